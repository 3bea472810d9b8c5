"""The gateway's status page, loaded in headless Chromium (Debian's `chromium`; .ci/run
installs it): the keys x models grid shows the cells the state says - a key cooling after a
429 on one model, a key disabled after an invalid-key answer, the others ok."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import requests

from conftest import KEYS
from gateway_fixtures import CLIENT_KEYS, FLASH
from gateway_fixtures import guarded  # noqa: F401  (a fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CELL = re.compile(r'<td class="cell ([^"]*)" data-key="([^"]*)" data-model="([^"]*)"[^>]*>'
                  r"<b>(\w+)</b>(.*?)</td>", re.S)


def chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
         *args], capture_output=True, text=True, timeout=120)


def ask(served, model: str) -> requests.Response:
    return requests.post(f"{served.url}/v1beta/models/{model}:generateContent", timeout=30,
                         headers={"x-goog-api-key": CLIENT_KEYS["alice"]},
                         json={"contents": [{"parts": [{"text": "hi"}]}]})


def test_the_status_page_renders_the_grid_in_chromium(guarded, fake, tmp_path):
    fake.set_behaviour("rate_minute", key=KEYS[0], model=FLASH, retry_delay="50s")
    fake.set_behaviour("invalid_key", key=KEYS[1], model="gemini-2.0-flash")
    assert [ask(guarded, m).status_code for m in (FLASH, "gemini-2.0-flash",
                                                  "gemini-2.0-flash")] == [200, 200, 200]
    assert [(c.model, c.key) for c in fake.calls if c.action == "generate"] == [
        (FLASH, KEYS[0]), (FLASH, KEYS[1]), ("gemini-2.0-flash", KEYS[0]),
        ("gemini-2.0-flash", KEYS[1]), ("gemini-2.0-flash", KEYS[0])]
    guarded.flush()
    page = f"{guarded.url}/?key={CLIENT_KEYS['bob']}"

    dom = chromium(tmp_path, "--dump-dom", page)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    cells = {(key, model): (classes, state, detail)
             for classes, key, model, state, detail in CELL.findall(html)}
    models = ["gemini-2.5-flash", "gemini-2.0-flash", "gemini-2.5-flash-lite",
              "gemini-2.0-flash-lite", "gemini-2.5-pro", "gemma-3-27b-it"]
    assert sorted(cells) == sorted((k, m) for k in ("key#1", "key#2") for m in models)
    classes, state, detail = cells[("key#1", FLASH)]
    assert (classes, state) == ("cooling", "cooling")
    assert re.search(r"until \d\d:\d\d:\d\d \((49|50) s left\)", detail), detail
    assert "rate limited: 10 requests per minute" in detail
    for model in models:          # an invalid key is disabled for every model
        classes, state, detail = cells[("key#2", model)]
        assert (classes, state) == ("disabled", "disabled")
        assert "API key not valid" in detail
    assert {cells[("key#1", m)][1] for m in models if m != FLASH} == {"ok"}
    # tiers and latency: the two models that answered have a measured latency
    assert re.search(r'<tr data-model="gemini-2\.0-flash"><td class="num">\d+</td>'
                     r"<td>gemini-2\.0-flash</td><td>[SABC]</td><td>[SABC]</td><td>[SABC]</td>"
                     r'<td class="num">\d+ ms</td><td class="num">100%</td>', html), html
    # it reloads itself, and needs nothing from elsewhere
    assert f'<meta http-equiv="refresh" content="{5}">' in html
    assert "<script" not in html and "<link" not in html and " src=" not in html
    for key in KEYS:
        assert key not in html

    shot = tmp_path / "status-page.png"
    taken = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,760",
                     "--hide-scrollbars", page)
    assert taken.returncode == 0, taken.stderr[-2000:]
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    if os.environ.get("GR_SAVE_STATUS_PAGE"):       # how README's screenshot was made
        shutil.copy(shot, os.environ["GR_SAVE_STATUS_PAGE"])
