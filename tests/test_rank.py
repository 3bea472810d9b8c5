"""`rank`: model discovery, the concurrent prober, and the routing order its samples produce.

What this file proves, against the fake Gemini through the real SDK:
- discovery keeps generateContent-capable text models only (embedding, image, TTS, audio/live,
  AQA are never called), follows list pages, lists through another key when one fails, and
  caches the list in state with a TTL (GEMINI_ROUTER_MODELS_TTL) so `route`/`lock` don't relist;
- the prober runs probes concurrently (24 models x 0.4 s in well under 2 s), honours
  `--concurrency`, `--rounds` and `--models`, spreads probes evenly over the healthy keys, skips
  (key, model) pairs that are cooling down, records outcomes exactly as `route` does, shows
  tqdm progress only on a terminal, and keeps its samples when interrupted;
- `route` follows the Balance order after a rank (skipping cooling models), and
  `--tier fast|quality` picks those orders;
- `rank` says what it cost in upstream calls (matching the simulator's count), and exits 4
  with one line saying why when no probe succeeded (rate limits, server errors, 404s, ...).

The pure tier arithmetic and the `tiers` command are in test_tiers.py.
"""
from __future__ import annotations

import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest

from conftest import KEYS, ROOT
from fake_gemini import DEFAULT_MODELS, make_models

import gemini_router as gr

TEXT_MODELS = ["gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.5-flash-lite",
               "gemini-2.0-flash", "gemini-2.0-flash-lite", "gemma-3-27b-it"]
NON_TEXT_MODELS = ["text-embedding-004", "gemini-embedding-001", "imagen-4.0-generate-001",
                   "gemini-2.5-flash-preview-tts", "gemini-2.0-flash-preview-image-generation",
                   "gemini-2.5-flash-native-audio-preview-09-2025",
                   "gemini-live-2.5-flash-preview", "aqa"]


def rank(run_main, *args, keys=None, env=None):
    r = run_main("rank", "-q", *args, keys=keys, env=env)
    assert r.code == 0, r.err
    return r


def route_json(run_main, *args, keys=None, env=None) -> dict:
    r = run_main("route", "--json", *args, "hello", keys=keys, env=env)
    assert r.code == 0, r.err
    return r.json()


def json_of(run_main, *args) -> dict | list:
    r = run_main(*args, "--json")
    assert r.code == 0, r.err
    return r.json()


def generate_counts(fake, models) -> dict[str, int]:
    return {m: fake.count(model=m, action="generate") for m in models}


@pytest.fixture(scope="module", autouse=True)
def sdk_imported():
    """Import the SDK once up front so its ~0.5 s import is not inside a timed rank."""
    gr._import_sdk()


# ----------------------------------------------------------------------------------------
# Discovery
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", DEFAULT_MODELS, ids=lambda e: e["name"])
def test_is_text_model_rule(entry):
    name = entry["name"].removeprefix("models/")
    assert gr.is_text_model(name, entry["supportedGenerationMethods"]) is \
        (name in TEXT_MODELS)


def test_rank_probes_every_text_model_exactly_once(run_main, fake):
    rank(run_main)
    assert generate_counts(fake, TEXT_MODELS) == {m: 1 for m in TEXT_MODELS}
    assert fake.count(action="generate") == len(TEXT_MODELS)
    stats = json_of(run_main, "stats")
    assert sorted(stats) == sorted(TEXT_MODELS)
    assert all(stats[m]["samples"] == 1 for m in TEXT_MODELS)


@pytest.mark.parametrize("model", NON_TEXT_MODELS)
def test_excluded_models_are_never_probed(run_main, fake, model):
    rank(run_main, "--rounds", "2")
    assert fake.count(model=model) == 0
    assert model not in json_of(run_main, "tiers")


def test_probe_is_a_tiny_prompt_with_small_max_output_tokens(run_main, fake):
    rank(run_main, "--models", "gemini-2.0-flash-lite")
    [call] = [c for c in fake.calls if c.action == "generate"]
    assert call.model == "gemini-2.0-flash-lite"
    max_tokens = call.body["generationConfig"]["maxOutputTokens"]
    assert 1 <= max_tokens <= 64
    prompt = " ".join(p["text"] for c in call.body["contents"] for p in c["parts"])
    assert len(prompt) <= 100


def test_discovery_follows_pages(run_main, fake):
    fake.page_size_cap = 3                  # 14 models -> pages of 3, 3, 3, 3, 2
    rank(run_main)
    assert fake.count(action="list") == 5
    assert generate_counts(fake, TEXT_MODELS) == {m: 1 for m in TEXT_MODELS}
    assert sorted(json_of(run_main, "tiers")) == sorted(TEXT_MODELS)


def test_discovery_lists_through_another_key_when_one_fails(run_main, fake):
    fake.set_behaviour("unavailable", key=KEYS[0], times=1)
    rank(run_main)
    assert fake.count(key=KEYS[0], action="list") == 1
    assert fake.count(key=KEYS[1], action="list") == 1
    assert fake.count(action="generate") == len(TEXT_MODELS)


def test_model_list_is_cached_across_routes(run_main, fake):
    route_json(run_main)
    assert fake.count(action="list") == 1
    fake.reset_log()
    route_json(run_main)
    assert fake.count(action="list") == 0
    assert fake.count(action="generate") == 1


def test_rank_fills_the_cache_for_route_and_lock(run_main, fake):
    rank(run_main)
    fake.reset_log()
    route_json(run_main)
    assert run_main("lock", "gemini-2.0-flash").code == 0
    assert fake.count(action="list") == 0


def test_models_ttl_zero_relists_on_every_route(run_main, fake):
    env = {"GEMINI_ROUTER_MODELS_TTL": "0"}
    route_json(run_main, env=env)
    route_json(run_main, env=env)
    assert fake.count(action="list") == 2


def test_models_ttl_expiry_relists(run_main, fake):
    route_json(run_main, env={"GEMINI_ROUTER_MODELS_TTL": "1"})
    time.sleep(1.1)
    route_json(run_main, env={"GEMINI_ROUTER_MODELS_TTL": "1"})
    assert fake.count(action="list") == 2


# ----------------------------------------------------------------------------------------
# The prober
# ----------------------------------------------------------------------------------------

def test_probes_run_concurrently(run_main, fake):
    fake.models = make_models(24)
    fake.set_latency(0.4)
    began = time.perf_counter()
    rank(run_main, keys=KEYS)
    elapsed = time.perf_counter() - began
    assert fake.count(action="generate") == 24
    assert elapsed < 2.0, f"24 probes at 0.4 s took {elapsed:.2f} s: not concurrent"


def test_probes_are_spread_evenly_across_keys(run_main, fake):
    fake.models = make_models(24)
    rank(run_main, keys=KEYS)
    assert [fake.count(key=k, action="generate") for k in KEYS] == [8, 8, 8]


def test_probes_are_spread_evenly_across_the_healthy_keys(run_main, fake):
    # key#1 is refused (disabled while listing): the 24 probes go 12 / 12 to key#2 and key#3.
    fake.models = make_models(24)
    fake.set_behaviour("invalid_key", key=KEYS[0])
    rank(run_main, keys=KEYS)
    assert fake.count(key=KEYS[0], action="generate") == 0
    assert [fake.count(key=k, action="generate") for k in KEYS[1:]] == [12, 12]


def test_concurrency_flag_bounds_probes_in_flight(run_main, fake):
    fake.models = make_models(6)
    for entry in fake.models:           # per-model latency: the list call stays instant
        fake.set_latency(0.2, model=entry["name"])
    began = time.perf_counter()
    rank(run_main, "--concurrency", "1")
    elapsed = time.perf_counter() - began
    assert fake.count(action="generate") == 6
    assert elapsed >= 1.2, f"6 probes x 0.2 s one at a time took only {elapsed:.2f} s"


def test_rounds_take_that_many_samples_per_model(run_main, fake):
    rank(run_main, "--rounds", "3")
    assert generate_counts(fake, TEXT_MODELS) == {m: 3 for m in TEXT_MODELS}
    stats = json_of(run_main, "stats")
    assert {m: stats[m]["samples"] for m in TEXT_MODELS} == {m: 3 for m in TEXT_MODELS}


@pytest.mark.parametrize("pattern", ["gemini-2.5*", "models/gemini-2.5*"])
def test_models_pattern_restricts_the_probe(run_main, fake, pattern):
    rank(run_main, "--models", pattern)
    probed = ["gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.5-flash-lite"]
    assert generate_counts(fake, TEXT_MODELS) == {m: int(m in probed) for m in TEXT_MODELS}
    assert fake.count(action="generate") == 3       # TTS / native-audio 2.5 models excluded
    assert sorted(json_of(run_main, "stats")) == sorted(probed)


def test_models_pattern_matching_nothing_is_a_usage_error(run_main, fake):
    r = run_main("rank", "--models", "no-such-model*")
    assert r.code == 2
    assert "no-such-model" in r.err
    assert fake.count(action="generate") == 0


def test_probe_uses_the_request_timeout_and_a_silent_model_ranks_last(run_main, fake):
    fake.set_behaviour("hang", model="gemini-2.5-pro", seconds=30)
    began = time.perf_counter()
    rank(run_main, "--timeout", "0.5")
    assert time.perf_counter() - began < 5
    tiers = json_of(run_main, "tiers")
    assert tiers["gemini-2.5-pro"]["success_rate"] == 0.0
    assert tiers["gemini-2.5-pro"]["latency_p50_s"] is None
    assert tiers["gemini-2.5-pro"]["fast"] == "C"
    assert tiers["gemini-2.5-pro"]["balance"] == "C"


@pytest.mark.parametrize("args", [("--concurrency", "0"), ("--rounds", "0"),
                                  ("--rounds", "many"), ("--concurrency", "-3")])
def test_bad_rank_flags_are_usage_errors(run_main, fake, args):
    r = run_main("rank", *args)
    assert r.code == 2
    assert args[0] in r.err
    assert fake.count() == 0


def test_probe_skips_a_cooling_key_model_pair(run_main, fake):
    model = "gemini-2.0-flash"
    fake.set_behaviour("rate_minute", key=KEYS[0], model=model, times=1)
    route_json(run_main, "-m", model)        # key#1 answers 429 -> (model, key#1) cools
    assert fake.count(key=KEYS[0], model=model, action="generate") == 1
    fake.reset_log()
    rank(run_main, "--models", model)
    assert fake.count(key=KEYS[0], model=model, action="generate") == 0
    assert fake.count(key=KEYS[1], model=model, action="generate") == 1
    assert json_of(run_main, "stats")[model]["success_rate"] == 1.0


def test_probe_skips_a_model_cooling_on_every_key(run_main, fake):
    model = "gemini-2.5-pro"
    fake.set_behaviour("rate_minute", model=model)
    rank(run_main)                             # 429 on both keys: both pairs cool down
    fake.reset_log()
    r = run_main("rank")
    assert r.code == 0, r.err
    assert fake.count(model=model) == 0
    others = [m for m in TEXT_MODELS if m != model]
    assert generate_counts(fake, others) == {m: 1 for m in others}
    assert model in r.err                         # the user is told it was skipped
    assert model in json_of(run_main, "tiers")    # still shown, not dropped


def test_probe_outcomes_are_recorded_like_routes(run_main, fake):
    # A 429 seen by `route` and one seen by `rank` leave the same kind of cooldown.
    fake.set_behaviour("rate_minute", key=KEYS[0], model="gemini-2.0-flash", times=1)
    route_json(run_main, "-m", "gemini-2.0-flash")
    fake.set_behaviour("rate_minute", model="gemma-3-27b-it", times=1)
    rank(run_main, "--models", "gemma-3-27b-it")
    entries = json_of(run_main, "cooldowns")
    by_model = {e["model"]: e for e in entries}
    routed, probed = by_model["gemini-2.0-flash"], by_model["gemma-3-27b-it"]
    assert routed["reason"] == probed["reason"]
    assert routed["key"] == "key#1"
    assert probed["key"] in ("key#1", "key#2")
    for entry in (routed, probed):
        assert 20 <= entry["remaining_s"] <= 26
    # The probe then moved to the other key and took a good sample.
    assert json_of(run_main, "stats")["gemma-3-27b-it"]["success_rate"] == 1.0


def test_probe_disables_a_refused_key(run_main, fake):
    fake.set_behaviour("invalid_key", key=KEYS[1])
    rank(run_main)
    assert fake.count(key=KEYS[1], action="list") == 0
    disabled = [e for e in json_of(run_main, "cooldowns") if e["until"] is None]
    assert [(e["model"], e["key"]) for e in disabled] == [(None, "key#2")]
    stats = json_of(run_main, "stats")
    assert {m: stats[m]["success_rate"] for m in TEXT_MODELS} == {m: 1.0 for m in TEXT_MODELS}


def test_probes_count_toward_the_per_minute_ceiling(run_main, fake):
    # With one call per key and model per minute allowed, a second round has nothing left
    # to spend: the 2 keys carry one probe each, the third probe is never sent.
    model = "gemini-2.0-flash"
    env = {"GEMINI_ROUTER_RPM": "1"}
    r = run_main("rank", "--models", model, "--rounds", "3", env=env)
    assert r.code == 0, r.err
    assert fake.count(model=model, action="generate") == 2
    assert {fake.count(key=k, model=model, action="generate") for k in KEYS[:2]} == {1}
    # ... and a route right after finds every key at its ceiling for that model.
    r = run_main("route", "-m", model, "hi", env=env)
    assert r.code == 4, r.err
    assert "earliest: key#" in r.err and f"on {model} in " in r.err
    assert fake.count(model=model, action="generate") == 2


def test_no_progress_bar_when_stderr_is_not_a_terminal(cli):
    r = cli("rank")
    assert r.code == 0, r.err
    assert "probing" not in r.err and "\r" not in r.err
    assert "\r" not in r.out


def test_progress_bar_on_a_terminal(cli):
    master, slave = pty.openpty()
    # A real terminal has a size; tqdm draws nothing on a 0-column one.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    env = {k: v for k, v in cli.env.items() if k != "NO_COLOR"}
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "gemini_router.py"), "rank"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
                              env=env, cwd=str(ROOT), timeout=60)
        os.close(slave)
        err = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            err += chunk
    finally:
        os.close(master)
    assert proc.returncode == 0
    assert b"\rprobing:" in err
    assert b"probing" not in proc.stdout


def test_interrupt_keeps_the_samples_already_taken(cli, fake):
    fast = ["gemini-2.5-flash", "gemini-2.0-flash", "gemini-2.0-flash-lite"]
    for model in set(TEXT_MODELS) - set(fast):
        fake.set_behaviour("hang", model=model, seconds=30)
    proc = subprocess.Popen([sys.executable, str(ROOT / "gemini_router.py"), "rank"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=cli.env, cwd=str(ROOT))
    try:
        deadline = time.time() + 20
        while time.time() < deadline:
            done = [c for c in fake.calls if c.action == "generate" and c.status == 200]
            hanging = [c for c in fake.calls if c.action == "generate" and c.status == 0]
            if len(done) == 3 and len(hanging) == 3:
                break
            time.sleep(0.05)
        time.sleep(0.2)                       # let the answered probes finish recording
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert b"Traceback" not in err
    stats = cli.state("stats")["models"]
    assert sorted(stats) == sorted(fast)
    assert all(len(samples) == 1 and samples[0]["ok"] for samples in stats.values())


# ----------------------------------------------------------------------------------------
# Routing order after a rank
# ----------------------------------------------------------------------------------------

def rank_with_distinct_orders(run_main, fake):
    """A rank after which Fast, Quality and Balance each put a different model first.

    gemma-3-27b-it   0.03 s, fails 1 probe of 2   -> fastest, but only 50% reliable
    gemini-2.0-flash 0.06 s, reliable, 8192       -> best Balance
    gemini-2.5-pro   0.3 s, outputTokenLimit 131072 (raised here) -> best Quality
    the rest         0.3 s
    """
    for entry in fake.models:
        if entry["name"] == "models/gemini-2.5-pro":
            entry["outputTokenLimit"] = 131072
    fake.set_latency(0.3)
    fake.set_latency(0.03, model="gemma-3-27b-it")
    fake.set_latency(0.06, model="gemini-2.0-flash")
    fake.set_behaviour("error500", model="gemma-3-27b-it", times=1)
    rank(run_main, "--rounds", "2")
    fake.set_latency(0.0)
    fake.reset_log()


def test_route_follows_balance_order_after_rank(run_main, fake):
    rank_with_distinct_orders(run_main, fake)
    tiers = json_of(run_main, "tiers")
    assert tiers["gemini-2.0-flash"]["balance"] == "S"
    assert route_json(run_main)["model"] == "gemini-2.0-flash"
    assert route_json(run_main, "--tier", "balance")["model"] == "gemini-2.0-flash"


def test_route_tier_fast_picks_the_lowest_latency_model(run_main, fake):
    rank_with_distinct_orders(run_main, fake)
    assert json_of(run_main, "tiers")["gemma-3-27b-it"]["fast"] == "S"
    assert route_json(run_main, "--tier", "fast")["model"] == "gemma-3-27b-it"


def test_route_tier_quality_picks_the_most_capable_model(run_main, fake):
    rank_with_distinct_orders(run_main, fake)
    assert json_of(run_main, "tiers")["gemini-2.5-pro"]["quality"] == "S"
    assert route_json(run_main, "--tier", "quality")["model"] == "gemini-2.5-pro"


def test_route_skips_a_cooling_model_in_balance_order(run_main, fake):
    rank_with_distinct_orders(run_main, fake)
    tiers = json_of(run_main, "tiers")
    order = sorted((m for m in tiers if tiers[m]["ranked"]),
                   key=lambda m: -tiers[m]["balance_score"])
    best, runner_up = order[0], order[1]
    assert best == "gemini-2.0-flash"
    fake.set_behaviour("rate_minute", model=best)
    first = route_json(run_main)               # 429 on both keys, then the next model
    assert first["model"] == runner_up
    assert fake.count(model=best, action="generate") == 2
    fake.reset_log()
    second = route_json(run_main)
    assert second["model"] == runner_up
    assert fake.count(model=best) == 0         # cooling: not even tried


# ----------------------------------------------------------------------------------------
# Review fixes: a rank that reaches nothing
# ----------------------------------------------------------------------------------------

def test_rank_with_a_cached_list_and_the_endpoint_gone_is_exit_4(cli, run_main, fake):
    """The model list is cached, so only the probes find the endpoint down: that is
    'cannot reach' (exit 4), not a rank of six unreachable models, and it adds no sample."""
    rank(run_main)
    stats_file = cli.state_dir / "model_stats.json"
    before = stats_file.read_bytes()
    url = fake.url
    fake.stop()
    r = cli("rank")                          # the subprocess env still points at `url`
    assert r.code == 4, r.err
    assert r.out == ""
    assert "Traceback" not in r.err
    assert r.err.startswith(f"gemini-router: error: cannot reach {url}") and \
        r.err.count("\n") == 1, r.err
    assert stats_file.read_bytes() == before


# ----------------------------------------------------------------------------------------
# What a rank costs, and a rank in which no probe succeeds (exit 4)
# ----------------------------------------------------------------------------------------

COST_LINE = (r"gemini-router: probed (\d+) model\(s\) x (\d+) round\(s\): (\d+) call\(s\)"
             r"( \+ the model list)?, (\d+) ok, (\d+) failed( \([^)]*\))? in [0-9.]+ s")


def test_rank_says_what_it_cost_in_calls(run_main, fake):
    fake.set_behaviour("unavailable", model="gemini-2.5-pro", times=1)
    r = run_main("rank", "--rounds", "2", keys=KEYS[:1])
    assert r.code == 0, r.err
    assert (fake.count(action="generate"), fake.count(action="list")) == (12, 1)
    [line] = [line for line in r.err.splitlines() if "probed" in line]
    assert re.fullmatch(COST_LINE, line).groups() == \
        ("6", "2", "12", " + the model list", "11", "1", " (1 transient)")
    # The list is cached now: the next rank costs exactly its probes.
    fake.reset_log()
    r = run_main("rank", "--models", "gemini-2.0-flash-lite", keys=KEYS[:1])
    assert r.code == 0, r.err
    assert fake.count() == 1
    [line] = [line for line in r.err.splitlines() if "probed" in line]
    assert re.fullmatch(COST_LINE, line).groups() == ("1", "1", "1", None, "1", "0", None)


def test_rank_cost_line_is_silenced_by_quiet(run_main, fake):
    r = run_main("rank", "-q")
    assert (r.code, r.err) == (0, "")


@pytest.mark.parametrize("behaviour, kind, why", [
    ("rate_minute", "rate_limited", "every probe was rate-limited or out of quota; "
                                    "'gemini-router cooldowns' says when they recover"),
    ("rate_day", "daily_quota", "every probe was rate-limited or out of quota; "
                                "'gemini-router cooldowns' says when they recover"),
    ("unavailable", "transient", "every probe failed upstream (server errors or timeouts); "
                                 "try later"),
    ("not_found", "model_missing", "no probed model was found; 'gemini-router models "
                                   "--refresh' relists them"),
    ("bad_request", "bad_request", "'gemini-router stats' shows each model's outcomes"),
])
def test_rank_with_no_successful_probe_is_exit_4_saying_why(run_main, fake, behaviour, kind,
                                                            why):
    model = "gemini-2.0-flash-lite"
    fake.set_behaviour(behaviour, model=model)
    r = run_main("rank", "--json", "--models", model, keys=KEYS[:1])
    assert (r.code, r.out) == (4, "")
    assert r.err == (f"gemini-router: error: no probe succeeded: probed 1 model(s) x 1 "
                     f"round(s): 1 call(s) + the model list, 0 ok, 1 failed (1 {kind}) "
                     f"in {r.err.split(' in ')[-1].split(';')[0]}; {why}\n")
    assert fake.count(action="generate") == 1
    # What the probe learned about the model is kept: a transient failure is a sample; a
    # 429, a 404 or the request's own fault says nothing about the model and leaves none.
    stats = json_of(run_main, "stats")
    if kind == "transient":
        assert stats[model]["outcomes"] == {"transient": 1}
    else:
        assert model not in stats


def test_rank_where_every_key_is_rate_limited_is_exit_4_and_counts_its_calls(run_main, fake):
    fake.set_behaviour("rate_minute")
    r = run_main("rank")
    assert r.code == 4
    assert fake.count(action="generate") == 12             # each model: key#1, then key#2
    assert "no probe succeeded: probed 6 model(s) x 1 round(s): 12 call(s)" in r.err
    assert "0 ok, 12 failed (12 rate_limited)" in r.err
    assert "rate-limited or out of quota" in r.err and r.err.count("\n") == 1
    # Everything is cooling now: the next rank spends nothing and says so.
    fake.reset_log()
    r = run_main("rank")
    assert r.code == 4
    assert fake.count() == 0
    assert "nothing could be probed: every key is disabled or cooling" in r.err
