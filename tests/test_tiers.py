"""Tiers: the S/A/B/C percentile cuts, the Fast / Quality / Balance scores behind them, and the
`tiers` command.

What this file proves:
- the position cut matches SPEC exactly for n = 1..10 and 24 (letters written out by hand);
- `assign_tiers` and `compute_tiers` give every model exactly one tier per metric, tiers are
  monotone in the score and equal scores share the better tier (hypothesis);
- Fast = median latency of successes (no success -> last), Quality = outputTokenLimit with
  inputTokenLimit as tie-breaker (taken from the model list, never a constant), Balance =
  a normalized score, and `--scoring seed` = (1 - success_rate)*1000 + latency - max_tokens*0.1;
- `tiers` reads local state only (works with the endpoint on a closed port, never imports the
  SDK), `--json` is keyed per model with fast/quality/balance plus metrics, and unprobed text
  models are shown as unranked, not dropped.

The network-facing half of ranking (discovery, the prober, routing order) is in test_rank.py.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from conftest import KEYS, ROOT, base_env
from fake_gemini import make_models

import gemini_router as gr

RANK = {"S": 0, "A": 1, "B": 2, "C": 3}
METRICS = ("fast", "quality", "balance")

# ----------------------------------------------------------------------------------------
# The cut by position (SPEC "Tiers"), expected letters written out by hand
# ----------------------------------------------------------------------------------------

EXPECTED_CUTS = {
    1: "A",
    2: "AB",
    3: "SAC",
    4: "SABC",
    5: "SAABC",
    6: "SAABBC",
    7: "SAAABBC",
    8: "SSAABBCC",
    9: "SSAAABBCC",
    10: "SSAAABBBCC",
    24: "SSSSS" "AAAAAAA" "BBBBBBB" "CCCCC",
}


@pytest.mark.parametrize("n, letters", sorted(EXPECTED_CUTS.items()))
def test_tier_for_position_matches_spec(n, letters):
    assert "".join(gr.tier_for_position(i, n) for i in range(n)) == letters


@pytest.mark.parametrize("n, counts", [(24, (5, 7, 7, 5)), (10, (2, 3, 3, 2))])
def test_tier_counts_quoted_in_spec(n, counts):
    letters = [gr.tier_for_position(i, n) for i in range(n)]
    assert tuple(letters.count(t) for t in "SABC") == counts


@pytest.mark.parametrize("n, letters", sorted(EXPECTED_CUTS.items()))
def test_assign_tiers_distinct_scores_lower_is_better(n, letters):
    # Scores deliberately not in name order: the cut follows the score, not the name.
    scores = {f"m{chr(ord('z') - i)}": float(i) for i in range(n)}
    tiers = gr.assign_tiers(scores)
    by_score = sorted(scores, key=scores.get)
    assert "".join(tiers[m] for m in by_score) == letters


def test_assign_tiers_ties_share_the_better_tier():
    # Positions 0..9 would be S S A A A B B B C C; the tie at positions 1..5 takes S (pos 1),
    # the tie at positions 7..8 takes B (pos 7).
    scores = {"a": 1, "b": 2, "c": 2, "d": 2, "e": 2, "f": 2, "g": 3, "h": 4, "i": 4, "j": 5}
    assert gr.assign_tiers(scores) == {"a": "S", "b": "S", "c": "S", "d": "S", "e": "S",
                                       "f": "S", "g": "B", "h": "B", "i": "B", "j": "C"}


def test_assign_tiers_all_equal_scores_all_share_the_top_tier():
    assert gr.assign_tiers({f"m{i}": 7.0 for i in range(6)}) == {f"m{i}": "S" for i in range(6)}


# ----------------------------------------------------------------------------------------
# Properties of assign_tiers
# ----------------------------------------------------------------------------------------

score_maps = st.dictionaries(st.text("abcdefgh", min_size=1, max_size=6),
                             st.integers(min_value=0, max_value=6), min_size=1, max_size=40)


@given(score_maps)
def test_property_each_model_gets_exactly_one_tier(scores):
    tiers = gr.assign_tiers(scores)
    assert set(tiers) == set(scores)
    assert set(tiers.values()) <= set("SABC")


@given(score_maps)
def test_property_tiers_are_monotone_in_score(scores):
    tiers = gr.assign_tiers(scores)
    for a in scores:
        for b in scores:
            if scores[a] < scores[b]:
                assert RANK[tiers[a]] <= RANK[tiers[b]], (a, b)


@given(score_maps)
def test_property_ties_share_the_tier_of_the_groups_best_position(scores):
    tiers = gr.assign_tiers(scores)
    values = sorted(scores.values())
    for m, score in scores.items():
        first = values.index(score)          # best 0-based position held by this score
        assert tiers[m] == gr.tier_for_position(first, len(scores))


# ----------------------------------------------------------------------------------------
# compute_tiers on synthetic stats (pure)
# ----------------------------------------------------------------------------------------

def sample(ok: bool, latency: float, t: float = 1.0) -> dict:
    return {"t": t, "ok": ok, "kind": "ok" if ok else "transient", "latency": latency,
            "prompt_tokens": 1, "output_tokens": 1, "key": "fp"}


def listing(limits: dict[str, tuple[int, int]]) -> dict[str, dict]:
    """A model index as the router caches it: name -> entry with output/input limits."""
    return {name: {"name": name, "output_limit": out, "input_limit": inp,
                   "methods": ["generateContent"]}
            for name, (out, inp) in limits.items()}


def tiers_of(samples: dict[str, list[dict]], limits: dict[str, tuple[int, int]],
             scoring: str = "balanced") -> dict[str, gr.TierRow]:
    return gr.compute_tiers(gr.all_stats({"models": samples}), listing(limits), scoring)


def test_fast_is_median_latency_of_successes():
    # Median of a's successes is 0.2 (the failed 0.01 s sample does not count).
    rows = tiers_of({"a": [sample(True, 0.1), sample(True, 0.2), sample(True, 0.9),
                           sample(False, 0.01)],
                     "b": [sample(True, 0.15)], "c": [sample(True, 0.3)],
                     "d": [sample(True, 0.5)]},
                    {m: (8192, 1000) for m in "abcd"})
    assert rows["a"].latency_p50_s == 0.2
    assert {m: rows[m].fast for m in "abcd"} == {"b": "S", "a": "A", "c": "B", "d": "C"}


def test_fast_model_with_no_success_ranks_last():
    # "z" failed fastest of all, but it never answered: it is last in Fast.
    rows = tiers_of({"a": [sample(True, 0.4)], "b": [sample(True, 0.5)],
                     "c": [sample(True, 0.6)], "z": [sample(False, 0.001)]},
                    {m: (8192, 1000) for m in "abcz"})
    assert rows["z"].latency_p50_s is None
    assert {m: rows[m].fast for m in "abcz"} == {"a": "S", "b": "A", "c": "B", "z": "C"}


def test_quality_follows_output_limit_not_speed():
    rows = tiers_of({m: [sample(True, 0.1 * (i + 1))] for i, m in enumerate("abcd")},
                    {"a": (1024, 1000), "b": (8192, 1000), "c": (65536, 1000),
                     "d": (16384, 1000)})
    assert {m: rows[m].quality for m in "abcd"} == {"c": "S", "d": "A", "b": "B", "a": "C"}
    assert rows["c"].output_limit == 65536 and rows["c"].input_limit == 1000


def test_quality_input_limit_breaks_output_ties():
    rows = tiers_of({m: [sample(True, 0.2)] for m in "ab"},
                    {"a": (8192, 32768), "b": (8192, 1048576)})
    assert (rows["b"].quality, rows["a"].quality) == ("A", "B")


def test_quality_equal_limits_share_a_tier():
    # Positions 0,1 (S, A) tie at 65536 -> both S; positions 2,3 (B, C) tie -> both B.
    rows = tiers_of({m: [sample(True, 0.1 * (i + 1))] for i, m in enumerate("abcd")},
                    {"a": (8192, 1000), "b": (8192, 1000), "c": (65536, 1000),
                     "d": (65536, 1000)})
    assert {m: rows[m].quality for m in "abcd"} == {"c": "S", "d": "S", "a": "B", "b": "B"}


def test_balance_prefers_reliability_all_else_equal():
    good = [sample(True, 0.2)] * 4
    rows = tiers_of({"good": good, "flaky": [sample(True, 0.2)] * 2 + [sample(False, 0.2)] * 2,
                     "dead": [sample(False, 0.2)] * 4},
                    {m: (8192, 1000) for m in ("good", "flaky", "dead")})
    assert (rows["good"].balance, rows["flaky"].balance, rows["dead"].balance) == \
        ("S", "A", "C")
    assert rows["good"].balance_score > rows["flaky"].balance_score > rows["dead"].balance_score


def test_balance_score_is_the_readme_formula():
    # README: 0.5*success + 0.3*(fastest p50 / p50) + 0.2*ln(out)/ln(max out). By hand:
    #   a: 0.5*1   + 0.3*(0.1/0.1) + 0.2*(16/16) = 1.0
    #   b: 0.5*0.5 + 0.3*(0.1/0.2) + 0.2*(13/16) = 0.25 + 0.15 + 0.1625 = 0.5625
    #   c: 0.5*1   + 0.3*(0.1/0.4) + 0.2*(10/16) = 0.5 + 0.075 + 0.125 = 0.7
    rows = tiers_of({"a": [sample(True, 0.1)], "b": [sample(True, 0.2), sample(False, 0.2)],
                     "c": [sample(True, 0.4)]},
                    {"a": (65536, 1000), "b": (8192, 1000), "c": (1024, 1000)})
    assert {m: rows[m].balance_score for m in "abc"} == \
        pytest.approx({"a": 1.0, "b": 0.5625, "c": 0.7}, abs=1e-4)
    assert {m: rows[m].balance for m in "abc"} == {"a": "S", "c": "A", "b": "C"}


def test_seed_scoring_is_the_original_formula():
    # (1 - success)*1000 + latency - max_tokens*0.1, lower is better, computed by hand:
    #   a: 0*1000 + 0.1 - 819.2  = -819.1
    #   b: 0.5*1000 + 0.3 - 3276.8 = -2776.5   (success 1/2, median of its one success 0.3)
    #   c: 0*1000 + 2.0 - 1638.4 = -1636.4
    samples = {"a": [sample(True, 0.1)], "b": [sample(True, 0.3), sample(False, 0.05)],
               "c": [sample(True, 2.0)]}
    limits = {"a": (8192, 1000), "b": (32768, 1000), "c": (16384, 1000)}
    rows = tiers_of(samples, limits, scoring="seed")
    assert {m: rows[m].balance_score for m in "abc"} == \
        pytest.approx({"a": -819.1, "b": -2776.5, "c": -1636.4}, abs=1e-6)
    assert {m: rows[m].balance for m in "abc"} == {"b": "S", "c": "A", "a": "C"}
    # The default scoring sees the same data differently: reliable and fast "a" beats "b".
    balanced = tiers_of(samples, limits)
    assert RANK[balanced["a"].balance] < RANK[balanced["b"].balance]


def test_unsampled_text_models_are_unranked_not_dropped():
    rows = tiers_of({"a": [sample(True, 0.2)]}, {"a": (8192, 1000), "new": (65536, 1000)})
    assert set(rows) == {"a", "new"}
    new = rows["new"]
    assert (new.ranked, new.fast, new.quality, new.balance, new.samples) == \
        (False, None, None, None, 0)
    assert new.output_limit == 65536
    # One ranked model of n = 1 is at p = 0.5: A in every metric.
    assert (rows["a"].fast, rows["a"].quality, rows["a"].balance) == ("A", "A", "A")


# ----------------------------------------------------------------------------------------
# Properties of compute_tiers
# ----------------------------------------------------------------------------------------

LIMIT_CHOICES = (1024, 8192, 16384, 65536)
model_specs = st.dictionaries(
    st.sampled_from([f"m{i}" for i in range(12)]),
    st.tuples(st.lists(st.tuples(st.booleans(), st.sampled_from((0.05, 0.1, 0.2, 0.4, 0.8))),
                       min_size=1, max_size=4),
              st.sampled_from(LIMIT_CHOICES), st.sampled_from((32768, 1048576))),
    min_size=1, max_size=12)


def _rows(spec):
    samples = {m: [sample(ok, lat) for ok, lat in s] for m, (s, _, _) in spec.items()}
    limits = {m: (out, inp) for m, (_, out, inp) in spec.items()}
    return tiers_of(samples, limits)


@hsettings(max_examples=150, deadline=None)
@given(model_specs)
def test_property_one_tier_per_metric_for_every_ranked_model(spec):
    rows = _rows(spec)
    assert set(rows) == set(spec)
    for row in rows.values():
        assert row.ranked is True
        assert all(getattr(row, metric) in RANK for metric in METRICS)


@hsettings(max_examples=150, deadline=None)
@given(model_specs)
def test_property_fast_and_quality_monotone_ties_shared(spec):
    rows = _rows(spec)

    def fast_key(r):
        return (r.latency_p50_s is None, r.latency_p50_s or 0.0)

    def quality_key(r):
        return (-r.output_limit, -r.input_limit)

    for a in rows.values():
        for b in rows.values():
            for metric, key in (("fast", fast_key), ("quality", quality_key)):
                if key(a) < key(b):
                    assert RANK[getattr(a, metric)] <= RANK[getattr(b, metric)]
                elif key(a) == key(b):
                    assert getattr(a, metric) == getattr(b, metric)


@hsettings(max_examples=150, deadline=None)
@given(model_specs)
def test_property_balance_is_normalized_and_respects_dominance(spec):
    rows = _rows(spec)
    for r in rows.values():
        assert 0.0 <= r.balance_score <= 1.0
    for a in rows.values():
        for b in rows.values():
            lat_a = a.latency_p50_s if a.latency_p50_s is not None else float("inf")
            lat_b = b.latency_p50_s if b.latency_p50_s is not None else float("inf")
            if a.success_rate >= b.success_rate and lat_a <= lat_b \
                    and a.output_limit >= b.output_limit:
                assert RANK[a.balance] <= RANK[b.balance], (a, b)
            if a.balance_score == b.balance_score:
                assert a.balance == b.balance


# ----------------------------------------------------------------------------------------
# The `tiers` command
# ----------------------------------------------------------------------------------------

def rank_ok(run_main, *args, **kw):
    r = run_main("rank", "-q", *args, **kw)
    assert r.code == 0, r.err
    return r


def tiers_json(run_main, *args, **kw) -> dict:
    r = run_main("tiers", "--json", *args, **kw)
    assert r.code == 0, r.err
    return r.json()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


TEXT_MODELS = ["gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.5-flash-lite",
               "gemini-2.0-flash", "gemini-2.0-flash-lite", "gemma-3-27b-it"]


def test_tiers_json_is_keyed_per_model_with_tiers_and_metrics(run_main, fake):
    rank_ok(run_main)
    data = tiers_json(run_main)
    assert sorted(data) == sorted(TEXT_MODELS)
    for model, row in data.items():
        assert row["fast"] in RANK and row["quality"] in RANK and row["balance"] in RANK
        assert row["samples"] == 1
        assert row["success_rate"] == 1.0
        assert isinstance(row["latency_p50_s"], float) and row["latency_p50_s"] > 0
    assert data["gemini-2.5-pro"]["output_limit"] == 65536
    assert data["gemma-3-27b-it"]["output_limit"] == 8192
    assert data["gemma-3-27b-it"]["input_limit"] == 131072


def test_tiers_never_touches_the_network(run_main, fake):
    rank_ok(run_main)
    before = tiers_json(run_main)
    fake.reset_log()
    after = tiers_json(run_main, env={"GEMINI_API_ENDPOINT": closed_port_url()})
    assert after == before
    assert fake.count() == 0


def test_tiers_works_without_keys_or_state(run_main, fake):
    # A fresh install: no samples, no model list, no key - still a clean answer, no call.
    r = run_main("tiers", "--json", keys=[])
    assert (r.code, r.json()) == (0, {})
    assert fake.count() == 0


def test_tiers_does_not_import_the_sdk(fake, state_dir):
    code = ("import sys, gemini_router\n"
            "rc = gemini_router.main(['tiers', '--json'])\n"
            "print(rc, sorted(m for m in sys.modules\n"
            "                 if m.startswith(('google.ai', 'google.generativeai',\n"
            "                                  'google.api_core', 'requests'))))\n")
    env = base_env(state_dir, closed_port_url(), KEYS[:2])
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, cwd=str(ROOT), timeout=30)
    assert proc.stdout.splitlines()[-1] == "0 []", proc.stderr


def test_tiers_shows_unprobed_models_as_unranked(run_main, fake):
    rank_ok(run_main, "--models", "gemini-2.0-*")      # 2.0-flash and 2.0-flash-lite
    data = tiers_json(run_main)
    assert sorted(data) == sorted(TEXT_MODELS)
    probed = {m for m, row in data.items() if row["ranked"]}
    assert probed == {"gemini-2.0-flash", "gemini-2.0-flash-lite"}
    for model in set(TEXT_MODELS) - probed:
        row = data[model]
        assert (row["fast"], row["quality"], row["balance"], row["samples"]) == \
            (None, None, None, 0), model
    human = run_main("tiers")
    assert human.code == 0
    for model in TEXT_MODELS:
        assert model in human.out
    assert "4 unranked" in human.out


def test_tiers_human_table_has_the_three_tiers_and_metrics(run_main, fake):
    rank_ok(run_main)
    r = run_main("tiers")
    assert r.code == 0 and r.err == ""
    header = r.out.splitlines()[0].split()
    for column in ("MODEL", "FAST", "QUALITY", "BALANCE", "SUCCESS", "P50"):
        assert column in header
    assert len(r.out.splitlines()) == 1 + len(TEXT_MODELS)


def test_quality_tier_follows_output_limits_from_the_model_list(run_main, fake):
    fake.models = make_models(4)          # output limits 8192, 16384, 32768, 65536
    rank_ok(run_main)
    first = tiers_json(run_main)
    assert {m: r["quality"] for m, r in first.items()} == {
        "sim-model-003": "S", "sim-model-002": "A", "sim-model-001": "B", "sim-model-000": "C"}
    # Upstream limits change: reversed. A relisting rank (TTL 0) must move the Quality tiers.
    for entry, limit in zip(fake.models, (65536, 32768, 16384, 8192)):
        entry["outputTokenLimit"] = limit
    rank_ok(run_main, env={"GEMINI_ROUTER_MODELS_TTL": "0"})
    second = tiers_json(run_main)
    assert {m: r["quality"] for m, r in second.items()} == {
        "sim-model-000": "S", "sim-model-001": "A", "sim-model-002": "B", "sim-model-003": "C"}
    assert second["sim-model-000"]["output_limit"] == 65536


def test_quality_input_limit_tie_break_from_the_model_list(run_main, fake):
    fake.models = make_models(2)
    for entry, inp in zip(fake.models, (32768, 1048576)):
        entry["outputTokenLimit"] = 8192
        entry["inputTokenLimit"] = inp
    rank_ok(run_main)
    data = tiers_json(run_main)
    assert (data["sim-model-001"]["quality"], data["sim-model-000"]["quality"]) == ("A", "B")


def test_seed_scoring_changes_balance_per_the_formula(run_main, fake):
    # Three models, output limits 8192 / 16384 / 32768 (make_models). sim-model-002 fails its
    # first probe of two, so its success rate is 0.5. By hand (latencies ~0.2-0.25 s):
    #   seed: 000: 0 + 0.25 - 819.2 ~ -819;  001: 0 + 0.2 - 1638.4 ~ -1638;
    #         002: 500 + 0.2 - 3276.8 ~ -2777   -> order 002, 001, 000 -> S, A, C
    #   balanced (0.5*success + speed + capability): 002 is the least reliable -> last (C).
    fake.models = make_models(3)
    fake.set_latency(0.25, model="sim-model-000")
    fake.set_latency(0.2, model="sim-model-001")
    fake.set_latency(0.2, model="sim-model-002")
    fake.set_behaviour("error500", model="sim-model-002", times=1)
    rank_ok(run_main, "--rounds", "2")

    seed = tiers_json(run_main, "--scoring", "seed")
    assert {m: r["balance"] for m, r in seed.items()} == {
        "sim-model-002": "S", "sim-model-001": "A", "sim-model-000": "C"}
    assert seed["sim-model-002"]["success_rate"] == 0.5
    for model, row in seed.items():
        expected = ((1 - row["success_rate"]) * 1000 + row["latency_p50_s"]
                    - row["output_limit"] * 0.1)
        assert row["balance_score"] == pytest.approx(expected, abs=1e-3), model

    balanced = tiers_json(run_main)
    assert balanced["sim-model-002"]["balance"] == "C"
    assert balanced["sim-model-001"]["balance"] == "S"
    # Fast and Quality do not depend on the Balance formula.
    for model in seed:
        assert (seed[model]["fast"], seed[model]["quality"]) == \
            (balanced[model]["fast"], balanced[model]["quality"])


def test_rank_json_is_the_tiers_object(run_main, fake):
    r = rank_ok(run_main, "--json")
    assert r.json() == tiers_json(run_main)
    assert json.loads(r.out)["gemini-2.5-pro"]["samples"] == 1
