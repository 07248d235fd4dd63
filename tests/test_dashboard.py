"""The dashboard at ``/`` in a real browser: headless Chromium against the served app and real Redis.

Chromium loads the page, whose script fetches ``v1/status`` and ``v1/events``; ``--dump-dom`` shows
what it rendered and ``--screenshot`` what it drew. The screenshot is decoded here (a small PNG
reader: zlib and the five row filters) and the memory bars are measured: the colours of active,
idle, evicting and free memory must cover the right share of each device's bar, in that order.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from support import in_thread, serve_app, wait_for
from test_metrics import OwnRedis, make_app

from gpuboss import dashboard
from gpuboss_client import Boss

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is missing (apt-get install chromium; CI installs it)"
)
RENDER_WAIT_S = 60.0

# The bar colours of gpuboss/static/dashboard.css.
ACTIVE = (0x1D, 0x4E, 0xD8)
IDLE = (0x60, 0xA5, 0xFA)
FREE = (0x86, 0xEF, 0xAC)
EVICTING = ((0xF5, 0x9E, 0x0B), (0xB4, 0x53, 0x09))  # the two colours of its stripes


# ---- a small PNG reader ---------------------------------------------------------------------------


@dataclass
class Image:
    width: int
    height: int
    rows: list[bytes]  # RGB, 3 bytes a pixel

    def pixel(self, x: int, y: int) -> tuple[int, int, int]:
        r, g, b = self.rows[y][3 * x : 3 * x + 3]
        return r, g, b

    def row(self, y: int) -> list[tuple[int, int, int]]:
        line = self.rows[y]
        return [(line[i], line[i + 1], line[i + 2]) for i in range(0, len(line), 3)]


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def read_png(data: bytes) -> Image:
    """Decode an 8-bit RGB or RGBA, non-interlaced PNG (what Chromium writes) to RGB rows."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    assert header is not None, "no IHDR"
    width, height, depth, color, _compression, _filter, interlace = header
    assert (depth, interlace) == (8, 0), f"unsupported PNG {header}"
    assert color in (2, 6), f"unsupported PNG {header}"
    bpp = 3 if color == 2 else 4
    stride = width * bpp
    raw = zlib.decompress(b"".join(idat))
    prev = bytearray(stride)
    rows = []
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        if kind == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif kind == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev, strict=True))
        elif kind == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif kind == 4:
            for i in range(stride):
                left, up_left = (line[i - bpp], prev[i - bpp]) if i >= bpp else (0, 0)
                line[i] = (line[i] + _paeth(left, prev[i], up_left)) & 0xFF
        else:
            assert kind == 0, f"bad filter {kind} in row {y}"
        rows.append(bytes(line) if bpp == 3 else bytes(b for i, b in enumerate(line) if i % 4 != 3))
        prev = line
    return Image(width, height, rows)


# ---- driving Chromium -----------------------------------------------------------------------------


def chromium(profile: Path, url: str, *args: str, budget_ms: int = 3000) -> str:
    """Run headless Chromium on ``url`` with ``args`` (``--dump-dom``, ``--screenshot=...``); its stdout.

    ``--virtual-time-budget`` lets the page run its timers and fetches for that long (virtual
    time waits while a fetch is in flight) before Chromium dumps or shoots and exits.
    """
    cmd = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,900",
        "--force-device-scale-factor=1", "--hide-scrollbars", f"--virtual-time-budget={budget_ms}",
        *args, url,
    ]  # fmt: skip
    env = {"HOME": str(profile), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=env, check=False)
    assert done.returncode == 0, f"chromium exited {done.returncode}: {done.stderr[-2000:]}"
    return done.stdout


def dom_until(profile: Path, url: str, what: str, ready: re.Pattern[str]) -> str:
    """Dump the page's DOM until it matches ``ready`` (the script has drawn what we wait for)."""
    deadline = time.monotonic() + RENDER_WAIT_S
    while True:
        dom = chromium(profile, url, "--dump-dom")
        if ready.search(dom):
            return dom
        if time.monotonic() > deadline:
            pytest.fail(f"the dashboard did not show {what} within {RENDER_WAIT_S} s; DOM:\n{dom[-4000:]}")


LIVE = re.compile(r'<body[^>]*data-state="live"')
ERROR = re.compile(r'<body[^>]*data-state="error"')


# ---- measuring the bars -----------------------------------------------------------------------------

BAR_COLOURS = {ACTIVE, IDLE, FREE, *EVICTING}


def is_evicting(p: tuple[int, int, int]) -> bool:
    """A pixel of the orange stripes: either stripe colour or a blend between the two."""
    (r1, g1, b1), (r2, g2, b2) = EVICTING
    return r2 <= p[0] <= r1 and g2 <= p[1] <= g1 and b2 <= p[2] <= b1 and p[0] - p[2] > 150


def bar_bands(img: Image) -> list[tuple[int, int]]:
    """(first row, last row) of each horizontal band where bar colours fill over half the width."""
    bands: list[tuple[int, int]] = []
    start = None
    for y in range(img.height):
        row = img.row(y)
        full = sum(1 for p in row if p in BAR_COLOURS or is_evicting(p)) > img.width // 2
        if full and start is None:
            start = y
        elif not full and start is not None:
            bands.append((start, y - 1))
            start = None
    return bands


@dataclass
class Bar:
    left: int
    right: int  # inclusive
    row: list[tuple[int, int, int]]

    @property
    def width(self) -> int:
        return self.right - self.left + 1

    def share(self, colour: tuple[int, int, int]) -> float:
        return sum(1 for p in self.row[self.left : self.right + 1] if p == colour) / self.width

    def first(self, colour: tuple[int, int, int]) -> float:
        """Where ``colour`` starts, as a share of the bar from its left end."""
        return (
            next(x for x in range(self.left, self.right + 1) if self.row[x] == colour) - self.left
        ) / self.width

    def last(self, colour: tuple[int, int, int]) -> float:
        return (
            max(x for x in range(self.left, self.right + 1) if self.row[x] == colour) - self.left
        ) / self.width


def measure(img: Image, band: tuple[int, int]) -> Bar:
    """The bar in ``band``, measured along its middle row."""
    row = img.row((band[0] + band[1]) // 2)
    inside = [x for x, p in enumerate(row) if p in BAR_COLOURS or is_evicting(p)]
    return Bar(min(inside), max(inside), row)


# ---- tests ------------------------------------------------------------------------------------------


def test_page_and_assets_are_local_and_typed(real_redis: redis.Redis, redis_url: str) -> None:
    # With tokens configured, the page, its assets and /metrics still need none (the data does).
    app = make_app(redis_url, tokens="viewer:holder:viewer-secret-0123456789")
    with serve_app(app) as base, httpx.Client(base_url=base, timeout=10) as http:
        assert http.get("/v1/status").status_code == 401
        assert http.get("/metrics").status_code == 200
        page = http.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp
        assert "connect-src 'self'" in csp
        assert "frame-ancestors 'none'" in csp
        refs = re.findall(r'(?:src|href)="([^"]*)"', page.text)
        assert "static/dashboard.js" in refs
        assert "static/dashboard.css" in refs
        assert all(not re.match(r"[a-z]+://|//", ref) for ref in refs), refs  # nothing from elsewhere
        for name, media in dashboard.ASSETS.items():
            asset = http.get(f"/static/{name}")
            assert asset.status_code == 200
            assert asset.headers["content-type"] == media
            assert asset.content == (Path(dashboard.__file__).parent / "static" / name).read_bytes()
        script = http.get("/static/dashboard.js").text
        assert "innerHTML" not in script  # service data goes in as text only
        for bad in ("index.html", "..%2Fapi.py", "nope.js"):
            missing = http.get(f"/static/{bad}")
            assert missing.status_code == 404
            assert missing.json()["error"] == "not_found"


@dataclass
class Scene:
    base: str
    ids: dict[str, str]


@pytest.fixture
def scene(real_redis: redis.Redis, redis_url: str) -> Iterator[Scene]:
    """gpu0 (24 GiB): 8 GiB active, 4 GiB idle, 12 GiB free. gpu1 (16 GiB): 12 GiB being evicted for a
    waiter that needs 8 GiB, 4 GiB free."""
    with serve_app(make_app(redis_url, devices=["gpu0=24GiB:0", "gpu1=16GiB:1"])) as base:
        llm = Boss(real_redis, holder="llm-server").acquire(
            8192, device="gpu0", ttl=120, priority="high", labels={"model": "<b>llama</b>"}
        )
        tts_boss = Boss(real_redis, holder="tts")
        tts = tts_boss.acquire(4096, device="gpu0", ttl=120)
        tts_boss.idle(tts)
        batch_boss = Boss(real_redis, holder="batch-train")
        batch = batch_boss.acquire(12288, device="gpu1", ttl=120, priority="low", preemptible=True, grace=120)
        waiter = Boss(real_redis, holder="diffusion")
        thread, out = in_thread(
            lambda: waiter.acquire(8192, device="gpu1", priority="high", ttl=120, timeout=90)
        )
        wait_for("the waiter to queue", lambda: waiter.status("default")[0].queued == 1)
        try:
            yield Scene(base, {"llm": llm.id, "tts": tts.id, "batch": batch.id})
        finally:
            batch_boss.release(batch)
            thread.join(30)
            assert "error" not in out, out
            waiter.release(out["value"])


@pytest.mark.slow
@needs_chromium
def test_screenshot_shows_the_bars_and_the_live_lease(scene: Scene, tmp_path: Path) -> None:
    profile = tmp_path / "profile"
    dom = dom_until(
        profile, scene.base + "/", "the live leases", re.compile(LIVE.pattern + r"[\s\S]*llm-server")
    )
    for text in ("gpu0", "gpu1", "llm-server", "tts", "batch-train", "diffusion", *scene.ids.values()):
        assert text in dom, text
    assert "&lt;b&gt;llama&lt;/b&gt;" in dom
    assert "<b>llama" not in dom
    queue = dom[dom.index('id="queue"') :]
    assert "diffusion" in queue[: queue.index("</table>")]
    assert "evicting" in dom
    assert "8.0 GiB active" in dom
    assert "12.0 GiB free" in dom

    shot = tmp_path / "dashboard.png"
    deadline = time.monotonic() + RENDER_WAIT_S
    while True:
        chromium(profile, scene.base + "/", f"--screenshot={shot}")
        img = read_png(shot.read_bytes())
        bands = bar_bands(img)
        if len(bands) >= 2 or time.monotonic() > deadline:
            break
    assert (img.width, img.height) == (1280, 900)
    assert len(bands) == 2, f"expected the bars of gpu0 and gpu1, found bands {bands} (see {shot})"
    (top0, bottom0), (top1, bottom1) = bands
    assert 20 <= bottom0 - top0 <= 40
    assert 20 <= bottom1 - top1 <= 40
    assert bottom0 < top1

    gpu0 = measure(img, bands[0])
    assert gpu0.width > 0.8 * img.width  # the bar spans the page
    assert gpu0.share(ACTIVE) == pytest.approx(8 / 24, abs=0.01)
    assert gpu0.share(IDLE) == pytest.approx(4 / 24, abs=0.01)
    assert gpu0.share(FREE) == pytest.approx(12 / 24, abs=0.01)
    assert gpu0.first(ACTIVE) == pytest.approx(0, abs=0.01)  # active, then idle, then free
    assert gpu0.first(IDLE) == pytest.approx(8 / 24, abs=0.01)
    assert gpu0.first(FREE) == pytest.approx(12 / 24, abs=0.01)
    assert gpu0.last(FREE) == pytest.approx(1, abs=0.01)

    gpu1 = measure(img, bands[1])
    assert abs(gpu1.left - gpu0.left) <= 1
    assert abs(gpu1.right - gpu0.right) <= 1
    assert gpu1.share(ACTIVE) == 0
    assert gpu1.share(IDLE) == 0
    assert gpu1.first(FREE) == pytest.approx(12 / 16, abs=0.01)
    assert gpu1.share(FREE) == pytest.approx(4 / 16, abs=0.01)
    stripes = gpu1.row[gpu1.left : gpu1.left + int(0.74 * gpu1.width)]
    assert sum(1 for p in stripes if p in EVICTING) > 0.5 * len(stripes)  # the two stripe colours
    assert all(is_evicting(p) for p in stripes)


@pytest.mark.slow
@needs_chromium
def test_token_from_the_address_is_kept_and_sent(
    real_redis: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    secret = "viewer-secret-0123456789"
    profile = tmp_path / "profile"
    with serve_app(make_app(redis_url, tokens=f"viewer:holder:{secret}")) as base:
        dom = dom_until(profile, base + "/", "the token banner", ERROR)
        assert "This service needs a token" in dom
        assert "#token=" in dom
        assert "No devices are registered" not in dom

        dom = dom_until(profile, f"{base}/#token={secret}", "the state with the token", LIVE)
        assert "No devices are registered" in dom  # and how to add one
        assert "gpuboss devices add" in dom
        assert "GPUBOSS_DEVICES" in dom

        dom = dom_until(profile, base + "/", "the state with the kept token", LIVE)  # no #token now
        assert "No devices are registered" in dom

        dom = dom_until(profile, f"{base}/#token=wrong-secret-0123456789", "the refused token", ERROR)
        assert "The token this browser keeps was refused" in dom


@pytest.mark.slow
@needs_chromium
def test_banner_when_the_service_fails_or_is_unreachable(tmp_path: Path) -> None:
    # Loaded from a file, the page has no service to ask: its fetches fail like a dead network.
    site = tmp_path / "site"
    (site / "static").mkdir(parents=True)
    static = Path(dashboard.__file__).parent / "static"
    shutil.copy(static / "index.html", site / "index.html")
    for name in dashboard.ASSETS:
        shutil.copy(static / name, site / "static" / name)
    dom = dom_until(tmp_path / "p1", (site / "index.html").as_uri(), "the unreachable banner", ERROR)
    assert "Cannot reach the gpuboss service" in dom

    own = OwnRedis(tmp_path)
    own.start()
    try:
        with serve_app(make_app(own.url, devices=["gpu0=8GiB"])) as base:
            own.stop()  # the service runs on, but Redis is gone: /v1/status answers 503
            dom = dom_until(tmp_path / "p2", base + "/", "the error banner", ERROR)
            assert "answered with an error (HTTP 503 backend_unavailable)" in dom
    finally:
        own.stop()
