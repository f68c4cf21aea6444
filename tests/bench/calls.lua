-- wrk script for the gated benchmark: the same requests for the floor and gated.
--
-- wrk -t1 -cCONNECTIONS ... -s calls.lua URL -- MODE CALLS TOKEN RATE CONNECTIONS
--   MODE   calls: cycle through CALLS ("code did callerid" per line, all valid;
--          code "-": none typed, as a routed call)
--          junk:  no token or a wrong one (not from the PBX), random codes
--          guess: the valid token, random wrong codes from random callers
--   RATE   requests/s for this thread, 0 = as fast as the server answers
--   CONNECTIONS  the -c given to wrk (its Lua side cannot see it)
-- done() prints one JSON line (prefixed "BENCH ") that bench.py reads.

local mode, token, rate = "calls", "", 0
local paths, n, i = {}, 0, 0
local wait, window_start, window_done, first_window = 0, 0, 0, true
answered = { ACK = 0, NAK = 0, ERR = 0, forbidden = 0, other = 0 }

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

local function plus(number)
  return "%2B" .. number:sub(2)
end

function init(args)
  mode, token, rate = args[1], args[3], tonumber(args[4])
  math.randomseed(os.time() + #threads)
  if mode == "calls" then
    for line in io.lines(args[2]) do
      local code, did, caller = line:match("(%S+) (%S+) (%S+)")
      if code == "-" then
        code = ""  -- no code typed: a routed call
      end
      n = n + 1
      paths[n] = "/voipgrid?token=" .. token .. "&code=" .. code .. "&did=" .. plus(did)
        .. "&callerid=" .. plus(caller) .. "&callername="
    end
    i = math.random(n)
  end
  if rate > 0 then
    -- Each connection waits between its requests; the wait is corrected
    -- once a second towards the target rate.
    wait = tonumber(args[5]) / rate * 1000
    window_start = os.time()
  end
end

function request()
  if mode == "calls" then
    i = i % n + 1
    return wrk.format("GET", paths[i])
  end
  local code = tostring(math.random(10000000, 99999999))
  local caller = "%2B3162" .. tostring(math.random(1000000, 9999999))
  local query
  if mode == "junk" then
    if math.random(2) == 1 then
      query = "code=" .. code .. "&did=%2B31501234567&callerid=" .. caller
    else
      query = "token=wrong-" .. code .. "&code=" .. code .. "&did=%2B31501234567&callerid=" .. caller
    end
  else
    query = "token=" .. token .. "&code=" .. code .. "&did=%2B31501234567&callerid=" .. caller
  end
  return wrk.format("GET", "/voipgrid?" .. query)
end

function delay()
  if rate <= 0 then
    return 0
  end
  local now = os.time()
  if now ~= window_start then
    local seen = window_done / (now - window_start)
    -- The first window began part-way through a second: it undercounts.
    if seen > 0 and not first_window then
      wait = math.max(0.5, math.min(wait * seen / rate, 1000))
    end
    window_start, window_done, first_window = now, 0, false
  end
  -- wrk takes whole milliseconds: dither so the mean is the fractional wait.
  local whole = math.floor(wait)
  if math.random() < wait - whole then
    whole = whole + 1
  end
  return whole
end

function response(status, headers, body)
  window_done = window_done + 1
  if status == 403 then
    answered.forbidden = answered.forbidden + 1
    return
  end
  local word = status == 200 and body:match("^status=(%u+)") or nil
  if word == "ACK" or word == "NAK" or word == "ERR" then
    answered[word] = answered[word] + 1
  else
    answered.other = answered.other + 1
  end
end

function done(summary, latency, requests)
  local total = { ACK = 0, NAK = 0, ERR = 0, forbidden = 0, other = 0 }
  for _, thread in ipairs(threads) do
    local counts = thread:get("answered")
    for key, value in pairs(counts) do
      total[key] = total[key] + value
    end
  end
  -- Non-2xx answers (the 403s of a junk flood) are counted above, by kind;
  -- these are the socket errors and timeouts.
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests": %d, "seconds": %.6f, "p50_ms": %.4f, "p99_ms": %.4f, '
      .. '"p999_ms": %.4f, "max_ms": %.4f, "mean_ms": %.4f, "errors": %d, '
      .. '"ACK": %d, "NAK": %d, "ERR": %d, "forbidden": %d, "other": %d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1000,
    latency:percentile(99) / 1000, latency:percentile(99.9) / 1000, latency.max / 1000,
    latency.mean / 1000, e.connect + e.read + e.write + e.timeout,
    total.ACK, total.NAK, total.ERR, total.forbidden, total.other))
end
