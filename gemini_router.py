#!/usr/bin/env python3
"""gemini-router: send prompts to Google Gemini through the best model and API key available now.

The whole tool is this one module. It reads top to bottom in the order the data flows:

  configuration  environment + flags -> a validated, immutable ``Settings`` (keys, projects,
                 the route budget, state locations)
  errors         one exception class per exit code; ``main`` turns them into one stderr line
  state store    three JSON documents (stats, cooldowns, router state) behind one lock per
                 directory: writers hold it through ``filelock``, readers share it with
                 ``flock`` and reuse what they parsed while no file changed; one bad entry is
                 dropped, never its neighbours; files atomically replaced on write. The same
                 interface over Redis (``RedisStateStore``: a lock with a TTL, the entries
                 that expire as keys with TTLs, degraded to a local copy while Redis is
                 away), and the response cache beside the state
  keys, client   ``key#N`` labels and sha256 fingerprints; one low-level SDK client per key
                 (never ``genai.configure``, which is process-global and sends the wrong key
                 under threads); every upstream answer classified from its raw JSON through
                 one table (``OUTCOME_RULES``, ``ERROR_TABLE``) into an ``Outcome``
  outcomes       ``record_outcome``, the single path from an outcome to a sample, a cooldown
                 (scoped like Google's limits: pair, project x model, project), a learned
                 limit or a disabled key; ``StateView``, the indexed read-back of all that
  stats          rolling per-model samples summarised into success rate, latency, tokens
  tiers          percentile cuts (S/A/B/C) of Fast, Quality and Balance, ties within noise
  prober         asyncio + ThreadPoolExecutor probes for ``rank``, through the router's core
  router         ``Router``: plan (lock, -m, tier order), reserve (rotation, pacing), call,
                 record; bounded by GEMINI_ROUTER_MAX_ATTEMPTS calls and a deadline
  gateway        ``gemini-router serve``: Gemini-native and OpenAI-compatible HTTP over the
                 same ``Router`` loop (FastAPI + uvicorn, aiohttp upstream; imported by
                 ``serve`` only), and the client side of ``route`` through a running gateway
  CLI            argparse subcommands, tables, ``--json``, exit codes

Design rules that the code keeps everywhere:
  * the state lock is never held across a network call;
  * facts from Google (quotas, refusals) are written at once, for every process to see;
    answers and transient failures (guesses) are batch-written;
  * a key's secret never leaves ``ApiKey.secret``: output shows ``key#N``, state keeps a
    fingerprint, and upstream messages are redacted before they are shown;
  * the Gemini SDK and tqdm are imported only by commands that use the network, so local
    commands (tiers, stats, cooldowns, keys, lock, unlock) start fast;
  * every expected failure is a ``RouterError`` with its exit code: one line on stderr,
    never a traceback; an answer that arrived is always delivered.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import stat
import sys
import time
from dataclasses import asdict, dataclass, field, replace

TYPE_CHECKING = False
if TYPE_CHECKING:      # annotations only: importing typing would slow every local command
    from typing import Any, AsyncIterator, Callable, Generator, Iterable, Iterator, Union
    Step = Union["UpstreamCall", "ModelCheck", str]      # what the route loop yields

__version__ = "1.0.0"
PROG = "gemini-router"

# ======================================================================================
# Configuration
# ======================================================================================

DEFAULT_ENDPOINT = "https://generativelanguage.googleapis.com"
STATE_FILE_NAMES = {"stats": "model_stats.json", "router": "router_state.json",
                    "cooldowns": "cooldowns.json"}
STATE_FILE_ENV = {"stats": "STATS_FILE", "router": "STATE_FILE", "cooldowns": "COOLDOWN_FILE"}
SCHEMA_VERSION = 1

# Before anything is measured, routes try Google's stable aliases first, when the list has
# them (they follow models as Google replaces them); the rest of the live list follows by
# family rule (`default_order`). No dated model name here: named models get shut down.
DEFAULT_PREFERENCE = ("gemini-flash-latest", "gemini-flash-lite-latest", "gemini-pro-latest")
# A model whose name carries one of these words is not a text model, whatever methods it lists.
NON_TEXT_WORDS = ("embed", "image", "imagen", "tts", "audio", "live", "veo", "aqa", "lyria",
                  "computer-use", "nano-banana", "robotics", "transcri", "native-audio")
MIN_KEY_LENGTH = 8
MAX_COOLDOWN_SECS = 30 * 86400  # no cooldown, whatever its source, lasts longer than 30 days
MAX_WAIT_SECS = 7 * 86400       # the longest `route --wait`
LONG_COOLDOWN_SECS = 86400.0    # refusals that only a person can lift (billing, no access)
NO_QUOTA_SECS = 30 * 86400.0    # "limit: 0": this project never gets this model
MODEL_CHECK_SECS = 3600.0       # a 404 pair waits this long while the live list is consulted
TRANSIENT_BASE_SECS = 5.0       # first transient strike on a (key, model) pair
MODEL_WIDE_KEYS = 3             # distinct keys failing on a model before it cools for everyone


@dataclass(frozen=True)
class Limit:
    """A bounded numeric setting or flag: its default and the values it may take."""
    default: float
    low: float
    high: float
    integer: bool = False

    def parse(self, raw: str | None, source: str) -> float:
        """The setting's value from the environment (blank = default) or a ConfigError."""
        if raw is None or raw.strip() == "":
            return self.default
        value, problem = self.convert(raw)
        if problem:
            raise ConfigError(f"{source} {problem}")
        return value

    def convert(self, raw: str) -> tuple[float, str | None]:
        """(value, None), or (nan, what is wrong with raw)."""
        try:
            value = int(raw) if self.integer else float(raw)
        except ValueError:
            kind = "a whole number" if self.integer else "a number"
            return math.nan, f"must be {kind}, got {raw.strip()[:40]!r}"
        if not (self.low <= value <= self.high) or math.isnan(value):
            return math.nan, (f"must be between {_fmt_num(self.low)} and {_fmt_num(self.high)}, "
                              f"got {raw.strip()[:40]}")
        return value, None


LIMITS = {
    "ROLLING_WINDOW": Limit(20, 1, 1000, integer=True),
    "COOLDOWN_SECS": Limit(60, 1, MAX_COOLDOWN_SECS),
    "GEMINI_ROUTER_TIMEOUT": Limit(60, 0.1, 3600),
    "GEMINI_ROUTER_LOCK_TIMEOUT": Limit(10, 0.1, 600),
    "GEMINI_ROUTER_MODELS_TTL": Limit(86400, 0, 30 * 86400),
    "GEMINI_ROUTER_RPM": Limit(0, 0, 100000, integer=True),
    "GEMINI_ROUTER_RPD": Limit(0, 0, 10000000, integer=True),
    "GEMINI_ROUTER_MAX_ATTEMPTS": Limit(8, 1, 100, integer=True),
    "GEMINI_ROUTER_DEADLINE": Limit(120, 1, 86400),
    "GEMINI_ROUTER_CACHE_TTL": Limit(0, 0, MAX_COOLDOWN_SECS),
    "GEMINI_ROUTER_CACHE_MB": Limit(64, 1, 1048576),
}
DEFAULT_CACHE_TTL = 3600.0         # a bare `route --cache` without GEMINI_ROUTER_CACHE_TTL
DEFAULT_REDIS_PREFIX = "gemini-router:"


@dataclass(frozen=True)
class Settings:
    """Everything a command needs to know about its environment, validated once."""
    keys: tuple[ApiKey, ...]
    endpoint: str
    state_dir: str
    files: dict[str, str]
    rolling_window: int
    cooldown_secs: float
    timeout: float
    lock_timeout: float
    models_ttl: float
    rpm_limit: int            # per key and model, 0 = no ceiling
    rpd_limit: int            # per key and model per Pacific day, 0 = no ceiling
    max_attempts: int = 8     # upstream calls one route may make
    deadline: float = 120.0   # wall time one route may take, all attempts together
    projects: tuple[tuple[int, ...], ...] = ()   # GEMINI_ROUTER_PROJECTS groups, as key indexes
    # GEMINI_ROUTER_STATE_URL: state in Redis instead of the files ("" = the files). It may
    # hold a password: never in a repr, shown only through `redact_url`.
    state_url: str = field(default="", repr=False)
    redis_prefix: str = DEFAULT_REDIS_PREFIX      # every Redis key of this tool starts so
    cache_ttl: float = 0.0                        # seconds an answer is kept; 0 = no cache
    cache_max_bytes: int = 64 << 20               # bound of the files backend's cache
    # The gateway (see "Gateway"): GEMINI_ROUTER_CLIENT_KEYS as (secret, name) pairs; where
    # `route` sends its request instead of calling Gemini, and the client key it presents.
    client_keys: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    server: str = ""
    client_key: str = field(default="", repr=False)

    def require_keys(self) -> tuple[ApiKey, ...]:
        if not self.keys:
            raise ConfigError("no API key: set GEMINI_API_KEY (or GEMINI_API_KEY_1, ..., "
                              "GEMINI_API_KEYS, GOOGLE_API_KEY)")
        return self.keys

    def label_of(self, fingerprint: str | None) -> str | None:
        """`key#N` for a persisted fingerprint; keys no longer configured keep a short tag."""
        if fingerprint is None:
            return None
        for key in self.keys:
            if key.fingerprint == fingerprint:
                return key.label
        return f"key?{fingerprint[:6]}"

    @functools.cached_property
    def _project_of(self) -> dict[int, tuple[ApiKey, ...]]:
        by_index = {k.index: k for k in self.keys}
        groups: dict[int, tuple[ApiKey, ...]] = {}
        for group in self.projects:
            members = tuple(by_index[i] for i in group if i in by_index)
            for key in members:
                groups[key.index] = members
        return {k.index: groups.get(k.index, (k,)) for k in self.keys}

    def project_keys(self, key: ApiKey) -> tuple[ApiKey, ...]:
        """Every configured key of `key`'s Google Cloud project (itself when undeclared)."""
        return self._project_of.get(key.index, (key,))

    def project_id(self, key: ApiKey) -> str:
        """A stable name for the project in state: its smallest key fingerprint, so it
        survives a reordering of the environment (a change of members re-learns limits)."""
        return min(k.fingerprint for k in self.project_keys(key))

    def project_label(self, key: ApiKey) -> str:
        """How the project is shown: 'project#G' for a declared group, else 'own'."""
        for n, group in enumerate(self.projects, 1):
            if key.index in group:
                return f"project#{n}"
        return "own"


def collect_keys(env: dict[str, str]) -> tuple[ApiKey, ...]:
    """Merge every key form in SPEC order, dropping blanks and duplicates (first place wins)."""
    numbered = sorted((int(name[len("GEMINI_API_KEY_"):]), name) for name in env
                      if name.startswith("GEMINI_API_KEY_")
                      and _is_decimal(name[len("GEMINI_API_KEY_"):]))
    sources: list[tuple[str, str]] = [(name, env[name]) for _, name in numbered]
    sources += [("GEMINI_API_KEYS", part) for part in env.get("GEMINI_API_KEYS", "").split(",")]
    sources += [(name, env.get(name, "")) for name in ("GEMINI_API_KEY", "GOOGLE_API_KEY")]
    secrets: list[str] = []
    for source, raw in sources:
        value = raw.strip()
        if not value or value in secrets:
            continue
        # A key goes into an HTTP header: anything but visible ASCII would break the request
        # far from here, so it is refused now (naming the variable, never the value).
        if not all(33 <= ord(ch) < 127 for ch in value):
            raise ConfigError(f"{source} holds a key with spaces or non-ASCII characters")
        # Real keys are 39 characters. A very short "key" cannot be told apart from
        # ordinary text, so redacting it from messages would garble them.
        if len(value) < MIN_KEY_LENGTH:
            raise ConfigError(f"{source} holds a value too short to be an API key "
                              f"(fewer than {MIN_KEY_LENGTH} characters)")
        secrets.append(value)
    return tuple(ApiKey(i + 1, secret) for i, secret in enumerate(secrets))


ENDPOINT_FORM = r"(https?)://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::([0-9]{1,5}))?/?"


def _is_decimal(text: str) -> bool:
    """ASCII digits only: str.isdigit() also accepts '²', which int() refuses."""
    return text.isascii() and text.isdigit()


def validate_endpoint(raw: str, source: str) -> str:
    """scheme://host[:port] and nothing else (the SDK appends the paths), normalised."""
    import re          # already loaded by argparse; urllib.parse would cost a local command 2 ms
    value = raw.strip()
    match = re.fullmatch(ENDPOINT_FORM, value, re.IGNORECASE)
    if not match or (match[3] is not None and not 0 < int(match[3]) < 65536):
        raise ConfigError(f"{source} must be scheme://host[:port] (e.g. "
                          f"https://generativelanguage.googleapis.com or "
                          f"http://127.0.0.1:8765), got {value[:80]!r}")
    scheme, host, port = match[1].lower(), match[2].lower(), match[3]
    return f"{scheme}://{host}" + (f":{int(port)}" if port else "")


def default_state_dir(env: dict[str, str]) -> str:
    xdg = env.get("XDG_STATE_HOME", "").strip()
    base = xdg or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "gemini-router")


def load_settings(env: dict[str, str] | None = None,
                  args: argparse.Namespace | None = None) -> Settings:
    """Validate the environment (default os.environ) and flags; every problem is a
    ConfigError naming the setting."""
    env = dict(os.environ) if env is None else env

    def limit(name: str) -> float:
        return LIMITS[name].parse(env.get(name), name)

    endpoint_flag = getattr(args, "endpoint", None)
    if endpoint_flag is not None:
        endpoint = validate_endpoint(endpoint_flag, "--endpoint")
    elif env.get("GEMINI_API_ENDPOINT", "").strip():
        endpoint = validate_endpoint(env["GEMINI_API_ENDPOINT"], "GEMINI_API_ENDPOINT")
    else:
        endpoint = DEFAULT_ENDPOINT
    state_flag = getattr(args, "state_dir", None)
    state_dir = os.path.expanduser(state_flag or env.get("GEMINI_ROUTER_STATE_DIR", "").strip()
                                   or default_state_dir(env))
    files = {name: os.path.expanduser(env[STATE_FILE_ENV[name]].strip())
             if env.get(STATE_FILE_ENV[name], "").strip()
             else os.path.join(state_dir, filename)
             for name, filename in STATE_FILE_NAMES.items()}
    same = [(a, b) for i, a in enumerate(STATE_FILE_ENV) for b in list(STATE_FILE_ENV)[i + 1:]
            if os.path.realpath(files[a]) == os.path.realpath(files[b])]
    if same:
        a, b = same[0]
        raise ConfigError(f"{STATE_FILE_ENV[a]} and {STATE_FILE_ENV[b]} name the same file "
                          f"{files[a]}; each state file needs its own path")
    keys = collect_keys(env)
    timeout_flag = getattr(args, "timeout", None)

    def flag_or(name: str, flag: str) -> float:
        value = getattr(args, flag, None)
        return value if value is not None else limit(name)

    return Settings(
        keys=keys,
        endpoint=endpoint,
        state_dir=state_dir,
        files=files,
        rolling_window=int(limit("ROLLING_WINDOW")),
        cooldown_secs=limit("COOLDOWN_SECS"),
        timeout=timeout_flag if timeout_flag is not None else limit("GEMINI_ROUTER_TIMEOUT"),
        lock_timeout=limit("GEMINI_ROUTER_LOCK_TIMEOUT"),
        models_ttl=limit("GEMINI_ROUTER_MODELS_TTL"),
        rpm_limit=int(limit("GEMINI_ROUTER_RPM")),
        rpd_limit=int(limit("GEMINI_ROUTER_RPD")),
        max_attempts=int(flag_or("GEMINI_ROUTER_MAX_ATTEMPTS", "max_attempts")),
        deadline=flag_or("GEMINI_ROUTER_DEADLINE", "deadline"),
        projects=parse_projects(env.get("GEMINI_ROUTER_PROJECTS", ""), len(keys)),
        state_url=state_url_setting(env, args),
        redis_prefix=redis_prefix_setting(env),
        cache_ttl=cache_ttl_setting(env, args),
        cache_max_bytes=int(limit("GEMINI_ROUTER_CACHE_MB") * 1048576),
        client_keys=parse_client_keys(env.get("GEMINI_ROUTER_CLIENT_KEYS", ""), keys),
        server=validate_endpoint(env["GEMINI_ROUTER_SERVER"], "GEMINI_ROUTER_SERVER")
        if env.get("GEMINI_ROUTER_SERVER", "").strip() else "",
        client_key=env.get("GEMINI_ROUTER_CLIENT_KEY", "").strip(),
    )


def state_url_setting(env: dict[str, str], args: argparse.Namespace | None) -> str:
    """--state-url or GEMINI_ROUTER_STATE_URL, checked without importing redis; "" = files."""
    flag = getattr(args, "state_url", None)
    source = "--state-url" if flag is not None else "GEMINI_ROUTER_STATE_URL"
    raw = (flag if flag is not None else env.get("GEMINI_ROUTER_STATE_URL", "")).strip()
    if not raw:
        return ""
    from urllib.parse import urlsplit     # only here: a Redis user imports redis anyway
    form = "redis://[:password@]host[:port][/db] or rediss://... (TLS)"
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError:
        raise ConfigError(f"{source} must be {form}, got {redact_url(raw)[:80]!r}") from None
    if parts.scheme.lower() not in ("redis", "rediss") or not parts.hostname:
        raise ConfigError(f"{source} must be {form}, got {redact_url(raw)[:80]!r}")
    db = parts.path.strip("/")
    if db and not _is_decimal(db):
        raise ConfigError(f"{source}: the database must be a number (/0 .. /15), got "
                          f"{db[:20]!r} in {redact_url(raw)[:80]!r}")
    if port == 0:
        raise ConfigError(f"{source}: port 0 in {redact_url(raw)[:80]!r}")
    return raw


def redact_url(url: str) -> str:
    """A URL as it may be shown: the password (and a lone user part) replaced by ***."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    shown = f"{user}:***" if colon else "***"
    return f"{scheme}://{shown}@{host}{slash}{tail}"


def redis_prefix_setting(env: dict[str, str]) -> str:
    raw = env.get("GEMINI_ROUTER_REDIS_PREFIX", "").strip()
    if not raw:
        return DEFAULT_REDIS_PREFIX
    if len(raw) > 100 or not all(33 <= ord(ch) < 127 for ch in raw):
        raise ConfigError("GEMINI_ROUTER_REDIS_PREFIX must be up to 100 visible ASCII "
                          f"characters, got {raw[:40]!r}")
    return raw


def cache_ttl_setting(env: dict[str, str], args: argparse.Namespace | None) -> float:
    """How long answers are cached. `route` caches only when asked (--cache[=TTL]; bare, the
    TTL is GEMINI_ROUTER_CACHE_TTL or an hour); other front ends (serve) follow
    GEMINI_ROUTER_CACHE_TTL (0 = off, the default)."""
    ttl = LIMITS["GEMINI_ROUTER_CACHE_TTL"].parse(env.get("GEMINI_ROUTER_CACHE_TTL"),
                                                  "GEMINI_ROUTER_CACHE_TTL")
    if args is None or not hasattr(args, "cache"):
        return ttl
    if args.cache is None:
        return 0.0
    return (ttl or DEFAULT_CACHE_TTL) if args.cache < 0 else args.cache


def parse_projects(raw: str, n_keys: int) -> tuple[tuple[int, ...], ...]:
    """GEMINI_ROUTER_PROJECTS "1,2;3,4,5" -> ((1, 2), (3, 4, 5)); a key in no group is its
    own project. Key numbers are positions in the merged key list (key#N)."""
    groups: list[tuple[int, ...]] = []
    seen: set[int] = set()
    for part in (p.strip() for p in raw.split(";")):
        if not part:
            continue
        members: list[int] = []
        for item in (i.strip() for i in part.split(",")):
            if not _is_decimal(item):
                raise ConfigError(f"GEMINI_ROUTER_PROJECTS must be groups of key numbers like "
                                  f"'1,2;3,4', got {item[:20]!r} in {raw.strip()[:60]!r}")
            n = int(item)
            if not 1 <= n <= max(n_keys, 1) or (n_keys and n > n_keys):
                raise ConfigError(f"GEMINI_ROUTER_PROJECTS names key#{n}, but "
                                  f"{n_keys} key(s) are configured")
            if n in seen:
                raise ConfigError(f"GEMINI_ROUTER_PROJECTS puts key#{n} in two projects")
            seen.add(n)
            members.append(n)
        groups.append(tuple(members))
    return tuple(groups)


# ======================================================================================
# Errors: one class per exit code
# ======================================================================================

class RouterError(Exception):
    """An expected failure: `main` prints its message as one stderr line and exits."""
    exit_code = 1


class UpstreamError(RouterError):
    """The request itself failed upstream; another model or key would not help."""
    exit_code = 1


class UsageError(RouterError):
    exit_code = 2


class ConfigError(RouterError):
    exit_code = 3


class NothingAvailable(RouterError):
    """Every candidate is cooling down, disabled or failed. `until` is the earliest recovery."""
    exit_code = 4

    def __init__(self, message: str, until: float | None = None, rate_limited: bool = False):
        super().__init__(message)
        self.until = until
        self.rate_limited = rate_limited    # every candidate out of quota (429) vs failing (503)


class Interrupted(RouterError):
    exit_code = 130


# ======================================================================================
# State store: three JSON documents - in files behind one lock, or in Redis - and the cache
# ======================================================================================
# Every read-modify-write of state happens inside `StateStore.transaction()`: it takes the
# lock of each directory that holds a state file (normally one: the state directory), loads
# the files the caller touches on first use, and on a clean exit writes back those whose
# content changed - each through a temp file unique to the writer, fsync and rename, so a
# reader or a crash never sees half a file. Network calls happen outside. Readers share the
# lock and reuse what they parsed while a file's inode, size and mtime are unchanged, so a
# route that only reads state costs a few stat() calls.

def empty_doc(name: str) -> dict[str, Any]:
    base: dict[str, Any] = {"schema": SCHEMA_VERSION, "kind": f"gemini-router/{name}"}
    if name == "stats":
        base["models"] = {}
    elif name == "cooldowns":
        base.update(cooldowns=[], disabled_keys={})
    else:
        base.update(next_key=0, lock=None, model_list=None, usage={}, strikes={}, limits={})
    return base


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")      # json.loads would accept NaN and Infinity


def _is_num(value: Any) -> bool:
    """A finite, non-negative number small enough to compute with."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return 0 <= value < 2 ** 53 and (isinstance(value, int) or math.isfinite(value))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and _is_num(value)


def _is_time(value: Any) -> bool:
    """A unix time this tool could have written (before the year 5138)."""
    return _is_num(value) and value < 1e11


def _opt_str(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _sample_ok(s: Any) -> bool:
    return (isinstance(s, dict) and _is_time(s.get("t")) and isinstance(s.get("ok"), bool)
            and isinstance(s.get("kind"), str) and _is_num(s.get("latency", 0))
            and _is_int(s.get("prompt_tokens", 0)) and _is_int(s.get("output_tokens", 0))
            and _opt_str(s.get("key")))


def _cooldown_ok(e: Any) -> bool:
    return (isinstance(e, dict) and _is_time(e.get("until")) and isinstance(e.get("reason"), str)
            and _opt_str(e.get("model")) and _opt_str(e.get("key"))
            and _opt_str(e.get("kind")) and _opt_str(e.get("scope")) and _opt_str(e.get("quota"))
            and _is_time(e.get("since", 0)))


def _usage_ok(u: Any) -> bool:
    return (isinstance(u, dict) and isinstance(u.get("minute", []), list)
            and all(_is_time(t) for t in u.get("minute", []))
            and _is_int(u.get("count", 0)) and _opt_str(u.get("day")))


def _limit_ok(v: Any) -> bool:
    return isinstance(v, dict) and all(
        _is_int(v.get(w, 0)) for w in ("rpm", "rpd", "tpm")) and _is_time(v.get("learned", 0))


def _strike_ok(v: Any) -> bool:
    return _is_int(v) or (isinstance(v, dict) and _is_int(v.get("n")) and _is_time(v.get("t")))


def _model_entry_ok(m: Any) -> bool:
    return (isinstance(m, dict) and isinstance(m.get("name"), str)
            and isinstance(m.get("input_limit"), int) and isinstance(m.get("output_limit"), int)
            and isinstance(m.get("methods"), list)
            and all(isinstance(x, str) for x in m["methods"]))


def _listing_ok(listing: Any) -> bool:
    return listing is None or (isinstance(listing, dict) and _is_time(listing.get("fetched_at"))
                               and isinstance(listing.get("models"), list))


def _keep(items: dict[str, Any], ok: Callable[[Any], bool]) -> tuple[dict[str, Any], int]:
    kept = {k: v for k, v in items.items() if isinstance(k, str) and ok(v)}
    return kept, len(items) - len(kept)


def sanitize_doc(name: str, doc: dict[str, Any]) -> tuple[dict[str, Any], int] | None:
    """(the document with every entry this version can use, how many entries were dropped),
    or None when its skeleton is unusable. One bad entry never costs its neighbours."""
    clean = empty_doc(name)
    dropped = 0
    if name == "stats":
        models = doc.get("models")
        if not isinstance(models, dict):
            return None
        for model, samples in models.items():
            if not isinstance(samples, list):
                dropped += 1
                continue
            good = [s for s in samples if _sample_ok(s)]
            dropped += len(samples) - len(good)
            clean["models"][model] = good
        return clean, dropped
    if name == "cooldowns":
        entries, disabled = doc.get("cooldowns"), doc.get("disabled_keys")
        if not isinstance(entries, list) or not isinstance(disabled, dict):
            return None
        clean["cooldowns"] = [e for e in entries if _cooldown_ok(e)]
        clean["disabled_keys"], bad = _keep(disabled, lambda v: isinstance(v, dict))
        return clean, dropped + bad + len(entries) - len(clean["cooldowns"])
    for field_name, ok in (("strikes", _strike_ok), ("usage", _usage_ok), ("limits", _limit_ok)):
        value = doc.get(field_name, {})
        if not isinstance(value, dict):
            dropped += 1
            continue
        clean[field_name], bad = _keep(value, ok)
        dropped += bad
    if _is_int(doc.get("next_key", 0)):
        clean["next_key"] = doc.get("next_key", 0)
    else:
        dropped += 1
    if _opt_str(doc.get("lock")):
        clean["lock"] = doc.get("lock")
    else:
        dropped += 1
    listing = doc.get("model_list")
    if _listing_ok(listing):
        if listing is not None:
            models = [m for m in listing["models"] if _model_entry_ok(m)]
            dropped += len(listing["models"]) - len(models)
            listing = {**listing, "models": models}
        clean["model_list"] = listing
    else:
        dropped += 1
    return clean, dropped


def checked_doc(name: str, raw: bytes | str, where: str, noun: str, elsewhere: str
                ) -> tuple[dict[str, Any], int] | str:
    """(the sanitized document, how many entries were dropped), or what makes the whole
    document unusable (to set it aside). A schema newer than this version is a ConfigError:
    nothing may overwrite what a newer gemini-router wrote."""
    try:
        doc = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return "is not valid JSON"
    if not isinstance(doc, dict) or doc.get("kind", f"gemini-router/{name}") != \
            f"gemini-router/{name}":
        return f"is not a gemini-router {name} {noun}"
    version = doc.get("schema")
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise ConfigError(f"{where} has schema {version}, newer than this gemini-router "
                          f"understands ({SCHEMA_VERSION}); upgrade, or {elsewhere}")
    if version != SCHEMA_VERSION:
        return f"has an unsupported schema ({version!r})"
    sanitized = sanitize_doc(name, doc)
    if sanitized is None:
        return "has an unexpected shape"
    return sanitized


def _racy(sig: tuple[int, int, int] | None) -> bool:
    """A file written in the last 50 ms: a second write in the same clock tick could keep
    its size and mtime (and reuse an inode), so its signature alone proves nothing yet."""
    return sig is not None and time.time_ns() - sig[2] < 50_000_000


def _copy(doc: dict[str, Any]) -> dict[str, Any]:
    """A writer's own copy of a cached document (plain JSON: a round trip is the fastest)."""
    return json.loads(json.dumps(doc))


def warn(message: str) -> None:
    """Warnings are one line on stderr; -q silences them (see `Output`)."""
    if not _QUIET:
        print(f"{PROG}: warning: {message}", file=sys.stderr)


_QUIET = False


class StateTransaction:
    """The documents of one locked transaction, loaded lazily by name.

    Built with `docs` instead, it is a view of in-memory documents (never committed)."""

    def __init__(self, store: StateStore | None, docs: dict[str, dict[str, Any]] | None = None,
                 write: bool = True):
        self._store = store
        self._write = write
        self._docs: dict[str, dict[str, Any]] = dict(docs or {})
        self._original: dict[str, str | None] = {name: None for name in self._docs}
        self.written: list[str] = []        # the documents commit() wrote, in order

    def doc(self, name: str) -> dict[str, Any]:
        if name not in self._docs:
            text, doc = self._store.load(name, self._write)
            self._original[name] = text
            self._docs[name] = doc
        return self._docs[name]

    @property
    def stats(self) -> dict[str, Any]:
        return self.doc("stats")

    @property
    def cooldowns(self) -> dict[str, Any]:
        return self.doc("cooldowns")

    @property
    def router(self) -> dict[str, Any]:
        return self.doc("router")

    def commit(self) -> None:
        for name, doc in self._docs.items():
            if self._original[name] is None and doc == empty_doc(name):
                continue        # nothing to keep: do not create a file for it
            text = json.dumps(doc, separators=(",", ":"))
            if text != self._original[name]:
                self._store.write(name, text, doc)
                self.written.append(name)


class ChangeCounter:
    """A count every writer of a state directory adds one to after each write, in a small
    file beside its lock (`state.gen`) that every process maps into memory.

    A reader that finds the count as it last saw it knows that no gemini-router process
    has written since - without a system call. That matters in a busy server: a syscall
    releases the interpreter lock, and with 32 threads routing, taking it back costs a
    queue's wait. Writers count under the state lock, after the rename. Where the file
    cannot be made or mapped (a read-only directory, one not created yet), `value()` is
    None and readers fall back to stat()."""

    NAME = "state.gen"
    SIZE = 8
    RETRY_SECS = 1.0          # how often a missing or unmappable counter is tried again

    def __init__(self, path: str):
        self.path = path
        self._map: Any = None
        self._writable = False
        self._identity: tuple[int, int] | None = None
        self._retry_at = 0.0

    def value(self) -> bytes | None:
        mapped = self._map if self._map is not None else self._open()
        return None if mapped is None else mapped[:self.SIZE]

    def bump(self) -> None:
        """Count one write (under the state lock, so writers never race). No system call:
        the readers of this process must not wait for the interpreter lock meanwhile."""
        mapped = self._map if self._map is not None else self._open(retry_now=True)
        if mapped is not None and self._writable:
            count = int.from_bytes(mapped[:self.SIZE], "little")
            mapped[:self.SIZE] = ((count + 1) % 2 ** 64).to_bytes(self.SIZE, "little")

    def check(self) -> None:
        """Map the file again if it was deleted, replaced or cut short since it was mapped
        (a reset state directory, a restored backup): a mapping of the old file would count
        nothing any more, and reading past the end of a shortened one kills the process.
        Called with the periodic look at the state files, so such a change lasts a second
        at most."""
        try:
            st = os.stat(self.path)
            same = (st.st_dev, st.st_ino) == self._identity and st.st_size >= self.SIZE
        except OSError:
            same = False
        if self._map is not None and not same:
            self._map, self._identity = None, None      # the old map closes with its last user
            self._open(retry_now=True)

    def _open(self, retry_now: bool = False) -> Any:
        now = time.monotonic()
        if not retry_now and now < self._retry_at:
            return None
        self._retry_at = now + self.RETRY_SECS
        import mmap
        try:
            try:
                fd, access = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600), mmap.ACCESS_WRITE
            except PermissionError:
                fd, access = os.open(self.path, os.O_RDONLY), mmap.ACCESS_READ
            try:
                st = os.fstat(fd)
                if st.st_size < self.SIZE:
                    if access == mmap.ACCESS_READ:
                        return None
                    # Real bytes, not a hole from ftruncate: the first count through the map
                    # must not need a block a full disk cannot give (that would be SIGBUS).
                    os.pwrite(fd, bytes(self.SIZE - st.st_size), st.st_size)
                mapped = mmap.mmap(fd, self.SIZE, access=access)
                self._writable = access == mmap.ACCESS_WRITE
                self._identity = (st.st_dev, st.st_ino)
                self._map = mapped
            finally:
                os.close(fd)
        except (OSError, ValueError):
            return None
        return self._map


@dataclass
class _FilesSeen:
    """What StateStore.snapshot() last read, and how it knew it was fresh."""
    sigs: dict[str, Any]
    docs: dict[str, dict[str, Any]]
    counted: tuple[bytes | None, ...]
    checked: float


class StateStore:
    """Where the state files are, their locks, and atomic, cached loads and writes."""

    LOCK_NAME = "state.lock"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.paths = settings.files
        # The lock lives with the data it protects: one per directory holding a state file,
        # so two state dirs sharing one overridden file still serialise on that file.
        self.lock_paths = sorted({os.path.join(os.path.dirname(p) or ".", self.LOCK_NAME)
                                  for p in self.paths.values()})
        self.lock_path = self.lock_paths[0]
        self._cache: dict[str, tuple[tuple[int, int, int], str, dict[str, Any]]] = {}
        self._noted: set[tuple[str, Any]] = set()
        self._snap: _FilesSeen | None = None
        self._locks: dict[str, Any] = {}
        import _thread     # built in: a local command does not pay for importing threading
        self._refreshing = _thread.allocate_lock()
        self._counters = {os.path.dirname(p): ChangeCounter(os.path.join(
            os.path.dirname(p), ChangeCounter.NAME)) for p in self.lock_paths}

    # The interface the Redis backend shares (see RedisStateStore): files are always there,
    # so this store never degrades and has nothing to resynchronise.
    degraded = False
    degraded_reason: str | None = None

    def describe(self) -> str:
        """Where the state is, for messages and a status page."""
        return f"files in {self.settings.state_dir}"

    def resync(self) -> bool:
        return True

    def close(self) -> None:
        return None

    @functools.cached_property
    def cache(self) -> FileCache:
        """The response cache, kept beside the state files (see FileCache)."""
        return FileCache(os.path.join(self.settings.state_dir, "cache"),
                         self.settings.cache_max_bytes)

    def check_dirs(self, create: bool) -> bool:
        """True when every state directory exists (creating them 0700 if asked)."""
        dirs = {self.settings.state_dir, *(os.path.dirname(p) or "." for p in self.paths.values())}
        for directory in sorted(dirs):
            if os.path.isdir(directory):
                continue
            if os.path.lexists(directory):
                raise ConfigError(f"state directory {directory} is not a directory")
            if not create:
                return False
            try:
                os.makedirs(directory, mode=0o700, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"cannot create state directory {directory}: "
                                  f"{exc.strerror or exc}") from None
        return True

    @contextlib.contextmanager
    def transaction(self, write: bool = True) -> Iterator[StateTransaction]:
        """Hold the state lock for the block; commit changed documents if it ends cleanly.

        write=False is a read-only snapshot (its documents are shared with the cache: never
        modify them): it shares the lock with other readers and creates nothing."""
        if not write:
            with self._shared_hold():
                yield StateTransaction(self, write=False)
            return
        self.check_dirs(create=True)
        with self._exclusive_hold():
            tx = StateTransaction(self)
            try:
                yield tx
                tx.commit()
            finally:
                if tx.written:
                    self._publish(tx.written)

    # How long an unchanged change counter alone proves the files unchanged: a writer that
    # does not count (an older gemini-router, a hand edit) is seen within this. Rarely, as
    # the stat() calls that check it are the syscalls a busy server must not make often.
    TRUST_COUNTER_SECS = 1.0

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Every document, read-only and shared with the cache. While the change counters
        (see ChangeCounter) are as this process last read them, that costs no system call
        and no lock - the reservation path of a busy server stays inside the interpreter;
        past TRUST_COUNTER_SECS, three stat() calls confirm that no file's inode, size or
        mtime changed."""
        cached = self._snap
        if self._counted_since(cached):
            if time.monotonic() - cached.checked < self.TRUST_COUNTER_SECS:
                return cached.docs
            # Only a writer that does not count can have changed the files: while one
            # thread of this process looks, the others go on with what it last read.
            if not self._refreshing.acquire(blocking=False):
                return cached.docs
            try:
                return self._refresh_snapshot()
            finally:
                self._refreshing.release()
        # Another process wrote (or there is no counter, or nothing was read yet): every
        # thread waits for the one that reads, then takes what it read.
        with self._refreshing:
            cached = self._snap
            return cached.docs if self._counted_since(cached) else self._refresh_snapshot()

    def current_snapshot(self) -> dict[str, dict[str, Any]] | None:
        """What `snapshot` returns when that takes no system call, no lock and no wait (the
        change counters as last read, within TRUST_COUNTER_SECS); else None. An event loop
        reads the state only this way, and leaves the rest to a worker thread."""
        cached = self._snap
        if self._counted_since(cached) and \
                time.monotonic() - cached.checked < self.TRUST_COUNTER_SECS:
            return cached.docs
        return None

    def _counted_since(self, seen: _FilesSeen | None) -> bool:
        """True when `seen` is as current as the change counters can tell."""
        if seen is None:
            return False
        counted = tuple(c.value() for c in self._counters.values())
        return None not in counted and seen.counted == counted

    def _refresh_snapshot(self) -> dict[str, dict[str, Any]]:
        for counter in self._counters.values():
            counter.check()
        counted = tuple(c.value() for c in self._counters.values())
        now = time.monotonic()
        cached = self._snap
        sigs = {name: self._signature(path) for name, path in self.paths.items()}
        if cached is not None and cached.sigs == sigs and not any(map(_racy, sigs.values())):
            self._snap = _FilesSeen(sigs, cached.docs, counted, now)
            return cached.docs
        with self.transaction(write=False) as tx:
            docs = {name: tx.doc(name) for name in self.paths}
            sigs = {name: self._signature(path) for name, path in self.paths.items()}
        self._snap = _FilesSeen(sigs, docs, counted, now)
        return docs

    @contextlib.contextmanager
    def _exclusive_hold(self) -> Iterator[None]:
        """Every state lock, exclusively, in path order (bounded wait)."""
        held: list[Any] = []
        try:
            for path in self.lock_paths:
                lock = self._file_lock(path)
                from filelock import Timeout
                try:
                    lock.acquire(timeout=self.settings.lock_timeout)
                except Timeout:
                    raise self._lock_timeout(path) from None
                except OSError as exc:
                    raise ConfigError(f"cannot lock state in {os.path.dirname(path)}: "
                                      f"{exc.strerror or exc}") from None
                held.append(lock)
            yield
        finally:
            for lock in reversed(held):
                lock.release()

    def _file_lock(self, path: str) -> Any:
        if path not in self._locks:
            from filelock import FileLock
            self._locks[path] = FileLock(path, mode=0o600)
        return self._locks[path]

    @contextlib.contextmanager
    def _shared_hold(self) -> Iterator[None]:
        """The state locks, shared, for readers.

        filelock's Unix lock is flock(LOCK_EX) on the lock file, so a reader taking
        flock(LOCK_SH) on the same file never overlaps a write, and readers never queue
        behind each other. Readers do it directly because importing filelock costs more than
        a whole local command; without flock they take the exclusive lock like writers."""
        self.check_dirs(create=False)      # a state "directory" that is a file: say so
        fds: list[int] = []
        flock_missing = False
        try:
            for path in self.lock_paths:
                if not os.path.isdir(os.path.dirname(path) or "."):
                    continue   # no directory, so no writer yet: the files there are whole
                fd = self._shared_flock(path)
                if fd is None:
                    flock_missing = True
                    break
                fds.append(fd)
            if not flock_missing:
                yield
        finally:
            for fd in fds:
                os.close(fd)          # closing the descriptor releases the flock
        if flock_missing:
            with self._exclusive_hold():
                yield

    def _shared_flock(self, path: str) -> int | None:
        """A descriptor holding flock(LOCK_SH) on `path`; None where flock is missing."""
        try:
            import fcntl
        except ImportError:
            return None
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot lock state in {os.path.dirname(path)}: "
                              f"{exc.strerror or exc}") from None
        deadline = time.monotonic() + self.settings.lock_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise self._lock_timeout(path) from None
                time.sleep(0.002)
            except OSError:             # a filesystem without flock (some NFS, FUSE)
                os.close(fd)
                return None

    def _lock_timeout(self, path: str) -> ConfigError:
        return ConfigError(f"state lock {path} held by another process for more "
                           f"than {_fmt_num(self.settings.lock_timeout)} s "
                           "(GEMINI_ROUTER_LOCK_TIMEOUT)")

    @contextlib.contextmanager
    def listing_hold(self, wait: float | None = None) -> Iterator[None]:
        """A lock of its own around listing models, so processes starting together list
        once. It is held across a network call, so it is never the state lock. `wait`
        bounds the wait for another lister (default: its timeout and the lock timeout)."""
        self.check_dirs(create=True)
        path = os.path.join(os.path.dirname(self.paths["router"]) or ".", "models.lock")
        lock = self._file_lock(path)
        try:
            lock.acquire(timeout=max(0.0, self.settings.timeout + self.settings.lock_timeout
                                     if wait is None else wait))
        except OSError:
            yield          # a stuck lister must not stop this process from listing itself
            return
        try:
            yield
        finally:
            lock.release()

    def _signature(self, path: str) -> tuple[int, int, int] | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.check_dirs(create=False)    # a state "directory" that is a file: say so
            raise ConfigError(f"cannot read state file {path}: {exc.strerror or exc}") from None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def load(self, name: str, write: bool = True) -> tuple[str | None, dict[str, Any]]:
        """(raw text, document). A missing file is empty; an unusable one is set aside; bad
        entries are dropped with a warning. For readers (write=False) the document is the
        cached one, shared: it must not be modified."""
        path = self.paths[name]
        sig = self._signature(path)
        if sig is None:
            self._cache.pop(name, None)
            return None, empty_doc(name)
        cached = self._cache.get(name)
        if cached is not None and cached[0] == sig and not _racy(sig):
            return cached[1], (cached[2] if not write else _copy(cached[2]))
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None, empty_doc(name)
        except OSError as exc:
            raise ConfigError(f"cannot read state file {path}: {exc.strerror or exc}") from None
        if cached is not None and raw == cached[1].encode():
            # Unchanged after all: keep the parsed objects (the router's caches key on them).
            self._cache[name] = (sig, cached[1], cached[2])
            return cached[1], (cached[2] if not write else _copy(cached[2]))
        text, doc = self._parse(name, raw, sig)
        if text is not None:
            self._cache[name] = (sig, text, doc)      # sanitized; shared by readers
            if write:
                doc = _copy(doc)
        return text, doc

    def _parse(self, name: str, raw: bytes, sig: Any) -> tuple[str | None, dict[str, Any]]:
        path = self.paths[name]
        checked = checked_doc(name, raw, f"state file {path}", "file",
                              "point STATS_FILE/STATE_FILE/COOLDOWN_FILE elsewhere")
        if isinstance(checked, str):
            return None, self.set_aside(name, checked)
        clean, dropped = checked
        if dropped and (name, sig) not in self._noted:    # said once per file version
            self._noted.add((name, sig))
            kept = self.keep_copy(name, raw)
            warn(f"state file {path}: dropped {dropped} unreadable entr"
                 f"{'y' if dropped == 1 else 'ies'}, kept the rest"
                 + (f" (original saved as {os.path.basename(kept)})" if kept else ""))
        if dropped:
            return None, clean
        return raw.decode("utf-8", "replace"), clean

    def _aside_name(self, name: str) -> str:
        path = self.paths[name]
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target, n = f"{path}.corrupt-{stamp}", 1
        while os.path.lexists(target):
            n += 1
            target = f"{path}.corrupt-{stamp}-{n}"
        return target

    def keep_copy(self, name: str, raw: bytes) -> str | None:
        """Keep the original of a file with bad entries (its cleaned version replaces it on
        the next write) - once: a byte-identical copy already kept is reused."""
        path = self.paths[name]
        folder, base = os.path.split(path)
        with contextlib.suppress(OSError):
            for entry in os.scandir(folder or "."):
                if entry.name.startswith(f"{base}.corrupt-") and \
                        entry.stat().st_size == len(raw):
                    with open(entry.path, "rb") as f:
                        if f.read() == raw:
                            return entry.path
        target = self._aside_name(name)
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with open(fd, "wb") as f:
                f.write(raw)
        except OSError:
            return None
        return target

    def set_aside(self, name: str, why: str) -> dict[str, Any]:
        """Keep a bad file for the user to inspect, and start that document afresh."""
        path = self.paths[name]
        target = self._aside_name(name)
        self._cache.pop(name, None)
        try:
            os.replace(path, target)
        except FileNotFoundError:
            return empty_doc(name)   # another reader set it aside first
        except OSError as exc:
            raise ConfigError(f"state file {path} {why} and cannot be moved aside: "
                              f"{exc.strerror or exc}") from None
        self._count_change(os.path.dirname(path) or ".")
        warn(f"state file {path} {why}; kept it as {os.path.basename(target)} and started "
             "afresh")
        return empty_doc(name)

    def _count_change(self, directory: str) -> None:
        counter = self._counters.get(directory)
        if counter is not None:
            counter.bump()

    def _publish(self, written: list[str]) -> None:
        """After a write, still under the lock: count the change for other processes, and
        make what was written this process's snapshot - its other threads go on without
        reading back the files it just wrote. Counted last, right before the snapshot is
        set: a thread of this process that sees the new count first only takes the slow
        path (it waits for the lock and reads), never a stale snapshot."""
        docs: dict[str, dict[str, Any]] | None = {}
        try:
            sigs = {name: self._signature(path) for name, path in self.paths.items()}
        except ConfigError:
            sigs, docs = {}, None        # the next reader says what is wrong
        for name, sig in sigs.items():
            cached = self._cache.get(name)
            if sig is None:
                docs[name] = empty_doc(name)
            elif cached is not None and cached[0] == sig:
                docs[name] = cached[2]
            else:
                docs = None              # not read since it changed: the next reader reads
                break
        for directory in {os.path.dirname(self.paths[name]) or "." for name in written}:
            self._count_change(directory)
        counted = tuple(c.value() for c in self._counters.values())
        self._snap = None if docs is None else \
            _FilesSeen(sigs, docs, counted, time.monotonic())

    def write(self, name: str, text: str, doc: dict[str, Any] | None = None) -> None:
        """Replace a state file atomically: a temp file of this writer's own, fsync, rename."""
        path = self.paths[name]
        tmp = os.path.join(os.path.dirname(path),
                           f".{os.path.basename(path)}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        self._cache.pop(name, None)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with open(fd, "wb") as f:
                f.write(text.encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise ConfigError(f"cannot write state file {path}: {exc.strerror or exc}") from None
        sig = self._signature(path)
        if sig is not None and doc is not None:
            self._cache[name] = (sig, text, json.loads(text))


# --------------------------------------------------------------------------------------
# The same state in Redis, shared by every process on every host
# --------------------------------------------------------------------------------------
# One hash `<prefix>state` holds each document's skeleton - the JSON text the file would
# hold, minus the entries that expire - beside its version (field "v:<name>", a random token
# replaced on every write touching the document or its entries). The entries that expire
# (COLLECTIONS: cooldowns; per-(key, model) call counters, "usage"; transient strikes) are
# each their own key, `<prefix>cooldown:<id>`, `<prefix>usage:<fp>/<model>` and
# `<prefix>strike:<fp>/<model>`, set to expire (PXAT) when the entry stops mattering, and
# each collection is listed in a sorted set, `<prefix>index:<word>` (member: the id, score:
# its expiry in ms), that expires with its last member - so nothing grows without bound,
# even if no process ever writes again. A read is one Lua script: the versions and, for each
# document this process has not parsed at that version, its skeleton and live entries, so
# an unchanged document stays the same object (the Router's StateView cache keys on that)
# and no read is ever staler than one round trip. An entry expiring by its TTL changes no
# version: a reader may keep it until the next write, harmless since every reader filters
# cooldowns, counters and strikes by time anyway. Writers hold `<prefix>lock` (SET NX PX: a
# writer killed mid-transaction leaves a lock that expires) and commit in one script that
# writes only while the lock is still theirs: the changed skeletons, and only the entries
# whose text changed since the transaction read them. Both scripts take the caller's clock
# (time.time()), the clock the entries' times were written with. Documents carry key
# fingerprints, never a key. What stays in the hash is bounded as in the files: disabled
# keys and learned limits, one per key or project; samples, a rolling window per model.

STATE_DOCS = ("stats", "cooldowns", "router")


def cooldown_target(entry: dict[str, Any]) -> str:
    """What a cooldown cools, as text: one entry per (model, key) target (add_cooldown)."""
    return json.dumps([entry.get("model"), entry.get("key")])


def cooldown_id(entry: dict[str, Any]) -> str:
    """A short, stable name for a cooldown's target (model and key may be None)."""
    import hashlib
    return hashlib.sha256(cooldown_target(entry).encode()).hexdigest()[:16]


def _cooldown_expiry(entry: dict[str, Any], now: float, settings: Settings) -> float:
    return entry["until"]


def _usage_expiry(entry: dict[str, Any], now: float, settings: Settings) -> float:
    """A call counter matters until its Pacific day ends (daily limits) and a minute after
    its last call (per-minute limits); one of another day than today counts for nothing."""
    ends = [max(entry.get("minute") or [0]) + 60]
    if entry.get("day") == pacific_day(now):
        ends.append(next_pacific_midnight(now))
    return max(ends)


def _strike_expiry(entry: Any, now: float, settings: Settings) -> float:
    """Strikes older than 10 x COOLDOWN_SECS start afresh (_strike); an older version's bare
    count, with no time, is given that long from now."""
    return (_strike_count(entry)[1] or now) + 10 * settings.cooldown_secs


@dataclass(frozen=True)
class Collection:
    """Entries of a document that expire: in Redis each is its own key `<prefix><word>:<id>`
    expiring at `expiry(entry, now, settings)`, listed in the sorted set `<prefix>index:<word>`.
    The document holds them as a map by id, or (`ident` given) as a list, one per id."""
    doc: str
    field: str
    word: str
    expiry: Callable[[Any, float, Settings], float]
    ident: Callable[[dict[str, Any]], str] | None = None

    def entries(self, doc: dict[str, Any]) -> dict[str, Any]:
        """id -> entry, of a sanitized document (of an id listed twice, the last counts)."""
        value = doc[self.field]
        return {self.ident(e): e for e in value} if self.ident else value

    def emptied(self) -> list[Any] | dict[str, Any]:
        return [] if self.ident else {}

    def merge_into(self, doc: dict[str, Any], kept: dict[str, Any]) -> None:
        """Add the entries Redis keeps (id -> entry) to a sanitized skeleton. An entry the
        skeleton holds itself was written there by an older version, after every kept one
        (a commit of this version writes the skeleton without them): it wins."""
        inline = doc[self.field]
        if self.ident is None:
            doc[self.field] = {**kept, **inline}
        else:
            held = {self.ident(e) for e in inline}
            doc[self.field] = inline + [e for i, e in kept.items() if i not in held]


COLLECTIONS = (Collection("cooldowns", "cooldowns", "cooldown", _cooldown_expiry, cooldown_id),
               Collection("router", "usage", "usage", _usage_expiry),
               Collection("router", "strikes", "strike", _strike_expiry))


def collections_of(name: str) -> tuple[Collection, ...]:
    return tuple(c for c in COLLECTIONS if c.doc == name)


def _ms(t: float) -> int:
    """A time in whole milliseconds, rounded up: an entry never expires before its end."""
    return math.ceil(t * 1000)


def diff_entries(collection: Collection, doc: dict[str, Any], kept: dict[str, str],
                 now: float, settings: Settings
                 ) -> tuple[list[tuple[str, str, int]], list[str], dict[str, str]]:
    """What a commit sends for one collection of `doc`, given what Redis keeps of it (id ->
    text): (id, text, expiry ms) of each entry new or changed, the ids to delete (gone from
    the document, or changed and already ended: never a SET with a past expiry), and id ->
    text of what Redis keeps afterwards. An unchanged entry is not sent."""
    now_ms = int(now * 1000)
    upserts, deletes, after = [], [], dict(kept)
    entries = collection.entries(doc)
    for ident, entry in entries.items():
        text = json.dumps(entry, separators=(",", ":"))
        if kept.get(ident) == text:
            continue
        expiry = _ms(collection.expiry(entry, now, settings))
        if expiry > now_ms:
            upserts.append((ident, text, expiry))
            after[ident] = text
        elif ident in kept:
            deletes.append(ident)
            del after[ident]
    for ident in kept:
        if ident not in entries:
            deletes.append(ident)
            del after[ident]
    return upserts, deletes, after


def _kept_texts(found: list[Any]) -> dict[str, dict[str, str]]:
    """word -> id -> text, of the (word, ids, values) triples REDIS_READ returns (an entry
    that expired between the index and its key is left out)."""
    kept = {}
    for word, ids, values in zip(found[::3], found[1::3], found[2::3]):
        texts = {_text(i): _text(v) for i, v in zip(ids, values) if v is not None}
        if texts:
            kept[_text(word)] = texts
    return kept


def _parsed_entries(texts: dict[str, str]) -> tuple[dict[str, Any], int]:
    """id -> entry of the texts read from Redis, and how many were not JSON (dropped)."""
    entries = {}
    for ident, text in texts.items():
        try:
            entries[ident] = json.loads(text, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            pass
    return entries, len(texts) - len(entries)


# ARGV: now (ms), prefix, then per document its known version and the words of its
# collections. Per document: {version, skeleton, then per collection: word, ids, values}
# (only what the caller lacks; values nil for entries expired meanwhile). Reads only.
REDIS_READ = """
local now, prefix, out = ARGV[1], ARGV[2], {}
for i, name in ipairs({'stats', 'cooldowns', 'router'}) do
  local v = redis.call('HGET', KEYS[1], 'v:' .. name)
  if v and v == ARGV[1 + 2 * i] then
    out[i] = {v, ''}
  else
    local doc = {v or '', v and redis.call('HGET', KEYS[1], name) or ''}
    for word in string.gmatch(ARGV[2 + 2 * i], '%S+') do
      local ids = redis.call('ZRANGEBYSCORE', prefix .. 'index:' .. word, '(' .. now, '+inf')
      local values = {}
      for first = 1, #ids, 1000 do
        local names = {}
        for j = first, math.min(first + 999, #ids) do
          names[#names + 1] = prefix .. word .. ':' .. ids[j]
        end
        local got = redis.call('MGET', unpack(names))
        for j = 1, #names do values[#values + 1] = got[j] end
      end
      doc[#doc + 1], doc[#doc + 2], doc[#doc + 3] = word, ids, values
    end
    out[i] = doc
  end
end
return out
"""
# ARGV: token, now (ms), prefix, the number of documents, then (name, skeleton, version) of
# each; the number of collections, then per collection: word, the number of upserts, (id,
# text, expiry ms) of each, the number of deletes, their ids. Writes only while `token`
# holds the lock (KEYS[2]); an index drops what expired and expires with its last member.
# The entries first, the documents last: Redis does not roll a failed script back, and a
# document written without its entries before they failed would lose them for everyone.
REDIS_COMMIT = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
local now, prefix, documents = ARGV[2], ARGV[3], tonumber(ARGV[4])
local i = 5 + 3 * documents
local collections = tonumber(ARGV[i])
i = i + 1
for _ = 1, collections do
  local word = ARGV[i]
  local index = prefix .. 'index:' .. word
  local upserts = tonumber(ARGV[i + 1])
  i = i + 2
  for _ = 1, upserts do
    redis.call('SET', prefix .. word .. ':' .. ARGV[i], ARGV[i + 1], 'PXAT', ARGV[i + 2])
    redis.call('ZADD', index, ARGV[i + 2], ARGV[i])
    i = i + 3
  end
  local deletes = tonumber(ARGV[i])
  i = i + 1
  for _ = 1, deletes do
    redis.call('DEL', prefix .. word .. ':' .. ARGV[i])
    redis.call('ZREM', index, ARGV[i])
    i = i + 1
  end
  redis.call('ZREMRANGEBYSCORE', index, '-inf', now)
  local last = redis.call('ZRANGE', index, -1, -1, 'WITHSCORES')
  if last[2] then redis.call('PEXPIREAT', index, last[2]) else redis.call('DEL', index) end
end
for d = 0, documents - 1 do
  local j = 5 + 3 * d
  redis.call('HSET', KEYS[1], ARGV[j], ARGV[j + 1], 'v:' .. ARGV[j], ARGV[j + 2])
end
return 1
"""
REDIS_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def open_store(settings: Settings) -> StateStore | RedisStateStore:
    """The state backend settings.state_url names: Redis, else the files (the default).
    Everything above the store works the same with either."""
    if settings.state_url:
        return RedisStateStore(settings)
    return StateStore(settings)


@dataclass(frozen=True)
class _Read:
    """One document as this process last read (or wrote) it in Redis."""
    version: str                 # "": Redis has none; "local": this process's copy (degraded)
    # Its JSON text; None: Redis holds none (an empty one need not be written); "": the next
    # writer must rewrite it, even empty (entries were dropped, or held inline).
    text: str | None
    doc: dict[str, Any]
    # Per collection (its word), id -> the text of the entry's own key: what a commit diffs
    # against, so an unchanged entry is never rewritten.
    kept: dict[str, dict[str, str]] = field(default_factory=dict)


class _Snapshot:
    """What one Redis write transaction loads from (the documents as read under the lock)
    and what StateTransaction.commit hands back (written together, in one script)."""

    def __init__(self, entries: dict[str, _Read]):
        self.entries = entries
        self.changed: dict[str, str] = {}

    def load(self, name: str, write: bool = True) -> tuple[str | None, dict[str, Any]]:
        read = self.entries[name]
        return read.text, _copy(read.doc)

    def write(self, name: str, text: str, doc: dict[str, Any] | None = None) -> None:
        self.changed[name] = text


class RedisStateStore:
    """The state in Redis, with the interface of StateStore (transaction, load, write,
    listing_hold, check_dirs), shared by every process naming the same URL and prefix.

    Redis gone while a process runs: the store degrades to this process's own copy of the
    state (`degraded` True, `degraded_reason` says why, one warning), so routes go on, and
    once Redis answers again (tried at most every RETRY_EVERY seconds, or by `resync()`) what
    the process learned meanwhile is merged into what Redis holds (see merge_doc)."""

    RETRY_EVERY = 1.0        # seconds between attempts to get back to Redis while degraded
    REACH_TIMEOUT = 0.5      # a degraded store's quick look whether Redis is back
    CONNECT_TIMEOUT = 2.0
    COMMAND_TIMEOUT = 5.0

    def __init__(self, settings: Settings):
        import threading
        self.settings = settings
        self.url = redact_url(settings.state_url)
        prefix = settings.redis_prefix
        self.state_key, self.lock_key = f"{prefix}state", f"{prefix}lock"
        self.listing_key, self.cache_prefix = f"{prefix}listing", f"{prefix}cache:"
        # A writer killed mid-transaction leaves a lock that expires within this; a waiter
        # waits GEMINI_ROUTER_LOCK_TIMEOUT, so it outlasts a dead holder.
        self.lock_ttl = max(1.0, settings.lock_timeout)
        self.degraded = False
        self.degraded_reason: str | None = None
        self._docs: dict[str, _Read] = {}
        self._local: dict[str, dict[str, dict[str, Any]]] | None = None   # base, mine
        self._mutex = threading.RLock()      # _docs, _local and the degraded flag
        self._writer = threading.Lock()      # one writer of this process at a time
        self._noted: set[tuple[str, str]] = set()
        self._retry_at = 0.0
        self._redis, self._lost, self._scripts = self._connect()

    # --- connection -------------------------------------------------------------------

    def _connect(self) -> tuple[Any, tuple[type, ...], dict[str, Any]]:
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise ConfigError(f"GEMINI_ROUTER_STATE_URL {self.url} needs the redis package: "
                              "pip install '.[redis]' in a checkout of gemini-router") from None
        try:
            # One immediate retry: a pooled connection that Redis closed (a restart) is
            # reopened once instead of failing the command; no backoff, so a Redis that is
            # really gone is noticed at once and the store degrades.
            client = redis.Redis.from_url(
                self.settings.state_url, socket_connect_timeout=self.CONNECT_TIMEOUT,
                socket_timeout=self.COMMAND_TIMEOUT, retry=Retry(NoBackoff(), 1))
            client.ping()
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"GEMINI_ROUTER_STATE_URL {self.url}: {self._say(exc)}") from None
        except (redis.AuthenticationError, redis.AuthenticationWrongNumberOfArgsError) as exc:
            raise ConfigError(f"Redis at {self.url} refused the credentials: "
                              f"{self._say(exc)}") from None
        except (redis.RedisError, OSError) as exc:
            raise ConfigError(f"cannot reach Redis at {self.url}: {self._say(exc)}") from None
        self._check_version(client, redis)
        scripts = {"read": client.register_script(REDIS_READ),
                   "commit": client.register_script(REDIS_COMMIT),
                   "release": client.register_script(REDIS_RELEASE)}
        return client, (redis.RedisError, OSError), scripts

    def _check_version(self, client: Any, redis: Any) -> None:
        """Refuse a Redis older than 6.2: the entries that expire are written with
        SET ... PXAT, which an older one refuses. A Redis that will not say (INFO denied by
        an ACL) is trusted."""
        try:
            version = str(client.info("server").get("redis_version", ""))
        except (redis.RedisError, OSError):
            return
        import re
        numbers = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
        if len(numbers) == 2 and numbers < (6, 2):
            raise ConfigError(f"Redis at {self.url} is version {version}; gemini-router needs "
                              "6.2 or later")

    def _say(self, exc: BaseException) -> str:
        """An error of redis-py as one line, the URL's password never in it."""
        from urllib.parse import urlsplit
        text = _one_line(exc, 240) or type(exc).__name__
        with contextlib.suppress(ValueError):
            password = urlsplit(self.settings.state_url).password
            if password:
                text = text.replace(password, "***")
        return text

    def describe(self) -> str:
        """Where the state is, for messages and a status page (no password)."""
        return f"Redis at {self.url} (keys {self.settings.redis_prefix}*)"

    def check_dirs(self, create: bool) -> bool:
        """The files' directory check; here: whether Redis answers (nothing to create)."""
        return bool(self._guard(lambda r: r.ping(), False))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._redis.close()

    @functools.cached_property
    def cache(self) -> RedisCache:
        return RedisCache(self)

    def _guard(self, action: Callable[[Any], Any], default: Any) -> Any:
        """action(the client), or `default` while Redis is away (which degrades the store)."""
        self._maybe_resync()
        if self.degraded:
            return default
        try:
            return action(self._redis)
        except self._lost as exc:
            self._degrade(exc)
            return default

    # --- transactions -----------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self, write: bool = True) -> Iterator[StateTransaction]:
        """As StateStore.transaction. A read is one atomic round trip and takes no lock
        (its documents are shared: never modify them); a write holds the Redis lock and
        commits every changed document at once."""
        self._maybe_resync()
        if not write:
            yield StateTransaction(None, docs={n: e.doc for n, e in self._current().items()},
                                   write=False)
            return
        if not self._writer.acquire(timeout=self.settings.lock_timeout):
            raise self._lock_timeout()
        try:
            token, entries = self._begin_write()
            snapshot = _Snapshot(entries)
            tx = StateTransaction(snapshot)          # type: ignore[arg-type]
            try:
                yield tx
                tx.commit()
                if snapshot.changed:
                    self._commit(token, entries, snapshot.changed)
            finally:
                if token is not None:
                    self._release(self.lock_key, token)
        finally:
            self._writer.release()

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Every document, read-only: one atomic read, the same objects while unchanged."""
        with self.transaction(write=False) as tx:
            return {name: tx.doc(name) for name in STATE_FILE_NAMES}

    def current_snapshot(self) -> None:
        """Never: every read of state on Redis is a round trip (see StateStore's)."""
        return None

    def load(self, name: str, write: bool = True) -> tuple[str | None, dict[str, Any]]:
        """(text, document) of one document now; a copy for writers, shared for readers."""
        read = self._current()[name]
        return read.text, (_copy(read.doc) if write else read.doc)

    def write(self, name: str, text: str, doc: dict[str, Any] | None = None) -> None:
        """Replace one document (under the lock, like every write)."""
        with self.transaction() as tx:
            target = tx.doc(name)
            target.clear()
            target.update(json.loads(text))

    @contextlib.contextmanager
    def listing_hold(self, wait: float | None = None) -> Iterator[None]:
        """As StateStore.listing_hold, across hosts: `<prefix>listing` with a TTL, so a
        lister that died frees it; a stuck one never stops this process from listing."""
        ttl = self.settings.timeout + self.settings.lock_timeout
        wait = ttl if wait is None else max(0.0, wait)
        token = self._guard(lambda r: self._acquire(self.listing_key, ttl, wait), None)
        try:
            yield
        finally:
            if token is not None:
                self._release(self.listing_key, token)

    def _current(self) -> dict[str, _Read]:
        """The documents: as Redis holds them, or this process's copy while degraded."""
        while True:
            if not self.degraded:
                try:
                    return self._fetch()
                except self._lost as exc:
                    self._degrade(exc)
            with self._mutex:
                if self._local is not None:
                    return {n: _Read("local", None, d) for n, d in self._local["mine"].items()}

    def _begin_write(self) -> tuple[str | None, dict[str, _Read]]:
        """(the lock's token, the documents now); (None, this process's copy) if degraded."""
        if not self.degraded:
            token = None
            try:
                token = self._acquire(self.lock_key, self.lock_ttl, self.settings.lock_timeout)
                if token is None:
                    raise self._lock_timeout()
                return token, self._fetch()
            except self._lost as exc:
                if token is not None:
                    self._release(self.lock_key, token)
                self._degrade(exc)
        with self._mutex:
            return None, {n: _Read("local", json.dumps(d, separators=(",", ":")), d)
                          for n, d in self._local["mine"].items()}

    def _commit(self, token: str | None, entries: dict[str, _Read], changed: dict[str, str]
                ) -> None:
        if token is None:
            with self._mutex:
                if self._local is not None:
                    self._local["mine"].update({n: json.loads(t) for n, t in changed.items()})
                    return
            token = ""              # back on Redis meanwhile: merge, below
        try:
            if token and self._write_docs(token, changed, entries):
                return
            # The lock expired under a stalled writer (or Redis came back): apply this
            # transaction's changes to what Redis holds now, never over it.
            self._merge_into_redis({n: e.doc for n, e in entries.items()},
                                   {n: json.loads(changed[n]) if n in changed else e.doc
                                    for n, e in entries.items()})
        except self._lost as exc:
            # Written or not, Redis is away: this process keeps the change, merged later.
            self._degrade(exc, entries, changed)

    def _write_docs(self, token: str, changed: dict[str, str], read: dict[str, _Read]
                    ) -> bool:
        """Write documents in one script, only while `token` holds the lock: their
        skeletons, and of their collections only what changed since `read` (diff_entries)."""
        now = time.time()
        versions = {name: os.urandom(8).hex() for name in changed}
        docs = {name: json.loads(text) for name, text in changed.items()}
        skeletons: list[Any] = []
        entries: list[Any] = []
        kept: dict[str, dict[str, dict[str, str]]] = {name: {} for name in changed}
        for name, doc in docs.items():
            skeleton = dict(doc)
            for c in collections_of(name):
                skeleton[c.field] = c.emptied()
                upserts, deletes, kept[name][c.word] = diff_entries(
                    c, doc, read[name].kept.get(c.word, {}), now, self.settings)
                entries += [c.word, len(upserts), *(x for u in upserts for x in u),
                            len(deletes), *deletes]
            skeletons += [name, json.dumps(skeleton, separators=(",", ":")), versions[name]]
        n_collections = sum(len(collections_of(name)) for name in changed)
        args = [token, int(now * 1000), self.settings.redis_prefix, len(changed), *skeletons,
                n_collections, *entries]
        if not self._scripts["commit"](keys=[self.state_key, self.lock_key], args=args):
            return False
        with self._mutex:
            for name, text in changed.items():
                self._docs[name] = _Read(versions[name], text, docs[name], kept[name])
        return True

    def _merge_into_redis(self, base: dict[str, dict[str, Any]],
                          mine: dict[str, dict[str, Any]]) -> None:
        """Apply the changes `mine` made since `base` to what Redis holds now, under the
        lock. A document Redis no longer has (a restart without persistence) is written
        back whole from `mine`."""
        token = self._acquire(self.lock_key, self.lock_ttl, self.settings.lock_timeout)
        if token is None:
            raise self._lock_timeout()
        try:
            changed = {}
            held = self._fetch()
            for name, theirs in held.items():
                merged = merge_doc(name, base[name], mine[name],
                                   theirs.doc if theirs.version else base[name], self.settings)
                merged_text = json.dumps(merged, separators=(",", ":"))
                if merged_text != theirs.text and \
                        (theirs.text is not None or merged != empty_doc(name)):
                    changed[name] = merged_text
            if changed and not self._write_docs(token, changed, held):
                raise ConfigError(f"state lock {self.lock_key} in Redis at {self.url} expired "
                                  "during a write (GEMINI_ROUTER_LOCK_TIMEOUT)")
        finally:
            self._release(self.lock_key, token)

    # --- reads ------------------------------------------------------------------------

    def _fetch(self) -> dict[str, _Read]:
        """Every document as Redis holds it now, read atomically (skeleton and live entries);
        one parsed before at this version is the same object as before."""
        with self._mutex:
            known = dict(self._docs)
        args: list[Any] = [int(time.time() * 1000), self.settings.redis_prefix]
        for name in STATE_DOCS:
            args += [known[name].version if name in known else "",
                     " ".join(c.word for c in collections_of(name))]
        reply = self._scripts["read"](keys=[self.state_key], args=args)
        entries = {}
        for name, (version, body, *found) in zip(STATE_DOCS, reply):
            version, kept = _text(version), _kept_texts(found)
            old = known.get(name)
            # No version: nothing of this version wrote the document (new, or lost); any
            # entries kept without it are still read, so a writer replaces them.
            if old is not None and old.version == version and (version or old.kept == kept):
                entries[name] = old
            elif not version and not kept:
                entries[name] = _Read("", None, empty_doc(name))
            else:
                entries[name] = self._parse(name, body, version, kept)
        with self._mutex:
            self._docs.update(entries)
        return entries

    def _parse(self, name: str, body: bytes, version: str,
               kept: dict[str, dict[str, str]]) -> _Read:
        """A document from its skeleton and the entries Redis keeps of its collections,
        each through the sanitizer the files go through: a bad entry is dropped, a skeleton
        this version cannot use is set aside and replaced by an empty one."""
        where = f"state in Redis at {self.url} ({self.state_key} {name})"
        checked = checked_doc(name, body, where, "document",
                              "set another GEMINI_ROUTER_REDIS_PREFIX") if body \
            else (empty_doc(name), 0)
        unusable = isinstance(checked, str)
        if unusable:
            self._set_aside(name, version, body, f"{where} {checked}")
            checked = (empty_doc(name), 0)
        doc, dropped = checked
        # Entries held inline (an older version wrote them) move to their own keys.
        rewrite = unusable or any(doc[c.field] for c in collections_of(name))
        if kept:
            for c in collections_of(name):
                found, bad = _parsed_entries(kept.get(c.word, {}))
                c.merge_into(doc, found)
                dropped += bad
            doc, bad = sanitize_doc(name, doc)     # a clean skeleton stays usable
            dropped += bad
        if dropped and self._first_time(name, version):
            warn(f"{where}: dropped {dropped} unreadable entr"
                 f"{'y' if dropped == 1 else 'ies'}, kept the rest")
        text = "" if rewrite or dropped else json.dumps(doc, separators=(",", ":"))
        return _Read(version, text, doc, kept)

    def _set_aside(self, name: str, version: str, raw: bytes, why: str) -> None:
        """Keep a skeleton this version cannot use for 30 days (once per version)."""
        if self._first_time(name, version):
            aside = f"{self.settings.redis_prefix}corrupt:{name}:{version}"
            with contextlib.suppress(*self._lost):
                self._redis.set(aside, raw, ex=30 * 86400, nx=True)
            warn(f"{why}; kept it as {aside} (for 30 days) and started afresh")

    def _first_time(self, name: str, version: str) -> bool:
        """Once per document version and process: a warning is not repeated per read."""
        with self._mutex:
            if (name, version) in self._noted:
                return False
            self._noted.add((name, version))
            return True

    # --- locks ------------------------------------------------------------------------

    def _acquire(self, key: str, ttl: float, wait: float) -> str | None:
        """A token holding `key` (SET NX PX ttl), or None after waiting `wait` seconds."""
        token = os.urandom(16).hex()
        deadline = time.monotonic() + wait
        pause = 0.002
        while not self._redis.set(key, token, nx=True, px=max(1, int(ttl * 1000))):
            if time.monotonic() >= deadline:
                return None
            time.sleep(pause)
            pause = min(pause * 2, 0.02)
        return token

    def _release(self, key: str, token: str) -> None:
        """Free `key` if `token` still holds it (its TTL frees it otherwise)."""
        with contextlib.suppress(*self._lost):
            self._scripts["release"](keys=[key], args=[token])

    def _lock_timeout(self) -> ConfigError:
        return ConfigError(f"state lock {self.lock_key} in Redis at {self.url} held by "
                           f"another process for more than "
                           f"{_fmt_num(self.settings.lock_timeout)} s "
                           "(GEMINI_ROUTER_LOCK_TIMEOUT)")

    # --- degraded mode ----------------------------------------------------------------

    def _degrade(self, exc: BaseException, entries: dict[str, Any] | None = None,
                 changed: dict[str, str] | None = None) -> None:
        """Go on with this process's own copy of the state (from its last read); with
        `changed`, a transaction's changes that Redis may not have got are kept in it."""
        with self._mutex:
            if self._local is None:
                last = {n: self._docs[n].doc if n in self._docs else empty_doc(n)
                        for n in STATE_DOCS}
                self._local = {"base": {n: _copy(d) for n, d in last.items()},
                               "mine": {n: _copy(d) for n, d in last.items()}}
                self.degraded = True
                self.degraded_reason = f"Redis at {self.url} unreachable: {self._say(exc)}"
                warn(f"state: {self.degraded_reason}; going on with this process's own copy "
                     "of the state until Redis answers again")
            self._retry_at = time.monotonic() + self.RETRY_EVERY
            mine = self._local["mine"]
            for name, text in (changed or {}).items():
                mine[name] = merge_doc(name, entries[name].doc, json.loads(text), mine[name],
                                       self.settings)

    def _maybe_resync(self) -> None:
        if self.degraded and time.monotonic() >= self._retry_at:
            self.resync()

    def resync(self) -> bool:
        """Back to Redis if it answers: what this process learned while it was away is
        merged into what Redis holds (merge_doc). True when the store is on Redis."""
        if not self.degraded:
            return True
        if not self._writer.acquire(blocking=False):
            return False            # a writer of this process is busy: the next try will do
        try:
            with self._mutex:
                if self._local is None:
                    return True
                self._retry_at = time.monotonic() + self.RETRY_EVERY
                base, mine = self._local["base"], dict(self._local["mine"])
            if not self._reachable():
                return False
            try:
                self._merge_into_redis(base, mine)
            except (*self._lost, ConfigError):
                return False
            with self._mutex:
                self.degraded, self.degraded_reason, self._local = False, None, None
            warn(f"state: Redis at {self.url} is back; what this process learned meanwhile "
                 "is merged in")
            return True
        finally:
            self._writer.release()


    def _reachable(self) -> bool:
        """A quick TCP probe before a resync: a Redis host that drops packets costs the
        request that tries at most REACH_TIMEOUT, not the client's connect timeout."""
        import socket
        options = self._redis.connection_pool.connection_kwargs
        if "host" not in options:
            return True                 # not TCP (a unix socket): let redis-py try
        try:
            socket.create_connection((options["host"], options.get("port", 6379)),
                                     timeout=self.REACH_TIMEOUT).close()
        except OSError:
            return False
        return True


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


# --- merging a document changed on both sides (Redis away, or a lock that expired) --------

def merge_doc(name: str, base: dict[str, Any], mine: dict[str, Any], theirs: dict[str, Any],
              settings: Settings) -> dict[str, Any]:
    """`theirs` with the changes `mine` made since `base` applied, entry by entry.

    Both sides' entries are kept; where both changed the same entry: the newer cooldown,
    strike and learned limit win, call counts add up, samples are merged by time (the
    rolling window kept). An entry removed on this side (a cleared cooldown) goes only if
    the other side left it as it was; the pin (lock) and the rotation follow this side only
    if the other did not change them."""
    out = _copy(theirs)
    if name == "stats":
        for model, samples in mine["models"].items():
            had = base["models"].get(model, [])
            new = [s for s in samples if s not in had]
            kept = out["models"].setdefault(model, [])
            kept += [s for s in new if s not in kept]
            kept.sort(key=lambda s: s["t"])
            del kept[:-settings.rolling_window]
        return out
    if name == "cooldowns":
        def by_target(doc: dict[str, Any]) -> dict[str, Any]:
            return {cooldown_target(e): e for e in doc["cooldowns"]}
        merged = _merge_map(by_target(base), by_target(mine), by_target(out),
                            lambda was, m, t: m if m.get("since", 0) >= t.get("since", 0) else t)
        out["cooldowns"] = list(merged.values())
        out["disabled_keys"] = _merge_map(base["disabled_keys"], mine["disabled_keys"],
                                          out["disabled_keys"])
        return out
    for field_name in ("next_key", "lock"):
        if mine.get(field_name) != base.get(field_name) and \
                out.get(field_name) == base.get(field_name):
            out[field_name] = mine.get(field_name)
    listing, there = mine.get("model_list"), out.get("model_list")
    if listing != base.get("model_list") and listing and \
            (not there or listing["fetched_at"] > there["fetched_at"]):
        out["model_list"] = listing
    out["usage"] = _merge_map(base["usage"], mine["usage"], out["usage"], _merge_usage)
    out["strikes"] = _merge_map(base["strikes"], mine["strikes"], out["strikes"],
                                lambda was, m, t: max(m, t, key=lambda v: _strike_count(v)[1]))
    out["limits"] = _merge_map(base["limits"], mine["limits"], out["limits"],
                               lambda was, m, t: max(m, t, key=lambda v: v.get("learned", 0)))
    return out


def _merge_map(base: dict[str, Any], mine: dict[str, Any], theirs: dict[str, Any],
               both: Callable[[Any, Any, Any], Any] | None = None) -> dict[str, Any]:
    """theirs + the entries mine added, changed or removed since base; `both(base, mine,
    theirs)` decides an entry both sides changed (default: mine)."""
    out = dict(theirs)
    for k, value in mine.items():
        was = base.get(k)
        if value == was:
            continue
        there = theirs.get(k)
        out[k] = value if there is None or there == was or both is None \
            else both(was, value, there)
    for k, was in base.items():
        if k not in mine and theirs.get(k) == was:
            out.pop(k, None)
    return out


def _merge_usage(was: dict[str, Any] | None, mine: dict[str, Any], theirs: dict[str, Any]
                 ) -> dict[str, Any]:
    """Calls counted on both sides: the counts add up (this side's since `was`)."""
    if mine.get("day") != theirs.get("day"):
        return max(mine, theirs, key=lambda u: u.get("day") or "")
    before = was.get("count", 0) if was and was.get("day") == mine.get("day") else 0
    merged = {**theirs, "count": theirs.get("count", 0) + mine.get("count", 0) - before}
    minute = sorted(set(theirs.get("minute", [])) | set(mine.get("minute", [])))
    keep = max(len(theirs.get("minute", [])), len(mine.get("minute", [])))
    if keep:
        merged["minute"] = minute[-keep:]
    return merged


# --------------------------------------------------------------------------------------
# The response cache, kept where the state is
# --------------------------------------------------------------------------------------

def cache_key(parts: dict[str, Any]) -> str:
    """The sha256 (hex) naming a cached answer: of a canonical JSON of everything that
    changes the answer; bytes (attachments) enter by their own sha256."""
    import hashlib

    def plain(value: Any) -> Any:
        if isinstance(value, (bytes, bytearray)):
            return {"sha256": hashlib.sha256(value).hexdigest()}
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value
    text = json.dumps(plain(parts), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def request_cache_key(settings: Settings, api: str, choice: str, body: Any) -> str:
    """The cache key of a request as a gateway receives it: the API it came through
    (e.g. "generateContent", "chat.completions"), the model choice as the client named it (a
    model id, "auto", "auto-fast", ...), and its JSON body (key order does not matter). A
    streamed and a plain request with the same body share the answer."""
    return cache_key({"v": 1, "endpoint": settings.endpoint, "api": api, "choice": choice,
                      "body": body})


def _is_cache_key(key: str) -> bool:
    return len(key) == 64 and all(c in "0123456789abcdef" for c in key)


class ResponseCache:
    """Answers kept for an exact repeat of a request (`route --cache`, the gateway), named
    by `cache_key`, with hit/miss/store counters (for metrics). One answer may take at most
    a quarter of the bound, so it never pushes out most of the others."""

    def __init__(self, max_bytes: int):
        import threading
        self.max_bytes = max_bytes
        self.hits = self.misses = self.stores = 0
        self._counting = threading.Lock()

    def get(self, key: str) -> dict[str, Any] | None:
        """The value kept under `key` while its TTL lasts; None is a miss."""
        entry = self._read(key) if _is_cache_key(key) else None
        fresh = isinstance(entry, dict) and _is_time(entry.get("expires")) and \
            entry["expires"] > time.time() and isinstance(entry.get("value"), dict)
        self._count("hits" if fresh else "misses")
        if not fresh:
            if entry is not None:
                self._drop(key)
            return None
        self._touch(key)
        return entry["value"]

    def put(self, key: str, value: dict[str, Any], ttl: float) -> bool:
        """Keep `value` (plain JSON) for `ttl` seconds; False when it was not kept."""
        if ttl <= 0 or not _is_cache_key(key):
            return False
        now = time.time()
        text = json.dumps({"created": round(now, 3), "expires": round(now + ttl, 3),
                           "value": value}, separators=(",", ":"))
        if len(text) > self.max_bytes // 4 or not self._write(key, text, ttl):
            return False
        self._count("stores")
        return True

    def counters(self) -> dict[str, int]:
        with self._counting:
            return {"hits": self.hits, "misses": self.misses, "stores": self.stores}

    def _count(self, what: str) -> None:
        with self._counting:
            setattr(self, what, getattr(self, what) + 1)

    def clear(self) -> int | None:
        """Remove every kept answer: how many, or None when the cache cannot be reached."""
        raise NotImplementedError

    def _read(self, key: str) -> Any:
        raise NotImplementedError

    def _write(self, key: str, text: str, ttl: float) -> bool:
        raise NotImplementedError

    def _touch(self, key: str) -> None:
        return None

    def _drop(self, key: str) -> None:
        return None


class FileCache(ResponseCache):
    """One file per answer in `directory` (<state dir>/cache), at most `max_bytes` in all
    (GEMINI_ROUTER_CACHE_MB): a store that finds more removes the least recently used
    answers (a hit refreshes a file's time) down to 90% of it. An expired answer is removed
    when it is looked up, or by that eviction."""

    def __init__(self, directory: str, max_bytes: int):
        super().__init__(max_bytes)
        self.directory = directory

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, f"{key}.json")

    def _read(self, key: str) -> Any:
        try:
            with open(self._path(key), "rb") as f:
                raw = f.read()
            return json.loads(raw, parse_constant=_reject_constant)
        except (OSError, ValueError, RecursionError):
            return None

    def _touch(self, key: str) -> None:
        with contextlib.suppress(OSError):
            os.utime(self._path(key))

    def _drop(self, key: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self._path(key))

    def _write(self, key: str, text: str, ttl: float) -> bool:
        path = self._path(key)
        tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with open(fd, "wb") as f:
                f.write(text.encode())
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            warn(f"could not cache the answer in {self.directory}: {exc.strerror or exc}")
            return False
        self._evict()
        return True

    def _files(self) -> list[tuple[float, int, str]]:
        """(mtime, size, path) of every kept answer; temp files a crash left are removed."""
        found: list[tuple[float, int, str]] = []
        try:
            entries = os.scandir(self.directory)
        except OSError:
            return found
        with entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    st = entry.stat()
                    if entry.name.endswith(".json"):
                        found.append((st.st_mtime, st.st_size, entry.path))
                    elif entry.name.endswith(".tmp") and st.st_mtime < time.time() - 600:
                        os.unlink(entry.path)
        return found

    def _evict(self) -> None:
        files = self._files()
        total = sum(size for _, size, _ in files)
        if total <= self.max_bytes:
            return
        for _, size, path in sorted(files):
            if total <= self.max_bytes * 0.9:
                break
            with contextlib.suppress(OSError):
                os.unlink(path)
            total -= size

    def clear(self) -> int | None:
        removed = 0
        for _, _, path in self._files():
            with contextlib.suppress(OSError):
                os.unlink(path)
                removed += 1
        return removed


class RedisCache(ResponseCache):
    """Each answer under its own key `<prefix>cache:<sha256>` with a Redis TTL, so it
    expires by itself. While Redis is away every lookup is a miss and nothing is kept."""

    def __init__(self, store: RedisStateStore):
        super().__init__(store.settings.cache_max_bytes)
        self.store = store

    def _read(self, key: str) -> Any:
        raw = self.store._guard(lambda r: r.get(self.store.cache_prefix + key), None)
        try:
            return None if raw is None else json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            return None

    def _write(self, key: str, text: str, ttl: float) -> bool:
        return bool(self.store._guard(lambda r: r.set(
            self.store.cache_prefix + key, text, px=max(1, int(ttl * 1000))), False))

    def clear(self) -> int | None:
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in self.store.cache_prefix)

        def drop(r: Any) -> int:
            removed, batch = 0, []
            for name in r.scan_iter(match=pattern + "*", count=500):
                batch.append(name)
                if len(batch) >= 500:
                    removed += r.delete(*batch)
                    batch = []
            return removed + (r.delete(*batch) if batch else 0)
        return self.store._guard(drop, None)


# ======================================================================================
# Keys, the client, and the classification of upstream outcomes
# ======================================================================================

@dataclass(frozen=True)
class ApiKey:
    index: int                                   # 1-based position in the merged list
    secret: str = field(repr=False, compare=False)

    @property
    def label(self) -> str:
        return f"key#{self.index}"

    @functools.cached_property
    def fingerprint(self) -> str:
        # One-way, short: enough to recognise the key across runs, useless to an attacker.
        import hashlib
        return hashlib.sha256(self.secret.encode()).hexdigest()[:12]


def redact(text: str, keys: Iterable[ApiKey]) -> str:
    """Replace any key that slipped into an upstream message by its label."""
    for key in keys:
        if key.secret in text:
            text = text.replace(key.secret, key.label)
    return text


def bare_model(name: str) -> str:
    return name[len("models/"):] if name.startswith("models/") else name


@dataclass
class Outcome:
    """What one upstream call came to. `kind` is a row of OUTCOME_RULES."""
    kind: str
    detail: str = ""
    retry_after: float | None = None
    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    thought_tokens: int = 0
    partial: bool = False        # a stream failed after some of its text was printed
    limits: dict[str, int] = field(default_factory=dict)   # learned: {"rpm"|"rpd"|"tpm": N}
    quota_id: str = ""           # the quotaId a 429 named (kept with its cooldowns)
    status: int = 0              # the HTTP status, when there was one
    body: Any = None             # the upstream's JSON answer or error, as received
    deferred: bool = False       # a stream still flowing to its client: its caller records
    #                              the final outcome itself (Router.record) when it ends

    @property
    def answered(self) -> bool:
        return self.kind in ("ok", "blocked")

    @property
    def rule(self) -> OutcomeRule:
        return OUTCOME_RULES[self.kind]


@dataclass(frozen=True)
class OutcomeRule:
    """What an outcome means and what follows from it (see OUTCOME_RULES)."""
    scope: str | None      # what it cools: pair | project_model | project; or disables:
    #                        key | project_keys; None = nothing
    length: str | None     # how long: retry | midnight | long | no_quota | transient | check
    sample: bool | None    # a model sample counting as success (True) / failure (False)
    route: str             # answer | next (key or model) | next_model | retry_once | end
    exit_code: int         # the exit code when a route ends on it
    words: str             # what it means, in a user's words


# The one table of what every upstream outcome means. A failure that says nothing about the
# model (quota, keys, the request, the caller) writes no sample; transient failures count
# against the (key, model) pair they happened on.
OUTCOME_RULES: dict[str, OutcomeRule] = {
    "ok": OutcomeRule(None, None, True, "answer", 0, "answered"),
    "blocked": OutcomeRule(None, None, True, "end", 1, "blocked for safety"),
    "empty": OutcomeRule(None, None, False, "next", 1, "an empty answer"),
    "thinking_exhausted": OutcomeRule(None, None, None, "next_model", 1,
                                      "spent the whole output budget thinking"),
    "recitation": OutcomeRule(None, None, None, "retry_once", 1, "stopped for recitation"),
    "rate_limited": OutcomeRule("project_model", "retry", None, "next", 4, "rate limited"),
    "daily_quota": OutcomeRule("project_model", "midnight", None, "next", 4, "daily quota spent"),
    "no_quota": OutcomeRule("project_model", "no_quota", None, "next", 4,
                            "no free-tier quota for this model on this project"),
    "capacity": OutcomeRule("pair", "retry", None, "next", 4,
                            "rate limited without details (quota or shared capacity)"),
    "credits": OutcomeRule("project", "long", None, "next", 4,
                           "prepayment credits depleted on this project"),
    "billing": OutcomeRule("project", "long", None, "next", 4, "this project needs billing"),
    "location": OutcomeRule(None, None, None, "end", 1,
                            "the Gemini API is not available in this location"),
    "key_invalid": OutcomeRule("key", None, None, "next", 4, "API key not valid"),
    "key_refused": OutcomeRule("key", None, None, "next", 4, "API key refused"),
    "project_refused": OutcomeRule("project_keys", None, None, "next", 4,
                                   "this key's project is refused"),
    "no_access": OutcomeRule("pair", "long", None, "next", 4,
                             "this key has no access to this model"),
    "model_cannot": OutcomeRule(None, None, None, "next_model", 1,
                                "this model cannot take this request"),
    "bad_request": OutcomeRule(None, None, None, "end", 1, "the request was refused"),
    "model_missing": OutcomeRule("pair", "check", None, "next_model", 4, "model not found"),
    "model_retired": OutcomeRule("project_model", "no_quota", None, "next", 4,
                                 "this model is no longer available to this project"),
    "transient": OutcomeRule("pair", "transient", False, "next", 4, "server error"),
    "unreachable": OutcomeRule(None, None, None, "end", 4, "endpoint unreachable"),
    "not_gemini": OutcomeRule(None, None, None, "end", 3, "the endpoint is not a Gemini API"),
}

# Which outcomes say something about the model (and so count in its success rate).
MODEL_VERDICTS = {kind: rule.sample for kind, rule in OUTCOME_RULES.items()
                  if rule.sample is not None}
# Quota kinds: a route that ends with only these blocking it is "rate limited" (HTTP 429).
QUOTA_KINDS = {"rate_limited", "daily_quota", "no_quota", "capacity", "credits", "ceiling",
               "limit"}
# Calls refused before any work, which spend no quota: they do not count toward the pace.
UNSPENT_KINDS = QUOTA_KINDS | {"billing", "location", "key_invalid", "key_refused",
                               "project_refused", "unreachable", "not_gemini"}

# Upstream errors, first match wins: (HTTP status, ErrorInfo reason, words in the message)
# -> outcome kind. "*" as reason: any reason present; None: not looked at. 429s are read by
# `quota_outcome` (QuotaFailure violations) before this table.
ERROR_TABLE: tuple[tuple[int, str | None, str | None, str], ...] = (
    (400, "API_KEY_INVALID", None, "key_invalid"),
    (400, None, "user location is not supported", "location"),
    (400, None, "free tier is not available", "billing"),
    (400, None, "billing account", "billing"),
    (400, None, "enable billing", "billing"),
    (400, None, "developer instruction is not enabled", "model_cannot"),
    (400, None, "exceeds the maximum number of tokens", "model_cannot"),
    (400, None, "thinking is not supported", "model_cannot"),
    (400, None, "only works in thinking mode", "model_cannot"),
    (400, None, None, "bad_request"),
    (401, None, None, "key_invalid"),
    (403, None, "reported as leaked", "key_refused"),
    (403, "API_KEY_INVALID", None, "key_invalid"),
    (403, "CONSUMER_SUSPENDED", None, "project_refused"),
    (403, "SERVICE_DISABLED", None, "project_refused"),
    (403, "*", None, "key_refused"),
    (403, None, None, "no_access"),
    (404, None, "no longer available to new users", "model_retired"),
    (404, None, None, "model_missing"),
    (408, None, None, "transient"),
    (409, None, None, "transient"),
    (429, None, "prepayment credits are depleted", "credits"),
    (429, None, None, "capacity"),
)

FINISH_NAMES = ("FINISH_REASON_UNSPECIFIED", "STOP", "MAX_TOKENS", "SAFETY", "RECITATION",
                "OTHER", "LANGUAGE", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII",
                "MALFORMED_FUNCTION_CALL", "IMAGE_SAFETY", "UNEXPECTED_TOOL_CALL")
BLOCK_NAMES = ("BLOCK_REASON_UNSPECIFIED", "SAFETY", "OTHER", "BLOCKLIST",
               "PROHIBITED_CONTENT", "IMAGE_SAFETY")
BLOCKING_FINISH = {"SAFETY", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY",
                   "LANGUAGE"}


def enum_name(value: Any, names: tuple[str, ...]) -> str:
    """An enum as received: its name when known, else the number or name itself ('' = unset).

    The SDK asks for integer enums; values newer than this table stay numbers."""
    if isinstance(value, bool) or value is None:
        return ""
    if isinstance(value, int):
        if value == 0:
            return ""
        return names[value] if 0 < value < len(names) else str(value)
    text = str(value)
    return "" if text in (names[0], "") else text


def _parse_duration(value: Any) -> float | None:
    """'26s' / '1.5s' (protobuf Duration JSON) -> seconds, at most MAX_COOLDOWN_SECS."""
    if isinstance(value, str) and value.endswith("s"):
        with contextlib.suppress(ValueError):
            seconds = float(value[:-1])
            if seconds >= 0 and math.isfinite(seconds):
                return min(seconds, MAX_COOLDOWN_SECS)
    return None


def _one_line(value: Any, limit: int | None = None) -> str:
    """Whitespace folded to single spaces; cut to `limit` characters when given."""
    text = " ".join(str(value).split())
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"


def _details(error: dict[str, Any], suffix: str) -> list[dict[str, Any]]:
    return [d for d in error.get("details") or [] if isinstance(d, dict)
            and str(d.get("@type", "")).endswith(suffix)]


# quotaId words -> the window it limits, first match wins (a per-day limit is per day,
# whatever else its id says).
QUOTA_WINDOWS = (("PerDay", "rpd", "requests per day"),
                 ("InputTokens", "tpm", "input tokens per minute"),
                 ("PerMinute", "rpm", "requests per minute"))


def _quota_window(quota_id: str) -> tuple[str, str]:
    """('rpm'|'rpd'|'tpm', words) for a quotaId."""
    for marker, window, words in QUOTA_WINDOWS:
        if marker in quota_id:
            return window, words
    return "rpm", "requests per minute"


def quota_outcome(error: dict[str, Any], message: str) -> Outcome | None:
    """A 429 read from its QuotaFailure violations; None when it carries none.

    Classified by quotaId, not by retryDelay: a per-day violation has been seen with
    retryDelay "36s" - retrying then would only waste calls."""
    violations = [v for d in _details(error, "google.rpc.QuotaFailure")
                  for v in d.get("violations") or [] if isinstance(v, dict)]
    if not violations:
        return None
    delay = next((_parse_duration(d.get("retryDelay"))
                  for d in _details(error, "google.rpc.RetryInfo")), None)
    limits: dict[str, int] = {}
    for v in violations:
        window, _ = _quota_window(str(v.get("quotaId", "")))
        with contextlib.suppress(TypeError, ValueError):
            limits[window] = min(limits.get(window, 1 << 62), int(v.get("quotaValue")))
    first = str(violations[0].get("quotaId", ""))
    if not limits and "limit: 0" in message or limits and not any(limits.values()):
        return Outcome("no_quota", f"no free-tier quota for this model on this project "
                                   f"(limit: 0, {first})", quota_id=first)
    daily = [str(v.get("quotaId", "")) for v in violations
             if "PerDay" in str(v.get("quotaId", ""))]
    quota_id = daily[0] if daily else first
    window, words = _quota_window(quota_id)
    limit = f"{limits[window]} {words}" if window in limits else words
    if daily:
        return Outcome("daily_quota", f"daily quota spent: {limit} on this project "
                                      f"({quota_id}); resets at midnight Pacific",
                       delay, limits=limits, quota_id=quota_id)
    return Outcome("rate_limited", f"rate limited: {limit} on this project ({quota_id})",
                   delay, limits=limits, quota_id=quota_id)


def classify_http(status: int, body: Any, content_type: str = "") -> Outcome:
    """An upstream HTTP failure (status >= 300) as an outcome: the ERROR_TABLE rows.

    `body` is the parsed JSON (None when the body was not JSON)."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        if status in (400, 401, 403, 404, 405) or 200 <= status < 300:
            kind = (content_type.split(";")[0].strip() or "no content type")
            return Outcome("not_gemini", f"HTTP {status} with a {kind} body, not a Gemini "
                                         f"API error", status=status)
        if status == 429:
            return Outcome("capacity", "rate limited without details (HTTP 429)",
                           status=status)
        return Outcome("transient", f"server error (HTTP {status}, not a Gemini API answer)",
                       status=status)
    message = _one_line(error.get("message") or error.get("status") or f"HTTP {status}")
    reason = next((str(d["reason"]) for d in _details(error, "google.rpc.ErrorInfo")
                   if d.get("reason")), None)
    outcome = quota_outcome(error, message) if status == 429 else None
    if outcome is None:
        lowered = message.lower()
        kind = "transient" if status >= 500 else "bad_request"
        for code, want_reason, words, row_kind in ERROR_TABLE:
            if code != status or (words is not None and words not in lowered):
                continue
            if want_reason == "*" and reason is None or \
                    want_reason not in (None, "*") and want_reason != reason:
                continue
            kind = row_kind
            break
        words = OUTCOME_RULES[kind].words
        if kind == "transient":
            words = f"server error (HTTP {status})"
        elif kind in ("key_invalid", "key_refused", "project_refused", "bad_request"):
            words += f" ({reason or f'HTTP {status}'})"
        same = message.lower().startswith(OUTCOME_RULES[kind].words.lower())
        outcome = Outcome(kind, f"{words}: {message}" if not same else
                          f"{message.rstrip('.')} ({reason or f'HTTP {status}'})")
    outcome.status, outcome.body = status, body
    return outcome


def _answer_parts(candidate: dict[str, Any]) -> tuple[str, str, bool]:
    """(answer text, thought text, whether any non-text part such as a tool call came)."""
    content = candidate.get("content") if isinstance(candidate.get("content"), dict) else {}
    text, thoughts, other = [], [], False
    for part in content.get("parts") or []:
        if not isinstance(part, dict):
            continue
        piece = part.get("text")
        if isinstance(piece, str):
            (thoughts if part.get("thought") else text).append(piece)
        elif part:
            other = True
    return "".join(text), "".join(thoughts), other


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def outcome_from_body(body: Any, streamed: bool = False) -> Outcome:
    """Classify a 200 generateContent answer (or a stream's elements merged) from its JSON."""
    if not isinstance(body, dict):
        return Outcome("transient", "malformed answer (not a JSON object)", status=200)
    usage = body.get("usageMetadata") if isinstance(body.get("usageMetadata"), dict) else {}
    prompt, output = _int(usage.get("promptTokenCount")), _int(usage.get("candidatesTokenCount"))
    total = _int(usage.get("totalTokenCount"))
    thoughts = _int(usage.get("thoughtsTokenCount")) or max(
        0, total - prompt - output - _int(usage.get("toolUsePromptTokenCount")))
    tokens = dict(prompt_tokens=prompt, output_tokens=output, total_tokens=total,
                  thought_tokens=thoughts, status=200, body=body)
    candidates = [c for c in body.get("candidates") or [] if isinstance(c, dict)]
    if not candidates:
        feedback = body.get("promptFeedback") if isinstance(body.get("promptFeedback"),
                                                            dict) else {}
        block = enum_name(feedback.get("blockReason"), BLOCK_NAMES)
        if block:
            return Outcome("blocked", f"prompt blocked ({block})", finish_reason=block,
                           **tokens)
        return Outcome("transient", "answer had no candidates", **tokens)
    text, _, other = _answer_parts(candidates[0])
    finish = enum_name(candidates[0].get("finishReason"), FINISH_NAMES)
    if finish in BLOCKING_FINISH:
        return Outcome("blocked", f"answer stopped for {finish}", text=text,
                       finish_reason=finish, **tokens)
    if finish == "RECITATION":
        return Outcome("recitation", "answer stopped for RECITATION (quoting a source)",
                       text=text, finish_reason=finish, **tokens)
    if streamed and not finish:
        # The SDK swallows an {"error": ...} element inside a 200 stream; a stream that ends
        # without a finish reason is a failed call.
        return Outcome("transient", "stream ended without a finish reason", text=text,
                       **tokens)
    if not text and not other:
        if finish == "MAX_TOKENS" and thoughts:
            return Outcome("thinking_exhausted", f"spent the whole output budget thinking "
                           f"({thoughts} thought tokens, no answer): raise -o "
                           "max_output_tokens or lower -o thinking_budget",
                           finish_reason=finish, **tokens)
        return Outcome("empty", f"an empty answer (finish reason {finish or 'none'}, no text)",
                       finish_reason=finish, **tokens)
    return Outcome("ok", text=text, finish_reason=finish, **tokens)


def merge_stream(elements: list[dict[str, Any]]) -> dict[str, Any]:
    """A stream's elements folded into one answer shaped like a non-streamed one."""
    parts: list[Any] = []
    merged: dict[str, Any] = {}
    candidate: dict[str, Any] = {}
    for element in elements:
        for cand in (element.get("candidates") or [])[:1]:
            if not isinstance(cand, dict):
                continue
            content = cand.get("content") if isinstance(cand.get("content"), dict) else {}
            parts.extend(content.get("parts") or [])
            if cand.get("finishReason"):
                candidate["finishReason"] = cand["finishReason"]
        for name in ("usageMetadata", "promptFeedback", "modelVersion", "responseId"):
            if element.get(name):
                merged[name] = element[name]
    if parts or candidate:
        merged["candidates"] = [{**candidate, "content": {"role": "model", "parts": parts}}]
    return merged


class JsonArrayReader:
    """Complete elements of a streamed JSON array ('[' e1 ',' e2 ... ']'), as they arrive."""

    def __init__(self) -> None:
        self.buffer = ""
        self.closed = False
        self._decoder = json.JSONDecoder()
        self._bytes: Any = None

    def feed(self, chunk: str | bytes) -> list[Any]:
        if isinstance(chunk, bytes):
            if self._bytes is None:
                import codecs
                self._bytes = codecs.getincrementaldecoder("utf-8")("replace")
            chunk = self._bytes.decode(chunk)
        self.buffer += chunk
        out: list[Any] = []
        while True:
            rest = self.buffer.lstrip(" \t\r\n[,")
            if rest.startswith("]"):
                self.closed, self.buffer = True, ""
                return out
            try:
                element, end = self._decoder.raw_decode(rest)
            except ValueError:
                self.buffer = rest
                return out
            out.append(element)
            self.buffer = rest[end:]

    @property
    def leftover(self) -> bool:
        return bool(self.buffer.strip())


class _Tap:
    """What the SDK's HTTP session received for the current call: the response and, for a
    stream, its elements as raw JSON (the pinned protos drop fields and flags)."""

    def __init__(self) -> None:
        self.response: Any = None
        self.reader = JsonArrayReader()
        self.pending: list[Any] = []

    def attach(self, response: Any, stream: bool) -> None:
        self.response = response
        if not stream:
            return
        inner = response.iter_content

        def iter_content(*args: Any, **kwargs: Any) -> Iterator[Any]:
            for chunk in inner(*args, **kwargs):
                self.pending.extend(self.reader.feed(chunk))
                yield chunk
        response.iter_content = iter_content

    def take(self) -> list[Any]:
        out, self.pending = self.pending, []
        return out

    def json(self) -> Any:
        try:
            return json.loads(self.response.content)
        except (AttributeError, ValueError, TypeError, RecursionError):
            return None


@dataclass
class PromptRequest:
    """What the user asks: built once by the CLI, sent unchanged to every candidate."""
    text: str
    system: str | None = None
    attachments: list[tuple[str, bytes]] = field(default_factory=list)   # (mime, data)
    options: dict[str, Any] = field(default_factory=dict)                # GenerationConfig
    schema: dict[str, Any] | None = None                                 # Schema proto dict
    wire_options: dict[str, Any] = field(default_factory=dict)           # see WIRE_OPTIONS


@dataclass(frozen=True)
class WireRequest:
    """A built request: the SDK proto, plus generationConfig fields its protos lack."""
    proto: Any
    wire_options: dict[str, Any]
    input_words: int = 0         # a lower bound of its input tokens, to skip small models


# The REST transport sends call metadata as HTTP headers; the client's session moves this
# one into the JSON body (see `_hook_session`).
WIRE_OPTIONS_HEADER = "x-gemini-router-generation-config"


def _import_sdk() -> Any:
    """The low-level generativelanguage package, imported once, without its noise."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from google.ai import generativelanguage_v1beta as glm
    return glm


def upstream_pool(endpoint: str, size: int = 8) -> Any:
    """The pool for the API's raw calls (the model list, a 404's check): urllib3, which
    requests itself is built on, used directly - requests' per-call work costs ≈0.3 ms. Proxy
    and CA settings come from the environment, as requests reads them, once."""
    import urllib3
    proxies, bundle = environment_transport(endpoint)
    if not bundle:
        import certifi
        bundle = certifi.where()
    options: dict[str, Any] = {"maxsize": size, "block": False, "retries": False}
    if endpoint.startswith("https://"):
        options.update(cert_reqs="CERT_REQUIRED", ca_certs=bundle)
    proxy = proxies.get(endpoint.split(":", 1)[0])
    return urllib3.ProxyManager(proxy, **options) if proxy else urllib3.PoolManager(**options)


def environment_transport(endpoint: str) -> tuple[dict[str, str], str | None]:
    """(the proxies, the CA bundle or None) the environment sets for `endpoint`, read the
    way requests reads them (HTTPS_PROXY, NO_PROXY, REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE)."""
    import requests.utils
    return (requests.utils.get_environ_proxies(endpoint),
            os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE"))


class RawResponse:
    """An upstream answer as the listing reads it: status, headers, the body (`content`,
    `json()`), read whole (the connection goes back to the pool)."""

    def __init__(self, response: Any):
        self.status_code: int = response.status
        self.headers = response.headers
        self.content: bytes = response.data or b""

    def json(self) -> Any:
        return json.loads(self.content)


def api_url(endpoint: str, path: str, params: dict[str, str] | None = None) -> str:
    """The URL of `path` (after /v1beta/) at `endpoint`, with its query."""
    from urllib.parse import quote, urlencode
    url = f"{endpoint}/v1beta/{quote(path, safe='/:')}"
    return url + "?" + urlencode(params) if params else url


def settle_session(session: Any, endpoint: str) -> Any:
    """The environment's proxy and CA settings for the one endpoint, read once: requests
    would otherwise scan the whole environment on every call (≈0.6 ms, a third of a call)."""
    proxies, bundle = environment_transport(endpoint)
    session.proxies.update(proxies)
    session.verify = bundle or True
    session.trust_env = False
    return session


class _StreamError(Exception):
    """An {"error": ...} element inside a 200 stream."""

    def __init__(self, error: dict[str, Any]):
        super().__init__(str(error.get("message", "")))
        self.error = error


class GeminiClient:
    """One REST SDK client per key, built on first use; SDK retries are off. Every call's
    outcome is classified here, from the raw JSON the upstream sent."""

    MAX_LIST_PAGES = 50

    def __init__(self, settings: Settings):
        import threading
        self.settings = settings
        self._clients: dict[tuple[str, int], Any] = {}
        self._local = threading.local()
        self._http: Any = None
        self.glm = _import_sdk()

    def _client(self, service: str, key: ApiKey) -> Any:
        """The SDK client of `service` ("GenerativeService"/"ModelService") for this key."""
        if (service, key.index) not in self._clients:
            opts = {"api_endpoint": self.settings.endpoint, "api_key": key.secret}
            client = getattr(self.glm, f"{service}Client")(transport="rest", client_options=opts)
            # The REST session "refreshes credentials" and resends on a 401, twice; an API
            # key cannot be refreshed, so that would only triple a refused key's cost.
            session = getattr(getattr(client, "_transport", None), "_session", None)
            if session is not None and hasattr(session, "_refresh_status_codes"):
                session._refresh_status_codes = ()
            if session is not None:
                self._hook_session(session)
                settle_session(session, self.settings.endpoint)
            self._clients[service, key.index] = client
        return self._clients[service, key.index]

    def _hook_session(self, session: Any) -> None:
        """Let calls add generationConfig fields the pinned protos lack (`seed`, thinking),
        and let the current call see the raw response (`_Tap`)."""
        send = session.request
        local = self._local

        def request(method: str, url: str, data: Any = None, headers: Any = None,
                    **kwargs: Any) -> Any:
            extra = headers.pop(WIRE_OPTIONS_HEADER, None) if headers else None
            if extra is not None and data:
                body = json.loads(data)
                config = body.setdefault("generationConfig", {})
                for name, value in json.loads(extra).items():
                    if isinstance(value, dict):
                        config.setdefault(name, {}).update(value)
                    else:
                        config[name] = value
                data = json.dumps(body)
            response = send(method, url, data=data, headers=headers, **kwargs)
            tap = getattr(local, "tap", None)
            if tap is not None:
                tap.attach(response, bool(kwargs.get("stream")))
            return response
        session.request = request

    @property
    def http(self) -> Any:
        """The connection pool of calls the protos cannot carry (model list, forwarding)."""
        if self._http is None:
            self._http = upstream_pool(self.settings.endpoint)
        return self._http

    def build_request(self, prompt: PromptRequest) -> WireRequest:
        """The request for `prompt`, without a model (`generate` adds it per attempt).

        Built once per prompt, before any call: a value the SDK refuses is the user's
        mistake (a UsageError), not an upstream failure to route around."""
        glm = self.glm
        config = dict(prompt.options)
        if prompt.schema is not None:
            config["response_mime_type"] = "application/json"
            config["response_schema"] = prompt.schema
        try:
            parts: list[Any] = [glm.Part(inline_data=glm.Blob(mime_type=mime, data=data))
                                for mime, data in prompt.attachments]
            parts.append(glm.Part(text=prompt.text))
            request = glm.GenerateContentRequest(
                contents=[glm.Content(role="user", parts=parts)],
                generation_config=glm.GenerationConfig(**config) if config else None)
            if prompt.system:
                request.system_instruction = glm.Content(parts=[glm.Part(text=prompt.system)])
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            # (a lone surrogate is a UnicodeEncodeError: a ValueError)
            raise UsageError(f"the request cannot be built: {_one_line(exc, 200)}") from None
        words = len(prompt.text.split()) + len((prompt.system or "").split())
        return WireRequest(request, dict(prompt.wire_options), words)

    def generate(self, key: ApiKey, model: str, request: WireRequest,
                 on_text: Callable[[str], None] | None = None,
                 timeout: float | None = None) -> Outcome:
        """One upstream call of `request` (from build_request) on `model`, classified.

        With on_text the answer is streamed into it; an error raised by on_text (our own
        output failing) propagates instead of being blamed on the upstream."""
        generative = self._client("GenerativeService", key)
        proto = type(request.proto)(request.proto, model=f"models/{model}")   # a copy per call
        metadata = ([(WIRE_OPTIONS_HEADER, json.dumps(request.wire_options))]
                    if request.wire_options else [])
        timeout = self.settings.timeout if timeout is None else timeout
        tap = self._local.tap = _Tap()
        try:
            if on_text is None:
                generative.generate_content(proto, timeout=timeout, retry=None,
                                            metadata=metadata)
                return outcome_from_body(tap.json())
            return self._stream(generative, proto, metadata, on_text, timeout, tap)
        except _OutputFailed as exc:
            raise exc.error from None
        except Exception as exc:     # noqa: BLE001 - every failure is classified, none escapes
            return self.outcome_from_error(exc, timeout)
        finally:
            self._local.tap = None

    def _stream(self, generative: Any, proto: Any, metadata: list[tuple[str, str]],
                on_text: Callable[[str], None], timeout: float, tap: _Tap) -> Outcome:
        elements: list[Any] = []
        printed = False

        def consume(new: list[Any]) -> None:
            nonlocal printed
            for element in new:
                if not isinstance(element, dict):
                    continue
                if isinstance(element.get("error"), dict):
                    raise _StreamError(element["error"])
                elements.append(element)
                text, _, _ = _answer_parts((element.get("candidates") or [{}])[0]
                                           if element.get("candidates") else {})
                if text:
                    try:
                        on_text(text)
                    except Exception as exc:  # noqa: BLE001 - not the upstream's fault
                        raise _OutputFailed(exc) from None
                    printed = True
        try:
            for _ in generative.stream_generate_content(proto, timeout=timeout, retry=None,
                                                        metadata=metadata):
                consume(tap.take())
            consume(tap.take())
            if tap.reader.leftover:
                raise _StreamError({"code": 500, "message": "stream cut off mid-element"})
        except Exception as exc:     # noqa: BLE001
            if isinstance(exc, _OutputFailed):
                raise
            outcome = self.outcome_from_error(exc, timeout)
            if printed:
                outcome.partial = True
                outcome.detail = f"stream broke after output began: {outcome.detail}"
            return outcome
        outcome = outcome_from_body(merge_stream(elements), streamed=True)
        if printed and outcome.kind != "ok":
            outcome.partial = True
            if outcome.kind == "transient":
                outcome.detail = f"stream broke after output began: {outcome.detail}"
        return outcome

    def outcome_from_error(self, exc: BaseException, timeout: float | None = None) -> Outcome:
        """Classify an exception from the SDK or HTTP layer, with a short, redacted detail."""
        return self._shown(_classify_exception(
            exc, self.settings.timeout if timeout is None else timeout))

    def _shown(self, outcome: Outcome) -> Outcome:
        """The outcome with its detail as a user reads it: redacted (before any cut, so no
        piece of a key survives it), one line, naming the endpoint when it is no Gemini API."""
        outcome.detail = _one_line(redact(outcome.detail, self.settings.keys), 300)
        if outcome.kind == "not_gemini":
            outcome.detail = f"{self.settings.endpoint} is not a Gemini API: {outcome.detail}"
        return outcome

    def widen_pool(self, size: int) -> None:
        """A pool of `size` connections for the raw calls (a server's worker threads)."""
        self._http = upstream_pool(self.settings.endpoint, size)

    def raw(self, key: ApiKey, method: str, path: str, *,
            params: dict[str, str] | None = None, timeout: float | None = None
            ) -> RawResponse:
        """One HTTP call to the API (path after /v1beta/) with `key`, never retried."""
        import urllib3
        limit = self.settings.timeout if timeout is None else timeout
        return RawResponse(self.http.request(
            method, api_url(self.settings.endpoint, path, params),
            headers={"x-goog-api-key": key.secret}, retries=False, redirect=False,
            timeout=urllib3.Timeout(connect=limit, read=limit)))

    def outcome_of_response(self, response: Any) -> Outcome | None:
        """None for a 2xx response, else the classified failure."""
        if 200 <= response.status_code < 300:
            return None
        try:
            body = response.json()
        except ValueError:
            body = None
        return self._shown(classify_http(response.status_code, body,
                                         response.headers.get("content-type", "")))

    def list_models(self, key: ApiKey, timeout: float | None = None
                    ) -> list[dict[str, Any]] | Outcome:
        """Every model the key can see (following pages), or the classified failure."""
        models: list[dict[str, Any]] = []
        token = ""
        for _ in range(self.MAX_LIST_PAGES):
            params = {"pageSize": "1000", **({"pageToken": token} if token else {})}
            try:
                response = self.raw(key, "GET", "models", params=params, timeout=timeout)
            except Exception as exc:     # noqa: BLE001
                return self.outcome_from_error(exc)
            failure = self.outcome_of_response(response)
            if failure is None and not isinstance(_safe_json(response), dict):
                failure = classify_http(200, None, response.headers.get("content-type", ""))
            if failure is not None:
                if failure.kind == "model_missing":
                    failure.kind = "transient"    # a 404 on the list is the endpoint's problem
                return failure
            page = _safe_json(response)
            models += [model_entry(m) for m in page.get("models") or [] if isinstance(m, dict)
                       and isinstance(m.get("name"), str)]
            token = page.get("nextPageToken") or ""
            if not token:
                break
        return models

    def get_model(self, key: ApiKey, model: str, timeout: float | None = None
                  ) -> dict[str, Any] | Outcome:
        """The live list's entry for one model, or the classified failure (model_missing =
        the list confirms it is gone)."""
        try:
            response = self.raw(key, "GET", f"models/{model}", timeout=timeout)
        except Exception as exc:     # noqa: BLE001
            return self.outcome_from_error(exc)
        failure = self.outcome_of_response(response)
        page = _safe_json(response)
        if failure is None and isinstance(page, dict) and isinstance(page.get("name"), str):
            return model_entry(page)
        return failure or Outcome("transient", "malformed model entry")


def _safe_json(response: Any) -> Any:
    try:
        return response.json()
    except (ValueError, RecursionError):
        return None


def _classify_exception(exc: BaseException, timeout: float) -> Outcome:
    """An exception from the SDK or its HTTP layer as an outcome (see classify_http)."""
    from google.api_core import exceptions as gx
    import requests
    if isinstance(exc, _StreamError):
        code = exc.error.get("code")
        return classify_http(code if isinstance(code, int) and code >= 400 else 500,
                             {"error": exc.error})
    if isinstance(exc, gx.GoogleAPICallError):
        response = getattr(exc, "response", None)
        body = _safe_json(response) if response is not None else None
        content_type = response.headers.get("content-type", "") if response is not None else ""
        code = int(exc.code) if exc.code is not None else 500
        if body is None and response is None:      # no HTTP body at hand: the SDK's words
            body = {"error": {"message": _upstream_message(exc), "details": exc.details or []}}
        return classify_http(code, body, content_type)
    if "aiohttp" in sys.modules:          # the gateway's transport
        outcome = _classify_aiohttp(exc, timeout)
        if outcome is not None:
            return outcome
    import urllib3.exceptions as ux
    # ConnectTimeout is both a ConnectionError and a Timeout: connection first, so an
    # endpoint that never accepts is "unreachable", not a slow model. The raw calls' urllib3
    # raises its own classes.
    if isinstance(exc, (ux.NewConnectionError, ux.ConnectTimeoutError)):
        return Outcome("unreachable", _connect_failure(exc) or "connection failed")
    if isinstance(exc, ux.TimeoutError):
        return Outcome("transient", f"no answer within {timeout:.3g} s (timeout)")
    if isinstance(exc, ux.HTTPError):
        return Outcome("transient", f"connection broken: {_one_line(exc)}")
    if isinstance(exc, requests.exceptions.ConnectionError):
        reason = _connect_failure(exc)
        if reason is not None:
            return Outcome("unreachable", reason)
        return Outcome("transient", f"connection broken: {_one_line(exc)}")
    if isinstance(exc, requests.exceptions.Timeout):
        return Outcome("transient", f"no answer within {timeout:.3g} s (timeout)")
    # Anything else (an empty or malformed 200 body the SDK cannot parse, a broken stream) is
    # the server's fault, not the request's.
    return Outcome("transient", f"malformed response ({type(exc).__name__}: {_one_line(exc)})")


def _classify_aiohttp(exc: BaseException, timeout: float) -> Outcome | None:
    """An exception of the gateway's aiohttp transport as an outcome, or None (not one)."""
    import asyncio
    import aiohttp
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return Outcome("unreachable", "connection timed out")
    # A TLS failure or a proxy that refuses is the transport's problem, not the endpoint's
    # absence: transient, as urllib3's SSLError and ProxyError are for the CLI.
    if isinstance(exc, (aiohttp.ClientSSLError, aiohttp.ClientProxyConnectionError)):
        return Outcome("transient", f"connection broken: {_one_line(exc)}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        error = getattr(exc, "os_error", None)     # (unset on some errors before 3.14)
        number = getattr(error, "errno", None)
        reason = os.strerror(number) if isinstance(number, int) and number > 0 else \
            str(getattr(error, "strerror", None) or error or "")
        return Outcome("unreachable", reason.lower() or "connection failed")
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):    # read timeouts (3.10: two)
        return Outcome("transient", f"no answer within {timeout:.3g} s (timeout)")
    if isinstance(exc, aiohttp.ClientError):
        return Outcome("transient", f"connection broken: {_one_line(exc)}")
    return None


def _connect_failure(exc: BaseException) -> str | None:
    """Why the TCP connection itself could not be made (endpoint down or wrong), or None
    when the failure came later. urllib3 buries the reason a few exceptions deep."""
    import urllib3.exceptions as ux
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, ux.NewConnectionError):      # (a ConnectTimeoutError subclass)
            # "...: Failed to establish a new connection: [Errno 111] Connection refused"
            detail = str(item).rsplit("new connection: ", 1)[-1]
            return detail.split("] ", 1)[-1].strip().lower() or "connection failed"
        if isinstance(item, ux.ConnectTimeoutError):
            return "connection timed out"
        if isinstance(item, BaseException):
            todo.extend([item.__cause__, item.__context__, getattr(item, "reason", None),
                         *item.args])
    return None


def _upstream_message(exc: Any) -> str:
    """The server's own error message, without the SDK's 'POST http://... :' prefix."""
    text = str(getattr(exc, "message", "") or exc)
    return _one_line(text.split(": ", 1)[1] if text.startswith(("POST ", "GET ")) else text)


class _OutputFailed(Exception):
    """Carries an error from the caller's on_text callback past the classification."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def model_entry(model: dict[str, Any]) -> dict[str, Any]:
    """The part of a models-list entry the router keeps (in the router state's cache)."""
    def limit(name: str) -> int:
        value = model.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0
    methods = [m for m in model.get("supportedGenerationMethods") or [] if isinstance(m, str)]
    return {"name": bare_model(model["name"]), "display_name": str(model.get("displayName", "")),
            "input_limit": limit("inputTokenLimit"), "output_limit": limit("outputTokenLimit"),
            "methods": methods, "version": str(model.get("version", "")),
            "thinking": model.get("thinking") is True}


def text_model_names(models: list[dict[str, Any]]) -> list[str]:
    """The names of the models `route` and `rank` use, in list order."""
    return [m["name"] for m in models if is_text_model(m["name"], m["methods"])]


def is_text_model(name: str, methods: list[str]) -> bool:
    """generateContent-capable and not an embedding/image/speech/live model (by name)."""
    lowered = name.lower()
    return "generateContent" in methods and not any(w in lowered for w in NON_TEXT_WORDS)


# ======================================================================================
# Outcomes -> samples, cooldowns, learned limits and disabled keys
# ======================================================================================
# `record_outcome` is the only code that turns an outcome into state, for route, rank and
# model listing alike; `StateView` is the only code that reads it back to decide whether a
# (key, model) pair may be called. Scopes follow Google's: quotas belong to a project (every
# key of it on that model), transient failures to the (key, model) pair they happened on.

def next_pacific_midnight(now: float) -> float:
    """When Gemini's daily quotas reset: the next midnight in America/Los_Angeles."""
    from datetime import datetime, timedelta
    local = datetime.fromtimestamp(now, _pacific())
    # Wall-clock arithmetic; .timestamp() then applies that midnight's own UTC offset.
    midnight = (local + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return midnight.timestamp()


def pacific_day(now: float) -> str:
    from datetime import datetime
    return datetime.fromtimestamp(now, _pacific()).date().isoformat()


def _pacific() -> Any:
    from datetime import timedelta, timezone
    try:
        from zoneinfo import ZoneInfo
        return ZoneInfo("America/Los_Angeles")
    except Exception:   # noqa: BLE001 - no tz database: UTC-8 never resets earlier than Google
        return timezone(timedelta(hours=-8))


@dataclass(frozen=True)
class Block:
    """Why a (key, model) pair cannot be called now."""
    until: float | None          # None: until a person acts (a disabled key)
    reason: str
    kind: str
    soft: bool = False           # a guess from transient failures, not a fact from Google


def effective_until(entry: dict[str, Any], now: float) -> float:
    """A cooldown's end; a clock stepped backwards never stretches it past its length."""
    since = entry.get("since") or 0.0
    if now < since:
        return min(entry["until"], now + (entry["until"] - since))
    return entry["until"]


class StateView:
    """An indexed, read-only picture of what keeps each (key, model) pair from being called.

    Built once per change of the state files, so every check is a few dictionary lookups,
    whatever the number of keys, models and cooldowns."""

    def __init__(self, settings: Settings, cooldowns: dict[str, Any], router: dict[str, Any]):
        self.settings = settings
        self.cooldowns = cooldowns
        self.router = router
        self.cool: dict[tuple[str | None, str | None], dict[str, Any]] = {}
        for entry in cooldowns["cooldowns"]:
            target = (entry.get("model"), entry.get("key"))
            if target not in self.cool or entry["until"] > self.cool[target]["until"]:
                self.cool[target] = entry
        self.disabled: dict[str, Any] = cooldowns["disabled_keys"]
        self._day: tuple[int, str] = (-1, "")
        # Guesses this process made since its last batched write (Router.record): a pair
        # that just failed transiently, seen at once by the process's other requests.
        self.guesses: dict[tuple[str, str], Block] = {}

    def today(self, now: float) -> str:
        hour = int(now // 3600)      # the Pacific day changes on the hour
        if self._day[0] != hour:
            self._day = (hour, pacific_day(now))
        return self._day[1]

    def block(self, key: ApiKey, model: str | None, now: float) -> Block | None:
        """Why (key, model) cannot be called now, or None. model=None asks about the key as
        a whole (disabled, or cooling for every model)."""
        disabled = self.disabled.get(key.fingerprint)
        if disabled is not None:
            return Block(None, f"disabled: {disabled.get('reason', '')}", "disabled")
        targets = ((model, key.fingerprint), (None, key.fingerprint), (model, None)) \
            if model is not None else ((None, key.fingerprint),)
        worst: Block | None = None
        for target in targets:
            entry = self.cool.get(target)
            if entry is None:
                continue
            until = effective_until(entry, now)
            if until <= now:
                continue
            soft = entry.get("kind") == "transient"
            if worst is None or (worst.soft and not soft) or \
                    (soft == worst.soft and until > (worst.until or 0)):
                worst = Block(until, entry["reason"], entry.get("kind", ""), soft)
        if worst is not None and not worst.soft:
            return worst
        guess = self.guesses.get((key.fingerprint, model)) if model is not None else None
        if guess is not None and guess.until > now and worst is None:
            worst = guess
        return (self.pace_block(key, model, now) if model is not None else None) or worst

    def strikes(self, key: ApiKey, model: str, now: float, settings: Settings) -> int:
        """Consecutive transient failures of the pair that still count (see `_strike`)."""
        n, last = _strike_count(self.router["strikes"].get(f"{key.fingerprint}/{model}"))
        return n if now - last <= 10 * settings.cooldown_secs else 0

    def limit(self, key: ApiKey, model: str) -> dict[str, Any] | None:
        return self.router["limits"].get(f"{self.settings.project_id(key)}/{model}")

    def paced(self, key: ApiKey, model: str) -> bool:
        """Whether calls on the pair are counted at once, under the lock (a ceiling or a
        learned limit applies): the other pairs' counts can wait for a batched write."""
        s = self.settings
        return bool(s.rpm_limit or s.rpd_limit or self.limit(key, model))

    def pace_block(self, key: ApiKey, model: str, now: float) -> Block | None:
        """A user ceiling (per key) or a learned limit (per project) reached, or None."""
        s, usage = self.settings, self.router["usage"]
        own = usage.get(f"{key.fingerprint}/{model}") or {}
        if s.rpm_limit:
            minute = [t for t in own.get("minute", []) if now - 60 < t <= now]
            if len(minute) >= s.rpm_limit:
                return Block(minute[-s.rpm_limit] + 60, f"GEMINI_ROUTER_RPM={s.rpm_limit} "
                             "reached", "ceiling")
        if s.rpd_limit and own.get("day") == self.today(now) and \
                own.get("count", 0) >= s.rpd_limit:
            return Block(next_pacific_midnight(now), f"GEMINI_ROUTER_RPD={s.rpd_limit} reached",
                         "ceiling")
        learned = self.limit(key, model)
        if not learned:
            return None
        project = [usage.get(f"{k.fingerprint}/{model}") or {} for k in s.project_keys(key)]
        rpm = learned.get("rpm", 0)
        if rpm:
            minute = sorted(t for u in project for t in u.get("minute", [])
                            if now - 60 < t <= now)   # a later stamp: the clock went back
            if len(minute) >= rpm:
                return Block(minute[-rpm] + 60, f"paced under the learned limit of {rpm} "
                             "requests per minute for this project", "limit")
        rpd = learned.get("rpd", 0)
        if rpd:
            today = self.today(now)
            if sum(u.get("count", 0) for u in project if u.get("day") == today) >= rpd:
                return Block(next_pacific_midnight(now), f"paced under the learned limit of "
                             f"{rpd} requests per day for this project", "limit")
        return None


def add_cooldown(cooldowns: dict[str, Any], model: str | None, fingerprint: str | None,
                 until: float, reason: str, kind: str, now: float,
                 scope: str = "pair", quota: str = "") -> float:
    """Cool a (key, model) target; never shortens a longer cooldown, and a guess (transient)
    never replaces a fact. Returns the end."""
    soft = kind == "transient"
    for entry in cooldowns["cooldowns"]:
        if entry.get("model") == model and entry.get("key") == fingerprint:
            old_soft = entry.get("kind") == "transient"
            if soft and not old_soft and entry["until"] > now:
                return entry["until"]
            if entry["until"] >= until and old_soft == soft:
                return entry["until"]
            entry.update(until=max(until, entry["until"]) if not soft else until,
                         reason=reason, kind=kind, since=now, scope=scope)
            if quota:
                entry["quota"] = quota
            return entry["until"]
    cooldowns["cooldowns"].append({"model": model, "key": fingerprint, "until": until,
                                   "reason": reason, "kind": kind, "since": now,
                                   "scope": scope, **({"quota": quota} if quota else {})})
    return until


def prune_cooldowns(cooldowns: dict[str, Any], now: float) -> None:
    cooldowns["cooldowns"] = [e for e in cooldowns["cooldowns"] if effective_until(e, now) > now]


def count_call(router: dict[str, Any], settings: Settings, key: ApiKey, model: str,
               now: float, minute_keep: int) -> None:
    """Count a call on (key, model): toward today's total and, when a per-minute limit
    applies, its time (only the last `minute_keep` are kept: all a check needs)."""
    usage = router["usage"].setdefault(f"{key.fingerprint}/{model}", {})
    today = pacific_day(now)
    if usage.get("day") != today:
        usage.update(day=today, count=0)
    usage["count"] = usage.get("count", 0) + 1
    if minute_keep:
        recent = [t for t in usage.get("minute", []) if now - 60 < t <= now] + [round(now, 3)]
        usage["minute"] = recent[-minute_keep:]
    else:
        usage.pop("minute", None)


def uncount_call(router: dict[str, Any], key: ApiKey, model: str, t: float) -> None:
    """Take back a call counted at its reservation that Google refused without spending
    quota (see UNSPENT_KINDS)."""
    usage = router["usage"].get(f"{key.fingerprint}/{model}")
    if not usage:
        return
    usage["count"] = max(0, usage.get("count", 0) - 1)
    minute = usage.get("minute", [])
    earlier = [x for x in minute if x <= t + 1]
    if earlier:
        minute.remove(max(earlier))


def minute_keep(router: dict[str, Any], settings: Settings, key: ApiKey, model: str) -> int:
    learned = router["limits"].get(f"{settings.project_id(key)}/{model}") or {}
    return max(settings.rpm_limit, learned.get("rpm", 0))


def cooldown_length(outcome: Outcome, settings: Settings, now: float) -> float:
    """When a cooldown earned by `outcome` ends (its rule's `length`)."""
    length = outcome.rule.length
    if length == "midnight":
        return next_pacific_midnight(now)
    if length == "retry":
        return now + (outcome.retry_after if outcome.retry_after is not None
                      else settings.cooldown_secs)
    if length == "long":
        return now + LONG_COOLDOWN_SECS
    if length == "no_quota":
        return now + NO_QUOTA_SECS
    return now + MODEL_CHECK_SECS        # "check"


def _strike_count(value: Any) -> tuple[int, float]:
    if isinstance(value, dict):
        return int(value.get("n", 0)), float(value.get("t", 0))
    return (value, 0.0) if isinstance(value, int) else (0, 0.0)


def record_outcome(tx: StateTransaction, settings: Settings, key: ApiKey, model: str | None,
                   outcome: Outcome, latency: float, now: float) -> str | None:
    """Apply one upstream outcome to state (OUTCOME_RULES). Returns a notice for stderr.

    This is the only place outcomes become samples, cooldowns, limits or disabled keys."""
    cooldowns, router = tx.cooldowns, tx.router
    rule = outcome.rule
    if model is not None and rule.sample is not None:
        samples = tx.stats["models"].setdefault(model, [])
        samples.append({"t": round(now, 3), "ok": rule.sample, "kind": outcome.kind,
                        "latency": round(latency, 4), "prompt_tokens": outcome.prompt_tokens,
                        "output_tokens": outcome.output_tokens, "key": key.fingerprint})
        del samples[:-settings.rolling_window]
    if outcome.limits and model is not None:
        learned = router["limits"].setdefault(f"{settings.project_id(key)}/{model}", {})
        learned.update({w: v for w, v in outcome.limits.items() if v > 0}, learned=round(now))
    if rule.scope is None:
        return None
    if rule.scope in ("key", "project_keys"):
        return _disable(cooldowns, settings, key, outcome, now)
    if model is None and rule.length == "transient":
        return None              # a failed listing says nothing about any model
    if model is None and rule.scope in ("pair", "project_model"):
        # Model listing failed with a pair-scoped kind: the key as a whole, briefly.
        add_cooldown(cooldowns, None, key.fingerprint, now + settings.cooldown_secs,
                     outcome.detail, outcome.kind, now, "key")
        return None
    if rule.length == "transient":
        return _strike(tx, settings, key, model, outcome, now)
    until = cooldown_length(outcome, settings, now)
    if rule.scope == "pair":
        add_cooldown(cooldowns, model, key.fingerprint, until, outcome.detail, outcome.kind, now)
    else:
        target_model = model if rule.scope == "project_model" else None
        for member in settings.project_keys(key):
            add_cooldown(cooldowns, target_model, member.fingerprint, until, outcome.detail,
                         outcome.kind, now, "project", outcome.quota_id)
    return None


def _disable(cooldowns: dict[str, Any], settings: Settings, key: ApiKey, outcome: Outcome,
             now: float) -> str | None:
    members = settings.project_keys(key) if outcome.rule.scope == "project_keys" else (key,)
    fresh = [k for k in members if k.fingerprint not in cooldowns["disabled_keys"]]
    for member in fresh:
        cooldowns["disabled_keys"][member.fingerprint] = {
            "reason": outcome.detail, "since": now, "kind": outcome.kind,
            "via": key.label if member is not key else None}
    if not fresh:
        return None
    labels = ", ".join(k.label for k in fresh)
    return (f"{labels} disabled: {outcome.detail}; fix it, then run "
            f"'{PROG} cooldowns --clear {fresh[0].label}'")


def _strike(tx: StateTransaction, settings: Settings, key: ApiKey, model: str,
            outcome: Outcome, now: float) -> None:
    """A transient failure: a short, growing cooldown of the pair (a guess, never a refusal),
    and of the model for everyone only once several keys fail on it."""
    strikes = tx.router["strikes"]
    pair = f"{key.fingerprint}/{model}"
    n, last = _strike_count(strikes.get(pair))
    if now - last > 10 * settings.cooldown_secs:
        n = 0                     # an old failure says nothing about now
    n += 1
    strikes[pair] = {"n": n, "t": round(now, 3)}
    length = transient_length(settings, n)
    add_cooldown(tx.cooldowns, model, key.fingerprint, now + length,
                 f"{n} transient failure{'s' if n > 1 else ''} in a row on this key: "
                 f"{outcome.detail}", "transient", now)
    failing = [p for p, v in strikes.items() if p.endswith(f"/{model}")
               and now - _strike_count(v)[1] <= settings.cooldown_secs]
    if len(failing) >= MODEL_WIDE_KEYS:
        add_cooldown(tx.cooldowns, model, None, now + length,
                     f"{len(failing)} keys failing on this model: {outcome.detail}",
                     "transient", now, "model")
    return None


def transient_length(settings: Settings, strikes: int) -> float:
    """A guess grows with repeated failure: 5 s, 10 s, 20 s ... up to COOLDOWN_SECS."""
    return min(settings.cooldown_secs, TRANSIENT_BASE_SECS * 2 ** (strikes - 1))


def clear_recovered(tx: StateTransaction, key: ApiKey, model: str) -> None:
    """An answer on a pair that was cooling as a guess: the guess was wrong, forget it."""
    tx.router["strikes"].pop(f"{key.fingerprint}/{model}", None)
    tx.cooldowns["cooldowns"] = [
        e for e in tx.cooldowns["cooldowns"]
        if not (e.get("kind") == "transient" and e.get("model") == model
                and e.get("key") in (key.fingerprint, None))]


# ======================================================================================
# Stats: rolling samples summarised per model
# ======================================================================================

@dataclass
class ModelStats:
    model: str
    samples: int                  # every sample in the window
    judged: int                   # samples that count in the success rate (see summarize)
    success_rate: float | None    # successes / judged
    latency_p50_s: float | None   # over successful answers
    latency_p95_s: float | None
    prompt_tokens_avg: float | None
    output_tokens_avg: float | None
    outcomes: dict[str, int]
    last_t: float | None
    latency_samples: int = 0      # successful answers: the latencies behind p50 and p95
    latency_mad_s: float | None = None   # their median absolute deviation (>= 3 answers)
    excluded: int = 0             # verdict samples of keys that never worked on this model


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile of an already sorted, non-empty list."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q
    low = math.floor(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def summarize(model: str, samples: list[dict[str, Any]]) -> ModelStats:
    """One model's window summarised.

    The success rate counts only what says something about the model: samples whose kind
    is in MODEL_VERDICTS. Health is per key x model, so when at least one key has succeeded
    on this model, the samples of keys that never succeeded on it are left out (`excluded`):
    a key without access or quota for the model must not make a working model look broken.
    When no key has succeeded, every verdict counts - then the model itself is failing.
    Latency (p50, p95, MAD) is over successful answers (kind "ok") only."""
    verdicts = [s for s in samples if s["kind"] in MODEL_VERDICTS]
    working_keys = {s.get("key") for s in verdicts if s["ok"]}
    judged = [s for s in verdicts if not working_keys or s.get("key") in working_keys]
    good = [s for s in samples if s["kind"] == "ok"]
    latencies = sorted(float(s.get("latency", 0.0)) for s in good)
    outcomes: dict[str, int] = {}
    for s in samples:
        outcomes[s["kind"]] = outcomes.get(s["kind"], 0) + 1

    def mean(name: str) -> float | None:
        return round(sum(int(s.get(name, 0)) for s in good) / len(good), 1) if good else None

    return ModelStats(
        model=model, samples=len(samples), judged=len(judged),
        success_rate=round(sum(1 for s in judged if s["ok"]) / len(judged), 4) if judged else None,
        latency_p50_s=round(percentile(latencies, 0.5), 4) if latencies else None,
        latency_p95_s=round(percentile(latencies, 0.95), 4) if latencies else None,
        prompt_tokens_avg=mean("prompt_tokens"), output_tokens_avg=mean("output_tokens"),
        outcomes=outcomes, last_t=max((s["t"] for s in samples), default=None),
        latency_samples=len(latencies), latency_mad_s=median_abs_deviation(latencies),
        excluded=len(verdicts) - len(judged))


def median_abs_deviation(sorted_values: list[float]) -> float | None:
    """The spread of a latency sample: None below 3 values, where it means nothing."""
    if len(sorted_values) < 3:
        return None
    middle = percentile(sorted_values, 0.5)
    return round(percentile(sorted(abs(v - middle) for v in sorted_values), 0.5), 4)


def all_stats(stats_doc: dict[str, Any]) -> dict[str, ModelStats]:
    return {model: summarize(model, samples)
            for model, samples in sorted(stats_doc["models"].items()) if samples}


# ======================================================================================
# Tiers: percentile cuts of Fast, Quality and Balance scores
# ======================================================================================
# Per metric, graded models are ordered best first; the model at position i of n has
# percentile p = (i + 0.5) / n and gets S (p <= 0.2), A (<= 0.5), B (<= 0.8) or C. Models
# that tie share the tier of the best position among them. What ties: the same capability
# (Quality), medians within measurement noise (Fast), equal scores (Balance). Quality grades
# every listed model from the model list alone; Fast and Balance grade only measured models
# (at least one successful answer) - the others are C, never tied with working ones.

TIER_NAMES = ("fast", "quality", "balance")
TRUSTED_ANSWERS = 3        # Fast/Balance letters resting on fewer answers are provisional
# Two median latencies tie when they differ by less than the largest of:
NOISE_FLOOR_S = 0.05       # network jitter: no single call resolves less
NOISE_RELATIVE = 0.25      # call-to-call variation, as a share of the faster median
NOISE_STANDARD_ERRORS = 2  # x the medians' combined standard error (needs >= 3 answers)
SPEED_SPAN = 30            # Balance: a model this many times slower than the fastest has
#                            speed 0 (log scale between)
# Gemini families, most capable first. Other Gemini models rank below these, and models of
# other lines (Gemma, LearnLM, ...) below every Gemini model.
GEMINI_FAMILIES = ("ultra", "pro", "flash", "flash-lite")
# A fresh install tries Google's stable aliases first (DEFAULT_PREFERENCE), then these
# families in this order (newest generation first, stable before preview), then the rest
# by capability: fast, widely available models first, with no model name written in.
DEFAULT_FAMILY_ORDER = ("flash", "flash-lite", "pro")
PREVIEW_WORDS = ("preview", "exp", "experimental")


def tier_for_position(i: int, n: int) -> str:
    p = (i + 0.5) / n
    return "S" if p <= 0.2 else "A" if p <= 0.5 else "B" if p <= 0.8 else "C"


def group_runs(ordered: list[str], ties: Callable[[list[str], str], bool]) -> list[list[str]]:
    """Best-first models grouped while `ties(group, model)`: each rule compares a model with
    its group's first member, not the previous one, so small steps cannot chain a slow
    model into a fast one's group."""
    groups: list[list[str]] = []
    for model in ordered:
        if groups and ties(groups[-1], model):
            groups[-1].append(model)
        else:
            groups.append([model])
    return groups


def tiers_by_group(groups: list[list[str]]) -> dict[str, str]:
    """Each group gets the tier of its best (first) position among all grouped models."""
    n = sum(len(g) for g in groups)
    tiers: dict[str, str] = {}
    position = 0
    for group in groups:
        for model in group:
            tiers[model] = tier_for_position(position, n)
        position += len(group)
    return tiers


def assign_tiers(scores: dict[str, Any]) -> dict[str, str]:
    """Tiers for models whose scores sort ascending best-first (lower is better)."""
    ordered = sorted(scores, key=lambda m: (scores[m], m))
    return tiers_by_group(group_runs(ordered, lambda g, m: scores[g[0]] == scores[m]))


# --- Fast: latency, with ties inside measurement noise --------------------------------

def median_error(stats: ModelStats) -> float:
    """Standard error of a median latency: 1.2533 x sigma / sqrt(n), sigma = 1.4826 x MAD.

    0 below 3 answers, where the spread is unknown and the relative threshold stands in."""
    if stats.latency_mad_s is None or stats.latency_samples < 3:
        return 0.0
    return 1.2533 * 1.4826 * stats.latency_mad_s / math.sqrt(stats.latency_samples)


def latency_noise(a: ModelStats, b: ModelStats) -> float:
    """How far apart two measured medians must be before they tell two models apart."""
    faster = min(a.latency_p50_s or 0.0, b.latency_p50_s or 0.0)
    return max(NOISE_FLOOR_S, NOISE_RELATIVE * faster,
               NOISE_STANDARD_ERRORS * math.hypot(median_error(a), median_error(b)))


def within_noise(a: ModelStats, b: ModelStats) -> bool:
    return abs((a.latency_p50_s or 0.0) - (b.latency_p50_s or 0.0)) < latency_noise(a, b)


def fast_groups(stats: dict[str, ModelStats]) -> list[list[str]]:
    """Measured models, lowest median latency first, grouped while within noise of the
    group's fastest member; an equal median always joins its twin's group (the noise term
    differs with each model's spread, equal medians must still share a tier). Models with
    no successful answer are left out."""
    measured = sorted((m for m, s in stats.items() if s.latency_p50_s is not None),
                      key=lambda m: (stats[m].latency_p50_s, m))

    def ties(group: list[str], model: str) -> bool:
        return within_noise(stats[group[0]], stats[model]) or \
            stats[group[-1]].latency_p50_s == stats[model].latency_p50_s
    return group_runs(measured, ties)


# --- Quality: capability from the model list -------------------------------------------

@dataclass(frozen=True)
class Capability:
    """What the model list says about a model, in the order it counts for Quality."""
    family: str                   # GEMINI_FAMILIES, "gemini" (other Gemini), else the name's
    #                               first word (gemma, learnlm, ...)
    generation: str | None        # from the name ("2.5"); an alias: the newest listed
    alias: bool                   # gemini-*-latest
    size_b: float | None          # parameters in billions, when the name says ("27b")
    thinking: bool | None         # None: the list does not say
    output_limit: int
    input_limit: int

    def rank_key(self) -> tuple[float, ...]:
        """Higher is more capable: family, generation, size, thinking, output, input."""
        return (family_level(self.family), *version_key(self.generation), self.size_b or 0.0,
                float(self.thinking is True), self.output_limit, self.input_limit)

    def describe(self) -> str:
        """The Quality basis in words: 'pro 2.5, thinking, out 65536'."""
        words = [self.family]
        if self.generation:
            words.append(self.generation + (" (latest)" if self.alias else ""))
        if self.size_b:
            words.append(f"{_fmt_num(self.size_b, 1)}b")
        text = " ".join(words)
        if self.thinking:
            text += ", thinking"
        return text + (f", out {self.output_limit}" if self.output_limit else "")


def family_level(family: str) -> int:
    """ultra 4, pro 3, flash 2, flash-lite 1, other Gemini 0, other lines -1."""
    if family in GEMINI_FAMILIES:
        return len(GEMINI_FAMILIES) - GEMINI_FAMILIES.index(family)
    return 0 if family == "gemini" else -1


def version_key(generation: str | None) -> tuple[int, int]:
    """'2.5' -> (2, 5), '3' -> (3, 0); unknown sorts below every known generation."""
    if not generation:
        return (-1, -1)
    parts = [int(p) for p in generation.split(".")]
    return (parts[0], parts[1] if len(parts) > 1 else 0)


def _version_word(word: str) -> str | None:
    """'2.5' or '3' (a generation); not '1206' or '001' (dates and revisions)."""
    parts = word.split(".")
    return word if len(parts) <= 2 and all(p.isdigit() and len(p) <= 2 for p in parts) \
        else None


def _size_word(word: str) -> float | None:
    number = word[:-1]
    if word.endswith("b") and number.replace(".", "", 1).isdigit():
        return float(number)
    return None


def is_preview(name: str) -> bool:
    return any(w in PREVIEW_WORDS for w in bare_model(name).lower().split("-"))


def model_family(words: list[str]) -> str:
    if words[0] != "gemini":
        return words[0] or "?"
    for i, word in enumerate(words):
        if word == "flash":
            return "flash-lite" if words[i + 1:i + 2] in (["lite"], ["8b"]) else "flash"
        if word in GEMINI_FAMILIES:
            return word
    return "gemini"


def capability(name: str, entry: dict[str, Any], alias_generation: str | None = None
               ) -> Capability:
    """A model's capability from its name and model-list entry (missing fields: unknown)."""
    words = bare_model(name).lower().split("-")
    alias = words[-1] == "latest"
    thinking = entry.get("thinking")
    return Capability(
        family=model_family(words),
        generation=next(filter(None, map(_version_word, words)), None) or
        (alias_generation if alias else None),
        alias=alias,
        size_b=next(filter(None, map(_size_word, words)), None),
        thinking=thinking if isinstance(thinking, bool) else None,
        output_limit=int(entry.get("output_limit") or 0),
        input_limit=int(entry.get("input_limit") or 0))


def capabilities(entries: dict[str, dict[str, Any]]) -> dict[str, Capability]:
    """Capability per model (name -> model-list entry). A gemini-*-latest alias counts as
    the newest generation listed in its family, else the newest Gemini generation listed."""
    caps = {m: capability(m, e) for m, e in entries.items()}
    newest: dict[str, str] = {}
    for c in caps.values():
        if c.generation and family_level(c.family) >= 0:
            for family in (c.family, "*"):
                if version_key(c.generation) > version_key(newest.get(family)):
                    newest[family] = c.generation
    for m, c in caps.items():
        if c.alias and c.generation is None and family_level(c.family) >= 0:
            caps[m] = capability(m, entries[m], newest.get(c.family) or newest.get("*"))
    return caps


def quality_groups(caps: dict[str, Capability]) -> list[list[str]]:
    """Models most capable first, grouped where the list says the same about them."""
    ordered = sorted(caps, key=lambda m: (tuple(-v for v in caps[m].rank_key()), m))
    return group_runs(ordered, lambda g, m: caps[g[0]].rank_key() == caps[m].rank_key())


# --- Balance, and the rows `tiers` shows ------------------------------------------------

def group_positions(groups: list[list[str]]) -> dict[str, int]:
    """0-based position of each model's group leader (equal models share it)."""
    positions: dict[str, int] = {}
    start = 0
    for group in groups:
        positions.update((m, start) for m in group)
        start += len(group)
    return positions


def balance_scores(measured: dict[str, ModelStats], speed_groups: list[list[str]],
                   capability_groups: list[list[str]], caps: dict[str, Capability],
                   scoring: str) -> dict[str, float]:
    """Balance per measured model. balanced (higher is better, 0..1):
    0.5 x success + 0.3 x speed + 0.2 x capability, where speed = 1 - ln(m / fastest) /
    ln(SPEED_SPAN), at least 0, with m the median of this model's Fast group leader (models
    tied within noise get the same speed; a log scale, so 0.2 s vs 1.5 s still counts), and
    capability = 1 - Quality position / (models - 1). seed (lower is better): the original
    (1 - success)*1000 + p50 - output_limit*0.1."""
    if scoring == "seed":
        return {m: round((1 - (s.success_rate or 0.0)) * 1000 + (s.latency_p50_s or 0.0)
                         - caps[m].output_limit * 0.1, 4) for m, s in measured.items()}
    lead = {m: max(measured[g[0]].latency_p50_s or 0.0, 1e-4)
            for g in speed_groups for m in g}
    fastest = min(lead.values(), default=1.0)
    place = group_positions(capability_groups)
    last = max(len(place) - 1, 1)
    speed = {m: max(0.0, 1 - math.log(lead[m] / fastest) / math.log(SPEED_SPAN)) for m in lead}
    return {m: round(0.5 * (s.success_rate or 0.0) + 0.3 * speed[m]
                     + 0.2 * (1 - place[m] / last), 4) for m, s in measured.items()}


@dataclass
class TierRow:
    model: str
    rank: int                     # place in Balance order, the order routes try (1 = first)
    fast: str
    quality: str
    balance: str
    measured: bool                # has a successful answer: Fast and Balance rest on data
    provisional: bool             # measured on fewer than TRUSTED_ANSWERS answers
    ranked: bool                  # has samples that judge the model
    latency_p50_s: float | None
    latency_samples: int
    success_rate: float | None
    judged: int
    excluded: int                 # samples of keys that never worked on it, not counted
    samples: int
    balance_score: float | None
    quality_rank: int             # 1 = most capable; the same capability shares a rank
    capability: str               # the Quality basis in words
    family: str
    generation: str | None
    thinking: bool | None
    output_limit: int | None
    input_limit: int | None


def model_index(router_doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    listing = router_doc.get("model_list") or {}
    return {m["name"]: m for m in listing.get("models", []) if isinstance(m, dict)
            and isinstance(m.get("name"), str)}


def compute_tiers(stats: dict[str, ModelStats], models: dict[str, dict[str, Any]],
                  scoring: str = "balanced") -> dict[str, TierRow]:
    """Tier rows for every known text model and every model with samples, in Balance order.

    Quality: `capabilities` order, for every model. Fast: median latency of successful
    answers, ties within noise (`fast_groups`). Balance: `balance_scores`. Fast and Balance
    grade measured models only; a model with no successful answer is C in both."""
    names = sorted({m for m, info in models.items() if is_text_model(m, info["methods"])}
                   | set(stats))
    caps = capabilities({m: models.get(m) or {} for m in names})
    capability_groups = quality_groups(caps)
    quality = tiers_by_group(capability_groups)
    quality_place = group_positions(capability_groups)
    measured = {m: stats[m] for m in names if m in stats and stats[m].latency_p50_s is not None}
    speed_groups = fast_groups(measured)
    fast = tiers_by_group(speed_groups)
    score = balance_scores(measured, speed_groups, capability_groups, caps, scoring)
    signed = {m: (s if scoring == "seed" else -s) for m, s in score.items()}
    balance = assign_tiers(signed)
    rows: dict[str, TierRow] = {}
    # Measured models in Balance order first: tier_order("balance") reads that order.
    for m in sorted(measured, key=lambda m: (signed[m], m)) + \
            [m for m in names if m not in measured]:
        st, cap = stats.get(m), caps[m]
        rows[m] = TierRow(
            model=m, rank=0, fast=fast.get(m, "C"), quality=quality[m],
            balance=balance.get(m, "C"), measured=m in measured,
            provisional=m in measured and measured[m].latency_samples < TRUSTED_ANSWERS,
            ranked=bool(st and st.judged), latency_p50_s=st.latency_p50_s if st else None,
            latency_samples=st.latency_samples if st else 0,
            success_rate=st.success_rate if st else None, judged=st.judged if st else 0,
            excluded=st.excluded if st else 0, samples=st.samples if st else 0,
            balance_score=score.get(m), quality_rank=quality_place[m] + 1,
            capability=cap.describe(), family=cap.family, generation=cap.generation,
            thinking=cap.thinking, output_limit=cap.output_limit or None,
            input_limit=cap.input_limit or None)
    order = tier_order(rows, "balance", names)
    for i, m in enumerate(order, 1):
        rows[m].rank = i
    return {m: rows[m] for m in order}


def tier_order(rows: dict[str, TierRow], tier: str, text_models: list[str]) -> list[str]:
    """Routing order for a tier, over text_models.

    Graded models first - Fast: measured, by median latency (within a tie the lower median
    first: the best guess); Quality: every model by capability; Balance: measured, by
    score (`rows` come in that order). Then models not measured yet in default order, and
    last the models that were tried and never answered (success rate 0)."""
    listed = set(text_models)
    candidates = [r for r in rows.values() if r.model in listed]
    failing = {r.model for r in candidates if r.ranked and not r.success_rate}
    if tier == "quality":
        graded = sorted((r for r in candidates if r.model not in failing),
                        key=lambda r: (r.quality_rank, r.model))
    elif tier == "fast":
        graded = sorted((r for r in candidates if r.measured),
                        key=lambda r: (r.latency_p50_s, r.model))
    else:
        graded = [r for r in candidates if r.measured]
    order = [r.model for r in graded]
    rest = [m for m in default_order(rows, text_models) if m not in order]
    return order + [m for m in rest if m not in failing] + [m for m in rest if m in failing]


def default_order(rows: dict[str, TierRow], text_models: list[str]) -> list[str]:
    """The order a fresh install tries models in: Google's stable aliases when listed
    (DEFAULT_PREFERENCE), then the DEFAULT_FAMILY_ORDER families, each newest generation
    first and stable before preview, then every other model by capability."""
    preferred = [m for m in DEFAULT_PREFERENCE if m in text_models]
    rest = sorted((m for m in text_models if m not in preferred),
                  key=lambda m: _default_key(rows[m]) if m in rows else (99, m))
    return preferred + rest


def _default_key(row: TierRow) -> tuple[Any, ...]:
    if row.family not in DEFAULT_FAMILY_ORDER:
        return (len(DEFAULT_FAMILY_ORDER), 0, 0, 0, row.quality_rank, row.model)
    major, minor = version_key(row.generation)
    return (DEFAULT_FAMILY_ORDER.index(row.family), -major, -minor, is_preview(row.model),
            row.quality_rank, row.model)


# ======================================================================================
# Prober: concurrent probes for `rank`
# ======================================================================================
# A probe is the smallest request that measures a model: a few words in, at most 16 tokens
# out. Each model gets one probe per round, through a key that rotates across rounds and
# models, so every model is measured through several keys; a pair that is cooling or paced
# is skipped, and a key-level refusal (quota, invalid key) moves the probe to the next key.
# One `rank` costs at most models x rounds calls that reach a model, plus one call per key
# refused. Outcomes go through the same `Router.record` as routes.

PROBE_PROMPT = "Reply with the single word: ok"


@dataclass
class ProbeResult:
    model: str
    key: ApiKey
    outcome: Outcome
    latency: float
    t: float


@dataclass
class ProbeRun:
    results: list[ProbeResult]   # one per upstream call
    skipped: list[str]           # models no key could probe (all cooling or disabled)
    seconds: float               # probing time, after the SDK import and client set-up


def probe_models(settings: Settings, store: StateStore, models: list[str], rounds: int,
                 concurrency: int, progress: bool) -> ProbeRun:
    """Probe every model `rounds` times, at most `concurrency` at once."""
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor
    keys = settings.require_keys()
    router = Router(settings, store)
    client = router.client
    request = client.build_request(PromptRequest(PROBE_PROMPT,
                                                 options={"max_output_tokens": 16}))
    start = router._next_start()
    # Probes rotate over the keys usable at all, so a disabled key does not pile its share
    # onto the next one.
    view, now = router.view(), time.time()
    usable = tuple(k for k in keys if view.block(k, None, now) is None) or keys
    results: list[ProbeResult] = []
    skipped: set[str] = set()
    done_lock = threading.Lock()
    bar = _progress_bar(len(models) * rounds, progress)

    def probe(model: str, offset: int) -> None:
        found: list[ProbeResult] = []

        def call(key: ApiKey, name: str, timeout: float) -> Outcome:
            began = time.perf_counter()
            outcome = client.generate(key, name, request, timeout=timeout)
            if outcome.kind == "thinking_exhausted":
                outcome.kind = "ok"      # our 16-token probe: the model answered by thinking
            found.append(ProbeResult(name, key, outcome, time.perf_counter() - began,
                                     time.time()))
            return outcome
        plan = RoutePlan([model], "probe")
        session = RouteSession(settings, plan, (start + offset) % len(usable), keys=usable)
        # Each usable key at most once (and a 404's look at the live list); done at the first
        # outcome that measures the model.
        router.run(plan, call, session=session, max_calls=2 * len(usable),
                   enough=lambda outcome: outcome.rule.sample is not None)
        with done_lock:
            results.extend(found)
            if not found:
                skipped.add(model)

    async def run_round(pool: ThreadPoolExecutor, round_no: int) -> None:
        loop = asyncio.get_running_loop()
        tasks = [loop.run_in_executor(pool, probe, m, i + round_no)
                 for i, m in enumerate(models)]
        for task in asyncio.as_completed(tasks):
            await task
            if bar is not None:
                bar.update(1)

    pool = ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(models))))
    began = time.perf_counter()
    try:
        for round_no in range(rounds):
            asyncio.run(run_round(pool, round_no))
            router.flush()
    except KeyboardInterrupt:
        router.close()
        if bar is not None:
            bar.close()
        raise Interrupted(f"interrupted; kept the {len(results)} samples taken") from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    router.close()
    if bar is not None:
        bar.close()
    return ProbeRun(results, sorted(skipped - {r.model for r in results}),
                    time.perf_counter() - began)


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc="probing", unit="probe", file=sys.stderr, leave=False)


# ======================================================================================
# Router: model list, candidate order, key rotation, failover and the route budget
# ======================================================================================
# One routing core for every front end: `Router.run(plan, call)` walks the candidates of a
# plan, reserving one (key, model) pair at a time, calling `call` outside every lock and
# recording its outcome, until an answer, a failure no other candidate would fix, or the
# budget (GEMINI_ROUTER_MAX_ATTEMPTS calls, GEMINI_ROUTER_DEADLINE seconds) runs out.
# The CLI's `call` is the SDK client; the gateway's forwards raw JSON. Answers are recorded
# in a batch (flushed at the end of a CLI route, or every half second in a server); every
# failure that changes what others may call is written at once, so the next reservation in
# any process honours it.

@dataclass
class Attempt:
    model: str
    key: str
    outcome: str
    latency_s: float
    detail: str = ""


@dataclass
class RouteResult:
    model: str
    key: str
    text: str
    finish_reason: str
    latency_s: float
    usage: dict[str, int]
    attempts: list[Attempt]
    cached: bool = False         # answered from the response cache, no upstream call

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def usage_of(outcome: Outcome) -> dict[str, int]:
    return {"prompt_tokens": outcome.prompt_tokens, "output_tokens": outcome.output_tokens,
            "thought_tokens": outcome.thought_tokens, "total_tokens": outcome.total_tokens}


def cached_model_list(router_doc: dict[str, Any], settings: Settings,
                      now: float) -> list[dict[str, Any]] | None:
    listing = router_doc.get("model_list")
    if not listing or listing.get("endpoint") != settings.endpoint:
        return None
    if now - float(listing.get("fetched_at", 0)) > settings.models_ttl:
        return None
    return listing["models"]


def resolve_model(name: str, models: list[dict[str, Any]]) -> str:
    """A user-given model name, validated against the list (with or without 'models/')."""
    wanted = bare_model(name.strip())
    listed = [m for m in models if m["name"] == wanted]
    if any(is_text_model(m["name"], m["methods"]) for m in listed):
        return wanted
    names = set(text_model_names(models))
    if listed:
        raise UsageError(f"{wanted!r} is not a text model (embedding, image, speech and live "
                         "models are not routed)")
    close = sorted(n for n in names if wanted and (wanted in n or n in wanted))[:3]
    hint = f"; did you mean {', '.join(close)}?" if close else \
        f"; '{PROG} models --refresh' lists the {len(names)} available"
    raise UsageError(f"unknown model {wanted!r}{hint}")


@dataclass
class RoutePlan:
    """The ordered candidates of one route and the reasons, for -v and --dry-run."""
    models: list[str]
    why: str
    notices: list[str] = field(default_factory=list)   # a choice of the user's overridden


def plan_route(tx: StateTransaction, models: list[dict[str, Any]], model: str | None,
               tier: str | None) -> RoutePlan:
    """The candidate models, in order: -m (already resolved), else the lock, else the tier
    order. A lock on a model the list no longer has is said plainly."""
    locked = tx.router.get("lock")
    text_models = text_model_names(models)
    if model:
        notices = [f"-m {model} overrides the lock on {locked}"] if locked and \
            locked != model else []
        return RoutePlan([model], "-m given", notices)
    if locked:
        if locked not in text_models:
            raise NothingAvailable(f"locked to {locked}, which the model list no longer has "
                                   f"(gone); '{PROG} unlock' releases the lock, or lock "
                                   "another model")
        notices = [f"locked to {locked}: --tier {tier} ignored ('{PROG} unlock' releases "
                   "it)"] if tier else []
        return RoutePlan([locked], f"locked to {locked} ('{PROG} unlock' to release)", notices)
    if not text_models:
        raise NothingAvailable(f"the model list has no text model ('{PROG} models --all' "
                               "shows what it has)")
    rows = compute_tiers(all_stats(tx.stats), {m["name"]: m for m in models})
    tier = tier or "balance"
    order = tier_order(rows, tier, text_models)
    ranked = sum(1 for m in order if rows.get(m) and rows[m].ranked)
    why = (f"{tier} tier order ({ranked} ranked, {len(order) - ranked} unranked)" if ranked
           else "no model ranked yet ('gemini-router rank' measures them): default order")
    return RoutePlan(order, why)


def unfit_models(models: list[dict[str, Any]], words: int, system: bool, thinking: bool
                 ) -> dict[str, str]:
    """The models the list says cannot take this request, and why: skipped before any call
    (Google would refuse them with a 400 that costs a call each). `words` is a lower bound
    of the input tokens (a word is at least one token)."""
    lists_thinking = any(m.get("thinking") for m in models)   # older lists do not say
    unfit = {}
    for m in models:
        name, limit = m["name"], m.get("input_limit") or 0
        if limit and words > limit:
            unfit[name] = f"the prompt ({words}+ tokens) exceeds its input limit of {limit}"
        elif system and name.startswith("gemma"):
            unfit[name] = "Gemma models take no system instruction"
        elif thinking and lists_thinking and not m.get("thinking"):
            unfit[name] = "the request sets thinking options and this model does not think"
    return unfit


class RouteSession:
    """The candidates of one route: per model, keys in rotation; what this route learned."""

    def __init__(self, settings: Settings, plan: RoutePlan, start: int,
                 unfit: dict[str, str] | None = None, keys: tuple[ApiKey, ...] | None = None):
        self.settings = settings
        self.plan = plan
        self.keys = keys or settings.keys
        self.start = start
        self.tried: set[tuple[str, int]] = set()
        self.transient: dict[str, int] = {}
        self.skipped: dict[str, Block] = {}        # "key#N on M" -> why it was passed over
        self.dropped: dict[str, str] = {}          # model -> why this route no longer tries it
        self.missing: dict[str, int] = {}          # model -> 404s in this route
        self.recitations = 0
        self.dropped.update(unfit or {})           # known not to take it: never called

    def rotated_keys(self) -> list[ApiKey]:
        n = len(self.keys)
        return [self.keys[(self.start + i) % n] for i in range(n)]

    def choose(self, view: StateView, now: float) -> tuple[str, ApiKey, Block | None] | None:
        """The next (model, key) to try: a free pair, models with fewer transient failures
        in this route first; else the best pair cooling only on a guess (transient)."""
        soft: list[tuple[float, int, str, ApiKey, Block]] = []
        second: tuple[str, ApiKey] | None = None
        keys = self.rotated_keys()
        for rank, model in enumerate(self.plan.models):
            if model in self.dropped:
                continue
            for key in keys:
                # Blocked before tried: a pair cooled by this very route still counts toward
                # the earliest recovery. Only untried pairs are "left" to try on a guess.
                tried = (model, key.index) in self.tried
                blocked = view.block(key, model, now)
                if blocked is not None:
                    self.skipped[f"{key.label} on {model}"] = blocked
                    if blocked.soft and not tried:
                        soft.append((blocked.until or 0.0, rank, model, key, blocked))
                    continue
                if tried:
                    continue
                self.skipped.pop(f"{key.label} on {model}", None)
                # "try the next key once, then the next model"
                if self.transient.get(model, 0) >= 2:
                    second = second or (model, key)
                    continue
                return model, key, None
        if second is not None:
            return second[0], second[1], None
        if soft:
            until, _, model, key, blocked = min(soft, key=lambda s: (s[0], s[1]))
            return model, key, blocked
        return None

    def learn(self, model: str, key: ApiKey, outcome: Outcome) -> None:
        self.tried.add((model, key.index))
        route = outcome.rule.route
        if outcome.kind in ("transient", "empty"):
            self.transient[model] = self.transient.get(model, 0) + 1
        elif route == "next_model":
            self.dropped[model] = outcome.detail
        elif route == "retry_once":
            self.recitations += 1

    def ends(self, outcome: Outcome) -> bool:
        """An answer, a failure no other candidate would fix, or a stream that printed."""
        route = outcome.rule.route
        return route in ("answer", "end") or outcome.partial or \
            (route == "retry_once" and self.recitations > 1)

    def earliest(self, now: float) -> tuple[float, str] | None:
        """(when, "key#N on MODEL") of the earliest recovery among the blocked pairs."""
        timed = [(b.until, what) for what, b in self.skipped.items()
                 if b.until is not None and b.until > now]
        return min(timed) if timed else None

    def rate_limited(self) -> bool:
        """Everything that stopped this route was a quota (429 to a gateway client)."""
        return bool(self.skipped) and all(b.kind in QUOTA_KINDS for b in self.skipped.values())


@dataclass
class RouteRun:
    """What `Router.run` came to: the last outcome (None: nothing was called) and why."""
    outcome: Outcome | None
    model: str | None
    key: ApiKey | None
    latency: float
    attempts: list[Attempt]
    session: RouteSession
    stop: str = ""               # why the loop stopped without an answer: budget, deadline


@dataclass
class UpstreamCall:
    """A step of the route loop: call `model` with `key` within `timeout` seconds."""
    key: ApiKey
    model: str
    timeout: float


@dataclass
class ModelCheck:
    """A step of the route loop after a 404: does the live list still have `model`?"""
    key: ApiKey
    model: str
    timeout: float


# Steps of the route loop that say what its next piece of work does, for a driver on an
# event loop: READING, it reads the state (sent back: a snapshot to use, or None to read it
# itself); LOCKING, it takes the state lock (and may wait for another process).
READING = "reading"
LOCKING = "locking"


class Router:
    """The routing core of one process: cached state, batched answers, the route loop.

    Thread-safe: a server routes many requests through one Router at once."""

    FLUSH_EVERY = 0.5            # seconds between batched writes in a long-running process

    def __init__(self, settings: Settings, store: StateStore | None = None,
                 client: GeminiClient | None = None, shared_rotation: bool = True):
        import threading
        self.settings = settings
        # Short-lived processes (the CLI) claim where to start in the key rotation from state,
        # so concurrent processes spread over the keys; a server rotates in memory.
        self.shared_rotation = shared_rotation
        self._rotation_moved = False
        self.store = store or open_store(settings)
        self._client = client
        self._lock = threading.RLock()
        self._pending: list[tuple[ApiKey, str, Outcome, float, float, bool]] = []
        self._view: tuple[tuple[Any, ...], StateView] | None = None
        self._rotation: int | None = None
        self._flusher: Any = None
        self._plans: dict[tuple[Any, ...], Any] = {}
        self._planning = threading.Lock()  # one thread plans anew; the others wait for it
        self._guesses: dict[tuple[str, str], Block] = {}

    @property
    def client(self) -> GeminiClient:
        if self._client is None:
            self._client = GeminiClient(self.settings)
        return self._client

    # --- state ------------------------------------------------------------------------

    def view(self, docs: dict[str, dict[str, Any]] | None = None) -> StateView:
        """The current picture of cooldowns and limits (of `docs`, a snapshot just taken, or
        a fresh one), rebuilt only when a file changed."""
        docs = docs or self.store.snapshot()
        cooldowns, router = docs["cooldowns"], docs["router"]
        stamp = (id(cooldowns), id(router))
        with self._lock:
            if self._view is None or self._view[0] != stamp:
                view = StateView(self.settings, cooldowns, router)
                view.guesses = self._guesses
                self._view = (stamp, view)
                if self._rotation is None:
                    self._rotation = router["next_key"]
            return self._view[1]

    def _next_start(self, docs: dict[str, dict[str, Any]] | None = None) -> int:
        n = max(1, len(self.settings.keys))
        if self.shared_rotation:
            # Unwritable state stops the route here, before any call: it could not record
            # what it learns (exit 3).
            with self.store.transaction() as tx:
                self._flush_into(tx)
                start = tx.router["next_key"] % n
                tx.router["next_key"] = (start + 1) % n
            with self._lock:
                self._rotation, self._rotation_moved = (start + 1) % n, False
            return start
        with self._lock:
            if self._rotation is None:
                self.view(docs)
            start = (self._rotation or 0) % n
            self._rotation = (start + 1) % n
            return start

    def reserve(self, session: RouteSession, docs: dict[str, dict[str, Any]] | None = None
                ) -> Generator[Step, Any, tuple[str, ApiKey, Block | None, bool] | None]:
        """The next pair of `session`, counted toward its limits (the generator's return
        value; it yields LOCKING first when it is about to take the state lock). A pair under
        a ceiling or a learned limit is counted at once under the lock, so two processes never
        both spend the last call of a window; other pairs are counted with the batched
        answers."""
        while True:
            if docs is None:
                docs = yield READING
            now = time.time()
            view = self.view(docs)
            docs = None                    # a second look (after a lost race) reads afresh
            choice = session.choose(view, now)
            if choice is None:
                return None
            model, key, soft = choice
            with self._lock:    # the next route starts after the key this one uses
                moved = key.index % len(self.settings.keys)
                self._rotation_moved |= moved != self._rotation
                self._rotation = moved
            if not view.paced(key, model):
                return model, key, soft, False
            yield LOCKING
            with self.store.transaction() as tx:
                # The clock again, under the lock: a stamp another process counted while this
                # one waited for the lock is later than `now` above, and would not count.
                now = time.time()
                self._flush_into(tx)
                view = StateView(self.settings, tx.cooldowns, tx.router)
                blocked = view.block(key, model, now)
                if blocked is None or (soft is not None and blocked.soft):
                    count_call(tx.router, self.settings, key, model, now,
                               minute_keep(tx.router, self.settings, key, model))
                    return model, key, soft, True
            session.skipped[f"{key.label} on {model}"] = blocked
            session.tried.add((model, key.index))

    def record(self, key: ApiKey, model: str | None, outcome: Outcome, latency: float,
               counted: bool = False, flush: bool = True) -> bool:
        """Record one outcome. Facts from Google (quotas, refusals) are written now, with
        everything pending, for every process to see; answers and transient failures - and
        an answer that proves a guess wrong - wait for the next batch (this process sees
        its guesses at once, through `StateView.guesses`). A failure to write an answer's
        record is a warning: the answer itself is never lost. With flush=False the write
        is left to the caller: the return value says whether one is due now."""
        now = time.time()
        immediate = outcome.rule.scope is not None and not outcome.answered \
            and outcome.rule.length != "transient" or bool(outcome.limits)
        with self._lock:
            self._pending.append((key, model or "", outcome, latency, now, counted))
            if model and outcome.rule.length == "transient" and self._view is not None:
                n = self._view[1].strikes(key, model, now, self.settings) + 1
                self._guesses[key.fingerprint, model] = Block(
                    now + transient_length(self.settings, n),
                    f"{n} transient failure{'s' if n > 1 else ''} in a row on this key: "
                    f"{outcome.detail}", "transient", soft=True)
            elif model and outcome.answered:
                self._guesses.pop((key.fingerprint, model), None)
        if immediate and flush:
            self.flush()
        return immediate

    def _flush_into(self, tx: StateTransaction) -> list[str]:
        with self._lock:
            batch, self._pending = self._pending, []
            self._guesses.clear()          # from now on the state itself holds them
        notices = []
        for key, model, outcome, latency, t, counted in batch:
            spent = outcome.kind not in UNSPENT_KINDS
            if model and not counted and spent:
                count_call(tx.router, self.settings, key, model, t,
                           minute_keep(tx.router, self.settings, key, model))
            elif model and counted and not spent:
                uncount_call(tx.router, key, model, t)
            notice = record_outcome(tx, self.settings, key, model or None, outcome, latency, t)
            if model and outcome.answered:
                clear_recovered(tx, key, model)
            if notice:
                notices.append(notice)
        if self._rotation is not None and (self._rotation_moved or not self.shared_rotation):
            tx.router["next_key"] = self._rotation
            self._rotation_moved = False
        if batch:
            prune_cooldowns(tx.cooldowns, time.time())
        return notices

    def flush(self) -> None:
        """Write everything pending in one transaction; problems are warnings."""
        with self._lock:
            if not self._pending:
                return
        try:
            with self.store.transaction() as tx:
                notices = self._flush_into(tx)
        except RouterError as exc:
            warn(f"could not record the outcome: {exc}")
            return
        for notice in notices:
            warn(notice)

    def start_flusher(self) -> None:
        """In a long-running process: write batched answers every FLUSH_EVERY seconds."""
        import threading
        if self._flusher is not None:
            return
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(self.FLUSH_EVERY):
                self.flush()
        thread = threading.Thread(target=loop, name="gemini-router-flush", daemon=True)
        self._flusher = (thread, stop)
        thread.start()

    def close(self) -> None:
        if self._flusher is not None:
            self._flusher[1].set()
            self._flusher[0].join(timeout=5)
            self._flusher = None
        self.flush()

    # --- the model list ---------------------------------------------------------------

    def models(self, refresh: bool = False, out: Output | None = None,
               deadline_at: float | None = None) -> list[dict[str, Any]]:
        """The cached model list, or a fresh one when there is none (or on refresh).
        Processes starting together list once: the others wait and read the cache."""
        if not refresh:
            cached = self._cached_models()
            if cached is not None:
                return cached
        wait = None if deadline_at is None else deadline_at - time.monotonic()
        with self.store.listing_hold(wait):
            if not refresh:
                cached = self._cached_models()
                if cached is not None:
                    return cached
            return self._fetch_models(out, deadline_at)

    def models_now(self, out: Output | None = None, deadline_at: float | None = None
                   ) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]] | None]:
        """(the model list, the state snapshot it came from): one look at the state serves
        a request's model list, its plan and its first reservation. The snapshot is None
        when the list had to be fetched (the state changed meanwhile)."""
        cached = self.cached_models_now()
        if cached is None:
            return self.models(out=out, deadline_at=deadline_at), None
        return cached

    def cached_models_now(self, current: bool = False
                          ) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]] | None:
        """(the cached model list, the snapshot it came from), or None when the list must
        be fetched: `models_now` without a network call. With `current`, also None when
        reading the state would take a system call or a wait (`current_snapshot`)."""
        docs = self.store.current_snapshot() if current else self.store.snapshot()
        models = None if docs is None else \
            cached_model_list(docs["router"], self.settings, time.time())
        return None if models is None else (models, docs)

    def _cached_models(self) -> list[dict[str, Any]] | None:
        cached = self.cached_models_now()
        return None if cached is None else cached[0]

    def _fetch_models(self, out: Output | None,
                      deadline_at: float | None = None) -> list[dict[str, Any]]:
        """List models through the first usable key (in rotation), cache them, return them."""
        keys = self.settings.require_keys()
        view, now = self.view(), time.time()
        start = self._rotation or 0
        usable = [k for k in (keys[(start + i) % len(keys)] for i in range(len(keys)))
                  if view.block(k, None, now) is None]
        failures: list[tuple[ApiKey, Outcome]] = []
        listed: list[dict[str, Any]] | None = None
        for key in usable[:self.settings.max_attempts]:
            if failures and self.view().block(key, None, time.time()) is not None:
                continue           # refused with its project by an earlier failure here
            began = time.perf_counter()
            left = self.settings.timeout if deadline_at is None else \
                min(self.settings.timeout, deadline_at - time.monotonic())
            if left < 0.05:
                break
            result = self.client.list_models(key, timeout=left)
            if not isinstance(result, Outcome):
                listed = result
                if out:
                    out.info(f"listed {len(listed)} models with {key.label} "
                             f"in {time.perf_counter() - began:.2f} s")
                break
            failures.append((key, result))
            self.record(key, None, result, 0.0)
            if out:
                out.info(f"listing models with {key.label}: {result.detail}")
            if result.rule.route == "end":
                break
        if listed is not None:
            with self.store.transaction() as tx:
                self._flush_into(tx)
                tx.router["model_list"] = {"endpoint": self.settings.endpoint,
                                           "fetched_at": time.time(), "models": listed}
            return listed
        self.flush()
        if failures and failures[-1][1].rule.route == "end":
            last = failures[-1][1]
            if last.kind == "unreachable":
                raise NothingAvailable(f"cannot reach {self.settings.endpoint}: {last.detail}")
            raise _error_for(last, "")
        if not failures:
            raise NothingAvailable(f"no usable key: every key is disabled or cooling; see "
                                   f"'{PROG} cooldowns'")
        summary = "; ".join(f"{k.label}: {o.detail}" for k, o in failures)
        raise NothingAvailable(f"could not list models: {summary}")

    def check_model(self, key: ApiKey, model: str, out: Output | None = None,
                    timeout: float | None = None) -> bool:
        """After a 404: ask the live list whether `model` still exists (one call). Gone: it
        leaves the cached list (the rest is kept). Listed: the 404 was this key's alone."""
        entry = self.client.get_model(key, model, timeout)
        if isinstance(entry, Outcome) and entry.kind != "model_missing":
            return False            # the list could not say: the pair's short cooldown stands
        gone = isinstance(entry, Outcome)
        with self.store.transaction() as tx:
            self._flush_into(tx)
            listing = tx.router.get("model_list")
            if gone and listing:
                listing["models"] = [m for m in listing["models"] if m["name"] != model]
            if not gone:
                add_cooldown(tx.cooldowns, model, key.fingerprint, time.time() +
                             LONG_COOLDOWN_SECS, "not found for this key, though the list has "
                             "it", "model_missing", time.time())
        if out:
            out.info(f"  the live list {'no longer has' if gone else 'still has'} {model}")
        return gone

    # --- the route loop ---------------------------------------------------------------

    def plan(self, models: list[dict[str, Any]], model: str | None = None,
             tier: str | None = None, docs: dict[str, dict[str, Any]] | None = None
             ) -> RoutePlan:
        """The route plan; reused while the stats and router state are unchanged (tiers over
        every model would otherwise be recomputed for every request of a server)."""
        tx = StateTransaction(None, docs or self.store.snapshot(), write=False)
        stamp = (id(tx.stats), id(tx.router), id(models), model, tier)
        cached = self._plans.get(stamp)
        if cached is not None:
            return cached[0]
        # After each batched write every request in flight meets a new stamp; planning once
        # for all of them keeps 32 threads from computing the same tiers 32 times.
        with self._planning:
            cached = self._plans.get(stamp)
            if cached is not None:
                return cached[0]
            plan = plan_route(tx, models, model, tier)
            with self._lock:
                if len(self._plans) > 64:
                    self._plans.clear()
                self._plans[stamp] = (plan, tx.stats, tx.router)   # keeps the ids alive
            return plan

    def run(self, plan: RoutePlan, call: Callable[[ApiKey, str, float], Outcome], *,
            out: Output | None = None, **options: Any) -> RouteRun:
        """Walk `plan` (see `steps`), making each upstream call with `call` in this thread."""
        steps = self.steps(plan, out=out, **options)
        reply: Any = None
        try:
            step = next(steps)
            while True:
                try:
                    if isinstance(step, UpstreamCall):
                        reply = call(step.key, step.model, step.timeout)
                    elif isinstance(step, ModelCheck):
                        reply = self.check_model(step.key, step.model, out, step.timeout)
                    else:
                        reply = None             # READING, LOCKING: this thread may wait
                except BaseException as exc:     # the loop's own `finally` sees it
                    step = steps.throw(exc)
                    continue
                step = steps.send(reply)
        except StopIteration as done:
            return done.value

    def steps(self, plan: RoutePlan, *, out: Output | None = None,
              unfit: dict[str, str] | None = None, deadline_at: float | None = None,
              docs: dict[str, dict[str, Any]] | None = None,
              session: RouteSession | None = None, max_calls: int | None = None,
              enough: Callable[[Outcome], bool] | None = None
              ) -> Generator[Step, Any, RouteRun]:
        """The route loop, as a generator its driver feeds: it yields an UpstreamCall and is
        sent back the call's Outcome (or thrown its exception); a ModelCheck, sent back
        whether the model is gone; READING before it reads the state (sent back a current
        snapshot, or None to read it itself) and LOCKING before it takes the state lock (a
        driver on an event loop moves to a worker thread for those); the rest of its work
        is in memory. It walks `plan` within the
        budget: at most max_attempts calls (or `max_calls`; a 404's check of the live list
        counts as one), never past the deadline (each call's timeout shrinks to what is
        left), until an answer, an end, or an outcome that is `enough` (a probe stops at
        its first measurement). Its return value is the RouteRun."""
        s = self.settings
        began = time.monotonic() if deadline_at is None else deadline_at - s.deadline
        budget = s.max_attempts if max_calls is None else max_calls
        if docs is None:
            docs = yield READING          # a driver may hand over a current snapshot
        session = session or RouteSession(s, plan, self._next_start(docs), unfit)
        for name, why in session.dropped.items():
            if out:
                out.info(f"skipping {name}: {why}")
        attempts: list[Attempt] = []
        last: tuple[str, ApiKey, Outcome, float] | None = None
        calls, stop = 0, ""
        while True:
            if calls >= budget:
                stop = f"budget of {budget} calls spent (GEMINI_ROUTER_MAX_ATTEMPTS)"
                break
            left = s.deadline - (time.monotonic() - began)
            if left < 0.05:
                stop = f"deadline of {s.deadline:g} s reached (GEMINI_ROUTER_DEADLINE)"
                break
            choice = yield from self.reserve(session, docs)
            docs = None                     # the next attempt reads the state afresh
            if choice is None:
                break
            model, key, soft, counted = choice
            timeout = min(s.timeout, left)
            if out:
                out.info(f"trying {model} with {key.label}" + (
                    f" (cooling on a guess: {soft.reason})" if soft else ""))
                out.attempt_started(model, key.label, timeout)
            t0 = time.perf_counter()
            try:
                outcome = yield UpstreamCall(key, model, timeout)
            finally:
                if out:
                    out.attempt_finished()
            latency = time.perf_counter() - t0
            calls += 1
            attempts.append(Attempt(model, key.label, outcome.kind, round(latency, 4),
                                    outcome.detail))
            if out:
                out.info(f"  {model} {key.label}: {outcome.detail} ({latency:.2f} s)"
                         if outcome.detail else
                         f"  {model} {key.label}: {outcome.rule.words} in {latency:.2f} s")
            if not outcome.deferred and self.record(key, model, outcome, latency, counted,
                                                    flush=False):
                yield LOCKING
                self.flush()
            session.learn(model, key, outcome)
            last = (model, key, outcome, latency)
            left = s.deadline - (time.monotonic() - began)
            if outcome.kind == "model_missing" and calls < budget and left >= 0.05:
                calls += 1
                session.missing[model] = session.missing.get(model, 0) + 1
                gone = yield ModelCheck(key, model, min(s.timeout, left))
                if not gone and session.missing[model] < 2:
                    session.dropped.pop(model, None)   # listed: maybe only this key lacks it
            if session.ends(outcome) or (enough is not None and enough(outcome)):
                break
        if out:
            tried = {f"{k.label} on {m}" for m in plan.models for k in self.settings.keys
                     if (m, k.index) in session.tried}
            for what, b in session.skipped.items():
                if what in tried:
                    continue
                left = "until a person acts" if b.until is None else \
                    f"{_duration(b.until - time.time())} left"
                out.info(f"skipped {what}: {b.reason} ({left})")
        if last is None:
            return RouteRun(None, None, None, 0.0, attempts, session, stop)
        return RouteRun(last[2], last[0], last[1], last[3], attempts, session, stop)

    def route(self, prompt: PromptRequest, *, model: str | None = None,
              tier: str | None = None, on_text: Callable[[str], None] | None = None,
              out: Output | None = None) -> RouteResult:
        """Send one prompt through the best available (model, key), failing over by outcome.
        With settings.cache_ttl, an exact repeat is answered from the cache without a call."""
        self.settings.require_keys()
        key = self.route_cache_key(prompt, model, tier) if self.settings.cache_ttl else None
        if key is not None:
            cached = self.cache_lookup(key, on_text, out)
            if cached is not None:
                return cached
        request = self.client.build_request(prompt)
        deadline_at = time.monotonic() + self.settings.deadline
        models, docs = self.models_now(out, deadline_at)
        model = resolve_model(model, models) if model else None
        plan = self.plan(models, model, tier, docs)
        for notice in plan.notices:
            (out.note if out else warn)(notice)
        if out:
            out.info(f"route: {plan.why}: {', '.join(plan.models[:8])}"
                     + (" …" if len(plan.models) > 8 else ""))

        def call(key: ApiKey, name: str, timeout: float) -> Outcome:
            return self.client.generate(key, name, request, on_text, timeout)
        unfit = unfit_models(models, request.input_words, bool(prompt.system),
                             "thinkingConfig" in request.wire_options)
        run = self.run(plan, call, out=out, unfit=unfit, deadline_at=deadline_at, docs=docs)
        result = result_of(run, self.settings, out)
        if key is not None:
            self.cache_store(key, result)
        return result

    # --- the response cache -----------------------------------------------------------

    def route_cache_key(self, prompt: PromptRequest, model: str | None = None,
                        tier: str | None = None) -> str:
        """The cache key of a route: the model choice as its plan resolves it (-m, else the
        lock, else the tier), the endpoint, and everything the request carries."""
        if model:
            choice = f"model:{bare_model(model.strip())}"
        else:
            with self.store.transaction(write=False) as tx:
                locked = tx.router.get("lock")
            choice = f"model:{locked}" if locked else f"tier:{tier or 'balance'}"
        return cache_key({"v": 1, "endpoint": self.settings.endpoint, "choice": choice,
                          "prompt": prompt.text, "system": prompt.system,
                          "options": prompt.options, "wire_options": prompt.wire_options,
                          "schema": prompt.schema,
                          "attachments": [[mime, data] for mime, data in prompt.attachments]})

    def cache_lookup(self, key: str, on_text: Callable[[str], None] | None = None,
                     out: Output | None = None) -> RouteResult | None:
        """The cached answer of a repeated route (no upstream call), or None. A stream
        gets the cached text in one piece."""
        began = time.perf_counter()
        value = self.store.cache.get(key)
        if value is None:
            return None
        try:
            result = RouteResult(model=str(value["model"]),
                                 key=self.settings.label_of(value["key"]) or "-",
                                 text=str(value["text"]),
                                 finish_reason=str(value["finish_reason"]),
                                 latency_s=round(time.perf_counter() - began, 4),
                                 usage=dict(value["usage"]), attempts=[], cached=True)
        except (KeyError, TypeError, ValueError):
            return None
        if out:
            out.info(f"answered from the cache: an answer of {result.model} to the same request")
        if on_text is not None and result.text:
            on_text(result.text)
        return result

    def cache_store(self, key: str, result: RouteResult, ttl: float | None = None) -> bool:
        """Keep an answer for repeats of its route, `ttl` (default settings.cache_ttl) s."""
        fingerprint = next((k.fingerprint for k in self.settings.keys
                            if k.label == result.key), None)
        value = {"model": result.model, "key": fingerprint, "text": result.text,
                 "finish_reason": result.finish_reason, "usage": result.usage}
        return self.store.cache.put(key, value, self.settings.cache_ttl if ttl is None else ttl)


def result_of(run: RouteRun, settings: Settings, out: Output | None = None) -> RouteResult:
    """The answer of a run, or the error that says why there is none."""
    outcome = run.outcome
    if outcome is not None and outcome.kind == "ok":
        if out and outcome.thought_tokens and outcome.thought_tokens >= \
                0.5 * max(1, outcome.thought_tokens + outcome.output_tokens):
            out.info(f"thinking used {outcome.thought_tokens} of "
                     f"{outcome.thought_tokens + outcome.output_tokens} output tokens")
        return RouteResult(model=run.model, key=run.key.label, text=outcome.text,
                           finish_reason=outcome.finish_reason,
                           latency_s=round(run.latency, 4), usage=usage_of(outcome),
                           attempts=run.attempts)
    if outcome is not None and outcome.partial:
        raise UpstreamError(f"{run.model} {run.key.label}: {outcome.detail}")
    if outcome is not None and (outcome.rule.route == "end" or run.session.ends(outcome)):
        if outcome.kind == "unreachable":
            raise NothingAvailable(f"cannot reach {settings.endpoint}: {outcome.detail}")
        raise _error_for(outcome, f"{run.model} {run.key.label}: ")
    if outcome is None and run.session.dropped and not run.session.skipped:
        # Every candidate was known not to take this request: no call was spent on it.
        name, why = next(iter(run.session.dropped.items()))
        raise UpstreamError(f"{name} cannot take this request: {why}")
    if outcome is not None and outcome.kind in ("thinking_exhausted", "empty", "model_cannot",
                                                "recitation") \
            and not run.session.earliest(time.time()):
        raise UpstreamError(f"{run.model} {run.key.label}: {outcome.detail}")
    raise nothing_available(run)


def _error_for(outcome: Outcome, prefix: str) -> RouterError:
    code = outcome.rule.exit_code
    cls = {1: UpstreamError, 3: ConfigError}.get(code, NothingAvailable)
    return cls(f"{prefix}{outcome.detail}")


def nothing_available(run: RouteRun) -> NothingAvailable:
    session, now = run.session, time.time()
    earliest = session.earliest(now)
    parts = ["nothing available"]
    if run.stop:
        parts.append(run.stop)
    if run.attempts:
        last = run.attempts[-1]
        parts.append(f"{len(run.attempts)} attempt(s), last: {last.model} {last.key}: "
                     f"{last.detail or last.outcome}")
    limited = session.rate_limited() and not any(
        OUTCOME_RULES[a.outcome].sample is False for a in run.attempts)
    if earliest is not None:
        until, what = earliest
        why = session.skipped[what].reason
        parts.append(f"earliest: {what} in {_duration(until - now)}"
                     + (f" ({why})" if session.skipped[what].kind in ("limit", "ceiling")
                        else ""))
        return NothingAvailable("; ".join(parts), until, limited)
    if session.dropped and not session.skipped:
        name, why = next(iter(session.dropped.items()))
        parts.append(f"{name}: {why}")
    elif session.skipped:
        parts.append(f"every key is disabled or out of quota; see '{PROG} cooldowns'")
    return NothingAvailable("; ".join(parts), None, limited)


def route_prompt(settings: Settings, store: StateStore, prompt: PromptRequest, *,
                 model: str | None = None, tier: str | None = None,
                 on_text: Callable[[str], None] | None = None,
                 out: Output | None = None) -> RouteResult:
    """Library entry point: route one prompt and record it before returning."""
    router = Router(settings, store)
    try:
        return router.route(prompt, model=model, tier=tier, on_text=on_text, out=out)
    finally:
        router.close()


def known_models(settings: Settings, store: StateStore, refresh: bool = False,
                 out: Output | None = None) -> list[dict[str, Any]]:
    """The cached model list, or a fresh one (see Router.models)."""
    router = Router(settings, store)
    try:
        return router.models(refresh, out)
    finally:
        router.close()


# ======================================================================================
# Gateway: `gemini-router serve`, the same routing core behind an HTTP front end
# ======================================================================================
# One routing core, two front ends: every endpoint plans with `Router.plan` and fails over
# with the route loop `Router.steps` - the generator `Router.run` drives for the CLI; only
# the calls differ: the gateway forwards the client's JSON body unchanged instead of building
# a request with the SDK. Why this stack:
#   * uvicorn + FastAPI (ASGI, interactive docs at /docs), installed by the optional extra
#     `serve` and imported by `serve` alone, so every other command starts as fast as before;
#   * upstream calls are made on the event loop with aiohttp (`Upstream`), connections kept
#     open and reused. A worker thread per call cost ≈0.25 ms of CPU in hand-overs and
#     urllib3's per-call work ≈0.2 ms more: a third of a forwarded request;
#   * the route loop's own work between calls (reservation, recording: memory) runs on the
#     event loop too; a step that takes the state lock, reads state on Redis, fetches the
#     model list or checks a 404 against it runs in a worker thread (GATEWAY_THREADS), so
#     the event loop never waits on another process or the network for state.
# Streams fail over only before their first byte leaves: the upstream stream is read until
# it carries content (or ends); until then any failure is just another outcome for the run
# loop. From then on the call is "deferred" and its final outcome is recorded when it ends.

DEFAULT_PORT = 8787
SERVE_HINT = "pip install '.[serve]' in a checkout of gemini-router"
# OpenAI-style model names that route by tier instead of naming a model.
AUTO_MODELS = {"auto": "balance", "auto-balance": "balance", "auto-fast": "fast",
               "auto-quality": "quality"}
GEMINI_METHODS = ("generateContent", "streamGenerateContent", "countTokens", "embedContent",
                  "batchEmbedContents")
EMBED_METHODS = ("embedContent", "batchEmbedContents")
GEMINI_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                 404: "NOT_FOUND", 405: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED",
                 500: "INTERNAL", 502: "UNAVAILABLE", 503: "UNAVAILABLE",
                 504: "DEADLINE_EXCEEDED"}
OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                      403: "permission_error", 404: "invalid_request_error",
                      405: "invalid_request_error", 429: "rate_limit_error"}
CLIENT_NAME_FORM = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
GATEWAY_ROUTING = 64          # requests routed at once; more wait their turn
LARGE_BODY = 1 << 20          # bytes: a body or answer this large is parsed in a worker thread
GATEWAY_THREADS = 64          # worker threads: state on Redis, list calls, the cache, /status
STATUS_REFRESH_S = 5          # the status page reloads itself this often
LOG_EVERY = 0.25              # seconds between writes of the gateway's log


def parse_client_keys(raw: str, google_keys: tuple[ApiKey, ...] = ()
                      ) -> tuple[tuple[str, str], ...]:
    """GEMINI_ROUTER_CLIENT_KEYS "secret1:name1,secret2:name2" -> ((secret, name), ...).

    Messages name an entry by its position and never echo a secret."""
    import re
    form = ("GEMINI_ROUTER_CLIENT_KEYS must be secret:name pairs separated by commas "
            "(e.g. 'a-long-random-secret:alice,another-secret:bob')")
    pairs: list[tuple[str, str]] = []
    for n, item in enumerate((p.strip() for p in raw.split(",") if p.strip()), 1):
        secret, sep, name = (part.strip() for part in item.rpartition(":"))
        if not sep or not secret or not name:
            raise ConfigError(f"{form}; entry {n} is not secret:name")
        if not re.fullmatch(CLIENT_NAME_FORM, name):
            raise ConfigError(f"{form}; the name of entry {n} must be 1-64 letters, digits, "
                              "'.', '_' or '-'")
        if not all(33 <= ord(ch) < 127 for ch in secret) or len(secret) < MIN_KEY_LENGTH:
            raise ConfigError(f"{form}; the secret of entry {n} ({name}) must be at least "
                              f"{MIN_KEY_LENGTH} visible ASCII characters")
        if any(secret == k.secret for k in google_keys):
            raise ConfigError(f"GEMINI_ROUTER_CLIENT_KEYS entry {n} ({name}) is one of the "
                              "Google API keys: clients get secrets of their own")
        if any(secret == s for s, _ in pairs) or any(name == m for _, m in pairs):
            raise ConfigError(f"GEMINI_ROUTER_CLIENT_KEYS entry {n} ({name}) repeats a "
                              "secret or a name of an earlier entry")
        pairs.append((secret, name))
    return tuple(pairs)


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback address (127.0.0.0/8, ::1)."""
    import ipaddress
    import socket
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        found = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(found) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in found)


class GatewayError(Exception):
    """An answer the gateway gives instead of the upstream's, rendered in the called API's
    error shape (`error_document`)."""

    def __init__(self, status: int, message: str, code: str = "",
                 retry_after: int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after = retry_after
        self.headers = dict(headers or {})


def error_document(api: str, status: int, message: str, code: str = "") -> dict[str, Any]:
    """An error as the called API shapes it: Gemini {"error": {"code", "message", "status"}},
    OpenAI {"error": {"message", "type", "code"}}."""
    if api == "openai":
        kind = OPENAI_ERROR_TYPES.get(status, "server_error" if status >= 500
                                      else "invalid_request_error")
        return {"error": {"message": message, "type": kind, "param": None,
                          "code": code or GEMINI_STATUS.get(status, str(status)).lower()}}
    return {"error": {"code": status, "message": message,
                      "status": GEMINI_STATUS.get(status, "UNKNOWN")}}


def retry_after_seconds(until: float | None, now: float | None = None) -> int | None:
    """Retry-After for an earliest recovery at `until` (whole seconds, at least 1)."""
    if until is None:
        return None
    return max(1, math.ceil(until - (time.time() if now is None else now)))


def routing_error(exc: RouterError, headers: dict[str, str] | None = None) -> GatewayError:
    """A route that ended without an answer, as an HTTP answer: nothing available is 429
    when every blocker was a quota, else 503, with Retry-After when the recovery is known."""
    message = str(exc)
    if isinstance(exc, NothingAvailable):
        return GatewayError(429 if exc.rate_limited else 503, message, "nothing_available",
                            retry_after_seconds(exc.until), headers)
    if isinstance(exc, UsageError):
        return GatewayError(400, message, "invalid_request", headers=headers)
    if isinstance(exc, ConfigError):
        status = 502 if "is not a Gemini API" in message else 500
        return GatewayError(status, message, "gateway_configuration", headers=headers)
    if isinstance(exc, UpstreamError):
        return GatewayError(400, message, "upstream_refused", headers=headers)
    return GatewayError(503, message, "interrupted", headers=headers)


def _dumps(value: Any) -> bytes:
    """Compact JSON bytes; a client's lone surrogate travels escaped (valid JSON, and the
    upstream judges it) rather than breaking the encoding."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8", "backslashreplace")


def request_shape(body: dict[str, Any]) -> tuple[int, bool, bool]:
    """(words of text, whether a system instruction, whether thinking options) of a
    generateContent body: what `unfit_models` needs to skip models before calling them."""
    def words(node: Any) -> int:
        if isinstance(node, dict):
            return sum(len(v.split()) if k == "text" and isinstance(v, str) else words(v)
                       for k, v in node.items())
        return sum(words(v) for v in node) if isinstance(node, list) else 0
    config = body.get("generationConfig")
    thinking = isinstance(config, dict) and isinstance(config.get("thinkingConfig"), dict)
    return (words(body.get("contents")) + words(body.get("systemInstruction")),
            bool(body.get("systemInstruction")), thinking)


def _flowing(element: Any) -> bool:
    """Whether a stream element carries content (text, thoughts or another part): once one
    is sent to the client the call can no longer be retried elsewhere."""
    if not isinstance(element, dict):
        return False
    for candidate in element.get("candidates") or []:
        if isinstance(candidate, dict):
            text, thoughts, other = _answer_parts(candidate)
            if text or thoughts or other:
                return True
    return False


def _stream_error(element: Any) -> dict[str, Any] | None:
    return element["error"] if isinstance(element, dict) and \
        isinstance(element.get("error"), dict) else None


@dataclass
class Forwarded:
    """An upstream answer passed on as it came: status, body bytes, and routing headers."""
    status: int
    body: bytes
    headers: dict[str, str]


@dataclass
class StreamFlow:
    """One upstream stream of a run: what was read before committing to it, and the rest."""
    key: ApiKey
    model: str
    response: Any
    outcome: Outcome
    began: float
    chunks: Any = None                  # the rest of the body, as it arrives
    reader: JsonArrayReader = field(default_factory=JsonArrayReader)
    buffered: list[Any] = field(default_factory=list)
    done: bool = False                  # the whole stream arrived before any content
    error: dict[str, Any] | None = None  # an {"error"} element that came before any content
    timeout: float | None = None        # the call's read timeout, for what a failure says


class GeminiArrayFramer:
    """A stream as Gemini sends it by default: one JSON array, an element at a time."""
    media_type = "application/json"

    def __init__(self) -> None:
        self.first = True

    def start(self) -> bytes:
        return b"["

    def element(self, element: dict[str, Any]) -> bytes:
        lead, self.first = (b"" if self.first else b"\n,\r\n"), False
        return lead + _dumps(element)

    def error(self, error: dict[str, Any]) -> bytes:
        return self.element({"error": error})

    def end(self, failed: bool) -> bytes:
        return b"]" if self.first else b"\n]"


class GeminiSseFramer:
    """A stream as Gemini sends it with ?alt=sse: one `data:` event per element (an error
    too, as the real API and the google-genai SDK read it)."""
    media_type = "text/event-stream"

    def start(self) -> bytes:
        return b""

    def element(self, element: dict[str, Any]) -> bytes:
        return b"data: " + _dumps(element) + b"\r\n\r\n"

    def error(self, error: dict[str, Any]) -> bytes:
        return self.element({"error": error})

    def end(self, failed: bool) -> bytes:
        return b""


class OpenAIFramer:
    """A stream as OpenAI sends it: chat.completion.chunk events, then `data: [DONE]`."""
    media_type = "text/event-stream"

    def __init__(self, chunker: OpenAIChunker):
        self.chunker = chunker

    def start(self) -> bytes:
        return b""

    def element(self, element: dict[str, Any]) -> bytes:
        return b"".join(b"data: " + _dumps(c) + b"\n\n" for c in self.chunker.chunks(element))

    def error(self, error: dict[str, Any]) -> bytes:
        doc = error_document("openai", int(error.get("code") or 500),
                             str(error.get("message", "")), str(error.get("status", "")).lower())
        return b"data: " + _dumps(doc) + b"\n\n"

    def end(self, failed: bool) -> bytes:
        tail = [] if failed else self.chunker.final()
        return b"".join(b"data: " + _dumps(c) + b"\n\n" for c in tail) + b"data: [DONE]\n\n"


class _Relayed:
    """An `Output` for a route run on behalf of `route` in another process: its -v lines
    and notes are sent back there, to be printed by that process's own Output."""

    def __init__(self, verbose: bool, sink: Callable[[str, str], None]):
        self.verbose = verbose
        self.sink = sink

    def info(self, message: str) -> None:
        if self.verbose:
            self.sink("info", message)

    def note(self, message: str) -> None:
        self.sink("note", message)

    def live(self) -> bool:
        return False

    def attempt_started(self, model: str, key_label: str, timeout_s: float) -> None:
        pass

    def attempt_finished(self) -> None:
        pass


class GatewayMetrics:
    """Prometheus metrics in a registry of the gateway's own (prometheus-client)."""

    def __init__(self, gateway: Gateway):
        from prometheus_client import (CollectorRegistry, Counter, Histogram,
                                       disable_created_metrics)
        disable_created_metrics()      # no *_created series: they only double the output
        self.registry = CollectorRegistry()
        self.requests = Counter("gemini_router_requests", "HTTP requests answered",
                                ["api", "endpoint", "client", "status"], registry=self.registry)
        self.attempts = Counter("gemini_router_attempts", "Upstream calls by outcome",
                                ["model", "key", "client", "outcome"], registry=self.registry)
        self.latency = Histogram("gemini_router_upstream_latency_seconds",
                                 "Upstream call latency", ["model"], registry=self.registry,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.gateway = gateway
        self.registry.register(self)

    def describe(self) -> list[Any]:
        return []            # collected on every scrape, from the state: nothing to pre-declare

    def collect(self) -> Iterator[Any]:
        """gemini_router_cooldowns_active{kind}: what keeps pairs from being called now."""
        from prometheus_client.core import GaugeMetricFamily
        gauge = GaugeMetricFamily("gemini_router_cooldowns_active",
                                  "Active cooldowns and disabled keys, by kind", labels=["kind"])
        router = self.gateway.router
        with router.store.transaction(write=False) as tx:
            entries = cooldown_entries(router.settings, tx.cooldowns, tx.router, time.time())
        kinds: dict[str, int] = {}
        for entry in entries:
            kinds[entry.get("kind") or "other"] = kinds.get(entry.get("kind") or "other", 0) + 1
        for kind in sorted(set(kinds) | {"rate_limited", "transient", "disabled"}):
            gauge.add_metric([kind], kinds.get(kind, 0))
        yield gauge
        from prometheus_client.core import CounterMetricFamily
        cache = CounterMetricFamily("gemini_router_cache", "Response cache lookups and stores "
                                    "(GEMINI_ROUTER_CACHE_TTL)", labels=["event"])
        for event, n in sorted(router.store.cache.counters().items()):
            cache.add_metric([event], n)
        yield cache

    def attempts_of(self, attempts: list[Attempt], client: str) -> None:
        for a in attempts:
            self.attempts.labels(a.model, a.key, client, a.outcome).inc()
            self.latency.labels(a.model).observe(a.latency_s)

    def text(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)


@dataclass
class Planned:
    """A request's plan, the model list it was made from and the state snapshot it read."""
    plan: RoutePlan
    models: list[dict[str, Any]]
    docs: dict[str, dict[str, Any]] | None


def _advance(step: Callable[[Any], Any], value: Any) -> tuple[bool, Any]:
    """(False, the route loop's next step) or (True, its RouteRun): one step of a generator,
    its end as a value (StopIteration cannot cross a thread's future)."""
    try:
        return False, step(value)
    except StopIteration as done:
        return True, done.value


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in one of the gateway's worker threads (GATEWAY_THREADS)."""
    import anyio.to_thread
    return await anyio.to_thread.run_sync(functools.partial(fn, *args))


async def on_loop_if_small(size: int, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), which works on `size` bytes: on the event loop, or in a worker thread
    from LARGE_BODY bytes up (parsing megabytes would hold up every request in flight)."""
    return fn(*args) if size < LARGE_BODY else await in_thread(fn, *args)


async def _aiter(items: list[bytes]) -> AsyncIterator[bytes]:
    for item in items:
        yield item


def asyncio_semaphore(n: int) -> Any:
    import asyncio
    return asyncio.Semaphore(n)


class UpstreamResponse:
    """An upstream answer on the event loop, read the way the classification reads one
    (`status_code`, `headers`, `content`, `json()`), or its body as it arrives (`chunks`)."""

    def __init__(self, response: Any):
        self._response = response
        self.status_code: int = response.status
        self.headers = response.headers
        self.content = b""

    def json(self) -> Any:
        return json.loads(self.content)

    async def read(self) -> None:
        """The whole body, into `content`; on a failure the connection is closed."""
        try:
            self.content = await self._response.read()
        except BaseException:
            self._response.close()
            raise

    def chunks(self) -> AsyncIterator[bytes]:
        return self._response.content.iter_any()

    def close(self) -> None:
        """Hand the connection back to the pool when the body was read to its end; else
        close it (a body left mid-way cannot carry the next request)."""
        self._response.release()


# Accept-Encoding as urllib3 sends it: a stream's first token is not held back by
# compression, and nothing is decompressed on the event loop.
UPSTREAM_HEADERS = {"content-type": "application/json", "accept-encoding": "identity"}


class Upstream:
    """The gateway's upstream transport: one aiohttp session on the event loop, connections
    kept open and reused, no thread per call. Proxy and CA settings come from the
    environment, read as the CLI reads them (HTTPS_PROXY, NO_PROXY, REQUESTS_CA_BUNDLE),
    once. Every failure becomes an Outcome, classified like the CLI's."""

    def __init__(self, settings: Settings, router: Router):
        self.settings = settings
        self.router = router
        self.session: Any = None
        proxies, self.bundle = environment_transport(settings.endpoint)
        self.proxy = proxies.get(settings.endpoint.split(":", 1)[0])
        self.proxy_headers: dict[str, str] | None = None

    async def open(self) -> None:
        import aiohttp
        import yarl
        if self.proxy:
            # The proxy's credentials travel in their header, never in a URL that an error
            # message could quote.
            url = yarl.URL(self.proxy)
            if url.user is not None:
                self.proxy_headers = {"Proxy-Authorization": aiohttp.BasicAuth(
                    url.user, url.password or "").encode()}
            self.proxy = str(url.with_user(None))
        ssl: Any = True
        if self.settings.endpoint.startswith("https://"):
            import ssl as ssl_module
            import certifi
            ssl = ssl_module.create_default_context(cafile=self.bundle or certifi.where())
        # No connection limit here: GATEWAY_ROUTING bounds the calls being routed, and a
        # stream keeps its connection until its client has it all.
        connector = aiohttp.TCPConnector(limit=0, ssl=ssl, keepalive_timeout=30)
        self.session = aiohttp.ClientSession(connector=connector, trust_env=False)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def post(self, key: ApiKey, path: str, body: bytes, params: dict[str, str],
                   timeout: float, stream: bool = False) -> UpstreamResponse | Outcome:
        """POST `body` to path (after /v1beta/) with `key`, never retried: the answer (read
        whole unless `stream`), or the failure as an Outcome."""
        import aiohttp
        import yarl
        url = yarl.URL(api_url(self.settings.endpoint, path, params), encoded=True)
        try:
            response = UpstreamResponse(await self.session.post(
                url, data=body, proxy=self.proxy, proxy_headers=self.proxy_headers,
                allow_redirects=False, headers=UPSTREAM_HEADERS | {"x-goog-api-key": key.secret},
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout,
                                              sock_read=timeout)))
        except Exception as exc:     # noqa: BLE001 - every failure is an outcome
            return self.router.client.outcome_from_error(exc, timeout)
        if stream:
            return response
        failure = await self.read(response, timeout)
        return response if failure is None else failure

    async def read(self, response: UpstreamResponse, timeout: float) -> Outcome | None:
        """Read the whole body into `response.content`; None, or the failure."""
        try:
            await response.read()
        except Exception as exc:     # noqa: BLE001
            return self.router.client.outcome_from_error(exc, timeout)
        return None


class Gateway:
    """The gateway's routing: one Router for every request, the upstream forwarding `call`s,
    the status picture, client keys and the request log. Forwarding is async (on the event
    loop); the other methods are synchronous and run in worker threads. `build_app` puts
    HTTP around them."""

    def __init__(self, settings: Settings, out: Output | None = None):
        import threading
        self.settings = settings
        self.out = out or Output()
        self.router = Router(settings, shared_rotation=False)
        self.clients = dict(settings.client_keys)          # secret -> name
        self.started = time.time()
        self.served = 0
        self._log_lock = threading.Lock()
        self._log_lines: list[str] = []
        self.metrics = GatewayMetrics(self)
        self.upstream = Upstream(settings, self.router)
        self.routing = asyncio_semaphore(GATEWAY_ROUTING)

    def warm(self) -> None:
        """Import the SDK and its transport now (the model list and 404 checks use them),
        not in the first request."""
        self.router.client.widen_pool(GATEWAY_THREADS)

    # --- clients and the log -------------------------------------------------------------

    def authenticate(self, headers: Any, query: Any) -> str:
        """The name of the client presenting a valid client key (Authorization: Bearer,
        x-goog-api-key or ?key=); "local" when no client keys are configured (loopback).
        A Google key is never accepted: it is not a client key."""
        if not self.clients:
            return "local"
        import hmac
        auth = headers.get("authorization") or ""
        scheme, _, token = auth.partition(" ")
        presented = [token.strip() if scheme.lower() == "bearer" else "",
                     headers.get("x-goog-api-key") or "", query.get("key") or ""]
        for value in (p for p in presented if p):
            for secret, name in self.clients.items():
                if hmac.compare_digest(value.encode(), secret.encode()):
                    return name
            raise GatewayError(401, "the client key presented is not valid for this gateway",
                               "invalid_api_key")
        raise GatewayError(401, "a client key is required: send it as 'Authorization: Bearer "
                                "KEY', 'x-goog-api-key: KEY' or '?key=KEY'", "invalid_api_key")

    def redacted(self, data: bytes) -> bytes:
        """`data` with any configured Google key replaced by its label."""
        for key in self.settings.keys:
            secret = key.secret.encode()
            if secret in data:
                data = data.replace(secret, key.label.encode())
        return data

    def log(self, message: str, now: bool = False) -> None:
        """One line of the gateway's log (stderr), keys redacted. Lines are written in
        batches (`flush_log`, every LOG_EVERY seconds): a write per request would make every
        request give up the interpreter lock once more."""
        if self.out.quiet:
            return
        line = f"{PROG}: {time.strftime('%Y-%m-%dT%H:%M:%S')} {message}"
        with self._log_lock:
            self._log_lines.append(redact(line, self.settings.keys))
            if now or len(self._log_lines) >= 256:
                self._write_log()

    def flush_log(self) -> None:
        with self._log_lock:
            self._write_log()

    def _write_log(self) -> None:
        if self._log_lines:
            lines, self._log_lines = self._log_lines, []
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write("\n".join(lines) + "\n")
                sys.stderr.flush()

    def served_request(self, api: str, endpoint: str, client: str, method: str, path: str,
                       status: int, headers: Any, began: float) -> None:
        """Count and log one answered request (its routing headers say where it went)."""
        self.served += 1
        self.metrics.requests.labels(api, endpoint, client, str(status)).inc()
        model = headers.get("x-gemini-router-model") or "-"
        key = headers.get("x-gemini-router-key") or "-"
        attempts = headers.get("x-gemini-router-attempts") or "0"
        self.log(f"{client} {method} {path} {status} {model} {key} attempts={attempts} "
                 f"{(time.perf_counter() - began) * 1000:.1f} ms")

    # --- plans ---------------------------------------------------------------------------

    async def plan(self, name: str, method: str) -> Planned:
        """The candidates for a model name (see `plan_on`), planned on the event loop when
        the model list is cached and the state can be read from memory; else in a worker
        thread (a list call, a re-read of the files, state on Redis)."""
        cached = self.router.cached_models_now(current=True)
        if cached is None:
            return await in_thread(self.plan_now, name, method)
        return self.plan_on(name, method, *cached)

    def plan_now(self, name: str, method: str) -> Planned:
        try:
            models, docs = self.router.models_now()
        except RouterError as exc:
            raise routing_error(exc) from None
        return self.plan_on(name, method, models, docs)

    def plan_on(self, name: str, method: str, models: list[dict[str, Any]],
                docs: dict[str, dict[str, Any]] | None) -> Planned:
        """The candidates for a model name: a listed id pins that model (keys rotate);
        auto, auto-fast, auto-quality and auto-balance route in that tier's order. One look
        at the state (`docs`) serves the model list, the plan and the first reservation."""
        try:
            wanted = bare_model(name.strip())
            tier = AUTO_MODELS.get(wanted.lower())
            if method in EMBED_METHODS:
                entry = next((m for m in models if m["name"] == wanted), None)
                if tier or entry is None:
                    raise GatewayError(404, f"models/{wanted} is not found for {method}: name "
                                            "an embedding model (GET /v1beta/models lists them)",
                                       "model_not_found")
                if "embedContent" not in entry["methods"]:
                    raise GatewayError(400, f"models/{wanted} does not support {method}")
                return Planned(self.router.plan(models, model=wanted, docs=docs), models, docs)
            if tier:
                return Planned(self.router.plan(models, tier=tier, docs=docs), models, docs)
            if not any(m["name"] == wanted for m in models):
                raise GatewayError(404, f"models/{wanted} is not found: GET /v1beta/models "
                                        f"lists the models, and auto, auto-fast, auto-quality "
                                        "and auto-balance route by tier", "model_not_found")
            return Planned(self.router.plan(models, model=resolve_model(wanted, models),
                                            docs=docs), models, docs)
        except RouterError as exc:
            raise routing_error(exc) from None

    def route_headers(self, run: RouteRun) -> dict[str, str]:
        headers = {"x-gemini-router-attempts": str(len(run.attempts))}
        if run.model:
            headers["x-gemini-router-model"] = run.model
        if run.key is not None:
            headers["x-gemini-router-key"] = run.key.label
        return headers

    async def run(self, planned: Planned, call: Callable[[ApiKey, str, float], Any],
                  client: str, body: bytes = b"", shaped: bool = True) -> RouteRun:
        """The route loop (`Router.steps`) over `planned`, each upstream call awaited on the
        event loop (`call` is a coroutine function); with `shaped`, models the list says
        cannot take the body are skipped before any call."""
        parsed = await on_loop_if_small(len(body), _safe_loads, body) if shaped and body \
            else None
        unfit = unfit_models(planned.models, *request_shape(parsed)) if isinstance(
            parsed, dict) else None
        steps = self.router.steps(planned.plan, unfit=unfit, docs=planned.docs,
                                  deadline_at=time.monotonic() + self.settings.deadline)
        run = await self.drive(steps, call)
        self.metrics.attempts_of(run.attempts, client)
        return run

    async def drive(self, steps: Generator[Step, Any, RouteRun],
                    call: Callable[[ApiKey, str, float], Any]) -> RouteRun:
        """Feed the route loop: its calls awaited here, its 404 checks (a blocking list
        call) in a worker thread, and its own work between calls on the event loop - except
        a step that takes the state lock, or reads state that is not current in memory (see
        `current_snapshot`; state on Redis never is): that one runs in a worker thread."""
        reply: Any = None
        thrown: BaseException | None = None
        off_loop = False
        try:
            while True:
                advance = (steps.send, reply) if thrown is None else (steps.throw, thrown)
                done, step = await in_thread(_advance, *advance) if off_loop else \
                    _advance(*advance)
                if done:
                    return step
                reply, thrown = None, None
                if step is READING:
                    reply = self.router.store.current_snapshot()
                off_loop = step is LOCKING or (step is READING and reply is None)
                if step is LOCKING or step is READING:
                    continue
                try:
                    if isinstance(step, UpstreamCall):
                        reply = await call(step.key, step.model, step.timeout)
                    else:
                        reply = await in_thread(self.router.check_model, step.key,
                                                step.model, None, step.timeout)
                except Exception as exc:     # noqa: BLE001 - the loop's own `finally` sees it
                    thrown = exc
        except BaseException:
            # Cancelled (the client went away, the server's shutdown ran out of time): the
            # loop's `finally` runs now - or, when a worker thread is still inside a step,
            # once that step ends and the generator is let go.
            if not steps.gi_running:
                steps.close()
            raise

    # --- forwarding ----------------------------------------------------------------------

    async def forward(self, method: str, name: str, body: bytes, params: dict[str, str],
                      client: str) -> Forwarded:
        """One non-streamed call (generateContent, countTokens, embedContent,
        batchEmbedContents), failed over by the run loop; the client's body goes up and the
        upstream's answer comes back unchanged."""
        cache_key = await on_loop_if_small(len(body), self.cache_key, name, body, params) \
            if method == "generateContent" and self.settings.cache_ttl > 0 else None
        hit = await in_thread(self.cache_hit, cache_key) if cache_key is not None else None
        if hit is not None:
            return Forwarded(200, self.redacted(_dumps(hit[0])), hit[1])
        last: dict[str, Any] = {}

        async def call(key: ApiKey, model: str, timeout: float) -> Outcome:
            last.clear()
            response = await self.upstream.post(key, f"models/{model}:{method}", body, params,
                                                timeout)
            if isinstance(response, Outcome):
                return response
            last["response"] = response
            failure = self.router.client.outcome_of_response(response)
            if failure is not None:
                return failure
            answer = await on_loop_if_small(len(response.content), _safe_json, response)
            if method == "generateContent":
                return outcome_from_body(answer)
            if not isinstance(answer, dict):
                return Outcome("transient", f"malformed {method} answer (not a JSON object)",
                               status=200)
            # Token counts and embeddings say nothing about how a model answers: deferred,
            # and never recorded, so they leave no sample in the model's stats.
            return Outcome("ok", status=200, deferred=True)
        async with self.routing:
            planned = await self.plan(name, method)
            run = await self.run(planned, call, client, body, method == "generateContent")
        answered = self.answer(run, last.get("response"))
        if cache_key is not None:
            answered.headers["x-gemini-router-cache"] = "miss"
            if run.outcome is not None and run.outcome.kind == "ok":
                await in_thread(self.cache_keep, cache_key, run.outcome.body, run.model,
                                run.key)
        return answered

    # --- the response cache (GEMINI_ROUTER_CACHE_TTL) -----------------------------------

    def cache_key(self, name: str, body: bytes, params: dict[str, str]) -> str | None:
        """The key of a generateContent request's answer, or None when the cache is off: the
        model name as given, the body, and the query sent upstream (`$alt=json;enum-encoding=
        int` changes how the answer is written). A streamed request shares it, so a stream
        replays a cached answer; only plain answers fill the cache (a stream's merged
        elements are not the answer a plain request gets)."""
        if self.settings.cache_ttl <= 0:
            return None
        parsed = _safe_loads(body)
        return None if not isinstance(parsed, dict) else request_cache_key(
            self.settings, "generateContent", bare_model(name),
            {"body": parsed, "query": sorted(params.items())})

    def cache_hit(self, cache_key: str | None) -> tuple[dict[str, Any], dict[str, str]] | None:
        """(the cached answer, its headers), or None: no upstream call for a repeat."""
        value = self.router.store.cache.get(cache_key) if cache_key else None
        if not isinstance(value, dict) or not isinstance(value.get("body"), dict):
            return None
        headers = {"x-gemini-router-cache": "hit", "x-gemini-router-attempts": "0",
                   "x-gemini-router-model": str(value.get("model", ""))}
        label = self.settings.label_of(value.get("key"))
        if label:
            headers["x-gemini-router-key"] = label
        return value["body"], headers

    def cache_keep(self, cache_key: str, body: Any, model: str | None,
                   key: ApiKey | None) -> None:
        if isinstance(body, dict):
            self.router.store.cache.put(cache_key, {"body": body, "model": model, "key":
                                                    key.fingerprint if key else None},
                                        self.settings.cache_ttl)

    def answer(self, run: RouteRun, response: Any) -> Forwarded:
        """What the client gets for a finished run: the upstream's answer as it came (an
        answer, a blocked prompt, a refused request), or the gateway's honest error."""
        headers = self.route_headers(run)
        try:
            result_of(run, self.settings)
        except UpstreamError as exc:
            if run.outcome is None:    # no model of the plan can take it: nothing was called
                raise GatewayError(400, str(exc), "INVALID_ARGUMENT", headers=headers) from None
            if response is None:
                raise GatewayError(502, str(exc), "upstream_failed", headers=headers) from None
            return Forwarded(response.status_code, self.redacted(response.content), headers)
        except RouterError as exc:
            raise routing_error(exc, headers) from None
        return Forwarded(200, self.redacted(response.content), headers)

    async def open_stream(self, name: str, body: bytes, params: dict[str, str], framer: Any,
                          client: str) -> tuple[dict[str, str], AsyncIterator[bytes]] | Forwarded:
        """Start a streamed call: failover happens here, before anything is sent. Returns
        the routing headers and the body to stream, or a Forwarded refusal (an HTTP error
        the upstream gave before streaming, passed on as it came)."""
        cache_key = await on_loop_if_small(len(body), self.cache_key, name, body, params) \
            if self.settings.cache_ttl > 0 else None
        hit = await in_thread(self.cache_hit, cache_key) if cache_key is not None else None
        if hit is not None:
            answer, headers = hit
            return headers, _aiter([self.redacted(framer.start() + framer.element(answer)),
                                    framer.end(False)])
        box: dict[str, Any] = {}

        async def call(key: ApiKey, model: str, timeout: float) -> Outcome:
            box.clear()
            flow = await self.upstream_stream(key, model, body, params, timeout)
            if isinstance(flow, Outcome):
                return flow
            box["flow"] = flow
            return flow.outcome
        async with self.routing:
            planned = await self.plan(name, "streamGenerateContent")
            run = await self.run(planned, call, client, body)
        flow: StreamFlow | None = box.get("flow")
        headers = self.route_headers(run)
        if cache_key is not None:
            headers["x-gemini-router-cache"] = "miss"
        try:
            result_of(run, self.settings)
        except UpstreamError as exc:
            if flow is not None and flow.error is not None:
                code = flow.error.get("code")
                raise GatewayError(code if isinstance(code, int) and 400 <= code < 600
                                   else 502, redact(str(exc), self.settings.keys),
                                   "upstream_refused", headers=headers) from None
            if run.outcome is None:    # no model of the plan can take it: nothing was called
                raise GatewayError(400, str(exc), "INVALID_ARGUMENT", headers=headers) from None
            if flow is None:
                raise GatewayError(502, str(exc), "upstream_failed", headers=headers) from None
            if not flow.done:
                return Forwarded(flow.response.status_code,
                                 self.redacted(flow.response.content), headers)
        except RouterError as exc:
            raise routing_error(exc, headers) from None
        return headers, self.relay(flow, framer)

    async def upstream_stream(self, key: ApiKey, model: str, body: bytes,
                              params: dict[str, str], timeout: float) -> StreamFlow | Outcome:
        """Open the upstream stream and read it until it carries content or ends. Its
        outcome is "ok" and deferred once content flows (the rest is relayed and recorded
        later), else whatever the stream came to - a failure the run loop may route around."""
        began = time.perf_counter()
        response = await self.upstream.post(key, f"models/{model}:streamGenerateContent",
                                            body, params, timeout, stream=True)
        if isinstance(response, Outcome):
            return response
        flow = StreamFlow(key, model, response, Outcome("ok", status=200, deferred=True), began,
                          timeout=timeout)
        if not 200 <= response.status_code < 300:
            failure = await self.upstream.read(response, timeout)
            flow.outcome = failure or self.router.client.outcome_of_response(response)
            return flow
        flow.chunks = response.chunks()
        try:
            async for chunk in flow.chunks:
                fresh = flow.reader.feed(chunk)
                for element in fresh:
                    error = _stream_error(element)
                    if error is not None:
                        response.close()
                        flow.outcome, flow.error = self.stream_failure(error), error
                        return flow
                flow.buffered += fresh
                if flow.reader.closed or any(_flowing(e) for e in fresh):
                    break
        except Exception as exc:     # noqa: BLE001
            response.close()
            return self.router.client.outcome_from_error(exc, timeout)
        if not any(_flowing(e) for e in flow.buffered):
            # The stream ended before any content (a blocked prompt, an empty answer, or
            # cut off): classified whole, like any call, so the loop may still fail over.
            response.close()
            flow.done = True
            if not flow.reader.closed or flow.reader.leftover:
                flow.outcome = Outcome("transient", "stream cut off before its end", status=200)
            else:
                flow.outcome = outcome_from_body(
                    merge_stream([e for e in flow.buffered if isinstance(e, dict)]),
                    streamed=True)
        return flow

    def stream_failure(self, error: dict[str, Any]) -> Outcome:
        """An {"error": ...} element inside a 200 stream, classified like an HTTP error."""
        code = error.get("code")
        outcome = classify_http(code if isinstance(code, int) and code >= 400 else 500,
                                {"error": error})
        outcome.detail = _one_line(redact(outcome.detail, self.settings.keys), 300)
        return outcome

    async def relay(self, flow: StreamFlow, framer: Any) -> AsyncIterator[bytes]:
        """The stream's body for the client: what was read before committing, then the rest
        as it arrives. A failure after the first byte ends the stream with an error element;
        the call's final outcome is recorded when it ends (the run loop left it deferred)."""
        elements = [e for e in flow.buffered if isinstance(e, dict)]
        failure: Outcome | None = None
        error: dict[str, Any] | None = None
        try:
            yield self.redacted(framer.start() + b"".join(framer.element(e) for e in elements))
            if not flow.done:
                try:
                    async for chunk in flow.chunks:
                        for element in flow.reader.feed(chunk):
                            error = _stream_error(element)
                            if error is not None:
                                failure = self.stream_failure(error)
                                break
                            if isinstance(element, dict):
                                elements.append(element)
                                yield self.redacted(framer.element(element))
                        if failure is not None:
                            break
                    if failure is None and (not flow.reader.closed or flow.reader.leftover):
                        failure = Outcome("transient", "stream cut off before its end")
                except Exception as exc:     # noqa: BLE001 - the upstream broke mid-stream
                    failure = self.router.client.outcome_from_error(exc, flow.timeout)
                if failure is not None:
                    error = error or {"code": 503, "status": "UNAVAILABLE",
                                      "message": f"the upstream stream broke after output "
                                                 f"began: {failure.detail}"}
                    yield self.redacted(framer.error(error))
            yield framer.end(failure is not None)
        finally:
            # Also when the client went away (cancelled, or the generator closed): then
            # nothing is recorded, as what arrived says nothing against the model.
            flow.response.close()
        if flow.done:
            return            # the run loop recorded it: it was never deferred
        final = failure or outcome_from_body(merge_stream(elements), streamed=True)
        if failure is not None:
            final.partial = True
            final.detail = f"stream broke after output began: {final.detail}"
        if self.router.record(flow.key, flow.model, final, time.perf_counter() - flow.began,
                              flush=False):
            await in_thread(self.router.flush)

    # --- the model list ------------------------------------------------------------------

    def model_entries(self) -> list[dict[str, Any]]:
        """The models, Gemini-shaped, from the router's cached list (the list the gateway
        routes over; refreshed after GEMINI_ROUTER_MODELS_TTL), without an upstream call."""
        try:
            models = self.router.models()
        except RouterError as exc:
            raise routing_error(exc) from None
        return [gemini_model_entry(m) for m in models]

    def models_page(self, page_size: str | None, page_token: str | None) -> dict[str, Any]:
        """GET /v1beta/models: a page of the cached list (pageToken = the offset)."""
        entries = self.model_entries()
        try:
            size = min(1000, max(1, int(page_size))) if page_size else 50
            start = int(page_token) if page_token else 0
            if start < 0:
                raise ValueError(page_token)
        except ValueError:
            raise GatewayError(400, "pageSize and pageToken must be whole numbers") from None
        page: dict[str, Any] = {"models": entries[start:start + size]}
        if start + size < len(entries):
            page["nextPageToken"] = str(start + size)
        return page

    def model_entry(self, name: str) -> dict[str, Any]:
        wanted = bare_model(name)
        for entry in self.model_entries():
            if entry["name"] == f"models/{wanted}":
                return entry
        raise GatewayError(404, f"models/{wanted} is not found", "model_not_found")

    def openai_models(self) -> dict[str, Any]:
        """GET /v1/models: the tier names, then the text models the gateway routes."""
        try:
            names = text_model_names(self.router.models())
        except RouterError as exc:
            raise routing_error(exc) from None
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "google"
             if name not in AUTO_MODELS else PROG} for name in [*AUTO_MODELS, *names]]}

    # --- route for the CLI (GEMINI_ROUTER_SERVER) ----------------------------------------

    def route_for_cli(self, payload: Any, sink: Callable[[dict[str, Any]], None],
                      client: str) -> None:
        """POST /v1/router/route: the same Router.route a direct `route` makes, its -v lines,
        notes and streamed text sent to `sink` as events, ending with {"result": ...} or
        {"error": {"exit_code", "kind", "message", "until", "rate_limited"}}."""
        router = self.router
        try:
            prompt, model, tier, stream, verbose, budget = cli_route_request(payload)
            if budget:
                router = Router(replace(self.settings, **budget),
                                store=self.router.store, client=self.router.client,
                                shared_rotation=False)
            out = _Relayed(verbose, lambda level, message: sink({"log": [level, message]}))
            on_text = (lambda piece: sink({"text": piece})) if stream else None
            result = router.route(prompt, model=model, tier=tier, on_text=on_text, out=out)
            self.metrics.attempts_of(result.attempts, client)
            sink({"result": result.as_json()})
        except RouterError as exc:
            kind = next((k for cls, k in ERROR_KINDS.items() if isinstance(exc, cls)),
                        "upstream")
            sink({"error": {"exit_code": exc.exit_code, "kind": kind,
                            "message": redact(str(exc), self.settings.keys),
                            "until": getattr(exc, "until", None),
                            "rate_limited": getattr(exc, "rate_limited", False)}})
        except Exception as exc:     # noqa: BLE001 - a forwarded route always ends in an event
            self.log(f"internal error on a forwarded route: {type(exc).__name__}: "
                     f"{_one_line(exc, 300)}", now=True)
            sink({"error": {"exit_code": 1, "kind": "upstream", "until": None,
                            "rate_limited": False,
                            "message": f"internal error in the gateway ({type(exc).__name__})"
                                       "; its log says more"}})
        finally:
            if router is not self.router:
                router.close()

    # --- status --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Keys x models: ok, cooling (until when, why) or disabled; tiers, latency and
        success per model; the gateway itself. Fingerprints and labels only, no secret."""
        s = self.settings
        with self.router.store.transaction(write=False) as tx:
            now = time.time()
            view = StateView(s, tx.cooldowns, tx.router)
            index = model_index(tx.router)
            rows = compute_tiers(all_stats(tx.stats), index)
            listing = tx.router.get("model_list") or {}
            locked = tx.router.get("lock")
        models = [m for m in rows if m in index and is_text_model(m, index[m]["methods"])]
        grid: dict[str, dict[str, Any]] = {}
        keys = []
        for key in s.keys:
            cells = {m: status_cell(view.block(key, m, now), now) for m in models}
            grid[key.label] = cells
            whole = view.block(key, None, now)
            state = "disabled" if whole is not None and whole.until is None else \
                "cooling" if whole is not None or any(c["state"] != "ok"
                                                      for c in cells.values()) else "ok"
            keys.append({"key": key.label, "fingerprint": key.fingerprint,
                         "project": s.project_label(key), "state": state,
                         "why": whole.reason if whole is not None else None})
        tiers = {m: {"rank": r.rank, "fast": r.fast, "quality": r.quality,
                     "balance": r.balance, "latency_p50_s": r.latency_p50_s,
                     "success_rate": r.success_rate, "samples": r.samples,
                     "measured": r.measured} for m, r in rows.items() if m in models}
        store = self.router.store
        return {"gateway": {"version": __version__, "started": round(self.started, 3),
                            "uptime_s": round(now - self.started, 1), "requests": self.served,
                            "clients": sorted(self.clients.values()) or None,
                            "endpoint": s.endpoint, "lock": locked,
                            "model_list_fetched": listing.get("fetched_at")},
                "state": {"backend": type(store).__name__,
                          "degraded": getattr(store, "degraded", None)},
                "now": round(now, 3), "keys": keys, "models": models, "grid": grid,
                "tiers": tiers}


def status_cell(block: Block | None, now: float) -> dict[str, Any]:
    """One key x model cell of /status: ok, cooling (until, why) or disabled (why)."""
    if block is None:
        return {"state": "ok", "until": None, "remaining_s": None, "why": None, "kind": None}
    state = "disabled" if block.until is None else "cooling"
    why = block.reason[len("disabled: "):] if block.reason.startswith("disabled: ") \
        else block.reason
    return {"state": state, "until": None if block.until is None else round(block.until, 3),
            "remaining_s": None if block.until is None else round(block.until - now, 1),
            "why": why, "kind": block.kind, "soft": block.soft}


def gemini_model_entry(model: dict[str, Any]) -> dict[str, Any]:
    """A cached model-list entry in the shape of the API's Model resource."""
    entry = {"name": f"models/{model['name']}", "version": model.get("version", ""),
             "displayName": model.get("display_name", ""),
             "inputTokenLimit": model["input_limit"], "outputTokenLimit": model["output_limit"],
             "supportedGenerationMethods": list(model["methods"])}
    if model.get("thinking"):
        entry["thinking"] = True
    return entry


def cli_route_request(payload: Any) -> tuple[PromptRequest, str | None, str | None, bool, bool,
                                              dict[str, Any]]:
    """The JSON `route` sends to a gateway -> (prompt, model, tier, stream, verbose, budget
    overrides). A malformed one is a usage error, as it would be on the command line."""
    import base64
    import binascii
    if not isinstance(payload, dict) or not isinstance(payload.get("prompt"), str):
        raise UsageError("the gateway needs a JSON object with a 'prompt' string")

    def pick(name: str, kinds: Any, default: Any = None) -> Any:
        value = payload.get(name, default)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)
                                  and bool not in (kinds if isinstance(kinds, tuple)
                                                   else (kinds,))):
            raise UsageError(f"'{name}' has the wrong type in the request to the gateway")
        return value
    try:
        attachments = [(str(mime), base64.b64decode(data, validate=True))
                       for mime, data in pick("attachments", list, [])]
    except (ValueError, TypeError, binascii.Error):
        raise UsageError("'attachments' must be [mime, base64] pairs") from None
    tier = pick("tier", str)
    if tier is not None and tier not in TIER_NAMES:
        raise UsageError(f"tier {tier!r} is not one of {', '.join(TIER_NAMES)}")
    budget: dict[str, Any] = {}
    for name, limit, field_name in (("max_attempts", "GEMINI_ROUTER_MAX_ATTEMPTS",
                                     "max_attempts"),
                                    ("deadline", "GEMINI_ROUTER_DEADLINE", "deadline"),
                                    ("timeout", "GEMINI_ROUTER_TIMEOUT", "timeout")):
        value = pick(name, (int, float))
        if value is not None:
            parsed, problem = LIMITS[limit].convert(str(value))
            if problem:
                raise UsageError(f"--{name.replace('_', '-')} {problem}")
            budget[field_name] = int(parsed) if LIMITS[limit].integer else parsed
    prompt = PromptRequest(text=payload["prompt"], system=pick("system", str),
                           attachments=attachments, options=pick("options", dict, {}),
                           schema=pick("schema", dict), wire_options=pick("wire_options", dict,
                                                                           {}))
    return (prompt, pick("model", str), tier, bool(pick("stream", bool, False)),
            bool(pick("verbose", bool, False)), budget)


STATUS_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .2em}h2{font-size:1.05em;margin:1.4em 0 .4em}
p.meta{color:#666;margin:0}table{border-collapse:collapse;background:#fff}
th,td{border:1px solid #ddd;padding:.3em .5em;vertical-align:top;text-align:left}
th{background:#f0f0f0;font-weight:600}td.num{text-align:right}
td.cell b{display:block}td.cell small{display:block;color:#555;max-width:22em;
overflow-wrap:anywhere}
td.ok{background:#e8f6e8}td.ok b{color:#1a6b1a}
td.cooling{background:#fff4d6}td.cooling b{color:#8a5a00}
td.disabled{background:#fbe3e3}td.disabled b{color:#a11}
td.soft{background:#fffbe8}
"""


def status_page(status: dict[str, Any]) -> str:
    """The HTML page of /status: a models x keys grid (ok / cooling until when, why /
    disabled), the tiers with latency and success, and the gateway; self-contained, no
    script or external asset, reloading itself every STATUS_REFRESH_S seconds."""
    import html

    def e(value: Any) -> str:
        return html.escape("-" if value is None else str(value))
    now = status["now"]
    keys = [k["key"] for k in status["keys"]]
    lines = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
             f'<meta http-equiv="refresh" content="{STATUS_REFRESH_S}">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{PROG} gateway</title><style>{STATUS_STYLE}</style></head><body>",
             f"<h1>{PROG} gateway</h1>",
             f'<p class="meta">{e(status["gateway"]["endpoint"])} &middot; '
             f'{len(keys)} key(s), {len(status["models"])} text model(s) &middot; '
             f'{status["gateway"]["requests"]} request(s) served &middot; updated '
             f'{e(_when(now, now))}, reloads every {STATUS_REFRESH_S} s</p>']
    degraded = status["state"].get("degraded")
    if degraded:
        lines.append(f'<p class="meta"><b>state backend degraded:</b> {e(degraded)}</p>')
    if status["gateway"].get("lock"):
        lines.append(f'<p class="meta">routing locked to {e(status["gateway"]["lock"])}</p>')
    lines += ["<h2>Keys &times; models</h2>", '<table id="grid"><thead><tr><th>model</th>']
    lines += [f"<th>{e(k['key'])}<br><small>{e(k['fingerprint'])} &middot; {e(k['project'])}"
              f"</small></th>" for k in status["keys"]]
    lines.append("</tr></thead><tbody>")
    if not status["models"]:
        lines.append(f'<tr><td colspan="{len(keys) + 1}">no model list yet: the first '
                     "request lists the models</td></tr>")
    for model in status["models"]:
        lines.append(f"<tr><th>{e(model)}</th>")
        for key in keys:
            cell = status["grid"][key][model]
            classes = f"cell {cell['state']}" + (" soft" if cell.get("soft") else "")
            detail = ""
            if cell["state"] == "cooling":
                detail = (f"<small>until {e(_when(cell['until'], now))} "
                          f"({e(_duration(cell['remaining_s']))} left)</small>")
            if cell["why"]:
                detail += f'<small class="why">{e(cell["why"])}</small>'
            lines.append(f'<td class="{classes}" data-key="{e(key)}" data-model="{e(model)}" '
                         f'title="{e(cell["why"] or cell["state"])}"><b>{cell["state"]}</b>'
                         f"{detail}</td>")
        lines.append("</tr>")
    lines += ["</tbody></table>", "<h2>Tiers</h2>", '<table id="tiers"><thead><tr>'
              "<th>#</th><th>model</th><th>fast</th><th>quality</th><th>balance</th>"
              "<th>latency p50</th><th>success</th><th>samples</th></tr></thead><tbody>"]
    for model, t in status["tiers"].items():
        p50 = t["latency_p50_s"]
        latency = "-" if p50 is None else f"{p50 * 1000:.0f} ms" if p50 < 1 else f"{p50:.2f} s"
        success = "-" if t["success_rate"] is None else f"{t['success_rate'] * 100:.0f}%"
        lines.append(f'<tr data-model="{e(model)}"><td class="num">{t["rank"]}</td>'
                     f"<td>{e(model)}</td><td>{t['fast']}</td><td>{t['quality']}</td>"
                     f"<td>{t['balance']}</td><td class=\"num\">{latency}</td>"
                     f"<td class=\"num\">{success}</td><td class=\"num\">{t['samples']}</td>"
                     "</tr>")
    lines += ["</tbody></table>", '<p class="meta">JSON: <a href="status">/status</a> '
              '&middot; metrics: <a href="metrics">/metrics</a> &middot; API docs: '
              '<a href="docs">/docs</a></p>', "</body></html>"]
    return "\n".join(lines)


def gemini_query(query: Any, stream: bool) -> tuple[dict[str, str], bool]:
    """(the client's query parameters to send upstream, whether it asked for SSE). Its
    client key stays here; a stream is always read upstream as Gemini's JSON array."""
    params = {k: v for k, v in query.items() if k != "key"}
    sse = stream and "sse" in (params.get("alt"), params.get("$alt"))
    if sse:
        params = {k: v for k, v in params.items() if k not in ("alt", "$alt")}
    return params, sse


def build_app(gateway: Gateway) -> Any:
    """The ASGI app: FastAPI routes over `gateway`, errors shaped like the called API."""
    import asyncio
    import anyio
    import anyio.to_thread
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, Response, StreamingResponse
    from fastapi.responses import JSONResponse as StarletteJSON
    from starlette.exceptions import HTTPException

    class JSONResponse(StarletteJSON):
        """JSON written by `_dumps`: a lone surrogate (a client's, echoed back) stays
        valid JSON instead of failing the encoding."""

        def render(self, content: Any) -> bytes:
            return _dumps(content)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        anyio.to_thread.current_default_thread_limiter().total_tokens = GATEWAY_THREADS
        await gateway.upstream.open()
        gateway.router.start_flusher()

        async def pump_log() -> None:
            while True:
                await asyncio.sleep(LOG_EVERY)
                gateway.flush_log()
        pump = asyncio.get_running_loop().create_task(pump_log())
        try:
            yield
        finally:
            pump.cancel()
            await gateway.upstream.close()
            await in_thread(gateway.router.close)
            gateway.flush_log()

    app = FastAPI(title=f"{PROG} gateway", version=__version__, lifespan=lifespan,
                  description="Gemini-native and OpenAI-compatible endpoints over one pool "
                              "of Gemini API keys, routed by the best model and key available "
                              "now. Client keys: Authorization: Bearer, x-goog-api-key or "
                              "?key=.")

    def api_of(path: str) -> str:
        return "openai" if path.startswith("/v1/") else "gemini"

    def typed(fn: Callable[..., Any]) -> Callable[..., Any]:
        """FastAPI reads parameter types from annotations, which this module keeps as
        strings (PEP 563) naming classes imported only here: resolve them here."""
        names = {"Request": Request, "Response": Response, "str": str}
        fn.__annotations__ = {k: names.get(v, v) for k, v in fn.__annotations__.items()}
        return fn

    def error_response(api: str, exc: GatewayError) -> Response:
        headers = dict(exc.headers)
        if exc.retry_after is not None:
            headers["retry-after"] = str(exc.retry_after)
        message = redact(str(exc), gateway.settings.keys)
        return JSONResponse(error_document(api, exc.status, message, exc.code), exc.status,
                            headers)

    async def serve(request: Request, api: str, endpoint: str,
                    work: Callable[[str], Any], public: bool = False) -> Response:
        began, client = time.perf_counter(), "-"
        try:
            client = "-" if public else gateway.authenticate(request.headers,
                                                             request.query_params)
            response = await work(client)
        except GatewayError as exc:
            response = error_response(api, exc)
        except Exception as exc:     # noqa: BLE001 - never a bare 500 or a traceback
            gateway.log(f"internal error on {request.method} {request.scope['path']}: "
                        f"{type(exc).__name__}: {_one_line(exc, 300)}", now=True)
            response = error_response(api, GatewayError(
                500, f"internal error in the gateway ({type(exc).__name__}); its log says "
                     "more", "internal_error"))
        gateway.served_request(api, endpoint, client, request.method, request.scope["path"],
                               response.status_code, response.headers, began)
        return response

    def streamed(result: Any, api: str, framer: Any) -> Response:
        if isinstance(result, Forwarded):       # refused before the stream began
            return forwarded_response(result, api)
        headers, chunks = result
        return StreamingResponse(chunks, media_type=framer.media_type, headers=headers)

    def forwarded_response(fwd: Forwarded, api: str) -> Response:
        if api == "gemini" or fwd.status == 200:
            return Response(fwd.body, fwd.status, fwd.headers, media_type="application/json")
        error = (_safe_loads(fwd.body) or {}).get("error") or {}
        message = str(error.get("message") or f"upstream answered HTTP {fwd.status}")
        code = str(error.get("status") or "").lower()
        return JSONResponse(error_document(api, fwd.status, message, code), fwd.status,
                            fwd.headers)

    async def json_body(request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except (ValueError, RecursionError):
            raise GatewayError(400, "the request body is not valid JSON (or nests too deeply)",
                               "invalid_json") from None

    @app.post("/v1beta/models/{target:path}", summary="Gemini: generateContent, "
              "streamGenerateContent (?alt=sse), countTokens, embedContent, "
              "batchEmbedContents")
    @typed
    async def gemini_call(target: str, request: Request) -> Response:
        model, _, method = target.rpartition(":")

        async def work(client: str) -> Response:
            if method not in GEMINI_METHODS or not model:
                raise GatewayError(404, f"Method not found: POST /v1beta/models/{target}")
            body = await request.body()
            params, sse = gemini_query(request.query_params, method == "streamGenerateContent")
            if method == "streamGenerateContent":
                framer = GeminiSseFramer() if sse else GeminiArrayFramer()
                return streamed(await gateway.open_stream(model, body, params, framer, client),
                                "gemini", framer)
            fwd = await gateway.forward(method, model, body, params, client)
            return forwarded_response(fwd, "gemini")
        return await serve(request, "gemini", method or "unknown", work)

    @app.get("/v1beta/models", summary="Gemini: the model list (the router's cached list)")
    @typed
    async def gemini_models(request: Request) -> Response:
        async def work(client: str) -> Response:
            q = request.query_params
            return JSONResponse(await in_thread(gateway.models_page, q.get("pageSize"),
                                               q.get("pageToken")))
        return await serve(request, "gemini", "models", work)

    @app.get("/v1beta/models/{model:path}", summary="Gemini: one model of the list")
    @typed
    async def gemini_model(model: str, request: Request) -> Response:
        async def work(client: str) -> Response:
            return JSONResponse(await in_thread(gateway.model_entry, model))
        return await serve(request, "gemini", "model", work)

    @app.post("/v1/chat/completions", summary="OpenAI: chat completions (stream or not)")
    @typed
    async def chat_completions(request: Request) -> Response:
        async def work(client: str) -> Response:
            body = await json_body(request)
            model, wanted = openai_request(body)
            data = _dumps(wanted)
            stream = body.get("stream") is True
            created, ident = int(time.time()), f"chatcmpl-{os.urandom(12).hex()}"
            if stream:
                options = body.get("stream_options")
                usage = isinstance(options, dict) and options.get("include_usage") is True
                chunker = OpenAIChunker(model, ident, created, usage)
                framer = OpenAIFramer(chunker)
                result = await gateway.open_stream(model, data, {}, framer, client)
                if not isinstance(result, Forwarded):
                    chunker.model = result[0].get("x-gemini-router-model", model)
                return streamed(result, "openai", framer)
            fwd = await gateway.forward("generateContent", model, data, {}, client)
            if fwd.status != 200:
                return forwarded_response(fwd, "openai")
            answer = _safe_loads(fwd.body) or {}
            used = fwd.headers.get("x-gemini-router-model", model)
            return JSONResponse(openai_completion(answer, used, ident, created),
                                headers=fwd.headers)
        return await serve(request, "openai", "chat.completions", work)

    @app.get("/v1/models", summary="OpenAI: the models (auto* route by tier)")
    @typed
    async def openai_models(request: Request) -> Response:
        async def work(client: str) -> Response:
            return JSONResponse(await in_thread(gateway.openai_models))
        return await serve(request, "openai", "models", work)

    @app.post("/v1/router/route", summary="gemini-router route, forwarded (GEMINI_ROUTER_SERVER)")
    @typed
    async def cli_route(request: Request) -> Response:
        async def work(client: str) -> Response:
            payload = await json_body(request)
            if isinstance(payload, dict) and payload.get("stream") is True:
                return StreamingResponse(route_events(payload, client),
                                         media_type="application/x-ndjson")
            events: list[dict[str, Any]] = []
            await in_thread(gateway.route_for_cli, payload, events.append, client)
            final = events[-1]
            doc = {**final, "log": [e["log"] for e in events if "log" in e]}
            error = final.get("error")
            status = 200 if error is None else {1: 422, 2: 400, 3: 500}.get(
                error["exit_code"], 429 if error.get("rate_limited") else 503)
            headers = {} if error is None or error.get("until") is None else \
                {"retry-after": str(retry_after_seconds(error["until"]))}
            result = final.get("result")
            if result is not None:      # where it went, for the log and the metrics
                headers.update({"x-gemini-router-model": result["model"],
                                "x-gemini-router-key": result["key"],
                                "x-gemini-router-attempts": str(len(result["attempts"]))})
            return Response(redact(json.dumps(doc), gateway.settings.keys), status, headers,
                             media_type="application/json")
        return await serve(request, "openai", "router.route", work)

    def route_events(payload: Any, client: str) -> Iterator[bytes]:
        """A streamed forwarded route: its events as JSON lines, as they happen."""
        import queue
        import threading
        events: Any = queue.Queue()
        worker = threading.Thread(target=gateway.route_for_cli, name="gemini-router-route",
                                  args=(payload, events.put, client), daemon=True)
        worker.start()
        patience = gateway.settings.deadline + gateway.settings.timeout + 30
        while True:
            try:
                event = events.get(timeout=patience)   # a route ends by its deadline
            except queue.Empty:
                event = {"error": {"exit_code": 1, "kind": "upstream", "until": None,
                                   "rate_limited": False, "message": "the forwarded route "
                                   "gave no answer within its deadline"}}
            yield redact(json.dumps(event), gateway.settings.keys).encode() + b"\n"
            if "result" in event or "error" in event:
                return

    @app.get("/status", summary="keys x models: cooling, until, why; tiers; no secrets")
    @typed
    async def status(request: Request) -> Response:
        async def work(client: str) -> Response:
            doc = await in_thread(gateway.status)
            return Response(redact(json.dumps(doc), gateway.settings.keys),
                            media_type="application/json")
        return await serve(request, "gemini", "status", work)

    @app.get("/", summary="the status page (HTML)", response_class=HTMLResponse)
    @typed
    async def page(request: Request) -> Response:
        async def work(client: str) -> Response:
            doc = await in_thread(gateway.status)
            return HTMLResponse(redact(status_page(doc), gateway.settings.keys))
        return await serve(request, "gemini", "page", work)

    @app.get("/metrics", summary="Prometheus metrics")
    @typed
    async def metrics(request: Request) -> Response:
        async def work(client: str) -> Response:
            from prometheus_client import CONTENT_TYPE_LATEST
            text = await in_thread(gateway.metrics.text)
            return Response(gateway.redacted(text), media_type=CONTENT_TYPE_LATEST)
        return await serve(request, "gemini", "metrics", work)

    @app.get("/healthz", summary="liveness")
    @typed
    async def healthz(request: Request) -> Response:
        async def work(client: str) -> Response:
            return JSONResponse({"status": "ok", "version": __version__})
        return await serve(request, "gemini", "healthz", work, public=True)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: Any) -> Response:
        api = api_of(request.scope["path"])
        message = f"{exc.detail}: {request.method} {request.scope['path']}"
        response = error_response(api, GatewayError(exc.status_code, message))
        gateway.served_request(api, "unknown", "-", request.method, request.scope["path"],
                               response.status_code, response.headers, time.perf_counter())
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        gateway.log(f"internal error on {request.method} {request.scope['path']}: "
                    f"{type(exc).__name__}: {_one_line(exc, 300)}")
        return error_response(api_of(request.scope["path"]), GatewayError(
            500, f"internal error in the gateway ({type(exc).__name__})", "internal_error"))

    # The two endpoints that carry nearly all the traffic skip FastAPI's middleware stack
    # and router - about a fifth of the gateway's CPU per request, which at 32 requests in
    # flight becomes queueing for the interpreter lock. The same endpoint functions answer
    # (through `serve`: authentication, errors shaped like the API, metrics, logs); every
    # other path, /docs and the OpenAPI schema included, goes through FastAPI.
    def hot_endpoint(scope: dict[str, Any]) -> Callable[[Request], Any] | None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return None
        path = scope["path"]
        if path.startswith("/v1beta/models/"):
            return functools.partial(gemini_call, path[len("/v1beta/models/"):])
        return chat_completions if path == "/v1/chat/completions" else None

    async def app_with_hot_paths(scope: dict[str, Any], receive: Any, send: Any) -> None:
        endpoint = hot_endpoint(scope)
        if endpoint is None:
            await app(scope, receive, send)
            return
        started = False

        async def sending(message: dict[str, Any]) -> None:
            nonlocal started
            started = True
            await send(message)
        request = Request(scope, receive)
        try:
            response = await endpoint(request)
            await response(scope, receive, sending)
        except Exception as exc:     # noqa: BLE001 - a stream's own failure, say
            gateway.log(f"internal error on POST {scope['path']}: {type(exc).__name__}: "
                        f"{_one_line(exc, 300)}", now=True)
            if not started:
                await error_response(api_of(scope["path"]), GatewayError(
                    500, f"internal error in the gateway ({type(exc).__name__})",
                    "internal_error"))(scope, receive, send)
    return app_with_hot_paths


def _safe_loads(data: bytes) -> Any:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


# --------------------------------------------------------------------------------------
# Gateway: OpenAI translation (pure functions: an OpenAI request -> a Gemini request, a
# Gemini answer or stream element -> OpenAI's)
# --------------------------------------------------------------------------------------

# OpenAI request fields -> generationConfig (the first of two names for one field wins).
OPENAI_CONFIG = (("temperature", "temperature", float), ("top_p", "topP", float),
                 ("max_completion_tokens", "maxOutputTokens", int),
                 ("max_tokens", "maxOutputTokens", int), ("n", "candidateCount", int),
                 ("seed", "seed", int), ("presence_penalty", "presencePenalty", float),
                 ("frequency_penalty", "frequencyPenalty", float))
OPENAI_TOOL_CHOICE = {"auto": "AUTO", "none": "NONE", "required": "ANY"}


def _bad(message: str) -> GatewayError:
    return GatewayError(400, message, "invalid_request_error")


def openai_request(body: Any) -> tuple[str, dict[str, Any]]:
    """An OpenAI chat.completions request -> (model name, Gemini generateContent body)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _bad("'model' is required: a model id from GET /v1/models, or auto, auto-fast, "
                   "auto-quality, auto-balance")
    system, contents = openai_messages(body.get("messages"))
    request: dict[str, Any] = {"contents": contents}
    if system:
        request["systemInstruction"] = {"parts": [{"text": "\n\n".join(system)}]}
    config = openai_generation_config(body)
    if config:
        request["generationConfig"] = config
    tools = openai_tools(body.get("tools"))
    if tools:
        request["tools"] = tools
    choice = openai_tool_config(body.get("tool_choice"))
    if choice:
        request["toolConfig"] = choice
    return model.strip(), request


def openai_messages(messages: Any) -> tuple[list[str], list[dict[str, Any]]]:
    """OpenAI messages -> (system texts, Gemini contents): user -> "user", assistant ->
    "model" (tool_calls -> functionCall parts), tool -> "user" functionResponse parts."""
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list")
    system: list[str] = []
    contents: list[dict[str, Any]] = []
    called: dict[str, str] = {}                     # tool_call_id -> function name
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"{where} must be an object")
        role, content = message.get("role"), message.get("content")
        if role in ("system", "developer"):
            system.append(openai_text(content, where))
        elif role == "user":
            contents.append({"role": "user", "parts": openai_parts(content, where)})
        elif role == "assistant":
            parts = [{"text": text} for text in [openai_text(content, where)] if text]
            calls = message.get("tool_calls") or []
            if not isinstance(calls, list):
                raise _bad(f"{where}.tool_calls must be a list")
            for n, call in enumerate(calls):
                name, args = openai_tool_call(call, f"{where}.tool_calls[{n}]")
                called[str(call.get("id"))] = name
                parts.append({"functionCall": {"name": name, "args": args}})
            if parts:
                contents.append({"role": "model", "parts": parts})
        elif role in ("tool", "function"):
            name = called.get(str(message.get("tool_call_id"))) or message.get("name")
            if not isinstance(name, str) or not name:
                raise _bad(f"{where}: a tool message must answer a tool_call_id of an "
                           "earlier assistant message")
            part = {"functionResponse": {"name": name,
                                         "response": tool_response(openai_text(content,
                                                                               where))}}
            previous = contents[-1] if contents else None
            if previous and previous["role"] == "user" and \
                    all("functionResponse" in p for p in previous["parts"]):
                previous["parts"].append(part)
            else:
                contents.append({"role": "user", "parts": [part]})
        else:
            raise _bad(f"{where}.role must be system, developer, user, assistant or tool, "
                       f"got {role!r}")
    if not contents:
        raise _bad("'messages' hold no user message")
    return system, contents


def openai_text(content: Any, where: str) -> str:
    """A message's text: a string, or the text parts of a list ("" for none)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content
                       if isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str))
    raise _bad(f"{where}.content must be a string or a list of parts")


def openai_parts(content: Any, where: str) -> list[dict[str, Any]]:
    """A user message's content -> Gemini parts: text, and images as data URLs."""
    if isinstance(content, str):
        return [{"text": content}]
    if not isinstance(content, list) or not content:
        raise _bad(f"{where}.content must be a string or a non-empty list of parts")
    parts = []
    for n, item in enumerate(content):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text" and isinstance(item.get("text"), str):
            parts.append({"text": item["text"]})
        elif kind == "image_url":
            image = item.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            parts.append(data_url_part(url, f"{where}.content[{n}]"))
        elif kind == "input_audio" and isinstance(item.get("input_audio"), dict):
            audio = item["input_audio"]
            parts.append({"inlineData": {"mimeType": f"audio/{audio.get('format', 'wav')}",
                                         "data": str(audio.get("data", ""))}})
        else:
            raise _bad(f"{where}.content[{n}] must be a text, image_url or input_audio part")
    return parts


def data_url_part(url: Any, where: str) -> dict[str, Any]:
    """data:<mime>;base64,<data> -> an inlineData part. Remote URLs are refused: the gateway
    fetches nothing on a client's behalf."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise _bad(f"{where}: images must be data URLs (data:image/png;base64,...); the "
                   "gateway does not fetch remote URLs")
    head, sep, data = url[len("data:"):].partition(",")
    mime, _, encoding = head.partition(";")
    if not sep or encoding != "base64" or not mime:
        raise _bad(f"{where}: a data URL must be data:<mime type>;base64,<data>")
    return {"inlineData": {"mimeType": mime, "data": data}}


def openai_tool_call(call: Any, where: str) -> tuple[str, dict[str, Any]]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise _bad(f"{where} must be a function call with a name")
    try:
        args = json.loads(function.get("arguments") or "{}")
    except (TypeError, ValueError, RecursionError):
        raise _bad(f"{where}.function.arguments is not JSON") from None
    return function["name"], args if isinstance(args, dict) else {"value": args}


def tool_response(text: str) -> dict[str, Any]:
    """A tool's answer as a functionResponse.response object."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return {"content": text}
    return value if isinstance(value, dict) else {"content": value}


def openai_generation_config(body: dict[str, Any]) -> dict[str, Any]:
    """temperature, top_p, max_tokens, n, seed, penalties, stop, response_format ->
    generationConfig."""
    config: dict[str, Any] = {}
    for name, target, kind in OPENAI_CONFIG:
        value = body.get(name)
        if value is None or target in config:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                kind is int and not isinstance(value, int) or not math.isfinite(value):
            raise _bad(f"'{name}' must be {'a whole number' if kind is int else 'a number'}")
        config[target] = value
    stop = body.get("stop")
    if isinstance(stop, str):
        config["stopSequences"] = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        config["stopSequences"] = stop
    elif stop is not None:
        raise _bad("'stop' must be a string or a list of strings")
    form = body.get("response_format")
    kind = form.get("type") if isinstance(form, dict) else None
    if kind == "json_object":
        config["responseMimeType"] = "application/json"
    elif kind == "json_schema":
        schema = (form.get("json_schema") or {}).get("schema") \
            if isinstance(form.get("json_schema"), dict) else None
        if not isinstance(schema, dict):
            raise _bad("response_format json_schema needs json_schema.schema (an object)")
        config.update(responseMimeType="application/json", responseJsonSchema=schema)
    elif form is not None and kind != "text":
        raise _bad("response_format.type must be text, json_object or json_schema")
    return config


def openai_tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI function tools -> one Gemini tool of functionDeclarations (JSON Schema)."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _bad("'tools' must be a list")
    declarations = []
    for n, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or \
                not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _bad(f"tools[{n}] must be a function tool with a name")
        declaration = {"name": function["name"]}
        if isinstance(function.get("description"), str):
            declaration["description"] = function["description"]
        if isinstance(function.get("parameters"), dict):
            declaration["parametersJsonSchema"] = function["parameters"]
        declarations.append(declaration)
    return [{"functionDeclarations": declarations}] if declarations else []


def openai_tool_config(choice: Any) -> dict[str, Any] | None:
    """tool_choice -> toolConfig.functionCallingConfig (auto, none, required, one name)."""
    if choice is None:
        return None
    if isinstance(choice, str) and choice in OPENAI_TOOL_CHOICE:
        return {"functionCallingConfig": {"mode": OPENAI_TOOL_CHOICE[choice]}}
    name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) and \
        isinstance(choice.get("function"), dict) else None
    if not isinstance(name, str):
        raise _bad("tool_choice must be auto, none, required or {\"type\": \"function\", "
                   "\"function\": {\"name\": ...}}")
    return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}}


def openai_finish_reason(finish: Any, tool_calls: bool) -> str | None:
    """Gemini's finishReason -> OpenAI's: STOP -> stop (tool_calls when it called one),
    MAX_TOKENS -> length, safety and recitation stops -> content_filter."""
    name = enum_name(finish, FINISH_NAMES)
    if not name:
        return None
    if name in BLOCKING_FINISH or name == "RECITATION":
        return "content_filter"
    if name == "MAX_TOKENS":
        return "length"
    return "tool_calls" if tool_calls else "stop"


def openai_usage(usage: Any) -> dict[str, Any]:
    """usageMetadata -> OpenAI usage (thinking counts as completion, as reasoning tokens)."""
    usage = usage if isinstance(usage, dict) else {}
    prompt, output = _int(usage.get("promptTokenCount")), _int(usage.get("candidatesTokenCount"))
    thoughts = _int(usage.get("thoughtsTokenCount"))
    return {"prompt_tokens": prompt, "completion_tokens": output + thoughts,
            "total_tokens": _int(usage.get("totalTokenCount")) or prompt + output + thoughts,
            "completion_tokens_details": {"reasoning_tokens": thoughts}}


def openai_candidate(candidate: dict[str, Any], first_call: int = 0
                     ) -> tuple[str, list[dict[str, Any]]]:
    """(the answer text without thoughts, its function calls as OpenAI tool_calls)."""
    content = candidate.get("content") if isinstance(candidate.get("content"), dict) else {}
    text, calls = [], []
    for part in content.get("parts") or []:
        if not isinstance(part, dict):
            continue
        if isinstance(part.get("text"), str) and not part.get("thought"):
            text.append(part["text"])
        call = part.get("functionCall")
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            calls.append({"index": first_call + len(calls),
                          "id": str(call.get("id") or f"call_{os.urandom(8).hex()}"),
                          "type": "function",
                          "function": {"name": call["name"],
                                       "arguments": json.dumps(call.get("args") or {})}})
    return "".join(text), calls


def openai_completion(answer: dict[str, Any], model: str, ident: str,
                      created: int) -> dict[str, Any]:
    """A Gemini generateContent answer -> an OpenAI chat.completion. A blocked prompt (no
    candidates) is one empty choice with finish_reason "content_filter"."""
    choices = []
    for i, candidate in enumerate(c for c in answer.get("candidates") or []
                                  if isinstance(c, dict)):
        text, calls = openai_candidate(candidate)
        message: dict[str, Any] = {"role": "assistant",
                                   "content": text if text or not calls else None}
        if calls:
            message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"}
                                     for c in calls]
        choices.append({"index": candidate.get("index", i), "message": message,
                        "finish_reason": openai_finish_reason(candidate.get("finishReason"),
                                                              bool(calls)) or "stop",
                        "logprobs": None})
    if not choices:
        choices = [{"index": 0, "message": {"role": "assistant", "content": None},
                    "finish_reason": "content_filter", "logprobs": None}]
    return {"id": ident, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": openai_usage(answer.get("usageMetadata"))}


class OpenAIChunker:
    """Gemini stream elements -> OpenAI chat.completion.chunk objects, one choice per
    candidate: the role first, then content and tool_calls deltas, the finish reason, and
    with stream_options.include_usage a last chunk carrying the usage."""

    def __init__(self, model: str, ident: str, created: int, include_usage: bool = False):
        self.model, self.ident, self.created = model, ident, created
        self.include_usage = include_usage
        self.started: set[int] = set()
        self.calls: dict[int, int] = {}              # choice -> tool calls sent
        self.usage: Any = None
        self.blocked = False

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.ident, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": choices}

    def chunks(self, element: dict[str, Any]) -> list[dict[str, Any]]:
        self.usage = element.get("usageMetadata") or self.usage
        feedback = element.get("promptFeedback")
        if isinstance(feedback, dict) and feedback.get("blockReason"):
            self.blocked = True
        out = []
        for i, candidate in enumerate(c for c in element.get("candidates") or []
                                      if isinstance(c, dict)):
            index = candidate.get("index", i)
            text, calls = openai_candidate(candidate, self.calls.get(index, 0))
            delta: dict[str, Any] = {}
            if index not in self.started:
                self.started.add(index)
                delta["role"] = "assistant"
                delta["content"] = ""
            if text:
                delta["content"] = text
            if calls:
                delta["tool_calls"] = calls
                self.calls[index] = self.calls.get(index, 0) + len(calls)
            finish = openai_finish_reason(candidate.get("finishReason"),
                                          bool(self.calls.get(index)))
            if delta or finish:
                out.append(self.chunk([{"index": index, "delta": delta, "finish_reason": finish,
                                        "logprobs": None}]))
        return out

    def final(self) -> list[dict[str, Any]]:
        out = []
        if self.blocked and not self.started:
            out.append(self.chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": "content_filter", "logprobs": None}]))
        if self.include_usage:
            out.append({**self.chunk([]), "usage": openai_usage(self.usage)})
        return out


# --------------------------------------------------------------------------------------
# Gateway: `serve`, and `route` through a running gateway (GEMINI_ROUTER_SERVER)
# --------------------------------------------------------------------------------------

def serve_stack() -> Any:
    """uvicorn, or a ConfigError saying how to install the `serve` extra."""
    try:
        import aiohttp
        import fastapi
        import prometheus_client
        import uvicorn
    except ImportError as exc:
        raise ConfigError(f"serve needs {exc.name or 'its server stack'}: "
                          f"{SERVE_HINT}") from None
    del aiohttp, fastapi, prometheus_client     # imported here only to say what is missing
    return uvicorn


def listen_socket(host: str, port: int) -> Any:
    """A listening TCP socket on host:port (port 0: any free one), or a ConfigError."""
    import socket
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except OSError as exc:
        raise ConfigError(f"--host {host}: {exc.strerror or exc}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def cmd_serve(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    """Serve the gateway until SIGINT/SIGTERM: then stop accepting, let requests in flight
    finish, write what is pending, and exit 0."""
    settings.require_keys()
    host, port = args.host.strip(), int(args.port)
    if not settings.client_keys and not is_loopback(host):
        raise ConfigError(f"refusing to serve on {host} without client keys: anyone who "
                          "reaches it could spend your Gemini keys. Set "
                          "GEMINI_ROUTER_CLIENT_KEYS='secret:name,...', or serve on "
                          "127.0.0.1")
    uvicorn = serve_stack()
    sock = listen_socket(host, port)
    gateway = Gateway(settings, out)
    gateway.warm()
    # proxy_headers off: nothing here uses the client's address, so X-Forwarded-* need not
    # be parsed on every request.
    config = uvicorn.Config(build_app(gateway), log_level="warning", access_log=False,
                            server_header=False, lifespan="on", timeout_keep_alive=30,
                            proxy_headers=False,
                            timeout_graceful_shutdown=max(settings.deadline,
                                                          settings.timeout) + 10)

    class GracefulServer(uvicorn.Server):  # type: ignore[misc, valid-type]
        """uvicorn, without re-raising the signal after its graceful stop: SIGINT and
        SIGTERM end `serve` with exit 0 once the requests in flight are answered."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            import signal
            import threading
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    tune_server_process()
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    clients = ", ".join(name for _, name in settings.client_keys)
    out.note(f"serving on http://{shown}:{bound[1]} with {len(settings.keys)} key(s); "
             + (f"clients: {clients}" if clients else "no client keys: loopback only")
             + "; Ctrl-C stops")
    GracefulServer(config).run(sockets=[sock])
    out.note("stopped")
    return 0


def tune_server_process() -> None:
    """Latency settings for a long-lived server process, after everything is imported:
    the objects alive now (the SDK's modules, the app) leave the garbage collector's
    sight, so a full collection no longer pauses every request in flight for tens of ms;
    and threads hand over the interpreter every 0.5 ms instead of 5, so the event loop is
    not kept waiting behind a worker thread (measured side by side against 1 ms: at 32
    requests in flight, 0.2 ms less at p50 and a shorter p99)."""
    import gc
    gc.collect()
    gc.freeze()
    sys.setswitchinterval(0.0005)


def gateway_route(args: argparse.Namespace) -> Callable[..., RouteResult]:
    """`route_prompt`'s stand-in when GEMINI_ROUTER_SERVER is set: the same request, routed
    by the running gateway. Only flags given on this command line override its budget."""
    budget = {name: getattr(args, name, None) for name in ("max_attempts", "deadline")}
    budget["timeout"] = getattr(args, "timeout", None)

    def route(settings: Settings, store: Any, prompt: PromptRequest, *,
              model: str | None = None, tier: str | None = None,
              on_text: Callable[[str], None] | None = None,
              out: Output | None = None) -> RouteResult:
        return route_via_server(settings, prompt, model=model, tier=tier, on_text=on_text,
                                out=out or Output(),
                                budget={k: v for k, v in budget.items() if v is not None})
    return route


def route_via_server(settings: Settings, prompt: PromptRequest, *, model: str | None,
                     tier: str | None, on_text: Callable[[str], None] | None, out: Output,
                     budget: dict[str, Any]) -> RouteResult:
    """Send one route to the gateway at settings.server (no SDK, no HTTP library: see
    `post_to_gateway`) and return its result, or raise the error it reports, with the same
    exit code and words as a direct route."""
    import base64
    payload = {"prompt": prompt.text, "system": prompt.system, "options": prompt.options,
               "wire_options": prompt.wire_options, "schema": prompt.schema,
               "attachments": [[mime, base64.b64encode(data).decode()]
                               for mime, data in prompt.attachments],
               "model": model, "tier": tier, "stream": on_text is not None,
               "verbose": out.verbose, **budget}
    headers = {"content-type": "application/json", "accept": "application/json"}
    if settings.client_key:
        if not all(32 <= ord(ch) < 127 for ch in settings.client_key):
            raise ConfigError("GEMINI_ROUTER_CLIENT_KEY holds characters a header cannot carry")
        headers["authorization"] = f"Bearer {settings.client_key}"
    wait = budget.get("deadline", settings.deadline) + budget.get("timeout", settings.timeout)
    try:
        answer = post_to_gateway(settings.server, "/v1/router/route",
                                 json.dumps(payload).encode(), headers, wait)
    except OSError as exc:
        raise NothingAvailable(f"cannot reach the gateway {settings.server} "
                               f"(GEMINI_ROUTER_SERVER): {exc.strerror or exc}") from None
    with answer:
        kind = answer.headers.get("content-type", "")
        if answer.status == 401:
            raise ConfigError(f"the gateway {settings.server} refused the client key: set "
                              "GEMINI_ROUTER_CLIENT_KEY to one of its GEMINI_ROUTER_CLIENT_KEYS "
                              "secrets")
        if not kind.startswith(("application/json", "application/x-ndjson")):
            raise ConfigError(f"{settings.server} is not a {PROG} gateway: HTTP "
                              f"{answer.status} with a {kind.split(';')[0] or 'untyped'} body")
        try:
            # A streamed route sends its events as JSON lines, a plain one a single document.
            lines = answer.lines() if kind.startswith("application/x-ndjson") \
                else [answer.read()]
            for line in lines:
                event = _safe_loads(line)
                if event is None:
                    break
                for level, message in gateway_log_lines(event):
                    (out.info if level == "info" else out.note)(message)
                if "text" in event and on_text is not None:
                    on_text(event["text"])
                if "result" in event:
                    data = event["result"]
                    return RouteResult(**{**data, "attempts": [Attempt(**a)
                                                               for a in data["attempts"]]})
                if "error" in event:
                    raise gateway_error_of(event["error"], settings.server)
        except OSError as exc:
            raise UpstreamError(f"the answer of the gateway {settings.server} broke off: "
                                f"{exc.strerror or exc}") from None
    raise UpstreamError(f"the gateway {settings.server} ended its answer without a result")


class GatewayAnswer:
    """An HTTP/1.1 response read off a socket: status, headers, and its body by lines or
    whole (Content-Length, chunked, or until the connection closes)."""

    def __init__(self, sock: Any, reader: Any):
        self.sock, self.reader = sock, reader
        status = reader.readline().split(None, 2)
        if len(status) < 2 or not status[0].startswith(b"HTTP/") or not status[1].isdigit():
            raise OSError("not an HTTP answer")
        self.status = int(status[1])
        self.headers: dict[str, str] = {}
        while (line := reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            self.headers[name.strip().lower()] = value.strip()

    def __enter__(self) -> GatewayAnswer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.reader.close()
        self.sock.close()

    def pieces(self) -> Iterator[bytes]:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while size := int(self.reader.readline().split(b";")[0].strip() or b"0", 16):
                data = self.reader.read(size)
                if len(data) < size:
                    raise OSError("the answer was cut off")
                self.reader.readline()
                yield data
        elif "content-length" in self.headers:
            yield self.reader.read(int(self.headers["content-length"]))
        else:
            yield self.reader.read()

    def lines(self) -> Iterator[bytes]:
        buffer = b""
        for piece in self.pieces():
            buffer += piece
            *complete, buffer = buffer.split(b"\n")
            yield from complete
        if buffer:
            yield buffer

    def read(self) -> bytes:
        return b"".join(self.pieces())


def post_to_gateway(server: str, path: str, body: bytes, headers: dict[str, str],
                    timeout: float) -> GatewayAnswer:
    """POST to a gateway over a plain socket (TLS for https). Why not urllib: its imports
    (http.client, email) cost a forwarded `route` more than the rest of its start-up, and
    this one request to our own server needs none of what they offer."""
    import socket
    scheme, _, authority = server.partition("://")
    if authority.startswith("["):
        host, _, port = authority[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = authority.partition(":")
    sock = socket.create_connection((host, int(port) if port else 443 if scheme == "https"
                                     else 80), timeout=timeout)
    try:
        if scheme == "https":
            import ssl
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        head = [f"POST {path} HTTP/1.1", f"host: {authority}", f"content-length: {len(body)}",
                "connection: close", *(f"{k}: {v}" for k, v in headers.items())]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        return GatewayAnswer(sock, sock.makefile("rb"))
    except BaseException:
        sock.close()
        raise


def gateway_log_lines(event: dict[str, Any]) -> list[tuple[str, str]]:
    """The (level, message) lines of a gateway's route event: a streamed event carries one,
    a whole answer all of them."""
    log = event.get("log")
    if not isinstance(log, list) or not log:
        return []
    lines = [log] if isinstance(log[0], str) else log
    return [(str(line[0]), str(line[1])) for line in lines
            if isinstance(line, list) and len(line) == 2]


def gateway_error_of(error: Any, server: str) -> RouterError:
    """The RouterError a gateway reported for a route, with its exit code and message."""
    if not isinstance(error, dict) or "exit_code" not in error:
        message = error.get("message") if isinstance(error, dict) else None
        return ConfigError(f"{server} is not a {PROG} gateway: {message or 'unexpected answer'}")
    code, message = error["exit_code"], str(error.get("message", ""))
    if code == 4:
        return NothingAvailable(message, error.get("until"), bool(error.get("rate_limited")))
    cls = {1: UpstreamError, 2: UsageError, 3: ConfigError, 130: Interrupted}.get(code,
                                                                                 UpstreamError)
    return cls(message)


# ======================================================================================
# CLI
# ======================================================================================

GENERATION_OPTIONS: dict[str, Callable[[str], Any]] = {
    "temperature": float, "top_p": float, "top_k": int, "max_output_tokens": int,
    "stop": str, "candidate_count": int, "response_mime_type": str,
    "presence_penalty": float, "frequency_penalty": float,
}
def _thinking_level(text: str) -> str:
    if text.lower() not in ("low", "high"):
        raise ValueError(text)
    return text.lower()


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(text)
    return text.lower() in ("true", "1", "yes")


OPTION_KINDS = {float: "a number", int: "an integer", str: "text",
                _thinking_level: "low or high", _boolean: "true or false"}
# Fields the pinned SDK (google-ai-generativelanguage 0.6.15) has no place for.
# Options the pinned SDK's GenerationConfig has no field for: sent as JSON beside it.
WIRE_OPTIONS: dict[str, Callable[[str], Any]] = {
    "seed": int, "thinking_budget": int, "thinking_level": _thinking_level,
    "include_thoughts": _boolean}
# Where each wire option goes in generationConfig (JSON names; nested for thinkingConfig).
WIRE_FIELDS = {"seed": ("seed",), "thinking_budget": ("thinkingConfig", "thinkingBudget"),
               "thinking_level": ("thinkingConfig", "thinkingLevel"),
               "include_thoughts": ("thinkingConfig", "includeThoughts")}


class Output:
    """Where every message goes: results to stdout, everything else to stderr.

    A status line (a slow attempt, a --wait countdown) is drawn only when stderr is a
    terminal: one line rewritten in place with \\r and erased when it is done, so it never
    reaches a pipe or a log file and never sits inside the answer on stdout."""

    SLOW_ATTEMPT_S = 2.0      # an attempt slower than this gets a status line

    def __init__(self, json_mode: bool = False, quiet: bool = False, verbose: bool = False):
        self.json_mode = json_mode
        self.quiet = quiet
        self.verbose = verbose
        self._ticker: tuple[Any, Any] | None = None     # (threading.Event, Thread)
        self._drawn = False
        # Set while a status thread runs (threading is imported only then): it keeps a
        # message from landing in the middle of a half-drawn status line.
        self._lock: Any = contextlib.nullcontext()

    def info(self, message: str) -> None:
        """-v detail."""
        if self.verbose and not self.quiet:
            self._line(f"{PROG}: {message}")

    def note(self, message: str) -> None:
        """Ordinary progress messages and hints; -q silences them."""
        if not self.quiet:
            self._line(f"{PROG}: {message}")

    def hint(self, message: str) -> None:
        """Advice beside a human table (stderr, so a script reading stdout never gets it)."""
        if not self.json_mode:
            self.note(message)

    def emit(self, data: Any, human: Callable[[], str]) -> None:
        text = json.dumps(data, indent=2, sort_keys=True) if self.json_mode else human()
        if text:
            sys.stdout.write(text if text.endswith("\n") else text + "\n")

    # --- status lines -------------------------------------------------------------------

    def live(self) -> bool:
        """Whether status lines are drawn: stderr is a terminal and -q is not given."""
        return not self.quiet and _isatty(sys.stderr)

    def _line(self, text: str) -> None:
        with self._lock:
            self.erase_status()
            print(text, file=sys.stderr)

    def _draw(self, text: str) -> None:
        try:
            width = os.get_terminal_size(sys.stderr.fileno()).columns or 80
        except (OSError, ValueError, AttributeError):
            width = 80
        # A line longer than the terminal wraps, and \r could no longer erase all of it.
        if len(text) >= width:
            text = text[:max(1, width - 2)] + "…"
        with self._lock:
            sys.stderr.write("\r\x1b[K" + text)
            sys.stderr.flush()
            self._drawn = True

    def erase_status(self) -> None:
        with self._lock:
            if self._drawn:
                self._drawn = False
                sys.stderr.write("\r\x1b[K")
                sys.stderr.flush()

    def attempt_started(self, model: str, key_label: str, timeout_s: float) -> None:
        """An upstream call began. Past SLOW_ATTEMPT_S a terminal shows what it waits for and
        when it gives up, once a second; without a terminal -v says it once."""
        self.attempt_finished()
        if not self.live() and not (self.verbose and not self.quiet):
            return
        import threading
        if isinstance(self._lock, contextlib.nullcontext):
            self._lock = threading.RLock()
        stop = threading.Event()
        began = time.monotonic()
        draw = self.live()

        def tick() -> None:
            shown = self.SLOW_ATTEMPT_S
            while not stop.wait(max(0.0, began + shown - time.monotonic())):
                what = (f"waiting for {model} on {key_label}: {_duration(shown)} "
                        f"(gives up in {_duration(timeout_s - shown)})")
                if not draw:
                    self._line(f"{PROG}: {what}")
                    return
                self._draw(f"{PROG}: {what}")
                shown += 1
            self.erase_status()

        thread = threading.Thread(target=tick, name="gemini-router-status", daemon=True)
        self._ticker = (stop, thread)
        thread.start()

    def attempt_finished(self) -> None:
        """The call returned (or text began to arrive): stop and erase its status line."""
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            stop, thread = ticker
            stop.set()
            thread.join()
        self.erase_status()

    def wait_until(self, until: float, reason: str) -> None:
        """Sleep until `until` (unix time), saying why and for how long: one line, and on a
        terminal a countdown updated each second."""
        self.note(f"{reason}; waiting {_duration(until - time.time())} "
                  f"(until {_when(until)}), then trying again")
        wake = until + 0.05       # just after: what ends at `until` has then ended
        try:
            while (left := wake - time.time()) > 0:
                shown = max(0.0, until - time.time())
                if self.live():
                    self._draw(f"{PROG}: waiting for the earliest recovery: "
                               f"{_duration(shown)} left (Ctrl-C stops)")
                # Wake when the whole number of seconds shown changes.
                time.sleep(min(left, shown - math.ceil(shown) + 1.005 if shown > 1 else left))
        finally:
            self.erase_status()


def _fmt_num(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.{digits}f}"


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{math.ceil(seconds)} s"
    if seconds < 5400:
        return f"{math.ceil(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def _when(moment: float, now: float | None = None) -> str:
    """A local clock time: '14:05:00' today, '2026-12-01 00:00 PST' on any other day."""
    local = time.localtime(moment)
    if local[:3] == time.localtime(time.time() if now is None else now)[:3]:
        return time.strftime("%H:%M:%S", local)
    return time.strftime("%Y-%m-%d %H:%M %Z", local)


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """Aligned columns; numbers right-aligned with one precision per column, text
    left-aligned."""
    cells = [[("-" if c is None else str(c)) for c in row] for row in rows]
    numeric = [bool(cells) and all(_looks_numeric(r[i]) for r in cells)
               for i in range(len(headers))]
    for i, num in enumerate(numeric):
        if num:
            for r, text in zip(cells, _same_precision([r[i] for r in cells])):
                r[i] = text
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()
    return "\n".join([line(headers)] + [line(r) for r in cells])


def _looks_numeric(text: str) -> bool:
    return text == "-" or text.lstrip("-").replace(".", "", 1).replace("%", "") \
        .replace(" s", "").isdigit()


def _same_precision(column: list[str]) -> list[str]:
    """Numbers of one column with as many decimals as the most precise one: '1' beside
    '0.25' becomes '1.00'."""
    def split(text: str) -> tuple[str, str, str]:
        unit = next((u for u in ("%", " s") if text.endswith(u)), "")
        whole, _, decimals = text[:len(text) - len(unit)].partition(".")
        return whole, decimals, unit
    digits = max((len(split(t)[1]) for t in column if t != "-"), default=0)
    if not digits:
        return column
    return [t if t == "-" else f"{w}.{d.ljust(digits, '0')}{u}"
            for t, (w, d, u) in ((t, split(t)) for t in column)]


def parse_options(pairs: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """-o KEY=VALUE pairs -> (GenerationConfig fields, WIRE_OPTIONS fields).

    An unknown key or a value of the wrong type is a usage error listing the valid ones."""
    kinds = {**GENERATION_OPTIONS, **WIRE_OPTIONS}
    valid = ", ".join(f"{name} ({OPTION_KINDS[kind]})" for name, kind in sorted(kinds.items()))
    options: dict[str, Any] = {}
    wire: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        name = name.strip().replace("-", "_")
        if not sep:
            raise UsageError(f"option {pair!r} is not KEY=VALUE; valid options: {valid}")
        if name not in kinds:
            raise UsageError(f"unknown option {name!r}; valid options: {valid}")
        kind = kinds[name]
        try:
            value = kind(raw.strip())
            if kind is float and not math.isfinite(value):
                raise ValueError(raw)
        except ValueError:
            raise UsageError(f"option {name} needs {OPTION_KINDS[kind]}, got {raw!r}; "
                             f"valid options: {valid}") from None
        if name == "stop":
            options.setdefault("stop_sequences", []).append(value)
        elif name in WIRE_OPTIONS:
            *parents, leaf = WIRE_FIELDS[name]
            target = wire
            for parent in parents:
                target = target.setdefault(parent, {})
            target[leaf] = value
        else:
            options[name] = value
    return options, wire


def split_model_options(spec: str | None) -> tuple[str | None, list[str]]:
    """'gemini-2.5-flash?temperature=0.3&max_output_tokens=200' -> (name, ['k=v', ...])."""
    if not spec or "?" not in spec:
        return spec, []
    name, _, query = spec.partition("?")
    return name, [p for p in query.split("&") if p]


SCHEMA_KEYS = {"type", "format", "description", "nullable", "enum", "items", "properties",
               "required", "minItems", "maxItems"}
SCHEMA_IGNORED = {"$schema", "$id", "title", "additionalProperties", "default", "examples"}


SCHEMA_MAX_DEPTH = 32


def schema_to_proto(node: Any, where: str = "schema", depth: int = 0) -> dict[str, Any]:
    """A JSON Schema subset -> the Schema proto's dict form (type names upper-case)."""
    if not isinstance(node, dict):
        raise UsageError(f"{where} must be a JSON object")
    if depth > SCHEMA_MAX_DEPTH:
        raise UsageError(f"schema nests deeper than {SCHEMA_MAX_DEPTH} levels")
    unknown = set(node) - SCHEMA_KEYS - SCHEMA_IGNORED
    if unknown:
        raise UsageError(f"{where}: unsupported schema keyword(s) {', '.join(sorted(unknown))}; "
                         f"supported: {', '.join(sorted(SCHEMA_KEYS))}")
    out: dict[str, Any] = {}
    kind = node.get("type")
    if isinstance(kind, list):      # ["string", "null"] -> nullable string
        out["nullable"] = "null" in kind
        kind = next((k for k in kind if k != "null"), None)
    if not isinstance(kind, str) or kind.upper() not in (
            "STRING", "NUMBER", "INTEGER", "BOOLEAN", "ARRAY", "OBJECT"):
        raise UsageError(f"{where}: 'type' must be one of string, number, integer, boolean, "
                         "array, object")
    out["type_"] = kind.upper()
    for name, proto_name in (("format", "format_"), ("description", "description"),
                             ("nullable", "nullable"), ("enum", "enum"),
                             ("required", "required"), ("minItems", "min_items"),
                             ("maxItems", "max_items")):
        if name in node:
            out[proto_name] = node[name]
    if "items" in node:
        out["items"] = schema_to_proto(node["items"], f"{where}.items", depth + 1)
    if "properties" in node:
        if not isinstance(node["properties"], dict):
            raise UsageError(f"{where}.properties must be an object")
        out["properties"] = {k: schema_to_proto(v, f"{where}.properties.{k}", depth + 1)
                             for k, v in node["properties"].items()}
    return out


def read_stdin_prompt() -> str | None:
    """stdin, when it is a pipe or a file (never a terminal, /dev/null or a socket)."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return None
    if not (stat.S_ISFIFO(mode) or stat.S_ISREG(mode)):
        return None
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError("stdin is not valid UTF-8") from None


# Binary input on `-a -` has no file name to guess a type from: its first bytes tell.
STDIN_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
               (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"),
               (b"%PDF-", "application/pdf"))


def read_stdin_attachment() -> str | tuple[str, bytes]:
    """What `-a -` asked for: stdin as text (str) or as a typed binary attachment."""
    try:
        if sys.stdin.isatty():
            raise UsageError("-a - reads stdin, but stdin is a terminal: pipe or redirect "
                             "something into it")
        data = sys.stdin.buffer.read()
    except (OSError, ValueError, AttributeError):
        raise UsageError("-a - reads stdin, but there is no stdin to read") from None
    if not data.strip():
        raise UsageError("-a - reads stdin, but stdin is empty")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    mime = next((m for magic, m in STDIN_MAGIC if data.startswith(magic)), None)
    if mime is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        mime = "image/webp"
    if mime is None:
        raise UsageError("-a -: stdin is neither UTF-8 text nor a PNG, JPEG, GIF, WebP or "
                         "PDF file")
    return mime, data


def build_prompt(args: argparse.Namespace) -> tuple[PromptRequest, str | None]:
    """(the prompt, the -m model name without its ?options).

    The prompt is the argument; stdin is read only when asked for: as the prompt when there
    is no argument (or it is '-'), as text put before the argument (or an image or PDF
    attached) with `-a -`. A `while read` loop or a parent that never closes stdin thus
    neither loses input nor hangs. Then the system text, generation options (from -o and
    the model string) and attached files."""
    argument = None if args.prompt == "-" else args.prompt
    # argv that is not UTF-8 arrives as lone surrogates, which cannot be sent anywhere.
    for text, what in ((argument, "the prompt"), (args.system, "--system"),
                       (args.model, "--model"), *((o, "-o") for o in args.option or [])):
        if text is not None and not _is_utf8(text):
            raise UsageError(f"{what} is not valid UTF-8")
    paths = args.attach or []
    if paths.count("-") > 1:
        raise UsageError("-a - is given twice, but stdin can be read only once")
    if "-" in paths and args.prompt == "-":
        raise UsageError("the prompt '-' and -a - both ask for stdin: give the prompt as "
                         "an argument")
    stdin_text, stdin_file = None, None
    if "-" in paths:
        piped = read_stdin_attachment()
        stdin_text, stdin_file = (piped, None) if isinstance(piped, str) else (None, piped)
    elif argument is None:
        stdin_text = read_stdin_prompt()
    pieces = [p for p in (stdin_text, argument) if p is not None and p.strip()]
    if not pieces:
        raise UsageError("empty prompt: give it as an argument or on stdin")
    model_name, model_opts = split_model_options(args.model)
    options, wire_options = parse_options(model_opts + (args.option or []))
    attachments = [stdin_file if path == "-" else read_attachment(path) for path in paths
                   if path != "-" or stdin_file is not None]
    schema = None
    if args.schema:
        try:
            with open(args.schema, encoding="utf-8") as f:
                schema = schema_to_proto(json.loads(f.read()))
        except OSError as exc:
            raise UsageError(f"cannot read schema {args.schema}: {exc.strerror or exc}") \
                from None
        except ValueError as exc:
            raise UsageError(f"schema {args.schema} is not valid JSON: {exc}") from None
        except RecursionError:
            raise UsageError(f"schema {args.schema} nests too deeply") from None
    prompt = PromptRequest(text="\n\n".join(pieces), system=args.system, options=options,
                           attachments=attachments, schema=schema, wire_options=wire_options)
    return prompt, model_name


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_attachment(path: str) -> tuple[str, bytes]:
    import mimetypes
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise UsageError(f"cannot read attachment {path}: {exc.strerror or exc}") from None
    mime = mimetypes.guess_type(path)[0]
    if mime is None:
        try:
            data.decode("utf-8")
            mime = "text/plain"
        except UnicodeDecodeError:
            raise UsageError(f"attachment {path}: unknown file type (use a known "
                             "extension such as .png, .jpg, .pdf, .txt)") from None
    return mime, data


# --- command handlers -----------------------------------------------------------------

def cmd_route(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    # With GEMINI_ROUTER_SERVER the gateway routes (see "Gateway"); the rest is the same.
    route = gateway_route(args) if settings.server and not args.dry_run else route_prompt
    prompt, model = build_prompt(args)
    store = open_store(settings)
    if args.dry_run:
        return dry_run(settings, store, model, args.tier, out)
    streamed: list[str] = []

    def on_text(piece: str) -> None:
        # Text is arriving: the attempt no longer waits, and a status line must not end
        # up inside the answer.
        out.attempt_finished()
        streamed.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()

    deadline = None if args.wait is None else time.time() + args.wait
    while True:
        try:
            # Under --json the answer goes out in one document at the end, so there is
            # nothing to stream to the user.
            streaming = args.stream and not out.json_mode
            result = route(settings, store, prompt, model=model, tier=args.tier,
                           on_text=on_text if streaming else None, out=out)
            break
        except UpstreamError:
            if streamed and not streamed[-1].endswith("\n"):
                sys.stdout.write("\n")      # keep the error off the partial answer's line
            raise
        except NothingAvailable as exc:
            if deadline is None:
                raise
            until = waitable_until(exc, deadline, args.wait)
            out.wait_until(until, str(exc))
    out.attempt_finished()
    if out.json_mode:
        out.emit(result.as_json(), str)
    elif args.stream:
        if streamed and not streamed[-1].endswith("\n"):
            sys.stdout.write("\n")
    else:
        sys.stdout.write(result.text if result.text.endswith("\n") else result.text + "\n")
    if result.finish_reason not in ("STOP", ""):
        out.note(f"answer ended with finish reason {result.finish_reason}")
    if result.cached:
        out.info(f"answered from the cache in {result.latency_s:.2f} s (no upstream call)")
    else:
        out.info(f"answered by {result.model} with {result.key} in {result.latency_s:.2f} s "
                 f"after {len(result.attempts)} attempt(s)")
    return 0


def waitable_until(exc: NothingAvailable, deadline: float, wait: float) -> float:
    """When --wait may sleep until: the earliest recovery, if it comes before the deadline;
    otherwise `exc` again, saying why waiting would not help."""
    if exc.until is None:
        raise NothingAvailable(f"{exc}; --wait has nothing to wait for: no recovery time is "
                               "known", None) from None
    if exc.until > deadline:
        raise NothingAvailable(f"{exc}; earliest recovery in "
                               f"{_duration(exc.until - time.time())} is beyond --wait "
                               f"{wait:g} s", exc.until) from None
    return exc.until


def dry_run(settings: Settings, store: StateStore, model: str | None, tier: str | None,
            out: Output) -> int:
    """Explain the choice a route would make, without calling the API."""
    settings.require_keys()
    with store.transaction(write=False) as tx:
        now = time.time()
        models = cached_model_list(tx.router, settings, now)
        if models is None:
            data = {"model": None, "key": None, "why": "no cached model list", "order": [],
                    "skipped": [], "model_list": "not cached"}
            out.emit(data, lambda: f"would use: unknown (no cached model list; "
                                   f"'{PROG} models' fetches it)")
            return 0
        model = resolve_model(model, models) if model else None
        plan = plan_route(tx, models, model, tier)
        session = RouteSession(settings, plan, tx.router["next_key"])
        choice = session.choose(StateView(settings, tx.cooldowns, tx.router), now)
    skipped = [{"target": what, "until": b.until, "reason": b.reason}
               for what, b in session.skipped.items()]
    data = {"model": choice[0] if choice else None, "key": choice[1].label if choice else None,
            "why": plan.why, "order": plan.models, "skipped": skipped, "model_list": "cached"}

    def human() -> str:
        lines = [f"would use: {data['model']} with {data['key']}" if choice
                 else "would use: nothing (every candidate is cooling down or disabled)",
                 f"because:   {plan.why}",
                 f"order:     {', '.join(plan.models[:10])}"
                 + (" …" if len(plan.models) > 10 else "")]
        for s in skipped:
            left = "disabled" if s["until"] is None else f"{_duration(s['until'] - now)} left"
            lines.append(f"skipped:   {s['target']}: {s['reason']} ({left})")
        return "\n".join(lines)
    out.emit(data, human)
    return 0 if choice else 4


def cmd_rank(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    import fnmatch
    store = open_store(settings)
    with store.transaction(write=False) as tx:
        relisting = args.refresh or cached_model_list(tx.router, settings, time.time()) is None
    models = known_models(settings, store, refresh=args.refresh, out=out)
    names = text_model_names(models)
    if not names:
        raise NothingAvailable(f"the model list has no text model ('{PROG} models --all' "
                               "shows what it has)")
    if args.models:
        patterns = [p.strip() for p in args.models.split(",") if p.strip()]
        names = [n for n in names if any(fnmatch.fnmatch(n, bare_model(p)) or bare_model(p) in n
                                         for p in patterns)]
        if not names:
            raise UsageError(f"no text model matches {args.models!r}")
    progress = sys.stderr.isatty() and not out.quiet
    run = probe_models(settings, store, names, args.rounds, args.concurrency, progress)
    reached = [r for r in run.results if r.outcome.kind != "unreachable"]
    if not reached:
        if run.results:
            raise NothingAvailable(f"cannot reach {settings.endpoint}: "
                                   f"{run.results[-1].outcome.detail}")
        raise NothingAvailable("nothing could be probed: every key is disabled or cooling "
                               f"for every model; see '{PROG} cooldowns'")
    cost = probe_cost(run, len(names), int(args.rounds), relisting)
    if not any(r.outcome.answered for r in run.results):
        # Refusals of the caller or the endpoint: no other model or key would do better.
        ending = next((r.outcome for r in run.results
                       if r.outcome.kind in ("location", "not_gemini")), None)
        if ending is not None:          # e.g. a location refusal: nothing else would work
            raise _error_for(ending, "no probe succeeded: ")
        raise NothingAvailable(f"no probe succeeded: {cost}; {no_success_reason(run)}")
    out.note(cost)
    return cmd_tiers(args, settings, out)


def probe_cost(run: ProbeRun, models: int, rounds: int, relisted: bool) -> str:
    """What a rank spent, in upstream calls: one per probe result, plus the model list."""
    calls = len(run.results)
    ok = sum(1 for r in run.results if r.outcome.kind == "ok")
    failed: dict[str, int] = {}
    for r in run.results:
        if r.outcome.kind != "ok":
            failed[r.outcome.kind] = failed.get(r.outcome.kind, 0) + 1
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(failed.items(),
                                                          key=lambda kv: (-kv[1], kv[0])))
    text = (f"probed {models} model(s) x {rounds} round(s): {calls} call(s)"
            + (" + the model list" if relisted else "")
            + f", {ok} ok, {calls - ok} failed" + (f" ({kinds})" if kinds else ""))
    if run.skipped:
        text += f"; skipped (cooling): {', '.join(run.skipped)}"
    return text + f" in {run.seconds:.2f} s"


# Why no probe succeeded, when every failure was of one sort ("quota": any rate limit or
# quota outcome).
NO_SUCCESS_WHY = {
    "quota": f"every probe was rate-limited or out of quota; '{PROG} cooldowns' says when "
             "they recover",
    "transient": "every probe failed upstream (server errors or timeouts); try later",
    "key": f"every key was refused; see '{PROG} cooldowns'",
    "model_missing": f"no probed model was found; '{PROG} models --refresh' relists them",
}


def no_success_reason(run: ProbeRun) -> str:
    sorts = {"quota" if k in QUOTA_KINDS else "key" if OUTCOME_RULES[k].scope in (
        "key", "project_keys") else k for k in (r.outcome.kind for r in run.results)}
    if len(sorts) == 1 and next(iter(sorts)) in NO_SUCCESS_WHY:
        return NO_SUCCESS_WHY[sorts.pop()]
    return f"'{PROG} stats' shows each model's outcomes"


def cmd_tiers(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    with open_store(settings).transaction(write=False) as tx:
        rows = compute_tiers(all_stats(tx.stats), model_index(tx.router), args.scoring)
    data = {r.model: {k: v for k, v in asdict(r).items() if k != "model"}
            for r in rows.values()}
    out.emit(data, lambda: tiers_table(list(rows.values()), args.scoring))
    never = sum(1 for r in rows.values() if not r.samples)
    if not rows:
        out.hint(f"'{PROG} rank' lists and measures the models")
    elif never:
        out.hint(f"{never} model(s) not measured yet: '{PROG} rank' measures them")
    return 0


def tiers_table(rows: list[TierRow], scoring: str) -> str:
    """The tiers, the metric behind each letter, and a legend (human output only)."""
    if not rows:
        return "no models known yet"
    table = format_table(
        ["RANK", "MODEL", "FAST", "QUALITY", "BALANCE", "P50", "N", "SUCCESS", "CAPABILITY",
         "SCORE", "NOTE"],
        [[r.rank, r.model, _letter(r.fast, r), r.quality, _letter(r.balance, r),
          _secs(r.latency_p50_s), r.latency_samples, _rate(r.success_rate, r.judged),
          r.capability, _fmt_num(r.balance_score, 2), tier_note(r)] for r in rows])
    return f"{table}\n\n{tiers_legend(scoring)}"


def _letter(letter: str, row: TierRow) -> str:
    return letter + "?" if row.provisional else letter


def tier_note(row: TierRow) -> str:
    if not row.measured:
        if not row.samples:
            return "unmeasured: never tried"
        if row.judged and not row.success_rate:
            return f"unmeasured: 0 of {row.judged} answered"
        return "unmeasured: no answer timed yet"
    notes = []
    if row.provisional:
        notes.append(f"provisional: {row.latency_samples} answer(s)")
    if row.excluded:
        notes.append(f"{row.excluded} sample(s) of a failing key not counted")
    return "; ".join(notes)


def tiers_legend(scoring: str) -> str:
    balance = ("seed formula (1 - success)*1000 + P50 - output limit*0.1; lower is better"
               if scoring == "seed" else
               "SCORE = 0.5 x success + 0.3 x speed + 0.2 x capability, 0..1, higher is better")
    return "\n".join([
        "S/A/B/C  best 20% / next 30% / next 30% / last 20% of the models graded; ties share "
        "the better",
        f"FAST     P50 latency over N successful answers; closer than "
        f"{NOISE_FLOOR_S * 1000:.0f} ms, {NOISE_RELATIVE:.0%} or "
        f"{NOISE_STANDARD_ERRORS} standard errors is a tie",
        "QUALITY  from the model list (CAPABILITY): family (pro > flash > flash-lite > other "
        "Gemini > others),",
        "         then generation, size, thinking, output and input token limits",
        f"BALANCE  {balance}",
        "SUCCESS  answers / tries that judge the model (quota, key errors, keys that never "
        "worked: left out)",
        f"RANK     Balance order, the order routes try.  ? provisional: fewer than "
        f"{TRUSTED_ANSWERS} answers.",
        "         unmeasured: no successful answer, so C in Fast and Balance"])


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _rate(value: float | None, judged: int) -> str:
    """A success rate with what it rests on: '67% of 3'."""
    return "-" if value is None else f"{_pct(value)} of {judged}"


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def cmd_stats(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    with open_store(settings).transaction(write=False) as tx:
        stats = all_stats(tx.stats)
    data = {m: {k: v for k, v in asdict(s).items() if k != "model"} for m, s in stats.items()}

    def human() -> str:
        if not stats:
            return "no samples yet"
        table = format_table(
            ["MODEL", "SAMPLES", "SUCCESS", "P50", "P95", "IN TOK", "OUT TOK", "OUTCOMES"],
            [[s.model, s.samples, _rate(s.success_rate, s.judged), _secs(s.latency_p50_s),
              _secs(s.latency_p95_s), _fmt_num(s.prompt_tokens_avg, 0),
              _fmt_num(s.output_tokens_avg, 0),
              " ".join(f"{k}={v}" for k, v in sorted(s.outcomes.items()))]
             for s in stats.values()])
        excluded = [f"{s.model} ({s.excluded})" for s in stats.values() if s.excluded]
        if excluded:
            table += ("\n\nnot counted in SUCCESS, samples of keys that never worked on the "
                      f"model while another key did: {', '.join(excluded)}")
        return table
    out.emit(data, human)
    if not stats:
        out.hint(f"'{PROG} rank' measures the models; routes add samples too")
    return 0


def cooldown_entries(settings: Settings, cooldowns: dict[str, Any], router: dict[str, Any],
                     now: float) -> list[dict[str, Any]]:
    """Everything that keeps a call from being made now: cooldowns (earliest end first),
    pairs at a ceiling or a learned limit, then disabled keys."""
    entries = [{"model": e.get("model"), "key": settings.label_of(e.get("key")),
                "reason": e["reason"], "kind": e.get("kind"), "scope": e.get("scope", "pair"),
                "since": e.get("since"), "until": round(effective_until(e, now), 3),
                "remaining_s": round(effective_until(e, now) - now, 1)}
               for e in cooldowns["cooldowns"] if effective_until(e, now) > now]
    view = StateView(settings, cooldowns, router)
    for target in router["usage"]:
        fingerprint, _, model = target.partition("/")
        key = next((k for k in settings.keys if k.fingerprint == fingerprint), None)
        paced = key and view.pace_block(key, model, now)
        if paced:
            entries.append({"model": model, "key": key.label, "reason": paced.reason,
                            "kind": paced.kind, "scope": "pair", "since": None,
                            "until": round(paced.until, 3),
                            "remaining_s": round(paced.until - now, 1)})
    entries.sort(key=lambda e: e["until"])
    entries += [{"model": None, "key": settings.label_of(fp), "reason": d.get("reason", ""),
                 "kind": "disabled", "scope": "key", "since": d.get("since"), "until": None,
                 "remaining_s": None}
                for fp, d in sorted(cooldowns["disabled_keys"].items())]
    return entries


def learned_limits(settings: Settings, router: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-project limits learned from Google's quotaValue, with the keys they cover."""
    members: dict[str, list[str]] = {}
    for key in settings.keys:
        members.setdefault(settings.project_id(key), []).append(key.label)
    rows = []
    for target, learned in sorted(router["limits"].items()):
        project, _, model = target.partition("/")
        rows.append({"model": model, "keys": members.get(project, [f"key?{project[:6]}"]),
                     **{w: learned[w] for w in ("rpm", "rpd", "tpm") if learned.get(w)},
                     "learned": learned.get("learned")})
    return rows


def cmd_cooldowns(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    store = open_store(settings)
    if args.clear_all and args.clear is None:
        raise UsageError("--all goes with a bare --clear")
    if args.clear is not None:
        if args.clear == "" and not args.clear_all and not confirm_clear_all(out):
            return 0
        return clear_cooldowns(args.clear, settings, store, out)
    with store.transaction(write=False) as tx:
        now = time.time()
        entries = cooldown_entries(settings, tx.cooldowns, tx.router, now)
        limits = learned_limits(settings, tx.router)

    def human() -> str:
        lines = [format_table(
            ["MODEL", "KEY", "LEFT", "UNTIL", "REASON"],
            [[e["model"] or "(every model)", e["key"] or "(every key)",
              "disabled" if e["until"] is None else _duration(e["remaining_s"]),
              "-" if e["until"] is None else _when(e["until"], now),
              e["reason"]] for e in entries]) if entries else "no active cooldowns"]
        if limits:
            lines.append("\nlearned limits (paced under; from Google's quotaValue):")
            lines += [f"  {lim['model']} on {', '.join(lim['keys'])}: " + ", ".join(
                f"{lim[w]} {w}" for w in ("rpm", "rpd", "tpm") if lim.get(w)) for lim in limits]
        return "\n".join(lines)
    out.emit(entries, human)
    return 0


def confirm_clear_all(out: Output) -> bool:
    """Clearing everything throws away what Google said: asked on a terminal, refused in a
    script without --all."""
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        raise UsageError("a bare --clear clears every cooldown and disabled key: add --all "
                         "to do it from a script, or name a MODEL or key#N")
    sys.stderr.write(f"{PROG}: clear every cooldown, disabled key and learned limit? [y/N] ")
    sys.stderr.flush()
    answer = sys.stdin.readline().strip().lower()
    if answer not in ("y", "yes"):
        out.note("nothing cleared")
        return False
    return True


def clear_cooldowns(target: str, settings: Settings, store: StateStore, out: Output) -> int:
    """Clear every cooldown, those of one model, or those (and the disabling) of key#N - or of
    a key no longer configured, named by the tag `cooldowns` shows (key?abc123)."""
    fingerprint = None
    if target.startswith("key#"):
        index = target[4:]
        if not _is_decimal(index) or not 1 <= int(index) <= len(settings.keys):
            raise UsageError(f"{target}: no such key (configured: {len(settings.keys)})")
        fingerprint = settings.keys[int(index) - 1].fingerprint
    model = bare_model(target) if target and not target.startswith(("key#", "key?")) else None

    def matches(key_fp: str | None, entry_model: str | None) -> bool:
        if not target:
            return True
        if target.startswith("key?"):
            return key_fp is not None and key_fp.startswith(target[4:]) and len(target) > 5
        return (fingerprint is not None and key_fp == fingerprint) or \
            (model is not None and entry_model == model)

    with store.transaction() as tx:
        cooldowns, now = tx.cooldowns, time.time()
        prune_cooldowns(cooldowns, now)
        before = len(cooldown_entries(settings, cooldowns, tx.router, now))
        cooldowns["cooldowns"] = [e for e in cooldowns["cooldowns"]
                                  if not matches(e.get("key"), e.get("model"))]
        cooldowns["disabled_keys"] = {fp: d for fp, d in cooldowns["disabled_keys"].items()
                                      if not matches(fp, None)}
        for name in ("usage", "strikes"):
            tx.router[name] = {k: v for k, v in tx.router[name].items()
                               if not matches(*k.split("/", 1))}
        if not target:
            tx.router["limits"] = {}
        cleared = before - len(cooldown_entries(settings, cooldowns, tx.router, now))
    if target and not cleared:
        raise UsageError(f"{target!r} matches no active cooldown or disabled key; "
                         f"'{PROG} cooldowns' lists them")
    out.emit({"cleared": cleared}, lambda: f"cleared {cleared} cooldown(s)")
    return 0


def cmd_lock(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    store = open_store(settings)
    name = resolve_model(args.model, known_models(settings, store, out=out))
    with store.transaction() as tx:
        previous = tx.router.get("lock")
        tx.router["lock"] = name
    out.emit({"lock": name, "was": previous},
             lambda: f"locked to {name}" + ("" if not previous else " (unchanged)"
                                            if previous == name else f" (was {previous})"))
    out.note(f"'{PROG} unlock' releases it")
    return 0


def cmd_unlock(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    with open_store(settings).transaction() as tx:
        previous = tx.router.get("lock")
        tx.router["lock"] = None
    out.emit({"lock": None, "was": previous},
             lambda: f"unlocked (was {previous})" if previous else "not locked")
    return 0


def cmd_models(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    store = open_store(settings)
    models = known_models(settings, store, refresh=args.refresh, out=out)
    text = set(text_model_names(models))
    shown = [m for m in models if args.all or m["name"] in text]
    with store.transaction(write=False) as tx:
        now = time.time()
        stats = all_stats(tx.stats)
        locked = tx.router.get("lock")
        # Which keys cannot call each model now, and until when (None = disabled key).
        view = StateView(settings, tx.cooldowns, tx.router)
        blocked = {m["name"]: {k.label: b.until for k in settings.keys
                               if (b := view.block(k, m["name"], now))}
                   for m in shown}
        model_wide = {e["model"] for e in tx.cooldowns["cooldowns"]
                      if e["until"] > now and e.get("model") and e.get("key") is None}
    data = {m["name"]: {"display_name": m.get("display_name"), "input_limit": m["input_limit"],
                        "output_limit": m["output_limit"], "text": m["name"] in text,
                        "methods": m.get("methods"), "probed": m["name"] in stats,
                        "cooling": m["name"] in model_wide or bool(settings.keys) and
                        len(blocked[m["name"]]) == len(settings.keys),
                        "cooling_keys": sorted(blocked[m["name"]]),
                        "locked": m["name"] == locked}
            for m in shown}

    def status(name: str, d: dict[str, Any]) -> str:
        if d["locked"]:
            return "locked"
        ends = [u for u in blocked[name].values() if u is not None]
        left = f", {_duration(min(ends) - now)}" if ends else ""
        if d["cooling"]:
            return f"cooling (every key{left})"
        if d["cooling_keys"]:
            return f"cooling on {', '.join(d['cooling_keys'])}{left}"
        return "" if d["text"] else "not text"

    def human() -> str:
        table = format_table(
            ["MODEL", "IN LIMIT", "OUT LIMIT", "PROBED", "STATUS"],
            [[name, d["input_limit"], d["output_limit"], "yes" if d["probed"] else "no",
              status(name, d)] for name, d in data.items()])
        return table
    out.emit(data, human)
    if len(models) > len(shown):
        out.hint(f"{len(models) - len(shown)} non-text models hidden (--all shows them)")
    return 0


def cmd_keys(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    """Each configured key: fingerprint, project, state, learned limits, calls today."""
    settings.require_keys()
    with open_store(settings).transaction(write=False) as tx:
        now = time.time()
        view = StateView(settings, tx.cooldowns, tx.router)
        today = pacific_day(now)
        limits = learned_limits(settings, tx.router)
        usage = tx.router["usage"]
        entries = cooldown_entries(settings, tx.cooldowns, tx.router, now)
        hints = sibling_hints(settings, tx.cooldowns)
    configured = {k.label for k in settings.keys}
    data = []
    for key in settings.keys:
        disabled = view.disabled.get(key.fingerprint)
        cooling = [{"model": e["model"], "until": e["until"], "reason": e["reason"]}
                   for e in entries if e["key"] == key.label and e["until"] is not None]
        state = "disabled" if disabled else "cooling" if cooling else "ok"
        data.append({
            "key": key.label, "fingerprint": key.fingerprint,
            "project": settings.project_label(key),
            "project_keys": [k.label for k in settings.project_keys(key)],
            "state": state, "disabled_reason": disabled.get("reason") if disabled else None,
            "cooling": cooling,
            "limits": [lim for lim in limits if key.label in lim["keys"]],
            "calls_today": sum(u.get("count", 0) for t, u in usage.items()
                               if t.startswith(key.fingerprint + "/") and u.get("day") == today),
            "sibling_hint": hints.get(key.label)})
    orphans = sorted({e["key"] for e in entries if e["key"] and e["key"] not in configured})

    def describe(d: dict[str, Any]) -> str:
        if d["state"] == "disabled":
            return f"disabled: {d['disabled_reason']}"
        if d["state"] == "cooling":
            soonest = min(d["cooling"], key=lambda c: c["until"])
            models = sorted({c["model"] or "every model" for c in d["cooling"]})
            shown = ", ".join(models[:3]) + (f" +{len(models) - 3}" if len(models) > 3 else "")
            return f"cooling on {shown} (first back in {_duration(soonest['until'] - now)})"
        return "ok"

    def human() -> str:
        table = format_table(
            ["KEY", "FINGERPRINT", "PROJECT", "CALLS TODAY", "LIMITS", "STATE"],
            [[d["key"], d["fingerprint"], d["project"], d["calls_today"],
              ", ".join(f"{lim['model']}: " + "/".join(
                  f"{lim[w]} {w}" for w in ("rpm", "rpd", "tpm") if lim.get(w))
                  for lim in d["limits"]) or "-", describe(d)] for d in data])
        return table
    out.emit({"keys": data, "unconfigured": orphans} if out.json_mode else data, human)
    for d in data:
        if d["sibling_hint"]:
            out.hint(f"{d['key']} {d['sibling_hint']}")
    for tag in orphans:
        out.hint(f"{tag}: a key no longer configured still has cooldowns; "
                 f"'{PROG} cooldowns --clear {tag}' removes them")
    return 0


def cmd_state(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    """`state export`: the three documents as one JSON document on stdout; `state import
    FILE|-`: such a document, validated entry by entry, replaces the state (one write under
    the lock), so state moves between the files and Redis."""
    store = open_store(settings)
    if args.action == "export":
        if args.file is not None:
            raise UsageError("state export takes no FILE: it writes to stdout "
                             "(redirect it: > state.json)")
        with store.transaction(write=False) as tx:
            docs = {name: tx.doc(name) for name in STATE_DOCS}
        data = {"kind": STATE_EXPORT_KIND, "schema": SCHEMA_VERSION,
                "exported_at": round(time.time(), 3), "source": store.describe(), **docs}
        sys.stdout.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
        return 0
    if args.file is None:
        raise UsageError(f"state import needs FILE, or - for stdin: a document from "
                         f"'{PROG} state export'")
    docs = read_state_export(args.file)
    with store.transaction() as tx:
        for name, doc in docs.items():
            target = tx.doc(name)
            target.clear()
            target.update(doc)
    counts = {"cooldowns": len(docs["cooldowns"]["cooldowns"]),
              "disabled_keys": len(docs["cooldowns"]["disabled_keys"]),
              "learned_limits": len(docs["router"]["limits"]),
              "samples": sum(len(v) for v in docs["stats"]["models"].values()),
              "models_listed": len((docs["router"]["model_list"] or {}).get("models", []))}
    out.emit({"imported": counts, "into": store.describe()},
             lambda: f"imported into {store.describe()}: " + ", ".join(
                 f"{n} {what.replace('_', ' ')}" for what, n in counts.items()))
    return 0


STATE_EXPORT_KIND = "gemini-router/state"


def read_state_export(path: str) -> dict[str, dict[str, Any]]:
    """The documents of a `state export` file ('-' = stdin), each through the sanitiser the
    state files go through: a bad entry is dropped with a warning, a bad document refused."""
    where = "stdin" if path == "-" else path
    try:
        if path == "-":
            raw = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except OSError as exc:
        raise UsageError(f"cannot read {where}: {exc.strerror or exc}") from None
    except (ValueError, AttributeError):
        raise UsageError("state import -: there is no stdin to read") from None
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise UsageError(f"{where} is not valid JSON") from None
    if not isinstance(data, dict) or data.get("kind") != STATE_EXPORT_KIND:
        raise UsageError(f"{where} is not a document of '{PROG} state export'")
    docs, dropped = {}, 0
    for name in STATE_DOCS:
        if not isinstance(data.get(name), dict):
            raise UsageError(f"{where} has no {name} document")
        checked = checked_doc(name, json.dumps(data[name]), f"{where} ({name})", "document",
                              "export it with this version")
        if isinstance(checked, str):
            raise UsageError(f"{where}: the {name} document {checked}")
        docs[name], n = checked
        dropped += n
    if dropped:
        warn(f"{where}: dropped {dropped} unreadable entr{'y' if dropped == 1 else 'ies'}, "
             "kept the rest")
    return docs


def cmd_cache(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    """`cache clear`: remove every cached answer, wherever the state is."""
    store = open_store(settings)
    removed = store.cache.clear()
    if removed is None:
        raise ConfigError(f"cannot clear the cache: {store.degraded_reason}")
    out.emit({"cleared": removed},
             lambda: f"cleared {removed} cached answer(s) from {store.describe()}")
    return 0


def sibling_hints(settings: Settings, cooldowns: dict[str, Any]) -> dict[str, str]:
    """Keys not declared in one project that hit the same per-project limit within seconds of
    each other are likely siblings: a hint for GEMINI_ROUTER_PROJECTS, never acted on."""
    hits: dict[tuple[str, str], list[tuple[float, ApiKey]]] = {}
    for e in cooldowns["cooldowns"]:
        if "PerProject" in (e.get("quota") or "") and e.get("key") and e.get("model"):
            key = next((k for k in settings.keys if k.fingerprint == e["key"]), None)
            if key is not None:
                hits.setdefault((e["model"], e["quota"]), []).append(
                    (float(e.get("since") or 0), key))
    hints: dict[str, str] = {}
    for found in hits.values():
        for since, key in found:      # refused within the same minute: the same window
            twins = [k.label for t, k in found if k is not key and abs(t - since) < 60
                     and k not in settings.project_keys(key)]
            if twins:
                hints[key.label] = (f"may share a project with {', '.join(twins)} (they hit "
                                    "the same per-project limit together); declare it in "
                                    "GEMINI_ROUTER_PROJECTS")
    return hints


# --- the parser ------------------------------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2, suggests the
    nearest name for a typo, and takes an optional value (`--wait [SECONDS]`) only when it
    is a number, so `route --wait "hello"` keeps "hello" as the prompt."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self.commands: dict[str, ArgumentParser] = {}
        self.numeric_optional: dict[str, str] = {}    # option -> its value when bare

    def error(self, message: str) -> None:    # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        args = sys.argv[1:] if args is None else list(args)
        numbered, left_alone = numeric_values_only(args, self.numeric_optional)
        namespace, extras = super().parse_known_args(numbered, namespace)
        if left_alone is not None:
            namespace._left_alone = left_alone
        return namespace, extras

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self.commands.get(getattr(namespace, "command", None) or "")
            (command or self).error(self.unrecognized(extras, namespace))
        return namespace

    def unrecognized(self, extras: list[str], namespace: Any) -> str:
        """What is wrong with arguments no parser took, with the nearest option name."""
        command = self.commands.get(getattr(namespace, "command", None) or "")
        word = extras[0]
        if word.startswith("-") and word != "-":
            names = set(self._option_string_actions)
            if command is not None:
                names |= set(command._option_string_actions)
            hint = did_you_mean(word.partition("=")[0], names)
            where = f" for {command.prog.split()[-1]}" if command is not None else ""
            return f"unknown option {word}{where}{hint}"
        message = f"unexpected argument {word!r}"
        if command is not None and any(a.dest == "prompt" for a in command._actions):
            message += ": the prompt is one argument (quote it if it has spaces)"
            left_alone = getattr(namespace, "_left_alone", None)
            if left_alone is not None:
                option, word = left_alone
                message += (f"; {option} takes only a number, so {word!r} was read as the "
                            "prompt")
        return message

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if action.choices is not None and value not in action.choices:
            choices = ", ".join(map(str, action.choices))
            hint = did_you_mean(str(value), [str(c) for c in action.choices])
            if isinstance(action, argparse._SubParsersAction):
                raise argparse.ArgumentError(None, f"unknown command {value!r}{hint} "
                                                   f"(commands: {choices})")
            raise argparse.ArgumentError(action, f"invalid choice: {value!r}{hint} "
                                                 f"(choose from {choices})")


def numeric_values_only(args: list[str], options: dict[str, str]
                        ) -> tuple[list[str], tuple[str, str] | None]:
    """argv with each `OPTION NUMBER` of `options` joined as `OPTION=NUMBER` and each other
    `OPTION` as `OPTION=<its bare value>`, so a word that is not a number is never taken as
    its value; and the last (option, word) so left alone, for an error message."""
    if not options:
        return args, None
    import re          # already loaded by argparse
    number = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
    result: list[str] = []
    left_alone: tuple[str, str] | None = None
    i = 0
    while i < len(args):
        word = args[i]
        if word == "--":
            return result + args[i:], left_alone
        i += 1
        if word not in options:
            result.append(word)
            continue
        following = args[i] if i < len(args) else None
        if following is not None and number.fullmatch(following.strip()):
            result.append(f"{word}={following}")
            i += 1
        else:
            result.append(f"{word}={options[word]}")
            if following is not None and not following.startswith("-"):
                left_alone = (word, following)
    return result, left_alone


def did_you_mean(word: str, names: Iterable[str]) -> str:
    """'; did you mean X?' for the names closest to a typo, or ''."""
    import difflib
    close = difflib.get_close_matches(word, sorted(names), n=3, cutoff=0.75)
    return f"; did you mean {' or '.join(close)}?" if close else ""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter (descriptions and epilogs kept as written), told the width so
    it need not import shutil to ask for it."""
    width: int | None = None

    def __init__(self, prog: str) -> None:
        if _HelpFormatter.width is None:
            try:
                columns = int(os.environ.get("COLUMNS", "")) or os.get_terminal_size().columns
            except (ValueError, OSError):
                columns = 80
            _HelpFormatter.width = max(40, columns - 2)
        super().__init__(prog, width=_HelpFormatter.width)


def flag_type(limit: Limit) -> Callable[[str], float]:
    """An argparse `type=` that checks a flag against the same bounds as its setting."""
    def parse(text: str) -> float:
        value, problem = limit.convert(text)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value
    return parse


def cache_flag(text: str) -> float:
    """route --cache[=TTL]: seconds, or -1 for a bare --cache (the setting's TTL)."""
    if text == "default":
        return -1.0
    return flag_type(LIMITS["GEMINI_ROUTER_CACHE_TTL"])(text)


def add_global_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """Global options, accepted before or after the subcommand.

    The subcommand copies default to SUPPRESS so they do not overwrite a value that was
    given before the subcommand."""
    d = (lambda value: value) if top else (lambda value: argparse.SUPPRESS)
    g = parser.add_argument_group("global options")
    g.add_argument("-v", "--verbose", action="store_true", default=d(False),
                   help="show the choice and every attempt on stderr")
    g.add_argument("-q", "--quiet", action="store_true", default=d(False),
                   help="no warnings or progress (errors still show)")
    g.add_argument("--json", action="store_true", default=d(False),
                   help="print exactly one JSON document on stdout")
    g.add_argument("--endpoint", metavar="URL", default=d(None),
                   help="API endpoint (default: $GEMINI_API_ENDPOINT or Google's)")
    g.add_argument("--state-dir", metavar="DIR", default=d(None),
                   help="state directory (default: $GEMINI_ROUTER_STATE_DIR or "
                        "$XDG_STATE_HOME/gemini-router)")
    g.add_argument("--state-url", metavar="URL", default=d(None),
                   help="keep the state in Redis: redis://[:password@]host:port/db or rediss:// "
                        "(default: $GEMINI_ROUTER_STATE_URL, else the state directory)")
    g.add_argument("--timeout", metavar="SECONDS", default=d(None),
                   type=flag_type(LIMITS["GEMINI_ROUTER_TIMEOUT"]),
                   help="per-request timeout (default: $GEMINI_ROUTER_TIMEOUT or 60)")
    g.add_argument("--version", action="version", version=f"{PROG} {__version__}")


HELP_EPILOG = f"""\
examples:
  {PROG} route "Say hello in French"
  git diff | {PROG} route "Review this diff" -a -     (stdin only with -a -)
  {PROG} route --wait 120 --json "..." | jq -r .text
  {PROG} rank && {PROG} route --tier fast "..."
  {PROG} -v route --dry-run "..."                       (why this model and key)
  {PROG} cooldowns                                      (what is cooling, until when)

environment:
  GEMINI_API_KEY_1, _2, ...   API keys (also GEMINI_API_KEYS=k1,k2, GEMINI_API_KEY,
                              GOOGLE_API_KEY); shown only as key#N
  GEMINI_API_ENDPOINT         API endpoint, scheme://host[:port]
  GEMINI_ROUTER_STATE_DIR     where cooldowns, stats and the lock are kept
  GEMINI_ROUTER_STATE_URL     redis://[:password@]host:port/db: the state in Redis, shared
  GEMINI_ROUTER_CACHE_TTL     seconds a cached answer is kept (route --cache, serve)
  GEMINI_ROUTER_PROJECTS      keys that share a Google Cloud project, e.g. "1,2;3,4"
  GEMINI_ROUTER_MAX_ATTEMPTS  upstream calls one route may make
  GEMINI_ROUTER_DEADLINE      seconds one route may take, all attempts together
  GEMINI_ROUTER_SERVER        route through a running '{PROG} serve'
  GEMINI_ROUTER_ERRORS=json   errors on stderr as one JSON object, for scripts
  NO_COLOR                    no colour ({PROG} prints none; progress still shows)

exit codes: 0 ok, 1 request failed upstream, 2 usage, 3 configuration,
            4 nothing available, 130 interrupted
"""

ROUTE_EPILOG = f"""\
The prompt is the argument. stdin is read only when asked for: as the prompt when there is
no argument (or it is '-'), and with -a - as text put before the argument (or, when it is a
PNG, JPEG, GIF, WebP or PDF, attached). So a `while read` loop keeps its input.

examples:
  {PROG} route "Say hello in French"
  echo "Say hello in French" | {PROG} route
  cat notes.txt | {PROG} route "Summarise these notes" -a -
  {PROG} route -m gemini-2.5-flash -o temperature=0.2 -s "Be brief" "..."
  {PROG} route --wait "..."        (waits up to 7 days for the earliest recovery)
  {PROG} route --wait 60 "..."     (waits at most 60 s, else exit 4)
"""


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG, description="Send prompts to Google Gemini through the best model and "
                               "API key available now.", epilog=HELP_EPILOG)
    add_global_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)

    def command(name: str, help_text: str, handler: Callable[..., int]) -> ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_global_options(p, top=False)
        p.set_defaults(handler=handler)
        parser.commands[name] = p
        return p

    p = command("route", "send one prompt through the best available model and key",
                cmd_route)
    p.epilog = ROUTE_EPILOG
    p.add_argument("prompt", nargs="?", help="the prompt; '-' or omitted: read it from stdin")
    p.add_argument("-m", "--model", help="use this model (may carry ?key=value options)")
    p.add_argument("--tier", choices=TIER_NAMES, help="route in this tier's order "
                   "(default balance)")
    p.add_argument("-s", "--system", metavar="TEXT", help="system instruction")
    p.add_argument("-o", "--option", action="append", metavar="KEY=VALUE",
                   help="generation option, repeatable: "
                        + ", ".join(sorted({**GENERATION_OPTIONS, **WIRE_OPTIONS})))
    p.add_argument("-a", "--attach", action="append", metavar="FILE",
                   help="attach a text file or an image, repeatable; '-' reads stdin")
    p.add_argument("--schema", metavar="FILE", help="JSON schema for a JSON answer")
    p.add_argument("--stream", action="store_true", help="print the answer as it arrives")
    p.add_argument("--max-attempts", metavar="N", default=None,
                   type=flag_type(LIMITS["GEMINI_ROUTER_MAX_ATTEMPTS"]),
                   help="upstream calls this route may make (default: "
                        "$GEMINI_ROUTER_MAX_ATTEMPTS or 8)")
    p.add_argument("--deadline", metavar="SECONDS", default=None,
                   type=flag_type(LIMITS["GEMINI_ROUTER_DEADLINE"]),
                   help="wall time this route may take, all attempts together (default: "
                        "$GEMINI_ROUTER_DEADLINE or 120)")
    p.add_argument("--dry-run", action="store_true",
                   help="explain which model and key would be used; call nothing")
    p.add_argument("--wait", nargs="?", type=flag_type(Limit(0, 0, MAX_WAIT_SECS)),
                   const=float(MAX_WAIT_SECS), default=None, metavar="SECONDS",
                   help="when nothing is available, wait for the earliest recovery (a "
                        "cooldown's end) and try again; at most SECONDS, bare --wait at most "
                        f"{MAX_WAIT_SECS // 86400} days. A value is taken only if it is "
                        "a number")
    p.numeric_optional["--wait"] = str(float(MAX_WAIT_SECS))
    p.add_argument("--cache", nargs="?", type=cache_flag, const="default", default=None,
                   metavar="TTL",
                   help="answer an exact repeat of this request (model choice, prompt, system, "
                        "options, attachments, schema) from the cache, and keep this answer for "
                        "TTL seconds (bare: $GEMINI_ROUTER_CACHE_TTL or 3600). A value is taken "
                        "only if it is a number")
    p.numeric_optional["--cache"] = "default"

    p = command("rank", "discover models, probe them concurrently and print the tiers",
                cmd_rank)
    p.add_argument("--models", metavar="PATTERN", help="only models matching (glob or "
                   "substring, comma-separated)")
    p.add_argument("--rounds", type=flag_type(Limit(1, 1, 1000, True)),
                   default=1, help="probes per model")
    p.add_argument("--concurrency", default=32,
                   type=flag_type(Limit(32, 1, 1000, True)),
                   help="probes in flight at once (default 32)")
    p.add_argument("--refresh", action="store_true", help="relist models first")
    p.add_argument("--scoring", choices=("balanced", "seed"), default="balanced",
                   help="Balance formula ('seed' = the original tool's)")

    p = command("tiers", "Fast / Quality / Balance tiers per model (no network)", cmd_tiers)
    p.add_argument("--scoring", choices=("balanced", "seed"), default="balanced",
                   help="Balance formula ('seed' = the original tool's)")
    command("stats", "rolling stats per model (no network)", cmd_stats)
    p = command("cooldowns", "active cooldowns and disabled keys (no network)", cmd_cooldowns)
    p.add_argument("--clear", nargs="?", const="", metavar="MODEL|key#N",
                   help="clear the cooldowns of MODEL or key#N (or key?TAG of a key no "
                        "longer configured); bare: everything, asked on a terminal")
    p.add_argument("--all", "--yes", dest="clear_all", action="store_true",
                   help="with a bare --clear: clear everything without asking")
    p = command("lock", "pin routing to one model", cmd_lock)
    p.add_argument("model", help="model name, with or without 'models/'")
    command("unlock", "remove the pin", cmd_unlock)
    command("keys", "each configured key: project, state, learned limits, calls today (no "
                    "network)", cmd_keys)
    p = command("models", "the discovered models, their limits and status", cmd_models)
    p.add_argument("--refresh", action="store_true", help="relist models now")
    p.add_argument("--all", action="store_true", help="include non-text models")
    p = command("state", "move the state between the files and Redis (export / import)",
                cmd_state)
    p.add_argument("action", choices=("export", "import"),
                   help="export: the state as JSON on stdout; import: replace it from FILE")
    p.add_argument("file", nargs="?", metavar="FILE", help="import: a file of 'state export' "
                   "(- reads stdin)")
    p = command("cache", "the response cache of route --cache (and serve)", cmd_cache)
    p.add_argument("action", choices=("clear",), help="clear: remove every cached answer")
    p = command("serve", "run the local gateway (Gemini-native and OpenAI-compatible "
                         "HTTP over the same keys and routing) until SIGINT/SIGTERM", cmd_serve)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                   "127.0.0.1; any other needs GEMINI_ROUTER_CLIENT_KEYS)")
    p.add_argument("--port", type=flag_type(Limit(DEFAULT_PORT, 0, 65535, True)),
                   default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free one)")
    return parser


ERROR_KINDS = {UpstreamError: "upstream", UsageError: "usage", ConfigError: "config",
               NothingAvailable: "nothing_available", Interrupted: "interrupted"}
ERROR_FORMATS = ("text", "json")


def main(argv: list[str] | None = None) -> int:
    global _QUIET
    argv = sys.argv[1:] if argv is None else argv
    out = Output()
    try:
        parser = build_parser()
        if not argv and _isatty(sys.stdout):
            # A person who typed just the name: show what there is (clig.dev), and still
            # exit 2, as nothing was done.
            parser.print_help()
            return 2
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            raise UsageError(f"missing command: one of {', '.join(parser.commands)} "
                             f"(see '{PROG} --help')")
        error_format()
        out = Output(json_mode=args.json, quiet=args.quiet, verbose=args.verbose)
        _QUIET = args.quiet
        settings = load_settings(dict(os.environ), args)
        code = args.handler(args, settings, out)
        out.attempt_finished()
        sys.stdout.flush()        # a failed write shows here, not as noise at exit
        return code
    except RouterError as exc:
        out.attempt_finished()
        keys = collect_keys_quietly()
        kind = next((k for cls, k in ERROR_KINDS.items() if isinstance(exc, cls)), "upstream")
        return report_error(exc.exit_code, kind, redact(str(exc), keys),
                            getattr(exc, "until", None))
    except KeyboardInterrupt:
        out.attempt_finished()
        return report_error(130, "interrupted", "interrupted", None,
                            text=f"{PROG}: interrupted")
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error worth a message.
        _silence_stdout()
        return 0
    except OSError as exc:
        # Everything else reaching here is our own output failing (a full disk, say): the
        # state store and the client turn their OSErrors into RouterErrors.
        _silence_stdout()
        return report_error(1, "output", f"cannot write output: {exc.strerror or exc}", None)
    except SystemExit as exc:          # --help / --version
        return int(exc.code or 0)


def _isatty(stream: Any) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def error_format() -> str:
    """'text' or 'json', from GEMINI_ROUTER_ERRORS (blank = text)."""
    value = os.environ.get("GEMINI_ROUTER_ERRORS", "").strip().lower() or "text"
    if value not in ERROR_FORMATS:
        raise ConfigError(f"GEMINI_ROUTER_ERRORS must be json or text, got {value[:40]!r}")
    return value


def report_error(code: int, kind: str, message: str, retry_at: float | None,
                 text: str | None = None) -> int:
    """The one stderr line of a failure: text, or with GEMINI_ROUTER_ERRORS=json one JSON
    object for scripts. Returns the exit code."""
    try:
        as_json = error_format() == "json"
    except ConfigError:
        as_json = False
    if as_json:
        line = json.dumps({"error": {"exit_code": code, "kind": kind, "message": message,
                                     "retry_at": None if retry_at is None
                                     else round(retry_at, 3)}})
    else:
        line = text or f"{PROG}: error: {message}"
    print(line, file=sys.stderr)
    return code


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush cannot fail again."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def collect_keys_quietly() -> tuple[ApiKey, ...]:
    try:
        return collect_keys(dict(os.environ))
    except ConfigError:
        return ()


def main_exit() -> None:
    """The console-script entry point."""
    code = main()
    if code == 130:
        # rank's probes still in flight may hang until their timeout; what they measured is
        # saved, so leave now instead of joining their worker threads.
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(130)
    sys.exit(code)


if __name__ == "__main__":
    main_exit()
