"""Tiers: the S/A/B/C percentile cuts, the Fast / Quality / Balance scores behind them, the
routing orders they give, and the `tiers` command.

What this file proves:
- the position cut matches SPEC exactly for n = 1..10 and 24 (letters written out by hand);
  ties share the better tier, and tie groups compare with their first member (no chaining);
- success rate counts only MODEL_VERDICTS kinds, and leaves out a key that never worked on a
  model while another key did (health is per key x model);
- Fast = median latency of successes with ties within noise (50 ms, 25 %, 2 standard errors
  of the medians): hand-written cases, and hypothesis properties (equal latencies -> one tier;
  jittered equal speeds -> one tier; monotone in latency, equal medians share; scaling keeps
  the partition of well-separated clusters); a model with no success is C and unmeasured;
- Quality = capability from the model list for every listed model, probed or not (family,
  generation, aliases, size, thinking, token limits); Balance = the README formula, noise-
  aware; `--scoring seed` = (1 - success_rate)*1000 + latency - max_tokens*0.1 by hand;
- the default order names no dated model, prefers Google's aliases, and on the test catalogue
  still starts with gemini-2.5-flash; measured, untried and failing models route in that order;
- before/after fleets (equal speeds, different speeds, a broken model, a flaky key);
- `tiers` reads local state only, `--json` is keyed per model with `rank` and the metrics, the
  human table shows the metric behind each letter, marks unmeasured and provisional letters
  and ends with a legend that never enters --json.

The network-facing half of ranking (discovery, the prober, rank's cost and exit code) is in
test_rank.py.
"""
from __future__ import annotations

import copy
import json
import re
import socket
import subprocess
import sys

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from conftest import KEYS, ROOT, base_env
from fake_gemini import DEFAULT_MODELS, make_models

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


def test_groups_compare_with_their_first_member_not_a_chain():
    # Each step is within the tie rule, the ends are not: a chain would make one group.
    ties = lambda g, m: abs(int(g[0]) - int(m)) <= 1       # noqa: E731
    assert gr.group_runs(["1", "2", "3", "4", "5"], ties) == [["1", "2"], ["3", "4"], ["5"]]
    assert gr.tiers_by_group([["a", "b"], ["c", "d"], ["e"]]) == \
        {"a": "S", "b": "S", "c": "A", "d": "A", "e": "C"}


# ----------------------------------------------------------------------------------------
# Building blocks: samples, model-list entries, rows
# ----------------------------------------------------------------------------------------

def sample(ok: bool, latency: float, t: float = 1.0, key: str = "fp",
           kind: str | None = None) -> dict:
    """A stats sample as record_outcome writes it."""
    return {"t": t, "ok": ok, "kind": kind or ("ok" if ok else "transient"),
            "latency": latency, "prompt_tokens": 1, "output_tokens": 1, "key": key}


def entry(name: str, out: int = 8192, inp: int = 1048576, thinking: bool | None = None) -> dict:
    """A cached model-list entry; `thinking` only when the list says (newer caches)."""
    e = {"name": name, "display_name": name, "output_limit": out, "input_limit": inp,
         "methods": ["generateContent"]}
    if thinking is not None:
        e["thinking"] = thinking
    return e


def listing(limits: dict[str, tuple[int, int]]) -> dict[str, dict]:
    """A model index as the router caches it: name -> entry with output/input limits."""
    return {name: entry(name, out, inp) for name, (out, inp) in limits.items()}


def tiers_of(samples: dict[str, list[dict]], limits: dict[str, tuple[int, int]],
             scoring: str = "balanced") -> dict[str, gr.TierRow]:
    return gr.compute_tiers(gr.all_stats({"models": samples}), listing(limits), scoring)


def rows_for(samples: dict[str, list[dict]], models: dict[str, dict],
             scoring: str = "balanced") -> dict[str, gr.TierRow]:
    return gr.compute_tiers(gr.all_stats({"models": samples}), models, scoring)


def letters(rows: dict[str, gr.TierRow], metric: str) -> dict[str, str]:
    return {m: getattr(r, metric) for m, r in rows.items()}


# The test catalogue (tests/fake_gemini.py DEFAULT_MODELS), as the router caches it.
CATALOGUE = {e["name"].removeprefix("models/"): entry(e["name"].removeprefix("models/"),
                                                      e["outputTokenLimit"],
                                                      e["inputTokenLimit"], e.get("thinking"))
             for e in DEFAULT_MODELS[:6]}
TEXT_MODELS = ["gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.5-flash-lite",
               "gemini-2.0-flash", "gemini-2.0-flash-lite", "gemma-3-27b-it"]
# A 2026-style list: aliases, a newer generation in preview, Gemma sizes; equal limits so
# only what the names say can order them.
LIST_2026 = {n: entry(n, 65536, 1048576) for n in (
    "gemini-3.1-pro-preview", "gemini-3-flash-preview", "gemini-2.5-flash-lite",
    "gemini-flash-latest", "gemini-flash-lite-latest", "gemini-pro-latest",
    "gemma-3-27b-it", "gemma-3-4b-it")}


# ----------------------------------------------------------------------------------------
# Success rate: only what says something about the model (summarize)
# ----------------------------------------------------------------------------------------

def test_success_rate_counts_only_model_verdicts():
    # Quota and key outcomes say nothing about the model: 1 answer of 1 verdict.
    st_ = gr.summarize("m", [sample(False, 0.1, kind="rate_limited"),
                             sample(False, 0.1, kind="daily_quota"),
                             sample(False, 0.0, kind="key_invalid"), sample(True, 0.3)])
    assert (st_.samples, st_.judged, st_.success_rate, st_.excluded) == (4, 1, 1.0, 0)
    assert st_.outcomes == {"rate_limited": 1, "daily_quota": 1, "key_invalid": 1, "ok": 1}
    assert set(k for k in st_.outcomes if k in gr.MODEL_VERDICTS) == {"ok"}


def test_a_key_that_never_worked_on_a_model_is_not_counted_against_it():
    # key k1 failed 3 times on this model, k2 answered 3 times: the model is fine.
    samples = [sample(False, 0.2, key="k1"), sample(True, 0.2, key="k2")] * 3
    st_ = gr.summarize("m", samples)
    assert (st_.judged, st_.success_rate, st_.excluded) == (3, 1.0, 3)


def test_a_working_keys_own_failures_still_count():
    # k1 answered once and failed once: both count; k2 never answered: left out.
    st_ = gr.summarize("m", [sample(True, 0.2, key="k1"), sample(False, 0.2, key="k1"),
                             sample(False, 0.2, key="k2"), sample(False, 0.2, key="k2")])
    assert (st_.judged, st_.success_rate, st_.excluded) == (2, 0.5, 2)


def test_when_no_key_works_every_verdict_counts():
    st_ = gr.summarize("m", [sample(False, 0.2, key="k1"), sample(False, 0.3, key="k2")])
    assert (st_.judged, st_.success_rate, st_.excluded, st_.latency_p50_s) == \
        (2, 0.0, 0, None)


def test_latency_spread_needs_three_answers():
    assert gr.summarize("m", [sample(True, 0.5), sample(True, 1.5)]).latency_mad_s is None
    st_ = gr.summarize("m", [sample(True, v) for v in (0.5, 1.0, 1.5, 9.0)])
    # median 1.25; deviations 0.75 0.25 0.25 7.75 -> median 0.5
    assert (st_.latency_samples, st_.latency_p50_s, st_.latency_mad_s) == (4, 1.25, 0.5)


# ----------------------------------------------------------------------------------------
# Fast: median latency of successes, ties within noise
# ----------------------------------------------------------------------------------------

def test_fast_is_median_latency_of_successes():
    # Median of a's successes is 0.2 (the failed 0.01 s sample does not count); 0.15 and
    # 0.2 are within the 50 ms floor of each other, 0.3 and 0.5 are not.
    rows = tiers_of({"a": [sample(True, 0.1), sample(True, 0.2), sample(True, 0.9),
                           sample(False, 0.01)],
                     "b": [sample(True, 0.15)], "c": [sample(True, 0.3)],
                     "d": [sample(True, 0.5)]},
                    {m: (8192, 1000) for m in "abcd"})
    assert rows["a"].latency_p50_s == 0.2 and rows["a"].latency_samples == 3
    assert letters(rows, "fast") == {"b": "S", "a": "S", "c": "B", "d": "C"}


def test_noise_rule_by_hand():
    def st_(*latencies):
        return gr.summarize("m", [sample(True, v) for v in latencies])
    # Floor: 0.10 vs 0.14 tie (40 ms < 50 ms); 0.10 vs 0.16 do not.
    assert gr.within_noise(st_(0.10), st_(0.14)) and not gr.within_noise(st_(0.10), st_(0.16))
    # Relative: 25% of the faster. 1.0 vs 1.2 tie; 1.0 vs 1.3 do not.
    assert gr.latency_noise(st_(1.0), st_(1.3)) == pytest.approx(0.25)
    assert gr.within_noise(st_(1.0), st_(1.2)) and not gr.within_noise(st_(1.0), st_(1.3))
    # Spread: MAD 0.5 over 3 answers -> standard error 1.2533*1.4826*0.5/sqrt(3) = 0.5364.
    wide_a, wide_b = st_(0.5, 1.0, 1.5), st_(1.0, 1.6, 2.2)
    assert gr.median_error(wide_a) == pytest.approx(0.5364, abs=1e-4)
    assert gr.median_error(wide_b) == pytest.approx(0.6437, abs=1e-4)
    # 2 x hypot(0.5364, 0.6437) = 1.6758 > 0.6: the same medians tie when the answers vary...
    assert gr.latency_noise(wide_a, wide_b) == pytest.approx(1.6758, abs=1e-3)
    assert gr.within_noise(wide_a, wide_b)
    # ... and separate when they do not (MAD 0: only the 25% threshold is left).
    assert not gr.within_noise(st_(1.0, 1.0, 1.0), st_(1.6, 1.6, 1.6))


def test_fast_ties_are_chain_free():
    # 0.14 is within 50 ms of 0.10, 0.18 is not (it starts a group), 0.22 joins 0.18.
    rows = tiers_of({m: [sample(True, v)] for m, v in zip("abcd", (0.10, 0.14, 0.18, 0.22))},
                    {m: (8192, 1000) for m in "abcd"})
    assert letters(rows, "fast") == {"a": "S", "b": "S", "c": "B", "d": "B"}


def test_equal_medians_share_a_group_whatever_their_spread():
    # m1's spread puts it within noise of m0; m2 has the same median but no spread: it
    # still joins m1's group rather than being graded apart from its twin.
    doc = {"models": {"m0": [sample(True, 0.05)],
                      "m1": [sample(True, v) for v in (0.05, 0.1, 0.2)],
                      "m2": [sample(True, v) for v in (0.05, 0.1, 0.1)]}}
    assert gr.fast_groups(gr.all_stats(doc)) == [["m0", "m1", "m2"]]


def test_one_round_of_equal_speeds_is_one_tier():
    jitter = (0.201, 0.199, 0.207, 0.203, 0.198, 0.205)
    rows = rows_for({m: [sample(True, v)] for m, v in zip(TEXT_MODELS, jitter)}, CATALOGUE)
    assert set(letters(rows, "fast").values()) == {"S"}


def test_clearly_different_speeds_still_separate():
    speeds = {"gemini-2.0-flash-lite": 0.05, "gemini-2.0-flash": 0.2,
              "gemini-2.5-flash": 0.6, "gemini-2.5-pro": 1.5}
    rows = rows_for({m: [sample(True, v)] for m, v in speeds.items()},
                    {m: CATALOGUE[m] for m in speeds})
    assert letters(rows, "fast") == {"gemini-2.0-flash-lite": "S", "gemini-2.0-flash": "A",
                                     "gemini-2.5-flash": "B", "gemini-2.5-pro": "C"}


def test_no_success_is_c_and_unmeasured_never_graded_with_working_models():
    # "z" failed fastest of all, but it never answered: C, and not among the graded - so
    # the three working models are cut as n = 3 (S A C), not n = 4.
    rows = tiers_of({"a": [sample(True, 0.4)], "b": [sample(True, 0.6)],
                     "c": [sample(True, 2.0)], "z": [sample(False, 0.001)]},
                    {m: (8192, 1000) for m in "abcz"})
    assert letters(rows, "fast") == {"a": "S", "b": "A", "c": "C", "z": "C"}
    assert letters(rows, "balance")["z"] == "C"
    z = rows["z"]
    assert (z.measured, z.latency_p50_s, z.balance_score, z.success_rate) == \
        (False, None, None, 0.0)


def test_a_model_never_probed_is_c_in_fast_and_balance():
    rows = tiers_of({"a": [sample(True, 0.2)]}, {"a": (8192, 1000), "new": (65536, 1000)})
    new = rows["new"]
    assert (new.ranked, new.measured, new.fast, new.balance, new.samples) == \
        (False, False, "C", "C", 0)
    # Quality grades both (n = 2: A, B) from the list alone.
    assert (new.quality, rows["a"].quality, new.output_limit) == ("A", "B", 65536)
    # One graded model of n = 1 is at p = 0.5: A.
    assert (rows["a"].fast, rows["a"].balance) == ("A", "A")


def test_provisional_below_three_answers():
    rows = tiers_of({"a": [sample(True, 0.2)] * 2, "b": [sample(True, 0.2)] * 3},
                    {m: (8192, 1000) for m in "ab"})
    assert (rows["a"].provisional, rows["b"].provisional) == (True, False)
    assert gr.TRUSTED_ANSWERS == 3


# ----------------------------------------------------------------------------------------
# Properties of the Fast noise rule (hypothesis)
# ----------------------------------------------------------------------------------------

NAMES = [f"m{i:02d}" for i in range(12)]
# A few round values among arbitrary ones, so equal medians with unequal spreads occur.
latency_lists = st.lists(st.one_of(st.sampled_from((0.05, 0.1, 0.2, 0.4)), st.floats(0.01, 30.0)),
                         min_size=1, max_size=5)
fleets = st.dictionaries(st.sampled_from(NAMES),
                         st.one_of(latency_lists, st.just([])), min_size=1, max_size=12)


def fleet_rows(fleet: dict[str, list[float]]) -> dict[str, gr.TierRow]:
    """Models with their answer latencies; an empty list = one failed try."""
    samples = {m: [sample(True, v) for v in lats] or [sample(False, 0.1)]
               for m, lats in fleet.items()}
    return tiers_of(samples, {m: (8192, 1000) for m in fleet})


@hsettings(max_examples=150, deadline=None)
@given(st.floats(0.01, 30.0), st.integers(1, 12), st.integers(1, 5))
def test_property_equal_latencies_share_one_fast_tier(latency, n, rounds):
    rows = fleet_rows({NAMES[i]: [latency] * rounds for i in range(n)})
    assert len({r.fast for r in rows.values()}) == 1
    assert len({r.balance for r in rows.values()}) == 1   # same list entry, same everything


@hsettings(max_examples=150, deadline=None)
@given(st.floats(0.05, 5.0), st.lists(st.floats(0.0, 0.02), min_size=2, max_size=12))
def test_property_one_round_of_jittered_equal_speeds_is_one_tier(base, jitter):
    # Jitter of up to 20 ms on one call each never spreads equal models over S..C.
    rows = fleet_rows({NAMES[i]: [base + j] for i, j in enumerate(jitter)})
    assert len({r.fast for r in rows.values()}) == 1


@hsettings(max_examples=200, deadline=None)
@given(fleets)
def test_property_fast_is_monotone_and_unmeasured_is_c(fleet):
    rows = fleet_rows(fleet)
    for a in rows.values():
        assert a.fast in RANK
        if not a.measured:
            assert (a.fast, a.balance, a.latency_p50_s) == ("C", "C", None)
        for b in rows.values():
            if a.measured and b.measured and a.latency_p50_s < b.latency_p50_s:
                assert RANK[a.fast] <= RANK[b.fast], (a, b)
            if a.measured and b.measured and a.latency_p50_s == b.latency_p50_s:
                assert a.fast == b.fast, (a, b)


@hsettings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=3), st.floats(0.05, 1.0),
       st.floats(1.0, 20.0), st.data())
def test_property_scaling_keeps_the_partition_of_separated_clusters(sizes, base, scale, data):
    # Clusters 3x apart (far beyond 25% and 50 ms), members within 1% of each other.
    fleet, clusters, i = {}, [], 0
    for j, size in enumerate(sizes):
        centre = base * 3 ** j
        members = []
        for _ in range(size):
            wobble = data.draw(st.floats(-0.01, 0.01))
            fleet[NAMES[i]] = centre * (1 + wobble)
            members.append(NAMES[i])
            i += 1
        clusters.append(set(members))

    def partition(factor: float) -> list[set[str]]:
        doc = {"models": {m: [sample(True, round(v * factor, 4))] for m, v in fleet.items()}}
        return [set(g) for g in gr.fast_groups(gr.all_stats(doc))]

    assert partition(1.0) == clusters
    assert partition(scale) == clusters


# ----------------------------------------------------------------------------------------
# Quality: capability from the model list, for every listed model
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, family, generation, size", [
    ("gemini-2.5-pro", "pro", "2.5", None),
    ("models/gemini-2.0-flash", "flash", "2.0", None),
    ("gemini-2.5-flash-lite", "flash-lite", "2.5", None),
    ("gemini-1.5-flash-8b", "flash-lite", "1.5", 8.0),
    ("gemini-2.5-flash-preview-05-20", "flash", "2.5", None),
    ("gemini-3.1-pro-preview", "pro", "3.1", None),
    ("gemini-flash-latest", "flash", None, None),
    ("gemini-exp-1206", "gemini", None, None),          # a date is not a generation
    ("gemma-3-27b-it", "gemma", "3", 27.0),
    ("learnlm-2.0-flash-experimental", "learnlm", "2.0", None),
])
def test_capability_read_from_the_name(name, family, generation, size):
    cap = gr.capability(name, {})
    assert (cap.family, cap.generation, cap.size_b) == (family, generation, size)


def test_aliases_count_as_the_newest_generation_of_their_family():
    caps = gr.capabilities(LIST_2026)
    assert caps["gemini-pro-latest"].generation == "3.1"
    assert caps["gemini-flash-latest"].generation == "3"
    assert caps["gemini-flash-lite-latest"].generation == "2.5"
    assert caps["gemini-flash-latest"].describe() == "flash 3 (latest), out 65536"


def test_quality_order_of_a_2026_list():
    rows = gr.compute_tiers({}, LIST_2026)
    order = sorted(rows, key=lambda m: (rows[m].quality_rank, m))
    assert order == ["gemini-3.1-pro-preview", "gemini-pro-latest", "gemini-3-flash-preview",
                     "gemini-flash-latest", "gemini-2.5-flash-lite",
                     "gemini-flash-lite-latest", "gemma-3-27b-it", "gemma-3-4b-it"]
    # An alias and the model it stands for are the same capability: one rank, one letter.
    assert {m: rows[m].quality_rank for m in order} == {
        "gemini-3.1-pro-preview": 1, "gemini-pro-latest": 1, "gemini-3-flash-preview": 3,
        "gemini-flash-latest": 3, "gemini-2.5-flash-lite": 5, "gemini-flash-lite-latest": 5,
        "gemma-3-27b-it": 7, "gemma-3-4b-it": 8}
    # n = 8: positions 0,2,4,6,7 -> S, A, B, C, C
    assert letters(rows, "quality") == {
        "gemini-3.1-pro-preview": "S", "gemini-pro-latest": "S", "gemini-3-flash-preview": "A",
        "gemini-flash-latest": "A", "gemini-2.5-flash-lite": "B",
        "gemini-flash-lite-latest": "B", "gemma-3-27b-it": "C", "gemma-3-4b-it": "C"}


def test_quality_of_the_test_catalogue_before_any_probe():
    # Family first: flash-lite is not level with pro although the limits are equal, and
    # Gemma is below every Gemini model. Every model gets a letter with no sample at all.
    rows = gr.compute_tiers({}, CATALOGUE)
    assert letters(rows, "quality") == {
        "gemini-2.5-pro": "S", "gemini-2.5-flash": "A", "gemini-2.0-flash": "A",
        "gemini-2.5-flash-lite": "B", "gemini-2.0-flash-lite": "B", "gemma-3-27b-it": "C"}
    assert rows["gemini-2.5-pro"].capability == "pro 2.5, thinking, out 65536"
    assert {r.fast for r in rows.values()} == {"C"}
    assert not any(r.measured for r in rows.values())


def test_family_outranks_token_limits():
    rows = gr.compute_tiers({}, {"gemma-3-27b-it": entry("gemma-3-27b-it", 131072),
                                 "gemini-2.0-flash-lite": entry("gemini-2.0-flash-lite", 8192)})
    assert (rows["gemini-2.0-flash-lite"].quality, rows["gemma-3-27b-it"].quality) == ("A", "B")


def test_generation_outranks_token_limits_within_a_family():
    rows = gr.compute_tiers({}, {"gemini-3.1-pro-preview": entry("gemini-3.1-pro-preview", 8192),
                                 "gemini-2.5-pro": entry("gemini-2.5-pro", 65536)})
    assert (rows["gemini-3.1-pro-preview"].quality, rows["gemini-2.5-pro"].quality) == \
        ("A", "B")


def test_thinking_breaks_ties_before_token_limits():
    rows = gr.compute_tiers({}, {
        "gemini-2.5-flash": entry("gemini-2.5-flash", 8192, thinking=True),
        "gemini-2.5-flash-preview-05-20": entry("gemini-2.5-flash-preview-05-20", 65536)})
    assert rows["gemini-2.5-flash"].quality_rank == 1
    assert rows["gemini-2.5-flash"].thinking is True
    assert rows["gemini-2.5-flash-preview-05-20"].thinking is None     # unknown, not False


def test_quality_follows_output_limit_when_names_say_nothing():
    rows = tiers_of({m: [sample(True, 0.1 * (i + 1))] for i, m in enumerate("abcd")},
                    {"a": (1024, 1000), "b": (8192, 1000), "c": (65536, 1000),
                     "d": (16384, 1000)})
    assert letters(rows, "quality") == {"c": "S", "d": "A", "b": "B", "a": "C"}
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
    assert letters(rows, "quality") == {"c": "S", "d": "S", "a": "B", "b": "B"}


# ----------------------------------------------------------------------------------------
# Balance and seed scoring
# ----------------------------------------------------------------------------------------

def test_balance_prefers_reliability_all_else_equal():
    good = [sample(True, 0.2)] * 4
    rows = tiers_of({"good": good, "flaky": [sample(True, 0.2)] * 2 + [sample(False, 0.2)] * 2,
                     "dead": [sample(False, 0.2)] * 4},
                    {m: (8192, 1000) for m in ("good", "flaky", "dead")})
    # dead is unmeasured: graded are good, flaky (n = 2: A, B); dead C.
    assert (rows["good"].balance, rows["flaky"].balance, rows["dead"].balance) == \
        ("A", "B", "C")
    assert rows["good"].balance_score > rows["flaky"].balance_score
    assert rows["dead"].balance_score is None
    assert [r.model for r in rows.values()] == ["good", "flaky", "dead"]
    assert [r.rank for r in rows.values()] == [1, 2, 3]


def test_balance_score_is_the_readme_formula():
    # README: 0.5*success + 0.3*speed + 0.2*capability; speed = 1 - ln(m/fastest)/ln(30)
    # with m this model's Fast-group leader's median; capability = 1 - Quality
    # position/(n-1). Quality by output limit: a (65536), b (8192), c (1024) -> 1, .5, 0.
    # 0.1, 0.2 and 0.4 s are three Fast groups. By hand:
    #   a: 0.5*1   + 0.3*1                      + 0.2*1   = 1.0
    #   b: 0.5*0.5 + 0.3*(1 - ln 2/ln 30 = .79621) + 0.2*0.5 = 0.25 + 0.23886 + 0.1 = 0.58886
    #   c: 0.5*1   + 0.3*(1 - ln 4/ln 30 = .59241) + 0.2*0   = 0.5 + 0.17772 = 0.67772
    rows = tiers_of({"a": [sample(True, 0.1)], "b": [sample(True, 0.2), sample(False, 0.2)],
                     "c": [sample(True, 0.4)]},
                    {"a": (65536, 1000), "b": (8192, 1000), "c": (1024, 1000)})
    assert {m: rows[m].balance_score for m in "abc"} == \
        pytest.approx({"a": 1.0, "b": 0.5889, "c": 0.6777}, abs=1e-4)
    assert letters(rows, "balance") == {"a": "S", "c": "A", "b": "C"}
    assert [(r.model, r.rank) for r in rows.values()] == [("a", 1), ("c", 2), ("b", 3)]


def test_balance_speed_is_noise_aware():
    # 0.20 and 0.23 s are one Fast group: both get speed 1, so capability decides.
    rows = tiers_of({"slow-big": [sample(True, 0.23)], "quick-small": [sample(True, 0.20)]},
                    {"slow-big": (65536, 1000), "quick-small": (8192, 1000)})
    assert rows["slow-big"].balance_score == pytest.approx(1.0)     # .5 + .3 + .2
    assert rows["quick-small"].balance_score == pytest.approx(0.8)  # .5 + .3 + 0
    assert (rows["slow-big"].fast, rows["quick-small"].fast) == ("A", "A")


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
    assert letters(rows, "balance") == {"b": "S", "c": "A", "a": "C"}
    assert [r.model for r in rows.values()] == ["b", "c", "a"]
    # The default scoring sees the same data differently: reliable and fast "a" beats "b".
    balanced = tiers_of(samples, limits)
    assert RANK[balanced["a"].balance] < RANK[balanced["b"].balance]


# ----------------------------------------------------------------------------------------
# Properties of compute_tiers
# ----------------------------------------------------------------------------------------

LIMIT_CHOICES = (1024, 8192, 16384, 65536)
model_specs = st.dictionaries(
    st.sampled_from([f"m{i}" for i in range(12)]),
    st.tuples(st.lists(st.tuples(st.booleans(), st.sampled_from((0.05, 0.1, 0.2, 0.4, 0.8)),
                                 st.sampled_from(("k1", "k2"))),
                       min_size=1, max_size=4),
              st.sampled_from(LIMIT_CHOICES), st.sampled_from((32768, 1048576))),
    min_size=1, max_size=12)


def _rows(spec):
    samples = {m: [sample(ok, lat, key=key) for ok, lat, key in s]
               for m, (s, _, _) in spec.items()}
    limits = {m: (out, inp) for m, (_, out, inp) in spec.items()}
    return tiers_of(samples, limits)


@hsettings(max_examples=150, deadline=None)
@given(model_specs)
def test_property_every_model_one_letter_per_metric_and_a_distinct_rank(spec):
    rows = _rows(spec)
    assert set(rows) == set(spec)
    assert sorted(r.rank for r in rows.values()) == list(range(1, len(spec) + 1))
    assert [r.rank for r in rows.values()] == list(range(1, len(spec) + 1))
    for row in rows.values():
        assert row.ranked is True
        assert all(getattr(row, metric) in RANK for metric in METRICS)
        assert row.measured == (row.latency_p50_s is not None)
        if not row.measured:
            assert (row.fast, row.balance) == ("C", "C")


@hsettings(max_examples=150, deadline=None)
@given(model_specs)
def test_property_quality_monotone_ties_shared(spec):
    rows = _rows(spec)
    for a in rows.values():
        for b in rows.values():
            ka, kb = (a.output_limit, a.input_limit), (b.output_limit, b.input_limit)
            if ka > kb:
                assert RANK[a.quality] <= RANK[b.quality]
            elif ka == kb:
                assert a.quality == b.quality


@hsettings(max_examples=150, deadline=None)
@given(model_specs)
def test_property_balance_is_normalized_and_respects_dominance(spec):
    rows = _rows(spec)
    measured = [r for r in rows.values() if r.measured]
    for r in measured:
        assert 0.0 <= r.balance_score <= 1.0
    for a in measured:
        for b in measured:
            if a.success_rate >= b.success_rate and a.latency_p50_s <= b.latency_p50_s \
                    and a.quality_rank <= b.quality_rank:
                assert RANK[a.balance] <= RANK[b.balance], (a, b)
                assert a.rank <= b.rank or a.balance_score == b.balance_score
            if a.balance_score == b.balance_score:
                assert a.balance == b.balance


# ----------------------------------------------------------------------------------------
# Routing orders: tier_order and the fresh-install default
# ----------------------------------------------------------------------------------------

def test_default_order_of_the_test_catalogue_starts_with_gemini_2_5_flash():
    rows = gr.compute_tiers({}, CATALOGUE)
    assert gr.default_order(rows, TEXT_MODELS) == [
        "gemini-2.5-flash", "gemini-2.0-flash", "gemini-2.5-flash-lite",
        "gemini-2.0-flash-lite", "gemini-2.5-pro", "gemma-3-27b-it"]


def test_default_order_prefers_googles_aliases_then_the_live_list():
    rows = gr.compute_tiers({}, LIST_2026)
    assert gr.default_order(rows, list(LIST_2026)) == [
        "gemini-flash-latest", "gemini-flash-lite-latest", "gemini-pro-latest",
        "gemini-3-flash-preview", "gemini-2.5-flash-lite", "gemini-3.1-pro-preview",
        "gemma-3-27b-it", "gemma-3-4b-it"]


def test_default_order_puts_stable_before_preview_within_a_generation():
    models = {n: entry(n, 65536) for n in ("gemini-2.5-flash-preview-05-20",
                                            "gemini-2.5-flash", "gemini-2.0-flash")}
    rows = gr.compute_tiers({}, models)
    assert gr.default_order(rows, list(models)) == [
        "gemini-2.5-flash", "gemini-2.5-flash-preview-05-20", "gemini-2.0-flash"]


def test_default_preference_names_no_dated_model():
    assert gr.DEFAULT_PREFERENCE == ("gemini-flash-latest", "gemini-flash-lite-latest",
                                     "gemini-pro-latest")
    assert not any(ch.isdigit() for name in gr.DEFAULT_PREFERENCE for ch in name)


def test_quality_order_routes_to_the_most_capable_model_without_a_probe():
    rows = gr.compute_tiers({}, CATALOGUE)
    assert gr.tier_order(rows, "quality", TEXT_MODELS)[:3] == [
        "gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.0-flash"]


def test_orders_put_measured_first_then_untried_then_failing():
    samples = {"gemini-2.0-flash-lite": [sample(True, 0.3)],
               "gemini-2.5-flash": [sample(False, 0.2)] * 2}      # tried, never answered
    rows = rows_for(samples, CATALOGUE)
    untried = ["gemini-2.0-flash", "gemini-2.5-flash-lite", "gemini-2.5-pro", "gemma-3-27b-it"]
    assert gr.tier_order(rows, "balance", TEXT_MODELS) == \
        ["gemini-2.0-flash-lite"] + untried + ["gemini-2.5-flash"]
    assert gr.tier_order(rows, "fast", TEXT_MODELS) == \
        ["gemini-2.0-flash-lite"] + untried + ["gemini-2.5-flash"]
    assert gr.tier_order(rows, "quality", TEXT_MODELS) == [
        "gemini-2.5-pro", "gemini-2.0-flash", "gemini-2.5-flash-lite",
        "gemini-2.0-flash-lite", "gemma-3-27b-it", "gemini-2.5-flash"]
    assert [rows[m].rank for m in gr.tier_order(rows, "balance", TEXT_MODELS)] == \
        [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------------------
# Before / after: the same simulated fleets under the old and the new rules
# ----------------------------------------------------------------------------------------
# Each fleet is samples written as `record_outcome` writes them, over the test catalogue.
# The rules before issue 12 graded the same fleets (FAST / QUALITY / BALANCE):
#   (a) equal speeds, one round: Fast spread S A A B B C by 10 ms of jitter; Quality put
#       2.5-flash-lite level with 2.5-pro (both S, same output limit)
#   (b) 0.05 / 0.2 / 0.6 / 1.5 s: Fast S A B C, as now
#   (c) gemini-2.5-pro always 503: C / C, but with a Balance score (0.2) among the working
#       models, and Fast cut over six models, the broken one included
#   (d) key#1 503 on every model: every model 50% success, Fast spread S..C by jitter
# The tables in the report come from these fleets.

FLEET_JITTER = {"gemini-2.5-pro": 0.203, "gemini-2.5-flash": 0.199,
                "gemini-2.5-flash-lite": 0.207, "gemini-2.0-flash": 0.201,
                "gemini-2.0-flash-lite": 0.198, "gemma-3-27b-it": 0.205}


def fleet_equal_speeds() -> dict[str, list[dict]]:
    return {m: [sample(True, v, key="k1")] for m, v in FLEET_JITTER.items()}


def fleet_different_speeds() -> dict[str, list[dict]]:
    speeds = {"gemini-2.0-flash-lite": 0.05, "gemini-2.0-flash": 0.2,
              "gemini-2.5-flash": 0.6, "gemini-2.5-pro": 1.5}
    return {m: [sample(True, v, key="k1")] for m, v in speeds.items()}


def fleet_one_broken_model() -> dict[str, list[dict]]:
    """Three rounds over two keys; gemini-2.5-pro answers 503 every time."""
    fleet = {}
    for m, v in FLEET_JITTER.items():
        fleet[m] = [sample(m != "gemini-2.5-pro", v + 0.002 * r, t=r, key=f"k{r % 2 + 1}")
                    for r in range(3)]
    return fleet


def fleet_one_flaky_key() -> dict[str, list[dict]]:
    """Four rounds, keys alternating; key#1 answers 503 on every model, key#2 is fine."""
    return {m: [sample(r % 2 == 1, v + 0.002 * r, t=r, key=f"k{r % 2 + 1}")
                for r in range(4)] for m, v in FLEET_JITTER.items()}


def fleet_table(samples: dict[str, list[dict]]) -> dict[str, str]:
    """model -> 'FAST QUALITY BALANCE' letters."""
    models = {m: CATALOGUE[m] for m in samples}
    return {m: f"{r.fast} {r.quality} {r.balance}" for m, r in rows_for(samples, models).items()}


def test_after_fleet_a_equal_speeds_one_round():
    rows = rows_for(fleet_equal_speeds(), CATALOGUE)
    assert fleet_table(fleet_equal_speeds()) == {
        "gemini-2.5-pro": "S S S", "gemini-2.5-flash": "S A A", "gemini-2.0-flash": "S A A",
        "gemini-2.5-flash-lite": "S B B", "gemini-2.0-flash-lite": "S B B",
        "gemma-3-27b-it": "S C C"}
    assert all(r.provisional for r in rows.values())


def test_after_fleet_b_clearly_different_speeds():
    assert fleet_table(fleet_different_speeds()) == {
        "gemini-2.0-flash-lite": "S C S", "gemini-2.0-flash": "A B A",
        "gemini-2.5-flash": "B A B", "gemini-2.5-pro": "C S C"}


def test_after_fleet_c_one_broken_model():
    table = fleet_table(fleet_one_broken_model())
    assert table == {
        "gemini-2.5-flash": "S A S", "gemini-2.0-flash": "S A A",
        "gemini-2.5-flash-lite": "S B A", "gemini-2.0-flash-lite": "S B B",
        "gemma-3-27b-it": "S C C", "gemini-2.5-pro": "C S C"}
    rows = rows_for(fleet_one_broken_model(), CATALOGUE)
    pro = rows["gemini-2.5-pro"]
    assert (pro.measured, pro.success_rate, pro.judged, pro.rank) == (False, 0.0, 3, 6)
    assert gr.tier_order(rows, "quality", TEXT_MODELS)[-1] == "gemini-2.5-pro"


def test_after_fleet_d_one_flaky_key():
    rows = rows_for(fleet_one_flaky_key(), CATALOGUE)
    assert {m: (r.success_rate, r.judged, r.excluded) for m, r in rows.items()} == \
        {m: (1.0, 2, 2) for m in TEXT_MODELS}
    assert fleet_table(fleet_one_flaky_key()) == fleet_table(fleet_equal_speeds())


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


def test_tiers_json_is_keyed_per_model_with_tiers_rank_and_metrics(run_main, fake):
    rank_ok(run_main)
    data = tiers_json(run_main)
    assert sorted(data) == sorted(TEXT_MODELS)
    assert sorted(row["rank"] for row in data.values()) == [1, 2, 3, 4, 5, 6]
    for model, row in data.items():
        assert row["fast"] in RANK and row["quality"] in RANK and row["balance"] in RANK
        assert (row["samples"], row["latency_samples"], row["judged"]) == (1, 1, 1)
        assert (row["measured"], row["provisional"]) == (True, True)
        assert row["success_rate"] == 1.0
        assert isinstance(row["latency_p50_s"], float) and row["latency_p50_s"] > 0
    assert data["gemini-2.5-pro"]["output_limit"] == 65536
    assert (data["gemini-2.5-pro"]["family"], data["gemini-2.5-pro"]["generation"]) == \
        ("pro", "2.5")
    assert data["gemini-2.5-pro"]["quality"] == "S"
    assert data["gemma-3-27b-it"]["output_limit"] == 8192
    assert data["gemma-3-27b-it"]["input_limit"] == 131072
    # Rank 1 is the Balance order's first, the model a plain route goes to.
    first = min(data, key=lambda m: data[m]["rank"])
    assert run_main("route", "--json", "hi").json()["model"] == first


def test_one_round_at_equal_speed_through_the_simulator_is_one_fast_tier(run_main, fake):
    fake.set_latency(0.2)
    rank_ok(run_main)
    data = tiers_json(run_main)
    assert {m: row["fast"] for m, row in data.items()} == {m: "S" for m in TEXT_MODELS}


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


def test_tiers_grades_quality_of_unprobed_models_and_marks_them_unmeasured(run_main, fake):
    rank_ok(run_main, "--models", "gemini-2.0-*")      # 2.0-flash and 2.0-flash-lite
    data = tiers_json(run_main)
    assert sorted(data) == sorted(TEXT_MODELS)
    probed = {m for m, row in data.items() if row["ranked"]}
    assert probed == {"gemini-2.0-flash", "gemini-2.0-flash-lite"}
    assert {m: row["quality"] for m, row in data.items()} == {
        "gemini-2.5-pro": "S", "gemini-2.5-flash": "A", "gemini-2.0-flash": "A",
        "gemini-2.5-flash-lite": "B", "gemini-2.0-flash-lite": "B", "gemma-3-27b-it": "C"}
    for model in set(TEXT_MODELS) - probed:
        row = data[model]
        assert (row["fast"], row["balance"], row["samples"], row["measured"],
                row["latency_p50_s"], row["balance_score"]) == \
            ("C", "C", 0, False, None, None), model
    assert sorted(data[m]["rank"] for m in probed) == [1, 2]
    human = run_main("tiers")
    assert human.code == 0
    lines = {line.split()[1]: line for line in human.out.splitlines()[1:7]}
    assert sorted(lines) == sorted(TEXT_MODELS)
    for model in set(TEXT_MODELS) - probed:
        assert "unmeasured: never tried" in lines[model]
    assert "4 model(s) not measured yet" in human.err             # a hint: stderr


def test_tiers_human_table_explains_itself(run_main, fake):
    rank_ok(run_main)
    r = run_main("tiers")
    assert r.code == 0 and r.err == ""
    lines = r.out.splitlines()
    assert lines[0].split() == ["RANK", "MODEL", "FAST", "QUALITY", "BALANCE", "P50", "N",
                                "SUCCESS", "CAPABILITY", "SCORE", "NOTE"]
    rows = lines[1:1 + len(TEXT_MODELS)]
    pro = next(line for line in rows if " gemini-2.5-pro " in line)
    # "thinking" shows once the cached list carries the field (older caches lack it).
    assert re.search(r"  pro 2\.5(, thinking)?, out 65536  ", pro), pro
    assert "100% of 1" in pro and "provisional: 1 answer(s)" in pro
    assert " S? " in r.out or " A? " in r.out             # provisional letters are marked
    legend = "\n".join(lines[1 + len(TEXT_MODELS):])
    for word in ("S/A/B/C", "FAST", "QUALITY", "BALANCE", "SUCCESS", "RANK", "provisional",
                 "unmeasured", "50 ms", "25%"):
        assert word in legend, word
    # --json carries no legend: one document, every value per model.
    assert "S/A/B/C" not in run_main("tiers", "--json").out


def test_quality_tier_follows_output_limits_from_the_model_list(run_main, fake):
    fake.models = make_models(4)          # output limits 8192, 16384, 32768, 65536
    rank_ok(run_main)
    first = tiers_json(run_main)
    assert {m: r["quality"] for m, r in first.items()} == {
        "sim-model-003": "S", "sim-model-002": "A", "sim-model-001": "B", "sim-model-000": "C"}
    # Upstream limits change: reversed. A relisting rank (TTL 0) must move the Quality tiers.
    for entry_, limit in zip(fake.models, (65536, 32768, 16384, 8192)):
        entry_["outputTokenLimit"] = limit
    rank_ok(run_main, env={"GEMINI_ROUTER_MODELS_TTL": "0"})
    second = tiers_json(run_main)
    assert {m: r["quality"] for m, r in second.items()} == {
        "sim-model-000": "S", "sim-model-001": "A", "sim-model-002": "B", "sim-model-003": "C"}
    assert second["sim-model-000"]["output_limit"] == 65536


def test_quality_input_limit_tie_break_from_the_model_list(run_main, fake):
    fake.models = make_models(2)
    for entry_, inp in zip(fake.models, (32768, 1048576)):
        entry_["outputTokenLimit"] = 8192
        entry_["inputTokenLimit"] = inp
    rank_ok(run_main)
    data = tiers_json(run_main)
    assert (data["sim-model-001"]["quality"], data["sim-model-000"]["quality"]) == ("A", "B")


def test_seed_scoring_changes_balance_per_the_formula(run_main, fake):
    # Three models, output limits 8192 / 16384 / 32768 (make_models). sim-model-002 fails its
    # first probe of two (one key, so both probes judge it), success rate 0.5. By hand:
    #   seed: 000: 0 + 0.6 - 819.2 ~ -819;  001: 0 + 0.2 - 1638.4 ~ -1638;
    #         002: 500 + 0.2 - 3276.8 ~ -2777   -> order 002, 001, 000 -> S, A, C
    #   balanced: 001 and 002 tie in Fast (speed 1), 000 is 3x slower (speed 1 - ln3/ln30
    #   = 0.68); capability 002 1, 001 0.5, 000 0:
    #   001: .5 + .3 + .1 = .9;  002: .25 + .3 + .2 = .75;  000: .5 + .2 + 0 = .7
    fake.models = make_models(3)
    fake.set_latency(0.6, model="sim-model-000")
    fake.set_latency(0.2, model="sim-model-001")
    fake.set_latency(0.2, model="sim-model-002")
    fake.set_behaviour("error500", model="sim-model-002", times=1)
    rank_ok(run_main, "--rounds", "2", keys=KEYS[:1])

    seed = tiers_json(run_main, "--scoring", "seed")
    assert {m: r["balance"] for m, r in seed.items()} == {
        "sim-model-002": "S", "sim-model-001": "A", "sim-model-000": "C"}
    assert {m: r["rank"] for m, r in seed.items()} == {
        "sim-model-002": 1, "sim-model-001": 2, "sim-model-000": 3}
    assert seed["sim-model-002"]["success_rate"] == 0.5
    for model, row in seed.items():
        expected = ((1 - row["success_rate"]) * 1000 + row["latency_p50_s"]
                    - row["output_limit"] * 0.1)
        assert row["balance_score"] == pytest.approx(expected, abs=1e-3), model

    balanced = tiers_json(run_main)
    assert {m: r["balance"] for m, r in balanced.items()} == {
        "sim-model-001": "S", "sim-model-002": "A", "sim-model-000": "C"}
    assert balanced["sim-model-001"]["balance_score"] == pytest.approx(0.9, abs=1e-3)
    assert balanced["sim-model-002"]["balance_score"] == pytest.approx(0.75, abs=1e-3)
    # Fast and Quality do not depend on the Balance formula.
    for model in seed:
        assert (seed[model]["fast"], seed[model]["quality"]) == \
            (balanced[model]["fast"], balanced[model]["quality"])


def test_rank_json_is_the_tiers_object(run_main, fake):
    r = rank_ok(run_main, "--json")
    assert r.json() == tiers_json(run_main)
    assert json.loads(r.out)["gemini-2.5-pro"]["samples"] == 1


def test_fresh_install_routes_to_googles_alias_when_listed(run_main, fake):
    alias = copy.deepcopy(DEFAULT_MODELS[1])
    alias.update(name="models/gemini-flash-latest", displayName="Gemini Flash Latest")
    fake.models = [alias] + fake.models
    r = run_main("route", "--json", "hi")
    assert r.code == 0, r.err
    assert r.json()["model"] == "gemini-flash-latest"
    assert fake.count(action="generate") == 1


def test_fresh_install_routes_to_the_newest_flash_of_the_live_list(run_main, fake):
    newer = copy.deepcopy(DEFAULT_MODELS[1])
    newer.update(name="models/gemini-3-flash-preview", displayName="Gemini 3 Flash Preview")
    fake.models = fake.models + [newer]
    r = run_main("route", "--json", "hi")
    assert r.code == 0, r.err
    assert r.json()["model"] == "gemini-3-flash-preview"
    assert fake.count(action="generate") == 1


def test_route_tier_quality_without_any_probe_picks_the_most_capable(run_main, fake):
    r = run_main("route", "--tier", "quality", "--json", "hi")
    assert r.code == 0, r.err
    assert r.json()["model"] == "gemini-2.5-pro"
    assert fake.count(action="generate") == 1
