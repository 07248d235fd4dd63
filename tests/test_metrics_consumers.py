"""The managed consumers in ``GET /metrics``: state gauges, measured memory, counters, histograms.

The exposition is parsed with prometheus_client's own parser. A rendered :class:`Snapshot` checks
every value (histogram buckets cumulative, ``+Inf`` equal to the count); a real service with a
consumer the boss runs as a child process checks that an ensure and a release show up.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from support import SLEEPER_REGISTRY
from test_api import Service, make_settings, serve
from test_metrics import MIB, Samples, parse, value

from gpuboss.consumers.manager import BUCKETS, STATES, Timings
from gpuboss.metrics import Consumers, ConsumerSample, Durations, Snapshot, render
from gpuboss_client import PoolStatus

CONSUMER_FAMILIES = {
    "gpuboss_consumer_state": "gauge",
    "gpuboss_consumer_measured_bytes": "gauge",
    "gpuboss_consumer_loads": "counter",
    "gpuboss_consumer_unloads": "counter",
    "gpuboss_consumer_evictions": "counter",
    "gpuboss_consumer_load_seconds": "histogram",
    "gpuboss_consumer_unload_seconds": "histogram",
}


def timings(*seconds: float) -> Timings:
    t = Timings()
    for s in seconds:
        t.observe(s)
    return t


def consumers(
    *units: ConsumerSample, loads: Timings | None = None, unloads: Timings | None = None
) -> Consumers:
    return Consumers(list(units), Durations.of(loads or Timings()), Durations.of(unloads or Timings()))


def snapshot(found: Consumers | None, *, redis_up: bool = True) -> Snapshot:
    pools = [PoolStatus("default", 1000, [], 0, 0)] if redis_up else None
    return Snapshot(pools, [], {}, 0.01, consumers=found)


def buckets(samples: Samples, name: str) -> dict[str, float]:
    """The ``le`` of each bucket of histogram ``name`` (no other labels), and its count."""
    out = {}
    for sample, labels in samples:
        if sample == f"{name}_bucket":
            out[dict(labels)["le"]] = samples[(sample, labels)]
    return out


TTS = ConsumerSample("tts", "", "idle", 2000, loads=3, unloads=2, evictions=1)
OLLAMA_A = ConsumerSample("ollama", "llama3", "ready", 9000, loads=1, unloads=0, evictions=0)
OLLAMA_B = ConsumerSample("ollama", "qwen", "loading", 9000, loads=0, unloads=4, evictions=2)
IMAGE = ConsumerSample("image", "", "stuck", None, loads=5, unloads=5, evictions=5)


def test_states_measured_memory_and_counters() -> None:
    text = render(snapshot(consumers(TTS, OLLAMA_A, OLLAMA_B, IMAGE))).decode()
    samples, types = parse(text)
    for name, kind in CONSUMER_FAMILIES.items():
        assert types[name] == kind, name

    units = {
        ("tts", ""): "idle",
        ("ollama", "llama3"): "ready",
        ("ollama", "qwen"): "loading",
        ("image", ""): "stuck",
    }
    for (name, model), current in units.items():
        got = {
            s: value(samples, "gpuboss_consumer_state", consumer=name, model=model, state=s) for s in STATES
        }
        assert got == {s: 1.0 if s == current else 0.0 for s in STATES}, (name, model)
    assert len([k for k in samples if k[0] == "gpuboss_consumer_state"]) == len(units) * len(STATES)

    # Measured once per consumer (the processes of all its models together); absent when not measured.
    measured = {
        dict(k[1])["consumer"]: v for k, v in samples.items() if k[0] == "gpuboss_consumer_measured_bytes"
    }
    assert measured == {"tts": 2000 * MIB, "ollama": 9000 * MIB}
    assert value(samples, "gpuboss_consumer_measured_bytes", consumer="ollama", model="") == 9000 * MIB

    expected = {
        ("tts", ""): (3, 2, 1),
        ("ollama", "llama3"): (1, 0, 0),
        ("ollama", "qwen"): (0, 4, 2),
        ("image", ""): (5, 5, 5),
    }
    for (name, model), counts in expected.items():
        found = tuple(
            value(samples, f"gpuboss_consumer_{what}_total", consumer=name, model=model)
            for what in ("loads", "unloads", "evictions")
        )
        assert found == counts, (name, model)


def test_histograms_are_cumulative_and_inf_is_the_count() -> None:
    loads = timings(0.05, 0.3, 0.3, 3.0, 400.0)  # 400 s is past the last bound: only in +Inf
    unloads = timings(1.0)  # on a bound: counted in it (le is "less or equal")
    text = render(snapshot(consumers(TTS, loads=loads, unloads=unloads))).decode()
    samples, _ = parse(text)

    load = buckets(samples, "gpuboss_consumer_load_seconds")
    assert list(load) == [*(str(float(b)) for b in BUCKETS), "+Inf"]
    observed = (0.05, 0.3, 0.3, 3.0, 400.0)
    assert [load[str(float(b))] for b in BUCKETS] == [sum(1 for s in observed if s <= b) for b in BUCKETS]
    assert load["0.1"] == 1
    assert load["0.5"] == 3
    assert load["5.0"] == 4
    assert load["300.0"] == 4
    values = list(load.values())
    assert values == sorted(values)  # cumulative: never decreasing
    assert load["+Inf"] == value(samples, "gpuboss_consumer_load_seconds_count") == 5
    assert value(samples, "gpuboss_consumer_load_seconds_sum") == pytest.approx(sum(observed))

    unload = buckets(samples, "gpuboss_consumer_unload_seconds")
    assert [unload[str(float(b))] for b in BUCKETS] == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    assert unload["+Inf"] == value(samples, "gpuboss_consumer_unload_seconds_count") == 1
    assert value(samples, "gpuboss_consumer_unload_seconds_sum") == pytest.approx(1.0)

    # The parser's own view: one histogram family each, with _bucket, _count and _sum.
    families = {f.name: f for f in text_string_to_metric_families(text)}
    names = {s.name for s in families["gpuboss_consumer_load_seconds"].samples}
    assert names == {
        "gpuboss_consumer_load_seconds_bucket",
        "gpuboss_consumer_load_seconds_count",
        "gpuboss_consumer_load_seconds_sum",
    }


def test_consumer_metrics_need_no_redis_and_are_absent_without_consumers() -> None:
    samples, _ = parse(render(snapshot(consumers(IMAGE), redis_up=False)).decode())
    assert value(samples, "gpuboss_redis_up") == 0
    assert value(samples, "gpuboss_consumer_state", consumer="image", model="", state="stuck") == 1
    assert value(samples, "gpuboss_consumer_loads_total", consumer="image", model="") == 5

    for found in (None, consumers()):  # no manager, or one with no consumers: nothing of them
        samples, types = parse(render(snapshot(found)).decode())
        assert not set(types) & set(CONSUMER_FAMILIES)
        assert value(samples, "gpuboss_redis_up") == 1


REGISTRY = SLEEPER_REGISTRY


@pytest.fixture
def managed(real_redis: redis.Redis, redis_url: str, tmp_path: Path) -> Iterator[Service]:
    registry = tmp_path / "consumers.yaml"
    registry.write_text(REGISTRY, encoding="utf-8")
    with serve(make_settings(redis_url, consumers=registry)) as svc:
        yield svc


def scrape(client: httpx.Client) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    return parse(response.text)[0]


def states(samples: Samples) -> dict[str, float]:
    return {
        s: value(samples, "gpuboss_consumer_state", consumer="sleeper", model="", state=s) for s in STATES
    }


@pytest.mark.slow
def test_an_ensured_consumer_shows_in_the_metrics(managed: Service) -> None:
    client = managed.client
    before = scrape(client)
    assert states(before) == {s: float(s == "unloaded") for s in STATES}
    assert value(before, "gpuboss_consumer_loads_total", consumer="sleeper", model="") == 0
    assert value(before, "gpuboss_consumer_load_seconds_count") == 0

    ensured = client.post("/v1/consumers/sleeper/ensure", json={"timeout_s": 10})
    assert ensured.status_code == 200, ensured.text
    assert ensured.json()["state"] == "idle"
    samples = scrape(client)
    assert states(samples) == {s: float(s == "idle") for s in STATES}
    assert value(samples, "gpuboss_consumer_loads_total", consumer="sleeper", model="") == 1
    assert value(samples, "gpuboss_consumer_unloads_total", consumer="sleeper", model="") == 0
    assert value(samples, "gpuboss_consumer_evictions_total", consumer="sleeper", model="") == 0
    assert value(samples, "gpuboss_consumer_load_seconds_count") == 1
    assert value(samples, "gpuboss_consumer_load_seconds_bucket", le="+Inf") == 1
    measured = client.get("/v1/consumers").json()["consumers"][0]["measured_mib"]
    key = ("gpuboss_consumer_measured_bytes", frozenset({("consumer", "sleeper"), ("model", "")}))
    assert samples.get(key) == (None if measured is None else measured * MIB)
    # The consumer's lease is on the device bar like any other.
    assert (
        value(samples, "gpuboss_device_leased_bytes", pool="default", device="gpu0", host=_host(samples))
        == 1024 * MIB
    )

    released = client.post("/v1/consumers/sleeper/release", json={})
    assert released.status_code == 200, released.text
    samples = scrape(client)
    assert states(samples) == {s: float(s == "unloaded") for s in STATES}
    assert value(samples, "gpuboss_consumer_unloads_total", consumer="sleeper", model="") == 1
    assert value(samples, "gpuboss_consumer_unload_seconds_count") == 1
    assert value(samples, "gpuboss_consumer_loads_total", consumer="sleeper", model="") == 1


def _host(samples: Samples) -> str:
    hosts = {dict(labels)["host"] for name, labels in samples if name == "gpuboss_device_leased_bytes"}
    assert len(hosts) == 1, hosts
    return hosts.pop()
