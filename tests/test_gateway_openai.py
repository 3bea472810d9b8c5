"""The gateway's OpenAI-compatible front end (issue 14): the translation functions on their own,
then /v1/chat/completions and /v1/models driven by the official openai SDK against the fake
Gemini server (what reached the fake is read from its request log)."""
from __future__ import annotations

import base64
import json

import openai
import pytest
import requests

from conftest import KEYS
from gateway_fixtures import CLIENT_KEYS, FLASH
from gateway_fixtures import guarded  # noqa: F401  (a fixture)

import gemini_router as gr


@pytest.fixture
def client(guarded):
    return openai.OpenAI(base_url=guarded.url + "/v1", api_key=CLIENT_KEYS["alice"],
                         max_retries=0, timeout=30)


def generated(fake) -> list:
    return [c for c in fake.calls if c.action in ("generate", "stream")]


def last_body(fake) -> dict:
    return generated(fake)[-1].body


# --------------------------------------------------------------------------------------
# translation (pure functions)
# --------------------------------------------------------------------------------------

def test_messages_become_system_instruction_and_contents():
    model, request = gr.openai_request({"model": "auto", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "bonjour"},
        {"role": "user", "content": [{"type": "text", "text": "and this?"},
                                     {"type": "image_url",
                                      "image_url": {"url": "data:image/png;base64,iVBORw0K"}}]},
    ]})
    assert model == "auto"
    assert request == {
        "systemInstruction": {"parts": [{"text": "Be brief.\n\nAnswer in French."}]},
        "contents": [{"role": "user", "parts": [{"text": "hello"}]},
                     {"role": "model", "parts": [{"text": "bonjour"}]},
                     {"role": "user", "parts": [{"text": "and this?"}, {"inlineData": {
                         "mimeType": "image/png", "data": "iVBORw0K"}}]}]}


def test_tool_calls_and_tool_answers_become_function_parts():
    _, request = gr.openai_request({"model": FLASH, "messages": [
        {"role": "user", "content": "weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
            {"id": "c2", "type": "function",
             "function": {"name": "weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": "c2", "content": "sunny"}],
        "tools": [{"type": "function", "function": {
            "name": "weather", "description": "the weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
        "tool_choice": {"type": "function", "function": {"name": "weather"}}})
    assert request["contents"][1:] == [
        {"role": "model", "parts": [{"functionCall": {"name": "weather", "args": {"city": "Paris"}}},
                                    {"functionCall": {"name": "weather", "args": {"city": "Rome"}}}]},
        {"role": "user", "parts": [
            {"functionResponse": {"name": "weather", "response": {"temp": 21}}},
            {"functionResponse": {"name": "weather", "response": {"content": "sunny"}}}]}]
    assert request["tools"] == [{"functionDeclarations": [{
        "name": "weather", "description": "the weather", "parametersJsonSchema": {
            "type": "object", "properties": {"city": {"type": "string"}}}}]}]
    assert request["toolConfig"] == {"functionCallingConfig": {
        "mode": "ANY", "allowedFunctionNames": ["weather"]}}


@pytest.mark.parametrize("choice, mode", [("auto", "AUTO"), ("none", "NONE"),
                                          ("required", "ANY")])
def test_tool_choice_words(choice, mode):
    assert gr.openai_tool_config(choice) == {"functionCallingConfig": {"mode": mode}}


def test_generation_options_map_to_generation_config():
    config = gr.openai_generation_config({
        "temperature": 0.2, "top_p": 0.9, "max_tokens": 50, "max_completion_tokens": 40,
        "stop": "END", "n": 2, "seed": 7, "presence_penalty": 0.5, "frequency_penalty": 0.25,
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}}})
    assert config == {"temperature": 0.2, "topP": 0.9, "maxOutputTokens": 40,
                      "candidateCount": 2, "seed": 7, "presencePenalty": 0.5,
                      "frequencyPenalty": 0.25, "stopSequences": ["END"],
                      "responseMimeType": "application/json",
                      "responseJsonSchema": {"type": "object",
                                             "properties": {"a": {"type": "integer"}}}}
    assert gr.openai_generation_config({"response_format": {"type": "json_object"}}) == \
        {"responseMimeType": "application/json"}


@pytest.mark.parametrize("body, words", [
    ({"messages": [{"role": "user", "content": "x"}]}, "'model' is required"),
    ({"model": "auto", "messages": []}, "non-empty list"),
    ({"model": "auto", "messages": [{"role": "robot", "content": "x"}]}, "role"),
    ({"model": "auto", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]},
     "data URLs"),
    ({"model": "auto", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
     "'temperature' must be a number"),
    ({"model": "auto", "messages": [{"role": "tool", "tool_call_id": "nope", "content": "x"}]},
     "tool_call_id"),
])
def test_bad_requests_are_400_with_a_reason(body, words):
    with pytest.raises(gr.GatewayError) as caught:
        gr.openai_request(body)
    assert caught.value.status == 400 and words in str(caught.value)


@pytest.mark.parametrize("finish, tools, expected", [
    ("STOP", False, "stop"), (1, False, "stop"), ("STOP", True, "tool_calls"),
    ("MAX_TOKENS", False, "length"), (2, False, "length"), ("SAFETY", False, "content_filter"),
    ("RECITATION", False, "content_filter"), ("PROHIBITED_CONTENT", False, "content_filter"),
    ("OTHER", False, "stop"), (None, False, None)])
def test_finish_reasons(finish, tools, expected):
    assert gr.openai_finish_reason(finish, tools) == expected


def test_a_gemini_answer_becomes_a_chat_completion():
    answer = {"candidates": [{"content": {"role": "model", "parts": [
        {"text": "thinking...", "thought": True}, {"text": "Hi "}, {"text": "there"},
        {"functionCall": {"name": "f", "args": {"a": 1}}}]}, "finishReason": "STOP",
        "index": 0}], "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 2,
                                        "thoughtsTokenCount": 5, "totalTokenCount": 10}}
    done = gr.openai_completion(answer, FLASH, "chatcmpl-1", 123)
    [choice] = done["choices"]
    assert choice["message"]["content"] == "Hi there"
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert (call["type"], call["function"]) == ("function", {"name": "f",
                                                             "arguments": '{"a": 1}'})
    assert done["usage"] == {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10,
                             "completion_tokens_details": {"reasoning_tokens": 5}}
    blocked = gr.openai_completion({"promptFeedback": {"blockReason": "SAFETY"}}, FLASH, "x", 1)
    assert [(c["message"]["content"], c["finish_reason"]) for c in blocked["choices"]] == \
        [(None, "content_filter")]


def test_stream_elements_become_chunks_then_usage():
    chunker = gr.OpenAIChunker(FLASH, "chatcmpl-1", 123, include_usage=True)
    first = chunker.chunks({"candidates": [{"content": {"parts": [{"text": "Hello "}]},
                                            "index": 0}]})
    last = chunker.chunks({"candidates": [{"content": {"parts": [{"text": "world"}]},
                                           "finishReason": "MAX_TOKENS", "index": 0}],
                           "usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": 2,
                                             "totalTokenCount": 3}})
    tail = chunker.final()
    deltas = [c["choices"][0] for c in first + last]
    assert [(d["delta"], d["finish_reason"]) for d in deltas] == [
        ({"role": "assistant", "content": "Hello "}, None), ({"content": "world"}, "length")]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == FLASH
               for c in first + last + tail)
    [usage] = tail
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 3


# --------------------------------------------------------------------------------------
# the openai SDK against the gateway
# --------------------------------------------------------------------------------------

def test_chat_completion_with_system_and_options(client, fake):
    done = client.chat.completions.create(
        model="auto", temperature=0.3, top_p=0.8, max_tokens=100, stop=["STOP"], seed=11,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "hello openai"}])
    assert done.choices[0].message.content == f"[{FLASH}] hello openai"
    assert (done.choices[0].finish_reason, done.model, done.object) == \
        ("stop", FLASH, "chat.completion")
    assert (done.usage.prompt_tokens, done.usage.completion_tokens,
            done.usage.total_tokens) == (4, 3, 7)
    body = last_body(fake)
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert body["contents"] == [{"role": "user", "parts": [{"text": "hello openai"}]}]
    assert body["generationConfig"] == {"temperature": 0.3, "topP": 0.8, "maxOutputTokens": 100,
                                        "seed": 11, "stopSequences": ["STOP"]}
    assert [(c.model, c.key) for c in generated(fake)] == [(FLASH, KEYS[0])]


def test_max_tokens_cut_is_finish_reason_length(client, fake):
    done = client.chat.completions.create(model=FLASH, max_completion_tokens=2, messages=[
        {"role": "user", "content": "one two three four"}])
    assert done.choices[0].finish_reason == "length"
    assert done.choices[0].message.content == f"[{FLASH}] one"


def test_json_response_formats(client, fake):
    done = client.chat.completions.create(model=FLASH, response_format={"type": "json_object"},
                                          messages=[{"role": "user", "content": "give json"}])
    assert json.loads(done.choices[0].message.content) == {"model": FLASH, "echo": "give json"}
    assert last_body(fake)["generationConfig"] == {"responseMimeType": "application/json"}
    schema = {"type": "object", "properties": {"echo": {"type": "string"}}}
    client.chat.completions.create(model=FLASH, messages=[{"role": "user", "content": "x"}],
                                   response_format={"type": "json_schema", "json_schema": {
                                       "name": "echo", "schema": schema}})
    assert last_body(fake)["generationConfig"] == {"responseMimeType": "application/json",
                                                   "responseJsonSchema": schema}


def test_image_as_a_data_url_reaches_gemini_as_inline_data(client, fake):
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n fake png").decode()
    client.chat.completions.create(model=FLASH, messages=[{"role": "user", "content": [
        {"type": "text", "text": "describe"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}]}])
    assert last_body(fake)["contents"][0]["parts"] == [
        {"text": "describe"}, {"inlineData": {"mimeType": "image/png", "data": png}}]


def test_tools_round_trip(client, fake):
    fake.set_behaviour("function_call", model=FLASH, times=1)
    tools = [{"type": "function", "function": {
        "name": "lookup", "description": "look a word up",
        "parameters": {"type": "object", "properties": {"prompt": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "look up zebra"}]
    done = client.chat.completions.create(model=FLASH, messages=messages, tools=tools,
                                          tool_choice="required")
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == \
        ("lookup", {"prompt": "look up zebra"})
    assert last_body(fake)["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"meaning": "animal"}'}]
    answer = client.chat.completions.create(model=FLASH, messages=messages, tools=tools)
    assert answer.choices[0].finish_reason == "stop"
    assert last_body(fake)["contents"][1:] == [
        {"role": "model", "parts": [{"functionCall": {"name": "lookup",
                                                      "args": {"prompt": "look up zebra"}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "lookup",
                                                         "response": {"meaning": "animal"}}}]}]


def test_stream_with_usage(client, fake):
    stream = client.chat.completions.create(
        model="auto", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "one two three four"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == f"[{FLASH}] one two three four"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 9
    assert [c.action for c in generated(fake)] == ["stream"]


def test_stream_without_usage_ends_with_done(guarded, fake):
    r = requests.post(guarded.url + "/v1/chat/completions", timeout=30,
                      headers={"Authorization": f"Bearer {CLIENT_KEYS['bob']}"},
                      json={"model": FLASH, "stream": True,
                            "messages": [{"role": "user", "content": "hi"}]})
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("data: [DONE]\n\n")
    assert '"usage"' not in r.text


def test_stream_failing_after_the_first_byte_raises_in_the_sdk(client, fake):
    fake.set_behaviour("stream_break", model=FLASH)
    received = []
    with pytest.raises(openai.APIError):
        for chunk in client.chat.completions.create(model=FLASH, stream=True, messages=[
                {"role": "user", "content": "one two three four"}]):
            received.append(chunk.choices[0].delta.content)
    assert received == [f"[{FLASH}] "]
    assert len(generated(fake)) == 1


def test_blocked_prompt_is_content_filter(client, fake):
    fake.set_behaviour("blocked")
    done = client.chat.completions.create(model=FLASH, messages=[{"role": "user",
                                                                  "content": "x"}])
    assert [(c.finish_reason, c.message.content) for c in done.choices] == \
        [("content_filter", None)]
    fake.set_behaviour("safety")
    done = client.chat.completions.create(model=FLASH, messages=[{"role": "user",
                                                                  "content": "x"}])
    assert done.choices[0].finish_reason == "content_filter"
    stream = list(client.chat.completions.create(model=FLASH, stream=True, messages=[
        {"role": "user", "content": "x"}]))
    assert [c.choices[0].finish_reason for c in stream if c.choices] == ["content_filter"]


def test_errors_are_openai_shaped_with_the_right_status(client, fake):
    fake.set_behaviour("rate_minute", model=FLASH, retry_delay="30s")
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model=FLASH, messages=[{"role": "user", "content": "x"}])
    assert limited.value.status_code == 429
    assert limited.value.response.headers["retry-after"] in ("29", "30", "31")
    assert limited.value.body["type"] == "rate_limit_error"
    assert "nothing available" in limited.value.body["message"]
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user",
                                                                  "content": "x"}])
    assert missing.value.body["code"] == "model_not_found"
    fake.set_behaviour("bad_request", model="gemini-2.0-flash", message="Unknown name \"q\"")
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="gemini-2.0-flash", messages=[{"role": "user",
                                                                             "content": "x"}])
    assert refused.value.body["message"] == "Unknown name \"q\""
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="auto", messages=[{"role": "wizard",
                                                                "content": "x"}])


def test_models_list(client, fake):
    ids = [m.id for m in client.models.list()]
    assert ids[:4] == ["auto", "auto-balance", "auto-fast", "auto-quality"]
    assert FLASH in ids and "text-embedding-004" not in ids
    assert len(ids) == 4 + len(gr.text_model_names([gr.model_entry(m) for m in fake.models]))


def test_a_wrong_client_key_is_an_authentication_error(guarded):
    bad = openai.OpenAI(base_url=guarded.url + "/v1", api_key=KEYS[0], max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.models.list()
    assert KEYS[0] not in json.dumps(caught.value.body)
