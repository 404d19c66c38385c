"""The playground page at `/` in a real headless Chromium (Debian's `chromium` and `chromium-driver`, driven by
selenium): type the key and a prompt, watch the progress bar rise, and the finished video plays in the page.

The server is the SDK tests' one (the real ingress under uvicorn, a real one-rank group writing real mp4s).
A screenshot of the page is kept at outputs/test-artifacts/playground.png.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import wait_for
from test_openai_sdk import KEY, MODEL, server  # noqa: F401 - `server` is the fixture

webdriver = pytest.importorskip("selenium.webdriver")
ARTIFACT = Path(__file__).resolve().parents[2] / "outputs" / "test-artifacts" / "playground.png"


@pytest.fixture
def browser():
    chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_bin):
        pytest.skip("needs Debian's chromium and chromium-driver (./run.sh test installs them with apt-get)")
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager try to download a browser
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1100,900",
                "--autoplay-policy=no-user-gesture-required"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_bin), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_a_prompt_renders_and_plays_in_the_page(server, browser):  # noqa: F811
    from selenium.webdriver.common.by import By

    base, svc = server
    browser.get(f"{base}/")
    assert browser.title == "pab-cluster playground"
    key = browser.find_element(By.ID, "key")
    key.send_keys(KEY)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    wait_for(lambda: browser.execute_script("return [...document.querySelectorAll('#model option')].map(o => o.value)")
           == [MODEL], 20, "the model list (the key works)")  # fmt: skip
    # the cache menu is the chosen model's (GET /v1/models' cache_presets), `paper` chosen
    assert browser.execute_script("const s = document.querySelector('#pab'); return [[...s.options].map(o => "
                                  "o.value), s.value]") == [["off", "paper"], "paper"]  # fmt: skip
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("a paced fox in the playground")
    browser.find_element(By.ID, "steps").send_keys("16")
    browser.find_element(By.ID, "submit").click()

    card = "[...document.querySelectorAll('.job')].find(c => c.querySelector('.prompt').textContent.includes('playground'))"
    wait_for(lambda: browser.execute_script(f"return !!({card})"), 20, "the new video's card")
    seen = []

    def finished() -> bool:
        value, status = browser.execute_script(f"const c = {card}; return [c.querySelector('progress').value, "
                                               "c.querySelector('.status').textContent]")  # fmt: skip
        seen.append(value)
        assert "failed" not in status and "cancelled" not in status, status
        return status.startswith("completed")

    wait_for(finished, 60, "the render to complete", interval_s=0.05)
    assert any(0 < v < 100 for v in seen) and seen[-1] == 100, seen  # progress rose step by step
    assert seen == sorted(seen), seen
    duration = wait_for(lambda: browser.execute_script(
        f"const v = {card}.querySelector('video'); return v && v.readyState >= 1 ? v.duration : 0"), 30,
        "the video to load")  # fmt: skip
    assert duration > 0
    details = browser.execute_script(f"return {card}.querySelector('pre').textContent")
    assert '"timings"' in details and '"cost"' in details and '"steps": 16' in details

    # Remix it: the prompt now in the form, with the finished video's settings and seed.
    prompt.clear()
    prompt.send_keys("a paced wolf remixed")
    browser.execute_script(f"{card}.querySelector('button.remix').click()")
    remixed = ("[...document.querySelectorAll('.job')].find(c => c.querySelector('.prompt').textContent === "
               "'a paced wolf remixed')")
    wait_for(lambda: browser.execute_script(f"const c = {remixed}; return !!c && "
                                            "c.querySelector('.status').textContent.startsWith('completed')"),
             60, "the remix to complete")  # fmt: skip
    original, remix = (browser.execute_script(f"return JSON.parse({c}.querySelector('pre').textContent)")
                       for c in (card, remixed))  # fmt: skip
    assert remix["seed"] == original["seed"] and remix["request"]["steps"] == 16 and remix["id"] != original["id"]
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACT)) and ARTIFACT.stat().st_size > 0
    assert not browser.find_element(By.ID, "error").text
