//! WireGuard mode: one interface, one peer per inventoried node, routes into it by
//! policy routing (see [`crate::wireguard::plan`] for the plan and the diff). The daemon's poll
//! loop calls `tick` at `next_deadline`; every change ends in `apply`, which reads the
//! kernel, diffs it against the plan and sends only the difference.
//!
//! Only the device (peers, handshakes) is read at every pass: links, addresses, routes
//! and rules are read again when rtnetlink's notifications report another program's
//! change (or a lost notice), after a pass that changed one of them, on a reload, and at
//! the slow resync ([`RESYNC`]).
//!
//! A peer is *up* while its last handshake is younger than 3 minutes
//! ([`plan::UP_WINDOW`]); every peer gets a persistent keepalive, so a pair that can
//! talk handshakes at once and every 2 minutes after, and a peer that cannot is
//! reported down within 3 minutes. The daemon leaves everything in place when it stops:
//! a restart adopts the device and its peers, and their sessions go on.

pub mod plan;
pub mod reconcile;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use log::{error, info, warn};

use self::reconcile::{Observed, Ops};
use crate::config::Config;
use crate::config::diag::Diagnostic;
use crate::config::wgkey::{self, PrivateKey};
use crate::kernel::link::{LinkError, Rtnl, RtnlWatch};
use crate::kernel::netlink::NetlinkError;
use crate::kernel::wireguard::{Wg, WgError, uapi_socket, userspace_backend};
use crate::objects::route::{Link, Route, Rule};
use crate::objects::wireguard::Device;

/// How often the kernel is re-read (handshakes, drift) while every peer is up, and
/// while one is not.
const RESCAN: Duration = Duration::from_secs(5);
const RESCAN_FAST: Duration = Duration::from_secs(1);
/// How often links, addresses, routes and rules are read although no notification said
/// so: the safety net under the notifications.
const RESYNC: Duration = Duration::from_secs(300);
/// Underlay MTU assumed when this node's address is on no local link.
const DEFAULT_UNDERLAY_MTU: u32 = 1500;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Key(Diagnostic),
    #[error(
        "this node's public key is {actual} (private key {path}), but the inventory lists {listed} for \"{node}\": put the output of `encryptd pubkey` in the inventory"
    )]
    KeyMismatch {
        node: String,
        path: String,
        actual: String,
        listed: String,
    },
    #[error(
        "interface {name} exists and is not a WireGuard interface (kind {kind}); encryptd leaves it alone: choose another [wireguard] interface"
    )]
    NotWireguard { name: String, kind: String },
    #[error(
        "this kernel has no WireGuard (creating interface {name} of type wireguard: Operation not supported): load the module (`modprobe wireguard`; in Linux since 5.6) or set [wireguard] userspace = \"/usr/bin/wireguard-go\" (package wireguard-go) to run WireGuard in userspace"
    )]
    NoModule { name: String },
    #[error("starting the userspace WireGuard {program} for interface {name}: {reason}")]
    Userspace {
        program: String,
        name: String,
        reason: String,
    },
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Wg(#[from] WgError),
}

/// What the last read of the kernel said about one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerStatus {
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub endpoint: Option<std::net::SocketAddr>,
}

/// What the last read of links, addresses, routes and rules found, kept while no
/// notification says otherwise.
struct NetView {
    link: Link,
    local: plan::Local,
    routes: Vec<Route>,
    rules: Vec<Rule>,
}

pub struct Engine {
    rtnl: Rtnl,
    /// Link, address, route and rule changes by other programs.
    watch: RtnlWatch,
    /// `None`: read them at the next pass.
    net: Option<NetView>,
    next_resync: Instant,
    /// Reads of links, addresses, routes and rules since the start.
    pub dumps: u64,
    /// Connected once the interface exists (creating it loads the module).
    wg: Option<Wg>,
    /// The interface is a userspace implementation's (a `tun` device and a UAPI socket).
    userspace: bool,
    key: PrivateKey,
    /// The interface this engine made or adopted.
    ifname: String,
    /// Per peer public key, from the last read of the device.
    pub status: BTreeMap<[u8; 32], PeerStatus>,
    /// Peers (by name) already logged as up, to log transitions once.
    up: BTreeMap<String, bool>,
    /// Names of the peers as last planned, for the log when one is removed.
    names: BTreeMap<[u8; 32], String>,
    next_rescan: Instant,
    warned_mtu: bool,
}

fn check_key(cfg: &Config, key: &PrivateKey) -> Result<(), Error> {
    let me = cfg.me();
    let actual = key.public();
    match me.wireguard_public_key {
        Some(listed) if listed != actual => Err(Error::KeyMismatch {
            node: me.name.clone(),
            path: cfg.settings.wireguard.private_key.display().to_string(),
            actual: wgkey::to_base64(&actual),
            listed: wgkey::to_base64(&listed),
        }),
        _ => Ok(()),
    }
}

impl Engine {
    /// Load (or create) the private key, then create or adopt the interface and bring
    /// the kernel to the plan.
    pub fn start(cfg: &Config) -> Result<Engine, Error> {
        let path = &cfg.settings.wireguard.private_key;
        let (key, created) = wgkey::load_or_create(path).map_err(Error::Key)?;
        if created {
            info!(
                "created a new WireGuard private key in {} (public key {})",
                path.display(),
                wgkey::to_base64(&key.public())
            );
        }
        check_key(cfg, &key)?;
        let rtnl = Rtnl::open()?;
        let watch = RtnlWatch::open(rtnl.port()).map_err(|source| {
            Error::Link(LinkError::Netlink {
                what: "rtnetlink notifications".into(),
                source: NetlinkError::Open {
                    protocol: crate::kernel::netlink::NETLINK_ROUTE,
                    source,
                },
            })
        })?;
        let mut e = Engine {
            rtnl,
            watch,
            net: None,
            next_resync: Instant::now() + RESYNC,
            dumps: 0,
            wg: None,
            userspace: false,
            key,
            ifname: cfg.settings.wireguard.interface.clone(),
            status: BTreeMap::new(),
            up: BTreeMap::new(),
            names: BTreeMap::new(),
            next_rescan: Instant::now(),
            warned_mtu: false,
        };
        if let Some(l) = e.rtnl.link(&e.ifname)? {
            info!("adopting interface {} (#{}) and its peers", l.name, l.index);
        }
        let n = e.apply(cfg)?;
        e.next_rescan = Instant::now() + RESCAN_FAST;
        info!(
            "wireguard interface {} ready: {n} kernel object(s) changed",
            e.ifname
        );
        Ok(e)
    }

    /// The interface, created if missing; refuses a foreign interface of that name. On a
    /// kernel without WireGuard, the configured userspace implementation creates it.
    fn ensure_link(&mut self, cfg: &Config) -> Result<Link, Error> {
        let name = self.ifname.clone();
        let userspace = cfg.settings.wireguard.userspace.as_deref();
        if let Some(l) = self.rtnl.link(&name)? {
            return match userspace_backend(&name, l.kind.as_deref()) {
                // A userspace device is driven only where one is configured.
                Some(u) if !u || userspace.is_some() => {
                    self.use_backend(u);
                    Ok(l)
                }
                _ => Err(Error::NotWireguard {
                    name,
                    kind: l.kind.as_deref().unwrap_or("none").into(),
                }),
            };
        }
        match self.rtnl.add_wireguard(&name) {
            Ok(()) => {
                info!("created interface {name} (type wireguard)");
                self.use_backend(false);
            }
            Err(e) if e.refused_with(libc::EOPNOTSUPP) => {
                let Some(program) = userspace else {
                    return Err(Error::NoModule { name });
                };
                start_userspace(program, &name)?;
                info!(
                    "this kernel has no WireGuard: created interface {name} with {}",
                    program.display()
                );
                self.use_backend(true);
            }
            Err(e) => return Err(e.into()),
        }
        self.rtnl.link(&name)?.ok_or_else(|| {
            Error::Link(LinkError::Rejected {
                what: format!("create interface {name}"),
                failures: Vec::new(),
            })
        })
    }

    /// Talk to the kernel or to the userspace implementation from now on.
    fn use_backend(&mut self, userspace: bool) {
        if self.userspace != userspace {
            self.userspace = userspace;
            self.wg = None;
        }
    }

    /// The local facts the plan needs: the addresses on this host, and the MTU of the
    /// link that holds this node's first address.
    fn local(&mut self, cfg: &Config, ifindex: u32) -> Result<plan::Local, Error> {
        let me = cfg.me();
        let addrs = self.rtnl.addresses()?;
        let links = self.rtnl.links()?;
        let found = me.addresses.iter().find_map(|a| {
            let idx = addrs.iter().find(|x| x.addr == *a)?.index;
            links.iter().find(|l| l.index == idx).map(|l| l.mtu)
        });
        let underlay_mtu = match found {
            Some(m) => m,
            None => {
                if !self.warned_mtu {
                    warn!(
                        "none of this node's addresses is on a local interface; assuming an underlay MTU of {DEFAULT_UNDERLAY_MTU}"
                    );
                    self.warned_mtu = true;
                }
                DEFAULT_UNDERLAY_MTU
            }
        };
        Ok(plan::Local {
            ifindex,
            underlay_mtu,
            addresses: addrs.iter().map(|a| a.addr).collect(),
        })
    }

    fn wg(&mut self) -> Result<&mut Wg, Error> {
        if self.wg.is_none() {
            self.wg = Some(Wg::open(&self.ifname, self.userspace)?);
        }
        Ok(self.wg.as_mut().expect("just set"))
    }

    /// The device as it is now, with links, routes and rules as `net` last found them:
    /// those are moved into the observation (not copied at every pass) and the caller
    /// puts them back while they still hold.
    fn observe(&mut self, net: &mut NetView) -> Result<Observed, Error> {
        let ifname = self.ifname.clone();
        let device: Device = self.wg()?.device(&ifname)?;
        Ok(Observed {
            mtu: net.link.mtu,
            up: net.link.up,
            device,
            routes: std::mem::take(&mut net.routes),
            rules: std::mem::take(&mut net.rules),
        })
    }

    /// Make the kernel match the plan. Returns the number of objects changed.
    pub fn apply(&mut self, cfg: &Config) -> Result<usize, Error> {
        let mut net = match self.net.take() {
            Some(n) => n,
            None => self.read_net(cfg)?,
        };
        let underlay = net.local.underlay_mtu;
        let ifindex = net.link.index;
        let have = self.observe(&mut net)?;
        self.note_status(cfg, &have.device);
        let want = plan::plan(cfg, self.key.public(), &net.local);
        let ops = reconcile::diff(&want, &have);
        let old_names = std::mem::replace(
            &mut self.names,
            want.peers
                .iter()
                .map(|(k, p)| (*k, p.name.clone()))
                .collect(),
        );
        let rtnl_changes = ops.mtu.is_some()
            || ops.up
            || !ops.replace_routes.is_empty()
            || !ops.delete_routes.is_empty()
            || !ops.add_rules.is_empty()
            || !ops.delete_rules.is_empty();
        let done = if ops.is_empty() {
            Ok(0)
        } else {
            match self.execute(&ops, ifindex) {
                Ok(()) => {
                    self.log_changes(&ops, &want, &have, &old_names, underlay);
                    Ok(ops.count())
                }
                Err(e) => Err(e),
            }
        };
        if !rtnl_changes {
            // Peers alone change nothing rtnetlink shows: what was read still holds.
            net.routes = have.routes;
            net.rules = have.rules;
            self.net = Some(net);
        }
        done
    }

    /// Read the interface (created if missing), the local facts, the routes and the
    /// rules.
    fn read_net(&mut self, cfg: &Config) -> Result<NetView, Error> {
        self.dumps += 1;
        let link = self.ensure_link(cfg)?;
        let local = self.local(cfg, link.index)?;
        let mut routes = self.rtnl.routes(plan::TABLE)?;
        routes.extend(self.rtnl.routes(plan::BLACKHOLE_TABLE)?);
        let rules = self.rtnl.rules()?;
        Ok(NetView {
            link,
            local,
            routes,
            rules,
        })
    }

    /// Read rtnetlink's notifications: `true` if another program changed a link, an
    /// address, a route or a rule (or notices were lost), and a pass should follow.
    pub fn on_readable(&mut self) -> bool {
        let ev = self.watch.drain();
        if ev.any() {
            self.net = None;
        }
        ev.any()
    }

    /// The rtnetlink watch's fd, for the poll loop.
    pub fn watch_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.watch)
    }

    /// Send `ops`, in the one order that loses nothing.
    fn execute(&mut self, ops: &Ops, ifindex: u32) -> Result<(), Error> {
        let ifname = self.ifname.clone();
        // The socket's fwmark before the rules that depend on it; the link up before
        // peers (their first keepalive starts the handshake); peers before the routes
        // into them; stale routes and rules last.
        if ops.private_key || ops.listen_port.is_some() || ops.fwmark.is_some() {
            let key = ops.private_key.then_some(&self.key);
            self.wg.as_mut().expect("observed").set_device(
                &ifname,
                key,
                ops.listen_port,
                ops.fwmark,
            )?;
        }
        if ops.mtu.is_some() || ops.up {
            self.rtnl
                .set_link(ifindex, ops.mtu, ops.up.then_some(true))?;
        }
        let wg = self.wg.as_mut().expect("observed");
        wg.set_peers(&ifname, &ops.set_peers)?;
        wg.detach_ips(&ifname, &ops.detach_ips)?;
        wg.remove_peers(&ifname, &ops.remove_peers)?;
        self.rtnl.replace_routes(&ops.replace_routes)?;
        self.rtnl.add_rules(&ops.add_rules)?;
        self.rtnl.delete_routes(&ops.delete_routes)?;
        self.rtnl.delete_rules(&ops.delete_rules)?;
        Ok(())
    }

    /// One line per peer added, changed or removed, and for detached IPs and the MTU.
    fn log_changes(
        &self,
        ops: &Ops,
        want: &plan::Desired,
        have: &Observed,
        old_names: &BTreeMap<[u8; 32], String>,
        underlay: u32,
    ) {
        let ifname = &self.ifname;
        let names = |k: &[u8; 32]| -> String {
            want.peers
                .get(k)
                .map_or_else(|| wgkey::to_base64(k), |p| p.name.clone())
        };
        for u in &ops.set_peers {
            let name = names(&u.public_key);
            if have
                .device
                .peers
                .iter()
                .any(|p| p.public_key == u.public_key)
            {
                info!(peer = name.as_str(); "peer {name} changed: {}", describe(u));
            } else {
                info!(peer = name.as_str(); "peer {name} added ({})", wgkey::to_base64(&u.public_key));
            }
        }
        for k in &ops.remove_peers {
            match old_names.get(k) {
                Some(n) => info!(peer = n.as_str(); "peer {n} removed ({})", wgkey::to_base64(k)),
                None => info!("peer {} removed", wgkey::to_base64(k)),
            }
        }
        if !ops.detach_ips.is_empty() {
            info!(
                "allowed IPs detached: {}",
                ops.detach_ips
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if let Some(m) = ops.mtu {
            info!(
                "{ifname}: MTU {m} (underlay {underlay} - {})",
                plan::OVERHEAD
            );
        }
    }

    /// Remember what the kernel says about each peer; log peers coming up or going down.
    fn note_status(&mut self, cfg: &Config, device: &Device) {
        let now = SystemTime::now();
        self.status = device
            .peers
            .iter()
            .map(|p| {
                (
                    p.public_key,
                    PeerStatus {
                        last_handshake: p.last_handshake,
                        rx_bytes: p.rx_bytes,
                        tx_bytes: p.tx_bytes,
                        endpoint: p.endpoint,
                    },
                )
            })
            .collect();
        let me = cfg.settings.node.clone();
        let mut seen = Vec::new();
        for n in cfg.inventory.peers(&me) {
            let up = self.peer_up(n.wireguard_public_key.as_ref(), now);
            let was = self.up.insert(n.name.clone(), up).unwrap_or(false);
            if up && !was {
                info!(peer = n.name.as_str(); "peer {} up", n.name);
            } else if !up && was {
                warn!(peer = n.name.as_str(); "peer {} down: no handshake for {} s", n.name, plan::UP_WINDOW.as_secs());
            }
            seen.push(n.name.clone());
        }
        self.up.retain(|n, _| seen.contains(n));
    }

    fn peer_up(&self, key: Option<&[u8; 32]>, now: SystemTime) -> bool {
        key.and_then(|k| self.status.get(k))
            .is_some_and(|s| plan::is_up(s.last_handshake, now))
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        Some(self.next_rescan)
    }

    /// Timers: re-read the kernel (handshakes, anything changed from under us).
    pub fn tick(&mut self, cfg: &Config, now: Instant) -> Result<(), Error> {
        if now < self.next_rescan {
            return Ok(());
        }
        if now >= self.next_resync {
            self.net = None;
            self.next_resync = now + RESYNC;
        }
        if let Err(e) = self.apply(cfg) {
            error!("reconcile: {e}");
        }
        let (up, total) = self.peers_up(cfg);
        let every = if up < total { RESCAN_FAST } else { RESCAN };
        self.next_rescan = Instant::now() + every;
        Ok(())
    }

    /// A new configuration: peers, routes, the key file, the interface name.
    pub fn reconfigure(&mut self, cfg: &Config) -> Result<usize, Error> {
        match wgkey::read(&cfg.settings.wireguard.private_key) {
            Ok(k) if k != self.key => {
                check_key(cfg, &k)?;
                info!(
                    "new private key (public key {})",
                    wgkey::to_base64(&k.public())
                );
                self.key = k;
            }
            Ok(_) => {}
            Err(d) => error!("keeping the private key in use: {d}"),
        }
        let name = &cfg.settings.wireguard.interface;
        if *name != self.ifname {
            if let Some(old) = self.rtnl.link(&self.ifname)?
                && old.kind.as_deref() == Some("wireguard")
            {
                self.rtnl.delete_link(old.index)?;
                info!("interface renamed: removed {}", self.ifname);
            }
            self.ifname = name.clone();
        }
        self.next_rescan = Instant::now() + RESCAN_FAST;
        // This node's addresses (and so the underlay MTU) may have changed.
        self.net = None;
        self.apply(cfg)
    }

    /// (peers up, peers in total).
    pub fn peers_up(&self, cfg: &Config) -> (usize, usize) {
        let now = SystemTime::now();
        let peers: Vec<_> = cfg.inventory.peers(&cfg.settings.node).collect();
        let up = peers
            .iter()
            .filter(|n| self.peer_up(n.wireguard_public_key.as_ref(), now))
            .count();
        (up, peers.len())
    }

    /// Per-peer state for `encryptd status`: up = a recent handshake.
    pub fn peer_statuses(&self, cfg: &Config) -> Vec<crate::cli::status::PeerStatus> {
        let now = SystemTime::now();
        cfg.inventory
            .peers(&cfg.settings.node)
            .map(|n| {
                let st = n
                    .wireguard_public_key
                    .as_ref()
                    .and_then(|k| self.status.get(k));
                crate::cli::status::PeerStatus {
                    name: n.name.clone(),
                    state: if self.peer_up(n.wireguard_public_key.as_ref(), now) {
                        "up".into()
                    } else {
                        "waiting".into()
                    },
                    key_ids: Vec::new(),
                    last_hello_secs: st
                        .and_then(|s| s.last_handshake)
                        .and_then(|t| now.duration_since(t).ok())
                        .map(|d| d.as_secs()),
                    rx_bytes: st.map_or(0, |s| s.rx_bytes),
                    tx_bytes: st.map_or(0, |s| s.tx_bytes),
                    endpoint: st.and_then(|s| s.endpoint).map(|e| e.to_string()),
                    rotating_secs: None,
                }
            })
            .collect()
    }
}

/// Run a userspace WireGuard as wireguard-go and boringtun are run: `PROGRAM IFNAME`
/// creates the tun device and the UAPI socket, then the program puts itself in the
/// background and the command returns. It stays in this service's cgroup: stopping or
/// restarting the service ends it and its sessions (docs/wireguard.md).
fn start_userspace(program: &Path, ifname: &str) -> Result<(), Error> {
    let fail = |reason: String| Error::Userspace {
        program: program.display().to_string(),
        name: ifname.into(),
        reason,
    };
    let out = Command::new(program)
        .arg(ifname)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // wireguard-go: with LOG_LEVEL set, its background process would keep our
        // stderr pipe open, and this would wait for it to end.
        .env_remove("LOG_LEVEL")
        .output()
        .map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        return Err(fail(format!("{}: {}", out.status, last.trim())));
    }
    let sock = uapi_socket(ifname);
    if !sock.exists() {
        return Err(fail(format!(
            "it exited without creating {}",
            sock.display()
        )));
    }
    Ok(())
}

fn describe(u: &crate::objects::wireguard::PeerUpdate) -> String {
    let mut parts = Vec::new();
    if let Some(e) = u.endpoint {
        parts.push(format!("endpoint {e}"));
    }
    if let Some(k) = u.keepalive {
        parts.push(format!("keepalive {k} s"));
    }
    match &u.preshared_key {
        Some(k) if k.is_none() => parts.push("preshared key removed".into()),
        Some(_) => parts.push("new preshared key".into()),
        None => {}
    }
    if !u.add_ips.is_empty() {
        parts.push(format!(
            "allowed IPs + {}",
            u.add_ips
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    parts.join(", ")
}
