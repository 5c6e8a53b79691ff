//! WireGuard mode end to end: real daemons, one per namespace node, each with one
//! `encryptd0`; traffic between every pair (IPv4, IPv6, into subnets, TCP) crosses the
//! wire only as WireGuard UDP; a daemon restart loses no packet; inventory changes
//! touch only the peer of the node that changed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Case;
use encryptd::config::wgkey::{self, PrivateKey};

use crate::fleet::{
    Fleet, Kind, TestDaemon, next_snapshot, no_plaintext, node_entry, plaintext, rename_over,
    tcp_echo, wg_node_entry, wg_public, write_keys,
};
use crate::rig::{ensure, in_netns, wait_for};

/// What WireGuard mode may put on the wire besides ARP and neighbour discovery.
const WG_WIRE: &[&str] = &[".51871: UDP"];

pub const CASES: &[Case] = &[
    ("wg_mesh_three_nodes", mesh_three_nodes),
    ("wg_restart_loses_no_packet", restart_loses_no_packet),
    (
        "wg_inventory_changes_touch_one_peer",
        inventory_changes_touch_one_peer,
    ),
    ("wg_bulk_transfer_no_fragments", bulk_transfer_no_fragments),
    ("wg_new_key_pair_on_reload", new_key_pair_on_reload),
    // Before another WireGuard case, which then shows that the module is back.
    (
        "wg_no_module_userspace_fallback",
        no_module_userspace_fallback,
    ),
    ("wg_preshared_key_rotation", preshared_key_rotation),
    ("wg_mode_switch_removes_the_other_mode", mode_switch),
    (
        "wg_idle_reads_no_routes_and_hears_other_programs",
        idle_reads_no_routes_and_hears_other_programs,
    ),
];

/// One peer line of `wg show encryptd0 dump`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WgPeer {
    public_key: String,
    endpoint: String,
    allowed_ips: String,
    latest_handshake: u64,
    rx: u64,
    tx: u64,
    keepalive: String,
}

impl WgPeer {
    /// `later` is this peer, untouched: the same configuration, and its session went on
    /// (a peer removed and added again starts at handshake 0 and 0 bytes). Not the same
    /// handshake time: both ends initiate when a pair comes up, and a session re-keys
    /// every 2 minutes, so that time moves on its own.
    fn kept_in(&self, later: &WgPeer) -> bool {
        (
            &self.public_key,
            &self.endpoint,
            &self.allowed_ips,
            &self.keepalive,
        ) == (
            &later.public_key,
            &later.endpoint,
            &later.allowed_ips,
            &later.keepalive,
        ) && self.latest_handshake != 0
            && later.latest_handshake >= self.latest_handshake
            && later.rx >= self.rx
            && later.tx >= self.tx
    }
}

/// The peers of node i's `encryptd0` (the interface line, with the private key, is skipped).
fn wg_peers(f: &Fleet, i: usize) -> Result<Vec<WgPeer>, String> {
    let out = f.topo.exec(i, "wg show encryptd0 dump")?;
    Ok(out
        .lines()
        .skip(1)
        .filter_map(|l| {
            let c: Vec<&str> = l.split('\t').collect();
            // The kernel lists allowed IPs in its trie's order: sort them.
            let mut ips: Vec<&str> = c.get(3)?.split(',').collect();
            ips.sort();
            (c.len() == 8).then(|| WgPeer {
                public_key: c[0].into(),
                endpoint: c[2].into(),
                allowed_ips: ips.join(","),
                latest_handshake: c[4].parse().unwrap_or(0),
                rx: c[5].parse().unwrap_or(0),
                tx: c[6].parse().unwrap_or(0),
                keepalive: c[7].into(),
            })
        })
        .collect())
}

fn peer_of(peers: &[WgPeer], node: usize) -> Option<&WgPeer> {
    let k = wg_public(node);
    peers.iter().find(|p| p.public_key == k)
}

/// Wait until `needle` occurs in the log more than `before` times.
fn wait_log_more(d: &TestDaemon, needle: &str, before: usize, t: Duration) -> Result<(), String> {
    if wait_for(t, || d.log().matches(needle).count() > before) {
        Ok(())
    } else {
        Err(format!(
            "no new `{needle}` in the log within {t:?}; log:\n{}",
            d.log()
        ))
    }
}

/// A `ping` running in the background in node `from`'s namespace.
struct Pinger {
    child: Child,
    what: String,
}

impl Pinger {
    fn start(
        f: &Fleet,
        from: usize,
        dst: &str,
        interval: &str,
        count: u32,
    ) -> Result<Pinger, String> {
        let child = Command::new("ip")
            .args(["netns", "exec", f.topo.ns(from), "ping", "-n", "-q"])
            .args(["-i", interval, "-c", &count.to_string(), "-W", "1", dst])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("ping: {e}"))?;
        Ok(Pinger {
            child,
            what: format!("n{from} -> {dst}"),
        })
    }

    /// (transmitted, received) once it is done.
    fn finish(mut self) -> Result<(u32, u32), String> {
        // ping bounds itself (-c, -W); this bounds a ping that does not
        crate::rig::finish_child(&mut self.child, Duration::from_secs(300), &self.what)?;
        let out = self.child.wait_with_output().map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .ok_or_else(|| format!("ping {}: no summary in {text:?}", self.what))?;
        let num = |word: &str| -> u32 {
            line.split(',')
                .find(|p| p.contains(word))
                .and_then(|p| p.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        Ok((num("transmitted"), num("received")))
    }
}

/// Wait for every pinger; the pings sent, or which lost any (or sent none).
fn none_lost(pings: impl IntoIterator<Item = Pinger>) -> Result<u32, String> {
    let mut sent = 0;
    let mut lost = Vec::new();
    for p in pings {
        let what = p.what.clone();
        let (tx, rx) = p.finish()?;
        sent += tx;
        if tx != rx || tx == 0 {
            lost.push(format!("{what}: {tx} sent, {rx} received"));
        }
    }
    ensure(lost.is_empty(), lost.join("\n"))?;
    Ok(sent)
}

/// Every node's `wg show` (no private keys) and log, for failure messages.
fn state(f: &Fleet) -> String {
    let mut s = String::new();
    for i in 0..f.n {
        s += &format!(
            "---- n{i} wg show\n{}",
            f.topo.exec(i, "wg show").unwrap_or_else(|e| e)
        );
    }
    s + &f.logs()
}

/// Start every daemon; wait for READY=1 from each, then for each to log every peer up
/// (WireGuard handshakes on its own schedule: READY=1 waits at most 10 s for them).
fn start_all(f: &mut Fleet) -> Result<Duration, String> {
    let t0 = Instant::now();
    for i in 0..f.n {
        f.start(i)?;
    }
    for i in 0..f.n {
        f.daemon(i)
            .wait_notify("READY=1", Duration::from_secs(30))
            .map_err(|e| format!("n{i}: {e}\n{}", state(f)))?;
    }
    for i in 0..f.n {
        for j in (0..f.n).filter(|j| *j != i) {
            f.daemon(i)
                .wait_log(&format!("peer n{j} up"), Duration::from_secs(30))
                .map_err(|e| format!("n{i}: {e}\n{}", state(f)))?;
        }
    }
    Ok(t0.elapsed())
}

fn mesh_three_nodes() -> Result<(), String> {
    let mut f = Fleet::new_with("wgm", 3, Kind::Wireguard)?;
    let took = start_all(&mut f)?;
    let st = f.daemon(0).notes.last().cloned().unwrap_or_default();
    // READY=1 carries the status line; it waits at most 10 s for the handshakes, so
    // on a slow host it may still say 1/2 (start_all then waited for every peer up).
    ensure(
        st.contains("STATUS=wireguard: ") && st.contains("/2 peers up, strict off"),
        format!(
            "READY=1 should carry the status line, got {st:?}\n{}",
            state(&f)
        ),
    )?;

    let lines = crate::fleet::three_node_traffic(&f)?;

    let clear = plaintext(&lines, WG_WIRE);
    no_plaintext(&clear)?;
    let wg = lines.iter().filter(|l| l.contains(": UDP")).count();
    ensure(wg > 50, format!("only {wg} WireGuard packets on the wire"))?;
    // Every pair's encrypted traffic goes between underlay addresses (not in a loop
    // through the tunnel).
    for v in [
        "IP 10.77.0.1.51871 > 10.77.0.2.51871: UDP",
        "IP 10.77.0.3.51871 > 10.77.0.1.51871: UDP",
    ] {
        ensure(
            lines.iter().any(|l| l.contains(v)),
            format!("no `{v}` on the wire"),
        )?;
    }

    // The kernel objects: one peer per node with its addresses and subnets, the MTU,
    // the fwmark, the rules.
    let peers = wg_peers(&f, 0)?;
    ensure(
        peers.len() == 2,
        format!("n0 has {} peers: {peers:?}", peers.len()),
    )?;
    let p1 = peer_of(&peers, 1).ok_or("no peer for n1")?;
    ensure(
        p1.endpoint == "10.77.0.2:51871"
            && p1.allowed_ips == "10.1.1.0/24,10.77.0.2/32,fd77::2/128"
            && p1.keepalive == "25",
        format!("n0's peer n1: {p1:?}"),
    )?;
    let link = f.topo.exec(0, "ip link show encryptd0")?;
    ensure(link.contains("mtu 1420"), format!("encryptd0: {link}"))?;
    // `encryptd status`: each peer with its handshake, bytes and endpoint; exit 0.
    let text = f.topo.exec(
        0,
        &format!(
            "{} status --config {}",
            env!("CARGO_BIN_EXE_encryptd"),
            f.dirs[0].join("encryptd.toml").display()
        ),
    )?;
    let n1 = text
        .lines()
        .find(|l| l.trim_start().starts_with("n1 "))
        .unwrap_or("");
    ensure(
        text.contains("Decryption interface(s): encryptd0")
            && n1.contains(" up ")
            && n1.contains("handshake ")
            && n1.contains("endpoint 10.77.0.2:51871")
            && !n1.contains("rx 0 B"),
        format!("status:\n{text}"),
    )?;
    println!("    encryptd status, n1's line: {}", n1.trim());
    let rules = f.topo.exec(0, "ip rule")? + &f.topo.exec(0, "ip -6 rule")?;
    ensure(
        rules
            .matches("31871:\tnot from all fwmark 0xca9f lookup 51871")
            .count()
            == 2,
        format!("rules:\n{rules}"),
    )?;
    println!(
        "    3 daemons started and every pair up in {} ms; {} packets captured, {wg} WireGuard, 0 plaintext",
        took.as_millis(),
        lines.len()
    );
    Ok(())
}

fn restart_loses_no_packet() -> Result<(), String> {
    let mut f = Fleet::new_with("wgr", 2, Kind::Wireguard)?;
    start_all(&mut f)?;
    // 10 ms pings both ways over both families while n1's daemon restarts.
    let pings = [
        Pinger::start(&f, 0, "10.77.0.2", "0.01", 500)?,
        Pinger::start(&f, 0, "fd77::2", "0.01", 500)?,
        Pinger::start(&f, 1, "10.1.0.1", "0.01", 500)?,
    ];
    std::thread::sleep(Duration::from_millis(1000));
    let before = wg_peers(&f, 1)?;
    let t0 = Instant::now();
    let d = f.daemons[1].take().unwrap();
    let (code, _, log) = d.stop()?;
    ensure(code == 0, format!("exit code {code}; log:\n{log}"))?;
    f.start(1)?;
    let st = f
        .daemon(1)
        .wait_notify("READY=1", Duration::from_secs(15))?;
    let took = t0.elapsed();
    ensure(
        st.contains("1/1 peers up"),
        format!("after the restart: {st:?}"),
    )?;
    let sent = none_lost(pings).map_err(|e| format!("{e}\n{}", f.logs()))?;
    let log = f.daemon(1).log();
    ensure(
        log.contains("adopting interface encryptd0")
            && log.contains("wireguard interface encryptd0 ready: 0 kernel object(s) changed"),
        format!("the restart should adopt everything and change nothing:\n{log}"),
    )?;
    let after = wg_peers(&f, 1)?;
    ensure(
        before.len() == 1 && after.len() == 1 && before[0].kept_in(&after[0]),
        format!("the session should be kept: before {before:?}, after {after:?}"),
    )?;
    println!(
        "    restart to READY=1 in {} ms; {sent} pings at 10 ms, 0 lost; session kept",
        took.as_millis()
    );

    // Drift: the interface deleted from under the daemon comes back, with its peer,
    // routes and traffic, at the next re-read.
    f.topo.exec(0, "ip link del encryptd0")?;
    let t0 = Instant::now();
    let back = wait_for(Duration::from_secs(15), || {
        f.topo.exec(0, "ping -c 1 -W 1 10.1.1.1").is_ok()
    });
    ensure(
        back,
        format!("no traffic after deleting encryptd0:\n{}", state(&f)),
    )?;
    ensure(
        f.daemon(0)
            .log()
            .matches("created interface encryptd0")
            .count()
            == 2,
        format!(
            "n0 should have re-created encryptd0:\n{}",
            f.daemon(0).log()
        ),
    )?;
    println!(
        "    encryptd0 deleted by hand: back with traffic in {} ms",
        t0.elapsed().as_millis()
    );
    Ok(())
}

fn inventory_changes_touch_one_peer() -> Result<(), String> {
    let mut f = Fleet::new_with("wgi", 3, Kind::Wireguard)?;
    start_all(&mut f)?;
    let entries =
        |e2: Option<&str>| -> String { wg_node_entry(0) + &wg_node_entry(1) + e2.unwrap_or("") };
    let n2 = |subnets: &str| {
        node_entry(2)
            .replace(
                "subnets = [\"10.1.2.0/24\"]",
                &format!("subnets = [{subnets}]"),
            )
            .trim_end()
            .to_string()
            + &format!("\nwireguard_public_key = \"{}\"\n\n", wg_public(2))
    };
    let applied = "applied: ";
    // Rewrite the inventory of `nodes`, wait for n0 to apply it.
    let change = |f: &mut Fleet, nodes: &[usize], inv: &str| -> Result<(), String> {
        let before = f.daemon(0).log().matches(applied).count();
        for &i in nodes {
            rename_over(&f.dirs[i].join("nodes.toml"), inv)?;
        }
        wait_log_more(f.daemon(0), applied, before, Duration::from_secs(5))
    };
    let unchanged = |a: &WgPeer, b: &WgPeer, what: &str| {
        ensure(
            a.kept_in(b),
            format!("{what}: n0's peer changed: {a:?} -> {b:?}"),
        )
    };

    let p0 = wg_peers(&f, 0)?;
    let n1_before = peer_of(&p0, 1).ok_or("no n1")?.clone();
    let n2_before = peer_of(&p0, 2).ok_or("no n2")?.clone();

    // 1. n2 loses its subnet, under a 10 ms ping to its address: the other allowed IPs
    //    of its peer stay (no black hole), n1's peer is untouched.
    let ping = Pinger::start(&f, 0, "10.77.0.3", "0.01", 300)?;
    std::thread::sleep(Duration::from_millis(500));
    change(&mut f, &[0, 1, 2], &entries(Some(&n2(""))))
        .map_err(|e| format!("{e}\n{}", f.logs()))?;
    let (tx, rx) = ping.finish()?;
    ensure(
        tx == rx && tx > 0,
        format!("ping n0 -> n2 while n2 lost a subnet: {tx} sent, {rx} received"),
    )?;
    f.daemon(0)
        .wait_log("allowed IPs detached: 10.1.2.0/24", Duration::from_secs(1))?;
    let p = wg_peers(&f, 0)?;
    unchanged(
        &n1_before,
        peer_of(&p, 1).ok_or("no n1")?,
        "n2 lost a subnet",
    )?;
    let n2_now = peer_of(&p, 2).ok_or("no n2")?;
    ensure(
        n2_now.allowed_ips == "10.77.0.3/32,fd77::3/128"
            && n2_now.latest_handshake == n2_before.latest_handshake,
        format!("n2's peer after losing its subnet: {n2_now:?} (before {n2_before:?})"),
    )?;
    let routes = f.topo.exec(0, "ip route show table 51871")?;
    ensure(
        !routes.contains("10.1.2.0/24"),
        format!("stale route:\n{routes}"),
    )?;

    // 2. n2 gains a subnet: only its peer changes.
    change(&mut f, &[0, 1, 2], &entries(Some(&n2("\"10.1.9.0/24\""))))?;
    let p = wg_peers(&f, 0)?;
    unchanged(
        &n1_before,
        peer_of(&p, 1).ok_or("no n1")?,
        "n2 gained a subnet",
    )?;
    let n2_now = peer_of(&p, 2).ok_or("no n2")?;
    ensure(
        n2_now.allowed_ips == "10.1.9.0/24,10.77.0.3/32,fd77::3/128",
        format!("n2's peer after gaining a subnet: {n2_now:?}"),
    )?;
    f.daemon(0).wait_log(
        "peer n2 changed: allowed IPs + 10.1.9.0/24",
        Duration::from_secs(1),
    )?;

    // 3. n2 leaves the inventory (of n0 and n1): its peer goes, n1's stays as it was.
    f.daemons[2].take().unwrap().kill();
    change(&mut f, &[0, 1], &entries(None))?;
    f.daemon(0).wait_log(
        &format!("peer n2 removed ({})", wg_public(2)),
        Duration::from_secs(1),
    )?;
    let p = wg_peers(&f, 0)?;
    ensure(p.len() == 1, format!("n0's peers after n2 left: {p:?}"))?;
    unchanged(&n1_before, &p[0], "n2 left")?;
    let routes = f.topo.exec(0, "ip route show table 51871")?
        + &f.topo.exec(0, "ip -6 route show table 51871")?;
    ensure(
        !routes.contains("10.77.0.3") && !routes.contains("fd77::3"),
        format!("n2's routes should be gone:\n{routes}"),
    )?;

    // 4. n2 comes back: a new peer, n1's untouched, and traffic flows to n2 again.
    change(&mut f, &[0, 1], &entries(Some(&wg_node_entry(2))))?;
    rename_over(
        &f.dirs[2].join("nodes.toml"),
        &entries(Some(&wg_node_entry(2))),
    )?;
    f.start(2)?;
    f.daemon(2)
        .wait_notify("READY=1", Duration::from_secs(20))?;
    for j in [0, 1] {
        f.daemon(2)
            .wait_log(&format!("peer n{j} up"), Duration::from_secs(30))
            .map_err(|e| format!("n2 back: {e}\n{}", state(&f)))?;
    }
    let p = wg_peers(&f, 0)?;
    unchanged(&n1_before, peer_of(&p, 1).ok_or("no n1")?, "n2 came back")?;
    ensure(
        peer_of(&p, 2).is_some(),
        format!("no peer for n2 after it came back: {p:?}"),
    )?;
    f.topo.exec(0, "ping -c 2 -i 0.2 -W 2 10.1.2.1")?;
    println!(
        "    4 inventory changes, n1's peer (key, endpoint, allowed IPs, handshake) untouched by each"
    );
    Ok(())
}

fn bulk_transfer_no_fragments() -> Result<(), String> {
    let mut f = Fleet::new_with("wgt", 2, Kind::Wireguard)?;
    // IPv6 addresses first: the endpoints, so the outer header is IPv6, the worst case
    // the 80 bytes of overhead are for.
    let inv: String = (0..2)
        .map(|i| {
            wg_node_entry(i).replace(
                &format!("[\"10.77.0.{a}\", \"fd77::{a}\"]", a = i + 1),
                &format!("[\"fd77::{a}\", \"10.77.0.{a}\"]", a = i + 1),
            )
        })
        .collect();
    ensure(inv.contains("[\"fd77::1\", \"10.77.0.1\"]"), inv.clone())?;
    for d in &f.dirs {
        rename_over(&d.join("nodes.toml"), &inv)?;
    }
    start_all(&mut f)?;
    // Fragments of either family, and the largest WireGuard packets.
    let cap = f.topo.capture(
        "(ip[6:2] & 0x3fff != 0) or (ip6 and ip6[6] == 44) or (udp port 51871 and greater 1400)",
    )?;
    const N: usize = 10 * 1024 * 1024;
    let t0 = Instant::now();
    let listener = in_netns(f.topo.ns(1), || TcpListener::bind("10.77.0.2:5010"))
        .map_err(|e| format!("bind: {e}"))?;
    let received = std::thread::scope(|s| -> Result<usize, String> {
        let server = s.spawn(move || -> std::io::Result<usize> {
            let mut c = crate::rig::accept_within(
                &listener,
                Duration::from_secs(10),
                Duration::from_secs(30),
            )?;
            let mut total = 0;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match c.read(&mut buf)? {
                    0 => return Ok(total),
                    n => total += n,
                }
            }
        });
        in_netns(f.topo.ns(0), || -> std::io::Result<()> {
            let addr: SocketAddr = "10.77.0.2:5010".parse().unwrap();
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            c.set_write_timeout(Some(Duration::from_secs(30)))?;
            let chunk = vec![0x5au8; 64 * 1024];
            for _ in 0..N / chunk.len() {
                c.write_all(&chunk)?;
            }
            c.shutdown(std::net::Shutdown::Write)
        })
        .map_err(|e| format!("send: {e}"))?;
        server
            .join()
            .map_err(|_| "server panicked".to_string())?
            .map_err(|e| format!("receive: {e}"))
    })?;
    let secs = t0.elapsed().as_secs_f64();
    let lines = cap.stop();
    ensure(received == N, format!("received {received} of {N} bytes"))?;
    let frags: Vec<&String> = lines
        .iter()
        .filter(|l| !l.trim().is_empty() && !l.contains(": UDP, length"))
        .collect();
    ensure(
        frags.is_empty(),
        format!(
            "fragments on the wire:\n{}",
            frags
                .iter()
                .take(10)
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        ),
    )?;
    let max = lines
        .iter()
        .filter_map(|l| l.rsplit("length ").next()?.trim().parse::<usize>().ok())
        .max()
        .unwrap_or(0);
    // MTU 1420 inside: 1420 + 32 bytes of WireGuard = 1452 bytes of UDP payload,
    // + 8 (UDP) + 40 (IPv6) = exactly the underlay's 1500.
    ensure(
        max == 1452,
        format!("largest WireGuard UDP payload {max}, want 1452 (full-size segments at MTU 1420)"),
    )?;
    let full = "IP6 fd77::1.51871 > fd77::2.51871: UDP, length 1452";
    ensure(
        lines.iter().any(|l| l.contains(full)),
        format!("no `{full}` on the wire"),
    )?;
    println!(
        "    10 MiB over TCP (IPv6 outer) in {secs:.1} s ({:.1} MB/s); {} WireGuard packets over 1400 bytes captured, largest UDP payload {max}; 0 fragments",
        N as f64 / secs / 1e6,
        lines.len()
    );
    Ok(())
}

/// A node gets a new key pair the way an operator would roll it out: the inventory
/// first (n1 refuses it until its key file matches), then n1's key file (watched).
fn new_key_pair_on_reload() -> Result<(), String> {
    let mut f = Fleet::new_with("wgk", 2, Kind::Wireguard)?;
    start_all(&mut f)?;
    let new = PrivateKey::from_bytes([0x42; 32]);
    let new_pub = wgkey::to_base64(&new.public());
    let inv = wg_node_entry(0) + &wg_node_entry(1).replace(&wg_public(1), &new_pub);
    for d in &f.dirs {
        rename_over(&d.join("nodes.toml"), &inv)?;
    }
    f.daemon(1).wait_log(
        "is not the public key of its private key",
        Duration::from_secs(5),
    )?;
    write_keys(&f.dirs[1].join("wireguard.key"), &new.to_base64())?;
    f.daemon(1)
        .wait_log("new private key (public key", Duration::from_secs(5))
        .map_err(|e| format!("{e}\n{}", f.logs()))?;
    f.daemon(0).wait_log(
        &format!("peer n1 added ({new_pub})"),
        Duration::from_secs(5),
    )?;
    f.daemon(0).wait_log(
        &format!("peer n1 removed ({})", wg_public(1)),
        Duration::from_secs(5),
    )?;
    let ok = wait_for(Duration::from_secs(15), || {
        f.topo.exec(0, "ping -c 1 -W 1 10.1.1.1").is_ok()
    });
    ensure(ok, format!("no traffic after the new key:\n{}", f.logs()))?;
    let peers = wg_peers(&f, 0)?;
    ensure(
        peers.len() == 1 && peers[0].public_key == new_pub && peers[0].latest_handshake != 0,
        format!("n0's peers after n1's new key: {peers:?}"),
    )?;
    let wg1 = f.topo.exec(1, "wg show encryptd0 public-key")?;
    ensure(wg1.trim() == new_pub, format!("n1's interface key: {wg1}"))?;
    println!("    n1's new key pair rolled out by reload; n0 replaced the peer; traffic flows");
    Ok(())
}

/// Node i's preshared key for each peer, by the peer's public key (`(none)` if none).
fn psks(f: &Fleet, i: usize) -> Result<Vec<(String, String)>, String> {
    let out = f.topo.exec(i, "wg show encryptd0 preshared-keys")?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(k, v)| (k.into(), v.trim().into()))
        .collect())
}

/// Every pair has a preshared key, both ends the same one, no two pairs alike; returns
/// them (pair (0,1), (0,2), (1,2)) so that the caller can compare before and after.
fn pair_psks(f: &Fleet) -> Result<Vec<String>, String> {
    let mut keys = Vec::new();
    for i in 0..f.n {
        for j in (i + 1)..f.n {
            let find = |a: usize, b: usize| -> Result<String, String> {
                psks(f, a)?
                    .into_iter()
                    .find(|(k, _)| *k == wg_public(b))
                    .map(|(_, v)| v)
                    .ok_or_else(|| format!("n{a} has no peer n{b}"))
            };
            let (ij, ji) = (find(i, j)?, find(j, i)?);
            ensure(
                ij == ji && ij != "(none)",
                format!("pair n{i}-n{j}: the two ends' preshared keys differ or are missing"),
            )?;
            keys.push(ij);
        }
    }
    let mut distinct = keys.clone();
    distinct.sort();
    distinct.dedup();
    ensure(
        distinct.len() == keys.len(),
        "two pairs share a preshared key",
    )?;
    Ok(keys)
}

/// n0's last handshake with n2 (seconds since the epoch).
fn handshake_with(f: &Fleet, i: usize, j: usize) -> Result<u64, String> {
    Ok(peer_of(&wg_peers(f, i)?, j).map_or(0, |p| p.latest_handshake))
}

/// Per-pair preshared keys from a cluster key; the cluster key replaced on every node
/// under 10 ms pings loses nothing; the new keys are the ones handshakes use (a node
/// with a different cluster key cannot handshake until it gets the right one).
fn preshared_key_rotation() -> Result<(), String> {
    let cluster = |b: u8| wgkey::to_base64(&[b; 32]) + "\n";
    let mut f = Fleet::new_with("wgp", 3, Kind::Wireguard)?;
    for d in &f.dirs {
        write_keys(&d.join("cluster.psk"), &cluster(1))?;
    }
    f.configure_all("preshared_key = \"cluster.psk\"\n")?;
    start_all(&mut f)?;
    let first = pair_psks(&f)?;

    let pings = [
        Pinger::start(&f, 0, "10.77.0.2", "0.01", 600)?,
        Pinger::start(&f, 0, "fd77::3", "0.01", 600)?,
        Pinger::start(&f, 1, "10.1.2.1", "0.01", 600)?,
    ];
    std::thread::sleep(Duration::from_millis(1000));
    let t0 = Instant::now();
    for i in 0..f.n {
        write_keys(&f.dirs[i].join("cluster.psk"), &cluster(2))?;
        let d = f.daemon(i);
        wait_for(Duration::from_secs(5), || {
            d.log().matches("new preshared key").count() == 2
        })
        .then_some(())
        .ok_or_else(|| format!("n{i} did not set its 2 peers' new keys:\n{}", d.log()))?;
    }
    let rolled = t0.elapsed();
    let sent = none_lost(pings).map_err(|e| format!("{e}\n{}", state(&f)))?;
    let second = pair_psks(&f)?;
    ensure(
        first.iter().zip(&second).all(|(a, b)| a != b),
        "every pair's preshared key should have changed",
    )?;
    println!(
        "    cluster key replaced on 3 nodes in {} ms under {sent} pings at 10 ms: 0 lost",
        rolled.as_millis()
    );

    // A handshake under the new keys: n2's interface re-created, n0 reaches it again.
    let reach = |f: &Fleet, secs: u64| {
        wait_for(Duration::from_secs(secs), || {
            f.topo.exec(0, "ping -c 1 -W 1 10.1.2.1").is_ok()
        })
    };
    let before = handshake_with(&f, 0, 2)?;
    f.topo.exec(2, "ip link del encryptd0")?;
    ensure(
        reach(&f, 20),
        format!("no traffic to the re-created n2:\n{}", state(&f)),
    )?;
    let after = handshake_with(&f, 0, 2)?;
    ensure(
        after > before,
        format!("n0-n2 should have handshaken anew ({before} -> {after})"),
    )?;

    // The key is really used: n2 alone on another cluster key cannot handshake...
    let d = f.daemon(2);
    let (keyed, created) = (
        d.log().matches("new preshared key").count(),
        d.log().matches("created interface encryptd0").count(),
    );
    write_keys(&f.dirs[2].join("cluster.psk"), &cluster(3))?;
    // Both its peers' keys (the count goes up by 2).
    wait_log_more(
        f.daemon(2),
        "new preshared key",
        keyed + 1,
        Duration::from_secs(5),
    )?;
    f.topo.exec(2, "ip link del encryptd0")?;
    wait_log_more(
        f.daemon(2),
        "created interface encryptd0",
        created,
        Duration::from_secs(10),
    )?;
    ensure(
        !reach(&f, 8),
        format!("n0 reached n2 although their keys differ:\n{}", state(&f)),
    )?;
    // ...until it has the same one again.
    write_keys(&f.dirs[2].join("cluster.psk"), &cluster(2))?;
    ensure(
        reach(&f, 20),
        format!(
            "n2 back on the cluster key, still unreachable:\n{}",
            state(&f)
        ),
    )?;
    pair_psks(&f)?;
    println!("    new keys handshake; a node on another cluster key cannot, until it has the same");
    Ok(())
}

/// While it lives, the guest kernel has no WireGuard: the module unloaded (which deletes
/// every WireGuard interface) and on-demand loading off. Dropping it puts both back and
/// ends the userspace implementations the test started.
struct NoWireguardModule {
    modprobe: String,
}

impl NoWireguardModule {
    fn new() -> Result<NoWireguardModule, String> {
        let modprobe = std::fs::read_to_string("/proc/sys/kernel/modprobe")
            .map_err(|e| e.to_string())?
            .trim()
            .to_string();
        std::fs::write("/proc/sys/kernel/modprobe", "/bin/false\n").map_err(|e| e.to_string())?;
        let guard = NoWireguardModule { modprobe };
        crate::rig::sh("rmmod wireguard")?;
        Ok(guard)
    }
}

impl Drop for NoWireguardModule {
    fn drop(&mut self) {
        let _ = crate::rig::sh("pkill -x wireguard-go; true");
        let _ = std::fs::write("/proc/sys/kernel/modprobe", format!("{}\n", self.modprobe));
        // The kernel's own helper: in the VM the modules are not under /lib/modules but
        // in the extracted kernel package, which that helper knows (plain `modprobe`
        // does not, and the next case would find no module).
        let _ = crate::rig::sh(&format!("{} wireguard", self.modprobe));
    }
}

/// A kernel without WireGuard: the daemon refuses to start and says what to do; with
/// `[wireguard] userspace` it runs wireguard-go instead (a tun device and the UAPI
/// socket), and the mesh, the wire, a restart that changes nothing and preshared keys
/// work as with the kernel's.
fn no_module_userspace_fallback() -> Result<(), String> {
    let _nomod = NoWireguardModule::new()?;
    let mut f = Fleet::new_with("wgu", 2, Kind::Wireguard)?;
    for (i, d) in f.dirs.iter().enumerate() {
        // One UAPI socket directory for every namespace: a name per node.
        write_keys(&d.join("cluster.psk"), &(wgkey::to_base64(&[7; 32]) + "\n"))?;
        let p = d.join("encryptd.toml");
        let s = std::fs::read_to_string(&p).map_err(|e| e.to_string())?;
        crate::fleet::write(
            &p,
            &format!("{s}interface = \"uwg{i}\"\npreshared_key = \"cluster.psk\"\n"),
        )?;
    }

    // Without `userspace`: a clear refusal, naming both ways out.
    f.start(0)?;
    f.daemon(0)
        .wait_log("this kernel has no WireGuard", Duration::from_secs(10))?;
    let (code, _, log) = f.daemons[0].take().unwrap().stop()?;
    ensure(
        code != 0
            && log.contains("load the module (`modprobe wireguard`")
            && log.contains("set [wireguard] userspace = \"/usr/bin/wireguard-go\""),
        format!("exit code {code}, log:\n{log}"),
    )?;
    println!("    no module, no userspace: refused to start (exit {code}) with the way out");

    for d in &f.dirs {
        let p = d.join("encryptd.toml");
        let s = std::fs::read_to_string(&p).map_err(|e| e.to_string())?;
        crate::fleet::write(&p, &(s + "userspace = \"/usr/bin/wireguard-go\"\n"))?;
        let _ = std::fs::remove_file(d.join("daemon.log"));
    }
    let t0 = Instant::now();
    for i in 0..2 {
        f.start(i)?;
    }
    for i in 0..2 {
        let up = f
            .daemon(i)
            .wait_log(&format!("peer n{} up", 1 - i), Duration::from_secs(30));
        if let Err(e) = up {
            // Seen once in about 25 runs (issue 10): neither end ever handshakes. What
            // each wireguard-go holds, and what crossed the wire, for the next look.
            let state: String = (0..2)
                .map(|j| {
                    let show = f
                        .topo
                        .exec(j, &format!("wg show uwg{j} dump; ip rule; ip route show table 51871; ip -s link show uwg{j}"))
                        .unwrap_or_else(|e| e);
                    format!("---- n{j}:\n{show}")
                })
                .collect();
            return Err(format!("n{i}: {e}\nboth daemons:\n{}\n{state}", f.logs()));
        }
    }
    let took = t0.elapsed();
    let log = f.daemon(0).log();
    ensure(
        log.contains(
            "this kernel has no WireGuard: created interface uwg0 with /usr/bin/wireguard-go",
        ),
        format!("n0 should say it runs userspace:\n{log}"),
    )?;
    let link = f.topo.exec(0, "ip -d link show uwg0")?;
    ensure(
        link.contains("tun") && link.contains("mtu 1420"),
        format!("uwg0 should be a tun device with MTU 1420: {link}"),
    )?;

    let cap = f.topo.capture("")?;
    let mut failures = Vec::new();
    for (i, dst) in [(0, "10.77.0.2"), (0, "fd77::2"), (1, "10.1.0.1")] {
        if let Err(e) = f.topo.exec(i, &format!("ping -c 3 -i 0.2 -W 2 {dst}")) {
            failures.push(format!("n{i} -> {dst}: {e}"));
        }
    }
    failures.extend(tcp_echo(&f, 0, 1, "10.77.0.2:5011".parse().unwrap(), 200_000).err());
    let lines = cap.stop();
    ensure(
        failures.is_empty(),
        format!("{}\n{}", failures.join("\n"), f.logs()),
    )?;
    no_plaintext(&plaintext(&lines, WG_WIRE))?;
    let wg = lines.iter().filter(|l| l.contains(".51871: UDP")).count();
    ensure(wg > 20, format!("only {wg} WireGuard packets on the wire"))?;
    // The userspace device holds the same per-pair preshared key on both ends.
    let psk = |i: usize| f.topo.exec(i, &format!("wg show uwg{i} preshared-keys"));
    let (k0, k1) = (psk(0)?, psk(1)?);
    let key_of = |out: &str| out.split('\t').nth(1).map(|k| k.trim().to_string());
    ensure(
        key_of(&k0).is_some() && key_of(&k0) == key_of(&k1) && !k0.contains("(none)"),
        "the two ends' preshared keys differ or are missing",
    )?;

    // A restart adopts the userspace device and changes nothing.
    let d = f.daemons[1].take().unwrap();
    let (code, _, _) = d.stop()?;
    ensure(code == 0, format!("n1 exit code {code}"))?;
    f.start(1)?;
    f.daemon(1)
        .wait_log("ready: 0 kernel object(s) changed", Duration::from_secs(15))
        .map_err(|e| format!("the restart should change nothing: {e}"))?;
    f.topo
        .exec(1, "ping -c 2 -i 0.2 -W 2 10.1.0.1")
        .map_err(|e| format!("after the restart: {e}"))?;

    // `encryptd teardown` removes the userspace device too; wireguard-go then exits.
    let d = f.daemons[0].take().unwrap();
    d.stop()?;
    let out = f.topo.exec(
        0,
        &format!(
            "{} teardown --config {}",
            env!("CARGO_BIN_EXE_encryptd"),
            f.dirs[0].join("encryptd.toml").display()
        ),
    )?;
    ensure(
        out.contains("removed the WireGuard interface uwg0"),
        format!("teardown: {out}"),
    )?;
    let gone = wait_for(Duration::from_secs(5), || {
        crate::rig::sh("pgrep -f 'wireguard-go uwg0'").is_err()
    });
    ensure(gone, "wireguard-go for uwg0 still runs after teardown")?;
    println!(
        "    wireguard-go mesh up in {} ms: ping, TCP, {wg} WireGuard packets, 0 plaintext; restart adopted it, 0 changes",
        took.as_millis()
    );
    Ok(())
}

/// `mode` changed by a restart: the new mode's daemon removes what the other mode left
/// (IPsec policies would otherwise catch the WireGuard UDP between the same addresses),
/// both ways, and traffic flows in the new mode.
fn mode_switch() -> Result<(), String> {
    let mut f = Fleet::new_with("wgs", 2, Kind::Wireguard)?;
    for d in &f.dirs {
        write_keys(&d.join("ipsec.keys"), crate::fleet::KEY1)?;
    }
    let set_mode = |f: &Fleet, from: &str, to: &str| -> Result<(), String> {
        for d in &f.dirs {
            let p = d.join("encryptd.toml");
            let s = std::fs::read_to_string(&p).map_err(|e| e.to_string())?;
            crate::fleet::write(&p, &s.replacen(from, to, 1))?;
            let _ = std::fs::remove_file(d.join("daemon.log"));
        }
        Ok(())
    };
    let restart_all = |f: &mut Fleet| -> Result<(), String> {
        for i in 0..2 {
            if let Some(d) = f.daemons[i].take() {
                d.stop()?;
            }
        }
        for i in 0..2 {
            f.start(i)?;
        }
        f.wait_all_up(Duration::from_secs(30))
    };
    let wire = |f: &Fleet, allowed: &[&str]| -> Result<usize, String> {
        let cap = f.topo.capture("")?;
        let r = f.topo.exec(0, "ping -c 3 -i 0.2 -W 2 10.1.1.1");
        let lines = cap.stop();
        r?;
        no_plaintext(&plaintext(&lines, allowed))?;
        Ok(lines.len())
    };

    set_mode(&f, "mode = \"wireguard\"", "mode = \"ipsec\"")?;
    restart_all(&mut f)?;
    wire(&f, crate::ipsec::IPSEC_WIRE)?;
    ensure(
        !f.topo.exec(0, "ip xfrm state")?.is_empty(),
        "IPsec mode should have states",
    )?;

    set_mode(&f, "mode = \"ipsec\"", "mode = \"wireguard\"")?;
    restart_all(&mut f)?;
    let log = f.daemon(0).log();
    ensure(
        log.contains("mode wireguard: removed what mode ipsec left:"),
        format!("n0 should have removed the IPsec objects:\n{log}"),
    )?;
    let left = f.topo.exec(0, "ip xfrm state; ip xfrm policy")?;
    ensure(
        left.trim().is_empty(),
        format!("IPsec objects left:\n{left}"),
    )?;
    wire(&f, WG_WIRE)?;

    set_mode(&f, "mode = \"wireguard\"", "mode = \"ipsec\"")?;
    restart_all(&mut f)?;
    let log = f.daemon(0).log();
    ensure(
        log.contains(
            "mode ipsec: removed what mode wireguard left: interface encryptd0, 2 policy rule(s)",
        ),
        format!("n0 should have removed the WireGuard objects:\n{log}"),
    )?;
    let left = f
        .topo
        .exec(0, "ip link show encryptd0 2>&1; ip rule; ip -6 rule")?;
    ensure(
        left.contains("does not exist") && !left.contains("51871"),
        format!("WireGuard objects left:\n{left}"),
    )?;
    wire(&f, crate::ipsec::IPSEC_WIRE)?;
    println!(
        "    ipsec -> wireguard -> ipsec by restart: the other mode's objects removed each time; traffic encrypted in each"
    );
    Ok(())
}

/// An idle WireGuard daemon reads only its device: links, addresses, routes and rules
/// are read again when rtnetlink says another program changed one (before: all of them
/// every 5 s). So over a settled 10 s it reads them at most once, and yet a route or the
/// policy rule deleted by hand is back within a second (before: at the next 5 s rescan;
/// the deadline here is 3 s). Strict mode is on: while the route or the rule is gone the
/// pair's packets are dropped, never sent in plaintext (without strict mode they leave in
/// plaintext until the route is back, which is what strict mode is for).
fn idle_reads_no_routes_and_hears_other_programs() -> Result<(), String> {
    let mut f = Fleet::new_with("wgi", 2, Kind::Wireguard)?;
    f.configure_all(crate::fleet::STRICT)?;
    start_all(&mut f)?;
    std::thread::sleep(Duration::from_secs(3));
    let dumps = |v: &serde_json::Value| v["rtnl_dumps"].as_u64().unwrap_or(0);
    let (t1, s1) = next_snapshot(&f, 0)?;
    let (t2, s2) = next_snapshot(&f, 0)?;
    let idle = dumps(&s2).saturating_sub(dumps(&s1));
    println!(
        "    idle n0: {idle} reads of links, routes and rules in {} ms ({} since the start)",
        (t2 - t1).as_millis(),
        dumps(&s2)
    );
    ensure(
        dumps(&s1) >= 1 && t2 - t1 >= Duration::from_secs(5) && idle <= 1,
        format!(
            "n0 read links, routes and rules {idle} times in {:?} while idle:\n{s2}",
            t2 - t1
        ),
    )?;

    let table = encryptd::wireguard::plan::TABLE;
    let prio = encryptd::wireguard::plan::RULE_PRIORITY;
    let routes = || f.topo.exec(0, &format!("ip route show table {table}"));
    let before = routes()?;
    let victim = before
        .lines()
        .find(|l| l.contains("10.77.0.2"))
        .ok_or_else(|| format!("no route to n1 in table {table}:\n{before}"))?
        .to_string();
    let rules = || f.topo.exec(0, "ip rule show");
    let rules_before = rules()?;
    ensure(
        rules_before.contains(&format!("{prio}:")),
        format!("no rule of priority {prio}:\n{rules_before}"),
    )?;
    let cap = f.topo.capture("")?;
    let ping_out = std::env::temp_dir().join("wgi-ping.txt");
    let mut ping = f.topo.exec_bg(
        0,
        &format!(
            "ping -n -q -i 0.01 -c 400 -W 1 10.77.0.2 > {}",
            ping_out.display()
        ),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let mut took = Vec::new();
    for (what, del, back) in [
        (
            "the route to n1",
            format!("ip route del {victim} table {table}"),
            Box::new(|| routes().is_ok_and(|r| r == before)) as Box<dyn Fn() -> bool>,
        ),
        (
            "the policy rule",
            format!("ip rule del priority {prio}"),
            Box::new(|| rules().is_ok_and(|r| r == rules_before)),
        ),
    ] {
        f.topo.exec(0, &del)?;
        let t0 = Instant::now();
        let ok = wait_for(Duration::from_secs(3), back);
        ensure(
            ok,
            format!(
                "{what}, deleted by hand, was not put back within 3 s:\nroutes:\n{}\nrules:\n{}\n{}",
                routes().unwrap_or_default(),
                rules().unwrap_or_default(),
                f.logs()
            ),
        )?;
        took.push(format!("{what} back in {} ms", t0.elapsed().as_millis()));
    }
    println!("    {}", took.join(", "));
    crate::rig::finish_child(&mut ping, Duration::from_secs(30), "ping n0 -> n1")?;
    let out = std::fs::read_to_string(&ping_out).unwrap_or_default();
    let lines = cap.stop();
    let clear = plaintext(&lines, WG_WIRE);
    let ping_line = out
        .lines()
        .find(|l| l.contains("transmitted"))
        .unwrap_or("");
    println!("    ping n0 -> n1 meanwhile: {ping_line}");
    no_plaintext(&clear)
}
