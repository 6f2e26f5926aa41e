"""The web page at `/` in a real headless browser: Debian's chromium driven by Playwright."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.procs import ROOT, Stack, free_port, start_api

pytestmark = pytest.mark.integration
CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT = "/tmp/imagegen-web.png"
ONE_IMAGE_SHOWN = (
    "(() => { const i = document.querySelector('#gallery img'); return i && i.complete && i.naturalWidth > 0; })()"
)


def _chromium() -> str | None:
    """Debian's chromium, installed on the spot when missing and we are root (as `make test` does)."""
    if not os.path.exists(CHROMIUM) and hasattr(os, "geteuid") and os.geteuid() == 0:
        subprocess.run([str(ROOT / "scripts" / "ensure-browser.sh")], check=False, timeout=900)
    return CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright missing: pip install -e '.[dev]'")
    exe = _chromium()
    if exe is None:
        pytest.skip("no chromium and it cannot be installed here (not root, or apt failed): apt-get install chromium")
    with sync_api.sync_playwright() as p:
        # Never `playwright install`: the distribution's chromium is the browser.
        b = p.chromium.launch(executable_path=exe, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, stack: Stack) -> Iterator[Any]:
    # Playwright's waits evaluate JavaScript, which the page's CSP forbids: bypassed here, kept in
    # `test_the_page_works_under_its_content_security_policy`.
    context = browser.new_context(viewport={"width": 1100, "height": 760}, base_url=stack.base_url, bypass_csp=True)
    pg = context.new_page()
    pg.errors = []  # uncaught exceptions in the page's JavaScript
    pg.on("pageerror", lambda exc: pg.errors.append(str(exc)))
    yield pg
    context.close()


def fill(page: Any, **fields: object) -> None:
    for name, value in fields.items():
        page.fill(f"#{name}", str(value))


def test_generate_shows_images_with_their_seeds(page: Any) -> None:
    streams: list[str] = []
    page.on("request", lambda req: streams.append(req.url) if req.url.endswith("/events") else None)
    page.goto("/")
    page.wait_for_function("document.querySelector('#server').textContent.startsWith('ready')", timeout=30_000)
    fill(page, prompt="a red circle on a blue background", num_images=2, seed=7, num_inference_steps=4)
    fill(page, width=32, height=32)
    page.click("#generate")
    page.wait_for_function(
        """() => {
            const imgs = [...document.querySelectorAll('#gallery img')];
            return imgs.length === 2 && imgs.every((i) => i.complete && i.naturalWidth > 0);
        }""",
        timeout=90_000,
    )
    widths = page.eval_on_selector_all("#gallery img", "imgs => imgs.map((i) => i.naturalWidth)")
    assert widths == [32, 32]
    assert page.locator("#gallery .seed").all_inner_texts() == ["seed 7", "seed 8"]
    assert page.inner_text("#status").startswith("succeeded")
    assert page.is_enabled("#generate") and not page.is_enabled("#cancel")
    assert streams, "the page should follow the job over /jobs/{id}/events"
    page.screenshot(path=SCREENSHOT, full_page=True)
    assert page.errors == []


def test_the_page_works_under_its_content_security_policy(browser: Any, stack: Stack) -> None:
    """No CSP bypass: the page's own script, styles, event stream and images all load, and the
    browser reports nothing blocked (waits by selector, which need no JavaScript evaluation)."""
    context = browser.new_context(viewport={"width": 1100, "height": 760}, base_url=stack.base_url)
    try:
        page = context.new_page()
        blocked: list[str] = []
        page.on("console", lambda msg: blocked.append(msg.text) if "Content Security Policy" in msg.text else None)
        page.on("pageerror", lambda exc: blocked.append(str(exc)))
        headers = page.goto("/").headers
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
        page.wait_for_selector("#server:text-matches('^ready')", timeout=30_000)
        fill(page, prompt="under the policy", seed=3, num_inference_steps=3, width=32, height=32)
        page.click("#generate")
        page.wait_for_selector("#gallery img", timeout=90_000)
        page.wait_for_selector("#status:text-matches('^succeeded')", timeout=90_000)
        assert page.locator("#gallery .seed").all_inner_texts() == ["seed 3"]
        assert page.locator("#gallery img").get_attribute("src")
        assert blocked == []
    finally:
        context.close()


def test_cancel_a_running_job(page: Any) -> None:
    page.goto("/")
    fill(page, prompt="this one gets canceled", num_inference_steps=150, width=64, height=64)
    page.click("#generate")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('running')", timeout=60_000)
    page.click("#cancel")
    page.wait_for_function("document.querySelector('#status').dataset.status === 'canceled'", timeout=60_000)
    # The status comes straight from the event; the reason follows once the page has fetched the job.
    page.wait_for_function("document.querySelector('#error').textContent.includes('cancel')", timeout=30_000)
    assert page.locator("#gallery img").count() == 0
    assert page.is_enabled("#generate")
    assert page.errors == []


def test_server_errors_are_shown(page: Any) -> None:
    page.goto("/")
    fill(page, prompt="too big", width=4096, height=32)
    page.click("#generate")
    page.wait_for_function("!document.querySelector('#error').hidden", timeout=10_000)
    assert "width" in page.inner_text("#error")
    assert page.is_enabled("#generate")


def test_polls_when_the_server_has_no_event_stream(page: Any) -> None:
    # An older server (or a proxy that drops SSE) answers 404 for /events: the page polls instead.
    page.route("**/events", lambda route: route.fulfill(status=404, json={"error": {"code": "not_found"}}))
    page.goto("/")
    fill(page, prompt="polled", seed=11, num_inference_steps=3, width=32, height=32)
    page.click("#generate")
    page.wait_for_function(
        ONE_IMAGE_SHOWN,
        timeout=90_000,
    )
    assert page.locator("#gallery .seed").all_inner_texts() == ["seed 11"]
    assert page.errors == []


def _polled(page: Any, refusals: int, status: int, headers: dict[str, str], message: str) -> list[float]:
    """Make the page poll (no event stream) and answer its first `refusals` polls of the job with
    `status`; returns the times (s) at which the page asked for the job."""
    import time

    asked: list[float] = []

    def job(route: Any) -> None:
        if route.request.method != "GET":
            return route.continue_()
        asked.append(time.monotonic())
        if len(asked) <= refusals:
            return route.fulfill(status=status, headers=headers, json={"error": {"code": "x", "message": message}})
        return route.continue_()

    page.route("**/events", lambda route: route.fulfill(status=404, json={"error": {"code": "not_found"}}))
    page.route("**/jobs/*", job)
    return asked


def test_polling_waits_out_a_429_and_says_so(page: Any) -> None:
    """A rate-limited poll (or a 503) is tried again after the server's Retry-After, with a message;
    the page went on polling every 400 ms, silently, and so kept its key over the limit."""
    asked = _polled(page, 2, 429, {"Retry-After": "2"}, "too many requests for this key")
    page.goto("/")
    fill(page, prompt="rate limited", seed=21, num_inference_steps=3, width=32, height=32)
    page.click("#generate")
    page.wait_for_function("document.querySelector('#error').textContent.includes('too many')", timeout=10_000)
    assert "again in 2 s" in page.inner_text("#error")
    page.wait_for_function(ONE_IMAGE_SHOWN, timeout=90_000)
    assert asked[1] - asked[0] >= 1.9 and asked[2] - asked[1] >= 1.9  # Retry-After honoured, twice
    assert page.locator("#gallery .seed").all_inner_texts() == ["seed 21"]
    assert page.is_hidden("#error")  # the message goes once the job is read again
    assert page.errors == []


def test_a_key_refused_while_polling_stops_following(page: Any) -> None:
    asked = _polled(page, 100, 401, {}, "invalid API key")
    page.goto("/")
    fill(page, prompt="key revoked", num_inference_steps=3, width=32, height=32)
    page.click("#generate")
    page.wait_for_function("document.querySelector('#error').textContent.includes('goes on')", timeout=10_000)
    assert "API key" in page.inner_text("#error")
    assert page.is_enabled("#generate") and not page.is_enabled("#cancel")
    page.wait_for_timeout(1500)
    assert len(asked) == 1  # no more polls
    assert page.errors == []


def test_with_api_keys_the_page_sends_the_key(browser: Any, stack: Stack, tmp_path: Any) -> None:
    # A second API process on the stack's Redis that requires keys; the stack's worker serves it.
    key = "web-page-key-0123456789abcdef"
    api, base = start_api(stack.env | {"IMAGEGEN_API_KEYS": key}, tmp_path / "api.log")
    context = browser.new_context(viewport={"width": 1100, "height": 760}, base_url=base, bypass_csp=True)
    try:
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto("/")
        fill(page, prompt="needs a key", seed=5, num_inference_steps=3, width=32, height=32)
        page.click("#generate")
        page.wait_for_function("!document.querySelector('#error').hidden", timeout=10_000)
        assert "API key" in page.inner_text("#error")

        fill(page, api_key=key)
        page.dispatch_event("#api_key", "change")
        polls: list[str] = []
        page.on("request", lambda r: polls.append(r.url) if r.method == "GET" and "/jobs/" in r.url else None)
        page.click("#generate")
        page.wait_for_function(
            ONE_IMAGE_SHOWN,
            timeout=90_000,
        )
        assert page.locator("#gallery .seed").all_inner_texts() == ["seed 5"]
        # The image comes from its signed link, relative to the page (no key, so no blob: URL that
        # would never be revoked); the job's id is no link, as a link opens without the key (401).
        src = page.get_attribute("#gallery img", "src")
        assert re.fullmatch(r"jobs/[0-9a-f-]+/images/0\?exp=\d+&sig=[\w-]+", src), src
        assert page.get_attribute("#gallery a[download]", "href") == src
        assert page.get_attribute("#job-link", "href") is None and page.inner_text("#job-link")
        # Followed by long-polls (a key's rate limit counts each request): 400 ms polls before.
        job_reads = [u for u in polls if "/images/" not in u]
        assert job_reads and all(u.endswith("?wait=5") for u in job_reads), polls
        # Kept in this browser: a reload still has it.
        page.reload()
        assert page.input_value("#api_key") == key
        assert errors == []
    finally:
        context.close()
        api.stop()


def test_a_poll_answered_after_the_job_ended_changes_nothing(page: Any) -> None:
    """Cancel settles the job while a poll is still out: when that poll's answer (here a 429) comes
    back, the page used to show "checking the job again in 1 s" under a job it had already ended."""
    import time

    held: list[Any] = []

    def job(route: Any) -> None:
        if route.request.method == "DELETE":  # answered as for a job canceled while queued
            job_id = route.request.url.rsplit("/", 1)[1]
            error = {"code": "canceled", "message": "canceled by request"}
            return route.fulfill(status=200, json={"id": job_id, "status": "canceled", "error": error})
        held.append(route)  # the poll stays out until the test answers it

    page.route("**/events", lambda route: route.fulfill(status=404, json={"error": {"code": "not_found"}}))
    page.route("**/jobs/*", job)
    page.goto("/")
    fill(page, prompt="canceled mid-poll", num_inference_steps=3, width=32, height=32)
    page.click("#generate")
    deadline = time.monotonic() + 10
    while not held and time.monotonic() < deadline:
        page.wait_for_timeout(50)
    assert len(held) == 1
    page.click("#cancel")
    page.wait_for_function("document.querySelector('#error').textContent === 'canceled by request'", timeout=10_000)
    held[0].fulfill(status=429, headers={"Retry-After": "1"}, json={"error": {"code": "x", "message": "slow down"}})
    page.wait_for_timeout(1500)
    assert page.inner_text("#error") == "canceled by request"
    assert page.get_attribute("#status", "data-status") == "canceled"
    assert len(held) == 1 and page.is_enabled("#generate")
    assert page.errors == []


def test_images_load_when_the_page_is_opened_at_another_address_than_the_public_url(
    browser: Any, stack: Stack, tmp_path: Any
) -> None:
    """The server builds image links under IMAGEGEN_PUBLIC_URL (here http://localhost:PORT); a page
    opened at http://127.0.0.1:PORT loaded them as they were, and its CSP ('self') blocked them."""
    port = free_port()
    api, base = start_api(stack.env | {"IMAGEGEN_PUBLIC_URL": f"http://localhost:{port}"}, tmp_path / "api.log", port)
    context = browser.new_context(viewport={"width": 1100, "height": 760}, base_url=base)  # the CSP applies
    try:
        page = context.new_page()
        blocked: list[str] = []
        page.on("console", lambda msg: blocked.append(msg.text) if "Content Security Policy" in msg.text else None)
        page.on("pageerror", lambda exc: blocked.append(str(exc)))
        page.goto("/")
        fill(page, prompt="another address", seed=9, num_inference_steps=3, width=32, height=32)
        with page.expect_response(lambda r: "/images/" in r.url, timeout=90_000) as image:
            page.click("#generate")
        assert image.value.status == 200 and image.value.url.startswith(base + "/jobs/")
        page.wait_for_selector("#status:text-matches('^succeeded')", timeout=30_000)
        assert page.get_attribute("#gallery img", "src").startswith("jobs/")
        assert blocked == []
    finally:
        context.close()
        api.stop()


def test_enter_that_ends_an_ime_composition_does_not_submit(page: Any) -> None:
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    page.goto("/")
    fill(page, prompt="日本語", num_inference_steps=2, width=32, height=32)
    page.dispatch_event("#prompt", "keydown", {"key": "Enter", "isComposing": True, "bubbles": True})
    page.dispatch_event("#prompt", "keydown", {"key": "Enter", "keyCode": 229, "bubbles": True})
    page.wait_for_timeout(500)
    assert posts == [] and page.is_hidden("#job")
    page.press("#prompt", "Enter")  # a plain Enter still submits
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('succeeded')", timeout=90_000)
    assert len(posts) == 1
    assert page.errors == []


def test_a_double_submit_sends_one_job(page: Any) -> None:
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    page.goto("/")
    fill(page, prompt="submitted twice", num_inference_steps=2, width=32, height=32)
    page.evaluate("() => { const f = document.getElementById('form'); f.requestSubmit(); f.requestSubmit(); }")
    page.wait_for_function(ONE_IMAGE_SHOWN, timeout=90_000)
    page.wait_for_timeout(300)
    assert len(posts) == 1, posts
    assert page.locator("#gallery img").count() == 1
    assert page.errors == []


def test_only_state_changes_are_announced(page: Any) -> None:
    """The live region is the status line, whose text changes with the job's state; the step count
    and the bar follow every progress event unannounced. The whole job section was live, and its
    text changed on every step."""
    page.goto("/")
    assert page.get_attribute("#job", "aria-live") is None
    assert page.get_attribute("#status", "role") == "status"
    assert page.get_attribute("#error", "role") == "alert"
    bar = page.locator("[role=progressbar]")
    assert bar.get_attribute("aria-label") and bar.get_attribute("aria-valuenow") == "0"
    page.evaluate(
        """() => {
            window.said = [];
            window.steps = new Set();
            const status = document.getElementById('status');
            const steps = document.getElementById('steps');
            new MutationObserver(() => window.said.push(status.textContent))
                .observe(status, {childList: true, characterData: true, subtree: true});
            new MutationObserver(() => window.steps.add(steps.textContent))
                .observe(steps, {childList: true, characterData: true, subtree: true});
        }"""
    )
    fill(page, prompt="announced", num_inference_steps=12, width=32, height=32)
    page.click("#generate")
    page.wait_for_function(ONE_IMAGE_SHOWN, timeout=90_000)
    said = page.evaluate("window.said")
    assert said[0] == "queued" and said[-1].startswith("succeeded in"), said
    assert len(said) <= 3 and not any("step" in text for text in said), said
    assert len(page.evaluate("[...window.steps]")) > 2  # the progress was shown all the same
    assert page.errors == []
