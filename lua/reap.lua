-- reap: end expired leases and abandoned waiters, oldest first, then grant what now fits.
-- KEYS: the pool's keys (see _common.lua).
-- ARGV[1] limit  int  most entries to reap in this call, 1..10000
-- Replies: {"ok", "now", now, "reaped", n, "more", 0|1}: more = expired entries remain
--        | bad_request
local limit = int_arg(ARGV[1], 1, 10000)
if limit == nil then return fail('bad_request', 'limit must be an integer from 1 to 10000') end

writes_even_when_full()
local now = now_ms()
local n = reap(now, limit)
if n > 0 then settle_all(now) end
local more = redis.call('ZCOUNT', K_EXPIRY, '-inf', int(now)) > 0 and 1 or 0
return {'ok', 'now', now, 'reaped', n, 'more', more}
