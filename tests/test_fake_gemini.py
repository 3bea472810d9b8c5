"""Self-test of tests/fake_gemini.py: drives the real SDK REST transport against the fake."""

import http.client
import json
import os
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

from fake_gemini import (BEHAVIOURS, DEFAULT_MODELS, LISTING_BEHAVIOURS, FakeGemini,  # noqa: E402
                         _ENUMS, make_models)

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
    "stream_truncate": gx.InternalServerError,
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
    if behaviour not in ("stream_break", "stream_truncate"):
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
