"""The core of gemini-router, driven as a user drives it (issue "Core").

Proves, against the fake Gemini server and the real SDK:
  * keys: every environment form, merged in SPEC order; `key#N` is the merged position;
    persisted by a sha256 fingerprint (state follows a key across a reordering);
  * the client: per-key clients (each call carries the key it was routed to), SDK retries
    off, an explicit per-call timeout, a configurable endpoint;
  * the state store: where the three files live (and every override), file lock, schema
    field, mode 0600, no temp files left, a rolling window of complete samples;
  * commands: route (fresh state, stdin, --json, a sample per attempt), lock/unlock
    (validation, exclusivity), stats and cooldowns in both output modes, every exit code;
  * round-robin key rotation that spreads load and skips a disabled key;
  * entry points (`python -m`, `python gemini_router.py`), global options before or after
    the subcommand, `--version`, model names with or without `models/`.
The CLI issue's round-robin, lock-exclusivity and "--json on every command" checks live
here too (test_cli.py covers the rest of that issue).
"""
from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import sys
import time

import pytest

import gemini_router
from conftest import CLI, KEYS, ROOT
from fake_gemini import FakeGemini, make_models

DEFAULT_MODEL = "gemini-2.5-flash"         # what a fresh state routes to first
STATE_FILES = {"stats": "model_stats.json", "router": "router_state.json",
               "cooldowns": "cooldowns.json"}


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

def fingerprint(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def route_touching_every_file(run_main, fake, *args, **kw) -> dict:
    """A route that changes all three state files: key#1 is rate limited (a cooldown), key#2
    answers (samples, round-robin position)."""
    fake.set_behaviour("rate_minute", key=KEYS[0], model=DEFAULT_MODEL)
    data = route_json(run_main, "hi", *args, **kw)
    assert [a["outcome"] for a in data["attempts"]] == ["rate_limited", "ok"]
    return data


def route_json(run_main, *args, **kw) -> dict:
    r = run_main("route", "--json", *args, **kw)
    assert r.code == 0, r.err
    return r.json()


def generate_calls(fake) -> list:
    return [c for c in fake.calls if c.action in ("generate", "stream")]


def read_doc(path) -> dict:
    return json.loads(path.read_text())


def assert_state_valid(state_dir) -> None:
    """Every state file present is complete JSON with a schema field, private, and no
    temp file of an atomic write is left behind."""
    leftovers = [p.name for p in state_dir.iterdir()
                 if p.name not in (*STATE_FILES.values(), "state.lock", "state.gen", "models.lock")]
    assert leftovers == []
    for name, filename in STATE_FILES.items():
        path = state_dir / filename
        if not path.exists():
            continue
        doc = read_doc(path)
        assert doc["schema"] == 1, filename
        assert path.stat().st_mode & 0o777 == 0o600, filename


def assert_one_error_line(r, code: int) -> None:
    assert r.code == code, (r.code, r.err)
    assert r.out == ""
    assert "Traceback" not in r.err
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gemini-router: error: "), r.err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------------------

def K(name: str) -> str:
    """A key-shaped value (keys shorter than 8 characters are refused)."""
    return f"AIza-test-{name}"


@pytest.mark.parametrize("env, expected", [
    pytest.param({"GEMINI_API_KEY_1": K("1"), "GEMINI_API_KEY_3": K("3"),
                  "GEMINI_API_KEY_10": K("10"), "GEMINI_API_KEY_2": ""},
                 [K("1"), K("3"), K("10")], id="numbered-numeric-order-gaps"),
    pytest.param({"GEMINI_API_KEYS": f" {K('a')}, ,{K('b')},,{K('c')} "},
                 [K("a"), K("b"), K("c")], id="comma-list-blanks"),
    pytest.param({"GOOGLE_API_KEY": K("g")}, [K("g")], id="google-alone"),
    pytest.param({"GOOGLE_API_KEY": K("g"), "GEMINI_API_KEY": K("s"),
                  "GEMINI_API_KEYS": f"{K('l1')},{K('l2')}", "GEMINI_API_KEY_2": K("n2")},
                 [K("n2"), K("l1"), K("l2"), K("s"), K("g")], id="merge-order"),
    pytest.param({"GEMINI_API_KEY_1": K("x"), "GEMINI_API_KEYS": f"{K('y')},{K('x')}",
                  "GEMINI_API_KEY": K("y"), "GOOGLE_API_KEY": K("x")},
                 [K("x"), K("y")], id="duplicates-first-place"),
    pytest.param({"GEMINI_API_KEY_1": "   ", "GEMINI_API_KEY": ""}, [], id="all-blank"),
])
def test_collect_keys_merges_every_form(env, expected):
    keys = gemini_router.collect_keys(env)
    assert [k.secret for k in keys] == expected
    assert [k.label for k in keys] == [f"key#{i}" for i in range(1, len(expected) + 1)]


@pytest.mark.parametrize("value", ["abc", "short12"])
def test_too_short_key_is_a_configuration_error(run_main, value):
    r = run_main("stats", keys=[], env={"GEMINI_API_KEY": value})
    assert r.code == 3
    assert r.err.strip() == ("gemini-router: error: GEMINI_API_KEY holds a value too short to be"
                             " an API key (fewer than 8 characters)")
    assert value not in r.err


def test_key_label_is_the_position_in_the_merged_list(run_main, fake):
    env = {"GEMINI_API_KEY_2": KEYS[0], "GEMINI_API_KEYS": f"{KEYS[1]}, {KEYS[0]}",
           "GOOGLE_API_KEY": KEYS[2]}
    for label, secret in [("key#1", KEYS[0]), ("key#2", KEYS[1]), ("key#3", KEYS[2])]:
        assert route_json(run_main, "hi", keys=[], env=env)["key"] == label
        assert generate_calls(fake)[-1].key == secret


def test_state_keeps_fingerprints_never_secrets(run_main, fake, state_dir):
    route_json(run_main, "one")
    route_json(run_main, "two")
    samples = read_doc(state_dir / STATE_FILES["stats"])["models"][DEFAULT_MODEL]
    for sample, secret in zip(samples, KEYS[:2]):
        assert len(sample["key"]) >= 8
        assert fingerprint(secret).startswith(sample["key"])
    for path in state_dir.iterdir():
        data = path.read_bytes()
        assert not any(secret.encode() in data for secret in KEYS), path.name


def test_disabled_key_follows_its_fingerprint_after_reordering(run_main, fake):
    fake.set_behaviour("invalid_key", key=KEYS[1])
    route_json(run_main, "a")                       # key#1 ok
    route_json(run_main, "b")                       # key#2 invalid -> disabled, key#1 answers
    assert fake.count(key=KEYS[1], action="generate") == 1
    swapped = [KEYS[1], KEYS[0]]                    # the bad key is key#1 now
    r = run_main("cooldowns", "--json", keys=swapped)
    assert r.code == 0, r.err
    assert [(e["model"], e["key"], e["until"], e["remaining_s"]) for e in r.json()] == \
        [(None, "key#1", None, None)]
    for _ in range(3):
        assert route_json(run_main, "c", keys=swapped)["key"] == "key#2"
    assert fake.count(key=KEYS[1], action="generate") == 1


def test_no_key_is_a_configuration_error(run_main, fake):
    r = run_main("route", "hi", keys=[])
    assert_one_error_line(r, 3)
    assert "GEMINI_API_KEY" in r.err
    assert fake.calls == []


# --------------------------------------------------------------------------------------
# the client
# --------------------------------------------------------------------------------------

def test_sdk_retries_are_off_one_call_per_attempt(run_main, fake):
    fake.set_behaviour("unavailable", model=DEFAULT_MODEL)      # 503: what the SDK retries
    began = time.monotonic()
    r = run_main("route", "-m", DEFAULT_MODEL, "hi")
    assert r.code == 4, r.err
    assert fake.count(action="generate") == 2                  # once per key, no SDK retry
    assert time.monotonic() - began < 10


def test_timeout_bounds_each_call_then_next_key(run_main, fake):
    fake.set_behaviour("slow", key=KEYS[0], seconds=5)
    began = time.monotonic()
    data = route_json(run_main, "--timeout", "0.5", "hi")
    assert time.monotonic() - began < 4
    assert data["key"] == "key#2"
    assert [(a["key"], a["outcome"]) for a in data["attempts"]] == \
        [("key#1", "transient"), ("key#2", "ok")]
    assert 0.4 <= data["attempts"][0]["latency_s"] < 3


def test_endpoint_flag_overrides_the_environment(run_main, fake):
    dead = f"http://127.0.0.1:{free_port()}"
    r = run_main("route", "hi", env={"GEMINI_API_ENDPOINT": dead})
    assert_one_error_line(r, 4)
    assert "127.0.0.1" in r.err
    assert fake.calls == []
    data = route_json(run_main, "--endpoint", fake.url, "hi",
                      env={"GEMINI_API_ENDPOINT": dead})
    assert data["text"] == f"[{DEFAULT_MODEL}] hi"


@pytest.mark.parametrize("endpoint", ["127.0.0.1:8080", "ftp://x", "http://h/v1beta"])
def test_bad_endpoint_is_a_configuration_error(run_main, fake, endpoint):
    assert_one_error_line(run_main("--endpoint", endpoint, "route", "hi"), 3)


# --------------------------------------------------------------------------------------
# the state store
# --------------------------------------------------------------------------------------

def test_route_writes_three_valid_private_files(run_main, fake, state_dir):
    route_touching_every_file(run_main, fake)
    assert sorted(p.name for p in state_dir.iterdir()) == \
        sorted([*STATE_FILES.values(), "models.lock", "state.gen", "state.lock"])
    assert_state_valid(state_dir)


@pytest.mark.parametrize("where", ["env", "flag-over-env", "xdg", "home"])
def test_state_directory_resolution(run_main, fake, tmp_path, where):
    env = {"GEMINI_ROUTER_STATE_DIR": str(tmp_path / "env-dir")}
    args = []
    expected = tmp_path / "env-dir"
    if where == "flag-over-env":
        args, expected = ["--state-dir", str(tmp_path / "flag-dir")], tmp_path / "flag-dir"
    elif where == "xdg":
        env = {"GEMINI_ROUTER_STATE_DIR": None, "XDG_STATE_HOME": str(tmp_path / "xdg")}
        expected = tmp_path / "xdg" / "gemini-router"
    elif where == "home":
        env = {"GEMINI_ROUTER_STATE_DIR": None, "HOME": str(tmp_path / "home")}
        expected = tmp_path / "home" / ".local" / "state" / "gemini-router"
    route_touching_every_file(run_main, fake, *args, env=env)
    assert sorted(p.name for p in expected.iterdir()) == \
        sorted([*STATE_FILES.values(), "models.lock", "state.gen", "state.lock"])
    assert_state_valid(expected)


@pytest.mark.parametrize("name, variable", [("stats", "STATS_FILE"), ("router", "STATE_FILE"),
                                            ("cooldowns", "COOLDOWN_FILE")])
def test_single_file_override(run_main, fake, state_dir, tmp_path, name, variable):
    moved = tmp_path / "elsewhere" / f"my-{name}.json"
    route_touching_every_file(run_main, fake, env={variable: str(moved)})
    assert read_doc(moved)["schema"] == 1
    assert moved.stat().st_mode & 0o777 == 0o600
    assert not (state_dir / STATE_FILES[name]).exists()
    others = {f for n, f in STATE_FILES.items() if n != name}
    assert others <= {p.name for p in state_dir.iterdir()}


def test_commands_wait_for_the_state_lock(cli, fake, state_dir):
    from filelock import FileLock
    assert cli("unlock").code == 0
    with FileLock(str(state_dir / "state.lock")):
        r = cli("stats", env={"GEMINI_ROUTER_LOCK_TIMEOUT": "0.3"})
    assert_one_error_line(r, 3)
    assert "lock" in r.err
    assert cli("stats").code == 0


def test_rolling_window_keeps_the_last_samples(run_main, fake, state_dir):
    for word in ["a", "b", "c", "d", "e"]:
        route_json(run_main, f"one two {word}", env={"ROLLING_WINDOW": "3"})
    samples = read_doc(state_dir / STATE_FILES["stats"])["models"][DEFAULT_MODEL]
    assert len(samples) == 3
    assert [s["t"] for s in samples] == sorted(s["t"] for s in samples)
    assert samples[0]["t"] > fake.calls[0].t - 1
    calls = generate_calls(fake)
    assert [s["key"] for s in samples] == \
        [fingerprint(c.key)[:len(s["key"])] for c, s in zip(calls[-3:], samples)]
    for s in samples:
        assert set(s) == {"t", "ok", "kind", "latency", "prompt_tokens", "output_tokens", "key"}
        assert (s["ok"], s["kind"], s["prompt_tokens"], s["output_tokens"]) == (True, "ok", 3, 4)
        assert 0 <= s["latency"] < 5


@pytest.mark.parametrize("variable, value", [("ROLLING_WINDOW", "abc"), ("ROLLING_WINDOW", "0"),
                                             ("COOLDOWN_SECS", "-5"), ("COOLDOWN_SECS", "nan")])
def test_bad_setting_is_a_configuration_error_naming_it(run_main, fake, variable, value):
    r = run_main("stats", env={variable: value})
    assert_one_error_line(r, 3)
    assert variable in r.err


# --------------------------------------------------------------------------------------
# route
# --------------------------------------------------------------------------------------

def test_route_on_fresh_state_picks_a_default_and_says_so(run_main, fake):
    r = run_main("route", "-v", "hello world")
    assert r.code == 0, r.err
    assert r.out == f"[{DEFAULT_MODEL}] hello world\n"
    assert [(c.model, c.key) for c in generate_calls(fake)] == [(DEFAULT_MODEL, KEYS[0])]
    assert DEFAULT_MODEL in r.err and "default" in r.err


def test_route_on_fresh_state_picks_from_the_listed_models(state_dir):
    with FakeGemini(models=make_models(4)) as server:
        r = CLI(server, state_dir, KEYS[:2])("route", "-v", "hi")
        assert r.code == 0, r.err
        [call] = [c for c in server.calls if c.action == "generate"]
        assert call.model.startswith("sim-model-")
        assert r.out == f"[{call.model}] hi\n"
        assert f"trying {call.model}" in r.err or f"{call.model} key#1" in r.err


def test_route_json_has_the_spec_fields(run_main, fake):
    data = route_json(run_main, "alpha beta")
    assert {"model", "key", "text", "finish_reason", "latency_s", "usage",
            "attempts"} <= set(data)
    assert (data["model"], data["key"], data["text"], data["finish_reason"]) == \
        (DEFAULT_MODEL, "key#1", f"[{DEFAULT_MODEL}] alpha beta", "STOP")
    assert data["usage"] == {"prompt_tokens": 2, "output_tokens": 3, "thought_tokens": 0,
                             "total_tokens": 5}
    assert isinstance(data["latency_s"], float) and 0 <= data["latency_s"] < 5
    assert [{k: a[k] for k in ("model", "key", "outcome")} for a in data["attempts"]] == \
        [{"model": DEFAULT_MODEL, "key": "key#1", "outcome": "ok"}]
    assert isinstance(data["attempts"][0]["latency_s"], float)


@pytest.mark.parametrize("setup, expected, sampled", [
    # a 429 says nothing about the model: an attempt, but no sample
    pytest.param(dict(behaviour="rate_minute", key=KEYS[0], model=DEFAULT_MODEL),
                 [(DEFAULT_MODEL, 0, "rate_limited"), (DEFAULT_MODEL, 1, "ok")],
                 [(DEFAULT_MODEL, 1, "ok")], id="next-key"),
    pytest.param(dict(behaviour="error500", model=DEFAULT_MODEL),
                 [(DEFAULT_MODEL, 0, "transient"), (DEFAULT_MODEL, 1, "transient"),
                  ("gemini-2.0-flash", 0, "ok")],
                 [(DEFAULT_MODEL, 0, "transient"), (DEFAULT_MODEL, 1, "transient"),
                  ("gemini-2.0-flash", 0, "ok")], id="next-model"),
])
def test_route_records_a_sample_for_every_attempt_that_judges_the_model(
        run_main, fake, state_dir, setup, expected, sampled):
    fake.set_behaviour(setup.pop("behaviour"), **setup)
    data = route_json(run_main, "hi")
    assert [(a["model"], a["key"], a["outcome"]) for a in data["attempts"]] == \
        [(m, f"key#{k + 1}", o) for m, k, o in expected]
    assert len(generate_calls(fake)) == len(expected)
    stats = read_doc(state_dir / STATE_FILES["stats"])["models"]
    recorded = [(m, s["key"], s["kind"]) for m in stats for s in stats[m]]
    assert sorted(recorded) == sorted(
        (m, fingerprint(KEYS[k])[:len(stats[m][0]["key"])], o) for m, k, o in sampled)


@pytest.mark.parametrize("args, stdin", [((), "from stdin\n"), (("-",), "dash reads stdin")])
def test_route_reads_the_prompt_from_stdin(cli, fake, args, stdin):
    r = cli("route", *args, input=stdin)
    assert r.code == 0, r.err
    assert r.out == f"[{DEFAULT_MODEL}] {stdin.strip()}\n"
    assert fake.count(action="generate") == 1


# --------------------------------------------------------------------------------------
# lock / unlock
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gemini-2.0-flash", "models/gemini-2.0-flash"])
def test_lock_pins_every_route_to_one_model_rotating_keys(run_main, fake, state_dir, name):
    r = run_main("lock", name)
    assert r.code == 0, r.err
    assert "gemini-2.0-flash" in r.out and "models/" not in r.out
    assert read_doc(state_dir / STATE_FILES["router"])["lock"] == "gemini-2.0-flash"
    for _ in range(6):
        assert route_json(run_main, "hi")["model"] == "gemini-2.0-flash"
    calls = generate_calls(fake)
    assert [c.model for c in calls] == ["gemini-2.0-flash"] * 6
    assert [c.key for c in calls] == [KEYS[0], KEYS[1]] * 3
    r = run_main("unlock")
    assert r.code == 0, r.err
    assert read_doc(state_dir / STATE_FILES["router"])["lock"] is None
    plan = run_main("route", "--dry-run", "--json", "hi").json()
    assert "lock" not in plan["why"]
    assert len(plan["order"]) == 6                   # every text model is a candidate again
    fake.set_behaviour("rate_minute", model="gemini-2.0-flash")
    assert route_json(run_main, "hi")["model"] != "gemini-2.0-flash"


def test_locked_model_failing_never_falls_back(run_main, fake):
    assert run_main("lock", "gemini-2.0-flash").code == 0
    fake.set_behaviour("rate_minute", model="gemini-2.0-flash")
    r = run_main("route", "hi")
    assert_one_error_line(r, 4)
    assert {c.model for c in generate_calls(fake)} == {"gemini-2.0-flash"}
    assert fake.count(action="generate") == 2


@pytest.mark.parametrize("name", ["nosuchmodel", "models/nosuchmodel", "text-embedding-004",
                                  "gemini-2.5-flash-preview-tts"])
def test_lock_unknown_model_is_a_usage_error_and_writes_no_lock(run_main, fake, state_dir, name):
    """Only a model routing can use (a listed text model, as `models` shows) can be locked."""
    r = run_main("lock", name)
    assert_one_error_line(r, 2)
    assert name.replace("models/", "") in r.err
    router = state_dir / STATE_FILES["router"]
    assert not router.exists() or read_doc(router)["lock"] is None


def test_lock_lists_models_once_then_uses_the_cache(run_main, fake):
    assert run_main("lock", "gemini-2.5-pro").code == 0
    assert run_main("lock", "gemini-2.0-flash").code == 0
    assert fake.count(action="list") == 1
    assert route_json(run_main, "hi")["model"] == "gemini-2.0-flash"
    assert fake.count(action="list") == 1


# --------------------------------------------------------------------------------------
# round-robin key rotation
# --------------------------------------------------------------------------------------

def test_round_robin_spreads_routes_evenly(run_main, fake):
    for _ in range(12):
        route_json(run_main, "hi", keys=KEYS)
    assert [fake.count(key=k, action="generate") for k in KEYS] == [4, 4, 4]
    assert [c.key for c in generate_calls(fake)[:3]] == KEYS


def test_round_robin_holds_under_concurrent_processes(fake, state_dir):
    """Six routes at once over three keys: the locked state hands out each key twice."""
    from concurrent.futures import ThreadPoolExecutor
    cli = CLI(fake, state_dir, KEYS)
    assert cli("models").code == 0                      # list once, so routes only generate
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda i: cli("route", f"prompt {i}"), range(6)))
    assert [r.code for r in results] == [0] * 6, [r.err for r in results]
    assert [fake.count(key=k, action="generate") for k in KEYS] == [2, 2, 2]
    assert_state_valid(state_dir)
    stats = read_doc(state_dir / STATE_FILES["stats"])["models"]
    assert len(stats[DEFAULT_MODEL]) == 6


def test_round_robin_skips_a_disabled_key_and_says_so_once(run_main, fake):
    fake.set_behaviour("invalid_key", key=KEYS[1])
    errors = ""
    for _ in range(12):
        r = run_main("route", "hi", keys=KEYS)
        assert r.code == 0, r.err
        errors += r.err
    assert fake.count(key=KEYS[1], action="generate") == 1
    assert [fake.count(key=k, action="generate", model=DEFAULT_MODEL)
            for k in (KEYS[0], KEYS[2])] == [6, 6]
    assert errors.count("key#2 disabled") == 1


# --------------------------------------------------------------------------------------
# stats and cooldowns, both output modes
# --------------------------------------------------------------------------------------

def test_stats_on_fresh_state(run_main, fake):
    r = run_main("stats")
    assert (r.code, r.out.count("\n")) == (0, 1)
    assert "no samples" in r.out
    assert run_main("stats", "--json").json() == {}
    assert fake.calls == []


def test_stats_table_and_json(run_main, fake):
    fake.set_behaviour("error500", key=KEYS[0], model=DEFAULT_MODEL, times=1)
    route_json(run_main, "hi")                          # key#1 transient, then key#2 ok
    route_json(run_main, "hi")                          # key#2 ok (key#1 cools on a guess)
    data = run_main("stats", "--json").json()
    assert list(data) == [DEFAULT_MODEL]
    row = data[DEFAULT_MODEL]
    # health is per key x model: key#1 never worked on it while key#2 did, so its failure
    # is kept in the window but left out of the success rate
    assert (row["samples"], row["judged"], row["excluded"], row["success_rate"]) == \
        (3, 2, 1, 1.0)
    assert 0 <= row["latency_p50_s"] <= row["latency_p95_s"] < 5
    table = run_main("stats").out.splitlines()
    assert table[0].split()[:3] == ["MODEL", "SAMPLES", "SUCCESS"]
    assert table[1].split()[:5] == [DEFAULT_MODEL, "3", "100%", "of", "2"]
    assert table[-1] == ("not counted in SUCCESS, samples of keys that never worked on the "
                         f"model while another key did: {DEFAULT_MODEL} (1)")
    # once key#1 answers on the model, its failure counts
    assert run_main("cooldowns", "--clear", "key#1").code == 0
    assert route_json(run_main, "hi")["key"] == "key#1"
    row = run_main("stats", "--json").json()[DEFAULT_MODEL]
    assert (row["samples"], row["judged"], row["excluded"], row["success_rate"]) == \
        (4, 4, 0, 0.75)
    table = run_main("stats").out.splitlines()
    assert table[1].split()[:5] == [DEFAULT_MODEL, "4", "75%", "of", "4"]
    assert len(table) == 2


def test_cooldowns_table_and_json(run_main, fake):
    fake.set_behaviour("rate_minute", key=KEYS[0], model=DEFAULT_MODEL, retry_delay="26s")
    fake.set_behaviour("invalid_key", key=KEYS[2])
    route_json(run_main, "hi", keys=KEYS)                  # key#1 limited -> key#2
    route_json(run_main, "hi", keys=KEYS)                  # key#3 invalid -> key#1 limited...
    entries = run_main("cooldowns", "--json", keys=KEYS).json()
    now = time.time()
    limited = [e for e in entries if e["until"] is not None]
    assert [(e["model"], e["key"]) for e in limited] == [(DEFAULT_MODEL, "key#1")]
    assert 20 < limited[0]["remaining_s"] <= 26
    assert limited[0]["until"] == pytest.approx(now + limited[0]["remaining_s"], abs=2)
    assert "rate" in limited[0]["reason"].lower()
    assert [(e["model"], e["key"], e["until"], e["remaining_s"]) for e in entries
            if e["until"] is None] == [(None, "key#3", None, None)]
    table = run_main("cooldowns", keys=KEYS).out.split("\n\n")[0].splitlines()
    assert table[0].split()[:2] == ["MODEL", "KEY"]
    assert len(table) == 3
    assert any(DEFAULT_MODEL in line and "key#1" in line for line in table[1:])
    assert any("key#3" in line and "disabled" in line for line in table[1:])


def test_cooldowns_on_fresh_state(run_main, fake):
    r = run_main("cooldowns")
    assert r.code == 0 and "no active cooldowns" in r.out
    assert run_main("cooldowns", "--json").json() == []


# --------------------------------------------------------------------------------------
# every command: both output modes, valid state after each
# --------------------------------------------------------------------------------------

COMMANDS = [
    ("route", "hi"), ("route", "--dry-run", "hi"), ("stats",), ("cooldowns",), ("tiers",),
    ("models",), ("lock", "gemini-2.0-flash"), ("unlock",), ("cooldowns", "--clear", "--all"),
    ("rank", "--models", "gemini-2.0-flash-lite"),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c))
def test_every_command_json_is_one_document(run_main, fake, state_dir, command):
    route_json(run_main, "warm up")
    r = run_main(*command, "--json")
    assert r.code == 0, r.err
    assert isinstance(json.loads(r.out), (dict, list))
    assert_state_valid(state_dir)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c))
def test_every_command_human_output_is_text(run_main, fake, state_dir, command):
    route_json(run_main, "warm up")
    r = run_main(*command)
    assert r.code == 0, r.err
    assert r.out.strip() != ""
    with pytest.raises(ValueError):
        json.loads(r.out)
    assert_state_valid(state_dir)


# --------------------------------------------------------------------------------------
# exit codes
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("setup, args, env, code, generate_count", [
    pytest.param(None, ("route", "hi"), {}, 0, 1, id="0-ok"),
    pytest.param("bad_request", ("route", "hi"), {}, 1, 1, id="1-bad-request"),
    pytest.param("blocked", ("route", "hi"), {}, 1, 1, id="1-blocked"),
    pytest.param("safety", ("route", "hi"), {}, 1, 1, id="1-safety"),
    pytest.param(None, ("route", "--bogus", "hi"), {}, 2, 0, id="2-unknown-flag"),
    pytest.param(None, (), {}, 2, 0, id="2-no-command"),
    pytest.param(None, ("route", "--tier", "cheap", "hi"), {}, 2, 0, id="2-bad-choice"),
    pytest.param(None, ("route", "-m", "nosuchmodel", "hi"), {}, 2, 0, id="2-unknown-model"),
    pytest.param(None, ("route", "hi"), {"GEMINI_API_KEY_1": None, "GEMINI_API_KEY_2": None},
                 3, 0, id="3-no-keys"),
    pytest.param(None, ("stats",), {"ROLLING_WINDOW": "many"}, 3, 0, id="3-bad-setting"),
    # 12 (key, model) pairs limited, but a route spends at most its budget of 8 calls
    pytest.param("rate_minute", ("route", "hi"), {}, 4, 8, id="4-all-limited"),
])
def test_exit_codes(run_main, fake, state_dir, setup, args, env, code, generate_count):
    if setup:
        fake.set_behaviour(setup)
    r = run_main(*args, env=env)
    if code == 0:
        assert r.code == 0, r.err
    else:
        assert_one_error_line(r, code)
    assert fake.count(action="generate") == generate_count
    if state_dir.exists():
        assert_state_valid(state_dir)


@pytest.mark.parametrize("setup, args, code", [
    ("bad_request", ("route", "hi"), 1),
    (None, ("lock", "nosuchmodel"), 2),
    (None, ("route", "-o", "seed=x", "hi"), 2),
    ("rate_minute", ("route", "hi"), 4),
])
def test_failure_under_json_leaves_stdout_empty(run_main, fake, setup, args, code):
    if setup:
        fake.set_behaviour(setup)
    assert_one_error_line(run_main("--json", *args), code)


def test_exit_3_when_the_state_directory_is_unusable(run_main, fake, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    r = run_main("stats", env={"GEMINI_ROUTER_STATE_DIR": str(blocker)})
    assert_one_error_line(r, 3)
    assert str(blocker) in r.err


def test_exit_4_says_when_the_earliest_recovers(run_main, fake):
    fake.set_behaviour("rate_minute", retry_delay="26s")
    r = run_main("route", "-m", DEFAULT_MODEL, "hi")
    assert_one_error_line(r, 4)
    assert "26 s" in r.err or "25 s" in r.err


def test_exit_130_on_interrupt(cli, fake):
    fake.set_behaviour("hang", model=DEFAULT_MODEL, seconds=20)
    proc = subprocess.Popen([sys.executable, str(ROOT / "gemini_router.py"), "route", "hi"],
                            env=cli.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=str(ROOT))
    deadline = time.monotonic() + 15
    while fake.count(action="generate") == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake.count(action="generate") == 1
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 130
    assert out == b""
    assert b"Traceback" not in err and b"interrupted" in err


# --------------------------------------------------------------------------------------
# entry points, global options, model names
# --------------------------------------------------------------------------------------

def test_python_dash_m_runs_the_module(cli, fake):
    proc = subprocess.run([sys.executable, "-m", "gemini_router", "route", "--json", "hi"],
                          env=cli.env, stdin=subprocess.DEVNULL, capture_output=True,
                          cwd=str(ROOT / "tests"), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["text"] == f"[{DEFAULT_MODEL}] hi"


def test_python_script_runs_and_prints_the_version(cli):
    r = cli("--version")
    assert (r.code, r.out) == (0, f"gemini-router {gemini_router.__version__}\n")


@pytest.mark.parametrize("args", [
    ("--json", "route", "hi"), ("route", "hi", "--json"), ("route", "--json", "hi"),
    ("--json", "-v", "route", "hi"), ("route", "-v", "hi", "--json"),
])
def test_global_options_before_or_after_the_subcommand(run_main, fake, args):
    r = run_main(*args)
    assert r.code == 0, r.err
    assert r.json()["text"] == f"[{DEFAULT_MODEL}] hi"
    if "-v" in args:
        assert f"{DEFAULT_MODEL}" in r.err and "key#1" in r.err
    else:
        assert r.err == ""


@pytest.mark.parametrize("where", ["before", "after"])
def test_state_dir_flag_before_or_after_the_subcommand(run_main, fake, state_dir, tmp_path,
                                                      where):
    flag = ["--state-dir", str(tmp_path / "mine")]
    args = [*flag, "route", "hi"] if where == "before" else ["route", "hi", *flag]
    assert run_main(*args).code == 0
    assert (tmp_path / "mine" / STATE_FILES["stats"]).exists()
    assert not state_dir.exists()


@pytest.mark.parametrize("name", ["gemini-2.0-flash", "models/gemini-2.0-flash"])
def test_model_names_with_or_without_prefix(run_main, fake, name):
    data = route_json(run_main, "-m", name, "hi")
    assert data["model"] == "gemini-2.0-flash"
    assert [a["model"] for a in data["attempts"]] == ["gemini-2.0-flash"]
    assert [c.model for c in generate_calls(fake)] == ["gemini-2.0-flash"]
