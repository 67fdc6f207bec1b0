"""Pattern parsing and exact mask selection."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunella.errors import PrunellaError
from prunella.methods.sparsity.patterns import (
    NM,
    Unstructured,
    lowest_k_mask,
    nm_mask,
    parse_pattern,
    row_balanced_mask,
)


def test_parse_valid():
    assert parse_pattern("unstructured", 0.7) == Unstructured(0.7)
    assert parse_pattern("unstructured") == Unstructured(0.5)
    assert parse_pattern("2:4") == NM(2, 4)
    assert parse_pattern(" 4:8 ").sparsity == 0.5
    assert parse_pattern("1:4").sparsity == 0.75
    assert parse_pattern("2:4", 0.5) == NM(2, 4)


@pytest.mark.parametrize(
    "text, sparsity, message",
    [
        ("4:2", None, "1 <= N < M"),
        ("0:4", None, "1 <= N < M"),
        ("2:0", None, "1 <= N < M"),
        ("4:4", None, "1 <= N < M"),
        ("2-4", None, "unknown pattern"),
        ("abc", None, "unknown pattern"),
        ("unstructured", -0.1, "[0, 1)"),
        ("unstructured", 1.0, "[0, 1)"),
        ("unstructured", 1.5, "[0, 1)"),
        ("2:4", 0.7, "conflicts"),
    ],
)
def test_parse_invalid(text, sparsity, message):
    with pytest.raises(PrunellaError, match=None) as info:
        parse_pattern(text, sparsity)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 12), cols=st.integers(1, 40), frac=st.floats(0, 1), seed=st.integers(0, 99)
)
def test_row_balanced_mask_is_exact_and_balanced(rows, cols, frac, seed):
    scores = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))
    k = int(frac * rows * cols)
    mask = row_balanced_mask(scores, k)
    assert mask.sum().item() == k
    per_row = mask.sum(1)
    assert per_row.max() - per_row.min() <= 1
    # within each row the pruned entries are the lowest ones
    for r in range(rows):
        if 0 < per_row[r] < cols:
            assert scores[r][mask[r]].max() <= scores[r][~mask[r]].min()


@settings(max_examples=40, deadline=None)
@given(numel=st.integers(1, 300), frac=st.floats(0, 1), seed=st.integers(0, 99))
def test_lowest_k_mask_is_exact(numel, frac, seed):
    scores = torch.rand(numel, generator=torch.Generator().manual_seed(seed)).view(1, -1)
    k = int(frac * numel)
    mask = lowest_k_mask(scores, k)
    assert mask.sum().item() == k
    if 0 < k < numel:
        assert scores[mask].max() <= scores[~mask].min()


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4), (3, 4), (1, 2)])
def test_nm_mask_groups(n, m):
    scores = torch.rand(6, 4 * m)
    mask = nm_mask(scores, n, m)
    groups = mask.view(6, 4, m)
    assert (groups.sum(-1) == m - n).all()
    kept = scores.view(6, 4, m).masked_fill(groups, float("inf"))
    pruned = scores.view(6, 4, m).masked_fill(~groups, float("-inf"))
    assert (pruned.max(-1).values <= kept.min(-1).values).all()


def test_nm_mask_needs_divisible_width():
    with pytest.raises(PrunellaError, match="multiple of 8"):
        nm_mask(torch.rand(2, 12), 4, 8)
