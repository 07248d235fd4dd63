-- note: append an event to the pool's stream for what happens outside the scripts (a managed
-- consumer loaded, unloaded, stuck), so operators read it beside the lease transitions.
-- KEYS: the pool's keys (see _common.lua).
-- ARGV[1] event   string  [a-z_], 1-32 characters, starting "consumer_" (the lease events are
--                         the scripts' own)
-- ARGV[2..] field, value pairs: at most 16; names [a-z_] of 1-32, values at most 512 bytes
-- Replies: {"ok", "now", now} | bad_request
local name = ARGV[1]
if type(name) ~= 'string' or #name > 32 or string.find(name, '^consumer_[a-z_]+$') == nil then
  return fail('bad_request', 'event must be consumer_ followed by [a-z_], at most 32 characters')
end
local n = #ARGV - 1
if n % 2 ~= 0 or n > 32 then return fail('bad_request', 'at most 16 field, value pairs') end
local fields = {}
for i = 2, #ARGV, 2 do
  local k, v = ARGV[i], ARGV[i + 1]
  if #k < 1 or #k > 32 or string.find(k, '^[a-z_]+$') == nil or k == 'event' then
    return fail('bad_request', 'field names are 1-32 of [a-z_] (not "event")')
  end
  if #v > 512 then return fail('bad_request', 'field ' .. k .. ' is over 512 bytes') end
  fields[#fields + 1], fields[#fields + 2] = k, v
end
event(name, fields)
return {'ok', 'now', now_ms()}
