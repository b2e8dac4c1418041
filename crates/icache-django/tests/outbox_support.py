"""Real servers and database aliases for the outbox tests.

* PostgreSQL: Debian's server (``initdb``/``postgres`` on PATH or under
  /usr/lib/postgresql/*/bin), run as the ``postgres`` user when we are root
  (it refuses to run as root), on a free loopback port with a temporary
  data directory; killed at the end.
* Redis with an append-only file (``appendfsync always``), so a server
  killed with SIGKILL and started again keeps its generations: a bump that
  was lost in the outage would show.
* ``database(alias, settings)``: a DATABASES alias added for one test (the
  suite's settings are configured once, in conftest).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import free_port, missing, wait_port

PG_USER = "postgres"

# Generous time-outs for the cache: these tests check what is stored and
# bumped, and a shared machine under load can miss the default 100 ms (the
# block would then render uncached, fail-open, and look like a miss).
SLOW_MACHINE = "&timeout_ms=2000&connect_timeout_ms=2000"


def _pg_bin() -> Path | None:
    initdb = shutil.which("initdb")
    if initdb:
        d = Path(initdb).resolve().parent
        if (d / "postgres").is_file():
            return d
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def _as_pg_user(args: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["setpriv", "--reuid", PG_USER, "--regid", PG_USER, "--init-groups", "--", *args]
    return args


def _chown(path: str) -> None:
    if os.geteuid() != 0:
        return
    pw = pwd.getpwnam(PG_USER)
    for root, dirs, files in os.walk(path):
        os.chown(root, pw.pw_uid, pw.pw_gid)
        for f in files:
            os.chown(os.path.join(root, f), pw.pw_uid, pw.pw_gid)


class Postgres:
    def __init__(self, bin_dir: Path, tmp: str, port: int, proc: subprocess.Popen):
        self.bin_dir, self.tmp, self.port, self.proc = bin_dir, tmp, port, proc
        self.data = os.path.join(tmp, "data")

    def settings(self, name: str = "postgres") -> dict:
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": name,
            "USER": PG_USER,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
        }

    def psql(self, sql: str, db: str = "postgres") -> str:
        out = subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER,
             "-d", db, "-At", "-c", sql],
            capture_output=True, text=True, timeout=30,
        )
        if out.returncode != 0:
            raise RuntimeError(f"psql {sql!r}: {out.stderr}")
        return out.stdout.strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.tmp, ignore_errors=True)


def start_postgres() -> Postgres:
    bin_dir = _pg_bin()
    if bin_dir is None or shutil.which("psql") is None:
        missing("PostgreSQL (Debian's postgresql package: initdb, postgres, psql)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            missing("the postgres user (Debian's postgresql package creates it)")
    tmp = tempfile.mkdtemp(prefix="icache-django-pg-")
    os.chmod(tmp, 0o755)
    data = os.path.join(tmp, "data")
    _chown(tmp)
    out = subprocess.run(
        _as_pg_user([str(bin_dir / "initdb"), "-D", data, "-U", PG_USER, "--auth=trust", "-E", "UTF8", "--no-sync"]),
        capture_output=True, text=True,
    )
    if out.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.fail(f"initdb failed: {out.stderr}")
    last = ""
    for _ in range(5):
        port = free_port()
        log = open(os.path.join(tmp, "postgres.log"), "ab")
        proc = subprocess.Popen(
            _as_pg_user([str(bin_dir / "postgres"), "-D", data, "-p", str(port), "-k", tmp,
                         "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=100"]),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        if wait_port(port, proc, "postgres", timeout=30):
            pg = Postgres(bin_dir, tmp, port, proc)
            deadline = time.monotonic() + 30
            while True:  # the port opens before the server accepts sessions
                try:
                    pg.psql("SELECT 1")
                    return pg
                except RuntimeError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        proc.kill()
        proc.wait()
        last = Path(tmp, "postgres.log").read_text(errors="replace")
    shutil.rmtree(tmp, ignore_errors=True)
    pytest.fail(f"postgres did not come up on a free loopback port: {last}")


class PersistentRedis:
    """redis-server with appendfsync always; ``kill()`` is SIGKILL,
    ``start()`` brings it back on the same port with its data."""

    def __init__(self):
        program = shutil.which("redis-server")
        if program is None:
            missing("redis-server")
        self.tmp = tempfile.mkdtemp(prefix="icache-django-aof-")
        self.port = free_port()
        self.args = [program, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                     "--appendfsync", "always", "--protected-mode", "no", "--dir", self.tmp]
        self.proc = None
        self.start()

    def url(self, prefix: str) -> str:
        return f"redis://127.0.0.1:{self.port}/0?prefix={prefix}&timeout_ms=1000&connect_timeout_ms=1000"

    def start(self) -> None:
        log = open(os.path.join(self.tmp, "stdio.log"), "ab")
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if not wait_port(self.port, self.proc, "redis"):
            pytest.fail("redis did not start: " + Path(self.tmp, "stdio.log").read_text(errors="replace"))
        from conftest import Server, redis_command

        deadline = time.monotonic() + 10
        while True:  # the port opens while the append-only file still loads
            try:
                redis_command(Server("redis", self.port, self.proc, self.tmp), "GET", "icache-probe")
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.contextmanager
def database(alias: str, conf: dict):
    """``DATABASES[alias] = conf`` for the duration (a connection of its own)."""
    from django.conf import settings
    from django.db import connections

    full = connections.configure_settings({"default": {}, alias: dict(conf)})[alias]
    connections.settings[alias] = full
    settings.DATABASES[alias] = full
    try:
        yield connections[alias]
    finally:
        with contextlib.suppress(Exception):
            connections[alias].close()
        with contextlib.suppress(Exception):
            del connections[alias]
        connections.settings.pop(alias, None)
        settings.DATABASES.pop(alias, None)


def create_tables(connection, *models) -> None:
    with connection.schema_editor() as editor:
        for m in models:
            editor.create_model(m)


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
