"""Sizes, priorities and durations as users write them."""

from __future__ import annotations

from typing import Any

import pytest

from gpuboss_client import PRIORITIES, BadRequest, parse_mib, parse_priority
from gpuboss_client.units import MAX_MIB, MAX_TTL_MS, parse_ttl_ms

GiB = 1024
TiB = 1024 * 1024


@pytest.mark.parametrize(
    ("vram", "mib"),
    [
        (1, 1),
        (8192, 8192),
        (MAX_MIB, MAX_MIB),
        ("512", 512),
        ("512M", 512),
        ("512MB", 512),
        ("512MiB", 512),
        ("512mib", 512),
        ("8G", 8 * GiB),
        ("8GB", 8 * GiB),  # binary, as nvidia-smi counts
        ("8GiB", 8 * GiB),
        ("8gib", 8 * GiB),
        (" 8 GiB ", 8 * GiB),
        ("1.5GiB", 1536),
        ("0.5G", 512),
        ("0.3G", 308),  # 307.2 rounds up
        ("0.1M", 1),  # a fraction of a MiB is a whole MiB
        ("1T", TiB),
        ("1TB", TiB),
        ("16TiB", MAX_MIB),
        ("1.1T", 1153434),  # 1153433.6 rounds up
    ],
)
def test_parse_mib_valid(vram: int | str, mib: int) -> None:
    assert parse_mib(vram) == mib


@pytest.mark.parametrize(
    ("vram_gb", "mib"),
    [(1, GiB), (8, 8 * GiB), (1.5, 1536), (0.0001, 1), (0.3, 308), (16 * 1024, MAX_MIB)],
)
def test_parse_mib_from_gb(vram_gb: float, mib: int) -> None:
    assert parse_mib(vram_gb=vram_gb) == mib


@pytest.mark.parametrize(
    "vram",
    [
        0, -1, MAX_MIB + 1, 10**30, True, False, 1.5, 8.0, float("nan"), float("inf"), None, b"8G",
        [8], {"vram": 8}, "", " ", "G", "GiB", "-8G", "+8G", "8XB", "8 G B", "8GiBs", "8Gi", "8K",
        "8KB", "1e3", "8,5G", "0x10", "0", "0G", "0.0", "16.001TiB", "17T", ".5G", "5.G", "8 8G",
    ],
)  # fmt: skip
def test_parse_mib_invalid(vram: Any) -> None:
    with pytest.raises(BadRequest):
        parse_mib(vram)


@pytest.mark.parametrize(
    "vram_gb", [0, -1, -0.0, 16 * 1024 + 0.001, float("nan"), float("inf"), float("-inf"), True, "8"]
)
def test_parse_mib_from_gb_invalid(vram_gb: Any) -> None:
    with pytest.raises(BadRequest):
        parse_mib(vram_gb=vram_gb)


def test_parse_mib_needs_exactly_one_of_vram_and_vram_gb() -> None:
    with pytest.raises(BadRequest):
        parse_mib()
    with pytest.raises(BadRequest):
        parse_mib(1024, vram_gb=1)


@pytest.mark.parametrize("vram", ["1" + "0" * 400, "1" + "0" * 400 + "GiB"])
def test_parse_mib_huge_number_string(vram: str) -> None:
    with pytest.raises(BadRequest):
        parse_mib(vram)


@pytest.mark.parametrize(
    ("priority", "value"),
    [
        ("low", 10), ("normal", 50), ("high", 90), ("HIGH", 90), (" Low ", 10), (0, 0), (100, 100),
        (42, 42), ("0", 0), ("100", 100), ("42", 42), (" 7 ", 7),
    ],
)  # fmt: skip
def test_parse_priority_valid(priority: int | str, value: int) -> None:
    assert parse_priority(priority) == value


def test_priority_names() -> None:
    assert PRIORITIES == {"low": 10, "normal": 50, "high": 90}


@pytest.mark.parametrize(
    "priority",
    [-1, 101, 1000, "urgent", "", " ", "-1", "101", "1e2", "50.0", "0x10", True, False, 50.5, None, [50]],
)
def test_parse_priority_invalid(priority: Any) -> None:
    with pytest.raises(BadRequest):
        parse_priority(priority)


def test_parse_priority_superscript_digit() -> None:
    with pytest.raises(BadRequest):
        parse_priority("²")


@pytest.mark.parametrize(
    ("ttl", "ms"),
    [(10, 10_000), (0.5, 500), (0.0001, 1), (1e-9, 1), (0.3, 300), (86400, MAX_TTL_MS), (1.0005, 1001)],
)
def test_parse_ttl_ms_valid(ttl: float, ms: int) -> None:
    assert parse_ttl_ms(ttl) == ms


@pytest.mark.parametrize("ttl", [4.03, 8.05, 8.13])
def test_parse_ttl_ms_exact_milliseconds(ttl: float) -> None:
    assert parse_ttl_ms(ttl) == round(ttl * 1000)


@pytest.mark.parametrize(
    "ttl", [0, -1, -0.0, 86400.001, 86401, float("nan"), float("inf"), float("-inf"), True, "10", None]
)
def test_parse_ttl_ms_invalid(ttl: Any) -> None:
    with pytest.raises(BadRequest):
        parse_ttl_ms(ttl)


def test_parse_ttl_ms_names_the_argument() -> None:
    with pytest.raises(BadRequest, match="grace"):
        parse_ttl_ms(0, name="grace")
