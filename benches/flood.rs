//! `cargo bench --bench flood`: what one real `encryptd run` absorbs when its hello port
//! is flooded, end to end on the project's kernel (the VM, TCG here), while its timers and
//! its other peers must keep their schedule.
//!
//! Three daemons n0, n1, n2 in namespaces on one bridge, IPsec over IPv4 and IPv6. The
//! attacker floods n0's hello port from n1's address (in n1's namespace, with a socket
//! that bypasses n1's tunnel policies, as one on the wire would send: plaintext), as fast
//! as one sender thread can, for `ENCRYPTD_FLOOD_SECS` (default 20) per kind:
//!
//! - none: the baseline;
//! - garbage: 64 random bytes;
//! - bad MAC: a hello of n1 recorded on the wire, its last byte flipped;
//! - replayed authentic: the same hello unchanged.
//!
//! During the first half of each phase n2 pings n0 every 10 ms (the other peer's traffic);
//! at half time n2 "reboots" (daemon killed, its SAs flushed, a new boot ID, started
//! again), and the phase lasts until n0 and n2 have the pair up again (the reaction the
//! flood must not slow). Printed as a Markdown table: datagrams sent, what n0's daemon read
//! and dropped (its status.json), what the kernel dropped at its full socket buffer, n0's
//! CPU, ping loss, the reboot's recovery time.
//!
//! Without `--bench` (e.g. `cargo test --benches`) it does nothing: it is not a test.

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const HERE: &str = "ENCRYPTD_BENCH";
const SECS: &str = "ENCRYPTD_FLOOD_SECS";
const BIN: &str = env!("CARGO_BIN_EXE_encryptd");
const WORK: &str = "/tmp/encryptd-flood";
const WIRE: &str = "hf-sw";
const N: usize = 3;
const KEYS: &str = "1+ rfc4106(gcm(aes)) 6b1c3f0e2d4a59788a9b0c1d2e3f40516273849a 128\n";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("flood: a benchmark, not a test; run it with `cargo bench --bench flood`");
        return ExitCode::SUCCESS;
    }
    if std::env::var_os("ENCRYPTD_VM").is_none() {
        return common::boot_vm("flood", &args, HERE, &[SECS], "1024");
    }
    let r = run();
    let _ = sh(&format!("ip netns del {WIRE}"));
    for i in 0..N {
        let _ = sh(&format!("ip netns del {}", ns(i)));
    }
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flood bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn ns(i: usize) -> String {
    format!("hf-{i}")
}

fn v4(i: usize) -> IpAddr {
    format!("10.78.0.{}", i + 1).parse().unwrap()
}

fn v6(i: usize) -> IpAddr {
    format!("fd78::{}", i + 1).parse().unwrap()
}

fn dir(i: usize) -> PathBuf {
    Path::new(WORK).join(format!("n{i}"))
}

fn sh(cmd: &str) -> Result<String, String> {
    let out = Command::new("timeout")
        .args(["60", "sh", "-c", cmd])
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, path).map_err(|e| e.to_string())
}

fn boot_id(n: u32) -> String {
    format!("{n:08x}-0000-4000-8000-000000000000\n")
}

/// Run `f` in network namespace `name` (on a thread of its own, which enters it).
fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(format!("/run/netns/{name}")).expect("netns file");
            // SAFETY: setns on this thread only, with a valid namespace fd.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns {name}");
            f()
        })
        .join()
        .expect("netns thread")
    })
}

struct Fleet {
    daemons: Vec<Option<Child>>,
    boots: u32,
}

impl Fleet {
    fn new() -> Result<Fleet, String> {
        let _ = std::fs::remove_dir_all(WORK);
        sh(&format!(
            "ip netns add {WIRE} && ip -n {WIRE} link add br0 type bridge && ip -n {WIRE} link set br0 up"
        ))?;
        let inventory: String = (0..N)
            .map(|i| {
                format!(
                    "[[node]]\nname = \"n{i}\"\naddresses = [\"{}\", \"{}\"]\n\n",
                    v4(i),
                    v6(i)
                )
            })
            .collect();
        for i in 0..N {
            let n = ns(i);
            sh(&format!(
                "ip netns add {n} && ip -n {n} link set lo up && \
                 ip link add e{i} netns {n} type veth peer name p{i} netns {WIRE} && \
                 ip -n {WIRE} link set p{i} master br0 up && \
                 ip -n {n} addr add {}/24 dev e{i} && ip -n {n} addr add {}/64 dev e{i} nodad && \
                 ip -n {n} link set e{i} up",
                v4(i),
                v6(i)
            ))?;
            let d = dir(i);
            std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
            write(
                &d.join("encryptd.toml"),
                &format!(
                    "mode = \"ipsec\"\nnode = \"n{i}\"\nruntime_dir = \"run\"\nstate_dir = \"state\"\nboot_id_path = \"boot_id\"\n"
                ),
                0o644,
            )?;
            write(&d.join("ipsec.keys"), KEYS, 0o600)?;
            write(&d.join("boot_id"), &boot_id(1000 + i as u32), 0o644)?;
            write(&d.join("nodes.toml"), &inventory, 0o644)?;
        }
        Ok(Fleet {
            daemons: (0..N).map(|_| None).collect(),
            boots: 2000,
        })
    }

    fn start(&mut self, i: usize) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir(i).join("log"))
            .map_err(|e| e.to_string())?;
        let child = Command::new("ip")
            .args(["netns", "exec", &ns(i), BIN, "run", "--config"])
            .arg(dir(i).join("encryptd.toml"))
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("start n{i}: {e}"))?;
        self.daemons[i] = Some(child);
        Ok(())
    }

    /// The daemon's snapshot, and when it was written.
    fn snapshot(&self, i: usize) -> Option<(std::time::SystemTime, serde_json::Value)> {
        let p = dir(i).join("run/status.json");
        let t = p.metadata().and_then(|m| m.modified()).ok()?;
        let v = serde_json::from_str(&std::fs::read_to_string(&p).ok()?).ok()?;
        Some((t, v))
    }

    /// A snapshot of node i written after now (they are rewritten every 10 s).
    fn next_snapshot(&self, i: usize) -> Result<serde_json::Value, String> {
        let now = std::time::SystemTime::now();
        let mut got = None;
        wait(Duration::from_secs(30), || {
            got = self.snapshot(i).filter(|(t, _)| *t > now).map(|(_, v)| v);
            got.is_some()
        });
        got.ok_or_else(|| format!("n{i} wrote no status snapshot in 30 s"))
    }

    fn all_up(&self, i: usize) -> bool {
        self.snapshot(i).is_some_and(|(_, v)| {
            let peers = v["peers"].as_array().cloned().unwrap_or_default();
            peers.len() == N - 1 && peers.iter().all(|p| p["state"] == "up")
        })
    }

    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(dir(i).join("log")).unwrap_or_default()
    }

    fn pid(&self, i: usize) -> u32 {
        self.daemons[i].as_ref().map_or(0, Child::id)
    }

    /// n2's reboot: its daemon killed, its SAs gone, a new boot ID, started again. The
    /// time until n0 and n2 have the pair up again.
    fn reboot(&mut self, i: usize) -> Result<Option<Duration>, String> {
        let ups = |f: &Fleet| f.log(0).matches(&format!("peer n{i} up")).count();
        let before = ups(self);
        if let Some(mut c) = self.daemons[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        sh(&format!("ip -n {} xfrm state flush", ns(i)))?;
        self.boots += 1;
        write(&dir(i).join("boot_id"), &boot_id(self.boots), 0o644)?;
        let _ = std::fs::remove_file(dir(i).join("run/status.json"));
        let t0 = Instant::now();
        self.start(i)?;
        let ok = wait(Duration::from_secs(60), || {
            ups(self) > before && self.all_up(i)
        });
        Ok(ok.then(|| t0.elapsed()))
    }

    fn stop(&mut self) {
        for c in self.daemons.iter_mut().flatten() {
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        for c in self.daemons.iter_mut().flatten() {
            let t0 = Instant::now();
            while c.try_wait().ok().flatten().is_none() && t0.elapsed() < Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let f: Vec<u64> = s
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|x| x.parse().ok())
                .collect();
            Some(f.iter().sum())
        })
        .unwrap_or(0)
}

/// The UDP payloads of a pcap (Ethernet, IPv4) from `src` to `dst`:4510.
fn hellos(pcap: &[u8], src: IpAddr, dst: IpAddr) -> Vec<Vec<u8>> {
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (src, dst) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let len = u32::from_le_bytes(pcap[at + 8..at + 12].try_into().unwrap()) as usize;
        let Some(frame) = pcap.get(at + 16..at + 16 + len) else {
            break;
        };
        at += 16 + len;
        if frame.len() < 14 + 20 + 8 || frame[12..14] != [0x08, 0x00] {
            continue;
        }
        let ip = &frame[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        if ip[9] != 17 || ip[12..16] != src.octets() || ip[16..20] != dst.octets() {
            continue;
        }
        let Some(udp) = ip.get(ihl..) else { continue };
        if udp.len() < 8 || u16::from_be_bytes([udp[2], udp[3]]) != 4510 {
            continue;
        }
        out.push(udp[8..].to_vec());
    }
    out
}

/// Send `dgram` to n0's hello port from n1's address as fast as one thread can, until
/// `stop`; (sent, refused by the local stack).
fn flood(dgram: Vec<u8>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(u64, u64)> {
    std::thread::spawn(move || {
        in_netns(&ns(1), || {
            let s = UdpSocket::bind((v4(1), 0)).expect("bind the flood socket");
            encryptd::kernel::xfrm::bypass_socket(s.as_raw_fd(), false)
                .expect("XFRM bypass for the flood socket");
            let to = SocketAddr::new(v4(0), 4510);
            let (mut sent, mut refused) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..256 {
                    match s.send_to(&dgram, to) {
                        Ok(_) => sent += 1,
                        Err(_) => refused += 1,
                    }
                }
            }
            (sent, refused)
        })
    })
}

struct Row {
    kind: &'static str,
    secs: f64,
    sent: u64,
    received: u64,
    dropped: String,
    overflows: u64,
    cpu: f64,
    pings: (u64, u64),
    reboot: Option<Duration>,
}

fn counters(v: &serde_json::Value) -> (u64, u64, serde_json::Map<String, serde_json::Value>) {
    let d = v;
    (
        d["hello_received"].as_u64().unwrap_or(0),
        d["hello_socket_overflows"].as_u64().unwrap_or(0),
        d["hello_dropped"].as_object().cloned().unwrap_or_default(),
    )
}

fn run() -> Result<(), String> {
    let secs: u64 = std::env::var(SECS)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let _ = sh("modprobe esp4; modprobe esp6; modprobe xfrm_user");
    let mut f = Fleet::new()?;
    let pcap = Path::new(WORK).join("hellos.pcap");
    let mut dump = Command::new("ip")
        .args([
            "netns", "exec", WIRE, "tcpdump", "-n", "-U", "-i", "p1", "-w",
        ])
        .arg(&pcap)
        .arg("udp port 4510")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("tcpdump: {e}"))?;
    std::thread::sleep(Duration::from_secs(2));
    for i in 0..N {
        f.start(i)?;
    }
    let up = wait(Duration::from_secs(90), || (0..N).all(|i| f.all_up(i)));
    std::thread::sleep(Duration::from_secs(1));
    let _ = dump.kill();
    let _ = dump.wait();
    if !up {
        f.stop();
        return Err(format!(
            "the fleet did not come up in 90 s; n0's log:\n{}",
            f.log(0)
        ));
    }
    let recorded = std::fs::read(&pcap).map_err(|e| format!("{}: {e}", pcap.display()))?;
    let authentic = hellos(&recorded, v4(1), v4(0))
        .pop()
        .ok_or("no hello n1 -> n0 recorded")?;
    let mut bad_mac = authentic.clone();
    *bad_mac.last_mut().unwrap() ^= 0x80;
    let garbage = encryptd::random::bytes::<64>().to_vec();
    let kinds: [(&str, Option<Vec<u8>>); 4] = [
        ("none", None),
        ("garbage", Some(garbage)),
        ("bad MAC", Some(bad_mac)),
        ("replayed authentic", Some(authentic)),
    ];
    let tick = 100.0; // USER_HZ
    let mut rows = Vec::new();
    for (kind, dgram) in kinds {
        eprintln!("flood bench: {kind} for {secs} s");
        let (r0, o0, d0) = counters(&f.next_snapshot(0)?);
        let cpu0 = cpu_ticks(f.pid(0));
        let t0 = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let sender = dgram.map(|d| flood(d, stop.clone()));
        let half = secs / 2;
        let ping = in_netns(&ns(2), || {
            Command::new("ping")
                .args(["-n", "-q", "-i", "0.01", "-W", "1", "-c"])
                .arg((half * 100).to_string())
                .arg(v4(0).to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
        })
        .map_err(|e| format!("ping: {e}"))?;
        let out = wait_child(ping, Duration::from_secs(half * 3 + 10))?;
        let pings = parse_ping(&out);
        let reboot = f.reboot(2)?;
        let rest = Duration::from_secs(secs).saturating_sub(t0.elapsed());
        std::thread::sleep(rest);
        stop.store(true, Ordering::Relaxed);
        let (sent, _refused) = sender.map_or((0, 0), |h| h.join().unwrap_or((0, 0)));
        let elapsed = t0.elapsed().as_secs_f64();
        let cpu = (cpu_ticks(f.pid(0)) - cpu0) as f64 / tick;
        let (r1, o1, d1) = counters(&f.next_snapshot(0)?);
        let mut dropped: Vec<String> = d1
            .iter()
            .map(|(k, v)| {
                (
                    k,
                    v.as_u64().unwrap_or(0) - d0.get(k).and_then(|x| x.as_u64()).unwrap_or(0),
                )
            })
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        if dropped.is_empty() {
            dropped.push("–".into());
        }
        rows.push(Row {
            kind,
            secs: elapsed,
            sent,
            received: r1 - r0,
            dropped: dropped.join(", "),
            overflows: o1 - o0,
            cpu,
            pings,
            reboot,
        });
    }
    f.stop();
    println!(
        "\n| flood | sent/s | read by n0/s | n0 dropped (reason count) | kernel dropped at n0's full socket | n0 CPU | n2 → n0 pings lost | n2 reboot: pair up again |"
    );
    println!("|---|---:|---:|---|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.0} | {:.0} | {} | {} | {:.0}% | {} of {} | {} |",
            r.kind,
            r.sent as f64 / r.secs,
            r.received as f64 / r.secs,
            r.dropped,
            r.overflows,
            100.0 * r.cpu / r.secs,
            r.pings.0 - r.pings.1,
            r.pings.0,
            r.reboot
                .map_or("timeout".into(), |d| format!("{:.1} s", d.as_secs_f64()))
        );
    }
    Ok(())
}

fn wait_child(mut c: Child, deadline: Duration) -> Result<String, String> {
    let t0 = Instant::now();
    loop {
        if c.try_wait().map_err(|e| e.to_string())?.is_some() {
            let mut s = String::new();
            use std::io::Read;
            if let Some(mut o) = c.stdout.take() {
                let _ = o.read_to_string(&mut s);
            }
            return Ok(s);
        }
        if t0.elapsed() > deadline {
            let _ = c.kill();
            let _ = c.wait();
            return Err(format!("a child outlived its {deadline:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// (sent, received) from ping's summary.
fn parse_ping(out: &str) -> (u64, u64) {
    let line = out
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or("");
    let num = |w: &str| {
        line.split(", ")
            .find(|p| p.contains(w))
            .and_then(|p| p.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (num("transmitted"), num("received"))
}
