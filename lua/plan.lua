-- plan: say what would happen to a request right now, changing nothing it asks about (expired
-- leases are still reaped in passing, as by every script).
-- KEYS: the pool's keys (see _common.lua).
-- ARGV[1] mib       int     VRAM in MiB
-- ARGV[2] priority  int     0..100
-- ARGV[3] want      string  device name, or "" for the pool
-- ARGV[4] exclusive "1"|"0" (optional)
-- ARGV[5] gang      int     devices of one host, 1..16 (optional, 1)
-- Replies: {"grant", "now", now, "device", d}: it would be granted on d (a gang: "d1,d2") at once
--        | {"evict", "now", now, "device", d, "victims", {id, ...}}: it would evict these on d
--        | {"wait", "now", now, "ahead", n}: it would wait; n requests wait ahead of it
--        | {"never", "now", now, "largest", mib}: no device could ever hold it
--        | bad_request | pool_not_found | device_not_found
local mib = int_arg(ARGV[1], 1, MAX_MIB)
local priority = int_arg(ARGV[2], 0, 100)
local want = ARGV[3]
local exclusive = ARGV[4] == '1' and '1' or '0'
local gang = int_arg(ARGV[5] or 1, 1, 16)
if mib == nil then return fail('bad_request', 'mib must be an integer from 1 to ' .. MAX_MIB) end
if priority == nil then return fail('bad_request', 'priority must be an integer from 0 to 100') end
if want ~= '' and not valid_name(want) then return fail('bad_request', 'bad device name') end
if gang == nil then return fail('bad_request', 'devices must be an integer from 1 to 16') end

local now = now_ms()
if reap(now, REAP_LIMIT) > 0 then settle_all(now) end
local devs = load_devices()
if #devs == 0 then return fail('pool_not_found', 'the pool has no devices') end
if want ~= '' and redis.call('SISMEMBER', K_DEVICES, want) == 0 then
  return fail('device_not_found', 'no device ' .. want .. ' in this pool')
end
local cands = candidates(devs, want, mib)
local hosts, enough = {}, false
for _, d in ipairs(cands) do
  hosts[d.host] = (hosts[d.host] or 0) + 1
  enough = enough or hosts[d.host] >= gang
end
if not enough then
  local largest = 0
  for _, d in ipairs(devs) do
    if (want == '' or want == d.name) and d.budget > largest then largest = d.budget end
  end
  return {'never', 'now', now, 'largest', largest}
end
local bound = '(' .. int((101 - priority) * PRIO_SPAN)
local blocked, partial = settle(now, devs, bound, true)
local r = {id = '', mib = mib, priority = priority, claim_mib = 0, exclusive = exclusive, gang = gang}
if not partial then
  local picked = best_fit(cands, blocked, r)
  if picked then
    local names = {}
    for i, d in ipairs(picked) do names[i] = d.name end
    return {'grant', 'now', now, 'device', table.concat(names, ',')}
  end
  local d, victims = plan_eviction(r, cands, blocked, now)
  if d then
    local ids = {}
    for i, v in ipairs(victims) do ids[i] = v.id end
    return {'evict', 'now', now, 'device', d.name, 'victims', ids}
  end
end
return {'wait', 'now', now, 'ahead', redis.call('ZCOUNT', K_QUEUE, '-inf', bound)}
