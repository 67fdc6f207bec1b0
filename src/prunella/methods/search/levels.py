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

Width ladders (EvoPress's quantization search, ``evo_quant_search.py``): the levels of a
layer are the bits axis's widths (2, 3, 4, 8; GGUF: 4, 8), level 0 the width the axis's
fitter gives it at equal ratios (as uniform as the average allows) and level ``l`` the
``l``-th width above (below, for ``l < 0``) it. A level costs the layer's bits at that
width with its scales counted (:func:`prunella.methods.bits.bits_per_weight`), and a
candidate fits when its bits are at most the average times the weights. EvoPress's
database has the widths 2 to 6 in steps of one and searches from a width, or, for a
fractional average, from the best of random mixes; ours holds the widths that
compressed-tensors and GGUF write, so steps differ in bits, and it starts from the
fitter's mix.

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
from ..bits import bits_per_weight, fit_widths, width_costs
from ..bits.grid import Grid, ggml_type
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
    kind: str = "sparsity"

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

    def key(self, name: str, level: int) -> str:
        """The level's tensor in the layer's database file."""
        return str(level)

    def to_json(self) -> dict:
        data = asdict(self)
        del data["kind"]  # the default: keeps the keys of databases built before widths
        return data

    def content(self) -> dict:
        """What decides the database's tensors (for its key): the whole ladder."""
        return self.to_json()

    def assignment(self, levels: dict[str, int]) -> tuple[dict[str, float], dict]:
        """A candidate's per-layer sparsities, and for an ``N:M`` ladder its levels."""
        values = {n: self.sparsity(n, levels[n]) for n in self.names}
        if self.m is None:
            return values, {}
        return values, {"nm": {n: [self.pattern(n, levels[n]).n, self.m] for n in self.names}}

    def for_ratios(self, units: dict[str, list[str]], ratio: dict[str, float]) -> dict[str, int]:
        """The layer levels nearest to per-unit sparsities ``ratio`` with the budget kept:
        each layer gets the real level ``x_l = (s_u n_l - base_l) / step_l + c`` (clipped
        to its range, ``c`` one shift making ``sum_l step_l x_l = 0``), rounded down, and
        the remaining steps go to the layers with the largest remainders."""
        names = self.names
        step = torch.tensor([self.step[n] for n in names], dtype=torch.float64)
        low = torch.tensor([self.low[n] for n in names], dtype=torch.float64)
        high = torch.tensor([self.high[n] for n in names], dtype=torch.float64)
        unit_of = {n: u for u, layers in units.items() for n in layers}
        raw = torch.tensor(
            [(ratio[unit_of[n]] * self.size[n] - self.base[n]) / self.step[n] for n in names],
            dtype=torch.float64,
        )
        a, b = (low - raw).min().item() - 1, (high - raw).max().item() + 1
        for _ in range(100):
            mid = (a + b) / 2
            a, b = (mid, b) if (step * (raw + mid).clamp(low, high)).sum() < 0 else (a, mid)
        exact = (raw + (a + b) / 2).clamp(low, high)
        levels = exact.floor()
        deficit = -(step * levels).sum().item()
        for i in (exact - levels).argsort(descending=True, stable=True).tolist():
            if deficit <= 0:
                break
            if levels[i] < high[i] and step[i] <= deficit:
                levels[i] += 1
                deficit -= step[i].item()
        return {n: int(v) for n, v in zip(names, levels.tolist(), strict=True)}


@dataclass(frozen=True)
class WidthLadder:
    """The widths of every quantized layer: level ``l`` of layer ``n`` is
    ``widths[start[n] + l]``; a candidate fits when its bits (scales counted) are at most
    ``average`` per weight."""

    target: float  # the ratio of the average (1 - average / 16), the allocations' scale
    average: float  # bits per weight, scales and zero points counted
    widths: list[int]
    size: dict[str, int]
    group: dict[str, int]  # each layer's group (GGML: its block of 32)
    start: dict[str, int]  # the index of each layer's level 0 in ``widths``
    symmetric: bool = True
    ggml: bool = False
    kind: str = "widths"

    @property
    def names(self) -> list[str]:
        return list(self.size)

    @property
    def low(self) -> dict[str, int]:
        return {n: -k for n, k in self.start.items()}

    @property
    def high(self) -> dict[str, int]:
        return {n: len(self.widths) - 1 - k for n, k in self.start.items()}

    def levels(self, name: str) -> range:
        return range(self.low[name], self.high[name] + 1)

    def width(self, name: str, level: int) -> int:
        index = self.start[name] + level
        if not 0 <= index < len(self.widths):
            raise PrunellaError(f"level {level} of {name!r} is outside its widths")
        return self.widths[index]

    def pattern(self, name: str, level: int) -> Grid:
        """The grid the level's layer is quantized on."""
        bits = self.width(name, level)
        ggml = ggml_type(bits, self.symmetric) if self.ggml else None
        return Grid(bits, self.group[name], self.symmetric, ggml)

    def cost(self, name: str, level: int) -> float:
        """The layer's bits at ``level``, scales counted."""
        bits = bits_per_weight(self.width(name, level), self.group[name], self.symmetric, self.ggml)
        return bits * self.size[name]

    @property
    def total(self) -> float:
        """The most bits a candidate may take."""
        return self.average * sum(self.size.values())

    def key(self, name: str, level: int) -> str:
        """The level's tensor in the layer's database file: its width, so that searches
        of other averages (other starts) share one database."""
        return str(self.width(name, level))

    def to_json(self) -> dict:
        return asdict(self)

    def content(self) -> dict:
        """What decides the database's tensors: not the average or the start."""
        data = self.to_json()
        for moot in ("target", "average", "start"):
            del data[moot]
        return data

    def assignment(self, levels: dict[str, int]) -> tuple[dict[str, float], dict]:
        """A candidate's widths, and the bits plan's groups, symmetry and GGML types."""
        values = {n: float(self.width(n, levels[n])) for n in self.names}
        detail = {
            "group": dict(self.group),
            "symmetric": dict.fromkeys(self.names, self.symmetric),
        }
        if self.ggml:
            detail["ggml"] = {n: ggml_type(int(v), self.symmetric) for n, v in values.items()}
        return values, detail

    def for_ratios(self, units: dict[str, list[str]], ratio: dict[str, float]) -> dict[str, int]:
        """The layer levels of per-unit ratios (fractions of 16 bits removed), by the bits
        axis's fitter (:func:`prunella.methods.bits.fit`) on this ladder's costs."""
        names = self.names
        unit_of = {n: u for u, layers in units.items() for n in layers}
        raw = torch.tensor([ratio[unit_of[n]] for n in names], dtype=torch.float64)
        sizes = torch.tensor([self.size[n] for n in names], dtype=torch.float64)
        groups = [self.group[n] for n in names]
        cost = width_costs(sizes, groups, self.widths, self.symmetric, self.ggml)
        widths = torch.tensor(self.widths, dtype=torch.float64)
        index = fit_widths(raw, cost, widths, self.total)
        return {n: k - self.start[n] for n, k in zip(names, index.tolist(), strict=True)}


LADDERS = {"sparsity": Ladder, "widths": WidthLadder}


def ladder_from_json(data: dict) -> Ladder | WidthLadder:
    """A ladder as :meth:`to_json` wrote it (a database's ``ladder.json``)."""
    return LADDERS[data.get("kind", "sparsity")](**data)


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
    """A built database in ``folder``: ``weight(layer, level)`` reads one compressed
    matrix (memory-mapped; the handles of the most recently read layers stay open).
    ``ladder`` reads levels as the search's ladder (default: the one it was built for;
    a width ladder of another average shares the database)."""

    OPEN_FILES = 64

    def __init__(self, folder: str | Path, ladder: Ladder | WidthLadder | None = None) -> None:
        self.folder = Path(folder)
        meta = self.folder / "ladder.json"
        if not (self.folder / "complete").exists() or not meta.is_file():
            raise PrunellaError(f"{self.folder} is not a finished level database")
        self.ladder = ladder or ladder_from_json(json.loads(meta.read_text()))
        self._handles: OrderedDict[str, object] = OrderedDict()

    def weight(self, layer: str, level: int) -> torch.Tensor:
        handle = self._handles.pop(layer, None)
        if handle is None:
            handle = safe_open(self.folder / "layers" / _file_name(layer), framework="pt")
        self._handles[layer] = handle
        while len(self._handles) > self.OPEN_FILES:
            self._handles.popitem(last=False)
        return handle.get_tensor(self.ladder.key(layer, level))


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
        return LevelDatabase(folder, ladder)
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
                    tensors[ladder.key(name, level)] = new.to(weight.dtype).cpu().contiguous()
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
    return LevelDatabase(folder, ladder)
