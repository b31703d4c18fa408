"""The page at GET /, driven in Debian's headless Chromium: pick or drop an image, see the top 5 with
bars and the server's timings, and the models table with cost and live p50, at 375 and 1280 px.

Playwright's Python API drives the system ``chromium`` (``benchmarks/install-chromium.sh``, run by
``make test-tools``); its own browser download is never used. Screenshots of the page after a
classification go to ``tests/output/``.
"""

from __future__ import annotations

import base64
import os
import re
import shutil

import httpx
import pytest

from contract.manifest import Manifest
from contract.photos import encode, make_photo, photo_jpeg
from service.app import create_app
from tests.conftest import REPO
from tests.live_server import LiveServer, serving_settings, wait_ready

OUTPUT = REPO / "tests" / "output"
INSTALL_HINT = "run benchmarks/install-chromium.sh (make test installs it)"
WIDTHS = (375, 1280)
JPEG = photo_jpeg(500, 375, seed=4)


def _chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail(f"chromium not found: {INSTALL_HINT}")
    return path


@pytest.fixture(scope="module")
def server(fake_repo):
    with LiveServer(create_app(serving_settings(fake_repo))) as live:
        wait_ready(live.url)
        live.repository = fake_repo
        yield live


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"playwright is not installed: {INSTALL_HINT}")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=_chromium(), args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        )
        yield chromium
        chromium.close()


class PageSession:
    """A page of the app in a fresh browser context, recording every request and script error."""

    def __init__(self, browser, server, width: int) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": 900})
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.goto(f"{server.url}/")
        # Both models listed as ready before anything is tried.
        self.page.wait_for_function(
            "(rows => rows.length === 2 && rows.every(r => r.cells[1].textContent === 'ready'))"
            "([...document.querySelectorAll('#models tbody tr')])"
        )

    def predictions(self) -> list[tuple[int, str, str]]:
        self.page.wait_for_selector("#predictions li")
        return self.page.eval_on_selector_all(
            "#predictions li",
            "items => items.map(li => [Number(li.dataset.classId),"
            " li.querySelector('.pred-label').textContent, li.querySelector('.bar span').style.width])",
        )

    def close(self) -> None:
        self.context.close()


def _api_top5(url: str, model: str, data: bytes, content_type: str) -> list[dict]:
    response = httpx.post(
        f"{url}/classify?model={model}&top_k=5", content=data, headers={"Content-Type": content_type}
    )
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


@pytest.mark.parametrize("width", WIDTHS)
def test_picking_an_image_shows_the_top5_timings_and_live_latency(browser, server, width, tmp_path):
    session = PageSession(browser, server, width)
    page = session.page
    try:
        page.select_option("#model", "shufflenet_v2")
        image = tmp_path / "cat.jpg"
        image.write_bytes(JPEG)
        page.set_input_files("#file", str(image))  # choosing a file classifies it

        shown = session.predictions()
        expected = _api_top5(server.url, "shufflenet_v2", JPEG, "image/jpeg")
        assert [(cid, label) for cid, label, _ in shown] == [(p["class_id"], p["label"]) for p in expected]
        widths = [float(w.rstrip("%")) for _, _, w in shown]
        assert (
            widths[0] == 100 and all(0 < w <= 100 for w in widths) and widths == sorted(widths, reverse=True)
        )
        assert page.text_content("#result-meta") == "shufflenet_v2 version 1 on onnxruntime-cpu"
        stages = page.eval_on_selector_all(
            "#timings div", "ds => ds.map(d => [d.dataset.stage, d.textContent])"
        )
        assert [name for name, _ in stages] == ["decode", "queue", "inference", "server total", "round trip"]
        assert all(re.search(r"\d+\.\d ms$", text) for _, text in stages), stages

        # The table: cost from the manifests, and a live p50 for the model just used.
        row = page.locator("#models tbody tr[data-model='shufflenet_v2'] td")
        cells = row.all_text_contents()
        assert cells[:4] == ["shufflenet_v2", "ready", "1", "onnxruntime-cpu"]
        manifest = Manifest.load(server.repository / "shufflenet_v2")  # the tiny test model
        assert cells[4] == f"{manifest.flops / 1e6:.2f}" and cells[5] == f"{manifest.params / 1e6:.2f}"
        assert cells[6] == f"{manifest.memory_access_cost / 1e6:.2f}" and cells[7] == "random"
        page.wait_for_function(
            "/\\d ms$/.test(document.querySelector(\"tr[data-model='shufflenet_v2'] .p50\").textContent)"
        )

        # Nothing overflows sideways, even at phone width, and the table needs no sideways scrolling.
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        assert page.evaluate("(w => w.scrollWidth <= w.clientWidth)(document.querySelector('.table-wrap'))")
        assert page.is_visible("#predictions li:nth-child(5)")

        OUTPUT.mkdir(exist_ok=True)
        path = OUTPUT / f"page-{width}px.png"
        page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 10_000

        # Self-contained: every request went to the server itself (or is the preview's local blob).
        own = (server.url + "/", f"blob:{server.url}/")
        assert session.requests and [u for u in session.requests if not u.startswith(own)] == []
        assert session.errors == []
    finally:
        session.close()


def test_dropping_an_image_and_switching_models(browser, server):
    session = PageSession(browser, server, 1280)
    page = session.page
    try:
        png = encode(make_photo(300, 200, seed=9), "PNG")
        page.evaluate(
            """(b64) => {
                const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                const transfer = new DataTransfer();
                transfer.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
                document.getElementById('drop').dispatchEvent(
                    new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));
            }""",
            base64.b64encode(png).decode(),
        )
        first = page.locator("#models tbody tr").first.get_attribute("data-model")
        expected = _api_top5(server.url, first, png, "image/png")
        page.wait_for_function(
            f"document.querySelector('#predictions li')?.dataset.classId === '{expected[0]['class_id']}'"
        )
        assert [cid for cid, _, _ in session.predictions()] == [p["class_id"] for p in expected]
        assert "dropped.png" in page.text_content("#drop-text")

        # Another model re-classifies the same image.
        other = "mobilenet_v2" if first == "shufflenet_v2" else "shufflenet_v2"
        page.select_option("#model", other)
        page.wait_for_function(f"document.querySelector('#result-meta').textContent.startsWith('{other}')")
        expected = _api_top5(server.url, other, png, "image/png")
        assert [cid for cid, _, _ in session.predictions()] == [p["class_id"] for p in expected]
        assert session.errors == []
    finally:
        session.close()


def test_a_file_that_is_not_an_image_shows_the_servers_error(browser, server, tmp_path):
    session = PageSession(browser, server, 375)
    page = session.page
    try:
        notes = tmp_path / "notes.jpg"
        notes.write_bytes(b"this is not a JPEG at all" * 10)
        page.set_input_files("#file", str(notes))
        page.wait_for_selector("#status.error")
        assert page.text_content("#status").startswith("400 invalid_image:")
        assert page.locator("#predictions li").count() == 0
    finally:
        session.close()


def test_with_a_bearer_token_configured_the_page_asks_for_it_and_then_works(browser, fake_repo, tmp_path):
    token = "page-test-token-0123456789abcdef"
    settings = serving_settings(fake_repo, auth_token=token)
    with LiveServer(create_app(settings)) as live:
        wait_ready(live.url)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        sent: list[str | None] = []
        page.on("request", lambda request: sent.append(request.headers.get("authorization")))
        try:
            page.goto(f"{live.url}/")
            # The page itself is open; its first API call is refused, and it asks for the token.
            page.wait_for_selector("#auth:not([hidden])")
            assert "needs a bearer token" in page.text_content("#auth-text")
            assert page.locator("#models tbody tr").count() == 0

            page.fill("#token", "not-the-token-at-all-0123456789")
            page.click("#use-token")
            page.wait_for_function("document.querySelector('#auth-text').textContent.includes('refused')")
            assert page.locator("#models tbody tr").count() == 0

            page.fill("#token", token)
            page.click("#use-token")
            page.wait_for_function(
                "(rows => rows.length === 2 && rows.every(r => r.cells[1].textContent === 'ready'))"
                "([...document.querySelectorAll('#models tbody tr')])"
            )
            assert page.is_hidden("#auth")
            photo = tmp_path / "photo.jpg"
            photo.write_bytes(JPEG)
            page.set_input_files("#file", str(photo))
            page.wait_for_selector("#predictions li")
            assert page.locator("#predictions li").count() == 5
            assert f"Bearer {token}" in sent  # the API calls carried it
            # Kept for the tab, not in storage that outlives it.
            assert page.evaluate("Object.keys(localStorage).length") == 0
        finally:
            context.close()
