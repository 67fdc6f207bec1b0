"""No password is written or printed: a search's storage URL, given with its password (in
the URL or in the environment), against a real PostgreSQL server with scram-sha-256
password authentication; every output file, the resume folder and every stream are read
for the password."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from postgres import postgres_server

from prunella.methods.search.urls import hide_password, public_url, with_password

PASSWORD = "Pw-4xQ9-not-to-be-seen"

KILL_AFTER_BLOCK = """
import os, signal, sys
import prunella.engine.store as store
original = store.WorkDir.save_block
def save_block(self, index, *args):
    original(self, index, *args)
    if index == 0:
        os.kill(os.getpid(), signal.SIGKILL)
store.WorkDir.save_block = save_block
from prunella.cli import main
sys.exit(main(sys.argv[1:]))
"""

SEARCH = ("--sparsity", "0.6", "--allocation", "evopress", "--granularity", "layer",
          "--nsamples", "6", "--seqlen", "32", "--allocation-opt", "evaluations=12",
          "--allocation-opt", "offspring=4", "--allocation-opt", "survivors=2,1",
          "--allocation-opt", "tokens=64,128")  # fmt: skip


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """A PostgreSQL server that wants a password: its URL without the password."""
    with postgres_server(tmp_path_factory, password=PASSWORD) as url:
        yield url


def with_secret(url: str) -> str:
    return url.replace("postgres@", f"postgres:{PASSWORD}@", 1)


def environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PGPASSWORD", "PGPASSFILE")}
    env.pop("PRUNELLA_SEARCH_STORAGE", None)
    # no ~/.pgpass of the machine's user either
    return env | {"PRUNELLA_HOME": str(tmp_path / "home"), "HOME": str(tmp_path), **extra}


def prunella(argv: list[str], env: dict, script: str | None = None):
    command = [sys.executable, "-c", script, *argv] if script else [
        sys.executable, "-m", "prunella", *argv]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def files_holding(root: Path, secret: str) -> list[str]:
    """The files under ``root`` whose bytes contain ``secret``."""
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_the_password_is_dropped_from_the_recorded_url_and_kept_for_the_connection():
    url = f"postgresql+psycopg2://user:{PASSWORD}@db.example:5432/prunella"
    public = hide_password(url)
    assert (
        PASSWORD not in public and public == "postgresql+psycopg2://user@db.example:5432/prunella"
    )
    assert public_url(url) == public
    assert with_password(public) == url  # the connection gets it back, in this process
    assert hide_password("sqlite:////tmp/x/studies.db") == "sqlite:////tmp/x/studies.db"


def test_a_password_in_the_storage_url_is_never_written_or_printed(tiny_llama, secured, tmp_path):
    env = environment(tmp_path, PRUNELLA_SEARCH_GRACE="4")
    out = tmp_path / "out"
    storage = ["--allocation-opt", f"storage={with_secret(secured)}"]
    argv = ["prune", str(tiny_llama), "--out", str(out), *SEARCH, *storage,
            "--allocation-opt", "workers=2", "--quiet"]  # fmt: skip
    streams = []
    killed = prunella(argv, env, KILL_AFTER_BLOCK)  # a search (with a worker), one block
    streams += [killed.stdout, killed.stderr]
    assert killed.returncode == -9, killed.stderr
    partial = out.with_name("out.partial")
    assert (partial / "run.json").is_file()
    assert files_holding(partial, PASSWORD) == []
    # another storage: the refusal to resume names both URLs, neither with the password
    other = ["--allocation-opt", f"storage={with_secret(secured).replace('/prunella', '/other')}"]
    refused = prunella([*argv[: -len(storage) - 3], *other, *argv[-3:]], env)
    streams += [refused.stdout, refused.stderr]
    assert refused.returncode == 2
    assert "cannot resume" in refused.stderr and "postgres@127.0.0.1" in refused.stderr
    # the same storage resumes and finishes
    done = prunella(argv, env)
    streams += [done.stdout, done.stderr]
    assert done.returncode == 0, done.stderr
    assert not partial.exists()
    assert {"recipe.yaml", "report.html", "prune_report.json"} <= {p.name for p in out.iterdir()}
    assert "postgres@127.0.0.1" in (out / "recipe.yaml").read_text()
    assert files_holding(out, PASSWORD) == []
    assert files_holding(tmp_path / "home", PASSWORD) == []
    assert not any(PASSWORD in s for s in streams)


@pytest.mark.parametrize("given", ["PGPASSWORD", "PRUNELLA_SEARCH_STORAGE"])
def test_the_password_from_the_environment(tiny_llama, secured, tmp_path, given):
    value = PASSWORD if given == "PGPASSWORD" else with_secret(secured)
    env = environment(tmp_path, **{given: value})
    plan = tmp_path / "plan.json"
    argv = ["allocate", str(tiny_llama), *SEARCH, "--allocation-opt", f"storage={secured}",
            "--json", str(plan), "--quiet"]  # fmt: skip
    done = prunella(argv, env)
    assert done.returncode == 0, done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    assert files_holding(tmp_path, PASSWORD) == []
    assert '"evaluations": 12' in plan.read_text()


def test_no_password_is_one_line_naming_the_storage(tiny_llama, secured, tmp_path):
    argv = ["allocate", str(tiny_llama), *SEARCH, "--allocation-opt", f"storage={secured}",
            "--quiet"]  # fmt: skip
    failed = prunella(argv, environment(tmp_path))
    assert failed.returncode == 2
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot open search storage {secured}")
    assert "password" in lines[0]
