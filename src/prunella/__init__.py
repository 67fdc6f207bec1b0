"""Prunella: one-shot pruning of causal language models, and where the sparsity goes."""

from .api import evaluate, prune, prune_to_dir
from .api import load_model as load
from .errors import PrunellaError
from .io.export import save
from .io.pack import pack, unpack
from .methods.heapr import heapr, heapr_to_dir
from .recipe import Recipe
from .version import __version__

__all__ = [
    "PrunellaError",
    "Recipe",
    "__version__",
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
