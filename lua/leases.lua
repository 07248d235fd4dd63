-- leases: one page of the pool's live leases and waiters, soonest expiry first.
-- KEYS: the pool's keys (see _common.lua).
-- ARGV[1] offset  int  rank to start at, >= 0
-- ARGV[2] limit   int  page size, 1..1000
-- Replies: {"ok", "now", now, "total", n, "leases", {{<lease hash>..., "id", id}, ...}} | bad_request
local offset = int_arg(ARGV[1], 0, 9007199254740991)
local limit = int_arg(ARGV[2], 1, 1000)
if offset == nil or limit == nil then return fail('bad_request', 'offset >= 0 and limit 1..1000') end

local now = now_ms()
if reap(now, REAP_LIMIT) > 0 then settle_all(now) end
local out = {}
for i, id in ipairs(redis.call('ZRANGE', K_EXPIRY, offset, offset + limit - 1)) do
  local flat = redis.call('HGETALL', lease_key(id))
  flat[#flat + 1] = 'id'
  flat[#flat + 1] = id
  out[i] = flat
end
return {'ok', 'now', now, 'total', redis.call('ZCARD', K_EXPIRY), 'leases', out}
