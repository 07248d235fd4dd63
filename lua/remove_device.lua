-- remove_device: take a device out of the pool. Refused while it has leases, unless forced:
-- then its leases are force-released, at most 256 per call ("partial": call again).
-- Waiters that named the device (all waiters, when it was the last) are cancelled and woken.
-- KEYS: the pool's keys (see _common.lua).
-- Operators only: its first write is a capability check on the pool's `admin` key (keys.py).
-- ARGV[1] name   string  device id
-- ARGV[2] force  "1"|"0"
-- Replies: {"ok", "now", now, "devices", n_left} | {"partial", "now", now, "remaining", n}
--        | bad_request | device_not_found | device_busy
local name, force = ARGV[1], ARGV[2] == '1'
if not valid_name(name) then return fail('bad_request', 'device name must be 1-64 of [A-Za-z0-9_.:-]') end

-- The capability check: Redis refuses this write to a user who may not run SETRANGE or write the
-- pool's `admin` key (holders, observers: deploy/redis-users.acl), before anything changed. It
-- changes nothing (an empty value, a key that never exists), and like any first write that
-- may grow memory it is refused while Redis is full.
redis.call('SETRANGE', PREFIX .. 'admin', 0, '')
local now = now_ms()
local dirty = reap(now, REAP_LIMIT) > 0
if redis.call('SISMEMBER', K_DEVICES, name) == 0 then
  if dirty then settle_all(now) end
  return fail('device_not_found', 'no device ' .. name .. ' in this pool')
end
local lkey = device_leases_key(name)
local live = redis.call('SCARD', lkey)
if live > 0 and not force then
  if dirty then settle_all(now) end
  return fail('device_busy', 'device ' .. name .. ' has ' .. live .. ' live leases (force to remove)')
end
for _, id in ipairs(redis.call('SRANDMEMBER', lkey, 256)) do
  local l = load_lease(id)
  if l then end_lease(l, 'force_released', now, 'device_removed') else redis.call('SREM', lkey, id) end
end
local remaining = redis.call('SCARD', lkey)
if remaining > 0 then
  settle_all(now)
  return {'partial', 'now', now, 'remaining', remaining}
end
redis.call('DEL', device_key(name), lkey)
redis.call('SREM', K_DEVICES, name)
event('device_removed', {'device', name})
-- Waiters that named it (or any waiter, once the pool is empty) are cancelled and woken; past
-- the first QUEUE_SCAN of the queue they learn it at their next poll.
local left = redis.call('SCARD', K_DEVICES)
for _, id in ipairs(redis.call('ZRANGE', K_QUEUE, 0, QUEUE_SCAN - 1)) do
  local l = load_lease(id)
  if l and (l.want == name or left == 0) then
    end_lease(l, 'cancelled', now, 'device_removed')
    wake(l, now)
  end
end
settle_all(now)
return {'ok', 'now', now, 'devices', left}
