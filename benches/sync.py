#!/usr/bin/env python3
"""benches/sync.py [N ...] -- `encryptd sync` against a real etcd holding N registrations
(default: 1000 and 10000). A benchmark, not a test: it prints a Markdown table
(docs/benchmarks.md, "The inventory from etcd").

    cargo build --release && python3 benches/sync.py 1000 10000

No kernel datapath is involved (the sync never touches XFRM, WireGuard or nftables), so
it runs on the host: one etcd member (Debian's etcd-server 3.4, as tests/vm/setup.sh
extracts it into $VM_CACHE/etcd) and the sync, both in a network namespace of its own on
its loopback, plaintext HTTP (the TLS handshake is paid once per connection, not per
change). For each N:
  1. N-1 registrations are written through the JSON gateway (not timed);
  2. the sync of node n0 starts: time until nodes.toml lists all N (one range of the
     prefix, N validations, the render, the whole-file validation, rename-over);
  3. CHANGES times: a new node registers, then is deleted; time from etcd's answer to
     the put (or delete) until the file has (or no longer has) it, polled every 1 ms;
  4. the sync's CPU (utime + stime) per change, its peak and final RSS (VmHWM, VmRSS).
Every wait has a deadline; a missed one is a failure with the sync's log.
Needs: root (ip netns), python3, iproute2, the release binary.
Env: ENCRYPTD_BIN, VM_CACHE (~/.cache/encryptd-kernel-vm), CHANGES (20).
"""
import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("ENCRYPTD_BIN", os.path.join(ROOT, "target/release/encryptd"))
CACHE = os.environ.get("VM_CACHE", os.path.expanduser("~/.cache/encryptd-kernel-vm"))
ETCD = os.path.join(CACHE, "etcd/usr/bin/etcd")
NS = "encryptd-bsync"
WORK = "/tmp/encryptd-bsync"
PREFIX = "/encryptd/bench"
CHANGES = int(os.environ.get("CHANGES", "20"))
TICKS = os.sysconf("SC_CLK_TCK")


def die(msg):
    print(f"sync.py: error: {msg}", file=sys.stderr)
    sys.exit(1)


def sh(*args):
    subprocess.run(args, check=True, timeout=30)


def wait(what, pred, deadline_s, log=None):
    t_end = time.monotonic() + deadline_s
    while time.monotonic() < t_end:
        v = pred()
        if v:
            return v
        time.sleep(0.001)
    tail = ""
    if log and os.path.exists(log):
        tail = "\n".join(open(log, errors="replace").read().splitlines()[-20:])
    die(f"{what}: not within {deadline_s} s\n{tail}")


def b64(s):
    return base64.b64encode(s.encode()).decode()


def gateway(path, body):
    req = urllib.request.Request(
        f"http://127.0.0.1:2379{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def registration(i):
    a = 0x64400000 + i + 1  # 100.64.0.0/10
    addr = f"{a >> 24}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}"
    return {
        "name": f"n{i}",
        "addresses": [addr, f"fd77::{i + 1:x}"],
        "subnets": [f"10.{i >> 8}.{i & 255}.0/24"],
    }


def put(i):
    r = registration(i)
    gateway("/v3/kv/put", {"key": b64(f"{PREFIX}/nodes/n{i}"), "value": b64(json.dumps(r))})


def delete(i):
    gateway("/v3/kv/deleterange", {"key": b64(f"{PREFIX}/nodes/n{i}")})


def listed(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def proc_stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICKS
    mem = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS"):
                mem[k] = int(v.split()[0]) / 1024
    return cpu, mem


def pct(v, p):
    s = sorted(v)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def run(n):
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    elog = os.path.join(WORK, "etcd.log")
    etcd = subprocess.Popen(
        [ETCD, "--name=b0", f"--data-dir={WORK}/etcd.data",
         "--listen-client-urls=http://127.0.0.1:2379",
         "--advertise-client-urls=http://127.0.0.1:2379",
         "--listen-peer-urls=http://127.0.0.1:2380",
         "--initial-advertise-peer-urls=http://127.0.0.1:2380",
         "--initial-cluster=b0=http://127.0.0.1:2380",
         # 10,000 registrations and their history are far below the default quota.
         "--quota-backend-bytes=1073741824"],
        stdin=subprocess.DEVNULL, stdout=open(elog, "w"), stderr=subprocess.STDOUT)
    sync = None
    try:
        def healthy():
            try:
                gateway("/v3/kv/range", {"key": b64("/")})
                return True
            except OSError:
                return False
        wait("etcd healthy", healthy, 30, elog)
        t0 = time.monotonic()
        for i in range(1, n):
            put(i)
        load_s = time.monotonic() - t0

        cfg = os.path.join(WORK, "encryptd.toml")
        inv = os.path.join(WORK, "nodes.toml")
        r0 = registration(0)
        with open(cfg, "w") as f:
            f.write(
                'mode = "ipsec"\nnode = "n0"\nruntime_dir = "run"\nstate_dir = "state"\n'
                f'\n[sync]\nendpoints = ["http://127.0.0.1:2379"]\nplaintext = true\n'
                f'prefix = "{PREFIX}"\naddresses = {json.dumps(r0["addresses"])}\n'
                f'subnets = {json.dumps(r0["subnets"])}\n')
        slog = os.path.join(WORK, "sync.log")
        t0 = time.monotonic()
        sync = subprocess.Popen([BIN, "sync", "--config", cfg], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=open(slog, "w"))
        wait(f"nodes.toml with {n} nodes", lambda: listed(inv).count("[[node]]") == n,
             120, slog)
        first_s = time.monotonic() - t0
        cpu0, _ = proc_stat(sync.pid)
        add, rm = [], []
        for k in range(CHANGES):
            j = n + k
            t = time.monotonic()
            put(j)
            wait(f"n{j} in nodes.toml", lambda: f'"n{j}"' in listed(inv), 30, slog)
            add.append((time.monotonic() - t) * 1000)
            t = time.monotonic()
            delete(j)
            wait(f"n{j} gone from nodes.toml", lambda: f'"n{j}"' not in listed(inv), 30, slog)
            rm.append((time.monotonic() - t) * 1000)
        cpu1, mem = proc_stat(sync.pid)
        size = os.path.getsize(inv)
        return {
            "n": n, "load_s": load_s, "first_s": first_s, "add": add, "rm": rm,
            "cpu_ms": (cpu1 - cpu0) * 1000 / (2 * CHANGES), "hwm": mem["VmHWM"],
            "rss": mem["VmRSS"], "size": size,
        }
    finally:
        for p in (sync, etcd):
            if p:
                p.kill()
                p.wait(timeout=10)


def main():
    if os.geteuid() != 0:
        die("run as root (a network namespace of its own)")
    for p in (BIN, ETCD):
        if not os.access(p, os.X_OK):
            die(f"{p} missing (cargo build --release; tests/vm/setup.sh extracts etcd)")
    sizes = [int(a) for a in sys.argv[1:]] or [1000, 10000]
    if os.environ.get("ENCRYPTD_BSYNC_IN_NS") != "1":
        # Re-run inside a namespace of its own: etcd, the sync and the gateway calls
        # all live on its loopback; nothing outside it is reachable.
        subprocess.run(["ip", "netns", "del", NS], stderr=subprocess.DEVNULL, timeout=30)
        sh("ip", "netns", "add", NS)
        try:
            rc = subprocess.run(
                ["ip", "netns", "exec", NS, sys.executable, os.path.abspath(__file__)]
                + [str(n) for n in sizes],
                env={**os.environ, "ENCRYPTD_BSYNC_IN_NS": "1"}, timeout=3600).returncode
        finally:
            subprocess.run(["ip", "netns", "del", NS], timeout=30)
        sys.exit(rc)
    sh("ip", "link", "set", "lo", "up")
    try:
        rows = [run(n) for n in sizes]
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    print(f"\n{CHANGES} changes each way per size; times from etcd's answer to the file.\n")
    print("| registrations | nodes.toml | start → file | add → file, median / p95 / max "
          "| delete → file, median / p95 / max | sync CPU per change | RSS peak / end |")
    print("|---:|---:|---:|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['n']:,} | {r['size'] / 1024:,.0f} KiB | {r['first_s'] * 1000:,.0f} ms "
              f"| {pct(r['add'], 50):.1f} / {pct(r['add'], 95):.1f} / {max(r['add']):.1f} ms "
              f"| {pct(r['rm'], 50):.1f} / {pct(r['rm'], 95):.1f} / {max(r['rm']):.1f} ms "
              f"| {r['cpu_ms']:.1f} ms | {r['hwm']:.1f} / {r['rss']:.1f} MiB |")
    print("\n(loading the registrations through the gateway, not part of the figures: "
          + ", ".join(f"{r['n']:,} in {r['load_s']:.1f} s" for r in rows) + ")")


if __name__ == "__main__":
    main()
