-- wrk script of bench/run: optional POST body from a file, and a machine-readable summary.
--   BENCH_METHOD     GET (default) or POST
--   BENCH_BODY_FILE  file whose bytes are the request body (POST), sent as application/json
-- done() prints one line: BENCH_RESULT {json} with requests, duration, latency percentiles
-- (microseconds) and every error wrk counts (socket errors and status >= 400).
local method = os.getenv("BENCH_METHOD") or "GET"
wrk.method = method
local body_file = os.getenv("BENCH_BODY_FILE")
if body_file and body_file ~= "" then
  local f = assert(io.open(body_file, "rb"))
  wrk.body = f:read("*a")
  f:close()
  wrk.headers["Content-Type"] = "application/json"
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end
