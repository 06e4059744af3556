"""The chat page at / in a real headless Chromium (the Debian package; `make test` installs it when missing):
two turns, text streaming in, the stop button."""

from __future__ import annotations

import shutil
import time


from scratchlm.serve.api import create_app
from scratchlm.serve.batching import Engine
from scratchlm.serve.text import ChatFormat
from serve_helpers import running_server, trained_model  # tests/ is on sys.path (pytest rootdir)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def test_chat_page_two_turns_streaming_and_stop():
    from playwright.sync_api import sync_playwright
    assert shutil.which("chromium"), "no chromium: run `make test` (installs it) or apt-get install chromium"
    model, tok = trained_model()
    engine = Engine(model, tok, max_batch=2, max_queue=4)
    step = engine.step
    engine.step = lambda: time.sleep(0.015) or step()  # slow enough to watch and to stop
    engine.start()
    fmt = ChatFormat.for_checkpoint(tok, {})
    try:
        with running_server(create_app(engine, fmt, "tiny")) as url, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').textContent.startsWith('tiny')")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "30")
            # turn 1: runs to the end
            page.fill("#input", "Once upon")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.assistant')[0]?.textContent.length > 0")
            assert page.is_disabled("#send") and page.is_enabled("#stop")  # still streaming: text came early
            page.wait_for_function("!document.getElementById('send').disabled", timeout=20_000)
            first = page.locator(".assistant").nth(0).text_content()
            expected = _greedy(engine, fmt, [{"role": "user", "content": "Once upon"}], 30)
            assert first == expected and first
            # turn 2: the page sends the whole conversation; stop it mid-stream
            page.fill("#max_tokens", "110")
            page.fill("#input", "a cat said")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.assistant')[1]?.textContent.length > 3")
            page.click("#stop")
            page.wait_for_function("document.getElementById('status').textContent === 'stopped'")
            partial = page.locator(".assistant").nth(1).text_content()
            conversation = [{"role": "user", "content": "Once upon"}, {"role": "assistant", "content": first},
                            {"role": "user", "content": "a cat said"}]
            full = _greedy(engine, fmt, conversation, 110)
            assert full.startswith(partial) and len(partial) < len(full)
            assert page.locator(".user").count() == 2 and page.is_enabled("#send")
            t = time.time()
            while engine.stats()["running"]:  # the aborted request gave its slot back
                assert time.time() - t < 5
                time.sleep(0.05)
            browser.close()
    finally:
        engine.shutdown()


def _greedy(engine: Engine, fmt: ChatFormat, messages: list[dict], max_tokens: int) -> str:
    from scratchlm.serve.batching import Request
    ids, _ = fmt.prompt_ids(messages, engine.context - min(max_tokens, engine.context // 2))
    req = Request(ids, max_tokens, temperature=0, stop_strings=fmt.stop_strings, stop_tokens=fmt.stop_tokens)
    return "".join(e.text for e in engine.stream(req))
