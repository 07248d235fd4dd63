-- busy: take a warm (idle) lease back into use. Refused once it is being evicted or has ended.
-- KEYS: the pool's keys (see _common.lua).
-- ARGV[1] id     string  lease id
-- ARGV[2] token  int     the lease's fencing token
-- Replies: {"ok", "now", now, "state", "active"}
--        | {"evicting", "now", now, "evict_deadline", ms}: it is being evicted (give it back)
--        | {"ended", "now", now, "state", s, "reason", r} | bad_request | lease_not_found
--        | lease_not_held
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
if dirty then
  -- What was reaped may let a waiter evict this very lease: look at it again after settling.
  settle_all(now)
  l = load_lease(id)
  if TERMINAL[l.state] then return ended_reply(l, now) end
end
if l.state == 'evicting' then return {'evicting', 'now', now, 'evict_deadline', l.evict_deadline} end
if l.state == 'idle' then
  redis.call('HSET', lease_key(id), 'state', 'active', 'used_at', int(now))
  l.state, l.used_at = 'active', int(now)
  index_evictable(l)
  index_live(l)
  event('busy', {'lease', id, 'holder', l.holder, 'device', l.device, 'mib', l.mib})
end
return {'ok', 'now', now, 'state', l.state}
