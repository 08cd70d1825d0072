"""The arena in a real browser: headless Chromium (Debian's package) driven by Playwright.

At a laptop width (1440x900, and 1366x768 for the image size) it votes by click and by key, checks the images are shown at least
512 px tall, the model names appear only after the vote (under each image, until Next) and both
votes are stored. At a phone width (390x844) it checks the stacked layout keeps "Left" under the
left image, the pause mode's reveal, and the leaderboard's CSV download. Screenshots of each
layout go to the test's folder, and to $DIFFALIGN_SCREENSHOT_DIR when that is set.

Needs /usr/bin/chromium (``.ci/run`` installs it); off CI a machine without it skips this test,
on CI (CI=true) a missing browser fails it.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import time
from pathlib import Path

import pytest

from diffalign.apps.arena.sessions import COOKIE_NAME
from diffalign.apps.arena.store import VoteStore

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# What a headless, sandbox-free Chromium needs on a machine whose network is closed (no background fetches).
# Playwright adds --headless and a fresh temporary --user-data-dir for every launch.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
DESKTOP = {"width": 1440, "height": 900}
SMALL_LAPTOP = {"width": 1366, "height": 768}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} missing on CI: .ci/run must install Debian's chromium")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def screenshot(page, folder: Path, name: str) -> Path:
    """A full-page PNG in ``folder``, copied to $DIFFALIGN_SCREENSHOT_DIR when set (to look at the layouts)."""
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("DIFFALIGN_SCREENSHOT_DIR"):
        target = Path(os.environ["DIFFALIGN_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / path.name)
    return path


def box(page, selector: str) -> dict:
    found = page.locator(selector).bounding_box()
    assert found is not None, f"{selector} is not displayed"
    return found


def centre_x(b: dict) -> float:
    return b["x"] + b["width"] / 2


def drawn_height(page, selector: str) -> float:
    """The height the image's pixels take on screen (its box less any letterboxing of object-fit: contain)."""
    return page.locator(selector).evaluate(
        "img => Math.min(img.clientHeight, img.clientWidth * img.naturalHeight / img.naturalWidth)")


def test_desktop_layout_reveal_until_next_and_votes_by_click_and_key(browser, toy_arena_sources, start_arena,
                                                                      tmp_path):
    models = list(toy_arena_sources)
    database = tmp_path / "votes.sqlite"
    url, _ = start_arena(toy_arena_sources.values(), database, "--seed", "0")
    page = browser.new_page(viewport=DESKTOP)
    page.set_default_timeout(30_000)
    page.goto(url)

    prompt = page.locator("#arena-prompt")
    prompt.get_by_text("a ", exact=False).wait_for()
    page.locator("#arena-left img").wait_for()
    page.locator("#arena-right img").wait_for()
    first_prompt = prompt.inner_text().strip()
    assert not any(model in page.content() for model in models), "model names must not be in the page before a vote"
    left_image, right_image = box(page, "#arena-left img"), box(page, "#arena-right img")
    heights = [drawn_height(page, f"#arena-{side} img") for side in ("left", "right")]
    assert min(heights) >= 512, heights
    assert abs(left_image["y"] - right_image["y"]) < 1 and centre_x(left_image) < centre_x(right_image), "side by side"
    left_button, right_button = box(page, "#vote-left"), box(page, "#vote-right")
    assert left_button["y"] >= left_image["y"] + left_image["height"], "Left is under the left image"
    assert left_image["x"] <= centre_x(left_button) <= left_image["x"] + left_image["width"]
    assert right_image["x"] <= centre_x(right_button) <= right_image["x"] + right_image["width"]
    screenshot(page, tmp_path, "desktop-1440x900-before-vote")
    page.set_viewport_size(SMALL_LAPTOP)
    assert min(drawn_height(page, f"#arena-{side} img") for side in ("left", "right")) >= 512, "and on 1366x768"
    for button in ("#vote-left", "#vote-right"):
        found = box(page, button)
        assert found["y"] + found["height"] <= SMALL_LAPTOP["height"], f"{button} visible without scrolling: {found}"
    screenshot(page, tmp_path, "laptop-1366x768-before-vote")
    page.set_viewport_size(DESKTOP)

    page.locator("#vote-left").click()
    left_caption, right_caption = page.locator("#arena-left-caption"), page.locator("#arena-right-caption")
    left_caption.get_by_text("your pick", exact=False).wait_for()
    captions = left_caption.inner_text() + "\n" + right_caption.inner_text()
    assert sum(model in captions for model in models) == 2, captions
    assert "Left" in left_caption.inner_text() and "Right" in right_caption.inner_text()
    assert "your pick" not in right_caption.inner_text()
    assert "arena-picked" in (left_caption.get_attribute("class") or ""), "the picked side is highlighted"
    assert "arena-picked" not in (right_caption.get_attribute("class") or "")
    assert "You chose Left is better" in page.locator("#arena-reveal").inner_text()
    page.locator("#next-pair").wait_for()
    assert page.locator("#vote-left").is_disabled() and page.locator("#vote-right").is_disabled()
    assert "Votes this session: 1" in page.locator("#arena-progress").inner_text()
    screenshot(page, tmp_path, "desktop-1440x900-revealed")
    page.wait_for_timeout(1000)  # the reveal stays: no next pair until the voter asks for it
    assert prompt.inner_text().strip() == first_prompt and "your pick" in left_caption.inner_text()

    page.locator("body").click(position={"x": 5, "y": 5})  # focus the page, not a button or an input
    page.keyboard.press(" ")  # Space: the next pair, the reveal cleared with it
    page.locator("#next-pair").wait_for(state="hidden")
    assert page.locator("#vote-left").is_enabled() and left_caption.inner_text().strip() == ""
    assert not any(model in page.content() for model in models), "the new pair is blind again"
    second_prompt = prompt.inner_text().strip()

    page.keyboard.press("ArrowRight")
    right_caption.get_by_text("your pick", exact=False).wait_for()
    assert "You chose Right is better" in page.locator("#arena-reveal").inner_text()
    page.keyboard.press("2")  # a second vote key during the reveal does nothing: the buttons are disabled
    page.locator("#arena-progress").get_by_text("Votes this session: 2", exact=False).wait_for()
    page.keyboard.press("n")
    page.locator("#next-pair").wait_for(state="hidden")
    # The session is the server's: an HttpOnly cookie the page's scripts cannot read or set.
    [cookie] = [c for c in page.context.cookies() if c["name"] == COOKIE_NAME]
    assert cookie["httpOnly"] and COOKIE_NAME not in page.evaluate("document.cookie")
    page.close()

    store = VoteStore(database)
    votes = store.votes()
    rejections = store.rejection_counts()
    store.close()
    assert [v.choice for v in votes] == ["left", "right"]
    assert rejections == {}, "no vote was sent during a reveal"
    assert {v.session_id for v in votes} == {cookie["value"].partition(".")[0]}
    assert [v.prompt for v in votes] == [first_prompt, second_prompt]


def test_phone_layout_pause_reveal_and_leaderboard_csv(browser, toy_arena_sources, start_arena, tmp_path):
    models = list(toy_arena_sources)
    database = tmp_path / "votes.sqlite"
    url, _ = start_arena(toy_arena_sources.values(), database, "--seed", "1", "--reveal", "pause",
                         "--reveal-seconds", "3", "--bootstrap-rounds", "20")
    page = browser.new_page(viewport=PHONE, is_mobile=True, has_touch=True, device_scale_factor=2)
    page.set_default_timeout(30_000)
    page.goto(url)
    page.locator("#arena-prompt").get_by_text("a ", exact=False).wait_for()
    page.locator("#arena-left img").wait_for()
    page.locator("#arena-right img").wait_for()
    assert not any(model in page.content() for model in models)

    # Stacked: left image, its Left button, then the right image and its Right button; nothing wider than the screen.
    left_image, right_image = box(page, "#arena-left img"), box(page, "#arena-right img")
    left_button, right_button = box(page, "#vote-left"), box(page, "#vote-right")
    assert left_image["y"] + left_image["height"] <= left_button["y"], "Left is under the left image"
    assert left_button["y"] + left_button["height"] <= right_image["y"], "and above the right image"
    assert right_image["y"] + right_image["height"] <= right_button["y"], "Right is under the right image"
    assert left_image["x"] <= centre_x(left_button) <= left_image["x"] + left_image["width"]
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], "no sideways scrolling"
    assert left_image["width"] >= 0.8 * PHONE["width"], "each image uses the screen's width"
    assert drawn_height(page, "#arena-left img") >= 0.95 * left_image["height"], "no empty band above and below"
    screenshot(page, tmp_path, "phone-390x844-before-vote")

    page.locator("#vote-right").tap()
    right_caption = page.locator("#arena-right-caption")
    right_caption.get_by_text("your pick", exact=False).wait_for()
    revealed_at = time.monotonic()
    captions = page.locator("#arena-left-caption").inner_text() + right_caption.inner_text()
    assert sum(model in captions for model in models) == 2, captions
    assert page.locator("#next-pair").is_hidden(), "pause mode has no Next button"
    screenshot(page, tmp_path, "phone-390x844-revealed")
    # After the pause the next pair comes by itself, blind.
    page.wait_for_function("document.querySelector('#arena-right-caption').innerText.trim() === ''", timeout=15_000)
    assert time.monotonic() - revealed_at >= 2.0, "the names stay for the pause (3 s) before the next pair"
    assert page.locator("#vote-right").is_enabled()
    assert "Votes this session: 1" in page.locator("#arena-progress").inner_text()
    assert not any(model in page.content() for model in models)

    page.get_by_role("tab", name="Leaderboard").click()
    page.locator("#leaderboard-refresh").click()
    page.locator("#leaderboard-csv").wait_for()
    screenshot(page, tmp_path, "phone-390x844-leaderboard")
    with page.expect_download() as download:
        page.locator("#leaderboard-csv").click()
    rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text(encoding="utf-8"))))
    page.close()
    store = VoteStore(database)
    [vote] = store.votes()
    store.close()
    assert [row["rank"] for row in rows] == ["1", "2"]
    assert {row["model"] for row in rows} == {vote.left_model, vote.right_model}
    assert rows[0]["model"] == vote.right_model, "the model voted better ranks first"
    assert all(row["votes"] == "1" for row in rows) and [row["wins"] for row in rows] == ["1", "0"]
