"""Contracts that keep the Lua scripts, the key layout, the error table and the exports in step."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from typing import Any

import pytest
import redis

import gpuboss_client
from gpuboss_client import Boss, PoolKeys, _measure, _ops, errors, keys, scripts
from gpuboss_client import _core as core
from gpuboss_client.errors import ERRORS, GpubossError, NotFound, ProtocolError, error_for

ROOT = Path(__file__).resolve().parents[1]
LUA = ROOT / "lua"
COMMON = (LUA / "_common.lua").read_text(encoding="utf-8")
VERBS = sorted(p.stem for p in LUA.glob("*.lua") if p.stem != "_common")


def split(name: str) -> tuple[list[str], str]:
    """The opening comment block of a script (its contract) and the code after it."""
    lines = (LUA / f"{name}.lua").read_text(encoding="utf-8").splitlines()
    n = next(i for i, line in enumerate(lines) if not line.startswith("--"))
    return lines[:n], "\n".join(lines[n:])


def strip_comments(code: str) -> str:
    return re.sub(r"--[^\n]*", "", code)


def functions(source: str) -> dict[str, tuple[list[str], str]]:
    """Top-level ``local function name(params) ... end`` of a Lua file: params and body."""
    out: dict[str, tuple[list[str], str]] = {}
    lines = source.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"local function (\w+)\(([^)]*)\)(.*)$", lines[i])
        i += 1
        if m is None:
            continue
        name, params, rest = m.groups()
        if rest.rstrip().endswith(" end"):  # a one-liner
            body = rest
        else:
            start = i
            while lines[i] != "end":
                i += 1
            body = "\n".join(lines[start:i])
        out[name] = ([p.strip() for p in params.split(",") if p.strip()], body)
    return out


COMMON_FUNCS = functions(strip_comments(COMMON))


def reached(code: str) -> list[str]:
    """``code`` and the bodies of the _common.lua functions it calls, directly or through others
    (e.g. ``held_lease``, whose error and ``ended`` replies the verbs that call it return)."""
    seen: set[str] = set()
    todo = [code]
    texts = []
    while todo:
        text = todo.pop()
        texts.append(text)
        for name, (_params, body) in COMMON_FUNCS.items():
            if name not in seen and re.search(rf"\b{name}\(", text):
                seen.add(name)
                todo.append(body)
    return texts


def reply_codes(code: str) -> set[str]:
    """Success codes a piece of Lua can reply with (not errors)."""
    found: set[str] = set()
    for text in reached(code):
        found |= set(re.findall(r"\{'(\w+)', 'now'", text))
        for name, (params, _body) in COMMON_FUNCS.items():
            if name.endswith("_reply") and params and params[0] == "code":
                found |= set(re.findall(rf"\b{name}\('(\w+)'", text))
    return found


def fail_codes(code: str) -> set[str]:
    return {c for text in reached(code) for c in re.findall(r"\bfail\('(\w+)'", text)}


def test_names_are_the_lua_files() -> None:
    assert set(scripts.NAMES) == set(VERBS)
    assert list(scripts.NAMES) == sorted(scripts.NAMES)
    assert set(scripts.script_shas()) == set(VERBS)
    assert len(set(scripts.script_shas().values())) == len(VERBS)


def test_script_source_is_common_then_verb() -> None:
    for name in VERBS:
        text = scripts.source(name)
        assert text.startswith(COMMON)
        assert text.endswith((LUA / f"{name}.lua").read_text(encoding="utf-8"))
    with pytest.raises(KeyError):
        scripts.source("_common")


@pytest.mark.parametrize("name", VERBS)
def test_script_opens_with_its_contract(name: str) -> None:
    header, body = split(name)
    text = "\n".join(header)
    assert re.match(rf"-- {name}: \S.+", header[0]), f"{name}.lua: first line must be '-- {name}: purpose'"
    assert "KEYS" in text
    assert "Replies:" in text
    used = set(map(int, re.findall(r"ARGV\[(\d+)\]", strip_comments(body))))
    documented = [int(n) for n in re.findall(r"^-- ARGV\[(\d+)\] \w+ +\S", text, re.M)]
    assert documented == list(range(1, len(documented) + 1)), f"{name}.lua: ARGV documented out of order"
    assert used == set(documented), f"{name}.lua: ARGV used {sorted(used)} but documented {documented}"
    if not used:
        assert "-- ARGV: none" in text
    assert "KEYS[" not in strip_comments(body), f"{name}.lua: bind KEYS through _common.lua's names"


@pytest.mark.parametrize("name", VERBS)
def test_every_reply_code_is_documented(name: str) -> None:
    header, body = split(name)
    text = "\n".join(header)
    replies = text[text.index("Replies:") :]
    code = strip_comments(body)
    documented_ok = set(re.findall(r'\{"(\w+)"', replies))
    assert reply_codes(code) == documented_ok, f"{name}.lua"
    documented_errors = set(re.findall(r"\b([a-z]+(?:_[a-z]+)+)\b", replies)) & set(ERRORS)
    assert fail_codes(code) == documented_errors, f"{name}.lua"


def test_every_error_code_is_in_the_error_table() -> None:
    for name in [*VERBS, "_common"]:
        code = strip_comments((LUA / f"{name}.lua").read_text(encoding="utf-8"))
        assert fail_codes(code) <= set(ERRORS), name


# The operations (where the scripts are called), then the two drivers.
CORE_TREE = ast.Module(
    body=[node for m in (_ops, _measure) for node in ast.parse(inspect.getsource(m)).body], type_ignores=[]
)
CLIENT_TREES = [
    CORE_TREE,
    *(ast.parse(inspect.getsource(m)) for m in (gpuboss_client.sync, gpuboss_client.aio)),
]


def _passed_to(func: ast.FunctionDef, param: str) -> set[str]:
    """The string constants every call of ``func`` in the client passes as its ``param``, following
    a caller that passes on a parameter of its own (``mark`` -> ``mark_ref``) to its callers."""
    index = [a.arg for a in func.args.args].index(param)
    found: set[str] = set()
    for tree in CLIENT_TREES:
        for caller in ast.walk(tree):
            if not isinstance(caller, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for n in ast.walk(caller):
                if not isinstance(n, ast.Call):
                    continue
                callee = n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", None)
                if callee != func.name:
                    continue
                given = n.args[index] if len(n.args) > index else None
                given = next((k.value for k in n.keywords if k.arg == param), given)
                if isinstance(given, ast.Name) and given.id in [a.arg for a in caller.args.args]:
                    assert isinstance(caller, ast.FunctionDef), ast.unparse(n)
                    found |= _passed_to(caller, given.id)
                    continue
                assert isinstance(given, ast.Constant), f"{func.name}: {ast.unparse(n)}"
                found.add(str(given.value))
    assert found, f"nothing calls {func.name} with a constant {param}"
    return found


def _scripts_of(node: ast.AST, func: ast.FunctionDef) -> set[str] | None:
    """The scripts named by the one ``Call(name, ...)`` inside ``node``, if there is one: a
    constant, or a parameter of ``func`` (``mark(lease, verb)``), resolved from its call sites."""
    calls = [
        n for n in ast.walk(node)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "Call"
    ]  # fmt: skip
    if len(calls) != 1:
        return None
    first = calls[0].args[0]
    if isinstance(first, ast.Name) and first.id in [a.arg for a in func.args.args]:
        return _passed_to(func, first.id)
    assert isinstance(first, ast.Constant), ast.unparse(node)
    return {str(first.value)}


def _expected_by_script() -> dict[str, set[str]]:
    """For each script, the reply codes the core accepts where it calls it (read from its AST).

    ``parse_reply((yield Call("x", ...)), codes)`` and ``reply = yield Call("x", ...)`` followed
    by ``parse_reply(reply, codes)`` in the same function are both understood, and so is a script
    name passed in as a parameter (``Call(verb, ...)``).
    """
    tree = CLIENT_TREES[0]
    out: dict[str, set[str]] = {}
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef):
            continue
        bound = {
            t.id: _scripts_of(n.value, func)
            for n in ast.walk(func)
            if isinstance(n, ast.Assign) and isinstance(n.value, ast.Yield)
            for t in n.targets
            if isinstance(t, ast.Name)
        }
        for node in ast.walk(func):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "parse_reply"
            ):
                continue
            arg = node.args[0]
            names = bound.get(arg.id) if isinstance(arg, ast.Name) else _scripts_of(arg, func)
            assert names, f"cannot tell which script {ast.unparse(node)} parses"
            accepted = node.args[1]
            if isinstance(accepted, ast.Name):
                value: Any = getattr(core, accepted.id)
            else:
                assert isinstance(accepted, ast.Call), ast.unparse(accepted)
                value = ast.literal_eval(accepted.args[0])
            for name in names:
                out.setdefault(name, set()).update(value)
    return out


def test_client_expects_exactly_the_codes_each_script_replies() -> None:
    expected = _expected_by_script()
    assert set(expected) == set(VERBS), "every script is called through parse_reply"
    for name in VERBS:
        _, body = split(name)
        assert reply_codes(strip_comments(body)) == expected[name], name


def test_every_success_code_is_not_an_error_code() -> None:
    expected = _expected_by_script()
    for codes in expected.values():
        assert not codes & set(ERRORS)


def test_common_declares_the_keys_in_pool_keys_order() -> None:
    declared = re.findall(r"^--\s+KEYS\[(\d+)\] (\w+) ", COMMON, re.M)
    assert [int(i) for i, _ in declared] == list(range(1, len(declared) + 1))
    pk = PoolKeys("p")
    assert pk.script_keys() == [getattr(pk, name) for _, name in declared]
    binds = re.findall(r"^\s+((?:PREFIX|K_\w+)[\w, ]*) = (keys\[[\w\[\], ]+)$", COMMON, re.M)
    assert binds, "_common.lua's bind() binds keys[1..] to PREFIX and K_ names"
    names = [n.strip() for lhs, _ in binds for n in lhs.split(",")]
    indexes = [int(i) for _, rhs in binds for i in re.findall(r"keys\[(\d+)\]", rhs)]
    assert [n.removeprefix("K_").lower() for n in names] == [name for _, name in declared]
    assert indexes == list(range(1, len(declared) + 1))


def test_no_script_scans_the_keyspace() -> None:
    for path in LUA.glob("*.lua"):
        code = strip_comments(path.read_text(encoding="utf-8")).upper()
        for cmd in ("'KEYS'", "'SCAN'", "'FLUSHDB'", "'FLUSHALL'", "'SELECT'"):
            assert cmd not in code, f"{path.name} calls {cmd}"


def test_lua_key_builders_agree_with_pool_keys(real_redis: redis.Redis) -> None:
    pk = PoolKeys("p-1.x")
    probe = COMMON + (
        "\nbind(KEYS)\nreturn {lease_key('L'), device_key('D'), device_leases_key('D'), wake_key('L'),"
        " evictable_key('D'), K_CONFIG, live_key()}"
    )
    got = real_redis.eval(probe, len(pk.script_keys()), *pk.script_keys())
    assert got == [
        pk.lease("L"), pk.device("D"), pk.device_leases("D"), pk.wake("L"), pk.evictable("D"), pk.config,
        pk.leases,
    ]  # fmt: skip


def test_keys_in_redis_are_the_ones_pool_keys_spells(real_redis: redis.Redis) -> None:
    boss = Boss(real_redis, holder="k")
    boss.add_device("gpu0", 1024, pool="pk")
    first = boss.acquire(1024, pool="pk", request_id="first")
    req = core.AcquireRequest.build(
        vram=1024, vram_gb=None, priority=50, device=None, pool="pk", ttl=60, timeout=None,
        labels=None, request_id="second",
    )  # fmt: skip
    op = core.acquire(req, boss.holder, lambda: 0.0)
    step = op.send(None)
    assert isinstance(step, core.Call)
    step = op.send(boss.script(step.script, step.keys, step.args))
    assert isinstance(step, core.Command)
    assert step.args[:2] == ("BLPOP", PoolKeys("pk").wake("second"))
    pk = PoolKeys("pk")
    assert set(real_redis.keys("*")) == {
        keys.POOLS, pk.devices, pk.device("gpu0"), pk.device_leases("gpu0"), pk.lease("first"),
        pk.lease("second"), pk.queue, pk.wants, pk.expiry, pk.events, pk.seq, pk.leases,
    }  # fmt: skip
    assert real_redis.hgetall(pk.wants) == {"*": "1", "#": "1"}  # the queue's census
    boss.release(first)  # grants "second" and wakes it; the queue and its census are gone
    assert set(real_redis.keys("*")) == {
        keys.POOLS, pk.devices, pk.device("gpu0"), pk.device_leases("gpu0"), pk.lease("first"),
        pk.lease("second"), pk.expiry, pk.events, pk.seq, pk.wake("second"), pk.leases,
    }  # fmt: skip
    assert real_redis.smembers(pk.device_leases("gpu0")) == {"second"}
    assert all(k == keys.POOLS or str(k).startswith("gpuboss:{pk}:v1:") for k in real_redis.keys("*"))


def test_eviction_keys_in_redis_are_the_ones_pool_keys_spells(real_redis: redis.Redis) -> None:
    boss = Boss(real_redis, holder="k")
    boss.add_device("gpu0", 1024, pool="pk")
    boss.configure_pool("pk", min_residency=1, aging=2)
    warm = boss.acquire(512, pool="pk", request_id="warm", ttl=60)
    warm.idle()
    pk = PoolKeys("pk")
    assert real_redis.hgetall(pk.config) == {"min_residency_ms": "1000", "aging_ms": "2000"}
    assert real_redis.zrange(pk.evictable("gpu0"), 0, -1) == ["warm"]
    assert set(real_redis.keys("*")) == {
        keys.POOLS, pk.devices, pk.device("gpu0"), pk.device_leases("gpu0"), pk.lease("warm"),
        pk.expiry, pk.events, pk.seq, pk.config, pk.evictable("gpu0"), pk.leases,
    }  # fmt: skip
    warm.busy()  # in use and not preemptible: out of the eviction index again
    assert real_redis.exists(pk.evictable("gpu0")) == 0


def test_pool_keys_share_one_hash_slot() -> None:
    pk = PoolKeys("gpu-farm")
    every = [*pk.script_keys(), pk.lease("a"), pk.device("d"), pk.device_leases("d"), pk.wake("a")]
    every += [pk.evictable("d"), pk.config, pk.leases]
    tags = {re.search(r"\{([^}]*)\}", k).group(1) for k in every}  # type: ignore[union-attr]
    assert tags == {"gpu-farm"}
    assert all(k.startswith(f"{keys.ROOT}:{{gpu-farm}}:{keys.SCHEMA}:") for k in every)


def test_pool_and_name_rules_match_the_lua() -> None:
    # valid_name in Lua: 1-64 of [%w_.:-]; pools also may not contain ':' or braces.
    assert "#s >= 1 and #s <= 64 and string.find(s, '^[%w_.:-]+$')" in COMMON
    for good in ("a", "x" * 64, "GPU-0_1.a:b"):
        assert keys.valid_name(good)
    for bad in ("", "x" * 65, "a b", "{a}", "a/b", "é"):
        assert not keys.valid_name(bad)
        assert not keys.valid_pool(bad)
    assert not keys.valid_pool("a:b")


# --- errors ----------------------------------------------------------------------------------


def _tree() -> list[type[GpubossError]]:
    out: list[type[GpubossError]] = []
    todo: list[type[GpubossError]] = [GpubossError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo += cls.__subclasses__()
    return out


def test_error_table() -> None:
    tree = _tree()
    assert {cls for cls in tree if cls.__module__ == errors.__name__} == set(tree)
    codes = [cls.code for cls in tree]
    assert len(codes) == len(set(codes)), "error codes are unique"
    for code, cls in ERRORS.items():
        assert cls.code == code
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", code)
        assert 400 <= cls.http_status <= 599
        assert 2 <= cls.exit_code <= 125
        assert not cls.retryable or cls.http_status in (429, 503)
    # Every error that is ever raised is in the table; only the two abstract bases are not.
    assert set(tree) - set(ERRORS.values()) == {GpubossError, NotFound}
    raised: list[type[GpubossError]] = [*ERRORS.values(), GpubossError]
    exit_codes = [cls.exit_code for cls in raised]
    assert len(exit_codes) == len(set(exit_codes)), "one exit code per error class"
    assert {cls.code for cls in ERRORS.values() if cls.retryable} == {
        "acquire_timeout",
        "backend_unavailable",
        "consumer_unhealthy",
        "queue_full",
    }


def test_error_for_and_to_dict() -> None:
    for code, cls in ERRORS.items():
        err = error_for(code, "msg", lease="x", none=None)
        assert type(err) is cls
        assert err.to_dict() == {"error": code, "message": "msg", "retryable": cls.retryable, "lease": "x"}
    unknown = error_for("no_such_code", "m")
    assert isinstance(unknown, ProtocolError)
    assert "no_such_code" in unknown.message


def test_parse_reply_refuses_unknown_codes() -> None:
    with pytest.raises(ProtocolError):
        core.parse_reply(["surprise", "now", 1], frozenset({"ok"}))
    with pytest.raises(ProtocolError):
        core.parse_reply(["ok", "now"], frozenset({"ok"}))  # not code + pairs
    with pytest.raises(ProtocolError):
        core.parse_reply("ok", frozenset({"ok"}))
    assert core.parse_reply([b"ok", b"now", 5], frozenset({"ok"})) == ("ok", {"now": 5})


def test_readme_error_table_matches() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)` \| (yes|no) \| (\d+) \| (\d+) \|$", readme, re.M)
    assert rows, "README has the error table"
    table = {code: (name, retry == "yes", int(http), int(code_)) for code, name, retry, http, code_ in rows}
    assert table == {
        code: (cls.__name__, cls.retryable, cls.http_status, cls.exit_code) for code, cls in ERRORS.items()
    }


# --- exports ---------------------------------------------------------------------------------


def test_all_matches_public_names() -> None:
    public = {
        name for name, value in vars(gpuboss_client).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }  # fmt: skip
    assert set(gpuboss_client.__all__) == public
    assert len(gpuboss_client.__all__) == len(set(gpuboss_client.__all__))
    namespace: dict[str, Any] = {}
    exec("from gpuboss_client import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(gpuboss_client.__all__)


@pytest.mark.parametrize("module", [gpuboss_client.aio, errors, keys, scripts, gpuboss_client.sync,
                                    gpuboss_client.units, core])  # fmt: skip
def test_module_all_names_exist(module: Any) -> None:
    for name in module.__all__:
        assert hasattr(module, name), f"{module.__name__}.{name}"
