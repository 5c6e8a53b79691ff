//! The strict table cannot silently vanish: another program runs `nft flush ruleset`
//! (what `systemctl restart nftables` does on Debian) three times on n0, while n0 pings a
//! management host in a protected range that is in no inventory (m: 10.77.0.50,
//! fd77::50) every 10 ms. The daemon puts its table back within a second each time, says
//! so in its log, `encryptd status` and the metrics, and no ping leaves in plaintext,
//! not even in the gap between the flush and the reinstall (IPsec: the XFRM block policy;
//! WireGuard: the blackhole routes of encryptd's routing table).

use std::time::{Duration, Instant};

use crate::Case;
use crate::fleet::{Fleet, KEY1, Kind, STRICT, first_lines};
use crate::rig::{endpoints, ensure, finish_child, run_within};

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
    f.add_management_host()?;
    f.start_all(Duration::from_secs(30))?;

    let cap = f.topo.capture("icmp or icmp6")?;
    let mut pings = Vec::new();
    for dst in ["10.77.0.50", "fd77::50"] {
        pings.push(
            f.topo
                .exec_bg(0, &format!("ping -i 0.01 -c 6000 -W 1 {dst}"))?,
        );
    }
    let mut took = Vec::new();
    for round in 1..=3 {
        std::thread::sleep(Duration::from_millis(700));
        let t0 = Instant::now();
        f.topo.exec(0, "nft flush ruleset")?;
        let flushed = t0.elapsed();
        let d = f.daemon(0);
        d.wait_log(
            &format!("reinstalled ({round} time(s) since start)"),
            Duration::from_secs(5),
        )
        .map_err(|e| format!("round {round}: {e}"))?;
        let back = t0.elapsed();
        ensure(
            f.topo.exec(0, "nft list table inet encryptd").is_ok(),
            format!("round {round}: the daemon said it reinstalled the table, but it is not there"),
        )?;
        took.push(back.saturating_sub(flushed));
    }
    std::thread::sleep(Duration::from_millis(500));
    for mut p in pings {
        // SAFETY: kill(2) of our own child (the shell running ping in n0).
        unsafe { libc::kill(p.id() as i32, libc::SIGKILL) };
        finish_child(&mut p, Duration::from_secs(10), "ping")?;
    }
    let lines = cap.stop();
    // n0's pings to m on the wire would be plaintext: there must be none.
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
            "{} ping(s) to the management host left n0 in plaintext:\n{}",
            leaked.len(),
            first_lines(&leaked, 10)
        ),
    )?;

    // What status and the metrics say, read from the kernel and the daemon.
    let bin = env!("CARGO_BIN_EXE_encryptd");
    let cfg = f.dirs[0].join("encryptd.toml");
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", f.topo.ns(0), bin, "status", "--config"])
        .arg(&cfg);
    let (_, text, _) = run_within(&mut cmd, Duration::from_secs(30)).map_err(|e| e.to_string())?;
    ensure(
        text.contains("Strict mode: on (table inet encryptd in the kernel; found removed or changed and reinstalled 3 time(s) since start)"),
        format!("status:\n{text}"),
    )?;
    let prom = f.dirs[0].join("metrics.prom");
    let ok = crate::rig::wait_for(Duration::from_secs(15), || {
        std::fs::read_to_string(&prom).is_ok_and(|m| {
            m.lines().any(|l| l == "encryptd_strict_reinstalls_total 3")
                && m.lines().any(|l| l == "encryptd_strict 1")
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
        text.contains("table inet encryptd is MISSING") && st.is_some_and(|s| !s.success()),
        format!("status with the table gone (exit {st:?}):\n{text}"),
    )?;
    let ms: Vec<u128> = took.iter().map(|d| d.as_millis()).collect();
    ensure(
        took.iter().all(|d| *d <= Duration::from_secs(1)),
        format!("the table took {ms:?} ms to come back (over 1 s)"),
    )?;
    println!(
        "    {} mode: `nft flush ruleset` x3 under 10 ms pings to a protected unknown host: table back after {ms:?} ms (flush returned to reinstall logged), 0 plaintext of {} ICMP lines; status and metrics count 3",
        if ipsec { "IPsec" } else { "WireGuard" },
        lines.len()
    );
    Ok(())
}
