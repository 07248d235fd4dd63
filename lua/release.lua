-- release: end a lease with its fencing token, then grant queued requests that now fit, in order.
-- An operator's force-release needs no token and also removes a waiter from the queue.
-- Forcing is for operators only: a capability check on the pool's `admin` key, before any change.
-- KEYS: the pool's keys (see _common.lua).
-- ARGV[1] id     string  lease id
-- ARGV[2] token  int     the lease's fencing token (ignored when forced)
-- ARGV[3] force  "1"|"0" operator force-release
-- Replies: {"released", "now", now}: released now, or already by this token (a retry); when
--          forced, followed by every field of the lease hash
--        | {"ended", "now", now, "state", s, "reason", r}: it had already ended otherwise
--        | bad_request | lease_not_found | lease_not_held
local id, force = ARGV[1], ARGV[3] == '1'
local token = int_arg(ARGV[2], 0, 9007199254740991)
if not valid_name(id) then return fail('bad_request', 'lease id must be 1-64 of [A-Za-z0-9_.:-]') end
if token == nil and not force then return fail('bad_request', 'token must be a non-negative integer') end

writes_even_when_full()
-- Forced: the operator's capability check (see remove_device.lua), after the write above, which
-- changes nothing, so that an operator can free memory while Redis is full.
if force then redis.call('SETRANGE', PREFIX .. 'admin', 0, '') end
local now = now_ms()
local dirty = reap(now, REAP_LIMIT) > 0
local l = load_lease(id)
if l == nil then
  if dirty then settle_all(now) end
  return fail('lease_not_found', 'no lease ' .. id)
end
if not force and tonumber(l.token) ~= token then
  if dirty then settle_all(now) end
  return fail('lease_not_held', 'lease ' .. id .. ' is not held with token ' .. ARGV[2])
end
if expire_if_due(l, now) then dirty = true end
if TERMINAL[l.state] then
  if dirty then settle_all(now) end
  if force then return lease_reply('released', id, now) end
  if l.state == 'released' then return {'released', 'now', now} end
  return ended_reply(l, now)
end
local was_queued = l.state == 'queued'
end_lease(l, force and 'force_released' or 'released', now, force and 'operator' or nil)
if was_queued then wake(l, now) end
settle_all(now)
if force then return lease_reply('released', id, now) end
return {'released', 'now', now}
