-- measure: record the agent's reading of one device: its health, the memory used outside leases,
-- and what the holders of its leases really use; log findings when they change.
-- The device hash gets `state`, `unmanaged_mib` (its budget shrinks by it), `seen_mib`,
-- `leak_mib`, `leak_pids`, `agent_host` and `measured_at`. A lost device's unmanaged_mib is
-- total - reserved, so its budget is 0 and nothing more is granted on it until it is back.
-- Each lease read gets `measured_mib`, `peak_mib`, `measured_at` and, while there is one, its
-- `finding`: "over_use" (measured above its size by more than over_pct; it lasts until the usage
-- is back within the size) or "under_use" (its peak below under_pct of its size once it has been
-- held under_after_ms). Each label `k=v` of a lease read keeps the highest peak of its leases in
-- the pool's hash `peaks` (at most 1024 labels).
-- Events, each only when its finding appears: over_use, under_use (per lease), leak (a process
-- holding no lease that was not reported before), device_lost and device_back.
-- Work is bounded by the number of readings (at most 1024) plus one settling of the queue.
-- KEYS: the pool's keys (see _common.lua).
-- Operators only: its first write is a capability check on the pool's `admin` key (keys.py).
-- ARGV[1] device         string  device name
-- ARGV[2] agent_host     string  host of the agent that read it
-- ARGV[3] state          string  "ok", or "lost" (vanished or failing)
-- ARGV[4] unmanaged_mib  int     MiB used outside leases, as smoothed by the agent, >= 0
-- ARGV[5] seen_mib       int     MiB in use on the device as the driver reports it, >= 0
-- ARGV[6] leak_mib       int     MiB used by processes that hold no lease, >= 0
-- ARGV[7] leak_pids      string  those processes' pids, space-separated, "" for none
-- ARGV[8] over_pct       int     over-use threshold, percent above a lease's size, 0..10000
-- ARGV[9] under_pct      int     under-use threshold, percent of a lease's size, 0..100
-- ARGV[10] under_after_ms int    how long a lease is held before it can be under-using, ms
-- ARGV[11] n             int     number of lease readings that follow, 0..1024
-- ARGV[12..] readings: n pairs of a lease id on the device and the MiB its holder uses there
-- Replies: {"ok", "now", now, "events", n, "unmanaged", mib} | bad_request | device_not_found
local MAX_READINGS = 1024
local PEAK_LABELS = 1024
local FIRST = 12
local name, agent_host, state = ARGV[1], ARGV[2], ARGV[3]
local unmanaged = int_arg(ARGV[4], 0, MAX_MIB)
local seen = int_arg(ARGV[5], 0, MAX_MIB)
local leak_mib = int_arg(ARGV[6], 0, MAX_MIB)
local leak_pids = ARGV[7]
local over_pct = int_arg(ARGV[8], 0, 10000)
local under_pct = int_arg(ARGV[9], 0, 100)
local under_after_ms = int_arg(ARGV[10], 0, MAX_TTL_MS)
local n = int_arg(ARGV[11], 0, MAX_READINGS)

if not valid_name(name) then return fail('bad_request', 'device name must be 1-64 of [A-Za-z0-9_.:-]') end
if agent_host == nil or #agent_host > 255 then return fail('bad_request', 'host must be at most 255 bytes') end
if state ~= 'ok' and state ~= 'lost' then return fail('bad_request', 'state must be ok or lost') end
if unmanaged == nil or seen == nil or leak_mib == nil then
  return fail('bad_request', 'unmanaged_mib, seen_mib and leak_mib must be integers from 0 to ' .. MAX_MIB)
end
if leak_pids == nil or #leak_pids > 4096 or string.find(leak_pids, '^[%d ]*$') == nil then
  return fail('bad_request', 'leak_pids must be pids separated by spaces, at most 4096 bytes')
end
if over_pct == nil or under_pct == nil or under_after_ms == nil then
  return fail('bad_request', 'over_pct 0..10000, under_pct 0..100, under_after_ms 0..' .. MAX_TTL_MS)
end
if n == nil or #ARGV ~= FIRST - 1 + 2 * n then
  return fail('bad_request', 'n must count the readings that follow, 0..' .. MAX_READINGS)
end
local readings = {}
for i = 0, n - 1 do
  local id, mib = ARGV[FIRST + 2 * i], int_arg(ARGV[FIRST + 2 * i + 1], 0, MAX_MIB)
  if not valid_name(id) or mib == nil then
    return fail('bad_request', 'a reading is a lease id and the MiB its holder uses, 0..' .. MAX_MIB)
  end
  readings[#readings + 1] = {id = id, mib = mib}
end

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

local dkey = device_key(name)
local d = redis.call('HMGET', dkey, 'total_mib', 'reserved_mib', 'state', 'leak_pids')
local limit = tonumber(d[1]) - tonumber(d[2])
local was, old_pids = d[3] or 'ok', d[4] or ''
-- The budget never goes below 0: unmanaged use beyond it only leaves existing leases over it.
if state == 'lost' or unmanaged > limit then unmanaged = limit end
redis.call('HSET', dkey, 'state', state, 'unmanaged_mib', unmanaged, 'seen_mib', seen, 'leak_mib', leak_mib,
           'leak_pids', leak_pids, 'agent_host', agent_host, 'measured_at', int(now))
local events = 0
if state ~= was then
  event(state == 'lost' and 'device_lost' or 'device_back', {'device', name, 'host', agent_host})
  events = events + 1
end
if leak_pids ~= '' then
  local known, new = {}, false
  for pid in string.gmatch(old_pids, '%d+') do known[pid] = true end
  for pid in string.gmatch(leak_pids, '%d+') do new = new or not known[pid] end
  if new then
    event('leak', {'device', name, 'host', agent_host, 'pids', leak_pids, 'mib', leak_mib})
    events = events + 1
  end
end

local peaks_key = PREFIX .. 'peaks'

local function on_device(l)
  for _, dev in ipairs(lease_devices(l)) do
    if dev == name then return true end
  end
  return false
end

local function record_peak(labels, peak)
  local ok, decoded = pcall(cjson.decode, labels)
  if not ok or type(decoded) ~= 'table' then return end
  for k, v in pairs(decoded) do
    if type(k) == 'string' and type(v) == 'string' then
      local label = k .. '=' .. v
      local old = redis.call('HGET', peaks_key, label)
      if (old and tonumber(old) < peak) or (not old and redis.call('HLEN', peaks_key) < PEAK_LABELS) then
        redis.call('HSET', peaks_key, label, peak)
      end
    end
  end
end

for _, r in ipairs(readings) do
  local l = load_lease(r.id)
  if l and l.device and not TERMINAL[l.state] and on_device(l) then
    local key = lease_key(l.id)
    local v = redis.call('HMGET', key, 'peak_mib', 'finding')
    local peak = math.max(tonumber(v[1] or 0), r.mib)
    local finding, found = v[2] or '', ''
    if r.mib * 100 > l.mib * (100 + over_pct) or (finding == 'over_use' and r.mib > l.mib) then
      found = 'over_use'
    elseif peak * 100 < l.mib * under_pct and now - tonumber(l.granted_at) >= under_after_ms then
      found = 'under_use'
    end
    redis.call('HSET', key, 'measured_mib', r.mib, 'peak_mib', peak, 'measured_at', int(now))
    if found == '' then
      redis.call('HDEL', key, 'finding')
    else
      redis.call('HSET', key, 'finding', found)
    end
    if found ~= '' and found ~= finding then
      event(found, {'lease', l.id, 'holder', l.holder, 'device', name, 'mib', l.mib,
                    'measured_mib', r.mib, 'peak_mib', peak})
      events = events + 1
    end
    record_peak(l.labels, peak)
  end
end

-- The budget may have grown (less unmanaged use, a device back): grant what now fits.
settle_all(now)
return {'ok', 'now', now, 'events', events, 'unmanaged', unmanaged}
