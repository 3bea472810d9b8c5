"""The words a user reads (issue 13 items 3 and 5): every failure kind ends in one clean line
that names the real cause - no doubled punctuation, no stray brackets, no exception class
names - an endpoint that is not a Gemini API says so once, a broken stream shows the
upstream's own message, and a choice the router overrides or passes over is said."""
from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import KEYS

FLASH = "gemini-2.5-flash"
FAILING = ["bad_request", "billing", "blocked", "credits_depleted", "empty200", "empty_answer",
           "error500", "forbidden", "gateway_timeout", "html502", "image_safety",
           "invalid_key", "key_blocked", "key_expired", "leaked", "location", "no_candidates",
           "no_longer_available", "no_permission", "no_system_instruction", "no_thinking",
           "nonjson_error", "not_found", "rate_day", "rate_minute", "rate_plain", "rate_tokens",
           "rate_zero", "recitation", "safety", "suspended", "thinking_exhausted", "too_long",
           "unauthorized", "unavailable", "unknown_block"]
CLASS_NAMES = re.compile(r"\b(TooManyRequests|BadRequest|Forbidden|NotFound|"
                         r"InternalServerError|ServiceUnavailable|GatewayTimeout|Unauthorized|"
                         r"ChunkedEncodingError|JSONDecodeError|Traceback|rate_limited|"
                         r"daily_quota|key_invalid|model_missing|model_cannot|no_quota)\b")


def assert_clean(line: str) -> None:
    """One line, punctuation used once, brackets balanced, no internal names."""
    assert line.endswith("\n") and line.count("\n") == 1, line
    text = line.rstrip("\n")
    for bad in ("..", ". .", ":.", ".:", ": :", ";;", "; ;", "()", "( ", " )", ",,", " ,",
                " .", "::"):
        assert bad not in text.replace("...", "…").replace("://", "/"), (bad, text)
    assert text.count("(") == text.count(")"), text
    assert text.count("[") == text.count("]"), text
    assert not CLASS_NAMES.search(text), text


@pytest.mark.parametrize("behaviour", FAILING)
def test_every_failure_kind_reads_as_one_clean_line(run_main, fake, behaviour):
    fake.set_behaviour(behaviour, model=FLASH)
    r = run_main("route", "-m", FLASH, "--max-attempts", "2", "hello")
    assert r.code in (1, 4), (r.code, r.err)
    lines = r.err.splitlines(keepends=True)
    assert lines[-1].startswith("gemini-router: error: ")
    for line in lines:
        assert_clean(line)


@pytest.mark.parametrize("behaviour", ["invalid_key", "leaked", "suspended", "rate_plain",
                                       "unavailable", "location"])
def test_listing_failures_read_as_clean_lines(run_main, fake, behaviour):
    fake.set_behaviour(behaviour)
    r = run_main("models", keys=KEYS[:1])
    assert r.code in (1, 3, 4)
    lines = r.err.splitlines(keepends=True)
    assert lines and lines[-1].startswith("gemini-router: error: ")
    for line in lines:
        assert_clean(line)


@pytest.mark.parametrize("behaviour", ["rate_minute", "rate_day", "rate_zero", "invalid_key",
                                       "no_permission", "unavailable", "billing"])
def test_cooldowns_name_the_reason_in_words(run_main, fake, behaviour):
    fake.set_behaviour(behaviour, model=FLASH)
    run_main("route", "-m", FLASH, "hello")
    r = run_main("cooldowns")
    assert r.code == 0
    table = r.out.split("\n\n")[0].splitlines()         # the table, before any footer
    assert len(table) >= 2
    for row in table[1:]:
        assert not CLASS_NAMES.search(row), row
        assert "  " in row
    words = {"rate_minute": "rate limited: 10 requests per minute",
             "rate_day": "daily quota spent", "rate_zero": "no free-tier quota for this model",
             "invalid_key": "API key not valid", "no_permission": "no access to this model",
             "unavailable": "transient failure", "billing": "needs billing"}[behaviour]
    assert words in r.out


class _HtmlSite(BaseHTTPRequestHandler):
    """A web server that is not a Gemini API: every path is an HTML 404 page."""

    def do_GET(self):
        self._page()

    def do_POST(self):
        self._page()

    def _page(self):
        body = b"<html><head><title>404 Not Found</title></head><body>" + b"x" * 2000 + \
            b"</body></html>"
        self.send_response(404)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def html_site():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HtmlSite)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_an_endpoint_that_is_not_a_gemini_api_is_said_once_and_short(run_main, html_site):
    r = run_main("route", "hello", env={"GEMINI_API_ENDPOINT": html_site})
    assert r.code == 3
    assert r.err == (f"gemini-router: error: {html_site} is not a Gemini API: HTTP 404 with a "
                     "text/html body, not a Gemini API error\n")
    assert "<html" not in r.err and "not found" not in r.err.lower().replace("404", "")


def test_a_broken_stream_shows_the_upstreams_own_message(run_main, fake):
    fake.set_behaviour("stream_break", model=FLASH, message="Backend shard 7 went away.")
    r = run_main("route", "-m", FLASH, "--stream", "hello there friend")
    assert r.code == 1
    assert "Backend shard 7 went away." in r.err
    assert_clean(r.err.splitlines(keepends=True)[-1])


def test_a_lock_that_overrides_tier_or_m_says_so(run_main, fake):
    assert run_main("lock", "gemini-2.0-flash").code == 0
    r = run_main("route", "--tier", "fast", "hello")
    assert r.code == 0
    assert "locked to gemini-2.0-flash: --tier fast ignored" in r.err
    assert r.out.startswith("[gemini-2.0-flash]")
    r = run_main("route", "-m", FLASH, "hello")
    assert r.code == 0
    assert f"-m {FLASH} overrides the lock on gemini-2.0-flash" in r.err
    assert r.out.startswith(f"[{FLASH}]")
    r = run_main("-q", "route", "--tier", "fast", "hello")
    assert r.err == ""


def test_verbose_names_every_pair_skipped_and_why(run_main, fake):
    fake.set_behaviour("invalid_key", key=KEYS[1])
    fake.set_behaviour("rate_minute", key=KEYS[0], model=FLASH, retry_delay="90s")
    assert run_main("route", "-m", FLASH, "first", keys=KEYS).code == 0
    r = run_main("-v", "route", "-m", FLASH, "second", keys=KEYS)
    assert r.code == 0
    assert re.search(r"skipped key#1 on gemini-2\.5-flash: rate limited: 10 requests per "
                     r"minute .*\(\d+ s left\)", r.err), r.err
    assert re.search(r"skipped key#2 on gemini-2\.5-flash: disabled: API key not valid.*"
                     r"\(until a person acts\)", r.err), r.err


def _seed_one_cooldown(run_main, fake):
    fake.set_behaviour("rate_minute", key=KEYS[0], model=FLASH, retry_delay="300s")
    assert run_main("route", "-m", FLASH, "hello", keys=KEYS[:2]).code == 0
    assert len(run_main("cooldowns", "--json", keys=KEYS[:2]).json()) == 1


def test_clearing_everything_from_a_script_needs_all(run_main, fake):
    _seed_one_cooldown(run_main, fake)
    r = run_main("cooldowns", "--clear", keys=KEYS[:2])
    assert r.code == 2 and "add --all" in r.err
    assert len(run_main("cooldowns", "--json", keys=KEYS[:2]).json()) == 1
    r = run_main("cooldowns", "--clear", "--all", keys=KEYS[:2])
    assert (r.code, r.out) == (0, "cleared 1 cooldown(s)\n")
    assert run_main("cooldowns", "--json", keys=KEYS[:2]).json() == []
    assert run_main("cooldowns", "--all", keys=KEYS[:2]).code == 2


@pytest.mark.parametrize("answer, left", [("n\n", 1), ("y\n", 0)])
def test_clearing_everything_on_a_terminal_asks_first(cli, fake, answer, left):
    import os
    import subprocess
    import sys
    fake.set_behaviour("rate_minute", key=KEYS[0], model=FLASH, retry_delay="300s")
    assert cli("route", "-m", FLASH, "hello").code == 0
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, str(cli.env["PYTHONPATH"]) + "/gemini_router.py",
                             "cooldowns", "--clear"], env=cli.env, stdin=slave, stderr=slave,
                            stdout=subprocess.PIPE)
    os.close(slave)
    os.write(master, answer.encode())
    out, _ = proc.communicate(timeout=30)
    prompt = os.read(master, 4096).decode()
    os.close(master)
    assert proc.returncode == 0
    assert "clear every cooldown, disabled key and learned limit? [y/N]" in prompt
    assert len(cli("cooldowns", "--json").json()) == left
    assert out.decode() == ("cleared 1 cooldown(s)\n" if left == 0 else "")


def test_cooldowns_lists_the_learned_limits(run_main, fake):
    fake.set_behaviour("rate_minute", key=KEYS[0], model=FLASH, quota_value="12",
                       retry_delay="300s")
    assert run_main("route", "-m", FLASH, "hello", keys=KEYS[:2]).code == 0
    r = run_main("cooldowns", keys=KEYS[:2])
    assert f"  {FLASH} on key#1: 12 rpm" in r.out
    assert "learned limits" in r.out
