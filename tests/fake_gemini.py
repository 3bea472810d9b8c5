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
- ``POST /v1beta/models/{m}:embedContent``         -> ``{"embedding": {"values": [...]}}``, and
  ``:batchEmbedContents`` -> ``{"embeddings": [...]}`` (one per request): EMBEDDING_DIMENSION
  numbers from the text's sha256, for models listing "embedContent".

A model is known when it is in ``FakeGemini.models`` (``remove_model(name)`` takes one out:
list, get and generate then 404 it); generate/stream need "generateContent" and count needs
"countTokens" in its supportedGenerationMethods, as with the real API. Otherwise: 404
NOT_FOUND. A request without any key gets the real 403 "unregistered callers" error.
Catalogues: ``DEFAULT_MODELS`` (2025: 2.x models, the default) and ``CURRENT_MODELS`` (2026:
the ``*-latest`` aliases, 3.x previews, Gemma, and non-text models that claim generateContent).

Enums: when the request asks for ``enum-encoding=int`` (the SDK always does) enum fields
(finishReason, blockReason, safety categories/probabilities) are sent as integers, as the real
server does; otherwise as names (handy with curl).

Behaviours (``set_behaviour(name, key=..., project=..., model=..., times=..., **params)``);
errors use the real body ``{"error": {"code", "message", "status", "details"?}}``:

======================  ===================================================================
ok                      normal answer
invalid_key             400 INVALID_ARGUMENT, ErrorInfo reason API_KEY_INVALID + LocalizedMessage
key_expired             like invalid_key, "API key expired. Please renew the API key."
unauthorized            401 UNAUTHENTICATED
forbidden               403 PERMISSION_DENIED, ErrorInfo reason ``reason`` (SERVICE_DISABLED)
key_blocked             403, ErrorInfo API_KEY_SERVICE_BLOCKED, "Requests to this API ... are
                        blocked."
suspended               403, ErrorInfo CONSUMER_SUSPENDED, "Permission denied: Consumer
                        'api_key:REDACTED' has been suspended." (never the real key)
leaked                  403 "Your API key was reported as leaked. ..." without details
no_permission           403 "The caller does not have permission" without details
location                400 FAILED_PRECONDITION "User location is not supported for the API use."
billing                 400 FAILED_PRECONDITION "Gemini API free tier is not available in your
                        country. ..."; ``variant="no_billing_account"``: "... cannot be used
                        without a billing account linked ..."
rate_minute             429, QuotaFailure GenerateRequestsPerMinutePerProjectPerModel-FreeTier,
                        RetryInfo ``retry_delay`` ("26s"); params quota_value ("10"), message
rate_day                429, QuotaFailure ...PerDayPerProjectPerModel-FreeTier, RetryInfo ("36s");
                        quota_value ("250")
rate_tokens             429, QuotaFailure GenerateContentInputTokensPerModelPerMinute-FreeTier,
                        quota_value ("250000"), RetryInfo ("26s"); ``no_retry_info=True`` drops it
rate_zero               429, three violations (requests/minute, requests/day, input tokens/minute)
                        without quotaValue, "limit: 0" for each, Help first, RetryInfo ("45s")
rate_plain              429 "Resource has been exhausted (e.g. check quota)." without details
credits_depleted        429 "Your prepayment credits are depleted. ..." without details
not_found               404 NOT_FOUND "models/x is not found for API version v1beta, ..."
no_longer_available     404 "This model models/x is no longer available to new users. ..." (GET
                        of the model still answers the entry)
bad_request             400 INVALID_ARGUMENT + BadRequest detail; param ``message``
no_system_instruction   400 "Developer instruction is not enabled for models/x"
too_long                400 "The input token count (N) exceeds the maximum number of tokens
                        allowed (L)."; N = the prompt's count (or param ``tokens``), L = the
                        model's inputTokenLimit (or param ``limit``)
no_thinking             400 "Thinking is not supported by this model."
error500                500 INTERNAL
unavailable             503 UNAVAILABLE "The model is overloaded. Please try again later."
flaky                   with probability ``rate`` (0.3) answer like unavailable, else like ok;
                        each rule draws from its own ``random.Random(seed)`` (``seed`` None:
                        unseeded), one draw per call it applies to. The 503 comes back at once,
                        without the configured latency (a real overload error is immediate);
                        the answers carry it
gateway_timeout         504 DEADLINE_EXCEEDED
slow                    wait ``seconds`` (1.0), then answer ok
hang                    never answer: wait until stop() or ``seconds`` (3600) pass, then drop the
                        connection without a response (Call.status stays 0)
blocked                 200, no candidates, promptFeedback.blockReason ``block_reason`` ("SAFETY")
unknown_block           200, no candidates, blockReason unknown to the 0.6.15 protos: ``number``
                        (7) with enum-encoding=int, else ``name`` ("FUTURE_BLOCK")
safety                  200, one candidate, finishReason SAFETY, no content, safetyRatings
empty_answer            200, finishReason STOP, content ``{"role": "model"}`` without parts
thinking_exhausted      200, finishReason MAX_TOKENS, no parts, usageMetadata.thoughtsTokenCount
                        = thinkingConfig.thinkingBudget, else maxOutputTokens, else ``budget``
                        (1024); totalTokenCount = prompt + thoughts, no candidatesTokenCount
recitation              200, finishReason RECITATION, no parts (``with_text=True``: half the text)
image_safety            200, finishReason IMAGE_SAFETY (11), no parts
unexpected_tool_call    200, finishReason UNEXPECTED_TOOL_CALL (12, newer than the protos), no
                        parts
function_call           200, one part ``{"functionCall": {"name": <the first declared function>,
                        "args": {"prompt": <the last user text>}}}``, finishReason STOP
unknown_finish          200, the normal text with a finishReason unknown to the protos:
                        ``number`` (99) with enum-encoding=int, else ``name`` ("FUTURE_REASON")
html502                 502 text/html "<html><body><h1>502 Bad Gateway</h1></body></html>"
nonjson_error           500 text/plain, not JSON
empty200                200 with an empty body
no_candidates           200 with only usageMetadata
stream_break            stream: one text element, then an ``{"error": ...}`` element, array
                        closed, connection closed. generate/count: like error500
stream_truncate         stream: one text element, then the connection is dropped mid-array (no
                        closing "]", no terminating chunk). generate/count: like error500
stream_error_after_stop stream: the whole normal answer (last element: STOP + usage), then an
                        ``{"error": ...}`` element, array closed. generate/count: like error500
======================  ===================================================================

Most error behaviours take an optional ``message`` param. The quota bodies (rate_*) take
``quota_id`` (overrides the quotaId; the metric follows it, e.g. a ``...PaidTier...`` id gets the
paid metric), ``quota_value``, ``retry_delay``, ``no_retry_info`` and ``help_first`` (Help
before QuotaFailure, a shape seen in 2026; rate_zero has it by default). On countTokens the
200-content behaviours answer a normal count (there are no candidates to block); empty200
sends an empty body. The streams of the 200 behaviours without text are one element; the ones
with text (unknown_finish, ``recitation`` with_text) carry their finishReason in the last one.

Natural triggers, as the real API (on generate/stream, when the call's behaviour is ok or slow
- any other rule wins; ``fake.natural_errors = False`` turns them off):

- a ``gemma*`` model given a ``systemInstruction`` -> no_system_instruction;
- a prompt longer (in words) than the model's inputTokenLimit -> too_long with the real N and L;
- ``generationConfig.thinkingConfig`` sent to a model whose entry lacks ``"thinking": true`` ->
  no_thinking.

Thinking: with ``generationConfig.thinkingConfig`` on a thinking model, the answer's
usageMetadata has ``thoughtsTokenCount`` = min(thinkingBudget, 8) (budget -1 or absent: 8 or
by thinkingLevel low 4 / high 8; budget 0: no thoughts), included in totalTokenCount and taken
from maxOutputTokens first (thoughts >= maxOutputTokens -> the thinking_exhausted answer);
``includeThoughts: true`` adds a first part ``{"text": "thinking...", "thought": true}``.

Projects: ``set_project(name, keys=[...])`` groups keys into one Google Cloud project (a key
in no declared project is its own project, and its ``Call.project`` is None). Rules can name a
project (``set_behaviour(..., project=NAME)``: every key of it).

Rule matching: ``key=None`` means any key, ``model=None`` any model ("models/" prefix optional).
Among the rules that apply to a call the most specific wins: (key, model) > (project, model) >
key only > project only > model only > global > "ok". ``times=N`` makes a rule expire after N
applications; a later rule with the same (key or project, model) replaces the earlier one.
Model listing (list/get) only sees rules with ``model=None`` whose behaviour is one of
LISTING_BEHAVIOURS; a rule that does not apply to a call is neither used nor consumed by it.

Quotas (per project and model, as Google counts them): ``set_quota(model=None, rpm=, rpd=,
tpm=, project=None, free_tier=True)``. A generate/stream call that would get a 200 counts
against its (project, model) in the current clock minute (``rpm``; resets on the minute), the
current Pacific day (``rpd``) and, for ``tpm``, adds its prompt tokens to the minute. Over a
limit the call gets the real 429 instead: GenerateRequestsPerMinutePerProjectPerModel[-FreeTier]
with quotaValue N and retryDelay = the whole seconds to the next minute (rounded up; "Please
retry in X.Ys." in the message has the exact figure); GenerateRequestsPerDayPerProjectPerModel
with retryDelay "36s" (like the real API: a few seconds, not the time to midnight);
GenerateContentInputTokensPerModelPerMinute with the seconds to the next minute. A limit of 0
answers the rate_zero body. A refused call (any non-200) consumes nothing. The most specific
quota wins: (project, model) > (project, any) > (any, model) > (any, any); ``project=None`` means
every project, each with its own counters. ``clear_quotas()`` forgets limits and counters;
``set_clock(fn)`` makes the quota windows read ``fn()`` (epoch seconds) instead of time.time,
so a test can move time (``set_clock(None)`` restores it).

Stream framing: ``Transfer-Encoding: chunked`` on HTTP/1.1 keep-alive; the body is
``[`` + elem1 + ``\\n,\\r\\n`` + elem2 + ... + ``\\n]`` (what the real server sends with
``alt=json``), one HTTP chunk per element with a short pause between them. Nothing may follow
the closing ``]``: google.api_core's rest_streaming parser rejects any byte after it.

Request log: every request (failing ones too) is appended to ``calls`` as soon as it is parsed
(``status`` 0), and its ``status`` is filled in when the response line is sent. ``Call.body``
is the parsed JSON request (so tests can see thinkingConfig or seed arrive), ``Call.raw`` its
bytes as received, ``Call.project`` the key's declared project. ``count(key=, model=, action=, project=)`` counts them.

Standalone::

    python tests/fake_gemini.py --port 8765 [--latency 0.05] [--models N] [--catalogue 2025|2026]
                                [--behaviour KEY:MODEL:BEHAVIOUR[:NAME=VALUE,...] ...]
                                [--project NAME=KEY1,KEY2 ...]
                                [--quota [PROJECT:]MODEL:rpm=N[,rpd=N][,tpm=N][,paid] ...]
    # KEY/MODEL may be *; KEY may be @PROJECT for a project rule
"""

from __future__ import annotations

import argparse
import base64
import copy
import datetime
import itertools
import json
import math
import random
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["FakeGemini", "Call", "DEFAULT_MODELS", "CURRENT_MODELS", "make_models", "BEHAVIOURS",
           "LISTING_BEHAVIOURS"]

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


def _default_entry(name: str) -> dict:
    """A copy of one DEFAULT_MODELS entry (for models that are in both catalogues as they are)."""
    return copy.deepcopy(next(m for m in DEFAULT_MODELS if m["name"] == f"models/{name}"))


_GEMMA_METHODS = ("generateContent", "countTokens")
_IMAGE_METHODS = ("generateContent", "countTokens", "batchGenerateContent")

# The list as it looked in 2026 (names, display names, descriptions and methods from public
# listings): 2.5-pro/flash and 3-pro-preview are shut down; stable aliases exist; several
# non-text models claim generateContent.
CURRENT_MODELS: list[dict] = [
    # --- text models a router should use ---
    _text_model("gemini-flash-latest", "Gemini Flash Latest", "Gemini Flash Latest",
                "Latest release of Gemini Flash", 65536, thinking=True),
    _text_model("gemini-flash-lite-latest", "Gemini Flash-Lite Latest",
                "Gemini Flash-Lite Latest", "Latest release of Gemini Flash-Lite", 65536,
                thinking=True),
    _text_model("gemini-pro-latest", "Gemini Pro Latest", "Gemini Pro Latest",
                "Latest release of Gemini Pro", 65536, thinking=True),
    _text_model("gemini-3.1-pro-preview", "Gemini 3.1 Pro Preview", "3.1-pro-preview-02-2026",
                "Gemini 3.1 Pro Preview", 65536, thinking=True),
    _text_model("gemini-3-flash-preview", "Gemini 3 Flash Preview", "3-flash-preview-12-2025",
                "Gemini 3 Flash Preview", 65536, thinking=True),
    _default_entry("gemini-2.5-flash-lite"),
    _default_entry("gemma-3-27b-it"),
    _text_model("gemma-3-12b-it", "Gemma 3 12B", "001", "", 8192, in_limit=32768,
                methods=_GEMMA_METHODS, max_temperature=None),
    _text_model("gemma-3n-e4b-it", "Gemma 3n E4B", "001", "", 2048, in_limit=8192,
                methods=_GEMMA_METHODS, max_temperature=None),
    # --- models a router must exclude (most of them claim generateContent) ---
    _text_model("nano-banana-pro-preview", "Nano Banana Pro", "3.0-pro-image-preview",
                "Gemini 3 Pro Image Preview", 32768, in_limit=131072, methods=_IMAGE_METHODS,
                thinking=True),
    _text_model("gemini-2.5-flash-image", "Nano Banana", "2.0", "Gemini 2.5 Flash Preview Image",
                32768, in_limit=32768, methods=_IMAGE_METHODS),
    _text_model("gemini-robotics-er-1.5-preview", "Gemini Robotics-ER 1.5 Preview",
                "1.5-preview", "Gemini Robotics-ER 1.5 Preview", 65536,
                methods=("generateContent", "countTokens"), thinking=True),
    _default_entry("gemini-2.5-flash-preview-tts"),
    _text_model("gemini-3.5-transcribe-preview", "Gemini 3.5 Transcribe Preview",
                "3.5-transcribe-preview", "Gemini 3.5 Transcribe Preview", 65536,
                methods=("generateContent", "countTokens")),
    # The real live and native-audio entries offer only bidiGenerateContent (+ countTokens).
    _default_entry("gemini-2.5-flash-native-audio-preview-09-2025"),
    _default_entry("gemini-live-2.5-flash-preview"),
    {
        "name": "models/gemini-embedding-001",
        "version": "001",
        "displayName": "Gemini Embedding 001",
        "description": "Obtain a distributed representation of a text.",
        "inputTokenLimit": 2048,
        "outputTokenLimit": 1,
        "supportedGenerationMethods": ["embedContent", "countTextTokens", "countTokens",
                                       "asyncBatchEmbedContent"],
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

# Behaviours answered with HTTP 200 and a (possibly odd) GenerateContentResponse.
_CONTENT_BEHAVIOURS = frozenset({
    "ok", "blocked", "unknown_block", "safety", "no_candidates", "empty_answer",
    "thinking_exhausted", "recitation", "image_safety", "unexpected_tool_call", "unknown_finish",
    "function_call",
})

# 200 streams that fail; generate/count answer them like error500.
_STREAM_FAILURES = frozenset({"stream_break", "stream_truncate", "stream_error_after_stop"})

# Behaviours that affect model listing (list/get); only rules with model=None are considered.
LISTING_BEHAVIOURS = frozenset({
    "invalid_key", "unauthorized", "forbidden", "rate_plain", "error500", "unavailable",
    "hang", "slow", "html502", "key_expired", "leaked", "suspended", "key_blocked", "location",
})

_STATUS_NAMES = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
    404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

_ACTION_METHOD = {"generate": "generateContent", "stream": "streamGenerateContent",
                  "count": "countTokens", "embed": "embedContent",
                  "batch_embed": "batchEmbedContents"}
# The method a model must list for each action (batchEmbedContents rides on embedContent).
_NEEDED_METHOD = {"count": "countTokens", "embed": "embedContent",
                  "batch_embed": "embedContent"}
EMBEDDING_DIMENSION = 8
_VERB_ACTION = {v: k for k, v in _ACTION_METHOD.items()}

_SERVICE = "generativelanguage.googleapis.com"
_QUOTA_METRIC = "generativelanguage.googleapis.com/generate_content_free_tier_requests"
_INVALID_KEY_MSG = "API key not valid. Please pass a valid API key."
_INTERNAL_MSG = ("An internal error has occurred. Please retry or report in "
                 "https://developers.generativeai.google/guide/troubleshooting")
_QUOTA_INTRO = (
    "You exceeded your current quota, please check your plan and billing details. "
    "For more information on this error, head to: "
    "https://ai.google.dev/gemini-api/docs/rate-limits. To monitor your current "
    "usage, head to: https://ai.dev/usage?tab=rate-limit. \n")

# quotaIds (the "-FreeTier" suffix is added for free-tier projects) and their windows.
QUOTA_RPM = "GenerateRequestsPerMinutePerProjectPerModel"
QUOTA_RPD = "GenerateRequestsPerDayPerProjectPerModel"
QUOTA_TPM = "GenerateContentInputTokensPerModelPerMinute"
QUOTA_TPM_PAID = "GenerateContentPaidTierInputTokensPerModelPerMinute"

# enum name -> number, used when the client asked for enum-encoding=int (verified against the
# google.ai.generativelanguage 0.6.15 protos in test_fake_gemini.py).
_ENUMS = {
    "finishReason": {"STOP": 1, "MAX_TOKENS": 2, "SAFETY": 3, "RECITATION": 4, "OTHER": 5,
                     "LANGUAGE": 6, "BLOCKLIST": 7, "PROHIBITED_CONTENT": 8, "SPII": 9,
                     "MALFORMED_FUNCTION_CALL": 10, "IMAGE_SAFETY": 11},
    "blockReason": {"SAFETY": 1, "OTHER": 2, "BLOCKLIST": 3, "PROHIBITED_CONTENT": 4,
                    "IMAGE_SAFETY": 5},
    "category": {"HARM_CATEGORY_HARASSMENT": 7, "HARM_CATEGORY_HATE_SPEECH": 8,
                 "HARM_CATEGORY_SEXUALLY_EXPLICIT": 9, "HARM_CATEGORY_DANGEROUS_CONTENT": 10,
                 "HARM_CATEGORY_CIVIC_INTEGRITY": 11},
    "probability": {"NEGLIGIBLE": 1, "LOW": 2, "MEDIUM": 3, "HIGH": 4},
}
# Values the real API sends that the pinned 0.6.15 protos do not know (from the API reference
# and google-ai-generativelanguage 0.6.16+; the test checks that 0.6.15 lacks them).
_NEWER_ENUMS = {"finishReason": {"UNEXPECTED_TOOL_CALL": 12}}


@dataclass(frozen=True)
class _EnumValue:
    """An enum value sent as ``number`` or ``name`` depending on the request's enum encoding."""
    number: int
    name: str


def _enum_number(field_name: str, value: str) -> int | None:
    for table in (_ENUMS, _NEWER_ENUMS):
        if value in table.get(field_name, {}):
            return table[field_name][value]
    return None


def _encode_enums(obj, as_int: bool):
    """Copy of a response body with its enum fields as numbers (as_int) or names."""
    if isinstance(obj, _EnumValue):
        return obj.number if as_int else obj.name
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            number = _enum_number(k, v) if as_int and isinstance(v, str) else None
            out[k] = number if number is not None else _encode_enums(v, as_int)
        return out
    if isinstance(obj, list):
        return [_encode_enums(v, as_int) for v in obj]
    return obj


def _int_enums(obj):
    """Copy of a response body with the known enum fields turned into their numbers."""
    return _encode_enums(obj, True)


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


def _seconds_text(seconds: float) -> str:
    """12.5 -> "12.5", 26.0 -> "26" (how the real messages print a delay)."""
    return f"{seconds:.9f}".rstrip("0").rstrip(".")


def _rpc_method(action: str | None) -> str:
    method = _ACTION_METHOD.get(action or "", "generateContent")
    return f"google.ai.generativelanguage.v1beta.GenerativeService.{method[0].upper()}{method[1:]}"


def _error_info(reason: str, **metadata) -> dict:
    return {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason,
            "domain": "googleapis.com", "metadata": {"service": _SERVICE, **metadata}}


@dataclass
class _Ctx:
    """What an error body may mention about the call it answers."""
    model: str                       # bare model name
    action: str | None
    params: dict
    prompt_tokens: int = 1
    input_limit: int | None = None

    @property
    def msg(self) -> str | None:
        return self.params.get("message")


# --- quota (429) bodies ---

def _quota_metric(quota_id: str) -> str:
    """The quotaMetric that goes with a quotaId."""
    free = quota_id.endswith("-FreeTier")
    if "InputTokens" in quota_id:
        name = ("generate_content_free_tier_input_token_count" if free else
                "generate_content_paid_tier_input_token_count")
    elif free:
        name = "generate_content_free_tier_requests"
    else:
        name = ("generate_requests_per_model_per_day" if "PerDay" in quota_id else
                "generate_requests_per_model")
    return f"{_SERVICE}/{name}"


def _quota_id(base: str, free_tier: bool) -> str:
    if base == QUOTA_TPM and not free_tier:
        return QUOTA_TPM_PAID
    return f"{base}-FreeTier" if free_tier else base


def _quota_error(model: str, violations: list[tuple[str, str | None]], params: dict, *,
                 retry_delay: str, retry_in: float | None = None,
                 help_first: bool = False) -> dict:
    """A real-shaped 429: QuotaFailure with one violation per (quotaId, quotaValue or None),
    Help and RetryInfo. A violation without a value prints "limit: 0", as the real API does."""
    retry_delay = params.get("retry_delay", retry_delay)
    with_retry = not params.get("no_retry_info")
    help_first = params.get("help_first", help_first)
    if retry_in is None or "retry_delay" in params:
        retry_in = _delay_seconds(retry_delay) + 0.5
    lines = "".join(f"* Quota exceeded for metric: {_quota_metric(qid)}, "
                    f"limit: {value if value is not None else 0}, model: {model}\n"
                    for qid, value in violations)
    message = params.get("message") or (
        _QUOTA_INTRO + lines + f"Please retry in {_seconds_text(retry_in)}s." if with_retry
        else (_QUOTA_INTRO + lines).rstrip("\n"))
    vs = []
    for qid, value in violations:
        v = {"quotaMetric": _quota_metric(qid), "quotaId": qid,
             "quotaDimensions": {"location": "global", "model": model}}
        if value is not None:
            v["quotaValue"] = str(value)
        vs.append(v)
    quota = {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": vs}
    help_ = {"@type": "type.googleapis.com/google.rpc.Help",
             "links": [{"description": "Learn more about Gemini API quotas",
                        "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]}
    details = [help_, quota] if help_first else [quota, help_]
    if with_retry:
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo",
                        "retryDelay": retry_delay})
    return _error(429, message, details)


def _zero_violations(free_tier: bool = True) -> list[tuple[str, None]]:
    return [(_quota_id(QUOTA_RPM, free_tier), None), (_quota_id(QUOTA_RPD, free_tier), None),
            (_quota_id(QUOTA_TPM, free_tier), None)]


def _rate_window(base: str, default_value: str, default_delay: str):
    def build(c: _Ctx) -> dict:
        qid = c.params.get("quota_id", _quota_id(base, True))
        value = c.params.get("quota_value", default_value)
        return _quota_error(c.model, [(qid, value)], c.params, retry_delay=default_delay)
    return build


def _rate_zero(c: _Ctx) -> dict:
    return _quota_error(c.model, _zero_violations(), c.params, retry_delay="45s",
                        help_first=True)


# --- key, project and request errors ---

def _invalid_key(default: str):
    def build(c: _Ctx) -> dict:
        msg = c.msg or default
        return _error(400, msg, [
            _error_info("API_KEY_INVALID"),
            {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US",
             "message": msg},
        ])
    return build


def _unauthorized(c: _Ctx) -> dict:
    return _error(401, c.msg or (
        "Request had invalid authentication credentials. Expected OAuth 2 access token, "
        "login cookie or other valid authentication credential. See "
        "https://developers.google.com/identity/sign-in/web/devconsole-project."), [
        _error_info("ACCESS_TOKEN_TYPE_UNSUPPORTED", method=_rpc_method(c.action)),
    ])


def _forbidden(default_reason: str):
    def build(c: _Ctx) -> dict:
        reason = c.params.get("reason", default_reason)
        if reason == "SERVICE_DISABLED":
            default = (
                "Generative Language API has not been used in project 123456789012 before or "
                "it is disabled. Enable it by visiting https://console.developers.google.com/"
                "apis/api/generativelanguage.googleapis.com/overview?project=123456789012 then "
                "retry.")
        elif reason == "CONSUMER_SUSPENDED":
            # The real message names the consumer "api_key:<the key>"; never echo a key here.
            default = "Permission denied: Consumer 'api_key:REDACTED' has been suspended."
        else:
            default = (f"Requests to this API {_SERVICE} method {_rpc_method(c.action)} "
                       f"are blocked.")
        return _error(403, c.msg or default, [
            _error_info(reason, consumer="projects/123456789012"),
        ])
    return build


def _plain(code: int, default: str, status: str | None = None):
    """A body with only code, message and status (no details), as many real errors are."""
    def build(c: _Ctx) -> dict:
        return _error(code, c.msg or default, status=status)
    return build


def _billing(c: _Ctx) -> dict:
    if c.params.get("variant") == "no_billing_account":
        default = ("The Gemini API cannot be used without a billing account linked to your "
                   "project. Please link a billing account to your project in Google AI Studio.")
    else:
        default = ("Gemini API free tier is not available in your country. Please enable "
                   "billing on your project in Google AI Studio.")
    return _error(400, c.msg or default, status="FAILED_PRECONDITION")


def _no_system_instruction(c: _Ctx) -> dict:
    return _error(400, c.msg or f"Developer instruction is not enabled for models/{c.model}")


def _too_long(c: _Ctx) -> dict:
    limit = int(c.params.get("limit", c.input_limit or 1048576))
    tokens = int(c.params.get("tokens", max(c.prompt_tokens, limit + 1)))
    return _error(400, c.msg or (f"The input token count ({tokens}) exceeds the maximum number "
                                 f"of tokens allowed ({limit})."))


def _not_found(c: _Ctx) -> dict:
    return _error(404, c.msg or _not_found_msg(c.model, c.action))


def _no_longer_available(c: _Ctx) -> dict:
    return _error(404, c.msg or (
        f"This model models/{c.model} is no longer available to new users. Please update your "
        f"code to use a newer model for the latest features and improvements."))


def _bad_request(c: _Ctx) -> dict:
    message = c.msg or 'Invalid JSON payload received. Unknown name "foo"'
    return _error(400, message, [
        {"@type": "type.googleapis.com/google.rpc.BadRequest",
         "fieldViolations": [{"description": message}]},
    ])


# Behaviours answered by a JSON error body: name -> builder(_Ctx) -> body (its "code" is the
# HTTP status).
_ERROR_BUILDERS: dict[str, Callable[[_Ctx], dict]] = {
    "invalid_key": _invalid_key(_INVALID_KEY_MSG),
    "key_expired": _invalid_key("API key expired. Please renew the API key."),
    "unauthorized": _unauthorized,
    "forbidden": _forbidden("SERVICE_DISABLED"),
    "key_blocked": _forbidden("API_KEY_SERVICE_BLOCKED"),
    "suspended": _forbidden("CONSUMER_SUSPENDED"),
    "leaked": _plain(403, "Your API key was reported as leaked. Please use another API key."),
    "no_permission": _plain(403, "The caller does not have permission"),
    "location": _plain(400, "User location is not supported for the API use.",
                       "FAILED_PRECONDITION"),
    "billing": _billing,
    "rate_minute": _rate_window(QUOTA_RPM, "10", "26s"),
    "rate_day": _rate_window(QUOTA_RPD, "250", "36s"),
    "rate_tokens": _rate_window(QUOTA_TPM, "250000", "26s"),
    "rate_zero": _rate_zero,
    "rate_plain": _plain(429, "Resource has been exhausted (e.g. check quota)."),
    "credits_depleted": _plain(429, (
        "Your prepayment credits are depleted. Please go to AI Studio at "
        "https://ai.studio/projects to manage your project and billing.")),
    "not_found": _not_found,
    "no_longer_available": _no_longer_available,
    "bad_request": _bad_request,
    "no_system_instruction": _no_system_instruction,
    "too_long": _too_long,
    "no_thinking": _plain(400, "Thinking is not supported by this model."),
    "error500": _plain(500, _INTERNAL_MSG),
    "unavailable": _plain(503, "The model is overloaded. Please try again later."),
    "gateway_timeout": _plain(504, "Deadline expired before operation could complete."),
}

_OTHER_BEHAVIOURS = frozenset({"slow", "hang", "html502", "nonjson_error", "empty200", "flaky"})

BEHAVIOURS = frozenset(_ERROR_BUILDERS) | _CONTENT_BEHAVIOURS | _STREAM_FAILURES | \
    _OTHER_BEHAVIOURS


def _error_body(behaviour: str, model: str | None, action: str | None, params: dict,
                prompt_tokens: int = 1, input_limit: int | None = None) -> dict:
    """The real-shaped JSON error body for a JSON error behaviour."""
    if behaviour in _STREAM_FAILURES:
        behaviour = "error500"
    if behaviour not in _ERROR_BUILDERS:
        raise ValueError(f"not an error behaviour: {behaviour}")
    ctx = _Ctx(model or "gemini-2.5-flash", action, params, prompt_tokens, input_limit)
    return _ERROR_BUILDERS[behaviour](ctx)


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


def _embedding(content: Any) -> dict:
    """A fixed-size embedding of a content's text: EMBEDDING_DIMENSION numbers in [0, 1)
    derived from its sha256, so equal texts embed equally."""
    import hashlib
    digest = hashlib.sha256(" ".join(_texts(content)).encode()).digest()
    return {"values": [round(b / 256, 6) for b in digest[:EMBEDDING_DIMENSION]]}


def _first_function(body: dict) -> str | None:
    """The name of the first function the request declares (tools[].functionDeclarations)."""
    for tool in body.get("tools") or []:
        for declaration in (tool.get("functionDeclarations") or []) if isinstance(tool, dict) \
                else []:
            if isinstance(declaration, dict) and isinstance(declaration.get("name"), str):
                return declaration["name"]
    return None


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


def _config(body: dict) -> dict:
    config = body.get("generationConfig") or body.get("generation_config")
    return config if isinstance(config, dict) else {}


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _max_output(body: dict) -> int | None:
    """generationConfig.maxOutputTokens when it is a positive number."""
    limit = _int_or_none(_config(body).get("maxOutputTokens"))
    return limit if limit is not None and limit > 0 else None


def _answer(model: str, body: dict, thoughts: int = 0) -> tuple[str, str]:
    """(answer text, finish reason) for a generate/stream request; thoughts are taken from
    maxOutputTokens first, as the real thinking models do."""
    prompt = _last_user_text(body)
    config = _config(body)
    if config.get("responseMimeType") == "application/json":
        text = json.dumps({"model": model, "echo": prompt})
    else:
        text = f"[{model}] {prompt}"
    limit = _max_output(body)
    if limit is not None:
        limit -= thoughts
    if limit is not None and limit > 0 and len(text.split()) > limit:
        return " ".join(text.split()[:limit]), "MAX_TOKENS"
    return text, "STOP"


# Thought tokens the fake "spends": min(budget, cap); thinkingLevel picks the budget when no
# thinkingBudget is given.
_THOUGHTS_CAP = 8
_LEVEL_THOUGHTS = {"minimal": 1, "low": 4, "medium": 6, "high": 8}
_THOUGHT_PART = {"text": "thinking...", "thought": True}


def _thinking_config(body: dict) -> dict | None:
    cfg = _config(body)
    cfg = cfg.get("thinkingConfig", cfg.get("thinking_config"))
    return cfg if isinstance(cfg, dict) else None


def _thoughts(cfg: dict) -> int:
    """Thought tokens a thinking model spends under this thinkingConfig."""
    budget = _int_or_none(cfg.get("thinkingBudget", cfg.get("thinking_budget")))
    if budget is None or budget < 0:
        level = str(cfg.get("thinkingLevel", cfg.get("thinking_level", ""))).lower()
        budget = _LEVEL_THOUGHTS.get(level, _THOUGHTS_CAP)
    return min(budget, _THOUGHTS_CAP)


def _include_thoughts(cfg: dict) -> bool:
    return bool(cfg.get("includeThoughts", cfg.get("include_thoughts")))


def _has_system_instruction(body: dict) -> bool:
    return bool(body.get("systemInstruction") or body.get("system_instruction"))


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
    project: str | None = None  # the key's declared project (None: the key is its own)
    raw: bytes = b""          # the request body exactly as received


@dataclass
class _Rule:
    behaviour: str
    params: dict = field(default_factory=dict)
    remaining: int | None = None
    rng: random.Random | None = None      # flaky: the rule's own seeded draws
    immediate: bool = False               # answered without the configured latency


@dataclass
class _Quota:
    """Limits of one (project, model): None = no limit in that window."""
    rpm: int | None = None
    rpd: int | None = None
    tpm: int | None = None
    free_tier: bool = True


@dataclass
class _Usage:
    """What one (project, model) spent in the current minute and Pacific day."""
    minute: int = -1
    minute_calls: int = 0
    minute_tokens: int = 0
    day: str = ""
    day_calls: int = 0


def _pacific_day(now: float) -> str:
    """The date in America/Los_Angeles (when the real daily quotas reset)."""
    try:
        from zoneinfo import ZoneInfo
        tz = ZoneInfo("America/Los_Angeles")
    except Exception:  # noqa: BLE001 - no tz database: standard time is close enough
        tz = datetime.timezone(datetime.timedelta(hours=-8))
    return datetime.datetime.fromtimestamp(now, tz).date().isoformat()


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
        self._rules: dict[tuple[str | None, str | None], _Rule] = {}       # (key, model)
        self._project_rules: dict[tuple[str, str | None], _Rule] = {}      # (project, model)
        self._projects: dict[str, str] = {}                                # key -> project
        self._quotas: dict[tuple[str | None, str | None], _Quota] = {}     # (project, model)
        self._usage: dict[tuple[tuple[str, str], str], _Usage] = {}
        self._clock: Callable[[], float] = time.time
        self.natural_errors = True             # see "Natural triggers" in the module docstring
        self._lock = threading.Lock()          # rules, projects, quotas, latency, log
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
                      times: int | None = None, project: str | None = None, **params) -> None:
        """A rule for calls with this key (or every key of this project) on this model; see
        "Rule matching" in the module docstring."""
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {behaviour!r}; known: {sorted(BEHAVIOURS)}")
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 or None")
        if key is not None and project is not None:
            raise ValueError("a rule names a key or a project, not both")
        rule = _Rule(behaviour, dict(params), times)
        if behaviour == "flaky":
            rule.rng = random.Random(params.get("seed"))
        with self._lock:
            if project is not None:
                self._project_rules[(project, _bare(model))] = rule
            else:
                self._rules[(key, _bare(model))] = rule

    def clear_behaviours(self) -> None:
        with self._lock:
            self._rules.clear()
            self._project_rules.clear()

    def set_latency(self, seconds: float, model: str | None = None) -> None:
        with self._lock:
            if model is None:
                self._latency_default = float(seconds)
            else:
                self._latency_model[_bare(model)] = float(seconds)

    def set_project(self, name: str, keys: list[str] | tuple[str, ...]) -> None:
        """Make `keys` (exactly these) the keys of Google Cloud project `name`; a key moves
        here from any other project. A key in no project is its own project."""
        if not name:
            raise ValueError("a project needs a name")
        with self._lock:
            for k in [k for k, p in self._projects.items() if p == name]:
                del self._projects[k]
            for k in keys:
                self._projects[k] = name

    def project_of(self, key: str | None) -> str | None:
        """The declared project of a key, or None (then the key is its own project)."""
        with self._lock:
            return self._projects.get(key) if key is not None else None

    def remove_model(self, name: str) -> bool:
        """Take a model out of the catalogue (list, get and generate then 404 it); True if it
        was there."""
        full = f"models/{_bare(name)}"
        with self._lock:
            before = len(self.models)
            self.models = [m for m in self.models if m.get("name") != full]
            return len(self.models) < before

    def set_quota(self, model: str | None = None, *, rpm: int | None = None,
                  rpd: int | None = None, tpm: int | None = None, project: str | None = None,
                  free_tier: bool = True) -> None:
        """Limits per (project, model), counted as Google does (see "Quotas" in the module
        docstring). model/project None = every model/project, each counted on its own. A later
        call for the same (project, model) replaces the limits; all three None removes them."""
        for label, value in (("rpm", rpm), ("rpd", rpd), ("tpm", tpm)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{label} must be an int >= 0 or None, not {value!r}")
        scope = (project, _bare(model))
        with self._lock:
            if rpm is None and rpd is None and tpm is None:
                self._quotas.pop(scope, None)
            else:
                self._quotas[scope] = _Quota(rpm, rpd, tpm, bool(free_tier))

    def clear_quotas(self) -> None:
        """Forget every quota and what was counted against them."""
        with self._lock:
            self._quotas.clear()
            self._usage.clear()

    def set_clock(self, clock: Callable[[], float] | None) -> None:
        """Read the time for quota windows from clock() (epoch seconds); None = time.time."""
        with self._lock:
            self._clock = clock or time.time

    # ------------------------------------------------------------------ request log
    def count(self, *, key: str | None = None, model: str | None = None,
              action: str | tuple | None = None, project: str | None = None) -> int:
        model = _bare(model)
        actions = (action,) if isinstance(action, str) else action
        with self._lock:
            calls = list(self.calls)
        return sum(1 for c in calls
                   if (key is None or c.key == key)
                   and (model is None or c.model == model)
                   and (actions is None or c.action in actions)
                   and (project is None or c.project == project))

    def reset_log(self) -> None:
        with self._lock:
            self.calls.clear()

    # ------------------------------------------------------------------ internals
    def _pick(self, key: str | None, project: str | None, model: str | None,
              action: str) -> _Rule:
        """The rule that applies to this call (consuming one use of it), or an "ok" rule."""
        listing = action in ("list", "get")
        if listing:
            model = None              # listing only sees rules for any model
        order = [(self._rules, (key, model)), (self._project_rules, (project, model)),
                 (self._rules, (key, None)), (self._project_rules, (project, None)),
                 (self._rules, (None, model)), (self._rules, (None, None))]
        with self._lock:
            for table, ck in order:
                if table is self._project_rules and project is None:
                    continue
                rule = table.get(ck)
                if rule is None:
                    continue
                if listing and rule.behaviour not in LISTING_BEHAVIOURS:
                    continue
                if rule.remaining is not None:
                    rule.remaining -= 1
                    if rule.remaining <= 0:
                        del table[ck]
                if rule.behaviour == "flaky":      # drawn under the lock: seeded runs repeat
                    if rule.rng.random() < float(rule.params.get("rate", 0.3)):
                        return _Rule("unavailable", dict(rule.params), immediate=True)
                    return _Rule("ok", dict(rule.params))
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

    def _find_model(self, model: str | None) -> dict | None:
        name = f"models/{model}"
        for m in list(self.models):
            if m.get("name") == name:
                return m
        return None

    def _response_id(self) -> str:
        return base64.urlsafe_b64encode(b"fake%08d" % next(self._ids)).decode().rstrip("=")

    def _quota_for(self, project: str | None, model: str) -> _Quota | None:
        scopes = [(None, model), (None, None)]
        if project is not None:
            scopes = [(project, model), (project, None)] + scopes
        for scope in scopes:
            if scope in self._quotas:
                return self._quotas[scope]
        return None

    def _spend_quota(self, key: str, project: str | None, model: str,
                     tokens: int) -> dict | None:
        """Count one call against its (project, model) quota; the 429 body instead when it is
        over a limit (then nothing is counted)."""
        with self._lock:
            quota = self._quota_for(project, model)
            if quota is None:
                return None
            now = self._clock()
            owner = ("project", project) if project is not None else ("key", key)
            use = self._usage.setdefault((owner, model), _Usage())
            minute, day = int(now // 60), _pacific_day(now)
            if use.minute != minute:
                use.minute, use.minute_calls, use.minute_tokens = minute, 0, 0
            if use.day != day:
                use.day, use.day_calls = day, 0
            to_minute = (minute + 1) * 60 - now
            minute_delay = f"{math.ceil(round(to_minute, 6))}s"
            free = quota.free_tier
            if 0 in (quota.rpm, quota.rpd, quota.tpm):
                return _quota_error(model, _zero_violations(free), {}, retry_delay=minute_delay,
                                    retry_in=to_minute, help_first=True)
            if quota.rpd is not None and use.day_calls >= quota.rpd:
                return _quota_error(model, [(_quota_id(QUOTA_RPD, free), quota.rpd)], {},
                                    retry_delay="36s")
            if quota.rpm is not None and use.minute_calls >= quota.rpm:
                return _quota_error(model, [(_quota_id(QUOTA_RPM, free), quota.rpm)], {},
                                    retry_delay=minute_delay, retry_in=to_minute)
            if quota.tpm is not None and use.minute_tokens + tokens > quota.tpm:
                return _quota_error(model, [(_quota_id(QUOTA_TPM, free), quota.tpm)], {},
                                    retry_delay=minute_delay, retry_in=to_minute)
            use.minute_calls += 1
            use.day_calls += 1
            use.minute_tokens += tokens
            return None

    def _natural_error(self, model: str, entry: dict, body: dict) -> dict | None:
        """The 400 the real API gives this model for this request by itself, if any."""
        if _thinking_config(body) is not None and not entry.get("thinking"):
            return _error_body("no_thinking", model, "generate", {})
        if model.startswith("gemma") and _has_system_instruction(body):
            return _error_body("no_system_instruction", model, "generate", {})
        limit = entry.get("inputTokenLimit")
        tokens = _prompt_tokens(body)
        if isinstance(limit, int) and tokens > limit:
            return _error_body("too_long", model, "generate", {}, tokens, limit)
        return None

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

        project = self.project_of(key)
        call = Call(t=time.time(), method=h.command, path=split.path, key=key, model=model,
                    action=action, body=body, query=split.query, project=project, raw=raw)
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

        rule = self._pick(key, project, model, action)
        if not rule.immediate and self._wait(self._latency_for(model)):
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
        entry = self._find_model(model) if model else None
        if b in _STREAM_FAILURES and action != "stream":
            b = "error500"
        if b in _ERROR_BUILDERS:
            err = _error_body(b, model, action, params,
                              _prompt_tokens(body) if isinstance(body, dict) else 1,
                              (entry or {}).get("inputTokenLimit"))
            h.send_json(call, err["error"]["code"], err)
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
        if action == "get":
            if entry is None:
                h.send_json(call, 404, _error(404, _not_found_msg(model, None)))
            else:
                h.send_json(call, 200, entry)
            return
        needed = _NEEDED_METHOD.get(action, "generateContent")
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
        if action == "embed":
            h.send_json(call, 200, {"embedding": _embedding(body.get("content"))})
            return
        if action == "batch_embed":
            requests = body.get("requests") if isinstance(body.get("requests"), list) else []
            h.send_json(call, 200, {"embeddings": [
                _embedding(r.get("content") if isinstance(r, dict) else None)
                for r in requests]})
            return
        if action == "count":
            h.send_json(call, 200, {"totalTokens": _prompt_tokens(body)})
            return
        if b == "ok" and self.natural_errors:
            err = self._natural_error(model, entry, body)
            if err is not None:
                h.send_json(call, err["error"]["code"], err)
                return
        err = self._spend_quota(key, project, model, _prompt_tokens(body))
        if err is not None:
            h.send_json(call, 429, err)
            return

        responses = self._responses(b, model, entry, body, params, stream=action == "stream")
        responses = [_encode_enums(r, int_enums) for r in responses]
        if action == "generate":
            h.send_json(call, 200, responses[0])
            return
        self._do_stream(h, call, b, responses, params)

    def _responses(self, b: str, model: str, entry: dict, body: dict, params: dict,
                   stream: bool) -> list:
        """Response bodies for a 200 generate (one) or stream (several elements)."""
        p_tokens = _prompt_tokens(body)
        common = {"modelVersion": model, "responseId": self._response_id()}
        prompt_usage = {"promptTokenCount": p_tokens, "totalTokenCount": p_tokens}
        if b in ("blocked", "unknown_block"):
            reason = (params.get("block_reason", "SAFETY") if b == "blocked" else
                      _EnumValue(int(params.get("number", 7)),
                                 str(params.get("name", "FUTURE_BLOCK"))))
            return [{"promptFeedback": {"blockReason": reason,
                                        "safetyRatings": _safety_ratings()},
                     "usageMetadata": prompt_usage, **common}]
        if b == "safety":
            return [{"candidates": [{"finishReason": "SAFETY", "index": 0,
                                     "safetyRatings": _safety_ratings()}],
                     "usageMetadata": prompt_usage, **common}]
        if b == "no_candidates":
            return [{"usageMetadata": prompt_usage, **common}]
        no_parts = {"empty_answer": "STOP", "image_safety": "IMAGE_SAFETY",
                    "unexpected_tool_call": "UNEXPECTED_TOOL_CALL", "recitation": "RECITATION"}
        if b in no_parts and not (b == "recitation" and params.get("with_text")):
            cand = {"finishReason": no_parts[b], "index": 0}
            if b == "empty_answer":
                cand = {"content": {"role": "model"}, **cand}
            return [{"candidates": [cand], "usageMetadata": prompt_usage, **common}]

        if b == "function_call":
            call = {"name": _first_function(body) or "unknown_function",
                    "args": {"prompt": _last_user_text(body)}}
            cand = {"content": {"parts": [{"functionCall": call}], "role": "model"},
                    "finishReason": "STOP", "index": 0}
            usage = {"promptTokenCount": p_tokens, "candidatesTokenCount": 1,
                     "totalTokenCount": p_tokens + 1}
            return [{"candidates": [cand], "usageMetadata": usage, **common}]

        cfg = _thinking_config(body) if entry.get("thinking") else None
        thoughts = _thoughts(cfg) if cfg is not None else 0
        out_limit = _max_output(body)
        exhausted = thoughts and out_limit is not None and thoughts >= out_limit
        if b == "thinking_exhausted" or (b == "ok" and exhausted):
            spent = out_limit if b == "ok" else self._thinking_budget(body, params)
            return [{"candidates": [{"content": {"role": "model"}, "finishReason": "MAX_TOKENS",
                                     "index": 0}],
                     "usageMetadata": {"promptTokenCount": p_tokens,
                                       "totalTokenCount": p_tokens + spent,
                                       "thoughtsTokenCount": spent}, **common}]

        # ok / unknown_finish / recitation with_text / the failing streams
        text, finish = _answer(model, body, thoughts)
        if b == "recitation":
            words = text.split()
            text, finish = " ".join(words[:max(1, len(words) // 2)]), "RECITATION"
        if b == "unknown_finish":
            finish = _EnumValue(int(params.get("number", 99)),
                                str(params.get("name", "FUTURE_REASON")))
        c_tokens = len(text.split())
        usage = {"promptTokenCount": p_tokens, "candidatesTokenCount": c_tokens,
                 "totalTokenCount": p_tokens + c_tokens + thoughts}
        if thoughts:
            usage["thoughtsTokenCount"] = thoughts
        lead = [dict(_THOUGHT_PART)] if thoughts and _include_thoughts(cfg) else []
        if not stream:
            return [{"candidates": [{"content": {"parts": lead + [{"text": text}],
                                                 "role": "model"},
                                     "finishReason": finish, "index": 0}],
                     "usageMetadata": usage, **common}]
        out = []
        if lead:
            out.append({"candidates": [{"content": {"parts": lead, "role": "model"},
                                        "index": 0}], **common})
        pieces = _split_text(text)
        for i, piece in enumerate(pieces):
            cand = {"content": {"parts": [{"text": piece}], "role": "model"}, "index": 0}
            elem = {"candidates": [cand], **common}
            if i == len(pieces) - 1:
                cand["finishReason"] = finish
                elem["usageMetadata"] = usage
            out.append(elem)
        return out

    @staticmethod
    def _thinking_budget(body: dict, params: dict) -> int:
        """Thoughts of thinking_exhausted: thinkingBudget, else maxOutputTokens, else the
        ``budget`` param (1024)."""
        budget = _int_or_none((_thinking_config(body) or {}).get("thinkingBudget"))
        if budget is None or budget <= 0:
            budget = _max_output(body)
        return budget if budget is not None else int(params.get("budget", 1024))

    def _do_stream(self, h: _Handler, call: Call, b: str, elems: list, params: dict) -> None:
        gap = float(params.get("chunk_gap", 0.01))
        if b in ("stream_break", "stream_error_after_stop"):
            err = _error(int(params.get("code", 500)), params.get("message") or _INTERNAL_MSG,
                         status=params.get("status"))
            elems = [elems[0], err] if b == "stream_break" else elems + [err]
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

_CATALOGUES = {"2025": DEFAULT_MODELS, "2026": CURRENT_MODELS}


def _param_value(text: str) -> Any:
    """A behaviour param from the command line: JSON when it parses (5, true, "x"), else the
    text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _parse_behaviour(spec: str) -> tuple[str, dict]:
    """KEY:MODEL:BEHAVIOUR[:NAME=VALUE,...] -> (behaviour, set_behaviour kwargs)."""
    parts = spec.split(":", 3)
    if len(parts) < 3:
        raise ValueError(f"--behaviour wants KEY:MODEL:BEHAVIOUR[:NAME=VALUE,...], got {spec!r}")
    k, m, b = parts[:3]
    if b not in BEHAVIOURS:
        raise ValueError(f"unknown behaviour {b!r}; known: {', '.join(sorted(BEHAVIOURS))}")
    kwargs: dict[str, Any] = {"model": None if m == "*" else m}
    if k.startswith("@"):
        kwargs["project"] = k[1:]
    else:
        kwargs["key"] = None if k == "*" else k
    for item in (parts[3].split(",") if len(parts) == 4 and parts[3] else []):
        name, eq, value = item.partition("=")
        if not eq or not name or name in ("key", "model", "project"):
            raise ValueError(f"--behaviour params are NAME=VALUE, got {item!r} in {spec!r}")
        kwargs[name] = _param_value(value)
    return b, kwargs


def _parse_project(spec: str) -> tuple[str, list[str]]:
    """NAME=KEY1,KEY2 -> (name, keys)."""
    name, eq, keys = spec.partition("=")
    if not eq or not name or not keys:
        raise ValueError(f"--project wants NAME=KEY1,KEY2, got {spec!r}")
    return name, [k for k in keys.split(",") if k]


def _parse_quota(spec: str) -> dict:
    """[PROJECT:]MODEL:rpm=N[,rpd=N][,tpm=N][,paid] -> set_quota kwargs."""
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"--quota wants [PROJECT:]MODEL:rpm=N[,rpd=N][,tpm=N][,paid], "
                         f"got {spec!r}")
    project = parts[0] if len(parts) == 3 else None
    model, limits = parts[-2], parts[-1]
    kwargs: dict[str, Any] = {"model": None if model == "*" else model, "project": project}
    for item in limits.split(","):
        name, eq, value = item.partition("=")
        if item == "paid":
            kwargs["free_tier"] = False
        elif eq and name in ("rpm", "rpd", "tpm") and value.isdigit():
            kwargs[name] = int(value)
        else:
            raise ValueError(f"--quota limits are rpm=N, rpd=N, tpm=N or paid, got {item!r}")
    if not any(n in kwargs for n in ("rpm", "rpd", "tpm")):
        raise ValueError(f"--quota needs at least one of rpm=, rpd=, tpm= in {spec!r}")
    return kwargs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Fake Gemini v1beta REST API on 127.0.0.1. Behaviours: "
                    + ", ".join(sorted(BEHAVIOURS)) + ".")
    ap.add_argument("--port", type=int, default=8765, help="port (0 = pick a free one)")
    ap.add_argument("--latency", type=float, default=0.0, help="seconds added to each request")
    ap.add_argument("--models", type=int, default=0, metavar="N",
                    help="serve N simulated text models (make_models) instead of a catalogue")
    ap.add_argument("--catalogue", "--catalog", choices=sorted(_CATALOGUES), default="2025",
                    help="model list to serve: 2025 (DEFAULT_MODELS, the default) or 2026 "
                         "(CURRENT_MODELS)")
    ap.add_argument("--behaviour", "--behavior", action="append", default=[],
                    metavar="KEY:MODEL:BEHAVIOUR[:NAME=VALUE,...]",
                    help="a rule; KEY or MODEL may be '*', KEY may be '@PROJECT'; params after "
                         "a 4th colon, e.g. '*:*:rate_minute:quota_value=5'. Repeatable.")
    ap.add_argument("--project", action="append", default=[], metavar="NAME=KEY1,KEY2",
                    help="keys that share one Google Cloud project (and its quotas). "
                         "Repeatable.")
    ap.add_argument("--quota", action="append", default=[],
                    metavar="[PROJECT:]MODEL:rpm=N[,rpd=N][,tpm=N][,paid]",
                    help="quota per project and model (MODEL may be '*'; no PROJECT = every "
                         "project); 'paid' drops the -FreeTier quota ids. Repeatable.")
    ap.add_argument("--model-latency", action="append", default=[], metavar="MODEL=SECONDS",
                    help="latency of one model (overrides --latency for it). Repeatable.")
    args = ap.parse_args(argv)

    models = make_models(args.models) if args.models > 0 else _CATALOGUES[args.catalogue]
    fake = FakeGemini(models=models, latency=args.latency, port=args.port)
    try:
        for spec in args.project:
            name, keys = _parse_project(spec)
            fake.set_project(name, keys)
        for spec in args.behaviour:
            behaviour, kwargs = _parse_behaviour(spec)
            fake.set_behaviour(behaviour, **kwargs)
        for spec in args.quota:
            fake.set_quota(**_parse_quota(spec))
    except ValueError as exc:
        ap.error(str(exc))
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
