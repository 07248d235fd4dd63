"""What the replay asks of a policy: the :class:`Allocator` protocol, and the messages between them.

The replay (:mod:`.replay`) models the services (loading, running, keeping warm, unloading); an
allocator decides only who holds memory where. It answers asynchronously, through
:meth:`Allocator.notices`: a request is granted now or later, a lease is asked to give its memory
back, or a request can never fit. The real scripts (:mod:`.engine`) and the baselines
(:mod:`.baselines`) implement it, so every policy replays the same jobs under the same service
model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

__all__ = ["Allocator", "Ask", "Notice"]


@dataclass(frozen=True, slots=True)
class Ask:
    """A lease request: its id (the lease's, once granted), holder, size and flags."""

    lease: str
    holder: str
    mib: int
    priority: int
    preemptible: bool
    grace_s: float


@dataclass(frozen=True, slots=True)
class Notice:
    """What an allocator tells the replay: ``granted`` (on ``device``), ``evict`` (give the lease
    back) or ``never`` (the request can never fit)."""

    kind: Literal["granted", "evict", "never"]
    lease: str
    device: str = ""


class Allocator(Protocol):
    """A policy that decides who holds memory. Every method takes the virtual time in seconds."""

    #: short name in tables and plots
    name: str

    def acquire(self, ask: Ask, now: float) -> None:
        """Ask for a lease; the answer comes as a notice, now or later."""

    def release(self, lease: str, now: float) -> None:
        """Give a granted lease back."""

    def revoke(self, lease: str, now: float) -> None:
        """End a victim that missed its grace deadline (its memory counts as free from now)."""

    def loaded(self, lease: str, now: float) -> None:
        """The lease's holder has loaded its model and starts running."""

    def idle(self, lease: str, now: float) -> None:
        """Keep the lease warm: resident, but evictable."""

    def busy(self, lease: str, now: float) -> bool:
        """Use a warm lease again; False if it is being evicted (it must be given back)."""

    def due(self) -> float | None:
        """When the allocator wants :meth:`tick` called next (a waiter's poll), if ever."""

    def tick(self, now: float) -> None:
        """Run what is due (polls, retries)."""

    def notices(self) -> list[Notice]:
        """The notices since the last call, in order."""
