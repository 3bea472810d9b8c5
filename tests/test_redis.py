"""State on Redis (issue 15): one state interface, two backends.

Every test here runs against a real redis-server (Debian's package) that it starts on a free
loopback port and stops (the `redis_servers` fixture); nothing of the backend is faked. The
route/failure suites run on Redis too with `pytest --state-backend=redis` (see conftest.py):

  1. one interface: every command works with GEMINI_ROUTER_STATE_URL and the state dir stays
     empty; a read returns the same documents while nothing changed; the file backend
     imports no redis (-X importtime); all keys under the prefix, other applications' keys
     untouched
  2. atomic across hosts: processes with different state dirs sharing one Redis spend exactly
     one call at a ceiling, and honour each other's cooldowns; no key secret reaches Redis;
     the lock and cache entries carry TTLs
  3. faults: unreachable at start, wrong password, TLS; Redis lost while a Router runs
     (degraded, merged back), restarted under load (no answer lost); a process killed in the
     middle of a reservation leaves no stuck lock; an answer is printed when its recording
     cannot get the lock; bad entries in Redis dropped, a bad document set aside
  5. moving over: files -> state export -> state import into Redis -> the same keys/cooldowns
  6. TTLs: cooldowns, call counters and strikes are keys of their own that Redis expires when
     they stop mattering (exact PEXPIRETIMEs), their indexes with their last member; after a
     mixed run only `PREFIX state` has no TTL; a Redis of the previous layout is read, then
     moved; a commit is one script and rewrites only the entries that changed
"""
from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import gemini_router as gr
from conftest import (KEYS, ROOT, CLI, RedisServer, base_env, redis_entries,
                      route_while_state_is_locked)

FLASH = "gemini-2.5-flash"
FLASH20 = "gemini-2.0-flash"
PREFIX = "gemini-router:"
K1, K2, K3 = KEYS


def fp(key: str) -> str:
    import hashlib
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@pytest.fixture
def redis_server(redis_servers) -> RedisServer:
    return redis_servers()


def on_redis(cli: CLI, server: RedisServer, prefix: str | None = None) -> CLI:
    """`cli` with its state in `server` (under `prefix`, default the documented one)."""
    cli.env["GEMINI_ROUTER_STATE_URL"] = server.url
    if prefix is None:
        cli.env.pop("GEMINI_ROUTER_REDIS_PREFIX", None)
    else:
        cli.env["GEMINI_ROUTER_REDIS_PREFIX"] = prefix
    return cli


def stored(server: RedisServer, name: str, prefix: str = PREFIX) -> dict:
    """A document's skeleton, as the hash `PREFIX state` holds it."""
    raw = server.client().hget(prefix + "state", name)
    return json.loads(raw) if raw else {}


def kept(server: RedisServer, word: str, prefix: str = PREFIX) -> dict:
    """id -> entry of the expiring entries kept under their own keys (`PREFIX <word>:<id>`)."""
    return redis_entries(server.client(), prefix, word)


def settings_for(state_dir: Path, fake, server: RedisServer, keys=KEYS[:2],
                 **extra: str) -> gr.Settings:
    env = base_env(state_dir, fake.url, keys)
    env.update(GEMINI_ROUTER_STATE_URL=server.url, **extra)
    env.pop("GEMINI_ROUTER_REDIS_PREFIX", None)
    return gr.load_settings(env)


def everything_in(server: RedisServer) -> dict[bytes, object]:
    """Every key of the server and its value (strings and hashes; other types by name)."""
    r = server.client()
    found: dict[bytes, object] = {}
    for name in r.scan_iter(count=1000):
        kind = r.type(name)
        found[name] = r.hgetall(name) if kind == b"hash" else \
            r.get(name) if kind == b"string" else kind
    return found


# --------------------------------------------------------------------------------------
# 1. One interface, two backends
# --------------------------------------------------------------------------------------

def test_every_command_works_on_redis_and_nothing_lands_in_the_state_dir(cli, fake,
                                                                         redis_server):
    on_redis(cli, redis_server)
    fake.set_behaviour("invalid_key", key=K1)
    r = cli("route", "--json", "hello")
    assert r.code == 0, r.err
    assert (r.json()["key"], r.json()["text"]) == ("key#2", f"[{FLASH}] hello")
    assert cli("lock", FLASH20).code == 0
    assert cli("route", "hi").out == f"[{FLASH20}] hi\n"
    assert cli("unlock").code == 0
    cooldowns = cli("cooldowns", "--json").json()
    assert [(e["key"], e["kind"]) for e in cooldowns] == [("key#1", "disabled")]
    keys = cli("keys", "--json").json()["keys"]
    assert [(k["key"], k["state"], k["calls_today"]) for k in keys] == \
        [("key#1", "disabled", 0), ("key#2", "ok", 2)]       # key#1 refused the listing
    assert cli("stats", "--json").json()[FLASH]["samples"] == 1
    assert FLASH in cli("tiers", "--json").json()
    assert cli("models", "--json").json()[FLASH]["probed"] is True
    dry = cli("route", "--dry-run", "--json", "x").json()
    assert (dry["model"], dry["key"], dry["model_list"]) == (FLASH, "key#2", "cached")
    assert cli("cooldowns", "--clear", "key#1").code == 0
    assert cli("cooldowns", "--json").json() == []
    # key#1 refused the listing, key#2 listed once for every command: the list is in Redis
    assert (fake.count(key=K1, action="list"), fake.count(key=K2, action="list")) == (1, 1)
    assert not cli.state_dir.exists() or list(cli.state_dir.iterdir()) == []
    assert stored(redis_server, "router")["lock"] is None
    assert stored(redis_server, "cooldowns")["disabled_keys"] == {}
    assert len(stored(redis_server, "stats")["models"][FLASH]) == 1


def test_a_read_returns_the_same_documents_until_another_process_writes(fake, tmp_path,
                                                                        redis_server):
    settings = settings_for(tmp_path / "a", fake, redis_server)
    mine, other = gr.open_store(settings), gr.open_store(settings)
    assert type(mine).__name__ == "RedisStateStore"
    with mine.transaction(write=False) as tx:
        first = (tx.cooldowns, tx.router)
    with mine.transaction(write=False) as tx:
        assert (tx.cooldowns, tx.router)[0] is first[0] and tx.router is first[1]
    with other.transaction() as tx:
        tx.router["lock"] = FLASH
    with mine.transaction(write=False) as tx:
        assert tx.router is not first[1] and tx.router["lock"] == FLASH
        assert tx.cooldowns is first[0]                     # unchanged: the same object


@pytest.mark.parametrize("argv", [["cooldowns"], ["tiers"], ["stats"], ["route", "hi"]])
def test_the_file_backend_imports_no_redis(cli, argv):
    proc = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "gemini_router.py"),
                           *argv], env=cli.env, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")]
    assert "json" in imported                               # the log is there to be read
    assert [m for m in imported if m.split(".")[0] == "redis"] == []


def test_all_keys_live_under_the_prefix_and_other_applications_keys_are_untouched(
        cli, fake, redis_server):
    r = redis_server.client()
    foreign = {b"state": b"another app", b"lock": b"theirs", b"app:cache:1": b"x",
               b"gemini-router-other:state": b"y"}
    r.mset(foreign)
    r.expire(b"app:cache:1", 3600)
    on_redis(cli, redis_server, prefix="team-a:")
    fake.set_behaviour("rate_minute", key=K1, model=FLASH)
    assert cli("route", "--cache", "hi").code == 0
    assert cli("cooldowns", "--clear", "--all").code == 0
    assert cli("cache", "clear").code == 0
    assert cli("route", "--cache", "again").code == 0
    ours = [k for k in everything_in(redis_server) if k not in foreign]
    assert ours and all(k.startswith(b"team-a:") for k in ours), ours
    assert {k: r.get(k) for k in foreign} == foreign
    assert 0 < r.ttl(b"app:cache:1") <= 3600


def test_two_prefixes_on_one_redis_are_two_separate_states(fake, tmp_path, redis_server):
    a = on_redis(CLI(fake, tmp_path / "a", KEYS[:2]), redis_server, prefix="a:")
    b = on_redis(CLI(fake, tmp_path / "b", KEYS[:2]), redis_server, prefix="b:")
    assert a("lock", FLASH20).code == 0
    assert b("route", "--json", "hi").json()["model"] == FLASH       # not locked there
    assert a("route", "--json", "hi").json()["model"] == FLASH20


# --------------------------------------------------------------------------------------
# 2. Atomic where it matters
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend, calls", [("files", 4), ("redis", 1)])
def test_hosts_with_their_own_state_dirs_spend_one_call_at_a_ceiling_only_on_redis(
        fake, tmp_path, redis_server, backend, calls):
    """Four processes ("hosts": separate state dirs) at once, GEMINI_ROUTER_RPM=1 on the one
    key: sharing Redis, exactly one of them may call; with files each host counts alone."""
    setup = CLI(fake, tmp_path / "setup", KEYS[:1])
    if backend == "redis":
        on_redis(setup, redis_server)
    assert setup("models").code == 0                        # a listed model for every host
    procs = []
    for i in range(4):
        env = base_env(tmp_path / f"host{i}", fake.url, KEYS[:1])
        env["GEMINI_ROUTER_RPM"] = "1"
        env.pop("GEMINI_ROUTER_REDIS_PREFIX", None)
        if backend == "redis":
            env["GEMINI_ROUTER_STATE_URL"] = redis_server.url
        else:
            (tmp_path / f"host{i}").mkdir()
            for name in ("router_state.json",):
                shutil.copy(tmp_path / "setup" / name, tmp_path / f"host{i}" / name)
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "gemini_router.py"), "route", "-m", FLASH, f"p{i}"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            cwd=str(ROOT)))
    results = [(p.wait(timeout=60), p.stderr.read().decode()) for p in procs]
    assert fake.count(action="generate") == calls
    assert sorted(code for code, _ in results) == sorted([0] * calls + [4] * (4 - calls))
    refused = [err for code, err in results if code == 4]
    assert all("GEMINI_ROUTER_RPM=1 reached" in err for err in refused), refused


def test_a_cooldown_set_on_one_host_is_honoured_by_the_next_route_on_another(
        fake, tmp_path, redis_server):
    host_a = on_redis(CLI(fake, tmp_path / "a", KEYS[:2]), redis_server)
    host_b = on_redis(CLI(fake, tmp_path / "b", KEYS[:2]), redis_server)
    fake.set_behaviour("rate_minute", key=K1, model=FLASH, retry_delay="300s")
    r = host_a("route", "--json", "-m", FLASH, "hi")
    assert [(a["key"], a["outcome"]) for a in r.json()["attempts"]] == \
        [("key#1", "rate_limited"), ("key#2", "ok")]
    fake.reset_log()
    for _ in range(3):
        r = host_b("route", "--json", "-m", FLASH, "hi")
        assert [(a["key"], a["outcome"]) for a in r.json()["attempts"]] == [("key#2", "ok")]
    assert fake.count(key=K1, action="generate") == 0       # host B never spent one on key#1
    entry = host_b("cooldowns", "--json").json()[0]
    assert (entry["key"], entry["model"], entry["kind"]) == ("key#1", FLASH, "rate_limited")
    assert 290 < entry["remaining_s"] <= 300


def test_no_key_secret_ever_reaches_redis(fake, tmp_path, redis_server):
    cli = on_redis(CLI(fake, tmp_path / "s", KEYS), redis_server)
    fake.set_behaviour("invalid_key", key=K1)
    fake.set_behaviour("rate_minute", key=K2, model=FLASH)
    assert cli("route", "--cache", "hello").code == 0
    assert cli("rank", "--models", FLASH).code == 0
    assert cli("route", "--stream", "--cache", "-o", "seed=3", "again").code == 0
    assert cli("lock", FLASH20).code == 0
    contents = everything_in(redis_server)
    assert len(contents) >= 2                                # the state and a cached answer
    text = repr(contents)
    for key in KEYS:
        for i in range(0, len(key) - 11):                   # no 12-character piece of a key
            assert key[i:i + 12].encode() not in text.encode(), key[i:i + 12]
    assert fp(K1).encode() in text.encode()                 # fingerprints are what is kept


def test_the_lock_and_cached_answers_carry_ttls_the_state_none(fake, tmp_path, redis_server):
    settings = settings_for(tmp_path / "t", fake, redis_server,
                            GEMINI_ROUTER_LOCK_TIMEOUT="3")
    store = gr.open_store(settings)
    with store.transaction() as tx:
        tx.router["lock"] = FLASH
        ttl_ms = redis_server.client().pttl(PREFIX + "lock")
    assert 2000 < ttl_ms <= 3000
    assert redis_server.client().exists(PREFIX + "lock") == 0   # released after the write
    assert store.cache.put("ab" * 32, {"text": "x"}, ttl=50)
    assert 45 < redis_server.client().ttl(PREFIX + "cache:" + "ab" * 32) <= 50
    assert redis_server.client().ttl(PREFIX + "state") == -1    # bounded; see section 6


# --------------------------------------------------------------------------------------
# 3. Faults
# --------------------------------------------------------------------------------------

def test_an_unreachable_redis_at_start_is_exit_3_naming_the_url_without_its_password(cli):
    port = __import__("conftest").free_port()
    url = f"redis://:s3cret-pass@127.0.0.1:{port}/2"
    for argv in (["route", "hi"], ["cooldowns"], ["state", "export"]):
        r = cli(*argv, env={"GEMINI_ROUTER_STATE_URL": url})
        assert r.code == 3, r.err
        assert r.out == ""
        assert r.err.splitlines() == [
            f"gemini-router: error: cannot reach Redis at redis://:***@127.0.0.1:{port}/2: "
            f"Error 111 connecting to 127.0.0.1:{port}. Connection refused."]
    r = cli("stats", "--state-url", f"redis://:s3cret-pass@127.0.0.1:{port}/2")
    assert r.code == 3 and "s3cret" not in r.err and "cannot reach Redis" in r.err


@pytest.mark.parametrize("url, words", [
    ("http://127.0.0.1:6379", "must be redis://[:password@]host[:port][/db] or rediss://"),
    ("redis://:pw@127.0.0.1:99999/0", "must be redis://"),
    ("redis://127.0.0.1:6379/x", "the database must be a number"),
])
def test_a_malformed_state_url_is_a_configuration_error(cli, url, words):
    r = cli("tiers", env={"GEMINI_ROUTER_STATE_URL": url})
    assert r.code == 3 and words in r.err and len(r.err.splitlines()) == 1, r.err
    assert ":pw@" not in r.err


def test_a_wrong_or_missing_password_is_exit_3_saying_so(cli, fake, redis_servers):
    server = redis_servers(password="right-password")
    good = server.url
    assert on_redis(cli, server)("route", "hi").code == 0
    for url in (good.replace("right-password", "wrong-password"),
                good.replace(":right-password@", "")):
        r = cli("route", "hi", env={"GEMINI_ROUTER_STATE_URL": url})
        assert r.code == 3, r.err
        [line] = r.err.splitlines()
        assert line.startswith("gemini-router: error: Redis at ") and \
            "refused the credentials" in line, line
        assert "password" not in line.split("refused")[0].replace("***", "")
        assert "wrong-password" not in line
    assert fake.count(action="generate") == 1


def make_certificate(directory: Path) -> dict[str, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA), made with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return {"cert": cert, "key": key, "ca": cert}


def test_rediss_keeps_the_state_over_tls_and_an_unverified_server_is_refused(
        cli, fake, tmp_path, redis_servers):
    server = redis_servers(tls=make_certificate(tmp_path / "tls"))
    assert server.url.startswith("rediss://")
    r = on_redis(cli, server)("route", "--json", "over tls")
    assert r.code == 0, r.err
    assert stored(server, "stats")["models"][FLASH][0]["ok"] is True
    # without the CA the server's certificate cannot be verified; plain redis:// is no TLS
    for url in (server.url.split("?")[0], server.url.split("?")[0].replace("rediss", "redis")):
        r = cli("cooldowns", env={"GEMINI_ROUTER_STATE_URL": url})
        assert r.code == 3 and r.err.startswith("gemini-router: error: cannot reach Redis at"), \
            r.err
        assert len(r.err.splitlines()) == 1
    r = cli("cooldowns", env={"GEMINI_ROUTER_STATE_URL": server.url.split("?")[0]})
    assert "certificate verify failed" in r.err


def wait_for(condition, timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_redis_lost_while_a_router_runs_degrades_then_merges_back(fake, tmp_path,
                                                                  redis_servers, capsys):
    server = redis_servers()
    settings = settings_for(tmp_path / "g", fake, server)
    router = gr.Router(settings, shared_rotation=False)
    store = router.store
    try:
        assert router.route(gr.PromptRequest("before")).text == f"[{FLASH}] before"
        router.flush()
        server.kill()
        fake.set_behaviour("rate_minute", key=K1, model=FLASH, retry_delay="600s")
        result = router.route(gr.PromptRequest("while away"))
        assert (result.key, result.text) == ("key#2", f"[{FLASH}] while away")
        assert store.degraded is True
        assert store.degraded_reason.startswith(f"Redis at {server.url} unreachable: ")
        router.route(gr.PromptRequest("still away"))
        assert fake.count(key=K1, action="generate") == 2      # an answer, then the 429
        with store.transaction(write=False) as tx:             # kept in the process's copy
            assert [(e["key"], e["kind"]) for e in tx.cooldowns["cooldowns"]] == \
                [(fp(K1), "rate_limited")]
        router.flush()
        server.start()                                         # back, and empty
        time.sleep(store.RETRY_EVERY)
        assert router.route(gr.PromptRequest("back")).text == f"[{FLASH}] back"
        assert store.degraded is False and store.degraded_reason is None
        router.route(gr.PromptRequest("and again"))
        assert fake.count(key=K1, action="generate") == 2      # the cooldown still holds
    finally:
        router.close()
    err = capsys.readouterr().err
    assert err.count("unreachable") == 1 and err.count("is back") == 1, err
    # what the router learned while Redis was away is in Redis now
    samples = stored(server, "stats")["models"][FLASH]
    assert [s["key"] for s in samples] == [fp(K1)] + [fp(K2)] * 4
    assert stored(server, "cooldowns")["cooldowns"] == []
    [cooldown] = kept(server, "cooldown").values()
    assert (cooldown["key"], cooldown["kind"]) == (fp(K1), "rate_limited")


def test_merging_back_keeps_both_sides_and_adds_up_the_counts():
    settings = gr.load_settings({"GEMINI_API_KEY": K1})
    empty = {n: gr.empty_doc(n) for n in gr.STATE_DOCS}
    base = json.loads(json.dumps(empty))
    base["cooldowns"]["cooldowns"] = [{"model": "m", "key": "a", "until": 5e9, "since": 1,
                                       "reason": "r", "kind": "rate_limited"}]
    base["router"]["usage"] = {"a/m": {"day": "2026-11-30", "count": 3}}
    mine, theirs = json.loads(json.dumps(base)), json.loads(json.dumps(base))
    mine["cooldowns"]["cooldowns"] = []                           # cleared here
    mine["cooldowns"]["disabled_keys"] = {"b": {"reason": "bad"}}  # disabled here
    mine["router"]["usage"]["a/m"]["count"] = 5                  # 2 calls here
    theirs["router"]["usage"]["a/m"]["count"] = 4                # 1 call there
    theirs["router"]["lock"] = "x"                                # pinned there
    mine["stats"]["models"]["m"] = [{"t": 2, "ok": True, "kind": "ok"}]
    theirs["stats"]["models"]["m"] = [{"t": 1, "ok": False, "kind": "transient"}]
    merged = {n: gr.merge_doc(n, base[n], mine[n], theirs[n], settings) for n in gr.STATE_DOCS}
    assert merged["cooldowns"]["cooldowns"] == []
    assert merged["cooldowns"]["disabled_keys"] == {"b": {"reason": "bad"}}
    assert merged["router"]["usage"]["a/m"]["count"] == 6
    assert merged["router"]["lock"] == "x"
    assert [s["t"] for s in merged["stats"]["models"]["m"]] == [1, 2]
    # a cooldown cleared here but changed there stays
    theirs["cooldowns"]["cooldowns"][0]["until"] = 6e9
    again = gr.merge_doc("cooldowns", base["cooldowns"], mine["cooldowns"],
                         theirs["cooldowns"], settings)
    assert [e["until"] for e in again["cooldowns"]] == [6e9]


def test_redis_restarted_under_load_loses_no_answer(fake, tmp_path, redis_servers, capsys):
    server = redis_servers()
    settings = settings_for(tmp_path / "load", fake, server, ROLLING_WINDOW="1000")
    router = gr.Router(settings, shared_rotation=False)
    router.start_flusher()
    answers: list[str] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def loop() -> None:
        n = 0
        while not stop.is_set() and n < 900:
            try:
                answers.append(router.route(gr.PromptRequest(f"q{n}")).text)
            except BaseException as exc:       # noqa: BLE001 - any failure fails the test
                failures.append(exc)
                return
            n += 1
    thread = threading.Thread(target=loop)
    thread.start()
    try:
        wait_for(lambda: len(answers) >= 20, what="routes before the restart")
        server.kill()
        wait_for(lambda: router.store.degraded, what="the store to degrade")
        at_kill = len(answers)
        wait_for(lambda: len(answers) >= at_kill + 30 or failures, what="routes while away")
        server.start()
        wait_for(lambda: not router.store.degraded or failures, what="the store to resync")
        at_back = len(answers)
        wait_for(lambda: len(answers) >= at_back + 20 or failures, what="routes after")
    finally:
        stop.set()
        thread.join(timeout=60)
        router.close()
    assert failures == []
    assert answers == [f"[{FLASH}] q{i}" for i in range(len(answers))]
    samples = stored(server, "stats")["models"][FLASH]
    assert len(samples) == len(answers) == fake.count(action="generate")
    err = capsys.readouterr().err
    assert err.count("unreachable") == 1 and err.count("is back") == 1, err


def test_a_process_killed_mid_reservation_leaves_no_stuck_lock(cli, fake, redis_server):
    on_redis(cli, redis_server)
    assert cli("models").code == 0
    env = dict(cli.env, GEMINI_ROUTER_RPM="5", GEMINI_ROUTER_LOCK_TIMEOUT="2")
    # the child stops for good inside Router.reserve's locked transaction (a paced pair)
    code = ("import sys, time, gemini_router as g\n"
            "def stuck(*a, **k):\n"
            "    print('holding', flush=True)\n"
            "    time.sleep(600)\n"
            "g.count_call = stuck\n"
            f"sys.exit(g.main(['route', '-m', {FLASH!r}, 'hi']))\n")
    child = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=str(ROOT),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL)
    try:
        assert child.stdout.readline() == b"holding\n"
        assert 0 < redis_server.client().pttl(PREFIX + "lock") <= 2000
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    began = time.monotonic()
    r = cli("route", "-m", FLASH, "after", env={"GEMINI_ROUTER_RPM": "5",
                                                "GEMINI_ROUTER_LOCK_TIMEOUT": "2"})
    assert (r.code, r.out) == (0, f"[{FLASH}] after\n"), r.err
    assert time.monotonic() - began < 2 + 3                 # the lock's TTL, plus start-up
    assert fake.count(action="generate") == 1               # the killed one never called


def test_an_answer_is_printed_when_the_redis_lock_keeps_its_record_out(cli, fake,
                                                                       redis_server):
    on_redis(cli, redis_server)
    assert cli("models").code == 0
    fake.set_latency(1.0, model=FLASH)
    r = route_while_state_is_locked(cli, FLASH, lambda: redis_server.client().set(
        PREFIX + "lock", "another-host", px=4000))
    assert r.code == 0, r.err
    assert r.out == f"[{FLASH}] hello\n"
    assert "warning: could not record the outcome: state lock gemini-router:lock in Redis" \
        in r.err
    assert "Traceback" not in r.err


def test_a_bad_entry_in_redis_is_dropped_and_a_bad_document_set_aside(cli, fake,
                                                                      redis_server):
    on_redis(cli, redis_server)
    fake.set_behaviour("invalid_key", key=K1)
    assert cli("route", "hi").code == 0
    r = redis_server.client()
    doc = stored(redis_server, "cooldowns")
    now = time.time()
    doc["cooldowns"] += [{"model": FLASH, "key": "x", "until": "tomorrow", "reason": "bad"},
                         {"model": FLASH20, "key": None, "until": now + 100, "reason": "kept",
                          "since": now, "kind": "rate_limited"}]
    r.hset(PREFIX + "state", mapping={"cooldowns": json.dumps(doc), "v:cooldowns": "hand"})
    listed = cli("cooldowns", "--json")
    assert listed.code == 0
    assert "dropped 1 unreadable entry, kept the rest" in listed.err
    assert sorted(((e["model"], e["kind"]) for e in listed.json()), key=str) == \
        [(FLASH20, "rate_limited"), (None, "disabled")]
    assert cli("route", "-m", FLASH, "hi").code == 0          # a writer saves it cleaned
    assert stored(redis_server, "cooldowns")["cooldowns"] == []
    assert [e["reason"] for e in kept(redis_server, "cooldown").values()] == ["kept"]
    r.hset(PREFIX + "state", mapping={"router": "{not json", "v:router": "broken"})
    listed = cli("cooldowns")
    assert listed.code == 0
    aside = f"{PREFIX}corrupt:router:broken"
    assert f"is not valid JSON; kept it as {aside} (for 30 days) and started afresh" \
        in listed.err
    assert r.get(aside) == b"{not json" and 0 < r.ttl(aside) <= 30 * 86400


# --------------------------------------------------------------------------------------
# 5. Moving over
# --------------------------------------------------------------------------------------

def test_files_move_to_redis_and_back_without_losing_disabled_keys_or_limits(
        fake, tmp_path, redis_server):
    files = CLI(fake, tmp_path / "files", KEYS)
    fake.set_behaviour("invalid_key", key=K1)
    fake.set_behaviour("rate_day", key=K2, model=FLASH, quota_value="20")
    assert files("route", "-m", FLASH, "hi").code == 0
    assert files("lock", FLASH).code == 0
    before = {what: files(what, "--json").json() for what in ("keys", "cooldowns", "stats")}
    assert [k["state"] for k in before["keys"]["keys"]] == ["disabled", "cooling", "ok"]
    assert before["keys"]["keys"][1]["limits"][0]["rpd"] == 20
    exported = files("state", "export")
    assert exported.code == 0 and exported.err == ""
    (tmp_path / "state.json").write_text(exported.out)

    shared = on_redis(CLI(fake, tmp_path / "elsewhere", KEYS), redis_server)
    r = shared("state", "import", str(tmp_path / "state.json"), "--json")
    assert r.code == 0, r.err
    assert r.json()["imported"] == {"cooldowns": 1, "disabled_keys": 1, "learned_limits": 1,
                                    "samples": 1, "models_listed": 14}
    after = {what: shared(what, "--json").json() for what in ("keys", "cooldowns", "stats")}
    for entry in before["cooldowns"] + after["cooldowns"]:
        entry.pop("remaining_s")
    assert after == before
    assert shared("route", "--json", "x").json()["model"] == FLASH          # the lock moved
    # and back again, through stdin, into fresh files
    back = CLI(fake, tmp_path / "back", KEYS)
    r = back("state", "import", "-", input=shared("state", "export").out)
    assert r.code == 0, r.err
    assert back("keys", "--json").json() == shared("keys", "--json").json()


def test_state_import_sanitises_every_entry_and_refuses_what_is_not_an_export(cli, tmp_path):
    assert cli("state", "export").code == 0
    data = json.loads(cli("state", "export").out)
    data["cooldowns"]["cooldowns"] = [{"model": FLASH, "key": fp(K1), "until": "soon"},
                                      {"model": FLASH, "key": fp(K2), "until": time.time() + 60,
                                       "reason": "kept", "since": time.time(), "kind": "capacity"}]
    path = tmp_path / "in.json"
    path.write_text(json.dumps(data))
    r = cli("state", "import", str(path))
    assert r.code == 0, r.err
    assert "dropped 1 unreadable entry, kept the rest" in r.err
    assert [e["reason"] for e in cli("cooldowns", "--json").json()] == ["kept"]
    for content, words in ((b"[]", "is not a document of 'gemini-router state export'"),
                           (b"{", "is not valid JSON"),
                           (json.dumps({**data, "router": {"kind": "gemini-router/router",
                                                           "schema": 7}}).encode(),
                            "newer than this gemini-router understands")):
        path.write_bytes(content)
        r = cli("state", "import", str(path))
        assert r.code in (2, 3) and words in r.err and len(r.err.splitlines()) == 1, r.err
    r = cli("state", "import")
    assert r.code == 2 and "state import needs FILE" in r.err
    assert [e["reason"] for e in cli("cooldowns", "--json").json()] == ["kept"]


def test_two_gateways_on_one_redis_spend_one_call_on_a_limited_pair(fake, tmp_path,
                                                                    redis_server):
    """Two `gemini-router serve` processes with their own state dirs and one Redis: the
    429 one of them gets cools the pair for both, so the other never spends a call on it."""
    import signal

    import requests

    from gateway_fixtures import ServeProcess
    fake.set_behaviour("rate_minute", key=K1, model=FLASH, retry_delay="300s")
    body = {"contents": [{"role": "user", "parts": [{"text": "hello"}]}]}
    gateways = []
    try:
        for host in ("a", "b"):
            env = base_env(tmp_path / host, fake.url, KEYS[:2])
            env.update(GEMINI_ROUTER_STATE_URL=redis_server.url)
            gateways.append(ServeProcess(env))
        answers = []
        for gateway in gateways + gateways:              # a, b, a, b
            r = requests.post(f"{gateway.url}/v1beta/models/{FLASH}:generateContent",
                              json=body, timeout=30)
            assert r.status_code == 200, r.text
            answers.append(r.headers["x-gemini-router-key"])
        assert answers == ["key#2"] * 4
        assert fake.count(key=K1, action="generate") == 1       # one call on key#1, ever
        assert fake.count(key=K2, action="generate") == 4
        cooling = on_redis(CLI(fake, tmp_path / "c", KEYS[:2]), redis_server)(
            "cooldowns", "--json").json()
        assert [(e["key"], e["model"], e["kind"]) for e in cooling] == \
            [("key#1", FLASH, "rate_limited")]
        assert 290 < cooling[0]["remaining_s"] <= 300
    finally:
        for gateway in gateways:
            assert gateway.stop(signal.SIGTERM) == 0


# --------------------------------------------------------------------------------------
# 6. Entries that expire carry Redis TTLs (issue 15 item 2)
# --------------------------------------------------------------------------------------

def ms(t: float) -> int:
    """A time in whole milliseconds, rounded up, as the expiry of an entry is set."""
    return math.ceil(t * 1000)


def cooldown_key(model: str | None, key: str | None, prefix: str = PREFIX) -> str:
    """The documented key of a cooldown: sha256 of the JSON [model, key fingerprint], 16 hex."""
    import hashlib
    return prefix + "cooldown:" + hashlib.sha256(json.dumps([model, key]).encode()
                                                 ).hexdigest()[:16]


def next_midnight_pacific(day: str) -> float:
    """The end of a Pacific day, computed without the module."""
    from datetime import date, datetime, timedelta
    from zoneinfo import ZoneInfo
    end = date.fromisoformat(day) + timedelta(days=1)
    return datetime(end.year, end.month, end.day,
                    tzinfo=ZoneInfo("America/Los_Angeles")).timestamp()


def command_calls(server: RedisServer, command: str) -> int:
    """How many times Redis ran `command` (scripts' calls included), from INFO commandstats."""
    return server.client().info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)


def test_a_cooldown_is_its_own_key_expiring_when_it_ends(cli, fake, redis_server):
    on_redis(cli, redis_server)
    r = redis_server.client()
    fake.set_behaviour("rate_minute", key=K1, model=FLASH, retry_delay="30s")
    routed = cli("route", "--json", "-m", FLASH, "hi")
    assert [(a["key"], a["outcome"]) for a in routed.json()["attempts"]] == \
        [("key#1", "rate_limited"), ("key#2", "ok")]
    name = cooldown_key(FLASH, fp(K1))
    entry = json.loads(r.get(name))
    assert (entry["model"], entry["key"], entry["kind"]) == (FLASH, fp(K1), "rate_limited")
    assert entry["until"] - entry["since"] == 30
    assert r.pexpiretime(name) == ms(entry["until"])
    assert r.zrange(PREFIX + "index:cooldown", 0, -1, withscores=True) == \
        [(name.removeprefix(PREFIX + "cooldown:").encode(), ms(entry["until"]))]
    assert r.pexpiretime(PREFIX + "index:cooldown") == ms(entry["until"])
    assert stored(redis_server, "cooldowns")["cooldowns"] == []       # none in the hash
    listed = cli("cooldowns", "--json").json()
    assert [(e["key"], e["model"], e["until"]) for e in listed] == \
        [("key#1", FLASH, round(entry["until"], 3))]
    assert cli("cooldowns", "--clear", "key#1").code == 0
    assert (r.exists(name), r.exists(PREFIX + "index:cooldown")) == (0, 0)
    assert cli("cooldowns", "--json").json() == []


def test_a_cooldown_that_ends_is_gone_from_redis_with_no_process_writing(cli, fake, tmp_path,
                                                                        redis_server):
    r = redis_server.client()
    fake.set_behaviour("rate_minute", key=K1, model=FLASH, retry_delay="1s")
    router = gr.Router(settings_for(tmp_path / "r", fake, redis_server), shared_rotation=False)
    try:                                 # in this process: a command's start-up takes ~1 s
        assert router.route(gr.PromptRequest("hi"), model=FLASH).key == "key#2"
    finally:
        router.close()
    name = cooldown_key(FLASH, fp(K1))
    until = json.loads(r.get(name))["until"]
    assert until - time.time() < 1
    assert r.exists(PREFIX + "index:cooldown") == 1
    scripts = command_calls(redis_server, "evalsha")
    time.sleep(max(0.0, until - time.time()) + 0.2)
    assert command_calls(redis_server, "evalsha") == scripts         # nobody wrote meanwhile
    assert (r.exists(name), r.exists(PREFIX + "index:cooldown")) == (0, 0)
    assert on_redis(cli, redis_server)("cooldowns", "--json").json() == []


def test_call_counters_and_strikes_expire_when_they_stop_counting(cli, fake, redis_server):
    on_redis(cli, redis_server)
    r = redis_server.client()
    paced = {"GEMINI_ROUTER_RPM": "5", "COOLDOWN_SECS": "45"}
    assert cli("route", "-m", FLASH, "hi", env=paced).code == 0
    name = f"{PREFIX}usage:{fp(K1)}/{FLASH}"
    usage = json.loads(r.get(name))
    assert usage["count"] == 1 and len(usage["minute"]) == 1
    expected = max(ms(next_midnight_pacific(usage["day"])), ms(usage["minute"][-1] + 60))
    assert r.pexpiretime(name) == expected
    assert r.zscore(PREFIX + "index:usage", f"{fp(K1)}/{FLASH}") == expected
    assert stored(redis_server, "router")["usage"] == {}
    fake.set_behaviour("unavailable", key=K2, model=FLASH)
    r503 = cli("route", "--json", "-m", FLASH, "again", env=paced)
    assert [(a["key"], a["outcome"]) for a in r503.json()["attempts"]] == \
        [("key#2", "transient"), ("key#1", "ok")]
    name = f"{PREFIX}strike:{fp(K2)}/{FLASH}"
    strike = json.loads(r.get(name))
    assert strike["n"] == 1
    assert r.pexpiretime(name) == ms(strike["t"] + 10 * 45)
    assert r.pexpiretime(PREFIX + "index:strike") == ms(strike["t"] + 10 * 45)
    assert stored(redis_server, "router")["strikes"] == {}


def test_every_key_but_the_state_hash_has_a_ttl_after_a_mixed_run(fake, tmp_path,
                                                                 redis_server):
    cli = on_redis(CLI(fake, tmp_path / "mixed", KEYS), redis_server)
    r = redis_server.client()
    fake.set_behaviour("rate_minute", key=K1, model=FLASH, retry_delay="300s")
    fake.set_behaviour("rate_day", key=K2, model=FLASH20)
    fake.set_behaviour("unavailable", key=K3, model=FLASH)
    fake.set_behaviour("unavailable", key=K2, model=FLASH, times=1)
    for argv in (["-m", FLASH, "one"], ["-m", FLASH20, "two"], ["--cache", "three"],
                 ["-m", FLASH, "four"]):
        assert cli("route", *argv, env={"GEMINI_ROUTER_RPM": "9"}).code in (0, 4)
    found = {k.decode(): r.pttl(k) for k in r.scan_iter(match=PREFIX + "*", count=1000)}
    kinds = {k.removeprefix(PREFIX).split(":")[0] for k in found}
    assert kinds == {"state", "cooldown", "usage", "strike", "index", "cache"}, found
    assert {k for k in found if k.startswith(PREFIX + "index:")} == \
        {PREFIX + "index:cooldown", PREFIX + "index:usage", PREFIX + "index:strike"}
    assert [k for k, ttl in found.items() if ttl <= 0] == [PREFIX + "state"]
    assert found[PREFIX + "state"] == -1                              # no TTL: kept


def test_a_redis_written_by_the_previous_version_is_read_then_moved_to_keys(
        fake, tmp_path, redis_server):
    """The previous layout: every entry inline in the documents of `PREFIX state`."""
    cli = on_redis(CLI(fake, tmp_path / "old", KEYS), redis_server)
    r = redis_server.client()
    assert cli("models").code == 0                                   # the model list
    now = time.time()
    cooldowns = {"schema": 1, "kind": "gemini-router/cooldowns",
                 "cooldowns": [{"model": FLASH, "key": fp(K1), "until": now + 600,
                                "since": now, "reason": "rate limited (old)",
                                "kind": "rate_limited", "scope": "pair"}],
                 "disabled_keys": {fp(K2): {"reason": "API key not valid", "since": now}}}
    router = stored(redis_server, "router")
    today, yesterday = gr.pacific_day(now), gr.pacific_day(now - 86400)
    router["usage"] = {f"{fp(K3)}/{FLASH20}": {"day": today, "count": 7},
                       f"{fp(K1)}/{FLASH20}": {"day": yesterday, "count": 3}}
    router["strikes"] = {f"{fp(K1)}/{FLASH20}": 2}                  # an old bare count
    r.hset(PREFIX + "state", mapping={
        "cooldowns": json.dumps(cooldowns), "v:cooldowns": "old-version-1",
        "router": json.dumps(router), "v:router": "old-version-2"})
    listed = cli("cooldowns", "--json")
    assert listed.code == 0 and listed.err == ""
    assert sorted((e["key"], e["model"], e["reason"]) for e in listed.json()) == \
        [("key#1", FLASH, "rate limited (old)"), ("key#2", None, "API key not valid")]
    assert r.hget(PREFIX + "state", "v:cooldowns") == b"old-version-1"   # a read wrote nothing
    routed = cli("route", "--json", "-m", FLASH, "hi")
    assert (routed.code, routed.json()["key"]) == (0, "key#3")
    assert fake.count(key=K1, action="generate") == fake.count(key=K2, action="generate") == 0
    skeleton = stored(redis_server, "cooldowns")
    assert skeleton["cooldowns"] == [] and list(skeleton["disabled_keys"]) == [fp(K2)]
    name = cooldown_key(FLASH, fp(K1))
    assert json.loads(r.get(name))["reason"] == "rate limited (old)"
    assert r.pexpiretime(name) == ms(now + 600)
    assert stored(redis_server, "router")["usage"] == {}
    assert stored(redis_server, "router")["strikes"] == {}
    # today's count moved, yesterday's (of no use) did not; the answer on key#3 is counted
    usage = kept(redis_server, "usage")
    assert {pair: u["count"] for pair, u in usage.items()} == \
        {f"{fp(K3)}/{FLASH20}": 7, f"{fp(K3)}/{FLASH}": 1}
    assert r.pexpiretime(f"{PREFIX}usage:{fp(K3)}/{FLASH20}") == \
        ms(next_midnight_pacific(today))
    assert kept(redis_server, "strike") == {f"{fp(K1)}/{FLASH20}": 2}
    assert 0 < r.pttl(f"{PREFIX}strike:{fp(K1)}/{FLASH20}") <= 10 * 60 * 1000
    after = cli("cooldowns", "--json").json()
    assert sorted((e["key"], e["model"]) for e in after) == [("key#1", FLASH), ("key#2", None)]


def test_a_commit_sends_only_the_entries_that_changed_in_one_script(fake, tmp_path,
                                                                   redis_server):
    """1500 cooldowns (50 keys x 30 models) are one script call; a later transaction that
    changes one entry rewrites that one only."""
    store = gr.open_store(settings_for(tmp_path / "big", fake, redis_server))
    r = redis_server.client()
    with store.transaction() as tx:
        tx.router["lock"] = FLASH                           # the scripts are loaded now
    now = time.time()
    sets, scripts = command_calls(redis_server, "set"), command_calls(redis_server, "evalsha")
    with store.transaction() as tx:
        for k in range(50):
            for m in range(30):
                gr.add_cooldown(tx.cooldowns, f"model-{m}", f"key-{k}", now + 600 + k,
                                "busy", "rate_limited", now)
    assert command_calls(redis_server, "evalsha") - scripts == 3   # read, commit, release
    assert command_calls(redis_server, "set") - sets == 1 + 1500   # the lock, each entry
    assert r.zcard(PREFIX + "index:cooldown") == 1500
    assert r.pexpiretime(PREFIX + "index:cooldown") == ms(now + 600 + 49)
    marker = cooldown_key("model-0", "key-0")
    r.pexpireat(marker, ms(now + 3600))                 # rewritten, it would lose this
    sets = command_calls(redis_server, "set")
    with store.transaction() as tx:
        gr.add_cooldown(tx.cooldowns, "model-1", "key-0", now + 900, "longer", "rate_limited",
                        now)
    assert command_calls(redis_server, "set") - sets == 1 + 1
    assert r.pexpiretime(cooldown_key("model-1", "key-0")) == ms(now + 900)
    assert r.pexpiretime(marker) == ms(now + 3600)
    with store.transaction(write=False) as tx:
        assert len(tx.cooldowns["cooldowns"]) == 1500


def test_a_bad_entry_under_its_own_key_is_dropped_and_removed_by_the_next_write(
        cli, fake, redis_server):
    on_redis(cli, redis_server)
    r = redis_server.client()
    fake.set_behaviour("rate_minute", key=K1, model=FLASH, retry_delay="300s")
    assert cli("route", "-m", FLASH, "hi").code == 0
    good = cooldown_key(FLASH, fp(K1))
    bad = PREFIX + "cooldown:0123456789abcdef"
    r.set(bad, "{not json", px=60_000)
    r.zadd(PREFIX + "index:cooldown", {"0123456789abcdef": ms(time.time() + 60)})
    r.hset(PREFIX + "state", "v:cooldowns", "changed-by-hand")
    listed = cli("cooldowns", "--json")
    assert "dropped 1 unreadable entry, kept the rest" in listed.err
    assert [(e["key"], e["model"]) for e in listed.json()] == [("key#1", FLASH)]
    fake.set_behaviour("rate_minute", key=K2, model=FLASH20, retry_delay="300s")
    assert cli("route", "-m", FLASH20, "hi").code == 0                  # a writer
    assert (r.exists(bad), r.zscore(PREFIX + "index:cooldown", "0123456789abcdef")) == (0, None)
    assert r.exists(good) == 1


def test_a_commit_that_fails_part_way_leaves_every_document_as_it_was(redis_servers, tmp_path):
    """Redis does not roll a failed script back. The commit writes the entries that expire
    first and the documents last, so a command failing in between (here ZADD, denied by an
    ACL; on a Redis without SET ... PXAT, the SET) leaves the shared documents untouched:
    a cooldown held in the previous layout survives for every other process."""
    server = redis_servers()
    admin = server.client()
    admin.execute_command("ACL", "SETUSER", "app", "on", ">pw", "~*", "+@all", "-zadd")
    now = time.time()
    old = {"schema": gr.SCHEMA_VERSION, "kind": "gemini-router/cooldowns",
           "cooldowns": [{"model": "m", "key": "fp1", "until": now + 600, "since": now,
                          "reason": "old layout", "kind": "rate_limited", "scope": "pair"}],
           "disabled_keys": {}}
    admin.hset("gemini-router:state", mapping={"cooldowns": json.dumps(old),
                                               "v:cooldowns": "old"})
    env = {"GEMINI_ROUTER_STATE_DIR": str(tmp_path / "state"), "GEMINI_API_KEY_1": KEYS[0],
           "GEMINI_ROUTER_STATE_URL": f"redis://app:pw@127.0.0.1:{server.port}/0"}
    store = gr.open_store(gr.load_settings(env))
    with store.transaction() as tx:
        gr.add_cooldown(tx.cooldowns, "m2", "fp2", now + 600, "new", "rate_limited", now)
    assert store.degraded                          # the failed write: kept locally
    assert admin.hget("gemini-router:state", "v:cooldowns") == b"old"
    assert json.loads(admin.hget("gemini-router:state", "cooldowns")) == old
    others = gr.open_store(gr.load_settings({**env, "GEMINI_ROUTER_STATE_URL": server.url}))
    assert [e["reason"] for e in others.snapshot()["cooldowns"]["cooldowns"]] == ["old layout"]
    store.close()
    others.close()
