//! WireGuard mode, pure: the desired device, peers, routes and rules from the validated
//! configuration and two local facts (the interface's index, the underlay MTU). The diff
//! against what the kernel reports is [`super::reconcile`].
//!
//! # Routing (wg-quick's pattern)
//! Every peer's addresses and subnets are routed into the interface in a table of
//! encryptd's own ([`TABLE`]), which a policy rule consults for every packet *not*
//! carrying [`FWMARK`] (`not fwmark 0xca9f lookup 51871`, priority [`RULE_PRIORITY`],
//! before `main`). The WireGuard socket marks its own UDP with [`FWMARK`], so the
//! encrypted packets to a peer's underlay address skip the rule and leave through the
//! underlay (`main`) instead of looping back into the tunnel. The routes carry this
//! node's own address of the family as their preferred source, so that what a peer
//! receives comes from an address in this node's AllowedIPs there.
//!
//! # MTU
//! Interface MTU = underlay MTU − [`OVERHEAD`] (80 = IPv6 outer header 40 + UDP 8 +
//! WireGuard data header 16 + Poly1305 tag 16; with an IPv4 outer header 20 bytes are
//! spare). WireGuard pads the plaintext to a multiple of 16 but never beyond the
//! interface MTU, so the padding needs no room of its own. TCP's MSS follows the
//! interface MTU: nothing is fragmented on the wire.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use crate::config::wgkey::PresharedKey;
use crate::config::{Config, Node};
use crate::net::Cidr;
use crate::objects::route::{Route, RouteKind, Rule};

/// Routing table of the routes into the tunnel.
pub const TABLE: u32 = 51871;
/// Mark of the WireGuard socket's own packets (they skip [`TABLE`]).
pub const FWMARK: u32 = 0xca9f;
/// Priority of the `not fwmark FWMARK lookup TABLE` rules: after any rule an operator
/// adds with a lower number, before `main` (32766).
pub const RULE_PRIORITY: u32 = 31871;
/// Priority of strict mode's exception rules (`from OWN ipproto P sport N lookup main`):
/// after [`TABLE`] (a peer gets its replies through the tunnel), before
/// [`BLACKHOLE_TABLE`] (a management host in a protected range gets them at all).
pub const EXCEPTION_RULE_PRIORITY: u32 = RULE_PRIORITY + 1;
/// Strict mode's routing table: a blackhole per protected range (see [`fail_closed`]).
pub const BLACKHOLE_TABLE: u32 = 51872;
/// Priority of the `not fwmark FWMARK lookup BLACKHOLE_TABLE` rules.
pub const BLACKHOLE_RULE_PRIORITY: u32 = RULE_PRIORITY + 2;
/// The `main` routing table.
pub const MAIN_TABLE: u32 = 254;
/// `proto` of encryptd's routes (`ip route show table 51871 proto 236`).
pub const ROUTE_PROTO: u8 = 236;
/// Worst-case WireGuard overhead (IPv6 outer header).
pub const OVERHEAD: u32 = 80;
/// The smallest MTU IPv6 allows on a link.
pub const MIN_MTU: u32 = 1280;
/// Persistent keepalive, seconds: keeps handshakes fresh (so "up" means something) and
/// NAT/conntrack state alive; 2 packets of 32 bytes per peer per 25 s.
pub const KEEPALIVE: u16 = 25;
/// A peer is up while its last handshake is younger than this (WireGuard's
/// REJECT_AFTER_TIME: older session keys are useless). With the keepalive above, a
/// pair that can talk re-handshakes every 2 minutes.
pub const UP_WINDOW: Duration = Duration::from_secs(180);

/// One desired peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPlan {
    pub name: String,
    pub endpoint: SocketAddr,
    /// Every address of the peer at the listen port: a roamed endpoint among them is kept.
    pub endpoints: Vec<SocketAddr>,
    /// The peer's addresses (as /32, /128) and subnets, sorted.
    pub allowed_ips: Vec<Cidr>,
    /// The pair's preshared key ([`PresharedKey::none`] when there is no cluster key).
    pub psk: PresharedKey,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub public_key: [u8; 32],
    pub listen_port: u16,
    pub fwmark: u32,
    pub mtu: u32,
    pub peers: BTreeMap<[u8; 32], PeerPlan>,
    pub routes: Vec<Route>,
    pub rules: Vec<Rule>,
}

fn same_family(a: &IpAddr, b: &IpAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
}

/// The peer's endpoint: its first address in a family this node has an address in
/// (its first address at all if there is none).
pub fn endpoint(me: &Node, peer: &Node, port: u16) -> Option<SocketAddr> {
    let ip = peer
        .addresses
        .iter()
        .find(|a| me.addresses.iter().any(|m| same_family(m, a)))
        .or(peer.addresses.first())?;
    Some(SocketAddr::new(*ip, port))
}

pub fn allowed_ips(n: &Node) -> Vec<Cidr> {
    let set: BTreeSet<Cidr> = n
        .addresses
        .iter()
        .map(|a| Cidr::host(*a))
        .chain(n.subnets.iter().copied())
        .collect();
    set.into_iter().collect()
}

pub fn mtu(underlay: u32) -> u32 {
    underlay.saturating_sub(OVERHEAD).max(MIN_MTU)
}

/// What the plan needs to know about this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local {
    /// The WireGuard interface's index.
    pub ifindex: u32,
    /// MTU of the link holding this node's first address.
    pub underlay_mtu: u32,
    /// The addresses configured on this host (a route's preferred source must be one).
    pub addresses: Vec<IpAddr>,
}

/// The desired state on this host.
pub fn plan(cfg: &Config, public_key: [u8; 32], local: &Local) -> Desired {
    let me = cfg.me();
    let port = cfg.settings.wireguard.listen_port;
    let mut peers = BTreeMap::new();
    let mut routes = Vec::new();
    for p in cfg.inventory.peers(&me.name) {
        let (Some(key), Some(endpoint)) = (p.wireguard_public_key, endpoint(me, p, port)) else {
            continue; // validation requires both in mode wireguard
        };
        let ips = allowed_ips(p);
        for dst in &ips {
            routes.push(Route {
                kind: RouteKind::Unicast,
                dst: *dst,
                table: TABLE,
                oif: local.ifindex,
                // This node's first inventoried address of the family that is on this
                // host (an inventoried address behind NAT is not).
                src: me
                    .addresses
                    .iter()
                    .copied()
                    .find(|a| same_family(a, &dst.addr()) && local.addresses.contains(a)),
                protocol: ROUTE_PROTO,
            });
        }
        peers.insert(
            key,
            PeerPlan {
                name: p.name.clone(),
                endpoint,
                endpoints: p
                    .addresses
                    .iter()
                    .map(|a| SocketAddr::new(*a, port))
                    .collect(),
                allowed_ips: ips,
                psk: cfg.psk.as_ref().map_or_else(PresharedKey::none, |c| {
                    crate::ipsec::derive::wireguard_psk(c, &public_key, &key)
                }),
            },
        );
    }
    let mut exception_rules = Vec::new();
    if cfg.settings.strict.enabled {
        exception_rules = fail_closed(cfg, &mut routes);
    }
    routes.sort();
    // `not fwmark FWMARK lookup T` for each table and family that has routes
    let mut rules: Vec<Rule> = [
        (TABLE, RULE_PRIORITY),
        (BLACKHOLE_TABLE, BLACKHOLE_RULE_PRIORITY),
    ]
    .into_iter()
    .flat_map(|(table, priority)| [false, true].map(|v6| (table, priority, v6)))
    .filter(|(table, _, v6)| {
        routes
            .iter()
            .any(|r| r.table == *table && r.dst.is_ipv4() != *v6)
    })
    .map(|(table, priority, v6)| Rule {
        v6,
        priority,
        invert: true,
        fwmark: Some(FWMARK),
        src: None,
        sport: None,
        table,
        other_selectors: false,
    })
    .collect();
    rules.extend(exception_rules);
    Desired {
        public_key,
        listen_port: port,
        fwmark: FWMARK,
        mtu: mtu(local.underlay_mtu),
        peers,
        routes,
        rules,
    }
}

/// Strict mode in the routing, where an `nft flush ruleset` does not reach. After
/// [`TABLE`] (the peers' routes), every packet but the tunnel's own UDP consults
/// [`BLACKHOLE_TABLE`]: a `blackhole` for every protected range, so that what has no
/// peer route drops instead of leaving in plaintext even while the nft table is gone,
/// and `throw` routes for this node's own addresses and subnets, which fall through to
/// `main`. Between the two, the replies of the management exceptions (from this node's
/// addresses and the exception's port) look up `main`: a management host gets them, a
/// peer has got them through [`TABLE`] already. Returns those rules; adds the routes to
/// `routes`.
fn fail_closed(cfg: &Config, routes: &mut Vec<Route>) -> Vec<Rule> {
    let me = cfg.me();
    let strict = &cfg.settings.strict;
    let special = |dst: Cidr, kind| Route {
        kind,
        dst,
        table: BLACKHOLE_TABLE,
        oif: 0,
        src: None,
        protocol: ROUTE_PROTO,
    };
    let own: Vec<Cidr> = me
        .addresses
        .iter()
        .map(|a| Cidr::host(*a))
        .chain(me.subnets.iter().copied())
        .collect();
    for o in own
        .iter()
        .filter(|o| strict.cidrs.iter().any(|c| c.overlaps(o)))
    {
        routes.push(special(*o, RouteKind::Throw));
    }
    // A protected range inside (or equal to) one of this node's own prefixes gets no
    // blackhole: it would outrank the throw (or collide with it, one route per
    // destination) and drop what this node delivers or forwards to its own subnet.
    for c in strict
        .cidrs
        .iter()
        .filter(|c| !own.iter().any(|o| o.covers(c)))
    {
        routes.push(special(*c, RouteKind::Blackhole));
    }
    let mut rules = Vec::new();
    for e in &strict.exceptions {
        let proto = match e.proto {
            crate::config::settings::Proto::Tcp => libc::IPPROTO_TCP as u8,
            crate::config::settings::Proto::Udp => libc::IPPROTO_UDP as u8,
        };
        for a in &me.addresses {
            rules.push(Rule {
                v6: a.is_ipv6(),
                priority: EXCEPTION_RULE_PRIORITY,
                invert: false,
                fwmark: None,
                src: Some(Cidr::host(*a)),
                sport: Some((proto, e.port)),
                table: MAIN_TABLE,
                other_selectors: false,
            });
        }
    }
    rules.sort();
    rules.dedup();
    rules
}

/// Whether a rule is encryptd's: its priority and its table (and, for the exception
/// rules into `main`, the port they select on).
pub fn is_our_rule(r: &Rule) -> bool {
    (r.priority == RULE_PRIORITY && r.table == TABLE)
        || (r.priority == BLACKHOLE_RULE_PRIORITY && r.table == BLACKHOLE_TABLE)
        || (r.priority == EXCEPTION_RULE_PRIORITY
            && r.table == MAIN_TABLE
            && r.sport.is_some()
            && !r.other_selectors)
}

/// Whether a peer counts as up at `now`: a handshake within [`UP_WINDOW`].
pub fn is_up(last_handshake: Option<SystemTime>, now: SystemTime) -> bool {
    last_handshake.is_some_and(|t| now.duration_since(t).unwrap_or(Duration::ZERO) < UP_WINDOW)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Inventory;
    use crate::objects::wireguard::Device;
    use crate::objects::wireguard::Peer;
    use crate::wireguard::reconcile::{Observed, diff};

    fn key(i: u8) -> [u8; 32] {
        [i; 32]
    }

    fn node(i: u8, subnets: &[&str]) -> Node {
        Node {
            name: format!("n{i}"),
            addresses: vec![
                format!("10.77.0.{}", i + 1).parse().unwrap(),
                format!("fd77::{}", i + 1).parse().unwrap(),
            ],
            subnets: subnets.iter().map(|s| s.parse().unwrap()).collect(),
            wireguard_public_key: Some(key(i + 1)),
            span: 0..0,
        }
    }

    fn config(nodes: Vec<Node>) -> Config {
        let text = "mode = \"wireguard\"\nnode = \"n0\"\n";
        let path = std::path::Path::new("/etc/encryptd/encryptd.toml");
        Config {
            settings: crate::config::settings::parse_str(path, text).expect("valid settings"),
            inventory: Inventory::new(nodes),
            keys: None,
            psk: None,
        }
    }

    fn local() -> Local {
        Local {
            ifindex: 9,
            underlay_mtu: 1500,
            addresses: vec!["10.77.0.1".parse().unwrap(), "fd77::1".parse().unwrap()],
        }
    }

    #[test]
    fn route_source_only_if_local() {
        let mut l = local();
        l.addresses.retain(|a| a.is_ipv4());
        let d = plan(&three(), key(1), &l);
        for r in &d.routes {
            let want = r.dst.is_ipv4().then(|| "10.77.0.1".parse().unwrap());
            assert_eq!(r.src, want, "{r}");
        }
    }

    fn three() -> Config {
        config(vec![
            node(0, &["10.1.0.0/24"]),
            node(1, &["10.1.1.0/24", "fd00:1::/64"]),
            node(2, &[]),
        ])
    }

    /// What the kernel would report after applying `d` (handshakes aside).
    fn applied(d: &Desired) -> Observed {
        Observed {
            mtu: d.mtu,
            up: true,
            device: Device {
                public_key: Some(d.public_key),
                listen_port: d.listen_port,
                fwmark: d.fwmark,
                peers: d
                    .peers
                    .iter()
                    .map(|(k, p)| Peer {
                        public_key: *k,
                        endpoint: Some(p.endpoint),
                        allowed_ips: p.allowed_ips.clone(),
                        keepalive: KEEPALIVE,
                        psk_tag: PresharedKey::tag(p.psk.as_bytes()),
                        last_handshake: None,
                        rx_bytes: 0,
                        tx_bytes: 0,
                    })
                    .collect(),
            },
            routes: d.routes.clone(),
            rules: d.rules.clone(),
        }
    }

    #[test]
    fn plan_of_three_nodes() {
        let d = plan(&three(), key(1), &local());
        assert_eq!(d.mtu, 1420);
        assert_eq!(d.listen_port, 51871);
        assert_eq!(d.peers.len(), 2);
        let p1 = &d.peers[&key(2)];
        assert_eq!(p1.name, "n1");
        assert_eq!(p1.endpoint, "10.77.0.2:51871".parse().unwrap());
        let ips: Vec<String> = p1.allowed_ips.iter().map(ToString::to_string).collect();
        assert_eq!(
            ips,
            ["10.1.1.0/24", "10.77.0.2/32", "fd00:1::/64", "fd77::2/128"]
        );
        assert_eq!(d.routes.len(), 4 + 2);
        let r = d
            .routes
            .iter()
            .find(|r| r.dst.to_string() == "fd00:1::/64")
            .unwrap();
        assert_eq!(r.src, Some("fd77::1".parse().unwrap()));
        assert_eq!((r.table, r.oif, r.protocol), (TABLE, 9, ROUTE_PROTO));
        assert_eq!(d.rules.len(), 2, "IPv4 and IPv6");
        assert!(d.rules.iter().all(|r| r.invert && r.fwmark == Some(FWMARK)));
    }

    #[test]
    fn endpoint_prefers_a_family_this_node_has() {
        let mut me = node(0, &[]);
        me.addresses.retain(|a| a.is_ipv6());
        let peer = node(1, &[]);
        assert_eq!(
            endpoint(&me, &peer, 7),
            Some("[fd77::2]:7".parse().unwrap())
        );
    }

    #[test]
    fn mtu_floor() {
        assert_eq!(mtu(9000), 8920);
        assert_eq!(mtu(1300), MIN_MTU);
    }

    #[test]
    fn empty_kernel_gets_everything() {
        let d = plan(&three(), key(1), &local());
        let have = Observed {
            mtu: 1420,
            up: false,
            device: Device::default(),
            routes: vec![],
            rules: vec![],
        };
        let ops = diff(&d, &have);
        assert!(ops.private_key && ops.up);
        assert_eq!(ops.listen_port, Some(51871));
        assert_eq!(ops.fwmark, Some(FWMARK));
        assert_eq!(ops.mtu, None);
        assert_eq!(ops.set_peers.len(), 2);
        assert!(ops.set_peers.iter().all(|u| u.keepalive == Some(KEEPALIVE)));
        assert_eq!(ops.replace_routes.len(), 6);
        assert_eq!(ops.add_rules.len(), 2);
        assert!(ops.remove_peers.is_empty() && ops.detach_ips.is_empty());
    }

    #[test]
    fn preshared_keys_set_rotated_and_removed_alone() {
        let mut c = three();
        let none = plan(&c, key(1), &local());
        assert!(none.peers.values().all(|p| p.psk.is_none()));
        let have = applied(&none);

        c.psk = Some(PresharedKey::from_bytes([5; 32]));
        let with = plan(&c, key(1), &local());
        let (k2, k3) = (&with.peers[&key(2)].psk, &with.peers[&key(3)].psk);
        assert!(!k2.is_none() && k2 != k3, "one key per pair");
        let ops = diff(&with, &have);
        assert_eq!(ops.set_peers.len(), 2, "{ops:?}");
        for u in &ops.set_peers {
            assert_eq!(
                u.preshared_key.as_ref(),
                Some(&with.peers[&u.public_key].psk)
            );
            assert!(u.endpoint.is_none() && u.keepalive.is_none() && u.add_ips.is_empty());
        }
        assert_eq!(ops.count(), 2, "nothing but the two peers' keys: {ops:?}");
        assert!(diff(&with, &applied(&with)).is_empty());

        c.psk = Some(PresharedKey::from_bytes([6; 32]));
        let rotated = plan(&c, key(1), &local());
        let ops = diff(&rotated, &applied(&with));
        assert_eq!(ops.count(), 2, "{ops:?}");
        assert_ne!(ops.set_peers[0].preshared_key.as_ref(), Some(k2));

        let ops = diff(&none, &applied(&with));
        assert_eq!(ops.count(), 2, "{ops:?}");
        assert!(
            ops.set_peers
                .iter()
                .all(|u| u.preshared_key.as_ref().is_some_and(PresharedKey::is_none))
        );
    }

    #[test]
    fn applied_state_is_a_fixed_point() {
        let d = plan(&three(), key(1), &local());
        let ops = diff(&d, &applied(&d));
        assert!(ops.is_empty(), "{ops:?}");
    }

    #[test]
    fn roamed_endpoint_among_the_peers_addresses_is_kept() {
        let d = plan(&three(), key(1), &local());
        let mut have = applied(&d);
        have.device.peers[0].endpoint = Some("[fd77::2]:51871".parse().unwrap());
        assert!(diff(&d, &have).is_empty());
        have.device.peers[0].endpoint = Some("192.0.2.99:51871".parse().unwrap());
        let ops = diff(&d, &have);
        assert_eq!(ops.set_peers.len(), 1);
        assert_eq!(
            ops.set_peers[0].endpoint,
            Some("10.77.0.2:51871".parse().unwrap())
        );
        assert!(ops.set_peers[0].add_ips.is_empty());
    }

    #[test]
    fn a_changed_node_changes_only_its_peer() {
        let before = plan(&three(), key(1), &local());
        let have = applied(&before);
        // n1 loses one subnet and gains another.
        let cfg = config(vec![
            node(0, &["10.1.0.0/24"]),
            node(1, &["10.1.9.0/24", "fd00:1::/64"]),
            node(2, &[]),
        ]);
        let ops = diff(&plan(&cfg, key(1), &local()), &have);
        assert_eq!(ops.set_peers.len(), 1);
        assert_eq!(ops.set_peers[0].public_key, key(2));
        assert_eq!(ops.set_peers[0].endpoint, None);
        assert_eq!(ops.set_peers[0].keepalive, None);
        assert_eq!(
            ops.set_peers[0].add_ips,
            vec!["10.1.9.0/24".parse::<Cidr>().unwrap()]
        );
        assert_eq!(ops.detach_ips, vec!["10.1.1.0/24".parse::<Cidr>().unwrap()]);
        assert!(ops.remove_peers.is_empty());
        assert_eq!(ops.replace_routes.len(), 1);
        assert_eq!(ops.delete_routes.len(), 1);
        assert!(!ops.private_key && ops.add_rules.is_empty() && ops.delete_rules.is_empty());
    }

    #[test]
    fn removed_node_and_new_key() {
        let have = applied(&plan(&three(), key(1), &local()));
        // n2 leaves; n1 gets a new key pair.
        let mut n1 = node(1, &["10.1.1.0/24", "fd00:1::/64"]);
        n1.wireguard_public_key = Some(key(42));
        let cfg = config(vec![node(0, &["10.1.0.0/24"]), n1]);
        let d = plan(&cfg, key(1), &local());
        let ops = diff(&d, &have);
        // The new peer takes n1's IPs over (moved, not detached), then both old peers go.
        assert_eq!(ops.set_peers.len(), 1);
        assert_eq!(ops.set_peers[0].public_key, key(42));
        assert_eq!(ops.set_peers[0].add_ips.len(), 4);
        assert!(ops.detach_ips.is_empty());
        assert_eq!(ops.remove_peers, vec![key(2), key(3)]);
        assert_eq!(ops.delete_routes.len(), 2, "n2's two addresses");
        assert!(ops.delete_rules.is_empty());
    }

    #[test]
    fn foreign_rules_are_left_alone_and_stale_ones_go() {
        let d = plan(&three(), key(1), &local());
        let mut have = applied(&d);
        let foreign = Rule {
            v6: false,
            priority: 100,
            invert: false,
            fwmark: None,
            src: None,
            sport: None,
            table: 200,
            other_selectors: true,
        };
        let stale = Rule {
            fwmark: Some(1),
            ..d.rules[0]
        };
        have.rules.push(foreign);
        have.rules.push(stale);
        let ops = diff(&d, &have);
        assert_eq!(ops.delete_rules, vec![stale]);
        assert!(ops.add_rules.is_empty());
    }

    #[test]
    fn strict_mode_fails_closed_in_the_routing_too() {
        let mut cfg = three();
        let d = plan(&cfg, key(1), &local());
        assert!(d.routes.iter().all(|r| r.kind == RouteKind::Unicast));
        assert_eq!(
            d.rules.len(),
            d.rules.iter().filter(|r| r.fwmark.is_some()).count()
        );
        cfg.settings.strict.enabled = true;
        cfg.settings.strict.cidrs = vec!["10.0.0.0/8".parse().unwrap()];
        cfg.settings.strict.exceptions = vec![crate::config::settings::Exception {
            proto: crate::config::settings::Proto::Tcp,
            port: 22,
        }];
        let d = plan(&cfg, key(1), &local());
        let of = |k| {
            d.routes
                .iter()
                .filter(|r| r.kind == k)
                .map(|r| r.dst.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(of(RouteKind::Blackhole), ["10.0.0.0/8"]);
        // this node's own address falls through to `main`
        let me = cfg.me();
        let own: Vec<String> = me
            .addresses
            .iter()
            .filter(|a| a.is_ipv4())
            .map(|a| format!("{a}/32"))
            .collect();
        for o in &own {
            assert!(
                of(RouteKind::Throw).contains(o),
                "{:?}",
                of(RouteKind::Throw)
            );
        }
        assert!(
            d.routes
                .iter()
                .all(|r| (r.kind == RouteKind::Unicast) == (r.table == TABLE))
        );
        let order: Vec<(u32, u32)> = {
            let mut v: Vec<_> = d.rules.iter().map(|r| (r.priority, r.table)).collect();
            v.sort();
            v.dedup();
            v
        };
        assert_eq!(
            order,
            [
                (RULE_PRIORITY, TABLE),
                (EXCEPTION_RULE_PRIORITY, MAIN_TABLE),
                (BLACKHOLE_RULE_PRIORITY, BLACKHOLE_TABLE)
            ],
            "peers first, then the exceptions' replies, then the blackholes"
        );
        let ex: Vec<&Rule> = d.rules.iter().filter(|r| r.sport.is_some()).collect();
        assert_eq!(ex.len(), me.addresses.len());
        assert!(ex.iter().all(|r| r.sport == Some((6, 22))
            && r.table == MAIN_TABLE
            && r.priority > RULE_PRIORITY
            && is_our_rule(r)
            && me.addresses.iter().any(|a| r.src == Some(Cidr::host(*a)))));
        // a second pass over what the first installed changes nothing
        let ops = diff(&d, &applied(&d));
        assert!(
            ops.replace_routes.is_empty()
                && ops.add_rules.is_empty()
                && ops.delete_rules.is_empty()
        );
    }

    /// Own subnets that equal or contain a protected range: the throw alone, never a
    /// blackhole for the same or a narrower destination (one would collide with the
    /// throw, the other outrank it and drop what this node forwards to its subnet).
    #[test]
    fn fail_closed_leaves_own_subnets_to_main() {
        let mut cfg = three();
        let own = cfg.me().subnets[0];
        let inside = Cidr::new(own.addr(), own.prefix_len() + 2).unwrap();
        cfg.settings.strict.enabled = true;
        cfg.settings.strict.cidrs = vec![own, inside, "10.0.0.0/8".parse().unwrap()];
        let d = plan(&cfg, key(1), &local());
        let in_table = |dst: &Cidr| -> Vec<RouteKind> {
            d.routes
                .iter()
                .filter(|r| r.table == BLACKHOLE_TABLE && r.dst == *dst)
                .map(|r| r.kind)
                .collect()
        };
        assert_eq!(in_table(&own), [RouteKind::Throw]);
        assert_eq!(in_table(&inside), Vec::<RouteKind>::new());
        assert_eq!(
            in_table(&"10.0.0.0/8".parse().unwrap()),
            [RouteKind::Blackhole]
        );
        // one route per (table, destination): what the kernel can hold
        let mut keys: Vec<_> = d.routes.iter().map(|r| (r.table, r.dst)).collect();
        let n = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), n);
        assert!(diff(&d, &applied(&d)).replace_routes.is_empty());
    }

    #[test]
    fn up_window() {
        let now = SystemTime::now();
        assert!(!is_up(None, now));
        assert!(is_up(Some(now - Duration::from_secs(179)), now));
        assert!(!is_up(Some(now - Duration::from_secs(181)), now));
    }
}
