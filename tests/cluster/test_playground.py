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
from selenium.webdriver.common.by import By  # noqa: E402 - selenium is there once the line above passes
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


def _submit(browser, base: str, prompt_text: str, steps: int, script: str | None = None):
    """Open the page (then run `script` in it), give it the key, render `prompt_text` with `steps` steps; returns
    the prompt field and the JavaScript expression of the new video's card once it shows."""
    browser.get(f"{base}/")
    assert browser.title == "pab-cluster playground"
    if script:
        browser.execute_script(script)
    key = browser.find_element(By.ID, "key")
    key.clear()  # the page keeps the key it was last given (localStorage): a second submit would type it twice
    key.send_keys(KEY)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    wait_for(lambda: browser.execute_script("return [...document.querySelectorAll('#model option')].map(o => o.value)")
           == [MODEL], 20, "the model list (the key works)")  # fmt: skip
    # the cache menu is the chosen model's (GET /v1/models' cache_presets), `paper` chosen
    assert browser.execute_script("const s = document.querySelector('#pab'); return [[...s.options].map(o => "
                                  "o.value), s.value]") == [["off", "paper"], "paper"]  # fmt: skip
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys(prompt_text)
    browser.find_element(By.ID, "steps").send_keys(str(steps))
    browser.find_element(By.ID, "submit").click()
    card = (f"[...document.querySelectorAll('.job')].find(c => c.querySelector('.prompt').textContent === "
            f"{prompt_text!r})")
    wait_for(lambda: browser.execute_script(f"return !!({card})"), 20, "the new video's card")
    return prompt, card


class Samples(list):
    """The progress values sampled; printed with the card's status text beside each, so a failed assertion
    on the values shows what the page said at every sample."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[str] = []

    def __repr__(self) -> str:
        return repr(list(zip(self, self.statuses, strict=True)))


def _progress_until_done(browser, card: str) -> Samples:
    """The card's progress bar, sampled every 50 ms until the video completes."""
    seen = Samples()

    def finished() -> bool:
        value, status = browser.execute_script(f"const c = {card}; return [c.querySelector('progress').value, "
                                               "c.querySelector('.status').textContent]")  # fmt: skip
        seen.append(value)
        seen.statuses.append(status)
        assert "failed" not in status and "cancelled" not in status, status
        return status.startswith("completed")

    wait_for(finished, 90, "the render to complete", interval_s=0.05)
    return seen


def test_a_prompt_renders_and_plays_in_the_page(server, browser):  # noqa: F811
    base, svc = server
    prompt, card = _submit(browser, base, "a paced fox in the playground", 16)
    seen = _progress_until_done(browser, card)
    assert any(0 < v < 100 for v in seen) and seen[-1] == 100, repr(seen)  # progress rose step by step
    assert seen == sorted(seen), repr(seen)
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


def test_progress_never_moves_back_when_answers_arrive_out_of_order(server, browser):  # noqa: F811
    """Every third answer to the page's list request reaches the page 1.3 s late, past its next refresh (each
    second), as over a slow link: a page that let two refreshes overlap would show that older progress after a
    newer one. (The delay is in the page's `fetch`: Chrome itself sends one request for a URL at a time.)"""
    base, svc = server
    late = """const fetched = window.fetch; let n = 0; window.lateAnswers = 0;
    window.fetch = async (...args) => {
      const answer = await fetched(...args);
      if (String(args[0]).startsWith('/v1/videos?') && n++ % 3 === 0) {
        window.lateAnswers++;
        await new Promise((done) => setTimeout(done, 1300));
      }
      return answer;
    };"""
    _, card = _submit(browser, base, "a paced heron", 48, script=late)  # a step every 0.15 s (BlackFrames)
    seen = _progress_until_done(browser, card)
    assert seen == sorted(seen) and seen[-1] == 100, repr(seen)
    assert len(set(seen)) > 4 and browser.execute_script("return window.lateAnswers") > 2, repr(seen)


def test_the_card_says_what_a_render_does_and_why_a_video_failed(server, browser):  # noqa: F811
    """While denoising, the card counts the steps; after the last one, for the seconds a long video's decode and
    upload take (progress stays at 99 until it is stored), it says so instead of looking stuck. A failed video
    says why on its card, not only in its details."""
    base, svc = server
    _, card = _submit(browser, base, "a paced fox with a tail", 16)  # 2.4 s of steps, then 3 s (BlackFrames)
    seen = _progress_until_done(browser, card)
    assert any("% \u00b7 step " in s and " of 16 \u00b7" in s for s in seen.statuses), repr(seen)
    assert any(s.startswith("in_progress 99% \u00b7 decoding and saving") for s in seen.statuses), repr(seen)
    assert not browser.execute_script(f"return {card}.querySelector('.why').textContent")

    _, broken = _submit(browser, base, "a broken fox", 4)  # raises on every try: fails after max_attempts
    wait_for(lambda: browser.execute_script(f"return {broken}.querySelector('.status').textContent")
             .startswith("failed"), 60, "the video to fail")  # fmt: skip
    why = browser.execute_script(f"const w = {broken}.querySelector('.why'); return [w.textContent, w.offsetHeight]")
    assert "failed on 3 GPU group(s)" in why[0] and "the engine broke at its first step" in why[0], why
    assert why[1] > 0  # shown, not only in the DOM
