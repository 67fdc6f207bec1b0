"""Recipes: every option of ``prunella prune`` as one validated, serialisable object.

A recipe is YAML (read with ``yaml.safe_load``) whose keys are the long option
names of ``prunella prune`` with ``_`` for ``-``::

    model: smollm2-135m
    sparsity: 0.7
    solver: sparsegpt
    allocation: owl
    nsamples: 64
    seqlen: 512

Unknown keys and wrong types are errors that name the key. Options given on the
command line override the recipe, and every output folder holds the fully
resolved recipe (``recipe.yaml``) that reproduces the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import PrunellaError
from .patterns import check_sparsity

RECIPE = "recipe.yaml"


class Recipe(BaseModel):
    """The options of one prune, with their defaults."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="checkpoint folder or bundled name")
    out: str | None = Field(None, description="output folder")
    sparsity: float | None = Field(None, description="target, in [0, 1) (default 0.5)")
    pattern: str = "unstructured"
    solver: Literal["magnitude", "wanda", "sparsegpt"] = "sparsegpt"
    allocation: Literal["uniform", "owl", "alphapruning"] = "uniform"
    allocation_file: str | None = None
    granularity: Literal["block", "layer"] = "block"
    min_sparsity: float = Field(0.0, ge=0.0, lt=1.0)
    max_sparsity: float = Field(0.99, ge=0.0, lt=1.0)
    lam: float | None = Field(None, ge=0.0, description="OWL lambda")
    outlier_m: float | None = Field(None, gt=0.0, description="OWL M")
    epsilon: float | None = Field(None, ge=0.0, lt=1.0, description="AlphaPruning epsilon")
    farms: bool | None = None
    calib: str = "sample"
    nsamples: int = Field(128, ge=1)
    seqlen: int = Field(2048, ge=2)
    seed: int = 0
    device: str = "auto"
    batch_size: int | None = Field(None, ge=1)
    offload: Literal["auto", "none", "disk"] = "auto"
    passes: Literal["auto", 1, 2] = Field(
        "auto", description="forward passes per block: 1, 2 (the papers'), auto"
    )
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the calibration forward passes (on CPU: of their matmuls)"
    )
    save_format: Literal["dense", "packed"] = "dense"
    eval_data: str | None = Field(None, description="text to evaluate dense and pruned on")
    eval_max_windows: int | None = Field(None, ge=1)
    percdamp: float = Field(0.01, ge=0.0, description="SparseGPT dampening")
    blocksize: int = Field(128, ge=1, description="SparseGPT column block")

    @field_validator("sparsity")
    @classmethod
    def _sparsity_range(cls, value: float | None) -> float | None:
        return None if value is None else check_sparsity(value)

    def allocation_options(self) -> dict:
        given = {
            "lam": self.lam,
            "outlier_m": self.outlier_m,
            "epsilon": self.epsilon,
            "farms": self.farms,
        }
        return {key: value for key, value in given.items() if value is not None}

    def solver_options(self) -> dict:
        return (
            {"percdamp": self.percdamp, "blocksize": self.blocksize}
            if (self.solver == "sparsegpt")
            else {}
        )

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)


def _one_line(error: ValidationError, recipe: Path | None) -> PrunellaError:
    """The first validation error as one line naming the key (or flag) and the value."""
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return PrunellaError(f"recipe {recipe}: unknown key {key!r}")
    message = first["msg"].removeprefix("Value error, ")
    if "input" in first and repr(first["input"]) not in message:
        message += f" (got {first['input']!r})"
    where = f"recipe {recipe}: {key}" if recipe is not None else "--" + key.replace("_", "-")
    return PrunellaError(f"{where}: {message}")


def build(file: str | Path | None = None, **overrides) -> Recipe:
    """A recipe from a YAML file (optional) with ``overrides`` (``None`` = not given) on top."""
    values: dict = {}
    path = None
    if file is not None:
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
        values = dict(loaded or {})
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        Recipe(**given)  # flags first, so a bad flag is named as a flag
    except ValidationError as exc:
        if any(error["loc"][0] in given for error in exc.errors() if error["loc"]):
            raise _one_line(exc, None) from None
    try:
        return Recipe(**{**values, **given})
    except ValidationError as exc:
        raise _one_line(exc, path) from None
