"""Sparsity patterns: the constraint a pruning mask must satisfy.

* :class:`Unstructured` -- a fraction ``sparsity`` of the weights is zero; which
  weights compete with each other (the whole matrix, each output row, a block
  of columns) is the solver's choice, as in its paper.
* :class:`NM` -- ``N:M`` semi-structured sparsity (NVIDIA's convention): in every
  group of ``M`` consecutive weights along the input dimension of a row, at most
  ``N`` are non-zero, so at least ``M - N`` are zero. ``2:4`` is 50% sparse.
* :class:`RowBudget` -- row ``r`` of the layer loses exactly ``counts[r]`` weights
  (per-row budgets, as chosen by TRIM; see :mod:`prunella.methods.rows`).

Masks are boolean tensors shaped like the weight, ``True`` where a weight is
pruned. The helpers here pick the lowest-scoring weights exactly: a target of
``k`` pruned weights gives exactly ``k``, ties broken by position.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ...errors import PrunellaError


@dataclass(frozen=True)
class Unstructured:
    sparsity: float

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)

    def __str__(self) -> str:
        return "unstructured"


@dataclass(frozen=True)
class NM:
    n: int
    m: int

    def __post_init__(self) -> None:
        if not (self.m >= 2 and 1 <= self.n < self.m):
            raise PrunellaError(
                f"pattern {self.n}:{self.m} is impossible: N:M needs 1 <= N < M (e.g. 2:4, 4:8)"
            )

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


@dataclass(frozen=True, eq=False)
class RowBudget:
    counts: torch.Tensor  # int64 [rows]: weights pruned in each row
    cols: int

    def __post_init__(self) -> None:
        counts = self.counts
        if counts.ndim != 1 or counts.is_floating_point() or counts.is_complex():
            raise PrunellaError("row budgets must be a 1-D tensor of integer counts")
        if bool((counts < 0).any() | (counts > self.cols).any()):
            raise PrunellaError(f"row budgets must be counts in [0, {self.cols}] per row")

    @property
    def sparsity(self) -> float:
        return int(self.counts.sum()) / (self.counts.numel() * self.cols)

    def __str__(self) -> str:
        return "per-row"


Pattern = Unstructured | NM | RowBudget


def check_sparsity(sparsity: float) -> float:
    """Return ``sparsity`` if it lies in [0, 1), else raise a one-line error."""
    if not isinstance(sparsity, int | float) or not (0.0 <= float(sparsity) < 1.0):
        raise PrunellaError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return float(sparsity)


_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(text: str, sparsity: float | None = None) -> Pattern:
    """Parse ``"unstructured"`` (with ``sparsity``) or ``"N:M"`` such as ``"2:4"``.

    For ``N:M`` the sparsity is implied (``1 - N/M``); a different explicit
    ``sparsity`` is an error rather than silently ignored.
    """
    text = str(text).strip().lower()
    if text == "unstructured":
        return Unstructured(check_sparsity(0.5 if sparsity is None else sparsity))
    match = _NM_RE.match(text)
    if not match:
        raise PrunellaError(
            f"unknown pattern {text!r}: use 'unstructured' or N:M with integers, e.g. '2:4'"
        )
    pattern = NM(int(match.group(1)), int(match.group(2)))
    if sparsity is not None and abs(check_sparsity(sparsity) - pattern.sparsity) > 1e-9:
        raise PrunellaError(
            f"sparsity {sparsity} conflicts with pattern {pattern}, which is "
            f"{pattern.sparsity:.2%} sparse; drop --sparsity or pick another N:M"
        )
    return pattern


def pruned_count(numel: int, sparsity: float) -> int:
    """Number of weights to prune: ``round(sparsity * numel)``, exact for the budget."""
    return round(sparsity * numel)


def pattern_count(pattern: Pattern, shape: tuple[int, int]) -> int:
    """How many weights ``pattern`` prunes in a matrix of ``shape``."""
    if isinstance(pattern, RowBudget):
        return int(pattern.counts.sum())
    if isinstance(pattern, NM):
        return shape[0] * (shape[1] // pattern.m) * (pattern.m - pattern.n)
    return pruned_count(shape[0] * shape[1], pattern.sparsity)


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` lowest entries of ``scores`` over the whole tensor."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        idx = torch.topk(scores.flatten(), k, largest=False, sorted=False).indices
        mask[idx] = True
    return mask.view_as(scores)


def row_balanced_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of exactly ``k`` entries of a 2-D ``scores``, spread as evenly as possible over rows.

    Every row loses ``k // rows`` of its lowest entries; the ``k % rows`` leftover
    weights go to the rows whose next-lowest entry is smallest. This is the
    per-output comparison group of Wanda, made exact for the layer's budget.
    """
    rows, cols = scores.shape
    base, extra = divmod(k, rows)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    take = min(base + (1 if extra else 0), cols)
    if take == 0:
        return mask
    values, idx = torch.topk(scores, take, dim=1, largest=False, sorted=True)
    if base:
        mask.scatter_(1, idx[:, :base], True)
    if extra:
        rows_extra = torch.topk(values[:, base], extra, largest=False, sorted=False).indices
        mask[rows_extra, idx[rows_extra, base]] = True
    return mask


def row_counts_mask(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mask of the ``counts[r]`` lowest entries of each row ``r`` of a 2-D ``scores``
    (ties broken by position)."""
    order = torch.sort(scores, dim=1, stable=True).indices
    ranks = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(1, order, ranks < counts.to(scores.device).unsqueeze(1))


def pattern_mask(scores: torch.Tensor, pattern: Pattern, per_row: bool = False) -> torch.Tensor:
    """The mask of ``pattern`` that prunes the lowest ``scores``: per group of ``M`` for
    ``N:M``, per row for row budgets, and for unstructured sparsity over the whole
    matrix, or row by row (:func:`row_balanced_mask`) when ``per_row``."""
    if isinstance(pattern, NM):
        return nm_mask(scores, pattern.n, pattern.m)
    if isinstance(pattern, RowBudget):
        if pattern.counts.shape[0] != scores.shape[0] or pattern.cols != scores.shape[1]:
            raise PrunellaError(
                f"row budgets for {pattern.counts.shape[0]} x {pattern.cols} given for a "
                f"{scores.shape[0]} x {scores.shape[1]} layer"
            )
        return row_counts_mask(scores, pattern.counts)
    k = pruned_count(scores.numel(), pattern.sparsity)
    return row_balanced_mask(scores, k) if per_row else lowest_k_mask(scores, k)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask pruning the ``m - n`` lowest of every ``m`` consecutive entries in each row."""
    rows, cols = scores.shape
    if cols % m:
        raise PrunellaError(
            f"pattern {n}:{m} needs the input dimension to be a multiple of {m}, got {cols}"
        )
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.topk(groups, m - n, dim=2, largest=False, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, idx, True)
    return mask.reshape(rows, cols)
