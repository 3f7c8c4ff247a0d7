"""The web page of ``python -m experiments.serve`` in headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by Selenium): the server is started with its one command, the page picks a synthetic
clip, shows its frames, streams two answers that equal the same requests answered by the HTTP API (greedy), and
shows an upload's error in its status line.

``VJAX_SERVE_SCREENSHOT=docs/images/serve.png`` saves the page after the second answer (the README's picture).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.serve_common import ROOT, tiny_checkpoint

INSTALL = "apt-get install -y chromium chromium-driver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                  "--window-size=1100,760"]
MAX_TOKENS = 16

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``python -m experiments.serve`` on a free loopback port (``--port=0``; it prints its address)."""
    import httpx

    d = tmp_path_factory.mktemp("serve_browser")
    paths = tiny_checkpoint(d)
    cmd = [sys.executable, "-m", "experiments.serve", f"--workdir={paths['ckpt']}", f"--tokenizer={paths['tokenizer']}",
           f"--config={paths['config']}", "--port=0", "--slots=2", "--max_context=512", "--max_new_tokens=32",
           f"--upload_dir={d / 'uploads'}", "--max_upload_mb=4"]
    log = open(d / "server.log", "w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=log, text=True)
    try:
        line = proc.stdout.readline()  # "serving chat_univi on http://127.0.0.1:PORT/ (...)"
        m = re.search(r"http://\S+?/", line)
        if not m:
            proc.wait(30)
            log.seek(0)
            pytest.fail(f"the server did not start (exit {proc.returncode}): {line!r} {log.read()[-3000:]}")
        url = m.group(0).rstrip("/")
        with httpx.Client(base_url=url, timeout=120) as client:
            for _ in range(600):
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            yield url, client, paths
    finally:
        proc.terminate()
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        log.seek(0)
        assert rc == 143, f"the server stopped with {rc}, not 143 on SIGTERM: {log.read()[-3000:]}"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail(f"headless Chromium is needed: {INSTALL} (Debian's packages; found chromium={chromium}, "
                    f"chromedriver={driver})")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is needed: pip install -e '.[test]'")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]:
        options.add_argument(flag)
    drv = webdriver.Chrome(service=Service(driver), options=options)  # Debian's driver: no download
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


def api_answer(client, messages) -> str:
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": MAX_TOKENS})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_the_page_streams_answers_about_a_synthetic_clip(browser, served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, client, _ = served
    drv = browser
    wait = WebDriverWait(drv, 120)
    drv.get(url + "/")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    assert drv.find_element(By.ID, "model").text == "chat_univi"
    clips = client.get("/v1/clips").json()["data"]
    select = Select(drv.find_element(By.ID, "clip"))
    assert [o.text for o in select.options[1:]] == [c["name"] for c in clips]
    select.select_by_visible_text(clips[1]["name"])
    video = clips[1]["video"]

    want = len(client.post("/v1/frames", json={"video": video}).json()["frames"])
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#frames img")) == want)
    assert all(drv.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
               for img in drv.find_elements(By.CSS_SELECTOR, "#frames img"))  # the JPEGs decode

    tokens = drv.find_element(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys(str(MAX_TOKENS))
    messages = []
    for turn, question in enumerate(["What colour is the circle?", "How many objects are there?"]):
        drv.find_element(By.ID, "question").send_keys(question)
        drv.find_element(By.ID, "ask").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".turn.assistant.done")) == turn + 1)
        node = drv.find_elements(By.CSS_SELECTOR, ".turn.assistant")[turn]
        answer, reason = node.get_attribute("data-answer"), node.get_attribute("data-finish-reason")
        status = drv.find_element(By.ID, "status")
        assert reason in ("stop", "length") and "error" not in status.get_attribute("class"), status.text
        assert node.get_attribute("textContent").startswith(answer)  # shown as streamed
        content = [{"type": "video", "video": video}, {"type": "text", "text": question}] if turn == 0 else question
        messages.append({"role": "user", "content": content})
        assert answer == api_answer(client, messages)  # the same request through the API, greedy
        messages.append({"role": "assistant", "content": answer})
    assert [n.text for n in drv.find_elements(By.CSS_SELECTOR, ".turn.user")] == [
        "What colour is the circle?", "How many objects are there?"]
    shot = os.environ.get("VJAX_SERVE_SCREENSHOT")
    if shot:
        drv.save_screenshot(shot)

    # an upload that is not a video: its reason in the status line, and the page still works
    bad = tmp_path / "notes.mp4"
    bad.write_bytes(b"this is not a video" * 50)
    drv.find_element(By.ID, "upload").send_keys(str(bad))
    wait.until(lambda d: "error" in d.find_element(By.ID, "status").get_attribute("class"))
    assert "notes.mp4 is not a readable video" in drv.find_element(By.ID, "status").text
    drv.find_element(By.ID, "new-chat").click()
    assert not drv.find_elements(By.CSS_SELECTOR, ".turn")
