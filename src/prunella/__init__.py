"""Prunella: one-shot compression of causal language models, and where it goes.

The names below are loaded on first use, so that ``prunella`` imports nothing heavy
until asked (the command line starts fast, and a broken third-party axis or method is
reported by it in one line).
"""

from importlib import import_module

from .errors import PrunellaError
from .version import __version__

_WHERE = {
    "allocate": ".api",
    "evaluate": ".api",
    "heapr_to_dir": ".api",
    "load": ".api",
    "prune": ".api",
    "prune_to_dir": ".api",
    "save": ".io.export",
    "pack": ".io.pack",
    "unpack": ".io.pack",
    "heapr": ".methods.heapr",
    "Plan": ".methods.plan",
    "Recipe": ".recipe",
}
__all__ = ["PrunellaError", "__version__", *_WHERE]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'prunella' has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name], __name__), "load_model" if name == "load" else name)
    globals()[name] = value
    return value
