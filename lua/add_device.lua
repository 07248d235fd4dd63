-- add_device: add a device to the pool, or update its size, headroom, host and CUDA index.
-- Leases, usage and the unmanaged reading of an existing device are kept.
-- KEYS: the pool's keys (see _common.lua).
-- Operators only: its first write is a capability check on the pool's `admin` key (keys.py).
-- ARGV[1] name          string  device id (a declared name or an NVML UUID)
-- ARGV[2] total_mib     int     memory of the device, MiB
-- ARGV[3] reserved_mib  int     headroom never leased, MiB, 0..total
-- ARGV[4] host          string  host the device is on
-- ARGV[5] cuda_index    int     CUDA index on that host, or -1 when unknown
-- Replies: {"ok", "now", now, "created", 0|1} | bad_request
local name = ARGV[1]
local total = int_arg(ARGV[2], 1, MAX_MIB)
local reserved = int_arg(ARGV[3], 0, MAX_MIB)
local host = ARGV[4]
local cuda_index = int_arg(ARGV[5], -1, 65535)
if not valid_name(name) then return fail('bad_request', 'device name must be 1-64 of [A-Za-z0-9_.:-]') end
if total == nil then return fail('bad_request', 'total_mib must be an integer from 1 to ' .. MAX_MIB) end
if reserved == nil or reserved > total then
  return fail('bad_request', 'reserved_mib must be an integer from 0 to total_mib')
end
if #host > 255 then return fail('bad_request', 'host must be at most 255 bytes') end
if cuda_index == nil then return fail('bad_request', 'cuda_index must be an integer from -1 to 65535') end
local exists = redis.call('SISMEMBER', K_DEVICES, name) == 1
if not exists and redis.call('SCARD', K_DEVICES) >= 256 then
  return fail('bad_request', 'a pool holds at most 256 devices')
end

-- The capability check: Redis refuses this write to a user who may not run SETRANGE or write the
-- pool's `admin` key (holders, observers: deploy/redis-users.acl), before anything changed. It
-- changes nothing (an empty value, a key that never exists), and like any first write that
-- may grow memory it is refused while Redis is full.
redis.call('SETRANGE', PREFIX .. 'admin', 0, '')
local now = now_ms()
reap(now, REAP_LIMIT)
local key = device_key(name)
redis.call('HSET', key, 'name', name, 'total_mib', total, 'reserved_mib', reserved, 'host', host,
           'cuda_index', cuda_index >= 0 and cuda_index or '', 'updated_at', int(now))
redis.call('HSETNX', key, 'used_mib', 0)
redis.call('HSETNX', key, 'unmanaged_mib', 0)
redis.call('HSETNX', key, 'added_at', int(now))
redis.call('SADD', K_DEVICES, name)
event(exists and 'device_updated' or 'device_added',
      {'device', name, 'total_mib', total, 'reserved_mib', reserved, 'host', host})
settle_all(now)
return {'ok', 'now', now, 'created', exists and 0 or 1}
