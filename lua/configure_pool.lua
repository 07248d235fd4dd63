-- configure_pool: set the pool's eviction and aging settings.
-- KEYS: the pool's keys (see _common.lua).
-- Operators only: its first write is a capability check on the pool's `admin` key (keys.py).
-- ARGV[1] min_residency_ms  int  a lease younger than this is evicted only if nothing else fits; 0 off
-- ARGV[2] aging_ms          int  a waiter rises one named priority level (10) per this much
--                                waiting, up to 100; 0 off (strict priority)
-- Replies: {"ok", "now", now} | bad_request
local min_residency_ms = int_arg(ARGV[1], 0, MAX_TTL_MS)
local aging_ms = int_arg(ARGV[2], 0, MAX_TTL_MS)
if min_residency_ms == nil or aging_ms == nil then
  return fail('bad_request', 'min_residency_ms and aging_ms must be integers from 0 to ' .. MAX_TTL_MS)
end
-- The capability check: Redis refuses this write to a user who may not run SETRANGE or write the
-- pool's `admin` key (holders, observers: deploy/redis-users.acl), before anything changed. It
-- changes nothing (an empty value, a key that never exists), and like any first write that
-- may grow memory it is refused while Redis is full.
redis.call('SETRANGE', PREFIX .. 'admin', 0, '')
local now = now_ms()
redis.call('HSET', K_CONFIG, 'min_residency_ms', min_residency_ms, 'aging_ms', aging_ms)
event('pool_configured', {'min_residency_ms', min_residency_ms, 'aging_ms', aging_ms})
return {'ok', 'now', now}
