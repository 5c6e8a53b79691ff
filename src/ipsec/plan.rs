//! The desired XFRM objects, from the validated configuration, this node's boot ID and
//! what the hello protocol agreed with each peer. Pure.
//!
//! Policies depend on the inventory only, so they are in place before any SA exists:
//! traffic to a peer without SAs is dropped by the kernel (XfrmOutNoStates), never sent
//! in plaintext. SAs follow the peers' hello state.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::config::settings::{Ipsec, Proto};
use crate::config::{Config, Node};
use crate::ipsec::derive::{BootId, SaContext, SaKey, sa_key};
use crate::ipsec::hello::Family;
use crate::ipsec::peer::{Peer, Slot};
use crate::net::Cidr;
use crate::objects::xfrm::{
    Action, Algorithm, Direction, DumpedState, EncapMode, Lifetime, PRIORITY_BLOCK,
    PRIORITY_EXEMPT, PRIORITY_REPLY, PRIORITY_TUNNEL, REQID_MIN, Selector, StateId, Template,
    XfrmPolicy, XfrmState,
};

/// The reqid of every encryptd SA and template. States are told apart by their addresses
/// and SPI, so one reqid is enough; it marks them as encryptd's.
pub const REQID: u32 = REQID_MIN + 1;

/// ICMPv6 neighbour solicitation and advertisement: they must bypass the tunnel, or the
/// IPv6 underlay stalls before the first SA exists.
const ND_TYPES: [u8; 2] = [135, 136];

/// HMAC-SHA256 truncated to 128 bits (RFC 4868).
const HMAC_SHA256_TRUNC_BITS: u32 = 128;

pub fn family(ip: &IpAddr) -> Family {
    if ip.is_ipv4() { Family::V4 } else { Family::V6 }
}

/// The node's tunnel endpoint in `f`: its first address of that family.
pub fn endpoint(n: &Node, f: Family) -> Option<IpAddr> {
    n.addresses.iter().copied().find(|a| family(a) == f)
}

/// Families both nodes have an endpoint in.
pub fn families(me: &Node, peer: &Node) -> Vec<Family> {
    [Family::V4, Family::V6]
        .into_iter()
        .filter(|f| endpoint(me, *f).is_some() && endpoint(peer, *f).is_some())
        .collect()
}

/// Everything behind a node in family `f`: its addresses and subnets.
fn prefixes(n: &Node, f: Family) -> Vec<Cidr> {
    n.addresses
        .iter()
        .filter(|a| family(a) == f)
        .map(|a| Cidr::host(*a))
        .chain(n.subnets.iter().copied().filter(|c| family(&c.addr()) == f))
        .collect()
}

fn any(f: Family) -> Cidr {
    let s = if f == Family::V4 { "0.0.0.0/0" } else { "::/0" };
    s.parse().expect("literal")
}

fn exempt(selector: Selector, dir: Direction) -> XfrmPolicy {
    XfrmPolicy {
        selector,
        dir,
        priority: PRIORITY_EXEMPT,
        action: Action::Allow,
        template: None,
    }
}

/// Policies: exemptions for the management exceptions and IPv6 neighbour discovery, then
/// for every peer and family, out/in/fwd between every prefix of each side through the
/// tunnel. (The hello needs no policy: its socket bypasses XFRM on its own.)
pub fn policies(cfg: &Config) -> Vec<XfrmPolicy> {
    let me = cfg.me();
    let mut out = Vec::new();
    let used: Vec<Family> = [Family::V4, Family::V6]
        .into_iter()
        .filter(|f| {
            cfg.inventory
                .peers(&me.name)
                .any(|p| families(me, p).contains(f))
        })
        .collect();
    for &f in &used {
        door_replies(cfg, f, &mut out);
        if f == Family::V6 {
            for t in ND_TYPES {
                let nd = Selector::new(any(f), any(f)).icmp_type(t);
                out.push(exempt(nd, Direction::Out));
                out.push(exempt(nd, Direction::In));
            }
        }
    }
    strict_block(cfg, &mut out);
    for peer in cfg.inventory.peers(&me.name) {
        tunnels(me, peer, &mut out);
    }
    out
}

/// Strict mode's management exceptions (e.g. SSH) are a door to this node's own
/// service, so that a broken tunnel or a protected range cannot lock the operators out.
/// Inbound needs no policy (a management host is no peer: no IN policy covers it; a
/// peer's connections come through its tunnel). Outbound, the replies, from this node's
/// own addresses and that port, ranked below the tunnels (a peer gets them encrypted)
/// and above the `block` (a management host inside a protected range gets them at
/// all). XFRM cannot tell a reply from a new connection out of that port; nft's
/// `ct direction reply` does.
fn door_replies(cfg: &Config, f: Family, out: &mut Vec<XfrmPolicy>) {
    if !cfg.settings.strict.enabled {
        return;
    }
    let me = cfg.me();
    for e in &cfg.settings.strict.exceptions {
        let proto = Some(match e.proto {
            Proto::Tcp => libc::IPPROTO_TCP as u8,
            Proto::Udp => libc::IPPROTO_UDP as u8,
        });
        for own in me.addresses.iter().filter(|a| family(a) == f) {
            out.push(XfrmPolicy {
                selector: Selector {
                    proto,
                    sport: Some(e.port),
                    ..Selector::new(Cidr::host(*own), any(f))
                },
                dir: Direction::Out,
                priority: PRIORITY_REPLY,
                action: Action::Allow,
                template: None,
            });
        }
    }
}

/// Strict mode's defence in depth: a low-priority `block` for the protected ranges, so
/// that a gap between tunnel policies (a replacement, a node not yet inventoried) drops
/// (XfrmOutPolBlock) instead of leaking. This node's own prefixes stay reachable.
fn strict_block(cfg: &Config, out: &mut Vec<XfrmPolicy>) {
    if !cfg.settings.strict.enabled {
        return;
    }
    let me = cfg.me();
    let cidrs = &cfg.settings.strict.cidrs;
    for f in [Family::V4, Family::V6] {
        for own in prefixes(me, f) {
            if cidrs.iter().any(|c| c.overlaps(&own)) {
                out.push(exempt(Selector::new(any(f), own), Direction::Out));
            }
        }
    }
    for c in cidrs {
        let f = family(&c.addr());
        out.push(XfrmPolicy {
            selector: Selector::new(any(f), *c),
            dir: Direction::Out,
            priority: PRIORITY_BLOCK,
            action: Action::Block,
            template: None,
        });
    }
}

/// The tunnel policies of one pair: for every prefix pair of each shared family, out,
/// in and fwd.
fn tunnels(me: &Node, peer: &Node, out: &mut Vec<XfrmPolicy>) {
    for f in families(me, peer) {
        let (mine, theirs) = (endpoint(me, f).unwrap(), endpoint(peer, f).unwrap());
        let tunnel = |src, dst| {
            Some(Template {
                src,
                dst,
                reqid: REQID,
                mode: EncapMode::Tunnel,
            })
        };
        for l in prefixes(me, f) {
            for p in prefixes(peer, f) {
                let pol = |selector, dir, template| XfrmPolicy {
                    selector,
                    dir,
                    priority: PRIORITY_TUNNEL,
                    action: Action::Allow,
                    template,
                };
                out.push(pol(
                    Selector::new(l, p),
                    Direction::Out,
                    tunnel(mine, theirs),
                ));
                out.push(pol(
                    Selector::new(p, l),
                    Direction::In,
                    tunnel(theirs, mine),
                ));
                out.push(pol(
                    Selector::new(p, l),
                    Direction::Fwd,
                    tunnel(theirs, mine),
                ));
            }
        }
    }
}

fn algorithm(k: SaKey) -> Algorithm {
    match k {
        SaKey::Gcm { key, icv_bits } => Algorithm::gcm_aes(key, u32::from(icv_bits)),
        SaKey::CbcHmac { enc, auth } => {
            Algorithm::cbc_aes_hmac_sha256(enc, auth, HMAC_SHA256_TRUNC_BITS)
        }
    }
}

/// A desired SA: fully specified when its key can be derived; `None` when it cannot be
/// (its key-id is no longer in the keys file, or it was adopted from the kernel and the
/// peer's boot ID is not known yet), in which case the SA installed earlier is kept as it is.
pub type DesiredStates = BTreeMap<StateId, Option<XfrmState>>;

/// The boot ID of an adopted SA's peer until the peer's first fresh hello tells it.
const UNKNOWN_BOOT: BootId = [0; 16];

/// SA keys already derived, by what each is derived from besides the configuration: the
/// SA (addresses, SPI), its key-id and both boot IDs. The node names and the PSKs are the
/// configuration's: a new configuration starts an empty cache. A key not planned in a
/// pass is dropped after it, so the cache holds the plan's keys and no others.
#[derive(Default)]
pub struct KeyCache {
    keys: std::collections::HashMap<(StateId, u8, BootId, BootId), (SaKey, u64)>,
    pass: u64,
    /// Keys derived (HKDF) since the start, for the benchmarks.
    pub derived: u64,
}

impl KeyCache {
    pub fn clear(&mut self) {
        self.keys.clear();
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// SAs for every peer's agreed slots (keys derived afresh; see [`states_cached`]).
pub fn states(cfg: &Config, boot: &BootId, peers: &BTreeMap<String, Peer>) -> DesiredStates {
    states_cached(cfg, boot, peers, &mut KeyCache::default())
}

/// SAs for every peer's agreed slots, each key derived once and then taken from `cache`.
pub fn states_cached(
    cfg: &Config,
    boot: &BootId,
    peers: &BTreeMap<String, Peer>,
    cache: &mut KeyCache,
) -> DesiredStates {
    cache.pass += 1;
    let pass = cache.pass;
    let me = cfg.me();
    let mut out = DesiredStates::new();
    for peer_node in cfg.inventory.peers(&me.name) {
        let Some(peer) = peers.get(&peer_node.name) else {
            continue;
        };
        for f in families(me, peer_node) {
            let (mine, theirs) = (endpoint(me, f).unwrap(), endpoint(peer_node, f).unwrap());
            let slot_sas = peer
                .inbound
                .iter()
                .chain(peer.draining.iter().map(|d| (&d.slot, &d.sa)))
                .map(|(s, sa)| (s, sa.spi, sa.peer_boot, false))
                .chain(
                    peer.outbound
                        .iter()
                        .map(|(s, sa)| (s, sa.spi, sa.peer_boot, true)),
                );
            for (&(sf, key_id), spi, peer_boot, outbound) in slot_sas {
                if sf != f {
                    continue;
                }
                let (src, dst, sender, receiver, sb, rb) = if outbound {
                    (mine, theirs, &me.name, &peer.name, boot, &peer_boot)
                } else {
                    (theirs, mine, &peer.name, &me.name, &peer_boot, boot)
                };
                let id = StateId {
                    src,
                    dst,
                    spi,
                    reqid: REQID,
                };
                // An adopted SA's key cannot be derived before the peer's boot ID is
                // known: keep it as the kernel has it, do not call it stale.
                let entry = cfg
                    .keys
                    .as_ref()
                    .and_then(|k| k.get(key_id))
                    .filter(|_| peer_boot != UNKNOWN_BOOT);
                let state = entry.map(|e| {
                    let slot = cache.keys.entry((id, e.id, *sb, *rb)).or_insert_with(|| {
                        cache.derived += 1;
                        let key = sa_key(
                            e,
                            &SaContext {
                                sender,
                                receiver,
                                src,
                                dst,
                                sender_boot: sb,
                                receiver_boot: rb,
                                spi,
                            },
                        );
                        (key, pass)
                    });
                    slot.1 = pass;
                    let key = slot.0.clone();
                    let mut s = XfrmState::tunnel(src, dst, spi, REQID, algorithm(key));
                    s.replay_window = cfg.settings.ipsec.replay_window;
                    s.lifetime = lifetime(&cfg.settings.ipsec, spi);
                    s
                });
                out.insert(id, state);
            }
        }
    }
    cache.keys.retain(|_, (_, used)| *used == pass);
    out
}

/// The slot of an SPI chosen by this node: the key-id sits in the low 4 bits, so that
/// SAs adopted from the kernel after a restart can be put back in their slots.
pub fn key_id_of_spi(spi: u32) -> u8 {
    (spi & 0xF) as u8
}

/// Make an SPI for key-id `key_id` from 28 random bits; never one of the reserved 0..=255.
pub fn make_spi(random: u32, key_id: u8) -> u32 {
    let spi = (random << 4) | u32::from(key_id & 0xF);
    if spi < 0x100 { spi | 0x1000_0000 } else { spi }
}

/// The packets an SA keeps for its handover at least (or half its limit, if smaller):
/// the re-key takes two reconciles and a hello before the peer sends on the new SA,
/// milliseconds on a real host, ~0.4 s for a debug build in an emulated VM, and the
/// packets of that time must fit between the soft and the hard limit.
pub const HANDOVER_PACKETS: u64 = 1 << 16;

/// The limits of one SA: hard at the settings, soft (the re-key) at 90% of the packets
/// (or `HANDOVER_PACKETS` before the limit, if that is earlier) and 80–90% of the age.
/// The age's share is spread by the SPI, so that the SAs of a fleet set up in one minute
/// do not all re-key in the same one; being the SPI's, it is the same at both ends and
/// at every pass.
pub fn lifetime(s: &Ipsec, spi: u32) -> Lifetime {
    let hard = s.sa_lifetime.as_secs();
    let spread = (hard / 10).max(1);
    let jitter = u64::from(spi.wrapping_mul(0x9E37_79B9) >> 8) % spread;
    let margin = (s.sa_packets / 10).max(HANDOVER_PACKETS.min(s.sa_packets / 2));
    Lifetime {
        soft_packets: Some(s.sa_packets - margin),
        hard_packets: Some(s.sa_packets),
        soft_secs: Some(hard - hard / 10 - jitter),
        hard_secs: Some(hard),
    }
}

/// Our inbound SAs, each the current one of its slot, past their soft limit in the
/// kernel's own counters (`now`: wall-clock seconds, as the kernel's add time): the ones
/// to re-key. The kernel's soft-expire message only says *when* to look; this says what,
/// and also finds what a lost message would have (`ENOBUFS`).
pub fn due_for_rekey<'a>(
    cfg: &Config,
    peers: &BTreeMap<String, Peer>,
    kernel: impl IntoIterator<Item = &'a DumpedState>,
    now: u64,
) -> Vec<(String, Slot, u32)> {
    let mut due = Vec::new();
    for d in kernel.into_iter().filter(|d| d.is_ours()) {
        let l = &d.state.lifetime;
        let past = l.soft_packets.is_some_and(|n| d.counters.packets >= n)
            || l.soft_secs
                .is_some_and(|n| now.saturating_sub(d.counters.add_time) >= n);
        if !past {
            continue;
        }
        let Some((peer, slot, false)) = slot_of(cfg, &d.id()) else {
            continue;
        };
        if peers
            .get(&peer)
            .and_then(|p| p.inbound.get(&slot))
            .is_some_and(|sa| sa.spi == d.state.spi)
        {
            due.push((peer, slot, d.state.spi));
        }
    }
    due
}

/// Bytes per peer, received and sent, summed over our SAs with it (both families, every
/// key-id in use).
pub fn traffic<'a>(
    cfg: &Config,
    ours: impl IntoIterator<Item = &'a DumpedState>,
) -> BTreeMap<String, (u64, u64)> {
    let mut t: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for s in ours {
        if let Some((peer, _, outbound)) = slot_of(cfg, &s.id()) {
            let e = t.entry(peer).or_default();
            if outbound {
                e.1 += s.counters.bytes;
            } else {
                e.0 += s.counters.bytes;
            }
        }
    }
    t
}

/// The peer and slot of one of our states, from its addresses and SPI.
pub fn slot_of(cfg: &Config, s: &StateId) -> Option<(String, Slot, bool)> {
    let me = cfg.me();
    let f = family(&s.src);
    let outbound = endpoint(me, f) == Some(s.src);
    let peer_addr = if outbound { s.dst } else { s.src };
    if !outbound && endpoint(me, f) != Some(s.dst) {
        return None;
    }
    let peer = cfg
        .inventory
        .node_by_address(&peer_addr)
        .filter(|p| p.name != me.name && endpoint(p, f) == Some(peer_addr))?;
    Some((peer.name.clone(), (f, key_id_of_spi(s.spi)), outbound))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::inventory::Inventory;
    use crate::config::keys::{Algorithm as KAlg, KeyEntry, KeyRing};
    use crate::config::settings::parse_str;
    use crate::ipsec::peer::{InSa, OutSa};
    use zeroize::Zeroizing;

    pub fn node(name: &str, addrs: &[&str], subnets: &[&str]) -> Node {
        Node {
            name: name.into(),
            addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            subnets: subnets.iter().map(|s| s.parse().unwrap()).collect(),
            wireguard_public_key: None,
            span: 0..0,
        }
    }

    pub fn config(nodes: Vec<Node>) -> Config {
        let text = "mode = \"ipsec\"\nnode = \"a\"\n";
        Config {
            settings: parse_str(std::path::Path::new("/etc/encryptd/encryptd.toml"), text)
                .expect("valid settings"),
            inventory: Inventory::new(nodes),
            keys: Some(KeyRing {
                entries: vec![KeyEntry {
                    id: 1,
                    algorithm: KAlg::Gcm {
                        key_bits: 128,
                        icv_bits: 128,
                    },
                    psk: Zeroizing::new(vec![7; 20]),
                    line: 1,
                }],
            }),
            psk: None,
        }
    }

    fn mesh() -> Config {
        config(vec![
            node("a", &["10.0.0.1", "fd00::1"], &["10.1.0.0/24"]),
            node("b", &["10.0.0.2", "fd00::2"], &[]),
            node("c", &["10.0.0.3"], &["10.3.0.0/24", "10.4.0.0/24"]),
        ])
    }

    #[test]
    fn policies_cover_every_prefix_pair_and_exempt_nd() {
        let p = policies(&mesh());
        let tunnel: Vec<_> = p.iter().filter(|p| p.template.is_some()).collect();
        // a-b: v4 2×1 + v6 1×1 = 3 pairs; a-c: v4 2×3 = 6 pairs; 3 directions each.
        assert_eq!(tunnel.len(), (3 + 6) * 3);
        let exempt: Vec<_> = p.iter().filter(|p| p.template.is_none()).collect();
        // IPv6 neighbour discovery, both types, in and out; nothing for the hello (its
        // socket bypasses XFRM) and no exceptions with strict mode off.
        assert_eq!(exempt.len(), 4, "{exempt:#?}");
        assert!(exempt.iter().all(|p| p.selector.proto == Some(58)));
        let out_ab = p
            .iter()
            .find(|p| {
                p.dir == Direction::Out
                    && p.selector
                        == Selector::new(
                            "10.1.0.0/24".parse().unwrap(),
                            "10.0.0.2/32".parse().unwrap(),
                        )
            })
            .expect("subnet of a to address of b");
        let t = out_ab.template.unwrap();
        assert_eq!(
            (t.src.to_string(), t.dst.to_string()),
            ("10.0.0.1".into(), "10.0.0.2".into())
        );
        // Never a policy between a node's own prefixes.
        assert!(!p.iter().any(|p| p.template.is_some()
            && p.selector.src.addr().to_string() == "10.0.0.1"
            && p.selector.dst.addr().to_string() == "10.1.0.0"));
        assert!(
            p.iter()
                .all(|p| crate::objects::xfrm::is_our_priority(p.priority))
        );
    }

    #[test]
    fn an_exception_is_a_door_to_this_nodes_own_addresses_only() {
        let mut cfg = mesh();
        cfg.settings.strict.exceptions = vec![crate::config::settings::Exception {
            proto: Proto::Tcp,
            port: 22,
        }];
        let doors = |cfg: &Config| -> Vec<XfrmPolicy> {
            policies(cfg)
                .into_iter()
                .filter(|p| p.selector.proto == Some(libc::IPPROTO_TCP as u8))
                .collect()
        };
        assert!(doors(&cfg).is_empty(), "strict mode off: no exceptions");
        cfg.settings.strict.enabled = true;
        let d = doors(&cfg);
        let show: Vec<String> = d
            .iter()
            .map(|p| {
                format!(
                    "{:?} {} {:?} > {} {:?}",
                    p.dir, p.selector.src, p.selector.sport, p.selector.dst, p.selector.dport
                )
            })
            .collect();
        assert_eq!(
            show,
            [
                "Out 10.0.0.1/32 Some(22) > 0.0.0.0/0 None",
                "Out fd00::1/128 Some(22) > ::/0 None",
            ]
        );
        // Below every tunnel policy, above the block.
        assert!(d.iter().all(|p| p.priority == PRIORITY_REPLY));
        assert!(
            policies(&cfg)
                .iter()
                .all(|p| p.template.is_none() || p.priority < PRIORITY_REPLY)
        );
        const { assert!(PRIORITY_REPLY < PRIORITY_BLOCK) };
    }

    #[test]
    fn strict_adds_a_block_policy_per_range_and_keeps_own_prefixes_reachable() {
        let mut cfg = mesh();
        cfg.settings.strict.enabled = true;
        cfg.settings.strict.cidrs = vec![
            "10.0.0.0/8".parse().unwrap(),
            "10.128.0.0/9".parse().unwrap(),
            "fd00::/8".parse().unwrap(),
        ];
        let p = policies(&cfg);
        let blocks: Vec<_> = p.iter().filter(|p| p.action == Action::Block).collect();
        assert_eq!(blocks.len(), 3);
        assert!(
            blocks
                .iter()
                .all(|b| b.priority == PRIORITY_BLOCK && b.dir == Direction::Out)
        );
        // a's own 10.0.0.1, 10.1.0.0/24 and fd00::1, once each despite two v4 ranges.
        let own: Vec<_> = p
            .iter()
            .filter(|p| {
                p.template.is_none() && p.action == Action::Allow && p.selector.proto.is_none()
            })
            .map(|p| p.selector.dst.to_string())
            .collect();
        assert_eq!(own, vec!["10.0.0.1/32", "10.1.0.0/24", "fd00::1/128"]);
        let ids: std::collections::HashSet<_> = p.iter().map(|p| p.id()).collect();
        assert_eq!(ids.len(), p.len(), "no duplicate policy");
    }

    /// Peer b of `mesh()` with one agreed slot, key-id 1, IPv4.
    fn agreed_peers() -> BTreeMap<String, Peer> {
        let mut peers = BTreeMap::new();
        let mut b = Peer::new("b", [1; 16]);
        b.inbound.insert(
            (Family::V4, 1),
            InSa {
                spi: make_spi(5, 1),
                bound: [0; 16],
                peer_boot: [2; 16],
                confirmed: true,
            },
        );
        b.outbound.insert(
            (Family::V4, 1),
            OutSa {
                spi: make_spi(9, 1),
                peer_boot: [2; 16],
            },
        );
        peers.insert("b".to_string(), b);
        peers
    }

    #[test]
    fn states_follow_the_peers_slots_with_per_direction_keys() {
        let cfg = mesh();
        let peers = agreed_peers();
        let s = states(&cfg, &[1; 16], &peers);
        assert_eq!(s.len(), 2);
        let sas: Vec<&XfrmState> = s.values().map(|v| v.as_ref().unwrap()).collect();
        assert_ne!(
            sas[0].algorithm, sas[1].algorithm,
            "each direction has its own key"
        );
        for st in &sas {
            assert_eq!(st.replay_window, 4096);
            assert!(st.esn);
            let (peer, slot, outbound) = slot_of(&cfg, &st.id()).unwrap();
            assert_eq!((peer.as_str(), slot), ("b", (Family::V4, 1)));
            assert_eq!(outbound, st.src.to_string() == "10.0.0.1");
        }
        // Adopted after a restart, before the peer's first hello: keep what is installed.
        let mut adopted = peers.clone();
        let b = adopted.get_mut("b").unwrap();
        for sa in b.inbound.values_mut() {
            sa.peer_boot = [0; 16];
        }
        for sa in b.outbound.values_mut() {
            sa.peer_boot = [0; 16];
        }
        let kept = states(&cfg, &[1; 16], &adopted);
        assert_eq!(kept.len(), 2);
        assert!(kept.values().all(Option::is_none));
        // A key-id no longer in the keys file: keep what is installed.
        let mut cfg2 = mesh();
        cfg2.keys.as_mut().unwrap().entries[0].id = 2;
        assert!(
            states(&cfg2, &[1; 16], &peers)
                .values()
                .all(Option::is_none)
        );
    }

    #[test]
    fn spis_carry_the_key_id_and_avoid_reserved_values() {
        for k in 1..=15u8 {
            for r in [0, 1, 0x0FFF_FFFF, 12345] {
                let spi = make_spi(r, k);
                assert!(spi >= 0x100);
                assert_eq!(key_id_of_spi(spi), k);
            }
        }
    }

    #[test]
    fn sa_limits_from_the_settings_with_the_age_spread_by_spi() {
        let cfg = mesh();
        let ip = &cfg.settings.ipsec;
        assert_eq!(ip.sa_lifetime.as_secs(), 86_400);
        let softs: std::collections::BTreeSet<u64> = (0..200u32)
            .map(|i| {
                let l = lifetime(ip, make_spi(100 + i, 1));
                assert_eq!(l.hard_secs, Some(86_400));
                assert_eq!(l.hard_packets, Some(ip.sa_packets));
                assert_eq!(l.soft_packets, Some(ip.sa_packets - ip.sa_packets / 10));
                let soft = l.soft_secs.unwrap();
                assert!((69_121..=77_760).contains(&soft), "{soft}");
                assert_eq!(
                    l,
                    lifetime(ip, make_spi(100 + i, 1)),
                    "the same at every pass"
                );
                soft
            })
            .collect();
        assert!(softs.len() > 150, "not spread: {} distinct", softs.len());
    }

    #[test]
    fn keys_are_derived_once_and_the_cache_holds_only_the_plans() {
        let cfg = mesh();
        let mut peers = agreed_peers();
        let mut cache = KeyCache::default();
        let first = states_cached(&cfg, &[1; 16], &peers, &mut cache);
        let n = first.values().filter(|s| s.is_some()).count() as u64;
        assert!(n > 0);
        assert_eq!(cache.derived, n);
        assert_eq!(
            first,
            states(&cfg, &[1; 16], &peers),
            "the same keys as derived afresh"
        );
        assert_eq!(states_cached(&cfg, &[1; 16], &peers, &mut cache), first);
        assert_eq!(cache.derived, n, "nothing derived again");
        // A new SPI for one slot: one key derived, the old one dropped.
        let p = peers.values_mut().next().unwrap();
        let sa = p.inbound.values_mut().next().unwrap();
        sa.spi += 0x10;
        let moved = states_cached(&cfg, &[1; 16], &peers, &mut cache);
        assert_eq!(cache.derived, n + 1);
        assert_eq!(cache.len() as u64, n);
        assert_eq!(moved, states(&cfg, &[1; 16], &peers));
        // Our reboot: every key is new.
        let rebooted = states_cached(&cfg, &[2; 16], &peers, &mut cache);
        assert_eq!(cache.derived, 2 * n + 1);
        assert_eq!(rebooted, states(&cfg, &[2; 16], &peers));
    }

    #[test]
    fn small_packet_limits_keep_room_for_the_handover() {
        let mut ip = mesh().settings.ipsec.clone();
        let soft = |ip: &Ipsec, n: u64| {
            let mut ip = ip.clone();
            ip.sa_packets = n;
            lifetime(&ip, 0x1234_5671).soft_packets.unwrap()
        };
        assert_eq!(soft(&ip, 100), 50, "half of a tiny limit");
        assert_eq!(soft(&ip, 500), 250);
        assert_eq!(soft(&ip, 131_072), 65_536);
        assert_eq!(soft(&ip, 200_000), 200_000 - 65_536);
        assert_eq!(soft(&ip, 1_000_000), 900_000, "90% once that leaves more");
        ip.sa_packets = (1 << 32) - (1 << 26);
        let l = lifetime(&ip, 0x1234_5671);
        assert_eq!(l.soft_packets, Some(ip.sa_packets - ip.sa_packets / 10));
    }

    #[test]
    fn due_for_rekey_is_the_current_inbound_sa_past_its_soft_limit() {
        let cfg = mesh();
        let mut peers = BTreeMap::new();
        let mut b = Peer::new("b", [1; 16]);
        let slot = (Family::V4, 1);
        let (cur, old) = (make_spi(300, 1), make_spi(200, 1));
        b.inbound.insert(
            slot,
            InSa {
                spi: cur,
                bound: [0; 16],
                peer_boot: [2; 16],
                confirmed: true,
            },
        );
        peers.insert("b".to_string(), b);
        let sa = |spi: u32, src: &str, dst: &str, packets: u64, added: u64| {
            let mut s = XfrmState::tunnel(
                src.parse().unwrap(),
                dst.parse().unwrap(),
                spi,
                REQID,
                Algorithm::gcm_aes(Zeroizing::new(vec![1; 20]), 128),
            );
            s.lifetime = lifetime(&cfg.settings.ipsec, spi);
            DumpedState {
                state: s,
                proto: 50,
                counters: crate::objects::xfrm::StateCounters {
                    packets,
                    add_time: added,
                    ..Default::default()
                },
                extras: vec![],
            }
        };
        let now = 1_000_000;
        let soft = cfg.settings.ipsec.sa_packets - cfg.settings.ipsec.sa_packets / 10;
        let kernel = [
            sa(cur, "10.0.0.2", "10.0.0.1", soft - 1, now - 60),
            sa(old, "10.0.0.2", "10.0.0.1", soft, now),
        ];
        assert!(
            due_for_rekey(&cfg, &peers, &kernel, now).is_empty(),
            "old is not current"
        );
        let kernel = [sa(cur, "10.0.0.2", "10.0.0.1", soft, now)];
        assert_eq!(
            due_for_rekey(&cfg, &peers, &kernel, now),
            vec![("b".into(), slot, cur)]
        );
        let kernel = [sa(cur, "10.0.0.2", "10.0.0.1", 0, now - 86_400)];
        assert_eq!(due_for_rekey(&cfg, &peers, &kernel, now).len(), 1, "by age");
        // Outbound SAs are the peer's to re-key (it chose their SPIs).
        let kernel = [sa(cur, "10.0.0.1", "10.0.0.2", soft, now - 86_400)];
        assert!(due_for_rekey(&cfg, &peers, &kernel, now).is_empty());
    }
}
