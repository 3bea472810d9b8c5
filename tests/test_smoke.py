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
