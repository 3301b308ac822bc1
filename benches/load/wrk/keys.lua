-- wrk script for the keygate load harness. Pre-builds one request per key (no per-request
-- formatting) and sends them in random or shuffled-sequential order.
-- args: KEYFILE ORDER PATH BODY KEYPLACE CONN [THREADS]
--   KEYFILE  file with one key per line, or "-" for no key at all
--   ORDER    random  (a random key per request)
--            walk    (a shuffled permutation, each key once before any repeats: the miss path;
--            with THREADS, wrk's -t, the threads walk disjoint slices of one permutation, so
--            no key is asked for twice until a slice comes round)
--   PATH     request path
--   BODY     none | multipart (4 KiB multipart/form-data POST, the key in the first part,
--            field "clientKey", followed by page, perPage and a file part) | multipart:BYTES
--            (the same, BYTES long in all: the 1 MiB uploads; keep KEYFILE short then, as
--            every key's request is built in memory) | chunked (the 4 KiB multipart body sent
--            with Transfer-Encoding: chunked, as one chunk: a client streaming its upload)
--   KEYPLACE bearer (Authorization: Bearer) | form (multipart field only) | both | none
--   CONN     keep (keep-alive) | close (Connection: close: a new connection per request)
local reqs, n, i = {}, 0, 0
-- This thread's number (0-based), set by setup() in wrk's main Lua state before init() runs
-- in the thread's own.
tid = 0
local started = 0
function setup(thread)
  thread:set("tid", started)
  started = started + 1
end
local BOUNDARY = "kgbenchBoundary7MA4YWxkTrZu0gW"

local function multipart(key, size)
  local head = "--" .. BOUNDARY .. "\r\n" ..
    'Content-Disposition: form-data; name="clientKey"\r\n\r\n' .. key .. "\r\n" ..
    "--" .. BOUNDARY .. "\r\n" ..
    'Content-Disposition: form-data; name="page"\r\n\r\n2\r\n' ..
    "--" .. BOUNDARY .. "\r\n" ..
    'Content-Disposition: form-data; name="perPage"\r\n\r\n50\r\n' ..
    "--" .. BOUNDARY .. "\r\n" ..
    'Content-Disposition: form-data; name="file"; filename="data.bin"\r\n' ..
    "Content-Type: application/octet-stream\r\n\r\n"
  local tail = "\r\n--" .. BOUNDARY .. "--\r\n"
  local pad = size - #head - #tail
  return head .. string.rep("x", pad) .. tail
end

-- wrk.format always adds a Content-Length to a body; a chunked request is written out here.
local function chunked_request(path, h, body)
  local lines = {"POST " .. path .. " HTTP/1.1"}
  for k, v in pairs(wrk.headers) do
    if h[k] == nil then lines[#lines + 1] = k .. ": " .. v end
  end
  for k, v in pairs(h) do lines[#lines + 1] = k .. ": " .. v end
  lines[#lines + 1] = "Transfer-Encoding: chunked"
  return table.concat(lines, "\r\n") .. "\r\n\r\n" ..
    string.format("%x", #body) .. "\r\n" .. body .. "\r\n0\r\n\r\n"
end

local function build(key, path, body, keyplace, conn)
  local h = {}
  if conn == "close" then h["Connection"] = "close" end
  if key and (keyplace == "bearer" or keyplace == "both") then
    h["Authorization"] = "Bearer " .. key
  end
  if body == "chunked" then
    h["Content-Type"] = "multipart/form-data; boundary=" .. BOUNDARY
    local k = key or "kg_none"
    if keyplace ~= "form" and keyplace ~= "both" then k = "-" end
    return chunked_request(path, h, multipart(k, 4096))
  end
  local kind, size = body:match("^(multipart):?(%d*)$")
  if kind then
    size = tonumber(size) or 4096
    h["Content-Type"] = "multipart/form-data; boundary=" .. BOUNDARY
    local k = key or "kg_none"
    if keyplace ~= "form" and keyplace ~= "both" then k = "-" end
    return wrk.format("POST", path, h, multipart(k, size))
  elseif body ~= "none" then
    error("unknown BODY " .. body)
  end
  return wrk.format("GET", path, h)
end

function init(args)
  local keyfile, order = args[1] or "-", args[2] or "random"
  local path, body = args[3] or "/", args[4] or "none"
  local keyplace, conn = args[5] or "bearer", args[6] or "keep"
  math.randomseed(os.time() + math.floor(os.clock() * 1e6))
  if keyfile == "-" then
    n = 1
    reqs[1] = build(nil, path, body, "none", conn)
  else
    for line in io.lines(keyfile) do
      if #line > 0 then
        n = n + 1
        reqs[n] = build(line, path, body, keyplace, conn)
      end
    end
  end
  if order == "walk" then
    -- One permutation for every thread (the same seed), each thread its own slice of it.
    math.randomseed(n)
    for j = n, 2, -1 do
      local k = math.random(j)
      reqs[j], reqs[k] = reqs[k], reqs[j]
    end
    local threads = math.max(1, tonumber(args[7] or "1") or 1)
    local t = tid % threads
    local first = math.floor(t * n / threads) + 1
    local last = math.max(first, math.floor((t + 1) * n / threads))
    i = first - 1
    request = function()
      i = i + 1
      if i > last then i = first end
      return reqs[i]
    end
  end
end

function request()
  return reqs[math.random(n)]
end

-- Exact percentiles in µs for the harness (wrk --latency prints only 50/75/90/99).
function done(summary, latency, requests)
  io.write(string.format("p50 %d\np99 %d\np999 %d\n",
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
