"""The dashboard at /ui, driven in headless Chromium against one served ledger and a miner.

One server, one miner and one browser for the whole module; each test gets a fresh
browser context (so a fresh sessionStorage: the key is typed again). The jobs the
module makes: client A's finished, failed and pending ones, client B's one, and
client C's 21 pending ones for paging. The throughput endpoint behind the chart is
checked over plain HTTP here too, on the same server.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from app import protocol
from tests.e2e.conftest import Served
from tests.e2e.dispatch import (
    Miner,
    events,
    register_miner,
    start_miner,
    submit,
    wait_all_terminal,
    wait_for,
    wait_status,
)

pytestmark = pytest.mark.e2e

# Debian's Chromium (scripts/test installs it), or the one JOBLEDGER_CHROMIUM names.
CHROMIUM = os.environ.get("JOBLEDGER_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 860}
# What the UI's assertions wait for at most: a miner run plus a projector round, with margin.
expect.set_options(timeout=20_000)

UNSERVED_GPU = "h100"  # no miner here offers it: such jobs stay pending
TEXT = {"destination": "local", "format": "text"}
FAKE_GPUS = [
    protocol.GpuInfo(
        index=index,
        name="NVIDIA A100-SXM4-80GB",
        uuid=f"GPU-5c0e1f2a-3b4c-4d5e-8f9a-0b1c2d3e4f5{index}",
        memory_total_mb=81920,
        driver="550.54.15",
    )
    for index in range(2)
]


@dataclass
class Scene:
    """The served ledger, its keys and the jobs the module made."""

    served: Served
    miner: Miner
    gpu_miner_id: str
    a: str
    b: str
    c: str
    auditor: str
    a_jobs: dict[str, str]  # job id -> its status once settled
    b_job: str
    c_jobs: list[str]

    @property
    def url(self) -> str:
        return self.served.url


def publish_heartbeat(served: Served, nats_url: str, miner_id: str) -> None:
    """One heartbeat for `miner_id` reporting two A100s, as an agent with NVML sends it."""

    async def publish() -> None:
        connection = await nats.connect(nats_url)
        try:
            beat = protocol.Heartbeat(
                miner_id=miner_id,
                inflight=0,
                gpus=FAKE_GPUS,
                at=datetime.now(UTC),
                session="dashboard-test",
                max_concurrent=2,
            )
            subject = protocol.Namespace(served.nats_prefix).heartbeat_subject(miner_id)
            await connection.publish(subject, protocol.encoder.encode(beat))
            await connection.flush()
        finally:
            await connection.close()

    # In a thread of its own: Playwright's sync API keeps an event loop running on this one.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, publish()).result()


@pytest.fixture(scope="module")
def scene(
    served: Served, nats_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scene]:
    """Keys, a cpu miner, a registered A100 miner that beat once, and settled jobs."""
    miner = start_miner(served, nats_url, tmp_path_factory.mktemp("miner"), "cpu")
    gpu_miner_id, _ = register_miner(served, "a100", name="rig-a100")
    a, b, c = (served.new_key("client", name) for name in ("alice", "bob", "carol"))
    auditor = served.new_key("auditor", "audrey")
    alice, bob, carol = served.client(a), served.client(b), served.client(c)

    done = [
        submit(alice, "echo", "hello dashboard", output_config=TEXT),
        submit(alice, "sha256", "abc", output_config=TEXT),
        submit(alice, "echo", "second", output_config=TEXT, priority="high"),
    ]
    failed = submit(alice, "fail", "out of memory (as asked)")
    pending = submit(alice, "echo", "waits", gpu_type=UNSERVED_GPU)
    b_job = submit(bob, "echo", "bob's secret input", output_config=TEXT)
    c_jobs = [submit(carol, "echo", f"page {i}", gpu_type=UNSERVED_GPU) for i in range(21)]
    settled = wait_all_terminal(alice, [*done, failed], timeout=90, on_fail=miner.log)
    wait_all_terminal(bob, [b_job], timeout=90, on_fail=miner.log)
    a_jobs = {job_id: row["status"] for job_id, row in settled.items()} | {pending: "pending"}
    assert [a_jobs[job] for job in done] == ["completed"] * 3, settled
    assert a_jobs[failed] == "failed"

    publish_heartbeat(served, nats_url, gpu_miner_id)
    wait_for(
        lambda: any(
            m["gpus"]
            for m in served.client(auditor).get("/v1/miners").json()["miners"]
            if m["miner_id"] == gpu_miner_id
        ),
        30,
        "the A100 miner's heartbeat to be recorded",
    )
    yield Scene(served, miner, gpu_miner_id, a, b, c, auditor, a_jobs, b_job, c_jobs)
    miner.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium (Debian's) for the module; never a downloaded one."""
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"the dashboard tests need Chromium at {CHROMIUM}: install Debian's package "
            "with `apt-get install chromium` (scripts/test does, as root) or set "
            "JOBLEDGER_CHROMIUM; Playwright's own browser downloads are not used",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


class Console:
    """What a page printed to its console: errors (a CSP violation is one) and page errors."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def watch(self, page: Page) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))

    def _console(self, message: ConsoleMessage) -> None:
        # A refused request (401, 404) is logged by the browser itself; the page shows those.
        if message.type == "error" and "Failed to load resource" not in message.text:
            self.errors.append(message.text)


def new_page(browser: Browser, console: Console) -> Page:
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    page = context.new_page()
    console.watch(page)
    return page


@pytest.fixture
def console() -> Iterator[Console]:
    """Every test ends with a clean console: no script error, no CSP refusal."""
    found = Console()
    yield found
    assert not found.errors, found.errors


@pytest.fixture
def page(browser: Browser, console: Console) -> Iterator[Page]:
    """A fresh tab in a fresh context: nothing in sessionStorage."""
    opened = new_page(browser, console)
    yield opened
    opened.context.close()


def sign_in(page: Page, url: str, key: str, route: str = "#/jobs") -> None:
    """Open the dashboard and type the key, as a person does."""
    page.goto(f"{url}/ui{route}")
    page.fill("#key-input", key)
    page.click("#login-button")
    expect(page.locator("#login")).to_be_hidden()


def listed_jobs(page: Page) -> list[str]:
    expect(page.locator("#jobs-list")).to_be_visible()
    return page.locator("#jobs-list tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.jobId)"
    )


def api(scene: Scene, key: str, path: str, **params: Any) -> dict[str, Any]:
    answer = httpx.get(scene.url + path, params=params, headers={"X-Api-Key": key}, timeout=30)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def collapsed_types(stored: list[dict[str, Any]]) -> list[str]:
    """Event types in order, a run of progress reports counted once (as the timeline shows)."""
    types: list[str] = []
    for event in stored:
        if not (event["type"] == "JobProgressReported" and types[-1:] == ["JobProgressReported"]):
            types.append(event["type"])
    return types


# ---- the pages themselves -------------------------------------------------------------


def test_the_pages_need_no_key_and_carry_a_strict_content_security_policy(scene: Scene) -> None:
    """/ui and its assets are public; scripts and styles come from this origin only."""
    for path, media_type in (
        ("/ui", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
    ):
        answer = httpx.get(scene.url + path, timeout=30)
        assert answer.status_code == 200, (path, answer.text)
        assert answer.headers["content-type"].startswith(media_type), path
        policy = answer.headers["content-security-policy"]
        assert "default-src 'self'" in policy
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy
        assert answer.headers["x-content-type-options"] == "nosniff"
    page = httpx.get(scene.url + "/ui", timeout=30).text
    assert "<script>" not in page and 'type="module" src="/ui/app.js"' in page
    missing = httpx.get(scene.url + "/ui/no-such-file.js", timeout=30)
    assert missing.status_code == 404
    assert missing.json()["error"]["status"] == 404


def test_an_invalid_key_is_refused_with_a_clear_message(page: Page, scene: Scene) -> None:
    page.goto(f"{scene.url}/ui")
    expect(page.locator("#login")).to_be_visible()
    page.fill("#key-input", "jl_000000000000_not-a-real-secret")
    page.click("#login-button")
    error = page.locator("#login-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("This key was refused: invalid or revoked API key")
    assert page.evaluate("sessionStorage.getItem('jobledger.apiKey')") is None
    expect(page.locator("#jobs-list")).to_have_count(0)


def test_the_job_list_shows_the_clients_own_jobs_only(page: Page, scene: Scene) -> None:
    sign_in(page, scene.url, scene.a)
    expected = [job["job_id"] for job in api(scene, scene.a, "/v1/jobs")["jobs"]]
    assert set(scene.a_jobs) <= set(expected)
    assert listed_jobs(page) == expected  # newest first, as the API pages them
    assert scene.b_job not in listed_jobs(page)
    expect(page.locator("#jobs-total")).to_have_text(f"{len(expected)} jobs")
    failed = next(job for job, status in scene.a_jobs.items() if status == "failed")
    row = page.locator(f'#jobs-list tr[data-job-id="{failed}"]')
    expect(row.locator(".pill")).to_have_text("failed")
    # The key is shown shortened, never whole, and stays in this tab's sessionStorage.
    hint = page.locator("#key-hint").inner_text()
    assert hint.endswith("…") and scene.a not in page.content()
    assert page.evaluate("sessionStorage.getItem('jobledger.apiKey')") == scene.a


def test_the_status_filter_narrows_the_list(page: Page, scene: Scene) -> None:
    sign_in(page, scene.url, scene.a)
    listed_jobs(page)
    page.select_option("#status-filter", "failed")
    expect(page).to_have_url(f"{scene.url}/ui#/jobs?status=failed")
    failed = [job for job, status in scene.a_jobs.items() if status == "failed"]
    expect(page.locator("#jobs-list tbody tr")).to_have_count(len(failed))
    assert listed_jobs(page) == failed
    expect(page.locator("#jobs-total")).to_have_text("1 job failed")
    page.select_option("#status-filter", "canceled")
    expect(page.locator(".empty")).to_have_text("No canceled jobs.")


def test_paging_by_cursor_neither_skips_nor_repeats(page: Page, scene: Scene) -> None:
    sign_in(page, scene.url, scene.c)
    first = listed_jobs(page)
    assert len(first) == 20
    expect(page.locator("#newer")).to_be_disabled()
    page.click("#older")
    expect(page.locator("#jobs-list tbody tr")).to_have_count(1)
    second = listed_jobs(page)
    assert first + second == list(reversed(scene.c_jobs))
    expect(page.locator("#older")).to_be_disabled()
    expect(page.locator(".pager")).to_contain_text("Page 2")
    page.click("#newer")
    expect(page.locator("#jobs-list tbody tr")).to_have_count(20)
    assert listed_jobs(page) == first


def test_a_job_page_shows_its_timeline_in_order_and_its_result(
    page: Page, scene: Scene, tmp_path: Path
) -> None:
    job_id = next(job for job, status in scene.a_jobs.items() if status == "completed")
    stored = events(scene.served.client(scene.a), job_id)
    job = api(scene, scene.a, f"/v1/jobs/{job_id}")
    sign_in(page, scene.url, scene.a)
    page.click(f'a[href="#/jobs/{job_id}"]')
    expect(page.locator("#job-page h1")).to_have_text(job_id)
    expect(page.locator("#job-page .page-head .pill")).to_have_text("completed")
    expect(page.locator("#job-progress")).to_have_attribute("data-progress", "100")
    timeline = page.locator("#timeline li")
    expect(timeline).to_have_count(len(collapsed_types(stored)))
    shown = timeline.evaluate_all("items => items.map(i => i.dataset.type)")
    assert shown == collapsed_types(stored)
    assert shown[0] == "JobSubmitted" and shown[-1] == "JobCompleted"
    expect(timeline.last).to_contain_text(f"cost {job['cost']}")
    expect(page.locator("#live")).to_have_text("final: completed")

    expect(page.locator("#result")).to_contain_text(job["result"]["sha256"])
    with page.expect_download() as download:
        page.click("#download")
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    expected = httpx.get(
        f"{scene.url}/v1/jobs/{job_id}/download", headers={"X-Api-Key": scene.a}, timeout=30
    ).content
    assert saved.read_bytes() == expected
    assert download.value.suggested_filename == f"{job_id}.txt"
    expect(page.locator("#download-status")).to_contain_text("sha256 verified")


def test_a_failed_job_shows_why(page: Page, scene: Scene) -> None:
    job_id = next(job for job, status in scene.a_jobs.items() if status == "failed")
    sign_in(page, scene.url, scene.a, f"#/jobs/{job_id}")
    expect(page.locator("#job-progress .error")).to_contain_text("out of memory (as asked)")
    expect(page.locator("#result")).to_contain_text("No result: the job failed.")
    expect(page.locator("#timeline li").last).to_have_attribute("data-type", "JobFailed")


def test_another_clients_job_is_not_shown(page: Page, scene: Scene) -> None:
    sign_in(page, scene.url, scene.a, f"#/jobs/{scene.b_job}")
    expect(page.locator("#job-message")).to_contain_text(f"job {scene.b_job} was not found")
    expect(page.locator("#timeline li")).to_have_count(0)
    assert "bob's secret input" not in page.content()
    # The auditor reads it.
    page.click("#forget-key")
    expect(page.locator("#login")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('jobledger.apiKey')") is None
    page.fill("#key-input", scene.auditor)
    page.click("#login-button")
    expect(page.locator("#job-page .page-head .pill")).to_have_text("completed")


def test_progress_updates_live_over_the_stream_and_by_polling_without_it(
    browser: Browser, console: Console, scene: Scene
) -> None:
    """Two tabs watch one running job: one over the SSE stream, one with the stream blocked."""
    alice = scene.served.client(scene.a)
    job_id = submit(alice, "sleep", "15", output_config=TEXT)
    wait_status(alice, job_id, {"running"}, timeout=60, on_fail=scene.miner.log)
    streamed, polled = new_page(browser, console), new_page(browser, console)
    polled.route("**/watch", lambda route: route.abort())
    first_seen = {}
    try:
        for page in (streamed, polled):
            sign_in(page, scene.url, scene.a, f"#/jobs/{job_id}")
            expect(page.locator("#job-progress")).to_be_visible()
            page.evaluate("window.notReloaded = true")
            # What the page showed when it opened, read at once: both pages then move on.
            first_seen[page] = int(
                page.locator("#job-progress").get_attribute("data-progress") or 0
            )
        assert max(first_seen.values()) < 100, "the job ended before the pages opened"
        expect(streamed.locator("#live")).to_have_attribute("data-mode", "stream")
        expect(polled.locator("#live")).to_have_attribute("data-mode", "polling")
        for page in (streamed, polled):
            seen = first_seen[page]
            page.wait_for_function(
                "seen => Number(document.querySelector('#job-progress').dataset.progress) > seen",
                arg=seen,
            )
            # The job finishes on the page, which the user never reloaded.
            expect(page.locator("#job-page .page-head .pill")).to_have_text("completed")
            expect(page.locator("#job-progress")).to_have_attribute("data-progress", "100")
            expect(page.locator("#timeline li").last).to_have_attribute("data-type", "JobCompleted")
            expect(page.locator("#live")).to_have_text("final: completed")
            assert page.evaluate("window.notReloaded") is True
        shown = streamed.locator("#timeline li").evaluate_all("l => l.map(i => i.dataset.type)")
        assert shown == collapsed_types(events(alice, job_id))
    finally:
        streamed.context.close()
        polled.context.close()


def test_the_miners_page_lists_miners_with_their_gpus(page: Page, scene: Scene) -> None:
    sign_in(page, scene.url, scene.auditor, "#/miners")
    agent = page.locator(f'#miners-list tr[data-miner-id="{scene.miner.miner_id}"]')
    expect(agent.locator(".pill")).to_have_text("online")
    expect(agent.locator(".offers")).to_contain_text("cpu \u00d7 1")
    rig = page.locator(f'#miners-list tr[data-miner-id="{scene.gpu_miner_id}"]')
    expect(rig).to_contain_text("rig-a100")
    expect(rig.locator(".offers")).to_contain_text("a100 \u00d7 1")
    expect(rig.locator(".gpu")).to_have_count(2)
    expect(rig.locator(".gpu").first).to_contain_text("NVIDIA A100-SXM4-80GB")
    expect(rig.locator(".gpu").first).to_contain_text("80 GiB")
    expect(rig).to_contain_text("0/2")  # load: jobs held out of its slots


def test_a_client_is_told_miners_are_for_auditors_and_admins(page: Page, scene: Scene) -> None:
    sign_in(page, scene.url, scene.a, "#/miners")
    expect(page.locator("#miners-note")).to_contain_text(
        "Miners are visible to auditors and admins."
    )
    expect(page.locator("#miners-area .error")).to_have_count(0)


def test_the_chart_draws_the_clients_jobs_by_status(page: Page, scene: Scene) -> None:
    sign_in(page, scene.url, scene.a)
    bars = page.locator("#throughput-chart rect.bar")
    expect(bars.first).to_be_visible()
    throughput = api(scene, scene.a, "/v1/jobs/throughput")
    drawn = bars.evaluate_all("rs => rs.map(r => [r.dataset.status, Number(r.dataset.count)])")
    by_status: dict[str, int] = {}
    for status, count in drawn:
        by_status[status] = by_status.get(status, 0) + count
    assert by_status == throughput["totals"]["by_status"]
    assert sum(by_status.values()) == api(scene, scene.a, "/v1/jobs")["total"]
    # Bars have height, and the legend names what they count.
    heights = bars.evaluate_all("rs => rs.map(r => Number(r.getAttribute('height')))")
    assert all(height > 0 for height in heights)
    expect(page.locator(".legend")).to_contain_text(f"completed {by_status['completed']}")
    # Per day: the same jobs, in bars that start at midnight UTC.
    page.click('button[data-bucket="day"]')
    expect(bars.first).to_have_attribute(
        "data-start", datetime.now(UTC).strftime("%Y-%m-%dT00:00:00Z")
    )
    days = bars.evaluate_all("rs => rs.reduce((n, r) => n + Number(r.dataset.count), 0)")
    assert days == sum(by_status.values())


def test_screenshot_of_the_job_list(page: Page, scene: Scene) -> None:
    """A full-page picture of the jobs page: it decodes, has the page's width, and has colour."""
    from PIL import Image

    sign_in(page, scene.url, scene.a)
    listed_jobs(page)
    expect(page.locator("#throughput-chart rect.bar").first).to_be_visible()
    png = page.screenshot(full_page=True)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert image.width == VIEWPORT["width"]
    assert image.height >= 600
    colours = {colour for _, colour in image.getcolors(maxcolors=1 << 20) or []}
    assert len(colours) > 50, "a blank or unstyled page"

    def near(rgb: tuple[int, int, int]) -> bool:
        return any(all(abs(a - b) <= 3 for a, b in zip(c, rgb, strict=True)) for c in colours)

    # The status colours of app.css: the stylesheet applied and the chart drew.
    assert near((0x16, 0xA3, 0x4A)), "no completed-green"
    assert near((0xDC, 0x26, 0x26)), "no failed-red"
    assert near((0x0F, 0x17, 0x2A)), "no top bar"
    if directory := os.environ.get("JOBLEDGER_SCREENSHOT_DIR"):
        Path(directory).mkdir(parents=True, exist_ok=True)
        Path(directory, "dashboard.png").write_bytes(png)
        job_id = next(job for job, status in scene.a_jobs.items() if status == "completed")
        page.goto(f"{scene.url}/ui#/jobs/{job_id}")
        expect(page.locator("#live")).to_have_text("final: completed")
        page.screenshot(path=str(Path(directory, "dashboard-job.png")), full_page=True)


# ---- the chart's endpoint -------------------------------------------------------------


def test_throughput_counts_each_clients_jobs_per_hour(scene: Scene) -> None:
    now = datetime.now(UTC)
    body = api(scene, scene.a, "/v1/jobs/throughput")
    assert body["bucket"] == "hour"
    starts = [datetime.fromisoformat(b["start"]) for b in body["buckets"]]
    assert len(starts) == 24
    assert all(
        later - earlier == timedelta(hours=1) for earlier, later in itertools.pairwise(starts)
    )
    assert starts[-1] == now.replace(minute=0, second=0, microsecond=0)
    assert all(b["jobs"] == sum(b["by_status"].values()) for b in body["buckets"])
    mine = api(scene, scene.a, "/v1/jobs")["total"]
    assert body["totals"]["jobs"] == mine
    assert body["totals"]["by_status"]["failed"] == 1
    carol = api(scene, scene.c, "/v1/jobs/throughput")["totals"]
    assert carol == {"jobs": 21, "by_status": {"pending": 21}}
    everyone = api(scene, scene.auditor, "/v1/jobs/throughput")["totals"]["jobs"]
    assert everyone == api(scene, scene.auditor, "/v1/jobs")["total"]


def test_throughput_per_day_over_a_window(scene: Scene) -> None:
    body = api(
        scene,
        scene.a,
        "/v1/jobs/throughput",
        bucket="day",
        **{"from": "2026-01-01", "to": "2026-01-31"},
    )
    assert len(body["buckets"]) == 31
    assert body["buckets"][0]["start"] == "2026-01-01T00:00:00Z"
    assert body["buckets"][-1]["start"] == "2026-01-31T00:00:00Z"
    assert body["to"].startswith("2026-01-31T23:59:59.999999")
    today = datetime.now(UTC).date().isoformat()
    recent = api(
        scene, scene.a, "/v1/jobs/throughput", bucket="day", **{"from": today, "to": today}
    )
    assert [b["start"] for b in recent["buckets"]] == [f"{today}T00:00:00Z"]
    assert recent["buckets"][0]["jobs"] == api(scene, scene.a, "/v1/jobs")["total"]


@pytest.mark.parametrize(
    ("params", "field", "words"),
    [
        ({"from": "2026-01-01", "to": "2026-03-01"}, "from", "1440 hour buckets; at most 1000"),
        ({"bucket": "day", "from": "2020-01-01", "to": "2026-01-01"}, "from", "at most 1000"),
        ({"from": "2026-02-01", "to": "2026-01-01"}, "from", "must not be after"),
        ({"from": "yesterday"}, "from", "must be a date"),
        ({"bucket": "week"}, "bucket", "bucket"),
    ],
)
def test_throughput_refuses_what_it_cannot_answer(
    scene: Scene, params: dict[str, str], field: str, words: str
) -> None:
    answer = httpx.get(
        scene.url + "/v1/jobs/throughput", params=params, headers={"X-Api-Key": scene.a}
    )
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert words in error["message"]
    assert field in str(error["details"])


def test_throughput_is_in_the_openapi_document(scene: Scene) -> None:
    document = httpx.get(scene.url + "/schema/openapi.json", timeout=30).json()
    operation = document["paths"]["/v1/jobs/throughput"]["get"]
    assert {p["name"] for p in operation["parameters"]} == {"from", "to", "bucket"}
    assert "200" in operation["responses"] and "422" in operation["responses"]
    assert not any(path.startswith("/ui") for path in document["paths"])
