//! IPsec mode end to end: real daemons, one per namespace node, build a full mesh over
//! XFRM; traffic between every pair (IPv4, IPv6, into subnets, TCP) crosses the wire only
//! as ESP, next to the hellos.

use std::time::Duration;

use crate::Case;
use crate::fleet::{Fleet, KEY1, no_plaintext, plaintext};

/// What IPsec mode may put on the wire besides ARP and neighbour discovery.
pub const IPSEC_WIRE: &[&str] = &["ESP(", ".4510: UDP"];
use crate::rig::ensure;

pub const CASES: &[Case] = &[
    ("ipsec_mesh_three_nodes", mesh_three_nodes),
    (
        "ipsec_status_names_the_peer_of_a_counter",
        status_names_the_peer_of_a_counter,
    ),
];

fn mesh_three_nodes() -> Result<(), String> {
    let mut f = Fleet::new("im", 3, KEY1)?;
    f.configure_all("\n[metrics]\npath = \"metrics.prom\"\n")?;
    for i in 0..3 {
        f.start(i)?;
    }
    f.wait_all_up(Duration::from_secs(30))
        .map_err(|e| format!("{e}\n{}", f.logs()))?;

    let lines = crate::fleet::three_node_traffic(&f)?;

    let clear = plaintext(&lines, IPSEC_WIRE);
    no_plaintext(&clear)?;
    let esp = lines.iter().filter(|l| l.contains("ESP(")).count();
    ensure(esp > 50, format!("only {esp} ESP packets on the wire"))?;
    for v in [
        "IP 10.77.0.1 > 10.77.0.2: ESP",
        "IP6 fd77::3 > fd77::1: ESP",
    ] {
        ensure(
            lines.iter().any(|l| l.contains(v)),
            format!("no `{v}` on the wire"),
        )?;
    }
    // Keys in use: 2 per peer per family.
    let states = f.xfrm_states(0)?;
    let n = states.lines().filter(|l| l.starts_with("src ")).count();
    ensure(
        n == 8,
        format!("n0 has {n} states, want 8 (2 peers x 2 families x in/out):\n{states}"),
    )?;
    // `encryptd status` in n0: both peers up, 8 keys in use, exit 0; JSON says the same.
    let cfg = f.dirs[0].join("encryptd.toml");
    let bin = env!("CARGO_BIN_EXE_encryptd");
    let text = f
        .topo
        .exec(0, &format!("{bin} status --config {}", cfg.display()))?;
    for want in [
        "Keys in use: 8",
        "Strict mode: off",
        "Current key-id: 1",
        "duplicates (other family), dropped: none",
    ] {
        ensure(
            text.contains(want),
            format!("status lacks `{want}`:\n{text}"),
        )?;
    }
    ensure(
        text.lines()
            .filter(|l| l.contains(" up ") && l.contains("key 1"))
            .count()
            == 2,
        format!("status should list 2 peers up with key 1:\n{text}"),
    )?;
    let json = f.topo.exec(
        0,
        &format!("{bin} status --json --config {}", cfg.display()),
    )?;
    ensure(
        json.contains("\"keys_in_use\": 8") && json.contains("\"daemon_running\": true"),
        format!("status --json:\n{json}"),
    )?;
    // Per peer, the bytes through its SAs now: the pings and TCP above went both ways.
    let v: serde_json::Value = serde_json::from_str(&json).map_err(|e| e.to_string())?;
    let peers = v["daemon"]["peers"].as_array().cloned().unwrap_or_default();
    ensure(
        peers.len() == 2
            && peers.iter().all(|p| {
                p["rx_bytes"].as_u64().unwrap_or(0) > 1000
                    && p["tx_bytes"].as_u64().unwrap_or(0) > 1000
            })
            && v["decryption_interfaces"]
                .as_array()
                .is_some_and(|a| !a.is_empty()),
        format!("status --json: per-peer bytes and decryption interfaces:\n{json}"),
    )?;
    // The node_exporter textfile is kept current: keys_in_use comes from the daemon's
    // last reconcile and the file is rewritten every 10 s, so wait (with a deadline)
    // for the write that has the SAs.
    let path = f.dirs[0].join("metrics.prom");
    crate::rig::wait_for(Duration::from_secs(25), || {
        std::fs::read_to_string(&path)
            .is_ok_and(|m| m.lines().any(|l| l == "encryptd_keys_in_use 8"))
    });
    let prom = std::fs::read_to_string(&path).map_err(|e| format!("metrics.prom: {e}"))?;
    for want in [
        "encryptd_peers_up 2",
        "encryptd_peer_up{peer=\"n1\"} 1",
        "encryptd_keys_in_use 8",
        "encryptd_hello_dropped_total{reason=\"replayed\"} 0",
        "encryptd_strict_enabled 0",
    ] {
        ensure(
            prom.lines().any(|l| l == want),
            format!("metrics lack `{want}`:\n{prom}"),
        )?;
    }
    ensure(
        prom.lines().any(|l| {
            l.starts_with("encryptd_build_info{version=\"") && l.ends_with(",mode=\"ipsec\"} 1")
        }) && prom
            .lines()
            .any(|l| l.starts_with("encryptd_last_update_timestamp_seconds 1")),
        format!("metrics lack build_info or the update time:\n{prom}"),
    )?;
    status_for_monitoring(&f)?;
    println!(
        "    {} packets captured, {esp} ESP, 0 plaintext",
        lines.len()
    );
    Ok(())
}

/// `encryptd status` as a monitoring check: the plugin headline and exit 0 when all is
/// well, one peer with its SAs on request, and UNKNOWN (3), not CRITICAL, for a user who
/// cannot read the daemon's state: not knowing is not an outage.
fn status_for_monitoring(f: &Fleet) -> Result<(), String> {
    let bin = env!("CARGO_BIN_EXE_encryptd");
    let cfg = f.dirs[0].join("encryptd.toml");
    let status = |args: &str| -> Result<(Option<i32>, String), String> {
        let (st, text, _) = crate::rig::run_within(
            std::process::Command::new("ip")
                .args(["netns", "exec", f.topo.ns(0), "sh", "-c"])
                .arg(format!("{args} --config {}", cfg.display())),
            Duration::from_secs(30),
        )
        .map_err(|e| e.to_string())?;
        Ok((st.and_then(|s| s.code()), text))
    };
    let (code, text) = status(&format!("{bin} status"))?;
    ensure(
        code == Some(0) && text.lines().next() == Some("ENCRYPTD OK - 2 of 2 peers up"),
        format!("status (exit {code:?}):\n{text}"),
    )?;
    let (code, text) = status(&format!("{bin} status --peer n1"))?;
    let spis = text.lines().filter(|l| l.contains(" SPI ")).count();
    ensure(
        code == Some(0) && text.contains("\n  n1 ") && !text.contains("\n  n2 ") && spis == 4,
        format!(
            "status --peer n1 should show n1 alone with its 4 SAs (exit {code:?}, {spis} SAs):\n{text}"
        ),
    )?;
    let (code, text) = status(&format!("{bin} status --peer n9"))?;
    ensure(
        code == Some(3) && text.contains("no peer n9"),
        format!("status --peer n9 (exit {code:?}):\n{text}"),
    )?;
    // The binary where an unprivileged user may run it; the config stays where it is.
    let (code, text) = status(&format!(
        "install -m 0755 {bin} /tmp/encryptd-nobody && setpriv --reuid=65534 --regid=65534 --clear-groups /tmp/encryptd-nobody status"
    ))?;
    ensure(
        code == Some(3) && text.starts_with("ENCRYPTD UNKNOWN - "),
        format!("status as nobody (exit {code:?}):\n{text}"),
    )?;
    println!(
        "    status: exit 0 `ENCRYPTD OK - 2 of 2 peers up`; --peer n1 with its 4 SAs; --peer n9 and as nobody exit 3 (UNKNOWN)"
    );
    Ok(())
}

/// Forged ESP from n1 (its daemon killed, its policies flushed, as an attacker holding
/// its address would send): n0's SA from n1 fails the integrity check.
/// `encryptd status` on n0 says XfrmInStateProtoError, names n1 (from the SA's own
/// statistics, not n2), and exits 1.
fn status_names_the_peer_of_a_counter() -> Result<(), String> {
    let mut f = Fleet::new("is", 3, KEY1)?;
    for i in 0..3 {
        f.start(i)?;
    }
    f.wait_all_up(Duration::from_secs(30))
        .map_err(|e| format!("{e}\n{}", f.logs()))?;
    f.topo.exec(1, "ping -c 2 -i 0.2 -W 2 10.77.0.1")?;
    f.daemons[1].take().unwrap().kill();
    f.topo.exec(1, "ip xfrm policy flush")?;
    let sa = f
        .topo
        .exec(1, "ip xfrm state list src 10.77.0.2 dst 10.77.0.1")?;
    let spi = sa
        .split_whitespace()
        .skip_while(|w| *w != "spi")
        .nth(1)
        .and_then(|h| u32::from_str_radix(h.trim_start_matches("0x"), 16).ok())
        .ok_or_else(|| format!("no SPI in n1's SA to n0:\n{sa}"))?;
    let script = f.dirs[1].join("forge.py");
    crate::fleet::write(
        &script,
        &format!(
            "import os, socket, struct\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 50)\n\
             for seq in range(100, 105):\n    \
                 s.sendto(struct.pack('!II', {spi}, seq) + os.urandom(64), ('10.77.0.1', 0))\n"
        ),
    )?;
    f.topo.exec(1, &format!("python3 {}", script.display()))?;

    let bin = env!("CARGO_BIN_EXE_encryptd");
    let cfg = f.dirs[0].join("encryptd.toml");
    let (status, text, _) = crate::rig::run_within(
        std::process::Command::new("ip")
            .args(["netns", "exec", f.topo.ns(0), bin, "status", "--config"])
            .arg(&cfg),
        Duration::from_secs(30),
    )
    .map_err(|e| e.to_string())?;
    let line = text
        .lines()
        .find(|l| l.contains("XfrmInStateProtoError:"))
        .unwrap_or("");
    ensure(
        status.and_then(|s| s.code()) == Some(1)
            && line.contains("(peers: n1)")
            && text.contains("PROBLEM: XfrmInStateProtoError"),
        format!("exit {status:?}, status:\n{text}"),
    )?;
    println!("    {}", line.trim());
    Ok(())
}
