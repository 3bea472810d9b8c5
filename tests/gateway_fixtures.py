"""Running the gateway for tests: in this process (uvicorn on a thread, loopback, a free
port) or as a `gemini-router serve` subprocess, against the fake Gemini server."""
from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import KEYS, ROOT, base_env

import gemini_router as gr

CLIENT_KEYS = {"alice": "client-secret-alice-0001", "bob": "client-secret-bob-00002"}
CLIENT_ENV = ",".join(f"{secret}:{name}" for name, secret in CLIENT_KEYS.items())
FLASH = "gemini-2.5-flash"


class Served:
    """A gateway served by uvicorn on a thread of this process."""

    def __init__(self, env: dict[str, str], quiet: bool = True):
        import uvicorn
        self.settings = gr.load_settings(env)
        self.gateway = gr.Gateway(self.settings, gr.Output(quiet=quiet))
        self.gateway.warm()
        sock = gr.listen_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(gr.build_app(self.gateway), log_level="warning",
                                lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       name="test-gateway", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            assert time.monotonic() < deadline, "the gateway did not start"
            assert self.thread.is_alive(), "the gateway thread died"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        assert not self.thread.is_alive(), "the gateway did not stop"

    def flush(self) -> None:
        """Write the batched answers now (the flusher does it every 0.5 s)."""
        self.gateway.router.flush()


@contextlib.contextmanager
def serving(env: dict[str, str], quiet: bool = True):
    served = Served(env, quiet)
    try:
        yield served
    finally:
        served.stop()


def gateway_env(fake, state_dir: Path, keys: list[str] | None = None,
                **extra: str) -> dict[str, str]:
    env = base_env(state_dir, fake.url, KEYS[:2] if keys is None else keys)
    env.update(extra)
    return env


@pytest.fixture
def gateway(fake, state_dir):
    """A gateway over the fake with two keys and no client keys (loopback only)."""
    with serving(gateway_env(fake, state_dir)) as served:
        yield served


@pytest.fixture
def guarded(fake, state_dir):
    """A gateway with client keys (alice, bob)."""
    with serving(gateway_env(fake, state_dir, GEMINI_ROUTER_CLIENT_KEYS=CLIENT_ENV)) as served:
        yield served


class ServeProcess:
    """`python gemini_router.py serve --port 0` as a user starts it; its stderr is kept."""

    def __init__(self, env: dict[str, str], *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "gemini_router.py"), "serve", "--port", "0", *args],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=str(ROOT))
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 30
        self.url = None
        while self.url is None:
            found = [re.search(r"serving on (http://\S+) ", line) for line in self.lines]
            found = [m for m in found if m]
            if found:
                self.url = found[0][1]
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"serve did not start: {self.stderr}")
            time.sleep(0.02)

    def _read(self) -> None:
        for raw in self.proc.stderr:
            self.lines.append(raw.decode("utf-8", "replace"))

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def stop(self, signal_number: int) -> int:
        self.proc.send_signal(signal_number)
        code = self.proc.wait(timeout=30)
        self._reader.join(timeout=5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def sse_events(text: str) -> list[dict]:
    """The JSON of each `data:` event of an SSE body (without OpenAI's [DONE])."""
    return [json.loads(line[len("data: "):]) for line in text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def answer_text(elements: list[dict]) -> str:
    return "".join(p.get("text", "") for e in elements for c in e.get("candidates", [])
                   for p in c.get("content", {}).get("parts", []) if not p.get("thought"))
