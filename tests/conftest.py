"""Shared fixtures: a fake Gemini on loopback, marker keys, a private state directory, and two
ways to run the CLI as a user would - a subprocess (`cli`) and `main(argv)` in-process
(`run_main`, faster; no stdin).

The state backend under test: the JSON files by default; `pytest --state-backend=redis` (or
GEMINI_ROUTER_TEST_STATE=redis) runs the same tests with the state in a real redis-server
started for the session on a free loopback port. `base_env` then gives each state directory
its own key prefix there, so tests stay as isolated as their directories; `read_state` and
`write_state` reach the state as stored, whichever the backend. Tests about the files
themselves are marked `files_only`."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(ROOT))

from fake_gemini import FakeGemini  # noqa: E402

import gemini_router  # noqa: E402

# Marker keys: distinctive strings the secrecy tests search for in every output and file.
KEYS = ["AIzaSyMARKER-ONE-aaaaaaaaaaaaaaaaaaaaaaa1",
        "AIzaSyMARKER-TWO-bbbbbbbbbbbbbbbbbbbbbbb2",
        "AIzaSyMARKER-THREE-ccccccccccccccccccccc3"]


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


@pytest.fixture
def fake():
    with FakeGemini() as server:
        yield server


def base_env(state_dir: Path, endpoint: str, keys: list[str]) -> dict[str, str]:
    """A clean environment: nothing from the developer's shell leaks into a test."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GEMINI_", "GOOGLE_API_KEY", "ROLLING_WINDOW", "COOLDOWN_SECS",
                                "STATS_FILE", "STATE_FILE", "COOLDOWN_FILE", "XDG_STATE_HOME"))}
    env["GEMINI_API_ENDPOINT"] = endpoint
    env["GEMINI_ROUTER_STATE_DIR"] = str(state_dir)
    env["PYTHONPATH"] = str(ROOT)
    for i, key in enumerate(keys, 1):
        env[f"GEMINI_API_KEY_{i}"] = key
    if BACKEND["url"]:
        env["GEMINI_ROUTER_STATE_URL"] = BACKEND["url"]
        env["GEMINI_ROUTER_REDIS_PREFIX"] = redis_prefix(state_dir)
    return env


# --------------------------------------------------------------------------------------
# The state backend under test
# --------------------------------------------------------------------------------------

BACKEND: dict = {"name": "files", "url": None, "server": None}
STATE_FILES = {"stats": "model_stats.json", "router": "router_state.json",
               "cooldowns": "cooldowns.json"}


def pytest_addoption(parser):
    parser.addoption("--state-backend", choices=("files", "redis"),
                     default=os.environ.get("GEMINI_ROUTER_TEST_STATE") or "files",
                     help="where the state of the tests' commands is kept (default files)")


def pytest_configure(config):
    config.addinivalue_line("markers", "files_only: reads or writes the state files "
                                       "themselves; skipped under --state-backend=redis")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--state-backend") != "redis":
        return
    skip = pytest.mark.skip(reason="about the state files themselves (--state-backend=redis)")
    for item in items:
        if item.get_closest_marker("files_only"):
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def state_backend(request, tmp_path_factory):
    """With --state-backend=redis: one redis-server for the session, stopped at its end."""
    if request.config.getoption("--state-backend") != "redis":
        yield "files"
        return
    server = RedisServer(tmp_path_factory.mktemp("redis-backend"))
    server.start()
    BACKEND.update(name="redis", url=server.url, server=server)
    try:
        yield "redis"
    finally:
        BACKEND.update(name="files", url=None, server=None)
        server.stop()


def redis_prefix(state_dir: Path) -> str:
    """The Redis key prefix standing for a state directory in --state-backend=redis."""
    return "t" + hashlib.sha256(str(state_dir).encode()).hexdigest()[:12] + ":"


# In Redis the entries that expire are keys of their own, `PREFIX <word>:<id>`, listed in the
# sorted set `PREFIX index:<word>`: (document, field, word); a list field holds cooldowns.
REDIS_COLLECTIONS = (("cooldowns", "cooldowns", "cooldown"), ("router", "usage", "usage"),
                     ("router", "strikes", "strike"))


def read_state(state_dir: Path, name: str) -> dict:
    """One state document as stored ({} when there is none), files or Redis (there: the
    skeleton in the hash with the entries kept under their own keys put back in)."""
    if BACKEND["server"] is not None:
        return read_redis_doc(BACKEND["server"].client(), redis_prefix(state_dir), name)
    path = state_dir / STATE_FILES[name]
    return json.loads(path.read_text()) if path.exists() else {}


def redis_entries(client, prefix: str, word: str) -> dict[str, object]:
    """id -> entry of one collection kept in Redis (those whose key is still there)."""
    ids = [i.decode() for i in client.zrange(f"{prefix}index:{word}", 0, -1)]
    values = client.mget([f"{prefix}{word}:{i}" for i in ids]) if ids else []
    return {i: json.loads(v) for i, v in zip(ids, values) if v is not None}


def read_redis_doc(client, prefix: str, name: str) -> dict:
    raw = client.hget(prefix + "state", name)
    doc = json.loads(raw) if raw else {}
    for doc_name, field, word in REDIS_COLLECTIONS:
        kept = redis_entries(client, prefix, word) if doc_name == name else {}
        if not kept:
            continue
        if field == "cooldowns":
            doc[field] = doc.get(field, []) + list(kept.values())
        else:
            doc[field] = {**kept, **doc.get(field, {})}
    return doc


def write_state(state_dir: Path, name: str, doc: dict) -> None:
    """Store one state document as an older version (or another host) would have (in
    Redis: the previous layout, every entry inside the hash; entries already kept under
    their own keys stay, and are read with it)."""
    if BACKEND["server"] is not None:
        BACKEND["server"].client().hset(redis_prefix(state_dir) + "state", mapping={
            name: json.dumps(doc), f"v:{name}": os.urandom(8).hex()})
        return
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / STATE_FILES[name]).write_text(json.dumps(doc))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server (Debian's package) on a free loopback port, in its own directory,
    without persistence. Stopped (or killed) by the test that started it."""

    def __init__(self, directory: Path, password: str | None = None,
                 tls: dict[str, Path] | None = None):
        self.directory = directory
        self.password = password
        self.tls = tls                  # {"cert", "key", "ca"}: TLS only, on `port`
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self._client = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls['ca']}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("CI"):
                pytest.fail("redis-server is not installed (.ci/run installs it)")
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.directory), "--daemonize", "no", "--loglevel", "warning",
                "--logfile", str(self.directory / "redis.log")]
        if self.tls:
            args += ["--port", "0", "--tls-port", str(self.port),
                     "--tls-cert-file", str(self.tls["cert"]),
                     "--tls-key-file", str(self.tls["key"]),
                     "--tls-ca-cert-file", str(self.tls["ca"]), "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = self.directory / "redis.log"
                    raise RuntimeError(f"redis-server did not start: "
                                       f"{log.read_text() if log.exists() else ''}")
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def client(self):
        """A redis-py client of this server, for looking at what the router stored."""
        if self._client is None:
            import redis
            kwargs = {"ssl_ca_certs": str(self.tls["ca"])} if self.tls else {}
            self._client = redis.Redis(host="127.0.0.1", port=self.port,
                                       password=self.password, ssl=bool(self.tls), **kwargs)
        return self._client


@pytest.fixture
def redis_servers(tmp_path):
    """Start real redis-servers for one test: `redis_servers()` -> a running RedisServer;
    every one is stopped when the test ends."""
    started: list[RedisServer] = []

    def start(**kwargs) -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(started)}", **kwargs)
        started.append(server)
        return server.start()
    yield start
    for server in started:
        server.stop()


class CLI:
    """Runs gemini-router against `fake` with `keys`, state in `state_dir`."""

    def __init__(self, fake: FakeGemini, state_dir: Path, keys: list[str]):
        self.fake = fake
        self.state_dir = state_dir
        self.env = base_env(state_dir, fake.url, keys)

    def __call__(self, *args: str, input: str | bytes | None = None,
                 env: dict[str, str | None] | None = None, timeout: float = 60) -> Result:
        full_env = dict(self.env)
        for k, v in (env or {}).items():
            if v is None:
                full_env.pop(k, None)
            else:
                full_env[k] = v
        proc = subprocess.run(
            [sys.executable, str(ROOT / "gemini_router.py"), *args],
            input=input.encode() if isinstance(input, str) else input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True, env=full_env, timeout=timeout, cwd=str(ROOT))
        return Result(proc.returncode, proc.stdout.decode("utf-8", "replace"),
                      proc.stderr.decode("utf-8", "replace"))

    def state(self, name: str) -> dict:
        return read_state(self.state_dir, name)


def route_while_state_is_locked(cli: CLI, model: str, take_lock) -> Result:
    """`route -m model hello` with `take_lock()` run once the upstream call is in flight
    (the model should answer slowly), so recording the answer meets a held lock."""
    import threading
    import time

    def hold() -> None:
        deadline = time.monotonic() + 30
        while not cli.fake.count(action="generate") and time.monotonic() < deadline:
            time.sleep(0.01)
        take_lock()
    thread = threading.Thread(target=hold)
    thread.start()
    try:
        return cli("route", "-m", model, "hello", env={"GEMINI_ROUTER_LOCK_TIMEOUT": "0.5"})
    finally:
        thread.join()


@pytest.fixture
def state_dir(tmp_path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def cli(fake, state_dir) -> CLI:
    """Two keys by default; build `CLI(fake, state_dir, KEYS[:n])` for other counts."""
    return CLI(fake, state_dir, KEYS[:2])


@pytest.fixture
def run_main(fake, state_dir, monkeypatch, capsys):
    """Run `gemini_router.main(argv)` in this process with the CLI fixture's environment."""
    def run(*args: str, env: dict[str, str | None] | None = None,
            keys: list[str] | None = None) -> Result:
        full = base_env(state_dir, fake.url, KEYS[:2] if keys is None else keys)
        for k, v in (env or {}).items():
            if v is None:
                full.pop(k, None)
            else:
                full[k] = v
        for k in list(os.environ):
            if k not in full:
                monkeypatch.delenv(k)
        for k, v in full.items():
            monkeypatch.setenv(k, v)
        capsys.readouterr()
        code = gemini_router.main(list(args))
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)
    return run
