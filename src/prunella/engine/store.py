"""Where the model lives while it is pruned: in memory, or streamed from its checkpoint.

Both stores have one interface, chosen once per run (:func:`open_store`):

* ``load(i)`` -- block ``i`` with its real weights; ``release(i)`` -- done with it;
* ``after_capture()`` -- the blocks' inputs are captured: what lies outside the
  blocks (embeddings, final norm, LM head) is not needed until the save;
* ``block_tensors(i)`` / ``restore(i, tensors)`` -- a block's weights under the
  checkpoint's keys, for the work folder and for resuming;
* ``write(folder, work)`` -- the checkpoint's weights and config.

:class:`MemoryStore` holds the whole model. :class:`StreamedStore` holds one
block: the model is built with its parameters on the ``meta`` device (no
memory), the tensors outside the blocks are read from the memory-mapped
safetensors shards for the capture and dropped after it, each block is read
just before it is pruned and dropped after it is saved to the work folder,
and the output is assembled from the work folder's block files (hard links)
plus the input's other tensors, copied one at a time. Peak memory is then one
block, or one non-block tensor, plus the calibration activations.

:class:`WorkDir` is the resume folder ``OUT.partial`` that both stores use.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ..errors import PrunellaError
from ..io.checkpoint import (
    ExpertParts,
    check_checkpoint,
    check_dense,
    checkpoint_key_map,
    empty_model,
    sparsity_format,
)
from ..io.faults import fault_point
from ..io.folders import write_json
from ..io.models import load, load_tokenizer
from ..io.safetensors_io import (
    CheckpointReader,
    ShardWriter,
    model_nbytes,
    save_tensors,
    write_index,
)
from .adapters import Adapter, adapter_for


def module_tensors(module: nn.Module, prefix: str, key_map: dict) -> dict:
    """Checkpoint key -> tensor for what ``module`` (named ``prefix...``) stores, tied
    duplicates once, fused experts split back into the checkpoint's per-expert tensors."""
    seen, out = set(), {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        full = prefix + name
        if full not in key_map or tensor.is_meta or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        key = key_map[full]
        if isinstance(key, ExpertParts):
            out.update(key.split(tensor.detach()))
        else:
            out[key] = tensor
    return out


class _Blocks:
    """What both stores share: the model's blocks and layers, by the adapter's names."""

    model: nn.Module
    adapter: Adapter
    key_map: dict[str, str | ExpertParts]

    def blocks(self) -> nn.ModuleList:
        return self.adapter.blocks(self.model)

    def layers(self) -> dict[str, tuple[int, int]]:
        return self.adapter.layers(self.model)

    def block_tensors(self, i: int) -> dict[str, torch.Tensor]:
        """Block ``i``'s weights under the checkpoint's keys."""
        return module_tensors(self.blocks()[i], f"{self.adapter.blocks_path}.{i}.", self.key_map)


class MemoryStore(_Blocks):
    """The whole model in memory."""

    offload = "none"

    def __init__(self, model: nn.Module, adapter: Adapter, path: Path | None = None) -> None:
        self.model, self.adapter, self.path = model, adapter, path
        self.key_map = (
            checkpoint_key_map(model, CheckpointReader(path))
            if path is not None and not sparsity_format(path)
            else {name: name for name in model.state_dict(keep_vars=True)}
        )

    def load(self, i: int) -> nn.Module:
        return self.blocks()[i]

    def release(self, i: int) -> None:
        pass

    def after_capture(self) -> None:
        pass

    def load_head(self) -> None:
        pass

    def restore(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        """Put a finished block's pruned weights (from the work folder) back."""
        for name, key in self.key_map.items():
            if isinstance(key, ExpertParts) and key.keys[0][0] in tensors:
                self.model.get_parameter(name).data.copy_(key.join(tensors.__getitem__))
            elif isinstance(key, str) and key in tensors:
                self.model.get_parameter(name).data.copy_(tensors[key])

    def run_bytes(self) -> int:
        """Bytes a run writes: the work folder's copy of the blocks, then the output."""
        return 2 * model_nbytes(self.model)

    def output_bytes(self) -> int:
        return model_nbytes(self.model)

    def write(self, folder: Path, work: WorkDir | None) -> None:
        self.model.save_pretrained(folder)


class StreamedStore(_Blocks):
    """One block in memory at a time, read from the checkpoint and written out when done."""

    offload = "disk"

    def __init__(self, path: Path, adapter: Adapter) -> None:
        if sparsity_format(path):
            raise PrunellaError(f"{path} is packed: streaming reads dense checkpoints only")
        self.path, self.adapter = path, adapter
        self.reader = CheckpointReader(path)
        self.model = empty_model(path)
        self.key_map = checkpoint_key_map(self.model, self.reader)
        # The capture runs the model up to the last block: the LM head (a second
        # embedding-sized matrix when untied) is never needed in memory.
        skip = (adapter.blocks_path, *self._untied_head())
        self._materialize(self.model, "", skip=skip)

    def _untied_head(self) -> tuple[str, ...]:
        """The name of the LM head module when it does not share the input embeddings."""
        head, embed = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        if head is None or (embed is not None and head.weight is embed.weight):
            return ()
        return tuple(name for name, module in self.model.named_modules() if module is head)

    def _materialize(self, module: nn.Module, prefix: str, skip: tuple[str, ...] = ()) -> None:
        """Read the parameters (and stored buffers) of ``module`` (named ``prefix...``).

        Submodules named in ``skip`` are left alone. Tied parameters are re-tied
        afterwards; any other parameter still empty is an error.
        """

        def skipped(name: str) -> bool:
            return any(name == s or name.startswith(s + ".") for s in skip)

        for name, sub in module.named_modules():
            if skipped(name):
                continue
            full = f"{prefix}{name}." if name else prefix
            for store in (sub._parameters, sub._buffers):
                for key, tensor in store.items():
                    if tensor is None or (full + key) not in self.key_map:
                        continue
                    source = self.key_map[full + key]
                    if isinstance(source, ExpertParts):
                        value, source = source.join(self.reader.tensor), full + key
                    else:
                        value = self.reader.tensor(source)
                    if tuple(value.shape) != tuple(tensor.shape):
                        raise PrunellaError(
                            f"tensor {source!r} has shape "
                            f"{tuple(value.shape)}, the model expects {tuple(tensor.shape)}"
                        )
                    if isinstance(tensor, nn.Parameter):
                        value = nn.Parameter(value, requires_grad=False)
                    store[key] = value
        if hasattr(module, "tie_weights"):
            module.tie_weights()
        for name, param in module.named_parameters():
            if param.is_meta and not skipped(name):
                raise PrunellaError(f"the checkpoint has no tensor for {prefix + name!r}")

    def load_head(self) -> None:
        """Read the LM head too (an allocation search makes logits before the pruning)."""
        head = self._untied_head()
        if head:
            self._materialize(self.model.get_submodule(head[0]), head[0] + ".")

    def load(self, i: int) -> nn.Module:
        block = self.blocks()[i]
        self._materialize(block, f"{self.adapter.blocks_path}.{i}.")
        return block

    def release(self, i: int) -> None:
        self.blocks()[i].to("meta")

    def after_capture(self) -> None:
        """Drop the parameters outside the blocks (embeddings, final norm, LM head) to the
        meta device; buffers (rotary frequencies) stay. The save copies them from the
        input checkpoint."""
        skip = self.adapter.blocks_path
        for name, sub in self.model.named_modules():
            if name == skip or name.startswith(skip + "."):
                continue
            for key, param in sub._parameters.items():
                if param is not None and not param.is_meta:
                    sub._parameters[key] = nn.Parameter(param.to("meta"), requires_grad=False)

    def restore(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        pass  # finished blocks stay in the work folder; the save links them from there

    def run_bytes(self) -> int:
        """Bytes a run writes: the blocks once (the output links the work folder's files),
        and the tensors outside them."""
        return self.reader.nbytes()

    def _outside(self) -> dict[str, str]:
        """Parameter name -> checkpoint key of the tensors outside the blocks."""
        block_prefix = self.adapter.blocks_path + "."
        return {
            n: k
            for n, k in self.key_map.items()
            if not n.startswith(block_prefix) and isinstance(k, str)
        }

    def _copy_block(self, i: int, path: Path) -> None:
        """Block ``i``'s tensors, as the input holds them, into one shard."""
        prefix = f"{self.adapter.blocks_path}.{i}."
        keys = {k for n, k in self.key_map.items() if n.startswith(prefix) and isinstance(k, str)}
        if any(n.startswith(prefix) and not isinstance(k, str) for n, k in self.key_map.items()):
            raise PrunellaError(f"internal: block {i} of {self.path} is stored in parts")
        writer = ShardWriter(path)
        for key in sorted(keys):
            writer.add(key, self.reader.tensor(key))
        writer.close()

    def output_bytes(self) -> int:
        """The tensors outside the blocks (the blocks' shards are links)."""
        tensors = self.model.state_dict(keep_vars=True)
        outside = {key: tensors[name] for name, key in self._outside().items()}
        return sum(t.numel() * t.element_size() for t in outside.values())

    def write(self, folder: Path, work: WorkDir | None) -> None:
        """One shard per finished block (hard links into the work folder, no copy; a block
        the run left as it is, copied from the input), and the tensors outside the blocks
        copied one at a time from the input into a last shard."""
        count = len(self.blocks()) + 1
        weight_map = {}
        for i in range(count - 1):
            shard = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            if work is not None and work.block_file(i).is_file():
                os.link(work.block_file(i), folder / shard)
            else:
                self._copy_block(i, folder / shard)
            with safe_open(folder / shard, framework="pt") as handle:
                weight_map.update(dict.fromkeys(handle.keys(), shard))
        shard = f"model-{count:05d}-of-{count:05d}.safetensors"
        writer = ShardWriter(folder / shard)
        for key in self._outside().values():
            if key not in weight_map:
                writer.add(key, self.reader.tensor(key))
                weight_map[key] = shard
        writer.close()
        write_index(
            folder, weight_map, sum((folder / f).stat().st_size for f in set(weight_map.values()))
        )
        self.model.config.save_pretrained(folder)
        if getattr(self.model, "generation_config", None) is not None:
            self.model.generation_config.save_pretrained(folder)


Store = MemoryStore | StreamedStore


def open_store(
    model: str | Path | nn.Module, offload: str = "auto", whole_model: bool = False, tokenizer=None
) -> tuple[Store, object]:
    """The store for ``model`` (a checkpoint, a bundled name or a loaded model), and its
    tokenizer. ``offload``: ``disk`` streams, ``none`` loads the whole model, ``auto``
    streams whenever the checkpoint's layout allows it, unless ``whole_model`` (an
    evaluation inside the run) needs it in memory."""
    if isinstance(model, nn.Module):
        return MemoryStore(model, adapter_for(model)), tokenizer
    path, adapter = check_checkpoint(model)
    check_dense(path)
    if offload == "disk" and whole_model:
        raise PrunellaError(
            "--eval-data needs the whole model in memory; it cannot run with --offload disk "
            "(evaluate the result with 'prunella eval' instead)"
        )
    if offload == "disk" or (offload == "auto" and not whole_model and not sparsity_format(path)):
        try:
            return StreamedStore(path, adapter), tokenizer or load_tokenizer(path)
        except PrunellaError:  # a layout that needs tensor conversions: load it whole
            if offload == "disk":
                raise
    hf_model, loaded_tokenizer, path, adapter = load(path)
    return MemoryStore(hf_model, adapter, path), tokenizer or loaded_tokenizer


def _flat(data: dict, prefix: str = "") -> dict:
    """Nested mappings as one mapping of dotted keys (``solver.options.percdamp``)."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


class WorkDir:
    """The work folder ``OUT.partial`` of a prune in progress, for resuming.

    After each block, and atomically (temporary name, then rename), it records:

    * ``run.json``   -- what determines the result (the fingerprint);
    * ``windows.safetensors`` -- the calibration token windows;
    * ``plan.json``  -- the allocation plan;
    * ``calibration.json`` -- what the windows were drawn from, for the report;
    * ``blocks/block-NNNNN.safetensors`` -- each finished block's pruned weights,
      under the checkpoint's own keys;
    * ``hidden-NNNNN.safetensors`` -- the activations entering block ``NNNNN``;
    * ``results.json`` -- the per-layer report rows so far;
    * ``state.json`` -- the next block to prune, written last (the commit point).

    A resumed run reloads all of this and produces the same model, weight for
    weight, as an uninterrupted run; a run whose fingerprint differs is refused,
    naming the first difference.
    """

    def __init__(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        self.path = out.with_name(out.name + ".partial")
        self.blocks = self.path / "blocks"
        # a streamed structure cut's checkpoint, which the run then streams (kept by start)
        self.structure = self.path / "structure"

    def exists(self) -> bool:
        return (self.path / "state.json").is_file()

    def check(self, fingerprint: dict) -> None:
        """Refuse to resume a run whose fingerprint differs, naming the first difference."""
        saved, fingerprint = _flat(self.load_json("run.json")), _flat(fingerprint)
        for key in sorted(set(saved) | set(fingerprint)):
            if saved.get(key) != fingerprint.get(key):
                raise PrunellaError(
                    f"cannot resume {self.path}: {key} was {saved.get(key)!r} in the interrupted "
                    f"run, now {fingerprint.get(key)!r} (use --restart to discard that run)"
                )

    def start(self, fingerprint: dict, windows: torch.Tensor, plan: dict) -> None:
        for entry in self.path.iterdir() if self.path.is_dir() else ():
            if entry != self.structure:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        self.blocks.mkdir(parents=True)
        save_tensors({"windows": windows}, self.path / "windows.safetensors")
        self.save_json("plan.json", plan)
        self.save_json("run.json", fingerprint)
        self.save_json("results.json", [])
        self.save_json("state.json", {"next_block": 0})

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def next_block(self) -> int:
        return self.load_json("state.json")["next_block"]

    def windows(self) -> torch.Tensor:
        return load_file(self.path / "windows.safetensors")["windows"]

    def save_json(self, name: str, data) -> None:
        write_json(self.path / name, data)

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    def load_json(self, name: str):
        return json.loads((self.path / name).read_text(encoding="utf-8"))

    def block_file(self, index: int) -> Path:
        return self.blocks / f"block-{index:05d}.safetensors"

    def extra(self, index: int) -> dict[str, torch.Tensor]:
        """What block ``index``'s layers keep beside their weights (none: empty)."""
        path = self.blocks / f"extra-{index:05d}.safetensors"
        return load_file(path) if path.is_file() else {}

    def hidden(self, index: int) -> list[torch.Tensor]:
        loaded = load_file(self.path / f"hidden-{index:05d}.safetensors")
        return [loaded[f"batch.{b}"] for b in range(len(loaded))]

    def save_block(
        self,
        index: int,
        tensors: dict[str, torch.Tensor],
        hidden: list[torch.Tensor],
        results: list[dict],
        extra: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Record block ``index`` as finished: its weights, the tensors its layers keep beside
        them (``extra``: the bits axis's scales), the next inputs, the report rows."""
        save_tensors(tensors, self.block_file(index))
        if extra:
            save_tensors(extra, self.blocks / f"extra-{index:05d}.safetensors")
        save_tensors(
            {f"batch.{b}": h for b, h in enumerate(hidden)},
            self.path / f"hidden-{index + 1:05d}.safetensors",
        )
        self.save_json("results.json", results)
        self.save_json("state.json", {"next_block": index + 1})
        (self.path / f"hidden-{index:05d}.safetensors").unlink(missing_ok=True)
        fault_point(f"block-saved-{index}")
