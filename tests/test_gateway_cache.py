"""The gateway's response cache (issue 15 item 6): with GEMINI_ROUTER_CACHE_TTL set, an
exact repeat of a generateContent request - plain, streamed (array or SSE) or through the
OpenAI API - is answered with no upstream call, says so in `x-gemini-router-cache`, and
shows in /metrics; a different body, model or an expired entry goes upstream."""
from __future__ import annotations

import json

import pytest
import requests

from gateway_fixtures import FLASH, gateway_env, serving


GENERATE = f"/v1beta/models/{FLASH}:generateContent"
STREAM = f"/v1beta/models/{FLASH}:streamGenerateContent"


def body(text: str = "hello there") -> dict:
    return {"contents": [{"role": "user", "parts": [{"text": text}]}]}


def post(served, path: str, payload=None, **kw) -> requests.Response:
    return requests.post(served.url + path, json=payload if payload is not None else body(),
                         timeout=30, **kw)


def upstream(fake) -> int:
    return fake.count(action=("generate", "stream"))


@pytest.fixture
def cached(fake, state_dir):
    with serving(gateway_env(fake, state_dir, GEMINI_ROUTER_CACHE_TTL="60")) as served:
        yield served


def test_an_exact_repeat_is_answered_from_the_cache(cached, fake):
    first = post(cached, GENERATE)
    assert first.status_code == 200
    assert first.headers["x-gemini-router-cache"] == "miss"
    second = post(cached, GENERATE)
    assert second.status_code == 200
    assert second.headers["x-gemini-router-cache"] == "hit"
    assert second.headers["x-gemini-router-attempts"] == "0"
    assert second.headers["x-gemini-router-model"] == FLASH
    assert second.headers["x-gemini-router-key"] == first.headers["x-gemini-router-key"]
    assert second.json() == first.json()
    assert upstream(fake) == 1
    post(cached, GENERATE, body("something else"))                 # another body: upstream
    post(cached, "/v1beta/models/gemini-2.0-flash:generateContent")   # another model
    assert upstream(fake) == 3


@pytest.mark.parametrize("alt", ["", "?alt=sse"])
def test_a_stream_replays_a_cached_answer(cached, fake, alt):
    first = post(cached, GENERATE)
    text = first.json()["candidates"][0]["content"]["parts"][0]["text"]
    r = post(cached, STREAM + alt)
    assert r.status_code == 200 and r.headers["x-gemini-router-cache"] == "hit"
    if alt:
        events = [json.loads(line[len("data: "):]) for line in r.text.splitlines()
                  if line.startswith("data: ")]
    else:
        events = r.json()
    assert "".join(p["text"] for e in events for c in e["candidates"]
                   for p in c["content"]["parts"]) == text
    assert upstream(fake) == 1


def test_only_plain_answers_fill_the_cache(cached, fake):
    """A stream's merged elements are not the answer a plain request gets (parts split as
    they arrived, candidate fields left out): a stream never fills the cache."""
    r = post(cached, STREAM)
    assert r.status_code == 200 and r.headers["x-gemini-router-cache"] == "miss"
    again = post(cached, GENERATE)
    assert again.headers["x-gemini-router-cache"] == "miss"
    assert again.json()["candidates"][0]["content"]["parts"] == \
        [{"text": "[gemini-2.5-flash] hello there"}]
    assert post(cached, GENERATE).headers["x-gemini-router-cache"] == "hit"
    assert upstream(fake) == 2


def test_the_query_sent_upstream_is_part_of_the_key(cached, fake):
    plain = post(cached, GENERATE)
    sdk_style = post(cached, GENERATE + "?$alt=json;enum-encoding=int")
    assert sdk_style.headers["x-gemini-router-cache"] == "miss"        # integer enums
    assert plain.json()["candidates"][0]["finishReason"] == "STOP"
    assert sdk_style.json()["candidates"][0]["finishReason"] == 1
    assert post(cached, GENERATE + "?$alt=json;enum-encoding=int&key=x").headers[
        "x-gemini-router-cache"] == "hit"                                 # a client key is not
    assert upstream(fake) == 2


def test_openai_repeats_are_cached_too_and_metrics_count_them(cached, fake):
    chat = {"model": FLASH, "messages": [{"role": "user", "content": "hello there"}]}
    first = post(cached, "/v1/chat/completions", chat)
    second = post(cached, "/v1/chat/completions", chat)
    assert (first.status_code, second.status_code) == (200, 200)
    assert second.headers["x-gemini-router-cache"] == "hit"
    assert second.json()["choices"][0]["message"]["content"] == \
        first.json()["choices"][0]["message"]["content"]
    assert upstream(fake) == 1
    metrics = requests.get(cached.url + "/metrics", timeout=10).text
    assert 'gemini_router_cache_total{event="hits"} 1.0' in metrics
    assert 'gemini_router_cache_total{event="stores"} 1.0' in metrics


def test_failures_are_not_cached(cached, fake):
    fake.set_behaviour("bad_request", model=FLASH, times=1)
    assert post(cached, GENERATE).status_code == 400
    r = post(cached, GENERATE)
    assert r.status_code == 200 and r.headers["x-gemini-router-cache"] == "miss"
    assert upstream(fake) == 2


def test_without_a_ttl_there_is_no_cache(fake, state_dir):
    with serving(gateway_env(fake, state_dir)) as served:
        for _ in range(2):
            r = post(served, GENERATE)
            assert "x-gemini-router-cache" not in r.headers
    assert upstream(fake) == 2
