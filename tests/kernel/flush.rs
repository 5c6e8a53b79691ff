//! The strict table cannot silently vanish: another program runs `nft flush ruleset`
//! (what `systemctl restart nftables` does on Debian) three times on n0, while n0 sends a
//! UDP datagram to a management host in a protected range that is in no inventory (m:
//! 10.77.0.50, fd77::50) every 10 ms. The daemon puts its table back within a second each
//! time, says so in its log, `encryptd status` and the metrics, and no datagram leaves in
//! plaintext, not even in the gap between the flush and the reinstall (IPsec: the XFRM block policy;
//! WireGuard: the blackhole routes of encryptd's routing table). Then two quieter
//! changes that leave the table, its chains and its drop rules in place: the protected
//! sets flushed (every drop then matches nothing), and an `accept` inserted at the head
//! of the output chain. Both are put back as well.

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::Case;
use crate::fleet::{Fleet, KEY1, Kind, MGMT4, MGMT6, STRICT, first_lines};
use crate::rig::{endpoints, ensure, run_within};

pub const CASES: &[Case] = &[
    ("flush_ipsec_table_comes_back_no_leak", || flush(true)),
    ("flush_wireguard_table_comes_back_no_leak", || flush(false)),
];

fn flush(ipsec: bool) -> Result<(), String> {
    let (tag, kind) = if ipsec {
        ("fi", Kind::Ipsec(KEY1))
    } else {
        ("fw", Kind::Wireguard)
    };
    let mut f = Fleet::new_with(tag, 2, kind)?;
    f.configure_all(&format!("{STRICT}\n[metrics]\npath = \"metrics.prom\"\n"))?;
    let m = f.add_management_host()?;
    f.start_all(Duration::from_secs(30))?;

    let cap = f.topo.capture("udp port 5555")?;
    let sender = Sender::start(f.topo.ns(0), &[MGMT4, MGMT6])?;
    let mut seen = sender.attempts();
    let mut took = Vec::new();
    let changes = [
        "nft flush ruleset",
        "nft flush ruleset",
        "nft flush ruleset",
        "nft flush set inet encryptd protected4; nft flush set inet encryptd protected6",
        "nft insert rule inet encryptd output accept",
    ];
    for (round, change) in (1..).zip(changes) {
        std::thread::sleep(Duration::from_millis(700));
        // The sender still runs: the proof that the probe probes.
        let now = sender.attempts();
        ensure(
            now > seen,
            format!(
                "round {round}: the sender stopped before `{change}` ({seen} -> {now} attempts)"
            ),
        )?;
        seen = now;
        let t0 = Instant::now();
        f.topo.exec(0, change)?;
        let flushed = t0.elapsed();
        let d = f.daemon(0);
        d.wait_log(
            &format!("reinstalled ({round} time(s) since start)"),
            Duration::from_secs(5),
        )
        .map_err(|e| format!("round {round} (`{change}`): {e}"))?;
        let back = t0.elapsed();
        ensure(
            f.topo.exec(0, "nft list table inet encryptd").is_ok(),
            format!("round {round}: the daemon said it reinstalled the table, but it is not there"),
        )?;
        took.push(back.saturating_sub(flushed));
    }
    std::thread::sleep(Duration::from_millis(500));
    let (attempts, accepted) = sender.stop()?;
    // The capture sees the wire: m's own datagrams to n0 must be in it.
    f.topo.exec_ns(
        &m,
        "echo x >/dev/udp/10.77.0.1/5555; echo x >/dev/udp/fd77::1/5555",
    )?;
    let lines = cap.stop();
    // n0's datagrams to m on the wire would be plaintext: there must be none; and the
    // kernel must have refused every one (a send it took is a datagram on its way).
    let leaked: Vec<&String> = lines
        .iter()
        .filter(|l| {
            endpoints(l).is_some_and(|(src, dst)| {
                (src == "10.77.0.1" || src == "fd77::1")
                    && (dst == "10.77.0.50" || dst == "fd77::50")
            })
        })
        .collect();
    ensure(
        leaked.is_empty(),
        format!(
            "{} datagram(s) to the management host left n0 in plaintext:\n{}",
            leaked.len(),
            first_lines(&leaked, 10)
        ),
    )?;

    let from_m = lines
        .iter()
        .filter(|l| {
            endpoints(l).is_some_and(|(src, dst)| {
                (src.starts_with("10.77.0.50.") && dst == "10.77.0.1.5555")
                    || (src.starts_with("fd77::50.") && dst == "fd77::1.5555")
            })
        })
        .count();
    ensure(
        from_m == 2,
        format!(
            "the capture on the wire did not see m's two datagrams to n0 ({from_m}):\n{}",
            first_lines(&lines.iter().collect::<Vec<_>>(), 10)
        ),
    )?;
    ensure(
        accepted == 0,
        format!("the kernel took {accepted} of {attempts} sends to the management host"),
    )?;

    // What status and the metrics say, read from the kernel and the daemon.
    let bin = env!("CARGO_BIN_EXE_encryptd");
    let cfg = f.dirs[0].join("encryptd.toml");
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", f.topo.ns(0), bin, "status", "--config"])
        .arg(&cfg);
    let (_, text, _) = run_within(&mut cmd, Duration::from_secs(30)).map_err(|e| e.to_string())?;
    ensure(
        text.contains("Strict mode: on (table inet encryptd in the kernel; found removed or changed and reinstalled 5 time(s) since start)"),
        format!("status:\n{text}"),
    )?;
    let prom = f.dirs[0].join("metrics.prom");
    let ok = crate::rig::wait_for(Duration::from_secs(15), || {
        std::fs::read_to_string(&prom).is_ok_and(|m| {
            m.lines().any(|l| l == "encryptd_strict_reinstalls_total 5")
                && m.lines().any(|l| l == "encryptd_strict_enabled 1")
                && m.lines().any(|l| l == "encryptd_strict_table_present 1")
                // The drop counters, read from the kernel's table by the daemon.
                && m.lines()
                    .any(|l| l.starts_with("encryptd_strict_dropped_packets_total{rule=\""))
        })
    });
    ensure(
        ok,
        format!(
            "metrics:\n{}\n{}",
            std::fs::read_to_string(&prom).unwrap_or_default(),
            f.logs()
        ),
    )?;
    // With the table deleted and no daemon to put it back, status says so.
    f.daemons[0].take().unwrap().kill();
    f.topo.exec(0, "nft delete table inet encryptd")?;
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", f.topo.ns(0), bin, "status", "--config"])
        .arg(&cfg);
    let (st, text, _) = run_within(&mut cmd, Duration::from_secs(30)).map_err(|e| e.to_string())?;
    ensure(
        text.contains("table inet encryptd is MISSING")
            && text.starts_with("ENCRYPTD CRITICAL - ")
            && st.and_then(|s| s.code()) == Some(2),
        format!("status with the table gone (exit {st:?}):\n{text}"),
    )?;
    let ms: Vec<u128> = took.iter().map(|d| d.as_millis()).collect();
    // The bound tells the reaction to nftables' notification (tens of ms, up to a
    // second or so on a loaded 2-core machine: one fresh-clone run measured 1,380 ms)
    // from the 10 s backstop (SNAPSHOT_EVERY); the time itself is reported, not judged.
    ensure(
        took.iter().all(|d| *d <= Duration::from_secs(3)),
        format!("the table took {ms:?} ms to come back (over 3 s: not on the notification)"),
    )?;
    println!(
        "    {} mode: `nft flush ruleset` x3, protected sets flushed, an accept inserted, under a datagram every 10 ms to a protected unknown host: table back after {ms:?} ms (change returned to reinstall logged); {attempts} sends, all refused, 0 on the wire (the capture saw m's 2 of {} lines); status and metrics count 5",
        if ipsec { "IPsec" } else { "WireGuard" },
        lines.len()
    );
    Ok(())
}

/// A UDP datagram to port 5555 of each destination every 10 ms, from inside a namespace,
/// on unconnected sockets: every send takes the kernel's route, XFRM and nft path afresh
/// and cannot end the probe by failing, as ping does when its first `connect` is refused.
struct Sender {
    stop: Arc<AtomicBool>,
    attempts: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    thread: JoinHandle<Result<(), String>>,
}

impl Sender {
    /// The longest a sender runs if nobody stops it.
    const LIFETIME: Duration = Duration::from_secs(120);

    fn start(ns: &str, dsts: &[&str]) -> Result<Sender, String> {
        let path = format!("/run/netns/{ns}");
        let netns = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        let dsts: Vec<std::net::SocketAddr> = dsts
            .iter()
            .map(|d| {
                format!(
                    "{}:5555",
                    if d.contains(':') {
                        format!("[{d}]")
                    } else {
                        d.to_string()
                    }
                )
            })
            .map(|d| d.parse().map_err(|e| format!("{d}: {e}")))
            .collect::<Result<_, String>>()?;
        let stop = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (s, a, k) = (stop.clone(), attempts.clone(), accepted.clone());
        let thread = std::thread::spawn(move || {
            // SAFETY: setns on a valid fd; affects only this thread.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
            }
            let v4 = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
            let v6 = UdpSocket::bind("[::]:0").map_err(|e| e.to_string())?;
            let until = Instant::now() + Sender::LIFETIME;
            while !s.load(Ordering::Relaxed) && Instant::now() < until {
                for d in &dsts {
                    let sock = if d.is_ipv4() { &v4 } else { &v6 };
                    if sock.send_to(b"plaintext?", d).is_ok() {
                        k.fetch_add(1, Ordering::Relaxed);
                    }
                }
                a.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(())
        });
        Ok(Sender {
            stop,
            attempts,
            accepted,
            thread,
        })
    }

    /// Rounds of sends so far (one datagram to each destination per round).
    fn attempts(&self) -> usize {
        self.attempts.load(Ordering::Relaxed)
    }

    /// Stops the sender; returns its rounds and the sends the kernel took.
    fn stop(self) -> Result<(usize, usize), String> {
        self.stop.store(true, Ordering::Relaxed);
        // Bounded: the loop checks the flag every 10 ms and ends at LIFETIME regardless.
        self.thread
            .join()
            .map_err(|_| "the sender thread panicked".to_string())??;
        Ok((
            self.attempts.load(Ordering::Relaxed),
            self.accepted.load(Ordering::Relaxed),
        ))
    }
}
