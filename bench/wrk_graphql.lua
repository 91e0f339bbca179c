-- wrk script for bench/analytics.py: POST one GraphQL document with a bearer token, and print one parseable line
-- at the end. Environment: SALESDASH_BENCH_TOKEN, SALESDASH_BENCH_BODY (the JSON request body), and optionally
-- SALESDASH_BENCH_PACE_MS: each connection waits that long before each request (a paced, not back-to-back, client).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("SALESDASH_BENCH_TOKEN")
wrk.body = os.getenv("SALESDASH_BENCH_BODY")

local pace = tonumber(os.getenv("SALESDASH_BENCH_PACE_MS") or "0")
if pace > 0 then
  function delay()
    return pace
  end
end

-- A 200 carrying GraphQL errors is a failure too: every body must hold the payload.
local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

wrong = 0
function response(status, headers, body)
  if status ~= 200 or not body:find('"salesOverview":{"revenue":', 1, true) then
    wrong = wrong + 1
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local bad = 0
  for _, thread in ipairs(threads) do
    bad = bad + thread:get("wrong")
  end
  -- requests, failed (connect, read, write, timeout, non-2xx, or no payload), µs: p50, p99, max; run µs
  io.write(string.format("RESULT %d %d %d %d %d %d\n", summary.requests,
    e.connect + e.read + e.write + e.timeout + e.status + bad,
    latency:percentile(50), latency:percentile(99), latency.max, summary.duration))
end
