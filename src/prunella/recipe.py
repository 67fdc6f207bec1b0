"""Recipes: every option of ``prunella prune`` as one validated, serialisable object.

A recipe is YAML (read with ``yaml.safe_load``) whose keys are the long option
names of ``prunella prune`` with ``_`` for ``-``. A field that names a method (the
allocation; the solver and the row method of the sparsity axis; ...) is a name and
that method's own options (declared by the method's module, see
:mod:`prunella.registry`); a bare name means the method's defaults::

    model: smollm2-135m
    sparsity: 0.7
    solver: {name: sparsegpt, options: {percdamp: 0.01}}
    allocation: owl
    nsamples: 64
    seqlen: 512

Unknown keys, wrong types and unknown method options are errors that name the
key. Options given on the command line override the recipe, and every output
folder holds the fully resolved recipe (``recipe.yaml``) that reproduces the run.
This class is the one list of options: the CLI's ``prune`` flags, the Python
API's keyword arguments and the report are all derived from it. Its fields are the
general ones below and every compression axis's own (:mod:`prunella.methods`: the
sparsity axis brings ``sparsity``, ``pattern``, ``solver``, ``rows``, ...), so an
axis added as a package brings its flags, keywords and recipe keys with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from .errors import PrunellaError
from .methods import AXES, structure
from .methods.allocation import ALLOCATIONS
from .registry import MethodChoice, Registry, method_field


class _Recipe(BaseModel):
    """What every recipe shares: forbidden extras, the checks, the resolution."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("passes", mode="before", check_fields=False)
    @classmethod
    def _passes_number(cls, value):
        return int(value) if value in ("1", "2") else value

    def resolved(self) -> Recipe:
        """This recipe with the methods' names checked and every option filled in."""
        update = {}
        for field, methods in METHOD_FIELDS.items():
            chosen = getattr(self, field)
            method = methods.get(chosen.name)
            update[field] = MethodChoice(name=method.name, options=method.resolve(chosen.options))
        quantized = "bits" in AXES.asked(self)
        if self.format == "auto":
            update["format"] = "compressed-tensors" if quantized else "hf"
        elif self.format == "compressed-tensors" and not quantized:
            raise PrunellaError("--format compressed-tensors needs --bits")
        return self.model_copy(update=update)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)


FRONT = {
    "model": (str | None, Field(None, description="Checkpoint folder, or a bundled name.")),
    "out": (str | None, Field(None, description="Output folder for the compressed checkpoint.")),
}
GENERAL = {
    "allocation": method_field("uniform", "Where the compression goes (see 'prunella methods')."),
    "allocation_file": (
        str | None,
        Field(None, description="A plan from 'prunella allocate --json' (overrides --allocation)."),
    ),
    "granularity": (
        Literal["block", "layer", "expert"],
        Field(
            "block",
            description="One ratio per block, per layer, or per expert (each expert of a "
            "mixture of experts, and the rest of its block).",
        ),
    ),
    "expert_min_tokens": (
        int,
        Field(
            16,
            ge=0,
            description="An expert that the router sends fewer calibration tokens than this is "
            "compressed without calibration data (noted in the report).",
        ),
    ),
    "calib": (
        str,
        Field(
            "sample",
            description="Calibration data: a text, JSONL or Parquet file, a datasets folder, "
            "'sample' (shipped), wikitext2 or c4.",
        ),
    ),
    "text_field": (
        str,
        Field(
            "text",
            description="The text field of JSONL/Parquet/datasets records (or chat messages).",
        ),
    ),
    "nsamples": (int, Field(128, ge=1, description="Number of calibration windows.")),
    "seqlen": (int, Field(2048, ge=2, description="Tokens per calibration window.")),
    "seed": (int, Field(0, description="Seed for drawing the calibration windows.")),
    "device": (str, Field("auto", description="auto, cpu, cuda or cuda:N.")),
    "batch_size": (
        int | None,
        Field(
            None, ge=1, description="Windows per forward pass (default: 4096 tokens' worth on CPU)."
        ),
    ),
    "offload": (
        Literal["auto", "none", "disk"],
        Field(
            "auto",
            description="none (model in memory), disk (one block at a time), auto (disk when "
            "the checkpoint allows it and --eval-data is not given).",
        ),
    ),
    "passes": (
        Literal["auto", 1, 2],
        Field(
            "auto",
            description="Forward passes per block: 1, 2 (the papers'), or auto (1 when the "
            "waiting activations take at most 4 GiB).",
        ),
    ),
    "compute_dtype": (
        Literal["auto", "float32", "bfloat16", "float16"],
        Field(
            "auto",
            description="dtype of the calibration forward passes (on a CPU: of their matmuls "
            "only).",
        ),
    ),
    "format": (
        Literal["auto", "hf", "sparse-bitmask", "compressed-tensors", "gguf"],
        Field(
            "auto",
            description="What is written: hf (a plain Hugging Face checkpoint), "
            "sparse-bitmask (packed zeros), compressed-tensors (packed integer weights) or "
            "gguf (one model.gguf file for llama.cpp); auto: compressed-tensors with --bits, "
            "else hf.",
        ),
    ),
    "gguf_type": (
        Literal["f32", "f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"],
        Field(
            "f16",
            description="GGML type of the decoder blocks' weights in a gguf output (q types "
            "round to nearest, by the gguf package).",
        ),
    ),
    "eval_data": (
        str | None,
        Field(None, description="Evaluate perplexity before and after compression on this text."),
    ),
    "eval_max_windows": (
        int | None,
        Field(None, ge=1, description="At most this many eval windows."),
    ),
}
# the recipe fields that name a method, with the registry each is looked up in
METHOD_FIELDS: dict[str, Registry] = {"allocation": ALLOCATIONS, **AXES.method_registries()}
_AXIS_FIELDS = {**structure.FIELDS, **AXES.fields()}
_CLASH = sorted(set(_AXIS_FIELDS) & (set(FRONT) | set(GENERAL)))
if _CLASH:
    raise PrunellaError(f"an axis declares the recipe field {_CLASH[0]!r}, a general option")
Recipe = create_model("Recipe", __base__=_Recipe, **FRONT, **_AXIS_FIELDS, **GENERAL)
Recipe.__doc__ = "The options of one run, with their defaults (general and every axis's)."


def _one_line(error: ValidationError, recipe: Path | None) -> PrunellaError:
    """The first validation error as one line naming the key (or flag) and the value."""
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        where = f"recipe {recipe}" if recipe is not None else "options"
        return PrunellaError(f"{where}: unknown key {key!r}")
    message = first["msg"].removeprefix("Value error, ")
    if "input" in first and repr(first["input"]) not in message:
        message += f" (got {first['input']!r})"
    where = f"recipe {recipe}: {key}" if recipe is not None else "--" + key.replace("_", "-")
    return PrunellaError(f"{where}: {message}")


def read_yaml(file: str | Path) -> dict:
    """The mapping in a recipe file (``yaml.safe_load``), with one-line errors."""
    path = Path(file)
    if not path.is_file():
        raise PrunellaError(f"recipe {path} not found")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise PrunellaError(
            f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}"
        ) from None
    if loaded is not None and not isinstance(loaded, dict):
        raise PrunellaError(f"recipe {path} must be a mapping of option: value")
    return dict(loaded or {})


FORMAT_ALIASES = {"dense": "hf", "packed": "sparse-bitmask"}  # the names before --format


def _renamed(values: dict, where: str) -> dict:
    """``values`` with the earlier spelling ``save_format`` (``dense``, ``packed``) as
    ``format`` (``hf``, ``sparse-bitmask``)."""
    values = dict(values)
    if values.get("save_format") is not None:
        if values.get("format") is not None:
            raise PrunellaError(f"{where}: give format or save_format (its old name), not both")
        values["format"] = values.pop("save_format")
    values.pop("save_format", None)
    if isinstance(values.get("format"), str):
        values["format"] = FORMAT_ALIASES.get(values["format"], values["format"])
    return values


def _merge_method(base, name: str | None, options: dict | None, default: str):
    """A method choice from the recipe's (or the ``default`` method), a new name (its
    options restart unless it is the same method) and options given on top."""
    if isinstance(base, str):
        base = {"name": base}
    base = dict(base or {"name": default})
    if name is not None and name != base.get("name"):
        base = {"name": name}
    if options:
        base["options"] = {**(base.get("options") or {}), **options}
    return base


def build(
    file: str | Path | None = None,
    *,
    method_options: dict[str, dict] | None = None,
    **overrides,
) -> Recipe:
    """A resolved recipe from a YAML file (optional) with ``overrides`` (``None`` = not
    given) on top; a method field (``solver``, ``allocation``, ``rows``, ...) may be a
    name or ``{name, options}``, and ``method_options[field]`` (or the keyword
    ``FIELD_options``) adds options to the chosen method."""
    method_options = dict(method_options or {})
    for field in METHOD_FIELDS:
        extra = overrides.pop(f"{field}_options", None)
        if extra:
            method_options[field] = {**method_options.get(field, {}), **extra}
    values = _renamed(read_yaml(file), f"recipe {file}") if file is not None else {}
    path = Path(file) if file is not None else None
    given = _renamed({k: v for k, v in overrides.items() if v is not None}, "options")
    extra = {f: method_options.get(f) for f in METHOD_FIELDS}
    for key, options in extra.items():
        flag = given.pop(key, None)
        if isinstance(flag, dict | MethodChoice):
            flag = dict(flag) if isinstance(flag, dict) else flag.model_dump()
            options = {**(flag.get("options") or {}), **(options or {})}
            flag = flag.get("name")
        if flag is not None or options:
            default = Recipe.model_fields[key].default.name
            given[key] = _merge_method(values.get(key), flag, options, default)
    try:
        Recipe(**given)  # flags first, so a bad flag is named as a flag
    except ValidationError as exc:
        if any(error["loc"][0] in given for error in exc.errors() if error["loc"]):
            raise _one_line(exc, None) from None
    try:
        recipe = Recipe(**{**values, **given})
    except ValidationError as exc:
        raise _one_line(exc, path) from None
    return recipe.resolved()
