"""Prunella: one-shot compression of causal language models, and where it goes."""

from .api import allocate, evaluate, heapr_to_dir, prune, prune_to_dir
from .api import load_model as load
from .errors import PrunellaError
from .io.export import save
from .io.pack import pack, unpack
from .methods.heapr import heapr
from .methods.plan import Plan
from .recipe import Recipe
from .version import __version__

__all__ = [
    "Plan",
    "PrunellaError",
    "Recipe",
    "__version__",
    "allocate",
    "evaluate",
    "heapr",
    "heapr_to_dir",
    "load",
    "pack",
    "prune",
    "prune_to_dir",
    "save",
    "unpack",
]
