"""The search page in a real headless browser: Debian's chromium driven by Playwright (never
`playwright install`: its own browser download is not reachable). A real server over a real store
whose class and file names are hostile: markup, an event handler, control bytes, a very long name."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from m3d.pipeline import SyncOptions, sync
from m3d.store import open_session
from serving import CONTROL_CLASS, HOSTILE_CLASS, HOSTILE_FILE, LONG_FILE, dev_tree, start_server

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "page-token-0123456789"
ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-gpu", "--disable-dev-shm-usage",
        "--no-first-run", "--disable-extensions"]


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install 'm3d[dev]' (playwright)")
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; make test does it)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def site(lpsb, tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    tree = dev_tree(lpsb, root / "meshes", {"Airplane": 3, "Chair": 3, "Cup": 3, "Table": 3, "Glasses": 3})
    with open_session(root / "store") as session:
        sync(session, tree, SyncOptions(encoders=("hog",), pools=("mean",), workers=0))
    server = start_server(root / "store", token=TOKEN)
    yield server, tree
    server.stop()


def open_page(browser, server, width: int, height: int):
    """bypass_csp: the test's own wait expressions need eval, which the page's policy forbids; it also
    makes the hostile-name test prove the escaping itself, with no policy to stop a script."""
    page = browser.new_page(viewport={"width": width, "height": height}, bypass_csp=True)
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
    page.goto(f"{server.url}/#token={TOKEN}")  # the fragment never reaches the server or its logs
    page.wait_for_selector(".chip[data-class='Chair']")
    return page, problems


def search_with(page, mesh: Path) -> None:
    page.set_input_files("#file", str(mesh))
    page.wait_for_function("document.querySelectorAll('.card').length > 0 && "
                           "[...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth > 0)",
                           timeout=120_000)


def test_upload_filter_open_and_more_like_this(browser, site, tmp_path) -> None:
    server, tree = site
    page, problems = open_page(browser, server, 1280, 900)
    chair = sorted((tree / "Chair").rglob("*.off"))[0]
    search_with(page, chair)
    cards = page.locator(".card")
    assert cards.count() == 17  # every object: k is larger than the store
    assert cards.first.locator(".path").text_content() == f"Chair/train/{chair.name}"
    assert float(cards.first.locator(".score").text_content()) == pytest.approx(1.0, abs=1e-3)
    assert page.locator("#query-preview img").get_attribute("src").startswith("data:image/png")
    page.screenshot(path=str(tmp_path / "desktop.png"))

    page.click(".chip[data-class='Table']")
    page.wait_for_function("[...document.querySelectorAll('.card .cls')].every(c => c.textContent === 'Table') && "
                           "document.querySelectorAll('.card').length === 3")
    assert page.locator(".chip.on").get_attribute("data-class") == "Table"

    page.locator(".card").first.click()
    page.wait_for_function("document.querySelectorAll('#views img').length === 8 && "
                           "[...document.querySelectorAll('#views img')].every(i => i.complete && i.naturalWidth > 0)",
                           timeout=120_000)
    assert "Table/" in page.locator("#detail-title").text_content()
    assert page.locator("#payload th", has_text="content_hash").count() == 1
    page.screenshot(path=str(tmp_path / "detail.png"))
    page.click("#more")
    page.wait_for_function("document.querySelector('#detail').hidden && "
                           "document.querySelector('#status').textContent.startsWith('2 results for more like')")
    assert not problems, problems


def test_hostile_names_are_shown_as_text(browser, site) -> None:
    """Markup in class and file names stays text: no element is made from it, no handler runs."""
    server, tree = site
    page, problems = open_page(browser, server, 1280, 900)
    hostile = next((tree / HOSTILE_CLASS).iterdir())
    search_with(page, hostile)
    assert page.evaluate("window.pwned") is None
    assert page.locator(".card img.thumb").count() == page.locator(".card").count()  # no extra <img>
    assert page.locator("script").count() == 1  # the page's own
    texts = page.locator(".card").all_text_contents()
    assert any(HOSTILE_FILE in t for t in texts) and any(HOSTILE_CLASS in t for t in texts)
    chip = page.evaluate("(name) => [...document.querySelectorAll('.chip')].filter(c => c.dataset.class === name)"
                         ".map(c => c.textContent)", CONTROL_CLASS)
    assert chip == ["bell\\x07\\x1b[31mred1"]  # the raw name filters; the escapes are shown, not sent on
    assert any(LONG_FILE[:50] in t for t in texts)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 1280  # a 200-character name is cut, it does not widen the page
    page.locator(".card", has_text=HOSTILE_FILE).click()
    page.wait_for_selector("#detail:not([hidden])")
    assert HOSTILE_FILE in page.locator("#detail-title").text_content()
    assert page.evaluate("window.pwned") is None
    assert not problems, problems


def test_phone_width(browser, site, tmp_path) -> None:
    server, tree = site
    page, problems = open_page(browser, server, 390, 844)
    search_with(page, sorted((tree / "Airplane").rglob("*.off"))[0])
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing runs off the side
    boxes = [page.locator(".card").nth(i).bounding_box() for i in range(2)]
    assert boxes[0]["y"] == boxes[1]["y"] and boxes[1]["x"] + boxes[1]["width"] <= 390  # two cards a row
    page.screenshot(path=str(tmp_path / "phone.png"))
    page.locator(".card").first.click()
    page.wait_for_selector("#views img")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert not problems, problems


def test_the_page_asks_for_the_token(browser, site) -> None:
    server, _ = site
    page = browser.new_page(bypass_csp=True)
    page.goto(server.url + "/")
    page.wait_for_selector("#token-form:not([hidden])")
    page.fill("#token", TOKEN)
    page.click("#token-form button")
    page.wait_for_selector(".chip[data-class='Chair']")
    assert page.locator("#token-form").is_hidden()


def test_screenshots_for_the_docs(browser, site, tmp_path) -> None:
    """Not an assertion of looks: writes the pictures that docs/serve.md shows when M3D_SCREENSHOTS names
    a folder (people look at them); otherwise checks only that they can be taken."""
    import os

    server, tree = site
    out = Path(os.environ.get("M3D_SCREENSHOTS") or tmp_path)
    page, _ = open_page(browser, server, 1100, 760)
    search_with(page, sorted((tree / "Chair").rglob("*.off"))[0])
    page.screenshot(path=str(out / "serve-desktop.png"))
    phone, _ = open_page(browser, server, 390, 844)
    search_with(phone, sorted((tree / "Airplane").rglob("*.off"))[0])
    phone.screenshot(path=str(out / "serve-phone.png"))
    assert (out / "serve-desktop.png").stat().st_size > 10_000
    shutil.rmtree(tmp_path, ignore_errors=True)
