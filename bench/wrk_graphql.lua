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

function done(summary, latency, requests)
  local e = summary.errors
  -- requests, errors (connect, read, write, timeout, non-2xx), µs: p50, p99, max; run µs
  io.write(string.format("RESULT %d %d %d %d %d %d\n", summary.requests,
    e.connect + e.read + e.write + e.timeout + e.status,
    latency:percentile(50), latency:percentile(99), latency.max, summary.duration))
end
