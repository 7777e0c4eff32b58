"""``jam serve`` (issue 25 item 4): a tiny chat model served on a free port by the real command,
talked to from a real headless Chromium (selenium + Debian's chromium-driver, installed by
``.ci/run``) and through its API: streamed answers with pictures, a second turn under the first,
an uploaded picture, and clear messages for bad input (never a traceback, never a server file)."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from _chat_util import write_chat_checkpoint

pytest.importorskip("starlette", reason="jam serve needs the serve extra")
pytest.importorskip("uvicorn", reason="jam serve needs the serve extra")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``jam serve`` in a subprocess on a free port; yields its base URL."""
    d = tmp_path_factory.mktemp("serve")
    paths = write_chat_checkpoint(d / "model")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jam_metaseq.cli", "serve", str(paths["checkpoint"]), "--image-tokenizer",
         str(paths["vq"]), "--port", "0", "--min-images", "1", "--max-new-tokens", "90", "--max-upload-mb", "0.05"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=d)
    deadline = time.monotonic() + 120
    url = None
    lines = []
    while time.monotonic() < deadline and url is None:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        m = re.search(r"open (http://127\.0\.0\.1:\d+/)", line)
        url = m.group(1) if m else None
    if url is None:
        proc.kill()
        pytest.fail("jam serve did not start: " + "".join(lines))
    yield url, d
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def call(url: str, *, method: str = "GET", body: bytes | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def png_b64(size=(32, 32), colour=(200, 30, 30), *, noise: bool = False) -> str:
    """A PNG as base64: one colour, or random pixels (which do not compress)."""
    from PIL import Image

    buf = io.BytesIO()
    img = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)) if noise else Image.new("RGB", size, colour)
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_api_streams_answers_and_refuses_bad_input_in_one_line(server):
    url, _ = server
    status, body = call(url + "api/conversations", method="POST")
    cid = json.loads(body)["id"]
    status, body = call(f"{url}api/conversations/{cid}/messages", method="POST",
                        body=json.dumps({"text": "what colour is it?", "image": png_b64()}).encode())
    events = [json.loads(f[6:]) for f in body.split("\n\n") if f.startswith("data: ")]
    kinds = [e["kind"] for e in events]
    assert status == 200 and kinds[-2:] == ["done", "end"] and "image" in kinds
    png = next(e["png"] for e in events if e["kind"] == "image")
    assert png.startswith("data:image/png;base64,") and base64.b64decode(png.split(",", 1)[1])[:4] == b"\x89PNG"
    bad = {
        "unknown conversation": (f"{url}api/conversations/nope/messages", {"text": "hi"}, 404),
        "not a picture": (f"{url}api/conversations/{cid}/messages",
                         {"text": "x", "image": base64.b64encode(b"%PDF-1.4 not a picture").decode()}, 400),
        "MiB": (f"{url}api/conversations/{cid}/messages", {"text": "x", "image": png_b64((150, 150), noise=True)}, 413),
        "not valid base64": (f"{url}api/conversations/{cid}/messages", {"text": "x", "image": "***"}, 400),
        "empty message": (f"{url}api/conversations/{cid}/messages", {"text": "  "}, 400),
        "a message is": (f"{url}api/conversations/{cid}/messages", {"text": "x", "path": "/etc/passwd"}, 400),
    }
    for words, (target, payload, code) in bad.items():
        status, body = call(target, method="POST", body=json.dumps(payload).encode())
        assert status == code and words in json.loads(body)["error"], (words, status, body)
        assert "Traceback" not in body
    status, body = call(f"{url}api/conversations/{cid}/messages", method="POST", body=b"\xff{not json")
    assert status == 400 and json.loads(body)["error"] == "the message is not JSON"
    # a body declared larger than the limit is refused before it is read (headers only are sent:
    # the server closes the connection without reading, so a client still sending would see a broken pipe)
    host, port = url.split("//")[1].rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest("POST", f"/api/conversations/{cid}/messages")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(64 << 20))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "request has 64.0 MiB" in json.loads(r.read())["error"]
    conn.close()
    for path in ("etc/passwd", "..%2f..%2fetc%2fpasswd", "app.js/../../ckpt.pt", "model/ckpt.pt", "vocab.json"):
        status, body = call(url + path)
        assert status == 404 and json.loads(body) == {"error": "no such page"}
    status, body = call(url)
    assert status == 200 and "<title>JAM chat</title>" in body


def _browser(tmp_path: Path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (dev extra)")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no chromium + chromedriver (apt-get install chromium chromium-driver; .ci/run does)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=900,1400", f"--user-data-dir={tmp_path / 'chrome'}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


def test_a_browser_tab_holds_a_two_turn_conversation(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, d = server
    browser = _browser(tmp_path)
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 90)

        def answered(n: int) -> bool:  # n answers finished: their pictures shown, Send enabled again
            answers = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
            return len(answers) == n and all(a.find_elements(By.TAG_NAME, "img") for a in answers) \
                and browser.find_element(By.ID, "send").is_enabled()

        wait.until(lambda b: b.execute_script("return cid !== null"))
        browser.find_element(By.ID, "text").send_keys("draw a red circle on a white background")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda b: answered(1))
        first = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[0]
        assert first.find_element(By.TAG_NAME, "span").text  # streamed text
        img = first.find_element(By.TAG_NAME, "img")
        assert img.get_attribute("src").startswith("data:image/png;base64,")
        assert browser.execute_script("return arguments[0].naturalWidth", img) == 32  # a decoded PNG

        # second turn, with a picture uploaded through the button's file input
        picture = d / "upload.png"
        picture.write_bytes(base64.b64decode(png_b64()))
        browser.find_element(By.ID, "file").send_keys(str(picture))
        wait.until(lambda b: b.find_element(By.ID, "attached").text == "upload.png")
        browser.find_element(By.ID, "text").send_keys("now make it blue")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda b: answered(2))
        roles = [e.get_attribute("class") for e in browser.find_elements(By.CSS_SELECTOR, "#log > .msg")]
        assert roles == ["msg user", "msg assistant", "msg user", "msg assistant"]  # the second under the first
        assert browser.find_elements(By.CSS_SELECTOR, ".msg.user")[1].find_elements(By.TAG_NAME, "img")
        if os.environ.get("JAM_SCREENSHOT"):
            browser.save_screenshot(os.environ["JAM_SCREENSHOT"])

        # a file that is not a picture: one clear line on the page, the conversation goes on
        bogus = d / "notes.png"
        bogus.write_bytes(b"just text")
        browser.find_element(By.ID, "file").send_keys(str(bogus))
        wait.until(lambda b: b.find_element(By.ID, "attached").text == "notes.png")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda b: "not a picture" in b.find_element(By.ID, "status").text)
        assert len(browser.find_elements(By.CSS_SELECTOR, ".msg")) == 4

        # a new conversation empties the page and gets a new id
        old = browser.execute_script("return cid")
        browser.find_element(By.ID, "new").click()
        wait.until(lambda b: b.execute_script("return cid") not in (None, old))
        assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
        status, _ = call(f"{url}api/conversations/{old}/stop", method="POST")
        assert status == 404  # the old one is forgotten
    finally:
        browser.quit()
