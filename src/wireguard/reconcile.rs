//! WireGuard mode, pure: what to change so that the kernel's device, peers, routes and
//! rules become the plan's ([`super::plan::Desired`]).
//!
//! # Reconciling
//! Only the difference is sent: a restart or a reload keeps the device, its key and
//! every peer that did not change (their sessions stay). A peer's allowed IPs are
//! added (never replaced); IPs it must lose are moved to a throw-away peer that is then
//! removed, so its other IPs never leave it (see [`crate::kernel::wireguard`], which does the moving). The
//! endpoint is the peer's first address in a family this node has; an endpoint the
//! kernel learned by roaming to another of the peer's own addresses is left alone.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::wgkey::PresharedKey;
use crate::net::Cidr;
use crate::objects::route::{Route, Rule};
use crate::objects::wireguard::{Device, PeerUpdate};
use crate::wireguard::plan::{Desired, KEEPALIVE, is_our_rule};

/// What the kernel has now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub mtu: u32,
    pub up: bool,
    pub device: Device,
    /// The routes of [`TABLE`].
    pub routes: Vec<Route>,
    /// Every policy rule (encryptd's are told apart by priority and table).
    pub rules: Vec<Rule>,
}

/// What to change, in the order the engine applies it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ops {
    pub private_key: bool,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub mtu: Option<u32>,
    pub up: bool,
    pub set_peers: Vec<PeerUpdate>,
    pub detach_ips: Vec<Cidr>,
    pub remove_peers: Vec<[u8; 32]>,
    pub replace_routes: Vec<Route>,
    pub add_rules: Vec<Rule>,
    pub delete_routes: Vec<Route>,
    pub delete_rules: Vec<Rule>,
}

impl Ops {
    /// The number of kernel objects this changes.
    pub fn count(&self) -> usize {
        usize::from(self.private_key || self.listen_port.is_some() || self.fwmark.is_some())
            + usize::from(self.mtu.is_some() || self.up)
            + self.set_peers.len()
            + usize::from(!self.detach_ips.is_empty())
            + self.remove_peers.len()
            + self.replace_routes.len()
            + self.add_rules.len()
            + self.delete_routes.len()
            + self.delete_rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.count() == 0
    }
}

/// The operations that make `have` match `want`.
pub fn diff(want: &Desired, have: &Observed) -> Ops {
    let mut ops = Ops {
        private_key: have.device.public_key != Some(want.public_key),
        listen_port: (have.device.listen_port != want.listen_port).then_some(want.listen_port),
        fwmark: (have.device.fwmark != want.fwmark).then_some(want.fwmark),
        mtu: (have.mtu != want.mtu).then_some(want.mtu),
        up: !have.up,
        ..Ops::default()
    };
    diff_peers(want, have, &mut ops);
    diff_routes(want, have, &mut ops);
    ops.add_rules = want
        .rules
        .iter()
        .filter(|r| !have.rules.contains(r))
        .copied()
        .collect();
    ops.delete_rules = have
        .rules
        .iter()
        .filter(|r| is_our_rule(r) && !want.rules.contains(r))
        .copied()
        .collect();
    ops
}

/// Peers to add or update (only what differs, so sessions stay), IPs to detach, peers
/// to remove.
fn diff_peers(want: &Desired, have: &Observed, ops: &mut Ops) {
    let kernel: BTreeMap<[u8; 32], &crate::objects::wireguard::Peer> = have
        .device
        .peers
        .iter()
        .map(|p| (p.public_key, p))
        .collect();
    let wanted_ips: BTreeSet<Cidr> = want
        .peers
        .values()
        .flat_map(|p| p.allowed_ips.iter().copied())
        .collect();
    for (key, p) in &want.peers {
        match kernel.get(key) {
            None => ops.set_peers.push(PeerUpdate {
                public_key: *key,
                endpoint: Some(p.endpoint),
                keepalive: Some(KEEPALIVE),
                preshared_key: (!p.psk.is_none()).then(|| p.psk.clone()),
                add_ips: p.allowed_ips.clone(),
            }),
            Some(k) => {
                let endpoint =
                    (!k.endpoint.is_some_and(|e| p.endpoints.contains(&e))).then_some(p.endpoint);
                let keepalive = (k.keepalive != KEEPALIVE).then_some(KEEPALIVE);
                // Setting a preshared key keeps the peer's session: the next handshake
                // uses the new key (see docs/wireguard.md, rotation).
                let preshared_key =
                    (k.psk_tag != PresharedKey::tag(p.psk.as_bytes())).then(|| p.psk.clone());
                let add_ips: Vec<Cidr> = p
                    .allowed_ips
                    .iter()
                    .filter(|c| !k.allowed_ips.contains(c))
                    .copied()
                    .collect();
                if endpoint.is_some()
                    || keepalive.is_some()
                    || preshared_key.is_some()
                    || !add_ips.is_empty()
                {
                    ops.set_peers.push(PeerUpdate {
                        public_key: *key,
                        endpoint,
                        keepalive,
                        preshared_key,
                        add_ips,
                    });
                }
                // IPs this peer must lose: those another peer wants move there with that
                // peer's update; the others are detached.
                ops.detach_ips.extend(
                    k.allowed_ips
                        .iter()
                        .filter(|c| !p.allowed_ips.contains(c) && !wanted_ips.contains(c)),
                );
            }
        }
    }
    ops.remove_peers = kernel
        .keys()
        .filter(|k| !want.peers.contains_key(*k))
        .copied()
        .collect();
    ops.detach_ips.sort();
    ops.detach_ips.dedup();
}

fn diff_routes(want: &Desired, have: &Observed, ops: &mut Ops) {
    // a route is identified by its table and destination (what `replace` replaces)
    let key = |r: &Route| (r.table, r.dst);
    let have_routes: BTreeMap<(u32, Cidr), &Route> =
        have.routes.iter().map(|r| (key(r), r)).collect();
    let want_routes: BTreeMap<(u32, Cidr), &Route> =
        want.routes.iter().map(|r| (key(r), r)).collect();
    ops.replace_routes = want
        .routes
        .iter()
        .filter(|r| have_routes.get(&key(r)) != Some(r))
        .copied()
        .collect();
    ops.delete_routes = have
        .routes
        .iter()
        .filter(|r| !want_routes.contains_key(&key(r)))
        .copied()
        .collect();
}
