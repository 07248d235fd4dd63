-- configure_pool: set the pool's eviction and aging settings.
-- KEYS: the pool's keys (see _common.lua).
-- ARGV[1] min_residency_ms  int  a lease younger than this is evicted only if nothing else fits; 0 off
-- ARGV[2] aging_ms          int  a waiter rises one named priority level (10) per this much
--                                waiting, up to 100; 0 off (strict priority)
-- Replies: {"ok", "now", now} | bad_request
local min_residency_ms = int_arg(ARGV[1], 0, MAX_TTL_MS)
local aging_ms = int_arg(ARGV[2], 0, MAX_TTL_MS)
if min_residency_ms == nil or aging_ms == nil then
  return fail('bad_request', 'min_residency_ms and aging_ms must be integers from 0 to ' .. MAX_TTL_MS)
end
local now = now_ms()
redis.call('HSET', K_CONFIG, 'min_residency_ms', min_residency_ms, 'aging_ms', aging_ms)
event('pool_configured', {'min_residency_ms', min_residency_ms, 'aging_ms', aging_ms})
return {'ok', 'now', now}
