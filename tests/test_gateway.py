"""The gateway's Gemini-native front end (issue 14), driven over real HTTP (requests, and the
official google-generativeai and google-genai SDKs) against the fake Gemini server.

Proves: bodies travel unchanged both ways (fields the pinned protos lack included); streams
as a JSON array and as SSE, failing over only before the first byte and ending with an error
element after it; countTokens / embedContent / batchEmbedContents with key rotation; the model
list; model names (pinned ids rotate keys, auto* route by tier); honest errors (429/503 with
Retry-After, upstream 400 passed through, a blocked prompt as Gemini answers it, shaped 500s);
routing headers; client keys; and that the server stack stays out of every other command.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import KEYS, ROOT, base_env
from gateway_fixtures import CLIENT_KEYS, FLASH, answer_text, gateway_env, serving, sse_events
from gateway_fixtures import gateway, guarded  # noqa: F401  (fixtures)

import gemini_router as gr

GENERATE = f"/v1beta/models/{FLASH}:generateContent"
STREAM = f"/v1beta/models/{FLASH}:streamGenerateContent"
FP = {k: gr.ApiKey(1, k).fingerprint for k in KEYS}


def body(text: str = "hello there", **extra) -> dict:
    return {"contents": [{"role": "user", "parts": [{"text": text}]}], **extra}


def post(served, path: str, payload=None, **kw) -> requests.Response:
    return requests.post(served.url + path, json=payload if payload is not None else body(),
                         timeout=30, **kw)


def calls(fake, action=("generate", "stream")) -> list[tuple[str, str]]:
    return [(c.model, c.key) for c in fake.calls if c.action in
            ((action,) if isinstance(action, str) else action)]


def stats(state_dir) -> dict:
    path = state_dir / "model_stats.json"
    return json.loads(path.read_text())["models"] if path.exists() else {}


# --------------------------------------------------------------------------------------
# 1. the stack stays out of the other commands
# --------------------------------------------------------------------------------------

SERVER_STACK = ("fastapi", "uvicorn", "starlette", "prometheus_client", "anyio", "pydantic",
                "httpx", "aiohttp", "yarl")


@pytest.mark.parametrize("argv", [["-c", "import gemini_router"],
                                  [str(ROOT / "gemini_router.py"), "stats"],
                                  [str(ROOT / "gemini_router.py"), "cooldowns"]])
def test_no_command_but_serve_imports_the_server_stack(state_dir, argv):
    env = base_env(state_dir, "http://127.0.0.1:9", KEYS[:1])
    proc = subprocess.run([sys.executable, "-X", "importtime", *argv], env=env,
                          capture_output=True, text=True, cwd=str(ROOT), timeout=60)
    assert proc.returncode == 0, proc.stderr
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert "json" in imported                      # the listing is real
    assert imported.isdisjoint(SERVER_STACK), sorted(imported & set(SERVER_STACK))


# --------------------------------------------------------------------------------------
# 2-3. Gemini-native: unchanged both ways
# --------------------------------------------------------------------------------------

def test_generate_forwards_the_body_unchanged_both_ways(gateway, fake):
    """thinkingConfig and a part's thoughtSignature (the pinned protos have neither) reach
    the upstream byte for byte; the answer's thought part and thoughtsTokenCount (also
    unknown to the protos) come back as the upstream sent them."""
    sent = (b'{ "contents": [{"role": "user", "parts": [{"text": "first"}]},\n'
            b'  {"role": "model", "parts": [{"text": "ok", "thoughtSignature": "c2lnbmF0dXJl"}]},'
            b'\n  {"role": "user", "parts": [{"text": "and now"}]}],\n'
            b'  "generationConfig": {"thinkingConfig": {"thinkingBudget": 4, '
            b'"includeThoughts": true}},\n'
            b'  "safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", '
            b'"threshold": "BLOCK_NONE"}] }')
    r = requests.post(gateway.url + GENERATE, data=sent, timeout=30,
                      headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    [call] = [c for c in fake.calls if c.action == "generate"]
    assert call.raw == sent
    assert call.body["contents"][1]["parts"][0]["thoughtSignature"] == "c2lnbmF0dXJl"
    answer = r.json()
    assert answer["candidates"][0]["content"]["parts"] == [
        {"text": "thinking...", "thought": True}, {"text": f"[{FLASH}] and now"}]
    assert answer["usageMetadata"]["thoughtsTokenCount"] == 4
    # the upstream's own bytes (the fake indents by 2), not a re-serialisation
    assert r.text == json.dumps(answer, indent=2) + "\n"


def test_a_body_of_megabytes_is_forwarded_unchanged_both_ways(gateway, fake):
    """A 3 MB body (parsed in a worker thread: over LARGE_BODY) reaches the upstream byte
    for byte, and the echo of it (an answer of megabytes, parsed there too) comes back
    unchanged."""
    text = ("lorem ipsum dolor sit amet " * 120_000)[:3 * 1024 * 1024]
    sent = json.dumps(body(text)).encode()
    assert len(sent) > gr.LARGE_BODY
    r = requests.post(gateway.url + GENERATE, data=sent, timeout=60,
                      headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text[:300]
    [call] = [c for c in fake.calls if c.action == "generate"]
    assert call.raw == sent
    assert len(r.content) > gr.LARGE_BODY
    assert answer_text([r.json()]) == f"[{FLASH}] {text}"


def test_answers_carry_the_routing_headers(gateway, fake):
    fake.set_behaviour("unavailable", key=KEYS[0], model=FLASH)
    r = post(gateway, GENERATE)
    assert r.status_code == 200, r.text
    assert (r.headers["x-gemini-router-model"], r.headers["x-gemini-router-key"],
            r.headers["x-gemini-router-attempts"]) == (FLASH, "key#2", "2")
    assert calls(fake) == [(FLASH, KEYS[0]), (FLASH, KEYS[1])]


def test_the_client_query_goes_upstream_but_its_key_does_not(gateway, fake):
    r = requests.post(gateway.url + GENERATE + "?$alt=json;enum-encoding=int&key=mine",
                      json=body(), timeout=30)
    assert r.status_code == 200
    [call] = [c for c in fake.calls if c.action == "generate"]
    assert "enum-encoding%3Dint" in call.query or "enum-encoding=int" in call.query
    assert "mine" not in call.query and call.key == KEYS[0]
    assert r.json()["candidates"][0]["finishReason"] == 1      # ints, as the client asked


# --------------------------------------------------------------------------------------
# streams
# --------------------------------------------------------------------------------------

def test_stream_is_a_json_array_by_default(gateway, fake):
    r = post(gateway, STREAM, body("one two three four"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    elements = json.loads(r.text)
    assert len(elements) == 3
    assert answer_text(elements) == f"[{FLASH}] one two three four"
    assert elements[-1]["candidates"][0]["finishReason"] == "STOP"
    assert calls(fake) == [(FLASH, KEYS[0])]


def test_stream_is_sse_with_alt_sse(gateway, fake):
    r = post(gateway, STREAM + "?alt=sse", body("one two three four"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert len(events) == 3 and r.text.count("data: ") == 3
    assert answer_text(events) == f"[{FLASH}] one two three four"
    [call] = [c for c in fake.calls if c.action == "stream"]
    assert "alt" not in call.query             # upstream it is always the JSON array


@pytest.mark.parametrize("behaviour", ["unavailable", "rate_minute", "empty_answer",
                                       "invalid_key"])
def test_stream_fails_over_before_the_first_byte(gateway, fake, state_dir, behaviour):
    """An HTTP error, or a stream that ends before any content (an empty answer), is just
    another outcome: the next key answers and the client sees one clean stream."""
    fake.set_behaviour(behaviour, key=KEYS[0], model=FLASH)
    r = post(gateway, STREAM + "?alt=sse", body("one two three"))
    assert r.status_code == 200, r.text
    assert r.headers["x-gemini-router-key"] == "key#2"
    events = sse_events(r.text)
    assert answer_text(events) == f"[{FLASH}] one two three"
    assert not any("error" in e for e in events)
    assert calls(fake) == [(FLASH, KEYS[0]), (FLASH, KEYS[1])]


@pytest.mark.parametrize("sse", [False, True])
@pytest.mark.parametrize("behaviour", ["stream_break", "stream_truncate"])
def test_stream_failure_after_the_first_byte_ends_with_an_error_element(
        gateway, fake, state_dir, behaviour, sse):
    fake.set_behaviour(behaviour, model=FLASH)
    r = post(gateway, STREAM + ("?alt=sse" if sse else ""), body("one two three four five"))
    assert r.status_code == 200
    elements = sse_events(r.text) if sse else json.loads(r.text)   # well-formed either way
    assert answer_text(elements[:-1]) == f"[{FLASH}] "
    error = elements[-1]["error"]
    assert error["code"] in (500, 503) and error["message"]
    assert calls(fake) == [(FLASH, KEYS[0])]                       # no second try
    gateway.flush()
    assert [(s["ok"], s["kind"]) for s in stats(state_dir)[FLASH]] == [(False, "transient")]


def test_a_finished_stream_is_recorded_as_an_answer(gateway, fake, state_dir):
    r = post(gateway, STREAM, body("one two three"))
    assert r.status_code == 200
    gateway.flush()
    [sample] = stats(state_dir)[FLASH]
    assert (sample["ok"], sample["kind"], sample["output_tokens"]) == (True, "ok", 4)


# --------------------------------------------------------------------------------------
# countTokens, embedContent, batchEmbedContents, the model list
# --------------------------------------------------------------------------------------

def test_count_tokens_rotates_keys_and_leaves_no_sample(gateway, fake, state_dir):
    fake.set_behaviour("rate_minute", key=KEYS[0], model=FLASH)
    r = post(gateway, f"/v1beta/models/{FLASH}:countTokens", body("three words here"))
    assert r.status_code == 200 and r.json() == {"totalTokens": 3}
    assert calls(fake, "count") == [(FLASH, KEYS[0]), (FLASH, KEYS[1])]
    gateway.flush()
    assert stats(state_dir) == {}


def test_embed_content_and_batch(gateway, fake, state_dir):
    model = "text-embedding-004"
    one = post(gateway, f"/v1beta/models/{model}:embedContent",
               {"content": {"parts": [{"text": "embed me"}]}})
    assert one.status_code == 200, one.text
    assert len(one.json()["embedding"]["values"]) == 8
    batch = post(gateway, f"/v1beta/models/{model}:batchEmbedContents",
                 {"requests": [{"model": f"models/{model}",
                                "content": {"parts": [{"text": t}]}} for t in ("a", "b")]})
    assert batch.status_code == 200
    assert [len(e["values"]) for e in batch.json()["embeddings"]] == [8, 8]
    assert calls(fake, ("embed", "batch_embed")) == [(model, KEYS[0]), (model, KEYS[1])]
    gateway.flush()
    assert model not in stats(state_dir)


@pytest.mark.parametrize("model, status", [(FLASH, 400), ("auto", 404), ("nosuch", 404)])
def test_embed_needs_an_embedding_model(gateway, fake, model, status):
    r = post(gateway, f"/v1beta/models/{model}:embedContent",
             {"content": {"parts": [{"text": "x"}]}})
    assert r.status_code == status
    assert r.json()["error"]["code"] == status
    assert calls(fake, ("embed", "batch_embed")) == []


def test_model_list_and_one_model_from_the_cache(gateway, fake):
    r = requests.get(gateway.url + "/v1beta/models", timeout=30)
    assert r.status_code == 200
    assert [m["name"] for m in r.json()["models"]] == [m["name"] for m in fake.models]
    listed = fake.count(action="list")
    first = requests.get(gateway.url + "/v1beta/models?pageSize=4", timeout=30).json()
    second = requests.get(gateway.url + f"/v1beta/models?pageSize=4&pageToken="
                                        f"{first['nextPageToken']}", timeout=30).json()
    assert [m["name"] for m in first["models"] + second["models"]] == \
        [m["name"] for m in fake.models][:8]
    entry = requests.get(gateway.url + f"/v1beta/models/{FLASH}", timeout=30).json()
    assert (entry["name"], entry["outputTokenLimit"], entry["thinking"]) == \
        (f"models/{FLASH}", 65536, True)
    missing = requests.get(gateway.url + "/v1beta/models/gemini-9-ultra", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["status"] == "NOT_FOUND"
    assert fake.count(action="list") == listed == 1     # listed once, then the cache


# --------------------------------------------------------------------------------------
# model names
# --------------------------------------------------------------------------------------

def test_a_listed_model_is_pinned_and_keys_rotate(gateway, fake):
    for _ in range(3):
        r = post(gateway, "/v1beta/models/gemini-2.0-flash:generateContent")
        assert r.status_code == 200
    assert calls(fake) == [("gemini-2.0-flash", KEYS[0]), ("gemini-2.0-flash", KEYS[1]),
                           ("gemini-2.0-flash", KEYS[0])]


@pytest.mark.parametrize("name, expected", [("auto", FLASH), ("auto-balance", FLASH),
                                            ("auto-fast", FLASH),
                                            ("auto-quality", "gemini-2.5-pro"),
                                            ("models/gemma-3-27b-it", "gemma-3-27b-it")])
def test_auto_names_route_by_tier(gateway, fake, name, expected):
    r = post(gateway, f"/v1beta/models/{name}:generateContent")
    assert r.status_code == 200, r.text
    assert r.headers["x-gemini-router-model"] == expected
    assert calls(fake) == [(expected, KEYS[0])]


def test_auto_fails_over_to_the_next_model(gateway, fake):
    fake.set_behaviour("error500", model=FLASH)
    r = post(gateway, "/v1beta/models/auto:generateContent")
    assert r.status_code == 200
    assert calls(fake) == [(FLASH, KEYS[0]), (FLASH, KEYS[1]), ("gemini-2.0-flash", KEYS[0])]
    assert r.headers["x-gemini-router-attempts"] == "3"


@pytest.mark.parametrize("name, status", [("gemini-9-ultra", 404),
                                          ("text-embedding-004", 400)])
def test_unknown_or_non_text_model_is_refused_without_a_call(gateway, fake, name, status):
    r = post(gateway, f"/v1beta/models/{name}:generateContent")
    assert r.status_code == status
    assert r.json()["error"]["status"] == {404: "NOT_FOUND", 400: "INVALID_ARGUMENT"}[status]
    assert calls(fake) == []


# --------------------------------------------------------------------------------------
# honest errors
# --------------------------------------------------------------------------------------

def test_every_key_rate_limited_is_429_with_retry_after(gateway, fake):
    fake.set_behaviour("rate_minute", model=FLASH, retry_delay="26s")
    r = post(gateway, GENERATE)
    assert r.status_code == 429
    assert r.headers["retry-after"] in ("25", "26", "27")
    error = r.json()["error"]
    assert (error["code"], error["status"]) == (429, "RESOURCE_EXHAUSTED")
    assert "nothing available" in error["message"] and "earliest: key#" in error["message"]
    assert calls(fake) == [(FLASH, KEYS[0]), (FLASH, KEYS[1])]
    again = post(gateway, GENERATE)                    # known now: no call at all
    assert again.status_code == 429 and calls(fake) == [(FLASH, KEYS[0]), (FLASH, KEYS[1])]
    assert int(again.headers["retry-after"]) <= int(r.headers["retry-after"])


def test_every_key_failing_is_503(gateway, fake):
    fake.set_behaviour("error500", model=FLASH)
    r = post(gateway, GENERATE)
    assert r.status_code == 503
    assert r.json()["error"]["status"] == "UNAVAILABLE"
    assert "nothing available" in r.json()["error"]["message"]
    assert r.headers["retry-after"] in ("4", "5")       # the first soft cooldown (5 s)
    # each pair once; a pair cooling on a guess after this route's own failure is not
    # retried within it
    assert calls(fake) == [(FLASH, KEYS[0]), (FLASH, KEYS[1])]


def test_a_disabled_key_pool_is_503_without_retry_after(gateway, fake):
    fake.set_behaviour("invalid_key", model=FLASH)
    r = post(gateway, GENERATE)
    assert r.status_code == 503
    assert "retry-after" not in r.headers
    assert calls(fake) == [(FLASH, KEYS[0]), (FLASH, KEYS[1])]


def test_an_upstream_400_passes_through(gateway, fake):
    fake.set_behaviour("bad_request", message='Invalid JSON payload received. Unknown name "x"')
    r = post(gateway, GENERATE)
    assert r.status_code == 400
    error = r.json()["error"]
    assert (error["status"], error["message"]) == \
        ("INVALID_ARGUMENT", 'Invalid JSON payload received. Unknown name "x"')
    assert calls(fake) == [(FLASH, KEYS[0])]


def test_a_blocked_prompt_is_gemini_s_own_answer(gateway, fake, state_dir):
    fake.set_behaviour("blocked", block_reason="PROHIBITED_CONTENT")
    r = post(gateway, GENERATE)
    assert r.status_code == 200
    assert r.json()["promptFeedback"]["blockReason"] == "PROHIBITED_CONTENT"
    assert "candidates" not in r.json()
    assert calls(fake) == [(FLASH, KEYS[0])]


def test_a_failure_of_the_gateway_itself_is_a_shaped_500(gateway, fake):
    def broken():
        raise RuntimeError(f"boom {KEYS[0]}")
    gateway.gateway.status = broken                    # the shield, not the router, is tested
    r = requests.get(gateway.url + "/status", timeout=30)
    assert r.status_code == 500
    assert r.json() == {"error": {"code": 500, "status": "INTERNAL", "message":
                                  "internal error in the gateway (RuntimeError); its log says "
                                  "more"}}
    assert "Traceback" not in r.text and KEYS[0] not in r.text


def test_unknown_paths_and_methods_are_shaped_like_the_api(gateway):
    gemini = requests.get(gateway.url + "/v1beta/nothing", timeout=30)
    assert gemini.status_code == 404 and gemini.json()["error"]["status"] == "NOT_FOUND"
    method = post(gateway, f"/v1beta/models/{FLASH}:predict")
    assert method.status_code == 404 and method.json()["error"]["code"] == 404
    openai = requests.get(gateway.url + "/v1/nothing", timeout=30)
    assert openai.status_code == 404
    assert set(openai.json()["error"]) == {"message", "type", "code", "param"}


# --------------------------------------------------------------------------------------
# client keys
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["bearer", "header", "query"])
def test_a_client_key_is_accepted_three_ways(guarded, fake, how):
    secret = CLIENT_KEYS["alice"]
    kw = {"bearer": {"headers": {"Authorization": f"Bearer {secret}"}},
          "header": {"headers": {"x-goog-api-key": secret}},
          "query": {"params": {"key": secret}}}[how]
    r = post(guarded, GENERATE, **kw)
    assert r.status_code == 200, r.text
    [call] = [c for c in fake.calls if c.action == "generate"]
    assert call.key == KEYS[0] and secret not in call.query       # Google's key goes up


@pytest.mark.parametrize("presented", [None, "wrong-secret-0000", KEYS[0], KEYS[1]])
def test_anything_else_is_401_and_calls_nothing(guarded, fake, presented):
    headers = {"x-goog-api-key": presented} if presented else {}
    r = post(guarded, GENERATE, headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["status"] == "UNAUTHENTICATED"
    openai = requests.get(guarded.url + "/v1/models", timeout=30,
                          headers={"Authorization": f"Bearer {presented}"} if presented else {})
    assert openai.status_code == 401
    assert openai.json()["error"]["type"] == "authentication_error"
    assert fake.calls == []
    for key in KEYS:
        assert key not in r.text and key not in openai.text


def test_healthz_is_open_and_status_is_not(guarded):
    assert requests.get(guarded.url + "/healthz", timeout=30).json()["status"] == "ok"
    assert requests.get(guarded.url + "/status", timeout=30).status_code == 401
    r = requests.get(guarded.url + "/status", params={"key": CLIENT_KEYS["bob"]}, timeout=30)
    assert r.status_code == 200 and r.json()["gateway"]["clients"] == ["alice", "bob"]


# --------------------------------------------------------------------------------------
# the official SDKs, unmodified
# --------------------------------------------------------------------------------------

def test_google_generativeai_sdk(guarded, fake):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import google.generativeai as genai
    genai.configure(api_key=CLIENT_KEYS["alice"], transport="rest",
                    client_options={"api_endpoint": guarded.url})
    model = genai.GenerativeModel(FLASH, system_instruction="be brief")
    assert model.generate_content("hello sdk").text == f"[{FLASH}] hello sdk"
    chunks = list(model.generate_content("one two three four", stream=True))
    assert "".join(c.text for c in chunks) == f"[{FLASH}] one two three four"
    assert model.count_tokens("four words right here").total_tokens == 6   # + "be brief"
    listed = [m.name for m in genai.list_models()]
    assert f"models/{FLASH}" in listed and len(listed) == len(fake.models)
    assert calls(fake) == [(FLASH, KEYS[0]), (FLASH, KEYS[1])]
    generated = [c for c in fake.calls if c.action == "generate"][-1].body
    assert generated["systemInstruction"]["parts"] == [{"text": "be brief"}]


def test_google_genai_sdk(guarded, fake):
    from google import genai
    from google.genai import types
    client = genai.Client(api_key=CLIENT_KEYS["bob"], http_options=types.HttpOptions(
        base_url=guarded.url, api_version="v1beta"))
    config = types.GenerateContentConfig(thinking_config=types.ThinkingConfig(
        thinking_budget=4, include_thoughts=True))
    answer = client.models.generate_content(model=FLASH, contents="hello genai", config=config)
    assert answer.text == f"[{FLASH}] hello genai"
    assert answer.usage_metadata.thoughts_token_count == 4
    assert answer.candidates[0].content.parts[0].thought is True
    sent = [c for c in fake.calls if c.action == "generate"][-1].body
    # as the SDK wrote it (its own mix of cases, which the API reads), untouched
    assert sent["generationConfig"] == {"thinkingConfig": {"include_thoughts": True,
                                                           "thinking_budget": 4}}
    streamed = "".join(c.text or "" for c in client.models.generate_content_stream(
        model="auto", contents="one two three"))
    assert streamed == f"[{FLASH}] one two three"
    embedded = client.models.embed_content(model="text-embedding-004", contents="vector me")
    assert len(embedded.embeddings[0].values) == 8
    assert client.models.count_tokens(model=FLASH, contents="a b c").total_tokens == 3


def test_google_genai_sdk_raises_on_an_error_after_the_first_byte(guarded, fake):
    from google import genai
    from google.genai import errors, types
    fake.set_behaviour("stream_break", model=FLASH)
    client = genai.Client(api_key=CLIENT_KEYS["bob"], http_options=types.HttpOptions(
        base_url=guarded.url, api_version="v1beta"))
    received = []
    with pytest.raises(errors.APIError) as caught:
        for chunk in client.models.generate_content_stream(model=FLASH,
                                                           contents="one two three four"):
            received.append(chunk.text)
    assert received == [f"[{FLASH}] "]
    assert caught.value.code == 500
    assert calls(fake) == [(FLASH, KEYS[0])]


def test_google_genai_sdk_sees_429_with_the_gateway_s_words(guarded, fake):
    from google import genai
    from google.genai import errors, types
    fake.set_behaviour("rate_minute", model=FLASH)
    client = genai.Client(api_key=CLIENT_KEYS["bob"], http_options=types.HttpOptions(
        base_url=guarded.url, api_version="v1beta", retry_options=types.HttpRetryOptions(
            attempts=1)))
    with pytest.raises(errors.ClientError) as caught:
        client.models.generate_content(model=FLASH, contents="hi")
    assert caught.value.code == 429 and "nothing available" in caught.value.message


def test_a_model_that_cannot_take_the_request_is_refused_without_a_call(gateway, fake):
    """Gemma takes no system instruction: the gateway says so (400) and calls nothing; with
    `auto` it routes to a model that can."""
    payload = body(systemInstruction={"parts": [{"text": "be brief"}]})
    r = post(gateway, "/v1beta/models/gemma-3-27b-it:generateContent", payload)
    assert r.status_code == 400
    assert "Gemma models take no system instruction" in r.json()["error"]["message"]
    assert calls(fake) == []
    r = post(gateway, "/v1beta/models/auto:generateContent", payload)
    assert r.status_code == 200 and r.headers["x-gemini-router-model"] != "gemma-3-27b-it"


def test_hostile_client_input_gets_a_400_never_a_500(gateway, fake):
    deep = '{"model":"auto","messages":' + "[" * 50000 + "]" * 50000 + "}"
    r = requests.post(gateway.url + "/v1/chat/completions", data=deep, timeout=30,
                      headers={"content-type": "application/json"})
    assert r.status_code == 400 and "nests too deeply" in r.json()["error"]["message"]
    bad_calls = {"model": FLASH, "messages": [{"role": "assistant", "content": "x",
                                               "tool_calls": 5},
                                              {"role": "user", "content": "hi"}]}
    r = post(gateway, "/v1/chat/completions", bad_calls)
    assert r.status_code == 400 and "tool_calls must be a list" in r.json()["error"]["message"]
    deep_args = {"model": FLASH, "messages": [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "f", "arguments": "[" * 50000}}]},
        {"role": "user", "content": "hi"}]}
    r = post(gateway, "/v1/chat/completions", deep_args)
    assert r.status_code == 400 and "arguments is not JSON" in r.json()["error"]["message"]
    r = requests.post(gateway.url + "/v1/chat/completions", timeout=30,
                      data='{"model":"gemini-2.5-flash","messages":[{"role":"user",'
                           '"content":"\\ud800"}]}', headers={"content-type": "application/json"})
    assert r.status_code in (200, 400), r.text                 # never a 500
    r = requests.get(gateway.url + "/v1beta/models?pageToken=-5", timeout=10)
    assert r.status_code == 400


@pytest.mark.files_only                # reads the cooldown from the state file
def test_a_forwarded_route_says_where_it_went_in_its_headers(gateway, fake, state_dir):
    """A whole (not streamed) forwarded route carries the routing headers the log and the
    metrics read: here a 429 on key#1, then key#2's answer - two calls, and key#1 cooling on
    the model for the 26 s Google asked."""
    fake.set_behaviour("rate_minute", key=KEYS[0], model=FLASH, retry_delay="26s")
    r = requests.post(gateway.url + "/v1/router/route", timeout=30,
                      data=json.dumps({"prompt": "hi", "model": FLASH}),
                      headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["result"]["text"] == f"[{FLASH}] hi"
    assert (r.headers["x-gemini-router-model"], r.headers["x-gemini-router-key"],
            r.headers["x-gemini-router-attempts"]) == (FLASH, "key#2", "2")
    assert calls(fake) == [(FLASH, KEYS[0]), (FLASH, KEYS[1])]
    [entry] = json.loads((state_dir / "cooldowns.json").read_text())["cooldowns"]
    assert (entry["model"], entry["key"], entry["kind"], round(entry["until"] - entry["since"])) \
        == (FLASH, FP[KEYS[0]], "rate_limited", 26)


@pytest.mark.parametrize("stream", [False, True])
def test_a_forwarded_route_the_sdk_cannot_build_ends_with_exit_2(gateway, fake, stream):
    """A lone surrogate in a forwarded route: one terminal error event (exit 2), never a
    stream that waits for ever."""
    payload = json.dumps({"prompt": "hi \ud800", "model": FLASH, "stream": stream})
    r = requests.post(gateway.url + "/v1/router/route", data=payload, timeout=20,
                      headers={"content-type": "application/json"})
    events = [json.loads(line) for line in r.text.splitlines() if line.strip()]
    assert events[-1]["error"]["exit_code"] == 2
    assert "cannot be built" in events[-1]["error"]["message"]
    assert calls(fake) == []


@pytest.mark.parametrize("path", [GENERATE, STREAM])
def test_an_endpoint_that_cannot_be_reached_for_the_model_list_is_a_503(state_dir, path):
    """No cached model list and an endpoint that refuses connections: the list call (in a
    worker thread) fails, and the client gets the router's 503 with its reason - no 500."""
    import socket
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]              # bound, never listening: refused
        with serving(base_env(state_dir, f"http://127.0.0.1:{port}", KEYS[:2])) as served:
            r = post(served, path)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["message"].startswith(
        f"cannot reach http://127.0.0.1:{port}: connection refused")
    # the endpoint's failure, not the keys': no key or model is cooled for it
    cooldowns = state_dir / "cooldowns.json"
    assert not cooldowns.exists() or json.loads(cooldowns.read_text())["cooldowns"] == []


# --------------------------------------------------------------------------------------
# the event loop never waits on the state lock
# --------------------------------------------------------------------------------------

HOLD_THE_LOCK = """import mmap, os, sys, filelock
lock = filelock.FileLock(sys.argv[1] + "/state.lock")
lock.acquire()
if sys.argv[2] == "written":     # as a writer does: count the change, touch a file
    counter = mmap.mmap(os.open(sys.argv[1] + "/state.gen", os.O_RDWR), 8)
    counter[:8] = (int.from_bytes(counter[:8], "little") + 1).to_bytes(8, "little")
    os.utime(sys.argv[1] + "/router_state.json")
print("holding", flush=True)
sys.stdin.readline()
"""


@pytest.mark.files_only                # state on Redis: every read runs in a worker thread
@pytest.mark.parametrize("waits_for", ["paced", "written"])
def test_a_request_waiting_for_the_state_lock_leaves_the_event_loop_free(fake, state_dir,
                                                                         waits_for):
    """The route loop runs on the event loop between its calls, but a step that must wait
    for the state lock runs in a worker thread: a paced reservation (GEMINI_ROUTER_RPM), or
    a read of files another process has just written (the change counter moved). While
    another process holds the lock, the gateway still answers everything else at once."""
    extra = {"GEMINI_ROUTER_RPM": "100"} if waits_for == "paced" else {}
    env = gateway_env(fake, state_dir, GEMINI_ROUTER_LOCK_TIMEOUT="20", **extra)
    pool = ThreadPoolExecutor(1)
    with serving(env) as served:
        assert post(served, GENERATE).status_code == 200          # the model list, cached
        holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(state_dir),
                                   waits_for], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert holder.stdout.readline() == b"holding\n"
            waiting = pool.submit(post, served, GENERATE, body("second"))
            took = []
            for _ in range(5):
                time.sleep(0.2)
                began = time.monotonic()
                health = requests.get(served.url + "/healthz", timeout=10)
                took.append(time.monotonic() - began)
                assert health.status_code == 200
            still_waiting = not waiting.done()
        finally:
            holder.communicate(b"\n", timeout=10)
        second = waiting.result(timeout=30)
    pool.shutdown()
    assert max(took) < 0.5, took
    assert still_waiting
    assert second.status_code == 200 and answer_text([second.json()]) == f"[{FLASH}] second"
    assert len(calls(fake)) == 2
