"""Quota, health and cost at scale (issue 10): projects, learned limits, the route budget,
health per (key, model), honest stats, vanishing models, delivered answers, trustworthy state
and the `keys` command. Every failure test asserts the exact upstream calls and cooldowns.

Real parts only: the CLI runs in-process through `main(argv)` (`run_main`) or as a subprocess
(`cli`), against the loopback fake Gemini (tests/fake_gemini.py) through the real SDK."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from filelock import FileLock

from conftest import KEYS, ROOT, base_env, route_while_state_is_locked, read_state, write_state

FLASH = "gemini-2.5-flash"
LITE = "gemini-2.0-flash-lite"
PROJECTS = {"GEMINI_ROUTER_PROJECTS": "1,2"}


def route(run_main, *args, keys=KEYS, env=None):
    return run_main("route", "--json", *args, keys=keys, env=env)


def cooldowns(run_main, keys=KEYS, env=None) -> list[dict]:
    r = run_main("cooldowns", "--json", keys=keys, env=env)
    assert r.code == 0, r.err
    return r.json()


def generate_calls(fake, **kw) -> int:
    return fake.count(action="generate", **kw)


# --------------------------------------------------------------------------------------
# 1. Projects
# --------------------------------------------------------------------------------------

def test_a_project_limit_costs_one_call_for_the_whole_project(run_main, fake):
    fake.set_project("p", keys=KEYS[:2])
    fake.set_behaviour("rate_minute", project="p", model=FLASH, retry_delay="30s")
    r = route(run_main, "-m", FLASH, "hi", env=PROJECTS)
    assert r.code == 0, r.err
    assert r.json()["key"] == "key#3"
    assert [generate_calls(fake, key=k) for k in KEYS] == [1, 0, 1]
    entries = [e for e in cooldowns(run_main, env=PROJECTS) if e["model"] == FLASH]
    assert sorted(e["key"] for e in entries) == ["key#1", "key#2"]
    assert {e["scope"] for e in entries} == {"project"}
    assert all(28 <= e["remaining_s"] <= 30 for e in entries)
    # the next route on FLASH spends nothing on the limited project
    assert route(run_main, "-m", FLASH, "again", env=PROJECTS).json()["key"] == "key#3"
    assert [generate_calls(fake, key=k) for k in KEYS] == [1, 0, 2]


def test_undeclared_keys_are_their_own_project_and_siblings_are_hinted(run_main, fake):
    fake.set_project("p", keys=KEYS[:2])
    fake.set_behaviour("rate_minute", project="p", model=FLASH, retry_delay="30s")
    r = route(run_main, "-m", FLASH, "hi")          # GEMINI_ROUTER_PROJECTS not set
    assert r.code == 0, r.err
    assert [generate_calls(fake, key=k) for k in KEYS] == [1, 1, 1]
    keys = run_main("keys", "--json", keys=KEYS).json()["keys"]
    assert "key#2" in keys[0]["sibling_hint"] and "GEMINI_ROUTER_PROJECTS" in keys[0]["sibling_hint"]
    assert keys[2]["sibling_hint"] is None
    assert [k["project"] for k in keys] == ["own", "own", "own"]


def test_billing_refusal_cools_every_model_of_the_project_and_other_projects_answer(run_main,
                                                                                     fake):
    fake.set_project("p", keys=KEYS[:2])
    fake.set_behaviour("billing", project="p")
    r = route(run_main, "hi", env=PROJECTS)
    assert r.code == 0, r.err
    assert r.json()["key"] == "key#3"
    assert [generate_calls(fake, key=k) for k in KEYS] == [1, 0, 1]
    entries = [e for e in cooldowns(run_main, env=PROJECTS) if e["key"] in ("key#1", "key#2")]
    assert [(e["model"], e["kind"]) for e in entries] == [(None, "billing"), (None, "billing")]
    assert all(86000 < e["remaining_s"] <= 86400 for e in entries)
    assert route(run_main, "-m", LITE, "hi", env=PROJECTS).json()["key"] == "key#3"
    assert generate_calls(fake, key=KEYS[1]) == 0


# --------------------------------------------------------------------------------------
# 2. Limits learned, then kept
# --------------------------------------------------------------------------------------

def test_a_learned_limit_paces_the_router_so_no_second_429_comes(run_main, fake, state_dir):
    keys = KEYS[:1]
    fake.set_quota(model=FLASH, rpm=2)
    for prompt in ("one", "two"):
        assert route(run_main, "-m", FLASH, prompt, keys=keys).code == 0
    r = route(run_main, "-m", FLASH, "three", keys=keys)
    assert r.code == 4                                     # the 429 that teaches the limit
    assert generate_calls(fake) == 3
    router = read_state(state_dir, "router")
    assert [v["rpm"] for v in router["limits"].values()] == [2]
    # a new minute upstream, and the cooldown cleared by hand: the router now paces itself
    assert run_main("cooldowns", "--clear", FLASH, keys=keys).code == 0
    fake.set_clock(lambda: time.time() + 60)
    for prompt in ("four", "five"):
        assert route(run_main, "-m", FLASH, prompt, keys=keys).code == 0
    r = route(run_main, "-m", FLASH, "six", keys=keys)
    assert r.code == 4
    assert "paced under the learned limit of 2 requests per minute" in r.err
    assert generate_calls(fake) == 5                       # the sixth spent no call
    assert sum(1 for c in fake.calls if c.status == 429) == 1
    paced = [e for e in cooldowns(run_main, keys=keys) if e["kind"] == "limit"]
    assert [(e["model"], e["key"]) for e in paced] == [(FLASH, "key#1")]
    assert 0 < paced[0]["remaining_s"] <= 60
    assert "2 rpm" in run_main("keys", keys=keys).out


def test_learned_limits_persist_and_show_in_keys(run_main, fake):
    fake.set_behaviour("rate_day", model=FLASH, quota_value="20")
    assert route(run_main, "-m", FLASH, "hi", keys=KEYS[:1]).code == 4
    keys = run_main("keys", "--json", keys=KEYS[:1]).json()["keys"]
    assert [(lim["model"], lim["rpd"]) for lim in keys[0]["limits"]] == [(FLASH, 20)]
    assert keys[0]["state"] == "cooling"


# --------------------------------------------------------------------------------------
# 3. Bounded cost per route
# --------------------------------------------------------------------------------------

def test_every_pair_limited_costs_the_budget_then_exit_4_with_the_earliest(run_main, fake):
    fake.set_behaviour("rate_minute", retry_delay="40s")
    fake.set_behaviour("rate_minute", key=KEYS[1], retry_delay="25s")
    r = route(run_main, "hi")
    assert r.code == 4
    assert generate_calls(fake) == 8                       # GEMINI_ROUTER_MAX_ATTEMPTS default
    assert "budget of 8 calls spent" in r.err
    assert "earliest: key#2 on" in r.err and "in 25 s" in r.err
    r = route(run_main, "--max-attempts", "2", "hi")
    assert r.code == 4 and generate_calls(fake) == 10


def test_next_route_makes_zero_calls_when_nothing_recovered(run_main, fake):
    fake.set_behaviour("rate_minute", model=FLASH, retry_delay="40s")
    assert route(run_main, "-m", FLASH, "hi").code == 4
    assert generate_calls(fake) == 3
    r = route(run_main, "-m", FLASH, "hi")
    assert r.code == 4 and generate_calls(fake) == 3
    assert "earliest: key#" in r.err


def test_the_deadline_ends_a_route_among_hanging_models(run_main, fake):
    assert run_main("models").code == 0
    fake.set_behaviour("hang", seconds=30)
    began = time.monotonic()
    r = route(run_main, "--deadline", "1.5", "--timeout", "60", "hi")
    elapsed = time.monotonic() - began
    assert r.code == 4
    assert elapsed < 3.5
    assert "deadline of 1.5 s reached" in r.err
    assert generate_calls(fake) == 1


def test_budget_settings_are_validated(run_main, fake):
    r = run_main("route", "--max-attempts", "0", "hi")
    assert r.code == 2 and "--max-attempts" in r.err
    r = run_main("route", "hi", env={"GEMINI_ROUTER_DEADLINE": "soon"})
    assert r.code == 3 and "GEMINI_ROUTER_DEADLINE" in r.err


# --------------------------------------------------------------------------------------
# 4. Health per (key, model)
# --------------------------------------------------------------------------------------

def test_one_failing_key_is_a_pair_problem_not_the_models(run_main, fake):
    fake.set_behaviour("unavailable", key=KEYS[0])
    for i in range(6):
        r = route(run_main, "-m", FLASH, f"p{i}", keys=KEYS[:2])
        assert r.code == 0, r.err
    assert generate_calls(fake, key=KEYS[0]) == 1           # its soft cooldown holds (5 s)
    assert generate_calls(fake, key=KEYS[1]) == 6
    entries = cooldowns(run_main, keys=KEYS[:2])
    assert [(e["model"], e["key"], e["kind"]) for e in entries] == [(FLASH, "key#1", "transient")]
    assert 0 < entries[0]["remaining_s"] <= 5
    stats = run_main("stats", "--json", keys=KEYS[:2]).json()[FLASH]
    assert stats["success_rate"] == 1.0                      # key#1 never answered; key#2 did
    tiers = run_main("tiers", "--json", keys=KEYS[:2]).json()
    assert tiers[FLASH]["fast"] != "C"


def test_two_transient_failures_do_not_end_a_route_with_an_untried_key(run_main, fake):
    fake.set_behaviour("unavailable", key=KEYS[0], model=FLASH)
    fake.set_behaviour("gateway_timeout", key=KEYS[1], model=FLASH)
    r = route(run_main, "-m", FLASH, "hi")
    assert r.code == 0, r.err
    assert [a["outcome"] for a in r.json()["attempts"]] == ["transient", "transient", "ok"]
    assert generate_calls(fake) == 3


def test_soft_cooldowns_never_refuse_the_best_of_them_is_tried(run_main, fake):
    fake.set_behaviour("unavailable", key=KEYS[0], model=FLASH, times=1)
    fake.set_behaviour("unavailable", key=KEYS[1], model=FLASH, times=1)
    r = route(run_main, "-m", FLASH, "hi", keys=KEYS[:2])
    assert r.code == 4                     # both pairs failed once: both cooling on a guess
    assert generate_calls(fake) == 2       # a pair that failed is not retried in its route
    r = route(run_main, "-m", FLASH, "hi", keys=KEYS[:2])
    assert r.code == 0, r.err
    assert [(a["key"], a["outcome"]) for a in r.json()["attempts"]] == [("key#1", "ok")]
    # the answer on key#1 cleared its guess; key#2's stands
    assert [(e["key"], e["kind"]) for e in cooldowns(run_main, keys=KEYS[:2])] == \
        [("key#2", "transient")]


def test_transient_cooldowns_grow_with_repeated_failure(run_main, fake, state_dir):
    fake.set_behaviour("unavailable", key=KEYS[0], model=FLASH)
    lengths = []
    for _ in range(3):
        assert route(run_main, "-m", FLASH, "--max-attempts", "1", "hi", keys=KEYS[:1]).code == 4
        entry = read_state(state_dir, "cooldowns")["cooldowns"][0]
        lengths.append(round(entry["until"] - entry["since"]))
    assert lengths == [5, 10, 20]
    assert generate_calls(fake) == 3


def test_a_model_cools_for_everyone_only_when_several_keys_fail_on_it(run_main, fake):
    fake.set_behaviour("unavailable", model=FLASH)
    r = route(run_main, "-m", FLASH, "--max-attempts", "3", "hi")
    assert r.code == 4 and generate_calls(fake) == 3
    wide = [e for e in cooldowns(run_main) if e["key"] is None]
    assert [(e["model"], e["kind"]) for e in wide] == [(FLASH, "transient")]


# --------------------------------------------------------------------------------------
# 5. Stats only say what they know
# --------------------------------------------------------------------------------------

def test_a_storm_of_rate_limits_leaves_the_measured_history_intact(run_main, fake):
    for i in range(4):
        assert route(run_main, "-m", FLASH, f"p{i}").code == 0
    fake.set_behaviour("rate_minute", model=FLASH, retry_delay="1s")
    fake.set_behaviour("invalid_key", key=KEYS[2], model=FLASH)
    for i in range(3):
        route(run_main, "-m", FLASH, f"q{i}")
        time.sleep(1.1)
    stats = run_main("stats", "--json").json()[FLASH]
    assert (stats["samples"], stats["success_rate"]) == (4, 1.0)


# --------------------------------------------------------------------------------------
# 6. Models that vanish
# --------------------------------------------------------------------------------------

def test_a_404_for_one_key_cools_the_pair_and_the_next_key_answers(run_main, fake):
    fake.set_behaviour("not_found", key=KEYS[0], model=FLASH)
    r = route(run_main, "-m", FLASH, "hi", keys=KEYS[:2])
    assert r.code == 0, r.err
    assert r.json()["key"] == "key#2"
    assert fake.count(action="get", model=FLASH) == 1        # the live list was asked once
    entries = cooldowns(run_main, keys=KEYS[:2])
    assert [(e["model"], e["key"], e["kind"]) for e in entries] == \
        [(FLASH, "key#1", "model_missing")]
    assert 86000 < entries[0]["remaining_s"] <= 86400
    assert FLASH in run_main("models", "--json", keys=KEYS[:2]).json()


def test_a_model_gone_from_the_list_leaves_the_cache_but_nothing_else(run_main, fake):
    assert run_main("models", keys=KEYS[:2]).code == 0
    fake.remove_model(FLASH)
    r = route(run_main, "hi", keys=KEYS[:2])
    assert r.code == 0, r.err
    assert r.json()["model"] != FLASH
    assert generate_calls(fake, model=FLASH) == 1 and fake.count(action="get") == 1
    assert fake.count(action="list") == 1                    # updated, not refetched
    listed = run_main("models", "--json", keys=KEYS[:2]).json()
    assert FLASH not in listed and "gemini-2.5-pro" in listed
    assert run_main("tiers", "--json", keys=KEYS[:2]).json()["gemini-2.5-pro"]["output_limit"] \
        == 65536


def test_a_locked_model_that_is_gone_says_so_and_wait_does_not_sleep(run_main, fake):
    assert run_main("lock", FLASH, keys=KEYS[:2]).code == 0
    fake.remove_model(FLASH)
    assert route(run_main, "hi", keys=KEYS[:2]).code == 4
    began = time.monotonic()
    r = run_main("route", "--wait", "30", "hi", keys=KEYS[:2])
    assert time.monotonic() - began < 3
    assert r.code == 4
    assert "no longer has" in r.err and "unlock" in r.err
    assert generate_calls(fake) == 1


# --------------------------------------------------------------------------------------
# 7. The answer always reaches the user
# --------------------------------------------------------------------------------------

@pytest.mark.files_only            # test_redis.py holds the Redis lock instead
def test_an_answer_is_printed_when_recording_it_fails(cli, fake, state_dir):
    assert cli("models").code == 0
    fake.set_latency(1.0, model=FLASH)
    lock = FileLock(str(state_dir / "state.lock"))
    try:
        r = route_while_state_is_locked(cli, FLASH, lock.acquire)
    finally:
        lock.release()
    assert r.code == 0, r.err
    assert r.out == f"[{FLASH}] hello\n"
    assert "warning: could not record the outcome" in r.err
    assert "Traceback" not in r.err


# --------------------------------------------------------------------------------------
# 8. State you can trust
# --------------------------------------------------------------------------------------

def test_one_file_named_by_two_overrides_is_refused(run_main, fake, tmp_path):
    same = str(tmp_path / "one.json")
    r = run_main("stats", env={"STATS_FILE": same, "COOLDOWN_FILE": same})
    assert r.code == 3
    assert "STATS_FILE and COOLDOWN_FILE name the same file" in r.err


@pytest.mark.files_only
def test_two_state_dirs_sharing_one_cooldown_file_lose_no_update(fake, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    models = ["gemini-2.5-flash", "gemini-2.0-flash", "gemini-2.5-flash-lite",
              "gemini-2.0-flash-lite", "gemini-2.5-pro", "gemma-3-27b-it"]
    fake.set_behaviour("rate_minute", key=KEYS[0], retry_delay="300s")
    procs = []
    for i, model in enumerate(models):
        env = base_env(tmp_path / f"state{i % 2}", fake.url, KEYS[:1])
        env["COOLDOWN_FILE"] = str(shared / "cooldowns.json")
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "gemini_router.py"), "route", "-m", model, "hi"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, cwd=str(ROOT)))
    for p in procs:
        p.wait(timeout=60)
    doc = json.loads((shared / "cooldowns.json").read_text())
    assert sorted(e["model"] for e in doc["cooldowns"]) == sorted(models)
    assert list(shared.iterdir()) and not [p for p in shared.iterdir() if p.suffix == ".tmp"]


@pytest.mark.files_only            # test_redis.py has the Redis counterpart
def test_a_bad_entry_is_dropped_and_the_rest_kept(run_main, fake, state_dir):
    fake.set_behaviour("invalid_key", key=KEYS[0])
    assert route(run_main, "hi").code == 0
    path = state_dir / "cooldowns.json"
    doc = json.loads(path.read_text())
    assert len(doc["disabled_keys"]) == 1
    now = time.time()
    doc["cooldowns"] += [{"model": FLASH, "key": "x", "until": "tomorrow", "reason": "bad"},
                         {"model": LITE, "key": None, "until": now + 100, "reason": "kept",
                          "since": now, "kind": "rate_limited"}]
    path.write_text(json.dumps(doc))
    r = run_main("cooldowns", "--json", keys=KEYS)
    assert r.code == 0
    assert "dropped 1 unreadable entry, kept the rest" in r.err
    kinds = sorted(((e["model"], e["kind"]) for e in r.json()), key=str)
    assert kinds == [(LITE, "rate_limited"), (None, "disabled")]
    r = route(run_main, "-m", FLASH, "hi")                   # a writer saves the cleaned file
    assert r.code == 0
    assert any(p.name.startswith("cooldowns.json.corrupt-") for p in state_dir.iterdir())
    assert len(json.loads(path.read_text())["cooldowns"]) == 1
    assert fake.count(key=KEYS[0]) == 1                      # still disabled


def test_a_clock_stepped_backwards_never_stretches_a_cooldown(run_main, fake, state_dir):
    assert route(run_main, "hi").code == 0
    now = time.time()
    doc = {"schema": 1, "kind": "gemini-router/cooldowns", "disabled_keys": {}}
    # written an hour "in the future": the clock has since been stepped back an hour
    doc["cooldowns"] = [{"model": FLASH, "key": None, "until": now + 3600 + 60,
                         "since": now + 3600, "reason": "rate limited", "kind": "rate_limited"}]
    write_state(state_dir, "cooldowns", doc)
    entries = cooldowns(run_main)
    assert len(entries) == 1 and 55 <= entries[0]["remaining_s"] <= 60


def test_concurrent_first_routes_list_the_models_once(fake, tmp_path):
    fake.set_latency(0.3)
    env = base_env(tmp_path / "state", fake.url, KEYS[:2])
    procs = [subprocess.Popen([sys.executable, str(ROOT / "gemini_router.py"), "route", f"p{i}"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, cwd=str(ROOT)) for i in range(5)]
    codes = [p.wait(timeout=60) for p in procs]
    assert codes == [0] * 5
    assert fake.count(action="list") == 1


def test_an_old_format_state_dir_keeps_its_cooldowns_and_disabled_keys(run_main, fake,
                                                                      state_dir):
    assert route(run_main, "hi").code == 0                   # fills the model cache
    fps = [k.fingerprint for k in __import__("gemini_router").collect_keys(
        {f"GEMINI_API_KEY_{i}": k for i, k in enumerate(KEYS, 1)})]
    now = time.time()
    write_state(state_dir, "cooldowns", {
        "schema": 1, "kind": "gemini-router/cooldowns",
        "cooldowns": [{"model": FLASH, "key": fps[0], "until": now + 600,
                       "reason": "rate limited (GenerateRequestsPerMinute)"}],
        "disabled_keys": {fps[1]: {"reason": "API key not valid", "since": now - 10}}})
    router = read_state(state_dir, "router")
    router.pop("limits", None)
    router["strikes"] = {FLASH: 2}
    router["usage"] = {f"{fps[0]}/{FLASH}": {"minute": [now - 5], "day": "2026-11-30",
                                             "count": 3}}
    write_state(state_dir, "router", router)
    fake.reset_log()
    r = route(run_main, "-m", FLASH, "hi")
    assert r.code == 0, r.err
    assert r.json()["key"] == "key#3"
    assert generate_calls(fake, key=KEYS[0]) == generate_calls(fake, key=KEYS[1]) == 0
    assert "warning" not in r.err
    kinds = sorted((e["key"], e["kind"]) for e in cooldowns(run_main))
    assert kinds == [("key#1", None), ("key#2", "disabled")]


# --------------------------------------------------------------------------------------
# 9. `keys`
# --------------------------------------------------------------------------------------

def test_keys_shows_each_key_its_project_state_limits_and_calls(run_main, fake):
    fake.set_behaviour("invalid_key", key=KEYS[2])
    fake.set_behaviour("rate_minute", key=KEYS[0], model=LITE, quota_value="7", retry_delay="50s")
    assert route(run_main, "-m", FLASH, "--max-attempts", "3", "a", env=PROJECTS).code == 0
    assert route(run_main, "-m", FLASH, "b", env=PROJECTS).code == 0
    assert route(run_main, "-m", LITE, "c", env=PROJECTS).code == 4   # project 1 limited
    r = run_main("keys", "--json", keys=KEYS, env=PROJECTS)
    assert r.code == 0
    data = {k["key"]: k for k in r.json()["keys"]}
    assert [data[k]["project"] for k in ("key#1", "key#2", "key#3")] == \
        ["project#1", "project#1", "own"]
    assert data["key#3"]["state"] == "disabled" and "API key not valid" in \
        data["key#3"]["disabled_reason"]
    assert data["key#1"]["state"] == data["key#2"]["state"] == "cooling"
    assert [(lim["model"], lim["rpm"]) for lim in data["key#2"]["limits"]] == [(LITE, 7)]
    # calls that spent quota today: the refused ones (an invalid key, a 429) did not
    assert sum(data[k]["calls_today"] for k in data) == sum(
        1 for c in fake.calls if c.action == "generate" and c.status == 200) == \
        generate_calls(fake) - 2
    assert all(len(k["fingerprint"]) == 12 for k in data.values())
    human = run_main("keys", keys=KEYS, env=PROJECTS).out
    assert "key#1" in human and "7 rpm" in human and "disabled" in human
    for secret in KEYS:
        assert secret not in human and secret not in r.out


def test_a_key_no_longer_configured_is_shown_and_can_be_cleared(run_main, fake):
    fake.set_behaviour("invalid_key", key=KEYS[1])
    for _ in range(2):                                       # the second starts at key#2
        assert route(run_main, "hi", keys=KEYS[:2]).code == 0
    assert generate_calls(fake, key=KEYS[1]) == 1
    r = run_main("keys", "--json", keys=KEYS[:1])              # key#2 dropped from the env
    tags = r.json()["unconfigured"]
    assert len(tags) == 1 and tags[0].startswith("key?")
    assert run_main("cooldowns", "--clear", tags[0], keys=KEYS[:1]).code == 0
    assert run_main("keys", "--json", keys=KEYS[:1]).json()["unconfigured"] == []
    r = run_main("cooldowns", "--clear", "gemini-9-nothing", keys=KEYS[:1])
    assert r.code == 2 and "matches no active cooldown" in r.err


def test_projects_setting_is_validated(run_main, fake):
    for value, words in (("1,x", "groups of key numbers"), ("1,2;2,3", "in two projects"),
                         ("1,9", "names key#9")):
        r = run_main("keys", keys=KEYS, env={"GEMINI_ROUTER_PROJECTS": value})
        assert r.code == 3 and words in r.err, (value, r.err)
