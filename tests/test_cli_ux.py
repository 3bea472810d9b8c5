"""A CLI that never leaves a user guessing (issue 13).

What this file proves, each against the real CLI (subprocess or `main`) and the simulator:
  1. waiting out loud: `route --wait "hello"` routes "hello" (a value is taken only when it is
     a number); --wait says what it waits for and how long - one plain line when stderr is a
     pipe, a countdown rewritten in place on a terminal, nothing under -q - and when --wait is
     shorter than the earliest recovery the error says so; the slow-attempt hooks
     (`Output.attempt_started` / `attempt_finished`) draw "waiting for MODEL on key#N" on a
     terminal after 2 s, once a second, erased at the end, and say it once under -v elsewhere;
  2. stdin only when asked: a parent that never closes stdin does not hang a route with an
     argument, a `while read` loop routes every line, `-a -` reads stdin (text before the
     argument, or an image attached);
  3. typos: "did you mean" for commands, options and choices, one line, exit 2; bare
     `gemini-router` prints the help on a terminal (exit 2) and one line elsewhere; --help has
     examples and the environment;
  4. re-locking names the previous lock, on stdout and in --json ("was");
  5. readable output: UNTIL shows the date and zone beyond today, one precision per numeric
     column, hints on stderr, GEMINI_ROUTER_ERRORS=json errors;
  6. local commands import neither difflib, threading nor pty.
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest

from conftest import KEYS, ROOT, base_env

import gemini_router as gr

FLASH = "gemini-2.5-flash"
CLEAR = "\r\x1b[K"
ROUTER = str(ROOT / "gemini_router.py")


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

def one_error_line(r, code: int) -> str:
    """The single stderr line of a failed command (stdout empty), without its newline."""
    assert r.code == code, (r.code, r.err)
    assert r.out == ""
    assert r.err.endswith("\n") and r.err.count("\n") == 1, repr(r.err)
    assert "Traceback" not in r.err
    return r.err[:-1]


def generated_prompts(fake) -> list[str]:
    return [c.body["contents"][0]["parts"][-1]["text"] for c in fake.calls
            if c.action in ("generate", "stream")]


def open_terminal(columns: int = 200) -> tuple[int, int]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    return master, slave


def drain(master: int) -> bytes:
    """Everything the terminal received, until its other end is closed."""
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def run_on_terminal(cli, *args: str, stream: str = "stderr",
                    env: dict[str, str] | None = None) -> tuple[int, bytes, bytes]:
    """Run the CLI with `stream` ("stdout" or "stderr") on a pseudo-terminal and the other
    on a pipe; return (exit code, stdout bytes, stderr bytes)."""
    master, slave = open_terminal()
    pipe = subprocess.PIPE
    proc = subprocess.Popen([sys.executable, ROUTER, *args], env={**cli.env, **(env or {})},
                            cwd=str(ROOT), stdin=subprocess.DEVNULL,
                            stdout=slave if stream == "stdout" else pipe,
                            stderr=slave if stream == "stderr" else pipe)
    os.close(slave)
    on_terminal = drain(master)
    os.close(master)
    piped = (proc.stdout if stream == "stderr" else proc.stderr).read()
    code = proc.wait(timeout=60)
    (proc.stdout or proc.stderr).close()
    if stream == "stdout":
        return code, on_terminal, piped
    return code, piped, on_terminal


class Terminal:
    """A pseudo-terminal for in-process Output tests: `stream` (to put in place of
    sys.stderr inside the test) and what it has received so far."""

    def __init__(self) -> None:
        self.master, slave = open_terminal()
        self.stream = open(slave, "w", encoding="utf-8")

    def received(self) -> str:
        chunks = []
        while select.select([self.master], [], [], 0.2)[0]:
            chunks.append(os.read(self.master, 65536))
        return b"".join(chunks).decode()

    def close(self) -> None:
        self.stream.close()
        os.close(self.master)


@pytest.fixture
def terminal():
    term = Terminal()
    try:
        yield term
    finally:
        term.close()


# --------------------------------------------------------------------------------------
# 1. waiting out loud
# --------------------------------------------------------------------------------------

def test_wait_does_not_swallow_the_prompt(run_main, fake):
    r = run_main("route", "--wait", "hello")
    assert (r.code, r.out, r.err) == (0, f"[{FLASH}] hello\n", "")
    assert generated_prompts(fake) == ["hello"]


@pytest.mark.parametrize("args, prompt", [
    (("--wait", "30", "hello"), "hello"),            # a number is --wait's value
    (("--wait", "-m", FLASH, "hello"), "hello"),     # bare, before another option
    (("hello", "--wait"), "hello"),                  # bare, last
    (("--wait", "--", "42"), "42"),                  # '--': a number as the prompt
])
def test_wait_takes_a_value_only_when_it_is_a_number(run_main, fake, args, prompt):
    r = run_main("route", *args)
    assert (r.code, r.out) == (0, f"[{FLASH}] {prompt}\n"), r.err
    assert generated_prompts(fake) == [prompt]


def test_wait_help_says_what_a_bare_wait_waits_for(run_main):
    r = run_main("route", "--help")
    assert r.code == 0
    text = " ".join(r.out.split())
    assert "--wait [SECONDS] when nothing is available, wait for the earliest recovery" in text
    assert "bare --wait at most 7 days" in text


def test_wait_says_once_what_it_waits_for_when_stderr_is_not_a_terminal(run_main, fake):
    fake.set_behaviour("rate_minute", model=FLASH, retry_delay="1s", times=2)
    began = time.monotonic()
    r = run_main("route", "-m", FLASH, "--wait", "hello")
    assert (r.code, r.out) == (0, f"[{FLASH}] hello\n"), r.err
    assert time.monotonic() - began >= 0.9
    assert fake.count(model=FLASH, action="generate") == 3      # two 429s, then the answer
    [line] = r.err.splitlines()
    assert re.fullmatch(r"gemini-router: nothing available.*earliest: key#\d on "
                        r"gemini-2\.5-flash in 1 s; waiting 1 s \(until "
                        r"(\d\d:\d\d:\d\d|\d{4}-\d\d-\d\d \d\d:\d\d \S+)\), then trying again",
                        line), line
    assert "\r" not in r.err


def test_wait_counts_down_in_place_on_a_terminal(cli, fake):
    fake.set_behaviour("rate_minute", model=FLASH, retry_delay="2s", times=2)
    code, out, err = run_on_terminal(cli, "route", "-m", FLASH, "--wait", "hello")
    assert (code, out) == (0, f"[{FLASH}] hello\n".encode()), err
    text = err.decode()
    countdown = [f"{CLEAR}gemini-router: waiting for the earliest recovery: {n} s left "
                 "(Ctrl-C stops)" for n in (2, 1)]
    assert countdown[0] in text and countdown[1] in text
    assert text.index(countdown[0]) < text.index(countdown[1])
    assert text.endswith(countdown[1] + CLEAR)                # erased when done
    [note] = [line for line in text.split("\r\n") if "then trying again" in line]
    assert note.startswith("gemini-router: nothing available")
    assert fake.count(model=FLASH, action="generate") == 3


def test_wait_is_silent_under_quiet_even_on_a_terminal(cli, fake):
    fake.set_behaviour("rate_minute", model=FLASH, retry_delay="1s", times=2)
    code, out, err = run_on_terminal(cli, "-q", "route", "-m", FLASH, "--wait", "hello")
    assert (code, out, err) == (0, f"[{FLASH}] hello\n".encode(), b"")
    assert fake.count(model=FLASH, action="generate") == 3


def test_wait_shorter_than_the_earliest_recovery_says_so(run_main, fake):
    fake.set_behaviour("rate_minute", model=FLASH, retry_delay="840s")
    began = time.monotonic()
    r = run_main("route", "-m", FLASH, "--wait", "60", "hi")
    line = one_error_line(r, 4)
    assert line.endswith("; earliest recovery in 14 min is beyond --wait 60 s"), line
    assert time.monotonic() - began < 10                        # it did not wait
    assert fake.count(model=FLASH, action="generate") == 2      # each key once


def test_slow_attempt_is_shown_on_a_terminal_once_a_second(terminal, capsys):
    with contextlib.redirect_stderr(terminal.stream):
        out = gr.Output(verbose=True)
        out.attempt_started(FLASH, "key#1", 60.0)
        time.sleep(2.3)
        out.info("a message")              # erases the status line first, never mixes in
        time.sleep(1.2)
        out.attempt_finished()
    status = f"{CLEAR}gemini-router: waiting for {FLASH} on key#1"
    assert terminal.received() == (f"{status}: 2 s (gives up in 58 s)"
                                   f"{CLEAR}gemini-router: a message\r\n"
                                   f"{status}: 3 s (gives up in 57 s){CLEAR}")
    assert capsys.readouterr() == ("", "")            # nothing on stdout (nor elsewhere)


def test_attempt_under_two_seconds_or_quiet_shows_nothing(terminal):
    with contextlib.redirect_stderr(terminal.stream):
        quick, quiet = gr.Output(verbose=True), gr.Output(quiet=True)
        quick.attempt_started(FLASH, "key#1", 60.0)
        quiet.attempt_started(FLASH, "key#2", 60.0)
        time.sleep(1.0)
        quick.attempt_finished()
        time.sleep(1.3)
        quiet.attempt_finished()
    assert terminal.received() == ""


def test_slow_attempt_without_a_terminal_is_one_line_under_verbose_only(capsys):
    verbose, plain = gr.Output(verbose=True), gr.Output()
    verbose.attempt_started(FLASH, "key#2", 30.0)
    plain.attempt_started(FLASH, "key#1", 30.0)
    time.sleep(3.3)
    verbose.attempt_finished()
    plain.attempt_finished()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"gemini-router: waiting for {FLASH} on key#2: 2 s (gives up in 28 s)\n"


# --------------------------------------------------------------------------------------
# 2. stdin only when asked
# --------------------------------------------------------------------------------------

def test_stdin_left_open_by_the_parent_does_not_hang_a_route(cli, fake):
    proc = subprocess.Popen([sys.executable, ROUTER, "route", "hello"], env=cli.env,
                            cwd=str(ROOT), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        code = proc.wait(timeout=30)               # stdin is never written nor closed
    finally:
        proc.kill()
        proc.stdin.close()
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    assert (code, out, err) == (0, f"[{FLASH}] hello\n".encode(), b"")


def test_a_while_read_loop_routes_every_line(cli, fake):
    script = f'while IFS= read -r line; do "{sys.executable}" "{ROUTER}" route "$line"; done'
    proc = subprocess.run(["bash", "-c", script], input=b"first\nsecond\nthird\n",
                          capture_output=True, env=cli.env, cwd=str(ROOT), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode() == "".join(f"[{FLASH}] {w}\n"
                                           for w in ("first", "second", "third"))
    assert generated_prompts(fake) == ["first", "second", "third"]


def test_dash_a_dash_puts_piped_text_before_the_instruction(cli, fake):
    r = cli("route", "summarise", "-a", "-", input="line one\nline two\n")
    assert r.code == 0, r.err
    [call] = [c for c in fake.calls if c.action == "generate"]
    assert call.body["contents"][0]["parts"] == [{"text": "line one\nline two\n\n\nsummarise"}]


def test_dash_a_dash_attaches_a_piped_image(cli, fake):
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    r = cli("route", "describe", "-a", "-", input=png)
    assert r.code == 0, r.err
    [call] = [c for c in fake.calls if c.action == "generate"]
    assert call.body["contents"][0]["parts"] == [
        {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(png).decode()}},
        {"text": "describe"}]


@pytest.mark.parametrize("args, stdin, message", [
    (("route", "hi", "-a", "-", "-a", "-"), b"x",
     "-a - is given twice, but stdin can be read only once"),
    (("route", "-", "-a", "-"), b"x",
     "the prompt '-' and -a - both ask for stdin: give the prompt as an argument"),
    (("route", "hi", "-a", "-"), b"", "-a - reads stdin, but stdin is empty"),
    (("route", "hi", "-a", "-"), b"\x00\x01\x02\xff",
     "-a -: stdin is neither UTF-8 text nor a PNG, JPEG, GIF, WebP or PDF file"),
])
def test_dash_a_dash_mistakes_are_usage_errors(cli, fake, args, stdin, message):
    r = cli(*args, input=stdin)
    assert one_error_line(r, 2) == f"gemini-router: error: {message}"
    assert fake.count(action=("generate", "stream")) == 0


# --------------------------------------------------------------------------------------
# 3. typos caught
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("typo, meant", [("rnak", "rank"), ("cooldown", "cooldowns"),
                                         ("lokc", "lock"), ("statz", "stats or state")])
def test_unknown_command_says_did_you_mean(run_main, fake, typo, meant):
    line = one_error_line(run_main(typo), 2)
    assert line.startswith(f"gemini-router: error: unknown command '{typo}'; did you mean "
                           f"{meant}? (commands: route, rank, tiers, stats, cooldowns, "), line
    assert line.endswith(") (see 'gemini-router --help')")


@pytest.mark.parametrize("args, message", [
    (("route", "--stram", "hi"),
     "unknown option --stram for route; did you mean --stream? "
     "(see 'gemini-router route --help')"),
    (("tiers", "--jsn"),
     "unknown option --jsn for tiers; did you mean --json? (see 'gemini-router tiers --help')"),
    (("route", "--tier", "qualty", "hi"),
     "argument --tier: invalid choice: 'qualty'; did you mean quality? (choose from fast, "
     "quality, balance) (see 'gemini-router route --help')"),
    (("route", "hello", "world"),
     "unexpected argument 'world': the prompt is one argument (quote it if it has spaces) "
     "(see 'gemini-router route --help')"),
    (("route", "--wait", "later", "hi"),
     "unexpected argument 'hi': the prompt is one argument (quote it if it has spaces); "
     "--wait takes only a number, so 'later' was read as the prompt "
     "(see 'gemini-router route --help')"),
])
def test_unknown_option_or_choice_says_did_you_mean(run_main, fake, args, message):
    assert one_error_line(run_main(*args), 2) == f"gemini-router: error: {message}"
    assert fake.count(action=("generate", "stream")) == 0


def test_bare_command_on_a_terminal_prints_the_help(cli):
    code, out, err = run_on_terminal(cli, stream="stdout")
    assert (code, err) == (2, b"")
    text = out.decode()
    assert text.startswith("usage: gemini-router ")
    assert "examples:" in text and "environment:" in text


def test_bare_command_in_a_script_is_one_line(run_main):
    line = one_error_line(run_main(), 2)
    assert line.startswith("gemini-router: error: missing command: one of route, rank, "
                           "tiers, stats, cooldowns, lock, unlock, keys, models"), line
    assert line.endswith(" (see 'gemini-router --help')")


def test_help_shows_examples_and_the_environment(run_main):
    r = run_main("--help")
    assert (r.code, r.err) == (0, "")
    assert "\nexamples:\n  gemini-router route \"Say hello in French\"\n" in r.out
    environment = r.out[r.out.index("\nenvironment:\n"):]
    for name in ("GEMINI_API_KEY_1", "GEMINI_API_KEYS", "GEMINI_API_KEY", "GOOGLE_API_KEY",
                 "GEMINI_API_ENDPOINT", "GEMINI_ROUTER_STATE_DIR", "GEMINI_ROUTER_PROJECTS",
                 "GEMINI_ROUTER_MAX_ATTEMPTS", "GEMINI_ROUTER_DEADLINE",
                 "GEMINI_ROUTER_SERVER", "GEMINI_ROUTER_ERRORS=json", "NO_COLOR"):
        assert re.search(rf"(?<![A-Z_]){re.escape(name)}(?![A-Z_0-9])", environment), name
    route = run_main("route", "--help").out
    assert "cat notes.txt | gemini-router route \"Summarise these notes\" -a -" in route
    assert "stdin is read only when asked for" in " ".join(route.split())


# --------------------------------------------------------------------------------------
# 4. say when a choice is overridden
# --------------------------------------------------------------------------------------

def test_relocking_names_the_previous_lock(run_main, fake):
    first = run_main("lock", "gemini-2.5-pro")
    assert (first.code, first.out, first.err) == (
        0, "locked to gemini-2.5-pro\n", "gemini-router: 'gemini-router unlock' releases it\n")
    again = run_main("lock", "gemini-2.0-flash")
    assert (again.code, again.out) == (0, "locked to gemini-2.0-flash (was gemini-2.5-pro)\n")
    same = run_main("--json", "lock", "gemini-2.0-flash")
    assert same.json() == {"lock": "gemini-2.0-flash", "was": "gemini-2.0-flash"}
    assert run_main("lock", "gemini-2.0-flash").out == "locked to gemini-2.0-flash (unchanged)\n"
    quiet = run_main("-q", "lock", "gemini-2.5-pro")
    assert (quiet.out, quiet.err) == ("locked to gemini-2.5-pro (was gemini-2.0-flash)\n", "")
    assert run_main("unlock").code == 0
    assert run_main("--json", "lock", "gemini-2.5-pro").json() == {"lock": "gemini-2.5-pro",
                                                                   "was": None}


# --------------------------------------------------------------------------------------
# 5. readable output
# --------------------------------------------------------------------------------------

def test_until_beyond_today_shows_the_date_and_zone(cli, fake):
    fake.set_behaviour("rate_minute", key=KEYS[0], model=FLASH)                  # 26 s
    fake.set_behaviour("rate_minute", key=KEYS[1], model=FLASH, retry_delay="200000s")
    assert cli("route", "-m", FLASH, "hi").code == 4
    est = {"TZ": "EST5"}                     # a fixed zone: UTC-5, called EST
    entries = cli("--json", "cooldowns", env=est).json()
    r = cli("cooldowns", env=est)
    assert r.code == 0, r.err
    lines = r.out.split("\n\n")[0].splitlines()     # the table; learned limits follow
    assert len(lines) == 3

    def local(t: float) -> time.struct_time:
        return time.gmtime(t - 5 * 3600)
    today = local(time.time())[:3]
    for entry, line in zip(entries, lines[1:]):
        shown = local(entry["until"])
        expected = (time.strftime("%H:%M:%S", shown) if shown[:3] == today
                    else time.strftime("%Y-%m-%d %H:%M", shown) + " EST")
        assert f"  {expected}  " in line, (expected, line)
    assert entries[1]["key"] == "key#2"
    assert re.search(r"  \d{4}-\d\d-\d\d \d\d:\d\d EST  ", lines[2]), lines[2]


def test_a_numeric_column_has_one_precision():
    table = gr.format_table(["MODEL", "LATENCY", "SHARE", "N"],
                            [["a", "1", "50%", 3], ["bb", "0.25", "12.5%", 10],
                             ["c", None, "-", 7]])
    assert table == ("MODEL  LATENCY  SHARE   N\n"
                     "a         1.00  50.0%   3\n"
                     "bb        0.25  12.5%  10\n"
                     "c            -      -   7")


def test_tiers_score_column_has_one_precision(run_main, fake):
    fake.set_latency(0.3, model="gemini-2.5-flash-lite")
    assert run_main("rank", "--models", FLASH).code == 0     # flash and flash-lite
    r = run_main("tiers")
    header, *lines = r.out.splitlines()
    end = header.index("SCORE") + len("SCORE")         # numbers end under their header
    scores = {next(t for t in line.split() if t.startswith("gemini")): line[:end].split()[-1]
              for line in lines[:2]}
    decimals = {len(v.split(".")[1]) for v in scores.values() if "." in v}
    assert len(scores) == 2 and all("." in v for v in scores.values()), scores
    assert len(decimals) == 1, scores                          # one precision in the column


def json_error(r, code: int) -> dict:
    doc = json.loads(one_error_line(r, code))
    assert list(doc) == ["error"]
    assert sorted(doc["error"]) == ["exit_code", "kind", "message", "retry_at"]
    assert doc["error"]["exit_code"] == code
    return doc["error"]


JSON_ERRORS = {"GEMINI_ROUTER_ERRORS": "json"}


def test_json_errors_for_usage_config_and_upstream(run_main, fake):
    usage = json_error(run_main("route", "--tier", "ultra", "hi", env=JSON_ERRORS), 2)
    assert usage == {"exit_code": 2, "kind": "usage", "retry_at": None,
                     "message": "argument --tier: invalid choice: 'ultra' (choose from fast, "
                                "quality, balance) (see 'gemini-router route --help')"}
    config = json_error(run_main("route", "hi", keys=[], env=JSON_ERRORS), 3)
    assert (config["kind"], config["retry_at"]) == ("config", None)
    assert config["message"].startswith("no API key")
    fake.set_behaviour("bad_request")
    upstream = json_error(run_main("--json", "route", "hi", env=JSON_ERRORS), 1)
    assert (upstream["kind"], upstream["retry_at"]) == ("upstream", None)
    assert FLASH in upstream["message"]
    assert fake.count(action="generate") == 1


def test_json_error_for_nothing_available_carries_retry_at(run_main, fake):
    fake.set_behaviour("rate_minute", model=FLASH)                       # 26 s on each key
    began = time.time()
    error = json_error(run_main("route", "-m", FLASH, "hi", env=JSON_ERRORS), 4)
    assert error["kind"] == "nothing_available"
    assert "earliest: key#" in error["message"]
    assert began + 25 <= error["retry_at"] <= time.time() + 26.5
    cooling = run_main("--json", "cooldowns").json()
    assert error["retry_at"] == pytest.approx(min(e["until"] for e in cooling), abs=0.01)


def test_json_error_for_an_interrupt(cli, fake):
    fake.set_behaviour("hang", model=FLASH, seconds=30)
    proc = subprocess.Popen([sys.executable, ROUTER, "route", "hi"],
                            env={**cli.env, **JSON_ERRORS}, cwd=str(ROOT),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while fake.count(action="generate") == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert (proc.returncode, out) == (130, b"")
    assert json.loads(err) == {"error": {"exit_code": 130, "kind": "interrupted",
                                         "message": "interrupted", "retry_at": None}}


def test_bad_error_format_setting_is_a_configuration_error(run_main):
    r = run_main("tiers", env={"GEMINI_ROUTER_ERRORS": "xml"})
    assert one_error_line(r, 3) == \
        "gemini-router: error: GEMINI_ROUTER_ERRORS must be json or text, got 'xml'"


# --------------------------------------------------------------------------------------
# 6. local commands stay light
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, heavy", [
    (["tiers"], ("threading",)), (["stats"], ("threading",)), (["cooldowns"], ("threading",)),
    (["--help"], ("threading",)), (["keys"], ("threading", "redis", "fastapi")),
    (["unlock"], ()),                 # a writer: filelock brings threading with it
])
def test_local_commands_import_no_new_modules(state_dir, fake, argv, heavy):
    code = ("import sys, gemini_router\n"
            f"rc = gemini_router.main({argv!r})\n"
            "print(rc, sorted(m for m in ('difflib', 'pty', 'tqdm', 'google.generativeai',\n"
            f"                             *{heavy!r}) if m in sys.modules))\n")
    env = base_env(state_dir, fake.url, KEYS[:2])
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, cwd=str(ROOT), timeout=30)
    assert proc.stdout.splitlines()[-1] == "0 []", proc.stderr
