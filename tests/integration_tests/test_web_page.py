"""The web page in a real headless Chromium (Debian's package), driven by Playwright."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from service.config import Settings
from service.devtools.servers import LocalServers
from service.gateway.app import serve_gateway
from service.storage.publisher import read_log
from service.worker import Worker
from tests.integration_tests.conftest import wait_until
from tests.integration_tests.test_agent_waits import AGENTS, _host, _talks_and_answers
from tests.integration_tests.test_gateway import (
    collect,
    held_tools,
    post_event,
    running_stack,
    short,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
TOKEN = "page-token"
PATH_NODES = ["discover", "plan", "assign", "execute", "execute_step", "review", "finalize"]

# Records every node the page highlights as current, in order, as the classes change.
RECORD_CURRENT = """
window.__current = [];
new MutationObserver((records) => {
  for (const r of records) {
    const t = r.target;
    if (t.classList && t.classList.contains("node") && t.classList.contains("current")) {
      const name = t.id.slice("node-".length);
      if (window.__current[window.__current.length - 1] !== name) window.__current.push(name);
    }
  }
}).observe(document, { subtree: true, attributes: true, attributeFilter: ["class"] });
"""


@pytest.fixture(scope="module")
async def stack(
    servers: LocalServers, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Settings, str, Worker]]:
    """A worker and a gateway that asks for a token."""
    directory = tmp_path_factory.mktemp("agents")
    async with running_stack(servers, directory, api_tokens=[TOKEN]) as started:
        yield started


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(
            "Chromium is missing at /usr/bin/chromium: install Debian's chromium package "
            "(`apt-get install chromium`) to run the web page tests; they drive it with "
            "Playwright and never download a browser."
        )
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield chromium
        await chromium.close()


# Reports every Content-Security-Policy violation of every document to the test.
REPORT_CSP_VIOLATIONS = """
document.addEventListener("securitypolicyviolation", (e) => {
  window.__cspViolation(`${e.effectiveDirective} blocked ${e.blockedURI || "inline"}`
    + ` in ${e.documentURI} (${e.sourceFile || ""}:${e.lineNumber})`);
});
"""


async def watched_context(browser: Any, url: str, problems: list[str]) -> Any:
    """Open a browser context whose tabs report what goes wrong into `problems`.

    That is: script errors, CSP violations, documents served without the gateway's CSP,
    and requests that leave the gateway.
    """
    context = await browser.new_context(viewport={"width": 1440, "height": 1000})
    await context.expose_binding(
        "__cspViolation", lambda _source, text: problems.append(f"CSP violation: {text}")
    )
    await context.add_init_script(REPORT_CSP_VIOLATIONS)

    def watch(tab: Any) -> None:
        tab.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        tab.on(
            "console",
            lambda msg: problems.append(f"console: {msg.text}") if msg.type == "error" else None,
        )
        tab.on(
            "request",
            lambda req: (
                None
                if req.url.startswith((url, "data:"))
                else problems.append(f"request off the gateway: {req.url}")
            ),
        )

        def document_policy(response: Any) -> None:
            if response.request.resource_type == "document" and response.url.startswith(url):
                policy = response.headers.get("content-security-policy", "")
                if "script-src 'self'" not in policy or "frame-ancestors 'none'" not in policy:
                    problems.append(f"served without the CSP: {response.url}")

        tab.on("response", document_policy)

    context.on("page", watch)
    return context


@pytest.fixture
async def page(browser: Any, stack: tuple[Settings, str, Worker]) -> AsyncIterator[Any]:
    """Open a page that fails the test on anything `watched_context` reports, in any tab."""
    problems: list[str] = []
    context = await watched_context(browser, stack[1], problems)
    tab = await context.new_page()
    await tab.add_init_script(RECORD_CURRENT)
    yield tab
    await context.close()
    # 401s before the token is entered are expected; nothing else is.
    assert [p for p in problems if "401" not in p] == []


async def classes(page: Any, selector: str) -> set[str]:
    return set((await page.get_attribute(selector, "class") or "").split())


async def test_start_a_workflow_from_the_form_and_watch_it(
    page: Any, stack: tuple[Settings, str, Worker], redis: Redis
) -> None:
    from playwright.async_api import expect

    await page.goto(stack[1])
    await expect(page.locator("#notice")).to_contain_text("API token")
    await page.fill("#token", TOKEN)
    await page.click("#token-form button")
    await page.select_option("#example", "claim submitted")
    with held_tools() as hold:  # the run waits in execute_step until the page shows it there
        await page.click("#send")
        await page.wait_for_url(re.compile(r"#/sessions/session-"))
        await expect(page.locator("#node-execute_step")).to_have_class(
            re.compile(r"\bcurrent\b"), timeout=60_000
        )
        hold.released.set()
        await expect(page.locator("#session-status")).to_have_text("completed", timeout=60_000)
    session_id = await page.text_content("#session-title")

    lit: list[str] = await page.evaluate("window.__current")
    assert set(PATH_NODES) <= set(lit)
    first = [lit.index(n) for n in PATH_NODES]
    assert first == sorted(first)  # lit up in the order the graph ran them
    for node in [*PATH_NODES, "__start__", "__end__"]:
        assert "visited" in await classes(page, f"#node-{node}"), node
    assert "visited" not in await classes(page, "#node-escalate")
    assert await page.locator("#graph g.node.current").count() == 0
    assert "visited" in await classes(page, "#edge-review-finalize")
    assert "visited" not in await classes(page, "#edge-review-escalate")

    await expect(page.locator("#result")).to_contain_text("completed")
    await expect(page.locator("#review")).to_contain_text("approve")
    steps = page.locator("#steps tbody tr")
    assert await steps.count() >= 2
    for i in range(await steps.count()):
        row = steps.nth(i)
        assert (await row.locator("td").nth(1).text_content() or "").strip()  # agents
        assert await row.locator("td").nth(2).text_content() == "done"
        assert (await row.locator("td").nth(3).text_content() or "").strip()  # output
    log = await read_log(redis, session_id)
    await expect(page.locator("#log tbody tr")).to_have_count(len(log))
    await expect(page.locator(f'#session-list li[data-session="{session_id}"]')).to_contain_text(
        "completed"
    )

    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "session.png"), full_page=True)


async def _escalate_from_the_page(page: Any, url: str) -> tuple[str, str]:
    """Send the escalating example from the page, as an event type of its own.

    Returns the session id and the event type, once the question shows.
    """
    from playwright.async_api import expect

    await page.add_init_script(f"sessionStorage.setItem('agentflow.token', {TOKEN!r})")
    await page.goto(url)
    await page.select_option("#example", "claim needs review (escalates)")
    kind = f"claim.submitted.t{uuid.uuid4().hex[:8]}"
    await page.fill("#event-type", kind)
    await page.click("#send")
    await expect(page.locator("#escalation")).to_be_visible(timeout=60_000)
    await expect(page.locator("#session-status")).to_have_text("interrupted")
    session_id = (await page.text_content("#session-title")) or ""
    return session_id.strip(), kind


async def _answers_of(url: str, session_id: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
    ) as http:
        detail = await http.get(f"/sessions/{session_id}")
        assert detail.status_code == 200, detail.text
        answers: list[dict[str, Any]] = detail.json()["answers"]
        return answers


async def _kept(worker: Worker, kind: str) -> int:
    library = worker.runner.context.library
    total, _ = await library.recent(event_type=kind)  # type: ignore[union-attr]
    return int(total)


async def test_approve_an_escalation_from_the_page(
    page: Any, stack: tuple[Settings, str, Worker]
) -> None:
    from playwright.async_api import expect

    session_id, kind = await _escalate_from_the_page(page, stack[1])
    question = await page.text_content("#question")
    assert question and question.strip()
    assert "current" in await classes(page, "#node-escalate")  # waiting in escalate
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "escalation.png"), full_page=True)

    await page.fill("#feedback", "discharge confirmed")
    await page.click("#approve")
    await expect(page.locator("#session-status")).to_have_text("completed", timeout=60_000)
    await expect(page.locator("#escalation")).to_be_hidden()
    await expect(page.locator("#review")).to_contain_text("discharge confirmed")
    await expect(page.locator("#log")).to_contain_text("approve by agentflow/gateway (http)")
    assert "visited" in await classes(page, "#node-escalate")
    assert "current" not in await classes(page, "#node-escalate")
    assert "visited" in await classes(page, "#edge-escalate-finalize")
    assert "visited" in await classes(page, "#node-__end__")
    assert await _kept(stack[2], kind) == 1
    (answer,) = await _answers_of(stack[1], session_id)
    assert (answer["decision"], answer["source"]) == ("approve", "http")


async def test_reject_an_escalation_from_the_page(
    page: Any, stack: tuple[Settings, str, Worker]
) -> None:
    from playwright.async_api import expect

    session_id, kind = await _escalate_from_the_page(page, stack[1])
    await page.fill("#feedback", "manager did not approve")
    await page.click("#reject")
    await expect(page.locator("#session-status")).to_have_text("rejected", timeout=60_000)
    await expect(page.locator("#escalation")).to_be_hidden()
    await expect(page.locator("#result")).to_contain_text("manager did not approve")
    await expect(page.locator("#log")).to_contain_text("session.rejected")
    assert await _kept(stack[2], kind) == 0  # a rejected workflow is never an example
    (answer,) = await _answers_of(stack[1], session_id)
    assert (answer["decision"], answer["feedback"]) == ("reject", "manager did not approve")


async def test_revise_an_escalation_from_the_page(
    page: Any, stack: tuple[Settings, str, Worker]
) -> None:
    from playwright.async_api import expect

    session_id, kind = await _escalate_from_the_page(page, stack[1])
    await page.fill("#feedback", "check the discharge papers again")
    await page.click("#revise")
    # The steps run again; their output still asks for a human, who is asked again.
    await expect(page.locator("#log")).to_contain_text("revise by agentflow/gateway (http)")
    asked_again = page.locator("#log tr.session-interrupted")
    await expect(asked_again).to_have_count(2, timeout=60_000)
    await expect(page.locator("#escalation")).to_be_visible()
    await page.click("#approve")
    await expect(page.locator("#session-status")).to_have_text("completed", timeout=60_000)
    assert await _kept(stack[2], kind) == 1
    answers = await _answers_of(stack[1], session_id)
    assert [a["decision"] for a in answers] == ["revise", "approve"]


async def test_a_session_has_an_address_and_its_panels_show_only_when_open(
    page: Any, stack: tuple[Settings, str, Worker], redis: Redis
) -> None:
    from playwright.async_api import expect

    url = stack[1]
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
    ) as http:
        first, second = [
            (await post_event(http, short("status_requested")))["session_id"] for _ in range(2)
        ]
        for session_id in (first, second):
            await collect(http, session_id)  # until it ends

    await page.add_init_script(f"sessionStorage.setItem('agentflow.token', {TOKEN!r})")
    await page.goto(url)
    await expect(page.locator(f'#session-list li[data-session="{second}"]')).to_be_visible()
    # No session picked: none of its panels.
    for panel in ("#session", "#cancel", "#steps", "#review", "#result", "#log", "#graph"):
        await expect(page.locator(panel)).to_be_hidden()
    await expect(page.locator("#empty")).to_be_visible()
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "no-session.png"), full_page=True)

    async def shows(session_id: str) -> None:
        await expect(page.locator("#session")).to_be_visible()
        await expect(page.locator("#session-title")).to_have_text(session_id)
        await expect(page.locator("#session-status")).to_have_text("completed")
        log = await read_log(redis, session_id)
        await expect(page.locator("#log tbody tr")).to_have_count(len(log))
        await expect(page.locator("#empty")).to_be_hidden()

    # Opening a session gives it an address.
    await page.click(f'#session-list li[data-session="{first}"] a')
    await page.wait_for_url(f"{url}/#/sessions/{first}")
    await shows(first)
    await page.click(f'#session-list li[data-session="{second}"] a')
    await page.wait_for_url(f"{url}/#/sessions/{second}")
    await shows(second)

    # Back: the previous session, then no session.
    await page.go_back()
    await page.wait_for_url(f"{url}/#/sessions/{first}")
    await shows(first)
    await page.go_back()
    await page.wait_for_url(f"{url}/")
    await expect(page.locator("#session")).to_be_hidden()
    await expect(page.locator("#empty")).to_be_visible()
    await page.go_forward()
    await shows(first)

    # The address opens the session in a fresh tab, once the token is entered there (the
    # token lives in the tab that was given it).
    fresh = await page.context.new_page()
    await fresh.goto(f"{url}/#/sessions/{second}")
    await expect(fresh.locator("#notice")).to_contain_text("token")
    await fresh.fill("#token", TOKEN)
    await fresh.click("#token-form button")
    await expect(fresh.locator("#session-title")).to_have_text(second)
    await expect(fresh.locator("#graph svg")).to_be_visible()
    await expect(fresh.locator("#session-status")).to_have_text("completed")
    await expect(fresh.locator("#log tbody tr")).to_have_count(len(await read_log(redis, second)))
    await fresh.close()


async def test_api_docs_render_offline(page: Any, stack: tuple[Settings, str, Worker]) -> None:
    from playwright.async_api import expect

    # The page fixture fails the test on any request that leaves the gateway.
    await page.goto(f"{stack[1]}/docs")
    await expect(page.locator(".swagger-ui .info .title")).to_contain_text("agentflow gateway")
    await expect(page.locator(".opblock-summary-path", has_text="/events").first).to_be_visible()
    await expect(page.locator(".opblock-summary-path", has_text="/stream").first).to_be_visible()
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "docs.png"))


async def test_the_page_keeps_its_token_in_the_tab_and_runs_under_its_policy(
    browser: Any, page: Any, stack: tuple[Settings, str, Worker]
) -> None:
    from playwright.async_api import expect

    url = stack[1]
    await page.goto(url)
    await page.fill("#token", TOKEN)
    await page.click("#token-form button")
    await expect(page.locator("#notice")).to_have_text("token saved")
    assert await page.evaluate("sessionStorage.getItem('agentflow.token')") == TOKEN
    assert await page.evaluate("localStorage.getItem('agentflow.token')") is None
    other_tab = await page.context.new_page()
    await other_tab.goto(url)
    assert await other_tab.evaluate("sessionStorage.getItem('agentflow.token')") is None
    await expect(other_tab.locator("#token")).to_have_value("")
    await other_tab.close()

    # The policy holds, and a violation reaches the test: an injected inline script is
    # refused and reported (this context is not the fixture's, which would fail on it).
    problems: list[str] = []
    context = await watched_context(browser, url, problems)
    try:
        tab = await context.new_page()
        await tab.goto(url)
        await tab.evaluate(
            "document.body.append(Object.assign(document.createElement('script'),"
            " {textContent: 'window.injected = true'}))"
        )
        await wait_until(
            lambda: any("CSP violation: script-src" in p for p in problems),
            "the refused inline script reported",
        )
        assert await tab.evaluate("window.injected") is None

        # Another origin cannot frame the page: Chromium shows its error page instead.
        await tab.route(
            "http://elsewhere.test/",
            lambda route: route.fulfill(
                content_type="text/html", body=f'<iframe id="framed" src="{url}/"></iframe>'
            ),
        )
        await tab.goto("http://elsewhere.test/")

        def framed_url() -> str | None:  # the frame's document, once it has one
            urls = [f.url for f in tab.frames if f is not tab.main_frame]
            return next((u for u in urls if u.startswith((url, "chrome-error:"))), None)

        await wait_until(framed_url, "the frame's document committed")
        assert framed_url() == "chrome-error://chromewebdata/"  # Chromium refused the page
        assert await tab.frame_locator("#framed").locator("#token").count() == 0
    finally:
        await context.close()


async def test_a_session_that_never_starts_shows_unknown_session(
    browser: Any, stack: tuple[Settings, str, Worker]
) -> None:
    from playwright.async_api import expect

    server, serving, url = await serve_gateway(
        stack[0], host="127.0.0.1", port=0, unknown_hold_s=0.5
    )
    problems: list[str] = []
    context = await watched_context(browser, url, problems)
    try:
        page = await context.new_page()
        await page.add_init_script(f"sessionStorage.setItem('agentflow.token', {TOKEN!r})")
        await page.goto(f"{url}/#/sessions/never-started")
        await expect(page.locator("#notice")).to_have_text("unknown session: never-started")
        await expect(page.locator("#session-status")).to_have_text("unknown")
    finally:
        await context.close()
        server.should_exit = True
        await serving
    assert problems == []


@pytest.fixture(scope="module")
async def remote_stack(
    servers: LocalServers, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Settings, str, Worker]]:
    """A worker and a gateway whose agent `second` runs elsewhere (`runs: kafka`)."""
    directory = tmp_path_factory.mktemp("remote-agents")
    agents = directory / "remote.yaml"  # running_stack writes its own agents.yaml there
    agents.write_text(AGENTS.format(timeout_s=300))
    async with running_stack(servers, directory, api_tokens=[TOKEN], agents_file=agents) as s:
        yield s


async def test_a_session_waiting_for_a_remote_agent_shows_whom_it_waits_for(
    browser: Any, remote_stack: tuple[Settings, str, Worker]
) -> None:
    from playwright.async_api import expect

    settings, url, _ = remote_stack
    problems: list[str] = []
    context = await watched_context(browser, url, problems)
    page = await context.new_page()
    await page.add_init_script(f"sessionStorage.setItem('agentflow.token', {TOKEN!r})")
    await page.goto(url)
    await page.select_option("#example", "claim submitted")
    await page.click("#send")
    await page.wait_for_url(re.compile(r"#/sessions/session-"))
    session_id = await page.text_content("#session-title")

    # Parked in Redis: the page says whom it waits for, and it can be cancelled; it asks
    # no question (that is for a human).
    await expect(page.locator("#log tbody tr.session-waiting")).to_have_count(1, timeout=60_000)
    await expect(page.locator("#session-status")).to_have_text("waiting")
    waits = page.locator("#log tbody tr.session-waiting td").nth(5)
    await expect(waits).to_contain_text(re.compile(r"waits for second on s\d+"))
    await expect(page.locator("#cancel")).to_be_visible()
    await expect(page.locator("#escalation")).to_be_hidden()
    assert "current" in await classes(page, "#node-execute_step")
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "waiting.png"), full_page=True)

    # The agent's host comes up and answers: its messages show, and the session ends.
    hosting = asyncio.create_task(_host(settings, _talks_and_answers, []))
    try:
        await expect(page.locator("#session-status")).to_have_text("completed", timeout=60_000)
    finally:
        hosting.cancel()
        await asyncio.gather(hosting, return_exceptions=True)
    messages = page.locator("#log tbody tr.agent-message", has_text="looking at")
    assert await messages.count() >= 1
    await expect(page.locator("#steps")).to_contain_text("remote answer for")
    await expect(page.locator("#cancel")).to_be_hidden()
    await context.close()
    assert [p for p in problems if "401" not in p] == []
    assert session_id and session_id.startswith("session-")
