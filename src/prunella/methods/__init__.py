"""Compression axes and the methods that serve them.

An *axis* is one way of compressing a linear layer: sparsity (``sparsity/``, with its
solvers and ``rows/``) and bits (``bits/``, with its quantizers). Each is one package, a
module that declares:

* ``NAME``, ``ORDER`` (where it applies within a layer: structure, then sparsity,
  then bits) and ``DEFAULT`` (whether it applies when a recipe asks for no axis);
* ``FIELDS`` -- its recipe fields (``name -> (annotation, pydantic Field)``): the
  ``prune`` and ``allocate`` flags, the API's keywords and the recipe keys;
* ``METHODS`` -- which of those fields name a method, and the registry of each;
* ``budget(recipe, default) -> Budget | None`` -- what the recipe asks of it;
* ``fit(raw, shapes, budget) -> (values, detail)`` -- the budget fitter: per-layer raw
  ratios (the fraction of a layer's cost removed) to levels on the axis, meeting the
  budget exactly (``shapes``: each layer's ``(rows, cols)``);
* ``levels(plan, shapes)``, ``check(plan, shapes, budget, where)`` and
  ``layer_bytes(...)`` -- an axis plan's per-layer levels, its validation, its cost;
* ``compressor(recipe)`` -- what compresses one layer to its level (see
  :class:`Compressor`);
* ``report(recipe, plan, results)`` and ``record(recipe, plan)`` -- its part of the
  report (with a one-line ``summary``),
  and what the resolved recipe records once the plan is known;
* optionally ``ladder(...)`` and ``level_solver(recipe)`` -- the level database of
  the searches (:mod:`prunella.methods.search`); ``ALLOCATED = False`` -- allocation
  methods leave it uniform (a budget can say the same of itself: ``Budget.allocated``,
  the bits axis at a whole width).

A compressor's facts may hold ``tensors``: what the layer keeps beside its weight (the
bits axis's ``weight_scale``), kept apart from the report, saved with the block in the
resume folder and handed to the writer of the checkpoint.

The structure axis (``structure/``: blocks, MLP channels, KV groups and experts removed,
``--params``) is a package too, but not one of these: it changes the model's shapes and
config rather than one layer's weights, so it runs once, before the block loop, on the
whole model (:func:`prunella.methods.structure.shrink`), and the axes here then compress
the smaller model; it brings its recipe fields the same way (``structure.FIELDS``).

Every score-based allocation (:mod:`prunella.methods.allocation`) maps its scores to
raw ratios, which any axis's ``fit`` turns into levels: adding an axis touches its
own package, and registers it here or through the ``prunella.axes`` entry point group.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Protocol

import torch

from ..errors import PrunellaError
from ..registry import Registry
from . import bits, sparsity
from .plan import Budget

HOOKS = ("NAME", "ORDER", "DEFAULT", "FIELDS", "METHODS", "budget", "fit", "levels", "check",
         "layer_bytes", "compressor", "report", "record")  # fmt: skip


class Compressor(Protocol):
    """Compresses one layer on one axis: ``compressor(weight, level, stats, data_free)``
    returns the new weight (float32 ``[out, in]``) and facts for the report; with
    ``data_free`` (an expert with too few calibration tokens) it uses what needs no
    statistics, and ``data_free_note`` says what that was."""

    axis: str
    name: str
    needs: frozenset[str]
    data_free_note: str

    def __call__(
        self, weight: torch.Tensor, level, stats, data_free: bool = False
    ) -> tuple[torch.Tensor, dict]: ...

    def describe(self, level) -> dict: ...


@dataclass
class Axes:
    """The axes by name: the built-in ones, then the entry point group ``prunella.axes``."""

    builtin: dict[str, ModuleType]
    group: str = "prunella.axes"
    _axes: dict[str, ModuleType] = field(default_factory=dict)

    def _load(self) -> dict[str, ModuleType]:
        if not self._axes:
            found = dict(self.builtin)
            for entry in importlib.metadata.entry_points(group=self.group):
                if entry.name in found:
                    continue
                try:
                    module = entry.load()
                except Exception as exc:
                    raise PrunellaError(
                        f"axis {entry.name!r} from entry point {entry.value!r} failed to "
                        f"import: {exc}"
                    ) from None
                missing = [h for h in HOOKS if not hasattr(module, h)]
                if missing:
                    raise PrunellaError(
                        f"axis {entry.name!r} ({module.__name__}) does not declare "
                        f"{', '.join(missing)}"
                    )
                found[entry.name] = module
            self._axes = dict(sorted(found.items(), key=lambda item: item[1].ORDER))
        return self._axes

    def __iter__(self) -> Iterator[ModuleType]:
        return iter(self._load().values())

    def get(self, name: str) -> ModuleType:
        try:
            return self._load()[name]
        except KeyError:
            raise PrunellaError(
                f"unknown axis {name!r}; known: {', '.join(self._load())}"
            ) from None

    def method_registries(self) -> dict[str, Registry]:
        """Recipe field -> registry, for every field of every axis that names a method."""
        return {name: reg for axis in self for name, reg in axis.METHODS.items()}

    def fields(self) -> dict[str, tuple]:
        """Every axis's recipe fields, in axis order (one axis per field name)."""
        fields: dict[str, tuple] = {}
        for axis in self:
            for name, spec in axis.FIELDS.items():
                if name in fields:
                    raise PrunellaError(f"two axes declare the recipe field {name!r}")
                fields[name] = spec
        return fields

    def asked(self, recipe) -> dict[str, Budget]:
        """The budget of every axis the recipe asks for, in axis order."""
        asked = {axis.NAME: axis.budget(recipe, False) for axis in self}
        return {name: b for name, b in asked.items() if b is not None}

    def budgets(self, recipe) -> dict[str, Budget]:
        """The budgets the recipe asks for; when it asks for none, the default axes with
        their defaults."""
        return self.asked(recipe) or {
            axis.NAME: axis.budget(recipe, True) for axis in self if axis.DEFAULT
        }


AXES = Axes({sparsity.NAME: sparsity, bits.NAME: bits})


def compressors(recipe, names) -> list:
    """The compressors of the axes ``names`` (in axis order), one per axis; SparseGPT's
    joint sweep in place of the sparsity and bits ones when the recipe prunes with
    SparseGPT (uniform rows) and quantizes with ``--quantizer sparsegpt``
    (:class:`prunella.methods.bits.sparsegpt.JointSweep`)."""
    made = {name: AXES.get(name).compressor(recipe) for name in names}
    joint = (
        {"sparsity", "bits"} <= set(made)
        and recipe.quantizer.name == "sparsegpt"
        and recipe.solver.name == "sparsegpt"
        and recipe.rows.name == "uniform"
    )
    if not joint:
        return list(made.values())
    made["sparsity"] = bits.sparsegpt.JointSweep(made["sparsity"], made.pop("bits"))
    return list(made.values())
