"""The Redis key layout, spelled in this one place.

Every key of a pool carries the pool as a hash tag, so each script touches one slot and a Redis
Cluster can spread pools over nodes. The layout version sits in every key so it can change safely.

=====================================  =======  ============================================
key                                    type     holds
=====================================  =======  ============================================
``gpuboss:pools``                      set      names of pools that have devices
``gpuboss:{pool}:v1:devices``          set      device names of the pool
``gpuboss:{pool}:v1:device:<name>``    hash     total/reserved/unmanaged/used MiB, host, ...
``gpuboss:{pool}:v1:device:<n>:leases`` set     ids of the leases granted on that device
``gpuboss:{pool}:v1:lease:<id>``       hash     one lease or waiter: state, holder, mib, ...
``gpuboss:{pool}:v1:queue``            zset     waiters; score (100 - priority) * 2^40 + seq
``gpuboss:{pool}:v1:expiry``           zset     live leases and waiters by expiry (ms)
``gpuboss:{pool}:v1:wake:<id>``        list     a waiter blocks here until it is granted
``gpuboss:{pool}:v1:events``           stream   capped log of every transition
``gpuboss:{pool}:v1:seq``              string   arrival order and fencing tokens
``gpuboss:{pool}:v1:config``           hash     min_residency_ms, aging_ms; clock_ms (a simulation)
``gpuboss:{pool}:v1:device:<n>:evictable`` zset  idle and preemptible leases, eviction order
``gpuboss:{pool}:v1:peaks``            hash     label ``k=v`` -> highest measured MiB of its leases
``gpuboss:{pool}:v1:leases``           hash     lease id -> one line per granted lease, for operators
``gpuboss:{pool}:v1:admin``            (none)   never written: a capability, see :attr:`PoolKeys.admin`
=====================================  =======  ============================================

The Lua scripts receive :meth:`PoolKeys.script_keys` as ``KEYS`` and build the per-lease and
per-device keys from its first entry, the pool prefix, exactly as the methods below do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

__all__ = ["POOLS", "ROOT", "SCHEMA", "PoolKeys", "hash_slot", "valid_name", "valid_pool"]

ROOT = "gpuboss"
SCHEMA = "v1"
POOLS = f"{ROOT}:pools"

_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_POOL = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def valid_name(name: str) -> bool:
    """Whether ``name`` may be a lease id or device name (1-64 of ``[A-Za-z0-9_.:-]``)."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def valid_pool(pool: str) -> bool:
    """Whether ``pool`` may name a pool (1-64 of ``[A-Za-z0-9_.-]``)."""
    return isinstance(pool, str) and _POOL.fullmatch(pool) is not None


@dataclass(frozen=True, slots=True)
class PoolKeys:
    """The keys of one pool."""

    pool: str

    @property
    def prefix(self) -> str:
        return f"{ROOT}:{{{self.pool}}}:{SCHEMA}:"

    @property
    def devices(self) -> str:
        return self.prefix + "devices"

    @property
    def queue(self) -> str:
        return self.prefix + "queue"

    @property
    def expiry(self) -> str:
        return self.prefix + "expiry"

    @property
    def events(self) -> str:
        return self.prefix + "events"

    @property
    def seq(self) -> str:
        return self.prefix + "seq"

    @property
    def config(self) -> str:
        return self.prefix + "config"

    @property
    def peaks(self) -> str:
        """Per label ``k=v``, the highest MiB the agent measured for a lease carrying it."""
        return self.prefix + "peaks"

    @property
    def leases(self) -> str:
        """Per granted lease (not waiters), one line for ``redis-cli hgetall``: lease id ->
        ``"<holder> <host>:<pid> <mib>MiB <device[,device...]> <state> granted=<ms>"``."""
        return self.prefix + "leases"

    @property
    def wants(self) -> str:
        """The queue's census: per device, how many waiters name it; ``*``, how many take any
        device; ``#``, how many wait in all. Gone while nobody waits."""
        return self.prefix + "wants"

    @property
    def admin(self) -> str:
        """The pool's operator capability. It never exists: every operator-only script (add and
        remove a device, configure the pool, force-release, the agent's measurements) first runs
        ``SETRANGE`` on it with an empty value, a write that changes nothing, so that Redis refuses
        the script, before anything changed, to a user whose ACL does not let it run that or write
        this key (``deploy/redis-users.acl``: holders and observers)."""
        return self.prefix + "admin"

    def evictable(self, name: str) -> str:
        return f"{self.prefix}device:{name}:evictable"

    def device(self, name: str) -> str:
        return f"{self.prefix}device:{name}"

    def device_leases(self, name: str) -> str:
        return f"{self.prefix}device:{name}:leases"

    def lease(self, lease_id: str) -> str:
        return f"{self.prefix}lease:{lease_id}"

    def wake(self, lease_id: str) -> str:
        return f"{self.prefix}wake:{lease_id}"

    def script_keys(self) -> list[str]:
        """``KEYS`` for every script, in the order ``lua/_common.lua`` declares (do not mutate)."""
        return _script_keys(self.pool)


@cache
def _script_keys(pool: str) -> list[str]:
    k = PoolKeys(pool)
    return [k.prefix, k.devices, k.queue, k.expiry, k.events, k.seq, k.config]


def _crc16_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021 if crc & 0x8000 else crc << 1) & 0xFFFF
        table.append(crc)
    return tuple(table)


_CRC16 = _crc16_table()


def hash_slot(key: str) -> int:
    """The Redis Cluster slot of ``key``: CRC16 (XMODEM) of its hash tag (the part between the
    first ``{`` and the next ``}``, if not empty) or of the whole key, modulo 16384. Every key of a
    pool has the slot of the pool's name."""
    data = key.encode()
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[(crc >> 8) ^ byte]
    return crc % 16384
