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
--   KEYS[7] config   hash    pool settings: min_residency_ms, aging_ms (absent = 0 = off), and
--                            clock_ms, a simulation's virtual time (see now_ms)
-- Per device there is also a zset `device:<name>:evictable` of its idle and preemptible leases, in
-- eviction order (see evict_score), and per lease an optional pub/sub channel it is told on.
-- The hash `leases` (live_key) holds one line per granted lease, for operators' `redis-cli hgetall`:
-- lease id -> "<holder> <host>:<pid> <mib>MiB <device[,device...]> <state> granted=<ms>" (see
-- index_live); grant adds it, idle/busy/eviction rewrite it, end_lease removes it. No waiters.
-- Every reply is {code, field, value, field, value, ...}; codes that are errors carry `message`.

-- The pool's keys of the call being run: the loader (scripts.py) binds them first thing in each
-- call, from KEYS (a script) or from a function's keys (the library).
-- A library's top level may read no global (Redis defines them only once its functions run), so
-- `unpack` (Lua 5.1's, or 5.4's table.unpack under fakeredis) is looked up then too.
-- A function runs with its flags (allow-oom where it must run while Redis is full); a script has
-- none, and `in_function` is false.
local PREFIX, K_DEVICES, K_QUEUE, K_EXPIRY, K_EVENTS, K_SEQ, K_CONFIG
local unpack
local in_function = false
local function bind(keys, as_function)
  unpack = unpack or table.unpack or _G.unpack
  in_function = as_function == true
  PREFIX, K_DEVICES, K_QUEUE, K_EXPIRY, K_EVENTS = keys[1], keys[2], keys[3], keys[4], keys[5]
  K_SEQ, K_CONFIG = keys[6], keys[7]
end

local EVENTS_MAXLEN = '10000' -- about this many events are kept per pool
local LINGER_MS = 120000 -- an ended lease stays readable this long, so retries and beats learn its fate
local WALK_LIMIT = 64 -- queue entries one call examines at most
local REAP_LIMIT = 64 -- expired entries one call reaps in passing
local QUEUE_SCAN = 256 -- waiters an operator's device removal looks at
local PRIO_SPAN = 1099511627776 -- 2^40: arrival seqs per priority band
local VICTIM_SCAN = 32 -- evictable leases of a device one plan looks at
local DEFAULT_GRACE_MS = 10000 -- a victim's time to unload when its lease named none
local AGING_STEP = 10 -- queue priority a waiter gains per aging_ms of waiting (one named level)
local CLASS_SPAN = 281474976710656 -- 2^48: evict_score of an active lease over an idle one
local PRIO_WEIGHT = 2199023255552 -- 2^41: evict_score per priority step (ms clock fits below)
local MAX_MIB = 16777216 -- 16 TiB
local MAX_TTL_MS = 86400000 -- one day

local function lease_key(id) return PREFIX .. 'lease:' .. id end
local function live_key() return PREFIX .. 'leases' end
local function device_key(name) return PREFIX .. 'device:' .. name end
local function device_leases_key(name) return PREFIX .. 'device:' .. name .. ':leases' end
local function wake_key(id) return PREFIX .. 'wake:' .. id end
local function wants_key() return PREFIX .. 'wants' end
local function evictable_key(name) return PREFIX .. 'device:' .. name .. ':evictable' end

-- Integers as exact decimal strings: redis.call would format big numbers with only 14 digits.
local function int(n) return string.format('%d', n) end

-- Under maxmemory with noeviction, Redis refuses a script's first write if that write may grow
-- memory, and lets the script finish once it has written anything. The scripts that end leases or
-- keep them alive (release, heartbeat, cancel, reap) first call this: PERSIST of the pool's
-- sequence counter, which never has a TTL, changes nothing and cannot grow memory; so they work
-- when Redis is full, and every other script is refused before it has written anything. Their
-- functions need no such write: they carry the allow-oom flag.
local function writes_even_when_full()
  if not in_function then redis.call('PERSIST', K_SEQ) end
end

-- The scripts' only clock. A pool whose config sets `clock_ms` runs on that virtual time instead
-- (`gpuboss simulate` replays a day through these scripts on a private Redis that way); no other
-- pool sets it.
local function now_ms()
  local virtual = redis.call('HGET', K_CONFIG, 'clock_ms')
  if virtual then return tonumber(virtual) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function fail(code, message) return {code, 'message', message} end

-- The queue's census (hash `wants`): per device, how many waiters name it; `*`, how many take any
-- device; `#`, how many wait in all (neither is a device name). A walk of the queue that stops
-- at WALK_LIMIT learns from it which devices no waiter beyond could use (see settle). It is kept
-- with every entry and exit of the queue, and starts afresh whenever the queue empties.
local function enqueued(want)
  redis.call('HINCRBY', wants_key(), want == '' and '*' or want, 1)
  redis.call('HINCRBY', wants_key(), '#', 1)
end

local function dequeued(id, want)
  if redis.call('ZREM', K_QUEUE, id) == 0 then return end -- not queued: it was never counted
  if redis.call('ZCARD', K_QUEUE) == 0 then
    redis.call('DEL', wants_key())
    return
  end
  -- An entry without its hash (want nil) leaves its device counted: that errs on the safe side.
  local field = want and (want == '' and '*' or want)
  if field and redis.call('HINCRBY', wants_key(), field, -1) <= 0 then redis.call('HDEL', wants_key(), field) end
  redis.call('HINCRBY', wants_key(), '#', -1)
end

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
  redis.call('XADD', K_EVENTS, 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'event', name, unpack(fields))
end

local TERMINAL = {released = true, expired = true, revoked = true, force_released = true,
                  cancelled = true, abandoned = true}

-- A lease or waiter as a table of its hash's fields (HGETALL of its dozen or so fields costs less
-- than HMGET of every field a lease may have), or nil.
local function load_lease(id)
  local v = redis.call('HGETALL', lease_key(id))
  local l = {}
  for i = 1, #v, 2 do l[v[i]] = v[i + 1] end
  if not l.state then return nil end
  l.id = id
  l.mib = tonumber(l.mib)
  l.priority = tonumber(l.priority)
  l.want = l.want or ''
  l.labels = l.labels or '{}'
  l.preemptible = l.preemptible or '0'
  l.exclusive = l.exclusive or '0'
  l.gang = tonumber(l.gang or 1)
  l.claim_mib = tonumber(l.claim_mib or 0)
  return l
end

-- The devices a granted lease holds: one name, or a gang's names joined by commas.
local function lease_devices(l)
  if not string.find(l.device, ',', 1, true) then return {l.device} end
  local names = {}
  for name in string.gmatch(l.device, '[^,]+') do names[#names + 1] = name end
  return names
end

-- Where a lease stands in its device's eviction order: idle before active-preemptible, lower
-- priority first, least recently used first.
local function evict_score(l)
  local class = l.state == 'idle' and 0 or 1
  return int(class * CLASS_SPAN + l.priority * PRIO_WEIGHT + tonumber(l.used_at))
end

-- Keep the device's eviction index in step with the lease's state and flags.
local function index_evictable(l)
  local evictable = l.state == 'idle' or (l.state == 'active' and l.preemptible == '1')
  for _, name in ipairs(lease_devices(l)) do
    if evictable then
      redis.call('ZADD', evictable_key(name), evict_score(l), l.id)
    else
      redis.call('ZREM', evictable_key(name), l.id)
    end
  end
end

-- Write a granted lease's line in the pool's `leases` hash (one HSET): what operators read with
-- `redis-cli hgetall`. MiB is per device (a gang holds it on each of its devices).
local function index_live(l)
  redis.call('HSET', live_key(), l.id, table.concat({
    l.holder, (l.holder_host or '') .. ':' .. (l.holder_pid or ''), int(l.mib) .. 'MiB', l.device,
    l.state, 'granted=' .. l.granted_at}, ' '))
end

-- Where a lease sits in the expiry index: its expiry, or its eviction deadline if sooner.
local function due_at(l)
  local due = tonumber(l.expires_at)
  if l.state == 'evicting' and tonumber(l.evict_deadline) < due then due = tonumber(l.evict_deadline) end
  return due
end

local function config()
  local v = redis.call('HMGET', K_CONFIG, 'min_residency_ms', 'aging_ms')
  return {min_residency_ms = tonumber(v[1] or 0), aging_ms = tonumber(v[2] or 0)}
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
          'expires_at', l.expires_at, 'cuda_index', l.cuda_index, 'device_host', l.device_host,
          'evict_deadline', l.evict_deadline or '', 'granted_at', l.granted_at or '',
          'requested_at', l.requested_at or ''}
end

local function ended_reply(l, now)
  return {'ended', 'now', now, 'state', l.state, 'reason', l.reason or ''}
end

-- What a woken waiter pops: "granted <now> <device> <token> <expires_at> <cuda_index> <host>"
-- (the host last: it may hold spaces), or "ended <state> <reason>".
local function wake_message(l, now)
  if not TERMINAL[l.state] then
    return table.concat({'granted', now, l.device, l.token, l.expires_at, l.cuda_index or '',
                         l.device_host or ''}, ' ')
  end
  return table.concat({'ended', l.state, l.reason or ''}, ' ')
end


-- The devices this call loaded, by name (see load_devices).
local loaded = {}

-- Devices of the pool, sorted by name so that ties break the same way every time.
local function load_devices()
  local names = redis.call('SMEMBERS', K_DEVICES)
  table.sort(names)
  local devs = {}
  loaded = {}
  for i, name in ipairs(names) do
    local v = redis.call('HMGET', device_key(name), 'total_mib', 'reserved_mib', 'unmanaged_mib',
                         'used_mib', 'cuda_index', 'host', 'claimed_mib', 'exclusive')
    local budget = tonumber(v[1]) - tonumber(v[2]) - tonumber(v[3])
    devs[i] = {name = name, budget = budget, used = tonumber(v[4]), cuda_index = v[5], host = v[6],
               claimed = tonumber(v[7] or 0), exclusive = v[8] or ''}
    loaded[name] = devs[i]
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

-- Room on a device for request l: its budget less what is leased and what evictions in progress
-- promised to other requests (l's own promise counts as room for l).
-- Nobody shares a device held exclusively, and an exclusive request needs it empty.
local function room(d, l)
  local own = (l and l.claim_device == d.name) and l.claim_mib or 0
  if d.exclusive ~= '' then return -1 end
  if l and l.exclusive == '1' then
    if d.used > 0 or d.claimed - own > 0 then return -1 end
    return d.budget
  end
  return d.budget - d.used - d.claimed + own
end

-- Best fit: the unblocked candidates with the least room left over after placing l, as a list of
-- one device, or for a gang of n, n devices on one host (the host whose n best add up least).
local function best_fit(cands, blocked, l)
  local n = l.gang or 1
  if n == 1 then
    local best, best_left = nil, nil
    for _, d in ipairs(cands) do
      local left = room(d, l) - l.mib
      if l.claim_device == d.name and left >= 0 then return {d} end
      if not blocked[d.name] and left >= 0
          and (best == nil or left < best_left or (left == best_left and d.name < best.name)) then
        best, best_left = d, left
      end
    end
    return best and {best} or nil
  end
  local by_host, best, best_left = {}, nil, nil
  for _, d in ipairs(cands) do
    local left = room(d, l) - l.mib
    -- Memory promised to l is l's, whoever waits ahead of it: they could not use it anyway. Once
    -- it is there, l takes it, so the victims did not unload for nothing.
    if l.claim_device == d.name and left >= 0 then return {d} end
    if (not blocked[d.name] or l.claim_device == d.name) and left >= 0 then
      local group = by_host[d.host] or {}
      group[#group + 1] = {d = d, left = left}
      by_host[d.host] = group
    end
  end
  for _, group in pairs(by_host) do
    if #group >= n then
      table.sort(group, function(a, b) return a.left < b.left or (a.left == b.left and a.d.name < b.d.name) end)
      local picked, total = {}, 0
      for i = 1, n do
        picked[i] = group[i].d
        total = total + group[i].left
      end
      if best == nil or total < best_left or (total == best_left and picked[1].name < best[1].name) then
        best, best_left = picked, total
      end
    end
  end
  return best
end

-- A request that is granted or gives up no longer needs the memory evictions promised it. The
-- promise goes from the device as this call loaded it too (wherever the request was granted), so
-- the rest of a queue walk sees that memory free.
local function release_claim(l)
  if (l.claim_mib or 0) > 0 then
    redis.call('HINCRBY', device_key(l.claim_device), 'claimed_mib', -l.claim_mib)
    redis.call('HDEL', lease_key(l.id), 'claim_device', 'claim_mib', 'claim_until')
    local dev = loaded[l.claim_device]
    if dev then dev.claimed = dev.claimed - l.claim_mib end
    l.claim_device, l.claim_mib = nil, 0
  end
end

local function grant(l, picked, now)
  local token = redis.call('INCR', K_SEQ)
  local names, cudas = {}, {}
  for i, dev in ipairs(picked) do
    local dkey = device_key(dev.name)
    redis.call('HINCRBY', dkey, 'used_mib', l.mib)
    redis.call('SADD', device_leases_key(dev.name), l.id)
    if l.exclusive == '1' then
      redis.call('HSET', dkey, 'exclusive', l.id)
      dev.exclusive = l.id
    end
    dev.used = dev.used + l.mib
    names[i], cudas[i] = dev.name, dev.cuda_index
  end
  local device, cuda_index = table.concat(names, ','), table.concat(cudas, ',')
  local expires_at = now + tonumber(l.ttl_ms)
  local hold = tonumber(l.max_hold_ms or 0)
  local hold_until = nil
  if hold > 0 then
    -- The hard cap: no heartbeat renews the lease past it.
    hold_until = int(now + hold)
    if now + hold < expires_at then expires_at = now + hold end
    l.hold_until = hold_until
  end
  expires_at = int(expires_at)
  -- A new request's own fields come along, so its hash is written once.
  redis.call('HSET', lease_key(l.id), 'state', 'active', 'device', device, 'token', token,
             'granted_at', int(now), 'used_at', int(now), 'expires_at', expires_at,
             'cuda_index', cuda_index, 'device_host', picked[1].host, unpack(l.fields or {}))
  if hold_until then redis.call('HSET', lease_key(l.id), 'hold_until', hold_until) end
  redis.call('ZADD', K_EXPIRY, expires_at, l.id)
  if l.state == 'queued' then dequeued(l.id, l.want) end
  release_claim(l)
  l.state, l.device, l.token, l.expires_at = 'active', device, token, expires_at
  l.cuda_index, l.device_host, l.used_at, l.granted_at = cuda_index, picked[1].host, int(now), int(now)
  if l.preemptible == '1' then index_evictable(l) end
  -- A waiter's holder host and pid were loaded with it; a new request's are in its fields.
  local f = l.fields or {}
  for i = 1, #f - 1, 2 do
    if f[i] == 'holder_host' or f[i] == 'holder_pid' then l[f[i]] = f[i + 1] end
  end
  index_live(l)
  event('granted', {'lease', l.id, 'holder', l.holder, 'device', device, 'mib', l.mib,
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
    dequeued(l.id, l.want)
    release_claim(l)
  else
    for _, name in ipairs(lease_devices(l)) do
      redis.call('HINCRBY', device_key(name), 'used_mib', -l.mib)
      redis.call('SREM', device_leases_key(name), l.id)
      if l.state == 'idle' or l.preemptible == '1' then redis.call('ZREM', evictable_key(name), l.id) end
      if l.exclusive == '1' then redis.call('HDEL', device_key(name), 'exclusive') end
    end
    redis.call('HDEL', live_key(), l.id)
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

-- What a lease that is due becomes: a waiter that stopped polling is abandoned, a victim past its
-- eviction deadline is revoked, anything else expired.
local function ended_as(l, now)
  if l.state == 'queued' then return 'abandoned' end
  if l.state == 'evicting' and tonumber(l.evict_deadline) <= now then return 'revoked' end
  return 'expired'
end

-- Why it ended, when the state alone does not say: a lease held to its hard cap (max_hold).
local function ended_why(l, now)
  if l.state ~= 'queued' and l.hold_until and tonumber(l.hold_until) <= now then return 'max_hold' end
  return nil
end

-- End what has expired, oldest first, at most `limit` entries. Returns how many went.
local function reap(now, limit)
  local ids = redis.call('ZRANGEBYSCORE', K_EXPIRY, '-inf', int(now), 'LIMIT', 0, limit)
  for _, id in ipairs(ids) do
    local l = load_lease(id)
    if l == nil then
      redis.call('ZREM', K_EXPIRY, id) -- defensive: an index entry without its hash
    else
      end_lease(l, ended_as(l, now), now, ended_why(l, now))
    end
  end
  return #ids
end

-- A lease whose expiry has passed is expired even if no reap has reached it yet.
local function expire_if_due(l, now)
  if not TERMINAL[l.state] and due_at(l) <= now then
    end_lease(l, ended_as(l, now), now, ended_why(l, now))
    return true
  end
  return false
end

-- Could victim v be evicted for request r at this level? Level 1: idle leases of priority <= r's
-- and preemptible active leases of lower priority, none younger than the pool's minimum residency.
-- Level 2: the same, young ones too. Level 3, the last resort: idle leases of any priority too.
local function eligible(v, r, level, now, cfg)
  if v.state == 'idle' then
    if v.priority > r.priority and level < 3 then return false end
  elseif v.state ~= 'active' or v.preemptible ~= '1' or v.priority >= r.priority then
    return false
  end
  return level > 1 or now - tonumber(v.granted_at) >= cfg().min_residency_ms
end

-- The fewest victims on device d, taken in eviction order, that make room for r; or nil.
local function plan_on(d, r, level, now, cfg, cache)
  local need = r.mib - room(d, r)
  if r.exclusive == '1' or d.exclusive ~= '' then
    -- Everything on the device must go (an exclusive holder is alone on it), and no other
    -- request may have been promised room there.
    local own = r.claim_device == d.name and r.claim_mib or 0
    if d.claimed - own > 0 then return nil end
    need = d.used
  end
  local list = cache[d.name]
  if list == nil then
    list = {}
    for _, id in ipairs(redis.call('ZRANGE', evictable_key(d.name), 0, VICTIM_SCAN - 1)) do
      local v = load_lease(id)
      if v then list[#list + 1] = v end
    end
    cache[d.name] = list
  end
  local chosen, freed = {}, 0
  for _, v in ipairs(list) do
    if freed >= need then break end
    if eligible(v, r, level, now, cfg) then
      chosen[#chosen + 1] = v
      freed = freed + v.mib
    end
  end
  if freed < need then return nil end
  -- Greedy order may have taken a small victim that a later, bigger one made unnecessary.
  for i = #chosen, 1, -1 do
    if freed - chosen[i].mib >= need then
      freed = freed - chosen[i].mib
      table.remove(chosen, i)
    end
  end
  return chosen
end

-- Device and victims for request r on its candidates that nobody ahead holds back: the lowest
-- level that works anywhere, then the fewest active victims, the fewest victims, the least MiB.
-- Returns nil when no set of victims would make it fit: then nothing is evicted.
local function plan_eviction(r, cands, blocked, now)
  if (r.gang or 1) > 1 then return nil, nil end -- a gang waits for room; it evicts nobody
  local settings
  local function cfg()
    settings = settings or config()
    return settings
  end
  local cache = {}
  for level = 1, 3 do
    local best, best_victims, best_cost = nil, nil, nil
    for _, d in ipairs(cands) do
      if not blocked[d.name] then
        local victims = plan_on(d, r, level, now, cfg, cache)
        if victims then
          local active, freed = 0, 0
          for _, v in ipairs(victims) do
            if v.state == 'active' then active = active + 1 end
            freed = freed + v.mib
          end
          local cost = {active, #victims, freed}
          local better = best == nil
          for k = 1, 3 do
            if better or cost[k] ~= best_cost[k] then
              better = better or cost[k] < best_cost[k]
              break
            end
          end
          if better then best, best_victims, best_cost = d, victims, cost end
        end
      end
    end
    if best then return best, best_victims end
  end
  return nil, nil
end

-- Ask the victims to give their memory back by their grace deadline, and promise r the room on d
-- (the free part now and what the victims free), so nobody else takes it meanwhile.
local function start_eviction(r, d, victims, now)
  -- An exclusive request is promised the whole device.
  local claim = r.exclusive == '1' and d.budget or r.mib
  r.claim_device, r.claim_mib = d.name, claim
  redis.call('HINCRBY', device_key(d.name), 'claimed_mib', claim)
  redis.call('HSET', lease_key(r.id), 'claim_device', d.name, 'claim_mib', claim)
  d.claimed = d.claimed + claim
  local last = 0
  for _, v in ipairs(victims) do
    -- The holder may hear no notice (pub/sub is at most once: its connection may be down, the
    -- notice delayed, or the process paused); then it learns of the eviction from its next
    -- heartbeat reply, and until then trusts its lease up to its expiry. So the deadline is its
    -- grace from now, but never before that expiry: whatever it hears, it has stopped by then.
    local deadline = now + tonumber(v.grace_ms or DEFAULT_GRACE_MS)
    if v.expires_at and tonumber(v.expires_at) > deadline then deadline = tonumber(v.expires_at) end
    deadline = int(deadline)
    if tonumber(deadline) > last then last = tonumber(deadline) end
    redis.call('HSET', lease_key(v.id), 'state', 'evicting', 'evict_deadline', deadline,
               'evicted_for', r.id)
    v.state, v.evict_deadline = 'evicting', deadline
    index_live(v)
    for _, name in ipairs(lease_devices(v)) do redis.call('ZREM', evictable_key(name), v.id) end
    redis.call('ZADD', K_EXPIRY, int(due_at(v)), v.id)
    if v.notify then redis.call('PUBLISH', v.notify, 'evict ' .. v.id .. ' ' .. deadline) end
    event('evicting', {'lease', v.id, 'holder', v.holder, 'device', d.name, 'mib', v.mib,
                       'priority', v.priority, 'for', r.id, 'deadline', deadline})
  end
  -- By then the victims have given their memory back or are revoked: the waiter's estimate.
  redis.call('HSET', lease_key(r.id), 'claim_until', int(last))
end

-- The census as numbers; nil unless it accounts for the whole queue (one an older version of the
-- scripts kept does not, until the queue empties and it starts afresh).
local function read_census()
  local census = {}
  local flat = redis.call('HGETALL', wants_key())
  for i = 1, #flat, 2 do census[flat[i]] = tonumber(flat[i + 1]) end
  if census['#'] ~= redis.call('ZCARD', K_QUEUE) then return nil end
  return census
end

-- After a walk that stopped at WALK_LIMIT: the devices held back, with every device some waiter
-- names, whether the walk reached it or not (the census says; a waiter the walk did not reach may
-- be ahead of the caller). Returns the set and false; or true (treat every device as held) when
-- a waiter may take any device, or the census cannot be trusted (see read_census).
-- Adds to `blocked` every device of `devs` that a waiter names, by the census, not counting once
-- the field `mine` (a waiter's own: its device, or `*`); false if a waiter may take any device.
local function hold_named(census, devs, blocked, mine)
  local function others(field) return (census[field] or 0) - (field == mine and 1 or 0) end
  if others('*') > 0 then return false end
  for _, d in ipairs(devs) do
    if others(d.name) > 0 then blocked[d.name] = true end
  end
  return true
end

local function held_beyond(blocked, devs)
  local census = read_census()
  if census == nil or not hold_named(census, devs, blocked, nil) then return blocked, true end
  return blocked, false
end

-- Walk the queue in order (priority, then arrival) up to `bound` (a score bound), granting
-- every waiter that fits on a device that no waiter ahead of it could use. A waiter that does not
-- fit starts evictions if that would make it fit, and holds back its candidate devices for
-- everyone behind it: nobody jumps the queue on memory that an earlier waiter is waiting for.
-- `devs` may be nil: they are loaded only if anyone waits. With `dry`, nothing is written (the
-- plan script): grants only count against the devices in memory.
-- Returns the held-back set and whether to treat every device as held (a walk that stopped at
-- WALK_LIMIT, where the census cannot tell: see held_beyond).
local function settle(now, devs, bound, dry)
  local ids = redis.call('ZRANGEBYSCORE', K_QUEUE, '-inf', bound, 'LIMIT', 0, WALK_LIMIT)
  local blocked, nblocked = {}, 0
  if #ids == 0 then return blocked, false end
  if devs == nil then devs = load_devices() end
  -- With every device held back nobody further can be granted, unless memory was promised to a
  -- waiter further down (an eviction it started).
  local claims = false
  for _, d in ipairs(devs) do claims = claims or d.claimed > 0 end
  for _, id in ipairs(ids) do
    if nblocked >= #devs and not claims then return blocked, true end
    local l = load_lease(id)
    if l == nil or due_at(l) <= now
        or (l.want ~= '' and redis.call('SISMEMBER', K_DEVICES, l.want) == 0) then
      -- gone, abandoned or waiting for a removed device: it holds back nobody
      if not dry then
        if l == nil then
          dequeued(id, nil)
        elseif due_at(l) <= now then
          end_lease(l, 'abandoned', now, nil)
        else
          end_lease(l, 'cancelled', now, 'device_removed')
          wake(l, now)
        end
      end
    else
      local cands = candidates(devs, l.want, l.mib)
      local picked = best_fit(cands, blocked, l)
      if picked and dry then
        for _, d in ipairs(picked) do d.used = d.used + l.mib end
      elseif picked then
        grant(l, picked, now)
        wake(l, now)
      else
        if not dry and l.claim_mib == 0 then
          local d, victims = plan_eviction(l, cands, blocked, now)
          if d then start_eviction(l, d, victims, now) end
        end
        -- A waiter whose memory is promised (its victims are unloading) needs nothing else: it
        -- holds back no device, so those behind it may use what is free and unpromised meanwhile.
        if l.claim_mib == 0 then
          for _, d in ipairs(cands) do
            if not blocked[d.name] then
              blocked[d.name] = true
              nblocked = nblocked + 1
            end
          end
        end
      end
    end
  end
  if #ids < WALK_LIMIT then return blocked, false end
  return held_beyond(blocked, devs)
end

local function settle_all(now) settle(now, nil, '+inf', false) end

-- Where waiter l goes when the walk cannot reach it (WALK_LIMIT waiters ahead of it): a device
-- that fits it and that no other waiter names (the census says so), which it takes from nobody;
-- or nil, and it waits for the queue ahead to shorten.
local function past_the_walk(l)
  local rank = redis.call('ZRANK', K_QUEUE, l.id)
  if not rank or rank < WALK_LIMIT then return nil end -- the walk decided
  local census = read_census()
  if census == nil then return nil end
  local devs, blocked = load_devices(), {}
  if not hold_named(census, devs, blocked, l.want == '' and '*' or l.want) then return nil end
  return best_fit(candidates(devs, l.want, l.mib), blocked, l)
end

-- The lease `id` held with `token`, or nil and the reply for a lease that is unknown, held with
-- another token, or ended (one that fell due just now ends here, and the queue moves on).
local function held_lease(id, token, now)
  local l = load_lease(id)
  if l == nil then return nil, fail('lease_not_found', 'no lease ' .. id) end
  if tonumber(l.token) ~= token then
    return nil, fail('lease_not_held', 'lease ' .. id .. ' is not held with token ' .. token)
  end
  if expire_if_due(l, now) then settle_all(now) end
  if TERMINAL[l.state] then return nil, ended_reply(l, now) end
  return l, nil
end
