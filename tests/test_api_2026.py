"""Every response of the 2026 Gemini API, end to end, with its exact cost (issue 11).

One row per line of "What the real API returns" in GEMINI_API_NOTES.md (and the thinking
options of issue 11 item 4), driven through the fake Gemini server and the real SDK. For each
row the tests assert, from the fake's request log and `cooldowns --json`:

- the exact upstream calls of a first route, of a second route and of a `rank` after them;
- the cooldowns or disabled keys written (model, key, kind, scope, length);
- the exit codes, and the words `-v`, the error and `cooldowns` use (never a raw class name).

Set-up of every test: three marker keys; key#1 and key#2 form one Google Cloud project
(GEMINI_ROUTER_PROJECTS="1,2" for the router, `fake.set_project` for the fake); key#3 is its
own project. The catalogue holds three text models that no default preference names, so a
fresh route tries them in the order the list and their output limits give: PRO (thinking,
output 65536, input limit 40 tokens), FLASH (thinking, output 32768), GEMMA (8192, no thinking).
Keys rotate: the first route starts at key#1; a route that had to move on to another key
makes the next one start after the key it used.
"""
from __future__ import annotations

import dataclasses

import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from conftest import KEYS, read_state
from fake_gemini import FakeGemini

K1, K2, K3 = KEYS
LABEL = {K1: "key#1", K2: "key#2", K3: "key#3"}
# Named so that the default order (flash family before flash-lite, Gemma last) tries them
# in this order: "PRO" (newest flash) is the first choice, "FLASH" the second.
PRO, FLASH, GEMMA = "gemini-9-flash", "gemini-8-flash", "gemma-test-it"
PROJECT = "project-12"
PROJECTS_ENV = {"GEMINI_ROUTER_PROJECTS": "1,2"}
GENERATE = ("generate", "stream")
DAY = 86400.0
NO_QUOTA = 30 * DAY
PRO_INPUT_LIMIT = 40

# What a user must never see in -v, an error or `cooldowns`: exception class names and the
# router's internal outcome labels.
RAW_NAMES = ("BadRequest", "Forbidden", "NotFound", "TooManyRequests", "ResourceExhausted",
             "PermissionDenied", "FailedPrecondition", "InvalidArgument", "InternalServerError",
             "ServiceUnavailable", "GatewayTimeout", "DeadlineExceeded", "GoogleAPICallError",
             "ClientError", "ServerError", "ReadTimeout", "ConnectionError", "ValueError",
             "KeyError", "TypeError", "AttributeError", "Traceback", "rate_limited",
             "daily_quota", "no_quota", "key_invalid", "key_refused", "project_refused",
             "no_access", "model_cannot", "bad_request", "model_missing", "model_retired",
             "thinking_exhausted", "not_gemini")


def _model(name: str, out_limit: int, *, in_limit: int = 1048576, thinking: bool = False,
           methods: tuple[str, ...] = ("generateContent", "countTokens")) -> dict:
    entry = {"name": f"models/{name}", "version": "001", "displayName": name,
             "description": "", "inputTokenLimit": in_limit, "outputTokenLimit": out_limit,
             "supportedGenerationMethods": list(methods), "temperature": 1.0, "topP": 0.95,
             "topK": 64}
    if thinking:
        entry["thinking"] = True
    return entry


CATALOGUE = [
    _model(PRO, 65536, in_limit=PRO_INPUT_LIMIT, thinking=True),
    _model(FLASH, 32768, thinking=True),
    _model(GEMMA, 8192, in_limit=8192),
    _model("text-embedding-test", 1, methods=("embedContent",)),
]


@pytest.fixture
def fake():
    """This module's catalogue; key#1 and key#2 share one project at the fake too."""
    with FakeGemini(models=CATALOGUE) as server:
        server.set_project(PROJECT, [K1, K2])
        yield server


@pytest.fixture
def run(run_main):
    """run_main with the three marker keys, key#1 and key#2 declared as one project."""
    def go(*args, env=None):
        return run_main(*args, env={**PROJECTS_ENV, **(env or {})}, keys=KEYS)
    return go


# ------------------------------------------------------------------------------ helpers

def called(fake, actions=GENERATE) -> list[tuple[str, str]]:
    """(model, key#N) of every logged call with one of `actions`, in arrival order."""
    return [(c.model, LABEL.get(c.key, "?")) for c in list(fake.calls) if c.action in actions]


def attempts(result) -> list[tuple[str, str, str]]:
    return [(a["model"], a["key"], a["outcome"]) for a in result.json()["attempts"]]


def cooldowns(run) -> list[tuple]:
    """(model, key, kind, scope) of every entry `cooldowns --json` lists, sorted."""
    r = run("cooldowns", "--json")
    assert r.code == 0, r.err
    return sorted(((e["model"], e["key"], e["kind"], e["scope"]) for e in r.json()),
                  key=repr)


def cooldown_entries(run) -> list[dict]:
    r = run("cooldowns", "--json")
    assert r.code == 0, r.err
    return r.json()


def samples(state_dir, model: str) -> list[tuple[str, bool]]:
    doc = read_state(state_dir, "stats")              # the files, or Redis (--state-backend)
    return [(s["kind"], s["ok"]) for s in doc.get("models", {}).get(model, [])]


def next_midnight_pacific(t: float) -> float:
    tz = ZoneInfo("America/Los_Angeles")
    day = datetime.fromtimestamp(t, tz).date() + timedelta(days=1)
    return datetime(day.year, day.month, day.day, tzinfo=tz).timestamp()


def assert_plain_words(text: str) -> None:
    for name in RAW_NAMES:
        assert not re.search(rf"\b{name}\b", text), f"raw name {name!r} shown: {text}"


# ------------------------------------------------------------------------------ the table

@dataclass(frozen=True)
class Row:
    """One response kind and everything it must cost.

    rule: where the fake answers with `behaviour`: "key1" (key#1 on PRO), "model" (every key
    on PRO). route1/route2: (model, key#N, outcome) of every upstream call of the first and the
    second route; exit1/exit2 their exit codes; rank: (model, key#N) of every call of
    `rank --models PRO` after them. cools: (model, key, kind, scope) in `cooldowns --json`
    after the first route; length: their length in seconds, "midnight", or None (disabled).
    words: what -v (and `cooldowns`, the error) must say. sample: PRO's model samples after
    the first route."""
    id: str
    behaviour: str
    params: dict
    rule: str
    route1: list
    exit1: int
    route2: list
    exit2: int
    rank: list
    cools: list = field(default_factory=list)
    length: float | str | None = None
    words: tuple = ()
    sample: list = field(default_factory=list)
    rank_exit: int = 0


def project_cooling(id, behaviour, kind, length, words, params=None):
    """A refusal that takes (project, PRO) out: key#2 is never asked, key#3 answers."""
    return Row(id, behaviour, params or {}, "key1",
               route1=[(PRO, "key#1", kind), (PRO, "key#3", "ok")], exit1=0,
               route2=[(PRO, "key#3", "ok")], exit2=0, rank=[(PRO, "key#3")],
               cools=[(PRO, "key#1", kind, "project"), (PRO, "key#2", kind, "project")],
               length=length, words=words, sample=[("ok", True)])


def project_wide(id, behaviour, kind, words, params=None):
    """A refusal of the whole project, every model, for long."""
    return Row(id, behaviour, params or {}, "key1",
               route1=[(PRO, "key#1", kind), (PRO, "key#3", "ok")], exit1=0,
               route2=[(PRO, "key#3", "ok")], exit2=0, rank=[(PRO, "key#3")],
               cools=[(None, "key#1", kind, "project"), (None, "key#2", kind, "project")],
               length=DAY, words=words, sample=[("ok", True)])


def pair_cooling(id, behaviour, kind, length, words, params=None, sample=None):
    """A refusal of the (key#1, PRO) pair only: key#2 answers; key#1 is not asked again."""
    return Row(id, behaviour, params or {}, "key1",
               route1=[(PRO, "key#1", kind), (PRO, "key#2", "ok")], exit1=0,
               route2=[(PRO, "key#3", "ok")], exit2=0, rank=[(PRO, "key#2")],
               cools=[(PRO, "key#1", kind, "pair")], length=length, words=words,
               sample=sample or [("ok", True)])


def key_disabled(id, behaviour, kind, words, params=None):
    return Row(id, behaviour, params or {}, "key1",
               route1=[(PRO, "key#1", kind), (PRO, "key#2", "ok")], exit1=0,
               route2=[(PRO, "key#3", "ok")], exit2=0, rank=[(PRO, "key#2")],
               cools=[(None, "key#1", "disabled", "key")], length=None, words=words,
               sample=[("ok", True)])


def project_disabled(id, behaviour, kind, words, params=None):
    return Row(id, behaviour, params or {}, "key1",
               route1=[(PRO, "key#1", kind), (PRO, "key#3", "ok")], exit1=0,
               route2=[(PRO, "key#3", "ok")], exit2=0, rank=[(PRO, "key#3")],
               cools=[(None, "key#1", "disabled", "key"), (None, "key#2", "disabled", "key")],
               length=None, words=words, sample=[("ok", True)])


def next_model(id, behaviour, kind, words, params=None):
    """This model cannot take this request: the next model, no cooldown, no sample. FLASH's
    answer is its first sample, so the second route (balance tier: measured models first)
    starts with FLASH."""
    return Row(id, behaviour, params or {}, "model",
               route1=[(PRO, "key#1", kind), (FLASH, "key#1", "ok")], exit1=0,
               route2=[(FLASH, "key#2", "ok")], exit2=0,
               rank=[(PRO, "key#3")], rank_exit=4, words=words, sample=[])


ROWS = [
    # 429 requests per minute, quotaValue, RetryInfo: the project's keys on PRO, retryDelay.
    project_cooling("rpm", "rate_minute", "rate_limited", 26.0,
                    ("rate limited", "10 requests per minute")),
    # 429 input tokens per minute (also PaidTier), with and without RetryInfo (then 60 s).
    project_cooling("tpm", "rate_tokens", "rate_limited", 26.0,
                    ("rate limited", "input tokens per minute")),
    project_cooling("tpm-no-retry-info", "rate_tokens", "rate_limited", 60.0,
                    ("rate limited", "input tokens per minute"), {"no_retry_info": True}),
    project_cooling("tpm-paid", "rate_tokens", "rate_limited", 26.0,
                    ("rate limited", "input tokens per minute"),
                    {"quota_id": "GenerateContentPaidTierInputTokensPerModelPerMinute"}),
    # 429 per day, retryDelay "36s": until midnight Pacific, never 36 s.
    project_cooling("rpd", "rate_day", "daily_quota", "midnight", ("daily quota",)),
    # 429 "limit: 0", no quotaValue, three violations: (project, PRO) for 30 days.
    project_cooling("limit-0", "rate_zero", "no_quota", NO_QUOTA,
                    ("no free-tier quota for this model on this project",)),
    # 429 "Resource has been exhausted" without details: a short cooldown of the pair.
    pair_cooling("bare-429", "rate_plain", "capacity", 60.0, ("rate limited",)),
    # 429 prepayment credits depleted: every model of the project, for long.
    project_wide("credits", "credits_depleted", "credits", ("credits",)),
    # 503 / 500 / 504: another key now; a soft 5 s cooldown of the pair (a strike).
    pair_cooling("503", "unavailable", "transient", 5.0, ("server error", "overloaded"),
                 sample=[("transient", False), ("ok", True)]),
    pair_cooling("500", "error500", "transient", 5.0, ("server error",),
                 sample=[("transient", False), ("ok", True)]),
    pair_cooling("504", "gateway_timeout", "transient", 5.0, ("server error",),
                 sample=[("transient", False), ("ok", True)]),
    # 400 API_KEY_INVALID ("API key not valid" / "API key expired"): the key is disabled.
    key_disabled("key-invalid", "invalid_key", "key_invalid", ("not valid",)),
    key_disabled("key-expired", "key_expired", "key_invalid", ("expired",)),
    # 403 leaked / API_KEY_SERVICE_BLOCKED: the key; CONSUMER_SUSPENDED / SERVICE_DISABLED:
    # every key of its project.
    key_disabled("leaked", "leaked", "key_refused", ("leaked",)),
    key_disabled("key-blocked", "key_blocked", "key_refused", ("blocked",)),
    project_disabled("suspended", "suspended", "project_refused", ("suspended",)),
    project_disabled("service-disabled", "forbidden", "project_refused", ("disabled",)),
    # 403 "The caller does not have permission", no details: that pair, for 24 h.
    pair_cooling("no-permission", "no_permission", "no_access", DAY, ("no access",)),
    # 400 FAILED_PRECONDITION location: the end (exit 1), no cooldown, no sample.
    Row("location", "location", {}, "model",
        route1=[(PRO, "key#1", "location")], exit1=1,
        route2=[(PRO, "key#2", "location")], exit2=1, rank=[(PRO, "key#3")], rank_exit=1,
        words=("location",), sample=[]),
    # 400 FAILED_PRECONDITION free tier not available / no billing account: the project's
    # keys, every model, for long; other projects are tried.
    project_wide("billing-country", "billing", "billing", ("billing",)),
    project_wide("billing-account", "billing", "billing", ("billing",),
                 {"variant": "no_billing_account"}),
    # 400 that this model cannot take: the next model.
    next_model("system-instruction", "no_system_instruction", "model_cannot",
               ("cannot take", "Developer instruction is not enabled")),
    next_model("too-long", "too_long", "model_cannot",
               ("cannot take", "exceeds the maximum number of tokens"), {"tokens": 50}),
    next_model("no-thinking", "no_thinking", "model_cannot",
               ("cannot take", "Thinking is not supported")),
    # 404 "not found" while the live list still has the model: one GET of the model with
    # the same key, then the pair cools 24 h; only this key lacks it: the next key answers.
    Row("not-found-listed", "not_found", {}, "key1",
        route1=[(PRO, "key#1", "model_missing"), (PRO, "key#2", "ok")], exit1=0,
        route2=[(PRO, "key#3", "ok")], exit2=0, rank=[(PRO, "key#2")],
        cools=[(PRO, "key#1", "model_missing", "pair")], length=DAY, words=("not found",),
        sample=[("ok", True)]),
    # 404 "no longer available to new users": (project, PRO), not the model for everyone.
    project_cooling("no-longer-available", "no_longer_available", "model_retired", NO_QUOTA,
                    ("no longer available",)),
    # 200 without parts: not a success; the next candidate.
    Row("empty-answer", "empty_answer", {}, "key1",
        route1=[(PRO, "key#1", "empty"), (PRO, "key#2", "ok")], exit1=0,
        route2=[(PRO, "key#3", "ok")], exit2=0, rank=[(PRO, "key#1")],
        words=("empty answer",), sample=[("empty", False), ("ok", True)], rank_exit=4),
    # 200 MAX_TOKENS, no parts, thoughts = the budget: not a success; the next model.
    # (rank's own 16-token probe that only thinks still shows the model alive: exit 0)
    dataclasses.replace(next_model("thinking-exhausted", "thinking_exhausted",
                                   "thinking_exhausted", ("thinking", "max_output_tokens")),
                        rank_exit=0),
    # 200 RECITATION: retried once elsewhere.
    Row("recitation", "recitation", {}, "key1",
        route1=[(PRO, "key#1", "recitation"), (PRO, "key#2", "ok")], exit1=0,
        route2=[(PRO, "key#3", "ok")], exit2=0, rank=[(PRO, "key#1"), (PRO, "key#2")],
        words=("recitation",), sample=[("ok", True)]),
    # 200 with a finish reason newer than the protos (a number): an answer, reported as is.
    Row("unknown-finish", "unknown_finish", {}, "model",
        route1=[(PRO, "key#1", "ok")], exit1=0,
        route2=[(PRO, "key#2", "ok")], exit2=0, rank=[(PRO, "key#3")],
        words=("99",), sample=[("ok", True)]),
    # 200, no candidates, a block reason newer than the protos: blocked, reported as is.
    Row("unknown-block", "unknown_block", {}, "model",
        route1=[(PRO, "key#1", "blocked")], exit1=1,
        route2=[(PRO, "key#2", "blocked")], exit2=1, rank=[(PRO, "key#3")],
        words=("7",), sample=[("blocked", True)]),
    Row("image-safety", "image_safety", {}, "model",
        route1=[(PRO, "key#1", "blocked")], exit1=1,
        route2=[(PRO, "key#2", "blocked")], exit2=1, rank=[(PRO, "key#3")],
        words=("IMAGE_SAFETY",), sample=[("blocked", True)]),
]


def apply_rule(fake, row: Row) -> None:
    key = K1 if row.rule == "key1" else None
    fake.set_behaviour(row.behaviour, key=key, model=PRO, **row.params)


def test_the_catalogue_routes_pro_flash_gemma_in_that_order(run, fake):
    """The premise of every row: a fresh route tries PRO, then FLASH, then GEMMA."""
    assert run("models").code == 0
    plan = run("route", "--dry-run", "--json", "hi")
    assert plan.code == 0, plan.err
    assert plan.json()["order"] == [PRO, FLASH, GEMMA]
    assert (plan.json()["model"], plan.json()["key"]) == (PRO, "key#1")


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_each_response_costs_exactly(run, fake, state_dir, row):
    apply_rule(fake, row)
    began = time.time()
    first = run("-v", "route", "--json", "hi")
    ended = time.time()
    # The first route: exactly these calls, in this order, and this exit code.
    assert first.code == row.exit1, first.err
    assert called(fake) == [(m, k) for m, k, _ in row.route1]
    if row.exit1 == 0:
        assert attempts(first) == row.route1
        assert first.json()["text"] == f"[{row.route1[-1][0]}] hi"
    else:
        assert first.out == ""
    # -v names what happened in a user's words, never a raw class name.
    for words in row.words:
        assert words.lower() in first.err.lower(), (words, first.err)
    assert_plain_words(first.err)
    assert "Traceback" not in first.err
    # What the first route left behind.
    assert cooldowns(run) == sorted(row.cools, key=repr)
    entries = cooldown_entries(run)
    for e in entries:
        if row.length is None:
            assert (e["until"], e["remaining_s"]) == (None, None)
        elif row.length == "midnight":
            assert e["until"] in (pytest.approx(next_midnight_pacific(began), abs=1),
                                  pytest.approx(next_midnight_pacific(ended), abs=1))
            assert e["until"] - ended > 36         # never the 36 s the server suggested
        else:
            assert e["until"] - e["since"] == pytest.approx(row.length, abs=1), e
    human = run("cooldowns")
    assert human.code == 0
    if row.cools:
        assert any(w.lower() in human.out.lower() for w in row.words), human.out
    assert_plain_words(human.out)
    assert samples(state_dir, PRO) == row.sample
    # The second route: the cooled or disabled targets cost nothing.
    fake.reset_log()
    second = run("route", "--json", "hi")
    assert second.code == row.exit2, second.err
    assert called(fake) == [(m, k) for m, k, _ in row.route2]
    if row.exit2 == 0:
        assert attempts(second) == row.route2
    # rank after them: the same classification, the same skips.
    fake.reset_log()
    ranked = run("rank", "--models", PRO, "--rounds", "1", "--json")
    assert ranked.code == row.rank_exit, ranked.err
    assert called(fake) == row.rank
    assert "Traceback" not in ranked.err


def test_404_checks_the_live_list_once_with_the_same_key(run, fake):
    fake.set_behaviour("not_found", key=K1, model=PRO)
    r = run("route", "--json", "hi")
    assert r.code == 0, r.err
    assert called(fake, ("get",)) == [(PRO, "key#1")]
    assert fake.count(action="list") == 1


def test_404_of_a_model_gone_from_the_live_list_drops_it_and_keeps_the_rest(run, fake):
    assert run("models").code == 0                 # the list is cached with PRO in it
    fake.remove_model(PRO)                         # then Google shuts PRO down
    fake.reset_log()
    r = run("route", "--json", "hi")
    assert r.code == 0, r.err
    assert attempts(r) == [(PRO, "key#1", "model_missing"), (FLASH, "key#1", "ok")]
    assert called(fake, ("get",)) == [(PRO, "key#1")]
    assert fake.count(action="list") == 0
    fake.reset_log()
    r = run("route", "--json", "hi")
    assert r.code == 0, r.err
    assert [a[0] for a in attempts(r)] == [FLASH]
    assert fake.count(action=("get", "list", "generate", "stream")) == 1
    plan = run("route", "--dry-run", "--json", "hi")
    assert plan.json()["order"] == [FLASH, GEMMA]


def test_no_longer_available_asks_nothing_of_the_live_list(run, fake):
    fake.set_behaviour("no_longer_available", key=K1, model=PRO)
    assert run("route", "hi").code == 0
    assert fake.count(action="get") == 0


def test_location_is_not_a_model_sample_and_says_why(run, fake, state_dir):
    fake.set_behaviour("location", model=PRO)
    r = run("route", "hi")
    assert r.code == 1
    assert r.out == ""
    assert "User location is not supported" in r.err
    assert len(r.err.strip().splitlines()) == 1
    assert samples(state_dir, PRO) == []
    assert cooldowns(run) == []


def test_billing_on_one_project_is_routed_to_the_other_project_on_every_model(run, fake):
    fake.set_behaviour("billing", project=PROJECT)         # the whole project is refused
    r = run("route", "--json", "-m", FLASH, "hi")
    assert r.code == 0, r.err
    assert attempts(r) == [(FLASH, "key#1", "billing"), (FLASH, "key#3", "ok")]
    fake.reset_log()
    for model in (PRO, FLASH, GEMMA):                    # every model: key#3 only
        r = run("route", "--json", "-m", model, "hi")
        assert r.code == 0, r.err
        assert [a[1] for a in attempts(r)] == ["key#3"]
    assert fake.count(project=PROJECT) == 0


def test_credits_depleted_everywhere_exits_4_naming_the_recovery(run, fake):
    fake.set_behaviour("credits_depleted")               # every key, every model
    r = run("route", "hi")
    assert r.code == 4
    # key#1 (its project), key#3 (its own): two calls, then nothing is left.
    assert called(fake) == [(PRO, "key#1"), (PRO, "key#3")]
    assert re.search(r"earliest: key#\d on \S+ in 2[34](\.\d)? h", r.err), r.err
    fake.reset_log()
    assert run("route", "hi").code == 4
    assert called(fake) == []


def test_limit_0_is_not_retried_at_midnight(run, fake):
    fake.set_behaviour("rate_zero", key=K1, model=PRO)
    before = time.time()
    assert run("route", "hi").code == 0
    for e in cooldown_entries(run):
        assert e["until"] > next_midnight_pacific(before) + DAY   # well past tomorrow
        assert e["until"] - e["since"] == pytest.approx(NO_QUOTA, abs=1)


ONLY_KEY1 = {"GEMINI_API_KEY_2": None, "GEMINI_API_KEY_3": None, "GEMINI_ROUTER_PROJECTS": None}


def test_no_permission_on_one_model_leaves_the_key_working_elsewhere(run, fake):
    fake.set_behaviour("no_permission", key=K1, model=PRO)
    assert run("route", "hi").code == 0
    fake.reset_log()
    r = run("route", "--json", "-m", FLASH, "hi", env=ONLY_KEY1)
    assert r.code == 0, r.err
    assert attempts(r) == [(FLASH, "key#1", "ok")]
    r = run("route", "-m", PRO, "hi", env=ONLY_KEY1)
    assert r.code == 4
    assert called(fake) == [(FLASH, "key#1")]
    assert cooldowns(run) == [(PRO, "key#1", "no_access", "pair")]


# ------------------------------------------------------------------------------ the 429 shape

def test_real_per_minute_quota_is_learned_and_cools_the_project(run, fake, state_dir):
    """The fake counts per project and minute as Google does: the 429 carries quotaValue 2
    and the seconds left in its minute; the router learns rpm 2 for the project."""
    frozen = (time.time() // 60) * 60 + 30            # 30 s before the fake's next minute
    fake.set_clock(lambda: frozen)
    fake.set_quota(model=PRO, rpm=2, project=PROJECT)
    used = []
    for _ in range(3):
        r = run("route", "--json", "hi")
        assert r.code == 0, r.err
        used.append(attempts(r))
    assert used == [[(PRO, "key#1", "ok")], [(PRO, "key#2", "ok")], [(PRO, "key#3", "ok")]]
    r = run("route", "--json", "hi")                   # the project's third call this minute
    assert r.code == 0, r.err
    assert attempts(r) == [(PRO, "key#1", "rate_limited"), (PRO, "key#3", "ok")]
    assert cooldowns(run) == [(PRO, "key#1", "rate_limited", "project"),
                              (PRO, "key#2", "rate_limited", "project")]
    for e in cooldown_entries(run):
        assert e["until"] - e["since"] == pytest.approx(30, abs=1)
    router = read_state(state_dir, "router")
    assert [(k.split("/", 1)[1], v.get("rpm")) for k, v in router["limits"].items()] == \
        [(PRO, 2)]
    keys = run("keys", "--json").json()["keys"]
    limits = {k["key"]: [(lim["model"], lim.get("rpm")) for lim in k["limits"]] for k in keys}
    assert limits == {"key#1": [(PRO, 2)], "key#2": [(PRO, 2)], "key#3": []}


# ------------------------------------------------------------------------------ end of a route

def test_empty_answers_everywhere_fail_saying_so(run, fake):
    fake.set_behaviour("empty_answer", model=PRO)
    r = run("route", "-m", PRO, "hi")
    assert r.code == 1
    assert r.out == ""
    assert called(fake) == [(PRO, "key#1"), (PRO, "key#2"), (PRO, "key#3")]
    assert "empty answer" in r.err.lower()
    assert_plain_words(r.err)


def test_thinking_exhausted_with_nothing_else_says_what_to_change(run, fake, state_dir):
    fake.set_behaviour("thinking_exhausted", model=PRO)
    r = run("route", "-m", PRO, "hi")
    assert r.code == 1
    assert r.out == ""
    assert called(fake) == [(PRO, "key#1")]        # another key would think the same
    assert "max_output_tokens" in r.err and "thinking_budget" in r.err
    assert samples(state_dir, PRO) == []
    assert cooldowns(run) == []


def test_a_second_recitation_ends_the_route(run, fake, state_dir):
    fake.set_behaviour("recitation", model=PRO)
    r = run("route", "-m", PRO, "hi")
    assert r.code == 1
    assert r.out == ""
    assert called(fake) == [(PRO, "key#1"), (PRO, "key#2")]
    assert "recitation" in r.err.lower()
    assert samples(state_dir, PRO) == []


def test_recitation_is_retried_on_another_model_when_the_keys_are_gone(run, fake):
    fake.set_behaviour("recitation", model=PRO, times=1)
    r = run("route", "--json", "hi", env=ONLY_KEY1)
    assert r.code == 0, r.err
    assert attempts(r) == [(PRO, "key#1", "recitation"), (FLASH, "key#1", "ok")]


def test_a_model_that_cannot_take_the_request_never_ends_the_route_alone(run, fake):
    fake.set_behaviour("no_system_instruction", model=PRO)
    r = run("route", "-m", PRO, "hi")
    assert r.code == 1
    assert called(fake) == [(PRO, "key#1")]         # other keys would be refused the same
    assert "Developer instruction is not enabled" in r.err


def test_gemma_refuses_a_system_instruction_and_the_route_moves_on(run, fake):
    """Gemma takes no system instruction: known from the model's name, so it is skipped
    before any call (the simulator would refuse it, as Google does)."""
    r = run("route", "--json", "-m", GEMMA, "-s", "be brief", "hi")
    assert r.code == 1
    assert "Gemma models take no system instruction" in r.err
    assert called(fake) == []
    fake.reset_log()
    fake.set_behaviour("no_system_instruction", model=PRO)
    r = run("route", "--json", "-s", "be brief", "hi")
    assert r.code == 0, r.err
    assert [(a[0], a[2]) for a in attempts(r)] == [(PRO, "model_cannot"), (FLASH, "ok")]


def test_a_prompt_longer_than_the_input_limit_skips_the_model_without_a_call(run, fake):
    prompt = " ".join(["word"] * (PRO_INPUT_LIMIT + 10))
    r = run("-v", "route", "--json", prompt)
    assert r.code == 0, r.err
    assert called(fake) == [(FLASH, "key#1")]
    assert [a[0] for a in attempts(r)] == [FLASH]
    assert re.search(rf"skipping {PRO}: .*input limit of {PRO_INPUT_LIMIT}", r.err), r.err
    fake.reset_log()
    assert run("route", prompt).code == 0
    assert fake.count(model=PRO) == 0
    short = run("route", "--json", "-m", PRO, "hi")    # a short prompt still goes to PRO
    assert attempts(short) == [(PRO, "key#3", "ok")]


# ------------------------------------------------------------------------------ listing

@pytest.mark.parametrize("behaviour, disabled_keys, kind", [
    ("key_expired", ["key#1"], "key_invalid"),
    ("leaked", ["key#1"], "key_refused"),
    ("key_blocked", ["key#1"], "key_refused"),
    ("suspended", ["key#1", "key#2"], "project_refused"),
])
def test_listing_refusals_disable_like_generation(run, fake, behaviour, disabled_keys, kind):
    fake.set_behaviour(behaviour, key=K1)
    r = run("route", "--json", "hi")
    assert r.code == 0, r.err
    after = "key#2" if len(disabled_keys) == 1 else "key#3"
    assert called(fake, ("list",)) == [(None, "key#1"), (None, after)]
    assert [a[1] for a in attempts(r)] == [after]
    assert cooldowns(run) == [(None, k, "disabled", "key") for k in disabled_keys]


def test_listing_refused_for_the_location_ends_with_exit_1(run, fake):
    fake.set_behaviour("location")
    r = run("route", "hi")
    assert r.code == 1
    assert called(fake, ("list",)) == [(None, "key#1")]
    assert called(fake) == []
    assert "location" in r.err.lower()
    assert cooldowns(run) == []


# ------------------------------------------------------------------------------ streams

def test_unknown_finish_in_a_printed_stream_is_an_answer(run, fake, state_dir):
    fake.set_behaviour("unknown_finish", model=PRO)
    r = run("route", "--stream", "hi")
    assert r.code == 0, r.err
    assert r.out == f"[{PRO}] hi\n"
    assert called(fake) == [(PRO, "key#1")]
    assert "99" in r.err                                # reported as received
    assert samples(state_dir, PRO) == [("ok", True)]


def test_unknown_finish_is_reported_in_json(run, fake):
    fake.set_behaviour("unknown_finish", model=PRO)
    r = run("route", "--json", "hi")
    assert r.code == 0, r.err
    assert r.json()["finish_reason"] == "99"
    assert r.json()["text"] == f"[{PRO}] hi"


def test_unknown_block_in_a_stream_ends_with_exit_1_naming_it(run, fake, state_dir):
    fake.set_behaviour("unknown_block", model=PRO)
    r = run("route", "--stream", "hi")
    assert r.code == 1
    assert r.out == ""
    assert called(fake) == [(PRO, "key#1")]
    assert re.search(r"\b7\b", r.err), r.err
    assert samples(state_dir, PRO) == [("blocked", True)]


def test_error_after_stop_in_a_printed_stream_never_fails_over(run, fake, state_dir):
    fake.set_behaviour("stream_error_after_stop", key=K1, model=PRO)
    r = run("route", "--stream", "hi")
    assert r.code == 1
    assert r.out.startswith(f"[{PRO}] hi")
    assert called(fake) == [(PRO, "key#1")]
    assert samples(state_dir, PRO) == [("transient", False)]


def test_error_after_stop_before_anything_printed_fails_over(run, fake, state_dir):
    fake.set_behaviour("stream_error_after_stop", key=K1, model=PRO)
    r = run("route", "--stream", "--json", "hi")
    assert r.code == 0, r.err
    assert attempts(r) == [(PRO, "key#1", "transient"), (PRO, "key#2", "ok")]
    assert r.json()["text"] == f"[{PRO}] hi"


@pytest.mark.parametrize("finish, block, kind, reason", [
    ("FUTURE_REASON", None, "ok", "FUTURE_REASON"),       # a name the protos do not know
    (99, None, "ok", "99"),                               # a number the protos do not know
    (12, None, "empty", "UNEXPECTED_TOOL_CALL"),          # newer than the protos, no parts
    (None, "FUTURE_BLOCK", "blocked", "FUTURE_BLOCK"),
    (None, 7, "blocked", "7"),
])
def test_unknown_enums_are_classified_as_received(finish, block, kind, reason):
    import gemini_router as gr
    if block is not None:
        body = {"promptFeedback": {"blockReason": block}}
    else:
        parts = [] if kind == "empty" else [{"text": "x"}]
        body = {"candidates": [{"content": {"role": "model", "parts": parts},
                                "finishReason": finish}]}
    outcome = gr.outcome_from_body(body)
    assert (outcome.kind, outcome.finish_reason) == (kind, reason)
    assert gr.outcome_from_body(body, streamed=True).kind == kind


# ------------------------------------------------------------------------------ thinking

def thinking_config(call) -> dict:
    return (call.body or {}).get("generationConfig", {}).get("thinkingConfig")


def generate_calls(fake):
    return [c for c in list(fake.calls) if c.action in GENERATE]


@pytest.mark.parametrize("options, sent", [
    (["thinking_budget=64"], {"thinkingBudget": 64}),
    (["thinking_budget=0"], {"thinkingBudget": 0}),
    (["thinking_budget=-1"], {"thinkingBudget": -1}),
    (["thinking_level=low"], {"thinkingLevel": "low"}),
    (["thinking_level=high"], {"thinkingLevel": "high"}),
    (["include_thoughts=true"], {"includeThoughts": True}),
    (["include_thoughts=false"], {"includeThoughts": False}),
    (["thinking_budget=4", "include_thoughts=true"],
     {"thinkingBudget": 4, "includeThoughts": True}),
])
def test_thinking_options_travel_in_thinking_config(run, fake, options, sent):
    args = [a for o in options for a in ("-o", o)]
    r = run("route", "--json", *args, "hi")
    assert r.code == 0, r.err
    [call] = generate_calls(fake)
    got = thinking_config(call)
    assert got is not None, call.body
    if "thinkingLevel" in got:
        got = {**got, "thinkingLevel": str(got["thinkingLevel"]).lower()}
    assert got == sent
    assert r.json()["text"] == f"[{PRO}] hi"             # thoughts never mixed into it


def test_thinking_options_reach_every_candidate(run, fake):
    fake.set_behaviour("unavailable", key=K1, model=PRO)
    r = run("route", "--json", "-o", "thinking_budget=4", "--stream", "hi")
    assert r.code == 0, r.err
    assert [thinking_config(c) for c in generate_calls(fake)] == \
        [{"thinkingBudget": 4}, {"thinkingBudget": 4}]


def test_json_usage_reports_thought_tokens(run, fake):
    r = run("route", "--json", "-o", "thinking_budget=4", "hi")
    assert r.code == 0, r.err
    usage = r.json()["usage"]
    assert usage["thought_tokens"] == 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["output_tokens"] + 4
    plain = run("route", "--json", "hi")
    assert plain.json()["usage"]["thought_tokens"] == 0


def test_verbose_says_when_thinking_used_most_of_the_output_budget(run, fake):
    r = run("-v", "route", "-o", "thinking_budget=8", "-o", "max_output_tokens=12", "hi")
    assert r.code == 0, r.err
    assert re.search(r"thinking used 8 of \d+", r.err), r.err
    light = run("-v", "route", "-o", "thinking_budget=1",
                "one two three four five six seven eight nine ten")
    assert light.code == 0, light.err
    assert "thinking used" not in light.err


def test_a_model_the_list_says_does_not_think_is_skipped_with_thinking_options(run, fake):
    r = run("-v", "route", "--json", "-m", GEMMA, "-o", "thinking_budget=4", "hi")
    assert r.code == 1 and "does not think" in r.err
    assert called(fake) == []                        # GEMMA is listed without thinking
    r = run("route", "--json", "-o", "thinking_budget=4", "hi")
    assert r.code == 0, r.err
    assert GEMMA not in [a[0] for a in attempts(r)]


def test_a_model_without_thinking_is_passed_for_the_next_model(run, fake):
    fake.set_behaviour("no_thinking", model=PRO)
    r = run("route", "--json", "-o", "thinking_budget=4", "hi")
    assert r.code == 0, r.err
    assert attempts(r) == [(PRO, "key#1", "model_cannot"), (FLASH, "key#1", "ok")]
    assert [thinking_config(c) for c in generate_calls(fake)] == \
        [{"thinkingBudget": 4}, {"thinkingBudget": 4}]


@pytest.mark.parametrize("option", [
    "thinking_budget=lots", "thinking_budget=1.5", "thinking_level=extreme",
    "include_thoughts=maybe",
])
def test_bad_thinking_options_are_usage_errors(run, fake, option):
    r = run("route", "-o", option, "hi")
    assert r.code == 2
    assert r.out == ""
    assert len(r.err.strip().splitlines()) == 1
    name, value = option.split("=")
    # Checked like the other options: the value is wrong, the option itself is known.
    assert f"option {name}" in r.err and repr(value) in r.err, r.err
    assert "unknown option" not in r.err
    assert fake.count(action=GENERATE) == 0
