"""pytest set-up for django_icache: Django settings, real servers on free
loopback ports, the Rust command line and peer.

Servers: ``redis-server`` and ``memcached`` are started once per session on
ports chosen free on 127.0.0.1, and stopped at the end. A missing binary skips
the tests that need it, loudly; with ``CI=true`` it fails them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(HERE))

# Templates the tests render, by name (the locmem loader reads this dict on
# every get_template: no template caching between tests).
TEMPLATES: dict[str, str] = {}

import django  # noqa: E402
from django.conf import settings  # noqa: E402

settings.configure(
    DEBUG=False,
    SECRET_KEY="django-icache-tests-" + uuid.uuid4().hex,
    INSTALLED_APPS=[
        "django.contrib.auth",
        "django.contrib.contenttypes",
        "django.contrib.sessions",
        "django.contrib.messages",
        "django.contrib.admin",  # test_outbox.py saves through the admin
        "django_icache",
        "movieapp",
    ],
    MIDDLEWARE=[
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.locale.LocaleMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "django.contrib.messages.middleware.MessageMiddleware",
    ],
    ROOT_URLCONF="movieapp.urls",
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
    CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}},
    TEMPLATES=[
        {
            "BACKEND": "django.template.backends.django.DjangoTemplates",
            "OPTIONS": {
                "loaders": [("django.template.loaders.locmem.Loader", TEMPLATES)],
                "debug": False,
                "context_processors": [
                    "django.template.context_processors.request",
                    "django.template.context_processors.i18n",
                    "django.contrib.auth.context_processors.auth",
                    "django.contrib.messages.context_processors.messages",
                ],
            },
        }
    ],
    USE_TZ=True,
    USE_I18N=True,
    LANGUAGE_CODE="en",
    LANGUAGES=[("en", "English"), ("de", "German")],
    PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"],
    DEFAULT_AUTO_FIELD="django.db.models.AutoField",
    LOGGING_CONFIG=None,
)
django.setup()

from django.template import engines  # noqa: E402
from django.test.utils import setup_test_environment  # noqa: E402

setup_test_environment()
# The tables of auth and sessions in the in-memory database (movieapp has no
# migrations: the tests that need its tables create them).
from django.core.management import call_command  # noqa: E402

call_command("migrate", verbosity=0)
from django.test.utils import override_settings  # noqa: E402

CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def missing(what: str):
    msg = f"{what} is not installed: these tests need it (scripts/test.sh installs it)"
    if CI:
        pytest.fail(f"CI=true: {msg}")
    print(f"\n!!! SKIPPING: {msg}\n", file=sys.stderr)
    pytest.skip(msg)


def render(source: str, context: dict | None = None, name: str | None = None) -> str:
    """Renders `source` as template `name` (default: a name of its own)."""
    name = name or f"t-{uuid.uuid4().hex}.html"
    TEMPLATES[name] = source
    return engines["django"].get_template(name).render(context or {})


def render_named(name: str, context: dict | None = None) -> str:
    return engines["django"].get_template(name).render(context or {})


def unique(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    return False


class Server:
    def __init__(self, kind: str, port: int, proc: subprocess.Popen, tmp: str):
        self.kind, self.port, self.proc, self.tmp = kind, port, proc, tmp

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, prefix: str | None = None) -> str:
        scheme = "redis" if self.kind == "redis" else "memcached"
        base = f"{scheme}://127.0.0.1:{self.port}" + ("/0" if self.kind == "redis" else "")
        return f"{base}?prefix={prefix}" if prefix else base

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.tmp, ignore_errors=True)


def start_server(kind: str) -> Server:
    program = shutil.which("redis-server" if kind == "redis" else "memcached")
    if program is None:
        missing("redis-server" if kind == "redis" else "memcached")
    last = ""
    for _ in range(5):
        port = free_port()
        tmp = tempfile.mkdtemp(prefix=f"icache-django-{kind}-")
        if kind == "redis":
            args = [program, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--protected-mode", "no", "--dir", tmp]
        else:
            args = [program, "-u", "root", "-l", "127.0.0.1", "-p", str(port), "-U", "0"]
        log = open(os.path.join(tmp, "stdio.log"), "wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if wait_port(port, proc, kind):
            return Server(kind, port, proc, tmp)
        proc.kill()
        proc.wait()
        last = Path(tmp, "stdio.log").read_text(errors="replace")
        shutil.rmtree(tmp, ignore_errors=True)
    pytest.fail(f"{kind} did not come up on a free loopback port: {last}")


@pytest.fixture(scope="session")
def redis_server():
    s = start_server("redis")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def memcached_server():
    s = start_server("memcached")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def memcached_server_2():
    """A second memcached, for a pool of two."""
    s = start_server("memcached")
    yield s
    s.stop()


def redis_command(server: Server, *args: str):
    """One RESP command on a fresh connection (tests only)."""
    out = f"*{len(args)}\r\n".encode()
    for a in args:
        b = a.encode()
        out += b"$%d\r\n%s\r\n" % (len(b), b)
    with socket.create_connection(("127.0.0.1", server.port), timeout=2) as s:
        s.sendall(out)
        f = s.makefile("rb")
        return _resp(f)


def _resp(f):
    line = f.readline().rstrip(b"\r\n")
    t, rest = line[:1], line[1:]
    if t == b"+":
        return rest.decode()
    if t == b"-":
        raise RuntimeError(rest.decode())
    if t == b":":
        return int(rest)
    if t == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)[:-2]
        return data
    if t == b"*":
        n = int(rest)
        return None if n < 0 else [_resp(f) for _ in range(n)]
    raise RuntimeError(f"unexpected reply {line!r}")


def memcached_command(server: Server, line: str) -> str:
    with socket.create_connection(("127.0.0.1", server.port), timeout=2) as s:
        s.sendall(line.encode() + b"\r\n")
        data = b""
        while not (data.endswith(b"END\r\n") or data.endswith(b"OK\r\n") or data.endswith(b"ERROR\r\n")):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data.decode(errors="replace")


@pytest.fixture
def use_url():
    """Points django_icache at a URL for one test (through the ICACHE_URL
    setting, as a site would)."""
    overrides = []

    def use(url: str):
        o = override_settings(ICACHE_URL=url)
        o.enable()
        overrides.append(o)
        from django_icache import icache

        return icache

    yield use
    for o in reversed(overrides):
        o.disable()


@pytest.fixture(params=["memory", "redis", "memcached"])
def backend_url(request):
    """A fresh URL (own prefix) on each backend."""
    prefix = unique("p")
    if request.param == "memory":
        return f"memory://?prefix={prefix}"
    server = request.getfixturevalue(f"{request.param}_server")
    return server.url(prefix)


def _cargo_target() -> Path:
    return Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")


def _cargo_build(args: list[str], binary: Path) -> Path:
    if shutil.which("cargo") is None:
        missing("cargo")
    subprocess.run(["cargo", "build", "-q", *args], cwd=REPO, check=True)
    assert binary.exists(), binary
    return binary


@pytest.fixture(scope="session")
def icache_cli() -> Path:
    """The `icache` command line, built from this checkout."""
    if os.environ.get("ICACHE_CLI"):
        return Path(os.environ["ICACHE_CLI"])
    return _cargo_build(["-p", "icache-cli"], _cargo_target() / "debug" / "icache")


@pytest.fixture(scope="session")
def rust_peer() -> Path:
    """examples/rust_peer.rs: a Rust service on the same cache."""
    return _cargo_build(
        ["-p", "icache-django", "--example", "rust_peer"],
        _cargo_target() / "debug" / "examples" / "rust_peer",
    )


class Counter:
    """A context object whose `tick` counts renders of a body."""

    def __init__(self):
        import threading

        self.n = 0
        self._lock = threading.Lock()

    def tick(self):
        with self._lock:
            self.n += 1
        return ""


def make_user(name: str):
    """A user with password "pw" (created once per name)."""
    from django.contrib.auth.models import User

    user, created = User.objects.get_or_create(username=name)
    if created:
        user.set_password("pw")
        user.save()
    return user


def client_for(name: str | None, csrf: bool = True):
    """A test client logged in as `name` (None: anonymous), CSRF enforced."""
    from django.test import Client

    c = Client(enforce_csrf_checks=csrf)
    if name is not None:
        make_user(name)
        assert c.login(username=name, password="pw")
    return c
