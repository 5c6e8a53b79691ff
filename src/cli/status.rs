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

/// Past this many peers the text lists only those not up (with the counts by state),
/// unless `--verbose`: 499 lines of `up` hide the one that is not.
const PEER_LIST_MAX: usize = 20;

/// What `status` was asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    pub json: bool,
    /// Every peer, with its SAs (SPI, direction, age, bytes).
    pub verbose: bool,
    /// Only this peer: its line, and its problems among the node's own.
    pub peer: Option<String>,
}

/// The monitoring-plugin convention (Nagios, Icinga, Sensu): the exit code is the worst
/// finding. Ordered as monitoring-plugins' `max_state_alt`, so that a CRITICAL is never
/// hidden behind an UNKNOWN (an unreadable counter next to a dead daemon).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Health {
    Ok,
    Unknown,
    Warning,
    Critical,
}

impl Health {
    pub fn exit_code(self) -> i32 {
        match self {
            Health::Ok => 0,
            Health::Warning => 1,
            Health::Critical => 2,
            Health::Unknown => 3,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Health::Ok => "OK",
            Health::Warning => "WARNING",
            Health::Critical => "CRITICAL",
            Health::Unknown => "UNKNOWN",
        }
    }
}

/// One thing that needs attention, and how much.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub health: Health,
    pub problem: String,
}

fn problem(health: Health, text: impl Into<String>) -> Problem {
    Problem {
        health,
        problem: text.into(),
    }
}

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
    /// IPsec: seconds since the pair has been between keys (SAs under more than one
    /// key-id, or none under the current one); `None` when it is not.
    #[serde(default)]
    pub rotating_secs: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// The daemon's version (`encryptd --version`): after an upgrade, a daemon not yet
    /// restarted shows the old one.
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub commit: String,
    pub mode: String,
    pub node: String,
    pub pid: u32,
    /// Unix time of this snapshot.
    pub written: u64,
    pub status_line: String,
    pub current_key_id: Option<u8>,
    /// A pair between keys longer than this is a WARNING (`key_rotation_duration` and a
    /// minute for the hellos); 0: not judged.
    #[serde(default)]
    pub rotation_limit_secs: u64,
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
    /// Hellos the kernel dropped because the daemon's socket buffer was full (a flood
    /// faster than it reads): not in `hello_received`.
    #[serde(default)]
    pub hello_socket_overflows: u64,
    /// IPsec: encryptd's SAs in the kernel, and the highest sequence number sent on
    /// any, at the daemon's last reconcile.
    #[serde(default)]
    pub keys_in_use: u64,
    /// IPsec: SAs re-keyed at their soft limit (age or packets) since the daemon started.
    #[serde(default)]
    pub sa_rekeys: u64,
    /// IPsec: dumps of the kernel's XFRM policies or states since the daemon started
    /// (an idle daemon reads the counters every 60 s and everything every
    /// `resync_interval`; notifications say when to read more).
    #[serde(default)]
    pub xfrm_dumps: u64,
    /// WireGuard: reads of the links, addresses, routes and rules since the daemon
    /// started (rtnetlink's notifications say when; every 5 min regardless).
    #[serde(default)]
    pub rtnl_dumps: u64,
    #[serde(default)]
    pub max_seq: u64,
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

/// Every counter of `/proc/net/xfrm_stat` of this network namespace (none when the
/// kernel has no XFRM statistics).
pub fn xfrm_stat() -> Vec<(String, u64)> {
    std::fs::read_to_string("/proc/net/xfrm_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse::<u64>().ok()?))
        })
        .collect()
}

/// The non-zero counters of `/proc/net/xfrm_stat`.
pub fn xfrm_errors() -> Vec<(String, u64)> {
    xfrm_stat().into_iter().filter(|(_, v)| *v > 0).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn peer(name: &str, state: &str) -> PeerStatus {
        PeerStatus {
            name: name.into(),
            state: state.into(),
            key_ids: vec![1],
            last_hello_secs: Some(2),
            rx_bytes: 0,
            tx_bytes: 0,
            endpoint: None,
            rotating_secs: None,
        }
    }

    pub(crate) fn snapshot(peers: Vec<PeerStatus>) -> Snapshot {
        Snapshot {
            mode: "ipsec".into(),
            version: "0.1.0".into(),
            written: 1_700_000_000,
            peers,
            ..Snapshot::default()
        }
    }

    fn worst(problems: &[Problem]) -> Health {
        problems
            .iter()
            .map(|p| p.health)
            .max()
            .unwrap_or(Health::Ok)
    }

    #[test]
    fn a_rotation_that_does_not_finish_is_a_warning_naming_the_peers() {
        let mut b = peer("b", "up");
        b.key_ids = vec![1];
        b.rotating_secs = Some(400);
        let mut c = peer("c", "up");
        c.rotating_secs = Some(30);
        let mut d = snapshot(vec![b, c]);
        d.current_key_id = Some(2);
        // Unjudged without a limit (an older daemon's snapshot, or WireGuard).
        assert_eq!(snapshot_problems(Some(&d), true), vec![]);
        d.rotation_limit_secs = 360;
        let p = snapshot_problems(Some(&d), true);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].health, Health::Warning);
        assert!(
            p[0].problem
                .contains("key rotation to key 2 in progress for longer than 360 s")
                && p[0].problem.contains("b (for 400 s, on key [1])")
                && !p[0].problem.contains("c ("),
            "{}",
            p[0].problem
        );
    }

    #[test]
    fn the_exit_code_follows_the_monitoring_plugin_convention() {
        let all_up = snapshot(vec![peer("b", "up"), peer("c", "up")]);
        assert_eq!(snapshot_problems(Some(&all_up), true), vec![]);
        // One peer of many waiting: a WARNING, named.
        let one_down = snapshot(vec![peer("b", "up"), peer("c", "waiting")]);
        assert_eq!(
            snapshot_problems(Some(&one_down), true),
            vec![problem(Health::Warning, "peer c is waiting")]
        );
        // No peer up at all: CRITICAL, for one peer as for many.
        for peers in [
            vec![peer("b", "stale")],
            vec![peer("b", "waiting"), peer("c", "stale")],
        ] {
            let p = snapshot_problems(Some(&snapshot(peers)), true);
            assert_eq!(worst(&p), Health::Critical, "{p:?}");
            assert!(p[0].problem.starts_with("no peer is up: b ("), "{p:?}");
        }
        // A daemon that stopped: CRITICAL whatever its last peers said.
        let p = snapshot_problems(Some(&all_up), false);
        assert_eq!(worst(&p), Health::Critical);
        assert!(p[0].problem.contains("is not running"), "{p:?}");
        // Running on the last good files while the newest are refused: a WARNING.
        let refused = Snapshot {
            config_refused: Some("nodes.toml:3:1: bad".into()),
            ..all_up.clone()
        };
        assert_eq!(
            worst(&snapshot_problems(Some(&refused), true)),
            Health::Warning
        );
        // The order that picks the exit code: a CRITICAL is not hidden by an UNKNOWN.
        assert!(Health::Critical > Health::Warning && Health::Warning > Health::Unknown);
        assert!(Health::Unknown > Health::Ok);
        let codes: Vec<i32> = [
            Health::Ok,
            Health::Warning,
            Health::Critical,
            Health::Unknown,
        ]
        .iter()
        .map(|h| h.exit_code())
        .collect();
        assert_eq!(codes, [0, 1, 2, 3]);
    }

    #[test]
    fn five_hundred_peers_one_line_each_only_when_not_up() {
        let mut peers: Vec<PeerStatus> = (0..499).map(|i| peer(&format!("n{i}"), "up")).collect();
        for i in [37, 40, 41] {
            peers[i].state = "waiting".into();
        }
        peers[99].state = "stale".into();
        let p = snapshot_problems(Some(&snapshot(peers.clone())), true);
        assert_eq!(
            p,
            vec![problem(
                Health::Warning,
                "4 of 499 peers are not up: n37 (waiting), n40 (waiting), n41 (waiting), n99 (stale)"
            )]
        );
        assert_eq!(peer_counts(&peers), "495 of 499 up, 1 stale, 3 waiting");
        // Past ten, the rest are counted, not listed.
        for p in peers.iter_mut().take(30) {
            p.state = "waiting".into();
        }
        let p = snapshot_problems(Some(&snapshot(peers)), true);
        assert!(
            p[0].problem
                .starts_with("34 of 499 peers are not up: n0 (waiting), ")
        );
        assert!(
            p[0].problem.ends_with(", n9 (waiting), and 24 more"),
            "{p:?}"
        );
    }

    #[test]
    fn the_first_line_is_the_worst_finding() {
        let r = |findings: Vec<Problem>| Report {
            health: worst(&findings),
            status_version: "0",
            daemon: Some(snapshot(vec![peer("b", "up")])),
            daemon_running: true,
            decryption_interfaces: vec![],
            keys_in_use: 0,
            max_seq: 0,
            max_seq_limit: 0,
            xfrm_errors: vec![],
            strict_drops: vec![],
            strict_table_in_kernel: false,
            sas: vec![],
            problems: vec![],
            findings,
        };
        assert_eq!(headline(&r(vec![])), "ENCRYPTD OK - 1 of 1 peers up");
        assert_eq!(
            headline(&r(vec![
                problem(Health::Critical, "strict table gone"),
                problem(Health::Warning, "peer c is waiting"),
            ])),
            "ENCRYPTD CRITICAL - strict table gone (and 1 more)"
        );
    }
}

#[derive(Debug, Serialize)]
struct Report {
    /// The worst of `findings` (OK without any): what the exit code says.
    health: Health,
    /// This `encryptd status`'s own version (the daemon's is in `daemon.version`).
    status_version: &'static str,
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
    /// With `--verbose`: encryptd's SAs, by peer.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    sas: Vec<SaLine>,
    /// The text of each finding (kept from before `findings`, for old readers).
    problems: Vec<String>,
    findings: Vec<Problem>,
}

/// One of encryptd's SAs, as `--verbose` lists it.
#[derive(Debug, Serialize)]
struct SaLine {
    peer: String,
    direction: &'static str,
    spi: String,
    key_id: u8,
    family: &'static str,
    age_secs: u64,
    /// Seconds until the soft limit (the re-key, made by the SA's receiver), and the
    /// packet count it is also re-keyed at; `None`: no limit (an SA of an older version).
    rekey_in_secs: Option<u64>,
    rekey_at_packets: Option<u64>,
    bytes: u64,
    packets: u64,
    /// Outbound: the highest sequence number sent; inbound: the highest received.
    seq: u64,
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

pub fn main(paths: &Paths, opts: &Options) -> i32 {
    let r = report(paths, opts);
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
    } else {
        print_text(&r, opts);
    }
    r.health.exit_code()
}

/// What status shows: the daemon's snapshot, brought up to date with what the kernel
/// says now (SAs, the WireGuard device, xfrm_stat, the strict table), and the findings.
fn report(paths: &Paths, opts: &Options) -> Report {
    // The snapshot is found even when the files are broken (that is when status matters):
    // then the runtime directory is read from the settings alone.
    let loaded = config::load(paths);
    let dir = match &loaded {
        Ok(c) => c.settings.runtime_dir.clone(),
        Err(_) => runtime_dir_alone(&paths.config),
    };
    let cfg: Option<&config::Config> = loaded.as_ref().ok();
    let mut problems = Vec::new();
    let mut daemon = read_snapshot(&dir, &mut problems);
    if daemon.is_none() && problems.is_empty() {
        problems.push(match &loaded {
            Ok(_) => problem(
                Health::Critical,
                format!(
                    "no status from the daemon in {}: is it running?",
                    dir.display()
                ),
            ),
            // Not knowing where the daemon writes is not knowing that it is down.
            Err(d) => problem(
                Health::Unknown,
                format!(
                    "no status in {}, and the configuration cannot be read ({}): run status as root",
                    dir.display(),
                    d.first().map_or_else(String::new, ToString::to_string)
                ),
            ),
        });
    }
    let running = daemon.as_ref().is_some_and(|d| {
        now_secs().saturating_sub(d.written) < FRESH_SECS && process_exists(d.pid)
    });
    if let Some(d) = daemon.as_mut()
        && let Some(name) = &opts.peer
    {
        d.peers.retain(|p| &p.name == name);
        if d.peers.is_empty() {
            problems.push(problem(
                Health::Unknown,
                format!("no peer {name} in the daemon's status"),
            ));
        }
    }
    problems.extend(snapshot_problems(daemon.as_ref(), running));
    let (keys_in_use, max_seq, findings, sas) =
        kernel_sas(cfg, daemon.as_mut(), opts, &mut problems);
    if let (Some(d), Some(c)) = (daemon.as_mut(), cfg.as_ref())
        && c.settings.mode == config::Mode::Wireguard
        && let Err(e) = wireguard_traffic(c, &mut d.peers)
    {
        problems.push(problem(
            Health::Unknown,
            format!("cannot read the WireGuard device: {e}"),
        ));
    }
    let xfrm_errors = xfrm_counters(daemon.as_ref(), &findings, &mut problems);
    let (strict_table_in_kernel, strict_drops) = strict_in_kernel(daemon.as_ref(), &mut problems);
    // Worst first: the first line of the text and a monitoring check show that one.
    problems.sort_by_key(|p| std::cmp::Reverse(p.health));
    Report {
        health: problems
            .iter()
            .map(|p| p.health)
            .max()
            .unwrap_or(Health::Ok),
        status_version: crate::VERSION,
        daemon,
        daemon_running: running,
        decryption_interfaces: cfg.map(decryption_interfaces).unwrap_or_default(),
        keys_in_use,
        max_seq,
        // ESN: 64-bit sequence numbers.
        max_seq_limit: u64::MAX,
        xfrm_errors,
        strict_drops,
        strict_table_in_kernel,
        sas,
        problems: problems.iter().map(|p| p.problem.clone()).collect(),
        findings: problems,
    }
}

/// `runtime_dir` from the configuration's settings, whatever else is wrong with the
/// files (a bad inventory, an unreadable key file); the default when even that fails.
fn runtime_dir_alone(config: &Path) -> PathBuf {
    match std::fs::read_to_string(config) {
        Ok(text) => {
            let src = crate::config::diag::Source::new(config, &text);
            config::settings::read(&src, &crate::config::diag::Diags::default()).runtime_dir
        }
        Err(_) => PathBuf::from("/run/encryptd"),
    }
}

/// The daemon's snapshot. Missing is the daemon's problem (CRITICAL, below); unreadable
/// (not root: the runtime directory is 0700) is status's own (UNKNOWN).
fn read_snapshot(dir: &Path, problems: &mut Vec<Problem>) -> Option<Snapshot> {
    let path = dir.join(SNAPSHOT);
    match std::fs::read(&path) {
        Ok(b) => match serde_json::from_slice(&b) {
            Ok(s) => Some(s),
            Err(e) => {
                problems.push(problem(
                    Health::Unknown,
                    format!("cannot parse {}: {e}", path.display()),
                ));
                None
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            problems.push(problem(
                Health::Unknown,
                format!("cannot read {}: {e} (run status as root)", path.display()),
            ));
            None
        }
    }
}

/// A snapshot rewritten 5 s ago by a daemon that crashed since is not a running daemon.
fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The daemon not running (no snapshot, a stale one, or its process gone), peers not
/// up, a refused configuration. Pure: the rules docs/status.md writes down.
fn snapshot_problems(daemon: Option<&Snapshot>, running: bool) -> Vec<Problem> {
    let mut problems = Vec::new();
    let Some(d) = daemon else {
        return problems;
    };
    if !running {
        problems.push(problem(
            Health::Critical,
            format!(
                "the daemon (pid {}) is not running: its last status is {} s old",
                d.pid,
                now_secs().saturating_sub(d.written)
            ),
        ));
    }
    let down: Vec<&PeerStatus> = d.peers.iter().filter(|p| p.state != "up").collect();
    if down.len() == 1 && d.peers.len() > 1 {
        problems.push(problem(
            Health::Warning,
            format!("peer {} is {}", down[0].name, down[0].state),
        ));
    } else if !down.is_empty() {
        const NAMED: usize = 10;
        let mut names: Vec<String> = down
            .iter()
            .take(NAMED)
            .map(|p| format!("{} ({})", p.name, p.state))
            .collect();
        if down.len() > NAMED {
            names.push(format!("and {} more", down.len() - NAMED));
        }
        let (health, what) = if down.len() == d.peers.len() {
            (Health::Critical, "no peer is up".to_string())
        } else {
            (
                Health::Warning,
                format!("{} of {} peers are not up", down.len(), d.peers.len()),
            )
        };
        problems.push(problem(health, format!("{what}: {}", names.join(", "))));
    }
    let stuck: Vec<String> = d
        .peers
        .iter()
        .filter_map(|p| {
            let s = p.rotating_secs?;
            (d.rotation_limit_secs > 0 && s > d.rotation_limit_secs)
                .then(|| format!("{} (for {s} s, on key {:?})", p.name, p.key_ids))
        })
        .collect();
    if !stuck.is_empty() {
        let to = d
            .current_key_id
            .map_or(String::new(), |k| format!(" to key {k}"));
        problems.push(problem(
            Health::Warning,
            format!(
                "key rotation{to} in progress for longer than {} s with {} peer(s): {}; \
                 does every node hold the new key?",
                d.rotation_limit_secs,
                stuck.len(),
                stuck
                    .iter()
                    .take(10)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    if let Some(r) = &d.config_refused {
        problems.push(problem(
            Health::Warning,
            format!("newest configuration refused (running on the last good one): {r}"),
        ));
    }
    problems
}

/// encryptd's SAs in the kernel now: how many, the highest sequence number sent, and
/// (IPsec mode) each peer's bytes and counter findings into the snapshot's peers.
fn kernel_sas(
    cfg: Option<&config::Config>,
    daemon: Option<&mut Snapshot>,
    opts: &Options,
    problems: &mut Vec<Problem>,
) -> (usize, u64, SaFindings, Vec<SaLine>) {
    match crate::kernel::xfrm::Xfrm::open().and_then(|mut x| x.dump_states()) {
        Ok(states) => {
            let ours: Vec<_> = states.into_iter().filter(|s| s.is_ours()).collect();
            let mut findings = SaFindings::default();
            let mut sas = Vec::new();
            if let (Some(d), Some(c)) = (daemon, cfg)
                && c.settings.mode == config::Mode::Ipsec
            {
                findings = ipsec_per_peer(c, &ours, &mut d.peers);
                if opts.verbose || opts.peer.is_some() {
                    sas = sa_lines(c, &ours, &d.peers);
                }
            }
            let max_seq = ours.iter().map(|s| s.counters.oseq).max().unwrap_or(0);
            (ours.len(), max_seq, findings, sas)
        }
        Err(e) => {
            problems.push(problem(
                Health::Unknown,
                format!("cannot read XFRM states: {e}"),
            ));
            (0, 0, SaFindings::default(), Vec::new())
        }
    }
}

/// The SAs of the peers shown, by peer, outbound first (as `swanctl --list-sas` shows
/// each child SA).
fn sa_lines(
    cfg: &config::Config,
    ours: &[crate::objects::xfrm::DumpedState],
    peers: &[PeerStatus],
) -> Vec<SaLine> {
    let now = now_secs();
    let mut lines: Vec<SaLine> = ours
        .iter()
        .filter_map(|s| {
            let id = s.id();
            let (peer, (_, key_id), outbound) = crate::ipsec::plan::slot_of(cfg, &id)?;
            peers.iter().any(|p| p.name == peer).then(|| SaLine {
                peer,
                direction: if outbound { "out" } else { "in" },
                spi: format!("{:08x}", id.spi),
                key_id,
                family: if id.src.is_ipv4() { "IPv4" } else { "IPv6" },
                age_secs: now.saturating_sub(s.counters.add_time),
                rekey_in_secs: s
                    .state
                    .lifetime
                    .soft_secs
                    .map(|t| t.saturating_sub(now.saturating_sub(s.counters.add_time))),
                rekey_at_packets: s.state.lifetime.soft_packets,
                bytes: s.counters.bytes,
                packets: s.counters.packets,
                seq: if outbound {
                    s.counters.oseq
                } else {
                    s.counters.seq
                },
            })
        })
        .collect();
    lines.sort_by(|a, b| {
        (&a.peer, b.direction, a.family, a.key_id).cmp(&(&b.peer, a.direction, b.family, b.key_id))
    });
    lines
}

/// The non-zero xfrm_stat counters, each with its meaning and the peers it most likely
/// concerns; the two that mean broken keys are problems.
fn xfrm_counters(
    daemon: Option<&Snapshot>,
    findings: &SaFindings,
    problems: &mut Vec<Problem>,
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
            // WARNING, not CRITICAL: the counters never go down, so one bad event
            // would otherwise page for ever.
            problems.push(problem(
                Health::Warning,
                format!("{} = {}: {}", c.name, c.value, c.meaning),
            ));
        }
    }
    counters
}

/// Whether table inet encryptd is in the kernel (a problem when the daemon has strict
/// mode on and it is not), and its drop counters.
fn strict_in_kernel(
    daemon: Option<&Snapshot>,
    problems: &mut Vec<Problem>,
) -> (bool, Vec<StrictDrop>) {
    let nft = crate::kernel::nft::Nft::default();
    let strict = daemon.is_some_and(|d| d.strict);
    // None: status could not read the table (not root), which is not knowing.
    let listed = nft.list();
    let in_kernel = match &listed {
        Ok(t) => Some(t.is_some()),
        Err(e) => {
            if strict {
                problems.push(problem(
                    Health::Unknown,
                    format!("cannot read table inet encryptd: {e}"),
                ));
            }
            None
        }
    };
    if strict && in_kernel == Some(false) {
        problems.push(problem(
            Health::Critical,
            "strict mode is on, but table inet encryptd is not in the kernel: nothing stops plaintext to the protected ranges (the daemon puts it back within a second when it runs)",
        ));
    }
    let in_kernel = in_kernel.unwrap_or(false);
    // From the same listing: one `nft` run, not two.
    let drops = listed
        .ok()
        .flatten()
        .and_then(|listing| listing.counters().ok())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|c| {
            Some(StrictDrop {
                rule: format!("{}/{}", c.chain, c.comment?),
                packets: c.packets,
            })
        })
        .collect();
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
fn print_text(r: &Report, opts: &Options) {
    println!("{}", headline(r));
    match &r.daemon {
        Some(d) => {
            println!(
                "Mode: {} (node {}, pid {}, encryptd {} commit {})",
                d.mode,
                d.node,
                d.pid,
                or_unknown(&d.version),
                or_unknown(&d.commit)
            );
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
            let wireguard = d.mode == "wireguard";
            let all = opts.verbose || opts.peer.is_some() || d.peers.len() <= PEER_LIST_MAX;
            if all {
                println!("Peers:");
            } else {
                println!("Peers: {} (--verbose lists all)", peer_counts(&d.peers));
            }
            for p in d.peers.iter().filter(|p| all || p.state != "up") {
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
                for sa in r.sas.iter().filter(|s| s.peer == p.name) {
                    let rekey = match (sa.rekey_in_secs, sa.rekey_at_packets) {
                        (Some(t), Some(n)) => format!("  rekey in {t} s or at {n} packets"),
                        (Some(t), None) => format!("  rekey in {t} s"),
                        (None, Some(n)) => format!("  rekey at {n} packets"),
                        (None, None) => "  no lifetime".into(),
                    };
                    println!(
                        "      {:<3} SPI {} key {} {:<4} age {} s  {} bytes  {} packets  seq {:#x}{rekey}",
                        sa.direction,
                        sa.spi,
                        sa.key_id,
                        sa.family,
                        sa.age_secs,
                        sa.bytes,
                        sa.packets,
                        sa.seq
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
                    "Hellos: {} received, {} accepted, {} duplicates (other family), dropped: {}{}",
                    d.hello_received,
                    d.hello_accepted,
                    d.hello_duplicates,
                    if dropped.is_empty() {
                        "none".into()
                    } else {
                        dropped.join(", ")
                    },
                    if d.hello_socket_overflows > 0 {
                        format!(
                            "; {} lost at the full socket buffer (a flood)",
                            d.hello_socket_overflows
                        )
                    } else {
                        String::new()
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
        if let Some(d) = &r.daemon {
            println!(
                "SA rekeys: {} (at the soft limit, since the daemon started)",
                d.sa_rekeys
            );
        }
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
    for p in &r.findings {
        println!("PROBLEM: {} ({})", p.problem, p.health.as_str());
    }
}

/// The first line, in the monitoring-plugin form `SERVICE STATE - text`: the worst
/// finding, or the peer count when all is well.
fn headline(r: &Report) -> String {
    let text = match r.findings.first() {
        Some(p) if r.findings.len() > 1 => {
            format!("{} (and {} more)", p.problem, r.findings.len() - 1)
        }
        Some(p) => p.problem.clone(),
        None => r.daemon.as_ref().map_or_else(String::new, |d| {
            format!("{} peers up", peer_counts(&d.peers))
        }),
    };
    format!("ENCRYPTD {} - {text}", r.health.as_str())
}

/// A daemon from before the field was added wrote none.
fn or_unknown(s: &str) -> &str {
    if s.is_empty() { "?" } else { s }
}

/// `3 of 4 up, 1 waiting`.
fn peer_counts(peers: &[PeerStatus]) -> String {
    let mut by: std::collections::BTreeMap<&str, usize> = Default::default();
    for p in peers {
        *by.entry(p.state.as_str()).or_default() += 1;
    }
    let up = by.remove("up").unwrap_or(0);
    let mut out = format!("{up} of {}", peers.len());
    if by.is_empty() {
        return out;
    }
    out += " up";
    for (state, n) in by {
        out += &format!(", {n} {state}");
    }
    out
}
