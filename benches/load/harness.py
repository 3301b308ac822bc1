#!/usr/bin/env python3
"""keygate load harness (loopback only). Run it through benches/load/run.sh, which installs the
packages and builds keygate first (or run it directly with KEYGATE_BIN and LOAD_KEYS_BIN set).
Workloads, contenders and the targets checked: WORKLOADS, contenders() and targets() below.

Layout on a 2-core machine (as in shared/bench-peers): the proxy under test on core 0 with one
worker (keygate: worker_threads = 1; nginx: 1 worker; HAProxy: 1 thread); wrk or h2load,
the upstream nginx and Redis on core 1. With --proxy-cores N (2N+1 cores or more): the proxy
on cores 0..N-1 with N workers, the rest on the other cores, load generators with N threads. Every process is started here, stopped by its own PID,
and everything runs on 127.0.0.1. Each contender is started fresh for each measurement (so
keygate's cache is cold when it should be), warmed up (except the cold-cache one), measured,
and stopped; rounds are interleaved and the table shows the median of each column over rounds.

Results: the table (medians), the targets of the benchmarks issue with met/missed, the 1 MiB
upload table and its memory-vs-concurrency check, and the memory phase, on stdout and in
OUT/results.md; every round's numbers in OUT/results.json; raw tool output in OUT/raw-*.txt.
The exit status is 1 when a contender failed (did not start, failed its sanity check).

usage: harness.py [--rounds N] [--dur S] [--cold-dur S] [--warm S] [--conns N] [--rate R]
                  [--only WORKLOAD,...] [--contenders NAME,...] [--upload-conns N]
                  [--upload-mem-conns N,N] [--skip-mem] [--mem-keys N] [--mem-cached N]
                  [--out DIR] [--perf WORKLOAD/CONTENDER,...] [--wait-quiet S]
Environment: KEYGATE_BIN, LOAD_KEYS_BIN (default: target/release/keygate and
target/release/examples/load_keys, as run.sh builds them).
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
KG = os.environ.get("KEYGATE_BIN", os.path.join(ROOT, "target", "release", "keygate"))
# A/B: when set, every keygate contender also runs with this binary, as `<name>@B`, interleaved
# in the same rounds (the way to compare two builds on a machine whose numbers drift).
KG_B = os.environ.get("KEYGATE_BIN_B")
LOADER = os.environ.get("LOAD_KEYS_BIN", os.path.join(ROOT, "target", "release", "examples", "load_keys"))

# Ports (127.0.0.1 only), away from the tests' and the peers' ranges.
P = dict(UP=18600, UP_H2=18601, REDIS=18602, KG=18610, KG_ADMIN=18611, NGX=18620, NGX_H2=18621,
         HAP=18630, HAP_H2=18631, LUA=18640, LUA_REDIS=18641, LUA_FORM=18642)

HOT_KEYS = 1000
COLD_KEYS = 100_000
# keygate-miss-every walks its own keys, each once: more than it can ask for in --cold-dur at
# 75 000 req/s (at 100 000 the walk came round within 4 s here, and a quarter of its requests were
# hits). Loaded when a walk first needs them; the perf phase gives each of its two runs a half.
WALK_KEYS = 400_000
WALK = []  # the walk keys, once loaded
CACHE_TTL_S = 3600  # keygate.toml [cache] ttl
NEG_TTL_S = 5  # keygate.toml [cache] negative_ttl (rendered from this)
UPLOAD_BYTES = 1 << 20  # the upload-1m body, multipart framing included
MIB = 1 << 20
# "Memory flat as concurrency grows": RSS growth per added concurrent upload at most the body
# peek (max_peek_bytes, 64 KiB by default) plus one read (max_header_bytes, 32 KiB by default);
# whole bodies held would show as ~1 MiB per upload. README.md's worst case per HTTP/1.1 upload
# is larger (peek, two reads, ~24 KiB of connection buffers: 152 KiB); this stricter bound is
# what the allocator's reuse lets us hold to. (128 KiB until 2026-11-24, when a read could be 64 KiB.)
FLAT_KIB_PER_UPLOAD = 96
BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

COLD = []  # the cold keys, once loaded
procs = []  # every Popen we started, stopped in reverse order on exit
REPORT = []  # what the summary printed, written to results.md as well


class ContenderError(Exception):
    """A contender did not start or failed its sanity check: recorded, and the run goes on."""


def out(line=""):
    print(line, flush=True)
    REPORT.append(line)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes

# --proxy-cores N (default 1, the reference layout): the proxy under test gets cores 0..N-1 and N
# workers (keygate worker_threads, nginx worker_processes, HAProxy nbthread); everything else
# (load generators with N threads, the upstream nginx with N workers, Redis, the key loader) the
# cores after them. pin(0) is the proxy's side, pin(1) the rest.
PROXY_CORES = 1
CPUSETS = {0: "0", 1: "1"}


def pin(side):
    return ["taskset", "-c", CPUSETS[side]] if TWO_CORES else []


def start(cmd, core, env=None, logname=None):
    e = dict(os.environ)
    e.update(env or {})
    f = open(os.path.join(RUN, logname or "proc.log"), "ab")
    p = subprocess.Popen(pin(core) + cmd, env=e, stdout=f, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL)
    p._logfile = f
    procs.append(p)
    return p


def start_time(pid):
    """The process's start time (clock ticks since boot): tells a PID from a reused one."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def stop(p, timeout=5):
    if p is None:
        return
    kids = []
    if p.poll() is None:
        # nginx's workers: SIGKILLed below if they outlive their master.
        kids = [(k, start_time(k)) for k in descendants(p.pid)[1:]]
        try:
            os.kill(p.pid, signal.SIGCONT)
        except OSError:
            pass
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
    for k, st in kids:
        if st is not None and start_time(k) == st:  # still the same process
            try:
                os.kill(k, signal.SIGKILL)
            except OSError:
                pass
    p._logfile.close()
    if p in procs:
        procs.remove(p)


def stop_all():
    for p in reversed(list(procs)):
        try:
            stop(p)
        except Exception as e:  # keep going: every process must be stopped
            log("stop:", e)


def wait_port(port, timeout=15):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def cpu_ticks(pid):
    """utime+stime (clock ticks) of pid and its live descendants (nginx master + worker)."""
    total, todo, seen = 0, [pid], set()
    while todo:
        q = todo.pop()
        if q in seen:
            continue
        seen.add(q)
        try:
            with open(f"/proc/{q}/stat") as fh:
                f = fh.read().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])
            for t in os.listdir(f"/proc/{q}/task"):
                with open(f"/proc/{q}/task/{t}/children") as ch:
                    todo += [int(x) for x in ch.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def rss_kib(pid, field="VmRSS"):
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def tree_rss_kib(pid):
    """Resident memory of pid and its descendants (nginx: master + worker)."""
    return sum(rss_kib(q) or 0 for q in descendants(pid))


class RssSampler(threading.Thread):
    """Peak resident memory of a process tree, sampled every 50 ms while a load runs."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0, threading.Event()

    def run(self):
        while not self.done.is_set():
            self.peak = max(self.peak, tree_rss_kib(self.pid))
            self.done.wait(0.05)

    def finish(self):
        self.done.set()
        self.join(2)
        self.peak = max(self.peak, tree_rss_kib(self.pid))
        return self.peak


def tcp_passive_opens():
    """Connections accepted on this machine so far (all sockets; a plausibility check that the
    new-connection workload really opens one connection per request)."""
    with open("/proc/net/snmp") as fh:
        rows = [line.split() for line in fh if line.startswith("Tcp:")]
    return int(rows[1][rows[0].index("PassiveOpens")])


def cpu_model():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


# Where Debian keeps nginx's dynamic modules and the Lua Redis client; a self-contained bundle
# (benches/load/bundle.sh) sets these to its own copies.
NGX_MODULES = os.environ.get("KEYGATE_BENCH_NGX_MODULES", "/usr/lib/nginx/modules")
LUA_PATH = os.environ.get("KEYGATE_BENCH_LUA_PATH", "/usr/share/lua/5.1")


def render(name, extra=None):
    """conf/NAME with @RUN@, @PORT@… filled in, written to RUN; returns the path."""
    vals = dict(P, RUN=RUN, NEG_TTL=NEG_TTL_S, WORKERS=PROXY_CORES, NGX_MODULES=NGX_MODULES, LUA_PATH=LUA_PATH)
    vals.update(extra or {})
    with open(os.path.join(HERE, "conf", name)) as fh:
        text = fh.read()
    text = re.sub(r"@([A-Z_0-9]+)@", lambda m: str(vals[m.group(1)]), text)
    out = os.path.join(RUN, name)
    with open(out, "w") as fh:
        fh.write(text)
    return out


def http(port, path="/", key=None, method="GET", body=None, headers=None, timeout=3):
    h = dict(headers or {})
    if key:
        h["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers=h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:
        return None, str(e).encode()


def redis_cli(*args, stdin=None):
    return subprocess.run(["redis-cli", "-p", str(P["REDIS"])] + list(args), input=stdin,
                          capture_output=True, timeout=600)


def redis_get_calls():
    """Key lookups Redis has served: GET before the record cap, GETRANGE (a capped read) since;
    both counted, so that runs of either build compare."""
    out = redis_cli("INFO", "commandstats").stdout.decode()
    return sum(int(m.group(1)) for m in re.finditer(r"cmdstat_(?:get|getrange):calls=(\d+)", out))


# ---------------------------------------------------------------- keys

BODY_LEN = 34  # characters between "kg_" and the checksum; set from a real key in prepare_keys()


def fake_key(valid_checksum):
    """A well-formed keygate key that is in no store (or, with a wrong checksum, a malformed one):
    kg_ + BODY_LEN base62 (slot tag and secret) + the CRC32 of everything before, 6 base62."""
    body = "".join(BASE62[b % 62] for b in os.urandom(BODY_LEN))
    signed = "kg_" + body
    n = zlib.crc32(signed.encode())
    cs = ""
    for _ in range(6):
        cs = BASE62[n % 62] + cs
        n //= 62
    if not valid_checksum:
        cs = cs[:-1] + ("A" if cs[-1] != "A" else "B")
    return signed + cs


def load_keys(count, out, team="bench"):
    t0 = time.time()
    r = subprocess.run(pin(1) + [LOADER, "--redis", f"redis://127.0.0.1:{P['REDIS']}", "--namespace", "kg",
                        "--count", str(count), "--team", team, "--concurrency", "256", "--out", out],
                       capture_output=True, timeout=900)
    if r.returncode != 0:
        raise SystemExit(f"load_keys failed: {r.stderr.decode()[-2000:]}")
    log(r.stderr.decode().strip(), f"[{time.time() - t0:.1f} s]")
    with open(out) as fh:
        return [line.strip() for line in fh if line.strip()]


def resp(*a):
    return f"*{len(a)}\r\n" + "".join(f"${len(x)}\r\n{x}\r\n" for x in a)


def prepare_keys():
    """Hot and cold keys in keygate's layout (via the library), the same plaintexts for the Lua
    peer (`apikey:<key>`), map files for nginx and HAProxy, and invalid keys."""
    global BODY_LEN
    hot = load_keys(HOT_KEYS, f"{RUN}/hot.txt")
    BODY_LEN = len(hot[0]) - len("kg_") - 6  # follow the key format of the keygate being measured
    probe = subprocess.run([KG, "--help"], capture_output=True, timeout=30)  # (binary runs at all)
    if probe.returncode != 0:
        raise SystemExit("keygate binary does not run")
    cold = load_keys(COLD_KEYS, f"{RUN}/cold.txt")
    pipe = "".join(resp("SET", f"apikey:{k}", "1") for k in hot + cold)
    r = redis_cli("--pipe", stdin=pipe.encode())
    log("lua peer keys:", r.stdout.decode().strip().splitlines()[-1:])
    with open(f"{RUN}/keys.nginx.map", "w") as fh:
        fh.writelines(f'"Bearer {k}" 1;\n' for k in hot)
    with open(f"{RUN}/keys.haproxy.map", "w") as fh:
        fh.writelines(f"{k} 1\n" for k in hot)
    with open(f"{RUN}/malformed.txt", "w") as fh:
        fh.writelines(fake_key(False) + "\n" for _ in range(HOT_KEYS))
    with open(f"{RUN}/unknown.txt", "w") as fh:
        fh.writelines(fake_key(True) + "\n" for _ in range(HOT_KEYS))
    return hot, cold


# ---------------------------------------------------------------- proxies

class Proxy:
    """A running contender: its process (None for direct), port and h2 port."""

    def __init__(self, proc, port, port_h2=None):
        self.proc, self.port, self.port_h2 = proc, port, port_h2


def listening(p, port, what, logname):
    """Wait for port; if it never opens, stop the process and give up on this contender."""
    if p.poll() is None and wait_port(port):
        return
    stop(p)
    raise ContenderError(f"{what} did not listen on {port}; see {RUN}/{logname}")


def start_keygate(log_level="warn", env=None, binary=None):
    cfg = render("keygate.toml", dict(PORT=P["KG"], ADMIN=P["KG_ADMIN"], LOG_LEVEL=log_level))
    logname = f"keygate-{log_level}.log"
    p = start([binary or KG, "serve", "--config", cfg], 0,
              env=dict({"TOKIO_WORKER_THREADS": str(PROXY_CORES), "RUST_LOG": log_level}, **(env or {})), logname=logname)
    listening(p, P["KG"], "keygate", logname)
    if not wait_port(P["KG_ADMIN"], 5):  # the metrics the harness reads
        stop(p)
        raise ContenderError(f"keygate's admin listener did not open; see {RUN}/{logname}")
    return Proxy(p, P["KG"], P["KG"])


def start_nginx_map():
    cfg = render("gw-nginx-map.conf", dict(PORT=P["NGX"], PORT_H2=P["NGX_H2"]))
    p = start(["nginx", "-p", RUN, "-e", f"{RUN}/gwn.err", "-c", cfg, "-g", "daemon off;"], 0, logname="nginx-map.log")
    listening(p, P["NGX"], "nginx-map", "nginx-map.log")
    return Proxy(p, P["NGX"], P["NGX_H2"])


def start_haproxy():
    cfg = render("gw-haproxy.cfg", dict(PORT=P["HAP"], PORT_H2=P["HAP_H2"]))
    p = start(["haproxy", "-db", "-f", cfg], 0, logname="haproxy.log")
    listening(p, P["HAP"], "haproxy", "haproxy.log")
    return Proxy(p, P["HAP"], P["HAP_H2"])


def start_nginx_lua(which):
    cfg = render("gw-nginx-lua.conf", dict(PORT=P["LUA"], PORT_REDIS=P["LUA_REDIS"], PORT_FORM=P["LUA_FORM"]))
    p = start(["nginx", "-p", RUN, "-e", f"{RUN}/gwl.err", "-c", cfg, "-g", "daemon off;"], 0, logname="nginx-lua.log")
    port = {"cache": P["LUA"], "redis": P["LUA_REDIS"], "form": P["LUA_FORM"]}[which]
    listening(p, port, "nginx-lua", "nginx-lua.log")
    return Proxy(p, port)


# ---------------------------------------------------------------- load generators

def to_us(v, unit):
    return float(v) * {"us": 1, "ms": 1000, "s": 1e6}[unit]


def parse_wrk(txt):
    d = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", txt)
    d["rps"] = float(m.group(1)) if m else None
    # The script's done() hook prints exact percentiles in µs.
    for key in ("p50", "p99", "p999"):
        m = re.search(rf"^{key} (\d+)$", txt, re.M)
        d[key] = float(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", txt)
    d["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"(\d+) requests in", txt)
    d["requests"] = int(m.group(1)) if m else None
    m = re.search(r"Socket errors:(.*)", txt)
    d["socket_errors"] = m.group(1).strip() if m else ""
    return d


def wrk(port, dur, conns, keyfile="-", order="random", path="/", body="none", keyplace="bearer", conn="keep"):
    script = os.path.join(RUN, "wrk-run.lua")
    cmd = pin(1) + ["wrk", f"-t{PROXY_CORES}", f"-c{conns}", f"-d{dur}s", "--timeout", "5s", "-s", script,
                    f"http://127.0.0.1:{port}{path}", "--", keyfile, order, path, body, keyplace, conn,
                    str(PROXY_CORES)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=dur + 60)
    d = parse_wrk(r.stdout)
    d["raw"] = r.stdout + r.stderr
    return d


def h2load(port, dur, key, conns=16, streams=10, path="/"):
    logf = os.path.join(RUN, "h2load.log")
    if os.path.exists(logf):
        os.remove(logf)
    cmd = pin(1) + ["h2load", f"-t{PROXY_CORES}", f"-c{conns}", f"-m{streams}", "-D", str(dur), "--log-file", logf]
    if key:
        cmd += ["-H", f"authorization: Bearer {key}"]
    cmd.append(f"http://127.0.0.1:{port}{path}")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=dur + 60)
    d = {"raw": r.stdout + r.stderr, "rps": None, "requests": None, "non2xx": 0,
         "p50": None, "p99": None, "p999": None, "socket_errors": ""}
    m = re.search(r"finished in ([\d.]+)(ms|s), ([\d.]+) req/s", r.stdout)
    if m:
        d["rps"] = float(m.group(3))
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored",
                  r.stdout)
    if m:
        d["requests"] = int(m.group(3))
        if int(m.group(5)) or int(m.group(6)):
            d["socket_errors"] = f"failed {m.group(5)}, errored {m.group(6)}"
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", r.stdout)
    if m:
        d["non2xx"] = int(m.group(2)) + int(m.group(3)) + int(m.group(4))
    lat = []
    if os.path.exists(logf):
        with open(logf) as fh:
            for line in fh:
                f = line.split()
                if len(f) >= 3:
                    lat.append(int(f[2]))
        os.remove(logf)
    if lat:
        lat.sort()
        pick = lambda q: float(lat[min(len(lat) - 1, int(q * len(lat)))])
        d["p50"], d["p99"], d["p999"] = pick(0.5), pick(0.99), pick(0.999)
    return d


# Seconds at the start of a fixed-rate run whose requests the percentiles leave out (at most a
# quarter of the run).
FIXED_SETTLE_S = 0.5


def h2load_fixed(port, dur, rate, path, keys=None, uri_keys=None, nproc=8):
    """Fixed request rate (open loop as long as answers come back within 1/rate per connection):
    NPROC h2load --h1 processes with one connection each, RATE/NPROC requests/s each. `keys`:
    one Authorization key per process; `uri_keys`: per process, a list of keys sent as
    ?api_key=… in turn (each process its own keys, so no two connections share a key)."""
    ps, logs = [], []
    for i in range(nproc):
        logf = os.path.join(RUN, f"h2fixed-{i}.log")
        if os.path.exists(logf):
            os.remove(logf)
        logs.append(logf)
        cmd = pin(1) + ["h2load", "--h1", "-t1", "-c1", "-m1", "--rps", str(max(1, rate // nproc)),
                        "-D", str(dur), "--log-file", logf]
        if keys:
            cmd += ["-H", f"authorization: Bearer {keys[i % len(keys)]}"]
        if uri_keys:
            uf = os.path.join(RUN, f"h2fixed-uris-{i}.txt")
            with open(uf, "w") as fh:
                fh.writelines(f"http://127.0.0.1:{port}{path}?api_key={k}\n" for k in uri_keys[i])
            cmd += ["-i", uf]
        else:
            cmd.append(f"http://127.0.0.1:{port}{path}")
        ps.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in ps:
            try:
                outs.append(p.communicate(timeout=dur + 60)[0])
            except subprocess.TimeoutExpired:
                p.kill()
                outs.append(p.communicate()[0])
    finally:  # interrupted: stop the rest (each bounded by -D anyway)
        for p in ps:
            if p.poll() is None:
                p.kill()
                p.wait(5)
    d = {"raw": "\n".join(outs), "requests": 0, "non2xx": 0, "socket_errors": ""}
    for out in outs:
        m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored",
                      out)
        if m:
            d["requests"] += int(m.group(3))
            if int(m.group(5)) or int(m.group(6)):
                d["socket_errors"] += f"failed {m.group(5)} errored {m.group(6)}; "
        m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
        if m:
            d["non2xx"] += int(m.group(2)) + int(m.group(3)) + int(m.group(4))
    d["rps"] = d["requests"] / dur if d["requests"] else None
    rows = []  # (start in µs since the epoch, duration in µs)
    for logf in logs:
        if os.path.exists(logf):
            with open(logf) as fh:
                rows += [(int(f[0]), int(f[2])) for f in (line.split() for line in fh) if len(f) >= 3]
            os.remove(logf)
    # The percentiles leave out the requests started in the run's first FIXED_SETTLE_S: the 8
    # h2load processes start then, on the core that also runs the upstream and Redis, and the
    # first requests of any contender wait in multiples of the 4 ms scheduler tick (see
    # docs/benchmarks.md, "The first 0.15 s of a fixed-rate run"). They still count as requests.
    t0 = min((r[0] for r in rows), default=0)
    settle_us = min(FIXED_SETTLE_S, dur / 4) * 1e6  # a short smoke run keeps most of itself
    lat = sorted(took for start, took in rows if start - t0 >= settle_us)
    d["settle_left_out"] = len(rows) - len(lat)
    every = sorted(took for _, took in rows)
    d["p999_with_start"] = float(every[min(len(every) - 1, int(0.999 * len(every)))]) if every else None
    pick = lambda q: float(lat[min(len(lat) - 1, int(q * len(lat)))]) if lat else None
    d["p50"], d["p99"], d["p999"] = pick(0.5), pick(0.99), pick(0.999)
    return d


# ---------------------------------------------------------------- contenders and workloads
#
# Each contender: (name, starter, generator arguments). The generator for a workload is wrk
# unless the workload is h2. For keygate, `route` picks the path.

WORKLOADS = {
    "get-keepalive": "small GET, Authorization: Bearer, keep-alive (wrk)",
    "get-newconn": "small GET, Authorization: Bearer, a new connection per request (wrk, Connection: close)",
    "post-multipart-4k": "4 KiB multipart POST, key in the `clientKey` field (header peers: key in Authorization too)",
    "post-chunked-4k": "the same 4 KiB multipart POST sent with Transfer-Encoding: chunked (one chunk), "
                       "key in Authorization",
    "get-h2": "small GET over h2c, one key in Authorization (h2load -c16 -m10)",
    "get-fixed-rate": "small GET at a fixed rate (--rate, default 5000/s; 8 h2load --h1 connections): "
                      "latency without saturation (percentiles after the run's first 0.5 s)",
    "upload-1m": "1 MiB multipart POST (key in Authorization, or first in the `clientKey` field for "
                 "keygate-form), --upload-conns connections; upstream drains and discards the body; "
                 "then keygate's RSS at --upload-mem-conns concurrent uploads",
}


def contenders(workload, form_ok):
    hot, cold, bad, unk = f"{RUN}/hot.txt", f"{RUN}/cold.txt", f"{RUN}/malformed.txt", f"{RUN}/unknown.txt"
    walk = f"{RUN}/walk.txt"
    direct = lambda: Proxy(None, P["UP"], P["UP_H2"])
    kg = lambda binary=None: start_keygate("warn", binary=binary)
    kg_info = lambda binary=None: start_keygate("info", binary=binary)
    c = []
    if workload in ("get-keepalive", "get-newconn"):
        conn = "keep" if workload == "get-keepalive" else "close"
        c += [
            ("direct", direct, dict(keyfile=hot, path="/v1/resource", conn=conn)),
            ("keygate-public", kg, dict(keyfile="-", path="/public/v1/resource", conn=conn)),
            # The same requests as keygate-cached (Authorization: Bearer …) on the public route:
            # authentication off, bytes in equal (the header is forwarded instead of the identity).
            ("keygate-public-bearer", kg, dict(keyfile=hot, path="/public/v1/resource", conn=conn)),
            ("keygate-cached", kg, dict(keyfile=hot, path="/v1/resource", conn=conn)),
        ]
        if workload == "get-keepalive":
            c += [
                ("keygate-cached-loginfo", kg_info, dict(keyfile=hot, path="/v1/resource", conn=conn)),
                # Cache cold at the start, keys at random from the 100 000: each key's first
                # request is a miss, its later ones hits (what a restart or scale-out sees).
                ("keygate-cold-100k", kg, dict(keyfile=cold, order="random", path="/v1/resource", conn=conn, cold=True)),
                # Every request a key not seen before (a shuffled walk): the miss path alone.
                ("keygate-miss-every", kg, dict(keyfile=walk, order="walk", path="/v1/resource", conn=conn, cold=True)),
                ("keygate-flood-malformed", kg, dict(keyfile=bad, path="/v1/resource", conn=conn, expect=401)),
                ("keygate-flood-unknown", kg, dict(keyfile=unk, path="/v1/resource", conn=conn, expect=401)),
            ]
        c += [
            ("nginx-map", start_nginx_map, dict(keyfile=hot, path="/v1/resource", conn=conn)),
            ("haproxy-map", start_haproxy, dict(keyfile=hot, path="/v1/resource", conn=conn)),
            ("nginx-lua-dict", lambda: start_nginx_lua("cache"), dict(keyfile=hot, path="/v1/resource", conn=conn)),
        ]
        if workload == "get-keepalive":
            c += [("nginx-lua-redis-every", lambda: start_nginx_lua("redis"),
                   dict(keyfile=hot, path="/v1/resource", conn=conn))]
    elif workload == "post-multipart-4k":
        mp = dict(keyfile=hot, body="multipart")
        c += [
            ("direct", direct, dict(mp, path="/form", keyplace="both")),
            ("keygate-public", kg, dict(mp, path="/public/form", keyplace="form")),
            ("keygate-bearer", kg, dict(mp, path="/form", keyplace="both")),
        ]
        if form_ok:
            c += [("keygate-form", kg, dict(mp, path="/form", keyplace="form"))]
        c += [
            ("nginx-map", start_nginx_map, dict(mp, path="/form", keyplace="both")),
            ("haproxy-map", start_haproxy, dict(mp, path="/form", keyplace="both")),
            ("nginx-lua-form", lambda: start_nginx_lua("form"), dict(mp, path="/form", keyplace="form")),
        ]
    elif workload == "post-chunked-4k":
        ch = dict(keyfile=hot, body="chunked")
        c += [
            ("direct", direct, dict(ch, path="/form", keyplace="both")),
            ("keygate-public", kg, dict(ch, path="/public/form", keyplace="form")),
            ("keygate-bearer", kg, dict(ch, path="/form", keyplace="both")),
            ("nginx-map", start_nginx_map, dict(ch, path="/form", keyplace="both")),
            ("haproxy-map", start_haproxy, dict(ch, path="/form", keyplace="both")),
        ]
    elif workload == "get-fixed-rate":
        c += [
            ("direct", direct, dict(fixed=True, path="/v1/resource")),
            ("keygate-public", kg, dict(fixed=True, path="/public/v1/resource", nokey=True)),
            ("keygate-public-bearer", kg, dict(fixed=True, path="/public/v1/resource")),
            ("keygate-cached", kg, dict(fixed=True, path="/v1/resource")),
            ("keygate-cold-100k", kg, dict(fixed=True, path="/q/v1/resource", cold=True)),
            ("nginx-map", start_nginx_map, dict(fixed=True, path="/v1/resource")),
            ("nginx-lua-dict", lambda: start_nginx_lua("cache"), dict(fixed=True, path="/v1/resource")),
            ("nginx-lua-redis-every", lambda: start_nginx_lua("redis"), dict(fixed=True, path="/v1/resource")),
        ]
    elif workload == "get-h2":
        c += [
            ("direct", direct, dict(h2=True, path="/v1/resource")),
            ("keygate-public", kg, dict(h2=True, path="/public/v1/resource", nokey=True)),
            ("keygate-public-bearer", kg, dict(h2=True, path="/public/v1/resource")),
            ("keygate-cached", kg, dict(h2=True, path="/v1/resource")),
            ("nginx-map", start_nginx_map, dict(h2=True, path="/v1/resource")),
            ("haproxy-map", start_haproxy, dict(h2=True, path="/v1/resource")),
        ]
    elif workload == "upload-1m":
        # Identical bytes for every contender: a multipart body whose first part is the key
        # (`clientKey`), then a file part up to 1 MiB in all. A few keys only: wrk holds every
        # key's request in memory.
        up = dict(keyfile=f"{RUN}/upload-keys.txt", body=f"multipart:{UPLOAD_BYTES}", upload=True)
        c += [
            ("direct", direct, dict(up, path="/v1/upload", keyplace="both")),
            ("keygate-public", kg, dict(up, path="/public/upload", keyplace="form")),
            ("keygate-bearer", kg, dict(up, path="/v1/upload", keyplace="both")),
        ]
        if form_ok:
            c += [("keygate-form", kg, dict(up, path="/form/upload", keyplace="form"))]
        c += [
            ("haproxy-map", start_haproxy, dict(up, path="/v1/upload", keyplace="both")),
            ("nginx-map", start_nginx_map, dict(up, path="/v1/upload", keyplace="both")),
        ]
    if KG_B:
        twins = []
        for name, starter, a in c:
            twins.append((name, starter, a))
            if name.startswith("keygate"):
                twins.append((name + "@B", lambda s=starter: s(binary=KG_B), a))
        c = twins
    return c


def ab_lines(results):
    """For every contender run with both binaries: B/A of req/s and of CPU per request, round
    by round (each pair measured minutes apart at most, so drift mostly cancels)."""
    def med(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2
    lines = ["| workload | contender | req/s B/A | CPU µs/req B/A | CPU µs/req A → B (medians) | rounds |",
             "|---|---|---|---|---|---|"]
    for (w, name), rs_a in results.items():
        rs_b = results.get((w, name + "@B"))
        if not rs_b or name.endswith("@B"):
            continue
        pairs = [(a, b) for a, b in zip(rs_a, rs_b) if a.get("rps") and b.get("rps")]
        if not pairs:
            continue
        rps = [b["rps"] / a["rps"] for a, b in pairs]
        cpu = [b["cpu_us_per_req"] / a["cpu_us_per_req"] for a, b in pairs
               if a.get("cpu_us_per_req") and b.get("cpu_us_per_req")]
        cell = lambda xs: f"{med(xs):.3f} ({min(xs):.3f}–{max(xs):.3f})" if xs else "-"
        ca = [a["cpu_us_per_req"] for a, _ in pairs if a.get("cpu_us_per_req")]
        cb = [b["cpu_us_per_req"] for _, b in pairs if b.get("cpu_us_per_req")]
        lines.append(f"| {w} | {name} | {cell(rps)} | {cell(cpu)} | "
                     f"{med(ca) if ca else '-'} → {med(cb) if cb else '-'} | {len(pairs)} |")
    return lines


def keygate_metrics():
    st, body = http(P["KG_ADMIN"], "/metrics")
    out = {}
    if st == 200:
        for line in body.decode().splitlines():
            m = re.match(r"(keygate_auth_\w+|keygate_auth_cache_entries)\s+([\d.e+]+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
    return out


MP_BOUNDARY = "kgbenchB"


def multipart_body(key, size=0):
    """A multipart body with the key as the first part (`clientKey`), then a file part padded
    to `size` bytes in all (0: no padding)."""
    head = (f'--{MP_BOUNDARY}\r\nContent-Disposition: form-data; name="clientKey"\r\n\r\n{key}\r\n'
            f'--{MP_BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="d.bin"\r\n'
            f'Content-Type: application/octet-stream\r\n\r\n').encode()
    tail = f"\r\n--{MP_BOUNDARY}--\r\n".encode()
    return head + b"x" * max(0, size - len(head) - len(tail)) + tail


MP_HEADERS = {"Content-Type": f"multipart/form-data; boundary={MP_BOUNDARY}"}


def sanity(workload, name, proxy, a, key):
    """A valid key passes and an unknown one does not, where the contender authenticates; for
    uploads, one full-size request goes through."""
    path, authenticates = a["path"], name != "direct" and "public" not in name
    if a.get("keyplace") == "form":  # key only in the body
        st_ok = http(proxy.port, path, None, "POST", multipart_body(key), MP_HEADERS)[0]
        st_bad = http(proxy.port, path, None, "POST", multipart_body(fake_key(True)), MP_HEADERS)[0]
    elif path.startswith("/q/"):
        st_ok = http(proxy.port, f"{path}?api_key={key}")[0]
        st_bad = http(proxy.port, f"{path}?api_key={fake_key(True)}")[0]
    else:
        st_ok = http(proxy.port, path, key)[0]
        st_bad = http(proxy.port, path, fake_key(True))[0]
    if st_ok != 200 or (authenticates and st_bad != 401):
        raise ContenderError(f"sanity check failed: valid key {st_ok}, unknown key {st_bad}"
                             + ("" if authenticates else " (not authenticating)"))
    if a.get("upload"):
        hdr = dict(MP_HEADERS)
        st, body = http(proxy.port, path, None if a.get("keyplace") == "form" else key, "POST",
                        multipart_body(key, UPLOAD_BYTES), hdr, timeout=30)
        if st != 200 or f'"received":{UPLOAD_BYTES}'.encode() not in body:
            raise ContenderError(f"1 MiB upload sanity check failed: {st} {body[:200]!r}")


def walk_keys():
    """The keys keygate-miss-every walks (WALK_KEYS of them), loaded on first use."""
    if not WALK:
        WALK[:] = load_keys(WALK_KEYS, f"{RUN}/walk.txt", team="bench-walk")
    return WALK


def count_lines(path):
    with open(path) as fh:
        return sum(1 for line in fh if line.strip())


def load_generator(proxy, a, hot, args, conns, cold_keys, keyfile=None):
    """The load for contender arguments `a`: a function of the seconds to run, and the
    connections it uses. `cold_keys` are what a fixed-rate cold run walks (each of its 8
    connections its own shard, in the query source); `keyfile` replaces `a`'s for wrk."""
    if a.get("fixed") and a.get("cold"):
        shard = len(cold_keys) // 8
        rng = __import__("random").Random(time.time())
        order = cold_keys[:]
        rng.shuffle(order)
        shards = [order[i * shard:(i + 1) * shard] for i in range(8)]
        return (lambda d: h2load_fixed(proxy.port, d, args.rate, a["path"], uri_keys=shards)), 8
    if a.get("fixed"):
        return (lambda d: h2load_fixed(proxy.port, d, args.rate, a["path"],
                                       keys=None if a.get("nokey") else hot[:8])), 8
    if a.get("h2"):
        return (lambda d: h2load(proxy.port_h2, d, None if a.get("nokey") else hot[0], path=a["path"])), 16 * 10
    keyfile = keyfile or a.get("keyfile", "-")
    return (lambda d: wrk(proxy.port, d, conns, keyfile, a.get("order", "random"), a["path"],
                          a.get("body", "none"), a.get("keyplace", "bearer"), a.get("conn", "keep"))), conns


def measure(workload, name, starter, a, hot, args, conns=None):
    """Start the contender, check it answers as expected, warm it, measure it, stop it."""
    if a.get("order") == "walk":
        # Loaded before the contender starts: 400 000 key creations must not land on it.
        walk_keys()
    proxy = starter()
    try:
        time.sleep(0.3)
        key = hot[0]
        expect = a.get("expect", 200)
        sanity(workload, name, proxy, a, key)
        # The walk must not come round to keys already asked for: it gets the shorter --cold-dur.
        dur = args.cold_dur if a.get("cold") and a.get("order") == "walk" else args.dur
        conns = conns or (args.upload_conns if a.get("upload") else args.conns)
        gen, conns = load_generator(proxy, a, hot, args, conns, COLD)
        watch = proxy.proc.pid if proxy.proc else UPSTREAM.pid
        is_kg = name.startswith("keygate")
        # Store traffic from here on (warm-up included), for the lookups-per-key checks.
        ga, ma, ta = redis_get_calls(), (keygate_metrics() if is_kg else {}), time.time()
        rss_idle = tree_rss_kib(proxy.proc.pid) if proxy.proc else None
        sampler = RssSampler(proxy.proc.pid) if proxy.proc else None  # peak over warm-up and run
        if sampler:
            sampler.start()
        try:
            if not a.get("cold") and args.warm > 0:
                gen(args.warm)
            m0 = keygate_metrics() if is_kg else {}
            g0, o0 = redis_get_calls(), tcp_passive_opens()
            c0, t0 = cpu_ticks(watch), time.time()
            d = gen(dur)
            c1, t1 = cpu_ticks(watch), time.time()
        finally:
            rss_peak = sampler.finish() if sampler else None
        g1, o1 = redis_get_calls(), tcp_passive_opens()
        m1 = keygate_metrics() if is_kg else {}
        d["conns"] = conns
        d["redis_gets"] = g1 - g0
        d["redis_gets_all"] = g1 - ga  # warm-up and measurement
        d["span_s"] = round(t1 - ta, 2)
        d["rss_idle_kib"], d["rss_peak_kib"] = rss_idle, rss_peak
        if d.get("requests"):
            hz = os.sysconf("SC_CLK_TCK")
            d["cpu_us_per_req"] = round((c1 - c0) / hz * 1e6 / d["requests"], 2)
            d["cpu_util"] = round((c1 - c0) / hz / (t1 - t0), 3)
            d["tcp_opens_per_req"] = round((o1 - o0) / d["requests"], 3)
            if a.get("upload"):
                mib = d["requests"] * UPLOAD_BYTES / MIB
                d["mib_s"] = round(d["rps"] * UPLOAD_BYTES / MIB, 1) if d.get("rps") else None
                d["cpu_ms_per_mib"] = round((c1 - c0) / hz * 1e3 / mib, 3)
        if m1:
            delta = {k: m1.get(k, 0) - m0.get(k, 0) for k in m1 if k != "keygate_auth_cache_entries"}
            d["kg_metrics"] = delta
            d["store_lookups_all"] = m1.get("keygate_auth_store_lookups_total", 0) - ma.get(
                "keygate_auth_store_lookups_total", 0)
            if a.get("cold") and d.get("requests"):
                d["miss_fraction"] = round(delta.get("keygate_auth_store_lookups_total", 0) / d["requests"], 3)
        # At most one Redis GET per distinct key per TTL (warm-up included): the distinct keys
        # this contender can have sent, times the TTL periods the run spans.
        if is_kg and "public" not in name:
            if a.get("cold"):
                # At most one distinct key per request (walked: exactly; at random: fewer), and
                # never more than the key set; requests still in flight at the end count too.
                keys = WALK_KEYS if a.get("order") == "walk" else COLD_KEYS
                distinct = min(keys, (d.get("requests") or 0) + conns)
                ttl = CACHE_TTL_S
            elif "malformed" in name:
                distinct, ttl = 0, NEG_TTL_S
            elif "unknown" in name:
                distinct, ttl = count_lines(a["keyfile"]), NEG_TTL_S
            else:
                distinct = count_lines(a["keyfile"]) if a.get("keyfile", "-") != "-" else (8 if a.get("fixed") else 1)
                ttl = CACHE_TTL_S
            periods = max(1, -(-int(d["span_s"] * 1000) // (ttl * 1000)))
            d["distinct_keys"], d["redis_gets_bound"] = distinct, distinct * periods
        if expect == 401:
            d["unexpected"] = d.get("requests", 0) - d.get("non2xx", 0)  # 2xx answers to invalid keys
        else:
            d["unexpected"] = d.get("non2xx", 0)
        if proxy.proc and is_kg:
            d["rss_kib"] = rss_kib(proxy.proc.pid)
        return d
    finally:
        if proxy.proc:
            stop(proxy.proc)


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def fmt_us(v):
    if v is None:
        return "-"
    return f"{v / 1000:.2f} ms" if v >= 1000 else f"{v:.0f} µs"


def fmt_kib(v):
    return f"{v / 1024:.1f} MiB" if v else "-"


MEDIAN_KEYS = ("rps", "p50", "p99", "p999", "cpu_us_per_req", "cpu_util", "redis_gets", "redis_gets_all",
               "redis_gets_bound", "store_lookups_all", "miss_fraction", "rss_kib", "rss_idle_kib", "rss_peak_kib",
               "tcp_opens_per_req", "mib_s", "cpu_ms_per_mib", "requests")


def summarize(results):
    """results[(workload, name)] = [per-round dicts, or {"error": …}]. Medians over rounds."""
    summary = {}
    for (w, n), all_rs in results.items():
        rs = [r for r in all_rs if "error" not in r]
        s = {k: median([r.get(k) for r in rs]) for k in MEDIAN_KEYS}
        s["rounds"] = len(rs)
        s["errors"] = [r["error"] for r in all_rs if "error" in r]
        s["rps_all"] = [r.get("rps") for r in rs]
        s["unexpected"] = sum(r.get("unexpected", 0) or 0 for r in rs)
        s["non2xx"] = sum(r.get("non2xx", 0) or 0 for r in rs)
        s["socket_errors"] = [r.get("socket_errors") for r in rs if r.get("socket_errors")]
        # Worst round, for the at-most checks.
        s["redis_gets_all_max"] = max((r.get("redis_gets_all") for r in rs if r.get("redis_gets_all") is not None),
                                      default=None)
        s["gets_over_bound"] = [(r.get("redis_gets_all"), r.get("redis_gets_bound")) for r in rs
                                if r.get("redis_gets_bound") is not None and r.get("redis_gets_all") is not None
                                and r["redis_gets_all"] > r["redis_gets_bound"]]
        s["conns"] = median([r.get("conns") for r in rs])
        summary[(w, n)] = s
    return summary


def table(summary, rounds):
    lines = ["| workload | contender | req/s | p50 | p99 | p99.9 | proxy CPU µs/req | × direct | "
             "non-2xx (expected) | Redis GETs (bound) | rounds |", "|" + "---|" * 11]
    for (w, n), s in summary.items():
        if s["errors"] and not s["rounds"]:
            lines.append(f"| {w} | {n} | FAILED: {s['errors'][0][:120]} |" + " |" * 8 + f" 0/{rounds} |")
            continue
        d = summary.get((w, "direct"), {}).get("rps")
        ratio = f"{s['rps'] / d:.3f}" if d and s["rps"] else "-"
        cpu = f"{s['cpu_us_per_req']:.1f}" if s["cpu_us_per_req"] is not None and n != "direct" else "-"
        rps = f"{s['rps']:,.0f}" if s["rps"] else "-"
        non2xx = f"{s['non2xx']}" + (" (401s)" if "flood" in n else "") + (f" ({s['unexpected']} unexpected)"
                                                                             if s["unexpected"] else "")
        gets = "-"
        if s["redis_gets_all"] is not None and (n.startswith("keygate") or "redis" in n):
            gets = f"{s['redis_gets_all']:.0f}" + (f" (≤ {s['redis_gets_bound']:.0f})"
                                                   if s["redis_gets_bound"] is not None else "")
        lines.append(f"| {w} | {n} | {rps} | {fmt_us(s['p50'])} | {fmt_us(s['p99'])} | {fmt_us(s['p999'])} | "
                     f"{cpu} | {ratio} | {non2xx} | {gets} | {s['rounds']}/{rounds} |")
    return lines


def upload_table(summary):
    rows = [(n, s) for (w, n), s in summary.items() if w == "upload-1m" and s["rounds"]]
    if not rows:
        return []
    lines = ["| contender | connections | MiB/s | × direct | × haproxy-map | proxy CPU ms/MiB | p99 | "
             "proxy RSS idle → peak |", "|" + "---|" * 8]
    d = summary.get(("upload-1m", "direct"), {}).get("mib_s")
    h = summary.get(("upload-1m", "haproxy-map"), {}).get("mib_s")
    for n, s in rows:
        mib, cpu = s["mib_s"], s["cpu_ms_per_mib"]
        x_direct = f"{mib / d:.3f}" if d and mib else "-"
        x_hap = f"{mib / h:.3f}" if h and mib else "-"
        cpu = f"{cpu:.3f}" if cpu is not None and n != "direct" else "-"
        mib = f"{mib:,.0f}" if mib else "-"
        rss = f"{fmt_kib(s['rss_idle_kib'])} → {fmt_kib(s['rss_peak_kib'])}" if n != "direct" else "-"
        lines.append(f"| {n} | {s['conns']:.0f} | {mib} | {x_direct} | {x_hap} | {cpu} | {fmt_us(s['p99'])} | {rss} |")
    return lines


def targets(summary, upload_mem=None):
    g = lambda n, w="get-keepalive": summary.get((w, n), {})
    res = []

    def ratio(a, b, k="rps"):
        return a[k] / b[k] if a.get(k) and b.get(k) else None

    def line(label, value, ok):
        res.append(f"- {label}: {value} -> {'met' if ok else ('missed' if ok is not None else 'not measured')}")

    def at_least(label, r, bound):
        line(label, f"{r:.3f}" if r is not None else "-", r >= bound if r is not None else None)

    at_least("valid cached key >= 0.95 x keygate without auth (same requests, Bearer on a public route)",
             ratio(g("keygate-cached"), g("keygate-public-bearer")), 0.95)
    at_least("valid cached key >= 0.95 x keygate without auth (no Authorization header)",
             ratio(g("keygate-cached"), g("keygate-public")), 0.95)
    at_least("valid cached key >= 1.0 x nginx static map", ratio(g("keygate-cached"), g("nginx-map")), 1.0)
    c = g("keygate-cached").get("cpu_us_per_req")
    line("proxy CPU <= 12 µs/request (cached key, keep-alive)", f"{c} µs" if c is not None else "-",
         c <= 12 if c is not None else None)
    kc, dr = g("keygate-cached", "get-fixed-rate").get("p99"), g("direct", "get-fixed-rate").get("p99")
    added = kc - dr if kc is not None and dr is not None else None
    line("added p99 over direct at the fixed rate (cached key) <= 130 µs",
         f"{added:+.0f} µs ({fmt_us(kc)} vs {fmt_us(dr)})" if added is not None else "-",
         added <= 130 if added is not None else None)
    p = g("keygate-cold-100k", "get-fixed-rate").get("p99")
    line("cold cache p99 <= 1 ms (fixed rate, every request a miss)", fmt_us(p), p <= 1000 if p is not None else None)
    p = g("keygate-cold-100k").get("p99")
    line("cold cache p99 <= 1 ms (saturated, 64 connections: queueing included)", fmt_us(p),
         p <= 1000 if p is not None else None)
    at_least("cold cache >= 1.5 x nginx+Lua doing a Redis GET per request",
             ratio(g("keygate-cold-100k"), g("nginx-lua-redis-every")), 1.5)
    r = ratio(g("keygate-miss-every"), g("nginx-lua-redis-every"))
    res.append("- (no target) every request a miss (keygate-miss-every) / nginx+Lua doing a Redis GET per "
               f"request: {r:.3f}" if r is not None else "- (no target) keygate-miss-every: not measured")
    for w in ("get-keepalive", "get-fixed-rate"):
        s = g("keygate-cold-100k", w)
        if s.get("rounds"):
            bad = s["gets_over_bound"]
            line(f"cold cache: <= 1 Redis round trip per distinct key per TTL ({w}; GETs / distinct keys sent, "
                 f"median)", f"{s['redis_gets_all']:.0f} / {s['redis_gets_bound']:.0f}"
                 + (f"; over in {len(bad)} round(s): {bad}" if bad else ""), not bad)
        else:
            line(f"cold cache: <= 1 Redis round trip per distinct key per TTL ({w})", "-", None)
    for n in ("keygate-flood-malformed", "keygate-flood-unknown"):
        at_least(f"invalid-key flood >= 1.0 x valid-key throughput ({n} / keygate-cached)",
                 ratio(g(n), g("keygate-cached")), 1.0)
    s = g("keygate-flood-unknown")
    if s.get("rounds"):
        bad = s["gets_over_bound"]
        line(f"unknown keys: <= 1 Redis lookup per distinct key per negative TTL ({NEG_TTL_S} s; GETs over warm-up "
             f"+ run / (distinct keys x TTL periods), median)", f"{s['redis_gets_all']:.0f} / {s['redis_gets_bound']:.0f}"
             + (f"; over in {len(bad)} round(s): {bad}" if bad else ""), not bad)
    else:
        line("unknown keys: <= 1 Redis lookup per distinct key per negative TTL", "-", None)
    s = g("keygate-flood-malformed")
    gets, lk = s.get("redis_gets_all_max"), s.get("store_lookups_all")
    line("malformed keys never reach Redis (Redis GETs and store lookups over warm-up + run, worst round)",
         f"{gets} GETs, {lk or 0:.0f} store lookups" if gets is not None else "-",
         (gets == 0 and not lk) if gets is not None else None)
    u = lambda n: g(n, "upload-1m")
    for n in ("keygate-bearer", "keygate-form"):
        at_least(f"1 MiB uploads >= 1.0 x HAProxy's throughput ({n})", ratio(u(n), u("haproxy-map"), "mib_s"), 1.0)
    for n in ("keygate-bearer", "keygate-form"):
        c = u(n).get("cpu_ms_per_mib")
        line(f"1 MiB uploads <= 0.4 ms proxy CPU per MiB ({n})", f"{c:.3f} ms" if c is not None else "-",
             c <= 0.4 if c is not None else None)
    for n, v in (upload_mem or {}).items():
        if n.startswith("keygate") and v.get("growth_kib_per_upload") is not None:
            gpu = v["growth_kib_per_upload"]
            ref = (upload_mem or {}).get("haproxy-map", {}).get("growth_kib_per_upload")
            line(f"1 MiB uploads: memory flat as concurrency grows ({n}; peak RSS growth per added concurrent "
                 f"upload <= {FLAT_KIB_PER_UPLOAD} KiB = peek + one read)",
                 f"{gpu:+.0f} KiB/upload ({v['summary']}" + (f"; haproxy-map {ref:+.0f} KiB/upload)" if ref is not None
                                                            else ")"), gpu <= FLAT_KIB_PER_UPLOAD)
    return res


# ---------------------------------------------------------------- profile

def descendants(pid):
    out, todo = [], [pid]
    while todo:
        q = todo.pop()
        out.append(q)
        try:
            for t in os.listdir(f"/proc/{q}/task"):
                with open(f"/proc/{q}/task/{t}/children") as ch:
                    todo += [int(x) for x in ch.read().split()]
        except FileNotFoundError:
            pass
    return out


SYSCALLS = ["raw_syscalls:sys_enter", "syscalls:sys_enter_writev", "syscalls:sys_enter_write",
            "syscalls:sys_enter_sendto", "syscalls:sys_enter_recvfrom", "syscalls:sys_enter_read",
            "syscalls:sys_enter_epoll_wait", "syscalls:sys_enter_futex", "context-switches"]


def profile(workload, name, starter, a, hot, args):
    """Where the contender's CPU goes during one run: syscalls and context switches per request
    (perf stat), then a flat perf profile by DSO and symbol (perf record)."""
    keys = walk_keys() if a.get("order") == "walk" else []
    # A walk must not come round to keys already asked for: its runs get the shorter --cold-dur.
    dur = args.cold_dur if a.get("order") == "walk" else args.dur
    proxy = starter()
    try:
        time.sleep(0.3)
        keyfiles = [a.get("keyfile", "-")] * 2
        if a.get("order") == "walk":
            # Each run walks its own half, so that both see misses only; no warm-up.
            keyfiles = [os.path.join(RUN, f"walk-{i}.txt") for i in (0, 1)]
            for i, path in enumerate(keyfiles):
                with open(path, "w") as fh:
                    fh.writelines(k + "\n" for k in keys[i::2])
        # The same load as the measured runs; a cold fixed-rate run's two runs walk halves of the
        # cold keys, so that both see misses only.
        gens = [load_generator(proxy, a, hot, args, args.conns, COLD[i::2], keyfiles[i])[0] for i in (0, 1)]
        gen = lambda d, i=0: gens[i](d)
        if a.get("order") != "walk" and not a.get("cold"):
            gen(args.warm or 1)
        pids = ",".join(str(x) for x in descendants(proxy.proc.pid))
        stat_out = os.path.join(RUN, f"perfstat-{workload}-{name}.txt")
        st = subprocess.Popen(pin(1) + ["perf", "stat", "-x", ",", "-o", stat_out, "-e", ",".join(SYSCALLS),
                                        "-p", pids, "--", "sleep", str(dur)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            d0 = gen(dur)
        finally:
            st.wait(dur + 30)
        per_req = []
        if os.path.exists(stat_out) and d0.get("requests"):
            for line in open(stat_out):
                f = line.strip().split(",")
                if len(f) > 3 and f[0].replace(".", "").isdigit():
                    per_req.append(f"{f[2]}: {float(f[0]) / d0['requests']:.2f}/request")
        data = os.path.join(RUN, f"perf-{workload}-{name}.data")
        graph = ["--call-graph", "dwarf,16384", "-F", "499"] if args.perf_callers else ["-F", "1999"]
        rec = subprocess.Popen(pin(1) + ["perf", "record"] + graph + ["-p", pids, "-o", data,
                                         "--", "sleep", str(dur)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            d = gen(dur, 1)
        finally:
            rec.wait(dur + 30)
        reports = []
        for sort in ("dso", "dso,symbol"):
            r = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "--sort", sort,
                                "--percent-limit", "0.7"], capture_output=True, text=True, timeout=300)
            reports.append("\n".join(l.rstrip(" -") for l in r.stdout.splitlines() if l and not l.startswith("#")))
        text = (f"perf profile: {workload}/{name} ({d0.get('rps')} req/s under perf stat, "
                f"{d.get('rps')} under perf record)\n" + "\n".join(per_req) + "\n\n" + "\n\n".join(reports))
        if args.perf_callers:
            svg = flamegraph(data, f"{workload} / {name}: {d.get('rps')} req/s")
            if svg:
                text += f"\n\nflame graph: {svg}"
        with open(os.path.join(RUN, f"perf-{workload}-{name}.txt"), "w") as fh:
            fh.write(text)
        return text
    finally:
        stop(proxy.proc)


def flamegraph(data, title):
    """perf.data with call graphs -> an interactive SVG beside it (inferno: `cargo install
    inferno`), or None when inferno is not installed or perf script fails."""
    collapse, render = shutil.which("inferno-collapse-perf"), shutil.which("inferno-flamegraph")
    if not (collapse and render):
        log("    no flame graph: inferno-collapse-perf / inferno-flamegraph not on PATH (cargo install inferno)")
        return None
    svg = data[: -len(".data")] + ".svg"
    try:
        script = subprocess.run(["perf", "script", "-i", data], capture_output=True, timeout=600)
        folded = subprocess.run([collapse], input=script.stdout, capture_output=True, timeout=600)
        graph = subprocess.run([render, "--title", title, "--minwidth", "0.2"], input=folded.stdout,
                               capture_output=True, timeout=600)
    except subprocess.TimeoutExpired:
        log("    no flame graph: perf script / inferno timed out")
        return None
    if graph.returncode != 0 or not graph.stdout:
        log(f"    no flame graph: {(script.stderr or folded.stderr or graph.stderr).decode(errors='replace')[:200]}")
        return None
    with open(data[: -len(".data")] + ".folded", "wb") as fh:
        fh.write(folded.stdout)
    with open(svg, "wb") as fh:
        fh.write(graph.stdout)
    return svg


# ---------------------------------------------------------------- uploads: memory vs concurrency

def upload_mem_phase(args, hot, form_ok, only=()):
    """keygate's resident memory (peak, sampled every 50 ms) at a few concurrencies of 1 MiB
    uploads, each on a fresh process; HAProxy alongside for reference. Memory that grows by
    about the body size per added upload means bodies are buffered; flat means streamed."""
    levels = sorted(int(x) for x in args.upload_mem_conns.split(",") if x)
    out = {}
    for name, starter, a in contenders("upload-1m", form_ok):
        if name not in ("keygate-bearer", "keygate-form", "haproxy-map") or (only and name not in only):
            continue
        per = {}
        for c in levels:
            log(f"upload memory: {name} at {c} concurrent uploads …")
            try:
                d = measure("upload-1m", name, starter, a, hot, args, conns=c)
            except (ContenderError, AssertionError) as e:
                log(f"    FAILED: {e}")
                per[c] = {"error": str(e)}
                continue
            d.pop("raw", None)
            per[c] = {k: d.get(k) for k in ("mib_s", "cpu_ms_per_mib", "rss_idle_kib", "rss_peak_kib", "non2xx",
                                             "socket_errors", "requests")}
            log(f"    {per[c]}")
        ok = [c for c in levels if per.get(c, {}).get("rss_peak_kib")]
        v = {"levels": per}
        if len(ok) >= 2:
            lo, hi = ok[0], ok[-1]
            v["growth_kib_per_upload"] = round((per[hi]["rss_peak_kib"] - per[lo]["rss_peak_kib"]) / (hi - lo), 1)
            v["summary"] = ", ".join(f"{c}: {per[c]['rss_peak_kib'] / 1024:.1f} MiB" for c in ok)
        out[name] = v
    return out


def upload_mem_lines(um):
    lines = ["| contender | concurrent uploads | MiB/s | proxy CPU ms/MiB | RSS idle | RSS peak | "
             "growth per added upload |", "|" + "---|" * 7]
    for n, v in um.items():
        for c, r in v["levels"].items():
            if "error" in r:
                lines.append(f"| {n} | {c} | FAILED: {r['error'][:100]} | | | | |")
                continue
            lines.append(f"| {n} | {c} | {r['mib_s'] or 0:,.0f} | {r['cpu_ms_per_mib']} | "
                         f"{fmt_kib(r['rss_idle_kib'])} | {fmt_kib(r['rss_peak_kib'])} | |")
        if v.get("growth_kib_per_upload") is not None:
            lines.append(f"| {n} | | | | | | {v['growth_kib_per_upload']:+.0f} KiB |")
    return lines


# ---------------------------------------------------------------- memory

def redis_count(pattern):
    """Keys matching pattern (streamed: a million names are not held in memory)."""
    p = subprocess.Popen(["redis-cli", "-p", str(P["REDIS"]), "--scan", "--pattern", pattern],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        n = sum(1 for _ in p.stdout)
    finally:
        p.stdout.close()
        p.wait(600)
    if p.returncode != 0:
        raise SystemExit(f"redis-cli --scan failed: {p.stderr.read().decode()[-500:]}")
    return n


def memory_phase(args, cold):
    """RSS with --mem-keys keys in Redis (1 000 000) and --mem-cached of them (100 000) cached;
    bytes per cached key."""
    extra = max(0, args.mem_keys - HOT_KEYS - COLD_KEYS - len(WALK))
    extra_keys = load_keys(extra, f"{RUN}/extra.txt", team="bench-mem") if extra else []
    cached = min(args.mem_cached, args.mem_keys, 200_000)  # keygate.toml max_entries = 200 000: no eviction
    pool = cold + extra_keys
    if cached > len(pool):
        raise SystemExit(f"--mem-cached {cached}: only {len(pool)} keys loaded")
    with open(f"{RUN}/mem-cached.txt", "w") as fh:
        fh.writelines(k + "\n" for k in pool[:cached])
    nkeys = redis_count("kg:h:*")
    res = {"keys_in_redis": nkeys, "keys_to_cache": cached}
    # Usage counting on (the default), with every key looked up counted and not yet flushed: the
    # most a usage map holds (with the default 10 s interval the sample fell before, during or
    # after a flush from run to run: 872 and 1 089 bytes per key for the same build). Then with
    # usage counting off.
    for label, env in (("default", {"KEYGATE__USAGE__FLUSH_INTERVAL": "1h"}),
                       ("usage_off", {"KEYGATE__USAGE__ENABLED": "false"})):
        res[label] = memory_once(args, env, cached)
    return res


def peak_rss_until_exit(p, timeout=120):
    """Stops p (SIGTERM) and returns its peak RSS until it exits, sampled every 10 ms."""
    peak = rss_kib(p.pid) or 0
    p.send_signal(signal.SIGTERM)
    deadline = time.time() + timeout
    while p.poll() is None and time.time() < deadline:
        peak = max(peak, rss_kib(p.pid) or 0)
        time.sleep(0.01)
    return peak


def memory_once(args, env, cached):
    proxy = start_keygate("warn", env)
    try:
        time.sleep(0.5)
        # Baseline: the process warmed by a public-route load (connections, buffers, pools).
        wrk(proxy.port, 3, args.conns, "-", "random", "/public/x")
        time.sleep(0.5)
        base = rss_kib(proxy.proc.pid)
        m0 = keygate_metrics()
        # The keys, each once (shuffled walk), until each has been looked up.
        lookups = lambda m: m.get("keygate_auth_store_lookups_total", 0) - m0.get("keygate_auth_store_lookups_total", 0)
        deadline = time.time() + 300
        while time.time() < deadline:
            wrk(proxy.port, 5, args.conns, f"{RUN}/mem-cached.txt", "walk", "/v1/x")
            if lookups(keygate_metrics()) >= cached:
                break
        time.sleep(1)
        m1 = keygate_metrics()
        after = rss_kib(proxy.proc.pid)
        # Each lookup cached one distinct key (max_entries is above --mem-cached: no eviction);
        # the cache's own entry count (moka's, updated lazily) is reported next to it.
        entries = lookups(m1)
        res = {"rss_base_kib": base, "rss_cached_kib": after, "store_lookups": entries,
               "cache_entries_gauge": m1.get("keygate_auth_cache_entries", 0),
               "bytes_per_cached_key": round((after - base) * 1024 / entries) if entries else None}
        if env.get("KEYGATE__USAGE__ENABLED") != "false":
            # Shutting down flushes what was counted: the peak RSS through it is what a flush of
            # every key at once costs on top.
            res["rss_flush_peak_kib"] = peak_rss_until_exit(proxy.proc)
        log(f"    memory ({env or 'default'}): {res}")
        return res
    finally:
        stop(proxy.proc)


# ---------------------------------------------------------------- main

def main():
    global RUN, UPSTREAM, TWO_CORES, PROXY_CORES
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dur", type=int, default=10, help="seconds measured per contender")
    ap.add_argument("--cold-dur", type=int, default=4, help="seconds for the cold-cache contender")
    ap.add_argument("--warm", type=int, default=2, help="warm-up seconds before each measurement")
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--proxy-cores", type=int, default=1, metavar="N",
                    help="cores (and workers) for the proxy under test; the load generators get N threads and "
                         "the upstream N workers, on the cores after the proxy's (default 1: the reference layout)")
    ap.add_argument("--rate", type=int, default=5000, help="requests/s for the get-fixed-rate workload")
    ap.add_argument("--upload-conns", type=int, default=16, help="connections for the upload-1m workload")
    ap.add_argument("--upload-mem-conns", default="8,64",
                    help="concurrent uploads for upload-1m's memory-vs-concurrency check ('' to skip)")
    ap.add_argument("--only", default=",".join(WORKLOADS), help="workloads, comma-separated: " + ", ".join(WORKLOADS))
    ap.add_argument("--contenders", default="", help="only these contenders (comma-separated), default all")
    ap.add_argument("--skip-mem", action="store_true", help="skip the memory phase")
    ap.add_argument("--wait-quiet", type=int, default=0, metavar="S",
                    help="first wait up to S seconds (polling every 30 s) for a 1-minute load average below 0.7")
    ap.add_argument("--mem-keys", type=int, default=1_000_000, help="keys in Redis for the memory phase")
    ap.add_argument("--mem-cached", type=int, default=100_000,
                    help="keys cached for the memory phase (at most --mem-keys and 200 000)")
    ap.add_argument("--out", default="", help="directory for logs and results (default /tmp/keygate-bench-DATE)")
    ap.add_argument("--perf-callers", action="store_true",
                    help="with --perf: record call graphs (DWARF) too, and draw them as a flame graph "
                         "OUT/perf-W-C.svg (with its folded stacks, .folded) when inferno is installed "
                         "(cargo install inferno); or read them with "
                         "`perf report -i OUT/perf-W-C.data --no-children -S SYMBOL -G`")
    ap.add_argument("--perf", default="", help="after the rounds, profile these WORKLOAD/CONTENDER pairs "
                    "(comma-separated) with perf record, e.g. get-keepalive/keygate-cached")
    args = ap.parse_args()
    unknown = [w for w in args.only.split(",") if w and w not in WORKLOADS]
    if unknown:
        ap.error(f"unknown workload(s) {unknown}; known: {', '.join(WORKLOADS)}")

    RUN = os.path.abspath(args.out or f"/tmp/keygate-bench-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(RUN, exist_ok=True)
    TWO_CORES = (os.cpu_count() or 1) >= 2
    PROXY_CORES = args.proxy_cores
    ncpu = len(os.sched_getaffinity(0))
    if PROXY_CORES < 1 or (PROXY_CORES > 1 and ncpu < 2 * PROXY_CORES + 1):
        ap.error(f"--proxy-cores {PROXY_CORES} needs at least {2 * PROXY_CORES + 1} cores "
                 f"(the proxy's, as many for load and upstream, one for Redis); this machine has {ncpu}")
    if PROXY_CORES > 1:
        CPUSETS[0], CPUSETS[1] = f"0-{PROXY_CORES - 1}", f"{PROXY_CORES}-{ncpu - 1}"
    with open(os.path.join(HERE, "wrk", "keys.lua")) as src, open(os.path.join(RUN, "wrk-run.lua"), "w") as dst:
        dst.write(src.read())
    for b in (KG, LOADER):
        if not os.access(b, os.X_OK):
            raise SystemExit(f"missing {b}: run benches/load/run.sh (it builds them)")
    for tool in ("nginx", "haproxy", "wrk", "h2load", "redis-server", "redis-cli", "taskset"):
        if not any(os.access(os.path.join(d, tool), os.X_OK) for d in os.environ.get("PATH", "").split(":")):
            raise SystemExit(f"missing {tool}: run benches/load/run.sh (it installs the packages)")
    busy = [port for port in set(P.values()) if wait_port(port, 0.01)]
    if busy:
        raise SystemExit(f"ports already in use on 127.0.0.1: {sorted(busy)} (a previous run still going?)")

    def on_signal(sig, frame):
        raise SystemExit(f"signal {sig}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    if args.wait_quiet:
        t_end = time.time() + args.wait_quiet
        while True:
            load1 = float(open("/proc/loadavg").read().split()[0])
            if load1 < 0.7 or time.time() >= t_end:
                break
            log(f"waiting for a quiet machine: load {load1}")
            time.sleep(30)
        print(f"load average when starting: {open('/proc/loadavg').read().strip()} "
              f"({'quiet' if load1 < 0.7 else 'NOT quiet: waited ' + str(args.wait_quiet) + ' s'})")
    load_start = open('/proc/loadavg').read().strip()
    log(f"run dir {RUN}; loadavg {load_start}")
    failed = False
    try:
        UPSTREAM = start(["nginx", "-p", RUN, "-e", f"{RUN}/up.err", "-c", render("upstream-nginx.conf"),
                          "-g", "daemon off;"], 1, logname="upstream.log")
        redis = start(["redis-server", render("redis.conf")], 1, logname="redis.log")
        if not (wait_port(P["UP"]) and wait_port(P["REDIS"])):
            raise SystemExit(f"upstream or redis did not start; see {RUN}/upstream.log, {RUN}/redis.log")
        hot, cold = prepare_keys()
        COLD[:] = cold
        with open(f"{RUN}/upload-keys.txt", "w") as fh:
            fh.writelines(k + "\n" for k in hot[:4])

        # Is the `form` source accepted by this tree's configuration check?
        kcfg = render("keygate.toml", dict(PORT=P["KG"], ADMIN=P["KG_ADMIN"], LOG_LEVEL="warn"))
        chk = subprocess.run([KG, "check-config", kcfg], capture_output=True, text=True, timeout=30)
        form_ok = chk.returncode == 0
        if not form_ok:
            log("SKIPPED keygate-form (post-multipart-4k, upload-1m): `keygate check-config` refuses the config:\n"
                + chk.stdout + chk.stderr)

        workloads = [w for w in args.only.split(",") if w]
        only = set(x for x in args.contenders.split(",") if x)
        results = {}
        for rnd in range(args.rounds):
            for w in workloads:
                for name, starter, a in contenders(w, form_ok):
                    if only and name not in only:
                        continue
                    log(f"round {rnd + 1}/{args.rounds} {w} {name} … (loadavg {open('/proc/loadavg').read().split()[0]})")
                    try:
                        d = measure(w, name, starter, a, hot, args)
                    except (ContenderError, AssertionError) as e:
                        log(f"    FAILED: {e}")
                        results.setdefault((w, name), []).append({"error": str(e)})
                        failed = True
                        continue
                    raw = d.pop("raw", "")
                    with open(os.path.join(RUN, f"raw-{rnd}-{w}-{name}.txt"), "w") as fh:
                        fh.write(raw)
                    results.setdefault((w, name), []).append(d)
                    extra = (f" MiB/s={d.get('mib_s')} ms/MiB={d.get('cpu_ms_per_mib')} rss_peak={d.get('rss_peak_kib')}"
                             if a.get("upload") else "")
                    if a.get("fixed"):
                        extra += f" p999_with_start={d.get('p999_with_start')} (left out {d.get('settle_left_out')})"
                    log(f"    rps={d.get('rps')} p50={d.get('p50')} p99={d.get('p99')} p999={d.get('p999')} "
                        f"cpu/req={d.get('cpu_us_per_req')} util={d.get('cpu_util')} non2xx={d.get('non2xx')} "
                        f"redis_gets={d.get('redis_gets')} (all {d.get('redis_gets_all')}, bound "
                        f"{d.get('redis_gets_bound')}) miss={d.get('miss_fraction')} "
                        f"opens/req={d.get('tcp_opens_per_req')} err={d.get('socket_errors')}{extra}")
        upload_mem = None
        if "upload-1m" in workloads and args.upload_mem_conns and (not only or only & {"keygate-bearer", "keygate-form"}):
            upload_mem = upload_mem_phase(args, hot, form_ok, only)

        summary = summarize(results)
        out(f"\n## Load results: medians of {args.rounds} interleaved round(s), {args.dur} s each "
            f"(cold cache {args.cold_dur} s, warm-up {args.warm} s), {args.conns} connections "
            f"({args.upload_conns} for upload-1m), {time.strftime('%Y-%m-%d %H:%M %Z')}\n")
        out(f"Layout: proxy on cores {CPUSETS[0]} with {PROXY_CORES} worker(s); load generators "
            f"({PROXY_CORES} thread(s)), upstream ({PROXY_CORES} worker(s)), Redis on cores {CPUSETS[1]}; "
            f"{os.cpu_count()} cores, {cpu_model()}\n")
        out(f"keygate: {KG}; load average at the start {load_start}, at the end "
            f"{open('/proc/loadavg').read().strip()}\n")
        for line in table(summary, args.rounds):
            out(line)
        up_lines = upload_table(summary)
        if up_lines:
            out(f"\n1 MiB uploads ({UPLOAD_BYTES} bytes per request, multipart; MiB/s = req/s x 1 MiB):\n")
            for line in up_lines:
                out(line)
        if upload_mem:
            out(f"\n1 MiB uploads, memory vs concurrency (fresh process per level; peak RSS sampled every 50 ms):\n")
            for line in upload_mem_lines(upload_mem):
                out(line)
        if KG_B:
            out(f"\nA/B: {KG_B} (@B) against {KG}, ratios B/A paired by round (median, min–max):\n")
            for line in ab_lines(results):
                out(line)
        out("\nTargets (load):")
        for t in targets(summary, upload_mem):
            out(t)
        for w, n in (("get-keepalive", "keygate-cold-100k"), ("get-keepalive", "keygate-miss-every"),
                     ("get-fixed-rate", "keygate-cold-100k")):
            cold_s = summary.get((w, n))
            if cold_s and cold_s["rounds"]:
                out(f"\n{n} ({w}): fraction of requests that went to Redis (median): "
                    f"{cold_s.get('miss_fraction')}")
        li, lw = summary.get(("get-keepalive", "keygate-cached-loginfo")), summary.get(("get-keepalive", "keygate-cached"))
        if li and lw and li.get("rps") and lw.get("rps"):
            out(f"access log at info: {li['rps'] / lw['rps']:.3f} x the throughput at warn; "
                f"CPU {li.get('cpu_us_per_req')} vs {lw.get('cpu_us_per_req')} µs/req")
        for (w, n), s in summary.items():
            if s["errors"]:
                out(f"FAILED {w}/{n} in {len(s['errors'])} round(s): {s['errors'][0]}")
            if s["unexpected"]:
                out(f"WARNING {w}/{n}: {s['unexpected']} answers with an unexpected status")
            if s["gets_over_bound"] and n.removesuffix("@B") not in ("keygate-cold-100k", "keygate-miss-every", "keygate-flood-unknown"):
                out(f"WARNING {w}/{n}: more Redis GETs than distinct keys per TTL: {s['gets_over_bound']}")
            if s["socket_errors"]:
                out(f"note {w}/{n}: socket errors: {s['socket_errors']}")
            o = s.get("tcp_opens_per_req")
            if o is not None and w == "get-newconn" and o < 0.9:
                out(f"WARNING {w}/{n}: only {o} connections accepted per request (expected >= 1)")
            if o is not None and w in ("get-keepalive", "upload-1m", "post-multipart-4k") and o > 0.05:
                out(f"WARNING {w}/{n}: {o} connections accepted per request on a keep-alive workload")
        for pair in [x for x in args.perf.split(",") if x]:
            w, _, n = pair.partition("/")
            found = [c for c in contenders(w, form_ok) if c[0] == n]
            if not found or found[0][1] is None:
                log(f"--perf: no contender {pair}")
                continue
            log(f"profiling {pair} …")
            out("\n" + profile(w, n, found[0][1], found[0][2], hot, args))
        mem = None
        if not args.skip_mem:
            log("memory phase …")
            mem = memory_phase(args, cold)
            out(f"\nMemory ({mem['keys_in_redis']} keys in Redis, {mem['keys_to_cache']} looked up once each):\n")
            out("| usage counting | RSS before | RSS with the keys cached | keys cached (cache gauge) | bytes per cached key | RSS peak flushing their usage (shutdown) |")
            out("|---|---|---|---|---|---|")
            for label in ("default", "usage_off"):
                m = mem[label]
                out(f"| {'on (default), not yet flushed' if label == 'default' else 'off'} | {fmt_kib(m['rss_base_kib'])} | "
                    f"{fmt_kib(m['rss_cached_kib'])} | {m['store_lookups']:.0f} ({m['cache_entries_gauge']:.0f}) | "
                    f"{m['bytes_per_cached_key']} | "
                    f"{fmt_kib(m['rss_flush_peak_kib']) if m.get('rss_flush_peak_kib') else '-'} |")
            for label, name in (("default", "usage counting on, the default"), ("usage_off", "usage counting off")):
                b = mem[label].get("bytes_per_cached_key")
                out(f"- cached key <= 1 KiB of resident memory ({name}): {b} bytes -> "
                    f"{'met' if b is not None and b <= 1024 else 'missed'}")
        with open(os.path.join(RUN, "results.json"), "w") as fh:
            json.dump({"args": vars(args), "keygate": KG, "loadavg_start": load_start,
                       "results": {f"{w}|{n}": rs for (w, n), rs in results.items()},
                       "summary": {f"{w}|{n}": s for (w, n), s in summary.items()},
                       "upload_memory": upload_mem, "memory": mem}, fh, indent=1)
        with open(os.path.join(RUN, "results.md"), "w") as fh:
            fh.write("\n".join(REPORT).lstrip("\n") + "\n")
        print(f"\nresults.md, results.json and raw output in {RUN}")
    finally:
        stop_all()
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
