"""Eviction: warm (idle) leases, preemption, claims, grace and revocation, plan and pool settings.

The first tests replay the documents the project grew from, with their numbers: mGPUmanager's
lazily loaded FLUX that must evict the idle TTS model, llmux's 16 GB card with LLM < TTS < ASR,
and GPU Manager V2's 24 GiB card shared by ComfyUI, CosyVoice, Vidi and Ollama. The rest pin the
rules down one by one. Everything runs on real Redis and on fakeredis.

Waiters are started in two ways: by driving the core's acquire generator by hand (:class:`Stepper`),
which stops where a real client would block on its wake list, so that the state in between can be
inspected; and by a real blocking ``acquire`` that returns once the victims are gone, which proves
the notice, ``on_evict``, release and wake-up path end to end.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis
from support import (
    Events,
    Stepper,
    Tier,
    claimed,
    field,
    join_evict_thread,
    other,
    redis_ms,
    snapshot,
    state,
    used,
)

from gpuboss_client import (
    AcquireTimeout,
    AsyncBoss,
    Boss,
    GpubossError,
    Lease,
    LeaseEvicted,
    LeaseLost,
    LeaseNotHeld,
    Plan,
    PoolKeys,
    _backend_aio,
)
from gpuboss_client import _core as core

GiB = 1024
POOL = PoolKeys("default")
LLM, TTS, ASR = "low", "normal", "high"  # llmux's tiers: 10 < 50 < 90


# --- helpers ---------------------------------------------------------------------------------


def wait_past(r: redis.Redis, ms: int) -> None:
    """Wait until Redis's clock has passed ``ms`` (polling Redis with a deadline)."""
    deadline = time.monotonic() + 5.0
    while redis_ms(r) <= ms:
        if time.monotonic() > deadline:
            pytest.fail(f"Redis time did not pass {ms}")
        time.sleep(0.002)  # nothing to block on: this watches Redis's clock


def tick(r: redis.Redis) -> None:
    """Let Redis's ms clock advance, so that the next ``used_at`` differs from the last."""
    wait_past(r, redis_ms(r))


def states(r: redis.Redis, *leases: Lease | str) -> list[str | None]:
    return [state(r, x if isinstance(x, str) else x.id) for x in leases]


def request(
    vram: int | str,
    rid: str,
    *,
    priority: int | str = "normal",
    device: str | None = None,
    preemptible: bool = False,
    grace: float = 10.0,
) -> core.AcquireRequest:
    return core.AcquireRequest.build(
        vram=vram, vram_gb=None, priority=priority, device=device, pool="default", ttl=60.0,
        timeout=None, labels=None, request_id=rid, preemptible=preemptible, grace=grace,
    )  # fmt: skip


def queue(boss: Boss, vram: int | str, rid: str, **kw: Any) -> Stepper:
    """Start an acquire that must wait; returns it stopped where it would block."""
    s = Stepper(boss, request(vram, rid, **kw))
    assert s.blocked, f"{rid} was expected to wait, got {s.value!r}"
    assert state(boss.redis, rid) == "queued"
    return s


def quiet_lease(boss: Boss, vram: int | str, rid: str, **kw: Any) -> Lease:
    """A lease whose notice channel nobody listens on: it learns of eviction only from replies."""
    s = Stepper(boss, request(vram, rid, **kw), holder=core.Holder.of("quiet", None, None))
    return s.lease


def load(boss: Boss, model: str, vram: int | str, priority: int | str, **kw: Any) -> Lease:
    """A model loaded, then kept warm between requests (an idle lease)."""
    lease = boss.acquire(vram, priority=priority, ttl=60, request_id=model, **kw)
    lease.idle()
    return lease


# --- the seeds -------------------------------------------------------------------------------


@pytest.mark.parametrize(("card", "evicts"), [("20GiB", True), ("24GiB", False)])
def test_mgpumanager_lazy_flux_evicts_idle_mvoice_first_only_when_both_do_not_fit(
    boss: Boss, card: str, evicts: bool
) -> None:
    """mGPUmanager's live bug: ComfyUI loads FLUX (13 GiB) lazily, at the first /v1/image, and
    OOMed on top of the still resident mvoice (2345 MiB). Asking for the lease first evicts mvoice
    where both do not fit beside the always-on whisper-server; where they fit, nothing goes."""
    r = boss.redis
    boss.add_device("gpu0", card)
    whisper = other(boss, "whisper-server").acquire(6538, ttl=60)  # always on: never evicted
    unloaded: list[str] = []
    mvoice_client = other(boss, "mvoice")
    mvoice = mvoice_client.acquire(
        2345, ttl=60, request_id="mvoice", on_evict=lambda x: unloaded.append(x.id)
    )
    mvoice.idle()  # the TTS request is done; the model stays resident
    log = Events(r)

    flux = other(boss, "comfyui").acquire("13GiB", ttl=60, timeout=5, request_id="flux")

    assert flux.device == "gpu0"
    if evicts:  # 6538 + 2345 + 13312 > 20480
        join_evict_thread(mvoice)
        assert unloaded == ["mvoice"]
        assert log.pairs() == [("queued", "flux"), ("evicting", "mvoice"), ("released", "mvoice"),
                               ("granted", "flux")]  # fmt: skip
        assert states(r, whisper, mvoice) == ["active", "released"]
        assert used(r) == 6538 + 13 * GiB
    else:  # 22195 MiB fit in 24 GiB
        assert unloaded == []
        assert log.pairs() == [("granted", "flux")]
        assert states(r, whisper, mvoice) == ["active", "idle"]
        assert used(r) == 6538 + 2345 + 13 * GiB
    assert claimed(r) == 0


def llmux_card(boss: Boss) -> tuple[Lease, Lease, Lease]:
    """llmux's test fixture: a 16 GB card, ASR 4 + TTS 2 + LLM 4 loaded and kept warm."""
    boss.add_device("gpu0", "16GiB")
    asr = load(boss, "cohere-transcribe", "4GiB", ASR)
    tts = load(boss, "chatterbox-multilingual", "2GiB", TTS)
    llm = load(boss, "qwen3.5-4b", "4GiB", LLM)
    return asr, tts, llm


@pytest.mark.parametrize(
    ("gib", "victims"),
    [
        # Evict LLM (4) and TTS (2): 12 fits beside ASR, which survives.
        (12, ["qwen3.5-4b", "chatterbox-multilingual"]),
        # 13 does not fit beside ASR: ASR goes as the last resort. The seed then evicts all three;
        # here LLM + ASR free 14 GiB, so the TTS model (2 GiB) is not needed and stays.
        (13, ["qwen3.5-4b", "cohere-transcribe"]),
        # 15 needs all of it.
        (15, ["qwen3.5-4b", "chatterbox-multilingual", "cohere-transcribe"]),
    ],
)
def test_llmux_large_llm_cascades_through_higher_tiers_only_as_far_as_it_must(
    boss: Boss, gib: int, victims: list[str]
) -> None:
    r = boss.redis
    asr, tts, llm = llmux_card(boss)
    everyone = [asr.id, tts.id, llm.id]
    assert boss.plan(f"{gib}GiB", priority=LLM) == Plan("evict", "gpu0", tuple(victims))
    log = Events(r)

    big = queue(boss, f"{gib}GiB", "gpt-oss-20b", priority=LLM)

    assert [e["lease"] for e in log.new() if e["event"] == "evicting"] == victims
    assert states(r, *everyone) == ["evicting" if x in victims else "idle" for x in everyone]
    assert claimed(r) == gib * GiB
    for lease in (asr, tts, llm):
        if lease.id in victims:
            boss.release(lease)  # the backend unloads it
    lease = big.woken()
    assert lease.id == "gpt-oss-20b"
    assert states(r, *everyone) == ["released" if x in victims else "idle" for x in everyone]
    assert claimed(r) == 0
    assert used(r) == gib * GiB + sum(x.mib for x in (asr, tts, llm) if x.id not in victims)


def test_llmux_tts_that_fits_evicts_nothing_and_a_replacement_evicts_the_old_tts_never_asr(
    boss: Boss,
) -> None:
    r = boss.redis
    boss.add_device("gpu0", "16GiB")
    asr = load(boss, "cohere-transcribe", "4GiB", ASR)
    llm = load(boss, "qwen3.5-9b-fp8", "9GiB", LLM)
    log = Events(r)
    # 13 GiB used, 3 free: the TTS model fits beside both and evicts nothing.
    tts = boss.acquire("2GiB", priority=TTS, ttl=60, timeout=0, request_id="chatterbox")
    assert log.pairs() == [("granted", "chatterbox")]
    tts.idle()
    # 15 used, 1 free; a new TTS model needs 2. While the LLM is idle, it goes first (lowest tier).
    assert boss.plan("2GiB", priority=TTS).victims == ("qwen3.5-9b-fp8",)
    llm.busy()  # serving a prompt now: then the old TTS model makes room (same tier), never ASR
    assert boss.plan("2GiB", priority=TTS).victims == ("chatterbox",)
    log.new()

    new = queue(boss, "2GiB", "chatterbox-ml", priority=TTS)

    assert [(e["event"], e["lease"]) for e in log.new()] == [
        ("queued", "chatterbox-ml"), ("evicting", "chatterbox"),
    ]  # fmt: skip
    boss.release(tts)
    assert new.woken().device == "gpu0"
    assert states(r, asr, llm, tts) == ["idle", "active", "released"]


def test_llmux_asr_request_evicts_the_llm_and_not_the_reverse(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", "16GiB")
    asr = load(boss, "cohere-transcribe", "4GiB", ASR)
    llm = load(boss, "qwen3.5-9b-fp8", "9GiB", LLM)
    # An LLM request evicts the old LLM (same tier), not ASR, though ASR would make room as well.
    assert boss.plan("6GiB", priority=LLM).victims == ("qwen3.5-9b-fp8",)
    log = Events(r)

    asr2 = queue(boss, "6GiB", "whisper-large-v3", priority=ASR)

    assert [e["lease"] for e in log.new() if e["event"] == "evicting"] == ["qwen3.5-9b-fp8"]
    assert states(r, asr, llm) == ["idle", "evicting"]
    boss.release(llm)
    assert asr2.woken().mib == 6 * GiB
    assert states(r, asr, llm) == ["idle", "released"]


def test_gpu_manager_v2_comfyui_preempts_what_it_must_and_lower_priorities_never_preempt(
    boss: Boss,
) -> None:
    """GPU Manager V2 on one 24 GiB card: ComfyUI 20 GiB (priority 100), CosyVoice 4 GiB (50),
    Vidi 4 GiB (40), Ollama 18 GiB (10); services may be preempted by higher ones."""
    r = boss.redis
    boss.add_device("gpu0", "24GiB")
    stopped: list[str] = []
    ollama_client = other(boss, "ollama")
    ollama = ollama_client.acquire(
        "18GiB", priority=10, preemptible=True, ttl=60, request_id="ollama",
        on_evict=lambda x: stopped.append(x.id),
    )  # fmt: skip
    cosyvoice = load(other(boss, "cosyvoice"), "cosyvoice", "4GiB", 50, preemptible=True)
    # 22 used, 2 free. ComfyUI needs 18 more: Ollama alone frees them, so CosyVoice stays warm
    # even though it is idle and would be taken first (it turns out unnecessary).
    assert boss.plan("20GiB", priority=100) == Plan("evict", "gpu0", ("ollama",))
    log = Events(r)

    comfyui = other(boss, "comfyui").acquire(
        "20GiB", priority=100, preemptible=True, ttl=60, timeout=5, request_id="comfyui"
    )

    join_evict_thread(ollama)
    assert stopped == ["ollama"]
    assert log.pairs() == [("queued", "comfyui"), ("evicting", "ollama"), ("released", "ollama"),
                           ("granted", "comfyui")]  # fmt: skip
    assert states(r, comfyui, cosyvoice) == ["active", "idle"]
    assert used(r) == 24 * GiB

    # Ollama returns (10): ComfyUI is preemptible but of higher priority, CosyVoice too small.
    assert boss.plan("18GiB", priority=10) == Plan("wait", ahead=0)
    back = queue(ollama_client, "18GiB", "ollama-2", priority=10, preemptible=True)
    cosyvoice.busy()  # Phase 3 again: CosyVoice in use (active, preemptible, 50)
    # Vidi (40) may not preempt CosyVoice (50), nor may anything of equal priority; 51 may.
    assert boss.plan("4GiB", priority=40) == Plan("wait", ahead=0)
    assert boss.plan("4GiB", priority=50) == Plan("wait", ahead=0)
    assert boss.plan("4GiB", priority=51) == Plan("evict", "gpu0", ("cosyvoice",))
    assert [e["event"] for e in log.new()] == ["queued", "busy"]  # nobody was asked to leave
    assert states(r, comfyui, cosyvoice, back.id) == ["active", "active", "queued"]
    assert claimed(r) == 0


# --- who is evicted, and when ----------------------------------------------------------------


def test_no_eviction_when_free_memory_suffices(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", "16GiB")
    warm = load(boss, "warm", "8GiB", "low")
    log = Events(r)
    assert boss.plan("8GiB", priority="high") == Plan("grant", "gpu0")
    lease = boss.acquire("8GiB", priority="high", timeout=0)
    assert log.pairs() == [("granted", lease.id)]
    assert states(r, warm) == ["idle"]


def test_nothing_is_evicted_when_no_set_of_victims_would_make_room(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", "16GiB")
    serving = boss.acquire("10GiB", priority="low", ttl=60)  # active, not preemptible: never a victim
    warm = load(boss, "warm", "2GiB", "low")
    # 4 GiB free + 2 GiB idle < 8 GiB: evicting the idle lease would not help, so it stays.
    assert boss.plan("8GiB", priority=100) == Plan("wait", ahead=0)
    log = Events(r)
    queue(boss, "8GiB", "big", priority=100)
    assert log.pairs() == [("queued", "big")]
    assert states(r, serving, warm) == ["active", "idle"]
    assert claimed(r) == 0


def test_preemptible_active_lease_goes_only_for_strictly_higher_priority(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", "8GiB")
    batch = boss.acquire("8GiB", priority=50, preemptible=True, ttl=60)
    assert boss.plan("8GiB", priority=50) == Plan("wait", ahead=0)
    log = Events(r)
    equal = queue(boss, "8GiB", "equal", priority=50)
    assert state(r, batch.id) == "active"
    higher = queue(boss, "8GiB", "higher", priority=51)
    assert log.pairs() == [("queued", "equal"), ("queued", "higher"), ("evicting", batch.id)]
    boss.release(batch)
    assert higher.woken().id == "higher"
    assert equal.blocked
    assert state(r, "equal") == "queued"


@pytest.mark.parametrize(
    ("layout", "victim"),
    [
        # idle before active-preemptible, even when the active one has the lower priority
        ([("batch", 10, "preemptible"), ("warm", 50, "idle")], "warm"),
        # lower priority first, even when it was used more recently
        ([("normal", 50, "idle"), ("low", 10, "idle")], "low"),
        # within a priority, least recently used first
        ([("older", 50, "idle"), ("newer", 50, "idle")], "older"),
    ],
)
def test_eviction_order(boss: Boss, layout: list[tuple[str, int, str]], victim: str) -> None:
    r = boss.redis
    boss.add_device("gpu0", "8GiB")
    for rid, priority, kind in layout:
        lease = boss.acquire("4GiB", priority=priority, preemptible=kind == "preemptible", ttl=60,
                             request_id=rid)  # fmt: skip
        if kind == "idle":
            lease.idle()
        tick(r)  # used_at has ms resolution: the next one is strictly later
    assert boss.plan("4GiB", priority=90) == Plan("evict", "gpu0", (victim,))
    queue(boss, "4GiB", "next", priority=90)
    assert [rid for rid, _p, _k in layout if state(r, rid) == "evicting"] == [victim]


def test_least_recently_used_follows_idle_and_busy(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", "8GiB")
    a = load(boss, "a", "4GiB", 50)
    tick(r)
    b = load(boss, "b", "4GiB", 50)
    assert boss.plan("4GiB", priority=50).victims == ("a",)
    tick(r)
    a.busy()
    a.idle()  # a was just used: b is now the least recently used
    assert boss.plan("4GiB", priority=50).victims == ("b",)
    queue(boss, "4GiB", "next")
    assert states(r, a, b) == ["idle", "evicting"]


def test_minimal_victims_a_small_one_is_dropped_when_a_bigger_one_alone_suffices(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", "12GiB")
    boss.acquire("4GiB", ttl=60)
    small = load(boss, "small", "1GiB", 10)  # first in eviction order (least recently used)
    tick(r)
    big = load(boss, "big", "6GiB", 10)
    # 1 GiB free, 5 needed: greedy takes small then big; small turns out unnecessary.
    assert boss.plan("5GiB", priority=50).victims == ("big",)
    queue(boss, "5GiB", "next")
    assert states(r, small, big) == ["idle", "evicting"]
    assert claimed(r) == 5 * GiB


@pytest.mark.parametrize(
    ("gpu0", "gpu1", "device", "victims"),
    [
        # the lowest level first: two low idle leases rather than one higher-priority idle lease
        ([("hi", 4, 90, "idle")], [("l1", 2, 10, "idle"), ("l2", 2, 10, "idle")], "gpu1", ("l1", "l2")),
        # then the fewest active victims: two idle leases rather than one preemptible active lease
        ([("batch", 4, 10, "preemptible")], [("i1", 2, 10, "idle"), ("i2", 2, 10, "idle")], "gpu1",
         ("i1", "i2")),
        # then the fewest victims
        ([("one", 4, 10, "idle")], [("i1", 2, 10, "idle"), ("i2", 2, 10, "idle")], "gpu0", ("one",)),
        # then the least memory freed
        ([("i8", 8, 10, "idle")], [("i4", 4, 10, "idle")], "gpu1", ("i4",)),
    ],
)  # fmt: skip
def test_across_devices_the_cheapest_set_wins(
    boss: Boss, gpu0: list[tuple[str, int, int, str]], gpu1: list[tuple[str, int, int, str]], device: str,
    victims: tuple[str, ...],
) -> None:  # fmt: skip
    for name, leases in (("gpu0", gpu0), ("gpu1", gpu1)):
        boss.add_device(name, "8GiB")
        for rid, gib, priority, kind in leases:
            lease = boss.acquire(gib * GiB, priority=priority, device=name, ttl=60, request_id=rid,
                                 preemptible=kind == "preemptible")  # fmt: skip
            if kind == "idle":
                lease.idle()
        if sum(gib for _r, gib, _p, _k in leases) < 8:  # the rest is in use
            boss.acquire((8 - sum(gib for _r, gib, _p, _k in leases)) * GiB, device=name, ttl=60)
    assert boss.plan("4GiB", priority=50) == Plan("evict", device, victims)
    queue(boss, "4GiB", "next")
    assert claimed(boss.redis, device) == 4 * GiB
    assert [rid for rid, *_ in gpu0 + gpu1 if state(boss.redis, rid) == "evicting"] == list(victims)


def test_min_residency_spares_young_leases_unless_nothing_else_fits(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", "12GiB")
    boss.acquire("4GiB", ttl=60)
    old = load(boss, "old", "4GiB", 50)
    wait_past(r, int(field(r, "old", "granted_at") or 0) + 400)
    young = load(boss, "young", "4GiB", 10)  # lower priority: first in eviction order
    assert boss.plan("4GiB", priority=50).victims == ("young",)
    gap = int(field(r, "young", "granted_at") or 0) - int(field(r, "old", "granted_at") or 0)
    boss.configure_pool(min_residency=(gap - 20) / 1000)  # old is older than that, young is not
    assert r.hget(POOL.config, "min_residency_ms") == str(gap - 20)
    assert boss.plan("4GiB", priority=50).victims == ("old",)
    # 8 GiB: old alone is not enough; only then may the young one go too.
    assert boss.plan("8GiB", priority=50).victims == ("young", "old")
    queue(boss, "4GiB", "next")
    assert states(r, old, young) == ["evicting", "idle"]


# --- claims, grace and revocation ------------------------------------------------------------


def test_claimed_memory_goes_only_to_the_request_that_caused_the_eviction(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", "16GiB")
    other(boss, "serving").acquire("8GiB", ttl=60)
    a = load(boss, "a", "4GiB", "low")
    b = load(boss, "b", "4GiB", "low")
    requester = queue(boss, "8GiB", "requester")
    assert states(r, a, b) == ["evicting", "evicting"]
    assert claimed(r) == 8 * GiB

    def nobody_else_gets_it() -> None:
        for priority in (0, 50, 100):
            assert boss.plan("4GiB", priority=priority).outcome == "wait"
            with pytest.raises(AcquireTimeout):
                boss.acquire("4GiB", priority=priority, timeout=0)

    nobody_else_gets_it()  # while the victims are evicting
    boss.release(a)
    assert used(r) == 12 * GiB
    nobody_else_gets_it()  # 4 GiB are free now, but promised to the requester
    assert requester.blocked
    boss.release(b)
    assert requester.woken().mib == 8 * GiB
    assert claimed(r) == 0
    assert used(r) == 16 * GiB


def test_a_higher_priority_waiter_does_not_stall_the_claimant(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", "16GiB")
    other(boss, "serving").acquire("8GiB", ttl=60)
    victim = load(boss, "victim", "8GiB", "low")
    requester = queue(boss, "8GiB", "requester", priority="normal")
    urgent = queue(boss, "8GiB", "urgent", priority="high")  # nothing left to evict: it waits
    assert claimed(r) == 8 * GiB
    boss.release(victim)
    # The freed memory was promised to the requester: it is granted, the urgent one keeps waiting.
    assert states(r, "requester", "urgent") == ["active", "queued"]
    assert requester.woken().id == "requester"
    assert urgent.blocked


def test_victim_that_does_not_give_back_by_its_deadline_is_revoked(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", "8GiB")
    stuck_client = other(boss, "stuck")
    # (a short TTL: the server revokes no earlier than the victim's expiry)
    stuck = stuck_client.acquire("8GiB", priority="low", ttl=1.0, grace=0.2, request_id="stuck")
    stuck.idle()
    log = Events(r)

    # Blocks until the victim's deadline passes; the waiter then reaps it and is granted.
    lease = boss.acquire("8GiB", priority="high", ttl=60, timeout=5, request_id="requester")

    events = log.new()
    assert [(e["event"], e["lease"]) for e in events] == [
        ("queued", "requester"), ("evicting", "stuck"), ("revoked", "stuck"), ("granted", "requester"),
    ]  # fmt: skip
    evicting = events[1]
    deadline = int(evicting["deadline"])
    assert {k: evicting[k] for k in ("holder", "device", "mib", "priority", "for")} == {
        "holder": "stuck", "device": "gpu0", "mib": str(8 * GiB), "priority": "10", "for": "requester",
    }  # fmt: skip
    assert int(field(r, "requester", "granted_at") or 0) >= deadline
    assert state(r, "stuck") == "revoked"
    assert stuck.evicting
    assert stuck.evict_deadline_ms == deadline
    # Its token no longer works: every call says it was evicted, and nothing of the new grant moves.
    with pytest.raises(LeaseEvicted):
        stuck_client.heartbeat(stuck)
    with pytest.raises(LeaseEvicted):
        stuck_client.release(stuck)
    with pytest.raises(LeaseEvicted):
        stuck.busy()
    assert stuck.lost
    assert (state(r, "requester"), used(r), claimed(r)) == ("active", 8 * GiB, 0)
    boss.release(lease)


def test_a_victim_is_revoked_no_earlier_than_its_expiry_whatever_its_grace(boss: Boss) -> None:
    """Its holder may not have heard the notice (pub/sub is at most once), and trusts the lease until
    its local deadline, before the expiry: the deadline is the later of the grace and the expiry."""
    r = boss.redis
    boss.add_device("gpu0", "8GiB")
    victim = other(boss, "deaf").acquire("8GiB", priority="low", ttl=30, grace=0.1, keepalive=False)
    victim.idle()
    expires_at = int(field(r, victim.id, "expires_at") or 0)
    with pytest.raises(AcquireTimeout):
        boss.acquire("8GiB", priority="high", timeout=0.2, request_id="requester")
    assert state(r, victim.id) == "evicting"
    assert int(field(r, victim.id, "evict_deadline") or 0) == expires_at
    assert expires_at > redis_ms(r) + 20_000


def test_requester_that_times_out_while_victims_evict_gives_up_its_claim(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", "8GiB")
    load(boss, "warm", "8GiB", "low")  # asked to leave, but takes its 10 s grace
    with pytest.raises(AcquireTimeout):
        boss.acquire("8GiB", priority="high", timeout=0.2, request_id="impatient")
    assert r.hget(POOL.device("gpu0"), "claimed_mib") == "0"
    assert state(r, "impatient") == "cancelled"
    assert r.zcard(POOL.queue) == 0


def test_timeout_zero_never_evicts(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", "8GiB")
    load(boss, "warm", "8GiB", "low")
    assert boss.plan("8GiB", priority="high") == Plan("evict", "gpu0", ("warm",))
    before = snapshot(r)
    with pytest.raises(AcquireTimeout):
        boss.acquire("8GiB", priority="high", timeout=0)
    assert snapshot(r) == before


# --- idle, busy, heartbeat and on_evict ------------------------------------------------------


def test_idle_and_busy_move_a_lease_and_append_their_events(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", "8GiB")
    lease = boss.acquire("8GiB", priority="low", ttl=60)
    log = Events(r)
    lease.idle()
    assert state(r, lease.id) == "idle"
    assert r.zrange(POOL.evictable("gpu0"), 0, -1) == [lease.id]
    lease.idle()  # already idle: no transition
    lease.busy()
    assert state(r, lease.id) == "active"
    assert r.zcard(POOL.evictable("gpu0")) == 0
    lease.busy()
    assert log.new() == [
        {"event": e, "lease": lease.id, "holder": "test", "device": "gpu0", "mib": str(8 * GiB)}
        for e in ("idle", "busy")
    ]
    lease.idle()
    boss.release(lease)
    with pytest.raises(LeaseLost):
        lease.busy()
    with pytest.raises(LeaseLost):
        lease.idle()


def test_idle_and_busy_with_a_wrong_token_change_nothing(boss: Boss) -> None:
    boss.add_device("gpu0", "8GiB")
    lease = boss.acquire("8GiB", ttl=60)
    forged = core.Lease(lease.info, deadline=lease.deadline, clock=time.monotonic)
    forged.token = lease.token + 1
    before = snapshot(boss.redis)
    for verb in (boss.idle, boss.busy):
        with pytest.raises(LeaseNotHeld) as caught:
            verb(forged)
        assert not isinstance(caught.value, LeaseLost)
    assert snapshot(boss.redis) == before
    lease.idle()  # the real holder still can


def test_idle_reports_an_eviction_and_busy_refuses_it(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", "8GiB")
    lease = quiet_lease(boss, "8GiB", "warm", priority="low")
    boss.idle(lease)
    requester = queue(boss, "8GiB", "requester", priority="high")
    assert state(r, "warm") == "evicting"
    assert not lease.evicting  # nobody listens on its channel: it learns from the next reply
    before = snapshot(r)
    boss.idle(lease)  # reports it, without raising
    assert lease.evicting
    assert lease.evict_deadline_ms == int(field(r, "warm", "evict_deadline") or 0)
    with pytest.raises(LeaseEvicted):
        boss.busy(lease)
    assert snapshot(r) == before
    assert not lease.lost  # still held until it gives the memory back or the deadline passes
    boss.release(lease)
    assert requester.woken().id == "requester"


def test_a_lease_going_idle_is_evicted_at_once_for_a_waiter_that_needs_it(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", "8GiB")
    lease = quiet_lease(boss, "8GiB", "serving", priority="low")
    requester = queue(boss, "8GiB", "requester", priority="high")
    assert claimed(r) == 0  # active and not preemptible: nothing to evict yet
    log = Events(r)
    boss.idle(lease)
    assert lease.evicting  # the idle reply says so at once
    assert log.pairs() == [("idle", "serving"), ("evicting", "serving")]
    assert claimed(r) == 8 * GiB
    boss.release(lease)
    assert requester.woken().id == "requester"


def test_heartbeat_reply_tells_the_holder_it_is_being_evicted(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", "8GiB")
    lease = quiet_lease(boss, "8GiB", "warm", priority="low")
    boss.idle(lease)
    assert boss.heartbeat(lease).state == "idle"
    assert not lease.evicting
    queue(boss, "8GiB", "requester", priority="high")
    assert not lease.evicting
    info = boss.heartbeat(lease)
    assert info.state == "evicting"
    assert lease.evicting
    assert lease.evict_deadline_ms == int(field(r, "warm", "evict_deadline") or 0)
    assert lease.evict_deadline_ms > redis_ms(r)
    assert not lease.lost


def test_on_evict_runs_once_then_the_client_releases_the_lease(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", "8GiB")
    tts_client = other(boss, "tts")
    seen: list[tuple[str, str | None, str]] = []

    def unload(lease: Lease) -> None:
        # The heartbeat and idle replies carry the notice too; neither runs on_evict again.
        beat = tts_client.heartbeat(lease).state
        tts_client.idle(lease)
        seen.append((lease.id, state(r, lease.id), beat))

    tts = tts_client.acquire("8GiB", priority="low", ttl=60, request_id="tts", on_evict=unload)
    tts.idle()
    lease = boss.acquire("8GiB", priority="high", ttl=60, timeout=5, request_id="requester")
    join_evict_thread(tts)
    assert seen == [("tts", "evicting", "evicting")]
    assert state(r, "tts") == "released"
    assert tts.evicting
    with pytest.raises(LeaseLost):
        tts_client.heartbeat(tts)
    assert len(seen) == 1
    assert lease.device == "gpu0"


# --- plan and pool settings ------------------------------------------------------------------


def test_plan_grant_evict_never_and_changes_nothing(boss: Boss) -> None:
    r = boss.redis
    boss.add_device("gpu0", "16GiB")
    boss.add_device("gpu1", "8GiB")
    assert boss.plan("4GiB") == Plan("grant", "gpu1")  # best fit
    boss.acquire("8GiB", device="gpu1", ttl=60)
    boss.acquire("8GiB", device="gpu0", ttl=60)
    load(boss, "warm", "8GiB", "low")
    before = snapshot(r)
    evict = boss.plan("8GiB", priority="normal")
    assert evict == Plan("evict", "gpu0", ("warm",))
    assert str(evict) == "would evict warm on gpu0"
    never = boss.plan("17GiB")
    assert never == Plan("never", largest_mib=16 * GiB)
    assert "16384" in str(never)
    assert boss.plan("8GiB", priority="normal", device="gpu1") == Plan("wait", ahead=0)
    assert snapshot(r) == before
    # What plan said is what acquire does.
    queue(boss, "8GiB", "next")
    assert state(r, "warm") == "evicting"


def test_plan_wait_counts_the_requests_ahead(boss: Boss) -> None:
    boss.add_device("gpu0", "8GiB")
    boss.acquire("8GiB", ttl=60)
    queue(boss, "4GiB", "high", priority="high")
    queue(boss, "4GiB", "normal", priority="normal")
    before = snapshot(boss.redis)
    assert boss.plan("4GiB", priority="low") == Plan("wait", ahead=2)
    assert boss.plan("4GiB", priority="normal") == Plan("wait", ahead=2)
    assert boss.plan("4GiB", priority="high") == Plan("wait", ahead=1)
    assert boss.plan("4GiB", priority=100) == Plan("wait", ahead=0)
    assert str(boss.plan("4GiB", priority="low")) == "would wait behind 2"
    assert snapshot(boss.redis) == before


@pytest.mark.parametrize(("aging", "first"), [(0.05, "old"), (0, "new")])
def test_aging_lets_an_old_low_priority_waiter_overtake(boss: Boss, aging: float, first: str) -> None:
    r = boss.redis
    boss.add_device("gpu0", "8GiB")
    holder = boss.acquire("8GiB", ttl=60)
    log = Events(r)
    boss.configure_pool(aging=aging)
    assert log.new() == [
        {"event": "pool_configured", "min_residency_ms": "0", "aging_ms": str(int(aging * 1000))}
    ]
    old = queue(boss, "8GiB", "old", priority="low")
    new = queue(boss, "8GiB", "new", priority="normal")
    # Six aging periods: low (10) + 6 * 10 > normal (50).
    wait_past(r, int(field(r, "old", "requested_at") or 0) + 300)
    old.repoll()  # the waiter polls again, as it does every third of its TTL
    assert old.blocked
    ahead = (r.zscore(POOL.queue, "old") or 0) < (r.zscore(POOL.queue, "new") or 0)
    assert ahead == (first == "old")
    boss.release(holder)
    winner, loser = (old, new) if first == "old" else (new, old)
    assert winner.woken().id == first
    assert loser.blocked
    assert state(r, loser.id) == "queued"


# --- AsyncBoss -------------------------------------------------------------------------------


def test_async_idle_busy_plan_and_an_async_on_evict(tier: Tier) -> None:
    r = tier.sync
    done: list[str] = []
    errors: list[GpubossError] = []

    async def main() -> None:
        async with AsyncBoss(tier.make_async(), holder="tts") as tts_client, \
                AsyncBoss(tier.make_async(), holder="asr") as asr_client:  # fmt: skip

            async def unload(lease: Lease) -> None:
                await asyncio.sleep(0)  # an unload that awaits
                try:
                    await lease.busy()
                except LeaseEvicted as exc:
                    errors.append(exc)
                done.append(lease.id)

            await tts_client.add_device("gpu0", "16GiB")
            tts = await tts_client.acquire("12GiB", priority=TTS, ttl=60, request_id="tts", on_evict=unload)
            await tts.idle()
            assert state(r, "tts") == "idle"
            await tts.busy()
            assert state(r, "tts") == "active"
            assert await asr_client.plan("8GiB", priority=ASR) == Plan("wait", ahead=0)
            await tts.idle()
            assert await asr_client.plan("8GiB", priority=ASR) == Plan("evict", "gpu0", ("tts",))
            lease = await asr_client.acquire("8GiB", priority=ASR, ttl=60, timeout=5, request_id="asr")
            assert lease.device == "gpu0"
            evicts = [t for t in _backend_aio._tasks if t.get_name() == "gpuboss-evict-tts"]
            await asyncio.gather(*evicts)  # the task that ran unload and released
            await asr_client.release(lease)

    asyncio.run(main())
    assert done == ["tts"]
    assert [e.code for e in errors] == ["lease_evicted"]
    assert state(r, "tts") == "released"
    assert state(r, "asr") == "released"


# --- the queue walk on several devices -----------------------------------------------------------


def test_a_waiter_granted_elsewhere_frees_its_promise_for_the_rest_of_the_walk(boss: Boss) -> None:
    """A waiter with an eviction under way on gpu0 is granted on gpu1 when room appears there. The
    memory it was promised on gpu0 is free again at once: a waiter behind it in the same walk that
    fits on gpu0 is granted by that same release, and nothing else on gpu0 is evicted."""
    r = boss.redis
    boss.add_device("gpu0", 6000)
    boss.add_device("gpu1", 3500)
    victim = load(boss, "victim", 3000, "low", device="gpu0")
    tick(r)
    spare = load(boss, "spare", 1000, "low", device="gpu0")  # idle too, but more recently used
    blocker = boss.acquire(2000, device="gpu1", ttl=60)
    big = queue(boss, 3000, "big", priority="high")  # gpu0 has 2000 free, gpu1 1500: evicts victim
    assert states(r, victim, spare) == ["evicting", "idle"]
    assert claimed(r, "gpu0") == 3000
    small = queue(boss, 1800, "small")  # fits nowhere: gpu0's free memory is promised to big

    boss.release(blocker)  # gpu1 is empty: big fits there now

    assert big.woken().device == "gpu1"
    assert claimed(r, "gpu0") == 0
    # gpu0 has 6000 - 3000 (victim, still unloading) - 1000 (spare) = 2000 free: small fits
    assert state(r, "small") == "active"
    assert small.woken().device == "gpu0"
    assert states(r, spare) == ["idle"]


def test_a_waiter_whose_memory_is_promised_holds_back_nothing(boss: Boss) -> None:
    """A waiter whose victims are unloading has its memory promised: a smaller request behind it
    that fits in what is free and unpromised elsewhere is granted at once, and evicts nobody."""
    r = boss.redis
    boss.add_device("gpu0", 4000)
    boss.add_device("gpu1", 4000)
    victim = load(boss, "victim", 3000, "low", device="gpu0")
    boss.acquire(3000, device="gpu1", ttl=60)
    big = queue(boss, 3000, "big", priority="high")
    assert states(r, victim) == ["evicting"]

    small = boss.acquire(900, ttl=60, timeout=0)

    assert small.device == "gpu1"
    assert state(r, "big") == "queued"
    assert big.blocked


def test_a_waiter_that_fits_is_granted_by_its_next_poll(boss: Boss) -> None:
    """Room that appeared without a walk of the queue (here written behind the scripts' back, as a
    stand-in for any path that misses one) is found by the waiter's next poll."""
    r = boss.redis
    boss.add_device("gpu0", 4096)
    holder = boss.acquire(4000, ttl=60)
    waiter = queue(boss, 1000, "waiter", priority="high")
    assert waiter.blocked
    r.hincrby(POOL.device("gpu0"), "total_mib", 2048)

    waiter.repoll()

    assert not waiter.blocked
    assert waiter.lease.device == "gpu0"
    assert state(r, "waiter") == "active"
    boss.release(holder)
