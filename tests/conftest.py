"""Shared fixtures: a fake Gemini on loopback, marker keys, a private state directory, and two
ways to run the CLI as a user would - a subprocess (`cli`) and `main(argv)` in-process
(`run_main`, faster; no stdin)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
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
    return env


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
        files = {"stats": "model_stats.json", "router": "router_state.json",
                 "cooldowns": "cooldowns.json"}
        return json.loads((self.state_dir / files[name]).read_text())


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
