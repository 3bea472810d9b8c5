#!/usr/bin/env python3
"""Speed benchmark for gemini-router (issue "Speed"). Not a test: pytest does not collect it.

    python tests/bench.py [--runs N] [--quick] [--keep] [--only speed,overhead,...,gateway-redis]

What it measures, each comparison side by side in one run (medians of N runs; the commands of
a group are interleaved and their order rotated every run, so machine noise hits all equally):

1. Local commands (tiers, stats, cooldowns, lock, unlock, --help) vs ``python -c pass``,
   on a steady-state directory (6 models x ROLLING_WINDOW samples, a cached model list, one
   cooldown). Target: within 2.5x. Also which heavy modules each of them imports.
2. ``route`` (model list cached) vs a minimal script making the same single SDK call,
   simulator at 50 ms latency. Target: within 1.10x. Also a cold route (no cached model list)
   and a route over 200 models x ROLLING_WINDOW samples of state, for information.
3. ``rank`` of 24 models at 0.4 s (target < 0.8 s) and of 100 models at 0.4 s with
   --concurrency 32 (target: about 4 rounds = 1.6 s, + 0.4 s). Whole-process ``rank`` is shown
   next to a minimal SDK thread-pool script (both are mostly interpreter + SDK import); the
   target is checked on ``probe_models()`` in-process, with the SDK already imported,
   interleaved with the same probes sent by a bare SDK thread pool.
4. ``tiers``/``stats`` with 200 models x ROLLING_WINDOW samples (target: within 2.5x of
   ``python -c pass``), and the state files' sizes: the sample count per model must stay
   within ROLLING_WINDOW and the files must not grow across routes and ranks.
5. Where route's time goes: in fresh processes, ``time.perf_counter`` around the steps a route
   takes (imports, client construction, state transactions, JSON, fsync), plus
   ``-X importtime`` of ``tiers`` and ``route``.

Sections 6-8 measure the routing core the gateway will use (a long-lived ``Router`` with
``shared_rotation=False`` and its flusher), in a child process, against simulators on threads
of this one (``--only overhead,cooling,fleet`` runs just these, about a minute):

6. Router overhead over a plain SDK call (``GenerativeServiceClient(transport="rest")``), the
   two interleaved, simulator at 5 ms: p50/p99 of route minus the same percentile of the plain
   call, with 1, 8 and 32 threads routing at once. Targets: p50 <= 1 ms single-threaded;
   p50 <= 2 ms and p99 <= 10 ms at 8 and 32 threads. When one is missed, a cProfile of 200
   routes (top 15 by cumulative time) says where the time goes.
7. A route's own CPU time (``time.process_time``) with 50 keys x 30 models, every pair cooling:
   it must end "nothing available" (exit 4) in milliseconds, with 0 upstream calls.
8. The 30% fleet: 5 keys, every model answering 30% of calls with an immediate 503
   (fake_gemini ``flaky``), two keys rate-limited on every model, one invalid, vs a healthy
   fleet at the same 20 ms per answer; 1000 routes on each, interleaved, on 4 threads.
   Targets: >= 99.9% answered, p95 within 1.2x of the healthy fleet's.

Section 9 measures the gateway (``--only gateway``), three processes as they run for real:
the simulator, ``gemini-router serve`` and this one sending load from plain threads
(requests, keep-alive): the gateway's overhead over a direct call to the simulator (p50/p99,
interleaved; 1 thread with the simulator at 5 ms, 32 threads with it at 100 ms so that 32
requests are in flight without saturating the machine; targets p50 <= 2 ms, p99 <= 10 ms); its
throughput at 32 threads against a zero-latency simulator (target >= 300 requests/s on 2
cores); and a scripted ``route`` through it (GEMINI_ROUTER_SERVER) vs a direct ``route`` and
``python -c pass`` (target: within 3x ``python -c pass`` plus the upstream latency, 50 ms).

Section 10 (``--only gateway-redis``, about a minute and a half) repeats section 9's overhead
and throughput with the state in files and in Redis side by side: it starts its own
``redis-server`` on a free loopback port (no persistence; stopped at the end), puts two
gateways in front of one simulator, one per backend, and loads them in turn, 4 blocks each
with the order rotated, so machine load falls on both alike. Also what a request costs Redis
(INFO commandstats before and after: commands sent, commands the Lua scripts ran, Redis' time).

How the CLI is run: like the installed ``gemini-router`` console script. The working tree's
``gemini_router.py`` is copied into a temporary directory, byte-compiled there, and started
through the same shim pip writes; ``python gemini_router.py`` (the source compiled on every
run) is shown as one extra row. The simulator (tests/fake_gemini.py) runs on threads of this
process; the commands run as subprocesses with a clean environment and two keys.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import py_compile
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))
# A worker child (sections 6-8) imports the installed-like copy the parent measures.
sys.path.insert(0, os.environ.get("GR_BENCH_MODULE_DIR") or str(ROOT))

from fake_gemini import FakeGemini, make_models  # noqa: E402

import gemini_router as gr  # noqa: E402  (only for the state format: empty_doc, fingerprints)

PY = sys.executable
KEYS = ["AIzaSyBENCH-ONE-aaaaaaaaaaaaaaaaaaaaaaaaa1", "AIzaSyBENCH-TWO-bbbbbbbbbbbbbbbbbbbbbbbbb2"]
WINDOW = int(gr.LIMITS["ROLLING_WINDOW"].default)
ROUTE_LATENCY = 0.05
RANK_LATENCY = 0.4
LOCAL_TARGET = 2.5
ROUTE_TARGET = 1.10
# Heavy modules a local command must not import (SPEC: no SDK, no tqdm), and others worth seeing.
FORBIDDEN = {"google.ai.generativelanguage_v1beta": "SDK", "google.generativeai": "SDK",
             "google.api_core": "SDK", "grpc": "SDK", "proto": "SDK", "tqdm": "tqdm"}
NOTABLE = ("requests", "urllib3", "google.protobuf", "asyncio", "concurrent.futures",
           "filelock", "zoneinfo", "logging", "inspect", "dataclasses", "argparse", "typing")


# ======================================================================================
# Measuring
# ======================================================================================

@dataclass
class Cmd:
    """One command line to time. `before` runs untimed before each run (e.g. state reset);
    `check` validates the (code, stdout, stderr) of the warm-up run."""
    name: str
    argv: list[str]
    env: dict[str, str]
    before: Callable[[], None] | None = None
    check: Callable[[int, str, str], str | None] | None = None
    extract: Callable[[str, str], float | None] | None = None   # a time the command prints
    wall: list[float] = field(default_factory=list)
    inner: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    error: str | None = None
    stderr_sample: str = ""


def run_once(cmd: Cmd) -> tuple[float, float, int, str, str]:
    """(wall s, child cpu s, exit code, stdout, stderr)."""
    if cmd.before:
        cmd.before()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd.argv, env=cmd.env, stdin=subprocess.DEVNULL, capture_output=True,
                          cwd=str(ROOT), timeout=300)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return (wall, cpu, proc.returncode, proc.stdout.decode("utf-8", "replace"),
            proc.stderr.decode("utf-8", "replace"))


def measure(title: str, cmds: list[Cmd], runs: int) -> None:
    """Warm each command once (validated), then `runs` interleaved rounds, rotating order."""
    for cmd in cmds:
        wall, cpu, code, out, err = run_once(cmd)
        problem = f"exit {code}: {err.strip()[-300:]}" if code else None
        if problem is None and cmd.check:
            problem = cmd.check(code, out, err)
        if problem:
            cmd.error = problem
            progress(f"  {cmd.name}: FAILED warm-up: {problem}")
        cmd.stderr_sample = err
    live = [c for c in cmds if c.error is None]
    for r in range(runs):
        progress(f"{title}: run {r + 1}/{runs}", end="\r")
        k = r % len(live) if live else 0
        for cmd in live[k:] + live[:k]:
            wall, cpu, code, out, err = run_once(cmd)
            if code:
                cmd.error = f"exit {code} in run {r + 1}: {err.strip()[-200:]}"
                break
            cmd.wall.append(wall)
            cmd.cpu.append(cpu)
            if cmd.extract:
                value = cmd.extract(out, err)
                if value is not None:
                    cmd.inner.append(value)
        live = [c for c in live if c.error is None]
    progress(f"{title}: done{' ' * 20}")


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def spread(values: list[float]) -> str:
    if len(values) < 3:
        return "-"
    qs = statistics.quantiles(values, n=10, method="inclusive")
    return f"p10 {fmt_s(qs[0])} .. p90 {fmt_s(qs[-1])}"


def progress(message: str, end: str = "\n") -> None:
    print(message, end=end, file=sys.stderr, flush=True)


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.3f} s"


def fmt_ms(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:9.2f} ms"


def fmt_bytes(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MiB"


# ======================================================================================
# The table
# ======================================================================================

@dataclass
class Row:
    what: str
    cmd: Cmd | None
    base: Cmd | None = None
    ratio_target: float | None = None      # pass when median/base <= this
    abs_target: float | None = None        # pass when median <= this (seconds)
    target_text: str = ""
    inner: bool = False                    # compare the times the commands print, not wall

    def cells(self) -> list[str]:
        if self.cmd is None:
            return [self.what, "-", "-", "-", "-", "-"]
        if self.cmd.error:
            return [self.what, "-", "-", "-", self.target_text or "-", "ERROR"]
        pick = (lambda c: c.inner) if self.inner else (lambda c: c.wall)
        m = median(pick(self.cmd))
        b = median(pick(self.base)) if self.base and not self.base.error else None
        ratio = m / b if (m is not None and b) else None
        verdict = "info"
        if self.ratio_target is not None and ratio is not None:
            verdict = "pass" if ratio <= self.ratio_target else "FAIL"
        elif self.abs_target is not None and m is not None:
            verdict = "pass" if m <= self.abs_target else "FAIL"
        return [self.what, fmt_s(m), fmt_s(b), f"{ratio:.2f}x" if ratio else "-",
                self.target_text or "-", verdict]


def print_table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    print(line(headers))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r))


# ======================================================================================
# Set-up: the installed-like CLI, environments, state directories
# ======================================================================================

CONSOLE_SHIM = """\
# -*- coding: utf-8 -*-
import re
import sys
from gemini_router import main_exit
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(main_exit())
"""

ROUTE_BASELINE = """\
# The minimal direct-SDK route: one client, one generate_content call, print the text.
import os, sys
from google.ai import generativelanguage_v1beta as glm
client = glm.GenerativeServiceClient(
    transport="rest",
    client_options={"api_endpoint": os.environ["GEMINI_API_ENDPOINT"],
                    "api_key": os.environ["GEMINI_API_KEY_1"]})
request = glm.GenerateContentRequest(
    model="models/" + sys.argv[1],
    contents=[glm.Content(role="user", parts=[glm.Part(text=sys.argv[2])])])
response = client.generate_content(request, retry=None, timeout=60)
print(response.candidates[0].content.parts[0].text)
"""

RANK_BASELINE = """\
# The minimal direct-SDK prober: one client, a thread pool, one probe per model.
# It prints the time from its SDK import to the last answer, like rank's own message.
import os, sys, time
began = time.perf_counter()
from concurrent.futures import ThreadPoolExecutor
from google.ai import generativelanguage_v1beta as glm
client = glm.GenerativeServiceClient(
    transport="rest",
    client_options={"api_endpoint": os.environ["GEMINI_API_ENDPOINT"],
                    "api_key": os.environ["GEMINI_API_KEY_1"]})
models = sys.argv[2].split(",")

def probe(model):
    request = glm.GenerateContentRequest(
        model="models/" + model,
        contents=[glm.Content(role="user", parts=[glm.Part(text="Reply with the single word: ok")])],
        generation_config=glm.GenerationConfig(max_output_tokens=16))
    return client.generate_content(request, retry=None, timeout=60).candidates[0].finish_reason

with ThreadPoolExecutor(max_workers=int(sys.argv[1])) as pool:
    done = list(pool.map(probe, models))
print(len(done), "probes, import + probes in %.3f s" % (time.perf_counter() - began))
"""


class Setup:
    def __init__(self, keep: bool):
        self.tmp = Path(tempfile.mkdtemp(prefix="gr-bench-"))
        self.keep = keep
        self.site = self.tmp / "site"
        self.site.mkdir()
        # An installed-like copy: module + its .pyc (as pip install leaves it), and pip's shim.
        shutil.copy2(ROOT / "gemini_router.py", self.site / "gemini_router.py")
        py_compile.compile(str(self.site / "gemini_router.py"), doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
        self.shim = self.tmp / "gemini-router"
        self.shim.write_text(CONSOLE_SHIM)
        self.route_baseline = self.tmp / "route_baseline.py"
        self.route_baseline.write_text(ROUTE_BASELINE)
        self.rank_baseline = self.tmp / "rank_baseline.py"
        self.rank_baseline.write_text(RANK_BASELINE)
        self.fakes: list[FakeGemini] = []

    def fake(self, models=None, latency: float = 0.0) -> FakeGemini:
        f = FakeGemini(models=models, latency=latency).start()
        self.fakes.append(f)
        return f

    def env(self, state_dir: Path, endpoint: str) -> dict[str, str]:
        """A clean environment (nothing from the caller's shell), two keys."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("GEMINI_", "GOOGLE_API_KEY", "ROLLING_WINDOW",
                                    "COOLDOWN_SECS", "STATS_FILE", "STATE_FILE",
                                    "COOLDOWN_FILE", "XDG_STATE_HOME", "PYTHONPATH"))}
        env.update(GEMINI_API_ENDPOINT=endpoint, GEMINI_ROUTER_STATE_DIR=str(state_dir),
                   PYTHONPATH=str(self.site), NO_COLOR="1")
        for i, key in enumerate(KEYS, 1):
            env[f"GEMINI_API_KEY_{i}"] = key
        return env

    def cli(self, *args: str) -> list[str]:
        return [PY, str(self.shim), *args]

    def run_cli(self, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.cli(*args), env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=600)
        if proc.returncode:
            raise SystemExit(f"set-up command {' '.join(args)} failed ({proc.returncode}): "
                             f"{proc.stderr.strip()[-500:]}")
        return proc

    def close(self) -> None:
        for f in self.fakes:
            f.stop()
        if not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


def fingerprint(secret: str) -> str:
    return gr.ApiKey(1, secret).fingerprint


def synthetic_samples(rng: random.Random, now: float, n: int) -> list[dict]:
    """n samples in the module's format: mostly ok, a few transient / rate-limited."""
    out = []
    for j in range(n):
        kind = rng.choices(["ok", "transient", "rate_limited"], [90, 7, 3])[0]
        out.append({"t": round(now - (n - j) * 60.0, 3), "ok": kind == "ok", "kind": kind,
                    "latency": round(rng.uniform(0.2, 3.0), 4),
                    "prompt_tokens": rng.randint(5, 400) if kind == "ok" else 0,
                    "output_tokens": rng.randint(1, 900) if kind == "ok" else 0,
                    "key": fingerprint(KEYS[j % len(KEYS)])})
    return out


def write_doc(path: Path, doc: dict) -> None:
    """Written the way the module writes (compact, sorted keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, separators=(",", ":"), sort_keys=True))


def router_entry(model: dict) -> dict:
    """A fake_gemini model entry in the router state's model_list format."""
    name = model["name"].split("/", 1)[1]
    methods = list(model["supportedGenerationMethods"])
    return {"name": name, "display_name": model["displayName"],
            "input_limit": int(model["inputTokenLimit"]),
            "output_limit": int(model["outputTokenLimit"]), "methods": methods}


def write_big_state(state_dir: Path, n_models: int, endpoint: str) -> None:
    now = time.time()
    rng = random.Random(42)
    models = make_models(n_models)
    stats = gr.empty_doc("stats")
    stats["models"] = {router_entry(m)["name"]: synthetic_samples(rng, now, WINDOW)
                       for m in models}
    router = gr.empty_doc("router")
    router["model_list"] = {"endpoint": endpoint, "fetched_at": now,
                            "models": [router_entry(m) for m in models]}
    write_doc(state_dir / "model_stats.json", stats)
    write_doc(state_dir / "router_state.json", router)


def fill_stats(state_dir: Path, names: list[str]) -> None:
    """Full rolling windows for `names` (steady state), keeping the real model list."""
    rng = random.Random(7)
    stats = gr.empty_doc("stats")
    stats["models"] = {n: synthetic_samples(rng, time.time(), WINDOW) for n in names}
    write_doc(state_dir / "model_stats.json", stats)


def set_lock(state_dir: Path, value: str | None) -> Callable[[], None]:
    """An untimed `before` hook: put the router state's lock in a known state."""
    path = state_dir / "router_state.json"

    def hook() -> None:
        doc = json.loads(path.read_text())
        if doc.get("lock") != value:
            doc["lock"] = value
            write_doc(path, doc)
    return hook


def drop_model_list(state_dir: Path) -> Callable[[], None]:
    path = state_dir / "router_state.json"

    def hook() -> None:
        doc = json.loads(path.read_text())
        if doc.get("model_list") is not None:
            doc["model_list"] = None
            write_doc(path, doc)
    return hook


def expect_json_len(n: int) -> Callable[[int, str, str], str | None]:
    def check(code: int, out: str, err: str) -> str | None:
        try:
            got = len(json.loads(out))
        except ValueError:
            return f"stdout is not JSON: {out[:100]!r}"
        return None if got == n else f"expected {n} models in the output, got {got}"
    return check


def expect_in_stdout(text: str) -> Callable[[int, str, str], str | None]:
    def check(code: int, out: str, err: str) -> str | None:
        return None if text in out else f"expected {text!r} in stdout, got {out[:200]!r}"
    return check


def printed_seconds(pattern: str, where: str) -> Callable[[str, str], float | None]:
    """Pull a duration the command prints (e.g. rank's 'probed ... in 0.52 s')."""
    import re
    rx = re.compile(pattern)

    def extract(out: str, err: str) -> float | None:
        m = rx.search(err if where == "stderr" else out)
        return float(m.group(1)) if m else None
    return extract


def sample_counts(state_dir: Path) -> dict[str, int]:
    doc = json.loads((state_dir / "model_stats.json").read_text())
    return {m: len(s) for m, s in doc["models"].items()}


def file_sizes(state_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(state_dir.glob("*.json"))}


# ======================================================================================
# Section 2: where route's time goes (in fresh processes)
# ======================================================================================

PROFILE_SCRIPT = r'''
import contextlib, json, os, statistics, sys, time
from collections import Counter
P = time.perf_counter
R = {}
big_stats = sys.argv[1]
reps = int(sys.argv[2])

def rec(name, seconds):
    R[name] = seconds * 1000

def warm(name, fn, n=reps):
    times = []
    for _ in range(n):
        t = P(); fn(); times.append(P() - t)
    rec(name, statistics.median(times))

t = P(); src = open(os.path.join(os.environ["PYTHONPATH"], "gemini_router.py")).read()
compile(src, "gemini_router.py", "exec"); rec("compile gemini_router.py source (script form pays this)", P() - t)
t = P(); import gemini_router as gr; rec("import gemini_router (from .pyc)", P() - t)
t = P(); parser = gr.build_parser(); rec("build_parser()", P() - t)
t = P(); args = parser.parse_args(["route", "hi"]); rec("parse_args(route hi)", P() - t)
t = P(); settings = gr.load_settings(dict(os.environ), args); rec("load_settings (env, 2 keys)", P() - t)
store = gr.StateStore(settings)
t = P()
with store.transaction(write=False) as tx:
    tx.router
rec("1st transaction: import filelock + lock + load router", P() - t)
from filelock import FileLock
lock_path = str(store.lock_path)
def lock_only():
    lk = FileLock(lock_path, timeout=10, mode=0o600); lk.acquire(); lk.release()
warm("lock acquire + release (warm)", lock_only)
def read_all():
    with store.transaction(write=False) as tx:
        tx.stats; tx.router; tx.cooldowns
warm("transaction read-only: lock + load 3 files", read_all)
def read_all_commit():
    with store.transaction() as tx:
        tx.stats; tx.router; tx.cooldowns
warm("transaction, nothing changed: + commit's re-dump of 3 docs", read_all_commit)
counter = [0]
def write_router():
    counter[0] += 1
    with store.transaction() as tx:
        tx.router["next_key"] = counter[0] % 2
warm("transaction writing router_state.json (1 fsync)", write_router)
def write_stats():
    with store.transaction() as tx:
        samples = tx.stats["models"].setdefault("bench-model", [])
        samples.append({"t": time.time(), "ok": True, "kind": "ok", "latency": 0.1,
                        "prompt_tokens": 1, "output_tokens": 1, "key": "x"})
        del samples[:-20]
warm("transaction appending 1 sample (stats + fsync)", write_stats)
stats_path = settings.files["stats"]
text = open(stats_path).read()
R["(typical model_stats.json bytes)"] = len(text)
warm("json.loads model_stats.json (typical)", lambda: json.loads(text))
big = open(big_stats).read()
R["(200x20 model_stats.json bytes)"] = len(big)
warm("json.loads model_stats.json (200 x 20)", lambda: json.loads(big))
big_doc = json.loads(big)
warm("json.dumps (200 x 20) - commit does this per loaded doc", lambda: json.dumps(big_doc, separators=(",", ":")))
warm("sanitize_doc stats (200 x 20)", lambda: gr.sanitize_doc("stats", big_doc))
warm("all_stats + compute_tiers (200 x 20)", lambda: gr.compute_tiers(gr.all_stats(big_doc), {}, "balanced"))
warm("store.write stats: tmp + fsync + rename", lambda: store.write("stats", text))
tmp = str(stats_path) + ".nofsync"
def plain_write():
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, str(stats_path) + ".copy")
warm("same write without fsync", plain_write)
os.unlink(str(stats_path) + ".copy")
t = P(); glm = gr._import_sdk(); rec("import SDK (google.ai.generativelanguage_v1beta)", P() - t)
opts = {"api_endpoint": settings.endpoint, "api_key": settings.keys[0].secret}
t = P(); gen = glm.GenerativeServiceClient(transport="rest", client_options=opts); rec("1st GenerativeServiceClient(rest)", P() - t)
t = P(); mdl = glm.ModelServiceClient(transport="rest", client_options=opts); rec("1st ModelServiceClient(rest) (route does not need it)", P() - t)
opts2 = {"api_endpoint": settings.endpoint, "api_key": settings.keys[1].secret}
warm("GenerativeServiceClient(rest), warm", lambda: glm.GenerativeServiceClient(transport="rest", client_options=opts2))
warm("ModelServiceClient(rest), warm", lambda: glm.ModelServiceClient(transport="rest", client_options=opts2))
client = gr.GeminiClient(settings)
prompt = gr.PromptRequest("hi")
key = settings.keys[0]
model = "gemini-2.5-flash"     # first in the default order of the simulator's list
t = P(); client._client("GenerativeService", key); rec("GeminiClient._client (generative, warm imports)", P() - t)
request = client.build_request(prompt)
t = P(); out = client.generate(key, model, request); rec("1st generate (new connection, lazy imports)", P() - t)
assert out.kind == "ok", out
warm("generate, warm (keep-alive)", lambda: client.generate(key, model, request))
t = P(); listed = client.list_models(key); rec("1st list_models (new connection; 1 page, 14 models)", P() - t)
assert isinstance(listed, list) and len(listed) == 14, listed
warm("list_models, warm (keep-alive)", lambda: client.list_models(key), n=max(3, reps // 2))
with store.transaction(write=False) as tx:
    models = gr.cached_model_list(tx.router, settings, time.time())
    warm("plan_route (typical state)", lambda: gr.plan_route(tx, models, None, None))

# A whole warm route in-process, counting what it does to the state store.
counts = Counter()
real_fsync, real_load, real_write = os.fsync, gr.StateStore.load, gr.StateStore.write
real_tx, real_client = gr.StateStore.transaction, gr.GeminiClient._client
def fsync(fd):
    counts["fsync"] += 1; return real_fsync(fd)
def load(self, *args, **kw):
    counts["file loads"] += 1; return real_load(self, *args, **kw)
def write(self, *args, **kw):
    counts["file writes"] += 1; return real_write(self, *args, **kw)
@contextlib.contextmanager
def transaction(self, write=True):
    counts["transactions"] += 1
    with real_tx(self, write) as tx:
        yield tx
def client_of(self, service, key):
    counts["SDK clients built"] += (service, key.index) not in self._clients
    return real_client(self, service, key)
os.fsync, gr.StateStore.load, gr.StateStore.write = fsync, load, write
gr.StateStore.transaction, gr.GeminiClient._client = transaction, client_of
t = P(); result = gr.route_prompt(settings, store, prompt); rec("route_prompt in-process, warm, 0 latency", P() - t)
R["(route_prompt counts)"] = dict(counts)
print(json.dumps(R))
'''


PROBER_SCRIPT = r'''
# probe_models() vs a minimal SDK thread pool, in one process, SDK already imported,
# interleaved; each run builds its own client(s) and pool, as a fresh rank would.
import json, os, sys, time
from concurrent.futures import ThreadPoolExecutor
import gemini_router as gr
P = time.perf_counter
runs, conc = int(sys.argv[1]), int(sys.argv[2])
settings = gr.load_settings(dict(os.environ), gr.build_parser().parse_args(["rank"]))
store = gr.StateStore(settings)
glm = gr._import_sdk()
with store.transaction(write=False) as tx:
    names = gr.text_model_names(gr.cached_model_list(tx.router, settings, time.time()))

def pool_run():
    client = glm.GenerativeServiceClient(transport="rest", client_options={
        "api_endpoint": settings.endpoint, "api_key": settings.keys[0].secret})
    def probe(model):
        request = glm.GenerateContentRequest(
            model="models/" + model,
            contents=[glm.Content(role="user", parts=[glm.Part(text=gr.PROBE_PROMPT)])],
            generation_config=glm.GenerationConfig(max_output_tokens=16))
        return client.generate_content(request, retry=None, timeout=60)
    with ThreadPoolExecutor(max_workers=conc) as pool:
        assert len(list(pool.map(probe, names))) == len(names)

def prober_run():
    run = gr.probe_models(settings, store, names, 1, conc, False)
    assert len(run.results) == len(names) and not run.skipped, (len(run.results), run.skipped)

out = {"prober": [], "pool": []}
for i in range(runs + 1):                  # the first round is a warm-up
    for name, fn in ((("prober", prober_run), ("pool", pool_run)) if i % 2 else
                     (("pool", pool_run), ("prober", prober_run))):
        t = P(); fn(); elapsed = P() - t
        if i:
            out[name].append(elapsed)
print(json.dumps(out))
'''


def prober_in_process(setup: Setup, seed_state: Path, endpoint: str, n: int, conc: int,
                      runs: int) -> tuple[Cmd, Cmd]:
    """probe_models() and a minimal SDK pool timed in one process (no startup, no import)."""
    script = setup.tmp / "prober.py"
    script.write_text(PROBER_SCRIPT)
    state = setup.tmp / f"prober-state-{n}"
    shutil.copytree(seed_state, state)
    progress(f"prober in-process, {n} models ...")
    proc = subprocess.run([PY, str(script), str(runs), str(conc)], env=setup.env(state, endpoint),
                          capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    prober, pool = Cmd(f"probe_models {n}", [], {}), Cmd(f"SDK pool {n}", [], {})
    if proc.returncode:
        prober.error = pool.error = f"prober script failed: {proc.stderr.strip()[-300:]}"
    else:
        times = json.loads(proc.stdout.strip().splitlines()[-1])
        prober.wall, pool.wall = times["prober"], times["pool"]
    return prober, pool


def profile_route(setup: Setup, seed_state: Path, endpoint: str, big_stats: Path, procs: int,
                  reps: int) -> tuple[dict[str, float], dict]:
    script = setup.tmp / "profile_route.py"
    script.write_text(PROFILE_SCRIPT)
    runs: list[dict] = []
    for i in range(procs):
        progress(f"route profile: process {i + 1}/{procs}", end="\r")
        state = setup.tmp / f"profile-state-{i}"
        shutil.copytree(seed_state, state)
        proc = subprocess.run([PY, str(script), str(big_stats), str(reps)],
                              env=setup.env(state, endpoint), capture_output=True, text=True,
                              timeout=300, stdin=subprocess.DEVNULL)
        if proc.returncode:
            raise SystemExit(f"profile script failed: {proc.stderr[-2000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    progress("route profile: done" + " " * 20)
    meds = {k: statistics.median(r[k] for r in runs) for k in runs[0]
            if not isinstance(runs[0][k], dict)}
    return meds, runs[-1]["(route_prompt counts)"]


# ======================================================================================
# -X importtime
# ======================================================================================

def import_times(argv: list[str], env: dict[str, str], runs: int) -> dict[str, tuple[int, int, int]]:
    """module -> (median self us, median cumulative us, depth) over `runs` runs."""
    seen: dict[str, list[tuple[int, int, int]]] = {}
    for _ in range(runs):
        proc = subprocess.run([PY, "-X", "importtime", *argv], env=env, capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, timeout=120)
        for line in proc.stderr.splitlines():
            if not line.startswith("import time:") or "self [us]" in line:
                continue
            self_us, cum_us, name = line[len("import time:"):].split("|")
            depth = (len(name) - len(name.lstrip())) // 2
            seen.setdefault(name.strip(), []).append((int(self_us), int(cum_us), depth))
    return {m: (int(statistics.median(v[0] for v in vals)),
                int(statistics.median(v[1] for v in vals)), vals[0][2])
            for m, vals in seen.items()}


def heavy_imports(modules: dict[str, tuple[int, int, int]]) -> tuple[list[str], list[str]]:
    forbidden = sorted({label + ":" + name for name, label in FORBIDDEN.items()
                        if any(m == name or m.startswith(name + ".") for m in modules)})
    notable = [n for n in NOTABLE if n in modules]
    return forbidden, notable


# ======================================================================================
# Sections 6-8: the routing core in one process (issue 10, items 3, 4 and 10)
# ======================================================================================
# The measured code runs in a child process (`bench.py --worker NAME PARAMS`) that imports
# the installed-like copy of the module; the simulators stay on threads of this process, so
# the child's interpreter lock serves only the router and the SDK, as in a gateway whose
# upstream is Google. The child prints one JSON line; call counts are read from the
# simulators here.

CORE_LATENCY = 0.005          # section 6: the simulator's latency per answer
FLEET_LATENCY = 0.020         # section 8: per successful answer (flaky 503s come back at once)
OVERHEAD_THREADS = (1, 8, 32)
# At least this many pairs per thread: at 32 threads a p99 then rests on 32 samples above
# it, not 6 (the tail of a saturated interpreter is wide; fewer made the p99 a coin toss).
OVERHEAD_MIN_PER_THREAD = 100
OVERHEAD_P50_ONE = 1.0        # ms over a plain SDK call, single-threaded (issue 10, item 10)
OVERHEAD_P50_MANY = 2.0       # ms at 8 and 32 threads (the gateway issue's figures at 32)
OVERHEAD_P99_MANY = 10.0
PROFILE_ROUTES = 200
COOLING_KEYS, COOLING_MODELS = 50, 30
COOLING_CPU_MS = 10           # "a route's own CPU time stays in milliseconds"
FLEET_KEYS = 5
FLEET_FLAKY_RATE = 0.3
FLEET_SEED = 10
FLEET_SUCCESS = 0.999
FLEET_P95_RATIO = 1.2


def bench_keys(n: int, tag: str) -> list[str]:
    """n distinct fake keys shaped like real ones (39 characters)."""
    return [f"AIzaSyBENCH-{tag}-{i:03d}".ljust(39, "x") for i in range(1, n + 1)]


def core_env(url: str, state_dir: Path | str, keys: list[str]) -> dict[str, str]:
    env = {"GEMINI_API_ENDPOINT": url, "GEMINI_ROUTER_STATE_DIR": str(state_dir)}
    env.update({f"GEMINI_API_KEY_{i}": key for i, key in enumerate(keys, 1)})
    return env


def pctl(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), linearly interpolated."""
    return gr.percentile(sorted(values), q / 100) if values else None


def run_worker(setup: Setup, name: str, params: dict, timeout: float = 900) -> dict:
    """Run `worker_<name>(params)` in a child process; its JSON answer, or {"error": ...}."""
    env = setup.env(setup.tmp, "http://127.0.0.1:9")      # clean; the worker gets its own
    env["GR_BENCH_MODULE_DIR"] = str(setup.site)
    proc = subprocess.run([PY, str(Path(__file__).resolve()), "--worker", name,
                           json.dumps(params)], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, cwd=str(ROOT))
    if proc.returncode:
        return {"error": f"worker {name} exit {proc.returncode}: {proc.stderr.strip()[-800:]}"}
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    answer["stderr"] = proc.stderr.strip()[-2000:]
    return answer


# --- in the child ----------------------------------------------------------------------

def core_router(url: str, state_dir: str, keys: list[str]) -> "gr.Router":
    """A long-lived routing core as the gateway runs it: rotation in memory, answers written
    in a batch every Router.FLUSH_EVERY seconds."""
    settings = gr.load_settings(core_env(url, state_dir, keys))
    router = gr.Router(settings, gr.StateStore(settings), shared_rotation=False)
    router.start_flusher()
    return router


def in_threads(n: int, work: Callable[[int], None],
               prepare: Callable[[int], None] | None = None) -> float:
    """Run work(0..n-1) on n threads started together, each after its untimed
    prepare(tid) (opening connections, say); the wall time of the work."""
    import threading
    barrier = threading.Barrier(n + 1)

    def run(tid: int) -> None:
        if prepare is not None:
            prepare(tid)
        barrier.wait()
        work(tid)
    threads = [threading.Thread(target=run, args=(t,)) for t in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def profiled(fn: Callable[[], None]) -> Any:
    """A cProfile.Profile of fn() (wall-clock timer: waits for locks and the GIL count)."""
    import cProfile
    prof = cProfile.Profile()
    prof.runcall(fn)
    return prof


def profile_text(profiles: list, sort: str, lines: int, restrict: str | None = None) -> str:
    """The top `lines` rows of the merged profiles by `sort`, optionally only the functions
    whose file:line(name) matches `restrict`."""
    import io
    import pstats
    buf = io.StringIO()
    stats = pstats.Stats(profiles[0], stream=buf)
    for prof in profiles[1:]:
        stats.add(prof)
    stats.strip_dirs().sort_stats(sort).print_stats(*([restrict] if restrict else []), lines)
    text = buf.getvalue()
    return text[text.find("   ncalls"):].rstrip() if "   ncalls" in text else text.strip()


def worker_overhead(p: dict) -> dict:
    """Section 6: Router.route vs a plain SDK call to the same simulator, interleaved
    (order alternating), at 1, 8 and 32 threads routing at once."""
    router = core_router(p["url"], p["state"], p["keys"])
    glm = gr._import_sdk()
    clients = [glm.GenerativeServiceClient(transport="rest", client_options={
        "api_endpoint": p["url"], "api_key": key}) for key in p["keys"]]
    prompt = gr.PromptRequest("hi")
    model = router.route(prompt, model=None).model        # lists the models once

    def routed(i: int) -> None:
        result = router.route(prompt, model=None)
        assert result.text == f"[{result.model}] hi", result.text

    def plain(i: int) -> None:
        request = glm.GenerateContentRequest(
            model="models/" + model,
            contents=[glm.Content(role="user", parts=[glm.Part(text="hi")])])
        response = clients[i % len(clients)].generate_content(request, timeout=60, retry=None)
        assert response.candidates[0].content.parts[0].text == f"[{model}] hi"

    levels = {}
    for threads in p["threads"]:
        per_thread = max(10, p["pairs"] // threads,
                         OVERHEAD_MIN_PER_THREAD if threads > 1 else 0)
        got: dict[str, list[float]] = {"route": [], "plain": []}
        errors: list[str] = []

        def work(tid: int) -> None:
            mine: dict[str, list[float]] = {"route": [], "plain": []}
            for i in range(-3, per_thread):                   # 3 warm-up pairs per thread
                order = (("route", routed), ("plain", plain)) if (i + tid) % 2 else \
                    (("plain", plain), ("route", routed))
                for name, fn in order:
                    t0 = time.perf_counter()
                    try:
                        fn(i + tid)
                    except Exception as exc:  # noqa: BLE001 - counted and shown
                        errors.append(f"{name}: {exc!r}"[:300])
                        continue
                    if i >= 0:
                        mine[name].append(time.perf_counter() - t0)
            got["route"].extend(mine["route"])   # list.extend is atomic under the GIL
            got["plain"].extend(mine["plain"])
        wall = in_threads(threads, work)
        levels[str(threads)] = {"route": got["route"], "plain": got["plain"], "wall": wall,
                                "errors": len(errors), "error_sample": errors[:3]}
    n = p["profile_routes"]
    one = profiled(lambda: [router.route(prompt, model=None) for _ in range(n)])
    many: list = []                    # cProfile follows one thread: one profile per thread
    threads = max(p["threads"])
    in_threads(threads, lambda tid: many.append(profiled(
        lambda: [router.route(prompt, model=None) for _ in range(max(1, n // threads))])))
    router.close()
    return {"model": model, "levels": levels, "profiles": {
        f"{n} routes, 1 thread: top 15 by cumulative time, the router's own functions":
            profile_text([one], "cumulative", 15, r"gemini_router\.py"),
        f"{n} routes, 1 thread: top 15 by own time": profile_text([one], "tottime", 15),
        f"{max(1, n // threads) * threads} routes on {threads} threads (all threads summed): "
        "top 15 by cumulative time, the router's own functions":
            profile_text(many, "cumulative", 15, r"gemini_router\.py"),
        f"the same {threads} threads: top 15 by own time": profile_text(many, "tottime", 15)}}


def worker_cooling(p: dict) -> dict:
    """Section 7: a route's own CPU time when every (key, model) pair is cooling."""
    prompt = gr.PromptRequest("hi")

    def one(router: "gr.Router") -> tuple[float, float, str]:
        c0, w0 = time.process_time(), time.perf_counter()
        try:
            router.route(prompt, model=None)
            what = "answered (expected nothing available)"
        except gr.RouterError as exc:
            what = f"{type(exc).__name__} (exit {exc.exit_code}): {exc}"
        return (time.process_time() - c0) * 1000, (time.perf_counter() - w0) * 1000, what

    router = core_router(p["url"], p["state"], p["keys"])
    router.client                      # the SDK import is not the route's work
    long_lived = [one(router) for _ in range(p["routes"])]
    router.close()
    settings = router.settings
    fresh = []
    for _ in range(p["fresh"]):        # as the CLI does: a new Router and StateStore per route
        cli_router = gr.Router(settings, gr.StateStore(settings))
        try:
            fresh.append(one(cli_router))
        finally:
            cli_router.close()
    return {"long": long_lived, "fresh": fresh}


def worker_fleet(p: dict) -> dict:
    """Section 8: route the same prompts through a healthy and a troubled fleet, one route on
    each in turn (order alternating), on a few threads."""
    routers = {name: core_router(url, state, p["keys"]) for name, (url, state) in
               p["fleets"].items()}
    prompt = gr.PromptRequest("hi")
    got: dict[str, list] = {name: [] for name in routers}
    per_thread = p["routes"] // p["threads"]

    def work(tid: int) -> None:
        names = list(routers)
        mine: dict[str, list] = {name: [] for name in names}
        for i in range(per_thread):
            for name in (names if (i + tid) % 2 else names[::-1]):
                t0 = time.perf_counter()
                try:
                    result = routers[name].route(prompt, model=None)
                    ok = result.text == f"[{result.model}] hi"
                    row = [time.perf_counter() - t0, ok, len(result.attempts),
                           "" if ok else f"wrong text {result.text[:80]!r}"]
                except gr.RouterError as exc:
                    row = [time.perf_counter() - t0, False, None,
                           f"{type(exc).__name__} (exit {exc.exit_code}): {exc}"[:300]]
                mine[name].append(row)
        for name in names:
            got[name].extend(mine[name])
    wall = in_threads(p["threads"], work) if per_thread else 0.0
    profiles = {}
    for name, router in routers.items():
        n = p.get("profile_routes", 0)
        if not n:
            continue

        def attempt_all() -> None:
            for _ in range(n):
                with contextlib.suppress(gr.RouterError):
                    router.route(prompt, model=None)
        router.client                  # the SDK import is not the routes' work
        prof = profiled(attempt_all)
        profiles[f"{n} more routes on the {name} fleet, 1 thread: top 15 by cumulative "
                 "time, the router's own functions"] = profile_text(
            [prof], "cumulative", 15, r"gemini_router\.py")
        profiles["the same: top 15 by own time"] = profile_text([prof], "tottime", 15)
    for router in routers.values():
        router.close()
    return {"routes": got, "wall": wall, "profiles": profiles}


WORKERS = {"overhead": worker_overhead, "cooling": worker_cooling, "fleet": worker_fleet}


# --- in the bench process ----------------------------------------------------------------

@dataclass
class Figure:
    """One line of the final summary: a measured figure against its target."""
    what: str
    value: str
    target: str = "info"
    ok: bool | None = None

    def cells(self) -> list[str]:
        verdict = "info" if self.ok is None else ("pass" if self.ok else "FAIL")
        return [self.what, self.value, self.target, verdict]


def fmt_ms2(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f} ms"


def section_overhead(setup: Setup, pairs: int) -> tuple[list[str], list[Figure]]:
    """Section 6: the router's own cost over a plain SDK call, 1/8/32 threads."""
    progress(f"core overhead: {pairs} route + SDK pairs per level, threads "
             f"{'/'.join(map(str, OVERHEAD_THREADS))} ...")
    fake = setup.fake(latency=CORE_LATENCY)
    data = run_worker(setup, "overhead", {
        "url": fake.url, "state": str(setup.tmp / "state-core"), "keys": bench_keys(3, "CORE"),
        "threads": list(OVERHEAD_THREADS), "pairs": pairs, "profile_routes": PROFILE_ROUTES})
    lines = [f"== Router overhead over a plain SDK call (one process, long-lived Router, "
             f"simulator {CORE_LATENCY * 1000:.0f} ms, 3 keys) =="]
    if "error" in data:
        return lines + [f"ERROR {data['error']}"], [Figure("router overhead", "ERROR", ok=False)]
    rows, figures = [], []
    for threads, level in data["levels"].items():
        r, b = level["route"], level["plain"]
        over50 = pctl(r, 50) - pctl(b, 50) if r and b else None
        over99 = pctl(r, 99) - pctl(b, 99) if r and b else None
        many = threads != "1"
        checks = [(over50, OVERHEAD_P50_MANY if many else OVERHEAD_P50_ONE, "p50")]
        if many:
            checks.append((over99, OVERHEAD_P99_MANY, "p99"))
        ok = level["errors"] == 0 and all(v is not None and v * 1000 <= t for v, t, _ in checks)
        target = " / ".join(f"{name} <= {t:g} ms" for _, t, name in checks)
        rows.append([threads, str(len(r)), fmt_ms2(pctl(r, 50)), fmt_ms2(pctl(b, 50)),
                     fmt_ms2(over50), fmt_ms2(pctl(r, 99)), fmt_ms2(pctl(b, 99)),
                     fmt_ms2(over99), f"{2 * len(r) / level['wall']:.0f}/s",
                     str(level["errors"]), target, "pass" if ok else "FAIL"])
        figures.append(Figure(f"route overhead, {threads} thread{'s' if many else ''} "
                              "(p50 / p99)", f"{fmt_ms2(over50)} / {fmt_ms2(over99)}",
                              target, ok))
        for sample in level["error_sample"]:
            lines.append(f"error at {threads} threads: {sample}")
    lines.extend(table_lines(
        ["threads", "pairs", "route p50", "SDK p50", "over p50", "route p99", "SDK p99",
         "over p99", "calls/s", "errors", "target", "verdict"], rows, right=set(range(1, 10))))
    lines.append(f"over = route percentile minus the same percentile of the plain SDK call "
                 f"(GenerativeServiceClient(transport='rest').generate_content on "
                 f"{data['model']}, one client per key, calls interleaved with the routes).")
    if not all(f.ok for f in figures):
        lines.append("")
        lines.append("where a route's time goes (cProfile, wall clock: the wait for the "
                     "simulator, for locks and for the interpreter lock included):")
        for title, text in data["profiles"].items():
            lines.append("")
            lines.append(f"-- {title}")
            lines.extend(text.splitlines())
    return lines, figures


def section_cooling(setup: Setup, routes: int) -> tuple[list[str], list[Figure]]:
    """Section 7: a route's CPU time with every (key, model) pair cooling."""
    progress(f"cooling: {COOLING_KEYS} keys x {COOLING_MODELS} models, all cooling ...")
    fake = setup.fake(models=make_models(COOLING_MODELS))
    state = setup.tmp / "state-cooling"
    keys = bench_keys(COOLING_KEYS, "COOL")
    settings = gr.load_settings(core_env(fake.url, state, keys))
    store = gr.StateStore(settings)
    lister = gr.Router(settings, store)
    names = gr.text_model_names(lister.models())     # the model list, cached in the state
    lister.close()
    now = time.time()
    with store.transaction() as tx:
        for key in settings.keys:
            for model in names:
                gr.add_cooldown(tx.cooldowns, model, key.fingerprint, now + 3600,
                                "You exceeded your current quota (GenerateRequestsPerMinute"
                                "PerProjectPerModel-FreeTier)", "rate_limited", now, "project")
        entries = len(tx.cooldowns["cooldowns"])
    fake.reset_log()
    data = run_worker(setup, "cooling", {"url": fake.url, "state": str(state), "keys": keys,
                                         "routes": routes, "fresh": max(5, routes // 2)})
    calls = len(fake.calls)
    lines = [f"== A route's own CPU time, {COOLING_KEYS} keys x {len(names)} models, every "
             f"pair cooling ({entries} cooldown entries) =="]
    if "error" in data:
        return lines + [f"ERROR {data['error']}"], [Figure("cooling route CPU", "ERROR", ok=False)]
    long_lived, fresh = data["long"], data["fresh"]
    outcomes = {row[2] for row in long_lived + fresh}
    nothing = all(o.startswith("NothingAvailable (exit 4)") for o in outcomes)
    med_cpu = statistics.median(r[0] for r in long_lived[1:])
    rows = [["long-lived Router, 1st route (builds the view)", f"{long_lived[0][0]:.2f} ms",
             f"{long_lived[0][1]:.2f} ms", "1"],
            ["long-lived Router, later routes (median)", f"{med_cpu:.2f} ms",
             f"{statistics.median(r[1] for r in long_lived[1:]):.2f} ms",
             str(len(long_lived) - 1)],
            ["new Router + StateStore per route, as the CLI (median)",
             f"{statistics.median(r[0] for r in fresh):.2f} ms",
             f"{statistics.median(r[1] for r in fresh):.2f} ms", str(len(fresh))]]
    lines.extend(table_lines(["route", "CPU (process_time)", "wall", "routes"], rows,
                             right={1, 2, 3}))
    lines.append(f"upstream calls made by the {len(long_lived) + len(fresh)} routes: {calls} "
                 f"(target 0): {'pass' if calls == 0 else 'FAIL'}")
    lines.append("every route ended: " + "; ".join(sorted(o[:160] for o in outcomes)))
    figures = [Figure("route CPU, 50 keys x 30 models cooling (median)",
                      f"{med_cpu:.2f} ms", f"< {COOLING_CPU_MS:g} ms, exit 4",
                      med_cpu < COOLING_CPU_MS and nothing),
               Figure("  same, new Router per route (CLI)",
                      f"{statistics.median(r[0] for r in fresh):.2f} ms"),
               Figure("  upstream calls by those routes", str(calls), "0", calls == 0)]
    return lines, figures


def section_fleet(setup: Setup, routes: int, threads: int) -> tuple[list[str], list[Figure]]:
    """Section 8: the 30% fleet vs a healthy one, side by side."""
    progress(f"fleet: {routes} routes on each fleet, {threads} threads ...")
    keys = bench_keys(FLEET_KEYS, "FLEET")
    healthy = setup.fake(latency=FLEET_LATENCY)
    troubled = setup.fake(latency=FLEET_LATENCY)
    troubled.set_behaviour("flaky", rate=FLEET_FLAKY_RATE, seed=FLEET_SEED)
    for key in keys[1:3]:
        troubled.set_behaviour("rate_minute", key=key, retry_delay="3600s")
    troubled.set_behaviour("invalid_key", key=keys[4])
    fleets = {"healthy": healthy, "flaky": troubled}
    data = run_worker(setup, "fleet", {
        "keys": keys, "routes": routes, "threads": threads,
        "fleets": {name: [f.url, str(setup.tmp / f"state-fleet-{name}")]
                   for name, f in fleets.items()}})
    lines = [f"== The 30% fleet: {FLEET_KEYS} keys, every model answering "
             f"{FLEET_FLAKY_RATE:.0%} of calls with an immediate 503, key#2 and key#3 "
             "rate-limited on every model (retryDelay 3600s), key#5 invalid; vs a healthy "
             f"fleet; {FLEET_LATENCY * 1000:.0f} ms per answer; long-lived Router, "
             f"{threads} thread{'s' if threads > 1 else ''}, routes interleaved =="]
    if "error" in data:
        return lines + [f"ERROR {data['error']}"], [Figure("30% fleet", "ERROR", ok=False)]
    rows, stats = [], {}
    for name, fake in fleets.items():
        got = data["routes"][name]
        times = [r[0] for r in got]
        ok = sum(1 for r in got if r[1])
        generate = [c for c in fake.calls if c.action == "generate"]
        by_status: dict[int, int] = {}
        for c in generate:
            by_status[c.status] = by_status.get(c.status, 0) + 1
        stats[name] = {"n": len(got), "ok": ok, "p50": pctl(times, 50), "p95": pctl(times, 95),
                       "p99": pctl(times, 99), "calls": len(generate) / max(1, len(got)),
                       "failures": sorted({r[3] for r in got if not r[1]})}
        rows.append([name, str(len(got)), f"{ok / max(1, len(got)):.1%}",
                     fmt_ms2(stats[name]["p50"]), fmt_ms2(stats[name]["p95"]),
                     fmt_ms2(stats[name]["p99"]), f"{stats[name]['calls']:.2f}",
                     ", ".join(f"{s}: {n}" for s, n in sorted(by_status.items())),
                     str(fake.count(action=("list", "get")))])
    lines.extend(table_lines(["fleet", "routes", "success", "p50", "p95", "p99",
                              "calls/route", "upstream statuses", "list/get calls"], rows,
                             right={1, 2, 3, 4, 5, 6, 8}))
    h, f = stats["healthy"], stats["flaky"]
    ratio50 = f["p50"] / h["p50"] if h["p50"] else None
    ratio95 = f["p95"] / h["p95"] if h["p95"] else None
    success = f["ok"] / max(1, f["n"])
    lines.append(f"flaky vs healthy: p50 {ratio50:.2f}x, p95 {ratio95:.2f}x (target <= "
                 f"{FLEET_P95_RATIO}x): {'pass' if ratio95 <= FLEET_P95_RATIO else 'FAIL'}; "
                 f"success {success:.1%} (target >= {FLEET_SUCCESS:.1%}): "
                 f"{'pass' if success >= FLEET_SUCCESS else 'FAIL'}")
    for name in fleets:
        for failure in stats[name]["failures"][:5]:
            lines.append(f"{name} failure: {failure}")
    by_attempts: dict[int, list[float]] = {}
    for row in data["routes"]["flaky"]:
        if row[1]:
            by_attempts.setdefault(min(row[2], 4), []).append(row[0])
    lines.append("flaky fleet, answered routes by upstream calls: " + "; ".join(
        f"{k}{'+' if k == 4 else ''} call{'s' if k > 1 else ''}: {len(v)} routes, p50 "
        f"{fmt_ms2(pctl(v, 50))}" for k, v in sorted(by_attempts.items())))
    figures = [Figure("30% fleet: routes answered", f"{success:.1%} of {f['n']}",
                      f">= {FLEET_SUCCESS:.1%}", success >= FLEET_SUCCESS),
               Figure("30% fleet: p95 vs healthy", f"{fmt_ms2(f['p95'])} vs "
                      f"{fmt_ms2(h['p95'])} = {ratio95:.2f}x", f"<= {FLEET_P95_RATIO}x",
                      ratio95 <= FLEET_P95_RATIO),
               Figure("  p50 vs healthy", f"{fmt_ms2(f['p50'])} vs {fmt_ms2(h['p50'])} = "
                      f"{ratio50:.2f}x"),
               Figure("  upstream calls per route", f"{f['calls']:.2f} (healthy "
                      f"{h['calls']:.2f})")]
    if not all(fig.ok is not False for fig in figures):
        progress(f"fleet: a target missed; profiling {PROFILE_ROUTES} more routes ...")
        more = run_worker(setup, "fleet", {
            "keys": keys, "routes": 0, "threads": 1, "profile_routes": PROFILE_ROUTES,
            "fleets": {"flaky": [troubled.url, str(setup.tmp / "state-fleet-flaky")]}})
        lines.append("")
        lines.append("where the flaky fleet's time goes (cProfile, wall clock; the same "
                     "state, a new Router):")
        for title, text in more.get("profiles", {"error": more.get("error", "")}).items():
            lines.append("")
            lines.append(f"-- {title}")
            lines.extend(text.splitlines())
    return lines, figures


# --- the gateway (issue 14) ------------------------------------------------------------------
# Three processes, as they run for real: the simulator (tests/fake_gemini.py), the gateway
# (`gemini-router serve`, installed-like copy) and this one sending the load from plain
# threads, each with its own requests.Session (keep-alive). Direct calls to the simulator and
# calls through the gateway are interleaved on every thread, so both see the same machine.

# Threads sending at once -> the simulator's latency for that overhead figure. At 32 the
# simulator is slower (as real answers are), so 32 requests are always in flight without
# saturating 2 cores: what saturation costs is the throughput figure's business.
GATEWAY_LEVELS = {1: 0.005, 32: 0.1}
GATEWAY_P50_MS, GATEWAY_P99_MS = 2.0, 10.0
GATEWAY_RPS = 300              # requests/s at 32 threads, zero-latency simulator, 2 cores
THROUGHPUT_THREADS = 32
ROUTE_LATENCY = 0.05           # the simulator's latency for the scripted route figures
GATEWAY_MODEL = "gemini-2.5-flash"
GATEWAY_PATH = f"/v1beta/models/{GATEWAY_MODEL}:generateContent"      # a pinned model
GATEWAY_BODY = json.dumps({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}).encode()
GATEWAY_HEADERS = {"content-type": "application/json"}
OVERHEAD_TARGET = f"p50 <= {GATEWAY_P50_MS:g} ms / p99 <= {GATEWAY_P99_MS:g} ms"
OVERHEAD_HEADERS = ["pairs", "direct p50", "gateway p50", "over p50", "direct p99",
                    "gateway p99", "over p99", "failed"]

# Gateways to start in front of one simulator: name -> (state directory, environment added
# to Setup.env's).
Gateways = dict[str, tuple[Path, dict[str, str]]]


def start_simulator(latency: float) -> tuple[subprocess.Popen, str]:
    """tests/fake_gemini.py as a process of its own; (process, url)."""
    proc = subprocess.Popen([PY, str(TESTS / "fake_gemini.py"), "--port", "0", "--latency",
                             str(latency)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    if "listening on " not in line:
        proc.kill()
        raise SystemExit(f"the simulator did not start: {line}")
    return proc, line.split("listening on ", 1)[1].split()[0]


def start_gateway(setup: Setup, url: str, state: Path, extra_env: dict[str, str] | None = None
                  ) -> tuple[subprocess.Popen, str, Path]:
    """`gemini-router serve --port 0` (its log to a file), with Setup.env plus extra_env;
    (process, url, log path)."""
    log = setup.tmp / f"gateway-{state.name}.log"
    env = {**setup.env(state, url), **(extra_env or {})}
    with open(log, "w") as sink:
        proc = subprocess.Popen(setup.cli("serve", "--port", "0"), env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=sink)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = log.read_text()
        if "serving on " in text:
            return proc, text.split("serving on ", 1)[1].split()[0], log
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"the gateway did not start: {log.read_text()[-800:]}")


def stop_process(proc: subprocess.Popen) -> None:
    import signal
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def running_gateways(setup: Setup, latency: float, gateways: Gateways
                     ) -> Iterator[tuple[str, dict[str, str]]]:
    """The simulator at `latency` and one gateway per entry in front of it, all stopped on
    the way out; (simulator url, {name: gateway url})."""
    procs: list[subprocess.Popen] = []
    try:
        sim, sim_url = start_simulator(latency)
        procs.append(sim)
        urls: dict[str, str] = {}
        for name, (state, extra_env) in gateways.items():
            gw, urls[name], _ = start_gateway(setup, sim_url, state, extra_env)
            procs.append(gw)
        yield sim_url, urls
    finally:
        for proc in reversed(procs):
            stop_process(proc)


def gateway_load(threads: int, per_thread: int, targets: list[tuple[str, str, dict]],
                 body: bytes) -> tuple[dict[str, list[float]], float, int]:
    """Each thread sends per_thread rounds, one request to every target per round (order
    rotated each round), after one untimed request to each that opens its keep-alive
    connection; ({target: latencies}, wall seconds, failures)."""
    import threading
    import requests
    times: dict[str, list[float]] = {name: [] for name, _, _ in targets}
    failures = [0]
    lock = threading.Lock()
    sessions = {n: requests.Session() for n in range(threads)}

    def connect(n: int) -> None:
        for _, url, headers in targets:
            sessions[n].post(url, data=body, headers=headers, timeout=60)

    def work(n: int) -> None:
        session = sessions[n]
        own: dict[str, list[float]] = {name: [] for name, _, _ in targets}
        bad = 0
        for i in range(per_thread):
            for name, url, headers in targets[(i + n) % len(targets):] + \
                    targets[:(i + n) % len(targets)]:
                t0 = time.perf_counter()
                r = session.post(url, data=body, headers=headers, timeout=60)
                own[name].append(time.perf_counter() - t0)
                bad += r.status_code != 200
        with lock:
            for name, values in own.items():
                times[name] += values
            failures[0] += bad
    wall = in_threads(threads, work, prepare=connect)
    return times, wall, failures[0]


def direct_target(sim_url: str) -> tuple[str, str, dict]:
    """The call a gateway makes, sent straight to the simulator with the key it would add."""
    return ("direct", sim_url + GATEWAY_PATH, {**GATEWAY_HEADERS, "x-goog-api-key": KEYS[0]})


def gateway_targets(gw_url: str, sim_url: str | None) -> list[tuple[str, str, dict]]:
    """One round of load on a gateway; with sim_url, a direct call interleaved with it."""
    gateway = ("gateway", gw_url + GATEWAY_PATH, GATEWAY_HEADERS)
    return [direct_target(sim_url), gateway] if sim_url else [gateway]


@dataclass
class GatewayRun:
    """One gateway's share of a load: its latencies, the direct calls interleaved with them,
    failed requests (either), seconds under load, and every request it was sent (timed or
    not)."""
    gateway: list[float] = field(default_factory=list)
    direct: list[float] = field(default_factory=list)
    failed: int = 0
    wall: float = 0.0
    sent: int = 0

    def over(self, q: float) -> float | None:
        """The gateway's q-th percentile minus the direct call's."""
        g, d = pctl(self.gateway, q), pctl(self.direct, q)
        return None if g is None or d is None else g - d

    def rate(self) -> float:
        """Answers per second through the gateway."""
        return len(self.gateway) / self.wall if self.wall else 0.0

    def overhead_ok(self) -> bool:
        over50, over99 = self.over(50), self.over(99)
        return (self.failed == 0 and over50 is not None and over99 is not None
                and over50 * 1000 <= GATEWAY_P50_MS and over99 * 1000 <= GATEWAY_P99_MS)

    def overhead_cells(self) -> list[str]:
        """The cells under OVERHEAD_HEADERS."""
        g, d = self.gateway, self.direct
        return [str(len(g)), fmt_ms2(pctl(d, 50)), fmt_ms2(pctl(g, 50)), fmt_ms2(self.over(50)),
                fmt_ms2(pctl(d, 99)), fmt_ms2(pctl(g, 99)), fmt_ms2(self.over(99)),
                str(self.failed)]

    def overhead_figure(self, what: str) -> Figure:
        return Figure(f"{what} (p50 / p99)",
                      f"{fmt_ms2(self.over(50))} / {fmt_ms2(self.over(99))}", OVERHEAD_TARGET,
                      self.overhead_ok())

    def throughput_figure(self, what: str) -> Figure:
        return Figure(what, f"{self.rate():.0f} requests/s", f">= {GATEWAY_RPS}/s",
                      self.failed == 0 and self.rate() >= GATEWAY_RPS)


def warm_gateways(urls: dict[str, str], sim_url: str | None, threads: int, rounds: int) -> None:
    """Untimed rounds on every gateway first (connections, lazy imports, the model list)."""
    for url in urls.values():
        gateway_load(threads, rounds, gateway_targets(url, sim_url), GATEWAY_BODY)


def measure_gateways(urls: dict[str, str], sim_url: str | None, threads: int, per_thread: int,
                     blocks: int = 1) -> dict[str, GatewayRun]:
    """About per_thread rounds from each of `threads` threads on every gateway, sent in
    `blocks` blocks: a block on each gateway in turn, the order rotated every block, so that
    whatever else the machine does falls on all of them alike. With sim_url, every round also
    calls the simulator directly (interleaved: the overhead's reference)."""
    runs = {name: GatewayRun() for name in urls}
    names = list(urls)
    rounds = max(1, round(per_thread / blocks))
    for block in range(blocks):
        first = block % len(names)
        for name in names[first:] + names[:first]:
            times, wall, bad = gateway_load(threads, rounds, gateway_targets(urls[name], sim_url),
                                            GATEWAY_BODY)
            run = runs[name]
            run.gateway += times["gateway"]
            run.direct += times.get("direct", [])
            run.failed += bad
            run.wall += wall
            run.sent += len(times["gateway"]) + threads                  # + the connects
    return runs


def simulator_rate(sim_url: str, threads: int, per_thread: int) -> float:
    """Answers per second of the simulator alone under the same load."""
    times, wall, _ = gateway_load(threads, per_thread, [direct_target(sim_url)], GATEWAY_BODY)
    return len(times["direct"]) / wall


def section_gateway(setup: Setup, requests_per_level: int, throughput_requests: int,
                    runs: int) -> tuple[list[str], list[Figure]]:
    """The gateway's overhead over a direct call (p50/p99 at 1 and 32 threads), its
    throughput at 32 threads against a zero-latency simulator, and a scripted `route`
    through it against a direct `route` and `python -c pass`."""
    lines = ["== The gateway (gemini-router serve): overhead, throughput, scripted route =="]
    figures: list[Figure] = []

    # --- overhead ---------------------------------------------------------------------
    progress(f"gateway overhead: {requests_per_level} pairs per level, threads "
             f"{'/'.join(map(str, GATEWAY_LEVELS))} ...")
    rows = []
    for threads, latency in GATEWAY_LEVELS.items():
        with running_gateways(setup, latency, {
                "gateway": (setup.tmp / f"state-gw-{threads}", {})}) as (sim_url, urls):
            warm_gateways(urls, sim_url, threads, 3)
            run = measure_gateways(urls, sim_url, threads,
                                   max(1, requests_per_level // threads))["gateway"]
        rows.append([str(threads), f"{latency * 1000:.0f} ms", *run.overhead_cells(),
                     "pass" if run.overhead_ok() else "FAIL"])
        figures.append(run.overhead_figure(f"gateway overhead, {threads} thread(s)"))
    lines.extend(table_lines(["threads", "simulator", *OVERHEAD_HEADERS, "verdict"], rows,
                             right=set(range(1, 10))))
    lines.append(f"POST {GATEWAY_PATH} (a pinned model); over = gateway percentile minus the "
                 "same percentile of the direct call, the two interleaved on the same threads; "
                 "at 32 threads the simulator answers in 100 ms, so 32 requests are in "
                 "flight without saturating the machine")

    # --- throughput -------------------------------------------------------------------
    progress(f"gateway throughput: {throughput_requests} requests on {THROUGHPUT_THREADS} "
             "threads, zero-latency simulator ...")
    per_thread = max(1, throughput_requests // THROUGHPUT_THREADS)
    with running_gateways(setup, 0.0, {
            "gateway": (setup.tmp / "state-throughput", {})}) as (sim_url, urls):
        warm_gateways(urls, None, 8, 20)
        run = measure_gateways(urls, None, THROUGHPUT_THREADS, per_thread)["gateway"]
        direct_rate = simulator_rate(sim_url, THROUGHPUT_THREADS, per_thread)
    figures.append(run.throughput_figure(
        f"gateway throughput, {THROUGHPUT_THREADS} threads, zero-latency simulator"))
    lines.append("")
    lines.append(f"throughput at {THROUGHPUT_THREADS} threads: {run.rate():.0f} requests/s "
                 f"through the gateway ({len(run.gateway)} requests in {run.wall:.2f} s, "
                 f"{run.failed} failed); the simulator alone answers {direct_rate:.0f}/s to "
                 f"the same load; {os.cpu_count()} cores shared by the three processes")

    # --- scripted route ---------------------------------------------------------------
    progress(f"scripted route through the gateway vs direct, simulator at "
             f"{ROUTE_LATENCY * 1000:.0f} ms, {runs} runs ...")
    with running_gateways(setup, ROUTE_LATENCY, {
            "gateway": (setup.tmp / "state-route-gw", {})}) as (sim_url, urls):
        direct_env = setup.env(setup.tmp / "state-route-direct", sim_url)
        setup.run_cli(direct_env, "models")                       # cached list, as usual
        via_env = setup.env(setup.tmp / "state-route-client", "http://127.0.0.1:9")
        for name in [k for k in via_env if k.startswith("GEMINI_API_KEY")]:
            del via_env[name]                                      # the client holds no key
        via_env["GEMINI_ROUTER_SERVER"] = urls["gateway"]
        subprocess.run(setup.cli("route", "warm"), env=via_env, capture_output=True)
        cmds = [("python -c pass", [PY, "-c", "pass"], direct_env),
                ("route (direct)", setup.cli("route", "hi"), direct_env),
                ("route (through the gateway)", setup.cli("route", "hi"), via_env)]
        samples: dict[str, list[float]] = {name: [] for name, _, _ in cmds}
        samples[UPSTREAM_ANSWER] = []
        for run_no in range(runs + 1):
            for name, argv, env in cmds[run_no % 3:] + cmds[:run_no % 3]:
                t0 = time.perf_counter()
                proc = subprocess.run(argv, env=env, capture_output=True,
                                      stdin=subprocess.DEVNULL)
                if proc.returncode:
                    raise SystemExit(f"{name} failed: {proc.stderr.decode()[-500:]}")
                if run_no:
                    samples[name].append(time.perf_counter() - t0)
            took = streamed_answer_time(sim_url)
            if run_no:
                samples[UPSTREAM_ANSWER].append(took)
    base, direct, via, upstream = (median(samples[name]) for name in samples)
    limit = 3 * base + upstream
    figures.append(Figure("route through the gateway, whole process",
                          f"{via * 1000:.0f} ms (direct {direct * 1000:.0f} ms, "
                          f"python -c pass {base * 1000:.0f} ms)",
                          f"<= 3x python -c pass + the upstream's {upstream * 1000:.0f} ms "
                          f"= {limit * 1000:.0f} ms", via <= limit))
    lines.append("")
    lines.extend(table_lines(["command", "median", "spread", "vs python -c pass"],
                             [[name, fmt_ms2(median(values)), spread(values),
                               f"{median(values) / base:.2f}x"]
                              for name, values in samples.items()], right={1, 3}))
    lines.append(f"simulator at {ROUTE_LATENCY * 1000:.0f} ms; medians of {runs} "
                 "interleaved runs; `route` streams its answer, and the simulator sends a "
                 "streamed answer's elements 10 ms apart, so the upstream's time is measured "
                 "(the same streamed request, sent straight to it from this process); the "
                 "forwarding route imports neither the SDK nor an HTTP library (a plain "
                 "socket to the gateway)")
    return lines, figures


UPSTREAM_ANSWER = "the upstream's streamed answer"


def streamed_answer_time(sim_url: str) -> float:
    """Seconds the simulator takes to send a streamed answer to `route hi` whole (its
    latency, then the elements' gaps), on a fresh connection as the CLI makes one."""
    import requests
    body = json.dumps({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
    t0 = time.perf_counter()
    r = requests.post(sim_url + f"/v1beta/models/{GATEWAY_MODEL}:streamGenerateContent",
                      data=body, headers={"content-type": "application/json",
                                          "x-goog-api-key": KEYS[0]}, timeout=60)
    r.raise_for_status()
    return time.perf_counter() - t0


# --- the gateway with its state in Redis (issue 15) ------------------------------------------
# The overhead and throughput figures above, with the state in files and in Redis side by
# side: for each figure one simulator with two gateways in front of it, one per backend,
# loaded in turn in GATEWAY_ALTERNATIONS blocks each (order rotated every block), so that
# whatever else the machine does falls on both alike. The bench starts its own redis-server
# (the tests' RedisServer: loopback, a free port, no persistence) and stops it at the end.
# INFO commandstats before and after a figure's load says what a request cost Redis.

GATEWAY_ALTERNATIONS = 4


def backend_gateways(setup: Setup, redis_url: str, tag: str) -> Gateways:
    """A gateway on the state files and one on Redis (a key prefix of its own), both on
    fresh state."""
    return {"files": (setup.tmp / f"state-files-{tag}", {}),
            "Redis": (setup.tmp / f"state-redis-{tag}",
                      {"GEMINI_ROUTER_STATE_URL": redis_url,
                       "GEMINI_ROUTER_REDIS_PREFIX": f"gr-bench-{tag}:"})}


def scripted_commands() -> set[str]:
    """The commands the module's Lua scripts run inside Redis (counted by INFO commandstats
    as well as the EVALSHA that ran them)."""
    import re
    return {name.lower() for text in vars(gr).values() if isinstance(text, str)
            for name in re.findall(r"redis\.call\('(\w+)'", text)}


def command_counts(client: Any) -> dict[str, tuple[int, int]]:
    """INFO commandstats: {command: (calls, microseconds)}."""
    return {name.removeprefix("cmdstat_"): (stat["calls"], stat["usec"])
            for name, stat in client.info("commandstats").items()}


@dataclass
class RedisCost:
    """What the requests sent to one gateway cost Redis, per request."""
    requests: int
    calls: dict[str, float]          # command -> calls per request
    usec: float                      # Redis' time per request (the commands sent, scripts whole)
    scripted: set[str]

    @classmethod
    def between(cls, before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]],
                requests: int) -> RedisCost:
        scripted = scripted_commands()
        diff = {name: (calls - before.get(name, (0, 0))[0], usec - before.get(name, (0, 0))[1])
                for name, (calls, usec) in after.items() if name != "info"}   # our own INFO
        diff = {name: d for name, d in diff.items() if d[0]}
        n = max(1, requests)
        return cls(requests, {name: calls / n for name, (calls, _) in diff.items()},
                   sum(usec for name, (_, usec) in diff.items() if name not in scripted) / n,
                   scripted)

    def commands_sent(self) -> dict[str, float]:
        """Commands the gateway sent, per request: its round trips to Redis."""
        return {k: v for k, v in self.calls.items() if k not in self.scripted}

    def commands_inside(self) -> dict[str, float]:
        """Commands the scripts ran inside Redis, per request."""
        return {k: v for k, v in self.calls.items() if k in self.scripted}

    def text(self) -> str:
        def listing(counts: dict[str, float]) -> str:
            return ", ".join(f"{k} {v:.2f}" for k, v in sorted(counts.items(),
                                                                 key=lambda kv: -kv[1]))
        sent = self.commands_sent()
        return (f"{sum(sent.values()):.2f} commands sent ({listing(sent)}); "
                f"inside the scripts {listing(self.commands_inside()) or 'none'}; "
                f"{self.usec:.0f} us of Redis' time ({self.requests} requests)")


def ratio_text(files: float | None, redis: float | None) -> str:
    """Redis / files, when both are positive."""
    return f"{redis / files:.2f}x" if files and redis and files > 0 and redis > 0 else "-"


def section_gateway_redis(setup: Setup, requests_per_level: int, throughput_requests: int
                          ) -> tuple[list[str], list[Figure]]:
    """Section 9's overhead and throughput with the state in files and in Redis, alternating,
    side by side; and what a request costs Redis."""
    lines = ["== The gateway with its state in files vs in Redis (two gateways, alternating) =="]
    if shutil.which("redis-server") is None:
        return (lines + ["not run: redis-server is not installed (apt-get install redis-server)"],
                [Figure("gateway on Redis", "not run", ok=False)])
    from conftest import RedisServer
    levels: dict[int, dict[str, GatewayRun]] = {}
    costs: dict[str, RedisCost] = {}
    server = RedisServer(setup.tmp / "redis").start()
    try:
        client = server.client()
        for threads, latency in GATEWAY_LEVELS.items():
            progress(f"gateway on files vs Redis, overhead: {requests_per_level} pairs each, "
                     f"{threads} thread(s), {GATEWAY_ALTERNATIONS} alternations ...")
            with running_gateways(setup, latency, backend_gateways(
                    setup, server.url, str(threads))) as (sim_url, urls):
                warm_gateways(urls, sim_url, threads, 3)
                before = command_counts(client)
                levels[threads] = measure_gateways(urls, sim_url, threads,
                                                   max(1, requests_per_level // threads),
                                                   GATEWAY_ALTERNATIONS)
                time.sleep(gr.Router.FLUSH_EVERY + 0.2)        # the last batch of answers
                costs[f"{threads} thread{'s' if threads > 1 else ''}"] = RedisCost.between(
                    before, command_counts(client), levels[threads]["Redis"].sent)
        progress(f"gateway on files vs Redis, throughput: {throughput_requests} requests each "
                 f"on {THROUGHPUT_THREADS} threads ...")
        with running_gateways(setup, 0.0, backend_gateways(
                setup, server.url, "throughput")) as (sim_url, urls):
            warm_gateways(urls, None, 8, 20)
            before = command_counts(client)
            through = measure_gateways(urls, None, THROUGHPUT_THREADS,
                                       max(1, throughput_requests // THROUGHPUT_THREADS),
                                       GATEWAY_ALTERNATIONS)
            time.sleep(gr.Router.FLUSH_EVERY + 0.2)
            costs["throughput"] = RedisCost.between(before, command_counts(client),
                                                    through["Redis"].sent)
        version = client.info("server")["redis_version"]
    finally:
        server.stop()

    figures: list[Figure] = []
    rows, detail = [], []
    for threads, runs in levels.items():
        many = "s" if threads > 1 else ""
        for name, run in runs.items():
            detail.append([str(threads), f"{GATEWAY_LEVELS[threads] * 1000:.0f} ms", name,
                           *run.overhead_cells(), "pass" if run.overhead_ok() else "FAIL"])
            figures.append(run.overhead_figure(f"gateway on {name}, overhead, {threads} "
                                               f"thread{many}"))
        files, redis = runs["files"], runs["Redis"]
        for q in (50, 99):
            rows.append([f"overhead p{q}, {threads} thread{many} "
                         f"({GATEWAY_LEVELS[threads] * 1000:.0f} ms simulator)",
                         fmt_ms2(files.over(q)), fmt_ms2(redis.over(q)),
                         ratio_text(files.over(q), redis.over(q))])
    rows.append([f"throughput, {THROUGHPUT_THREADS} threads (0 ms simulator)",
                 f"{through['files'].rate():.0f}/s", f"{through['Redis'].rate():.0f}/s",
                 ratio_text(through["files"].rate(), through["Redis"].rate())])
    rows.append(["failed requests", str(sum(r["files"].failed for r in levels.values())
                                        + through["files"].failed),
                 str(sum(r["Redis"].failed for r in levels.values()) + through["Redis"].failed),
                 ""])
    for name, run in through.items():
        figures.append(run.throughput_figure(f"gateway on {name}, throughput, "
                                             f"{THROUGHPUT_THREADS} threads"))
    lines.extend(table_lines(["figure", "files", "Redis", "Redis/files"], rows,
                             right={1, 2, 3}))
    lines.append(f"two gateways (state in files; state in Redis {version} on loopback) in "
                 f"front of one simulator, loaded in turn, {GATEWAY_ALTERNATIONS} blocks each, "
                 "the order rotated every block; overhead as in section 9 (gateway percentile "
                 "minus the same percentile of direct calls interleaved with it)")
    lines.append("")
    lines.extend(table_lines(["threads", "simulator", "state", *OVERHEAD_HEADERS, "verdict"],
                             detail, right=set(range(3, 11))))
    lines.append("")
    lines.append("Redis per request (INFO commandstats before and after each load, the last "
                 "batched write included):")
    for what, cost in costs.items():
        lines.append(f"  {what}: {cost.text()}")
    return lines, figures


def table_lines(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()
                ) -> list[str]:
    """print_table's output as lines."""
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_table(headers, rows, right)
    return buf.getvalue().splitlines()


def run_core(setup: Setup, sections: set[str], args: argparse.Namespace) -> int:
    """Sections 6-8, each on its own simulator; their reports, then the summary table."""
    reports: list[list[str]] = []
    figures: list[Figure] = []
    if "overhead" in sections:
        lines, figs = section_overhead(setup, args.pairs)
        reports.append(lines)
        figures += figs
    if "cooling" in sections:
        lines, figs = section_cooling(setup, args.cooling_routes)
        reports.append(lines)
        figures += figs
    if "fleet" in sections:
        lines, figs = section_fleet(setup, args.fleet_routes, args.fleet_threads)
        reports.append(lines)
        figures += figs
    if "gateway" in sections:
        lines, figs = section_gateway(setup, args.gateway_requests, args.gateway_throughput,
                                      args.gateway_runs)
        reports.append(lines)
        figures += figs
    if "gateway-redis" in sections:
        lines, figs = section_gateway_redis(setup, args.gateway_requests,
                                            args.gateway_throughput)
        reports.append(lines)
        figures += figs
    for lines in reports:
        print()
        print("\n".join(lines))
    if figures:
        print()
        print("== Routing core: summary ==")
        print_table(["figure", "measured", "target", "verdict"], [f.cells() for f in figures])
        if hasattr(os, "getloadavg"):
            print("load average at end: " + " ".join(f"{x:.2f}" for x in os.getloadavg())
                  + f" ({os.cpu_count()} cores)")
    return 1 if any(f.ok is False for f in figures) else 0


# ======================================================================================
# Main
# ======================================================================================

def machine_header(runs: int) -> list[str]:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    versions = []
    from importlib import metadata
    for dist in ("google-generativeai", "google-ai-generativelanguage", "protobuf", "filelock",
                 "tqdm", "requests"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{dist} {metadata.version(dist)}")
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip() or "?"
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "gemini_router.py"],
                           capture_output=True, text=True).stdout.strip()
    digest = hashlib.sha256((ROOT / "gemini_router.py").read_bytes()).hexdigest()[:12]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return [
        "gemini-router speed benchmark (tests/bench.py)",
        f"date:     {time.strftime('%Y-%m-%d %H:%M:%S %z')}",
        f"machine:  {cpu}; {os.cpu_count()} cores ({affinity} usable); "
        f"{platform.machine()}",
        f"os:       {platform.platform()}",
        f"python:   {platform.python_implementation()} {platform.python_version()} ({PY})",
        f"packages: {', '.join(versions)}",
        f"module:   gemini_router.py sha256 {digest} at {git}"
        f"{' (modified)' if dirty else ''}",
        f"method:   medians of {runs} interleaved runs (order rotated each run) after one "
        f"warm-up; load average at start {load}",
        "cli:      installed-like: module copied + byte-compiled into a temp dir, run via "
        "pip's console shim",
    ]


SECTIONS = {"speed": "sections 1-5: the CLI side by side with its baselines",
            "overhead": "section 6: Router overhead over a plain SDK call, 1/8/32 threads",
            "cooling": "section 7: a route's CPU time, 50 keys x 30 models all cooling",
            "fleet": "section 8: the 30% fleet vs a healthy one",
            "gateway": "section 9: the gateway's overhead, throughput and a scripted route",
            "gateway-redis": "section 10: the gateway's overhead and throughput, state in files "
                             "vs in Redis"}


def sections_arg(text: str) -> set[str]:
    chosen = {s.strip() for s in text.split(",") if s.strip()}
    unknown = chosen - set(SECTIONS)
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"sections are {', '.join(SECTIONS)}; got {text!r}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=None, help="runs per command (default 15; 5 with --quick)")
    ap.add_argument("--quick", action="store_true", help="fewer runs and repetitions")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--only", type=sections_arg, default=set(SECTIONS), metavar="S[,S...]",
                    help="run only these sections: " + "; ".join(
                        f"{k} = {v}" for k, v in SECTIONS.items()).replace("%", "%%"))
    ap.add_argument("--pairs", type=int, default=None,
                    help="route + SDK pairs per thread count in section 6 (default 600; 300 "
                         "with --quick)")
    ap.add_argument("--cooling-routes", type=int, default=30, help="routes timed in section 7")
    ap.add_argument("--fleet-routes", type=int, default=1000,
                    help="routes on each fleet in section 8 (default 1000)")
    ap.add_argument("--fleet-threads", type=int, default=4, help="threads in section 8")
    ap.add_argument("--gateway-requests", type=int, default=1000,
                    help="gateway + direct pairs per thread count (and backend) in sections 9-10")
    ap.add_argument("--gateway-throughput", type=int, default=3200,
                    help="requests of the throughput run (per backend) in sections 9-10")
    ap.add_argument("--gateway-runs", type=int, default=15,
                    help="runs of each scripted route command in section 9")
    ap.add_argument("--worker", nargs=2, metavar=("NAME", "PARAMS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        name, params = args.worker
        print(json.dumps(WORKERS[name](json.loads(params))))
        return 0
    runs = args.runs or (5 if args.quick else 15)
    procs = 3 if args.quick else 5                   # fresh processes for the route profile
    reps = 5 if args.quick else 15                   # repetitions of warm steps inside one
    itime_runs = 1 if args.quick else 3
    args.pairs = args.pairs or (300 if args.quick else 600)

    header = machine_header(runs)
    setup = Setup(args.keep)
    try:
        code = 0
        if "speed" in args.only:
            code = run_all(setup, runs, procs, reps, itime_runs, header)
        else:
            print("\n".join(header[:-2]))
        return run_core(setup, args.only, args) or code
    finally:
        setup.close()


def run_all(setup: Setup, runs: int, procs: int, reps: int, itime_runs: int,
            header: list[str]) -> int:
    tmp = setup.tmp
    progress(f"working in {tmp}")

    # --- steady-state directory for the local commands --------------------------------
    local_fake = setup.fake()
    local_dir = tmp / "state-local"
    local_env = setup.env(local_dir, local_fake.url)
    # one daily-quota cooldown, so `cooldowns` has something to show
    local_fake.set_behaviour("rate_day", key=KEYS[0], model="gemini-2.0-flash-lite")
    setup.run_cli(local_env, "rank")
    local_fake.clear_behaviours()
    text_models = [m for m in json.loads(setup.run_cli(local_env, "models", "--json").stdout)]
    fill_stats(local_dir, text_models)
    n_text = len(text_models)

    # --- 200 x WINDOW synthetic state -------------------------------------------------
    big_dir = tmp / "state-200"
    write_big_state(big_dir, 200, local_fake.url)
    big_env = setup.env(big_dir, local_fake.url)
    big_sizes = file_sizes(big_dir)

    # --- group 1: local commands ------------------------------------------------------
    def cmd(name: str, argv: list[str], env: dict[str, str], **kw) -> Cmd:
        return Cmd(name, argv, env, **kw)

    baseline = cmd("python -c pass", [PY, "-c", "pass"], local_env)
    tiers = cmd("tiers", setup.cli("tiers"), local_env)
    stats = cmd("stats", setup.cli("stats"), local_env)
    cooldowns = cmd("cooldowns", setup.cli("cooldowns"), local_env,
                    check=expect_in_stdout("gemini-2.0-flash-lite"))
    lock = cmd("lock", setup.cli("lock", "gemini-2.5-flash"), local_env,
               before=set_lock(local_dir, None), check=expect_in_stdout("locked to"))
    unlock = cmd("unlock", setup.cli("unlock"), local_env,
                 before=set_lock(local_dir, "gemini-2.5-flash"),
                 check=expect_in_stdout("unlocked"))
    helpc = cmd("--help", setup.cli("--help"), local_env, check=expect_in_stdout("usage:"))
    tiers_json = cmd("tiers --json", setup.cli("tiers", "--json"), local_env,
                     check=expect_json_len(n_text))
    tiers_script = cmd("tiers (script)", [PY, str(setup.site / "gemini_router.py"), "tiers"],
                       local_env)
    big_tiers = cmd("tiers 200", setup.cli("tiers", "--json"), big_env,
                    check=expect_json_len(200))
    big_stats = cmd("stats 200", setup.cli("stats", "--json"), big_env,
                    check=expect_json_len(200))
    group1 = [baseline, tiers, stats, cooldowns, lock, unlock, helpc, tiers_json, tiers_script,
              big_tiers, big_stats]
    measure("local commands", group1, runs)

    # --- group 2: route vs the minimal SDK call at 50 ms ------------------------------
    route_fake = setup.fake()
    route_dir = tmp / "state-route"
    route_env = setup.env(route_dir, route_fake.url)
    setup.run_cli(route_env, "rank")
    fill_stats(route_dir, text_models)
    route_fake.set_latency(ROUTE_LATENCY)
    probe = json.loads(setup.run_cli(route_env, "route", "--json", "Say hi").stdout)
    routed = probe["model"]
    sizes_before = file_sizes(route_dir)
    cold_dir = tmp / "state-route-cold"
    shutil.copytree(route_dir, cold_dir)
    cold_env = setup.env(cold_dir, route_fake.url)
    route_base = cmd("route baseline", [PY, str(setup.route_baseline), routed, "Say hi"],
                     route_env, check=expect_in_stdout(f"[{routed}] Say hi"))
    route = cmd("route", setup.cli("route", "Say hi"), route_env,
                check=expect_in_stdout("] Say hi"))
    route_cold = cmd("route cold", setup.cli("route", "Say hi"), cold_env,
                     before=drop_model_list(cold_dir), check=expect_in_stdout("] Say hi"))
    # the same route with 200 models x WINDOW samples of state (full windows: steady state)
    big_fake = setup.fake(models=make_models(200), latency=ROUTE_LATENCY)
    big_route_dir = tmp / "state-route-200"
    write_big_state(big_route_dir, 200, big_fake.url)
    big_route_before = file_sizes(big_route_dir)
    route_big = cmd("route 200", setup.cli("route", "Say hi"),
                    setup.env(big_route_dir, big_fake.url), check=expect_in_stdout("] Say hi"))
    measure("route", [route_base, route, route_cold, route_big], runs)
    sizes_after = file_sizes(route_dir)
    counts_after = sample_counts(route_dir)
    big_route_after = file_sizes(big_route_dir)
    big_route_counts = sample_counts(big_route_dir)

    # --- groups 3 and 4: rank ---------------------------------------------------------
    rank_rows = []
    for n, conc in ((24, None), (100, 32)):
        fake = setup.fake(models=make_models(n), latency=RANK_LATENCY)
        d = tmp / f"state-rank-{n}"
        env = setup.env(d, fake.url)
        fake.set_latency(0)
        names = list(json.loads(setup.run_cli(env, "models", "--json").stdout))
        fill_stats(d, names)
        fake.set_latency(RANK_LATENCY)
        extra = ["--concurrency", str(conc)] if conc else []
        rank = cmd(f"rank {n}", setup.cli("rank", *extra), env,
                   extract=printed_seconds(r"probed .* in ([0-9.]+) s", "stderr"))
        base = cmd(f"rank {n} baseline",
                   [PY, str(setup.rank_baseline), str(conc or 32), ",".join(names)], env,
                   check=expect_in_stdout(f"{n} probes"),
                   extract=printed_seconds(r"import \+ probes in ([0-9.]+) s", "stdout"))
        measure(f"rank {n}", [base, rank], runs)
        prober, pool = prober_in_process(setup, d, fake.url, n, conc or 32, runs)
        rank_rows.append((n, conc, rank, base, d, prober, pool))

    # --- section 2: in-process profile ------------------------------------------------
    profile_fake = setup.fake()
    profile_dir = tmp / "state-profile"
    profile_env = setup.env(profile_dir, profile_fake.url)
    setup.run_cli(profile_env, "rank")
    fill_stats(profile_dir, text_models)
    steps, counts = profile_route(setup, profile_dir, profile_fake.url,
                                  big_dir / "model_stats.json", procs, reps)

    # --- import times -----------------------------------------------------------------
    progress("import times ...")
    itimes = {
        "tiers": import_times([str(setup.shim), "tiers"], local_env, itime_runs),
        "route": import_times([str(setup.shim), "route", "Say hi"], route_env, itime_runs),
    }
    heavy = {}
    for name, c_argv, env in (("tiers", ["tiers"], local_env), ("stats", ["stats"], local_env),
                              ("cooldowns", ["cooldowns"], local_env),
                              ("lock", ["lock", "gemini-2.5-flash"], local_env),
                              ("unlock", ["unlock"], local_env), ("--help", ["--help"], local_env),
                              ("tiers 200", ["tiers"], big_env)):
        heavy[name] = heavy_imports(import_times([str(setup.shim), *c_argv], env, 1))

    # ================================================================ report
    print("\n".join(header))
    print()
    print("== Speed: medians, side by side ==")
    rows = [Row("python -c pass (baseline)", baseline)]
    for c, label in ((tiers, "tiers"), (stats, "stats"), (cooldowns, "cooldowns"),
                     (lock, "lock (cached model list)"), (unlock, "unlock"), (helpc, "--help"),
                     (tiers_json, "tiers --json")):
        rows.append(Row(f"{label} vs python -c pass", c, baseline, LOCAL_TARGET,
                        target_text=f"<= {LOCAL_TARGET:.2f}x"))
    rows.append(Row("tiers, script form (python gemini_router.py)", tiers_script, baseline,
                    target_text="info"))
    rows.append(Row(f"route warm vs direct SDK call ({ROUTE_LATENCY * 1000:.0f} ms sim)",
                    route, route_base, ROUTE_TARGET, target_text=f"<= {ROUTE_TARGET:.2f}x"))
    rows.append(Row("route cold (lists models first) vs direct SDK call", route_cold,
                    route_base, target_text="info"))
    rows.append(Row(f"route warm, 200 models x {WINDOW} samples vs direct SDK call", route_big,
                    route_base, target_text="info"))
    for n, conc, rank, base, _, prober, pool in rank_rows:
        rounds = -(-n // (conc or 32))
        limit = rounds * RANK_LATENCY + RANK_LATENCY
        label = f"rank {n} models @ {RANK_LATENCY} s" + (f", --concurrency {conc}" if conc else "")
        text = f"< {limit:.2f} s" + (f" ({rounds} rounds + {RANK_LATENCY})" if rounds > 1 else "")
        rows.append(Row(f"{label}: whole process vs SDK pool script", rank, base,
                        target_text="info (startup + SDK import)"))
        rows.append(Row(f"{label}: probe_models in-process vs SDK pool", prober, pool,
                        abs_target=limit, target_text=text))
    rows.append(Row(f"tiers, 200 models x {WINDOW} samples vs python -c pass", big_tiers,
                    baseline, LOCAL_TARGET, target_text=f"<= {LOCAL_TARGET:.2f}x"))
    rows.append(Row(f"stats, 200 models x {WINDOW} samples vs python -c pass", big_stats,
                    baseline, target_text="info"))
    print_table(["what", "median", "baseline median", "ratio", "target", "verdict"],
                [r.cells() for r in rows], right={1, 2, 3})

    print("whole process = interpreter + imports + work; the SDK import alone is most of a "
          "route or rank.")
    print("probe_models in-process = gemini_router.probe_models() with the SDK already "
          "imported, interleaved with the same probes sent by a bare SDK thread pool.")
    print()
    print("spread and child CPU (user+sys) per command ('printed time' = the time the command "
          "reports itself: rank's 'probed ... in X s', the SDK script's import + probes):")
    all_cmds = group1 + [route_base, route, route_cold, route_big] + [
        x for r in rank_rows for x in (r[3], r[2], r[6], r[5])]
    base_of = {id(r.cmd): r.base for r in rows if r.cmd is not None and r.base is not None}

    def cpu_ratio(c: Cmd) -> str:
        b = base_of.get(id(c))
        if b is None or not c.cpu or not b.cpu:
            return "-"
        return f"{median(c.cpu) / median(b.cpu):.2f}x"
    print_table(["command", "median wall", "min wall", "spread", "median cpu",
                 "cpu vs baseline", "printed time", "runs"],
                [[c.name, fmt_s(median(c.wall)), fmt_s(min(c.wall, default=None)),
                  spread(c.wall), fmt_s(median(c.cpu)), cpu_ratio(c), fmt_s(median(c.inner)),
                  str(len(c.wall))] for c in all_cmds],
                right={1, 2, 4, 5, 6, 7})
    errors = [c for c in all_cmds if c.error]
    for c in errors:
        print(f"ERROR {c.name}: {c.error}")
    for n, conc, rank, base, *_ in rank_rows:
        noisy = [ln for ln in rank.stderr_sample.splitlines() if "pool is full" in ln]
        if noisy:
            print(f"note: rank {n} warm-up printed {len(noisy)} urllib3 'Connection pool is "
                  f"full' warning(s) on stderr")

    print()
    print("== State files ==")
    bytes_per_sample = big_sizes["model_stats.json"] / (200 * WINDOW)
    size_rows = [[f"200 models x {WINDOW} samples (synthetic)", name, fmt_bytes(size)]
                 for name, size in big_sizes.items()]
    size_rows.append(["", "bytes per sample", f"{bytes_per_sample:.0f} B"])
    for name, size in sizes_before.items():
        size_rows.append([f"route dir before {runs + 1} routes", name, fmt_bytes(size)])
    for name, size in sizes_after.items():
        size_rows.append([f"route dir after {runs + 1} routes", name, fmt_bytes(size)])
    for name, size in big_route_before.items():
        size_rows.append(["200-model route dir before", name, fmt_bytes(size)])
    for name, size in big_route_after.items():
        size_rows.append([f"200-model route dir after {len(route_big.wall) + 1} routes", name,
                          fmt_bytes(size)])
    for n, conc, rank, base, d, *_ in rank_rows:
        for name, size in file_sizes(d).items():
            size_rows.append([f"rank {n} dir after {len(rank.wall) + 1} ranks", name,
                              fmt_bytes(size)])
    print_table(["state", "file", "size"], size_rows, right={2})
    worst = max(counts_after.values(), default=0)
    grown = sizes_after.get("model_stats.json", 0) - sizes_before.get("model_stats.json", 0)
    print(f"bounded: most samples kept for one model after the routes = {worst} "
          f"(ROLLING_WINDOW {WINDOW}): {'pass' if worst <= WINDOW else 'FAIL'}; "
          f"model_stats.json grew by {grown} B over {runs + 1} routes")
    w = max(big_route_counts.values(), default=0)
    grown = big_route_after.get("model_stats.json", 0) - big_route_before["model_stats.json"]
    print(f"bounded: 200-model route dir, most samples for one model = {w}: "
          f"{'pass' if w <= WINDOW else 'FAIL'}; model_stats.json grew by {grown} B")
    for n, conc, rank, base, d, *_ in rank_rows:
        w = max(sample_counts(d).values(), default=0)
        print(f"bounded: rank {n} dir, most samples for one model = {w}: "
              f"{'pass' if w <= WINDOW else 'FAIL'}")

    print()
    print("== Where route's time goes (in-process, time.perf_counter; medians of "
          f"{procs} fresh processes, warm steps repeated {reps}x) ==")
    print(f"simulator latency 0 here; state: {n_text} models x {WINDOW} samples, cached list")
    step_rows = []
    for name, ms in steps.items():
        if name.startswith("("):
            step_rows.append([name, f"{int(ms)} B" if "bytes" in name else fmt_ms(ms)])
        else:
            step_rows.append([name, fmt_ms(ms)])
    print_table(["step", "time"], step_rows, right={1})
    if steps.get("generate, warm (keep-alive)", 0) > steps.get(
            "1st generate (new connection, lazy imports)", 0) + 20:
        print("note: requests on a reused (keep-alive) connection to the simulator take ~40 ms "
              "more than on a new one: fake_gemini writes the response headers and body "
              "separately without TCP_NODELAY (Nagle + delayed ACK). A single route uses a new "
              "connection; rank's later rounds reuse them (router and SDK script alike).")
    print("one warm route_prompt did: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    startup = median(baseline.wall) * 1000
    print(f"for scale: python -c pass = {startup:.1f} ms; route's median wall minus the "
          f"direct SDK script's = "
          f"{(median(route.wall) - median(route_base.wall)) * 1000:.1f} ms"
          if route.wall and route_base.wall else "")

    for title, mods in itimes.items():
        print()
        print(f"== -X importtime: {title}, 10 biggest by cumulative time "
              f"(median of {itime_runs}) ==")
        total = sum(v[0] for v in mods.values())
        top = sorted(mods.items(), key=lambda kv: -kv[1][1])[:10]
        print_table(["module (indent = nesting)", "self", "cumulative"],
                    [["  " * depth + m, f"{s / 1000:.1f} ms", f"{c / 1000:.1f} ms"]
                     for m, (s, c, depth) in top], right={1, 2})
        print(f"all imports: {len(mods)} modules, {total / 1000:.1f} ms self time in total")

    print()
    print("== Heavy imports per local command (-X importtime) ==")
    print("(SDK = google.ai.generativelanguage_v1beta, google.generativeai, google.api_core, "
          "grpc or proto)")
    print_table(["command", "SDK / tqdm imported", "other notable modules"],
                [[name, ", ".join(f) or "none", ", ".join(n) or "-"]
                 for name, (f, n) in heavy.items()])
    if hasattr(os, "getloadavg"):
        print()
        print("load average at end: " + " ".join(f"{x:.2f}" for x in os.getloadavg())
              + f" ({os.cpu_count()} cores; above that, other processes shared the CPU)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
