-- wrk script for bench.sh: POSTs the batch written by batch.py, with every event made unique,
-- counts responses that are not 2xx, and prints one machine-readable line at the end.
-- Usage: wrk ... -s post.lua URL -- BATCH_FILE NONCE
-- NONCE keeps the events of one wrk run apart from those of every other run on the same daemon.

local threads = {}
local next_id = 0

function setup(thread)
    next_id = next_id + 1
    thread:set("id", next_id)
    table.insert(threads, thread)
end

local parts = {}
local prefix = ""
local counter = 0
non2xx = 0

function init(args)
    local path, nonce = args[1], args[2]
    local f = assert(io.open(path, "rb"))
    local template = f:read("*a")
    f:close()
    local start = 1
    while true do
        local i, j = string.find(template, "@N@", start, true)
        if not i then break end
        table.insert(parts, string.sub(template, start, i - 1))
        start = j + 1
    end
    table.insert(parts, string.sub(template, start))
    prefix = nonce .. "-" .. tostring(id) .. "-"
    wrk.method = "POST"
    wrk.headers["Content-Type"] = "application/json"
end

function request()
    counter = counter + 1
    local n = prefix .. tostring(counter)
    local body = parts[1]
    for k = 2, #parts do
        body = body .. n .. parts[k]
    end
    return wrk.format(nil, nil, nil, body)
end

function response(status, headers, body)
    if status < 200 or status > 299 then
        non2xx = non2xx + 1
    end
end

function done(summary, latency, requests)
    local bad = 0
    for _, thread in ipairs(threads) do
        bad = bad + thread:get("non2xx")
    end
    local e = summary.errors
    io.write(string.format(
        "BENCH requests=%d non2xx=%d duration_us=%d bytes=%d p50_us=%d p99_us=%d p999_us=%d max_us=%d "
            .. "socket_errors=%d timeouts=%d\n",
        summary.requests, bad, summary.duration, summary.bytes,
        latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max,
        e.connect + e.read + e.write, e.timeout))
end
