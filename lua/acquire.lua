-- acquire: grant a lease now, or queue it (priority, then arrival), or re-poll a queued request.
-- Idempotent per lease id: the same id never grants twice; a retry returns what the first call got.
-- KEYS: the pool's keys (see _common.lua).
-- ARGV[1] id           string  lease id chosen by the caller (also its request id)
-- ARGV[2] holder       string  service name
-- ARGV[3] holder_host  string  host the holder runs on
-- ARGV[4] holder_pid   int     process id of the holder
-- ARGV[5] mib          int     VRAM in MiB, 1..2^24
-- ARGV[6] priority     int     0..100, higher wins
-- ARGV[7] want         string  device name, or "" for best fit within the pool
-- ARGV[8] ttl_ms       int     lease (and queue entry) lifetime without a heartbeat, ms
-- ARGV[9] labels       string  JSON object, opaque to the scripts
-- ARGV[10] wait        "1"|"0" queue the request if it does not fit now, or just answer busy
-- ARGV[11] preemptible "1"|"0" a request of strictly higher priority may evict it while active
--                              (optional, "0")
-- ARGV[12] grace_ms    int     time to give the memory back once asked to, ms (optional, 10000)
-- ARGV[13] notify      string  pub/sub channel the holder hears eviction notices on (optional)
-- ARGV[14] exclusive   "1"|"0" nothing else may share the device while this is held (optional)
-- ARGV[15] gang        int     the same mib on this many devices of one host, all or nothing,
--                              1..16 (optional, 1); a gang evicts nobody, it waits for room
-- ARGV[16] max_hold_ms int     hard cap on the lease's life from its grant, ms: no heartbeat
--                              renews it past that (optional, 0 = none)
-- ARGV[17] max_queue   int     refuse to queue (queue_full) while this many wait in the pool
--                              (optional, 0 = no cap)
-- ARGV[18] take_over   "1"|"0" the holder's own process already uses this memory on `want`, where
--                              the agent counts it as unmanaged: a grant moves up to mib of the
--                              device's unmanaged_mib to the lease. Only for a request that names
--                              its device and does not wait, and only while nobody waits in the
--                              pool (nobody else could be granted the room). (optional, "0")
-- A request that does not fit, and that nobody ahead of it holds back, evicts the cheapest set of
-- victims that makes it fit on one device (see plan_eviction), and waits for their memory.
-- Replies: {"granted", "now", now, "state", s, "device", d, "token", t, "expires_at", ms,
--           "cuda_index", i, "device_host", h}
--           "evict_deadline", ms or "", "granted_at", ms or "", "requested_at", ms or "" (known
--           when granted at once)
--        | {"queued", "now", now, "position", rank, "next_expiry", ms or "", "evicting", n,
--           "reason", r, "until", ms or ""}:
--          next_expiry is the soonest expiry (or eviction deadline) in the pool, when the head of
--          the queue should look again; evicting is how many leases were asked to make room now;
--          reason is why it waits: "evicting" (its memory is promised; victims unload until
--          `until`), "behind" (earlier waiters go first) or "no_room" (nothing fits now; the
--          soonest expiry in the pool is `until`)
--        | {"busy", "now", now}: does not fit now and wait is "0"
--        | {"ended", "now", now, "state", s, "reason", r}: the lease this id got has ended
--        | bad_request | pool_not_found | device_not_found (also to a waiter whose device went)
--        | insufficient_vram | request_conflict | queue_full
local id, holder, holder_host = ARGV[1], ARGV[2], ARGV[3]
local holder_pid = int_arg(ARGV[4], 0, 4294967295)
local mib = int_arg(ARGV[5], 1, MAX_MIB)
local priority = int_arg(ARGV[6], 0, 100)
local want = ARGV[7]
local ttl_ms = int_arg(ARGV[8], 1, MAX_TTL_MS)
local labels = ARGV[9]
local wait = ARGV[10] == '1'
local preemptible = ARGV[11] == '1' and '1' or '0'
local grace_ms = int_arg(ARGV[12] or DEFAULT_GRACE_MS, 0, MAX_TTL_MS)
local notify = ARGV[13] or ''
local exclusive = ARGV[14] == '1' and '1' or '0'
local gang = int_arg(ARGV[15] or 1, 1, 16)
local max_hold_ms = int_arg(ARGV[16] or 0, 0, MAX_TTL_MS)
local max_queue = int_arg(ARGV[17] or 0, 0, 1000000)
local take_over = ARGV[18] == '1'

if not valid_name(id) then return fail('bad_request', 'lease id must be 1-64 of [A-Za-z0-9_.:-]') end
if #holder < 1 or #holder > 128 then return fail('bad_request', 'holder must be 1-128 bytes') end
if #holder_host > 255 or holder_pid == nil then return fail('bad_request', 'bad holder host or pid') end
if mib == nil then return fail('bad_request', 'mib must be an integer from 1 to ' .. MAX_MIB) end
if priority == nil then return fail('bad_request', 'priority must be an integer from 0 to 100') end
if want ~= '' and not valid_name(want) then return fail('bad_request', 'bad device name') end
if ttl_ms == nil then return fail('bad_request', 'ttl_ms must be an integer from 1 to ' .. MAX_TTL_MS) end
if #labels > 4096 then return fail('bad_request', 'labels must be at most 4096 bytes') end
if grace_ms == nil then return fail('bad_request', 'grace_ms must be an integer from 0 to ' .. MAX_TTL_MS) end
if #notify > 256 then return fail('bad_request', 'notify channel must be at most 256 bytes') end
-- (the eviction that publishes to it must not fail half-way on a channel an ACL refuses)
if notify ~= '' and notify:sub(1, 15) ~= 'gpuboss:notify:' then
  return fail('bad_request', 'notify channel must start with gpuboss:notify:')
end
if gang == nil then return fail('bad_request', 'devices must be an integer from 1 to 16') end
if gang > 1 and want ~= '' then return fail('bad_request', 'a gang of devices cannot name one device') end
if max_hold_ms == nil then return fail('bad_request', 'max_hold_ms must be an integer from 0 to ' .. MAX_TTL_MS) end
if max_queue == nil then return fail('bad_request', 'max_queue must be an integer from 0 to 1000000') end
if take_over and (want == '' or wait) then
  return fail('bad_request', 'take_over needs a device and no waiting')
end

local now = now_ms()
local dirty = reap(now, REAP_LIMIT) > 0
local key = lease_key(id)

local function queued_reply(evicting)
  -- The soonest expiry but the waiter's own (its queue entry expires too, if it stops polling).
  local head = redis.call('ZRANGE', K_EXPIRY, 0, 1, 'WITHSCORES')
  local next_expiry = head[1] == id and head[4] or head[2] or ''
  local position = redis.call('ZRANK', K_QUEUE, id)
  local claim = redis.call('HMGET', key, 'claim_mib', 'claim_until')
  local reason, until_ms = 'no_room', next_expiry
  if tonumber(claim[1] or 0) > 0 then
    reason, until_ms = 'evicting', claim[2] or ''
  elseif position > 0 then
    reason, until_ms = 'behind', ''
  end
  return {'queued', 'now', now, 'position', position, 'next_expiry', next_expiry, 'evicting', evicting,
          'reason', reason, 'until', until_ms}
end

local l = load_lease(id)
if l then
  if l.holder ~= holder or l.mib ~= mib or l.priority ~= priority or l.want ~= want
      or tonumber(l.ttl_ms) ~= ttl_ms or l.labels ~= labels or l.exclusive ~= exclusive
      or l.gang ~= gang then
    return fail('request_conflict', 'lease id ' .. id .. ' belongs to another request')
  end
  if expire_if_due(l, now) then dirty = true end
  if l.state ~= 'abandoned' then
    if l.state == 'queued' and (l.want ~= '' and redis.call('SISMEMBER', K_DEVICES, l.want) == 0
                                or redis.call('SCARD', K_DEVICES) == 0) then
      end_lease(l, 'cancelled', now, 'device_removed')
    end
    if l.state == 'cancelled' and l.reason == 'device_removed' then
      if dirty then settle_all(now) end
      return fail('device_not_found', 'the device this request waited for was removed')
    end
    if l.state == 'queued' then
      local expires_at = now + ttl_ms
      redis.call('HSET', key, 'expires_at', int(expires_at))
      redis.call('ZADD', K_EXPIRY, int(expires_at), id)
      local aging_ms = config().aging_ms
      if aging_ms > 0 then
        -- Aging: a waiter rises one named level per aging_ms of waiting, keeping its arrival order.
        local waited = now - tonumber(redis.call('HGET', key, 'requested_at'))
        local aged = math.min(100, priority + AGING_STEP * math.floor(waited / aging_ms))
        redis.call('ZADD', K_QUEUE, int((100 - aged) * PRIO_SPAN + tonumber(l.seq)), id)
      end
      -- Every poll walks the queue: a waiter that fits (after aging, or after a walk that could
      -- not reach it) is granted now rather than at the next release. The walk is bounded.
      dirty = true
    end
    if dirty then
      settle_all(now)
      l = load_lease(id)
    end
    if TERMINAL[l.state] then return ended_reply(l, now) end
    if l.state == 'queued' then
      local dev = past_the_walk(l)
      if dev then grant(l, dev, now) else return queued_reply(0) end
    end
    redis.call('DEL', wake_key(id))
    return grant_reply('granted', l, now)
  end
  -- It stopped polling and lost its place; it queues anew below.
  redis.call('DEL', key)
end

-- Waiters ahead of this request take reaped memory first, and the devices are read after that.
if dirty then settle_all(now) end
-- Taking over memory in use: credit the device's unmanaged memory to this request for the rest of
-- the call, and give the credit back unless it is granted (nobody waits, so nobody else can use it).
local credit = 0
if take_over and redis.call('ZCARD', K_QUEUE) == 0 and redis.call('SISMEMBER', K_DEVICES, want) == 1 then
  credit = math.min(mib, tonumber(redis.call('HGET', device_key(want), 'unmanaged_mib') or 0))
  if credit > 0 then redis.call('HINCRBY', device_key(want), 'unmanaged_mib', -credit) end
end
local function no(reply)
  if credit > 0 then redis.call('HINCRBY', device_key(want), 'unmanaged_mib', credit) end
  return reply
end
local devs = load_devices()
if #devs == 0 then return fail('pool_not_found', 'the pool has no devices') end
if want ~= '' and redis.call('SISMEMBER', K_DEVICES, want) == 0 then
  return fail('device_not_found', 'no device ' .. want .. ' in this pool')
end
local cands = candidates(devs, want, mib)
if gang > 1 then
  -- A gang needs that many candidates on one host.
  local hosts, enough = {}, false
  for _, d in ipairs(cands) do hosts[d.host] = (hosts[d.host] or 0) + 1 end
  for _, n in pairs(hosts) do enough = enough or n >= gang end
  if not enough then cands = {} end
end
if #cands == 0 then
  local largest = 0
  for _, d in ipairs(devs) do
    if (want == '' or want == d.name) and d.budget > largest then largest = d.budget end
  end
  return no(fail('insufficient_vram', mib .. ' MiB on ' .. gang .. ' device(s) of one host can never fit:'
                 .. ' the largest budget is ' .. largest .. ' MiB'))
end

-- Waiters ahead of this request: every one of priority >= its own (it would queue behind them).
local blocked, partial = settle(now, devs, '(' .. int((101 - priority) * PRIO_SPAN))
local dev = nil
l = {id = id, holder = holder, mib = mib, priority = priority, ttl_ms = ttl_ms, state = 'new',
     requested_at = int(now),
     preemptible = preemptible, exclusive = exclusive, gang = gang, claim_mib = 0, max_hold_ms = max_hold_ms}
if not partial then dev = best_fit(cands, blocked, l) end

local fields = {'holder', holder, 'holder_host', holder_host, 'holder_pid', holder_pid, 'mib', mib,
                'priority', priority, 'want', want, 'ttl_ms', ttl_ms, 'requested_at', int(now)}
-- Fields at their default are left out (load_lease fills them in): fewer writes on the hot path.
local function optional(name, value, default)
  if value ~= default then
    fields[#fields + 1] = name
    fields[#fields + 1] = value
  end
end
optional('notify', notify, '')
optional('labels', labels, '{}')
optional('preemptible', preemptible, '0')
optional('grace_ms', grace_ms, DEFAULT_GRACE_MS)
optional('exclusive', exclusive, '0')
optional('gang', gang, 1)
optional('max_hold_ms', max_hold_ms, 0)
if dev then
  l.fields = fields
  grant(l, dev, now)
  return grant_reply('granted', l, now)
end
if not wait then return no({'busy', 'now', now}) end
if max_queue > 0 and redis.call('ZCARD', K_QUEUE) >= max_queue then
  return fail('queue_full', max_queue .. ' requests wait in this pool already')
end

local seq = redis.call('INCR', K_SEQ)
local expires_at = now + ttl_ms
redis.call('HSET', key, 'state', 'queued', 'seq', seq, 'expires_at', int(expires_at), unpack(fields))
redis.call('ZADD', K_QUEUE, int((100 - priority) * PRIO_SPAN + seq), id)
enqueued(want)
redis.call('ZADD', K_EXPIRY, int(expires_at), id)
event('queued', {'lease', id, 'holder', holder, 'mib', mib, 'priority', priority, 'want', want})
local victims = {}
if not partial then
  l.state = 'queued'
  local d
  d, victims = plan_eviction(l, cands, blocked, now)
  if d then start_eviction(l, d, victims, now) else victims = {} end
end
return queued_reply(#victims)
