"""Hostile input and upstream weirdness never end in a traceback.

What this file proves (issue "Reliability and security", parts 4 and 5):

* a table of bad inputs (keys, endpoint, numeric settings, timeout, prompt, stdin, model
  names, subcommand), each run plain and with `--json`: the exit code of the SPEC table, one
  stderr line carrying a fragment that names the problem, an empty stdout, and not a byte of
  state written (a warmed state directory is compared before and after; a fresh one gains
  no state file);
* duplicate and blank keys are merged away; a 5 MB prompt goes through whole;
* upstream weirdness (non-JSON error bodies, an HTML 502, an empty 200, a 200 without
  candidates, 500/503/504, a hanging server, a broken or truncated stream) is classified as
  transient: the next key once, then the next model; connection refused is exit 4
  "cannot reach". No "Traceback" ever reaches stderr, and an error is one stderr line.
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import KEYS, CLI
from fake_gemini import FakeGemini

NO_KEYS = {"GEMINI_API_KEY_1": None, "GEMINI_API_KEY_2": None}


def closed_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEAD = f"http://127.0.0.1:{closed_port()}"


@dataclass
class Row:
    id: str
    args: tuple[str, ...]
    code: int
    fragment: str
    env: dict[str, str | None] = field(default_factory=dict)
    stdin: bytes | None = None        # rows with stdin run as a subprocess

    @property
    def param(self):
        return pytest.param(self, id=self.id)


MATRIX = [
    # keys
    Row("no-keys", ("route", "hi"), 3, "no API key", NO_KEYS),
    Row("blank-keys", ("route", "hi"), 3, "no API key",
        {"GEMINI_API_KEY_1": "   ", "GEMINI_API_KEY_2": "", "GEMINI_API_KEYS": " , ,",
         "GEMINI_API_KEY": "\t", "GOOGLE_API_KEY": ""}),
    Row("key-with-space", ("route", "hi"), 3, "GEMINI_API_KEY_2",
        {"GEMINI_API_KEY_2": "AIza with spaces"}),
    Row("key-non-ascii", ("route", "hi"), 3, "GEMINI_API_KEYS",
        {"GEMINI_API_KEYS": "AIzaSyé"}),
    # endpoint
    Row("endpoint-no-scheme", ("route", "hi"), 3, "GEMINI_API_ENDPOINT",
        {"GEMINI_API_ENDPOINT": "localhost:8080"}),
    Row("endpoint-ftp", ("route", "hi"), 3, "GEMINI_API_ENDPOINT",
        {"GEMINI_API_ENDPOINT": "ftp://example.com"}),
    Row("endpoint-bad-port", ("route", "hi"), 3, "GEMINI_API_ENDPOINT",
        {"GEMINI_API_ENDPOINT": "http://127.0.0.1:99999"}),
    Row("endpoint-with-path", ("route", "hi"), 3, "GEMINI_API_ENDPOINT",
        {"GEMINI_API_ENDPOINT": "http://127.0.0.1:8080/v1beta"}),
    Row("endpoint-flag-garbage", ("route", "--endpoint", "not a url", "hi"), 3, "--endpoint"),
    Row("endpoint-unreachable", ("route", "--endpoint", DEAD, "hi"), 4, "cannot reach"),
    # numeric settings: non-numeric, negative, huge
    *[Row(f"{var}-{label}", (cmd, *extra), 3, var, {var: value})
      for var, cmd, extra in (("ROLLING_WINDOW", "route", ("hi",)),
                              ("COOLDOWN_SECS", "route", ("hi",)),
                              ("GEMINI_ROUTER_TIMEOUT", "route", ("hi",)),
                              ("GEMINI_ROUTER_LOCK_TIMEOUT", "stats", ()),
                              ("ROLLING_WINDOW", "stats", ()))
      for label, value in (("text", "lots"), ("negative", "-5"), ("huge", "1e30"),
                           ("nan", "nan"))],
    *[Row(f"timeout-flag-{label}", ("route", "--timeout", value, "hi"), 2, "--timeout")
      for label, value in (("text", "soon"), ("negative", "-5"), ("huge", "1e30"),
                           ("zero", "0"))],
    Row("timeout-flag-before-command", ("--timeout", "-1", "stats"), 2, "--timeout"),
    # prompt and stdin
    Row("empty-prompt", ("route", ""), 2, "empty prompt"),
    Row("whitespace-prompt", ("route", "  \t\n  "), 2, "empty prompt"),
    Row("empty-stdin", ("route",), 2, "empty prompt", stdin=b""),
    Row("whitespace-stdin", ("route", "-"), 2, "empty prompt", stdin=b" \n\t \n"),
    Row("non-utf8-stdin", ("route",), 2, "UTF-8", stdin=b"caf\xe9 \xff\xfe"),
    Row("non-utf8-stdin-dash", ("route", "-"), 2, "UTF-8", stdin=b"\x80\x81\x82"),
    # argv bytes that are not UTF-8 reach Python as lone surrogates (surrogateescape)
    Row("non-utf8-argument", ("route", os.fsdecode(b"caf\xe9 \xff")), 2, "UTF-8"),
    Row("non-utf8-system", ("route", "-s", os.fsdecode(b"\xff\xfe"), "hi"), 2, "UTF-8"),
    Row("non-utf8-key", ("route", "hi"), 3, "GEMINI_API_KEY_1",
        {"GEMINI_API_KEY_1": os.fsdecode(b"AIza\xff\xfe")}),
    # files and options
    Row("missing-attachment", ("route", "-a", "/nonexistent/file.png", "hi"), 2,
        "/nonexistent/file.png"),
    Row("schema-not-json", ("route", "--schema", __file__, "hi"), 2, "schema"),
    Row("option-not-a-number", ("route", "-o", "temperature=hot", "hi"), 2, "temperature"),
    Row("option-unknown", ("route", "-o", "flavour=mint", "hi"), 2, "flavour"),
    Row("wait-not-a-number", ("route", "--wait", "later", "hi"), 2, "--wait"),
    Row("rank-zero-rounds", ("rank", "--rounds", "0"), 2, "--rounds"),
    Row("rank-negative-concurrency", ("rank", "--concurrency", "-1"), 2, "--concurrency"),
    # model names, commands, flags
    Row("unknown-model-lock", ("lock", "no-such-model"), 2, "no-such-model"),
    Row("unknown-model-route", ("route", "-m", "models/no-such-model", "hi"), 2,
        "no-such-model"),
    Row("unknown-model-path", ("lock", "../../etc/passwd"), 2, "../../etc/passwd"),
    Row("unknown-subcommand", ("frobnicate",), 2, "frobnicate"),
    Row("no-subcommand", (), 2, "command"),
    Row("unknown-flag", ("route", "--bogus", "hi"), 2, "--bogus"),
    Row("bad-tier", ("route", "--tier", "ultra", "hi"), 2, "ultra"),
]


def snapshot(state_dir: Path) -> dict[str, tuple[bytes, int]] | None:
    if not state_dir.exists():
        return None
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(state_dir.iterdir())}


def run_row(row: Row, run_main, cli: CLI, json_mode: bool):
    args = ("--json", *row.args) if json_mode else row.args
    if row.stdin is not None:
        return cli(*args, input=row.stdin, env=row.env)
    return run_main(*args, env=row.env)


def assert_one_clean_error(r, code: int, fragment: str) -> None:
    assert r.code == code, (r.code, r.err)
    assert r.out == ""
    assert "Traceback" not in r.err
    assert r.err.startswith("gemini-router: error: ") and r.err.count("\n") == 1, repr(r.err)
    assert fragment in r.err


@pytest.fixture
def warmed(run_main, fake, state_dir):
    """One successful route: state files exist and the model list is cached."""
    assert run_main("route", "warm up").code == 0
    fake.reset_log()
    return state_dir


@pytest.mark.parametrize("json_mode", [False, True], ids=["plain", "json"])
@pytest.mark.parametrize("row", [r.param for r in MATRIX])
def test_hostile_input_on_warm_state(row, json_mode, warmed, run_main, cli, fake):
    before = snapshot(warmed)
    r = run_row(row, run_main, cli, json_mode)
    assert_one_clean_error(r, row.code, row.fragment)
    assert snapshot(warmed) == before                       # nothing written
    assert fake.count(action=("generate", "stream")) == 0


@pytest.mark.parametrize("row", [r.param for r in MATRIX
                                 if not r.id.startswith("unknown-model")])
def test_hostile_input_on_fresh_state_writes_no_state(row, run_main, cli, state_dir, fake):
    r = run_row(row, run_main, cli, json_mode=False)
    assert_one_clean_error(r, row.code, row.fragment)
    files = snapshot(state_dir) or {}
    assert [n for n in files if n.endswith(".json")] == []
    assert fake.count(action=("generate", "stream")) == 0


@pytest.mark.parametrize("args", [("lock", "no-such-model"),
                                  ("route", "-m", "no-such-model", "hi")])
def test_unknown_model_on_fresh_state_only_caches_the_list(args, run_main, state_dir, fake):
    r = run_main(*args)
    assert_one_clean_error(r, 2, "no-such-model")
    assert fake.count(action="list") == 1
    assert fake.count(action=("generate", "stream")) == 0
    router = json.loads((state_dir / "router_state.json").read_text())
    assert router["lock"] is None
    assert not (state_dir / "model_stats.json").exists()


def test_blank_and_duplicate_keys_are_merged(run_main, fake):
    env = {"GEMINI_API_KEY_1": KEYS[0], "GEMINI_API_KEY_2": "   ", "GEMINI_API_KEY_3": KEYS[0],
           "GEMINI_API_KEYS": f" {KEYS[0]} ,, {KEYS[1]} ,{KEYS[1]}", "GEMINI_API_KEY": KEYS[0],
           "GOOGLE_API_KEY": ""}
    fake.set_behaviour("invalid_key", key=KEYS[0])
    r = run_main("route", "--json", "hi", env=env)
    assert r.code == 0, r.err
    # KEYS[1] is the second distinct key: key#2, whatever its repeats and the blanks
    assert r.json()["key"] == "key#2"
    assert fake.count(key=KEYS[0], action=("generate", "list")) == 1
    cooldowns = run_main("cooldowns", "--json", env=env).json()
    assert [(c["key"], c["model"]) for c in cooldowns] == [("key#1", None)]


FIVE_MB = ("lorem ipsum dolor sit amet " * 200_000)[:5 * 1024 * 1024]


def test_five_megabyte_prompt_on_stdin(cli, fake):
    r = cli("route", input=FIVE_MB)
    assert r.code == 0, r.err[:300]
    assert r.err == ""
    assert r.out == f"[gemini-2.5-flash] {FIVE_MB.strip()}\n"
    (call,) = [c for c in fake.calls if c.action == "generate"]
    assert call.body["contents"][0]["parts"][-1]["text"] == FIVE_MB


def test_five_megabyte_prompt_as_argument(run_main, fake):
    r = run_main("route", "--json", FIVE_MB)
    assert r.code == 0, r.err[:300]
    assert r.json()["text"] == f"[gemini-2.5-flash] {FIVE_MB.strip()}"


def test_five_megabyte_prompt_refused_upstream_is_one_line(run_main, fake):
    fake.set_behaviour("bad_request", message="Request payload size exceeds the limit: "
                                              "20971520 bytes.")
    r = run_main("route", FIVE_MB)
    assert_one_clean_error(r, 1, "payload size exceeds the limit")
    assert fake.count(action="generate") == 1           # the request's fault: no failover


# --------------------------------------------------------------------------------------
# upstream weirdness
# --------------------------------------------------------------------------------------

FIRST, SECOND = "gemini-2.5-flash", "gemini-2.0-flash"   # the default route order, fresh state
FAST_TIMEOUT = {"GEMINI_ROUTER_TIMEOUT": "0.5"}

WEIRD = [
    pytest.param("nonjson_error", {}, id="nonjson-error-body"),
    pytest.param("html502", {}, id="html-502"),
    pytest.param("empty200", {}, id="empty-200"),
    pytest.param("no_candidates", {}, id="200-no-candidates"),
    pytest.param("error500", {}, id="json-500"),
    pytest.param("unavailable", {}, id="503"),
    pytest.param("gateway_timeout", {}, id="504"),
    pytest.param("hang", FAST_TIMEOUT, id="hang-timeout"),
]


@pytest.mark.parametrize("behaviour,env", WEIRD)
def test_weird_answer_is_transient_next_key_once_then_next_model(behaviour, env, run_main,
                                                                 fake, state_dir):
    fake.set_behaviour(behaviour, model=FIRST)
    r = run_main("route", "--json", "hello", env=env)
    assert r.code == 0, r.err
    assert r.err == ""
    data = r.json()
    assert [(a["model"], a["key"], a["outcome"]) for a in data["attempts"]] == [
        (FIRST, "key#1", "transient"), (FIRST, "key#2", "transient"), (SECOND, "key#1", "ok")]
    assert (data["model"], data["text"]) == (SECOND, f"[{SECOND}] hello")
    assert fake.count(model=FIRST, action="generate") == 2
    assert fake.count(model=SECOND, action="generate") == 1
    stats = json.loads((state_dir / "model_stats.json").read_text())["models"]
    assert [s["kind"] for s in stats[FIRST]] == ["transient", "transient"]


@pytest.mark.parametrize("behaviour", ["html502", "nonjson_error", "empty200", "no_candidates"])
def test_weird_answer_everywhere_is_exit_4_at_the_budget_two_keys_per_model(behaviour, warmed,
                                                                          run_main, fake):
    """Every model fails: two keys per model in route order (the warm-up took key#1, so this
    route starts at key#2), until the route budget of 8 calls is spent."""
    fake.set_behaviour(behaviour)         # the model list is cached: only generate sees it
    r = run_main("route", "hello")
    assert_one_clean_error(r, 4, "nothing available")
    assert "budget of 8 calls spent" in r.err
    tried = ["gemini-2.5-flash", "gemini-2.0-flash", "gemini-2.5-flash-lite",
             "gemini-2.0-flash-lite"]
    assert [(c.model, c.key) for c in fake.calls if c.action == "generate"] == [
        (model, key) for model in tried for key in (KEYS[1], KEYS[0])]
    assert fake.count(action="generate") == 8


@pytest.mark.parametrize("behaviour", ["stream_break", "stream_truncate"])
def test_broken_stream_under_json_fails_over(behaviour, run_main, fake):
    """With --json nothing reaches stdout before the end, so a stream that breaks midway is
    an ordinary transient failure: next key once, then next model."""
    fake.set_behaviour(behaviour, model=FIRST)
    r = run_main("route", "--stream", "--json", "hello")
    assert r.code == 0, r.err
    assert r.err == ""
    data = r.json()
    assert [(a["model"], a["key"], a["outcome"]) for a in data["attempts"]] == [
        (FIRST, "key#1", "transient"), (FIRST, "key#2", "transient"), (SECOND, "key#1", "ok")]
    assert data["text"] == f"[{SECOND}] hello"


@pytest.mark.parametrize("behaviour", ["stream_break", "stream_truncate"])
def test_broken_stream_after_output_is_one_line_exit_1(behaviour, run_main, fake, state_dir):
    """Text already printed cannot be taken back: the route stops with one error line and
    the sample is recorded as transient."""
    fake.set_behaviour(behaviour, model=FIRST)
    r = run_main("route", "--stream", "hello there world")
    assert r.code == 1
    assert r.out.startswith(f"[{FIRST}]")
    assert "Traceback" not in r.err
    assert r.err.startswith("gemini-router: error: ") and r.err.count("\n") == 1, repr(r.err)
    assert FIRST in r.err
    assert fake.count(action="stream") == 1
    stats = json.loads((state_dir / "model_stats.json").read_text())["models"]
    assert [s["kind"] for s in stats[FIRST]] == ["transient"]


@pytest.mark.parametrize("args", [("route", "hi"), ("route", "--json", "hi"),
                                  ("route", "--stream", "hi"), ("models",), ("rank",),
                                  ("rank", "--json"), ("lock", "gemini-2.5-flash")])
def test_connection_refused_is_exit_4_cannot_reach(args, run_main, fake, state_dir):
    r = run_main(*args, env={"GEMINI_API_ENDPOINT": DEAD})
    assert_one_clean_error(r, 4, f"cannot reach {DEAD}")
    assert not (state_dir / "model_stats.json").exists()
    cooldowns = run_main("cooldowns", "--json", env={"GEMINI_API_ENDPOINT": DEAD})
    assert cooldowns.json() == []       # an unreachable endpoint says nothing about keys


def test_server_gone_after_listing_is_exit_4_cannot_reach(run_main, state_dir):
    with FakeGemini() as short_lived:
        env = {"GEMINI_API_ENDPOINT": short_lived.url}
        assert run_main("route", "hi", env=env).code == 0       # lists and caches
    r = run_main("route", "hi", env=env)                         # now nobody listens
    assert_one_clean_error(r, 4, f"cannot reach {env['GEMINI_API_ENDPOINT']}")
    stats = json.loads((state_dir / "model_stats.json").read_text())["models"]
    assert [s["kind"] for s in stats["gemini-2.5-flash"]] == ["ok"]   # no sample added
    assert run_main("cooldowns", "--json", env=env).json() == []


@pytest.mark.parametrize("behaviour,env", [("hang", FAST_TIMEOUT), ("html502", {}),
                                           ("unavailable", {}), ("error500", {})])
def test_model_listing_weirdness_is_one_line_exit_4(behaviour, env, run_main, fake):
    fake.set_behaviour(behaviour)
    r = run_main("route", "hi", env=env)
    assert_one_clean_error(r, 4, "could not list models")
    assert fake.count(action="list") == 2                 # each key once
    assert "key#1" in r.err and "key#2" in r.err


# --------------------------------------------------------------------------------------
# review fixes: requests the SDK refuses, strict endpoints, non-ASCII digits
# --------------------------------------------------------------------------------------

def nested_schema(levels: int) -> dict:
    """An array schema whose `items` nest `levels` deep around a string."""
    node: dict = {"type": "string"}
    for _ in range(levels):
        node = {"type": "array", "items": node}
    return node


REFUSED_REQUESTS = [   # (route args, schema file content or None, fragment)
    pytest.param(("-o", "top_k=99999999999999999999"), None, "the request cannot be built",
                 id="top-k-beyond-int32"),
    pytest.param(("--schema", "{schema}"),
                 '{"type":"array","minItems":"x","items":{"type":"string"}}',
                 "the request cannot be built", id="schema-min-items-not-a-number"),
    pytest.param(("--schema", "{schema}"), json.dumps(nested_schema(40)), "nests deeper",
                 id="schema-40-levels"),
    pytest.param(("--schema", "{schema}"), "[" * 100_000, "nests too deeply",
                 id="schema-100000-brackets"),
]


@pytest.mark.parametrize("args,schema,fragment", REFUSED_REQUESTS)
def test_request_the_sdk_refuses_is_a_usage_error_before_any_call(args, schema, fragment,
                                                                  warmed, run_main, fake,
                                                                  tmp_path):
    """A value the SDK cannot put in a request is the user's mistake: exit 2 before any
    call, not six 'malformed response' failures blamed on the models (and recorded)."""
    path = tmp_path / "schema.json"
    if schema is not None:
        path.write_text(schema)
    before = snapshot(warmed)
    r = run_main("route", *(a.format(schema=path) for a in args), "hi")
    assert_one_clean_error(r, 2, fragment)
    assert fake.count(action=("generate", "stream")) == 0
    assert snapshot(warmed) == before                 # no sample, strike or cooldown


def test_schema_nested_32_levels_is_still_sent(run_main, fake, tmp_path):
    """The nesting limit refuses only what is deeper than 32 levels."""
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(nested_schema(32)))
    r = run_main("route", "--schema", str(path), "hi")
    assert r.code == 0, r.err
    assert fake.count(action="generate") == 1


BAD_ENDPOINTS = ["https://x?", "https://x#", "http://h:0", "http://h:99999", "http://user@h",
                 "http://h/path", "127.0.0.1:8765"]


@pytest.mark.parametrize("endpoint", BAD_ENDPOINTS)
@pytest.mark.parametrize("via", ["env", "flag"])
def test_endpoint_that_is_not_scheme_host_port_is_a_config_error(endpoint, via, warmed,
                                                                 run_main, fake):
    before = snapshot(warmed)
    if via == "env":
        r = run_main("route", "hi", env={"GEMINI_API_ENDPOINT": endpoint})
    else:
        r = run_main("route", "--endpoint", endpoint, "hi")
    assert_one_clean_error(r, 3, "GEMINI_API_ENDPOINT" if via == "env" else "--endpoint")
    assert repr(endpoint) in r.err
    assert snapshot(warmed) == before
    assert fake.count() == 0


def test_upper_case_scheme_is_accepted_and_normalised(run_main, fake, state_dir):
    shouted = fake.url.replace("http://", "HTTP://")
    r = run_main("route", "--json", "hi", env={"GEMINI_API_ENDPOINT": shouted})
    assert r.code == 0, r.err
    assert r.json()["text"] == f"[{FIRST}] hi"
    router = json.loads((state_dir / "router_state.json").read_text())
    assert router["model_list"]["endpoint"] == fake.url      # cached under the normal form


def test_key_variable_with_a_non_ascii_digit_is_not_a_numbered_key(run_main, fake):
    r = run_main("route", "hi", env={**NO_KEYS, "GEMINI_API_KEY_²": KEYS[2]})
    assert_one_clean_error(r, 3, "no API key")
    assert fake.count() == 0


def test_key_variable_with_a_non_ascii_digit_is_ignored_beside_real_keys(run_main, fake):
    r = run_main("route", "--json", "hi", env={"GEMINI_API_KEY_²": KEYS[2]})
    assert r.code == 0, r.err
    assert (r.json()["key"], r.err) == ("key#1", "")
    assert fake.count(key=KEYS[2]) == 0
    assert fake.count(key=KEYS[0], action="generate") == 1


def test_clearing_a_key_numbered_with_a_non_ascii_digit_is_a_usage_error(run_main):
    r = run_main("cooldowns", "--clear", "key#²")
    assert_one_clean_error(r, 2, "key#²: no such key")
