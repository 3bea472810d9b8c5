"""README's "Gateway" examples, run as written against a gateway (with client keys) over the
fake Gemini server: the curl command, the google-generativeai, google-genai and openai
snippets, and `route` through the gateway. Only the address and the client key are
substituted."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, base_env
from gateway_fixtures import CLIENT_KEYS, FLASH
from gateway_fixtures import guarded  # noqa: F401  (a fixture)

ANSWER = f"[{FLASH}] Say hello in French"


def gateway_blocks() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Gateway\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, re.S)


def filled(code: str, served) -> str:
    return code.replace("http://127.0.0.1:8787", served.url).replace(
        "YOUR-CLIENT-KEY", CLIENT_KEYS["alice"])


def test_the_readme_has_the_five_examples():
    kinds = [lang for lang, _ in gateway_blocks()]
    assert kinds == ["sh", "sh", "python", "python", "python", "sh"]


@pytest.mark.filterwarnings("ignore::FutureWarning")     # google-generativeai's notice
@pytest.mark.parametrize("index", [2, 3, 4], ids=["google-generativeai", "google-genai",
                                                  "openai"])
def test_python_snippet(guarded, fake, index):
    lang, code = gateway_blocks()[index]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(filled(code, guarded), f"README.md block {index}", "exec"), {})
    assert printed.getvalue() == ANSWER + "\n"
    assert len([c for c in fake.calls if c.action == "generate"]) == 1


def test_curl_snippet(guarded, fake):
    if shutil.which("curl") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("curl is missing: .ci/run installs it")
        pytest.skip("curl is not installed")
    _, code = gateway_blocks()[1]
    argv = shlex.split(filled(code, guarded).replace("\\\n", " "))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["candidates"][0]["content"]["parts"] == [{"text": ANSWER}]


def test_route_snippet(guarded, fake, state_dir):
    _, code = gateway_blocks()[5]
    words = shlex.split(filled(code, guarded).replace("\\\n", " "))
    env = base_env(state_dir.parent / "client", "http://127.0.0.1:9", [])
    while "=" in words[0]:
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    assert words[0] == "gemini-router"
    proc = subprocess.run([sys.executable, str(ROOT / "gemini_router.py"), *words[1:]],
                          env=env, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert (proc.returncode, proc.stdout) == (0, ANSWER + "\n"), proc.stderr
