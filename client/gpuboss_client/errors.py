"""One error tree for every surface.

Each error has a stable ``code`` (also what the Lua scripts reply), a ``retryable`` flag, the HTTP
status the service answers with and the exit code the CLI ends with.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "ERRORS",
    "AcquireTimeout",
    "BackendForbidden",
    "BackendUnavailable",
    "BadRequest",
    "ConsumerNotFound",
    "ConsumerUnhealthy",
    "ConsumerUnreachable",
    "DeviceBusy",
    "DeviceNotFound",
    "Forbidden",
    "GpubossError",
    "InsufficientVram",
    "LeaseEvicted",
    "LeaseLost",
    "LeaseNotFound",
    "LeaseNotHeld",
    "MethodNotAllowed",
    "NoConsumer",
    "NotFound",
    "PayloadTooLarge",
    "PoolNotFound",
    "ProtocolError",
    "QueueFull",
    "RequestConflict",
    "Unauthorized",
    "error_for",
]


class GpubossError(Exception):
    """Base of every gpuboss error."""

    code: ClassVar[str] = "error"
    retryable: ClassVar[bool] = False
    http_status: ClassVar[int] = 500
    exit_code: ClassVar[int] = 1

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        """The JSON body of this error: ``{"error", "message", "retryable", ...details}``."""
        return {"error": self.code, "message": self.message, "retryable": self.retryable} | {
            k: v for k, v in self.details.items() if v is not None
        }


class BadRequest(GpubossError):
    """The request is malformed: a bad size, priority, name, TTL or id. Nothing was changed."""

    code = "bad_request"
    http_status = 400
    exit_code = 2


class MethodNotAllowed(BadRequest):
    """The route exists, but not with this HTTP method (its ``Allow`` header says which)."""

    code = "method_not_allowed"
    http_status = 405
    exit_code = 22


class PayloadTooLarge(BadRequest):
    """The request's body is over the service's limit."""

    code = "payload_too_large"
    http_status = 413
    exit_code = 23


class NotFound(GpubossError):
    """Something named in the request does not exist."""

    code = "not_found"
    http_status = 404
    exit_code = 3


class LeaseNotFound(NotFound):
    """No lease with that id (it never existed, or ended long enough ago to be forgotten)."""

    code = "lease_not_found"
    exit_code = 3


class DeviceNotFound(NotFound):
    """No device with that name in the pool."""

    code = "device_not_found"
    exit_code = 4


class PoolNotFound(NotFound):
    """The pool has no devices."""

    code = "pool_not_found"
    exit_code = 5


class ConsumerNotFound(NotFound):
    """No managed consumer with that name (or it serves no such model)."""

    code = "consumer_not_found"
    exit_code = 18


class NoConsumer(NotFound):
    """No managed consumer serves what the request asks for (a model, a kind)."""

    code = "no_consumer"
    exit_code = 19


class ConsumerUnreachable(GpubossError):
    """A managed consumer could not be loaded or reached: it did not answer, or refused."""

    code = "consumer_unreachable"
    http_status = 502
    exit_code = 20


class ConsumerUnhealthy(GpubossError):
    """A managed consumer loaded but did not pass its health check."""

    code = "consumer_unhealthy"
    retryable = True
    http_status = 503
    exit_code = 21


class LeaseNotHeld(GpubossError):
    """The lease exists but the caller does not hold it: the token does not match."""

    code = "lease_not_held"
    http_status = 409
    exit_code = 6


class LeaseLost(LeaseNotHeld):
    """The holder lost its lease: it expired, was revoked or force-released, or could not be
    renewed before the local deadline. Stop using the memory at once."""

    code = "lease_lost"
    exit_code = 7


class LeaseEvicted(LeaseLost):
    """The lease was evicted (or is being evicted) for a request that needed its memory: give it
    back, and acquire again to use the device."""

    code = "lease_evicted"
    exit_code = 14


class RequestConflict(GpubossError):
    """The lease id is already used by a different request."""

    code = "request_conflict"
    http_status = 409
    exit_code = 8


class DeviceBusy(GpubossError):
    """The device still has leases; remove it with force to release them."""

    code = "device_busy"
    http_status = 409
    exit_code = 9


class InsufficientVram(GpubossError):
    """The request can never fit: no device of the pool has that much budget."""

    code = "insufficient_vram"
    http_status = 409
    exit_code = 10


class AcquireTimeout(GpubossError):
    """The request was not granted before its timeout; it left the queue."""

    code = "acquire_timeout"
    retryable = True
    http_status = 503
    exit_code = 11


class BackendUnavailable(GpubossError):
    """Redis could not be reached or did not answer."""

    code = "backend_unavailable"
    retryable = True
    http_status = 503
    exit_code = 12


class ProtocolError(GpubossError):
    """A reply did not have the expected shape: client and scripts disagree."""

    code = "protocol_error"
    http_status = 502
    exit_code = 13


class Unauthorized(GpubossError):
    """The boss service needs a bearer token and got none, or one it does not know."""

    code = "unauthorized"
    http_status = 401
    exit_code = 15


class Forbidden(GpubossError):
    """The token is valid but may not do this: another holder's lease, or an operator route."""

    code = "forbidden"
    http_status = 403
    exit_code = 16


class BackendForbidden(Forbidden):
    """Redis refused a command to this client's Redis user (``NOPERM``: its ACL does not allow
    the command, the key or the channel), or this client refused Redis's TLS certificate (not
    signed by ``ssl_ca_certs``); the message names what was refused. No retry helps."""

    code = "backend_forbidden"
    exit_code = 24


class QueueFull(GpubossError):
    """The pool's queue is at its cap; try again later."""

    code = "queue_full"
    retryable = True
    http_status = 429
    exit_code = 17


ERRORS: dict[str, type[GpubossError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        MethodNotAllowed,
        PayloadTooLarge,
        LeaseNotFound,
        DeviceNotFound,
        PoolNotFound,
        ConsumerNotFound,
        NoConsumer,
        ConsumerUnreachable,
        ConsumerUnhealthy,
        LeaseNotHeld,
        LeaseLost,
        LeaseEvicted,
        RequestConflict,
        DeviceBusy,
        InsufficientVram,
        AcquireTimeout,
        BackendUnavailable,
        ProtocolError,
        Unauthorized,
        Forbidden,
        BackendForbidden,
        QueueFull,
    )
}


def error_for(code: str, message: str, **details: Any) -> GpubossError:
    """The error for a code; an unknown code is itself a protocol error."""
    cls = ERRORS.get(code)
    if cls is None:
        return ProtocolError(f"unknown error code {code!r}: {message}", code=code)
    return cls(message, **details)
