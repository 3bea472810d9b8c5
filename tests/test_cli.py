"""The command line a user meets (issue "A CLI people enjoy").

Proves, by reading the request bodies the fake Gemini server received:
  * the prompt: argument, stdin, both with `-a -` (stdin first), -s system instruction, -a text and
    image attachments as inline data with the right mime type;
  * model choice: -m (with `?key=value` options), --tier fast|quality|balance after a rank;
  * generation options: every -o key (seed too, which the pinned SDK lacks) lands in
    generationConfig; unknown or ill-typed keys are usage errors listing the valid keys;
    --schema sends responseSchema;
  * --stream: text as it arrives, failover before any text, a clear failure (recorded) after;
  * route --dry-run: the choice and its reasons (lock, tier order, skipped cooldowns) with
    no generate call;
  * models: limits and probed / cooling / locked, --refresh relists;
  * output: aligned tables, no progress bar unless stderr is a terminal (NO_COLOR keeps it),
    -q silences warnings, -v shows the choice and every attempt.
Round-robin spread, lock exclusivity and "--json on every command" are in test_core.py.
"""
from __future__ import annotations

import base64
import copy
import fcntl
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios

import pytest

from conftest import CLI, KEYS, ROOT
from fake_gemini import DEFAULT_MODELS, FakeGemini, make_models

DEFAULT_MODEL = "gemini-2.5-flash"
VALID_OPTIONS = ["temperature", "top_p", "top_k", "max_output_tokens", "stop",
                 "candidate_count", "response_mime_type", "presence_penalty",
                 "frequency_penalty", "seed"]
SCHEMA_TYPES = {1: "STRING", 2: "NUMBER", 3: "INTEGER", 4: "BOOLEAN", 5: "ARRAY", 6: "OBJECT"}


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

def last_generate(fake):
    calls = [c for c in fake.calls if c.action in ("generate", "stream")]
    assert calls, "no generate call reached the server"
    return calls[-1]


def parts_of(body) -> list[dict]:
    [content] = body["contents"]
    assert content["role"] == "user"
    return content["parts"]


def route_ok(run_main, *args, **kw):
    r = run_main("route", *args, **kw)
    assert r.code == 0, r.err
    return r


def usage_error(r) -> str:
    assert r.code == 2, (r.code, r.err)
    assert r.out == "" and "Traceback" not in r.err
    return r.err


def schema_types(node):
    """Schema enum values as names whatever the wire encoding (ints with enum-encoding=int)."""
    if isinstance(node, dict):
        return {k: (SCHEMA_TYPES.get(v, v) if k == "type" else schema_types(v))
                for k, v in node.items()}
    return node


def assert_aligned(table: str) -> None:
    """Every cell starts under its header (left-aligned) or ends under it (right-aligned)."""
    lines = [line for line in table.splitlines() if line.strip()]
    header = lines[0]
    spans = [m.span() for m in re.finditer(r"\S+(?: \S+)*", header)]
    assert len(spans) >= 3, header
    for line in lines[1:]:
        cells = [m.span() for m in re.finditer(r"\S+(?: \S+)*", line)]
        assert 1 <= len(cells) <= len(spans), line
        for (cs, ce), (hs, he) in zip(cells, spans):
            assert cs == hs or ce == he, f"misaligned cell {line[cs:ce]!r} in:\n{table}"


# --------------------------------------------------------------------------------------
# 1. the prompt
# --------------------------------------------------------------------------------------

def test_prompt_from_the_argument(run_main, fake):
    r = route_ok(run_main, "plain argument")
    assert r.out == f"[{DEFAULT_MODEL}] plain argument\n"
    assert parts_of(last_generate(fake).body) == [{"text": "plain argument"}]


def test_prompt_from_stdin_and_argument_stdin_first(cli, fake):
    """With an argument, stdin is read only when asked for with `-a -` (issue 13)."""
    r = cli("route", "and the question", "-a", "-", input="the context from stdin\n")
    assert r.code == 0, r.err
    [part] = parts_of(last_generate(fake).body)
    text = part["text"]
    assert text.startswith("the context from stdin")
    assert text.endswith("and the question")
    assert r.out == f"[{DEFAULT_MODEL}] {text}\n"


@pytest.mark.parametrize("stdin", [None, "", "   \n"])
def test_empty_prompt_is_a_usage_error(cli, fake, stdin):
    usage_error(cli("route", input=stdin))
    assert fake.count(action="generate") == 0


def test_system_instruction_is_sent(run_main, fake):
    route_ok(run_main, "-s", "Answer in French.", "hello")
    body = last_generate(fake).body
    assert body["systemInstruction"]["parts"] == [{"text": "Answer in French."}]
    assert parts_of(body) == [{"text": "hello"}]


@pytest.mark.parametrize("filename, data, mime", [
    ("pixel.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR fake image bytes", "image/png"),
    ("photo.jpg", b"\xff\xd8\xff\xe0 fake jpeg", "image/jpeg"),
    ("notes.txt", "some notes, ünïcode\n".encode(), "text/plain"),
])
def test_attachment_is_inline_data_with_its_mime_type(run_main, fake, tmp_path,
                                                      filename, data, mime):
    path = tmp_path / filename
    path.write_bytes(data)
    route_ok(run_main, "-a", str(path), "describe this")
    parts = parts_of(last_generate(fake).body)
    inline = [p["inlineData"] for p in parts if "inlineData" in p]
    assert inline == [{"mimeType": mime, "data": base64.b64encode(data).decode()}]
    assert {"text": "describe this"} in parts


def test_two_attachments_keep_their_order(run_main, fake, tmp_path):
    (tmp_path / "a.png").write_bytes(b"PNGDATA")
    (tmp_path / "b.txt").write_text("text")
    route_ok(run_main, "-a", str(tmp_path / "a.png"), "-a", str(tmp_path / "b.txt"), "q")
    mimes = [p["inlineData"]["mimeType"] for p in parts_of(last_generate(fake).body)
             if "inlineData" in p]
    assert mimes == ["image/png", "text/plain"]


def test_missing_attachment_is_a_usage_error(run_main, fake, tmp_path):
    err = usage_error(run_main("route", "-a", str(tmp_path / "nope.png"), "q"))
    assert "nope.png" in err
    assert fake.count(action="generate") == 0


# --------------------------------------------------------------------------------------
# 2. model choice
# --------------------------------------------------------------------------------------

def test_model_flag_routes_to_that_model(run_main, fake):
    r = route_ok(run_main, "-m", "gemma-3-27b-it", "hi")
    assert r.out == "[gemma-3-27b-it] hi\n"
    assert last_generate(fake).model == "gemma-3-27b-it"
    assert fake.count(action="generate") == 1


def test_unknown_model_flag_is_a_usage_error(run_main, fake):
    err = usage_error(run_main("route", "-m", "gemini-9-ultra", "hi"))
    assert "gemini-9-ultra" in err
    assert fake.count(action="generate") == 0


def test_model_string_carries_generation_options(run_main, fake):
    route_ok(run_main, "-m", "gemini-2.5-flash?temperature=0.3&max_output_tokens=200", "hi")
    call = last_generate(fake)
    assert call.model == "gemini-2.5-flash"
    assert call.body["generationConfig"] == {"temperature": pytest.approx(0.3),
                                             "maxOutputTokens": 200}


def test_model_string_option_is_validated(run_main, fake):
    err = usage_error(run_main("route", "-m", "gemini-2.5-flash?warmth=3", "hi"))
    assert "warmth" in err
    assert fake.count(action="generate") == 0


def _model(name: str, out_limit: int) -> dict:
    entry = copy.deepcopy(DEFAULT_MODELS[1])
    entry.update(name=f"models/{name}", displayName=name, outputTokenLimit=out_limit)
    return entry


@pytest.fixture(scope="module")
def ranked_state(tmp_path_factory):
    """A fake with three models, ranked once (3 rounds); each is best in one tier:
    gemini-quick   fastest, but 2 of 3 probes fail          -> Fast
    gemini-large   biggest output limit, slow, 2 of 3 fail   -> Quality
    gemini-steady  always answers, mid speed and size         -> Balance"""
    models = [_model("gemini-quick", 8192), _model("gemini-large", 1_000_000),
              _model("gemini-steady", 65536)]
    with FakeGemini(models=models) as server:
        server.set_latency(0.3, model="gemini-large")
        server.set_latency(0.1, model="gemini-steady")
        server.set_behaviour("error500", model="gemini-quick", times=2)
        server.set_behaviour("error500", model="gemini-large", times=2)
        ranked = tmp_path_factory.mktemp("ranked")
        r = CLI(server, ranked, KEYS[:2])("rank", "--rounds", "3", "--json")
        assert r.code == 0, r.err
        yield server, ranked


@pytest.fixture
def tiered(ranked_state, state_dir):
    """A CLI on a private copy of the ranked state."""
    server, ranked = ranked_state
    shutil.copytree(ranked, state_dir)
    server.reset_log()
    return CLI(server, state_dir, KEYS[:2])


@pytest.mark.parametrize("tier, expected", [("fast", "gemini-quick"),
                                            ("quality", "gemini-large"),
                                            ("balance", "gemini-steady")])
def test_tier_picks_the_best_model_of_that_tier(tiered, tier, expected):
    r = tiered("route", "--tier", tier, "--json", "hi")
    assert r.code == 0, r.err
    assert r.json()["model"] == expected
    assert [c.model for c in tiered.fake.calls if c.action == "generate"] == [expected]


def test_default_route_follows_the_balance_tier(tiered):
    r = tiered("route", "--json", "hi")
    assert r.code == 0, r.err
    assert r.json()["model"] == "gemini-steady"


# --------------------------------------------------------------------------------------
# 3. generation options
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, config", [
    (["temperature=0.5"], {"temperature": 0.5}),
    (["top_p=0.9"], {"topP": 0.9}),
    (["top_k=40"], {"topK": 40}),
    (["max_output_tokens=50"], {"maxOutputTokens": 50}),
    (["stop=END"], {"stopSequences": ["END"]}),
    (["stop=END", "stop=###"], {"stopSequences": ["END", "###"]}),
    (["candidate_count=1"], {"candidateCount": 1}),
    (["response_mime_type=text/plain"], {"responseMimeType": "text/plain"}),
    (["presence_penalty=0.5"], {"presencePenalty": 0.5}),
    (["frequency_penalty=-0.25"], {"frequencyPenalty": -0.25}),
    (["seed=42"], {"seed": 42}),
    (["seed=7", "temperature=0.2"], {"seed": 7, "temperature": 0.2}),
], ids=lambda v: ",".join(v) if isinstance(v, list) else "")
def test_generation_option_reaches_the_request(run_main, fake, options, config):
    args = [a for o in options for a in ("-o", o)]
    route_ok(run_main, *args, "hi")
    sent = last_generate(fake).body["generationConfig"]
    assert sent == {k: pytest.approx(v) if isinstance(v, float) else v
                    for k, v in config.items()}


def test_max_output_tokens_cuts_the_answer_and_says_why(run_main, fake):
    r = route_ok(run_main, "-o", "max_output_tokens=2", "one two three four")
    assert r.out == f"[{DEFAULT_MODEL}] one\n"
    assert "MAX_TOKENS" in r.err


def test_seed_travels_with_every_attempt_and_the_stream(run_main, fake):
    # The pinned SDK's GenerationConfig has no seed: it is added to the JSON body on the
    # wire, for each attempt (here after a 429 on key#1) and for streamed calls alike.
    fake.set_behaviour("rate_minute", key=KEYS[0], times=1)
    route_ok(run_main, "-o", "seed=5", "hi")
    route_ok(run_main, "--stream", "-m", "gemini-2.0-flash?seed=9", "hi")
    sent = [(c.action, c.body["generationConfig"]) for c in fake.calls
            if c.action in ("generate", "stream")]
    assert sent == [("generate", {"seed": 5}), ("generate", {"seed": 5}),
                    ("stream", {"seed": 9})]
    assert all("x-gemini-router" not in str(c.body) for c in fake.calls)


@pytest.mark.parametrize("option", ["warmth=3", "top_k=abc", "temperature=hot",
                                    "max_output_tokens=1.5", "temperature", "seed=1.5",
                                    "temperature=nan", "top_p=inf"])
def test_bad_option_is_a_usage_error_listing_the_valid_ones(run_main, fake, option):
    err = usage_error(run_main("route", "-o", option, "hi"))
    assert option.split("=")[0] in err
    assert all(name in err for name in VALID_OPTIONS), err
    assert fake.count(action="generate") == 0


def test_schema_asks_for_json_with_a_response_schema(run_main, fake, tmp_path):
    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "tags": {"type": "array",
                                                        "items": {"type": "string"}}},
              "required": ["name"]}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    r = route_ok(run_main, "--schema", str(tmp_path / "schema.json"), "who")
    config = last_generate(fake).body["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    assert schema_types(config["responseSchema"]) == {
        "type": "OBJECT", "required": ["name"],
        "properties": {"name": {"type": "STRING"},
                       "tags": {"type": "ARRAY", "items": {"type": "STRING"}}}}
    assert json.loads(r.out) == {"model": DEFAULT_MODEL, "echo": "who"}


@pytest.mark.parametrize("content", ["{not json", '{"type": "thing"}', "[1, 2]"])
def test_bad_schema_is_a_usage_error(run_main, fake, tmp_path, content):
    (tmp_path / "s.json").write_text(content)
    usage_error(run_main("route", "--schema", str(tmp_path / "s.json"), "q"))
    assert fake.count(action="generate") == 0


# --------------------------------------------------------------------------------------
# 4. --stream
# --------------------------------------------------------------------------------------

def test_stream_prints_the_answer(run_main, fake):
    r = route_ok(run_main, "--stream", "one two three four five")
    assert r.out == f"[{DEFAULT_MODEL}] one two three four five\n"
    assert (fake.count(action="stream"), fake.count(action="generate")) == (1, 0)


def test_stream_json_is_one_document(run_main, fake):
    r = route_ok(run_main, "--stream", "--json", "one two three")
    data = r.json()
    assert (data["text"], data["finish_reason"]) == (f"[{DEFAULT_MODEL}] one two three", "STOP")
    assert fake.count(action=("generate", "stream")) == 1


@pytest.mark.parametrize("behaviour", ["unavailable", "rate_minute", "invalid_key"])
def test_stream_failure_before_text_moves_to_the_next_key(run_main, fake, behaviour):
    fake.set_behaviour(behaviour, key=KEYS[0], model=DEFAULT_MODEL)
    r = route_ok(run_main, "--stream", "hello there")
    assert r.out == f"[{DEFAULT_MODEL}] hello there\n"
    assert [c.key for c in fake.calls if c.action == "stream"] == [KEYS[0], KEYS[1]]


@pytest.mark.parametrize("behaviour", ["stream_break", "stream_truncate"])
def test_stream_failure_after_text_is_a_clear_error_and_recorded(run_main, fake, state_dir,
                                                                behaviour):
    fake.set_behaviour(behaviour)
    r = run_main("route", "--stream", "one two three four five six")
    assert r.code == 1, r.err
    assert r.out.startswith(f"[{DEFAULT_MODEL}]")
    assert r.out.strip() != f"[{DEFAULT_MODEL}] one two three four five six"
    assert r.out.endswith("\n")             # the partial line is ended: the error stands alone
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gemini-router: error: ")
    assert "stream" in lines[0] and "Traceback" not in r.err
    assert re.search(r"incomplete|partial|after output began", lines[0]), lines[0]
    assert fake.count(action="stream") == 1                   # printed text: no second try
    samples = json.loads((state_dir / "model_stats.json").read_text())["models"]
    assert [(s["ok"], s["kind"]) for s in samples[DEFAULT_MODEL]] == [(False, "transient")]


# --------------------------------------------------------------------------------------
# 5. --dry-run
# --------------------------------------------------------------------------------------

def test_dry_run_calls_nothing_and_names_the_choice(run_main, fake):
    assert run_main("models").code == 0                     # a cached model list
    fake.reset_log()
    r = route_ok(run_main, "--dry-run", "hi")
    assert f"{DEFAULT_MODEL} with key#1" in r.out
    data = route_ok(run_main, "--dry-run", "--json", "hi").json()
    assert (data["model"], data["key"]) == (DEFAULT_MODEL, "key#1")
    assert data["order"][0] == DEFAULT_MODEL
    assert "default" in data["why"] or "balance" in data["why"]
    assert fake.calls == []


def test_dry_run_predicts_the_next_route(run_main, fake):
    route_ok(run_main, "warm up")
    plan = route_ok(run_main, "--dry-run", "--json", "hi").json()
    real = route_ok(run_main, "--json", "hi").json()
    assert (plan["model"], plan["key"]) == (real["model"], real["key"]) == \
        (DEFAULT_MODEL, "key#2")


def test_dry_run_on_fresh_state_stays_offline_and_guesses_nothing(state_dir):
    """Without a cached model list the dry run cannot know the models: it says so, calls
    nothing at all (not even the list), and names no model."""
    with FakeGemini(models=make_models(4)) as server:
        cli = CLI(server, state_dir, KEYS[:2])
        plan = cli("route", "--dry-run", "--json", "hi")
        assert plan.code == 0, plan.err
        assert len(server.calls) == 0
        assert (plan.json()["model"], plan.json()["key"]) == (None, None)
        assert plan.json()["model_list"] == "not cached"
        human = cli("route", "--dry-run", "hi")
        assert human.out.startswith("would use: unknown (no cached model list")
        assert len(server.calls) == 0


def test_dry_run_explains_a_lock(run_main, fake):
    assert run_main("lock", "gemini-2.0-flash-lite").code == 0
    fake.reset_log()
    data = route_ok(run_main, "--dry-run", "--json", "hi").json()
    assert data["model"] == "gemini-2.0-flash-lite"
    assert data["order"] == ["gemini-2.0-flash-lite"]
    assert "lock" in data["why"]
    assert "lock" in route_ok(run_main, "--dry-run", "hi").out
    assert fake.count(action=("generate", "stream")) == 0


def test_dry_run_lists_skipped_cooldowns(run_main, fake):
    fake.set_behaviour("rate_minute", key=KEYS[0], model=DEFAULT_MODEL)
    route_ok(run_main, "hi")                         # key#1 cools down on the default model
    fake.reset_log()
    data = route_ok(run_main, "--dry-run", "--json", "hi").json()
    assert (data["model"], data["key"]) == (DEFAULT_MODEL, "key#2")
    assert [s["target"] for s in data["skipped"]] == [f"key#1 on {DEFAULT_MODEL}"]
    assert "rate" in data["skipped"][0]["reason"]
    human = route_ok(run_main, "--dry-run", "hi").out
    assert "skipped" in human and "key#1" in human
    assert fake.count(action=("generate", "stream")) == 0


def test_dry_run_explains_the_tier_order(tiered):
    r = tiered("route", "--dry-run", "--tier", "fast", "--json", "hi")
    assert r.code == 0, r.err
    data = r.json()
    assert data["model"] == "gemini-quick"
    assert "fast" in data["why"]
    assert data["order"][0] == "gemini-quick"
    assert tiered.fake.count(action=("generate", "stream")) == 0


# --------------------------------------------------------------------------------------
# 6. models
# --------------------------------------------------------------------------------------

TEXT_MODELS = {m["name"][len("models/"):]: m for m in DEFAULT_MODELS[:6]}


def test_models_lists_text_models_with_limits_and_status(run_main, fake):
    route_ok(run_main, "hi")                                              # probes the default
    assert run_main("lock", "gemini-2.0-flash").code == 0
    fake.set_behaviour("not_found", model="gemini-2.0-flash-lite")
    fake.reset_log()
    # 404 on each key while the live list still has it: each pair cools 24 h, no sample
    r = run_main("route", "-m", "gemini-2.0-flash-lite", "hi")
    assert r.code == 4, r.err
    assert fake.count(model="gemini-2.0-flash-lite", action="generate") == 2
    assert fake.count(model="gemini-2.0-flash-lite", action="get") == 2
    data = run_main("models", "--json").json()
    assert set(data) == set(TEXT_MODELS)
    for name, entry in TEXT_MODELS.items():
        assert (data[name]["input_limit"], data[name]["output_limit"]) == \
            (entry["inputTokenLimit"], entry["outputTokenLimit"])
    status = {name: (d["probed"], d["cooling"], d["locked"]) for name, d in data.items()}
    assert status[DEFAULT_MODEL] == (True, False, False)
    assert status["gemini-2.0-flash"] == (False, False, True)
    assert status["gemini-2.0-flash-lite"] == (False, True, False)    # a 404 is no sample
    assert data["gemini-2.0-flash-lite"]["cooling_keys"] == ["key#1", "key#2"]
    assert status["gemini-2.5-pro"] == (False, False, False)


def test_models_shows_which_keys_are_cooling(run_main, fake):
    model = "gemini-2.5-pro"
    fake.set_behaviour("rate_minute", key=KEYS[0], model=model, retry_delay="40s")
    route_ok(run_main, "-m", model, "hi")                 # key#1 429s, key#2 answers
    data = run_main("models", "--json").json()
    assert (data[model]["cooling"], data[model]["cooling_keys"]) == (False, ["key#1"])
    line = next(l for l in run_main("models").out.splitlines() if l.startswith(model + " "))
    assert re.search(r"cooling on key#1, (3[5-9]|40) s$", line.rstrip()), line
    fake.set_behaviour("rate_minute", key=KEYS[1], model=model, retry_delay="30s")
    assert run_main("route", "-m", model, "hi").code == 4   # now both keys are limited
    data = run_main("models", "--json").json()
    assert (data[model]["cooling"], data[model]["cooling_keys"]) == (True, ["key#1", "key#2"])
    line = next(l for l in run_main("models").out.splitlines() if l.startswith(model + " "))
    assert re.search(r"cooling \(every key, (2[5-9]|30) s\)$", line.rstrip()), line


def test_models_table_is_aligned(run_main, fake):
    assert run_main("lock", "gemini-2.0-flash").code == 0
    r = run_main("models")
    assert r.code == 0, r.err
    table = r.out.split("\n\n")[0]
    assert table.splitlines()[0].split()[:1] == ["MODEL"]
    assert len(table.splitlines()) == 1 + len(TEXT_MODELS)
    assert_aligned(table)
    [locked] = [line for line in table.splitlines() if line.startswith("gemini-2.0-flash ")]
    assert "locked" in locked and "65536" not in locked and "8192" in locked


def test_models_uses_the_cache_and_refresh_relists(run_main, fake):
    assert run_main("models").code == 0
    assert run_main("models").code == 0
    assert fake.count(action="list") == 1
    assert run_main("models", "--refresh").code == 0
    assert fake.count(action="list") == 2


# --------------------------------------------------------------------------------------
# 7. output
# --------------------------------------------------------------------------------------

def test_stats_and_cooldowns_tables_are_aligned(run_main, fake):
    fake.set_behaviour("rate_minute", key=KEYS[0], model=DEFAULT_MODEL)
    fake.set_behaviour("invalid_key", key=KEYS[2])
    for _ in range(3):
        route_ok(run_main, "hi", keys=KEYS)
    route_ok(run_main, "-m", "gemma-3-27b-it", "hi", keys=KEYS)
    for command in ("stats", "cooldowns", "tiers"):
        r = run_main(command, keys=KEYS)
        assert r.code == 0, r.err
        table = r.out.split("\n\n")[0]
        assert len(table.splitlines()) >= 3, table
        assert_aligned(table)


def run_with_stderr_on_a_terminal(cli, *args, env=None) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal; return (exit code, stderr text)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    full = dict(cli.env)
    full.update(env or {})
    proc = subprocess.Popen([sys.executable, str(ROOT / "gemini_router.py"), *args],
                            env=full, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=slave, cwd=str(ROOT))
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode("utf-8", "replace")


def test_progress_shows_only_on_a_terminal_whatever_no_color(cli, fake):
    """NO_COLOR turns off colour only, not the progress bar (issue 13); -q and a
    non-terminal stderr do."""
    fake.set_latency(0.05)
    code, err = run_with_stderr_on_a_terminal(cli, "rank")
    assert code == 0
    assert "\rprobing:" in err
    code, err = run_with_stderr_on_a_terminal(cli, "rank", env={"NO_COLOR": "1"})
    assert code == 0
    assert "\rprobing:" in err
    code, err = run_with_stderr_on_a_terminal(cli, "-q", "rank")
    assert code == 0
    assert "probing" not in err and "\r" not in err.replace("\r\n", "\n")
    r = cli("rank")                                   # stderr is a pipe
    assert r.code == 0, r.err
    assert "probing" not in r.err and "\r" not in r.err


def test_quiet_silences_warnings(run_main, fake):
    fake.set_behaviour("invalid_key", key=KEYS[0])
    r = route_ok(run_main, "-q", "hi")
    assert (r.out, r.err) == (f"[{DEFAULT_MODEL}] hi\n", "")
    fake.set_behaviour("invalid_key", key=KEYS[1])
    r = run_main("route", "hi", keys=KEYS[1:])
    assert "key#1 disabled" in r.err                  # the same warning without -q


def test_quiet_still_shows_errors(run_main, fake):
    fake.set_behaviour("bad_request")
    r = run_main("route", "-q", "hi")
    assert r.code == 1
    assert r.err.startswith("gemini-router: error: ")


def test_verbose_shows_the_choice_and_every_attempt(run_main, fake):
    fake.set_behaviour("rate_minute", key=KEYS[0], model=DEFAULT_MODEL)
    r = route_ok(run_main, "-v", "hi")
    assert r.out == f"[{DEFAULT_MODEL}] hi\n"
    lines = r.err.splitlines()
    assert any("default" in line and DEFAULT_MODEL in line for line in lines)   # the choice
    # every attempt, its outcome in words (never a raw class name such as rate_limited)
    assert any(f"{DEFAULT_MODEL} key#1: rate limited: " in line for line in lines)
    assert any(f"{DEFAULT_MODEL} key#2: answered in " in line for line in lines)
    assert "rate_limited" not in r.err
    quiet = route_ok(run_main, "hi")
    assert quiet.err == ""


def test_version_flag(run_main):
    import gemini_router
    r = run_main("--version")
    assert (r.code, r.out.strip()) == (0, f"gemini-router {gemini_router.__version__}")


# --------------------------------------------------------------------------------------
# review fixes: our own output failing is not the upstream's fault
# --------------------------------------------------------------------------------------

def run_with_stdout(cli, stdout, *args) -> subprocess.CompletedProcess:
    """The CLI as a subprocess whose stdout is `stdout` (a file object), stderr captured."""
    return subprocess.run([sys.executable, str(ROOT / "gemini_router.py"), *args],
                          env=cli.env, cwd=str(ROOT), stdin=subprocess.DEVNULL,
                          stdout=stdout, stderr=subprocess.PIPE, timeout=60)


def recorded_failures(cli) -> tuple[list, dict, list]:
    """(non-ok samples, strikes, cooldowns) in state, whichever files exist."""
    files = {name: cli.state_dir / f for name, f in (("stats", "model_stats.json"),
                                                      ("router", "router_state.json"),
                                                      ("cooldowns", "cooldowns.json"))}
    docs = {n: json.loads(p.read_text()) if p.exists() else {} for n, p in files.items()}
    bad = [(m, s["kind"]) for m, ss in docs["stats"].get("models", {}).items()
           for s in ss if not s["ok"]]
    return bad, docs["router"].get("strikes", {}), docs["cooldowns"].get("cooldowns", [])


def test_stream_reader_going_away_is_not_blamed_on_the_model(cli, fake):
    fake.set_behaviour("ok", chunk_gap=0.3)          # time for the reader to leave
    proc = subprocess.Popen([sys.executable, str(ROOT / "gemini_router.py"), "route",
                             "--stream", "one two three four five six"],
                            env=cli.env, cwd=str(ROOT), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.read(5)
    proc.stdout.close()                              # like `| head -c 5`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert first == f"[{DEFAULT_MODEL}]".encode()[:5]
    assert err == ""                                 # no traceback, no error line
    assert fake.count(action=("generate", "stream")) == 1
    assert recorded_failures(cli) == ([], {}, [])


needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")


@needs_dev_full
@pytest.mark.parametrize("args, generate_calls", [(("route", "hi"), 1),
                                                  (("route", "--stream", "hi"), 1),
                                                  (("stats", "--json"), 0)],
                         ids=["route", "route-stream", "stats-json"])
def test_full_disk_on_stdout_is_one_line_exit_1(cli, fake, args, generate_calls):
    with open("/dev/full", "w") as full:
        proc = run_with_stdout(cli, full, *args)
    assert proc.returncode == 1
    assert proc.stderr.decode() == \
        "gemini-router: error: cannot write output: No space left on device\n"
    assert fake.count(action=("generate", "stream")) == generate_calls
    assert recorded_failures(cli) == ([], {}, [])
