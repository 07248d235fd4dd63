-- idle: mark a lease as kept warm (resident, not in use). Anyone who needs the room may evict it,
-- least recently used first; waiters that could not fit may do so at once.
-- KEYS: the pool's keys (see _common.lua).
-- ARGV[1] id     string  lease id
-- ARGV[2] token  int     the lease's fencing token
-- Replies: {"ok", "now", now, "state", "idle"} | {"evicting", "now", now, "evict_deadline", ms}:
--          it is being evicted (give it back) | {"ended", "now", now, "state", s, "reason", r}
--        | bad_request | lease_not_found | lease_not_held
local id = ARGV[1]
local token = int_arg(ARGV[2], 0, 9007199254740991)
if not valid_name(id) then return fail('bad_request', 'lease id must be 1-64 of [A-Za-z0-9_.:-]') end
if token == nil then return fail('bad_request', 'token must be a non-negative integer') end

local now = now_ms()
local dirty = reap(now, REAP_LIMIT) > 0
local l, err = held_lease(id, token, now)
if err then
  if dirty then settle_all(now) end
  return err
end
if l.state == 'active' then
  redis.call('HSET', lease_key(id), 'state', 'idle', 'used_at', int(now))
  l.state, l.used_at = 'idle', int(now)
  index_evictable(l)
  index_live(l)
  event('idle', {'lease', id, 'holder', l.holder, 'device', l.device, 'mib', l.mib})
  dirty = true
end
if dirty then settle_all(now) end
l = load_lease(id)
if l.state == 'evicting' then return {'evicting', 'now', now, 'evict_deadline', l.evict_deadline} end
if TERMINAL[l.state] then return ended_reply(l, now) end
return {'ok', 'now', now, 'state', l.state}
