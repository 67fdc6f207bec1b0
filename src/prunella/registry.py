"""Methods by name: each method is one module that declares its options next to its
function, and a registry binds a name to that module (PEFT's method registry).

A method module declares:

* ``PAPER``   -- the paper it implements, one line;
* ``NEEDS``   -- what it reads besides the weights' shapes (:mod:`prunella.engine.stats`:
  layer statistics, the weights' values, the model's loss, the KL fitness);
* ``OPTIONS`` -- a tuple of :class:`Option` (name, type, default, bounds, one-line help):
  the one place an option and its default are written; the method's functions take
  the options as keyword arguments without defaults, and the registry passes them all;

and the hooks of its kind (a solver's ``prune``, an allocation's ``allocate``, a row
method's ``prune``: see :mod:`prunella.methods`). A module may declare ``FALLBACK =
True``: it is what its registry falls back to where the calibration data is too thin
(an expert the router sends few tokens).

Built-in methods are listed in their package's ``__init__``; third-party packages add
theirs through the entry point groups (``prunella.solvers``, ``prunella.allocations``,
``prunella.rows``, ...; ``name = "package.module"``). Nothing outside a method's module
knows its options: the CLI, the recipe, the report and the pipeline read them here.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from .errors import PrunellaError, notice

TYPES = {"int": int, "float": float, "bool": bool, "str": str}
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class Option:
    """One option of a method: ``name`` of ``type``, ``default``, optional bounds or choices.

    ``low``/``high`` are inclusive unless ``low_open``/``high_open``; ``parse``, when
    given, must accept the value (raising ``ValueError`` on a bad one), e.g. a list in text;
    ``clean``, when given, maps the checked value to what the recipe records (a storage
    URL without its password).
    """

    name: str
    type: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | None = None
    parse: Callable[[Any], Any] | None = None
    old: tuple[str, ...] = ()  # former names, still accepted (with a notice)
    clean: Callable[[Any], Any] | None = None

    def bounds(self) -> str:
        """The allowed values, in words (``"in (0, 1)"``, ``"one of a, b"``, or ``""``)."""
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        if self.low is None and self.high is None:
            return ""
        left = ("(" if self.low_open else "[") + ("-inf" if self.low is None else f"{self.low:g}")
        right = ("inf" if self.high is None else f"{self.high:g}") + (
            ")" if self.high_open else "]"
        )
        return f"in {left}, {right}"

    def check(self, value: Any, owner: str) -> Any:
        """``value`` converted to :attr:`type` (from text too) and checked; one-line errors."""
        where = f"{owner} option {self.name!r}"
        if isinstance(value, str) and self.type is not str:
            text = value.strip().lower()
            try:
                if self.type is bool:
                    if text not in TRUE + FALSE:
                        raise ValueError
                    value = text in TRUE
                else:
                    value = self.type(text)
            except ValueError:
                raise PrunellaError(
                    f"{where} must be {self.type.__name__}, got {value!r}"
                ) from None
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.type) or (self.type is not bool and isinstance(value, bool)):
            raise PrunellaError(f"{where} must be {self.type.__name__}, got {value!r}")
        if self.parse is not None:
            try:
                self.parse(value)
            except ValueError as exc:
                raise PrunellaError(f"{where}: {exc} (got {value!r})") from None
        if self.choices is not None and value not in self.choices:
            raise PrunellaError(f"{where} must be {self.bounds()}, got {value!r}")
        low_bad = self.low is not None and (
            value < self.low or (self.low_open and value == self.low)
        )
        high_bad = self.high is not None and (
            value > self.high or (self.high_open and value == self.high)
        )
        if low_bad or high_bad:
            raise PrunellaError(f"{where} must be {self.bounds()}, got {value!r}")
        return self.clean(value) if self.clean is not None else value


@dataclass(frozen=True)
class Method:
    """A registered method: its ``kind`` (solver, allocation, rows, ...), name and module."""

    kind: str
    name: str
    module: ModuleType

    @property
    def needs(self) -> frozenset[str]:
        return frozenset(self.module.NEEDS)

    @property
    def needs_data(self) -> bool:
        """Whether it reads calibration data (anything but the weights' values)."""
        return bool(self.needs - {"weights"})

    @property
    def options(self) -> tuple[Option, ...]:
        return tuple(self.module.OPTIONS)

    @property
    def paper(self) -> str:
        return self.module.PAPER

    def defaults(self) -> dict:
        return {option.name: option.default for option in self.options}

    def resolve(self, given: dict | None) -> dict:
        """Every option's value: ``given`` (checked) over the defaults; unknown keys are errors.
        A former name of an option is taken for it, with a one-line notice."""
        declared = {option.name: option for option in self.options}
        given = dict(given or {})
        for option in self.options:
            for old in option.old:
                if old in given and option.name not in given:
                    notice(f"{self.kind} {self.name!r} option {old!r} is now {option.name!r}")
                    given[option.name] = given.pop(old)
        unknown = sorted(set(given) - set(declared))
        if unknown:
            allowed = ", ".join(declared) or "none"
            raise PrunellaError(
                f"{self.kind} {self.name!r} has no option {unknown[0]!r} (options: {allowed})"
            )
        owner = f"{self.kind} {self.name!r}"
        return {
            name: option.check(given[name], owner) if name in given else option.default
            for name, option in declared.items()
        }

    def call(self, hook: str, *args, **options):
        """The module's ``hook`` (``prune``, ``allocate``, ...) with ``options`` checked and
        every option not given at its declared default."""
        return getattr(self.module, hook)(*args, **self.resolve(options))

    def __getattr__(self, attr: str):
        """The module's hooks and constants (``prune``, ``allocate``, ``ratios``, ``METRIC``)."""
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(self.module, attr)


class Registry:
    """Name -> :class:`Method` for one kind: built-in modules, then entry points."""

    def __init__(self, kind: str, group: str, builtin: dict[str, ModuleType], hooks: tuple):
        self.kind, self.group, self.hooks = kind, group, hooks
        self.builtin = set(builtin)
        self._methods = {name: self._method(name, module) for name, module in builtin.items()}
        self._loaded = False

    def _method(self, name: str, module: ModuleType) -> Method:
        # hooks: the names every module declares, or alternatives (a tuple of such tuples)
        alternatives = self.hooks if isinstance(self.hooks[0], tuple) else (self.hooks,)
        missing = min(
            ([a for a in ("PAPER", "NEEDS", "OPTIONS", *hooks) if not hasattr(module, a)]
             for hooks in alternatives),
            key=len,
        )  # fmt: skip
        if missing:
            raise PrunellaError(
                f"{self.kind} {name!r} ({module.__name__}) does not declare {', '.join(missing)}"
            )
        return Method(self.kind, name, module)

    def _load_entry_points(self) -> None:
        """Third-party methods (entry point group :attr:`group`); built-in names win."""
        if self._loaded:
            return
        self._loaded = True
        for entry in importlib.metadata.entry_points(group=self.group):
            if entry.name in self._methods:
                continue
            try:
                module = entry.load()
            except Exception as exc:
                raise PrunellaError(
                    f"{self.kind} {entry.name!r} from entry point {entry.value!r} "
                    f"failed to import: {exc}"
                ) from None
            self._methods[entry.name] = self._method(entry.name, module)

    def names(self) -> list[str]:
        self._load_entry_points()
        return list(self._methods)

    def __iter__(self):
        return iter(self.names())

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def fallback(self) -> Method:
        """The method that declares ``FALLBACK = True``: what this kind falls back to
        where the calibration data is too thin."""
        found = [m for m in map(self.get, self.names()) if getattr(m.module, "FALLBACK", False)]
        builtin = [m for m in found if m.name in self.builtin]
        found = builtin or found  # a built-in fallback wins over a third party's
        if len(found) != 1:
            raise PrunellaError(f"{len(found)} {self.kind} methods declare FALLBACK, not one")
        return found[0]

    def get(self, name: str) -> Method:
        self._load_entry_points()
        try:
            return self._methods[name]
        except KeyError:
            raise PrunellaError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self._methods)}"
            ) from None


def parse_pairs(pairs: list[str] | None, flag: str) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` (repeated CLI options) as a dict of strings."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise PrunellaError(f"{flag} takes KEY=VALUE, got {pair!r}")
        options[key.strip().replace("-", "_")] = value.strip()
    return options


class MethodChoice(BaseModel):
    """A method by name, with its options (resolved: every option, defaults filled in)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


def _bare_name(value):
    return {"name": value} if isinstance(value, str) else value


def method_field(default: str, description: str) -> tuple:
    """A recipe field that names a method (``name``, or ``{name, options}``), for
    ``pydantic.create_model``."""
    return (
        Annotated[MethodChoice, BeforeValidator(_bare_name)],
        Field(MethodChoice(name=default), description=description),
    )
