"""Who may call what: every route of the app, as anonymous, holder A, holder B and an operator.

The matrix is built from ``app.routes``: a route added without an entry in :data:`ROUTES` fails
:func:`test_every_route_has_an_entry` and its own cases. A refused request (401, 403) must change
nothing in Redis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import pytest
import redis
from pydantic import ValidationError
from starlette.routing import BaseRoute
from support import POOL, SLEEPER_REGISTRY, snapshot, state
from test_api import Service, acquire, error, granted, make_settings, ref, serve

from gpuboss.api import create_app
from gpuboss.proxy.routes import METHODS, OPENAI_ROUTES
from gpuboss.settings import ServiceSettings, Token

SECRETS = {
    "alice": "alice-secret-0123456789",
    "bob": "bob-secret-0123456789",
    "root": "root-secret-0123456789",
}
TOKENS = [
    Token("alice", "holder", SECRETS["alice"]),
    Token("bob", "holder", SECRETS["bob"]),
    Token("root", "operator", SECRETS["root"]),
]
Who = Literal["anonymous", "alice", "bob", "root"]
PRINCIPALS: tuple[Who, ...] = ("anonymous", "alice", "bob", "root")
#: public: no token; reader: any token; holder: any token, a holder token on alice's lease only
#: when it is alice's; operator: operator tokens only
Access = Literal["public", "reader", "acquire", "alices_lease", "operator", "forward"]


@dataclass
class Call:
    """One request: method, path, and optionally a JSON body and query parameters."""

    method: str
    path: str
    json: Any = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Scene:
    """What exists before each call: gpu0, a spare device, and a lease alice holds."""

    lease: dict[str, Any]


Build = Callable[[Scene], Call]


def _lease_call(verb: str) -> Build:
    return lambda s: Call("POST", f"/v1/leases/{s.lease['id']}/{verb}", ref(s.lease))


def _forward_call(method: str, path: str) -> Build:
    return lambda s: Call(method, path)


ROUTES: dict[tuple[str, str], tuple[Access, Build]] = {
    ("GET", "/healthz"): ("public", lambda s: Call("GET", "/healthz")),
    ("GET", "/readyz"): ("public", lambda s: Call("GET", "/readyz")),
    ("GET", "/health"): ("public", lambda s: Call("GET", "/health")),
    ("GET", "/metrics"): ("public", lambda s: Call("GET", "/metrics")),
    ("GET", "/"): ("public", lambda s: Call("GET", "/")),
    ("GET", "/static/{name}"): ("public", lambda s: Call("GET", "/static/dashboard.js")),
    ("GET", "/openapi.json"): ("public", lambda s: Call("GET", "/openapi.json")),
    ("GET", "/docs"): ("public", lambda s: Call("GET", "/docs")),
    ("GET", "/docs/oauth2-redirect"): ("public", lambda s: Call("GET", "/docs/oauth2-redirect")),
    ("GET", "/redoc"): ("public", lambda s: Call("GET", "/redoc")),
    ("GET", "/v1/status"): ("reader", lambda s: Call("GET", "/v1/status")),
    ("GET", "/v1/devices"): ("reader", lambda s: Call("GET", "/v1/devices")),
    ("GET", "/v1/leases"): ("reader", lambda s: Call("GET", "/v1/leases")),
    ("GET", "/v1/queue"): ("reader", lambda s: Call("GET", "/v1/queue")),
    ("GET", "/v1/leases/{id}"): ("reader", lambda s: Call("GET", f"/v1/leases/{s.lease['id']}")),
    ("GET", "/v1/findings"): ("reader", lambda s: Call("GET", "/v1/findings")),
    ("GET", "/v1/events"): ("reader", lambda s: Call("GET", "/v1/events")),
    ("GET", "/v1/events/stream"): ("reader", lambda s: Call("GET", "/v1/events/stream", params={"last": 1})),
    ("POST", "/v1/plan"): ("reader", lambda s: Call("POST", "/v1/plan", {"vram": "1GiB"})),
    ("POST", "/v1/leases"): (
        "acquire",
        lambda s: Call("POST", "/v1/leases", {"vram": "1GiB", "timeout_s": 0}),
    ),
    ("POST", "/v1/leases/{id}/heartbeat"): ("alices_lease", _lease_call("heartbeat")),
    ("POST", "/v1/leases/{id}/release"): ("alices_lease", _lease_call("release")),
    ("POST", "/v1/leases/{id}/idle"): ("alices_lease", _lease_call("idle")),
    ("POST", "/v1/leases/{id}/busy"): ("alices_lease", _lease_call("busy")),
    ("PUT", "/v1/devices/{name}"): ("operator", lambda s: Call("PUT", "/v1/devices/gpu9", {"vram": "8GiB"})),
    ("DELETE", "/v1/devices/{name}"): ("operator", lambda s: Call("DELETE", "/v1/devices/spare")),
    ("POST", "/v1/leases/{id}/force-release"): (
        "operator",
        lambda s: Call("POST", f"/v1/leases/{s.lease['id']}/force-release", {"pool": "default"}),
    ),
    ("POST", "/v1/reap"): ("operator", lambda s: Call("POST", "/v1/reap", {})),
    ("GET", "/v1/consumers"): ("reader", lambda s: Call("GET", "/v1/consumers")),
    ("GET", "/v1/consumers/{name}"): ("reader", lambda s: Call("GET", "/v1/consumers/sleeper")),
    ("POST", "/v1/consumers/{name}/ensure"): (
        "acquire",
        lambda s: Call("POST", "/v1/consumers/sleeper/ensure", {"timeout_s": 0}),
    ),
    ("POST", "/v1/consumers/{name}/release"): (
        "acquire",
        lambda s: Call("POST", "/v1/consumers/sleeper/release", {}),
    ),
    ("POST", "/v1/consumers/release-all"): ("operator", lambda s: Call("POST", "/v1/consumers/release-all")),
    ("POST", "/v1/consumers/reload"): ("operator", lambda s: Call("POST", "/v1/consumers/reload")),
    ("GET", "/v1/models"): ("reader", lambda s: Call("GET", "/v1/models")),
    **{
        ("POST", path): ("forward", lambda s: Call("POST", "/v1/chat/completions", {"model": "nosuch"}))
        for path in OPENAI_ROUTES
    },
    **{
        (method, "/v1/consumers/{name}/{path:path}"): (
            "forward",
            _forward_call(method, "/v1/consumers/sleeper/x"),
        )
        for method in METHODS
    },
    **{
        (method, "/v1/{kind}/{path:path}"): ("forward", _forward_call(method, "/v1/tts/speak"))
        for method in METHODS
    },
    ("PUT", "/v1/pools/{pool}/config"): (
        "operator",
        lambda s: Call("PUT", "/v1/pools/default/config", {"min_residency_s": 5, "aging_s": 0}),
    ),
}


def _flatten(routes: list[BaseRoute]) -> Iterator[BaseRoute]:
    # Newer FastAPI keeps an included router whole (as a route that holds it) instead of copying
    # its routes into the app's list; look inside. No router here is included with a prefix.
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _flatten(inner.routes)
        else:
            yield route


def app_routes() -> list[tuple[str, str]]:
    """Every (method, path) the app serves (HEAD, which mirrors GET, left out)."""
    app = create_app(
        ServiceSettings(tokens=TOKENS, redis_url="redis://127.0.0.1:1/0"), "redis://127.0.0.1:1/0"
    )
    out = set()
    for route in _flatten(app.routes):
        for method in getattr(route, "methods", None) or ():
            if method != "HEAD":
                out.add((method, str(getattr(route, "path", ""))))
    return sorted(out)


APP_ROUTES = app_routes()


def test_every_route_has_an_entry() -> None:
    assert set(APP_ROUTES) == set(ROUTES)


def expected(access: Access, who: Who) -> int | None:
    """The status a principal gets: 401 or 403, or None for success (2xx)."""
    if access == "public":
        return None
    if who == "anonymous":
        return 401
    if access == "operator" and who != "root":
        return 403
    if access == "alices_lease" and who == "bob":
        return 403
    return None


REGISTRY = SLEEPER_REGISTRY


@pytest.fixture(scope="module")
def secured(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The service with alice and bob (holders) and root (operator) tokens, and one managed
    consumer, for the whole module."""
    registry = tmp_path_factory.mktemp("consumers") / "consumers.yaml"
    registry.write_text(REGISTRY, encoding="utf-8")
    with serve(make_settings(redis_url, tokens=TOKENS, reap_interval_s=60, consumers=registry)) as svc:
        yield svc


@pytest.fixture(scope="module")
def clients(secured: Service) -> Iterator[dict[Who, httpx.Client]]:
    """A client per principal."""
    made: dict[Who, httpx.Client] = {
        who: secured.new_client(None if who == "anonymous" else SECRETS[who]) for who in PRINCIPALS
    }
    yield made
    for client in made.values():
        client.close()


@pytest.fixture(autouse=True)
def sleeper_unloaded(clients: dict[Who, httpx.Client]) -> Iterator[None]:
    """After each case, the module's consumer gives back what a case made it load: otherwise the
    next case's flush takes its lease away, and the consumer's own unload event lands in the
    middle of that case's before-and-after comparison."""
    yield
    clients["root"].post("/v1/consumers/sleeper/release", json={}).raise_for_status()


@pytest.fixture
def scene(real_redis: redis.Redis, clients: dict[Who, httpx.Client]) -> Scene:
    """A flushed Redis with gpu0 and a spare device, and a lease that alice holds."""
    for name in ("gpu0", "spare"):
        clients["root"].put(f"/v1/devices/{name}", json={"vram": "8GiB"}).raise_for_status()
    return Scene(granted(acquire(clients["alice"], "2GiB", ttl_s=60)))


def send(client: httpx.Client, call: Call) -> int:
    """Send ``call``; its status (an event stream is closed as soon as its status is known)."""
    if call.path == "/v1/events/stream":
        with client.stream(call.method, call.path, params=call.params) as reply:
            if reply.status_code != 200:
                reply.read()
                error(reply, reply.status_code, reply.json()["error"])
            return reply.status_code
    reply = client.request(call.method, call.path, json=call.json, params=call.params)
    if reply.status_code >= 400:
        error(reply, reply.status_code, reply.json()["error"])  # the JSON error shape, always
    return reply.status_code


@pytest.mark.parametrize("who", PRINCIPALS)
@pytest.mark.parametrize("route", APP_ROUTES, ids=[f"{m} {p}" for m, p in APP_ROUTES])
def test_authorization_matrix(
    route: tuple[str, str], who: Who, scene: Scene, clients: dict[Who, httpx.Client], real_redis: redis.Redis
) -> None:
    access, build = ROUTES[route]
    call = build(scene)
    before = snapshot(real_redis)
    status = send(clients[who], call)
    want = expected(access, who)
    if want is None and access == "forward":  # let through; what the consumer answers is its own
        assert status not in (401, 403), (route, who, status)
    elif want is None:
        assert 200 <= status < 300, (route, who, status)
    else:
        assert status == want, (route, who, status)
        assert snapshot(real_redis) == before  # refused: nothing changed, not even an expiry


def test_unauthorized_answers_name_the_scheme(secured: Service) -> None:
    wrong = [{}, {"Authorization": "Bearer wrong-secret-0123456789"}, {"Authorization": "Basic YTpi"}]
    wrong.append({"Authorization": f"Bearer {SECRETS['bob']}x"})
    for headers in wrong:
        reply = secured.client.get("/v1/status", headers=headers)
        doc = error(reply, 401, "unauthorized")
        assert doc["retryable"] is False
        assert reply.headers["WWW-Authenticate"] == "Bearer"


def test_holder_tokens_act_as_their_own_holder(
    scene: Scene, clients: dict[Who, httpx.Client], real_redis: redis.Redis
) -> None:
    bob, root = clients["bob"], clients["root"]
    mine = granted(acquire(bob, "1GiB"))
    assert mine["holder"] == "bob"
    assert granted(acquire(bob, "1GiB", holder="bob"))["holder"] == "bob"
    before = snapshot(real_redis)
    error(acquire(bob, "1GiB", holder="alice"), 403, "forbidden")
    assert snapshot(real_redis) == before
    # an operator acquires as any holder it names, else as itself
    assert granted(acquire(root, "1GiB", holder="batch"))["holder"] == "batch"
    assert granted(acquire(root, "1GiB"))["holder"] == "root"
    # and may act on anyone's lease (with its token)
    root.post(f"/v1/leases/{mine['id']}/release", json=ref(mine)).raise_for_status()
    assert state(real_redis, mine["id"]) == "released"


def test_holder_b_cannot_touch_as_lease_even_with_its_token(
    scene: Scene, clients: dict[Who, httpx.Client], real_redis: redis.Redis
) -> None:
    alice, bob, lease = clients["alice"], clients["bob"], scene.lease
    expiry = real_redis.hget(POOL.lease(lease["id"]), "expires_at")
    for verb in ("heartbeat", "release", "idle", "busy"):
        error(bob.post(f"/v1/leases/{lease['id']}/{verb}", json=ref(lease)), 403, "forbidden")
    error(bob.post(f"/v1/leases/{lease['id']}/force-release"), 403, "forbidden")
    assert state(real_redis, lease["id"]) == "active"
    assert real_redis.hget(POOL.lease(lease["id"]), "expires_at") == expiry
    # a request id is no way around it: the same id from bob is another holder's request
    error(acquire(bob, "2GiB", ttl_s=60, request_id=lease["id"]), 409, "request_conflict")
    alice.post(f"/v1/leases/{lease['id']}/release", json=ref(lease)).raise_for_status()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "gpu-box.example"])
def test_settings_refuse_a_non_loopback_address_without_tokens(host: str) -> None:
    with pytest.raises(ValidationError, match="without tokens"):
        ServiceSettings(host=host, tokens=[])
    assert ServiceSettings(host=host, tokens=TOKENS).auth


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_settings_allow_loopback_without_tokens(host: str) -> None:
    assert not ServiceSettings(host=host, tokens=[]).auth
