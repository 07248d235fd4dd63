-- _common.lua: helpers shared by every script; the loader puts this file in front of each one.
--
-- Every script takes the same KEYS, all in the pool's hash slot:
--   KEYS[1] prefix   string  "gpuboss:{<pool>}:v1:"; per-lease and per-device keys are built from it
--   KEYS[2] devices  set     names of the pool's devices
--   KEYS[3] queue    zset    waiting lease ids, score = (100 - priority) * 2^40 + arrival seq
--   KEYS[4] expiry   zset    live lease and waiter ids, score = expires_at (ms, Redis TIME)
--   KEYS[5] events   stream  capped log of every transition
--   KEYS[6] seq      string  counter: queue arrival order and fencing tokens (so a token strictly
--                            increases per device, even across removing and re-adding it)
-- Every reply is {code, field, value, field, value, ...}; codes that are errors carry `message`.

local unpack = unpack or table.unpack

local PREFIX = KEYS[1]
local K_DEVICES, K_QUEUE, K_EXPIRY, K_EVENTS, K_SEQ = KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]

local EVENTS_MAXLEN = 10000 -- about this many events are kept per pool
local LINGER_MS = 120000 -- an ended lease stays readable this long, so retries and beats learn its fate
local WALK_LIMIT = 64 -- queue entries one call examines at most
local REAP_LIMIT = 64 -- expired entries one call reaps in passing
local QUEUE_SCAN = 256 -- waiters an operator's device removal looks at
local PRIO_SPAN = 1099511627776 -- 2^40: arrival seqs per priority band
local MAX_MIB = 16777216 -- 16 TiB
local MAX_TTL_MS = 86400000 -- one day

local function lease_key(id) return PREFIX .. 'lease:' .. id end
local function device_key(name) return PREFIX .. 'device:' .. name end
local function device_leases_key(name) return PREFIX .. 'device:' .. name .. ':leases' end
local function wake_key(id) return PREFIX .. 'wake:' .. id end

-- Integers as exact decimal strings: redis.call would format big numbers with only 14 digits.
local function int(n) return string.format('%d', n) end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function fail(code, message) return {code, 'message', message} end

-- An integer ARGV in [lo, hi], or nil.
local function int_arg(v, lo, hi)
  local n = tonumber(v)
  if n == nil or n ~= math.floor(n) or n < lo or n > hi then return nil end
  return n
end

local function valid_name(s)
  return type(s) == 'string' and #s >= 1 and #s <= 64 and string.find(s, '^[%w_.:-]+$') ~= nil
end

local function event(name, fields)
  local args = {'XADD', K_EVENTS, 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'event', name}
  for i = 1, #fields do args[#args + 1] = fields[i] end
  redis.call(unpack(args))
end

-- The fields any script needs of a lease (HMGET of these costs less than HGETALL of all).
local LEASE_FIELDS = {'state', 'holder', 'mib', 'priority', 'want', 'device', 'token', 'ttl_ms',
                      'expires_at', 'labels', 'reason', 'cuda_index', 'device_host'}

local function load_lease(id)
  local v = redis.call('HMGET', lease_key(id), unpack(LEASE_FIELDS))
  if not v[1] then return nil end
  local l = {id = id}
  for i, f in ipairs(LEASE_FIELDS) do
    if v[i] then l[f] = v[i] end
  end
  l.mib = tonumber(l.mib)
  l.priority = tonumber(l.priority)
  l.want = l.want or ''
  l.labels = l.labels or '{}'
  return l
end

-- {code, 'now', now, <every field of the lease hash>}: for listings and operators.
local function lease_reply(code, id, now)
  local reply = {code, 'now', now, 'id', id}
  local flat = redis.call('HGETALL', lease_key(id))
  for i = 1, #flat do reply[#reply + 1] = flat[i] end
  return reply
end

-- What a holder needs of its grant beyond what it asked for (the request fields must match).
local function grant_reply(code, l, now)
  return {code, 'now', now, 'state', l.state, 'device', l.device, 'token', l.token,
          'expires_at', l.expires_at, 'cuda_index', l.cuda_index, 'device_host', l.device_host}
end

local function ended_reply(l, now)
  return {'ended', 'now', now, 'state', l.state, 'reason', l.reason or ''}
end

-- What a woken waiter pops: "granted <now> <device> <token> <expires_at> <cuda_index> <host>"
-- (the host last: it may hold spaces), or "ended <state> <reason>".
local function wake_message(l, now)
  if l.state == 'active' then
    return table.concat({'granted', now, l.device, l.token, l.expires_at, l.cuda_index or '',
                         l.device_host or ''}, ' ')
  end
  return table.concat({'ended', l.state, l.reason or ''}, ' ')
end

local TERMINAL = {released = true, expired = true, revoked = true, force_released = true,
                  cancelled = true, abandoned = true}

-- Devices of the pool, sorted by name so that ties break the same way every time.
local function load_devices()
  local names = redis.call('SMEMBERS', K_DEVICES)
  table.sort(names)
  local devs = {}
  for i, name in ipairs(names) do
    local v = redis.call('HMGET', device_key(name), 'total_mib', 'reserved_mib', 'unmanaged_mib',
                         'used_mib', 'cuda_index', 'host')
    local budget = tonumber(v[1]) - tonumber(v[2]) - tonumber(v[3])
    devs[i] = {name = name, budget = budget, used = tonumber(v[4]), cuda_index = v[5], host = v[6]}
  end
  return devs
end

-- Devices a request could ever use: its named device, or any in the pool, with budget >= mib.
local function candidates(devs, want, mib)
  local out = {}
  for _, d in ipairs(devs) do
    if (want == '' or want == d.name) and d.budget >= mib then out[#out + 1] = d end
  end
  return out
end

-- Best fit: the unblocked candidate with the least room left over after placing mib.
local function best_fit(cands, blocked, mib)
  local best, best_left = nil, nil
  for _, d in ipairs(cands) do
    local left = d.budget - d.used - mib
    if not blocked[d.name] and left >= 0 and (best == nil or left < best_left) then
      best, best_left = d, left
    end
  end
  return best
end

local function grant(l, dev, now)
  local dkey = device_key(dev.name)
  local token = redis.call('INCR', K_SEQ)
  redis.call('HINCRBY', dkey, 'used_mib', l.mib)
  redis.call('SADD', device_leases_key(dev.name), l.id)
  dev.used = dev.used + l.mib
  local expires_at = int(now + tonumber(l.ttl_ms))
  -- A new request's own fields come along, so its hash is written once.
  redis.call('HSET', lease_key(l.id), 'state', 'active', 'device', dev.name, 'token', token,
             'granted_at', int(now), 'expires_at', expires_at, 'cuda_index', dev.cuda_index,
             'device_host', dev.host, unpack(l.fields or {}))
  redis.call('ZADD', K_EXPIRY, expires_at, l.id)
  if l.state == 'queued' then redis.call('ZREM', K_QUEUE, l.id) end
  l.state, l.device, l.token, l.expires_at = 'active', dev.name, token, expires_at
  l.cuda_index, l.device_host = dev.cuda_index, dev.host
  event('granted', {'lease', l.id, 'holder', l.holder, 'device', dev.name, 'mib', l.mib,
                    'priority', l.priority, 'token', token})
end

-- Tell a blocked waiter what became of its request (it BLPOPs this list).
local function wake(l, now)
  local key = wake_key(l.id)
  redis.call('RPUSH', key, wake_message(l, now))
  redis.call('PEXPIRE', key, l.ttl_ms)
end

-- Move a lease or waiter to a terminal state; its memory and queue place are freed at once.
local function end_lease(l, state, now, reason)
  local key = lease_key(l.id)
  if l.state == 'queued' then
    redis.call('ZREM', K_QUEUE, l.id)
  else
    redis.call('HINCRBY', device_key(l.device), 'used_mib', -l.mib)
    redis.call('SREM', device_leases_key(l.device), l.id)
  end
  redis.call('ZREM', K_EXPIRY, l.id)
  redis.call('HSET', key, 'state', state, 'ended_at', int(now), 'reason', reason or '')
  redis.call('PEXPIRE', key, LINGER_MS)
  local was = l.state
  l.state, l.reason = state, reason
  local fields = {'lease', l.id, 'holder', l.holder, 'mib', l.mib}
  if was ~= 'queued' then
    fields[#fields + 1] = 'device'
    fields[#fields + 1] = l.device
  end
  if reason and reason ~= '' then
    fields[#fields + 1] = 'reason'
    fields[#fields + 1] = reason
  end
  event(state, fields)
end

-- End what has expired, oldest first, at most `limit` entries. Returns how many went.
local function reap(now, limit)
  local ids = redis.call('ZRANGEBYSCORE', K_EXPIRY, '-inf', int(now), 'LIMIT', 0, limit)
  for _, id in ipairs(ids) do
    local l = load_lease(id)
    if l == nil then
      redis.call('ZREM', K_EXPIRY, id) -- defensive: an index entry without its hash
    else
      end_lease(l, l.state == 'queued' and 'abandoned' or 'expired', now, nil)
    end
  end
  return #ids
end

-- A lease whose expiry has passed is expired even if no reap has reached it yet.
local function expire_if_due(l, now)
  if not TERMINAL[l.state] and tonumber(l.expires_at) <= now then
    end_lease(l, l.state == 'queued' and 'abandoned' or 'expired', now, nil)
    return true
  end
  return false
end

-- Walk the queue in order (priority, then arrival) up to `bound` (a score bound), granting
-- every waiter that fits on a device that no waiter ahead of it could use. A waiter that does not
-- fit blocks its candidate devices for everyone behind it: nobody jumps the queue on memory that
-- an earlier waiter is waiting for. `devs` may be nil: they are loaded only if anyone waits.
-- Returns the blocked set and whether the walk ended early (then treat every device as held back).
local function settle(now, devs, bound)
  local ids = redis.call('ZRANGEBYSCORE', K_QUEUE, '-inf', bound, 'LIMIT', 0, WALK_LIMIT)
  local blocked = {}
  if #ids == 0 then return blocked, false end
  if devs == nil then devs = load_devices() end
  for _, id in ipairs(ids) do
    -- Stop once no device that is not held back has room: nobody further can be granted.
    local room = false
    for _, d in ipairs(devs) do
      if not blocked[d.name] and d.used < d.budget then room = true end
    end
    if not room then return blocked, true end
    local l = load_lease(id)
    if l == nil then
      redis.call('ZREM', K_QUEUE, id)
    elseif expire_if_due(l, now) then
      -- an abandoned waiter blocks nobody
    elseif l.want ~= '' and redis.call('SISMEMBER', K_DEVICES, l.want) == 0 then
      end_lease(l, 'cancelled', now, 'device_removed')
      wake(l, now)
    else
      local cands = candidates(devs, l.want, l.mib)
      local dev = best_fit(cands, blocked, l.mib)
      if dev then
        grant(l, dev, now)
        wake(l, now)
      else
        for _, d in ipairs(cands) do blocked[d.name] = true end
      end
    end
  end
  return blocked, #ids >= WALK_LIMIT
end

local function settle_all(now) settle(now, nil, '+inf') end
