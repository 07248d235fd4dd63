-- devices: the pool's devices with their budgets and usage, and its lease and queue counts.
-- KEYS: the pool's keys (see _common.lua).
-- ARGV: none
-- Replies: {"ok", "now", now, "live", n, "queued", n, "devices", {{<device hash>..., "leases", n}, ...}}
--          live counts granted leases and waiters alike.
local now = now_ms()
if reap(now, REAP_LIMIT) > 0 then settle_all(now) end
local names = redis.call('SMEMBERS', K_DEVICES)
table.sort(names)
local out = {}
for i, name in ipairs(names) do
  local flat = redis.call('HGETALL', device_key(name))
  flat[#flat + 1] = 'leases'
  flat[#flat + 1] = redis.call('SCARD', device_leases_key(name))
  out[i] = flat
end
return {'ok', 'now', now, 'live', redis.call('ZCARD', K_EXPIRY), 'queued', redis.call('ZCARD', K_QUEUE),
        'devices', out}
