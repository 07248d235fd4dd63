"""Real Redis deployments on loopback for tests: a Redis Cluster, and a primary with replicas and Sentinels.

:func:`redis_cluster` and :func:`sentinel_group` are context managers: they start ``redis-server``
processes on free ports of 127.0.0.1, each in its own subfolder of the given folder (its config,
log and any files it writes), wait until the deployment is formed and agreed, and on exit stop and
reap every process they started, also when the body raised. Nothing is persisted (``save ""``,
``appendonly no``). Every wait polls the servers' own state against a deadline.

:func:`make_certs` makes a throwaway CA with a server and a client certificate (``openssl``), and
:func:`tls_redis_server` and :func:`tls_sentinel` start servers that speak only TLS with them.

Test modules import them with ``from topology import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode
from redis.retry import Retry
from redis.sentinel import Sentinel

__all__ = [
    "HOST",
    "Certs",
    "Cluster",
    "Node",
    "SentinelGroup",
    "TLSUnsupported",
    "make_certs",
    "redis_cluster",
    "redis_server",
    "restart",
    "sentinel_group",
    "tls_redis_server",
    "tls_sentinel",
]

HOST = "127.0.0.1"
REDIS_SERVER = shutil.which("redis-server") or "redis-server"
OPENSSL = shutil.which("openssl") or "openssl"
SLOTS = 16384
BUS_OFFSET = 10000  # a cluster node's bus port is its port + 10000
START_S = 10.0  # for one redis-server to answer PING
FORM_S = 30.0  # for a deployment to form, or to settle after a change
STOP_S = 5.0  # for the processes to exit on SIGTERM before SIGKILL
POLL_S = 0.05  # between polls of another process's state: there is nothing to block on
MIGRATE_BATCH = 100
MIGRATE_TIMEOUT_MS = 5000
#: a per-call limit for the helpers' own connections, so that a frozen server fails a poll instead of
#: hanging it
ADMIN_TIMEOUT_S = 2.0

Role = Literal["master", "replica", "sentinel"]


@dataclass(eq=False)
class Node:
    """One ``redis-server`` process a helper started. ``role`` is the role the helpers last saw.

    Nodes compare by identity: a deployment holds one :class:`Node` per server, and every method
    that names a node returns that object.
    """

    host: str
    port: int
    process: subprocess.Popen[bytes]
    role: Role
    folder: Path
    argv: list[str] = field(repr=False)  # how to start it again
    node_id: str = ""  # cluster nodes only
    frozen: bool = False
    certs: Certs | None = None  # a server that speaks only TLS: the certificates it was given

    @property
    def addr(self) -> tuple[str, int]:
        """``(host, port)``."""
        return (self.host, self.port)

    @property
    def alive(self) -> bool:
        """The process is running (it may be frozen)."""
        return self.process.poll() is None

    @property
    def reachable(self) -> bool:
        """The process is running and not frozen, so it answers commands."""
        return self.alive and not self.frozen


# --------------------------------------------------------------------------------------------------
# processes


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as redis-server binds
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def _free_port(*, bus: bool) -> int:
    """A free loopback port; with ``bus``, one whose cluster bus port (+10000) is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if not bus or (port + BUS_OFFSET <= 65535 and _port_free(port + BUS_OFFSET)):
            return port
    raise RuntimeError("no free loopback port (with a free bus port)")


def _admin(
    host: str, port: int, *, decode: bool = True, certs: Certs | None = None, **kwargs: Any
) -> redis.Redis:
    """A client of one server; with ``certs``, over TLS with the client certificate. ``kwargs`` go
    to :class:`redis.Redis`."""
    tls: dict[str, Any] = {}
    if certs is not None:
        tls = {
            "ssl": True,
            "ssl_ca_certs": str(certs.ca),
            "ssl_certfile": str(certs.client_cert),
            "ssl_keyfile": str(certs.client_key),
        }
    return redis.Redis(
        host=host,
        port=port,
        decode_responses=decode,
        socket_timeout=ADMIN_TIMEOUT_S,
        socket_connect_timeout=ADMIN_TIMEOUT_S,
        **tls,
        **kwargs,
    )


def _call(client: redis.Redis, *args: Any) -> Any:
    """``client.execute_command(*args)`` (redis-py leaves it untyped)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _log_tail(folder: Path, lines: int = 20) -> str:
    logs = sorted(folder.glob("*.log"))
    if not logs:
        return "(no log)"
    return "\n".join(logs[0].read_text(errors="replace").splitlines()[-lines:])


def _started(port: int, proc: subprocess.Popen[bytes], deadline_s: float, certs: Certs | None = None) -> bool:
    """Wait until the server ``proc`` answers on ``port`` (over TLS with ``certs``); False if it
    exited first (port taken).

    Checks the answering server's pid, so another process that took the port is not mistaken for it.
    """
    deadline = time.monotonic() + deadline_s
    # no retries of its own: redis-py's default backs off for seconds on a port not listening yet
    client = _admin(HOST, port, certs=certs, retry=Retry(NoBackoff(), 0))
    try:
        while True:
            if proc.poll() is not None:
                return False
            try:
                if int(client.info("server")["process_id"]) == proc.pid:
                    return True
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server (pid {proc.pid}) did not answer on port {port}")
            time.sleep(POLL_S)
    finally:
        client.close()


def _spawn(argv: list[str], stderr: Path | None = None) -> subprocess.Popen[bytes]:
    # the servers log to their own file (before they open it, a config error goes to ``stderr``);
    # stdin closed so that they never read the test's terminal
    with contextlib.ExitStack() as stack:
        err: Any = subprocess.DEVNULL if stderr is None else stack.enter_context(stderr.open("wb"))
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)


def _start(
    folder: Path,
    role: Role,
    config: Callable[[int], list[str]],
    *,
    bus: bool = False,
    sentinel: bool = False,
    extra: list[str] | None = None,
    certs: Certs | None = None,
) -> Node:
    """Start one server in ``folder`` with the config lines ``config(port)`` on a free port (with
    ``certs``, a server that answers only over TLS there).

    Picking a port and binding it are not atomic, so a start that loses the port is retried on
    another one. A server built without TLS raises :class:`TLSUnsupported`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    conf = folder / ("sentinel.conf" if sentinel else "redis.conf")
    stderr = folder / "stderr.txt"
    for _ in range(5):
        port = _free_port(bus=bus)
        (folder / "nodes.conf").unlink(missing_ok=True)  # a cluster config of a lost attempt
        conf.write_text("\n".join(config(port)) + "\n")
        argv = [REDIS_SERVER, str(conf), *(["--sentinel"] if sentinel else []), *(extra or [])]
        proc = _spawn(argv, stderr)
        if _started(port, proc, START_S, certs):
            return Node(HOST, port, proc, role, folder, argv, certs=certs)
        proc.wait(STOP_S)
        if certs is not None and (why := _no_tls(stderr.read_text(errors="replace"), _log_tail(folder))):
            raise TLSUnsupported(f"{REDIS_SERVER} cannot serve TLS: {why}")
    raise RuntimeError(
        f"redis-server in {folder} did not start:\n{stderr.read_text(errors='replace')}{_log_tail(folder)}"
    )


def _base_config(folder: Path, port: int, log: str) -> list[str]:
    return [
        f"port {port}",
        f"bind {HOST}",
        "protected-mode no",
        "daemonize no",
        f"dir {_quote(str(folder))}",
        f"logfile {_quote(str(folder / log))}",
    ]


def _data_config(folder: Path, port: int) -> list[str]:
    return [
        *_base_config(folder, port, "redis.log"),
        'save ""',
        "appendonly no",
        # on SIGTERM, exit at once rather than wait up to 10 s for lagging (say frozen) replicas
        "shutdown-on-sigterm nosave now",
        "shutdown-timeout 0",
        # a full sync starts at once instead of waiting 5 s for more replicas to share it
        "repl-diskless-sync-delay 0",
    ]


def _stop_all(nodes: list[Node]) -> None:
    """SIGTERM every running process (SIGCONT first: a stopped one cannot act on it), reap them all,
    SIGKILL any still running after :data:`STOP_S`."""
    running = [n.process for n in nodes if n.alive]
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
    deadline = time.monotonic() + STOP_S
    for proc in running:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for node in nodes:
        node.frozen = False


def _wait(what: str, check: Callable[[], str | None], timeout: float) -> None:
    """Poll ``check`` (None when done, else why not) until it passes; raise with the last reason."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            reason = check()
        except (redis.RedisError, OSError, LookupError) as e:
            reason = f"{type(e).__name__}: {e}"
        if reason is None:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout} s: {reason}")
        time.sleep(POLL_S)


def _kill(node: Node) -> None:
    node.process.kill()
    node.process.wait()
    node.frozen = False


def _freeze(node: Node) -> None:
    node.process.send_signal(signal.SIGSTOP)
    node.frozen = True


def _thaw(node: Node) -> None:
    node.process.send_signal(signal.SIGCONT)
    node.frozen = False


class _Clients:
    """Clients handed out by a deployment, closed when it stops."""

    def __init__(self) -> None:
        self._close: list[Callable[[], None]] = []

    def keep(self, close: Callable[[], None]) -> None:
        self._close.append(close)

    def close_all(self) -> None:
        for close in reversed(self._close):
            with contextlib.suppress(Exception):
                close()
        self._close.clear()


# --------------------------------------------------------------------------------------------------
# cluster


@dataclass(frozen=True)
class _ClusterView:
    """What one node says about the live nodes: who is master of whom, and the slot map."""

    roles: frozenset[tuple[tuple[str, int], str, tuple[str, int] | None]]
    slots: tuple[tuple[int, int, tuple[str, int]], ...]  # (first, last, master addr), sorted


def _addr(field_: str) -> tuple[str, int]:
    hostport = field_.split("@", 1)[0]  # ip:port@cport[,hostname]
    host, _, port = hostport.rpartition(":")
    return (host, int(port))


def _cluster_view(text: str, live: set[tuple[str, int]]) -> tuple[_ClusterView, str | None]:
    """Parse ``CLUSTER NODES``; also say what is not settled (a live node failed or in handshake)."""
    lines = [line.split() for line in text.splitlines() if line.strip()]
    by_id = {parts[0]: _addr(parts[1]) for parts in lines}
    roles: set[tuple[tuple[str, int], str, tuple[str, int] | None]] = set()
    slots: list[tuple[int, int, tuple[str, int]]] = []
    problem = None
    seen: set[tuple[str, int]] = set()
    for parts in lines:
        addr, flags = by_id[parts[0]], set(parts[2].split(","))
        if flags & {"handshake", "noaddr"}:
            problem = f"{addr} is in {parts[2]}"
            continue
        if "master" in flags:
            for spec in parts[8:]:
                if spec.startswith("["):  # a slot migrating or importing: shown by its owner only
                    continue
                first, _, last = spec.partition("-")
                slots.append((int(first), int(last or first), addr))
        if addr not in live:
            continue
        seen.add(addr)
        if flags & {"fail", "fail?"}:
            problem = f"{addr} is flagged {parts[2]}"
        if "master" in flags:
            roles.add((addr, "master", None))
        else:
            roles.add((addr, "replica", by_id.get(parts[3])))
    if seen != live:
        problem = f"does not know {sorted(live - seen)}"
    return _ClusterView(frozenset(roles), tuple(sorted(slots))), problem


@dataclass(eq=False)
class Cluster:
    """A Redis Cluster on loopback, started by :func:`redis_cluster`."""

    nodes: list[Node]
    _clients: _Clients = field(default_factory=_Clients, repr=False)

    @property
    def masters(self) -> list[Node]:
        """The nodes that were masters when the cluster last settled."""
        return [n for n in self.nodes if n.role == "master"]

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:P1,127.0.0.1:P2,...``, naming every master."""
        return "redis+cluster://" + ",".join(f"{n.host}:{n.port}" for n in self.masters)

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every node."""
        return [n.addr for n in self.nodes]

    def client(self, **kwargs: Any) -> redis.RedisCluster:
        """A cluster client (``decode_responses=True``; ``kwargs`` go to :class:`redis.RedisCluster`),
        closed when the cluster stops."""
        kwargs.setdefault("decode_responses", True)
        client = redis.RedisCluster(
            startup_nodes=[ClusterNode(n.host, n.port) for n in self.nodes if n.reachable],  # type: ignore[no-untyped-call]
            **kwargs,
        )
        self._clients.keep(client.close)
        return client

    def node_client(self, node: Node, **kwargs: Any) -> redis.Redis:
        """A plain client of one node (``decode_responses=True``), closed when the cluster stops."""
        kwargs.setdefault("decode_responses", True)
        client = redis.Redis(host=node.host, port=node.port, **kwargs)
        self._clients.keep(client.close)
        return client

    def node_at(self, addr: tuple[str, int]) -> Node:
        """The node listening on ``addr``."""
        for node in self.nodes:
            if node.addr == addr:
                return node
        raise KeyError(addr)

    def node_for_slot(self, slot: int, *, asked: Node | None = None) -> Node:
        """The master that owns ``slot`` as ``asked`` sees it (by default the first reachable master,
        else the first reachable node)."""
        if asked is None:
            asked = next(n for n in sorted(self.nodes, key=lambda n: n.role != "master") if n.reachable)
        view, _ = _cluster_view(self._nodes_text(asked), set())
        for first, last, addr in view.slots:
            if first <= slot <= last:
                return self.node_at(addr)
        raise LookupError(f"{asked.addr} knows no owner of slot {slot}")

    def kill(self, node: Node) -> None:
        """SIGKILL ``node`` and reap it."""
        _kill(node)

    def freeze(self, node: Node) -> None:
        """SIGSTOP ``node``: it holds its connections but answers nothing."""
        _freeze(node)

    def thaw(self, node: Node) -> None:
        """SIGCONT a frozen node."""
        _thaw(node)

    def migrate_slot(self, slot: int, target: Node, *, between: Callable[[], None] | None = None) -> None:
        """Move ``slot`` and its keys to the master ``target``, step by step as
        ``redis-cli --cluster reshard`` does; return once every live node agrees on the new owner.

        ``between()`` runs while the slot is IMPORTING on the target and MIGRATING on the source,
        before any key moves: clients then get ASK (or TRYAGAIN for multi-key commands). If it
        raises, the slot is left in that state.
        """
        source = self.node_for_slot(slot)
        if source is target:
            raise ValueError(f"slot {slot} is already on {target.addr}")
        with contextlib.closing(_admin(*target.addr)) as dst, contextlib.closing(_admin(*source.addr)) as src:
            _call(dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
            _call(src, "CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
            if between is not None:
                between()
            with contextlib.closing(_admin(*source.addr, decode=False)) as raw:
                while keys := _call(raw, "CLUSTER", "GETKEYSINSLOT", slot, MIGRATE_BATCH):
                    _call(raw, "MIGRATE", target.host, target.port, "", 0, MIGRATE_TIMEOUT_MS, "KEYS", *keys)
            # the target first: it takes the slot and bumps its config epoch, so its claim wins
            for node in [target, source, *(n for n in self.masters if n not in (target, source))]:
                if node.reachable:
                    with contextlib.closing(_admin(*node.addr)) as c:
                        _call(c, "CLUSTER", "SETSLOT", slot, "NODE", target.node_id)

        def owned() -> str | None:
            for node in self.nodes:
                if node.reachable and (owner := self.node_for_slot(slot, asked=node)) is not target:
                    return f"{node.addr} says slot {slot} is on {owner.addr}"
            return None

        self.wait_settled(extra=owned)

    def wait_settled(self, timeout: float = FORM_S, *, extra: Callable[[], str | None] | None = None) -> None:
        """Wait until every reachable node says ``cluster_state:ok``, all agree on the slot map and
        on who replicates whom, and every live replica's link is up; then update the nodes' roles."""
        agreed: list[_ClusterView] = []

        def check() -> str | None:
            live = {n.addr for n in self.nodes if n.reachable}
            views: dict[tuple[str, int], _ClusterView] = {}
            for node in self.nodes:
                if not node.reachable:
                    continue
                with contextlib.closing(_admin(*node.addr)) as c:
                    state = _call(c, "CLUSTER", "INFO")
                    if "cluster_state:ok" not in state:
                        return f"{node.addr} is not cluster_state:ok"
                    view, problem = _cluster_view(_call(c, "CLUSTER", "NODES"), live)
                    if problem:
                        return f"{node.addr}: {problem}"
                    role = _call(c, "ROLE")
                    if role[0] == "slave" and role[3] != "connected":
                        return f"{node.addr}'s link to its master is {role[3]}"
                views[node.addr] = view
            if len(set(views.values())) != 1:
                return f"the nodes disagree: {views}"
            if extra is not None and (reason := extra()) is not None:
                return reason
            agreed[:] = [next(iter(views.values()))]
            return None

        _wait("the cluster to settle", check, timeout)
        roles = {addr: role for addr, role, _ in agreed[0].roles}
        for node in self.nodes:
            if node.addr in roles:
                node.role = "master" if roles[node.addr] == "master" else "replica"

    def _nodes_text(self, node: Node) -> str:
        with contextlib.closing(_admin(*node.addr)) as c:
            text: str = _call(c, "CLUSTER", "NODES")
            return text

    def _form(self, masters: int, replicas_per_master: int) -> None:
        clients = [_admin(*n.addr) for n in self.nodes]
        try:
            for i, (node, c) in enumerate(zip(self.nodes, clients, strict=True)):
                node.node_id = _call(c, "CLUSTER", "MYID")
                # distinct epochs up front, as redis-cli does, so no epoch collision has to be resolved
                _call(c, "CLUSTER", "SET-CONFIG-EPOCH", i + 1)
            for i in range(masters):
                first, last = i * SLOTS // masters, (i + 1) * SLOTS // masters - 1
                _call(clients[i], "CLUSTER", "ADDSLOTSRANGE", first, last)
            for node in self.nodes[1:]:
                _call(clients[0], "CLUSTER", "MEET", node.host, node.port)

            def everyone_known() -> str | None:
                live = {n.addr for n in self.nodes}
                for node, c in zip(self.nodes, clients, strict=True):
                    _, problem = _cluster_view(_call(c, "CLUSTER", "NODES"), live)
                    if problem:
                        return f"{node.addr}: {problem}"
                return None

            _wait("the nodes to meet", everyone_known, FORM_S)
            for i in range(masters * replicas_per_master):
                master = self.nodes[i // replicas_per_master]
                _call(clients[masters + i], "CLUSTER", "REPLICATE", master.node_id)
        finally:
            for c in clients:
                c.close()
        self.wait_settled()


@contextlib.contextmanager
def redis_cluster(folder: Path, masters: int = 3, replicas_per_master: int = 0) -> Iterator[Cluster]:
    """Start a Redis Cluster of ``masters`` masters with ``replicas_per_master`` replicas each, formed
    and agreed on its slot map (slots split evenly, in order); stop it on exit.

    Node ``i`` lives in ``folder/node-i``; the masters come first, then the replicas of master 0,
    of master 1, ...
    """
    if masters < 1 or replicas_per_master < 0:
        raise ValueError("need at least one master and no negative replica count")
    cluster = Cluster(nodes=[])

    def config(node_folder: Path) -> Callable[[int], list[str]]:
        return lambda port: [
            *_data_config(node_folder, port),
            "cluster-enabled yes",
            "cluster-config-file nodes.conf",
            "cluster-node-timeout 2000",
        ]

    try:
        for i in range(masters * (1 + replicas_per_master)):
            node_folder = folder / f"node-{i}"
            role: Role = "master" if i < masters else "replica"
            cluster.nodes.append(_start(node_folder, role, config(node_folder), bus=True))
        cluster._form(masters, replicas_per_master)
        yield cluster
    finally:
        cluster._clients.close_all()
        _stop_all(cluster.nodes)


# --------------------------------------------------------------------------------------------------
# sentinel


def _sentinel_primary(sentinel: redis.Redis, service: str) -> tuple[str, int] | None:
    """``SENTINEL GET-MASTER-ADDR-BY-NAME``: the primary's address, None if the service is unknown."""
    reply = _call(sentinel, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", service)
    return None if reply is None else (str(reply[0]), int(reply[1]))


def _sentinel_list(sentinel: redis.Redis, what: str, service: str) -> list[dict[str, str]]:
    """``SENTINEL REPLICAS`` or ``SENTINELS``, each entry as a dict of its fields (``ip``, ``port``,
    ``flags``, ...)."""
    # RESP3 (redis-py 8's default) replies with maps, RESP2 with flat lists of fields and values
    return [
        {str(k): str(v) for k, v in (e.items() if isinstance(e, dict) else zip(e[::2], e[1::2], strict=True))}
        for e in _call(sentinel, "SENTINEL", what, service)
    ]


@dataclass(eq=False)
class SentinelGroup:
    """A primary with replicas, watched by Sentinels, started by :func:`sentinel_group`."""

    service: str
    data_nodes: list[Node]  # the primary at start first, then the replicas
    sentinels: list[Node]
    _clients: _Clients = field(default_factory=_Clients, repr=False)

    @property
    def sentinel_addrs(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every sentinel."""
        return [s.addr for s in self.sentinels]

    @property
    def url(self) -> str:
        """``redis+sentinel://127.0.0.1:S1,127.0.0.1:S2,.../service``."""
        return "redis+sentinel://" + ",".join(f"{h}:{p}" for h, p in self.sentinel_addrs) + f"/{self.service}"

    def node_at(self, addr: tuple[str, int]) -> Node:
        """The data node listening on ``addr``."""
        for node in self.data_nodes:
            if node.addr == addr:
                return node
        raise KeyError(addr)

    def primary(self, timeout: float = 10.0) -> Node:
        """The primary that every reachable sentinel names and whose ``ROLE`` is master (waits up to
        ``timeout`` for them to agree)."""
        found: list[Node] = []

        def check() -> str | None:
            named = self._named_primary()
            if isinstance(named, str):
                return named
            if (role := self._role(named)) != "master":
                return f"the sentinels name {named.addr}, whose ROLE is {role}"
            found[:] = [named]
            return None

        _wait("the sentinels to agree on the primary", check, timeout)
        self._set_roles(found[0])
        return found[0]

    def replicas(self) -> list[Node]:
        """The live data nodes other than the primary."""
        primary = self.primary()
        return [n for n in self.data_nodes if n.alive and n is not primary]

    def client(self, **kwargs: Any) -> redis.Redis:
        """A client of the current primary through ``Sentinel(...).master_for`` (``decode_responses=True``;
        ``kwargs`` go to ``master_for``), closed when the group stops."""
        kwargs.setdefault("decode_responses", True)
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            self.sentinel_addrs, sentinel_kwargs={"socket_timeout": ADMIN_TIMEOUT_S}
        )
        client: redis.Redis = sentinel.master_for(self.service, **kwargs)  # type: ignore[no-untyped-call]
        self._clients.keep(sentinel.close)
        self._clients.keep(client.close)
        return client

    def node_client(self, node: Node, **kwargs: Any) -> redis.Redis:
        """A plain client of one node (``decode_responses=True``), closed when the group stops."""
        kwargs.setdefault("decode_responses", True)
        client = redis.Redis(host=node.host, port=node.port, **kwargs)
        self._clients.keep(client.close)
        return client

    def failover(self, timeout: float = 30.0) -> Node:
        """``SENTINEL FAILOVER``; wait until a new primary is named, is master, and every other live
        data node (the old primary too) replicates it with its link up. Return the new primary."""
        old = self.primary()
        asked = next(s for s in self.sentinels if s.reachable)
        with contextlib.closing(_admin(*asked.addr)) as c:
            _call(c, "SENTINEL", "FAILOVER", self.service)
        return self.wait_for_new_primary(old, timeout)

    def kill_primary(self) -> Node:
        """SIGKILL the current primary and reap it; return it."""
        primary = self.primary()
        _kill(primary)
        return primary

    def wait_for_new_primary(self, old: Node, timeout: float = 30.0) -> Node:
        """Wait until every reachable sentinel names a primary other than ``old``, its ``ROLE`` is
        master, and every other reachable data node replicates it with ``master_link_status:up``."""
        found: list[Node] = []

        def check() -> str | None:
            named = self._named_primary()
            if isinstance(named, str):
                return named
            if named is old:
                return f"the sentinels still name {old.addr}"
            if (role := self._role(named)) != "master":
                return f"the sentinels name {named.addr}, whose ROLE is {role}"
            if (lagging := self._unlinked(named)) is not None:
                return lagging
            found[:] = [named]
            return None

        _wait("a new primary", check, timeout)
        self._set_roles(found[0])
        return found[0]

    def restart(self, node: Node, timeout: float = 30.0) -> None:
        """Start a killed data node again on its port, with its config file (as Sentinel may have
        rewritten it) plus ``replicaof`` the current primary; wait until its link is up and every
        sentinel lists it as a healthy replica.

        (Left to the sentinels, a node that comes back as a master stays one, a second master, until
        a sentinel has seen it so for 8 s and reads its INFO again, which it does every 10 s.)
        """
        if node.alive:
            raise ValueError(f"{node.addr} is running")
        primary = self.primary()
        argv = [*node.argv, "--replicaof", primary.host, str(primary.port)]
        node.process = _spawn(argv)
        if not _started(node.port, node.process, START_S):
            raise RuntimeError(f"{node.addr} did not start again:\n{_log_tail(node.folder)}")
        node.role = "replica"

        def rejoined() -> str | None:
            if (lagging := self._unlinked(primary)) is not None:
                return lagging
            return self._sentinels_see(primary, [n for n in self.data_nodes if n.reachable])

        _wait(f"{node.addr} to rejoin", rejoined, timeout)

    def wait_seen_down(self, node: Node, timeout: float = 30.0) -> None:
        """Wait until every reachable sentinel flags replica ``node`` as down (``s_down``)."""

        def check() -> str | None:
            for s in self.sentinels:
                if not s.reachable:
                    continue
                with contextlib.closing(_admin(*s.addr)) as c:
                    entries = _sentinel_list(c, "REPLICAS", self.service)
                flags = [
                    set(e["flags"].split(",")) for e in entries if (e["ip"], int(e["port"])) == node.addr
                ]
                if not flags or "s_down" not in flags[0]:
                    return f"sentinel {s.addr} does not flag {node.addr} down yet"
            return None

        _wait(f"{node.addr} to be seen down", check, timeout)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until every live data node but the primary replicates it with its link up, and every
        reachable sentinel sees them all healthy."""
        primary = self.primary()

        def check() -> str | None:
            if (lagging := self._unlinked(primary)) is not None:
                return lagging
            return self._sentinels_see(primary, [n for n in self.data_nodes if n.reachable])

        _wait("the group to be healthy", check, timeout)

    def freeze(self, node: Node) -> None:
        """SIGSTOP ``node`` (a data node or a sentinel): it holds its connections but answers nothing."""
        _freeze(node)

    def thaw(self, node: Node) -> None:
        """SIGCONT a frozen node."""
        _thaw(node)

    def kill(self, node: Node) -> None:
        """SIGKILL ``node`` (a data node or a sentinel) and reap it."""
        _kill(node)

    def _named_primary(self) -> Node | str:
        """The data node every reachable sentinel names as primary, else why not."""
        named = set()
        for s in self.sentinels:
            if s.reachable:
                with contextlib.closing(_admin(*s.addr)) as c:
                    named.add(_sentinel_primary(c, self.service))
        if len(named) != 1:
            return f"the sentinels name {sorted(named, key=str)}"
        (addr,) = named
        if addr is None:
            return "no sentinel knows the service"
        return self.node_at(addr)

    def _role(self, node: Node) -> str:
        if not node.reachable:
            return "unreachable"
        with contextlib.closing(_admin(*node.addr)) as c:
            return str(_call(c, "ROLE")[0])

    def _unlinked(self, primary: Node) -> str | None:
        """Why not every reachable data node but ``primary`` replicates it with its link up, or None."""
        for node in self.data_nodes:
            if node is primary or not node.reachable:
                continue
            with contextlib.closing(_admin(*node.addr)) as c:
                info = c.info("replication")
            if (
                info.get("role") != "slave"
                or (str(info.get("master_host")), int(info.get("master_port", 0))) != primary.addr
                or info.get("master_link_status") != "up"
            ):
                return (
                    f"{node.addr} is {info.get('role')} of {info.get('master_host')}:"
                    f"{info.get('master_port')}, link {info.get('master_link_status')}"
                )
        return None

    def _sentinels_see(self, primary: Node, data_nodes: list[Node]) -> str | None:
        """Why not every reachable sentinel names ``primary``, lists the other ``data_nodes`` as
        healthy replicas and every other sentinel as healthy, or None."""
        want_replicas = {n.addr for n in data_nodes if n is not primary}
        for s in self.sentinels:
            if not s.reachable:
                continue
            want_sentinels = {o.addr for o in self.sentinels if o is not s and o.reachable}
            with contextlib.closing(_admin(*s.addr)) as c:
                if _sentinel_primary(c, self.service) != primary.addr:
                    return f"sentinel {s.addr} does not name {primary.addr} yet"
                for kind, want, entries in (
                    ("replicas", want_replicas, _sentinel_list(c, "REPLICAS", self.service)),
                    ("sentinels", want_sentinels, _sentinel_list(c, "SENTINELS", self.service)),
                ):
                    healthy = {
                        (e["ip"], int(e["port"]))
                        for e in entries
                        if not set(e["flags"].split(",")) & {"s_down", "o_down", "disconnected"}
                    }
                    if not want <= healthy:
                        return f"sentinel {s.addr} sees healthy {kind} {sorted(healthy)}, not {sorted(want)}"
        return None

    def _set_roles(self, primary: Node) -> None:
        for node in self.data_nodes:
            node.role = "master" if node is primary else "replica"


@contextlib.contextmanager
def sentinel_group(
    folder: Path,
    replicas: int = 2,
    sentinels: int = 3,
    service: str = "gpuboss",
    *,
    min_replicas_to_write: int = 0,
) -> Iterator[SentinelGroup]:
    """Start a primary (``folder/data-0``), ``replicas`` replicas (``folder/data-i``) and ``sentinels``
    Sentinels (``folder/sentinel-i``) monitoring it as ``service`` with a majority quorum; return once
    every replica's link is up and every sentinel has found every replica and every other sentinel.
    Stop them all on exit.

    ``min_replicas_to_write`` > 0 sets ``min-replicas-to-write`` (and ``min-replicas-max-lag 1``) on
    every data node, so a promoted replica enforces it too.
    """
    if replicas < 0 or sentinels < 1:
        raise ValueError("need no negative replica count and at least one sentinel")
    group = SentinelGroup(service, [], [])

    def data_config(node_folder: Path, replica_of: int | None) -> Callable[[int], list[str]]:
        def config(port: int) -> list[str]:
            lines = _data_config(node_folder, port)
            if min_replicas_to_write > 0:
                lines += [f"min-replicas-to-write {min_replicas_to_write}", "min-replicas-max-lag 1"]
            if replica_of is not None:
                lines.append(f"replicaof {HOST} {replica_of}")
            return lines

        return config

    def sentinel_config(node_folder: Path, primary_port: int) -> Callable[[int], list[str]]:
        return lambda port: [
            *_base_config(node_folder, port, "sentinel.log"),
            f"sentinel monitor {service} {HOST} {primary_port} {sentinels // 2 + 1}",
            f"sentinel down-after-milliseconds {service} 1000",
            f"sentinel failover-timeout {service} 5000",
            f"sentinel parallel-syncs {service} 1",
        ]

    try:
        primary_folder = folder / "data-0"
        primary = _start(primary_folder, "master", data_config(primary_folder, None))
        group.data_nodes.append(primary)
        for i in range(1, replicas + 1):
            node_folder = folder / f"data-{i}"
            group.data_nodes.append(_start(node_folder, "replica", data_config(node_folder, primary.port)))
        # the sentinels learn the replicas from the primary's INFO, which they read on connecting and
        # then only every 10 s: start them once the primary lists every replica
        _wait("the replicas to sync", lambda: group._unlinked(primary), FORM_S)
        for i in range(sentinels):
            node_folder = folder / f"sentinel-{i}"
            config = sentinel_config(node_folder, primary.port)
            group.sentinels.append(_start(node_folder, "sentinel", config, sentinel=True))
        _wait(
            "the sentinels to find everyone",
            lambda: group._sentinels_see(primary, group.data_nodes),
            FORM_S,
        )
        yield group
    finally:
        group._clients.close_all()
        _stop_all([*group.sentinels, *group.data_nodes])


# --------------------------------------------------------------------------------------------------
# one server


@contextlib.contextmanager
def redis_server(folder: Path, *config: str) -> Iterator[Node]:
    """One ``redis-server`` on a free loopback port with the extra config lines ``config``; stopped
    on exit (also when killed and restarted meanwhile)."""
    node = _start(folder, "master", lambda port: [*_data_config(folder, port), *config])
    try:
        yield node
    finally:
        _stop_all([node])


def restart(node: Node) -> None:
    """Start a killed (or stopped) single server again, on its port, with its config."""
    if node.alive:
        _kill(node)
    node.process = _spawn(node.argv)
    if not _started(node.port, node.process, START_S, node.certs):
        raise RuntimeError(f"redis-server in {node.folder} did not start again:\n{_log_tail(node.folder)}")


# --------------------------------------------------------------------------------------------------
# TLS

#: the extensions of each certificate :func:`make_certs` makes (an ``openssl`` config file)
_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
# clientAuth too: a server's certificate is also what it shows as a client (a sentinel, a replica)
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""
_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
CERT_DAYS = 2


class TLSUnsupported(RuntimeError):
    """The ``redis-server`` here was built without TLS (or ``openssl`` is missing)."""


@dataclass(frozen=True)
class Certs:
    """A throwaway CA and two certificates it signed, each with its key (PEM files, no password):
    the server's, for 127.0.0.1 and localhost, and a client's."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(folder: Path, *args: str) -> None:
    try:
        done = subprocess.run([OPENSSL, *args], cwd=folder, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise TLSUnsupported(f"no {OPENSSL} to make test certificates with") from None
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{done.stderr}")


def make_certs(folder: Path, name: str = "gpuboss test CA") -> Certs:
    """Make a CA named ``name`` in ``folder`` and sign a server and a client certificate with it;
    each call makes a CA of its own (ECDSA P-256, valid for :data:`CERT_DAYS` days)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "openssl.cnf"
    config.write_text(_OPENSSL_CONFIG)
    ca, ca_key = folder / "ca.crt", folder / "ca.key"
    _openssl(
        folder, "req", "-x509", "-config", str(config), "-extensions", "ca", *_KEY,
        "-keyout", str(ca_key), "-out", str(ca), "-days", str(CERT_DAYS), "-subj", f"/CN={name}",
    )  # fmt: skip
    for serial, (who, cn) in enumerate((("server", "localhost"), ("client", "gpuboss test client")), 1):
        csr = folder / f"{who}.csr"
        _openssl(
            folder, "req", "-new", "-config", str(config), *_KEY,
            "-keyout", str(folder / f"{who}.key"), "-out", str(csr), "-subj", f"/CN={cn}",
        )  # fmt: skip
        _openssl(
            folder, "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
            "-set_serial", str(serial), "-days", str(CERT_DAYS), "-extfile", str(config),
            "-extensions", who, "-out", str(folder / f"{who}.crt"),
        )  # fmt: skip
    return Certs(
        ca, folder / "server.crt", folder / "server.key", folder / "client.crt", folder / "client.key"
    )


def _no_tls(stderr: str, log: str) -> str | None:
    """Why a server that exited did so for want of TLS support, or None if it did not."""
    for line in stderr.splitlines():
        if line.startswith(">>> 'tls-"):  # Redis <= 7.0 built without TLS: the directives are unknown
            return f"{line.removeprefix('>>> ')}: {stderr.strip().splitlines()[-1]}"
    if "Failed finding TLS support" in log:  # Redis >= 7.2 without its TLS module
        return "Failed finding TLS support"
    return None


def _tls_config(certs: Certs, port: int, auth_clients: bool) -> list[str]:
    """Listen on TLS on ``port`` (and, with ``port 0`` in the base config, on nothing else); with
    ``auth_clients``, a client must show a certificate the CA signed."""
    return [
        f"tls-port {port}",
        f"tls-cert-file {_quote(str(certs.server_cert))}",
        f"tls-key-file {_quote(str(certs.server_key))}",
        f"tls-ca-cert-file {_quote(str(certs.ca))}",
        f"tls-auth-clients {'yes' if auth_clients else 'no'}",
        "tls-replication yes",  # a replica's or a sentinel's links to the primary are TLS too
    ]


@contextlib.contextmanager
def tls_redis_server(folder: Path, certs: Certs, *config: str, auth_clients: bool = False) -> Iterator[Node]:
    """One ``redis-server`` that listens only on TLS, on a free loopback port (``node.port``), with
    the server certificate of ``certs`` and the extra config lines ``config``; with
    ``auth_clients``, it refuses a client without a certificate the CA signed. Stopped on exit.
    :class:`TLSUnsupported` if this redis-server was built without TLS."""
    node = _start(
        folder, "master",
        lambda port: [*_data_config(folder, 0), *_tls_config(certs, port, auth_clients), *config],
        certs=certs,
    )  # fmt: skip
    try:
        yield node
    finally:
        _stop_all([node])


@contextlib.contextmanager
def tls_sentinel(
    folder: Path, certs: Certs, primary: Node, service: str = "gpuboss", *, auth_clients: bool = False
) -> Iterator[Node]:
    """One Sentinel that listens only on TLS and monitors ``primary`` (a :func:`tls_redis_server`)
    as ``service`` with quorum 1, over TLS; returns once it has read the primary's INFO (so its
    own TLS link works). Stopped on exit."""

    def config(port: int) -> list[str]:
        return [
            *_base_config(folder, 0, "sentinel.log"),
            *_tls_config(certs, port, auth_clients),
            f"sentinel monitor {service} {primary.host} {primary.port} 1",
            f"sentinel down-after-milliseconds {service} 1000",
        ]

    node = _start(folder, "sentinel", config, sentinel=True, certs=certs)
    try:

        def sees_primary() -> str | None:
            with contextlib.closing(_admin(*node.addr, certs=certs)) as c:
                if _sentinel_primary(c, service) != primary.addr:
                    return f"it does not name {primary.addr}"
                seen = _sentinel_master(c, service)
            if set(seen["flags"].split(",")) != {"master"}:
                return f"it flags the primary {seen['flags']}"
            # the run id comes from the primary's INFO: the sentinel has reached it over TLS
            return None if seen.get("runid") else "it has not read the primary's INFO yet"

        _wait("the TLS sentinel to see the primary", sees_primary, FORM_S)
        yield node
    finally:
        _stop_all([node])


def _sentinel_master(sentinel: redis.Redis, service: str) -> dict[str, str]:
    """What ``SENTINEL MASTER`` says of ``service``'s primary (``flags``, ``runid``, ...)."""
    reply = _call(sentinel, "SENTINEL", "MASTER", service)
    fields = reply if isinstance(reply, dict) else dict(zip(reply[::2], reply[1::2], strict=True))
    return {str(k): str(v) for k, v in fields.items()}
