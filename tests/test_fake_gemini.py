"""Self-test of tests/fake_gemini.py: drives the real SDK REST transport against the fake."""

import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import warnings

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)   # api_core / generativeai deprecation notes
    import requests
    from google.ai import generativelanguage as glm
    from google.api_core import exceptions as gx
    from google.protobuf.json_format import ParseError

from fake_gemini import (BEHAVIOURS, CURRENT_MODELS, DEFAULT_MODELS,  # noqa: E402
                         LISTING_BEHAVIOURS, FakeGemini, _ENUMS, _NEWER_ENUMS, make_models)

T = 5.0  # per-call timeout


@pytest.fixture
def fake():
    with FakeGemini() as f:
        yield f


def clients(fake, key="key-a"):
    opts = {"api_endpoint": fake.url, "api_key": key}
    return (glm.GenerativeServiceClient(transport="rest", client_options=opts),
            glm.ModelServiceClient(transport="rest", client_options=opts))


def req(model="gemini-2.5-flash", text="hello there world", **config):
    r = glm.GenerateContentRequest(
        model=f"models/{model}", contents=[{"role": "user", "parts": [{"text": text}]}])
    if config:
        r.generation_config = glm.GenerationConfig(**config)
    return r


def generate(fake, key="key-a", **kw):
    gen, _ = clients(fake, key)
    return gen.generate_content(req(**kw), timeout=T, retry=None)


def stream(fake, key="key-a", **kw):
    gen, _ = clients(fake, key)
    return list(gen.stream_generate_content(req(**kw), timeout=T, retry=None))


def text_of(resp):
    return "".join(p.text for c in resp.candidates for p in c.content.parts)


# ------------------------------------------------------------------ happy paths

def test_list_models_paginates(fake):
    fake.page_size_cap = 3
    _, mdl = clients(fake)
    names = [m.name for m in mdl.list_models(timeout=T, retry=None)]
    assert names == [m["name"] for m in DEFAULT_MODELS]
    assert fake.count(action="list") == -(-len(DEFAULT_MODELS) // 3)
    # the SDK honours the server's page size even when asking for more
    pages = list(mdl.list_models(glm.ListModelsRequest(page_size=10), timeout=T,
                                 retry=None).pages)
    assert [len(p.models) for p in pages][:2] == [3, 3]


def test_list_models_page_size_smaller_than_cap(fake):
    _, mdl = clients(fake)
    pages = list(mdl.list_models(glm.ListModelsRequest(page_size=5), timeout=T,
                                 retry=None).pages)
    assert sum(len(p.models) for p in pages) == len(DEFAULT_MODELS)
    assert len(pages[0].models) == 5 and not pages[-1].next_page_token


def test_get_model(fake):
    _, mdl = clients(fake)
    m = mdl.get_model(name="models/gemini-2.5-pro", timeout=T, retry=None)
    assert (m.input_token_limit, m.output_token_limit) == (1048576, 65536)
    assert "generateContent" in m.supported_generation_methods   # (0.6.15 Model has no "thinking")
    with pytest.raises(gx.NotFound):
        mdl.get_model(name="models/nope", timeout=T, retry=None)
    assert [c.status for c in fake.calls] == [200, 404]


def test_generate_ok(fake):
    r = generate(fake, text="hello there world")
    assert text_of(r) == "[gemini-2.5-flash] hello there world"
    assert r.candidates[0].finish_reason == glm.Candidate.FinishReason.STOP
    u = r.usage_metadata
    assert (u.prompt_token_count, u.candidates_token_count, u.total_token_count) == (3, 4, 7)
    assert r.model_version == "gemini-2.5-flash"


def test_generate_via_generativeai_wrapper(fake):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import google.generativeai as genai
    resp = genai.types.GenerateContentResponse.from_response(generate(fake, model="gemma-3-27b-it"))
    assert resp.text == "[gemma-3-27b-it] hello there world"


def test_generate_max_tokens_and_json(fake):
    r = generate(fake, text="one two three four five", max_output_tokens=3)
    assert text_of(r) == "[gemini-2.5-flash] one two"
    assert r.candidates[0].finish_reason == glm.Candidate.FinishReason.MAX_TOKENS
    r = generate(fake, text="hi", response_mime_type="application/json")
    assert json.loads(text_of(r)) == {"model": "gemini-2.5-flash", "echo": "hi"}


def test_stream_ok(fake):
    chunks = stream(fake, text="a b c d e")
    assert 2 <= len(chunks) <= 3
    assert "".join(text_of(c) for c in chunks) == "[gemini-2.5-flash] a b c d e"
    assert chunks[-1].candidates[0].finish_reason == glm.Candidate.FinishReason.STOP
    assert all(c.candidates[0].finish_reason == 0 for c in chunks[:-1])
    assert chunks[-1].usage_metadata.total_token_count == 5 + 6


def test_count_tokens(fake):
    gen, _ = clients(fake)
    r = gen.count_tokens(glm.CountTokensRequest(
        model="models/gemini-2.0-flash", contents=[{"parts": [{"text": "a b c d"}]}]),
        timeout=T, retry=None)
    assert r.total_tokens == 4


def test_unknown_or_unsupported_model_is_404(fake):
    for model in ("no-such-model", "text-embedding-004", "imagen-4.0-generate-001"):
        with pytest.raises(gx.NotFound, match="not found for API version v1beta"):
            generate(fake, model=model)
    fake.models.append(make_models(1, prefix="late")[0])      # models is live
    assert text_of(generate(fake, model="late-000")).startswith("[late-000] ")


def test_missing_key_is_403(fake):
    r = requests.get(fake.url + "/v1beta/models", timeout=T)
    assert r.status_code == 403 and r.json()["error"]["status"] == "PERMISSION_DENIED"
    assert fake.calls[0].key is None


# ------------------------------------------------------------------ error behaviours

ERRORS = {
    "invalid_key": gx.BadRequest, "unauthorized": gx.Unauthorized, "forbidden": gx.Forbidden,
    "rate_minute": gx.TooManyRequests, "rate_day": gx.TooManyRequests,
    "rate_plain": gx.TooManyRequests, "not_found": gx.NotFound, "bad_request": gx.BadRequest,
    "error500": gx.InternalServerError, "unavailable": gx.ServiceUnavailable,
    "gateway_timeout": gx.GatewayTimeout, "html502": gx.BadGateway,
    "nonjson_error": gx.InternalServerError, "stream_break": gx.InternalServerError,
    "stream_truncate": gx.InternalServerError, "stream_error_after_stop": gx.InternalServerError,
    "key_expired": gx.BadRequest, "leaked": gx.Forbidden, "suspended": gx.Forbidden,
    "key_blocked": gx.Forbidden, "no_permission": gx.Forbidden, "location": gx.BadRequest,
    "billing": gx.BadRequest, "rate_tokens": gx.TooManyRequests, "rate_zero": gx.TooManyRequests,
    "credits_depleted": gx.TooManyRequests, "no_longer_available": gx.NotFound,
    "no_system_instruction": gx.BadRequest, "too_long": gx.BadRequest, "no_thinking": gx.BadRequest,
}


@pytest.mark.parametrize("behaviour", sorted(ERRORS))
def test_error_behaviours_generate_and_count(fake, behaviour):
    fake.set_behaviour(behaviour)
    with pytest.raises(ERRORS[behaviour]) as ei:
        generate(fake)
    assert ei.value.code == fake.calls[-1].status
    gen, _ = clients(fake)
    with pytest.raises(ERRORS[behaviour]):
        gen.count_tokens(glm.CountTokensRequest(model="models/gemini-2.5-flash",
                                                contents=[{"parts": [{"text": "x"}]}]),
                         timeout=T, retry=None)
    if behaviour not in ("stream_break", "stream_truncate", "stream_error_after_stop"):
        with pytest.raises(ERRORS[behaviour]):     # raised at the call, before iterating
            gen.stream_generate_content(req(), timeout=T, retry=None)


def _details(e, type_suffix):
    return [d for d in e.details if d.get("@type", "").endswith(type_suffix)]


def test_error_details(fake):
    fake.set_behaviour("invalid_key", key="key-a")
    fake.set_behaviour("bad_request", key="key-b", message="Request payload size exceeds")
    fake.set_behaviour("forbidden", key="key-c", reason="API_KEY_SERVICE_BLOCKED")
    fake.set_behaviour("rate_plain", key="key-d")
    with pytest.raises(gx.BadRequest) as ei:
        generate(fake, key="key-a")
    assert _details(ei.value, "ErrorInfo")[0]["reason"] == "API_KEY_INVALID"
    assert "API key not valid" in ei.value.message and "key-a" not in str(ei.value)
    with pytest.raises(gx.BadRequest) as ei:
        generate(fake, key="key-b")
    assert not _details(ei.value, "ErrorInfo") and _details(ei.value, "BadRequest")
    assert "Request payload size exceeds" in ei.value.message
    with pytest.raises(gx.Forbidden) as ei:
        generate(fake, key="key-c")
    assert _details(ei.value, "ErrorInfo")[0]["reason"] == "API_KEY_SERVICE_BLOCKED"
    assert ei.value.response.json()["error"]["status"] == "PERMISSION_DENIED"
    with pytest.raises(gx.TooManyRequests) as ei:
        generate(fake, key="key-d")
    assert list(ei.value.details) == [] and "details" not in ei.value.response.json()["error"]


@pytest.mark.parametrize("behaviour,window,delay", [
    ("rate_minute", "PerMinute", "26s"), ("rate_day", "PerDay", "36s")])
def test_429_details(fake, behaviour, window, delay):
    fake.set_behaviour(behaviour, model="gemini-2.0-flash")
    with pytest.raises(gx.TooManyRequests) as ei:
        generate(fake, model="gemini-2.0-flash")
    e = ei.value
    assert not isinstance(e, gx.ResourceExhausted)
    v = _details(e, "QuotaFailure")[0]["violations"][0]
    assert window in v["quotaId"] and v["quotaDimensions"]["model"] == "gemini-2.0-flash"
    assert _details(e, "RetryInfo")[0]["retryDelay"] == delay
    assert e.response.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert "Please retry in" in e.message
    fake.set_behaviour(behaviour, retry_delay="5s")
    with pytest.raises(gx.TooManyRequests) as ei:
        generate(fake)
    assert _details(ei.value, "RetryInfo")[0]["retryDelay"] == "5s"


def test_blocked_safety_no_candidates_empty(fake):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import google.generativeai as genai
    wrap = genai.types.GenerateContentResponse.from_response

    fake.set_behaviour("blocked", block_reason="PROHIBITED_CONTENT")
    r = generate(fake)
    assert not r.candidates
    assert r.prompt_feedback.block_reason == \
        glm.GenerateContentResponse.PromptFeedback.BlockReason.PROHIBITED_CONTENT
    with pytest.raises(ValueError):
        wrap(r).text
    assert stream(fake)[0].prompt_feedback.block_reason != 0

    fake.set_behaviour("safety")
    r = generate(fake)
    assert r.candidates[0].finish_reason == glm.Candidate.FinishReason.SAFETY
    assert not r.candidates[0].content.parts and r.candidates[0].safety_ratings
    with pytest.raises(ValueError):
        wrap(r).text

    fake.set_behaviour("no_candidates")
    r = generate(fake)
    assert not r.candidates and r.usage_metadata.prompt_token_count == 3
    assert not r.prompt_feedback.block_reason

    fake.set_behaviour("empty200")
    with pytest.raises(ParseError):
        generate(fake)
    assert stream(fake) == []


def test_stream_break_and_truncate(fake):
    fake.set_behaviour("stream_break")
    chunks = stream(fake)
    assert text_of(chunks[0]) and chunks[0].candidates[0].finish_reason == 0
    # the {"error": ...} element is swallowed by the SDK as an empty response
    assert len(chunks) == 2 and not chunks[1].candidates
    assert not any(c.candidates and c.candidates[0].finish_reason for c in chunks)

    fake.set_behaviour("stream_truncate")
    gen, _ = clients(fake)
    it = gen.stream_generate_content(req(), timeout=T, retry=None)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for _ in it:
            pass
    assert fake.calls[-1].status == 200


# ------------------------------------------------------------------ rules

def test_times_expiry(fake):
    fake.set_behaviour("unavailable", times=2)
    for _ in range(2):
        with pytest.raises(gx.ServiceUnavailable):
            generate(fake)
    assert text_of(generate(fake))


def test_flaky_draws_from_its_seeded_rng_and_fails_fast(fake):
    fake.set_latency(0.2)
    fake.set_behaviour("flaky", rate=0.5, seed=1234)
    draws = random.Random(1234)
    expected = [draws.random() < 0.5 for _ in range(40)]   # one draw per call, like the fake
    failed, fast, slow = 0, [], []
    for _ in range(40):
        t0 = time.monotonic()
        try:
            assert text_of(generate(fake)) == "[gemini-2.5-flash] hello there world"
            slow.append(time.monotonic() - t0)
        except gx.ServiceUnavailable as e:
            assert e.message.endswith(": The model is overloaded. Please try again later.")
            failed += 1
            fast.append(time.monotonic() - t0)
    assert failed == sum(expected) and 10 <= failed <= 30
    assert [c.status for c in fake.calls] == [503 if x else 200 for x in expected]
    assert max(fast) < 0.15 and min(slow) >= 0.2      # only the answers carry the latency


def test_precedence(fake):
    fake.set_behaviour("error500")                                      # global
    fake.set_behaviour("rate_minute", model="models/gemini-2.0-flash")  # model only
    fake.set_behaviour("forbidden", key="k1")                           # key only
    fake.set_behaviour("not_found", key="k1", model="gemini-2.0-flash")  # key + model
    with pytest.raises(gx.NotFound):
        generate(fake, key="k1", model="gemini-2.0-flash")
    with pytest.raises(gx.Forbidden):
        generate(fake, key="k1", model="gemini-2.5-flash")
    with pytest.raises(gx.TooManyRequests):
        generate(fake, key="k2", model="gemini-2.0-flash")
    with pytest.raises(gx.InternalServerError):
        generate(fake, key="k2", model="gemini-2.5-flash")
    # an expiring specific rule falls back to the next one
    fake.set_behaviour("ok", key="k3", times=1)
    assert text_of(generate(fake, key="k3"))
    with pytest.raises(gx.InternalServerError):
        generate(fake, key="k3")
    # same (key, model) replaces
    fake.set_behaviour("ok", key="k1", model="gemini-2.0-flash")
    assert text_of(generate(fake, key="k1", model="gemini-2.0-flash"))
    fake.clear_behaviours()
    assert text_of(generate(fake, key="k1"))


def test_listing_sees_only_key_level_listing_behaviours(fake):
    fake.set_behaviour("rate_minute", times=1)              # not a listing behaviour
    fake.set_behaviour("invalid_key", key="bad")
    fake.set_behaviour("error500", model="gemini-2.5-pro")   # model rule: ignored by get
    _, good = clients(fake, "good")
    _, bad = clients(fake, "bad")
    assert len(list(good.list_models(timeout=T, retry=None))) == len(DEFAULT_MODELS)
    assert good.get_model(name="models/gemini-2.5-pro", timeout=T, retry=None).name
    with pytest.raises(gx.BadRequest):
        list(bad.list_models(timeout=T, retry=None))
    with pytest.raises(gx.TooManyRequests):                 # the times=1 rule is still there
        generate(fake, key="good")
    assert LISTING_BEHAVIOURS <= BEHAVIOURS


def test_request_log(fake):
    generate(fake, key="k1")
    generate(fake, key="k1", model="gemini-2.0-flash")
    stream(fake, key="k2")
    fake.set_behaviour("rate_plain", key="k2")
    with pytest.raises(gx.TooManyRequests):
        generate(fake, key="k2")
    assert fake.count() == 4
    assert fake.count(key="k1") == 2
    assert fake.count(model="models/gemini-2.5-flash") == 3
    assert fake.count(key="k2", action=("generate", "stream")) == 2
    assert fake.count(action="stream") == 1
    c = fake.calls[-1]
    assert (c.method, c.key, c.model, c.action, c.status) == ("POST", "k2", "gemini-2.5-flash",
                                                              "generate", 429)
    assert c.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert c.body["contents"][0]["parts"][0]["text"] == "hello there world"
    fake.reset_log()
    assert fake.count() == 0


# ------------------------------------------------------------------ timing, concurrency, lifecycle

def test_hang_timeout_and_prompt_stop():
    fake = FakeGemini().start()
    try:
        fake.set_behaviour("hang")
        gen, _ = clients(fake)
        t0 = time.monotonic()
        with pytest.raises(requests.exceptions.ReadTimeout):
            gen.generate_content(req(), timeout=0.5, retry=None)
        assert time.monotonic() - t0 < 1.5
        # a request still hanging while stop() is called
        errors = []
        th = threading.Thread(target=lambda: errors.append(
            pytest.raises(Exception, gen.generate_content, req(), timeout=30, retry=None)))
        th.start()
        while fake.count() < 2:
            time.sleep(0.01)
    finally:
        t0 = time.monotonic()
        fake.stop()
        assert time.monotonic() - t0 < 1.0
    th.join(5)
    assert not th.is_alive() and errors          # the client saw the connection drop
    assert [c.status for c in fake.calls] == [0, 0]


def test_slow_and_latency_overlap(fake):
    fake.set_latency(0.3)
    fake.set_latency(0.0, model="gemini-2.0-flash")
    results = []

    def one(i):
        results.append(text_of(generate(fake, key=f"k{i}", text=str(i))))

    t0 = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 16 and time.monotonic() - t0 < 1.5   # not 16 * 0.3 s
    t0 = time.monotonic()
    generate(fake, model="gemini-2.0-flash")
    assert time.monotonic() - t0 < 0.25
    fake.set_behaviour("slow", model="gemini-2.0-flash", seconds=0.3)
    t0 = time.monotonic()
    assert text_of(generate(fake, model="gemini-2.0-flash"))
    assert time.monotonic() - t0 >= 0.3


def test_keep_alive_framing(fake):
    """Several requests, including a chunked stream and errors, on one HTTP/1.1 connection."""
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=T)
    body = json.dumps({"contents": [{"role": "user", "parts": [{"text": "x y"}]}]})
    hdr = {"x-goog-api-key": "k", "Content-Type": "application/json"}
    q = "?%24alt=json%3Benum-encoding%3Dint"
    fake.set_behaviour("rate_minute", times=1)
    for verb, status in [("generateContent", 429), ("streamGenerateContent", 200),
                         ("generateContent", 200), ("countTokens", 200)]:
        conn.request("POST", f"/v1beta/models/gemini-2.5-flash:{verb}{q}", body, hdr)
        r = conn.getresponse()
        data = json.loads(r.read())
        assert r.status == status and not r.will_close
    assert data == {"totalTokens": 2}
    assert len(fake._conns) == 1
    conn.close()


def test_enum_numbers_match_sdk():
    enums = {"finishReason": glm.Candidate.FinishReason,
             "blockReason": glm.GenerateContentResponse.PromptFeedback.BlockReason,
             "category": glm.HarmCategory, "probability": glm.SafetyRating.HarmProbability}
    for field, cls in enums.items():
        for name, num in _ENUMS[field].items():
            assert cls[name].value == num, (field, name)
    # the newer values really are unknown to the pinned protos (by name and by number)
    for field, values in _NEWER_ENUMS.items():
        for name, num in values.items():
            assert name not in enums[field].__members__
            assert num not in {m.value for m in enums[field]}
    assert _NEWER_ENUMS == {"finishReason": {"UNEXPECTED_TOOL_CALL": 12}}
    assert (_ENUMS["finishReason"]["IMAGE_SAFETY"], _ENUMS["blockReason"]["IMAGE_SAFETY"]) == (11, 5)


def test_models_catalogue():
    names = {m["name"] for m in DEFAULT_MODELS}
    for n in ("gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.5-flash-lite", "gemini-2.0-flash",
              "gemini-2.0-flash-lite", "gemma-3-27b-it", "text-embedding-004",
              "gemini-embedding-001", "imagen-4.0-generate-001", "gemini-2.5-flash-preview-tts",
              "gemini-2.0-flash-preview-image-generation", "aqa"):
        assert f"models/{n}" in names
    sims = make_models(5)
    assert [m["name"] for m in sims][:2] == ["models/sim-model-000", "models/sim-model-001"]
    assert [m["outputTokenLimit"] for m in sims] == [8192, 16384, 32768, 65536, 8192]
    assert all("generateContent" in m["supportedGenerationMethods"] for m in sims)


def test_standalone_cli():
    p = subprocess.Popen(
        [sys.executable, os.path.join(os.path.dirname(__file__), "fake_gemini.py"),
         "--port", "0", "--models", "3", "--behaviour", "bad:*:invalid_key",
         "--model-latency", "sim-model-001=0.3"],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = p.stderr.readline()
        assert line.startswith("fake Gemini listening on http://127.0.0.1:")
        url = line.split()[4]
        r = requests.get(url + "/v1beta/models", headers={"x-goog-api-key": "k"}, timeout=T)
        assert [m["name"] for m in r.json()["models"]][-1] == "models/sim-model-002"
        r = requests.get(url + "/v1beta/models", headers={"x-goog-api-key": "bad"}, timeout=T)
        assert r.status_code == 400
        body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
        for model, slow in (("sim-model-000", False), ("sim-model-001", True)):
            began = time.monotonic()
            r = requests.post(f"{url}/v1beta/models/{model}:generateContent", json=body,
                              headers={"x-goog-api-key": "k"}, timeout=T)
            assert r.status_code == 200
            assert (time.monotonic() - began >= 0.3) is slow
    finally:
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=5)
    assert p.returncode == 0 and err == "" and out == ""


# ------------------------------------------------------------------ 2026: errors of the real API

def tapped(fake, key="key-a", config=None):
    """A real GenerativeServiceClient whose requests also carry `config` in generationConfig
    (JSON the 0.6.15 protos cannot hold, sent the way the router sends `seed`), and the list of
    the raw HTTP responses it got (to read fields the protos drop)."""
    gen, _ = clients(fake, key)
    session = gen._transport._session
    send = session.request
    seen = []

    def request(method, url, data=None, **kw):
        if config and data:
            body = json.loads(data)
            body.setdefault("generationConfig", {}).update(config)
            data = json.dumps(body)
        resp = send(method, url, data=data, **kw)
        seen.append(resp)
        return resp
    session.request = request
    return gen, seen


def raw_post(fake, model, body, key="key-a", verb="generateContent", int_enums=True):
    q = "?%24alt=json%3Benum-encoding%3Dint" if int_enums else ""
    return requests.post(f"{fake.url}/v1beta/models/{model}:{verb}{q}", json=body,
                         headers={"x-goog-api-key": key}, timeout=T)


PROMPT = {"contents": [{"role": "user", "parts": [{"text": "hello there world"}]}]}

# behaviour, params -> (exception, body status, exact message, ErrorInfo reasons)
REAL_ERRORS = [
    ("key_expired", {}, gx.BadRequest, "INVALID_ARGUMENT",
     "API key expired. Please renew the API key.", ["API_KEY_INVALID"]),
    ("leaked", {}, gx.Forbidden, "PERMISSION_DENIED",
     "Your API key was reported as leaked. Please use another API key.", None),
    ("suspended", {}, gx.Forbidden, "PERMISSION_DENIED",
     "Permission denied: Consumer 'api_key:REDACTED' has been suspended.",
     ["CONSUMER_SUSPENDED"]),
    ("key_blocked", {}, gx.Forbidden, "PERMISSION_DENIED",
     "Requests to this API generativelanguage.googleapis.com method "
     "google.ai.generativelanguage.v1beta.GenerativeService.GenerateContent are blocked.",
     ["API_KEY_SERVICE_BLOCKED"]),
    ("no_permission", {}, gx.Forbidden, "PERMISSION_DENIED",
     "The caller does not have permission", None),
    ("location", {}, gx.BadRequest, "FAILED_PRECONDITION",
     "User location is not supported for the API use.", None),
    ("billing", {}, gx.BadRequest, "FAILED_PRECONDITION",
     "Gemini API free tier is not available in your country. Please enable billing on your "
     "project in Google AI Studio.", None),
    ("billing", {"variant": "no_billing_account"}, gx.BadRequest, "FAILED_PRECONDITION",
     "The Gemini API cannot be used without a billing account linked to your project. Please "
     "link a billing account to your project in Google AI Studio.", None),
    ("credits_depleted", {}, gx.TooManyRequests, "RESOURCE_EXHAUSTED",
     "Your prepayment credits are depleted. Please go to AI Studio at "
     "https://ai.studio/projects to manage your project and billing.", None),
    ("no_longer_available", {}, gx.NotFound, "NOT_FOUND",
     "This model models/gemini-2.5-flash is no longer available to new users. Please update "
     "your code to use a newer model for the latest features and improvements.", None),
    ("no_system_instruction", {}, gx.BadRequest, "INVALID_ARGUMENT",
     "Developer instruction is not enabled for models/gemini-2.5-flash", None),
    ("too_long", {}, gx.BadRequest, "INVALID_ARGUMENT",
     "The input token count (1048577) exceeds the maximum number of tokens allowed (1048576).",
     None),
    ("too_long", {"tokens": 40000, "limit": 32768}, gx.BadRequest, "INVALID_ARGUMENT",
     "The input token count (40000) exceeds the maximum number of tokens allowed (32768).",
     None),
    ("no_thinking", {}, gx.BadRequest, "INVALID_ARGUMENT",
     "Thinking is not supported by this model.", None),
]


@pytest.mark.parametrize("behaviour,params,exc,status,message,reasons", REAL_ERRORS,
                         ids=[f"{r[0]}{'-' + '-'.join(map(str, r[1].values())) if r[1] else ''}"
                              for r in REAL_ERRORS])
def test_real_error_bodies(fake, behaviour, params, exc, status, message, reasons):
    fake.set_behaviour(behaviour, **params)
    with pytest.raises(exc) as ei:
        generate(fake, key="AIzaSySECRET-KEY-0123456789")
    e = ei.value
    err = e.response.json()["error"]
    assert (err["code"], err["status"], err["message"]) == (e.code, status, message)
    if reasons is None:
        assert "details" not in err and list(e.details) == []
    else:
        assert [d["reason"] for d in _details(e, "ErrorInfo")] == reasons
    assert "SECRET" not in e.response.text
    gen, _ = clients(fake)
    with pytest.raises(exc):                        # streams fail at the call, before iterating
        gen.stream_generate_content(req(), timeout=T, retry=None)


def test_key_errors_also_refuse_listing(fake):
    fake.set_behaviour("leaked", key="bad")
    fake.set_behaviour("location", key="far")
    fake.set_behaviour("no_permission", key="good")          # per model in reality: not listing
    for key, exc in (("bad", gx.Forbidden), ("far", gx.BadRequest)):
        _, mdl = clients(fake, key)
        with pytest.raises(exc):
            list(mdl.list_models(timeout=T, retry=None))
    _, mdl = clients(fake, "good")
    assert len(list(mdl.list_models(timeout=T, retry=None))) == len(DEFAULT_MODELS)
    assert {"leaked", "suspended", "key_blocked", "key_expired", "location"} <= LISTING_BEHAVIOURS


def _violations(e):
    return [v for d in _details(e, "QuotaFailure") for v in d["violations"]]


def _types(e):
    return [d["@type"].rsplit(".", 1)[1] for d in e.details]


def test_rate_tokens(fake):
    fake.set_behaviour("rate_tokens", model="gemini-2.0-flash")
    with pytest.raises(gx.TooManyRequests) as ei:
        generate(fake, model="gemini-2.0-flash")
    e = ei.value
    assert _violations(e) == [{
        "quotaMetric": "generativelanguage.googleapis.com/"
                       "generate_content_free_tier_input_token_count",
        "quotaId": "GenerateContentInputTokensPerModelPerMinute-FreeTier",
        "quotaDimensions": {"location": "global", "model": "gemini-2.0-flash"},
        "quotaValue": "250000"}]
    assert _types(e) == ["QuotaFailure", "Help", "RetryInfo"]
    assert _details(e, "RetryInfo")[0]["retryDelay"] == "26s"
    assert "limit: 250000, model: gemini-2.0-flash\nPlease retry in 26.5s." in e.message

    fake.set_behaviour("rate_tokens", quota_id="GenerateContentPaidTierInputTokensPerModelPerMinute",
                       quota_value=1000000, no_retry_info=True)
    with pytest.raises(gx.TooManyRequests) as ei:
        generate(fake)
    e = ei.value
    v = _violations(e)[0]
    assert (v["quotaId"], v["quotaValue"], v["quotaMetric"]) == (
        "GenerateContentPaidTierInputTokensPerModelPerMinute", "1000000",
        "generativelanguage.googleapis.com/generate_content_paid_tier_input_token_count")
    assert _types(e) == ["QuotaFailure", "Help"]
    assert "limit: 1000000" in e.message and "retry in" not in e.message


def test_rate_minute_and_day_shapes(fake):
    fake.set_behaviour("rate_minute", help_first=True, quota_value=5,
                       quota_id="GenerateRequestsPerMinutePerProjectPerModel")
    with pytest.raises(gx.TooManyRequests) as ei:
        generate(fake)
    e = ei.value
    assert _types(e) == ["Help", "QuotaFailure", "RetryInfo"]
    v = _violations(e)[0]
    assert (v["quotaId"], v["quotaValue"], v["quotaMetric"]) == (
        "GenerateRequestsPerMinutePerProjectPerModel", "5",
        "generativelanguage.googleapis.com/generate_requests_per_model")
    assert "limit: 5, model: gemini-2.5-flash" in e.message
    assert e.message.endswith("Please retry in 26.5s.")
    fake.set_behaviour("rate_day")
    with pytest.raises(gx.TooManyRequests) as ei:
        generate(fake)
    e = ei.value
    assert _types(e) == ["QuotaFailure", "Help", "RetryInfo"]
    assert (_violations(e)[0]["quotaId"], _violations(e)[0]["quotaValue"]) == (
        "GenerateRequestsPerDayPerProjectPerModel-FreeTier", "250")
    assert "limit: 250," in e.message and e.message.endswith("Please retry in 36.5s.")


def test_rate_zero(fake):
    fake.set_behaviour("rate_zero", model="gemini-2.5-pro")
    with pytest.raises(gx.TooManyRequests) as ei:
        generate(fake, model="gemini-2.5-pro")
    e = ei.value
    assert _types(e) == ["Help", "QuotaFailure", "RetryInfo"]
    vs = _violations(e)
    assert [v["quotaId"] for v in vs] == [
        "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
        "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
        "GenerateContentInputTokensPerModelPerMinute-FreeTier"]
    assert not any("quotaValue" in v for v in vs)
    assert all(v["quotaDimensions"]["model"] == "gemini-2.5-pro" for v in vs)
    assert e.message.count("limit: 0, model: gemini-2.5-pro\n") == 3
    assert _details(e, "RetryInfo")[0]["retryDelay"] == "45s"


def test_no_longer_available_and_removed_models(fake):
    fake.set_behaviour("no_longer_available", model="gemini-2.0-flash")
    with pytest.raises(gx.NotFound, match="no longer available to new users"):
        generate(fake, model="gemini-2.0-flash")
    _, mdl = clients(fake)
    assert mdl.get_model(name="models/gemini-2.0-flash", timeout=T, retry=None).name == \
        "models/gemini-2.0-flash"
    assert "models/gemini-2.0-flash" in [m.name for m in mdl.list_models(timeout=T, retry=None)]

    assert fake.remove_model("models/gemini-2.5-pro") is True
    assert fake.remove_model("gemini-2.5-pro") is False
    assert "models/gemini-2.5-pro" not in [m.name for m in mdl.list_models(timeout=T, retry=None)]
    with pytest.raises(gx.NotFound, match="not found for API version v1beta"):
        mdl.get_model(name="models/gemini-2.5-pro", timeout=T, retry=None)
    with pytest.raises(gx.NotFound, match="not found for API version v1beta"):
        generate(fake, model="gemini-2.5-pro")
    assert len(DEFAULT_MODELS) == len(fake.models) + 1 and DEFAULT_MODELS[0]["name"] == \
        "models/gemini-2.5-pro"                       # the module's catalogue is untouched


# ------------------------------------------------------------------ 2026: odd 200 answers

def _wrap():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import google.generativeai as genai
    return genai.types.GenerateContentResponse.from_response


def test_empty_answer(fake):
    fake.set_behaviour("empty_answer")
    gen, seen = tapped(fake)
    r = gen.generate_content(req(), timeout=T, retry=None)
    assert seen[-1].json()["candidates"] == [
        {"content": {"role": "model"}, "finishReason": 1, "index": 0}]
    assert r.candidates[0].finish_reason == glm.Candidate.FinishReason.STOP
    assert not r.candidates[0].content.parts
    assert (r.usage_metadata.prompt_token_count, r.usage_metadata.total_token_count) == (3, 3)
    with pytest.raises(ValueError):
        _wrap()(r).text
    chunks = stream(fake)
    assert len(chunks) == 1 and not chunks[0].candidates[0].content.parts
    assert chunks[0].candidates[0].finish_reason == glm.Candidate.FinishReason.STOP


@pytest.mark.parametrize("config,params,thoughts", [
    ({"thinkingConfig": {"thinkingBudget": 50}}, {}, 50),
    ({"maxOutputTokens": 200}, {}, 200),
    ({}, {}, 1024),
    ({}, {"budget": 77}, 77),
])
def test_thinking_exhausted(fake, config, params, thoughts):
    fake.set_behaviour("thinking_exhausted", **params)
    gen, seen = tapped(fake, config=config)
    r = gen.generate_content(req(), timeout=T, retry=None)
    body = seen[-1].json()
    assert body["candidates"] == [{"content": {"role": "model"}, "finishReason": 2, "index": 0}]
    assert body["usageMetadata"] == {"promptTokenCount": 3, "totalTokenCount": 3 + thoughts,
                                     "thoughtsTokenCount": thoughts}
    assert r.candidates[0].finish_reason == glm.Candidate.FinishReason.MAX_TOKENS
    assert not r.candidates[0].content.parts and r.usage_metadata.total_token_count == 3 + thoughts
    chunks = list(gen.stream_generate_content(req(), timeout=T, retry=None))
    assert len(chunks) == 1 and chunks[0].usage_metadata.total_token_count == 3 + thoughts


@pytest.mark.filterwarnings("ignore:Unrecognized FinishReason")   # the SDK's own warning
@pytest.mark.parametrize("behaviour,finish,number", [
    ("recitation", glm.Candidate.FinishReason.RECITATION, 4),
    ("image_safety", glm.Candidate.FinishReason.IMAGE_SAFETY, 11),
    ("unexpected_tool_call", None, 12),
])
def test_finish_without_parts(fake, behaviour, finish, number):
    fake.set_behaviour(behaviour)
    gen, seen = tapped(fake)
    r = gen.generate_content(req(), timeout=T, retry=None)
    assert seen[-1].json()["candidates"] == [{"finishReason": number, "index": 0}]
    assert r.candidates[0].finish_reason == number and not r.candidates[0].content.parts
    if finish is None:                                   # unknown to the 0.6.15 protos
        assert type(r.candidates[0].finish_reason) is int
    else:
        assert r.candidates[0].finish_reason == finish
    with pytest.raises(ValueError):
        _wrap()(r).text
    chunks = stream(fake)
    assert len(chunks) == 1 and chunks[0].candidates[0].finish_reason == number
    by_name = raw_post(fake, "gemini-2.5-flash", PROMPT, int_enums=False).json()
    assert by_name["candidates"][0]["finishReason"] == behaviour.upper()


def test_recitation_with_text(fake):
    fake.set_behaviour("recitation", with_text=True)
    r = generate(fake, text="one two three four five")      # answer: 6 words -> first 3
    assert text_of(r) == "[gemini-2.5-flash] one two"
    assert r.candidates[0].finish_reason == glm.Candidate.FinishReason.RECITATION
    chunks = stream(fake, text="one two three four five")
    assert "".join(text_of(c) for c in chunks) == "[gemini-2.5-flash] one two"
    assert chunks[-1].candidates[0].finish_reason == glm.Candidate.FinishReason.RECITATION


@pytest.mark.filterwarnings("ignore:Unrecognized FinishReason")
def test_unknown_finish(fake):
    fake.set_behaviour("unknown_finish")
    r = generate(fake)
    reason = r.candidates[0].finish_reason
    assert text_of(r) == "[gemini-2.5-flash] hello there world"
    assert reason == 99 and type(reason) is int
    with pytest.raises(AttributeError):
        reason.name
    chunks = stream(fake)
    assert "".join(text_of(c) for c in chunks) == "[gemini-2.5-flash] hello there world"
    assert [c.candidates[0].finish_reason for c in chunks][-1] == 99
    assert all(c.candidates[0].finish_reason == 0 for c in chunks[:-1])
    fake.set_behaviour("unknown_finish", number=42, name="NEWER_STOP")
    assert generate(fake).candidates[0].finish_reason == 42
    by_name = raw_post(fake, "gemini-2.5-flash", PROMPT, int_enums=False).json()
    assert by_name["candidates"][0]["finishReason"] == "NEWER_STOP"
    fake.set_behaviour("unknown_finish")                  # names when enums are not asked as int
    by_name = raw_post(fake, "gemini-2.5-flash", PROMPT, int_enums=False).json()
    assert by_name["candidates"][0]["finishReason"] == "FUTURE_REASON"


@pytest.mark.filterwarnings("ignore:Unrecognized BlockReason")
def test_unknown_block(fake):
    fake.set_behaviour("unknown_block")
    r = generate(fake)
    assert not r.candidates
    assert r.prompt_feedback.block_reason == 7 and type(r.prompt_feedback.block_reason) is int
    assert stream(fake)[0].prompt_feedback.block_reason == 7
    fake.set_behaviour("unknown_block", number=9)
    assert generate(fake).prompt_feedback.block_reason == 9
    by_name = raw_post(fake, "gemini-2.5-flash", PROMPT, int_enums=False).json()
    assert by_name["promptFeedback"]["blockReason"] == "FUTURE_BLOCK"
    fake.set_behaviour("blocked", block_reason="IMAGE_SAFETY")
    assert generate(fake).prompt_feedback.block_reason == \
        glm.GenerateContentResponse.PromptFeedback.BlockReason.IMAGE_SAFETY


def test_stream_error_after_stop(fake):
    fake.set_behaviour("stream_error_after_stop")
    chunks = stream(fake, text="a b c d e")
    assert "".join(text_of(c) for c in chunks) == "[gemini-2.5-flash] a b c d e"
    finals = [c for c in chunks if c.candidates and c.candidates[0].finish_reason]
    assert len(finals) == 1 and finals[0].usage_metadata.total_token_count == 11
    # the error element comes after the STOP one and is swallowed as an empty chunk
    assert chunks[-2] is finals[0] and not chunks[-1].candidates
    elems = raw_post(fake, "gemini-2.5-flash", PROMPT, verb="streamGenerateContent").json()
    assert elems[-2]["candidates"][0]["finishReason"] == 1
    assert elems[-1] == {"error": {"code": 500, "status": "INTERNAL", "message": (
        "An internal error has occurred. Please retry or report in "
        "https://developers.generativeai.google/guide/troubleshooting")}}
    assert fake.calls[-1].status == 200


# ------------------------------------------------------------------ natural triggers

def _system_req(model, system="Be brief.", text="hello there world"):
    r = req(model=model, text=text)
    r.system_instruction = glm.Content(parts=[glm.Part(text=system)])
    return r


def test_gemma_refuses_system_instruction(fake):
    gen, _ = clients(fake)
    with pytest.raises(gx.BadRequest) as ei:
        gen.generate_content(_system_req("gemma-3-27b-it"), timeout=T, retry=None)
    assert ei.value.response.json()["error"]["message"] == \
        "Developer instruction is not enabled for models/gemma-3-27b-it"
    assert fake.calls[-1].body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    with pytest.raises(gx.BadRequest):
        gen.stream_generate_content(_system_req("gemma-3-27b-it"), timeout=T, retry=None)
    # without a system instruction, and on a Gemini model, it answers
    assert text_of(generate(fake, model="gemma-3-27b-it")) == "[gemma-3-27b-it] hello there world"
    r = gen.generate_content(_system_req("gemini-2.5-flash"), timeout=T, retry=None)
    assert text_of(r) == "[gemini-2.5-flash] hello there world"
    # a rule wins over the natural answer; so does natural_errors = False
    fake.set_behaviour("empty_answer", model="gemma-3-27b-it", times=1)
    r = gen.generate_content(_system_req("gemma-3-27b-it"), timeout=T, retry=None)
    assert r.candidates[0].finish_reason == 1 and not r.candidates[0].content.parts
    fake.natural_errors = False
    r = gen.generate_content(_system_req("gemma-3-27b-it"), timeout=T, retry=None)
    assert text_of(r) == "[gemma-3-27b-it] hello there world"


def test_input_longer_than_the_model_limit(fake):
    fake.models[0]["inputTokenLimit"] = 5            # gemini-2.5-pro
    with pytest.raises(gx.BadRequest) as ei:
        generate(fake, model="gemini-2.5-pro", text="a b c d e f")
    assert ei.value.response.json()["error"]["message"] == \
        "The input token count (6) exceeds the maximum number of tokens allowed (5)."
    assert text_of(generate(fake, model="gemini-2.5-pro", text="a b c d e")) == \
        "[gemini-2.5-pro] a b c d e"
    gen, _ = clients(fake)                            # the system instruction counts too
    with pytest.raises(gx.BadRequest, match=r"\(7\) exceeds .* \(5\)"):
        gen.generate_content(_system_req("gemini-2.5-pro", system="two words", text="a b c d e"),
                             timeout=T, retry=None)
    assert [c.status for c in fake.calls] == [400, 200, 400]


def test_thinking_config_on_a_model_without_thinking(fake):
    gen, _ = tapped(fake, config={"thinkingConfig": {"thinkingBudget": 64}})
    with pytest.raises(gx.BadRequest) as ei:
        gen.generate_content(req(model="gemini-2.0-flash"), timeout=T, retry=None)
    assert ei.value.response.json()["error"]["message"] == \
        "Thinking is not supported by this model."
    assert fake.calls[-1].body["generationConfig"]["thinkingConfig"] == {"thinkingBudget": 64}
    assert text_of(gen.generate_content(req(), timeout=T, retry=None)).startswith(
        "[gemini-2.5-flash]")


# ------------------------------------------------------------------ thinking

@pytest.mark.parametrize("thinking,thoughts", [
    ({"thinkingBudget": 100}, 8), ({"thinkingBudget": 3}, 3), ({"thinkingBudget": 0}, 0),
    ({"thinkingBudget": -1}, 8), ({"thinkingLevel": "low"}, 4), ({"thinkingLevel": "high"}, 8),
    ({}, 8),
])
def test_thinking_usage(fake, thinking, thoughts):
    gen, seen = tapped(fake, config={"thinkingConfig": thinking, "seed": 7})
    r = gen.generate_content(req(), timeout=T, retry=None)
    usage = seen[-1].json()["usageMetadata"]
    expected = {"promptTokenCount": 3, "candidatesTokenCount": 4, "totalTokenCount": 7 + thoughts}
    if thoughts:
        expected["thoughtsTokenCount"] = thoughts
    assert usage == expected
    assert r.usage_metadata.total_token_count == 7 + thoughts
    assert text_of(r) == "[gemini-2.5-flash] hello there world"
    assert fake.calls[-1].body["generationConfig"] == {"thinkingConfig": thinking, "seed": 7}


def test_include_thoughts(fake):
    gen, seen = tapped(fake, config={"thinkingConfig": {"includeThoughts": True}})
    r = gen.generate_content(req(), timeout=T, retry=None)
    assert seen[-1].json()["candidates"][0]["content"]["parts"] == [
        {"text": "thinking...", "thought": True}, {"text": "[gemini-2.5-flash] hello there world"}]
    assert [p.text for p in r.candidates[0].content.parts] == [
        "thinking...", "[gemini-2.5-flash] hello there world"]     # the protos drop "thought"
    chunks = list(gen.stream_generate_content(req(), timeout=T, retry=None))
    assert text_of(chunks[0]) == "thinking..." and chunks[0].candidates[0].finish_reason == 0
    assert "".join(text_of(c) for c in chunks[1:]) == "[gemini-2.5-flash] hello there world"
    assert chunks[-1].usage_metadata.total_token_count == 7 + 8


def test_thoughts_share_the_output_budget(fake):
    gen, seen = tapped(fake, config={"thinkingConfig": {"thinkingBudget": 8},
                                     "maxOutputTokens": 10})
    r = gen.generate_content(req(text="a b c d e f"), timeout=T, retry=None)
    assert text_of(r) == "[gemini-2.5-flash] a"       # 10 - 8 thoughts = 2 words
    assert r.candidates[0].finish_reason == glm.Candidate.FinishReason.MAX_TOKENS
    assert seen[-1].json()["usageMetadata"]["thoughtsTokenCount"] == 8
    gen, seen = tapped(fake, config={"thinkingConfig": {"thinkingBudget": 8},
                                     "maxOutputTokens": 8})
    r = gen.generate_content(req(), timeout=T, retry=None)
    assert not r.candidates[0].content.parts and r.candidates[0].finish_reason == 2
    assert seen[-1].json()["usageMetadata"] == {"promptTokenCount": 3, "totalTokenCount": 11,
                                                "thoughtsTokenCount": 8}


# ------------------------------------------------------------------ projects

def test_project_rules_and_log(fake):
    fake.set_project("alpha", keys=["k1", "k2"])
    fake.set_project("beta", keys=["k3"])
    fake.set_behaviour("billing", project="alpha")
    for key in ("k1", "k2"):
        with pytest.raises(gx.BadRequest, match="free tier is not available"):
            generate(fake, key=key)
    assert text_of(generate(fake, key="k3")) and text_of(generate(fake, key="k4"))
    assert [c.project for c in fake.calls] == ["alpha", "alpha", "beta", None]
    assert (fake.count(project="alpha"), fake.count(project="beta"), fake.count()) == (2, 1, 4)
    assert fake.project_of("k2") == "alpha" and fake.project_of("k4") is None
    # set_project names exactly the project's keys: k2 leaves alpha
    fake.set_project("alpha", keys=["k1"])
    assert fake.project_of("k2") is None and text_of(generate(fake, key="k2"))
    fake.set_project("beta", keys=["k3", "k1"])               # a key moves between projects
    assert fake.project_of("k1") == "beta" and text_of(generate(fake, key="k1"))
    with pytest.raises(ValueError):
        fake.set_behaviour("ok", key="k1", project="beta")


def test_project_precedence(fake):
    """(key, model) > (project, model) > key > project > model > global."""
    fake.set_project("p", keys=["k1", "k2"])
    fake.set_behaviour("error500")                                        # global
    fake.set_behaviour("unavailable", model="gemini-2.0-flash")           # model
    fake.set_behaviour("leaked", project="p")                             # project
    fake.set_behaviour("location", key="k2")                              # key
    fake.set_behaviour("rate_zero", project="p", model="gemini-2.0-flash")  # project + model
    fake.set_behaviour("not_found", key="k2", model="gemini-2.0-flash")   # key + model
    cases = [("k2", "gemini-2.0-flash", gx.NotFound), ("k1", "gemini-2.0-flash", gx.TooManyRequests),
             ("k2", "gemini-2.5-flash", gx.BadRequest), ("k1", "gemini-2.5-flash", gx.Forbidden),
             ("k9", "gemini-2.0-flash", gx.ServiceUnavailable),
             ("k9", "gemini-2.5-flash", gx.InternalServerError)]
    for key, model, exc in cases:
        with pytest.raises(exc):
            generate(fake, key=key, model=model)
    # listing sees the project's listing behaviours
    _, mdl = clients(fake, "k1")
    with pytest.raises(gx.Forbidden):
        list(mdl.list_models(timeout=T, retry=None))
    fake.clear_behaviours()
    assert text_of(generate(fake, key="k1"))


def test_project_rule_times_are_shared(fake):
    fake.set_project("p", keys=["k1", "k2"])
    fake.set_behaviour("credits_depleted", project="p", times=2)
    for key in ("k1", "k2"):
        with pytest.raises(gx.TooManyRequests, match="prepayment credits are depleted"):
            generate(fake, key=key)
    assert text_of(generate(fake, key="k1"))


# ------------------------------------------------------------------ quotas

class Clock:
    def __init__(self, t):
        self.t = t

    def __call__(self):
        return self.t


def _quota_429(fake, key, model="gemini-2.5-flash", text="hello there world"):
    with pytest.raises(gx.TooManyRequests) as ei:
        generate(fake, key=key, model=model, text=text)
    return ei.value


def test_quota_rpm_per_project_and_model(fake):
    clock = Clock(1_800_000_034.0)          # 34 s into a minute: 26 s to the next one
    fake.set_clock(clock)
    fake.set_project("p", keys=["k1", "k2"])
    fake.set_quota("gemini-2.5-flash", rpm=3)
    for key in ("k1", "k2", "k1"):
        assert text_of(generate(fake, key=key))
    e = _quota_429(fake, "k2")                     # the 4th call of the project in this minute
    assert _violations(e) == [{
        "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
        "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
        "quotaDimensions": {"location": "global", "model": "gemini-2.5-flash"},
        "quotaValue": "3"}]
    assert _details(e, "RetryInfo")[0]["retryDelay"] == "26s"
    assert "limit: 3, model: gemini-2.5-flash\nPlease retry in 26s." in e.message
    assert _types(e) == ["QuotaFailure", "Help", "RetryInfo"]
    clock.t += 0.5
    e = _quota_429(fake, "k1")                    # a 429 consumes nothing, and says so exactly
    assert _details(e, "RetryInfo")[0]["retryDelay"] == "26s"
    assert e.message.endswith("Please retry in 25.5s.")
    # other projects, undeclared keys and other models have their own counters
    for _ in range(3):
        assert text_of(generate(fake, key="k3"))
    _quota_429(fake, "k3")
    assert text_of(generate(fake, key="k1", model="gemini-2.0-flash"))
    # the next minute resets it
    clock.t = 1_800_000_060.0                     # the next minute
    for key in ("k2", "k2", "k1"):
        assert text_of(generate(fake, key=key))
    _quota_429(fake, "k1")
    assert [c.status for c in fake.calls if c.project == "p" and c.model == "gemini-2.5-flash"] \
        == [200, 200, 200, 429, 429, 200, 200, 200, 429]


def test_quota_rpd_resets_at_pacific_midnight(fake):
    from zoneinfo import ZoneInfo
    la = ZoneInfo("America/Los_Angeles")
    import datetime as dt
    before_midnight = dt.datetime(2026, 3, 10, 23, 58, 30, tzinfo=la).timestamp()
    clock = Clock(before_midnight)
    fake.set_clock(clock)
    fake.set_quota(rpd=2)
    assert text_of(generate(fake)) and text_of(generate(fake))
    clock.t += 60                                   # another minute, same Pacific day
    e = _quota_429(fake, "key-a")
    v = _violations(e)[0]
    assert (v["quotaId"], v["quotaValue"]) == ("GenerateRequestsPerDayPerProjectPerModel-FreeTier",
                                               "2")
    assert _details(e, "RetryInfo")[0]["retryDelay"] == "36s"   # not the time to midnight
    assert "limit: 2, model: gemini-2.5-flash" in e.message
    assert text_of(generate(fake, model="gemini-2.0-flash"))      # per model
    clock.t += 60                                   # 00:00:30 the next day in Los Angeles
    assert text_of(generate(fake)) and text_of(generate(fake))
    _quota_429(fake, "key-a")


def test_quota_tpm_counts_prompt_words(fake):
    fake.set_clock(Clock(1_800_000_000.0))          # on the minute: 60 s to the next
    fake.set_quota("gemini-2.5-flash", tpm=10)
    assert text_of(generate(fake, text="a b c d")) and text_of(generate(fake, text="a b c d"))
    e = _quota_429(fake, "key-a", text="a b c")     # 8 + 3 > 10
    v = _violations(e)[0]
    assert (v["quotaId"], v["quotaValue"]) == (
        "GenerateContentInputTokensPerModelPerMinute-FreeTier", "10")
    assert _details(e, "RetryInfo")[0]["retryDelay"] == "60s"
    assert text_of(generate(fake, text="a b"))      # 8 + 2 fits
    _quota_429(fake, "key-a", text="x")


def test_quota_zero_paid_and_precedence(fake):
    fake.set_clock(Clock(1_800_000_050.0))
    fake.set_project("paid", keys=["k1"])
    fake.set_quota(rpm=1)                                        # every project, every model
    fake.set_quota("gemini-2.5-pro", rpm=0)                      # no free tier for pro
    fake.set_quota(rpm=2, project="paid", free_tier=False)       # the paid project: 2 per model
    e = _quota_429(fake, "k9", model="gemini-2.5-pro")
    assert [v.get("quotaValue") for v in _violations(e)] == [None, None, None]
    assert e.message.count("limit: 0") == 3 and _types(e) == ["Help", "QuotaFailure", "RetryInfo"]
    assert _details(e, "RetryInfo")[0]["retryDelay"] == "10s"
    assert text_of(generate(fake, key="k9"))
    _quota_429(fake, "k9")
    for _ in range(2):
        assert text_of(generate(fake, key="k1", model="gemini-2.5-pro"))
    e = _quota_429(fake, "k1", model="gemini-2.5-pro")
    v = _violations(e)[0]
    assert (v["quotaId"], v["quotaValue"], v["quotaMetric"]) == (
        "GenerateRequestsPerMinutePerProjectPerModel", "2",
        "generativelanguage.googleapis.com/generate_requests_per_model")
    fake.clear_quotas()
    assert text_of(generate(fake, key="k9", model="gemini-2.5-pro"))


def test_quota_counts_streams_not_counts_or_refusals(fake):
    fake.set_quota("gemini-2.5-flash", rpm=2)
    gen, _ = clients(fake)
    for _ in range(3):
        gen.count_tokens(glm.CountTokensRequest(model="models/gemini-2.5-flash",
                                                contents=[{"parts": [{"text": "x"}]}]),
                         timeout=T, retry=None)
    fake.set_behaviour("unavailable", times=1)
    with pytest.raises(gx.ServiceUnavailable):
        generate(fake)
    assert "".join(text_of(c) for c in stream(fake)) and text_of(generate(fake))
    with pytest.raises(gx.TooManyRequests):               # a 429 raised at the stream call
        gen.stream_generate_content(req(), timeout=T, retry=None)
    fake.set_quota("gemini-2.5-flash")                     # no limits: removed
    assert text_of(generate(fake))
    with pytest.raises(ValueError):
        fake.set_quota(rpm=-1)


# ------------------------------------------------------------------ the 2026 catalogue

def test_current_catalogue(fake):
    fake.models = CURRENT_MODELS
    _, mdl = clients(fake)
    names = [m.name.split("/", 1)[1] for m in mdl.list_models(timeout=T, retry=None)]
    assert names == [
        "gemini-flash-latest", "gemini-flash-lite-latest", "gemini-pro-latest",
        "gemini-3.1-pro-preview", "gemini-3-flash-preview", "gemini-2.5-flash-lite",
        "gemma-3-27b-it", "gemma-3-12b-it", "gemma-3n-e4b-it", "nano-banana-pro-preview",
        "gemini-2.5-flash-image", "gemini-robotics-er-1.5-preview", "gemini-2.5-flash-preview-tts",
        "gemini-3.5-transcribe-preview", "gemini-2.5-flash-native-audio-preview-09-2025",
        "gemini-live-2.5-flash-preview", "gemini-embedding-001"]
    by_name = {m["name"].split("/", 1)[1]: m for m in CURRENT_MODELS}
    for alias in ("gemini-flash-latest", "gemini-flash-lite-latest", "gemini-pro-latest"):
        m = by_name[alias]
        assert (m["outputTokenLimit"], m["thinking"], m["maxTemperature"]) == (65536, True, 2.0)
    for gemma in ("gemma-3-27b-it", "gemma-3-12b-it", "gemma-3n-e4b-it"):
        m = by_name[gemma]
        assert "maxTemperature" not in m and "thinking" not in m
        assert m["supportedGenerationMethods"] == ["generateContent", "countTokens"]
    assert (by_name["gemma-3n-e4b-it"]["inputTokenLimit"],
            by_name["gemma-3n-e4b-it"]["outputTokenLimit"]) == (8192, 2048)
    claims = [n for n in ("nano-banana-pro-preview", "gemini-2.5-flash-image",
                          "gemini-robotics-er-1.5-preview", "gemini-2.5-flash-preview-tts",
                          "gemini-3.5-transcribe-preview")
              if "generateContent" in by_name[n]["supportedGenerationMethods"]]
    assert len(claims) == 5
    assert by_name["gemini-embedding-001"]["supportedGenerationMethods"][0] == "embedContent"
    assert {"gemini-2.5-pro", "gemini-2.5-flash", "gemini-3-pro-preview"}.isdisjoint(by_name)
    assert text_of(generate(fake, model="gemini-flash-latest")) == \
        "[gemini-flash-latest] hello there world"
    with pytest.raises(gx.NotFound):                       # shut down
        generate(fake, model="gemini-2.5-flash")
    assert CURRENT_MODELS[0]["name"] == "models/gemini-flash-latest"   # not mutated by a test


# ------------------------------------------------------------------ standalone, 2026 options

def _standalone(*args):
    return subprocess.Popen(
        [sys.executable, os.path.join(os.path.dirname(__file__), "fake_gemini.py"),
         "--port", "0", *args], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_standalone_projects_quotas_catalogue():
    p = _standalone("--catalogue", "2026", "--project", "p=k1,k2",
                    "--quota", "p:gemini-flash-latest:rpm=1,rpd=5",
                    "--behaviour", "@p:gemma-3-27b-it:rate_minute:quota_value=7,help_first=true",
                    "--behaviour", "k3:*:unknown_finish:number=42")
    try:
        line = p.stderr.readline()
        assert line.startswith("fake Gemini listening on http://127.0.0.1:")
        url = line.split()[4]
        r = requests.get(url + "/v1beta/models", headers={"x-goog-api-key": "k"}, timeout=T)
        assert r.json()["models"][0]["name"] == "models/gemini-flash-latest"
        body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}

        def post(key, model):
            return requests.post(f"{url}/v1beta/models/{model}:generateContent?"
                                 "%24alt=json%3Benum-encoding%3Dint", json=body,
                                 headers={"x-goog-api-key": key}, timeout=T)
        assert [post(k, "gemini-flash-latest").status_code for k in ("k1", "k2", "k3")] == \
            [200, 429, 200]
        r = post("k2", "gemma-3-27b-it")
        details = r.json()["error"]["details"]
        assert details[0]["@type"].endswith("Help") and \
            details[1]["violations"][0]["quotaValue"] == "7"
        assert post("k3", "gemma-3-27b-it").json()["candidates"][0]["finishReason"] == 42
    finally:
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=5)
    assert p.returncode == 0 and err == "" and out == ""


@pytest.mark.parametrize("args,fragment", [
    (["--behaviour", "k:*:no_such"], "unknown behaviour 'no_such'"),
    (["--behaviour", "k:rate_minute"], "--behaviour wants KEY:MODEL:BEHAVIOUR"),
    (["--project", "p"], "--project wants NAME=KEY1,KEY2"),
    (["--quota", "*:rpm=x"], "--quota limits are rpm=N"),
    (["--quota", "a:b:c:d"], "--quota wants [PROJECT:]MODEL:rpm=N"),
    (["--catalogue", "1999"], "invalid choice: '1999'"),
])
def test_standalone_bad_options(args, fragment):
    p = _standalone(*args)
    out, err = p.communicate(timeout=10)
    assert p.returncode == 2 and out == "" and fragment in err and "Traceback" not in err


def test_standalone_help_lists_behaviours():
    r = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "fake_gemini.py"),
                        "--help"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0 and "--quota" in r.stdout and "--project" in r.stdout
    flat = " ".join(r.stdout.split())
    assert all(b in flat for b in ("rate_zero", "thinking_exhausted", "stream_error_after_stop"))
