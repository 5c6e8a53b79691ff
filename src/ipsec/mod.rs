//! IPsec mode: the hello socket, each peer's state, and reconciling XFRM with the plan.
//! The daemon's poll loop calls `on_readable` when the hello socket has data and `tick`
//! at `next_deadline`; every change ends in `apply`, which diffs the plan against the
//! kernel and sends only the difference.

pub mod apply;
pub mod derive;
pub mod drops;
pub mod hello;
pub mod ledger;
pub mod peer;
pub mod plan;
pub mod reconcile;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};

use self::derive::BootId;
use self::drops::HelloStats;
use self::hello::Family;
use self::ledger::{SpiLedger, Start};
use self::peer::{Local, Peer, Slot};
use crate::config::Config;
use crate::kernel::xfrm::{Xfrm, XfrmError, XfrmWatch};
use crate::objects::xfrm::StateId;

/// Hello interval while a pair is not settled (not up, stale, or an SA draining), and the
/// keepalive of a settled one. What changes (a boot, a rotation, an offer, a lost SA) is
/// sent at once whatever the interval; the keepalive only says "still here", so it is
/// slow: at 10,000 peers, 100 s is 200 datagrams a second each way (one per family).
/// Spread ±10% by peer, so that a fleet started together does not send together.
const HELLO_FAST: Duration = Duration::from_secs(1);
const HELLO_SLOW: Duration = Duration::from_secs(100);
/// A peer that was up and has been silent this long, its SAs' receive counters still,
/// is `stale` (its SAs stay): two keepalives and a half.
const STALE_AFTER: Duration = Duration::from_secs(250);
/// How often the byte and packet counters of our SAs are read (status, metrics), which
/// also finds SAs past their soft limit whose expiry notice was lost.
/// A minute: at 10,000 peers a dump of the SAs is 0.7 s of a TCG guest's CPU (see
/// docs/benchmarks.md), so an idle daemon's reads stay under 1/20 of what the 5 s rescan
/// cost.
const COUNTERS_EVERY: Duration = Duration::from_secs(60);
/// ... and this soon after an apply changed SAs (status and metrics count them).
const COUNTERS_AFTER_CHANGE: Duration = Duration::from_secs(1);
/// At most this many SA ids are remembered as used (see `Engine::installed`).
const MAX_INSTALLED_MEMORY: usize = 1 << 16;
/// Datagrams read per socket per wake-up: a flood waits its turn behind the timers
/// (hellos due, re-keys, the rescan) instead of starving them.
const READ_BUDGET: usize = 128;
/// Answers to one peer at most this often: a flood of authentic but stale hellos
/// (recorded and replayed) earns at most 50 answers a second, not one each.
const MIN_ANSWER_GAP: Duration = Duration::from_millis(20);
/// See `on_datagram`: the answers to a peer in a hurry while we think the pair settled.
const HURRY_ANSWER_GAP: Duration = Duration::from_secs(2);
/// The SPI ledger's file in `state_dir`.
const LEDGER_FILE: &str = "spi-ledger";
/// Dropped hellos are reported in one log line per burst: this long after the first
/// drop, and at most once per `DROP_REPORT_EVERY`.
const DROP_REPORT_DELAY: Duration = Duration::from_secs(1);
const DROP_REPORT_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the boot ID from {path}: {reason}")]
    BootId { path: String, reason: String },
    #[error("hello socket on {addr}: {source}")]
    Socket { addr: SocketAddr, source: io::Error },
    #[error("XFRM notifications: {0}")]
    Watch(io::Error),
    #[error(transparent)]
    Xfrm(#[from] XfrmError),
}

pub struct Engine {
    boot: BootId,
    xfrm: Xfrm,
    /// The hello sockets: IPv4, and IPv6 where the host has it.
    sockets: Vec<UdpSocket>,
    /// The kernel's XFRM notifications: expiries (when to re-key) and other programs'
    /// changes (when to read the kernel again).
    watch: XfrmWatch,
    /// The kernel holds what the last apply left, as far as its notifications tell:
    /// nothing expired, nobody else changed an SA or a policy, none was lost. While it
    /// does, an apply whose plan is the one applied last reads nothing from the kernel.
    in_sync: bool,
    /// A fingerprint of the plan (policies and states, keys included) the last apply
    /// made the kernel hold; keyed per process, so it says nothing about the keys.
    applied: Option<u64>,
    fingerprint_key: std::collections::hash_map::RandomState,
    /// Dumps of the kernel's policies and states sent since the start.
    pub dumps: u64,
    /// The SA keys of the plan, each derived once (emptied by a new configuration).
    pub key_cache: plan::KeyCache,
    /// Every peer's hello keys, derived once per configuration.
    hello_keys: drops::HelloKeys,
    /// A socket still had datagrams when its read budget ran out: read on at once, after
    /// the timers.
    backlog: bool,
    /// When the last hello went to each peer (answers are spaced by `MIN_ANSWER_GAP`).
    last_hello: BTreeMap<String, Instant>,
    /// When the counters last showed bytes from each peer (it is alive: no need to hear
    /// its keepalive), and bytes to it (it sees us: no need to send ours).
    rx_moved: BTreeMap<String, Instant>,
    tx_moved: BTreeMap<String, Instant>,
    /// The keepalive each settled peer's next hello was scheduled as: a hello brought
    /// forward since (an answer, a change) is no keepalive and is always sent.
    keepalive_at: BTreeMap<String, Instant>,
    /// SAs re-keyed at their soft limit since the start.
    pub rekeys: u64,
    pub peers: BTreeMap<String, Peer>,
    next_hello: BTreeMap<String, Instant>,
    /// Old key slots to delete at a time (key rotation).
    retire: BTreeMap<String, (Instant, Vec<Slot>)>,
    /// The next full read of the kernel regardless of notifications (`resync_interval`),
    /// and the next read of the SA counters.
    next_resync: Instant,
    next_counters: Instant,
    /// Our SAs this process has seen in the kernel, deleted ones included: an SA that
    /// vanishes, or that the hello exchange would bring back, is re-keyed under a new SPI,
    /// never installed again under one it used (same key, sequence numbers from 1).
    installed: BTreeSet<StateId>,
    /// Where new inbound SPIs come from: never one twice in a boot (see `ledger`).
    ledger: SpiLedger,
    /// Per peer, (bytes received, bytes sent) through encryptd's SAs at the last read.
    traffic: BTreeMap<String, (u64, u64)>,
    /// Our SAs in the kernel and the highest sequence number sent, at the last apply.
    pub sa_summary: (u64, u64),
    pub stats: HelloStats,
    /// Drops already in the log, when the next report is due, and when the last was.
    drops_reported: BTreeMap<&'static str, u64>,
    drop_report_at: Option<Instant>,
    last_drop_report: Option<Instant>,
    /// Since when each pair has been between keys (see `PeerStatus::rotating_secs`).
    rotating_since: BTreeMap<String, Instant>,
    /// Peers already logged as up, to log transitions once.
    up: BTreeMap<String, bool>,
}

fn read_boot(cfg: &Config) -> Result<BootId, Error> {
    let path = &cfg.settings.boot_id_path;
    let err = |reason: String| Error::BootId {
        path: path.display().to_string(),
        reason,
    };
    let s = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    derive::parse_boot_id(&s).ok_or_else(|| err("not a UUID".into()))
}

/// This node's hello addresses: its endpoint in each family it has one in. The hello
/// sockets are bound to exactly these, so that a hello reaches the daemon only at the
/// address peers know it by (not at another address of the host, on another network),
/// and leaves from it.
fn hello_addrs(cfg: &Config) -> Vec<SocketAddr> {
    let me = cfg.me();
    [Family::V4, Family::V6]
        .into_iter()
        .filter_map(|f| plan::endpoint(me, f))
        .map(|ip| SocketAddr::new(ip, cfg.settings.ipsec.hello_port))
        .collect()
}

/// The hello sockets, one per address of `addrs` (a socket policy is per family): their
/// datagrams, and only theirs, bypass the tunnel policies, so hellos pass before any SA
/// exists and no other program's datagrams to the port pass in plaintext.
fn bind(addrs: &[SocketAddr]) -> Result<Vec<UdpSocket>, Error> {
    addrs
        .iter()
        .map(|a| {
            let err = |source| Error::Socket { addr: *a, source };
            let s = udp_bound(*a).map_err(err)?;
            s.set_nonblocking(true).map_err(err)?;
            crate::kernel::xfrm::bypass_socket(s.as_raw_fd(), a.is_ipv6()).map_err(err)?;
            Ok(s)
        })
        .collect()
}

/// A UDP socket bound to `addr`, IPv6 only for an IPv6 address. With `IP_FREEBIND`: at
/// boot the daemon may start before the network has configured the address, and the
/// socket receives once it appears.
fn udp_bound(addr: SocketAddr) -> io::Result<UdpSocket> {
    use std::os::fd::FromRawFd;
    let set = |fd, level, name| {
        let one: libc::c_int = 1;
        // SAFETY: setsockopt reads one c_int from a live local.
        let r = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    let af = if addr.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    // SAFETY: a plain socket call; the fd is wrapped (and so closed on every path) at once.
    let fd = unsafe { libc::socket(af, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket that nothing else owns.
    let sock = unsafe { UdpSocket::from_raw_fd(fd) };
    let r = match addr {
        SocketAddr::V4(a) => {
            set(fd, libc::IPPROTO_IP, libc::IP_FREEBIND)?;
            let sa = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: `sa` is a valid sockaddr_in that outlives the call.
            unsafe {
                libc::bind(
                    fd,
                    (&sa as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            }
        }
        SocketAddr::V6(a) => {
            set(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)?;
            set(fd, libc::IPPROTO_IPV6, libc::IPV6_FREEBIND)?;
            // SAFETY: all-zero is a valid sockaddr_in6.
            let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sa.sin6_port = a.port().to_be();
            sa.sin6_addr.s6_addr = a.ip().octets();
            sa.sin6_scope_id = a.scope_id();
            // SAFETY: `sa` is a valid sockaddr_in6 that outlives the call.
            unsafe {
                libc::bind(
                    fd,
                    (&sa as *const libc::sockaddr_in6).cast(),
                    std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            }
        }
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

impl Engine {
    /// Open the kernel and the socket, adopt the SAs a previous run left, install the
    /// policies before anything else.
    pub fn start(cfg: &Config) -> Result<Engine, Error> {
        let boot = read_boot(cfg)?;
        let xfrm = Xfrm::open()?;
        let sockets = bind(&hello_addrs(cfg))?;
        let watch = XfrmWatch::open(xfrm.port()).map_err(Error::Watch)?;
        let ledger_path = cfg.settings.state_dir.join(LEDGER_FILE);
        let mut e = Engine {
            boot,
            xfrm,
            sockets,
            watch,
            in_sync: false,
            applied: None,
            fingerprint_key: std::collections::hash_map::RandomState::new(),
            dumps: 0,
            key_cache: plan::KeyCache::default(),
            hello_keys: drops::HelloKeys::default(),
            backlog: false,
            last_hello: BTreeMap::new(),
            rx_moved: BTreeMap::new(),
            tx_moved: BTreeMap::new(),
            keepalive_at: BTreeMap::new(),
            rekeys: 0,
            peers: BTreeMap::new(),
            next_hello: BTreeMap::new(),
            retire: BTreeMap::new(),
            next_resync: Instant::now() + cfg.settings.ipsec.resync_interval,
            next_counters: Instant::now() + COUNTERS_EVERY,
            installed: BTreeSet::new(),
            // Opened below, once the adopted SAs are known.
            ledger: SpiLedger::unopened(),
            traffic: BTreeMap::new(),
            sa_summary: (0, 0),
            stats: HelloStats::default(),
            drops_reported: BTreeMap::new(),
            drop_report_at: None,
            last_drop_report: None,
            up: BTreeMap::new(),
            rotating_since: BTreeMap::new(),
        };
        e.sync_peers(cfg);
        let adopted = e.adopt(cfg)?;
        if adopted > 0 {
            info!("adopted {adopted} SAs from the kernel");
        }
        // Opened once the adopted SAs are known: the counter starts above them.
        let kernel_max = e
            .peers
            .values()
            .flat_map(|p| p.inbound.values())
            .map(|sa| sa.spi)
            .max();
        let random = u32::from_ne_bytes(crate::random::bytes());
        let (ledger, how) =
            SpiLedger::open(&ledger_path, &cfg.settings.node, &boot, kernel_max, random);
        let path = ledger_path.display();
        match how {
            Start::Continued => debug!("SPI ledger {path}: continuing this boot's counter"),
            Start::NewBoot => info!("SPI ledger {path}: a new boot, the counter starts over"),
            Start::Lost(why) if kernel_max.is_none() && why == ledger::NO_LEDGER => {
                info!("SPI ledger {path}: {why}; starting one")
            }
            Start::Lost(why) => warn!(
                "SPI ledger {path}: {why}; new SPIs start at random above the kernel's, and \
                 that they never repeat an SPI used earlier in this boot rests on chance"
            ),
        }
        e.ledger = ledger;
        e.apply(cfg)?;
        Ok(e)
    }

    /// One `Peer` per inventoried peer: new ones added, removed ones dropped.
    fn sync_peers(&mut self, cfg: &Config) {
        let me = &cfg.settings.node;
        let names: std::collections::HashSet<String> =
            cfg.inventory.peers(me).map(|n| n.name.clone()).collect();
        // The keys may have changed as well as the peers.
        self.hello_keys = drops::HelloKeys::new(cfg);
        self.peers.retain(|n, _| names.contains(n));
        self.last_hello.retain(|n, _| names.contains(n));
        self.rx_moved.retain(|n, _| names.contains(n));
        self.tx_moved.retain(|n, _| names.contains(n));
        self.keepalive_at.retain(|n, _| names.contains(n));
        self.next_hello.retain(|n, _| names.contains(n));
        self.retire.retain(|n, _| names.contains(n));
        let now = Instant::now();
        for n in names {
            self.peers
                .entry(n.clone())
                .or_insert_with(|| Peer::new(&n, crate::random::bytes()));
            self.next_hello.entry(n).or_insert(now);
        }
    }

    /// Put SAs found in the kernel back into their peers' slots (a restart of the daemon
    /// keeps the kernel's SAs and their sequence numbers).
    fn adopt(&mut self, cfg: &Config) -> Result<usize, Error> {
        let mut n = 0;
        self.dumps += 1;
        for d in self.xfrm.dump_states()?.into_iter().filter(|d| d.is_ours()) {
            let Some((peer, slot, outbound)) = plan::slot_of(cfg, &d.id()) else {
                continue;
            };
            let Some(p) = self.peers.get_mut(&peer) else {
                continue;
            };
            // The peer's boot ID is learned from its next hello; until then the
            // adopted SA's epoch is unknown (zeros) and is checked against the key then.
            if outbound {
                p.outbound.insert(
                    slot,
                    crate::ipsec::peer::OutSa {
                        spi: d.state.spi,
                        peer_boot: [0; 16],
                    },
                );
            } else {
                let sa = crate::ipsec::peer::InSa {
                    spi: d.state.spi,
                    bound: [0; 16],
                    peer_boot: [0; 16],
                    confirmed: false,
                };
                // Two in one slot: a re-key was under way. SPIs only go up (the ledger),
                // so the higher is the successor; the other drains as before.
                let older = match p.inbound.get(&slot) {
                    Some(cur) if cur.spi > sa.spi => Some(sa),
                    _ => p.inbound.insert(slot, sa),
                };
                if let Some(old) = older {
                    p.draining.push(crate::ipsec::peer::Draining {
                        slot,
                        sa: old,
                        release_at: None,
                    });
                }
            }
            n += 1;
        }
        Ok(n)
    }

    /// Key-ids this node makes new SAs with towards `peer`: never older than the newest
    /// one it already sends with (no going back after a rotation).
    fn key_ids_for(cfg: &Config, peer: &Peer) -> Vec<u8> {
        let ids: Vec<u8> = cfg
            .keys
            .as_ref()
            .map(|k| k.entries.iter().map(|e| e.id).collect())
            .unwrap_or_default();
        let newest_used = ids
            .iter()
            .rposition(|id| peer.outbound.keys().any(|(_, k)| k == id));
        match newest_used {
            Some(i) => ids[i..].to_vec(),
            None => ids,
        }
    }

    fn families(cfg: &Config, peer: &str) -> Vec<Family> {
        match cfg.inventory.node(peer) {
            Some(p) => plan::families(cfg.me(), p),
            None => Vec::new(),
        }
    }

    /// Make the kernel match the plan. Returns the number of objects changed. While the
    /// kernel is in sync (see the field) and the plan is the one applied last, nothing
    /// is read from the kernel: an idle daemon's passes cost a plan, not two dumps.
    pub fn apply(&mut self, cfg: &Config) -> Result<usize, Error> {
        let mut planned = None;
        if self.in_sync {
            let policies = plan::policies(cfg);
            let states = plan::states_cached(cfg, &self.boot, &self.peers, &mut self.key_cache);
            if self.applied == Some(self.fingerprint(&policies, &states)) {
                self.note_rotations(cfg);
                return Ok(0);
            }
            planned = Some((policies, states));
        }
        // Out of sync until this pass has made the kernel match.
        self.in_sync = false;
        let r = self.apply_read(cfg, planned);
        if r.is_err() {
            self.applied = None;
        }
        r
    }

    fn fingerprint(
        &self,
        policies: &[crate::objects::xfrm::XfrmPolicy],
        states: &plan::DesiredStates,
    ) -> u64 {
        use std::hash::{BuildHasher, Hash, Hasher};
        let mut h = self.fingerprint_key.build_hasher();
        policies.hash(&mut h);
        states.hash(&mut h);
        h.finish()
    }

    /// The kernel's SA counters, for status and metrics; SAs past their soft limit
    /// whose notice was lost make the next pass a full one.
    fn read_counters(&mut self, cfg: &Config) -> Result<(), Error> {
        self.dumps += 1;
        let ks = self.xfrm.dump_states()?;
        self.note_counters(cfg, &ks);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if !plan::due_for_rekey(cfg, &self.peers, &ks, now).is_empty() {
            self.in_sync = false;
        }
        Ok(())
    }

    fn note_counters(&mut self, cfg: &Config, ks: &[crate::objects::xfrm::DumpedState]) {
        let traffic = plan::traffic(cfg, ks.iter().filter(|s| s.is_ours()));
        let now = Instant::now();
        for (peer, (rx, tx)) in &traffic {
            // Grown, not just changed: a re-keyed SA starts again from 0.
            let (rx0, tx0) = self
                .traffic
                .get(peer)
                .copied()
                .unwrap_or((u64::MAX, u64::MAX));
            if *rx > rx0 {
                self.rx_moved.insert(peer.clone(), now);
            }
            if *tx > tx0 {
                self.tx_moved.insert(peer.clone(), now);
            }
        }
        self.traffic = traffic;
        let ours = ks.iter().filter(|s| s.is_ours());
        let max_seq = ours.clone().map(|s| s.counters.oseq).max();
        self.sa_summary = (ours.count() as u64, max_seq.unwrap_or(0));
    }

    /// The full pass: read the kernel, re-key what is due, diff, apply. `planned`: the
    /// plan the caller already made, still good unless a re-key changes it.
    fn apply_read(
        &mut self,
        cfg: &Config,
        planned: Option<(Vec<crate::objects::xfrm::XfrmPolicy>, plan::DesiredStates)>,
    ) -> Result<usize, Error> {
        self.dumps += 2;
        let kp = self.xfrm.dump_policies()?;
        let ks = self.xfrm.dump_states()?;
        let rekeys = self.rekeys;
        self.rekey_due(cfg, &ks);
        let (policies, states) = match planned {
            Some(p) if self.rekeys == rekeys => p,
            _ => (
                plan::policies(cfg),
                plan::states_cached(cfg, &self.boot, &self.peers, &mut self.key_cache),
            ),
        };
        let in_kernel: BTreeSet<StateId> =
            ks.iter().filter(|s| s.is_ours()).map(|s| s.id()).collect();
        self.note_counters(cfg, &ks);
        self.installed.extend(in_kernel.iter().copied());
        self.note_rotations(cfg);
        let ops = reconcile::diff(&policies, &states, &kp, &ks, &self.installed);
        self.handle_gaps(cfg, &ops);
        // SAs deleted on purpose stay remembered too: their SPIs are never used again.
        // A bound on the memory: beyond it only what is desired or in the kernel stays.
        if self.installed.len() > MAX_INSTALLED_MEMORY {
            self.installed
                .retain(|id| states.contains_key(id) || in_kernel.contains(id));
        }
        let print = self.fingerprint(&policies, &states);
        if ops.is_empty() {
            self.applied = Some(print);
            self.in_sync = true;
            return Ok(0);
        }
        // Remembered before they are sent: an SA whose add failed half-way is re-keyed
        // under a new SPI, never re-sent under this one.
        self.installed.extend(ops.add_states.iter().map(|s| s.id()));
        apply::apply(&mut self.xfrm, &ops)?;
        // The counters (SAs in use, bytes) as they are after this change, soon.
        self.next_counters = self
            .next_counters
            .min(Instant::now() + COUNTERS_AFTER_CHANGE);
        // What a gap changed (a re-key under a new SPI) is a new plan: the next pass
        // applies it, reading the kernel again.
        self.applied = Some(print);
        self.in_sync = true;
        debug!(
            "xfrm: +{} ~{} -{} policies, +{} ~{} -{} states",
            ops.add_policies.len(),
            ops.update_policies.len(),
            ops.delete_policies.len(),
            ops.add_states.len(),
            ops.update_states.len(),
            ops.delete_states.len()
        );
        Ok(ops.changes())
    }

    /// Our inbound SAs past their soft limit get a successor, offered at once; the old one
    /// stays until the peer sends on the new (see `Peer::rekey_inbound`).
    fn rekey_due(&mut self, cfg: &Config, ks: &[crate::objects::xfrm::DumpedState]) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        for (peer, slot, spi) in plan::due_for_rekey(cfg, &self.peers, ks, now) {
            let Some(new_spi) = self.ledger.take(slot.1) else {
                continue;
            };
            let Some(p) = self.peers.get_mut(&peer) else {
                continue;
            };
            if p.rekey_inbound(slot, spi, new_spi) {
                self.rekeys += 1;
                info!(peer = peer.as_str(), spi = spi; "SA 0x{spi:08x} from {peer} reached its soft limit; offering 0x{new_spi:08x} in its place");
                self.next_hello.insert(peer, Instant::now());
            }
        }
    }

    /// SAs that vanished from the kernel, or whose key is not what the plan derives (an
    /// adopted SA from an older epoch): never re-created under the same SPI. Outbound:
    /// a new nonce makes the peer offer a new SPI; inbound: a new SPI is offered.
    fn handle_gaps(&mut self, cfg: &Config, ops: &reconcile::Ops) {
        for id in ops.missing.iter().chain(&ops.conflicts) {
            let Some((peer, slot, outbound)) = plan::slot_of(cfg, id) else {
                continue;
            };
            let Some(p) = self.peers.get_mut(&peer) else {
                continue;
            };
            if p.is_draining(id.spi) {
                // A replaced SA that reached its hard limit: it was on its way out.
                debug!("replaced SA {id} expired");
                p.release_drained(Instant::now(), &[id.spi]);
                continue;
            }
            warn!(peer = peer.as_str(), spi = id.spi; "SA {id} is gone or stale; re-keying it");
            if outbound {
                p.outbound_lost(slot, crate::random::bytes());
            } else {
                p.inbound.remove(&slot);
            }
            self.next_hello.insert(peer, Instant::now());
        }
    }

    /// Up once, and nothing heard from it since `STALE_AFTER`: no fresh hello, no bytes.
    fn is_stale(&self, name: &str, p: &Peer, now: Instant) -> bool {
        let heard = p
            .last_fresh
            .into_iter()
            .chain(self.rx_moved.get(name).copied())
            .max();
        heard.is_some_and(|t| now.duration_since(t) > STALE_AFTER)
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        let retire = self.retire.values().map(|(t, _)| *t);
        let drained = self.peers.values().filter_map(Peer::next_release);
        self.next_hello
            .values()
            .copied()
            .chain(retire)
            .chain(drained)
            .chain(self.backlog.then(Instant::now))
            .chain(self.drop_report_at)
            .chain([self.next_resync, self.next_counters])
            .min()
    }

    fn send_hello(&mut self, cfg: &Config, peer: &str) {
        let me = cfg.me();
        let Some(node) = cfg.inventory.node(peer) else {
            return;
        };
        let fams = plan::families(me, node);
        let ids = self
            .peers
            .get(peer)
            .map(|p| Self::key_ids_for(cfg, p))
            .unwrap_or_default();
        let bits = cfg
            .keys
            .iter()
            .flat_map(|k| k.entries.iter())
            .fold(0u16, |b, e| b | 1 << e.id);
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        let local = Local {
            boot: &self.boot,
            key_ids: &ids,
            families: &fams,
        };
        let hellos = p.hellos(&me.name, &local, bits);
        let Some(refs) = self.hello_keys.tx(peer) else {
            return;
        };
        self.last_hello.insert(peer.to_string(), Instant::now());
        for h in hellos {
            let bytes = h.encode(&refs);
            for f in &fams {
                let Some(ip) = plan::endpoint(node, *f) else {
                    continue;
                };
                let to = SocketAddr::new(ip, cfg.settings.ipsec.hello_port);
                let sock = self
                    .sockets
                    .iter()
                    .find(|s| s.local_addr().is_ok_and(|a| a.is_ipv4() == to.is_ipv4()));
                let Some(sock) = sock else {
                    debug!("hello to {peer} at {to}: no socket of that family");
                    continue;
                };
                if let Err(e) = sock.send_to(&bytes, to) {
                    debug!("hello to {peer} at {to}: {e}");
                }
            }
        }
    }

    /// Read every pending datagram. Returns whether the plan may have changed.
    pub fn on_readable(&mut self, cfg: &Config) -> bool {
        let ev = self.watch.drain();
        if ev.any() {
            debug!(
                "xfrm: {} soft and {} hard SA expiries, {} changes by other programs{}",
                ev.soft,
                ev.hard,
                ev.foreign,
                if ev.lost { ", some notices lost" } else { "" }
            );
            self.in_sync = false;
        }
        // The reconcile the caller runs re-keys what is due and notices what is gone.
        let mut changed = ev.any();
        let mut buf = [0u8; hello::MAX_LEN + 1];
        self.backlog = false;
        for i in 0..self.sockets.len() {
            for read in 0.. {
                if read == READ_BUDGET {
                    self.backlog = true;
                    break;
                }
                let (n, from) = match self.sockets[i].recv_from(&mut buf) {
                    Ok(x) => x,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        warn!("hello socket: {e}");
                        break;
                    }
                };
                self.stats.received += 1;
                changed |= self.on_datagram(cfg, &buf[..n], from.ip());
            }
        }
        if self.drop_report_at.is_none() && self.stats.dropped != self.drops_reported {
            let now = Instant::now();
            let soonest = self.last_drop_report.map(|t| t + DROP_REPORT_EVERY);
            self.drop_report_at = Some(soonest.map_or(now, |t| t.max(now)) + DROP_REPORT_DELAY);
        }
        changed
    }

    /// One line for the drops since the last report, by reason.
    fn report_drops(&mut self, now: Instant) {
        self.drop_report_at = None;
        self.last_drop_report = Some(now);
        let new: Vec<(&str, u64)> = self
            .stats
            .dropped
            .iter()
            .map(|(k, v)| (*k, v - self.drops_reported.get(k).copied().unwrap_or(0)))
            .filter(|(_, d)| *d > 0)
            .collect();
        let n: u64 = new.iter().map(|(_, d)| d).sum();
        let total: u64 = self.stats.dropped.values().sum();
        let why: Vec<String> = new.iter().map(|(k, d)| format!("{k} {d}")).collect();
        warn!(
            "hello: dropped {n} datagram(s) ({}); {total} since start",
            why.join(", ")
        );
        self.drops_reported = self.stats.dropped.clone();
    }

    fn on_datagram(&mut self, cfg: &Config, bytes: &[u8], from: IpAddr) -> bool {
        let h = match drops::admit(cfg, &self.hello_keys, bytes, from) {
            Ok(h) => h,
            Err(why) => {
                self.stats.drop(why);
                return false;
            }
        };
        let sender = h.sender.clone();
        let fams = Self::families(cfg, &sender);
        let Some(p) = self.peers.get_mut(&sender) else {
            return false;
        };
        let ids = Self::key_ids_for(cfg, p);
        let heard_before = p.last_fresh;
        let local = Local {
            boot: &self.boot,
            key_ids: &ids,
            families: &fams,
        };
        let ledger = &mut self.ledger;
        let mut spi = |k: u8| ledger.take(k);
        let mut nonce = crate::random::bytes::<16>;
        let outcome = p.on_hello(
            &h,
            plan::family(&from),
            &local,
            Instant::now(),
            &mut spi,
            &mut nonce,
        );
        if outcome.duplicate {
            self.stats.duplicates += 1;
            return false;
        }
        if outcome.replayed {
            self.stats.drop("replayed");
            return false;
        }
        self.stats.accepted += 1;
        if let Some(Some(_)) = outcome.boot_changed {
            warn!(peer = sender.as_str(); "peer {sender} rebooted: replacing the pair's SAs with fresh keys");
        }
        // Answer at once whenever the exchange is not settled, so a pair converges in a
        // few round trips instead of a few intervals.
        let up = p.is_up(&fams);
        // A peer sending faster than keepalives is not settled, whatever we think of the
        // pair: it waits for something of ours, which our next keepalive would carry only
        // in 100 s. Answered too, at most every `HURRY_ANSWER_GAP`, and only when we sent
        // nothing in that time, so that two such answers never chase each other.
        let now = Instant::now();
        let in_a_hurry = heard_before.is_some_and(|t| now.duration_since(t) < HELLO_SLOW / 2)
            && self
                .last_hello
                .get(&sender)
                .is_none_or(|t| now.duration_since(*t) >= HURRY_ANSWER_GAP);
        if outcome.wants_answer() || !up || in_a_hurry {
            let at = self
                .last_hello
                .get(&sender)
                .map_or(now, |t| (*t + MIN_ANSWER_GAP).max(now));
            let next = self.next_hello.entry(sender.clone()).or_insert(at);
            *next = (*next).min(at);
        }
        self.note_up(&sender, up);
        self.schedule_retirement(cfg, &sender);
        outcome.sas_changed || outcome.boot_changed.is_some()
    }

    /// Start or stop the clock of each pair that is between keys: SAs under more than
    /// one key-id, or none under the current one (the peer lacks it, or has not moved).
    fn note_rotations(&mut self, cfg: &Config) {
        let current = cfg.keys.as_ref().and_then(|k| k.current()).map(|k| k.id);
        let now = Instant::now();
        for (name, p) in &self.peers {
            let ids: BTreeSet<u8> = p
                .outbound
                .keys()
                .chain(p.inbound.keys())
                .map(|(_, k)| *k)
                .collect();
            let between =
                ids.len() > 1 || current.is_some_and(|c| !ids.is_empty() && !ids.contains(&c));
            if between {
                self.rotating_since.entry(name.clone()).or_insert(now);
            } else {
                self.rotating_since.remove(name);
            }
        }
        self.rotating_since
            .retain(|n, _| self.peers.contains_key(n));
    }

    fn note_up(&mut self, peer: &str, up: bool) {
        let was = self.up.insert(peer.to_string(), up).unwrap_or(false);
        if up && !was {
            info!(peer = peer; "peer {peer} up");
        } else if !up && was {
            warn!(peer = peer; "peer {peer} down");
        }
    }

    /// Once a pair sends with the newest key in every family and the peer confirmed it,
    /// the older keys' SAs go after `key_rotation_duration`.
    fn schedule_retirement(&mut self, cfg: &Config, peer: &str) {
        let fams = Self::families(cfg, peer);
        let Some(p) = self.peers.get(peer) else {
            return;
        };
        let Some(current) = cfg.keys.as_ref().and_then(|k| k.current()).map(|e| e.id) else {
            return;
        };
        let done = fams.iter().all(|f| {
            p.outbound.contains_key(&(*f, current))
                && p.inbound.get(&(*f, current)).is_some_and(|s| s.confirmed)
        });
        let old: Vec<Slot> = p
            .inbound
            .keys()
            .chain(p.outbound.keys())
            .filter(|(_, k)| *k != current)
            .copied()
            .collect();
        if done && !old.is_empty() && !self.retire.contains_key(peer) {
            let at = Instant::now() + cfg.settings.ipsec.key_rotation_duration;
            info!(peer = peer, key_id = current; "pair with {peer} moved to key {current}; older SAs go in {:?}", cfg.settings.ipsec.key_rotation_duration);
            self.retire.insert(peer.to_string(), (at, old));
        }
    }

    /// Timers: hellos due, retirements due, and the periodic re-read of the kernel.
    pub fn tick(&mut self, cfg: &Config, now: Instant) -> Result<(), Error> {
        // Datagrams the read budget left are read after the timers below: those are what
        // a flood must not delay.
        let backlog = self.backlog;
        let due: Vec<String> = self
            .next_hello
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(n, _)| n.clone())
            .collect();
        for peer in due {
            let fams = Self::families(cfg, &peer);
            let p = &self.peers[&peer];
            let up = p.is_up(&fams);
            let stale = self.is_stale(&peer, p, now);
            let settled =
                up && !stale && p.draining.is_empty() && !self.rotating_since.contains_key(&peer);
            // Only a keepalive may be left out: when our traffic has reached the peer
            // since our last hello, it sees us in its counters, as we see it in ours.
            let is_keepalive =
                self.keepalive_at.remove(&peer) == self.next_hello.get(&peer).copied();
            let seen = settled
                && is_keepalive
                && self
                    .tx_moved
                    .get(&peer)
                    .is_some_and(|t| self.last_hello.get(&peer).is_none_or(|h| t > h));
            if !seen {
                self.send_hello(cfg, &peer);
            }
            if stale {
                self.note_up(&peer, false);
            }
            if settled {
                let at = now + keepalive(&peer);
                self.keepalive_at.insert(peer.clone(), at);
                self.next_hello.insert(peer, at);
            } else {
                self.next_hello.insert(peer, now + HELLO_FAST);
            }
        }
        if self.drop_report_at.is_some_and(|t| t <= now) {
            self.report_drops(now);
        }
        let retired: Vec<String> = self
            .retire
            .iter()
            .filter(|(_, (t, _))| *t <= now)
            .map(|(n, _)| n.clone())
            .collect();
        let mut changed = false;
        for p in self.peers.values_mut() {
            changed |= p.release_drained(now, &[]);
        }
        for peer in retired {
            let (_, slots) = self.retire.remove(&peer).expect("listed above");
            if let Some(p) = self.peers.get_mut(&peer) {
                for s in &slots {
                    p.inbound.remove(s);
                    p.outbound.remove(s);
                }
                info!(peer = peer.as_str(); "removed {} old SA slot(s) of {peer} after the rotation", slots.len());
                changed = true;
            }
        }
        if backlog {
            changed |= self.on_readable(cfg);
        }
        if now >= self.next_resync {
            // The safety net under the notifications: read everything now and then.
            self.next_resync = now + cfg.settings.ipsec.resync_interval;
            self.in_sync = false;
            changed = true;
        }
        if now >= self.next_counters {
            self.next_counters = now + COUNTERS_EVERY;
            if let Err(e) = self.read_counters(cfg) {
                error!("reading the SA counters: {e}");
            }
            changed |= !self.in_sync;
        }
        if changed && let Err(e) = self.apply(cfg) {
            error!("reconcile: {e}");
        }
        Ok(())
    }

    /// A new configuration: new or removed peers, keys, policies.
    pub fn reconfigure(&mut self, cfg: &Config) -> Result<usize, Error> {
        // This node's addresses may have changed: the hello sockets follow them. The
        // caller registers the sockets with the poll loop again (`hello_fds`).
        let addrs = hello_addrs(cfg);
        let bound: Vec<SocketAddr> = self
            .sockets
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect();
        if bound != addrs {
            let list = |a: &[SocketAddr]| {
                a.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            // Without new sockets the old ones are still better than none, and the rest
            // of the new configuration goes in regardless.
            match bind(&addrs) {
                Ok(s) => {
                    self.sockets = s;
                    info!("hello sockets bound to {}", list(&addrs));
                }
                Err(e) => error!("{e}; the hello sockets stay on {}", list(&bound)),
            }
        }
        // The keys file or a node's name may have changed: derive every key again.
        self.key_cache.clear();
        self.sync_peers(cfg);
        for p in self.next_hello.values_mut() {
            *p = Instant::now();
        }
        self.apply(cfg)
    }

    /// (peers up, peers in total).
    pub fn peers_up(&self, cfg: &Config) -> (usize, usize) {
        let up = self
            .peers
            .iter()
            .filter(|(n, p)| p.is_up(&Self::families(cfg, n)))
            .count();
        (up, self.peers.len())
    }

    /// Per-peer state for `encryptd status`.
    pub fn peer_statuses(&self, cfg: &Config, now: Instant) -> Vec<crate::cli::status::PeerStatus> {
        self.peers
            .iter()
            .map(|(name, p)| {
                let fams = Self::families(cfg, name);
                let stale = self.is_stale(name, p, now);
                let state = if stale {
                    "stale"
                } else if p.is_up(&fams) {
                    "up"
                } else {
                    "waiting"
                };
                let mut key_ids: Vec<u8> = p.outbound.keys().map(|(_, k)| *k).collect();
                key_ids.sort_unstable();
                key_ids.dedup();
                crate::cli::status::PeerStatus {
                    rotating_secs: self
                        .rotating_since
                        .get(name)
                        .map(|t| now.saturating_duration_since(*t).as_secs()),
                    name: name.clone(),
                    state: state.into(),
                    key_ids,
                    last_hello_secs: p.last_fresh.map(|t| now.duration_since(t).as_secs()),
                    rx_bytes: self.traffic.get(name).map_or(0, |t| t.0),
                    tx_bytes: self.traffic.get(name).map_or(0, |t| t.1),
                    endpoint: None,
                }
            })
            .collect()
    }

    pub fn netlink_messages(&self) -> u64 {
        self.xfrm.stats().messages_sent
    }
}

impl Engine {
    /// Hellos the kernel dropped at our sockets' full receive buffers (a flood faster
    /// than the read budget drains them), both families.
    pub fn socket_overflows(&self, cfg: &Config) -> u64 {
        ["/proc/self/net/udp", "/proc/self/net/udp6"]
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .map(|t| drops::socket_overflows(&t, cfg.settings.ipsec.hello_port))
            .sum()
    }

    /// The hello sockets' fds and the XFRM watch's, for the poll loop.
    pub fn hello_fds(&self) -> Vec<RawFd> {
        self.sockets
            .iter()
            .map(AsRawFd::as_raw_fd)
            .chain(std::iter::once(self.watch.as_raw_fd()))
            .collect()
    }
}

/// The keepalive interval towards `peer`: `HELLO_SLOW`, spread ±10% by the peer's name.
fn keepalive(peer: &str) -> Duration {
    let h = peer.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let spread = HELLO_SLOW.as_millis() as u64 / 5;
    HELLO_SLOW - HELLO_SLOW / 10 + Duration::from_millis(h % spread)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalives_are_slow_and_spread_by_peer() {
        let all: BTreeSet<Duration> = (0..1000).map(|i| keepalive(&format!("node-{i}"))).collect();
        assert!(
            all.len() > 900,
            "not spread: {} distinct of 1000",
            all.len()
        );
        for d in &all {
            assert!(
                (Duration::from_secs(90)..Duration::from_secs(110)).contains(d),
                "{d:?}"
            );
        }
        assert_eq!(keepalive("n1"), keepalive("n1"), "the same at every hello");
        // The budget the interval is for: 10,000 peers, a datagram per family.
        let per_sec = 10_000.0 * 2.0 / all.iter().min().unwrap().as_secs_f64();
        assert!(per_sec <= 225.0, "{per_sec}");
        assert!(
            STALE_AFTER > 2 * HELLO_SLOW,
            "one lost keepalive is not a stale peer"
        );
    }
}
