#!/usr/bin/env python3
"""benches/fleet.py [N] -- a fleet of N real `encryptd run` daemons (default 50), one
network namespace each on one bridge, full IPsec mesh over IPv4 and IPv6, in the
project's VM (Debian's stock kernel, tests/vm/vmrun.sh; TCG here). A benchmark, not a
test: it prints a Markdown table (docs/benchmarks.md, "A fleet of real daemons").

    cargo build --release && python3 benches/fleet.py 50

What it measures, in order:
  1. N-1 daemons started at once: time until every one is READY with every peer up
     (their status.json snapshots, which a daemon rewrites when its STATUS= changes);
  2. two idle minutes (longer than a keepalive): CPU (utime + stime) and RSS of every
     daemon, hello datagrams on the wire per node and second;
  3. a key rotation on every node (key-id 2 appended, rename-over) under 10 ms pings
     between sampled pairs: time until every pair sends with key 2 only, pings lost;
  4. node N joins (every inventory rewritten, its daemon started): time until every
     node has it up and a ping to it passes;
  5. node 1 rebooted (daemon killed, its XFRM state flushed, a new boot ID, started):
     time until it and all its peers have the pair up again.
Every wait has a deadline; a deadline missed is reported in the table as "timeout".
Needs: root, python3, iproute2, tcpdump, the release binary (target/release/encryptd).
Env: VM_MEM (default here 3072), VM_TIMEOUT (default 3000), FLEET_READY_SECS (900: the
deadline of step 1; the later steps are skipped when it passes).
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("ENCRYPTD_BIN", os.path.join(ROOT, "target/release/encryptd"))
WORK = "/tmp/encryptd-fleet"
WIRE = "fb-wire"
# Longer than a keepalive (100 s), so that the window holds each pair's.
IDLE = 120


def sh(cmd, check=True, timeout=60):
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{cmd}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def ns(i):
    return f"fb-{i}"


def v4(i):
    return f"10.80.{i // 250}.{i % 250 + 1}"


def v6(i):
    return f"fd80::{i:x}"


def key_line(kid):
    return f"{kid}+ rfc4106(gcm(aes)) {os.urandom(20).hex()} 128\n"


def write(path, text, mode=0o644):
    tmp = path + ".new"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.rename(tmp, path)  # rename-over, as Ansible writes


def boot_id(n):
    return f"{n:08x}-0000-4000-8000-000000000000\n"


class Stop(Exception):
    """The fleet did not come up: the later steps would measure nothing."""


class Fleet:
    def __init__(self, n):
        self.n = n
        self.procs = {}
        self.keys = key_line(1)
        shutil.rmtree(WORK, ignore_errors=True)
        os.makedirs(WORK)
        sh(f"ip netns add {WIRE} && ip -n {WIRE} link add br0 type bridge && ip -n {WIRE} link set br0 up")
        for i in range(1, n + 1):
            sh(
                f"ip netns add {ns(i)} && ip -n {ns(i)} link set lo up && "
                f"ip link add e{i} netns {ns(i)} type veth peer name p{i} netns {WIRE} && "
                f"ip -n {WIRE} link set p{i} master br0 up && "
                f"ip -n {ns(i)} addr add {v4(i)}/16 dev e{i} && "
                f"ip -n {ns(i)} addr add {v6(i)}/64 dev e{i} nodad && ip -n {ns(i)} link set e{i} up"
            )
            d = self.dir(i)
            os.makedirs(d)
            write(
                f"{d}/encryptd.toml",
                f'mode = "ipsec"\nnode = "n{i}"\nruntime_dir = "run"\nstate_dir = "state"\n'
                f'boot_id_path = "boot_id"\n\n[ipsec]\nkey_rotation_duration = "10s"\n',
            )
            write(f"{d}/ipsec.keys", self.keys, 0o600)
            write(f"{d}/boot_id", boot_id(1000 + i))

    def dir(self, i):
        return f"{WORK}/n{i}"

    def inventory(self, members):
        text = "".join(
            f'[[node]]\nname = "n{i}"\naddresses = ["{v4(i)}", "{v6(i)}"]\n\n' for i in members
        )
        for i in range(1, self.n + 1):
            write(f"{self.dir(i)}/nodes.toml", text)

    def start(self, i):
        log = open(f"{self.dir(i)}/log", "a")
        self.procs[i] = subprocess.Popen(
            ["ip", "netns", "exec", ns(i), BIN, "run", "--config", f"{self.dir(i)}/encryptd.toml"],
            stdout=log,
            stderr=log,
        )

    def kill(self, i):
        p = self.procs.pop(i)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)

    def snapshot(self, i):
        try:
            with open(f"{self.dir(i)}/run/status.json") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def pid(self, i):
        # `ip netns exec` execs the daemon: same process.
        return self.procs[i].pid

    def stop_all(self):
        for i in list(self.procs):
            self.procs[i].send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs.clear()


def wait(what, deadline_s, cond, every=0.2):
    """Seconds until cond() holds, or None past the deadline."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        if cond():
            return time.monotonic() - t0
        time.sleep(every)
    print(f"fleet bench: timeout waiting for {what}", file=sys.stderr)
    return None


def pairs_up(f, members):
    """Directed pairs (i sees j up) of members, out of len * (len - 1)."""
    n = 0
    for i in members:
        s = f.snapshot(i) or {}
        n += sum(1 for p in s.get("peers", []) if p["state"] == "up" and int(p["name"][1:]) in members)
    return n


def all_up(f, members, key=None):
    for i in members:
        s = f.snapshot(i)
        if not s:
            return False
        peers = {p["name"]: p for p in s.get("peers", [])}
        for j in members:
            if j == i:
                continue
            p = peers.get(f"n{j}")
            if not p or p["state"] != "up":
                return False
            if key is not None and p.get("key_ids") != [key]:
                return False
    return True


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as fh:
        m = re.search(r"VmRSS:\s+(\d+)", fh.read())
    return int(m.group(1)) if m else 0


class Pings:
    def __init__(self, pairs, count):
        self.procs = [
            subprocess.Popen(
                ["ip", "netns", "exec", ns(a), "ping", "-n", "-q", "-i", "0.01", "-c", str(count), "-W", "1", v4(b)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for a, b in pairs
        ]

    def finish(self):
        sent = got = 0
        for p in self.procs:
            out, _ = p.communicate(timeout=120)
            m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
            if m:
                sent += int(m.group(1))
                got += int(m.group(2))
        return sent, got


def fmt(t):
    return "timeout" if t is None else f"{t:.1f} s"


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    if not os.environ.get("ENCRYPTD_VM"):
        env = dict(os.environ)
        env.setdefault("VM_MEM", "3072")
        env.setdefault("VM_TIMEOUT", "3000")
        env["VM_ENV"] = (env.get("VM_ENV", "") + " ENCRYPTD_BIN FLEET_READY_SECS").strip()
        env["ENCRYPTD_BIN"] = BIN
        os.execvpe(
            os.path.join(ROOT, "tests/vm/vmrun.sh"),
            ["vmrun.sh", "python3", os.path.abspath(__file__), str(n)],
            env,
        )
    if not os.access(BIN, os.X_OK):
        sys.exit(f"fleet bench: no binary at {BIN} (cargo build --release)")
    # The first SAs of a boot load the ESP and gcm modules and run the crypto self-tests.
    sh("modprobe esp4; modprobe esp6; modprobe xfrm_user", check=False)
    rows = []
    f = Fleet(n)
    try:
        first = list(range(1, n))
        f.inventory(first)
        t0 = time.monotonic()
        for i in first:
            f.start(i)
        last = [0, time.monotonic()]

        def ready():
            up = pairs_up(f, first)
            if time.monotonic() - last[1] > 30:
                print(f"fleet bench: {up} of {len(first) * (len(first) - 1)} pairs up after {time.monotonic() - t0:.0f} s", file=sys.stderr)
                last[1] = time.monotonic()
            return all_up(f, first)

        deadline = int(os.environ.get("FLEET_READY_SECS", "900"))
        t_ready = wait("every daemon READY with every peer up", deadline, ready, every=1)
        rows.append((f"{n - 1} daemons started: every one READY, every pair up (IPv4 and IPv6)", fmt(t_ready)))
        if t_ready is None:
            rows.append(("pairs up at the deadline", f"{pairs_up(f, first)} of {len(first) * (len(first) - 1)}"))
            raise Stop()

        # Idle minutes.
        time.sleep(10)
        cap = subprocess.Popen(
            ["ip", "netns", "exec", WIRE, "tcpdump", "-n", "-q", "-l", "-i", "br0", "udp port 4510"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        hz = os.sysconf("SC_CLK_TCK")
        c0 = {i: cpu_ticks(f.pid(i)) for i in first}
        time.sleep(IDLE)
        c1 = {i: cpu_ticks(f.pid(i)) for i in first}
        cap.send_signal(signal.SIGINT)
        out, _ = cap.communicate(timeout=30)
        hellos = sum(1 for line in out.splitlines() if ".4510" in line)
        cpu = sorted((c1[i] - c0[i]) * 1000 * 60 // (hz * IDLE) for i in first)
        rss = sorted(rss_kib(f.pid(i)) for i in first)
        rows.append((f"idle, over {IDLE} s: CPU per daemon and minute, median / max", f"{cpu[len(cpu) // 2]} / {cpu[-1]} ms"))
        rows.append((f"idle, over {IDLE} s: hello datagrams per node and second (out)", f"{hellos / (len(first) * IDLE):.2f}"))
        rows.append(("RSS per daemon, median / max", f"{rss[len(rss) // 2] / 1024:.1f} / {rss[-1] / 1024:.1f} MiB"))

        # A key rotation under pings.
        pairs = [(1, 2), (n // 2, 1), (n - 1, n // 3 + 1)]
        ping = Pings(pairs, 3000)
        time.sleep(2)
        f.keys += key_line(2)
        t0 = time.monotonic()
        for i in first:
            write(f"{f.dir(i)}/ipsec.keys", f.keys, 0o600)
        t_rot = wait("every pair on key 2", 300, lambda: all_up(f, first, key=2), every=0.5)
        sent, got = ping.finish()
        rows.append(("key rotation on every node: every pair sending with key 2 only", fmt(t_rot)))
        rows.append((f"pings at 10 ms across the rotation ({len(pairs)} pairs): sent / lost", f"{sent} / {sent - got}"))

        # Node n joins.
        members = list(range(1, n + 1))
        t0 = time.monotonic()
        f.inventory(members)
        f.start(n)

        def joined():
            return all_up(f, members) and subprocess.run(
                ["ip", "netns", "exec", ns(1), "ping", "-c", "1", "-W", "1", v4(n)],
                capture_output=True,
            ).returncode == 0

        rows.append((f"node n{n} joins: every node has it up, a ping to it passes", fmt(wait("the join", 300, joined, every=0.5))))

        # Node 1 reboots.
        f.kill(1)
        sh(f"ip -n {ns(1)} xfrm state flush && ip -n {ns(1)} xfrm policy flush")
        write(f"{f.dir(1)}/boot_id", boot_id(5000))
        t0 = time.monotonic()
        f.start(1)

        def rekeyed():
            s = f.snapshot(1)
            return bool(s) and s.get("pid") == f.pid(1) and all_up(f, members)

        rows.append(("node n1 rebooted: every one of its pairs up again, new keys", fmt(wait("the reboot", 300, rekeyed, every=0.5))))
    except Stop:
        pass
    finally:
        f.stop_all()
        for i in range(1, n + 1):
            sh(f"ip netns del {ns(i)}", check=False)
        sh(f"ip netns del {WIRE}", check=False)

    kernel = os.uname().release
    print(f"\nfleet bench: {n} daemons, kernel {kernel}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}\n")
    print("| measure | result |\n|---|---:|")
    for what, v in rows:
        print(f"| {what} | {v} |")


if __name__ == "__main__":
    main()
