"""The playground page of `azgpt serve` in a real browser: headless Chromium (the Debian
package, never a downloaded browser) driven by Playwright. Type a prompt, watch text stream in,
press stop, change the temperature; a screenshot is kept in the test's temporary folder."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
requests = pytest.importorskip("requests")
sync_api = pytest.importorskip("playwright.sync_api")

from test_serve import NAME, PROMPT, ckpt, one_thread, running_server  # noqa: E402,F401

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs /usr/bin/chromium (`make test` installs it with apt-get)"
)


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):  # noqa: F811
    log = tmp_path_factory.mktemp("serve-log") / "serve-browser.log"
    # 30 ms per decoding step: a long generation streams for many seconds, so the test can
    # watch it grow and stop it.
    env = {"AZGPT_FAULT_SLOW_STEP": "0.03"}
    with running_server(ckpt, log, "--name", NAME, "--max-tokens", "2000", env=env) as base:
        yield base


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            yield browser.new_page(viewport={"width": 1200, "height": 800})
        finally:
            browser.close()


def set_value(page, selector: str, value) -> None:
    # range inputs cannot be typed into: set the value and fire the event a user's drag fires
    page.eval_on_selector(
        selector,
        "(el, v) => { el.value = v; el.dispatchEvent(new Event('input', {bubbles: true})); }",
        str(value),
    )


def wait_until(cond, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def generated(page) -> str:
    return page.eval_on_selector("#generated", "el => el.textContent")


def test_playground_streams_stops_and_uses_the_controls(server, page, tmp_path):
    expect = sync_api.expect
    sent: list[dict] = []
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    page.on(
        "request",
        lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/api/generate") else None,
    )
    page.goto(server + "/")
    expect(page.locator("h1")).to_contain_text("sınaq meydançası")
    expect(page.locator("#model")).to_have_text(NAME)
    assert page.locator("#send").inner_text() == "Göndər"
    assert page.locator("#stop").inner_text() == "Dayandır"

    # Typing shows how the prompt splits into tokens.
    page.locator("#prompt").press_sequentially(PROMPT, delay=10)
    tokens = requests.post(f"{server}/tokenize", json={"text": PROMPT}, timeout=10).json()
    expect(page.locator("#token_count")).to_have_text(str(tokens["count"]))
    expect(page.locator("#tokens span")).to_have_count(tokens["count"])

    # A long generation: text streams in, then the stop button ends it. The tiny test model
    # often samples <|endoftext|> within a few dozen tokens, which would end the stream before
    # the stop button is tried: the request the page sends gets `ignore_eos` (azgpt's extension)
    # on its way to the server, and the page itself is unchanged.
    def without_eos(route, request):
        body = json.loads(request.post_data)
        body["options"]["ignore_eos"] = True
        route.continue_(post_data=json.dumps(body))

    page.route("**/api/generate", without_eos)
    set_value(page, "#temperature", 1.3)
    expect(page.locator("#temperature_v")).to_have_text("1.3")
    page.fill("#max_tokens", "1500")
    page.fill("#seed", "7")
    page.click("#send")
    expect(page.locator("#status")).to_have_text("Yaradılır…")
    wait_until(lambda: len(generated(page)) > 0, "the first text")
    n = len(generated(page))
    wait_until(lambda: len(generated(page)) > n + 5, "more text")  # streamed, not all at the end
    assert page.locator("#stop").is_enabled() and page.locator("#send").is_disabled()
    page.click("#stop")
    expect(page.locator("#status")).to_have_text("Dayandırıldı")
    expect(page.locator("#send")).to_be_enabled()
    stopped = generated(page)
    assert sent[-1]["options"]["temperature"] == 1.3 and sent[-1]["options"]["num_predict"] == 1500
    assert sent[-1]["stream"] is True and sent[-1]["prompt"] == PROMPT
    # The server dropped the generation when the page aborted its fetch.
    wait_until(
        lambda: requests.get(f"{server}/health", timeout=10).json()["active"] == 0,
        "the stopped generation to leave its slot",
        timeout=30,
    )
    assert generated(page) == stopped
    page.screenshot(path=str(tmp_path / "playground-stopped.png"), full_page=True)

    page.unroute("**/api/generate")

    # Temperature 0 (greedy): the page shows exactly what the API returns.
    set_value(page, "#temperature", 0)
    page.fill("#max_tokens", "24")
    page.click("#send")
    expect(page.locator("#status")).to_contain_text("Bitdi", timeout=60_000)
    assert sent[-1]["options"]["temperature"] == 0
    body = {"prompt": PROMPT, "stream": False, "options": {"temperature": 0, "num_predict": 24}}
    want = requests.post(f"{server}/api/generate", json=body, timeout=60).json()
    assert generated(page) == want["response"]
    assert page.locator("#count").inner_text() == str(want["eval_count"])
    assert float(page.locator("#tps").inner_text()) > 0

    shot = tmp_path / "playground.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")  # pytest keeps the last runs' temporary folders

    # Offline: everything the page loaded came from this server.
    assert urls and all(u.startswith(server) for u in urls), urls


def test_playground_chat_mode(server, page):
    expect = sync_api.expect
    page.goto(server + "/")
    page.select_option("#mode", "chat")
    set_value(page, "#temperature", 0)
    page.fill("#max_tokens", "12")
    page.fill("#prompt", "Salam! Necəsən?")
    with page.expect_request(lambda r: r.url.endswith("/api/chat")) as req:
        page.click("#send")
    expect(page.locator("#status")).to_contain_text("Bitdi", timeout=60_000)
    body = json.loads(req.value.post_data)
    assert body["messages"] == [{"role": "user", "content": "Salam! Necəsən?"}]
    turns = page.locator("#output .turn")
    expect(turns).to_have_count(2)
    assert turns.nth(0).inner_text().startswith("Siz:")
    assert turns.nth(1).inner_text().startswith("Model:")
