"""The managed consumers on the dashboard: a table of them, and a chip under the bar of each
device where one holds a lease. Headless Chromium renders the page against the served app (see
test_dashboard.py); without it only the static checks run.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from support import SLEEPER_REGISTRY, serve_app
from test_dashboard import LIVE, dom_until, needs_chromium
from test_metrics import make_app

REGISTRY = SLEEPER_REGISTRY

CONSUMER_ROW = re.compile(r'<tr data-consumer="sleeper">([\s\S]*?)</tr>')


class WithoutConsumers:
    """ASGI middleware: a service of before ``/v1/consumers`` (it answers 404 ``not_found``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/consumers"):
            missing = JSONResponse({"error": "not_found", "message": "no such route"}, status_code=404)
            await missing(scope, receive, send)
            return
        await self.app(scope, receive, send)


def section(dom: str, element_id: str) -> str:
    """The HTML of the element with ``element_id``, up to its table's end."""
    start = dom.index(f'id="{element_id}"')
    return dom[start : dom.index("</table>", start)]


def test_the_script_polls_v1_consumers_and_the_page_has_a_hidden_table(
    real_redis: redis.Redis, redis_url: str
) -> None:
    with serve_app(make_app(redis_url)) as base, httpx.Client(base_url=base, timeout=10) as http:
        script = http.get("/static/dashboard.js").text
        page = http.get("/").text
    assert '"v1/consumers"' in script
    assert "innerHTML" not in script
    assert re.search(r'<section id="consumers-section"[^>]*\bhidden\b', page)  # until there are some
    assert '<table id="consumers">' in page


@pytest.fixture
def with_sleeper(real_redis: redis.Redis, redis_url: str, tmp_path: Path) -> Iterator[str]:
    """The app with gpu0 and the sleeper consumer, ensured (idle, holding 1 GiB of gpu0)."""
    registry = tmp_path / "consumers.yaml"
    registry.write_text(REGISTRY, encoding="utf-8")
    app = make_app(redis_url, devices=["gpu0=8GiB:0"], consumers=registry)
    with serve_app(app) as base, httpx.Client(base_url=base, timeout=30) as http:
        ensured = http.post("/v1/consumers/sleeper/ensure", json={"timeout_s": 10})
        assert ensured.status_code == 200, ensured.text
        assert ensured.json()["state"] == "idle"
        yield base


@pytest.mark.slow
@needs_chromium
def test_a_leased_consumer_has_a_row_and_a_chip_on_its_device(with_sleeper: str, tmp_path: Path) -> None:
    dom = dom_until(
        tmp_path / "profile",
        with_sleeper + "/",
        "the consumer row",
        re.compile(LIVE.pattern + r'[\s\S]*<tr data-consumer="sleeper">'),
    )
    assert not re.search(r'<section id="consumers-section"[^>]*\bhidden\b', dom)
    assert 'id="consumers-count" class="count">(1)<' in dom
    row = CONSUMER_ROW.search(section(dom, "consumers"))
    assert row is not None
    cells = re.findall(r"<td[^>]*>([\s\S]*?)</td>", row.group(1))
    assert len(cells) == 6, cells
    assert cells[0] == "sleeper"
    assert '<span class="badge consumer-ok">idle</span>' in cells[1]
    assert cells[2:] == ["gpu0", "1,024", "", ""]  # leased on gpu0; not measured; no error

    device = dom[dom.index('data-device="gpu0"') : dom.index('id="leases-title"')]
    chip = re.search(r'<li class="consumer-chip consumer-ok" data-consumer="sleeper">([\s\S]*?)</li>', device)
    assert chip is not None, device
    assert re.sub(r"<[^>]+>", "", chip.group(1)) == "sleeper idle · 1.0 GiB"


@pytest.mark.slow
@needs_chromium
def test_a_service_without_v1_consumers_still_draws_the_rest(
    real_redis: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    app = make_app(redis_url, devices=["gpu0=8GiB:0"])
    app.add_middleware(WithoutConsumers)
    with serve_app(app) as base, httpx.Client(base_url=base, timeout=10) as http:
        assert http.get("/v1/consumers").status_code == 404
        dom = dom_until(
            tmp_path / "profile",
            base + "/",
            "the devices",
            re.compile(LIVE.pattern + r'[\s\S]*data-device="gpu0"'),
        )
    assert re.search(r'<section id="consumers-section"[^>]*\bhidden\b', dom)
    assert 'role="alert" hidden' in dom  # no error banner for the missing route
