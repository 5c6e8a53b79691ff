//! `encryptd status`: what the daemon last wrote to its runtime directory (peers, hello
//! counters, configuration state) joined with what the kernel says now (SAs in use,
//! sequence numbers, XFRM error counters with their meaning, strict-mode drops).
//! `--json` prints the same as one JSON object; its fields are documented in
//! docs/status.md and only ever added to.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::{self, Paths};

/// The file the daemon keeps current in `runtime_dir`.
pub const SNAPSHOT: &str = "status.json";

/// A snapshot older than this means the daemon is not running (it rewrites every 10 s).
const FRESH_SECS: u64 = 60;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerStatus {
    pub name: String,
    /// `up`, `waiting` or `stale`.
    pub state: String,
    /// Key-ids this node sends to the peer with.
    pub key_ids: Vec<u8>,
    /// Seconds since the last fresh hello (IPsec) or handshake (WireGuard), if any.
    pub last_hello_secs: Option<u64>,
    /// Bytes received from and sent to the peer: IPsec, through the SAs in the kernel
    /// now (a rotation starts them again); WireGuard, since the peer was configured.
    #[serde(default)]
    pub rx_bytes: u64,
    #[serde(default)]
    pub tx_bytes: u64,
    /// WireGuard: the peer's endpoint as the kernel has it (roaming included).
    #[serde(default)]
    pub endpoint: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Snapshot {
    pub mode: String,
    pub node: String,
    pub pid: u32,
    /// Unix time of this snapshot.
    pub written: u64,
    pub status_line: String,
    pub current_key_id: Option<u8>,
    /// Strict mode is on in the configuration (what the kernel holds, `status` reads
    /// from the kernel itself).
    pub strict: bool,
    /// How often the daemon found its table removed or changed and put it back.
    #[serde(default)]
    pub strict_reinstalls: u64,
    /// The daemon's last check found its table in the kernel (every few seconds, and at
    /// once on an nftables notification).
    #[serde(default)]
    pub strict_in_kernel: bool,
    /// Why the newest configuration files were refused, while they are.
    pub config_refused: Option<String>,
    pub peers: Vec<PeerStatus>,
    pub hello_received: u64,
    pub hello_accepted: u64,
    /// The same hello again over the peer's other address family (each is sent over
    /// every family the pair shares): neither accepted twice nor dropped.
    #[serde(default)]
    pub hello_duplicates: u64,
    pub hello_dropped: std::collections::BTreeMap<String, u64>,
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Write the snapshot for `encryptd status` (see [`crate::daemon::files`]).
pub fn write(dir: &Path, s: &Snapshot) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(s).map_err(std::io::Error::other)?;
    crate::files::replace(&dir.join(SNAPSHOT), &json, false)
}

/// The snapshot and the kernel's XFRM counters in the node_exporter textfile format.
/// Long on purpose: one metric family after another, in the file's order, each with
/// its HELP and TYPE next to the values (docs/metrics.md follows the same order).
pub fn metrics(s: &Snapshot, xfrm: &[(String, u64)]) -> String {
    let mut m = String::new();
    let mut metric = |name: &str, help: &str, ty: &str, samples: &[(String, u64)]| {
        m += &format!("# HELP encryptd_{name} {help}\n# TYPE encryptd_{name} {ty}\n");
        for (labels, v) in samples {
            m += &format!("encryptd_{name}{labels} {v}\n");
        }
    };
    let up = s.peers.iter().filter(|p| p.state == "up").count() as u64;
    metric(
        "peers",
        "Inventoried peers.",
        "gauge",
        &[(String::new(), s.peers.len() as u64)],
    );
    metric(
        "peers_up",
        "Peers with working SAs or handshakes.",
        "gauge",
        &[(String::new(), up)],
    );
    let per_peer: Vec<(String, u64)> = s
        .peers
        .iter()
        .map(|p| {
            (
                format!("{{peer=\"{}\"}}", p.name),
                u64::from(p.state == "up"),
            )
        })
        .collect();
    metric("peer_up", "1 when the peer is up.", "gauge", &per_peer);
    for (name, help, get) in [
        (
            "peer_receive_bytes",
            "Bytes received from the peer (IPsec: through the current SAs).",
            (|p: &PeerStatus| p.rx_bytes) as fn(&PeerStatus) -> u64,
        ),
        (
            "peer_transmit_bytes",
            "Bytes sent to the peer (IPsec: through the current SAs).",
            |p: &PeerStatus| p.tx_bytes,
        ),
    ] {
        let samples: Vec<(String, u64)> = s
            .peers
            .iter()
            .map(|p| (format!("{{peer=\"{}\"}}", p.name), get(p)))
            .collect();
        // Gauges, not counters: an IPsec rotation starts them again.
        metric(name, help, "gauge", &samples);
    }
    if let Some(k) = s.current_key_id {
        metric(
            "key_id",
            "Current IPsec key-id.",
            "gauge",
            &[(String::new(), u64::from(k))],
        );
    }
    metric(
        "strict",
        "1 when strict mode is on and the daemon's last check found its table in the kernel.",
        "gauge",
        &[(String::new(), u64::from(s.strict && s.strict_in_kernel))],
    );
    metric(
        "strict_reinstalls_total",
        "Times the strict table was found removed or changed by another program and put back.",
        "counter",
        &[(String::new(), s.strict_reinstalls)],
    );
    metric(
        "config_refused",
        "1 while the newest configuration files are refused.",
        "gauge",
        &[(String::new(), u64::from(s.config_refused.is_some()))],
    );
    metric(
        "hello_received_total",
        "Hello datagrams received.",
        "counter",
        &[(String::new(), s.hello_received)],
    );
    let drops: Vec<(String, u64)> = s
        .hello_dropped
        .iter()
        .map(|(k, v)| (format!("{{reason=\"{k}\"}}"), *v))
        .collect();
    metric(
        "hello_dropped_total",
        "Hello datagrams dropped, by reason.",
        "counter",
        &drops,
    );
    let x: Vec<(String, u64)> = xfrm
        .iter()
        .map(|(k, v)| (format!("{{counter=\"{k}\"}}"), *v))
        .collect();
    metric(
        "xfrm_errors_total",
        "Non-zero /proc/net/xfrm_stat counters.",
        "counter",
        &x,
    );
    m
}

/// Write the metrics file whole (node_exporter must never read half a file) and
/// readable by node_exporter's unprivileged user.
pub fn write_metrics(path: &Path, text: &str) -> std::io::Result<()> {
    crate::files::replace_readable(path, text.as_bytes())
}

/// The troubleshooting table of the seed documents, for the counters encryptd can cause.
pub fn explain(counter: &str) -> &'static str {
    match counter {
        "XfrmInError" => {
            "a decrypted packet could not be routed (destination gone) or memory ran out"
        }
        "XfrmInNoStates" => {
            "ESP arrived for an SPI this node has no SA for: a peer rebooted or re-keyed and the new SAs are being set up, or the old key was removed too early"
        }
        "XfrmInStateProtoError" => {
            "key or anti-replay sequence mismatch between nodes: a key changed without a new key-id; rotate again, properly"
        }
        "XfrmInStateInvalid" => {
            "a packet matched an SA being deleted (node removal, rotation cleanup)"
        }
        "XfrmInTmplMismatch" => {
            "a packet did not come through the SA its policy requires (plaintext from a peer, or a misconfiguration)"
        }
        "XfrmInNoPols" => "no policy for a decrypted packet: configuration bug",
        "XfrmInPolBlock" => "an inbound block policy dropped a packet",
        "XfrmOutNoStates" => {
            "traffic to a peer without SAs was dropped (not sent in plaintext): the pair is still being set up or the peer is not answering hellos"
        }
        "XfrmOutStateSeqError" => {
            "an outbound SA's sequence number reached its maximum: rotate the key"
        }
        "XfrmOutPolBlock" => {
            "strict mode's block policy dropped traffic that would have left in plaintext"
        }
        "XfrmFwdHdrError" => {
            "a decrypted packet could not be forwarded (destination gone) or memory ran out"
        }
        "XfrmInStateSeqError" => {
            "replayed or too-old sequence numbers (replay window too small for the reordering?)"
        }
        _ => "see the kernel's Documentation/networking/xfrm_proc.rst",
    }
}

/// Non-zero counters of `/proc/net/xfrm_stat` of this network namespace.
pub fn xfrm_errors() -> Vec<(String, u64)> {
    std::fs::read_to_string("/proc/net/xfrm_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (k, v) = (it.next()?, it.next()?.parse::<u64>().ok()?);
            (v > 0).then(|| (k.to_string(), v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_text_format() {
        let s = Snapshot {
            peers: vec![
                PeerStatus {
                    name: "b".into(),
                    state: "up".into(),
                    key_ids: vec![1],
                    last_hello_secs: Some(2),
                    rx_bytes: 1500,
                    tx_bytes: 900,
                    endpoint: None,
                },
                PeerStatus {
                    name: "c".into(),
                    state: "waiting".into(),
                    key_ids: vec![],
                    last_hello_secs: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    endpoint: None,
                },
            ],
            current_key_id: Some(3),
            hello_dropped: [("bad_mac".to_string(), 4)].into_iter().collect(),
            ..Snapshot::default()
        };
        let m = metrics(&s, &[("XfrmOutNoStates".into(), 7)]);
        for line in [
            "# TYPE encryptd_peers_up gauge",
            "encryptd_peers_up 1",
            "encryptd_peers 2",
            "encryptd_peer_up{peer=\"b\"} 1",
            "encryptd_peer_up{peer=\"c\"} 0",
            "encryptd_peer_receive_bytes{peer=\"b\"} 1500",
            "encryptd_peer_transmit_bytes{peer=\"b\"} 900",
            "encryptd_key_id 3",
            "encryptd_hello_dropped_total{reason=\"bad_mac\"} 4",
            "encryptd_xfrm_errors_total{counter=\"XfrmOutNoStates\"} 7",
        ] {
            assert!(m.lines().any(|l| l == line), "missing {line:?} in\n{m}");
        }
    }
}

#[derive(Debug, Serialize)]
struct Report {
    daemon: Option<Snapshot>,
    daemon_running: bool,
    decryption_interfaces: Vec<String>,
    keys_in_use: usize,
    max_seq: u64,
    max_seq_limit: u64,
    xfrm_errors: Vec<XfrmCounter>,
    strict_drops: Vec<StrictDrop>,
    /// What `status` itself found: is `table inet encryptd` in the kernel now?
    strict_table_in_kernel: bool,
    problems: Vec<String>,
}

#[derive(Debug, Serialize)]
struct XfrmCounter {
    name: String,
    value: u64,
    meaning: &'static str,
    /// The peers it most likely concerns, where that can be told.
    peers: Vec<String>,
}

#[derive(Debug, Serialize)]
struct StrictDrop {
    rule: String,
    packets: u64,
}

/// Where traffic from peers is decrypted: WireGuard, its interface; IPsec (which
/// decrypts by policy, on whatever link ESP arrives), the links holding this node's
/// inventoried addresses.
fn decryption_interfaces(cfg: &config::Config) -> Vec<String> {
    if cfg.settings.mode == config::Mode::Wireguard {
        return vec![cfg.settings.wireguard.interface.clone()];
    }
    let Ok(mut r) = crate::kernel::link::Rtnl::open() else {
        return Vec::new();
    };
    let (Ok(addrs), Ok(links)) = (r.addresses(), r.links()) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cfg
        .me()
        .addresses
        .iter()
        .filter_map(|a| addrs.iter().find(|x| x.addr == *a))
        .filter_map(|x| links.iter().find(|l| l.index == x.index))
        .map(|l| l.name.clone())
        .collect();
    names.dedup();
    names
}

/// What the kernel's IPsec SAs say per peer now: bytes (over the daemon's figures, up
/// to 10 s old) and which peers' inbound SAs counted integrity failures or replays.
#[derive(Default)]
struct SaFindings {
    integrity: std::collections::BTreeSet<String>,
    replay: std::collections::BTreeSet<String>,
}

fn ipsec_per_peer(
    cfg: &config::Config,
    ours: &[crate::objects::xfrm::DumpedState],
    peers: &mut [PeerStatus],
) -> SaFindings {
    let mut found = SaFindings::default();
    let traffic = crate::ipsec::plan::traffic(cfg, ours);
    for p in peers.iter_mut() {
        (p.rx_bytes, p.tx_bytes) = traffic.get(&p.name).copied().unwrap_or_default();
    }
    for s in ours {
        let Some((name, _, outbound)) = crate::ipsec::plan::slot_of(cfg, &s.id()) else {
            continue;
        };
        let c = &s.counters;
        if !outbound && c.integrity_failures > 0 {
            found.integrity.insert(name.clone());
        }
        if !outbound && c.replay_drops + c.replay_window_drops > 0 {
            found.replay.insert(name);
        }
    }
    found
}

/// The peers a non-zero `/proc/net/xfrm_stat` counter most likely concerns (the counter
/// itself is per namespace): from the per-SA statistics where the kernel keeps them,
/// else the peers that are not up.
fn concerned_peers(counter: &str, found: &SaFindings, not_up: &[String]) -> Vec<String> {
    match counter {
        "XfrmInStateProtoError" => found.integrity.iter().cloned().collect(),
        "XfrmInStateSeqError" => found.replay.iter().cloned().collect(),
        "XfrmOutNoStates" | "XfrmOutPolBlock" | "XfrmInNoStates" => not_up.to_vec(),
        _ => Vec::new(),
    }
}

/// WireGuard: bytes, handshake and endpoint per peer, read from the device now.
fn wireguard_traffic(cfg: &config::Config, peers: &mut [PeerStatus]) -> Result<(), String> {
    use crate::kernel::wireguard::{Wg, userspace_backend};
    let ifname = &cfg.settings.wireguard.interface;
    let link = crate::kernel::link::Rtnl::open()
        .and_then(|mut r| r.link(ifname))
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no interface {ifname}"))?;
    let userspace = userspace_backend(ifname, link.kind.as_deref())
        .ok_or_else(|| format!("interface {ifname} is not a WireGuard device"))?;
    let mut wg = Wg::open(ifname, userspace).map_err(|e| e.to_string())?;
    let dev = wg.device(ifname).map_err(|e| e.to_string())?;
    let now = SystemTime::now();
    for kp in &dev.peers {
        let Some(node) = cfg
            .inventory
            .nodes
            .iter()
            .find(|n| n.wireguard_public_key == Some(kp.public_key))
        else {
            continue;
        };
        if let Some(p) = peers.iter_mut().find(|p| p.name == node.name) {
            p.rx_bytes = kp.rx_bytes;
            p.tx_bytes = kp.tx_bytes;
            p.endpoint = kp.endpoint.map(|e| e.to_string());
            p.last_hello_secs = kp
                .last_handshake
                .and_then(|t| now.duration_since(t).ok())
                .map(|d| d.as_secs());
        }
    }
    Ok(())
}

pub fn main(paths: &Paths, json: bool) -> i32 {
    let r = report(paths);
    if json {
        println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
    } else {
        print_text(&r);
    }
    i32::from(!r.problems.is_empty())
}

/// What status shows: the daemon's snapshot, brought up to date with what the kernel
/// says now (SAs, the WireGuard device, xfrm_stat, the strict table), and the problems.
fn report(paths: &Paths) -> Report {
    // The snapshot is found even when the files are broken (that is when status matters).
    let cfg = config::load(paths).ok();
    let dir = cfg.as_ref().map_or_else(
        || PathBuf::from("/run/encryptd"),
        |c| c.settings.runtime_dir.clone(),
    );
    let mut daemon: Option<Snapshot> = std::fs::read(dir.join(SNAPSHOT))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let running = daemon
        .as_ref()
        .is_some_and(|d| now_secs().saturating_sub(d.written) < FRESH_SECS);
    let mut problems = snapshot_problems(daemon.as_ref(), running, &dir);
    let (keys_in_use, max_seq, findings) = kernel_sas(cfg.as_ref(), daemon.as_mut(), &mut problems);
    if let (Some(d), Some(c)) = (daemon.as_mut(), cfg.as_ref())
        && c.settings.mode == config::Mode::Wireguard
        && let Err(e) = wireguard_traffic(c, &mut d.peers)
    {
        problems.push(format!("cannot read the WireGuard device: {e}"));
    }
    let xfrm_errors = xfrm_counters(daemon.as_ref(), &findings, &mut problems);
    let (strict_table_in_kernel, strict_drops) = strict_in_kernel(daemon.as_ref(), &mut problems);
    Report {
        daemon,
        daemon_running: running,
        decryption_interfaces: cfg.as_ref().map(decryption_interfaces).unwrap_or_default(),
        keys_in_use,
        max_seq,
        // ESN: 64-bit sequence numbers.
        max_seq_limit: u64::MAX,
        xfrm_errors,
        strict_drops,
        strict_table_in_kernel,
        problems,
    }
}

/// The daemon not running (no snapshot, or a stale one), peers not up, a refused
/// configuration.
fn snapshot_problems(daemon: Option<&Snapshot>, running: bool, dir: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    match daemon {
        None => problems.push(format!(
            "no status from the daemon in {}: is it running?",
            dir.display()
        )),
        Some(_) if !running => {
            problems.push("the daemon's status is older than 60 s: it is not running".into())
        }
        Some(_) => {}
    }
    if let Some(d) = daemon {
        for p in d.peers.iter().filter(|p| p.state != "up") {
            problems.push(format!("peer {} is {}", p.name, p.state));
        }
        if let Some(r) = &d.config_refused {
            problems.push(format!("newest configuration refused: {r}"));
        }
    }
    problems
}

/// encryptd's SAs in the kernel now: how many, the highest sequence number sent, and
/// (IPsec mode) each peer's bytes and counter findings into the snapshot's peers.
fn kernel_sas(
    cfg: Option<&config::Config>,
    daemon: Option<&mut Snapshot>,
    problems: &mut Vec<String>,
) -> (usize, u64, SaFindings) {
    match crate::kernel::xfrm::Xfrm::open().and_then(|mut x| x.dump_states()) {
        Ok(states) => {
            let ours: Vec<_> = states.into_iter().filter(|s| s.is_ours()).collect();
            let mut findings = SaFindings::default();
            if let (Some(d), Some(c)) = (daemon, cfg)
                && c.settings.mode == config::Mode::Ipsec
            {
                findings = ipsec_per_peer(c, &ours, &mut d.peers);
            }
            let max_seq = ours.iter().map(|s| s.counters.oseq).max().unwrap_or(0);
            (ours.len(), max_seq, findings)
        }
        Err(e) => {
            problems.push(format!("cannot read XFRM states: {e}"));
            (0, 0, SaFindings::default())
        }
    }
}

/// The non-zero xfrm_stat counters, each with its meaning and the peers it most likely
/// concerns; the two that mean broken keys are problems.
fn xfrm_counters(
    daemon: Option<&Snapshot>,
    findings: &SaFindings,
    problems: &mut Vec<String>,
) -> Vec<XfrmCounter> {
    let not_up: Vec<String> = daemon
        .iter()
        .flat_map(|d| {
            d.peers
                .iter()
                .filter(|p| p.state != "up")
                .map(|p| p.name.clone())
        })
        .collect();
    let counters: Vec<XfrmCounter> = xfrm_errors()
        .into_iter()
        .map(|(name, value)| XfrmCounter {
            meaning: explain(&name),
            peers: concerned_peers(&name, findings, &not_up),
            name,
            value,
        })
        .collect();
    for c in &counters {
        if matches!(
            c.name.as_str(),
            "XfrmInStateProtoError" | "XfrmOutStateSeqError"
        ) {
            problems.push(format!("{} = {}: {}", c.name, c.value, c.meaning));
        }
    }
    counters
}

/// Whether table inet encryptd is in the kernel (a problem when the daemon has strict
/// mode on and it is not), and its drop counters.
fn strict_in_kernel(
    daemon: Option<&Snapshot>,
    problems: &mut Vec<String>,
) -> (bool, Vec<StrictDrop>) {
    let nft = crate::kernel::nft::Nft::default();
    let in_kernel = matches!(nft.list(), Ok(Some(_)));
    if daemon.is_some_and(|d| d.strict) && !in_kernel {
        problems.push(
            "strict mode is on, but table inet encryptd is not in the kernel: nothing stops plaintext to the protected ranges (the daemon puts it back within a second when it runs)".into(),
        );
    }
    let drops = nft
        .counters()
        .map(|cs| {
            cs.into_iter()
                .filter_map(|c| {
                    Some(StrictDrop {
                        rule: format!("{}/{}", c.chain, c.comment?),
                        packets: c.packets,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    (in_kernel, drops)
}

/// Bytes for people: 1023 B, 1.5 KiB, 12.0 MiB.
fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The report for people. Long on purpose: the sections in the order they are shown,
/// one after another, so that the code reads as the output does.
fn print_text(r: &Report) {
    match &r.daemon {
        Some(d) => {
            println!("Mode: {} (node {}, pid {})", d.mode, d.node, d.pid);
            println!("Status: {}", d.status_line);
            if let Some(k) = d.current_key_id {
                println!("Current key-id: {k}");
            }
            let reinstalled = if d.strict_reinstalls > 0 {
                format!(
                    "; found removed or changed and reinstalled {} time(s) since start",
                    d.strict_reinstalls
                )
            } else {
                String::new()
            };
            match (d.strict, r.strict_table_in_kernel) {
                (true, true) => {
                    println!("Strict mode: on (table inet encryptd in the kernel{reinstalled})")
                }
                (true, false) => println!(
                    "Strict mode: on, but table inet encryptd is MISSING from the kernel{reinstalled}"
                ),
                (false, _) => println!("Strict mode: off"),
            }
            if !r.decryption_interfaces.is_empty() {
                println!(
                    "Decryption interface(s): {}",
                    r.decryption_interfaces.join(", ")
                );
            }
            println!("Peers:");
            let wireguard = d.mode == "wireguard";
            for p in &d.peers {
                let seen = p
                    .last_hello_secs
                    .map_or("never".to_string(), |s| format!("{s} s ago"));
                let traffic = format!("rx {}  tx {}", human(p.rx_bytes), human(p.tx_bytes));
                if wireguard {
                    println!(
                        "  {:<20} {:<8} handshake {seen:<10} {traffic}  endpoint {}",
                        p.name,
                        p.state,
                        p.endpoint.as_deref().unwrap_or("-")
                    );
                } else {
                    let keys: Vec<String> = p.key_ids.iter().map(u8::to_string).collect();
                    println!(
                        "  {:<20} {:<8} key {:<6} last hello {seen:<10} {traffic}",
                        p.name,
                        p.state,
                        if keys.is_empty() {
                            "-".into()
                        } else {
                            keys.join(",")
                        }
                    );
                }
            }
            let dropped: Vec<String> = d
                .hello_dropped
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            if !wireguard {
                println!(
                    "Hellos: {} received, {} accepted, {} duplicates (other family), dropped: {}",
                    d.hello_received,
                    d.hello_accepted,
                    d.hello_duplicates,
                    if dropped.is_empty() {
                        "none".into()
                    } else {
                        dropped.join(", ")
                    }
                );
            }
        }
        None => println!("Daemon: no status"),
    }
    // IPsec's keys and sequence numbers mean nothing in WireGuard mode (the kernel's
    // WireGuard keeps its keys to itself); XFRM's error counters are shown in both, as
    // IPsec objects of others may be in the same namespace.
    if r.daemon.as_ref().is_none_or(|d| d.mode != "wireguard") {
        println!("Keys in use: {}", r.keys_in_use);
        println!("Max Seq. Number: {:#x}/{:#x}", r.max_seq, r.max_seq_limit);
    }
    println!(
        "Errors: {}",
        r.xfrm_errors.iter().map(|c| c.value).sum::<u64>()
    );
    for c in &r.xfrm_errors {
        let peers = if c.peers.is_empty() {
            String::new()
        } else {
            format!(" (peers: {})", c.peers.join(", "))
        };
        println!("  {}: {} — {}{peers}", c.name, c.value, c.meaning);
    }
    if !r.strict_drops.is_empty() {
        println!("Strict-mode drops:");
        for d in &r.strict_drops {
            println!("  {}: {} packets", d.rule, d.packets);
        }
    }
    for p in &r.problems {
        println!("PROBLEM: {p}");
    }
}
