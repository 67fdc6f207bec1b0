"""A throwaway PostgreSQL server for tests, on loopback, started from Debian's binaries.

Use the session fixture ``postgres_url`` (import it into a conftest or test module with
``from postgres import postgres_url  # noqa: F401``) to get a SQLAlchemy URL such as
``postgresql+psycopg2://postgres@127.0.0.1:PORT/prunella``, or the context manager
``postgres_server(tmp_path_factory)`` directly.

initdb, pg_ctl and postgres refuse to run as root, so when the tests run as root they run as
Debian's ``postgres`` system user (``runuser``, else ``setpriv``) on a data directory in /tmp
that user owns: pytest's own temp dirs are mode 0700 root and unreachable for it. A missing
PostgreSQL fails the test (no skip): .ci/run installs Debian's ``postgresql`` package.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

DATABASE = "prunella"
SUPERUSER = "postgres"
_SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes, with ".s.PGSQL.NNNNN" appended


def _version_key(bindir: str) -> tuple[int, ...]:
    match = re.search(r"/postgresql/(\d+(?:\.\d+)*)/", bindir + "/")
    return tuple(int(p) for p in match.group(1).split(".")) if match else ()


def find_bindir() -> Path | None:
    """The directory with initdb and pg_ctl: the highest /usr/lib/postgresql/*/bin, else
    ``pg_config --bindir``, else wherever pg_ctl is on PATH."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    if shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["pg_config", "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            candidates.append(out)
    if shutil.which("pg_ctl"):
        candidates.append(str(Path(shutil.which("pg_ctl")).resolve().parent))
    for d in candidates:
        if all(os.access(os.path.join(d, exe), os.X_OK) for exe in ("initdb", "pg_ctl")):
            return Path(d)
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user() -> list[str]:
    """Command prefix that runs initdb/pg_ctl as a user they accept (none unless root)."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SUPERUSER)
    except KeyError:
        pytest.fail(
            f"PostgreSQL tests run as root need the '{SUPERUSER}' system user (created by "
            "Debian's postgresql package) to run initdb/postgres as; it does not exist",
            pytrace=False,
        )
    if shutil.which("runuser"):
        return ["runuser", "-u", SUPERUSER, "--"]
    if shutil.which("setpriv"):
        return ["setpriv", f"--reuid={SUPERUSER}", f"--regid={SUPERUSER}", "--init-groups", "--"]
    pytest.fail("running as root but neither runuser nor setpriv is available", pytrace=False)


def _run(cmd: list[str], what: str, log: Path | None = None, **kw) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)
    if proc.returncode != 0:
        detail = (proc.stdout + proc.stderr).strip()
        if log is not None and log.exists():
            detail += "\n--- server log ---\n" + log.read_text(errors="replace")[-4000:]
        pytest.fail(f"PostgreSQL {what} failed (exit {proc.returncode}):\n{detail}", pytrace=False)


@contextlib.contextmanager
def postgres_server(
    tmp_path_factory: pytest.TempPathFactory, password: str | None = None
) -> Iterator[str]:
    """Start a fresh PostgreSQL server on 127.0.0.1 at a free port, yield its SQLAlchemy
    URL (database ``prunella``, user ``postgres``; trust auth, or with ``password``
    scram-sha-256 password auth and the URL without the password), stop it on exit."""
    bindir = find_bindir()
    if bindir is None:
        pytest.fail(
            "PostgreSQL is not installed (no initdb/pg_ctl in /usr/lib/postgresql/*/bin, "
            "pg_config --bindir or PATH): apt-get install postgresql (.ci/run does)",
            pytrace=False,
        )
    prefix = _as_server_user()
    if prefix:  # root: a directory the postgres user can reach and owns
        base = Path(tempfile.mkdtemp(prefix="prunella-pg-"))
        pw = pwd.getpwnam(SUPERUSER)
        os.chown(base, pw.pw_uid, pw.pw_gid)
    else:
        base = tmp_path_factory.mktemp("postgres")
    data, log = base / "data", base / "server.log"
    # Unix sockets only in our own directory; none at all if its path is too long.
    sockets = str(base) if len(str(base)) < _SOCKET_PATH_MAX - 16 else ""
    started = False

    def pg(exe: str, *args: object, server_user: bool = True) -> list[str]:
        return [*(prefix if server_user else []), str(bindir / exe), *map(str, args)]

    try:
        auth: tuple[str, ...] = ("--auth=trust",)
        if password is not None:
            pwfile = base / "pwfile"
            pwfile.write_text(password + "\n")
            pwfile.chmod(0o600)
            if prefix:
                os.chown(pwfile, pw.pw_uid, pw.pw_gid)
            auth = ("--auth=scram-sha-256", f"--pwfile={pwfile}")
        init_opts = ("-U", SUPERUSER, *auth, "--encoding=UTF8", "--locale=C", "--no-sync")
        _run(pg("initdb", "-D", data, *init_opts), "initdb", cwd=base)
        if password is not None:
            pwfile.unlink()
        for attempt in range(3):  # another process may take the free port before we bind it
            port = free_port()
            # A per-attempt include file, written by us (root or not), read by the server.
            conf = base / f"test-{attempt}.conf"
            conf.write_text(
                f"listen_addresses = '127.0.0.1'\nport = {port}\n"
                f"unix_socket_directories = '{sockets}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
            )
            conf.chmod(0o644)
            with open(data / "postgresql.conf", "a") as f:
                f.write(f"include '{conf}'\n")
            proc = subprocess.run(
                pg("pg_ctl", "-D", data, "-l", log, "-w", "-t", 60, "start"),
                capture_output=True,
                text=True,
                timeout=90,
                cwd=base,
            )
            if proc.returncode == 0:
                started = True
                break
            text = log.read_text(errors="replace") if log.exists() else ""
            if "could not bind" not in text or attempt == 2:
                pytest.fail(
                    f"PostgreSQL server did not start (pg_ctl exit {proc.returncode}):\n"
                    f"{(proc.stdout + proc.stderr).strip()}\n--- server log ---\n{text[-4000:]}",
                    pytrace=False,
                )
        createdb = ("createdb", "-h", "127.0.0.1", "-p", port, "-U", SUPERUSER, DATABASE)
        env = dict(os.environ, PGPASSWORD=password) if password is not None else None
        _run(pg(*createdb, server_user=False), "createdb", log=log, env=env)
        yield f"postgresql+psycopg2://{SUPERUSER}@127.0.0.1:{port}/{DATABASE}"
    finally:
        if started:
            subprocess.run(
                pg("pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"),
                capture_output=True,
                timeout=60,
                cwd=base,
            )
        if prefix:
            shutil.rmtree(base, ignore_errors=True)


def fresh_database(url: str, name: str) -> str:
    """A new, empty database ``name`` on the server of ``url``, and its URL: a test of its
    own there, whose studies meet no other test's (a search's study name is a digest of
    its options, so two tests with the same options would share one study)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return make_url(url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """SQLAlchemy URL of a PostgreSQL server (one per test session)."""
    with postgres_server(tmp_path_factory) as url:
        yield url
