//! `nodes.toml`: every node of the fleet, its underlay addresses and the subnets behind it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::Range;

use base64::Engine;

use super::diag::{Diags, Source};
use super::doc::{At, Table, parse};
use super::settings::Mode;
use crate::net::{Cidr, CidrError, PrefixIndex};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub addresses: Vec<IpAddr>,
    pub subnets: Vec<Cidr>,
    pub wireguard_public_key: Option<[u8; 32]>,
    /// Where the node's table starts, for messages that concern the node as a whole.
    pub span: Range<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Inventory {
    pub nodes: Vec<Node>,
    /// Position of each node by name and by address: lookups stay O(1) at 10,000 nodes.
    by_name: HashMap<String, usize>,
    by_addr: HashMap<IpAddr, usize>,
}

impl Inventory {
    pub fn new(nodes: Vec<Node>) -> Inventory {
        let by_name = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), i))
            .collect();
        let by_addr = nodes
            .iter()
            .enumerate()
            .flat_map(|(i, n)| n.addresses.iter().map(move |a| (*a, i)))
            .collect();
        Inventory {
            nodes,
            by_name,
            by_addr,
        }
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.by_name.get(name).map(|&i| &self.nodes[i])
    }

    /// The node that has `addr` among its addresses.
    pub fn node_by_address(&self, addr: &IpAddr) -> Option<&Node> {
        self.by_addr.get(addr).map(|&i| &self.nodes[i])
    }

    /// Every node but `name`.
    pub fn peers<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Node> {
        self.nodes.iter().filter(move |n| n.name != name)
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn address(t: &Table, At { value, span }: &At<String>) -> Option<IpAddr> {
    if value.contains('/') {
        t.error(
            span.clone(),
            format!(
                "address \"{value}\" has a prefix length; `addresses` are single addresses, put routed ranges in `subnets`"
            ),
        );
        return None;
    }
    match value.parse::<IpAddr>() {
        Ok(ip) if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() => {
            t.error(
                span.clone(),
                format!(
                    "address {ip} cannot be a node address (unspecified, loopback or multicast)"
                ),
            );
            None
        }
        Ok(ip) => Some(ip),
        Err(_) => {
            t.error(
                span.clone(),
                format!("\"{value}\" is not an IPv4 or IPv6 address"),
            );
            None
        }
    }
}

/// Read `nodes.toml`. Problems go to `diags`; the result is meaningful only if none were added.
pub fn read(src: &Source, diags: &Diags, mode: Mode) -> Inventory {
    let doc = parse(src, diags);
    let top = Table::new(src, diags, &doc, "the inventory");
    let tables = top.tables("node");
    if tables.is_empty() && diags.is_empty() {
        top.error(0..0, "the inventory lists no `[[node]]`");
    }
    let mut seen = Seen::default();
    let mut nodes = Vec::new();
    for t in &tables {
        let node = read_node(src, t, mode, &mut seen, nodes.len() + 1);
        nodes.push(node);
    }
    let subnets = seen.subnets;
    top.finish();

    // An underlay address inside another node's subnet would be routed into that node's
    // tunnel: its own ESP/WireGuard packets would loop.
    for n in &nodes {
        for a in &n.addresses {
            if let Some((c, (other, span))) =
                subnets.containing(*a).find(|(_, (o, _))| *o != n.name)
            {
                diags.push(src.diag(
                    span.clone(),
                    format!(
                        "subnet {c} of node \"{other}\" contains address {a} of node \"{}\"",
                        n.name
                    ),
                ));
            }
        }
    }
    Inventory::new(nodes)
}

/// The first place each name, address, subnet and key was seen, for duplicate messages:
/// the first node to claim one keeps it.
#[derive(Default)]
struct Seen {
    names: HashMap<String, usize>,
    addrs: HashMap<IpAddr, (String, usize)>,
    subnets: PrefixIndex<(String, Range<usize>)>,
    keys: HashMap<[u8; 32], (String, usize)>,
}

/// One `[[node]]` (the `index`-th).
fn read_node(src: &Source, t: &Table, mode: Mode, seen: &mut Seen, index: usize) -> Node {
    let line = |span: &Range<usize>| src.line_col(span.start).0;
    let name = t.required_string("name");
    let name_str = name.as_ref().map(|n| n.value.clone()).unwrap_or_default();
    if let Some(At { value, span }) = &name {
        if !valid_name(value) {
            t.error(
                span.clone(),
                format!("node name \"{value}\" must be letters, digits, '-', '_' or '.'"),
            );
        } else if let Some(first) = seen.names.get(value) {
            t.error(
                span.clone(),
                format!("duplicate node name \"{value}\" (first defined on line {first})"),
            );
        } else {
            seen.names.insert(value.clone(), line(span));
        }
    }
    let node_addrs = read_addresses(src, t, &name_str, seen);
    let node_subnets = read_subnets(src, t, &name_str, seen);
    let wireguard_public_key = read_public_key(src, t, &name_str, seen);
    if mode == Mode::Wireguard && !t.has_key("wireguard_public_key") {
        t.error(
            t.span(),
            format!(
                "missing required field `wireguard_public_key` in [[node]] #{index} (mode = \"wireguard\"; `encryptd pubkey` on that node prints it)"
            ),
        );
    }
    t.finish();
    for (c, span) in &node_subnets {
        seen.subnets.insert(*c, (name_str.clone(), span.clone()));
    }
    Node {
        name: name_str,
        addresses: node_addrs,
        subnets: node_subnets.into_iter().map(|(c, _)| c).collect(),
        wireguard_public_key,
        span: t.span(),
    }
}

fn read_addresses(src: &Source, t: &Table, name_str: &str, seen: &mut Seen) -> Vec<IpAddr> {
    let line = |span: &Range<usize>| src.line_col(span.start).0;
    let mut node_addrs = Vec::new();
    match t.strings("addresses") {
        None if t.has_key("addresses") => {}
        None => t.missing("addresses"),
        Some(v) if v.is_empty() => t.error(
            t.span(),
            format!("node \"{name_str}\" has an empty `addresses` list"),
        ),
        Some(v) => {
            for a in &v {
                let Some(ip) = address(t, a) else { continue };
                if let Some((other, l)) = seen.addrs.get(&ip) {
                    t.error(
                        a.span.clone(),
                        format!("duplicate address {ip}: node \"{other}\" has it too (line {l})"),
                    );
                    continue;
                }
                seen.addrs.insert(ip, (name_str.to_string(), line(&a.span)));
                node_addrs.push(ip);
            }
        }
    }
    node_addrs
}

fn read_subnets(src: &Source, t: &Table, name_str: &str, seen: &Seen) -> Vec<(Cidr, Range<usize>)> {
    let line = |span: &Range<usize>| src.line_col(span.start).0;
    let mut node_subnets = Vec::new();
    for At { value, span } in t.strings("subnets").unwrap_or_default() {
        let c = match value.parse::<Cidr>() {
            Ok(c) => c,
            Err(e @ CidrError::HostBits { .. }) => {
                t.error(span, format!("subnet {e}"));
                continue;
            }
            Err(e) => {
                t.error(span, format!("subnet: {e}"));
                continue;
            }
        };
        if let Some((o, (other, ospan))) = seen
            .subnets
            .overlapping(&c)
            .find(|(_, (other, _))| *other != name_str)
        {
            t.error(
                span.clone(),
                format!(
                    "subnet {c} overlaps subnet {o} of node \"{other}\" (line {})",
                    line(ospan)
                ),
            );
            continue;
        }
        node_subnets.push((c, span));
    }
    node_subnets
}

fn read_public_key(src: &Source, t: &Table, name_str: &str, seen: &mut Seen) -> Option<[u8; 32]> {
    let line = |span: &Range<usize>| src.line_col(span.start).0;
    t.string("wireguard_public_key").and_then(|At { value, span }| {
        let decoded = base64::engine::general_purpose::STANDARD.decode(value.trim());
        match decoded.ok().and_then(|b| <[u8; 32]>::try_from(b).ok()) {
            Some(k) => {
                if let Some((other, l)) = seen.keys.get(&k) {
                    t.error(
                        span,
                        format!(
                            "wireguard_public_key is also the key of node \"{other}\" (line {l}); every node needs its own key pair"
                        ),
                    );
                    None
                } else {
                    seen.keys.insert(k, (name_str.to_string(), line(&span)));
                    Some(k)
                }
            }
            None => {
                t.error(
                    span,
                    "wireguard_public_key must be 32 bytes in base64 (44 characters, as `wg pubkey` or `encryptd pubkey` prints)",
                );
                None
            }
        }
    })
}
