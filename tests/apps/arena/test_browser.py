"""The arena in a real browser: headless Chromium (Debian's package) driven by Playwright.

Loads the page, votes once with a click and once with a key, sees the model names revealed,
and finds both votes in the database. Needs /usr/bin/chromium (``.ci/run`` installs it); off
CI a machine without it skips this test, on CI (CI=true) a missing browser fails it.
"""

from __future__ import annotations

import os
import shutil

import pytest

from diffalign.apps.arena.sessions import COOKIE_NAME
from diffalign.apps.arena.store import VoteStore

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# What a headless, sandbox-free Chromium needs on a machine whose network is closed (no background fetches).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


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


def test_vote_by_click_and_by_key_in_chromium(browser, toy_arena_sources, start_arena, tmp_path):
    database = tmp_path / "votes.sqlite"
    url, _ = start_arena(toy_arena_sources.values(), database, "--seed", "0")
    page = browser.new_page()
    page.set_default_timeout(30_000)
    page.goto(url)

    prompt = page.locator("#arena-prompt")
    prompt.get_by_text("a ", exact=False).wait_for()
    first_prompt = prompt.inner_text().strip()
    assert page.locator("#arena-left img").count() == 1 and page.locator("#arena-right img").count() == 1
    assert not any(model in page.content() for model in toy_arena_sources), "model names must be hidden before a vote"

    page.locator("#vote-left").click()
    reveal = page.locator("#arena-reveal")
    reveal.get_by_text("Left was", exact=False).wait_for()
    text = reveal.inner_text()
    assert "you chose Left is better" in text
    assert sum(model in text for model in toy_arena_sources) == 2, text
    page.locator("#arena-progress").get_by_text("Votes this session: 1", exact=False).wait_for()
    second_prompt = prompt.inner_text().strip()

    page.locator("body").click(position={"x": 5, "y": 5})  # focus the page, not an input
    page.keyboard.press("ArrowRight")
    reveal.get_by_text("you chose Right is better", exact=False).wait_for()
    page.locator("#arena-progress").get_by_text("Votes this session: 2", exact=False).wait_for()
    # The session is the server's: an HttpOnly cookie the page's scripts cannot read or set.
    [cookie] = [c for c in page.context.cookies() if c["name"] == COOKIE_NAME]
    assert cookie["httpOnly"] and COOKIE_NAME not in page.evaluate("document.cookie")
    page.close()

    store = VoteStore(database)
    votes = store.votes()
    store.close()
    assert [v.choice for v in votes] == ["left", "right"]
    assert {v.session_id for v in votes} == {cookie["value"].partition(".")[0]}
    assert [v.prompt for v in votes] == [first_prompt, second_prompt]
