"""Resumable runs: the work folder ``OUT_DIR.partial`` of a prune in progress.

After each block, and atomically (temporary name, then rename), the work folder
records what is needed to continue exactly where the run stopped:

* ``run.json``   -- the arguments that determine the result (the fingerprint);
* ``windows.safetensors`` -- the calibration token windows;
* ``plan.json``  -- the allocation plan;
* ``blocks/block-NNNNN.safetensors`` -- each finished block's pruned weights,
  under the checkpoint's own keys;
* ``hidden-NNNNN.safetensors`` -- the activations entering block ``NNNNN``;
* ``results.json`` -- the per-layer report rows so far;
* ``state.json`` -- the next block to prune, written last (the commit point).

A resumed run reloads all of this and produces the same model, weight for
weight, as an uninterrupted run. A run whose arguments differ from the
fingerprint is refused with the first differing argument named.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import PrunellaError
from .streaming import save_tensors


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class WorkDir:
    def __init__(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        self.path = out.with_name(out.name + ".partial")
        self.blocks = self.path / "blocks"

    def exists(self) -> bool:
        return (self.path / "state.json").is_file()

    def fingerprint(self) -> dict:
        return json.loads((self.path / "run.json").read_text(encoding="utf-8"))

    def check(self, fingerprint: dict) -> None:
        """Refuse to resume a run whose arguments differ, naming the first difference."""
        saved = self.fingerprint()
        for key in sorted(set(saved) | set(fingerprint)):
            if saved.get(key) != fingerprint.get(key):
                raise PrunellaError(
                    f"cannot resume {self.path}: {key} was {saved.get(key)!r} in the interrupted "
                    f"run, now {fingerprint.get(key)!r} (use --restart to discard that run)"
                )

    def start(self, fingerprint: dict, windows: torch.Tensor, plan: dict) -> None:
        self.discard()
        self.blocks.mkdir(parents=True)
        save_tensors({"windows": windows}, self.path / "windows.safetensors")
        _write_json(self.path / "plan.json", plan)
        _write_json(self.path / "run.json", fingerprint)
        _write_json(self.path / "results.json", [])
        _write_json(self.path / "state.json", {"next_block": 0})

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def next_block(self) -> int:
        return json.loads((self.path / "state.json").read_text(encoding="utf-8"))["next_block"]

    def windows(self) -> torch.Tensor:
        return load_file(self.path / "windows.safetensors")["windows"]

    def plan(self) -> dict:
        return json.loads((self.path / "plan.json").read_text(encoding="utf-8"))

    def results(self) -> list[dict]:
        return json.loads((self.path / "results.json").read_text(encoding="utf-8"))

    def save_json(self, name: str, data) -> None:
        _write_json(self.path / name, data)

    def load_json(self, name: str):
        return json.loads((self.path / name).read_text(encoding="utf-8"))

    def block_file(self, index: int) -> Path:
        return self.blocks / f"block-{index:05d}.safetensors"

    def hidden(self, index: int) -> list[torch.Tensor]:
        loaded = load_file(self.path / f"hidden-{index:05d}.safetensors")
        return [loaded[f"batch.{b}"] for b in range(len(loaded))]

    def save_block(
        self,
        index: int,
        tensors: dict[str, torch.Tensor],
        hidden: list[torch.Tensor],
        results: list[dict],
    ) -> None:
        """Record block ``index`` as finished: its weights, the next inputs, the report rows."""
        save_tensors(tensors, self.block_file(index))
        save_tensors(
            {f"batch.{b}": h for b, h in enumerate(hidden)},
            self.path / f"hidden-{index + 1:05d}.safetensors",
        )
        _write_json(self.path / "results.json", results)
        _write_json(self.path / "state.json", {"next_block": index + 1})
        stale = self.path / f"hidden-{index:05d}.safetensors"
        stale.unlink(missing_ok=True)
