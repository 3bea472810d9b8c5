"""Failure semantics, end to end: every upstream outcome is classified once and acted on the
same way by `route` and `rank`.

Each row of the issue's table is driven through the fake Gemini server with the real SDK, and
the tests assert the exact upstream calls per key and model (from the fake's request log), the
cooldown or disabled key written to cooldowns.json, and the exit code:

  rate limited        429 PerMinute -> the project's keys cool on that model for retryDelay
                      (a key in no GEMINI_ROUTER_PROJECTS group is its own project), next key
  capacity            429 without details -> (key, model) cooldown, next key
  daily quota         429 PerDay -> project x model cooldown until midnight Pacific, next key
  key invalid         400 API_KEY_INVALID / 401 -> key disabled for every model, next key
  project refused     403 SERVICE_DISABLED -> every key of the project disabled, next key
  model missing       404 while the live list has the model -> one GET of it with the same
                      key, then that (key, model) pair cools 24 h; no sample
  transient           5xx, timeout, malformed answer, broken stream -> next key once, next
                      model; a failure sample and a short, growing soft cooldown of the pair
                      (never a refusal: when only soft-cooling pairs are left one is tried)
  bad request         other 400 -> exit 1 at once, one call, no cooldown, no sample
  blocked             prompt blocked / SAFETY candidate -> exit 1 naming the reason, ok sample

A route spends at most GEMINI_ROUTER_MAX_ATTEMPTS (8) upstream calls. 429s, refused keys,
404s and client errors write no model sample.

plus: exit 4 naming the earliest recovery, `--wait`, the proactive RPM/RPD ceilings,
`route --json` attempts and `-v`, `cooldowns` (display and `--clear`), pruning, an unreachable
endpoint, and `rank` probes obeying the same classification.

Model order of a fresh route (no rank): gemini-2.5-flash, gemini-2.0-flash, gemini-2.5-flash-lite,
gemini-2.0-flash-lite, gemini-2.5-pro, gemma-3-27b-it. Keys rotate round-robin from
router_state.json `next_key` (0 on a fresh state, so key#1 goes first).
"""
from __future__ import annotations

import hashlib
import re
import socket
import time
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from conftest import CLI, KEYS, read_state, write_state

K1, K2, K3 = KEYS
FLASH = "gemini-2.5-flash"
FLASH20 = "gemini-2.0-flash"
LITE = "gemini-2.5-flash-lite"
LITE20 = "gemini-2.0-flash-lite"
PRO = "gemini-2.5-pro"
GEMMA = "gemma-3-27b-it"
ROUTE_ORDER = [FLASH, FLASH20, LITE, LITE20, PRO, GEMMA]
GENERATE = ("generate", "stream")


# ------------------------------------------------------------------------------ helpers

def fp(key: str) -> str:
    """The fingerprint state keeps for a key."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def calls(fake, key: str | None = None, model: str | None = None) -> int:
    """Generation calls (plain or streamed) the fake received."""
    return fake.count(key=key, model=model, action=GENERATE)


def next_midnight_pacific(t: float) -> float:
    """Computed independently of the module: the next 00:00 in America/Los_Angeles."""
    tz = ZoneInfo("America/Los_Angeles")
    day = datetime.fromtimestamp(t, tz).date() + timedelta(days=1)
    return datetime(day.year, day.month, day.day, tzinfo=tz).timestamp()


def state(state_dir: Path, name: str) -> dict:
    return read_state(state_dir, name)          # the files, or Redis (--state-backend)


def cooldown_targets(state_dir: Path) -> list[tuple]:
    """(model, key fingerprint, kind) of every cooldown entry, sorted by repr."""
    doc = state(state_dir, "cooldowns")
    return sorted(((e["model"], e["key"], e["kind"]) for e in doc.get("cooldowns", [])),
                  key=repr)


def cooldown_for(state_dir: Path, model: str | None, key: str | None) -> dict:
    found = [e for e in state(state_dir, "cooldowns").get("cooldowns", [])
             if e["model"] == model and e["key"] == key]
    assert len(found) == 1, state(state_dir, "cooldowns")
    return found[0]


def disabled(state_dir: Path) -> dict:
    return state(state_dir, "cooldowns").get("disabled_keys", {})


def samples(state_dir: Path, model: str) -> list[tuple[str, bool]]:
    return [(s["kind"], s["ok"]) for s in state(state_dir, "stats").get("models", {})
            .get(model, [])]


def strikes(state_dir: Path) -> dict:
    """{"<key fingerprint>/<model>": n}: transient failures in a row on each pair."""
    return {pair: v["n"] for pair, v in state(state_dir, "router").get("strikes", {}).items()}


def pair(key: str, model: str) -> str:
    return f"{fp(key)}/{model}"


def lengths(state_dir: Path) -> dict[tuple, float]:
    """(model, key fingerprint, kind) -> how long each cooldown was set for, in seconds."""
    return {(e["model"], e["key"], e["kind"]): round(e["until"] - e["since"], 2)
            for e in state(state_dir, "cooldowns").get("cooldowns", [])}


def attempts(result) -> list[tuple[str, str, str]]:
    return [(a["model"], a["key"], a["outcome"]) for a in result.json()["attempts"]]


@pytest.fixture
def run3(run_main):
    """run_main with all three marker keys (rotation matters)."""
    def run(*args, env=None):
        return run_main(*args, env=env, keys=KEYS)
    return run


# ------------------------------------------------------------------------------ rate limited

@pytest.mark.parametrize("behaviour, params, env, delay, kind", [
    ("rate_minute", {}, {}, 26.0, "rate_limited"),                 # RetryInfo retryDelay 26s
    ("rate_minute", {"retry_delay": "7s"}, {}, 7.0, "rate_limited"),
    # no QuotaFailure, no RetryInfo: quota or shared capacity, COOLDOWN_SECS for the pair
    ("rate_plain", {}, {"COOLDOWN_SECS": "120"}, 120.0, "capacity"),
])
def test_rate_limit_cools_the_pair_and_tries_the_next_key(run3, fake, state_dir, behaviour,
                                                          params, env, delay, kind):
    fake.set_behaviour(behaviour, key=K1, model=FLASH, **params)
    before = time.time()
    r = run3("route", "--json", "hi", env=env)
    after = time.time()
    assert r.code == 0, r.err
    assert attempts(r) == [(FLASH, "key#1", kind), (FLASH, "key#2", "ok")]
    assert (calls(fake, K1, FLASH), calls(fake, K2, FLASH), calls(fake)) == (1, 1, 2)
    # Only this (key, model) cools (key#1 is a project of its own): never the model for the
    # other keys, never the key.
    assert cooldown_targets(state_dir) == [(FLASH, fp(K1), kind)]
    entry = cooldown_for(state_dir, FLASH, fp(K1))
    assert before + delay - 0.01 <= entry["until"] <= after + delay + 0.01
    assert disabled(state_dir) == {}


def test_rate_limit_row_through_the_installed_entry_point(fake, state_dir):
    """The same row as a user runs it: a subprocess with three keys."""
    cli = CLI(fake, state_dir, KEYS)
    fake.set_behaviour("rate_minute", key=K1, model=FLASH)
    r = cli("route", "--json", "hi")
    assert r.code == 0, r.err
    assert attempts(r) == [(FLASH, "key#1", "rate_limited"), (FLASH, "key#2", "ok")]
    assert (calls(fake, K1, FLASH), calls(fake, K2, FLASH), calls(fake)) == (1, 1, 2)
    assert [(e["model"], e["key"]) for e in cli("cooldowns", "--json").json()] == \
        [(FLASH, "key#1")]


def test_one_limited_key_over_ten_routes_costs_one_call(run3, fake, state_dir):
    fake.set_behaviour("rate_minute", key=K1)                 # key#1 limited on every model
    answered_by = []
    for _ in range(10):
        r = run3("route", "--json", "hi")
        assert r.code == 0, r.err
        answered_by.append((r.json()["model"], r.json()["key"]))
    assert calls(fake, K1, FLASH) == 1
    assert calls(fake, K1) == 1
    assert calls(fake, K2) + calls(fake, K3) == 10
    assert calls(fake) == 11
    assert {m for m, _ in answered_by} == {FLASH}
    assert {k for _, k in answered_by} == {"key#2", "key#3"}
    assert cooldown_targets(state_dir) == [(FLASH, fp(K1), "rate_limited")]


def test_one_limited_key_costs_one_call_per_model(run_main, fake, state_dir):
    """Two keys, routes alternating between two models: key#1 is asked once per model."""
    fake.set_behaviour("rate_minute", key=K1)
    for i in range(10):
        r = run_main("route", "-m", (FLASH, FLASH20)[i % 2], "hi")
        assert r.code == 0, r.err
    assert (calls(fake, K1, FLASH), calls(fake, K1, FLASH20)) == (1, 1)
    assert (calls(fake, K2, FLASH), calls(fake, K2, FLASH20)) == (5, 5)
    assert cooldown_targets(state_dir) == [(FLASH20, fp(K1), "rate_limited"),
                                           (FLASH, fp(K1), "rate_limited")]


def test_every_key_cooling_on_a_model_skips_it_without_a_call(run3, fake, state_dir):
    """Keys of one project share a quota: once all are known to cool, the model is skipped."""
    fake.set_behaviour("rate_minute", model=FLASH, times=3)
    r = run3("route", "--json", "hi")
    assert r.code == 0, r.err
    assert attempts(r) == [(FLASH, "key#1", "rate_limited"), (FLASH, "key#2", "rate_limited"),
                           (FLASH, "key#3", "rate_limited"), (FLASH20, "key#1", "ok")]
    fake.reset_log()
    r = run3("route", "--json", "hi")
    assert r.code == 0, r.err
    assert [a[0] for a in attempts(r)] == [FLASH20]
    assert calls(fake, model=FLASH) == 0
    assert calls(fake) == 1


# ------------------------------------------------------------------------------ daily quota

def test_daily_quota_cools_until_midnight_pacific_whatever_retry_delay_says(
        run3, fake, state_dir):
    fake.set_behaviour("rate_day", key=K1, model=FLASH, retry_delay="36s")
    before = time.time()
    r = run3("route", "--json", "hi")
    after = time.time()
    assert r.code == 0, r.err
    assert attempts(r) == [(FLASH, "key#1", "daily_quota"), (FLASH, "key#2", "ok")]
    assert (calls(fake, K1, FLASH), calls(fake, K2, FLASH)) == (1, 1)
    assert cooldown_targets(state_dir) == [(FLASH, fp(K1), "daily_quota")]
    until = cooldown_for(state_dir, FLASH, fp(K1))["until"]
    assert until in (pytest.approx(next_midnight_pacific(before), abs=0.01),
                     pytest.approx(next_midnight_pacific(after), abs=0.01))
    assert until - after > 36                   # never the 36 s the server suggested
    listed = run3("cooldowns", "--json").json()
    assert [(e["model"], e["key"], e["until"]) for e in listed] == \
        [(FLASH, "key#1", round(until, 3))]
    assert listed[0]["remaining_s"] == pytest.approx(until - time.time(), abs=2)


# ------------------------------------------------------------------------------ key invalid

@pytest.mark.parametrize("behaviour, kind, reason_word", [
    ("invalid_key", "key_invalid", "API_KEY_INVALID"),
    ("unauthorized", "key_invalid", "ACCESS_TOKEN_TYPE_UNSUPPORTED"),       # 401
    # 403 SERVICE_DISABLED refuses the project: every key of it (key#1 is its own project)
    ("forbidden", "project_refused", "SERVICE_DISABLED"),
])
def test_refused_key_is_disabled_for_every_model(run3, fake, state_dir, behaviour, kind,
                                                 reason_word):
    fake.set_behaviour(behaviour, key=K1, model=FLASH)
    r = run3("route", "--json", "hi")
    assert r.code == 0, r.err
    assert attempts(r) == [(FLASH, "key#1", kind), (FLASH, "key#2", "ok")]
    assert list(disabled(state_dir)) == [fp(K1)]
    assert disabled(state_dir)[fp(K1)]["kind"] == kind
    assert reason_word in disabled(state_dir)[fp(K1)]["reason"]
    assert cooldown_targets(state_dir) == []
    assert r.err.count("key#1 disabled") == 1
    # Disabled for every model: later routes to another model never ask key#1 again, and
    # the notice is not repeated.
    assert calls(fake, K1, FLASH) == 1                      # a refused key costs one call
    later = [run3("route", "-m", FLASH20, "hi") for _ in range(3)]
    assert [x.code for x in later] == [0, 0, 0]
    assert all("disabled" not in x.err for x in later)
    assert calls(fake, K1) == 1
    assert calls(fake, K2, FLASH20) + calls(fake, K3, FLASH20) == 3
    listed = run3("cooldowns", "--json").json()
    assert [(e["model"], e["key"], e["until"], e["remaining_s"]) for e in listed] == \
        [(None, "key#1", None, None)]


def test_disabled_key_comes_back_when_its_value_changes(run_main, fake, state_dir):
    fake.set_behaviour("invalid_key", key=K1, model=FLASH)
    assert run_main("route", "hi", keys=[K1, K2]).code == 0
    assert list(disabled(state_dir)) == [fp(K1)]
    new_value = K1.replace("ONE", "NEW")
    r = run_main("route", "--json", "hi", keys=[new_value])
    assert r.code == 0, r.err
    assert attempts(r) == [(FLASH, "key#1", "ok")]
    assert calls(fake, new_value) == 1


def test_disabled_key_comes_back_when_cleared(run_main, fake, state_dir):
    fake.set_behaviour("invalid_key", key=K1, model=FLASH, times=1)
    assert run_main("route", "hi").code == 0
    assert list(disabled(state_dir)) == [fp(K1)]
    r = run_main("route", "hi", keys=[K1])
    assert r.code == 4, r.err
    assert calls(fake, K1) == 1
    assert run_main("cooldowns", "--clear", "key#1").code == 0
    assert disabled(state_dir) == {}
    r = run_main("route", "--json", "hi", keys=[K1])
    assert r.code == 0, r.err
    assert attempts(r) == [(FLASH, "key#1", "ok")]
    assert calls(fake, K1) == 2


# ------------------------------------------------------------------------------ model unavailable

def test_404_while_the_list_has_the_model_cools_each_pair_then_moves_on(run3, fake, state_dir):
    """Every key 404s on FLASH, yet the live list still has it: each 404 costs one GET of the
    model with the same key, then that pair cools 24 h; the model stays listed. A route gives
    a listed model a second key after a 404, not a third: then it moves to the next model."""
    fake.set_behaviour("not_found", model=FLASH)
    r = run3("route", "--json", "hi")
    assert r.code == 0, r.err
    assert attempts(r) == [(FLASH, "key#1", "model_missing"), (FLASH, "key#2", "model_missing"),
                           (FLASH20, "key#1", "ok")]
    assert calls(fake, model=FLASH) == 2
    assert [(c.model, c.key) for c in fake.calls if c.action == "get"] == \
        [(FLASH, K1), (FLASH, K2)]
    assert fake.count(action="list") == 1                   # the first listing only
    assert lengths(state_dir) == {(FLASH, fp(k), "model_missing"): 86400.0 for k in KEYS[:2]}
    assert samples(state_dir, FLASH) == []                  # a 404 says nothing of its health
    assert FLASH in run3("models", "--json").json()
    fake.reset_log()
    for _ in range(3):                                      # measured FLASH20 now leads
        r = run3("route", "--json", "hi")
        assert r.code == 0, r.err
        assert r.json()["model"] == FLASH20
    assert calls(fake, model=FLASH) == 0
    assert calls(fake) == 3
    r = run3("route", "-m", FLASH, "hi")                    # pinned: key#3 is found out once
    assert r.code == 4
    assert [(c.model, c.key) for c in fake.calls if c.action == "generate"][-1:] == [(FLASH, K3)]
    assert calls(fake, model=FLASH) == 1
    assert lengths(state_dir) == {(FLASH, fp(k), "model_missing"): 86400.0 for k in KEYS}


# ------------------------------------------------------------------------------ transient

@pytest.mark.parametrize("behaviour, params, extra", [
    ("error500", {}, []),
    ("unavailable", {}, []),                                # 503
    ("gateway_timeout", {}, []),                            # 504
    ("html502", {}, []),
    ("nonjson_error", {}, []),
    ("empty200", {}, []),
    ("no_candidates", {}, []),
    ("hang", {"seconds": 10}, ["--timeout", "0.5"]),        # read timeout
])
def test_transient_tries_the_next_key_once_then_the_next_model(run3, fake, state_dir,
                                                               behaviour, params, extra):
    fake.set_behaviour(behaviour, model=FLASH, **params)
    r = run3(*extra, "route", "--json", "hi")
    assert r.code == 0, r.err
    assert attempts(r) == [(FLASH, "key#1", "transient"), (FLASH, "key#2", "transient"),
                           (FLASH20, "key#1", "ok")]
    assert (calls(fake, K1, FLASH), calls(fake, K2, FLASH), calls(fake, K3, FLASH)) == (1, 1, 0)
    assert (calls(fake, model=FLASH20), calls(fake)) == (1, 3)
    assert samples(state_dir, FLASH) == [("transient", False), ("transient", False)]
    # counted against each (key, model) pair: a 5 s soft cooldown each; not the model for
    # everyone (2 of 3 keys failed on it)
    assert strikes(state_dir) == {pair(K1, FLASH): 1, pair(K2, FLASH): 1}
    assert lengths(state_dir) == {(FLASH, fp(K1), "transient"): 5.0,
                                  (FLASH, fp(K2), "transient"): 5.0}


def test_hang_is_cut_by_the_timeout(run3, fake):
    fake.set_behaviour("hang", model=FLASH, seconds=20)
    began = time.monotonic()
    r = run3("--timeout", "0.5", "route", "-m", FLASH, "hi")
    elapsed = time.monotonic() - began
    assert r.code == 4, r.err
    assert "timeout" in r.err
    # the only model: every key once (an untried key is never left while the budget lasts)
    assert [calls(fake, k, FLASH) for k in KEYS] == [1, 1, 1]
    assert elapsed < 8                                      # three 0.5 s timeouts, not 20 s


def test_one_transient_failure_then_the_next_key_answers(run3, fake, state_dir):
    fake.set_behaviour("unavailable", key=K1, model=FLASH)
    r = run3("route", "--json", "hi")
    assert r.code == 0, r.err
    assert attempts(r) == [(FLASH, "key#1", "transient"), (FLASH, "key#2", "ok")]
    assert (calls(fake, K1, FLASH), calls(fake, K2, FLASH), calls(fake)) == (1, 1, 2)
    # key#2's answer says nothing of key#1: key#1's strike and 5 s soft cooldown stand
    assert strikes(state_dir) == {pair(K1, FLASH): 1}
    assert lengths(state_dir) == {(FLASH, fp(K1), "transient"): 5.0}


def test_transient_failures_in_a_row_grow_the_soft_cooldown_but_never_refuse(run_main, fake,
                                                                             state_dir):
    """One key, one model failing: the pair's soft cooldown doubles from 5 s up to
    COOLDOWN_SECS (60); it is a guess, so with nothing else left every route still tries it.
    One key configured: never a model-wide cooldown."""
    fake.set_behaviour("unavailable", model=FLASH)
    seen = []
    for n in range(1, 7):
        r = run_main("route", "-m", FLASH, "hi", keys=[K1])
        assert r.code == 4
        assert calls(fake, K1, FLASH) == n                   # tried again, one call a route
        assert strikes(state_dir) == {pair(K1, FLASH): n}
        seen.append(lengths(state_dir))
    assert seen == [{(FLASH, fp(K1), "transient"): float(s)} for s in (5, 10, 20, 40, 60, 60)]
    assert re.search(r"earliest: key#1 on gemini-2\.5-flash in (59|60) s", r.err), r.err


def test_an_answer_resets_the_transient_count(run_main, fake, state_dir):
    fake.set_behaviour("unavailable", model=FLASH, times=2)
    assert [run_main("route", "-m", FLASH, "hi", keys=[K1]).code for _ in range(3)] == [4, 4, 0]
    fake.set_behaviour("unavailable", model=FLASH, times=2)
    assert [run_main("route", "-m", FLASH, "hi", keys=[K1]).code for _ in range(2)] == [4, 4]
    assert calls(fake, K1, FLASH) == 5
    # counted afresh after the answer: 2 strikes, 10 s (not 4 strikes and 40 s)
    assert strikes(state_dir) == {pair(K1, FLASH): 2}
    assert lengths(state_dir) == {(FLASH, fp(K1), "transient"): 10.0}


@pytest.mark.parametrize("behaviour", ["stream_break", "stream_truncate"])
def test_broken_stream_under_json_fails_over_like_any_transient(run3, fake, state_dir,
                                                                behaviour):
    """Under --json nothing reached stdout yet, so a broken stream is retried elsewhere."""
    fake.set_behaviour(behaviour, key=K1, model=FLASH)
    r = run3("route", "--json", "--stream", "hi")
    assert r.code == 0, r.err
    assert attempts(r) == [(FLASH, "key#1", "transient"), (FLASH, "key#2", "ok")]
    assert r.json()["text"] == f"[{FLASH}] hi"
    assert samples(state_dir, FLASH) == [("transient", False), ("ok", True)]


@pytest.mark.parametrize("behaviour", ["stream_break", "stream_truncate"])
def test_broken_stream_after_printing_counts_against_the_model(run3, fake, state_dir,
                                                               behaviour):
    """Text already went to stdout: the route stops (exit 1) but the model pays for it."""
    fake.set_behaviour(behaviour, key=K1, model=FLASH)
    r = run3("route", "--stream", "hi")
    assert r.code == 1
    assert "stream" in r.err
    assert calls(fake) == 1
    assert samples(state_dir, FLASH) == [("transient", False)]
    assert strikes(state_dir) == {pair(K1, FLASH): 1}
    assert lengths(state_dir) == {(FLASH, fp(K1), "transient"): 5.0}


def test_unreachable_endpoint_exits_4_quickly(run_main, state_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]            # closed again before the route starts
    url = f"http://127.0.0.1:{port}"
    began = time.monotonic()
    r = run_main("route", "--endpoint", url, "hi")
    assert time.monotonic() - began < 10
    assert r.code == 4
    assert r.err.strip().endswith(f"cannot reach {url}: connection refused"), r.err
    assert "Traceback" not in r.err
    assert cooldown_targets(state_dir) == [] and disabled(state_dir) == {}


# ------------------------------------------------------------------------------ bad request

def test_bad_request_stops_at_once_without_penalty(run3, fake, state_dir):
    fake.set_behaviour("bad_request", model=FLASH,
                       message="Request contains an invalid argument: temperature")
    r = run3("route", "hi")
    assert r.code == 1
    assert "Request contains an invalid argument: temperature" in r.err
    assert r.out == ""
    assert calls(fake) == 1
    assert cooldown_targets(state_dir) == [] and disabled(state_dir) == {}
    assert strikes(state_dir) == {}
    assert samples(state_dir, FLASH) == []             # the request's fault: no model sample


# ------------------------------------------------------------------------------ blocked

@pytest.mark.parametrize("behaviour, params, reason", [
    ("blocked", {}, "SAFETY"),
    ("blocked", {"block_reason": "PROHIBITED_CONTENT"}, "PROHIBITED_CONTENT"),
    ("safety", {}, "SAFETY"),
])
def test_blocked_exits_1_naming_the_reason_and_counts_as_success(run3, fake, state_dir,
                                                                 behaviour, params, reason):
    fake.set_behaviour(behaviour, model=FLASH, **params)
    r = run3("route", "hi")
    assert r.code == 1
    assert reason in r.err
    assert calls(fake) == 1
    assert samples(state_dir, FLASH) == [("blocked", True)]
    assert cooldown_targets(state_dir) == [] and disabled(state_dir) == {}
    assert strikes(state_dir) == {}


# ------------------------------------------------------------------------------ nothing available

def limit_every_key(fake) -> None:
    """Every key rate limited on every model; key#2 recovers first (14 s)."""
    for key, delay in ((K1, "40s"), (K2, "14s"), (K3, "50s")):
        fake.set_behaviour("rate_minute", key=key, retry_delay=delay)


EARLIEST_K2_FLASH = r"earliest: key#2 on gemini-2\.5-flash in 1[34] s"


def test_every_key_limited_costs_one_call_per_pair_until_the_budget_then_exits_4(
        run3, fake, state_dir):
    limit_every_key(fake)
    r = run3("route", "hi")
    assert r.code == 4
    assert r.out == ""
    assert "budget of 8 calls spent" in r.err
    # 18 pairs, each its own project: one call per pair in route order, 8 at most
    first_eight = [(m, k) for m in ROUTE_ORDER for k in KEYS][:8]
    assert [(c.model, c.key) for c in fake.calls if c.action in GENERATE] == first_eight
    assert cooldown_targets(state_dir) == sorted(
        ((m, fp(k), "rate_limited") for m, k in first_eight), key=repr)


def test_every_key_limited_message_names_the_earliest_recovery(run3, fake):
    """The route that discovers the limits already knows when the first one ends."""
    limit_every_key(fake)
    r = run3("route", "hi")
    assert r.code == 4
    assert re.search(EARLIEST_K2_FLASH, r.err), r.err


def test_everything_known_cooling_exits_4_without_a_call(run3, fake):
    """18 limited pairs, 8 calls a route: the first routes learn them all (8 + 8 + 2 calls);
    then a route calls nothing and names the earliest recovery."""
    limit_every_key(fake)
    spent = []
    for _ in range(3):
        fake.reset_log()
        assert run3("route", "hi").code == 4
        spent.append(calls(fake))
    assert spent == [8, 8, 2]
    fake.reset_log()
    r = run3("route", "--json", "hi")
    assert r.code == 4
    assert r.out == ""
    assert calls(fake) == 0
    assert re.search(EARLIEST_K2_FLASH, r.err), r.err


def test_wait_sleeps_until_the_earliest_recovery_then_answers(run3, fake):
    fake.set_behaviour("rate_minute", model=FLASH, retry_delay="1s", times=3)
    began = time.monotonic()
    r = run3("route", "--json", "--wait", "30", "-m", FLASH, "hi")
    elapsed = time.monotonic() - began
    assert r.code == 0, r.err
    assert r.json()["text"] == f"[{FLASH}] hi"
    assert calls(fake, model=FLASH) == 4           # three 429s, then the answer
    assert 0.9 <= elapsed < 15


def test_wait_shorter_than_the_recovery_still_exits_4(run3, fake):
    fake.set_behaviour("rate_minute", model=FLASH)          # 26 s
    began = time.monotonic()
    r = run3("route", "--wait", "0.1", "-m", FLASH, "hi")
    assert r.code == 4
    assert time.monotonic() - began < 10
    assert calls(fake, model=FLASH) == 3
    assert re.search(r"earliest: key#\d on gemini-2\.5-flash in 2[56] s", r.err), r.err


# ------------------------------------------------------------------------------ proactive ceilings

def test_rpm_ceiling_is_never_exceeded(run_main, fake):
    env = {"GEMINI_ROUTER_RPM": "2"}
    codes = [run_main("route", "-m", FLASH, "hi", keys=[K1], env=env).code for _ in range(2)]
    assert codes == [0, 0]
    r = run_main("route", "-m", FLASH, "hi", keys=[K1], env=env)
    assert r.code == 4
    assert calls(fake, K1, FLASH) == 2
    assert re.search(r"earliest: key#1 on gemini-2\.5-flash in (59|60) s", r.err), r.err


def test_rpm_ceiling_counts_per_key_and_model(run3, fake):
    env = {"GEMINI_ROUTER_RPM": "1"}
    used = []
    for _ in range(4):
        r = run3("route", "--json", "hi", env=env)
        assert r.code == 0, r.err
        used.append((r.json()["model"], r.json()["key"]))
    assert used == [(FLASH, "key#1"), (FLASH, "key#2"), (FLASH, "key#3"), (FLASH20, "key#1")]
    assert calls(fake) == 4


def test_cooldowns_shows_keys_at_a_ceiling_and_clear_resets_them(run_main, fake):
    env = {"GEMINI_ROUTER_RPM": "1"}

    def run(*args):
        return run_main(*args, env=env, keys=KEYS[:1])
    assert run("route", "-m", FLASH20, "hi").code == 0              # key#1 spends its one
    assert run("route", "-m", FLASH20, "hi").code == 4              # ... and is then held back
    entries = run("cooldowns", "--json").json()
    assert [(e["model"], e["key"], e["kind"], e["reason"]) for e in entries] == \
        [(FLASH20, "key#1", "ceiling", "GEMINI_ROUTER_RPM=1 reached")]
    assert 55 <= entries[0]["remaining_s"] <= 60
    assert run("cooldowns", "--clear", FLASH20).out == "cleared 1 cooldown(s)\n"
    assert run("cooldowns", "--json").json() == []
    assert run("route", "-m", FLASH20, "hi").code == 0              # the counter was reset
    assert fake.count(key=KEYS[0], model=FLASH20, action="generate") == 2


def test_rpd_ceiling_waits_for_midnight_pacific(run_main, fake):
    env = {"GEMINI_ROUTER_RPD": "1"}
    assert run_main("route", "-m", FLASH, "hi", keys=[K1], env=env).code == 0
    r = run_main("route", "-m", FLASH, "hi", keys=[K1], env=env)
    assert r.code == 4
    assert calls(fake, K1, FLASH) == 1
    assert "earliest: key#1 on gemini-2.5-flash in" in r.err
    plan = run_main("route", "--dry-run", "--json", "-m", FLASH, "hi", keys=[K1], env=env)
    assert plan.code == 4
    [skip] = plan.json()["skipped"]
    assert skip["target"] == f"key#1 on {FLASH}"
    assert skip["until"] == pytest.approx(next_midnight_pacific(time.time()), abs=0.01)
    assert "GEMINI_ROUTER_RPD" in skip["reason"]


# ------------------------------------------------------------------------------ visibility

def test_verbose_prints_every_attempt_on_stderr(run3, fake):
    fake.set_behaviour("rate_minute", key=K1, model=FLASH)
    r = run3("-v", "route", "hi")
    assert r.code == 0, r.err
    assert r.out == f"[{FLASH}] hi\n"
    # in words, never a raw class name
    assert re.search(r"gemini-2\.5-flash key#1: rate limited: ", r.err), r.err
    assert re.search(r"gemini-2\.5-flash key#2: answered in ", r.err), r.err
    assert "rate_limited" not in r.err


def test_json_attempts_carry_model_key_outcome_latency(run3, fake):
    fake.set_behaviour("unavailable", key=K1, model=FLASH)
    data = run3("route", "--json", "hi").json()
    assert [set(a) >= {"model", "key", "outcome", "latency_s"} for a in data["attempts"]] == \
        [True, True]
    assert all(isinstance(a["latency_s"], float) and a["latency_s"] >= 0
               for a in data["attempts"])
    assert (data["model"], data["key"]) == (FLASH, "key#2")


def seed_cooldowns(state_dir: Path, now: float) -> None:
    doc = {"schema": 1, "kind": "gemini-router/cooldowns",
           "cooldowns": [
               {"model": None, "key": fp(K1), "until": now + 100, "reason": "r-key",
                "kind": "rate_limited", "since": now},
               {"model": FLASH, "key": fp(K2), "until": now + 200, "reason": "r-pair",
                "kind": "rate_limited", "since": now},
               {"model": FLASH20, "key": None, "until": now + 300, "reason": "r-model",
                "kind": "model_unavailable", "since": now},
               {"model": LITE, "key": fp(K1), "until": now - 5, "reason": "r-expired",
                "kind": "rate_limited", "since": now - 65}],
           "disabled_keys": {fp(K3): {"reason": "r-disabled", "since": now}}}
    write_state(state_dir, "cooldowns", doc)


def test_cooldowns_lists_every_kind_with_reason_and_time_left(run3, state_dir):
    now = time.time()
    seed_cooldowns(state_dir, now)
    r = run3("cooldowns", "--json")
    assert r.code == 0, r.err
    listed = r.json()
    assert [(e["model"], e["key"], e["reason"]) for e in listed] == [
        (None, "key#1", "r-key"), (FLASH, "key#2", "r-pair"), (FLASH20, None, "r-model"),
        (None, "key#3", "r-disabled")]
    assert [e["until"] for e in listed] == [round(now + 100, 3), round(now + 200, 3),
                                            round(now + 300, 3), None]
    left = [e["remaining_s"] for e in listed]
    assert left[3] is None
    assert left[:3] == [pytest.approx(100, abs=3), pytest.approx(200, abs=3),
                        pytest.approx(300, abs=3)]
    human = run3("cooldowns")
    assert human.code == 0
    for text in ("r-key", "r-pair", "r-model", "r-disabled", "(every model)", "(every key)",
                 "disabled", "key#1", "key#2", "key#3"):
        assert text in human.out, text
    assert "r-expired" not in human.out


@pytest.mark.parametrize("target, left", [
    (FLASH, [(None, "key#1"), (FLASH20, None), (None, "key#3")]),
    (f"models/{FLASH20}", [(None, "key#1"), (FLASH, "key#2"), (None, "key#3")]),
    ("key#1", [(FLASH, "key#2"), (FLASH20, None), (None, "key#3")]),
    ("key#3", [(None, "key#1"), (FLASH, "key#2"), (FLASH20, None)]),
    (None, []),
])
def test_cooldowns_clear(run3, state_dir, target, left):
    seed_cooldowns(state_dir, time.time())
    r = run3("cooldowns", "--clear", *([target] if target else ["--all"]))
    assert r.code == 0, r.err
    assert [(e["model"], e["key"]) for e in run3("cooldowns", "--json").json()] == left


def test_listing_rate_limit_cools_the_key_for_every_model(run3, fake, state_dir):
    fake.set_behaviour("rate_plain", key=K1, times=1)       # the model list 429s on key#1
    r = run3("route", "--json", "hi")
    assert r.code == 0, r.err
    assert fake.count(key=K1, action="list") == 1
    # a bare 429 while listing: key#1 cools for every model, COOLDOWN_SECS
    assert lengths(state_dir) == {(None, fp(K1), "capacity"): 60.0}
    for _ in range(3):
        assert run3("route", "-m", FLASH20, "hi").code == 0
    assert calls(fake, K1) == 0
    listed = run3("cooldowns", "--json").json()
    assert [(e["model"], e["key"]) for e in listed] == [(None, "key#1")]


def test_expired_cooldowns_are_pruned(run3, fake, state_dir):
    now = time.time()
    seed_cooldowns(state_dir, now)
    r = run3("route", "-m", LITE, "hi")
    assert r.code == 0, r.err
    doc = state(state_dir, "cooldowns")
    assert "r-expired" not in [e["reason"] for e in doc["cooldowns"]]
    assert len(doc["cooldowns"]) == 3
    assert calls(fake, K1, LITE) == 0              # key#1 still cools on every model
    assert calls(fake, K2, LITE) == 1


def test_a_new_cooldown_never_shortens_a_longer_one():
    import gemini_router as gr
    doc = {"cooldowns": [], "disabled_keys": {}}
    now = 1_000_000.0
    assert gr.add_cooldown(doc, FLASH, "k", now + 500, "long", "daily_quota", now) == now + 500
    assert gr.add_cooldown(doc, FLASH, "k", now + 30, "short", "rate_limited", now) == now + 500
    assert [(e["until"], e["reason"]) for e in doc["cooldowns"]] == [(now + 500, "long")]
    assert gr.add_cooldown(doc, FLASH, "k", now + 900, "longer", "rate_limited", now) == now + 900
    assert [(e["until"], e["reason"]) for e in doc["cooldowns"]] == [(now + 900, "longer")]
    gr.add_cooldown(doc, FLASH, None, now + 10, "other target", "transient", now)
    assert len(doc["cooldowns"]) == 2


# ------------------------------------------------------------------------------ rank

@pytest.mark.parametrize("behaviour, rule_key, expect_calls, expect_cooldowns, expect_disabled", [
    ("rate_minute", K1, (1, 1), [(PRO, fp(K1), "rate_limited")], []),
    ("rate_day", K1, (1, 1), [(PRO, fp(K1), "daily_quota")], []),
    ("invalid_key", K1, (1, 1), [], [fp(K1)]),
    # (like a route: a listed model gets a second key after a 404, then is left)
    ("not_found", None, (1, 1), [(PRO, fp(K1), "model_missing"), (PRO, fp(K2), "model_missing")],
     []),
    ("unavailable", None, (1, 0), [(PRO, fp(K1), "transient")], []),
    ("bad_request", None, (1, 0), [], []),
])
def test_rank_probes_obey_the_same_classification(run3, fake, state_dir, behaviour, rule_key,
                                                  expect_calls, expect_cooldowns,
                                                  expect_disabled):
    fake.set_behaviour(behaviour, key=rule_key, model=PRO)
    before = time.time()
    r = run3("rank", "--models", PRO, "--json")
    assert r.code == (0 if rule_key else 4), r.err      # 4: no probe succeeded
    assert (calls(fake, K1, PRO), calls(fake, K2, PRO), calls(fake, K3, PRO)) == \
        (*expect_calls, 0)
    assert calls(fake) == sum(expect_calls)
    assert cooldown_targets(state_dir) == expect_cooldowns
    assert list(disabled(state_dir)) == expect_disabled
    if behaviour == "rate_day":
        until = cooldown_for(state_dir, PRO, fp(K1))["until"]
        assert until == pytest.approx(next_midnight_pacific(before), abs=0.01)
    if behaviour == "not_found":       # one GET of the model, same key: listed -> pair, 24 h
        assert [(c.model, c.key) for c in fake.calls if c.action == "get"] == \
            [(PRO, K1), (PRO, K2)]
        assert lengths(state_dir) == {(PRO, fp(k), "model_missing"): 86400.0 for k in (K1, K2)}
        assert samples(state_dir, PRO) == []
    if behaviour == "unavailable":
        assert strikes(state_dir) == {pair(K1, PRO): 1}
        assert lengths(state_dir) == {(PRO, fp(K1), "transient"): 5.0}


def test_rank_skips_a_cooling_pair_and_probes_with_the_other_key(run3, fake, state_dir):
    fake.set_behaviour("rate_minute", key=K1, model=PRO)
    assert run3("rank", "--models", PRO).code == 0
    fake.reset_log()
    assert run3("rank", "--models", PRO).code == 0
    assert calls(fake, K1, PRO) == 0                 # key#1 cools on pro: never asked
    assert calls(fake, model=PRO) == 1
    assert samples(state_dir, PRO) == [("ok", True), ("ok", True)]   # the 429 is no sample


# ------------------------------------------------------------------------------ review fixes

def plain_settings(env: dict[str, str] | None = None):
    """Settings as load_settings builds them from an environment with one key."""
    import argparse
    import gemini_router as gr
    return gr.load_settings({"GEMINI_API_KEY": K1, **(env or {})}, argparse.Namespace())


def connect_timeout():
    import requests
    import urllib3
    return requests.exceptions.ConnectTimeout(
        urllib3.exceptions.ConnectTimeoutError(None, "timed out"))


def read_timeout():
    import requests
    import urllib3
    return requests.exceptions.ReadTimeout(
        urllib3.exceptions.ReadTimeoutError(None, "/v1beta/models", "Read timed out."))


def connection_refused():
    import requests
    import urllib3
    refused = urllib3.exceptions.NewConnectionError(
        None, "Failed to establish a new connection: [Errno 111] Connection refused")
    return requests.exceptions.ConnectionError(
        urllib3.exceptions.MaxRetryError(None, "/v1beta/models", refused))


@pytest.mark.parametrize("make, kind, detail", [
    (connect_timeout, "unreachable", "connection timed out"),     # the endpoint never accepts
    (read_timeout, "transient", "no answer within 60 s (timeout)"),   # a slow model
    (connection_refused, "unreachable", "connection refused"),
], ids=["connect-timeout", "read-timeout", "connection-refused"])
def test_connection_failures_are_classified_by_where_they_happened(make, kind, detail):
    import gemini_router as gr
    outcome = gr.GeminiClient(plain_settings()).outcome_from_error(make())
    assert (outcome.kind, outcome.detail) == (kind, detail)


def test_huge_retry_delay_cools_the_pair_for_at_most_30_days(run3, fake, state_dir):
    fake.set_behaviour("rate_minute", key=K1, model=FLASH, retry_delay="999999999999s")
    before = time.time()
    r = run3("route", "--json", "hi")
    assert r.code == 0, r.err
    assert attempts(r) == [(FLASH, "key#1", "rate_limited"), (FLASH, "key#2", "ok")]
    until = cooldown_for(state_dir, FLASH, fp(K1))["until"]
    assert before + 30 * 86400 <= until <= time.time() + 30 * 86400
    listed = run3("cooldowns", "--json")
    assert (listed.code, listed.err) == (0, "")          # the file is still valid state
    assert [(e["model"], e["key"]) for e in listed.json()] == [(FLASH, "key#1")]
    assert list(state_dir.glob("*.corrupt-*")) == []


def rpm_blocked_after(calls_made: int, rpm: int):
    """What blocks (key#1, flash) after `calls_made` counted calls within one minute."""
    import gemini_router as gr
    settings = plain_settings({"GEMINI_ROUTER_RPM": str(rpm)})
    key = settings.keys[0]
    router, cooldowns = gr.empty_doc("router"), gr.empty_doc("cooldowns")
    now = 1_800_000_000.0
    for i in range(calls_made):
        gr.count_call(router, settings, key, FLASH, now + i * 0.01,
                      gr.minute_keep(router, settings, key, FLASH))
    view = gr.StateView(settings, cooldowns, router)
    return view.block(key, FLASH, now + calls_made * 0.01)


def test_rpm_above_1000_is_enforced():
    assert plain_settings({"GEMINI_ROUTER_RPM": "1200"}).rpm_limit == 1200
    blocked = rpm_blocked_after(1200, 1200)
    assert blocked is not None
    assert (blocked.kind, blocked.reason) == ("ceiling", "GEMINI_ROUTER_RPM=1200 reached")


def test_rpm_above_1000_lets_the_last_call_of_the_minute_through():
    assert rpm_blocked_after(1199, 1200) is None


def test_listing_skips_a_key_cooling_for_every_model(run3, fake, state_dir):
    relist = {"GEMINI_ROUTER_MODELS_TTL": "0"}                # every command lists again
    fake.set_behaviour("rate_plain", key=K1, times=1)       # the listing 429s on key#1
    assert run3("route", "hi", env=relist).code == 0
    assert cooldown_targets(state_dir) == [(None, fp(K1), "capacity")]
    fake.reset_log()
    for _ in range(3):                                      # rotation reaches key#1 again
        r = run3("route", "--json", "hi", env=relist)
        assert r.code == 0, r.err
        assert r.json()["key"] != "key#1"
    assert fake.count(key=K1) == 0                          # not even to list the models
    assert fake.count(action="list") == 3
