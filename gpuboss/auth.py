"""Who is calling: bearer tokens from the settings, turned into a :class:`Principal`.

With no tokens configured (allowed on loopback only) every caller is an operator. With tokens, a
request without a known ``Authorization: Bearer <secret>`` is refused with ``unauthorized`` (401);
a holder-scope token acts as the holder named like the token, on its own leases only; operator
routes need an operator-scope token, else ``forbidden`` (403).
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gpuboss_client import Forbidden, LeaseInfo, Unauthorized

from .settings import Scope, ServiceSettings, Token

__all__ = [
    "DEFAULT_HOLDER",
    "HolderDep",
    "OperatorDep",
    "Principal",
    "ReaderDep",
    "authenticate",
    "bearer",
    "find_token",
    "require_holder",
    "require_operator",
    "require_reader",
]

#: the holder an acquire records when the caller names none and no token names it
DEFAULT_HOLDER = "http"

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="`Authorization: Bearer <secret>`: a token from `GPUBOSS_TOKENS`, needed when the service "
    "has tokens configured.",
)


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of one request: the token's ``name`` (None without authentication) and ``scope``."""

    name: str | None
    scope: Scope

    @property
    def is_operator(self) -> bool:
        return self.scope == "operator"

    def holder_for(self, given: str | None) -> str:
        """The holder an acquire by this caller records; a holder token may not name another."""
        if self.scope == "holder":
            if given is not None and given != self.name:
                raise Forbidden(f"token {self.name!r} acquires as holder {self.name!r}, not {given!r}")
            assert self.name is not None
            return self.name
        return given if given is not None else (self.name or DEFAULT_HOLDER)

    def check_holds(self, lease: LeaseInfo) -> None:
        """Refuse a holder token acting on a lease that another holder holds."""
        if self.scope == "holder" and lease.holder != self.name:
            raise Forbidden(f"lease {lease.id} is not held by {self.name!r}", lease=lease.id)


def find_token(tokens: Sequence[Token], secret: str) -> Token | None:
    """The token with this secret, comparing every one in constant time."""
    given = secret.encode()
    found = None
    for token in tokens:
        if hmac.compare_digest(token.secret.encode(), given):
            found = token
    return found


async def authenticate(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]
) -> Principal:
    """The principal of a request; raises :class:`Unauthorized` for a missing or unknown token."""
    settings: ServiceSettings = request.app.state.settings
    if not settings.auth:
        return Principal(None, "operator")
    if credentials is None:
        raise Unauthorized("this service needs a token: send Authorization: Bearer <secret>")
    token = find_token(settings.tokens, credentials.credentials)
    if token is None:
        raise Unauthorized("unknown token")
    return Principal(token.name, token.scope)


async def require_reader(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
    """Any valid token (or none needed): reading status, devices, leases, events, plans."""
    return principal


async def require_holder(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
    """Any valid token: acquire, and act on leases (a holder token on its own leases only)."""
    return principal


async def require_operator(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
    """An operator token (or none needed): devices, pools, force-release, reap."""
    if not principal.is_operator:
        raise Forbidden(f"token {principal.name!r} has holder scope; this needs an operator token")
    return principal


ReaderDep = Annotated[Principal, Depends(require_reader)]
HolderDep = Annotated[Principal, Depends(require_holder)]
OperatorDep = Annotated[Principal, Depends(require_operator)]
