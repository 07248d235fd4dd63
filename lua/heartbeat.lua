-- heartbeat: push a lease's expiry forward and tell the holder the lease's true state.
-- KEYS: the pool's keys (see _common.lua).
-- ARGV[1] id      string  lease id
-- ARGV[2] token   int     the lease's fencing token
-- ARGV[3] ttl_ms  int     new lifetime from now, ms
-- Replies: {"ok", "now", now, "state", s, "expires_at", ms, "evict_deadline", ms or ""}: state
--          "evicting" means give the memory back (release) before evict_deadline; expires_at
--          is never past the lease's hard cap (max_hold), if it has one
--        | {"ended", "now", now, "state", s, "reason", r}: it ended (expired, revoked, ...)
--        | bad_request | lease_not_found | lease_not_held
local id = ARGV[1]
local token = int_arg(ARGV[2], 0, 9007199254740991)
local ttl_ms = int_arg(ARGV[3], 1, MAX_TTL_MS)
if not valid_name(id) then return fail('bad_request', 'lease id must be 1-64 of [A-Za-z0-9_.:-]') end
if token == nil then return fail('bad_request', 'token must be a non-negative integer') end
if ttl_ms == nil then return fail('bad_request', 'ttl_ms must be an integer from 1 to ' .. MAX_TTL_MS) end

writes_even_when_full()
local now = now_ms()
local dirty = reap(now, REAP_LIMIT) > 0
local l = load_lease(id)
if l == nil then
  if dirty then settle_all(now) end
  return fail('lease_not_found', 'no lease ' .. id)
end
if tonumber(l.token) ~= token then
  if dirty then settle_all(now) end
  return fail('lease_not_held', 'lease ' .. id .. ' is not held with token ' .. ARGV[2])
end
if expire_if_due(l, now) then dirty = true end
if dirty then settle_all(now) end
if TERMINAL[l.state] then return ended_reply(l, now) end
local expires_at = now + ttl_ms
-- A lease with a hard cap (max_hold) is never renewed past it.
if l.hold_until and tonumber(l.hold_until) < expires_at then expires_at = tonumber(l.hold_until) end
expires_at = int(expires_at)
redis.call('HSET', lease_key(id), 'expires_at', expires_at, 'ttl_ms', ttl_ms)
l.expires_at = expires_at
redis.call('ZADD', K_EXPIRY, int(due_at(l)), id)
return {'ok', 'now', now, 'state', l.state, 'expires_at', expires_at, 'evict_deadline', l.evict_deadline or ''}
