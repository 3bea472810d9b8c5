"""`route` through a running gateway (GEMINI_ROUTER_SERVER), `serve` as a process (signals,
state other processes see at once), its configuration checks, and secrets (issue 14).

The route tests run both ways - a direct route and one forwarded to the gateway - with the
same assertions: same stdout, --json, -v lines and exit codes."""
from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from conftest import CLI, KEYS, ROOT, base_env
from gateway_fixtures import (CLIENT_ENV, CLIENT_KEYS, FLASH, ServeProcess, gateway_env,
                              serving)

GENERATE = ("generate", "stream")


def calls(fake) -> list[tuple[str, str]]:
    return [(c.model, c.key) for c in fake.calls if c.action in GENERATE]


def one_error_line(r, code: int) -> str:
    assert r.code == code, (r.code, r.out, r.err)
    assert r.out == "" and "Traceback" not in r.err
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gemini-router: error: "), r.err
    return lines[0]


@pytest.fixture(params=["direct", "gateway"])
def route(request, fake, state_dir, run_main):
    """Runs `gemini-router route ...` in-process, directly or through a gateway."""
    if request.param == "direct":
        yield run_main
        return
    with serving(gateway_env(fake, state_dir, GEMINI_ROUTER_CLIENT_KEYS=CLIENT_ENV)) as served:
        def through(*args, env=None, **kw):
            return run_main(*args, env={"GEMINI_ROUTER_SERVER": served.url,
                                        "GEMINI_ROUTER_CLIENT_KEY": CLIENT_KEYS["alice"],
                                        **(env or {})}, **kw)
        yield through


# --------------------------------------------------------------------------------------
# the same route tests, both ways
# --------------------------------------------------------------------------------------

def test_plain_answer(route, fake):
    r = route("route", "plain argument")
    assert (r.code, r.out, r.err) == (0, f"[{FLASH}] plain argument\n", "")
    assert calls(fake) == [(FLASH, KEYS[0])]


def test_json_has_the_spec_fields(route, fake):
    r = route("route", "--json", "alpha beta")
    assert r.code == 0, r.err
    data = r.json()
    assert (data["model"], data["key"], data["text"], data["finish_reason"]) == \
        (FLASH, "key#1", f"[{FLASH}] alpha beta", "STOP")
    assert data["usage"] == {"prompt_tokens": 2, "output_tokens": 3, "thought_tokens": 0,
                             "total_tokens": 5}
    assert [{k: a[k] for k in ("model", "key", "outcome")} for a in data["attempts"]] == \
        [{"model": FLASH, "key": "key#1", "outcome": "ok"}]
    assert isinstance(data["latency_s"], float) and isinstance(
        data["attempts"][0]["latency_s"], float)


def test_verbose_shows_every_attempt(route, fake):
    fake.set_behaviour("rate_minute", key=KEYS[0], model=FLASH)
    r = route("route", "-v", "hi")
    assert (r.code, r.out) == (0, f"[{FLASH}] hi\n"), r.err
    lines = r.err.splitlines()
    assert any(re.match(rf"gemini-router: +{FLASH} key#1: rate limited: ", line)
               for line in lines), r.err
    assert any(re.match(rf"gemini-router: +{FLASH} key#2: answered in ", line)
               for line in lines), r.err
    assert any(line.startswith("gemini-router: answered by gemini-2.5-flash with key#2")
               for line in lines)
    assert "rate_limited" not in r.err
    assert calls(fake) == [(FLASH, KEYS[0]), (FLASH, KEYS[1])]


def test_exit_4_when_every_key_is_limited(route, fake):
    fake.set_behaviour("rate_minute")
    line = one_error_line(route("route", "hi"), 4)
    assert "budget of 8 calls spent" in line and "earliest: key#" in line
    assert len(calls(fake)) == 8


def test_exit_4_names_the_earliest_recovery(route, fake):
    fake.set_behaviour("rate_minute", retry_delay="26s")
    line = one_error_line(route("route", "-m", FLASH, "hi"), 4)
    assert re.search(r"earliest: key#\d on gemini-2\.5-flash in 2[56] s", line), line


def test_exit_1_on_a_bad_request(route, fake):
    fake.set_behaviour("bad_request", message="Invalid value at 'contents'")
    line = one_error_line(route("route", "hi"), 1)
    assert "Invalid value at 'contents'" in line
    assert calls(fake) == [(FLASH, KEYS[0])]


def test_exit_2_on_an_unknown_model(route, fake):
    line = one_error_line(route("route", "-m", "nosuchmodel", "hi"), 2)
    assert "unknown model 'nosuchmodel'" in line
    assert calls(fake) == []


def test_stream_prints_the_answer(route, fake):
    r = route("route", "--stream", "one two three four five")
    assert (r.code, r.out) == (0, f"[{FLASH}] one two three four five\n"), r.err
    assert (fake.count(action="stream"), fake.count(action="generate")) == (1, 0)


def test_stream_broken_after_text_is_exit_1_with_the_partial_answer(route, fake):
    fake.set_behaviour("stream_break")
    r = route("route", "--stream", "one two three four five six")
    assert r.code == 1 and r.out == f"[{FLASH}] \n"
    line = r.err.strip()
    assert line.startswith("gemini-router: error: ") and "after output began" in line
    assert fake.count(action="stream") == 1


def test_options_system_and_attachments_arrive_the_same(route, fake, tmp_path):
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nPIXELS")
    r = route("route", "-s", "Be brief.", "-o", "temperature=0.2", "-o", "seed=5",
              "-a", str(tmp_path / "a.png"), "describe")
    assert r.code == 0, r.err
    body = [c for c in fake.calls if c.action == "generate"][-1].body
    assert body["systemInstruction"]["parts"] == [{"text": "Be brief."}]
    assert body["generationConfig"]["seed"] == 5
    assert body["generationConfig"]["temperature"] == pytest.approx(0.2)
    assert body["contents"][0]["parts"][0]["inlineData"]["mimeType"] == "image/png"


# --------------------------------------------------------------------------------------
# through the gateway only
# --------------------------------------------------------------------------------------

@pytest.fixture
def served(fake, state_dir):
    with serving(gateway_env(fake, state_dir, GEMINI_ROUTER_CLIENT_KEYS=CLIENT_ENV)) as s:
        yield s


def client_env(state_dir, served, key: str = CLIENT_KEYS["bob"]) -> dict[str, str]:
    """A client with no Google key at all: the gateway holds them."""
    env = base_env(state_dir.parent / "client-state", "http://127.0.0.1:9", [])
    env.update(GEMINI_ROUTER_SERVER=served.url, GEMINI_ROUTER_CLIENT_KEY=key)
    return env


def test_forwarded_route_needs_no_google_key_and_never_imports_the_sdk(served, state_dir,
                                                                       fake):
    script = ("import json, sys, gemini_router as g\n"
              "code = g.main(['route', '-v', 'hello gateway'])\n"
              "heavy = sorted(m for m in sys.modules if m.startswith(('google.', 'requests',"
              " 'tqdm', 'grpc', 'proto', 'fastapi', 'uvicorn')))\n"
              "print(json.dumps(heavy), file=sys.stderr)\n"
              "sys.exit(code)\n")
    proc = subprocess.run([sys.executable, "-c", script], env=client_env(state_dir, served),
                          capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"[{FLASH}] hello gateway\n"
    assert json.loads(proc.stderr.strip().splitlines()[-1]) == []
    assert calls(fake) == [(FLASH, KEYS[0])]


def test_a_wrong_client_key_is_exit_3(served, state_dir, fake):
    r = CLI(fake, state_dir, [])("route", "hi", env=client_env(state_dir, served,
                                                              "not-a-client-key"))
    line = one_error_line(r, 3)
    assert "GEMINI_ROUTER_CLIENT_KEY" in line and "not-a-client-key" not in line
    assert calls(fake) == []


def test_an_unreachable_gateway_is_exit_4(fake, state_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"GEMINI_ROUTER_SERVER": f"http://127.0.0.1:{port}"}
    line = one_error_line(CLI(fake, state_dir, KEYS[:1])("route", "hi", env=env), 4)
    assert f"cannot reach the gateway http://127.0.0.1:{port}" in line
    assert calls(fake) == []


def test_a_server_that_is_not_a_gateway_is_exit_3(fake, state_dir):
    env = {"GEMINI_ROUTER_SERVER": fake.url}        # a Gemini API, not a gemini-router
    line = one_error_line(CLI(fake, state_dir, KEYS[:1])("route", "hi", env=env), 3)
    assert "is not a gemini-router gateway" in line


@pytest.mark.parametrize("value", ["127.0.0.1:8787", "http://127.0.0.1:8787/v1"])
def test_a_malformed_server_setting_is_exit_3(run_main, value):
    line = one_error_line(run_main("route", "hi", env={"GEMINI_ROUTER_SERVER": value}), 3)
    assert "GEMINI_ROUTER_SERVER" in line


# --------------------------------------------------------------------------------------
# serve: configuration
# --------------------------------------------------------------------------------------

def test_serve_refuses_a_public_address_without_client_keys(run_main, fake):
    line = one_error_line(run_main("serve", "--host", "0.0.0.0", "--port", "0"), 3)
    assert "refusing to serve on 0.0.0.0 without client keys" in line
    assert "GEMINI_ROUTER_CLIENT_KEYS" in line


@pytest.mark.parametrize("value, words", [
    ("no-colon-here-at-all", "entry 1 is not secret:name"),
    ("long-enough-secret:", "entry 1 is not secret:name"),
    ("short:alice", "at least 8"),
    ("long-enough-secret:bad name", "letters, digits"),
    ("long-enough-secret:alice,long-enough-secret:bob", "repeats"),
    (f"{KEYS[0]}:alice", "is one of the Google API keys"),
])
def test_bad_client_keys_are_exit_3_without_echoing_a_secret(run_main, fake, value, words):
    line = one_error_line(run_main("serve", env={"GEMINI_ROUTER_CLIENT_KEYS": value}), 3)
    assert words in line
    for secret in ("long-enough-secret", "no-colon-here-at-all", KEYS[0]):
        assert secret not in line


def test_serve_on_a_port_in_use_is_exit_3(run_main, fake):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        line = one_error_line(run_main("serve", "--port", str(port)), 3)
    assert f"cannot listen on 127.0.0.1:{port}" in line


def test_serve_without_keys_is_exit_3(run_main, fake):
    one_error_line(run_main("serve", env={"GEMINI_API_KEY_1": None, "GEMINI_API_KEY_2": None}),
                   3)


# --------------------------------------------------------------------------------------
# serve as a process: signals, state, logs, secrets
# --------------------------------------------------------------------------------------

@pytest.fixture
def serve_process(fake, state_dir):
    env = base_env(state_dir, fake.url, KEYS[:2])
    env["GEMINI_ROUTER_CLIENT_KEYS"] = CLIENT_ENV
    proc = ServeProcess(env)
    yield proc
    proc.kill()


def ask(url: str, text: str = "hi", client: str = "alice", path: str = f"/v1beta/models/"
        f"{FLASH}:generateContent") -> requests.Response:
    return requests.post(url + path, timeout=30, headers={"x-goog-api-key": CLIENT_KEYS[client]},
                         json={"contents": [{"parts": [{"text": text}]}]})


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_lets_the_request_in_flight_finish_then_exits_0(serve_process, fake, sig,
                                                                  state_dir):
    fake.set_behaviour("slow", seconds=1.5)
    answers = []
    worker = threading.Thread(target=lambda: answers.append(ask(serve_process.url, "slow one")))
    worker.start()
    deadline = time.monotonic() + 15
    while fake.count(action="generate") == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    code = serve_process.stop(sig)
    worker.join(timeout=15)
    assert code == 0, serve_process.stderr
    [answer] = answers
    assert answer.status_code == 200 and answer.json()["candidates"][0]["content"]["parts"] == \
        [{"text": f"[{FLASH}] slow one"}]
    assert "Traceback" not in serve_process.stderr
    assert serve_process.stderr.rstrip().endswith("gemini-router: stopped")
    with pytest.raises(requests.ConnectionError):       # no longer accepting
        ask(serve_process.url)
    # what was pending was written on the way out
    samples = json.loads((state_dir / "model_stats.json").read_text())["models"][FLASH]
    assert [(s["ok"], s["kind"]) for s in samples] == [(True, "ok")]


def test_cooldowns_are_visible_to_another_process_at_once(serve_process, fake, state_dir):
    fake.set_behaviour("rate_minute", key=KEYS[0], model=FLASH, retry_delay="40s")
    assert ask(serve_process.url).status_code == 200
    r = CLI(fake, state_dir, KEYS[:2])("cooldowns", "--json")
    assert r.code == 0, r.err
    [entry] = [e for e in r.json() if e["model"] == FLASH]
    assert entry["key"] == "key#1" and 38 <= entry["remaining_s"] <= 40


def test_samples_are_visible_to_another_process_within_a_second(serve_process, fake,
                                                                 state_dir):
    assert ask(serve_process.url, "one two").status_code == 200
    answered = time.monotonic()
    cli = CLI(fake, state_dir, KEYS[:2])
    while True:
        started = time.monotonic() - answered
        r = cli("stats", "--json")
        if r.code == 0 and r.json().get(FLASH, {}).get("samples") == 1:
            break
        assert started < 1.0, "no sample a second after the answer"
    assert started <= 1.0


def test_logs_name_the_client_and_nothing_shows_a_google_key(serve_process, fake, state_dir):
    """Every response, header, log line, /status, / and /metrics is scanned for every
    configured key - including an upstream error message that echoes one."""
    fake.set_behaviour("bad_request", model="gemini-2.0-flash",
                       message=f"Invalid request for key {KEYS[1]}")
    fake.set_behaviour("rate_minute", key=KEYS[0], model="gemini-2.5-flash-lite")
    url = serve_process.url
    auth = {"Authorization": f"Bearer {CLIENT_KEYS['bob']}"}
    seen = [ask(url, "fine", "alice"), ask(url, "refused", "bob",
                                          "/v1beta/models/gemini-2.0-flash:generateContent"),
            ask(url, "limited", "bob", "/v1beta/models/gemini-2.5-flash-lite:generateContent"),
            ask(url, "streamed", "alice",
                f"/v1beta/models/{FLASH}:streamGenerateContent?alt=sse"),
            requests.post(url + "/v1/chat/completions", headers=auth, timeout=30,
                          json={"model": "gemini-2.0-flash",
                                "messages": [{"role": "user", "content": "x"}]}),
            requests.get(url + "/v1beta/models", headers=auth, timeout=30),
            requests.get(url + "/v1beta/models", timeout=30,
                         headers={"x-goog-api-key": KEYS[0]}),
            requests.get(url + "/status", headers=auth, timeout=30),
            requests.get(url + "/", headers=auth, timeout=30),
            requests.get(url + "/metrics", headers=auth, timeout=30)]
    assert [r.status_code for r in seen] == [200, 400, 200, 200, 400, 200, 401, 200, 200, 200]
    assert "Invalid request for key key#2" in seen[1].text        # redacted, not dropped
    metrics = seen[-1].text
    assert re.search(r'gemini_router_requests_total\{api="gemini",client="alice",'
                     r'endpoint="generateContent",status="200"\} 1\.0', metrics), metrics
    assert re.search(r'gemini_router_attempts_total\{client="bob",key="key#1",'
                     r'model="gemini-2.5-flash-lite",outcome="rate_limited"\} 1\.0', metrics)
    assert 'gemini_router_cooldowns_active{kind="rate_limited"} 1.0' in metrics
    assert "gemini_router_upstream_latency_seconds_bucket" in metrics
    serve_process.stop(signal.SIGTERM)
    log = serve_process.stderr
    assert re.search(rf"alice POST /v1beta/models/{FLASH}:generateContent 200 {FLASH} key#1 "
                     r"attempts=1 ", log), log
    assert re.search(r"bob POST /v1beta/models/gemini-2.0-flash:generateContent 400 ", log)
    everything = [log] + [r.text + json.dumps(dict(r.headers)) for r in seen]
    for key in KEYS[:2]:
        for text in everything:
            assert key not in text
    for secret in CLIENT_KEYS.values():
        assert secret not in log
