#!/usr/bin/env python3
"""gemini-router: send prompts to Google Gemini through the best model and API key available now.

The whole tool is this one module. It reads top to bottom in the order the data flows:

  configuration  environment + flags -> a validated, immutable ``Settings``
  errors         one exception class per exit code; ``main`` turns them into one stderr line
  state store    three JSON files (stats, cooldowns, router state) behind one lock file:
                 writers hold it exclusively through ``filelock``, readers share it with
                 ``flock``; short transactions, files atomically replaced on write
  keys, client   ``key#N`` labels and sha256 fingerprints; one low-level SDK client per key
                 (never ``genai.configure``, which is process-global and sends the wrong key
                 under threads); every upstream outcome classified into one ``Outcome``
  outcomes       the single code path that turns an outcome into a sample, a cooldown or a
                 disabled key - shared by ``route``, ``rank`` and model listing
  stats          rolling per-model samples summarised into success rate, latency, tokens
  tiers          percentile cuts (S/A/B/C) of Fast, Quality and Balance scores
  prober         asyncio + ThreadPoolExecutor probes for ``rank``, batched state writes
  router         candidate order (lock, -m, tier order), key rotation, failover
  CLI            argparse subcommands, tables, ``--json``, exit codes

Design rules that the code keeps everywhere:
  * the state lock is never held across a network call;
  * a key's secret never leaves ``ApiKey.secret``: output shows ``key#N``, state keeps a
    fingerprint, and upstream messages are redacted before they are shown;
  * the Gemini SDK and tqdm are imported only by commands that use the network, so local
    commands (tiers, stats, cooldowns, lock, unlock) start fast;
  * every expected failure is a ``RouterError`` with its exit code: one line on stderr,
    never a traceback.
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
from dataclasses import asdict, dataclass, field

TYPE_CHECKING = False
if TYPE_CHECKING:      # annotations only: importing typing would slow every local command
    from typing import Any, Callable, Iterable, Iterator

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

# Models a fresh install routes to before any `rank` has measured anything: fast,
# generally available text models first; the rest follow in Quality order.
DEFAULT_PREFERENCE = ("gemini-2.5-flash", "gemini-2.0-flash", "gemini-2.5-flash-lite",
                      "gemini-2.0-flash-lite", "gemini-2.5-pro")
# A model whose name carries one of these words is not a text model, whatever methods it lists.
NON_TEXT_WORDS = ("embed", "image", "imagen", "tts", "audio", "live", "veo", "aqa", "lyria",
                  "computer-use")
MIN_KEY_LENGTH = 8
MAX_COOLDOWN_SECS = 7 * 86400  # no upstream retryDelay cools anything longer than a week
TRANSIENT_STRIKES = 3          # consecutive transient failures that cool a model down
MODEL_GONE_SECS = 3600.0       # a 404 model stays out of routing this long


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
}


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
    timeout_flag = getattr(args, "timeout", None)
    return Settings(
        keys=collect_keys(env),
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
    )


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

    def __init__(self, message: str, until: float | None = None):
        super().__init__(message)
        self.until = until


class Interrupted(RouterError):
    exit_code = 130


# ======================================================================================
# State store: three JSON files behind one lock
# ======================================================================================
# Every read-modify-write of state happens inside `StateStore.transaction()`: it takes the
# one file lock (bounded wait), loads the files the caller touches on first use, and on a
# clean exit writes back those whose content changed - each through a temp file, fsync and
# rename, so a reader or a crash never sees half a file. Network calls happen outside.

def empty_doc(name: str) -> dict[str, Any]:
    base: dict[str, Any] = {"schema": SCHEMA_VERSION, "kind": f"gemini-router/{name}"}
    if name == "stats":
        base["models"] = {}
    elif name == "cooldowns":
        base.update(cooldowns=[], disabled_keys={})
    else:
        base.update(next_key=0, lock=None, model_list=None, usage={}, strikes={})
    return base


def doc_shape_ok(name: str, doc: Any) -> bool:
    """A structural check: enough that no code reading the document can crash on it."""
    if name == "stats":
        models = doc.get("models")
        return isinstance(models, dict) and all(
            isinstance(samples, list) and all(_sample_ok(s) for s in samples)
            for samples in models.values())
    if name == "cooldowns":
        entries, disabled = doc.get("cooldowns"), doc.get("disabled_keys")
        return isinstance(entries, list) and isinstance(disabled, dict) and all(
            isinstance(e, dict) and _is_time(e.get("until")) and isinstance(e.get("reason"), str)
            and _opt_str(e.get("model")) and _opt_str(e.get("key")) for e in entries) \
            and all(isinstance(v, dict) for v in disabled.values())
    listing = doc.get("model_list")
    return (isinstance(doc.get("next_key"), int) and _opt_str(doc.get("lock"))
            and isinstance(doc.get("strikes"), dict)
            and all(isinstance(v, int) for v in doc["strikes"].values())
            and isinstance(doc.get("usage"), dict)
            and all(isinstance(u, dict) and isinstance(u.get("minute", []), list)
                    and all(_is_time(t) for t in u.get("minute", []))
                    and isinstance(u.get("count", 0), int) for u in doc["usage"].values())
            and (listing is None or (isinstance(listing, dict)
                                     and _is_time(listing.get("fetched_at"))
                                     and isinstance(listing.get("models"), list)
                                     and all(_model_entry_ok(m) for m in listing["models"]))))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")      # json.loads would accept NaN and Infinity


def _is_num(value: Any) -> bool:
    """A finite, non-negative number small enough to compute with."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return 0 <= value < 2 ** 53 and (isinstance(value, int) or math.isfinite(value))


def _is_time(value: Any) -> bool:
    """A unix time this tool could have written (before the year 5138)."""
    return _is_num(value) and value < 1e11


def _opt_str(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _sample_ok(s: Any) -> bool:
    return (isinstance(s, dict) and _is_time(s.get("t")) and isinstance(s.get("ok"), bool)
            and isinstance(s.get("kind"), str) and _is_num(s.get("latency", 0))
            and isinstance(s.get("prompt_tokens", 0), int) and _is_num(s.get("prompt_tokens", 0))
            and isinstance(s.get("output_tokens", 0), int) and _is_num(s.get("output_tokens", 0)))


def _model_entry_ok(m: Any) -> bool:
    return (isinstance(m, dict) and isinstance(m.get("name"), str)
            and isinstance(m.get("input_limit"), int) and isinstance(m.get("output_limit"), int)
            and isinstance(m.get("methods"), list)
            and all(isinstance(x, str) for x in m["methods"]))


def warn(message: str) -> None:
    """Warnings are one line on stderr; -q silences them (see `Output`)."""
    if not _QUIET:
        print(f"{PROG}: warning: {message}", file=sys.stderr)


_QUIET = False


class StateTransaction:
    """The documents of one locked transaction, loaded lazily by name.

    Built with `docs` instead, it is a view of in-memory documents (never committed): the
    prober's local mirror of state goes through the same `record_outcome`."""

    def __init__(self, store: StateStore | None, docs: dict[str, dict[str, Any]] | None = None):
        self._store = store
        self._docs: dict[str, dict[str, Any]] = dict(docs or {})
        self._original: dict[str, str | None] = {name: None for name in self._docs}

    def doc(self, name: str) -> dict[str, Any]:
        if name not in self._docs:
            text, doc = self._store.load(name)
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
                self._store.write(name, text)


class StateStore:
    """The state directory: where the files are, the lock, and atomic loads and writes."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.paths = settings.files
        self.lock_path = os.path.join(settings.state_dir, "state.lock")

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

        write=False is a read-only snapshot: it shares the lock with other readers and
        creates nothing when there is no state yet."""
        if not write:
            with self._shared_hold():
                yield StateTransaction(self)
            return
        self.check_dirs(create=True)
        with self._exclusive_hold():
            tx = StateTransaction(self)
            yield tx
            tx.commit()

    @contextlib.contextmanager
    def _exclusive_hold(self) -> Iterator[None]:
        """The state lock, exclusively, through filelock (bounded wait)."""
        from filelock import FileLock, Timeout
        lock = FileLock(self.lock_path, timeout=self.settings.lock_timeout, mode=0o600)
        try:
            lock.acquire()
        except Timeout:
            raise self._lock_timeout() from None
        except OSError as exc:
            raise ConfigError(f"cannot lock state in {self.settings.state_dir}: "
                              f"{exc.strerror or exc}") from None
        try:
            yield
        finally:
            lock.release()

    @contextlib.contextmanager
    def _shared_hold(self) -> Iterator[None]:
        """The state lock, shared, for readers.

        filelock's Unix lock is flock(LOCK_EX) on the lock file, so a reader taking
        flock(LOCK_SH) on the same file never overlaps a write, and readers never queue
        behind each other. Readers do it directly because importing filelock costs more than
        a whole local command; without flock they take the exclusive lock like writers."""
        if not self.check_dirs(create=False) and not os.path.isdir(self.settings.state_dir):
            # No state directory, so no lock file and no writer yet (a writer creates the
            # directory before it writes); the files, if overridden elsewhere, are whole.
            yield
            return
        fd = self._shared_flock()
        if fd is None:
            with self._exclusive_hold():
                yield
            return
        try:
            yield
        finally:
            os.close(fd)          # closing the descriptor releases the flock

    def _shared_flock(self) -> int | None:
        """A descriptor holding flock(LOCK_SH) on the lock file; None where flock is missing."""
        try:
            import fcntl
        except ImportError:
            return None
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot lock state in {self.settings.state_dir}: "
                              f"{exc.strerror or exc}") from None
        deadline = time.monotonic() + self.settings.lock_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise self._lock_timeout() from None
                time.sleep(0.01)
            except OSError:             # a filesystem without flock (some NFS, FUSE)
                os.close(fd)
                return None

    def _lock_timeout(self) -> ConfigError:
        return ConfigError(f"state lock {self.lock_path} held by another process for more "
                           f"than {_fmt_num(self.settings.lock_timeout)} s "
                           "(GEMINI_ROUTER_LOCK_TIMEOUT)")

    def load(self, name: str) -> tuple[str | None, dict[str, Any]]:
        """(raw text, document). A missing file is empty; a corrupt one is set aside."""
        path = self.paths[name]
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None, empty_doc(name)
        except OSError as exc:
            raise ConfigError(f"cannot read state file {path}: {exc.strerror or exc}") from None
        try:
            doc = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            return None, self.set_aside(name, "is not valid JSON")
        if not isinstance(doc, dict) or doc.get("kind", f"gemini-router/{name}") != \
                f"gemini-router/{name}":
            return None, self.set_aside(name, "is not a gemini-router " + name + " file")
        version = doc.get("schema")
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise ConfigError(f"state file {path} has schema {version}, newer than this "
                              f"gemini-router understands ({SCHEMA_VERSION}); upgrade, or "
                              "point STATS_FILE/STATE_FILE/COOLDOWN_FILE elsewhere")
        if version != SCHEMA_VERSION:
            return None, self.set_aside(name, f"has an unsupported schema ({version!r})")
        if not doc_shape_ok(name, doc):
            return None, self.set_aside(name, "has an unexpected shape")
        return raw.decode("utf-8", "replace"), doc

    def set_aside(self, name: str, why: str) -> dict[str, Any]:
        """Keep a bad file for the user to inspect, and start that document afresh."""
        path = self.paths[name]
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = f"{path}.corrupt-{stamp}"
        n = 1
        while os.path.lexists(target):
            n += 1
            target = f"{path}.corrupt-{stamp}-{n}"
        try:
            os.replace(path, target)
        except FileNotFoundError:
            return empty_doc(name)   # another reader set it aside first
        except OSError as exc:
            raise ConfigError(f"state file {path} {why} and cannot be moved aside: "
                              f"{exc.strerror or exc}") from None
        warn(f"state file {path} {why}; kept it as {os.path.basename(target)} and started "
             "afresh")
        return empty_doc(name)

    def write(self, name: str, text: str) -> None:
        """Replace a state file atomically: temp file, fsync, rename."""
        path = self.paths[name]
        # Writes happen only under the exclusive lock, so one fixed temp name suffices; a
        # crash's leftover is simply overwritten by the next write.
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(fd, "wb") as f:
                f.write(text.encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise ConfigError(f"cannot write state file {path}: {exc.strerror or exc}") from None


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
    """What one upstream call came to. `kind` decides what `record_outcome` and the route do."""
    kind: str                    # ok | blocked | rate_limited | daily_quota | key_invalid |
    #                              model_unavailable | transient | bad_request | unreachable
    detail: str = ""
    retry_after: float | None = None
    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    partial: bool = False        # a stream failed after some of its text was printed

    @property
    def answered(self) -> bool:
        return self.kind in ("ok", "blocked")


# Which outcomes say something about the model (and so count in its success rate).
MODEL_VERDICTS = {"ok": True, "blocked": True, "bad_request": True,
                  "transient": False, "model_unavailable": False}
BLOCKING_FINISH = {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII",
                   "IMAGE_SAFETY", "LANGUAGE"}


def _parse_duration(value: Any) -> float | None:
    """'26s' / '1.5s' (protobuf Duration JSON) -> seconds, at most MAX_COOLDOWN_SECS."""
    if isinstance(value, str) and value.endswith("s"):
        with contextlib.suppress(ValueError):
            seconds = float(value[:-1])
            if seconds >= 0 and math.isfinite(seconds):
                return min(seconds, MAX_COOLDOWN_SECS)
    return None


def outcome_from_error(exc: BaseException, settings: Settings) -> Outcome:
    """Classify an exception from the SDK or its HTTP layer, with a short, redacted detail."""
    outcome = _classify_error(exc, settings.timeout)
    # Redact before shortening: a cut could leave part of a key that redact() won't match.
    outcome.detail = _one_line(redact(outcome.detail, settings.keys), 300)
    return outcome


def _classify_error(exc: BaseException, timeout: float) -> Outcome:
    """The failure table of GEMINI_API_NOTES ('Errors over REST') as outcome kinds."""
    from google.api_core import exceptions as gx
    import requests
    if isinstance(exc, gx.GoogleAPICallError):
        code = int(exc.code) if exc.code is not None else 0
        details = [d for d in (exc.details or []) if isinstance(d, dict)]
        message = _upstream_message(exc)
        infos = [d for d in details if d.get("@type", "").endswith("google.rpc.ErrorInfo")]
        reason = next((d.get("reason") for d in infos if d.get("reason")), None)
        if code == 429:
            quota_ids = [v.get("quotaId", "") for d in details
                         if d.get("@type", "").endswith("google.rpc.QuotaFailure")
                         for v in d.get("violations", []) if isinstance(v, dict)]
            delay = next((_parse_duration(d.get("retryDelay")) for d in details
                          if d.get("@type", "").endswith("google.rpc.RetryInfo")), None)
            # Classify by quotaId, not by retryDelay: a per-day violation has been seen
            # carrying retryDelay "36s" - retrying then would only waste calls.
            daily = [q for q in quota_ids if "PerDay" in q]
            if daily:
                return Outcome("daily_quota", f"daily quota exhausted ({daily[0]})", delay)
            what = quota_ids[0] if quota_ids else "429 RESOURCE_EXHAUSTED"
            return Outcome("rate_limited", f"rate limited ({what})", delay)
        if code == 400 and reason == "API_KEY_INVALID":
            return Outcome("key_invalid", "API key not valid (API_KEY_INVALID)")
        if code in (401, 403):
            return Outcome("key_invalid", f"key refused: HTTP {code} {reason or message}")
        if code == 404:
            return Outcome("model_unavailable", f"model not found: {message}")
        if code >= 500 or code == 408:
            return Outcome("transient", f"HTTP {code}: {message}")
        return Outcome("bad_request", f"HTTP {code}: {message}")
    # ConnectTimeout is both a ConnectionError and a Timeout: connection first, so an
    # endpoint that never accepts is "unreachable", not a slow model.
    if isinstance(exc, requests.exceptions.ConnectionError):
        reason = _connect_failure(exc)
        if reason is not None:
            return Outcome("unreachable", reason)
        return Outcome("transient", f"connection broken: {_one_line(exc)}")
    if isinstance(exc, requests.exceptions.Timeout):
        return Outcome("transient", f"no answer within {_fmt_num(timeout)} s (timeout)")
    # Anything else (an empty or malformed 200 body the SDK cannot parse, a broken stream) is
    # the server's fault, not the request's.
    return Outcome("transient", f"malformed response ({type(exc).__name__}: {_one_line(exc)})")


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
    with contextlib.suppress(Exception):
        body = exc.response.json()
        message = body["error"]["message"]
        if isinstance(message, str) and message:
            return _one_line(message)
    text = str(getattr(exc, "message", "") or exc)
    return _one_line(text.split(": ", 1)[1] if text.startswith(("POST ", "GET ")) else text)


def _one_line(value: Any, limit: int | None = None) -> str:
    """Whitespace folded to single spaces; cut to `limit` characters when given."""
    text = " ".join(str(value).split())
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"


def outcome_from_response(response: Any, streamed: bool = False) -> Outcome:
    """Classify a (possibly merged streamed) GenerateContentResponse proto."""
    usage = response.usage_metadata
    tokens = dict(prompt_tokens=int(usage.prompt_token_count),
                  output_tokens=int(usage.candidates_token_count),
                  total_tokens=int(usage.total_token_count))
    feedback = response.prompt_feedback
    if not response.candidates:
        if feedback and int(feedback.block_reason):
            reason = type(feedback.block_reason)(feedback.block_reason).name
            return Outcome("blocked", f"prompt blocked ({reason})", finish_reason=reason,
                           **tokens)
        return Outcome("transient", "response had no candidates", **tokens)
    candidate = response.candidates[0]
    text = "".join(part.text for part in candidate.content.parts if part.text)
    finish = type(candidate.finish_reason)(candidate.finish_reason).name
    if finish in BLOCKING_FINISH:
        return Outcome("blocked", f"answer stopped for {finish}", text=text,
                       finish_reason=finish, **tokens)
    if finish == "FINISH_REASON_UNSPECIFIED" and streamed:
        # The SDK swallows an {"error": ...} element inside a 200 stream: the only trace is
        # a stream that ends without a finish reason.
        return Outcome("transient", "stream ended without a finish reason", text=text, **tokens)
    return Outcome("ok", text=text, finish_reason=finish, **tokens)


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


# The REST transport sends call metadata as HTTP headers; the client's session moves this
# one into the JSON body (see `_send_wire_options`).
WIRE_OPTIONS_HEADER = "x-gemini-router-generation-config"


def _import_sdk() -> Any:
    """The low-level generativelanguage package, imported once, without its noise."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from google.ai import generativelanguage_v1beta as glm
    return glm


class GeminiClient:
    """One REST SDK client pair per key, built on first use; SDK retries are off."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._clients: dict[tuple[str, int], Any] = {}
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
                _send_wire_options(session)
            self._clients[service, key.index] = client
        return self._clients[service, key.index]

    def build_request(self, prompt: PromptRequest) -> WireRequest:
        """The request for `prompt`, without a model (`generate` adds it per attempt).

        Built once per prompt, before any call: a value the SDK refuses is the user's
        mistake (a UsageError), not an upstream failure to route around."""
        glm = self.glm
        parts: list[Any] = [glm.Part(inline_data=glm.Blob(mime_type=mime, data=data))
                            for mime, data in prompt.attachments]
        parts.append(glm.Part(text=prompt.text))
        config = dict(prompt.options)
        if prompt.schema is not None:
            config["response_mime_type"] = "application/json"
            config["response_schema"] = prompt.schema
        try:
            request = glm.GenerateContentRequest(
                contents=[glm.Content(role="user", parts=parts)],
                generation_config=glm.GenerationConfig(**config) if config else None)
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            raise UsageError(f"the request cannot be built: {_one_line(exc, 200)}") from None
        if prompt.system:
            request.system_instruction = glm.Content(parts=[glm.Part(text=prompt.system)])
        return WireRequest(request, dict(prompt.wire_options))

    def generate(self, key: ApiKey, model: str, request: WireRequest,
                 on_text: Callable[[str], None] | None = None) -> Outcome:
        """One upstream call of `request` (from build_request) on `model`, classified.

        With on_text the answer is streamed into it; an error raised by on_text (our own
        output failing) propagates instead of being blamed on the upstream."""
        generative = self._client("GenerativeService", key)
        proto = type(request.proto)(request.proto, model=f"models/{model}")   # a copy per call
        metadata = ([(WIRE_OPTIONS_HEADER, json.dumps(request.wire_options))]
                    if request.wire_options else [])
        try:
            if on_text is None:
                response = generative.generate_content(proto, timeout=self.settings.timeout,
                                                       retry=None, metadata=metadata)
                return outcome_from_response(response)
            return self._stream(generative, proto, metadata, on_text)
        except _OutputFailed as exc:
            raise exc.error from None
        except Exception as exc:     # noqa: BLE001 - every failure is classified, none escapes
            return outcome_from_error(exc, self.settings)

    def _stream(self, generative: Any, proto: Any, metadata: list[tuple[str, str]],
                on_text: Callable[[str], None]) -> Outcome:
        merged = self.glm.GenerateContentResponse()
        printed = False
        try:
            for chunk in generative.stream_generate_content(
                    proto, timeout=self.settings.timeout, retry=None, metadata=metadata):
                piece = "".join(p.text for c in chunk.candidates[:1] for p in c.content.parts)
                if piece:
                    try:
                        on_text(piece)
                    except Exception as exc:  # noqa: BLE001 - not the upstream's fault
                        raise _OutputFailed(exc) from None
                    printed = True
                merged = _merge_chunk(self.glm, merged, chunk)
        except Exception as exc:     # noqa: BLE001
            if not printed or isinstance(exc, _OutputFailed):
                raise
            outcome = outcome_from_error(exc, self.settings)
            outcome.kind = "transient"   # text already went out: the call as a whole failed
            outcome.detail = f"stream broke after output began: {outcome.detail}"
            outcome.partial = True
            return outcome
        outcome = outcome_from_response(merged, streamed=True)
        if printed and outcome.kind != "ok":
            outcome.partial = True
            if outcome.kind == "transient":
                outcome.detail = f"stream broke after output began: {outcome.detail}"
        return outcome

    def list_models(self, key: ApiKey) -> list[dict[str, Any]] | Outcome:
        """Every model the key can see (following pages), or the classified failure."""
        models = self._client("ModelService", key)
        try:
            pager = models.list_models(self.glm.ListModelsRequest(page_size=1000),
                                       timeout=self.settings.timeout, retry=None)
            return [model_entry(m) for m in pager]
        except Exception as exc:     # noqa: BLE001
            outcome = outcome_from_error(exc, self.settings)
            if outcome.kind == "model_unavailable":
                outcome.kind = "transient"      # a 404 on the list is the endpoint's problem
            return outcome


def _send_wire_options(session: Any) -> None:
    """Let calls add generationConfig fields the pinned protos lack (`seed`).

    Such a call carries them in the WIRE_OPTIONS_HEADER metadata; this moves them from the
    header into the JSON body just before the request leaves this session."""
    send = session.request

    def request(method: str, url: str, data: Any = None, headers: Any = None,
                **kwargs: Any) -> Any:
        extra = headers.pop(WIRE_OPTIONS_HEADER, None) if headers else None
        if extra is not None and data:
            body = json.loads(data)
            body.setdefault("generationConfig", {}).update(json.loads(extra))
            data = json.dumps(body)
        return send(method, url, data=data, headers=headers, **kwargs)
    session.request = request


class _OutputFailed(Exception):
    """Carries an error from the caller's on_text callback past the classification."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def _merge_chunk(glm: Any, merged: Any, chunk: Any) -> Any:
    """Fold one streamed chunk into a response that looks like a non-streamed one."""
    if chunk.candidates:
        cand = chunk.candidates[0]
        if not merged.candidates:
            merged.candidates.append(glm.Candidate(content=glm.Content(role="model")))
        target = merged.candidates[0]
        for part in cand.content.parts:
            if part.text:
                target.content.parts.append(glm.Part(text=part.text))
        if int(cand.finish_reason):
            target.finish_reason = cand.finish_reason
    if chunk.prompt_feedback and int(chunk.prompt_feedback.block_reason):
        merged.prompt_feedback = chunk.prompt_feedback
    if chunk.usage_metadata and int(chunk.usage_metadata.total_token_count):
        merged.usage_metadata = chunk.usage_metadata
    return merged


def model_entry(model: Any) -> dict[str, Any]:
    """The part of a models-list entry the router keeps (in the router state's cache)."""
    name = bare_model(model.name)
    methods = list(model.supported_generation_methods)
    return {"name": name, "display_name": model.display_name,
            "input_limit": int(model.input_token_limit),
            "output_limit": int(model.output_token_limit), "methods": methods}


def text_model_names(models: list[dict[str, Any]]) -> list[str]:
    """The names of the models `route` and `rank` use, in list order."""
    return [m["name"] for m in models if is_text_model(m["name"], m["methods"])]


def is_text_model(name: str, methods: list[str]) -> bool:
    """generateContent-capable and not an embedding/image/speech/live model (by name)."""
    lowered = name.lower()
    return "generateContent" in methods and not any(w in lowered for w in NON_TEXT_WORDS)


# ======================================================================================
# Outcomes -> samples, cooldowns and disabled keys (the one path for route, rank, listing)
# ======================================================================================

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


def add_cooldown(cooldowns: dict[str, Any], model: str | None, fingerprint: str | None,
                 until: float, reason: str, kind: str, now: float) -> float:
    """Cool a (key, model) target; never shortens a longer cooldown. Returns the end."""
    for entry in cooldowns["cooldowns"]:
        if entry.get("model") == model and entry.get("key") == fingerprint:
            if entry["until"] >= until:
                return entry["until"]
            entry.update(until=until, reason=reason, kind=kind, since=now)
            return until
    cooldowns["cooldowns"].append({"model": model, "key": fingerprint, "until": until,
                                   "reason": reason, "kind": kind, "since": now})
    return until


def prune_cooldowns(cooldowns: dict[str, Any], now: float) -> None:
    cooldowns["cooldowns"] = [e for e in cooldowns["cooldowns"] if e["until"] > now]


def why_blocked(cooldowns: dict[str, Any], router: dict[str, Any], settings: Settings,
                key: ApiKey, model: str | None, now: float) -> tuple[float | None, str] | None:
    """Why (key, model) cannot be called now: (until, reason); until None = disabled key.

    None means it is free. Looks at disabled keys, cooldowns on the pair, the key or the
    model, and the proactive per-minute and per-day ceilings. model=None asks about the key
    as a whole (disabled, or cooling for every model)."""
    disabled = cooldowns["disabled_keys"].get(key.fingerprint)
    if disabled is not None:
        return None, f"disabled: {disabled.get('reason', '')}"
    worst: tuple[float, str] | None = None
    for entry in cooldowns["cooldowns"]:
        if entry["until"] > now and entry.get("model") in (None, model) \
                and entry.get("key") in (None, key.fingerprint):
            if worst is None or entry["until"] > worst[0]:
                worst = (entry["until"], entry["reason"])
    if worst is not None:
        return worst
    return ceiling_until(router, settings, key, model, now)


def ceiling_until(router: dict[str, Any], settings: Settings, key: ApiKey, model: str | None,
                  now: float) -> tuple[float, str] | None:
    if model is None or not (settings.rpm_limit or settings.rpd_limit):
        return None
    usage = router["usage"].get(f"{key.fingerprint}/{model}")
    if not usage:
        return None
    minute = [t for t in usage.get("minute", []) if t > now - 60]
    if settings.rpm_limit and len(minute) >= settings.rpm_limit:
        return minute[-settings.rpm_limit] + 60, f"GEMINI_ROUTER_RPM={settings.rpm_limit} reached"
    if settings.rpd_limit and usage.get("day") == pacific_day(now) \
            and usage.get("count", 0) >= settings.rpd_limit:
        return next_pacific_midnight(now), f"GEMINI_ROUTER_RPD={settings.rpd_limit} reached"
    return None


def count_request(router: dict[str, Any], settings: Settings, key: ApiKey, model: str,
                  now: float) -> None:
    """Count a call toward the proactive ceilings (only when a ceiling is set)."""
    if not (settings.rpm_limit or settings.rpd_limit):
        return
    usage = router["usage"].setdefault(f"{key.fingerprint}/{model}", {})
    # The last rpm_limit calls are all the per-minute check needs.
    recent = [t for t in usage.get("minute", []) if t > now - 60] + [now]
    usage["minute"] = recent[-settings.rpm_limit:] if settings.rpm_limit else []
    today = pacific_day(now)
    if usage.get("day") != today:
        usage.update(day=today, count=0)
    usage["count"] = usage.get("count", 0) + 1


def record_outcome(tx: StateTransaction, settings: Settings, key: ApiKey, model: str | None,
                   outcome: Outcome, latency: float, now: float) -> str | None:
    """Apply one upstream outcome to state. Returns a notice for stderr, if any.

    This is the only place outcomes become samples, cooldowns or disabled keys."""
    cooldowns = tx.cooldowns
    prune_cooldowns(cooldowns, now)
    notice = None
    kind = outcome.kind
    if kind == "unreachable":
        return None          # says nothing about the key or the model
    if model is not None:
        samples = tx.stats["models"].setdefault(model, [])
        samples.append({"t": round(now, 3), "ok": MODEL_VERDICTS.get(kind, False) is True,
                        "kind": kind, "latency": round(latency, 4),
                        "prompt_tokens": outcome.prompt_tokens,
                        "output_tokens": outcome.output_tokens, "key": key.fingerprint})
        del samples[:-settings.rolling_window]
    strikes = tx.router["strikes"]
    if kind == "rate_limited":
        delay = outcome.retry_after if outcome.retry_after is not None else settings.cooldown_secs
        add_cooldown(cooldowns, model, key.fingerprint, now + delay, outcome.detail, kind, now)
    elif kind == "daily_quota":
        add_cooldown(cooldowns, model, key.fingerprint, next_pacific_midnight(now),
                     outcome.detail, kind, now)
    elif kind == "key_invalid":
        if key.fingerprint not in cooldowns["disabled_keys"]:
            cooldowns["disabled_keys"][key.fingerprint] = {"reason": outcome.detail,
                                                           "since": now}
            notice = (f"{key.label} disabled: {outcome.detail}; fix it, or run "
                      f"'{PROG} cooldowns --clear {key.label}'")
    elif kind == "model_unavailable" and model is not None:
        add_cooldown(cooldowns, model, None, now + MODEL_GONE_SECS, outcome.detail, kind, now)
        tx.router["model_list"] = None          # the list we routed from is out of date
    elif kind == "transient" and model is not None:
        strikes[model] = strikes.get(model, 0) + 1
        if strikes[model] >= TRANSIENT_STRIKES:
            add_cooldown(cooldowns, model, None, now + settings.cooldown_secs,
                         f"{strikes[model]} transient failures in a row: {outcome.detail}",
                         kind, now)
            strikes.pop(model)
    if model is not None and outcome.answered:
        strikes.pop(model, None)
    return notice


# ======================================================================================
# Stats: rolling samples summarised per model
# ======================================================================================

@dataclass
class ModelStats:
    model: str
    samples: int                  # every sample in the window
    judged: int                   # samples that say something about the model
    success_rate: float | None    # answered / judged
    latency_p50_s: float | None   # over successful answers
    latency_p95_s: float | None
    prompt_tokens_avg: float | None
    output_tokens_avg: float | None
    outcomes: dict[str, int]
    last_t: float | None


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile of an already sorted, non-empty list."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q
    low = math.floor(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def summarize(model: str, samples: list[dict[str, Any]]) -> ModelStats:
    judged = [s for s in samples if s["kind"] in MODEL_VERDICTS]
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
        outcomes=outcomes, last_t=max((s["t"] for s in samples), default=None))


def all_stats(stats_doc: dict[str, Any]) -> dict[str, ModelStats]:
    return {model: summarize(model, samples)
            for model, samples in sorted(stats_doc["models"].items()) if samples}


# ======================================================================================
# Tiers: percentile cuts of Fast, Quality and Balance scores
# ======================================================================================
# Per metric, ranked models are ordered best first; the model at position i of n has
# percentile p = (i + 0.5) / n and gets S (p <= 0.2), A (<= 0.5), B (<= 0.8) or C. Equal
# scores share the tier of the best position among them.

TIER_NAMES = ("fast", "quality", "balance")


def tier_for_position(i: int, n: int) -> str:
    p = (i + 0.5) / n
    return "S" if p <= 0.2 else "A" if p <= 0.5 else "B" if p <= 0.8 else "C"


def assign_tiers(scores: dict[str, Any]) -> dict[str, str]:
    """Tiers for models whose scores sort ascending best-first (lower is better)."""
    ordered = sorted(scores, key=lambda m: (scores[m], m))
    tiers: dict[str, str] = {}
    for i, model in enumerate(ordered):
        previous = ordered[i - 1] if i else None
        if previous is not None and scores[previous] == scores[model]:
            tiers[model] = tiers[previous]
        else:
            tiers[model] = tier_for_position(i, len(ordered))
    return tiers


@dataclass
class TierRow:
    model: str
    fast: str | None
    quality: str | None
    balance: str | None
    success_rate: float | None
    latency_p50_s: float | None
    output_limit: int | None
    input_limit: int | None
    balance_score: float | None
    samples: int
    ranked: bool


def model_index(router_doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    listing = router_doc.get("model_list") or {}
    return {m["name"]: m for m in listing.get("models", []) if isinstance(m, dict)
            and isinstance(m.get("name"), str)}


def compute_tiers(stats: dict[str, ModelStats], models: dict[str, dict[str, Any]],
                  scoring: str = "balanced") -> dict[str, TierRow]:
    """Tier rows for every known text model and every model with samples.

    Ranked = has at least one sample that judges the model. Fast: median latency of
    successful answers (no success -> last). Quality: output token limit, input limit as
    tie-breaker. Balance: 0.5*success + 0.3*speed + 0.2*capability, each in 0..1 (README);
    `scoring="seed"` uses the original (1-success)*1000 + latency - max_tokens*0.1."""
    names = sorted({m for m, info in models.items() if is_text_model(m, info["methods"])}
                   | set(stats))
    ranked = [m for m in names if m in stats and stats[m].judged]
    limits = {m: (int(models.get(m, {}).get("output_limit") or 0),
                  int(models.get(m, {}).get("input_limit") or 0)) for m in names}
    latency = {m: stats[m].latency_p50_s for m in ranked}
    # A median of 0.0 is possible after rounding: clamp rather than treat it as "no latency".
    latency = {m: (None if v is None else max(v, 1e-4)) for m, v in latency.items()}
    fastest = min((v for v in latency.values() if v is not None), default=None)
    top_output = max((limits[m][0] for m in ranked), default=0)
    balance: dict[str, float] = {}
    for m in ranked:
        success = stats[m].success_rate or 0.0
        if scoring == "seed":
            lat = latency[m] if latency[m] is not None else 1000.0
            balance[m] = round((1 - success) * 1000 + lat - limits[m][0] * 0.1, 4)
        else:
            speed = fastest / latency[m] if latency[m] is not None and fastest else 0.0
            capability = (math.log(limits[m][0]) / math.log(top_output)
                          if limits[m][0] > 1 and top_output > 1 else 0.0)
            balance[m] = round(0.5 * success + 0.3 * speed + 0.2 * capability, 4)
    fast_score = {m: (latency[m] is None, latency[m] or 0.0) for m in ranked}  # no success: last
    quality_score = {m: (-limits[m][0], -limits[m][1]) for m in ranked}
    balance_score = {m: (balance[m] if scoring == "seed" else -balance[m]) for m in ranked}
    fast, quality = assign_tiers(fast_score), assign_tiers(quality_score)
    bal = assign_tiers(balance_score)
    # Rows come in Balance order (best first), unranked models last: the default route order.
    rows = {}
    for m in sorted(ranked, key=lambda m: (balance_score[m], m)) + \
            [m for m in names if m not in fast]:
        st = stats.get(m)
        rows[m] = TierRow(model=m, fast=fast.get(m), quality=quality.get(m),
                          balance=bal.get(m), success_rate=st.success_rate if st else None,
                          latency_p50_s=st.latency_p50_s if st else None,
                          output_limit=limits[m][0] or None, input_limit=limits[m][1] or None,
                          balance_score=balance.get(m), samples=st.samples if st else 0,
                          ranked=m in fast)
    return rows


def tier_order(rows: dict[str, TierRow], tier: str, text_models: list[str]) -> list[str]:
    """Routing order for a tier: ranked models best first, then unranked by preference."""
    ranked = [r for r in rows.values() if r.ranked and r.model in text_models]
    if tier == "fast":
        ranked.sort(key=lambda r: (r.latency_p50_s is None, r.latency_p50_s or 0.0, r.model))
    elif tier == "quality":
        ranked.sort(key=lambda r: (-(r.output_limit or 0), -(r.input_limit or 0), r.model))
    order = [r.model for r in ranked]        # "balance": rows already come in that order
    return order + [m for m in default_order(rows, text_models) if m not in order]


def default_order(rows: dict[str, TierRow], text_models: list[str]) -> list[str]:
    """Unmeasured models: the well-known defaults first, then by capability."""
    preferred = [m for m in DEFAULT_PREFERENCE if m in text_models]
    rest = sorted((m for m in text_models if m not in preferred),
                  key=lambda m: (-(rows[m].output_limit or 0) if m in rows else 0, m))
    return preferred + rest


# ======================================================================================
# Prober: concurrent probes for `rank`
# ======================================================================================

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
    results: list[ProbeResult]
    skipped: list[str]           # models no key could probe (all cooling or disabled)
    seconds: float               # probing time, after the SDK import and client set-up


def probe_models(settings: Settings, store: StateStore, models: list[str], rounds: int,
                 concurrency: int, progress: bool) -> ProbeRun:
    """Probe every model `rounds` times.

    Results are written to state in one transaction per round (and on Ctrl-C), never with
    the lock held across a call."""
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor
    keys = settings.require_keys()
    client = GeminiClient(settings)
    with store.transaction() as tx:
        prune_cooldowns(tx.cooldowns, time.time())
        cooldowns = json.loads(json.dumps(tx.cooldowns))
        router = json.loads(json.dumps(tx.router))
        start = tx.router["next_key"]
        tx.router["next_key"] = (start + len(models)) % len(keys)
    # Probes go to keys that are usable at all (not disabled, not cooling for every model).
    healthy = [k for k in keys
               if why_blocked(cooldowns, router, settings, k, None, time.time()) is None]
    results: list[ProbeResult] = []
    pending: list[ProbeResult] = []
    skipped: set[str] = set()
    request = client.build_request(PromptRequest(PROBE_PROMPT,
                                                 options={"max_output_tokens": 16}))
    bar = _progress_bar(len(models) * rounds, progress)
    mirror = StateTransaction(None, {"cooldowns": cooldowns, "router": router,
                                     "stats": empty_doc("stats")})
    mirror_lock = threading.Lock()     # guards the local mirror and the result lists

    def probe(model: str, offset: int) -> None:
        # Spread over healthy keys: model i starts at healthy key (start + i); key-level
        # failures move on to the next key so one limited key does not hide a model's health.
        for step in range(len(healthy)):
            key = healthy[(start + offset + step) % len(healthy)]
            with mirror_lock:
                if why_blocked(cooldowns, router, settings, key, model, time.time()):
                    continue
                count_request(router, settings, key, model, time.time())
            began = time.perf_counter()
            outcome = client.generate(key, model, request)
            result = ProbeResult(model, key, outcome, time.perf_counter() - began, time.time())
            with mirror_lock:
                pending.append(result)
                results.append(result)
                if outcome.kind in ("rate_limited", "daily_quota", "key_invalid"):
                    # Mirror the state change locally so later probes skip this pair/key.
                    record_outcome(mirror, settings, key, model, outcome, result.latency,
                                   result.t)
            if outcome.kind in ("rate_limited", "daily_quota", "key_invalid"):
                continue
            return
        skipped.add(model)

    def flush() -> None:
        with mirror_lock:
            batch = list(pending)
        if batch:
            with store.transaction() as tx:
                for r in batch:
                    count_request(tx.router, settings, r.key, r.model, r.t)
                notices = [record_outcome(tx, settings, r.key, r.model, r.outcome, r.latency,
                                          r.t) for r in batch]
            # Forget the batch only once it is on disk: a Ctrl-C mid-write retries it.
            with mirror_lock:
                del pending[:len(batch)]
            for notice in filter(None, notices):
                warn(notice)

    async def run_round(pool: ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        tasks = [loop.run_in_executor(pool, probe, m, i) for i, m in enumerate(models)]
        for task in asyncio.as_completed(tasks):
            await task
            if bar is not None:
                bar.update(1)

    pool = ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(models))))
    began = time.perf_counter()
    try:
        for _ in range(rounds):
            asyncio.run(run_round(pool))
            flush()
    except KeyboardInterrupt:
        flush()
        if bar is not None:
            bar.close()
        raise Interrupted(f"interrupted; kept the {len(results)} samples taken") from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
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
# Router: model list, candidate order, key rotation and failover
# ======================================================================================

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

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def cached_model_list(router_doc: dict[str, Any], settings: Settings,
                      now: float) -> list[dict[str, Any]] | None:
    listing = router_doc.get("model_list")
    if not listing or listing.get("endpoint") != settings.endpoint:
        return None
    if now - float(listing.get("fetched_at", 0)) > settings.models_ttl:
        return None
    return listing["models"]


def fetch_model_list(settings: Settings, store: StateStore, client: GeminiClient | None = None,
                     out: Output | None = None) -> list[dict[str, Any]]:
    """List models through the first healthy key (round-robin), cache them, return them."""
    keys = settings.require_keys()
    client = client or GeminiClient(settings)
    with store.transaction(write=False) as tx:
        start, now = tx.router["next_key"], time.time()
        usable = [k for k in (keys[(start + i) % len(keys)] for i in range(len(keys)))
                  if why_blocked(tx.cooldowns, tx.router, settings, k, None, now) is None]
    failures: list[tuple[ApiKey, Outcome]] = []
    listed: list[dict[str, Any]] | None = None
    for key in usable:
        began = time.perf_counter()
        result = client.list_models(key)
        if not isinstance(result, Outcome):
            listed = result
            if out:
                out.info(f"listed {len(listed)} models with {key.label} "
                         f"in {time.perf_counter() - began:.2f} s")
            break
        failures.append((key, result))
        if out:
            out.info(f"listing models with {key.label}: {result.kind}: {result.detail}")
        if result.kind == "unreachable":
            break
    if listed is not None or any(o.kind != "unreachable" for _, o in failures):
        with store.transaction() as tx:
            now = time.time()
            for notice in [record_outcome(tx, settings, k, None, o, 0.0, now)
                           for k, o in failures]:
                if notice:
                    warn(notice)
            if listed is not None:
                tx.router["model_list"] = {"endpoint": settings.endpoint, "fetched_at": now,
                                           "models": listed}
    if listed is not None:
        return listed
    if failures and failures[-1][1].kind == "unreachable":
        raise NothingAvailable(f"cannot reach {settings.endpoint}: {failures[-1][1].detail}")
    if not failures:
        raise NothingAvailable(f"no usable key: every key is disabled or cooling; see "
                               f"'{PROG} cooldowns'")
    summary = "; ".join(f"{k.label}: {o.detail}" for k, o in failures)
    raise NothingAvailable(f"could not list models: {summary}")


def known_models(settings: Settings, store: StateStore, refresh: bool = False,
                 client: GeminiClient | None = None,
                 out: Output | None = None) -> list[dict[str, Any]]:
    """The cached model list, or a fresh one when there is none (or on refresh)."""
    if not refresh:
        with store.transaction(write=False) as tx:
            cached = cached_model_list(tx.router, settings, time.time())
        if cached is not None:
            return cached
    return fetch_model_list(settings, store, client=client, out=out)


def resolve_model(name: str, models: list[dict[str, Any]]) -> str:
    """A user-given model name, validated against the list (with or without 'models/')."""
    wanted = bare_model(name.strip())
    names = set(text_model_names(models))
    if wanted in names:
        return wanted
    if any(m["name"] == wanted for m in models):
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


def plan_route(tx: StateTransaction, models: list[dict[str, Any]], model: str | None,
               tier: str | None) -> RoutePlan:
    """The candidate models, in order: -m (already resolved), else the lock, else the tier
    order."""
    if model:
        return RoutePlan([model], "-m given")
    locked = tx.router.get("lock")
    if locked:
        return RoutePlan([locked], f"locked to {locked} ('{PROG} unlock' to release)")
    text_models = text_model_names(models)
    rows = compute_tiers(all_stats(tx.stats), {m["name"]: m for m in models})
    tier = tier or "balance"
    order = tier_order(rows, tier, text_models)
    ranked = sum(1 for m in order if rows.get(m) and rows[m].ranked)
    why = (f"{tier} tier order ({ranked} ranked, {len(order) - ranked} unranked)" if ranked
           else "no model ranked yet ('gemini-router rank' measures them): default order")
    return RoutePlan(order, why)


class RouteSession:
    """Walks the plan: per model, rotated keys; per attempt, one state transaction."""

    def __init__(self, settings: Settings, plan: RoutePlan, start: int):
        self.settings = settings
        self.plan = plan
        self.keys = settings.keys
        self.start = start
        self.tried: dict[str, set[int]] = {}
        self.transient: dict[str, int] = {}
        self.skipped: dict[str, tuple[float | None, str]] = {}   # "key#N on M" -> (until, why)
        self.gone: set[str] = set()

    def rotated_keys(self) -> list[ApiKey]:
        n = len(self.keys)
        return [self.keys[(self.start + i) % n] for i in range(n)]

    def next_choice(self, tx: StateTransaction, now: float,
                    reserve: bool = True) -> tuple[str, ApiKey] | None:
        cooldowns, router = tx.cooldowns, tx.router
        for model in self.plan.models:
            # "try the next key once, then the next model": two transient failures end a model.
            if model in self.gone or self.transient.get(model, 0) >= 2:
                continue
            for key in self.rotated_keys():
                # Blocked before tried: a pair cooled by this very route must still count
                # toward the earliest recovery (and --wait).
                blocked = why_blocked(cooldowns, router, self.settings, key, model, now)
                if blocked is not None:
                    self.skipped[f"{key.label} on {model}"] = blocked
                    continue
                if key.index in self.tried.get(model, set()):
                    continue
                if reserve:
                    self.tried.setdefault(model, set()).add(key.index)
                    count_request(router, self.settings, key, model, now)
                    router["next_key"] = key.index % len(self.keys)
                return model, key
        return None

    def learn(self, model: str, outcome: Outcome) -> None:
        if outcome.kind == "transient":
            self.transient[model] = self.transient.get(model, 0) + 1
        elif outcome.kind == "model_unavailable":
            self.gone.add(model)

    def earliest(self) -> tuple[float, str] | None:
        timed = [(until, what) for what, (until, _) in self.skipped.items()
                 if until is not None]
        return min(timed) if timed else None


def route_prompt(settings: Settings, store: StateStore, prompt: PromptRequest, *,
                 model: str | None = None, tier: str | None = None,
                 on_text: Callable[[str], None] | None = None,
                 out: Output | None = None) -> RouteResult:
    """Send one prompt through the best available (model, key), failing over by outcome.

    Each attempt is one transaction that records the previous outcome (`record_outcome`)
    and reserves the next (model, key); the call itself happens outside the lock."""
    settings.require_keys()
    client = GeminiClient(settings)
    request = client.build_request(prompt)
    models = known_models(settings, store, client=client, out=out)
    model = resolve_model(model, models) if model else None    # before taking any lock
    attempts: list[Attempt] = []
    last: tuple[str, ApiKey, Outcome, float] | None = None
    session: RouteSession | None = None
    while True:
        with store.transaction() as tx:
            now = time.time()
            prune_cooldowns(tx.cooldowns, now)
            if last is not None:
                notice = record_outcome(tx, settings, last[1], last[0], last[2], last[3], now)
                if notice:
                    warn(notice)
            if last is not None and ends_route(last[2]):
                break
            if session is None:
                plan = plan_route(tx, models, model, tier)
                session = RouteSession(settings, plan, tx.router["next_key"])
                if out:
                    out.info(f"route: {plan.why}: {', '.join(plan.models[:8])}"
                             + (" …" if len(plan.models) > 8 else ""))
            choice = session.next_choice(tx, now)
        if choice is None:
            break
        chosen_model, key = choice
        if out:
            out.info(f"trying {chosen_model} with {key.label}")
        began = time.perf_counter()
        outcome = client.generate(key, chosen_model, request, on_text)
        latency = time.perf_counter() - began
        attempts.append(Attempt(chosen_model, key.label, outcome.kind, round(latency, 4),
                                outcome.detail))
        if out:
            out.info(f"  {chosen_model} {key.label}: {outcome.kind} in {latency:.2f} s"
                     + (f" ({outcome.detail})" if outcome.detail else ""))
        session.learn(chosen_model, outcome)
        last = (chosen_model, key, outcome, latency)
    assert session is not None
    if last is not None:
        chosen_model, key, outcome, latency = last
        if outcome.kind == "ok":
            return RouteResult(model=chosen_model, key=key.label, text=outcome.text,
                               finish_reason=outcome.finish_reason, latency_s=round(latency, 4),
                               usage={"prompt_tokens": outcome.prompt_tokens,
                                      "output_tokens": outcome.output_tokens,
                                      "total_tokens": outcome.total_tokens},
                               attempts=attempts)
        if outcome.kind in ("blocked", "bad_request") or outcome.partial:
            raise UpstreamError(f"{chosen_model} {key.label}: {outcome.detail}")
        if outcome.kind == "unreachable":
            raise NothingAvailable(f"cannot reach {settings.endpoint}: {outcome.detail}")
    raise nothing_available(session, attempts)


def ends_route(outcome: Outcome) -> bool:
    """An answer, a failure no other model would fix, or a stream that already printed."""
    return outcome.kind in ("ok", "blocked", "bad_request", "unreachable") \
        or outcome.partial


def nothing_available(session: RouteSession, attempts: list[Attempt]) -> NothingAvailable:
    earliest = session.earliest()
    parts = ["nothing available"]
    if attempts:
        last = attempts[-1]
        parts.append(f"{len(attempts)} attempt(s), last: {last.model} {last.key}: "
                     f"{last.detail or last.outcome}")
    if earliest is not None:
        until, what = earliest
        parts.append(f"earliest: {what} in {_duration(until - time.time())}")
        return NothingAvailable("; ".join(parts), until)
    if session.skipped:
        parts.append("every key is disabled or out of quota; see 'gemini-router cooldowns'")
    return NothingAvailable("; ".join(parts))


# ======================================================================================
# CLI
# ======================================================================================

GENERATION_OPTIONS: dict[str, Callable[[str], Any]] = {
    "temperature": float, "top_p": float, "top_k": int, "max_output_tokens": int,
    "stop": str, "candidate_count": int, "response_mime_type": str,
    "presence_penalty": float, "frequency_penalty": float,
}
OPTION_KINDS = {float: "a number", int: "an integer", str: "text"}
# Fields the pinned SDK (google-ai-generativelanguage 0.6.15) has no place for.
# Options the pinned SDK's GenerationConfig has no field for: sent as JSON beside it.
WIRE_OPTIONS: dict[str, Callable[[str], Any]] = {"seed": int}


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
        else:
            (wire if name in WIRE_OPTIONS else options)[name] = value
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
    prompt, model = build_prompt(args)
    store = StateStore(settings)
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
            result = route_prompt(settings, store, prompt, model=model, tier=args.tier,
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
        choice = session.next_choice(tx, now, reserve=False)
    skipped = [{"target": what, "until": until, "reason": why}
               for what, (until, why) in session.skipped.items()]
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
    store = StateStore(settings)
    models = known_models(settings, store, refresh=args.refresh, out=out)
    names = text_model_names(models)
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
    ok = sum(1 for r in run.results if r.outcome.kind == "ok")
    out.note(f"probed {len(names)} models x {args.rounds} round(s): {ok}/{len(run.results)} ok "
             f"in {run.seconds:.2f} s"
             + (f"; skipped (cooling): {', '.join(run.skipped)}" if run.skipped else ""))
    return cmd_tiers(args, settings, out)


def cmd_tiers(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    with StateStore(settings).transaction(write=False) as tx:
        rows = compute_tiers(all_stats(tx.stats), model_index(tx.router), args.scoring)
    ordered = list(rows.values())
    data = {r.model: {k: v for k, v in asdict(r).items() if k != "model"} for r in ordered}

    def human() -> str:
        if not rows:
            return f"no models known yet; run '{PROG} rank'"
        table = format_table(
            ["MODEL", "FAST", "QUALITY", "BALANCE", "SUCCESS", "P50", "OUT LIMIT", "SCORE",
             "SAMPLES"],
            [[r.model, r.fast or "-", r.quality or "-", r.balance or "-",
              _pct(r.success_rate), _secs(r.latency_p50_s), r.output_limit,
              _fmt_num(r.balance_score, 3), r.samples] for r in ordered])
        unranked = sum(1 for r in ordered if not r.ranked)
        if unranked:
            table += f"\n\n{unranked} unranked (no samples yet): run '{PROG} rank'"
        return table
    out.emit(data, human)
    return 0


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def cmd_stats(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    with StateStore(settings).transaction(write=False) as tx:
        stats = all_stats(tx.stats)
    data = {m: {k: v for k, v in asdict(s).items() if k != "model"} for m, s in stats.items()}

    def human() -> str:
        if not stats:
            return f"no samples yet; run '{PROG} rank' or route a prompt"
        return format_table(
            ["MODEL", "SAMPLES", "SUCCESS", "P50", "P95", "IN TOK", "OUT TOK", "OUTCOMES"],
            [[s.model, s.samples, _pct(s.success_rate), _secs(s.latency_p50_s),
              _secs(s.latency_p95_s), _fmt_num(s.prompt_tokens_avg, 0),
              _fmt_num(s.output_tokens_avg, 0),
              " ".join(f"{k}={v}" for k, v in sorted(s.outcomes.items()))]
             for s in stats.values()])
    out.emit(data, human)
    return 0


def cooldown_entries(settings: Settings, cooldowns: dict[str, Any], router: dict[str, Any],
                     now: float) -> list[dict[str, Any]]:
    """Everything that keeps a call from being made now: cooldowns, keys at a proactive
    ceiling (GEMINI_ROUTER_RPM/RPD), then disabled keys."""
    entries = [{"model": e.get("model"), "key": settings.label_of(e.get("key")),
                "reason": e["reason"], "kind": e.get("kind"), "since": e.get("since"),
                "until": round(e["until"], 3), "remaining_s": round(e["until"] - now, 1)}
               for e in cooldowns["cooldowns"] if e["until"] > now]
    for target in router["usage"]:
        fingerprint, _, model = target.partition("/")
        key = next((k for k in settings.keys if k.fingerprint == fingerprint), None)
        ceiling = key and ceiling_until(router, settings, key, model, now)
        if ceiling:
            entries.append({"model": model, "key": key.label, "reason": ceiling[1],
                            "kind": "ceiling", "since": None, "until": round(ceiling[0], 3),
                            "remaining_s": round(ceiling[0] - now, 1)})
    entries.sort(key=lambda e: e["until"])
    entries += [{"model": None, "key": settings.label_of(fp), "reason": d.get("reason", ""),
                 "kind": "disabled", "since": d.get("since"), "until": None,
                 "remaining_s": None}
                for fp, d in sorted(cooldowns["disabled_keys"].items())]
    return entries


def cmd_cooldowns(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    store = StateStore(settings)
    if args.clear is not None:
        return clear_cooldowns(args.clear, settings, store, out)
    with store.transaction(write=False) as tx:
        now = time.time()
        entries = cooldown_entries(settings, tx.cooldowns, tx.router, now)

    def human() -> str:
        if not entries:
            return "no active cooldowns"
        return format_table(
            ["MODEL", "KEY", "LEFT", "UNTIL", "REASON"],
            [[e["model"] or "(every model)", e["key"] or "(every key)",
              "disabled" if e["until"] is None else _duration(e["remaining_s"]),
              "-" if e["until"] is None else _when(e["until"], now),
              e["reason"]] for e in entries])
    out.emit(entries, human)
    return 0


def clear_cooldowns(target: str, settings: Settings, store: StateStore, out: Output) -> int:
    """Clear every cooldown, those of one model, or those (and the disabling) of key#N."""
    fingerprint = None
    if target.startswith("key#"):
        index = target[4:]
        if not _is_decimal(index) or not 1 <= int(index) <= len(settings.keys):
            raise UsageError(f"{target}: no such key (configured: {len(settings.keys)})")
        fingerprint = settings.keys[int(index) - 1].fingerprint
    model = bare_model(target) if target and fingerprint is None else None
    def matches(key_fp: str | None, entry_model: str | None) -> bool:
        return not target or (fingerprint is not None and key_fp == fingerprint) \
            or (model is not None and entry_model == model)

    with store.transaction() as tx:
        cooldowns, now = tx.cooldowns, time.time()
        prune_cooldowns(cooldowns, now)
        before = len(cooldown_entries(settings, cooldowns, tx.router, now))
        cooldowns["cooldowns"] = [e for e in cooldowns["cooldowns"]
                                  if not matches(e.get("key"), e.get("model"))]
        cooldowns["disabled_keys"] = {fp: d for fp, d in cooldowns["disabled_keys"].items()
                                      if not matches(fp, None)}
        tx.router["usage"] = {k: v for k, v in tx.router["usage"].items()
                              if not matches(*k.split("/", 1))}
        tx.router["strikes"] = {m: n for m, n in tx.router["strikes"].items()
                                if not matches(None, m)}
        cleared = before - len(cooldown_entries(settings, cooldowns, tx.router, now))
    out.emit({"cleared": cleared}, lambda: f"cleared {cleared} cooldown(s)")
    return 0


def cmd_lock(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    store = StateStore(settings)
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
    with StateStore(settings).transaction() as tx:
        previous = tx.router.get("lock")
        tx.router["lock"] = None
    out.emit({"lock": None, "was": previous},
             lambda: f"unlocked (was {previous})" if previous else "not locked")
    return 0


def cmd_models(args: argparse.Namespace, settings: Settings, out: Output) -> int:
    store = StateStore(settings)
    models = known_models(settings, store, refresh=args.refresh, out=out)
    text = set(text_model_names(models))
    shown = [m for m in models if args.all or m["name"] in text]
    with store.transaction(write=False) as tx:
        now = time.time()
        stats = all_stats(tx.stats)
        locked = tx.router.get("lock")
        # Which keys cannot call each model now, and until when (None = disabled key).
        blocked = {m["name"]: {k.label: b[0] for k in settings.keys
                               if (b := why_blocked(tx.cooldowns, tx.router, settings, k,
                                                      m["name"], now))}
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
        hidden = len(models) - len(shown)
        return table + (f"\n\n{hidden} non-text models hidden (--all shows them)"
                        if hidden else "")
    out.emit(data, human)
    return 0


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
    g.add_argument("--timeout", metavar="SECONDS", type=flag_type(LIMITS["GEMINI_ROUTER_TIMEOUT"]), default=d(None),
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
    p.add_argument("--dry-run", action="store_true",
                   help="explain which model and key would be used; call nothing")
    p.add_argument("--wait", nargs="?", type=flag_type(Limit(0, 0, MAX_COOLDOWN_SECS)),
                   const=float(MAX_COOLDOWN_SECS), default=None, metavar="SECONDS",
                   help="when nothing is available, wait for the earliest recovery (a "
                        "cooldown's end) and try again; at most SECONDS, bare --wait at most "
                        f"{MAX_COOLDOWN_SECS // 86400} days. A value is taken only if it is "
                        "a number")
    p.numeric_optional["--wait"] = str(float(MAX_COOLDOWN_SECS))

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
                   help="clear every cooldown, or those of MODEL or key#N")
    p = command("lock", "pin routing to one model", cmd_lock)
    p.add_argument("model", help="model name, with or without 'models/'")
    command("unlock", "remove the pin", cmd_unlock)
    p = command("models", "the discovered models, their limits and status", cmd_models)
    p.add_argument("--refresh", action="store_true", help="relist models now")
    p.add_argument("--all", action="store_true", help="include non-text models")
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
