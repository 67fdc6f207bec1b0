"""The level database: every prunable layer pruned at a ladder of levels, on disk.

Sieberling et al., "EvoPress: Accurate Dynamic Model Compression via Evolutionary
Search", ICML 2025 (IST-DASLab/EvoPress, ``prune.py``).

Ladder (unstructured target ``s``): level ``l`` of a layer with ``n`` weights prunes
``round(s n) + l Δ`` of them, for integer ``l`` in ``[-L_lo, L_hi]``. The step ``Δ``
is the *same number of weights for every layer*, so one level up in one layer and
one down in another keep the model's number of zeros exactly. EvoPress's
defaults: at most ``num_levels = 8`` steps each way and
``Δ = floor(0.5 min(s, 1 - s) / num_levels · d²)`` with ``d`` the hidden size.
Levels stay within ``[min_sparsity, max_sparsity]``.

N:M ladders (EvoPress has none; ours): level ``l`` of a target ``N:M`` is the
pattern ``(N - l):M``, ``1 <= N - l <= M - 1``; one step is ``n / M`` weights, so a
budget-preserving switch pairs layers of the same size.

Each level is solved from the dense weight with the chosen solver and the
statistics of the *dense* model's inputs (every layer independently, as EvoPress
does: a candidate mixes levels freely, so no level may depend on another layer's
level). One file per layer, ``layers/NAME.safetensors`` with a tensor per level,
written atomically: a crashed build resumes at the first missing layer. A build is
keyed by the model, the calibration windows, the solver and its options, and the
ladder, and is reused by every search that asks for the same.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ...engine.forward import visit_blocks
from ...engine.stats import exact
from ...errors import PrunellaError
from ..sparsity.patterns import NM, Pattern, Unstructured

NUM_LEVELS = 8  # EvoPress's default (prune.py --num_levels)


@dataclass(frozen=True)
class Ladder:
    """The levels of every prunable layer: sparsity ``(base + l step) / size``."""

    target: float
    size: dict[str, int]
    base: dict[str, int]  # weights pruned at level 0
    step: dict[str, int]  # weights per level
    low: dict[str, int]  # the lowest level (<= 0)
    high: dict[str, int]  # the highest level (>= 0)
    m: int | None = None  # N:M ladders: M (and level l is (N - l):M)

    @property
    def names(self) -> list[str]:
        return list(self.size)

    def pruned(self, name: str, level: int) -> int:
        return self.base[name] + level * self.step[name]

    def sparsity(self, name: str, level: int) -> float:
        return self.pruned(name, level) / self.size[name]

    def pattern(self, name: str, level: int) -> Pattern:
        if self.m is not None:
            return NM(self.m - self.pruned(name, level) * self.m // self.size[name], self.m)
        return Unstructured(self.sparsity(name, level))

    def levels(self, name: str) -> range:
        return range(self.low[name], self.high[name] + 1)

    def mean_sparsity(self, levels: dict[str, int]) -> float:
        """The parameter-weighted sparsity of a candidate."""
        pruned = sum(self.pruned(n, levels[n]) for n in self.names)
        return pruned / sum(self.size.values())

    def to_json(self) -> dict:
        return asdict(self)

    def assignment(self, levels: dict[str, int]) -> tuple[dict[str, float], dict]:
        """A candidate's per-layer sparsities, and for an ``N:M`` ladder its levels."""
        values = {n: self.sparsity(n, levels[n]) for n in self.names}
        if self.m is None:
            return values, {}
        return values, {"nm": {n: [self.pattern(n, levels[n]).n, self.m] for n in self.names}}


def make_ladder(
    sizes: dict[str, int],
    pattern: Pattern,
    hidden_size: int,
    num_levels: int = NUM_LEVELS,
    step: int | None = None,
    lo: float = 0.0,
    hi: float = 0.99,
) -> Ladder:
    """The ladder around ``pattern``'s target for layers of ``sizes`` weights."""
    if isinstance(pattern, NM):
        m, n = pattern.m, pattern.n
        return Ladder(
            target=pattern.sparsity,
            size=dict(sizes),
            base={k: v * (m - n) // m for k, v in sizes.items()},
            step={k: v // m for k, v in sizes.items()},
            # (n - l):m within [1, m - 1] and within the clamp, at most num_levels away
            low={
                k: -min(num_levels, m - 1 - n, math.floor(round((1 - lo) * m, 9)) - n)
                for k in sizes
            },
            high={k: min(num_levels, n - 1, n - math.ceil(round((1 - hi) * m, 9))) for k in sizes},
            m=m,
        )
    s = pattern.sparsity
    if step is None:
        step = int(0.5 * min(s, 1 - s) / num_levels * hidden_size**2)
    step = max(1, step)
    base = {k: round(s * v) for k, v in sizes.items()}
    return Ladder(
        target=s,
        size=dict(sizes),
        base=base,
        step=dict.fromkeys(sizes, step),
        low={
            k: -min(num_levels, max(0, (base[k] - math.ceil(lo * v)) // step))
            for k, v in sizes.items()
        },
        high={
            k: min(num_levels, max(0, (math.floor(hi * v) - base[k]) // step))
            for k, v in sizes.items()
        },
    )


def database_key(**parts) -> str:
    """A short digest of what determines a database (or a dense reference)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _file_name(layer: str) -> str:
    return layer.replace("/", "_") + ".safetensors"


class LevelDatabase:
    """A built database in ``folder``: ``weight(layer, level)`` reads one pruned matrix
    (memory-mapped; the handles of the most recently read layers stay open)."""

    OPEN_FILES = 64

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        meta = self.folder / "ladder.json"
        if not (self.folder / "complete").exists() or not meta.is_file():
            raise PrunellaError(f"{self.folder} is not a finished level database")
        self.ladder = Ladder(**json.loads(meta.read_text()))
        self._handles: OrderedDict[str, object] = OrderedDict()

    def weight(self, layer: str, level: int) -> torch.Tensor:
        handle = self._handles.pop(layer, None)
        if handle is None:
            handle = safe_open(self.folder / "layers" / _file_name(layer), framework="pt")
        self._handles[layer] = handle
        while len(self._handles) > self.OPEN_FILES:
            self._handles.popitem(last=False)
        return handle.get_tensor(str(level))


def build_database(
    folder: str | Path,
    store,
    windows: torch.Tensor | None,
    solve,
    ladder: Ladder,
    *,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    progress: bool = True,
) -> LevelDatabase:
    """Compress every layer at every level of ``ladder`` with ``solve(weight, level,
    stats)`` (the searched axis's level solver: its ``name``, ``needs``) into ``folder``
    (or finish a build a crash interrupted), and open it."""
    folder = Path(folder)
    if (folder / "complete").exists():
        return LevelDatabase(folder)
    layers = folder / "layers"
    layers.mkdir(parents=True, exist_ok=True)
    (folder / "ladder.json").write_text(json.dumps(ladder.to_json()))
    if solve.needs and windows is None:
        raise PrunellaError(f"{solve.name!r} needs calibration data")

    def visit(prefix: str, block_layers: dict) -> None:
        for name, (weight, stats) in block_layers.items():
            path = layers / _file_name(name)
            if path.exists():
                continue
            dense = weight.detach().float()
            tensors = {}
            with exact(dense):
                for level in ladder.levels(name):
                    new = solve(dense.clone(), ladder.pattern(name, level), stats)
                    tensors[str(level)] = new.to(weight.dtype).cpu().contiguous()
            partial = path.with_suffix(".partial")
            save_file(tensors, partial)
            os.replace(partial, path)

    visit_blocks(
        store,
        visit,
        needs=solve.needs,
        windows=windows if solve.needs else None,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        progress=progress,
        desc=f"level database ({solve.name})",
    )
    (folder / "complete").write_text("")
    return LevelDatabase(folder)
