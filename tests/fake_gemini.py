"""A loopback fake of the Gemini v1beta REST API, for tests.

Stdlib only. It speaks the protocol the way the google-generativeai SDK's REST
transport uses it, so tests can drive the *real* SDK clients against it::

    from google.ai import generativelanguage as glm
    with FakeGemini() as fake:
        opts = {"api_endpoint": fake.url, "api_key": "key-1"}
        gen = glm.GenerativeServiceClient(transport="rest", client_options=opts)
        raw = gen.generate_content(
            glm.GenerateContentRequest(model="models/gemini-2.5-flash",
                                       contents=[{"role": "user", "parts": [{"text": "hi"}]}]),
            timeout=5, retry=None)
        assert raw.candidates[0].content.parts[0].text == "[gemini-2.5-flash] hi"

Endpoints (the query string, e.g. ``$alt=json;enum-encoding=int``, is accepted and
otherwise ignored except for ``pageSize``/``pageToken``; the key is read from the
``x-goog-api-key`` header, or from a ``key=`` query parameter as the real API allows):

- ``GET  /v1beta/models?pageSize=N&pageToken=T``  -> ``{"models": [...], "nextPageToken": T}``;
  at most ``min(pageSize or 50, page_size_cap)`` per page, no token on the last page.
- ``GET  /v1beta/models/{m}``                      -> the model entry, or 404 NOT_FOUND.
- ``POST /v1beta/models/{m}:generateContent``      -> a GenerateContentResponse whose text is
  ``f"[{m}] " + <text of the last user part>``. ``generationConfig.maxOutputTokens`` cuts the
  answer to that many words (finishReason MAX_TOKENS); ``responseMimeType ==
  "application/json"`` answers ``{"model": m, "echo": prompt}``. Token counts are word counts
  (prompt: all request text, at least 1).
- ``POST /v1beta/models/{m}:streamGenerateContent`` -> the same answer as a streamed JSON array
  (see "Stream framing" below) in 2-3 elements; the last carries finishReason and usageMetadata.
- ``POST /v1beta/models/{m}:countTokens``          -> ``{"totalTokens": N}``.

A model is known when it is in ``FakeGemini.models``; generate/stream need
"generateContent" and count needs "countTokens" in its supportedGenerationMethods, as with the
real API. Otherwise: 404 NOT_FOUND. A request without any key gets the real 403
"unregistered callers" error.

Enums: when the request asks for ``enum-encoding=int`` (the SDK always does) enum fields
(finishReason, blockReason, safety categories/probabilities) are sent as integers, as the real
server does; otherwise as names (handy with curl).

Behaviours (``set_behaviour(name, key=..., model=..., times=..., **params)``); errors use the
real body ``{"error": {"code", "message", "status", "details"?}}``:

=================  ========================================================================
ok                 normal answer
invalid_key        400 INVALID_ARGUMENT, ErrorInfo reason API_KEY_INVALID + LocalizedMessage
unauthorized       401 UNAUTHENTICATED
forbidden          403 PERMISSION_DENIED, ErrorInfo reason ``reason`` (SERVICE_DISABLED)
rate_minute        429, QuotaFailure ...PerMinutePerProjectPerModel-FreeTier, RetryInfo
                   ``retry_delay`` ("26s"); params quota_value, message
rate_day           429, QuotaFailure ...PerDayPerProjectPerModel-FreeTier, RetryInfo ("36s")
rate_plain         429 RESOURCE_EXHAUSTED without details
not_found          404 NOT_FOUND "models/x is not found for API version v1beta, ..."
bad_request        400 INVALID_ARGUMENT + BadRequest detail; param ``message``
error500           500 INTERNAL
unavailable        503 UNAVAILABLE "The model is overloaded. Please try again later."
gateway_timeout    504 DEADLINE_EXCEEDED
slow               wait ``seconds`` (1.0), then answer ok
hang               never answer: wait until stop() or ``seconds`` (3600) pass, then drop the
                   connection without a response (Call.status stays 0)
blocked            200, no candidates, promptFeedback.blockReason ``block_reason`` ("SAFETY")
safety             200, one candidate, finishReason SAFETY, no content, safetyRatings
html502            502 text/html "<html><body><h1>502 Bad Gateway</h1></body></html>"
nonjson_error      500 text/plain, not JSON
empty200           200 with an empty body
no_candidates      200 with only usageMetadata
stream_break       stream: one text element, then an ``{"error": ...}`` element, array closed,
                   connection closed. generate/count: like error500
stream_truncate    stream: one text element, then the connection is dropped mid-array (no
                   closing "]", no terminating chunk). generate/count: like error500
=================  ========================================================================

Most error behaviours take an optional ``message`` param. On countTokens the 200-content
behaviours blocked/safety/no_candidates answer a normal count (there are no candidates to
block); empty200 sends an empty body.

Rule matching: ``key=None`` means any key, ``model=None`` any model ("models/" prefix optional).
Among the rules that apply to a call the most specific wins: (key, model) > key only >
model only > global > "ok". ``times=N`` makes a rule expire after N applications; a later rule
with the same (key, model) replaces the earlier one. Model listing (list/get) only sees rules
with ``model=None`` whose behaviour is one of LISTING_BEHAVIOURS; a rule that does not apply to
a call is neither used nor consumed by it.

Stream framing: ``Transfer-Encoding: chunked`` on HTTP/1.1 keep-alive; the body is
``[`` + elem1 + ``\\n,\\r\\n`` + elem2 + ... + ``\\n]`` (what the real server sends with
``alt=json``), one HTTP chunk per element with a short pause between them. Nothing may follow
the closing ``]``: google.api_core's rest_streaming parser rejects any byte after it.

Request log: every request (failing ones too) is appended to ``calls`` as soon as it is parsed
(``status`` 0), and its ``status`` is filled in when the response line is sent.

Standalone::

    python tests/fake_gemini.py --port 8765 [--latency 0.05] [--models N]
                                [--behaviour KEY:MODEL:BEHAVIOUR ...]   # KEY/MODEL may be *
"""

from __future__ import annotations

import argparse
import base64
import copy
import itertools
import json
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["FakeGemini", "Call", "DEFAULT_MODELS", "make_models", "BEHAVIOURS", "LISTING_BEHAVIOURS"]

API_VERSION = "v1beta"

# --------------------------------------------------------------------------------------------
# Model catalogue
# --------------------------------------------------------------------------------------------

def _text_model(name, display, version, description, out_limit, *, in_limit=1048576,
                methods=("generateContent", "countTokens", "createCachedContent",
                         "batchGenerateContent"),
                top_k=64, thinking=False, max_temperature=2.0):
    entry = {
        "name": f"models/{name}",
        "version": version,
        "displayName": display,
        "description": description,
        "inputTokenLimit": in_limit,
        "outputTokenLimit": out_limit,
        "supportedGenerationMethods": list(methods),
        "temperature": 1.0,
        "topP": 0.95,
        "topK": top_k,
    }
    # The real list omits fields that hold their default (proto3 JSON): no maxTemperature on
    # Gemma, no "thinking" on non-thinking models.
    if max_temperature is not None:
        entry["maxTemperature"] = max_temperature
    if thinking:
        entry["thinking"] = True
    return entry


DEFAULT_MODELS: list[dict] = [
    # --- text models a router should use ---
    _text_model("gemini-2.5-pro", "Gemini 2.5 Pro", "2.5",
                "Stable release (June 17th, 2025) of Gemini 2.5 Pro", 65536, thinking=True),
    _text_model("gemini-2.5-flash", "Gemini 2.5 Flash", "001",
                "Stable version of Gemini 2.5 Flash, our mid-size multimodal model that "
                "supports up to 1 million tokens, released in June of 2025.", 65536,
                thinking=True),
    _text_model("gemini-2.5-flash-lite", "Gemini 2.5 Flash-Lite", "001",
                "Stable version of Gemini 2.5 Flash-Lite, released in July of 2025", 65536,
                thinking=True),
    _text_model("gemini-2.0-flash", "Gemini 2.0 Flash", "2.0", "Gemini 2.0 Flash", 8192,
                top_k=40),
    _text_model("gemini-2.0-flash-lite", "Gemini 2.0 Flash-Lite", "2.0",
                "Gemini 2.0 Flash-Lite", 8192, top_k=40),
    _text_model("gemma-3-27b-it", "Gemma 3 27B", "001", "", 8192, in_limit=131072,
                methods=("generateContent", "countTokens"), max_temperature=None),
    # --- models a router must exclude ---
    {
        "name": "models/text-embedding-004",
        "version": "004",
        "displayName": "Text Embedding 004",
        "description": "Obtain a distributed representation of a text.",
        "inputTokenLimit": 2048,
        "outputTokenLimit": 1,
        "supportedGenerationMethods": ["embedContent"],
    },
    {
        "name": "models/gemini-embedding-001",
        "version": "001",
        "displayName": "Gemini Embedding 001",
        "description": "Obtain a distributed representation of a text.",
        "inputTokenLimit": 2048,
        "outputTokenLimit": 1,
        "supportedGenerationMethods": ["embedContent"],
    },
    {
        "name": "models/imagen-4.0-generate-001",
        "version": "001",
        "displayName": "Imagen 4",
        "description": "Vertex served Imagen 4.0 model",
        "inputTokenLimit": 480,
        "outputTokenLimit": 8192,
        "supportedGenerationMethods": ["predict"],
    },
    _text_model("gemini-2.5-flash-preview-tts", "Gemini 2.5 Flash Preview TTS",
                "gemini-2.5-flash-exp-tts-2025-05-19", "Gemini 2.5 Flash Preview TTS", 16384,
                in_limit=8192, methods=("countTokens", "generateContent")),
    _text_model("gemini-2.0-flash-preview-image-generation",
                "Gemini 2.0 Flash Preview Image Generation", "2.0",
                "Gemini 2.0 Flash Preview Image Generation", 8192, in_limit=32768,
                methods=("generateContent", "countTokens", "batchGenerateContent")),
    _text_model("gemini-2.5-flash-native-audio-preview-09-2025",
                "Gemini 2.5 Flash Native Audio Preview 09-2025", "gemini-2.5-flash-native-audio",
                "Gemini 2.5 Flash Native Audio Preview 09-2025", 8192, in_limit=131072,
                methods=("countTokens", "bidiGenerateContent"), thinking=True),
    _text_model("gemini-live-2.5-flash-preview", "Gemini Live 2.5 Flash Preview", "001",
                "Gemini Live 2.5 Flash Preview", 8192, in_limit=1048576,
                methods=("bidiGenerateContent", "countTokens")),
    {
        "name": "models/aqa",
        "version": "001",
        "displayName": "Model that performs Attributed Question Answering.",
        "description": "Model trained to return answers to questions that are grounded in "
                       "provided sources, along with estimating answerable probability.",
        "inputTokenLimit": 7168,
        "outputTokenLimit": 1024,
        "supportedGenerationMethods": ["generateAnswer"],
        "temperature": 0.2,
        "topP": 1.0,
        "topK": 40,
    },
]

_SIM_OUTPUT_LIMITS = (8192, 16384, 32768, 65536)


def make_models(n: int, prefix: str = "sim-model") -> list[dict]:
    """n generateContent-capable text models ``f"{prefix}-{i:03d}"`` (i from 0), with
    outputTokenLimit cycling through 8192, 16384, 32768, 65536."""
    return [
        _text_model(f"{prefix}-{i:03d}", f"Sim Model {i:03d}", "001",
                    f"Simulated text model number {i}.",
                    _SIM_OUTPUT_LIMITS[i % len(_SIM_OUTPUT_LIMITS)],
                    methods=("generateContent", "countTokens"))
        for i in range(n)
    ]


# --------------------------------------------------------------------------------------------
# Behaviours and error bodies
# --------------------------------------------------------------------------------------------

BEHAVIOURS = frozenset({
    "ok", "invalid_key", "unauthorized", "forbidden", "rate_minute", "rate_day", "rate_plain",
    "not_found", "bad_request", "error500", "unavailable", "gateway_timeout", "slow", "hang",
    "blocked", "safety", "html502", "nonjson_error", "empty200", "no_candidates",
    "stream_break", "stream_truncate",
})

# Behaviours that affect model listing (list/get); only rules with model=None are considered.
LISTING_BEHAVIOURS = frozenset({
    "invalid_key", "unauthorized", "forbidden", "rate_plain", "error500", "unavailable",
    "hang", "slow", "html502",
})

# Behaviours answered by a JSON error body with this HTTP status.
_JSON_ERRORS = {
    "invalid_key": 400, "unauthorized": 401, "forbidden": 403, "rate_minute": 429,
    "rate_day": 429, "rate_plain": 429, "not_found": 404, "bad_request": 400, "error500": 500,
    "unavailable": 503, "gateway_timeout": 504,
}

_STATUS_NAMES = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
    404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

_ACTION_METHOD = {"generate": "generateContent", "stream": "streamGenerateContent",
                  "count": "countTokens"}
_VERB_ACTION = {v: k for k, v in _ACTION_METHOD.items()}

_SERVICE = "generativelanguage.googleapis.com"
_QUOTA_METRIC = "generativelanguage.googleapis.com/generate_content_free_tier_requests"
_INVALID_KEY_MSG = "API key not valid. Please pass a valid API key."

# enum name -> number, used when the client asked for enum-encoding=int (verified against the
# google.ai.generativelanguage 0.6.15 protos in test_fake_gemini.py).
_ENUMS = {
    "finishReason": {"STOP": 1, "MAX_TOKENS": 2, "SAFETY": 3, "RECITATION": 4, "OTHER": 5,
                     "LANGUAGE": 6, "BLOCKLIST": 7, "PROHIBITED_CONTENT": 8, "SPII": 9,
                     "MALFORMED_FUNCTION_CALL": 10},
    "blockReason": {"SAFETY": 1, "OTHER": 2, "BLOCKLIST": 3, "PROHIBITED_CONTENT": 4},
    "category": {"HARM_CATEGORY_HARASSMENT": 7, "HARM_CATEGORY_HATE_SPEECH": 8,
                 "HARM_CATEGORY_SEXUALLY_EXPLICIT": 9, "HARM_CATEGORY_DANGEROUS_CONTENT": 10,
                 "HARM_CATEGORY_CIVIC_INTEGRITY": 11},
    "probability": {"NEGLIGIBLE": 1, "LOW": 2, "MEDIUM": 3, "HIGH": 4},
}


def _int_enums(obj):
    """Copy of a response body with the known enum fields turned into their numbers."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k in _ENUMS and isinstance(v, str) and v in _ENUMS[k]:
                out[k] = _ENUMS[k][v]
            else:
                out[k] = _int_enums(v)
        return out
    if isinstance(obj, list):
        return [_int_enums(v) for v in obj]
    return obj


def _safety_ratings(flagged: str = "HARM_CATEGORY_DANGEROUS_CONTENT") -> list[dict]:
    cats = ["HARM_CATEGORY_SEXUALLY_EXPLICIT", "HARM_CATEGORY_HATE_SPEECH",
            "HARM_CATEGORY_HARASSMENT", "HARM_CATEGORY_DANGEROUS_CONTENT"]
    out = []
    for c in cats:
        r = {"category": c, "probability": "HIGH" if c == flagged else "NEGLIGIBLE"}
        if c == flagged:
            r["blocked"] = True
        out.append(r)
    return out


def _error(code: int, message: str, details: list | None = None, status: str | None = None):
    err = {"code": code, "message": message, "status": status or _STATUS_NAMES[code]}
    if details is not None:
        err["details"] = details
    return {"error": err}


def _delay_seconds(delay: str) -> float:
    try:
        return float(str(delay).rstrip("s"))
    except ValueError:
        return 0.0


def _error_body(behaviour: str, model: str | None, action: str | None, params: dict) -> dict:
    """The real-shaped JSON error body for a JSON error behaviour."""
    msg = params.get("message")
    method = _ACTION_METHOD.get(action or "", "generateContent")
    m = model or "gemini-2.5-flash"
    if behaviour == "invalid_key":
        return _error(400, msg or _INVALID_KEY_MSG, [
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
             "domain": "googleapis.com", "metadata": {"service": _SERVICE}},
            {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US",
             "message": msg or _INVALID_KEY_MSG},
        ])
    if behaviour == "unauthorized":
        return _error(401, msg or (
            "Request had invalid authentication credentials. Expected OAuth 2 access token, "
            "login cookie or other valid authentication credential. See "
            "https://developers.google.com/identity/sign-in/web/devconsole-project."), [
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo",
             "reason": "ACCESS_TOKEN_TYPE_UNSUPPORTED", "domain": "googleapis.com",
             "metadata": {"service": _SERVICE, "method":
                          f"google.ai.generativelanguage.v1beta.GenerativeService."
                          f"{method[0].upper()}{method[1:]}"}},
        ])
    if behaviour == "forbidden":
        reason = params.get("reason", "SERVICE_DISABLED")
        default = (
            "Generative Language API has not been used in project 123456789012 before or it "
            "is disabled. Enable it by visiting https://console.developers.google.com/apis/api/"
            "generativelanguage.googleapis.com/overview?project=123456789012 then retry."
            if reason == "SERVICE_DISABLED" else
            f"Requests to this API {_SERVICE} method "
            f"google.ai.generativelanguage.v1beta.GenerativeService."
            f"{method[0].upper()}{method[1:]} are blocked.")
        return _error(403, msg or default, [
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason,
             "domain": "googleapis.com",
             "metadata": {"service": _SERVICE, "consumer": "projects/123456789012"}},
        ])
    if behaviour in ("rate_minute", "rate_day"):
        per_day = behaviour == "rate_day"
        delay = params.get("retry_delay", "36s" if per_day else "26s")
        quota_id = ("GenerateRequestsPerDayPerProjectPerModel-FreeTier" if per_day else
                    "GenerateRequestsPerMinutePerProjectPerModel-FreeTier")
        limit = str(params.get("quota_value", "250" if per_day else "10"))
        message = msg or (
            "You exceeded your current quota, please check your plan and billing details. "
            "For more information on this error, head to: "
            "https://ai.google.dev/gemini-api/docs/rate-limits. To monitor your current "
            "usage, head to: https://ai.dev/usage?tab=rate-limit. \n"
            f"* Quota exceeded for metric: {_QUOTA_METRIC}, limit: {limit}, model: {m}\n"
            f"Please retry in {_delay_seconds(delay) + 0.5:g}s.")
        return _error(429, message, [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
             "violations": [{"quotaMetric": _QUOTA_METRIC, "quotaId": quota_id,
                             "quotaDimensions": {"location": "global", "model": m},
                             "quotaValue": limit}]},
            {"@type": "type.googleapis.com/google.rpc.Help",
             "links": [{"description": "Learn more about Gemini API quotas",
                        "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay},
        ])
    if behaviour == "rate_plain":
        return _error(429, msg or "Resource has been exhausted (e.g. check quota).")
    if behaviour == "not_found":
        return _error(404, msg or _not_found_msg(m, action))
    if behaviour == "bad_request":
        message = msg or 'Invalid JSON payload received. Unknown name "foo"'
        return _error(400, message, [
            {"@type": "type.googleapis.com/google.rpc.BadRequest",
             "fieldViolations": [{"description": message}]},
        ])
    if behaviour in ("error500", "stream_break", "stream_truncate"):
        return _error(500, msg or (
            "An internal error has occurred. Please retry or report in "
            "https://developers.generativeai.google/guide/troubleshooting"))
    if behaviour == "unavailable":
        return _error(503, msg or "The model is overloaded. Please try again later.")
    if behaviour == "gateway_timeout":
        return _error(504, msg or "Deadline expired before operation could complete.")
    raise ValueError(f"not an error behaviour: {behaviour}")


def _not_found_msg(model: str, action: str | None) -> str:
    if action in _ACTION_METHOD:
        return (f"models/{model} is not found for API version {API_VERSION}, or is not "
                f"supported for {_ACTION_METHOD[action]}. Call ListModels to see the list of "
                f"available models and their supported methods.")
    return f"models/{model} is not found for API version {API_VERSION}."


# --------------------------------------------------------------------------------------------
# Request content helpers
# --------------------------------------------------------------------------------------------

def _bare(model: str | None) -> str | None:
    if model is None:
        return None
    return model[len("models/"):] if model.startswith("models/") else model


def _texts(contents: Any) -> list[str]:
    out = []
    if isinstance(contents, dict):
        contents = [contents]
    if not isinstance(contents, list):
        return out
    for c in contents:
        if not isinstance(c, dict):
            continue
        for p in c.get("parts") or []:
            if isinstance(p, dict) and isinstance(p.get("text"), str):
                out.append(p["text"])
    return out


def _request_texts(body: dict) -> list[str]:
    """All text of a generate/count request (contents, systemInstruction, and for countTokens
    the nested generateContentRequest)."""
    texts = _texts(body.get("contents")) + _texts(body.get("systemInstruction"))
    inner = body.get("generateContentRequest")
    if isinstance(inner, dict):
        texts += _texts(inner.get("contents")) + _texts(inner.get("systemInstruction"))
    return texts


def _words(texts: list[str]) -> int:
    return sum(len(t.split()) for t in texts)


def _prompt_tokens(body: dict) -> int:
    return max(1, _words(_request_texts(body)))


def _last_user_text(body: dict) -> str:
    contents = body.get("contents")
    if not isinstance(contents, list):
        return ""
    for c in reversed(contents):
        if isinstance(c, dict) and c.get("role", "user") in ("user", "", None):
            texts = _texts([c])
            if texts:
                return texts[-1]
    return ""


def _answer(model: str, body: dict) -> tuple[str, str]:
    """(answer text, finish reason) for a generate/stream request."""
    prompt = _last_user_text(body)
    config = body.get("generationConfig") or {}
    if config.get("responseMimeType") == "application/json":
        text = json.dumps({"model": model, "echo": prompt})
    else:
        text = f"[{model}] {prompt}"
    limit = config.get("maxOutputTokens")
    try:
        limit = int(limit) if limit is not None else None
    except (TypeError, ValueError):
        limit = None
    if limit is not None and limit > 0 and len(text.split()) > limit:
        return " ".join(text.split()[:limit]), "MAX_TOKENS"
    return text, "STOP"


def _split_text(text: str, pieces: int = 3) -> list[str]:
    """Split text into 2..pieces parts whose concatenation is exactly text."""
    # cut points just after whitespace runs, so words stay whole
    cuts = [i for i in range(1, len(text)) if text[i - 1].isspace() and not text[i].isspace()]
    if not cuts:
        mid = max(1, len(text) // 2)
        return [text[:mid], text[mid:]] if len(text) > 1 else [text, ""]
    if len(cuts) >= pieces - 1:
        step = len(cuts) / (pieces - 1)
        chosen = sorted({cuts[int(step * k)] for k in range(pieces - 1)})
    else:
        chosen = cuts
    parts, last = [], 0
    for c in chosen:
        parts.append(text[last:c])
        last = c
    parts.append(text[last:])
    return parts


# --------------------------------------------------------------------------------------------
# The fake
# --------------------------------------------------------------------------------------------

@dataclass
class Call:
    t: float
    method: str
    path: str                 # request path without the query string
    key: str | None
    model: str | None         # bare model name
    action: str               # list | get | generate | stream | count | unknown
    status: int = 0           # HTTP status sent; 0 until sent (stays 0 for hang / dropped)
    body: Any = None          # parsed JSON request body, or None
    query: str = ""           # raw query string


@dataclass
class _Rule:
    behaviour: str
    params: dict = field(default_factory=dict)
    remaining: int | None = None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Many clients connect at once (e.g. 32 processes); a tiny backlog would make some
    # connects wait for a SYN retransmit (1 s+).
    request_queue_size = 256

    def __init__(self, addr, handler, fake: "FakeGemini"):
        self.fake = fake
        super().__init__(addr, handler)

    def handle_error(self, request, client_address):
        # Clients going away (timeouts, stop()) are normal here: stay quiet. Real bugs in the
        # fake still get a traceback.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, socket.timeout, OSError)):
            return
        super().handle_error(request, client_address)


class _Dropped(Exception):
    """Raised inside the handler to drop the connection without (further) response."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def version_string(self):
        return "scaffolding on HTTPServer2"   # what the real API's Server header says

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass  # quiet: no per-request lines on stderr

    # --- connection tracking, so stop() can cut idle keep-alive and hanging connections ---
    def setup(self):
        super().setup()
        # Headers and body go out in separate writes; without TCP_NODELAY, Nagle plus the
        # client's delayed ACK stalls every response on a reused connection by ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.fake._track(self.connection, add=True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.fake._track(self.connection, add=False)

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def _dispatch(self):
        try:
            self.server.fake._handle(self)
        except _Dropped:
            self.close_connection = True
        except (ConnectionError, socket.timeout):
            self.close_connection = True

    # --- low-level senders used by FakeGemini._handle ---
    def send_raw(self, call: Call, status: int, body: bytes, content_type: str,
                 close: bool = False):
        call.status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Vary", "Origin, X-Origin, Referer")
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if body:
            self.wfile.write(body)
        self.wfile.flush()

    def send_json(self, call: Call, status: int, obj: Any):
        self.send_raw(call, status, json.dumps(obj, indent=2).encode() + b"\n",
                      "application/json; charset=UTF-8")

    def start_chunked(self, call: Call, status: int = 200, close: bool = False):
        call.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Vary", "Origin, X-Origin, Referer")
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.flush()

    def write_chunk(self, data: bytes):
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    def end_chunked(self):
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class FakeGemini:
    """Loopback fake Gemini REST server. See the module docstring."""

    page_size_cap: int = 50

    def __init__(self, models: list[dict] | None = None, latency: float = 0.0,
                 host: str = "127.0.0.1", port: int = 0):
        self.models: list[dict] = copy.deepcopy(DEFAULT_MODELS if models is None else models)
        self.page_size_cap = type(self).page_size_cap
        self.calls: list[Call] = []
        self._host, self._port = host, port
        self._latency_default = float(latency)
        self._latency_model: dict[str, float] = {}
        self._rules: dict[tuple[str | None, str | None], _Rule] = {}
        self._lock = threading.Lock()          # rules, latency, log
        self._conn_lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "FakeGemini":
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _Server((self._host, self._port), _Handler, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
            name="fake-gemini", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()               # wakes hang/slow/latency waits
        server.shutdown()                  # ends serve_forever (poll_interval 0.05 s)
        server.server_close()
        # Cut every open connection: idle keep-alive ones would otherwise keep being served
        # by their (daemon) threads after stop().
        with self._conn_lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None

    def __enter__(self) -> "FakeGemini":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeGemini is not started")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    def _track(self, conn, add: bool):
        with self._conn_lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    # ------------------------------------------------------------------ configuration
    def set_behaviour(self, behaviour: str, *, key: str | None = None, model: str | None = None,
                      times: int | None = None, **params) -> None:
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {behaviour!r}; known: {sorted(BEHAVIOURS)}")
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 or None")
        with self._lock:
            self._rules[(key, _bare(model))] = _Rule(behaviour, dict(params), times)

    def clear_behaviours(self) -> None:
        with self._lock:
            self._rules.clear()

    def set_latency(self, seconds: float, model: str | None = None) -> None:
        with self._lock:
            if model is None:
                self._latency_default = float(seconds)
            else:
                self._latency_model[_bare(model)] = float(seconds)

    # ------------------------------------------------------------------ request log
    def count(self, *, key: str | None = None, model: str | None = None,
              action: str | tuple | None = None) -> int:
        model = _bare(model)
        actions = (action,) if isinstance(action, str) else action
        with self._lock:
            calls = list(self.calls)
        return sum(1 for c in calls
                   if (key is None or c.key == key)
                   and (model is None or c.model == model)
                   and (actions is None or c.action in actions))

    def reset_log(self) -> None:
        with self._lock:
            self.calls.clear()

    # ------------------------------------------------------------------ internals
    def _pick(self, key: str | None, model: str | None, action: str) -> _Rule:
        """The rule that applies to this call (consuming one use of it), or an "ok" rule."""
        listing = action in ("list", "get")
        if listing:
            candidates = [(key, None), (None, None)]
        else:
            candidates = [(key, model), (key, None), (None, model), (None, None)]
        with self._lock:
            for ck in candidates:
                rule = self._rules.get(ck)
                if rule is None:
                    continue
                if listing and rule.behaviour not in LISTING_BEHAVIOURS:
                    continue
                if rule.remaining is not None:
                    rule.remaining -= 1
                    if rule.remaining <= 0:
                        del self._rules[ck]
                return _Rule(rule.behaviour, dict(rule.params))
        return _Rule("ok")

    def _latency_for(self, model: str | None) -> float:
        with self._lock:
            if model is not None and model in self._latency_model:
                return self._latency_model[model]
            return self._latency_default

    def _wait(self, seconds: float) -> bool:
        """Sleep up to seconds; True if the server is stopping."""
        if seconds <= 0:
            return self._stopping.is_set()
        return self._stopping.wait(seconds)

    def _find_model(self, model: str) -> dict | None:
        name = f"models/{model}"
        for m in list(self.models):
            if m.get("name") == name:
                return m
        return None

    def _response_id(self) -> str:
        return base64.urlsafe_b64encode(b"fake%08d" % next(self._ids)).decode().rstrip("=")

    def _handle(self, h: _Handler) -> None:
        split = urlsplit(h.path)
        path = unquote(split.path)
        query = parse_qs(split.query, keep_blank_values=True)
        # The SDK sends $alt=json;enum-encoding=int (URL-encoded); honour it like the real API.
        int_enums = any("enum-encoding=int" in v for v in query.get("$alt", []))
        key = h.headers.get("x-goog-api-key") or (query.get("key") or [None])[0]

        # Always read the body so the keep-alive stream stays in sync.
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length > 0 else b""
        body, bad_json = None, False
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                bad_json = True

        # Route
        prefix = f"/{API_VERSION}/models"
        action, model = "unknown", None
        if path == prefix and h.command == "GET":
            action = "list"
        elif path.startswith(prefix + "/"):
            rest = path[len(prefix) + 1:]
            if ":" in rest:
                model, verb = rest.split(":", 1)
                if h.command == "POST" and verb in _VERB_ACTION:
                    action = _VERB_ACTION[verb]
            elif h.command == "GET" and rest:
                model, action = rest, "get"

        call = Call(t=time.time(), method=h.command, path=split.path, key=key, model=model,
                    action=action, body=body, query=split.query)
        with self._lock:
            self.calls.append(call)

        if action == "unknown":
            h.send_json(call, 404, _error(404, f"Method not found: {h.command} {split.path}"))
            return
        if not key:
            h.send_json(call, 403, _error(403, (
                "Method doesn't allow unregistered callers (callers without established "
                "identity). Please use API Key or other form of API consumer identity to call "
                "this API.")))
            return

        rule = self._pick(key, model, action)
        if self._wait(self._latency_for(model)):
            raise _Dropped()
        b, params = rule.behaviour, rule.params

        # --- timing behaviours ---
        if b == "hang":
            self._wait(float(params.get("seconds", 3600)))
            raise _Dropped()          # never answer: drop the connection
        if b == "slow":
            if self._wait(float(params.get("seconds", 1.0))):
                raise _Dropped()
            b = "ok"

        # --- error behaviours ---
        if b in ("stream_break", "stream_truncate") and action != "stream":
            b = "error500"
        if b in _JSON_ERRORS:
            h.send_json(call, _JSON_ERRORS[b], _error_body(b, model, action, params))
            return
        if b == "html502":
            h.send_raw(call, 502, b"<html><body><h1>502 Bad Gateway</h1></body></html>",
                       "text/html; charset=UTF-8")
            return
        if b == "nonjson_error":
            h.send_raw(call, 500, b"upstream connect error or disconnect/reset before headers. "
                                  b"reset reason: connection termination",
                       "text/plain")
            return

        # --- the request itself ---
        if action == "list":
            self._do_list(h, call, query)
            return
        entry = self._find_model(model)
        if action == "get":
            if entry is None:
                h.send_json(call, 404, _error(404, _not_found_msg(model, None)))
            else:
                h.send_json(call, 200, entry)
            return
        needed = "countTokens" if action == "count" else "generateContent"
        if entry is None or needed not in entry.get("supportedGenerationMethods", []):
            h.send_json(call, 404, _error(404, _not_found_msg(model, action)))
            return
        if bad_json or (raw and not isinstance(body, dict)):
            h.send_json(call, 400, _error(400, "Invalid JSON payload received.", [
                {"@type": "type.googleapis.com/google.rpc.BadRequest",
                 "fieldViolations": [{"description": "Invalid JSON payload received."}]}]))
            return
        body = body or {}

        if b == "empty200":
            h.send_raw(call, 200, b"", "application/json; charset=UTF-8")
            return
        if action == "count":
            h.send_json(call, 200, {"totalTokens": _prompt_tokens(body)})
            return

        enc = _int_enums if int_enums else (lambda o: o)
        responses = self._responses(b, model, body, params, stream=action == "stream")
        if action == "generate":
            h.send_json(call, 200, enc(responses[0]))
            return
        self._do_stream(h, call, b, [enc(r) for r in responses], params)

    def _responses(self, b: str, model: str, body: dict, params: dict, stream: bool) -> list:
        """Response bodies for a 200 generate (one) or stream (several elements)."""
        p_tokens = _prompt_tokens(body)
        common = {"modelVersion": model, "responseId": self._response_id()}
        if b == "blocked":
            return [{"promptFeedback": {"blockReason": params.get("block_reason", "SAFETY"),
                                        "safetyRatings": _safety_ratings()},
                     "usageMetadata": {"promptTokenCount": p_tokens,
                                       "totalTokenCount": p_tokens}, **common}]
        if b == "safety":
            return [{"candidates": [{"finishReason": "SAFETY", "index": 0,
                                     "safetyRatings": _safety_ratings()}],
                     "usageMetadata": {"promptTokenCount": p_tokens,
                                       "totalTokenCount": p_tokens}, **common}]
        if b == "no_candidates":
            return [{"usageMetadata": {"promptTokenCount": p_tokens,
                                       "totalTokenCount": p_tokens}, **common}]

        # ok / stream_break / stream_truncate
        text, finish = _answer(model, body)
        c_tokens = len(text.split())
        usage = {"promptTokenCount": p_tokens, "candidatesTokenCount": c_tokens,
                 "totalTokenCount": p_tokens + c_tokens}
        if not stream:
            return [{"candidates": [{"content": {"parts": [{"text": text}], "role": "model"},
                                     "finishReason": finish, "index": 0}],
                     "usageMetadata": usage, **common}]
        out = []
        pieces = _split_text(text)
        for i, piece in enumerate(pieces):
            cand = {"content": {"parts": [{"text": piece}], "role": "model"}, "index": 0}
            elem = {"candidates": [cand], **common}
            if i == len(pieces) - 1:
                cand["finishReason"] = finish
                elem["usageMetadata"] = usage
            out.append(elem)
        return out

    def _do_stream(self, h: _Handler, call: Call, b: str, elems: list, params: dict) -> None:
        gap = float(params.get("chunk_gap", 0.01))
        if b == "stream_break":
            err = _error(int(params.get("code", 500)), params.get("message") or (
                "An internal error has occurred. Please retry or report in "
                "https://developers.generativeai.google/guide/troubleshooting"),
                status=params.get("status"))
            elems = [elems[0], err]
        elif b == "stream_truncate":
            elems = [elems[0]]
        h.start_chunked(call, close=b in ("stream_break", "stream_truncate"))
        for i, elem in enumerate(elems):
            if i and self._wait(gap):
                raise _Dropped()
            data = json.dumps(elem, indent=2).encode()
            h.write_chunk((b"[" if i == 0 else b"\n,\r\n") + data)
        if b == "stream_truncate":
            raise _Dropped()   # no "]" and no terminating chunk: the client sees a broken body
        h.write_chunk(b"\n]")
        h.end_chunked()

    def _do_list(self, h: _Handler, call: Call, query: dict) -> None:
        try:
            size = int((query.get("pageSize") or ["0"])[0] or 0)
        except ValueError:
            size = 0
        size = min(size if size > 0 else 50, max(1, int(self.page_size_cap)))
        token = (query.get("pageToken") or [""])[0]
        offset = 0
        if token:
            try:
                offset = int(base64.urlsafe_b64decode(token + "==").decode().split(":", 1)[1])
            except (ValueError, IndexError):
                h.send_json(call, 400, _error(400, "Invalid page token."))
                return
        models = list(self.models)
        page = models[offset:offset + size]
        out: dict[str, Any] = {"models": page}
        if offset + size < len(models):
            out["nextPageToken"] = base64.urlsafe_b64encode(
                f"offset:{offset + size}".encode()).decode().rstrip("=")
        h.send_json(call, 200, out)


# --------------------------------------------------------------------------------------------
# Standalone
# --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Fake Gemini v1beta REST API on 127.0.0.1.")
    ap.add_argument("--port", type=int, default=8765, help="port (0 = pick a free one)")
    ap.add_argument("--latency", type=float, default=0.0, help="seconds added to each request")
    ap.add_argument("--models", type=int, default=0, metavar="N",
                    help="serve N simulated text models (make_models) instead of the defaults")
    ap.add_argument("--behaviour", "--behavior", action="append", default=[],
                    metavar="KEY:MODEL:BEHAVIOUR",
                    help="a rule; KEY or MODEL may be '*'. Repeatable.")
    ap.add_argument("--model-latency", action="append", default=[], metavar="MODEL=SECONDS",
                    help="latency of one model (overrides --latency for it). Repeatable.")
    args = ap.parse_args(argv)

    fake = FakeGemini(models=make_models(args.models) if args.models > 0 else None,
                      latency=args.latency, port=args.port)
    for spec in args.behaviour:
        parts = spec.split(":")
        if len(parts) != 3:
            ap.error(f"--behaviour wants KEY:MODEL:BEHAVIOUR, got {spec!r}")
        k, m, b = parts
        if b not in BEHAVIOURS:
            ap.error(f"unknown behaviour {b!r}; known: {', '.join(sorted(BEHAVIOURS))}")
        fake.set_behaviour(b, key=None if k == "*" else k, model=None if m == "*" else m)
    for spec in args.model_latency:
        model, _, seconds = spec.partition("=")
        try:
            fake.set_latency(float(seconds), model=model)
        except ValueError:
            ap.error(f"--model-latency wants MODEL=SECONDS, got {spec!r}")
    fake.start()
    print(f"fake Gemini listening on {fake.url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
