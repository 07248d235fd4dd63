-- cancel: a waiter that gives up leaves the queue; those behind it may be granted at once.
-- KEYS: the pool's keys (see _common.lua).
-- ARGV[1] id      string  lease id of the queued request
-- ARGV[2] holder  string  the holder that made the request
-- Replies: {"cancelled", "now", now}
--        | {"granted", ...}: it was granted first and the caller now holds it (as acquire replies)
--        | {"ended", "now", now, "state", s, "reason", r} | bad_request | lease_not_found
--        | lease_not_held: another holder's request
local id, holder = ARGV[1], ARGV[2]
if not valid_name(id) then return fail('bad_request', 'lease id must be 1-64 of [A-Za-z0-9_.:-]') end

writes_even_when_full()
local now = now_ms()
local dirty = reap(now, REAP_LIMIT) > 0
local l = load_lease(id)
if l == nil then
  if dirty then settle_all(now) end
  return fail('lease_not_found', 'no lease ' .. id)
end
if l.holder ~= holder then
  if dirty then settle_all(now) end
  return fail('lease_not_held', 'lease ' .. id .. ' belongs to another holder')
end
if expire_if_due(l, now) then dirty = true end
if l.state == 'queued' then
  end_lease(l, 'cancelled', now, nil)
  redis.call('DEL', wake_key(id))
  settle_all(now)
  return {'cancelled', 'now', now}
end
if dirty then settle_all(now) end
if TERMINAL[l.state] then return ended_reply(l, now) end
redis.call('DEL', wake_key(id))
return grant_reply('granted', l, now)
