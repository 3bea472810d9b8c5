from conftest import KEYS


def test_route_answers_from_the_simulator(cli):
    r = cli("route", "hello world")
    assert r.code == 0, r.err
    assert r.out == "[gemini-2.5-flash] hello world\n"


def test_route_in_process(run_main, fake):
    r = run_main("route", "--json", "hi")
    assert r.code == 0, r.err
    assert r.json()["text"] == "[gemini-2.5-flash] hi"
    assert fake.count(action="generate") == 1
    assert fake.count(key=KEYS[0], action="list") == 1


def test_library_use_routes_and_records_like_the_cli(fake, state_dir, monkeypatch):
    """The README's "As a library" example, as written."""
    import gemini_router as gr
    from conftest import base_env
    for name, value in base_env(state_dir, fake.url, KEYS[:2]).items():
        monkeypatch.setenv(name, value)
    settings = gr.load_settings()
    store = gr.StateStore(settings)
    result = gr.route_prompt(settings, store, gr.PromptRequest("Hello", system="Be brief"))
    assert (result.model, result.key, result.text) == \
        ("gemini-2.5-flash", "key#1", "[gemini-2.5-flash] Hello")
    assert fake.calls[-1].body["systemInstruction"]["parts"][0]["text"] == "Be brief"
    with store.transaction(write=False) as tx:
        stats = gr.all_stats(tx.stats)
    assert stats["gemini-2.5-flash"].samples == 1
