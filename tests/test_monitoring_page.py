"""The monitoring page in a real browser: Debian's chromium, headless, driven by Playwright, against the API served
by uvicorn in a subprocess and real worker subprocesses. Screenshots go to tests/artifacts/ (ignored by git).

Skipped only where no browser can be had (no `playwright` package or no chromium); SALESDASH_REQUIRE_BROWSER=1
(.ci/run sets it) turns that skip into a failure."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from db.queries.history import write_history
from db.queries.views import lock_rollups
from salesdash.auth import OPERATOR
from tests.conftest import ROOT, enqueue_job
from worker import client
from worker.history import record_to_row, try_to_row
from worker.records import JobRecord, TryRecord

ARTIFACTS = ROOT / "tests" / "artifacts"
EXPECT_MS = 30_000  # generous: the machine is shared; a wait only lasts this long when something is wrong

try:
    from playwright.async_api import Browser, Page, async_playwright, expect
except ImportError:  # pragma: no cover - the dev extra installs it
    async_playwright = None  # type: ignore[assignment]


def _no_browser(reason: str) -> None:
    if os.environ.get("SALESDASH_REQUIRE_BROWSER") == "1":
        pytest.fail(f"SALESDASH_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """The API as operators run it: uvicorn in its own process, on the suite's database and Redis db."""
    port = _free_port()
    ARTIFACTS.mkdir(exist_ok=True)
    log = (ARTIFACTS / "uvicorn.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=os.environ.copy(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, (
            "uvicorn did not start (tests/artifacts/uvicorn.log)"
        )
        time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(10)
    log.close()


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    if async_playwright is None:
        _no_browser("the playwright package is not installed")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        _no_browser("no chromium on PATH (make test installs Debian's where apt-get can)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        yield launched
        await launched.close()


async def sign_in(browser: Browser, server: str, token: str) -> Page:
    context = await browser.new_context(base_url=server, viewport={"width": 1500, "height": 1100})
    page = await context.new_page()
    await page.goto("/dashboard")
    await page.fill("input[name=token]", token)
    await page.click("#sign-in")
    await expect(page.locator("#queues tbody tr[data-queue=analytics]")).to_be_visible(timeout=EXPECT_MS)
    return page


async def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def search(page: Page, text: str) -> None:
    await page.fill("#filters input[name=q]", text)
    await page.click("#filter-apply")


def job_row(page: Page, job_id: str) -> Any:
    return page.locator(f'#jobs tr[data-job-id="{job_id}"]')


async def history_job(db: asyncpg.Pool, task: str, status: Any, **fields: Any) -> str:
    """A finished job as the workers' history flush writes it into job_runs and job_tries (its one try)."""
    now = int(datetime.now(UTC).timestamp() * 1000)
    job_id = uuid.uuid4().hex
    record = JobRecord(
        job_id, task, "maintenance", status, [], {}, now - 2000, now, 1, 5, started_ms=now - 1500, **fields
    )
    await write_history(db, [record_to_row(record)], [try_to_row(TryRecord.of_record(record))])
    return job_id


# ---- sign-in ----------------------------------------------------------------------------------------------------
async def test_sign_in(browser: Browser, server: str, tokens: dict[str, str]) -> None:
    page = await (await browser.new_context(base_url=server)).new_page()
    response = await page.goto("/dashboard")
    assert response is not None and response.status == 401
    # the sign-in page shows the header's form literally: "<token>" is text, not a swallowed tag
    await expect(page.locator("#sign-in-message")).to_have_text("missing bearer token (Authorization: Bearer <token>)")
    await page.fill("input[name=token]", "not-a-token")
    await page.click("#sign-in")
    await expect(page.locator("#sign-in-message")).to_have_text("invalid, expired or revoked token")
    await page.fill("input[name=token]", tokens["trigger"])
    await page.click("#sign-in")
    await expect(page.locator("header")).to_contain_text("signed in with trigger scope")
    await expect(page.locator("#workers tbody")).to_be_visible()
    await expect(page.locator("#schedule tr[data-task=warm_dashboard_cache]")).to_contain_text("every 2 min")
    await shot(page, "signed-in")
    await page.click("#sign-out")
    await expect(page.locator("#sign-in")).to_be_visible()


# ---- actions ----------------------------------------------------------------------------------------------------
async def test_trigger_from_the_form_goes_queued_to_complete_without_reload(
    browser: Browser, server: str, tokens: dict[str, str], spawn_worker: Any
) -> None:
    page = await sign_in(browser, server, tokens["admin"])
    await page.select_option("#trigger-task", "refresh_all_materialized_views")
    await page.evaluate("window.__notReloaded = true")
    await page.click("#trigger-submit")
    await expect(page.locator("#flash")).to_contain_text("refresh_all_materialized_views queued on analytics")
    job_id = (await page.locator("#flash").inner_text()).rsplit("job ", 1)[1].strip()
    status = job_row(page, job_id).locator("td.status")
    await expect(status).to_have_text("queued", timeout=EXPECT_MS)  # no analytics worker runs yet
    await shot(page, "trigger-queued")
    proc = spawn_worker("worker.analytics.Settings")
    await expect(status).to_have_text("complete", timeout=EXPECT_MS)
    assert await page.evaluate("window.__notReloaded") is True  # the same document all along
    worker = page.locator("#workers tbody tr", has=page.locator("td.num", has_text=re.compile(f"^{proc.pid}$")))
    await expect(worker.locator("td").nth(1)).to_have_text("alive", timeout=EXPECT_MS)
    await expect(worker.locator("td").nth(2)).to_have_text("analytics")
    await expect(worker.locator("td").nth(7)).to_have_text(re.compile(r"^\d+ MiB$"))  # RSS
    await expect(worker.locator("td").nth(8)).to_have_text(re.compile(r"^\d+\.\d s$"))  # uptime
    await shot(page, "trigger-complete")


async def test_the_trigger_form_is_generated_from_the_argument_model(
    browser: Browser, server: str, tokens: dict[str, str]
) -> None:
    page = await sign_in(browser, server, tokens["trigger"])
    options = await page.locator("#trigger-task option").all_inner_texts()
    assert "export_analytics_data" in options and "prune_job_history" not in options  # an admin task
    await page.select_option("#trigger-task", "export_analytics_data")
    fields = page.locator("#trigger-fields")
    await expect(fields.locator("input[name=start_date]")).to_have_attribute("type", "datetime-local")
    assert await fields.locator("input[name=end_date]").get_attribute("required") is not None
    formats = await fields.locator("select[name=export_format] option").all_inner_texts()
    assert formats == ["(default)", "json", "csv", "parquet"]
    await page.select_option("#trigger-task", "update_customer_lifetime_values")
    await expect(fields.locator("input[name=as_of]")).to_have_attribute("type", "date")
    await page.select_option("#trigger-task", "export_analytics_data")
    await fields.locator("input[name=start_date]").fill("2026-02-01T00:00")
    await fields.locator("input[name=end_date]").fill("2026-01-01T00:00")
    await page.click("#trigger-submit")
    await expect(page.locator("#flash.error")).to_contain_text("422: bad arguments for export_analytics_data: end_date")
    await expect(page.locator("#flash")).to_contain_text("must be after start_date")
    await shot(page, "trigger-form-refused")


async def test_abort_a_long_job(
    browser: Browser, server: str, tokens: dict[str, str], spawn_worker: Any, db: asyncpg.Pool, redis: Redis
) -> None:
    """A rebuild held up by another session's rollup locks runs until the operator aborts it."""
    async with db.acquire() as conn, conn.transaction():
        await lock_rollups(conn)
        spawn_worker("worker.analytics.Settings", {"SALESDASH_ROLLUP_LOCK_TIMEOUT": "120"})
        page = await sign_in(browser, server, tokens["trigger"])
        job = await client.enqueue_task(redis, OPERATOR, "refresh_all_materialized_views")
        await search(page, job.task_id)
        await job_row(page, job.task_id).locator("a.job-link").click()
        detail = page.locator("#detail")
        await expect(detail.locator("[data-field=status]")).to_have_text("in_progress", timeout=EXPECT_MS)
        await shot(page, "abort-running")
        await page.click("#abort")
        await expect(page.locator("#flash")).to_contain_text("aborted (it was in_progress)")
        await expect(detail.locator("[data-field=status]")).to_have_text("aborted", timeout=EXPECT_MS)
        await expect(job_row(page, job.task_id).locator("td.status")).to_have_text("aborted", timeout=EXPECT_MS)
        await expect(page.locator("#abort")).to_have_count(0)
        await shot(page, "abort-done")


async def test_a_failed_jobs_traceback_is_shown_to_admin_and_not_to_read(
    browser: Browser, server: str, tokens: dict[str, str], db: asyncpg.Pool
) -> None:
    marker = f"boom-{uuid.uuid4().hex[:8]}"
    trace = f'Traceback (most recent call last):\n  File "worker/jobs/stock.py", line 9\nValueError: {marker}'
    job_id = await history_job(db, "check_low_stock_products", "failed", error=f"ValueError: {marker}", traceback=trace)
    for scope, sees in (("admin", True), ("read", False)):
        page = await sign_in(browser, server, tokens[scope])
        await search(page, job_id)
        await job_row(page, job_id).locator("a.job-link").click()
        detail = page.locator("#detail")
        await expect(detail.locator("[data-field=error]")).to_have_text(f"ValueError: {marker}")
        tries = detail.locator("#detail-tries tbody tr")  # every try, for any scope: its error is no secret
        await expect(tries).to_have_count(1)
        await expect(tries.locator("td").nth(1)).to_have_text("failed")
        await expect(tries.locator("td").nth(6)).to_have_text("1.5 s")  # started 1500 ms before it finished
        if sees:
            await expect(detail.locator("[data-field=traceback]")).to_contain_text(
                f'stock.py", line 9\nValueError: {marker}'
            )
            await expect(page.locator("#retry")).to_be_visible()
        else:
            await expect(detail.locator("[data-field=traceback]")).to_have_text(
                "hidden: tracebacks are shown to admin tokens only"
            )
            assert "stock.py" not in await page.content()
            await expect(page.locator("#retry")).to_have_count(0)
        await shot(page, f"failed-job-{scope}")
        await page.context.close()


async def test_filter_the_job_list(browser: Browser, server: str, tokens: dict[str, str], db: asyncpg.Pool) -> None:
    tag = uuid.uuid4().hex[:10]
    ok = await history_job(db, "generate_monthly_report", "complete", result={"tag": tag})
    failed = await history_job(db, "generate_monthly_report", "failed", error="no data")
    other = await history_job(db, "check_low_stock_products", "complete")
    await db.execute("UPDATE job_runs SET kwargs = $2 WHERE job_id = ANY($1)", [ok, failed], {"month": f"{tag}"})
    page = await sign_in(browser, server, tokens["read"])
    await expect(job_row(page, other)).to_have_count(1, timeout=EXPECT_MS)  # unfiltered, the newest show
    await page.select_option("#filters select[name=status]", "failed")
    await page.click("#filter-apply")
    await expect(job_row(page, failed)).to_have_count(1)
    await expect(job_row(page, ok)).to_have_count(0)
    statuses = await page.locator("#jobs td.status").all_inner_texts()
    assert statuses and set(statuses) == {"failed"}
    await page.select_option("#filters select[name=status]", "")
    await page.select_option("#filters select[name=task]", "generate_monthly_report")
    await search(page, tag)  # by arguments
    await expect(page.locator("#jobs tbody tr")).to_have_count(2)
    await expect(job_row(page, ok)).to_have_count(1)
    await expect(job_row(page, failed)).to_have_count(1)
    await page.select_option("#filters select[name=task]", "")
    await search(page, other[:12])  # by id prefix
    await expect(page.locator("#jobs tbody tr")).to_have_count(1)
    await expect(job_row(page, other)).to_have_count(1)
    await shot(page, "filtered")


async def test_read_scope_sees_no_action_and_is_refused_if_it_posts_one(
    browser: Browser, server: str, tokens: dict[str, str], redis: Redis, db: asyncpg.Pool
) -> None:
    job = await client.enqueue_task(redis, OPERATOR, "update_customer_segments")  # no maintenance worker runs
    try:
        page = await sign_in(browser, server, tokens["read"])
        await expect(page.locator("header")).to_contain_text("signed in with read scope")
        await search(page, job.task_id)
        await job_row(page, job.task_id).locator("a.job-link").click()
        await expect(page.locator("#detail [data-field=status]")).to_have_text("queued")
        assert await page.locator("#trigger, #abort, #retry, button.purge").count() == 0
        await shot(page, "read-scope")
        posts = {
            "/dashboard/api/jobs": {"task_name": "refresh_all_materialized_views", "kwargs": {}},
            f"/dashboard/api/jobs/{job.task_id}/abort": None,
            "/dashboard/api/queues/maintenance/purge": None,
        }
        for path, body in posts.items():
            refused = await page.request.post(path, data=json.dumps(body) if body else None, headers=_JSON)
            assert refused.status == 403, (path, await refused.text())
        assert (await client.job_status(redis, db, job.task_id)).status == "queued"
    finally:
        await client.abort_job(redis, db, OPERATOR, job.task_id)


_JSON = {"Content-Type": "application/json"}


async def test_admin_purges_a_queue_after_confirming(
    browser: Browser, server: str, tokens: dict[str, str], redis: Redis
) -> None:
    for _ in range(3):
        await client.enqueue_task(redis, OPERATOR, "check_low_stock_products")  # no notifications worker runs
    queued = (await client.queue_overview(redis))["notifications"]["queued"]
    assert queued >= 3
    page = await sign_in(browser, server, tokens["admin"])
    waiting = page.locator("#queues tr[data-queue=notifications] td.waiting")
    await expect(waiting).to_have_text(str(queued), timeout=EXPECT_MS)
    page.once("dialog", lambda dialog: dialog.dismiss())
    await page.click("#queues button.purge[data-queue=notifications]")
    await page.wait_for_timeout(300)
    assert (await client.queue_overview(redis))["notifications"]["queued"] == queued  # dismissed: nothing went
    page.once("dialog", lambda dialog: dialog.accept())
    await page.click("#queues button.purge[data-queue=notifications]")
    await expect(page.locator("#flash")).to_have_text(f"purged {queued} waiting job(s) from notifications")
    await expect(waiting).to_have_text("0")


async def test_sales_view_shows_the_analytics_cache(browser: Browser, server: str, tokens: dict[str, str]) -> None:
    page = await sign_in(browser, server, tokens["read"])
    await page.click("#tab-sales")
    await expect(page.locator("#sales-overview tr", has_text="revenue")).to_have_count(1, timeout=EXPECT_MS)
    await expect(page.locator("#sales-generated")).to_contain_text("cache computed")
    await expect(page.locator("#sales-hourly svg rect")).to_have_count(24)
    await expect(page.locator("#operations")).to_be_hidden()
    cached = await (await page.request.get("/dashboard/api/sales")).json()  # the same cache entries the page drew
    overview = cached["overview"]["data"]
    revenue = page.locator("#sales-overview tr", has_text="revenue").locator("td")
    await expect(revenue).to_have_text(str(overview["revenue"]))
    orders = page.locator("#sales-overview tr", has=page.get_by_text("orders", exact=True)).locator("td")
    await expect(orders).to_have_text(str(overview["orders"]))
    products = [p["name"] for p in cached["top_products"]["data"]["products"]]
    shown = await page.locator("#sales-top tbody tr td:first-child").all_inner_texts()
    assert shown == (products or ["none"])
    await shot(page, "sales")


# ---- escaping -------------------------------------------------------------------------------------------------
HTML = '<img src=x onerror="window.__injected=1"><b class="injected">bold</b>'


async def test_html_in_arguments_errors_and_results_is_shown_as_text_everywhere(
    browser: Browser, server: str, tokens: dict[str, str], db: asyncpg.Pool, redis: Redis
) -> None:
    finished = await history_job(
        db, "generate_monthly_report", "failed", result={"html": HTML}, error=HTML, traceback=f"Traceback\n{HTML}"
    )
    await db.execute("UPDATE job_runs SET kwargs = $2 WHERE job_id = $1", finished, {"month": HTML})
    waiting = await enqueue_job(redis, "<i class='injected'>task</i>", "maintenance", {"note": HTML}, defer_ms=600_000)
    try:
        page = await sign_in(browser, server, tokens["admin"])
        await search(page, "injected")
        await expect(job_row(page, finished)).to_have_count(1, timeout=EXPECT_MS)
        await expect(job_row(page, waiting)).to_have_count(1)
        await expect(job_row(page, waiting).locator("td.task")).to_have_text("<i class='injected'>task</i>")
        await expect(job_row(page, finished).locator("td.error")).to_have_text(HTML)
        await expect(job_row(page, finished).locator("td.args")).to_contain_text(HTML.replace('"', '\\"'))
        for job_id in (finished, waiting):
            await job_row(page, job_id).locator("a.job-link").click()
            await expect(page.locator("#detail-id")).to_have_text(job_id)
            await expect(page.locator("#detail [data-field=arguments]")).to_contain_text("injected")
        await expect(page.locator("#detail [data-field=error]")).to_have_text("")
        await job_row(page, finished).locator("a.job-link").click()
        await expect(page.locator("#detail [data-field=error]")).to_have_text(HTML)
        await expect(page.locator("#detail [data-field=result]")).to_contain_text('"html": "<img src=x')
        await expect(page.locator("#detail [data-field=traceback]")).to_have_text(f"Traceback\n{HTML}")
        failed_try = page.locator("#detail-tries tbody tr[data-outcome=failed]")
        await expect(failed_try.locator("td").nth(7)).to_have_text(HTML)  # the try's error, as text
        await page.wait_for_timeout(2500)  # one more poll redraws everything
        assert await page.locator(".injected, img, i").count() == 0
        assert await page.evaluate("window.__injected") is None
        await shot(page, "escaped")
    finally:
        await client.abort_job(redis, db, OPERATOR, waiting)


def test_the_artifacts_directory_is_ignored_by_git() -> None:
    ignored = subprocess.run(["git", "check-ignore", "-q", "tests/artifacts/x.png"], cwd=ROOT, check=False)
    assert ignored.returncode == 0
