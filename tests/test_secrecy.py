"""No API key ever leaves the process: not on stdout, not on stderr, not in a state file.

What this file proves (issue "Reliability and security", part 6):

* every command (route, route --stream, route --json, route -v, route --dry-run, rank, tiers,
  stats, cooldowns, cooldowns --json, lock, unlock, models, ...) run under every failure
  kind the simulator has - including an upstream that echoes the key back in its error
  message, once in full and once straddling the 300-character cut of long messages - leaves
  no trace of any key: the scan looks for every 10-character piece of every key (so also
  the first 10 characters) in stdout, stderr, and the names and contents of every file in
  the state directory, set-aside `.corrupt-` files included;
* the marker keys here differ in their first 10 characters (the shared `AIzaSyMARK` prefix
  of conftest.KEYS would make a prefix scan meaningless);
* the state directory is created 0700 and every file in it is 0600, even under umask 000.
"""
from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, CLI

SECRET_KEYS = ["Qz7mK2pLwX-secret-alpha-9f3b2c1d0e8a7b6c5d4",
               "Vn4RtY8sHd-secret-bravo-7a6b5c4d3e2f1a0b9c8",
               "Pb1GcJ5uEf-secret-charlie-1a2b3c4d5e6f7a8b9"]
PIECE = 10                       # the length of the shortest piece that counts as a leak
assert len({k[:PIECE] for k in SECRET_KEYS}) == len(SECRET_KEYS)


def key_pieces() -> dict[str, str]:
    """Every PIECE-long substring of every key -> the key's number (for the message)."""
    return {key[i:i + PIECE]: f"key {n}" for n, key in enumerate(SECRET_KEYS, 1)
            for i in range(len(key) - PIECE + 1)}


PIECES = key_pieces()


def leaks(text: str) -> list[str]:
    """One entry per key of which some PIECE-long part occurs in text."""
    hits: dict[str, str] = {}
    for piece, who in PIECES.items():
        if piece in text:
            hits.setdefault(who, piece)
    return [f"{who} (e.g. {piece!r})" for who, piece in sorted(hits.items())]


def scan_state_dir(state_dir: Path) -> list[str]:
    """Leaks in the names and contents of every file under the state directory."""
    found = []
    if not state_dir.exists():
        return found
    for path in sorted(state_dir.rglob("*")):
        found += [f"{path.name} (name): {leak}" for leak in leaks(path.name)]
        if path.is_file():
            text = path.read_bytes().decode("utf-8", "replace")
            found += [f"{path.name}: {leak}" for leak in leaks(text)]
    return found


def echo_message(key: str) -> str:
    """An upstream message that repeats the key: once whole near the start, and once so that
    it straddles character 300, where the module shortens long upstream messages (a
    shortened message must still not show the first 20 characters of the key)."""
    head = f"API key {key} was rejected. "
    second = 280                           # the second copy runs from 280 to 323
    return head + "x" * (second - len(head) - len(" again: ")) + f" again: {key} end"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


COMMANDS = [
    ("route", "hello"), ("route", "--stream", "hello"), ("route", "--json", "hello"),
    ("route", "-v", "hello"), ("route", "--dry-run", "hello"),
    ("route", "--dry-run", "--json", "hello"), ("route", "-m", "gemini-2.0-flash", "hi"),
    ("rank",), ("rank", "--json"), ("tiers",), ("tiers", "--json"), ("stats",),
    ("stats", "--json"), ("cooldowns",), ("cooldowns", "--json"), ("lock", "gemini-2.5-flash"),
    ("route", "-v", "--stream", "locked"), ("unlock",), ("models",), ("models", "--json"),
    ("models", "--all", "--refresh", "-v"),
]

# Failure kinds of the simulator; those answered by a JSON error body echo the key back.
ECHOING = ["invalid_key", "unauthorized", "forbidden", "rate_minute", "rate_day",
           "rate_plain", "not_found", "bad_request", "error500", "unavailable",
           "gateway_timeout", "stream_break"]
PLAIN = ["ok", "slow", "hang", "blocked", "safety", "html502", "nonjson_error", "empty200",
         "no_candidates", "stream_truncate"]


def apply_kind(fake, kind: str, keys: list[str]) -> None:
    for key in keys:
        params = {"message": echo_message(key)} if kind in ECHOING else {}
        if kind == "slow":
            params["seconds"] = 0.05
        if kind == "hang":
            params["seconds"] = 30
        fake.set_behaviour(kind, key=key, **params)


def run_everything(run_main, state_dir: Path, env: dict[str, str | None]) -> list[str]:
    """Every command in order (state accumulates), with a corrupt stats file set aside in
    the middle; returns every leak found in the outputs and the state directory."""
    found = []
    for args in COMMANDS:
        if args == ("stats",) and (state_dir / "model_stats.json").exists():
            with open(state_dir / "model_stats.json", "r+b") as f:   # truncated in place
                f.truncate(20)
        r = run_main(*args, env=env, keys=SECRET_KEYS[:2])   # an escaping exception fails
        found += [f"{' '.join(args)} stdout: {leak}" for leak in leaks(r.out)]
        found += [f"{' '.join(args)} stderr: {leak}" for leak in leaks(r.err)]
    found += scan_state_dir(state_dir)
    return found


FAST = {"GEMINI_ROUTER_TIMEOUT": "0.3"}


@pytest.mark.parametrize("kind", ECHOING + PLAIN)
def test_no_key_leaks_when_one_key_fails(kind, run_main, fake, state_dir):
    apply_kind(fake, kind, SECRET_KEYS[:1])
    found = run_everything(run_main, state_dir, FAST)
    assert found == [], "\n".join(found)
    assert list(state_dir.glob("model_stats.json.corrupt-*"))     # the set-aside was scanned
    assert fake.count(key=SECRET_KEYS[0]) > 0                      # the markers were in play
    if kind != "not_found":           # a 404 retires the model for every key: key 2 idles
        assert fake.count(key=SECRET_KEYS[1], action=("generate", "stream")) > 0


@pytest.mark.parametrize("kind", ["invalid_key", "forbidden", "rate_minute", "rate_day",
                                  "bad_request", "error500", "unavailable", "html502",
                                  "not_found", "stream_break"])
def test_no_key_leaks_when_every_key_fails(kind, run_main, fake, state_dir):
    apply_kind(fake, kind, SECRET_KEYS[:2])
    found = run_everything(run_main, state_dir, FAST)
    assert found == [], "\n".join(found)
    assert fake.count(key=SECRET_KEYS[0]) > 0 and fake.count(key=SECRET_KEYS[1]) > 0


def test_no_key_leaks_when_the_endpoint_is_unreachable(run_main, fake, state_dir):
    found = run_everything(run_main, state_dir,
                           {"GEMINI_API_ENDPOINT": f"http://127.0.0.1:{closed_port()}"})
    assert found == [], "\n".join(found)


def test_no_key_leaks_in_config_errors(run_main, state_dir):
    """A key the tool refuses (a space inside) is named by its variable, never shown."""
    bad = SECRET_KEYS[2][:20] + " " + SECRET_KEYS[2][20:]
    r = run_main("route", "hello", env={"GEMINI_API_KEY_3": bad})
    assert r.code == 3
    assert "GEMINI_API_KEY_3" in r.err
    assert leaks(r.out + r.err) == []


def test_no_key_leaks_from_a_real_process(fake, state_dir):
    """The same scan on real subprocesses: catches anything printed past sys.stdout/stderr
    (SDK or HTTP library logging straight to the file descriptors)."""
    cli = CLI(fake, state_dir, SECRET_KEYS[:2])
    apply_kind(fake, "invalid_key", SECRET_KEYS[:1])
    fake.set_behaviour("unavailable", key=SECRET_KEYS[1], model="gemini-2.5-flash",
                       message=f"overloaded for key {SECRET_KEYS[1]}, sorry")
    found = []
    for args in [("route", "-v", "--stream", "hello"), ("rank", "-v"), ("cooldowns",),
                 ("route", "-v", "--json", "hello")]:
        r = cli(*args)
        assert "Traceback" not in r.err
        found += leaks(r.out) + leaks(r.err)
    assert found + scan_state_dir(state_dir) == []
    assert fake.count(key=SECRET_KEYS[1], model="gemini-2.5-flash", action="stream") == 1


# --------------------------------------------------------------------------------------
# permissions
# --------------------------------------------------------------------------------------

def test_state_dir_0700_and_files_0600_even_under_umask_000(fake, state_dir):
    cli = CLI(fake, state_dir, SECRET_KEYS[:2])
    lax = {"preexec_fn": lambda: os.umask(0)}

    def run(*args: str) -> None:
        proc = subprocess.run([sys.executable, str(ROOT / "gemini_router.py"), *args],
                              env=cli.env, cwd=str(ROOT), capture_output=True,
                              stdin=subprocess.DEVNULL, timeout=60, **lax)
        assert proc.returncode == 0, proc.stderr.decode()

    run("route", "hello")
    fake.set_behaviour("rate_minute", key=SECRET_KEYS[0])
    run("rank")
    with open(state_dir / "model_stats.json", "r+b") as f:     # damaged in place
        f.truncate(10)
    run("stats")                                               # sets it aside
    run("lock", "gemini-2.5-flash")

    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in state_dir.iterdir()}
    assert {"cooldowns.json", "router_state.json", "state.lock"} <= set(modes)
    assert any(".corrupt-" in name for name in modes)
    assert modes == {name: 0o600 for name in modes}


def test_nested_state_dir_is_created_private(run_main, tmp_path):
    deep = tmp_path / "a" / "b" / "state"
    r = run_main("route", "hello", env={"GEMINI_ROUTER_STATE_DIR": str(deep)})
    assert r.code == 0, r.err
    assert stat.S_IMODE(deep.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in deep.iterdir()} == {0o600}
