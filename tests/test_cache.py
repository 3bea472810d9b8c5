"""The response cache (issue 15 item 6): `route --cache[=TTL]` answers an exact repeat of a
request with no upstream call, from where the state is (the state directory, or Redis).

Each CLI test runs on both backends (`backend` fixture: the files, and a real redis-server
started for the test) and counts the fake's upstream calls: a hit costs none, anything that
changes the answer (model choice, prompt, system, options, wire options, attachments' bytes,
schema) is a miss that costs one."""
from __future__ import annotations

import json
import time

import pytest

import gemini_router as gr
from conftest import KEYS, base_env

FLASH = "gemini-2.5-flash"
FLASH20 = "gemini-2.0-flash"


@pytest.fixture(params=["files", "redis"])
def backend(request, run_main, redis_servers):
    """The CLI (in-process) with its state, so its cache, in the files or in a real Redis."""
    extra: dict[str, str | None] = {}
    if request.param == "redis":
        extra = {"GEMINI_ROUTER_STATE_URL": redis_servers().url,
                 "GEMINI_ROUTER_REDIS_PREFIX": None}

    def run(*args: str, env: dict[str, str | None] | None = None):
        return run_main(*args, env={**extra, **(env or {})})
    return run


def calls(fake) -> int:
    return fake.count(action=("generate", "stream"))


def test_an_exact_repeat_is_answered_from_the_cache_without_a_call(backend, fake):
    first = backend("route", "--cache", "--json", "hello")
    assert first.code == 0, first.err
    assert first.json()["cached"] is False
    assert calls(fake) == 1
    again = backend("route", "--cache", "--json", "hello")
    assert again.code == 0, again.err
    assert calls(fake) == 1                                  # no upstream call
    data = again.json()
    assert data["cached"] is True and data["attempts"] == []
    assert (data["model"], data["key"], data["text"], data["finish_reason"]) == \
        (FLASH, "key#1", f"[{FLASH}] hello", "STOP")
    assert data["usage"] == first.json()["usage"]
    plain = backend("-v", "route", "--cache", "hello")
    assert plain.out == f"[{FLASH}] hello\n"
    assert "answered from the cache" in plain.err and "trying" not in plain.err
    assert calls(fake) == 1


@pytest.mark.parametrize("variant", [
    ["changed prompt"],
    ["-s", "Be brief", "hello"],
    ["-o", "temperature=0.5", "hello"],
    ["-o", "seed=7", "hello"],                                # a wire option
    ["-o", "thinking_budget=0", "hello"],
    ["-m", FLASH20, "hello"],
    ["--tier", "fast", "hello"],
    ["--schema", "SCHEMA", "hello"],
    ["-a", "ATTACHMENT", "hello"],
])
def test_everything_that_changes_the_answer_changes_the_cache_key(backend, fake, tmp_path,
                                                                  variant):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "string"}}}))
    attachment = tmp_path / "notes.txt"
    attachment.write_text("first version")
    args = [str(schema) if a == "SCHEMA" else str(attachment) if a == "ATTACHMENT" else a
            for a in variant]
    assert backend("route", "--cache", "hello").code == 0
    assert backend("route", "--cache", "-a", str(attachment), "hello").code == 0
    before = calls(fake)
    r = backend("route", "--cache", "--json", *args)
    assert r.code == 0, r.err
    if "ATTACHMENT" in variant:                 # the same file: a hit, until its bytes change
        assert (r.json()["cached"], calls(fake)) == (True, before)
        attachment.write_text("second version")
        r = backend("route", "--cache", "--json", *args)
    assert (r.json()["cached"], calls(fake)) == (False, before + 1)
    r = backend("route", "--cache", "--json", *args)
    assert (r.json()["cached"], calls(fake)) == (True, before + 1)


def test_the_lock_is_part_of_the_model_choice(backend, fake):
    assert backend("route", "--cache", "hello").code == 0              # tier order: FLASH
    assert backend("lock", FLASH20).code == 0
    r = backend("route", "--cache", "--json", "hello")
    assert (r.json()["model"], r.json()["cached"], calls(fake)) == (FLASH20, False, 2)
    r = backend("route", "--cache", "--json", "-m", f"models/{FLASH20}", "hello")
    assert (r.json()["model"], r.json()["cached"], calls(fake)) == (FLASH20, True, 2)
    assert backend("unlock").code == 0
    r = backend("route", "--cache", "--json", "hello")
    assert (r.json()["model"], r.json()["cached"], calls(fake)) == (FLASH, True, 2)


def test_an_answer_expires_with_its_ttl(backend, fake):
    assert backend("route", "--cache=1", "hello").code == 0
    assert backend("route", "--cache", "1", "hello").code == 0        # --cache N takes N
    assert calls(fake) == 1
    time.sleep(1.1)
    assert backend("route", "--cache=1", "hello").code == 0
    assert calls(fake) == 2
    # a bare --cache keeps it for GEMINI_ROUTER_CACHE_TTL
    env = {"GEMINI_ROUTER_CACHE_TTL": "1"}
    assert backend("route", "--cache", "bye", env=env).code == 0
    assert backend("route", "--cache", "bye", env=env).code == 0
    assert calls(fake) == 3
    time.sleep(1.1)
    assert backend("route", "--cache", "bye", env=env).code == 0
    assert calls(fake) == 4


def test_without_cache_every_route_calls_even_with_the_serve_setting(backend, fake):
    env = {"GEMINI_ROUTER_CACHE_TTL": "600"}            # for serve; route caches when asked
    for _ in range(2):
        r = backend("route", "--json", "hello", env=env)
        assert (r.code, r.json()["cached"]) == (0, False)
    assert calls(fake) == 2
    assert backend("route", "--cache", "hello").code == 0
    assert calls(fake) == 3                             # nothing was kept without --cache


def test_a_stream_replays_the_cached_answer(backend, fake):
    first = backend("route", "--stream", "--cache", "tell me")
    assert (first.code, first.out) == (0, f"[{FLASH}] tell me\n"), first.err
    again = backend("route", "--stream", "--cache", "tell me")
    assert (again.code, again.out) == (0, first.out)
    plain = backend("route", "--cache", "tell me")     # streamed or not: the same answer
    assert plain.out == first.out
    assert fake.count(action="stream") == 1 and fake.count(action="generate") == 0


def test_cache_clear_empties_it(backend, fake):
    assert backend("route", "--cache", "one").code == 0
    assert backend("route", "--cache", "two").code == 0
    r = backend("cache", "clear", "--json")
    assert (r.code, r.json()) == (0, {"cleared": 2})
    assert backend("route", "--cache", "one").code == 0
    assert calls(fake) == 3
    assert backend("cache", "clear").out.startswith("cleared 1 cached answer(s) from ")


def test_failures_are_never_cached(backend, fake):
    fake.set_behaviour("bad_request", model=FLASH)
    for expected_calls in (1, 2):
        r = backend("route", "--cache", "-m", FLASH, "hello")
        assert r.code == 1
        assert calls(fake) == expected_calls


def test_cache_settings_are_validated(backend):
    for env, words in (({"GEMINI_ROUTER_CACHE_TTL": "-1"}, "GEMINI_ROUTER_CACHE_TTL"),
                       ({"GEMINI_ROUTER_CACHE_MB": "0"}, "GEMINI_ROUTER_CACHE_MB")):
        r = backend("route", "--cache", "hello", env=env)
        assert r.code == 3 and words in r.err and len(r.err.splitlines()) == 1, r.err
    r = backend("route", "--cache=-5", "hello")
    assert r.code == 2 and "--cache" in r.err


def test_the_router_counts_hits_misses_and_stores(fake, state_dir):
    env = base_env(state_dir, fake.url, KEYS[:2])
    env["GEMINI_ROUTER_CACHE_TTL"] = "60"                   # what serve uses
    settings = gr.load_settings(env)
    assert settings.cache_ttl == 60
    router = gr.Router(settings, shared_rotation=False)
    try:
        for _ in range(3):
            assert router.route(gr.PromptRequest("hi")).text == f"[{FLASH}] hi"
    finally:
        router.close()
    assert router.store.cache.counters() == {"hits": 2, "misses": 1, "stores": 1}
    assert calls(fake) == 1


def test_the_files_cache_stays_within_its_bound_dropping_the_least_recently_used(tmp_path):
    cache = gr.FileCache(str(tmp_path / "cache"), max_bytes=20_000)
    names = [f"{i:064x}" for i in range(12)]
    value = {"text": "x" * 2400}
    for i, name in enumerate(names):
        assert cache.put(name, value, ttl=600)
        time.sleep(0.01)
        assert cache.get(names[0]) == value                   # the first one stays in use
        files = list((tmp_path / "cache").iterdir())
        assert sum(f.stat().st_size for f in files) <= 20_000
    kept = sorted(f.stem for f in (tmp_path / "cache").iterdir())
    assert names[0] in kept and names[1] not in kept and names[-1] in kept
    assert len(kept) < len(names)
    assert not cache.put("f" * 64, {"text": "y" * 6000}, ttl=600)   # over a quarter: refused
    assert cache.get("f" * 64) is None
    assert cache.clear() == len(kept)


def test_the_cache_key_is_canonical_and_sees_attachment_bytes():
    parts = {"prompt": "p", "options": {"a": 1, "b": 2}, "attachments": [["image/png", b"1"]]}
    same = {"attachments": [["image/png", b"1"]], "options": {"b": 2, "a": 1}, "prompt": "p"}
    other = {**parts, "attachments": [["image/png", b"2"]]}
    assert gr.cache_key(parts) == gr.cache_key(same) != gr.cache_key(other)
    assert len(gr.cache_key(parts)) == 64


def test_a_gateway_request_key_ignores_key_order_but_not_the_choice(fake, state_dir):
    settings = gr.load_settings(base_env(state_dir, fake.url, KEYS[:1]))
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
            "generationConfig": {"temperature": 0.2, "seed": 1}}
    reordered = {"generationConfig": {"seed": 1, "temperature": 0.2},
                 "contents": [{"parts": [{"text": "hi"}], "role": "user"}]}
    key = gr.request_cache_key(settings, "generateContent", "auto", body)
    assert key == gr.request_cache_key(settings, "generateContent", "auto", reordered)
    assert key != gr.request_cache_key(settings, "generateContent", "auto-fast", body)
    assert key != gr.request_cache_key(settings, "chat.completions", "auto", body)
