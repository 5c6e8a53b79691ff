//! What etcd holds, turned into `nodes.toml`: each registration is checked on its own with
//! the inventory's own validation, then against the registrations accepted before it (the
//! first registered owner of an address, a subnet or a key keeps it). A registration that
//! fails is left out by name and reason; the others are rendered.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::diag::{Diags, Source};
use crate::config::{Mode, inventory};
use crate::net::{PrefixIndex, addresses_in};

/// A registration larger than this is left out: a node's entry is a few hundred bytes,
/// and one writer must not make every node render megabytes.
pub const MAX_VALUE: usize = 16 * 1024;

/// One key under `<prefix>/nodes/` as etcd holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    /// The revision that created the key: older registrations win conflicts.
    pub create_revision: i64,
    pub value: Vec<u8>,
}

/// A node's registration: the value of its key, JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub name: String,
    pub addresses: Vec<String>,
    #[serde(default)]
    pub subnets: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_public_key: Option<String>,
}

impl Registration {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("plain strings serialize")
    }
}

/// The key of node `name` under `prefix`.
pub fn node_key(prefix: &str, name: &str) -> String {
    format!("{}{name}", nodes_dir(prefix))
}

/// Where registrations live: `<prefix>/nodes/`.
pub fn nodes_dir(prefix: &str) -> String {
    format!("{prefix}/nodes/")
}

/// The result of one rendering.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rendered {
    /// `nodes.toml`, every accepted node in registration order.
    pub toml: String,
    /// Names of the nodes rendered.
    pub accepted: Vec<String>,
    /// Keys left out, each with why.
    pub rejected: BTreeMap<String, String>,
}

/// Render the inventory from every key under `nodes_dir(prefix)`.
pub fn render(entries: &BTreeMap<String, Kv>, prefix: &str, mode: Mode) -> Rendered {
    let dir = nodes_dir(prefix);
    let mut order: Vec<(&String, &Kv)> = entries.iter().collect();
    order.sort_by_key(|(k, kv)| (kv.create_revision, *k));
    let mut out = Rendered {
        toml: format!(
            "# Rendered by `encryptd sync` from etcd ({dir}): every node registered there, in the\n\
             # order they registered. Do not edit: the next change in etcd replaces this file.\n\n"
        ),
        ..Rendered::default()
    };
    let mut claims = Claims::default();
    for (key, kv) in order {
        match entry(key, kv, &dir, mode).and_then(|(node, text)| {
            claims.check(&node)?;
            Ok((node, text))
        }) {
            Ok((node, text)) => {
                claims.take(&node);
                out.accepted.push(node.name);
                out.toml += &text;
            }
            Err(why) => {
                out.rejected.insert(key.clone(), why);
            }
        }
    }
    out
}

/// One registration, validated alone: its node and its `[[node]]` text.
fn entry(key: &str, kv: &Kv, dir: &str, mode: Mode) -> Result<(inventory::Node, String), String> {
    let name = key
        .strip_prefix(dir)
        .ok_or_else(|| format!("key is not under {dir}"))?;
    if kv.value.len() > MAX_VALUE {
        return Err(format!(
            "registration is {} bytes; at most {MAX_VALUE}",
            kv.value.len()
        ));
    }
    let reg: Registration = serde_json::from_slice(&kv.value)
        .map_err(|e| format!("registration is not the JSON `encryptd sync` writes: {e}"))?;
    if reg.name != name {
        return Err(format!(
            "registration names node \"{}\" but is stored under node \"{name}\"'s key",
            reg.name
        ));
    }
    let text = node_toml(&reg);
    let diags = Diags::default();
    let inv = inventory::read(&Source::new(Path::new(key), &text), &diags, mode);
    if let Some(d) = diags.into_sorted().into_iter().next() {
        return Err(d.message);
    }
    let node = inv.nodes.into_iter().next().ok_or("no node")?;
    Ok((node, text))
}

/// What the accepted registrations hold, so that a later one cannot take it.
#[derive(Default)]
struct Claims {
    addrs: BTreeMap<IpAddr, String>,
    subnets: PrefixIndex<String>,
    keys: HashMap<[u8; 32], String>,
}

impl Claims {
    fn check(&self, n: &inventory::Node) -> Result<(), String> {
        for a in &n.addresses {
            if let Some(o) = self.addrs.get(a) {
                return Err(format!("address {a} is node \"{o}\"'s (registered first)"));
            }
            if let Some((c, o)) = self.subnets.containing(*a).next() {
                return Err(format!(
                    "address {a} is inside subnet {c} of node \"{o}\" (registered first)"
                ));
            }
        }
        for s in &n.subnets {
            if let Some((c, o)) = self.subnets.overlapping(s).next() {
                return Err(format!(
                    "subnet {s} overlaps subnet {c} of node \"{o}\" (registered first)"
                ));
            }
            if let Some((a, o)) = addresses_in(&self.addrs, s).next() {
                return Err(format!(
                    "subnet {s} contains address {a} of node \"{o}\" (registered first)"
                ));
            }
        }
        if let Some(k) = &n.wireguard_public_key
            && let Some(o) = self.keys.get(k)
        {
            return Err(format!(
                "wireguard_public_key is node \"{o}\"'s (registered first)"
            ));
        }
        Ok(())
    }

    fn take(&mut self, n: &inventory::Node) {
        for a in &n.addresses {
            self.addrs.insert(*a, n.name.clone());
        }
        for s in &n.subnets {
            self.subnets.insert(*s, n.name.clone());
        }
        if let Some(k) = n.wireguard_public_key {
            self.keys.insert(k, n.name.clone());
        }
    }
}

/// A registration as a `[[node]]` table.
fn node_toml(r: &Registration) -> String {
    let list = |v: &[String]| v.iter().map(|s| quote(s)).collect::<Vec<_>>().join(", ");
    let mut s = format!(
        "[[node]]\nname = {}\naddresses = [{}]\nsubnets = [{}]\n",
        quote(&r.name),
        list(&r.addresses),
        list(&r.subnets)
    );
    if let Some(k) = &r.wireguard_public_key {
        let _ = writeln!(s, "wireguard_public_key = {}", quote(k));
    }
    s.push('\n');
    s
}

/// A TOML basic string: whatever a writer put in etcd stays inside its quotes.
fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(q, "\\u{:04X}", c as u32);
            }
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/encryptd/t";

    fn reg(name: &str, addrs: &[&str], subnets: &[&str]) -> Vec<u8> {
        Registration {
            name: name.into(),
            addresses: addrs.iter().map(|s| s.to_string()).collect(),
            subnets: subnets.iter().map(|s| s.to_string()).collect(),
            wireguard_public_key: None,
        }
        .to_json()
        .into_bytes()
    }

    fn put(m: &mut BTreeMap<String, Kv>, rev: i64, name: &str, value: Vec<u8>) {
        m.insert(
            node_key(P, name),
            Kv {
                create_revision: rev,
                value,
            },
        );
    }

    fn valid_inventory(toml: &str, mode: Mode) {
        let diags = Diags::default();
        inventory::read(&Source::new(Path::new("x"), toml), &diags, mode);
        assert!(diags.is_empty(), "{:?}\n{toml}", diags.into_sorted());
    }

    #[test]
    fn every_registration_is_rendered_in_registration_order() {
        let mut m = BTreeMap::new();
        put(
            &mut m,
            7,
            "a",
            reg("a", &["10.0.0.1", "fd00::1"], &["10.9.0.0/24"]),
        );
        put(&mut m, 3, "b", reg("b", &["10.0.0.2"], &[]));
        let r = render(&m, P, Mode::Ipsec);
        assert_eq!(r.accepted, ["b", "a"]);
        assert!(r.rejected.is_empty());
        valid_inventory(&r.toml, Mode::Ipsec);
        assert!(r.toml.find("\"b\"").unwrap() < r.toml.find("\"a\"").unwrap());
    }

    #[test]
    fn a_later_claim_of_an_address_or_subnet_is_left_out_by_name() {
        let mut m = BTreeMap::new();
        put(&mut m, 1, "a", reg("a", &["10.0.0.1"], &["10.9.0.0/16"]));
        put(&mut m, 2, "thief", reg("thief", &["10.0.0.1"], &[]));
        put(&mut m, 3, "inside", reg("inside", &["10.9.3.3"], &[]));
        put(
            &mut m,
            4,
            "overlap",
            reg("overlap", &["10.0.0.4"], &["10.9.1.0/24"]),
        );
        put(
            &mut m,
            5,
            "around",
            reg("around", &["10.0.0.5"], &["10.0.0.0/29"]),
        );
        put(&mut m, 6, "c", reg("c", &["10.0.0.6"], &[]));
        let r = render(&m, P, Mode::Ipsec);
        assert_eq!(r.accepted, ["a", "c"]);
        let why = |n: &str| r.rejected[&node_key(P, n)].clone();
        assert_eq!(
            why("thief"),
            "address 10.0.0.1 is node \"a\"'s (registered first)"
        );
        assert!(why("inside").contains("inside subnet 10.9.0.0/16 of node \"a\""));
        assert!(why("overlap").contains("overlaps subnet 10.9.0.0/16 of node \"a\""));
        assert!(why("around").contains("contains address 10.0.0.1 of node \"a\""));
        valid_inventory(&r.toml, Mode::Ipsec);
    }

    #[test]
    fn the_first_owner_keeps_its_address_whichever_key_sorts_first() {
        let mut m = BTreeMap::new();
        put(&mut m, 9, "a", reg("a", &["10.0.0.1"], &[]));
        put(&mut m, 2, "z", reg("z", &["10.0.0.1"], &[]));
        let r = render(&m, P, Mode::Ipsec);
        assert_eq!(r.accepted, ["z"]);
        assert!(r.rejected[&node_key(P, "a")].contains("node \"z\"'s"));
    }

    #[test]
    fn malformed_registrations_are_left_out_with_the_reason() {
        let mut m = BTreeMap::new();
        put(&mut m, 1, "ok", reg("ok", &["10.0.0.1"], &[]));
        put(&mut m, 2, "json", b"{not json".to_vec());
        put(&mut m, 3, "addr", reg("addr", &["10.0.0.300"], &[]));
        put(&mut m, 4, "other", reg("n3", &["10.0.0.4"], &[]));
        put(&mut m, 5, "big", vec![b' '; MAX_VALUE + 1]);
        put(&mut m, 6, "bad name!", reg("bad name!", &["10.0.0.6"], &[]));
        put(
            &mut m,
            7,
            "inject",
            reg("inject\"\n[[node]]\nname = \"x", &["10.0.0.7"], &[]),
        );
        let r = render(&m, P, Mode::Ipsec);
        assert_eq!(r.accepted, ["ok"]);
        let why = |n: &str| r.rejected[&node_key(P, n)].clone();
        assert!(why("json").starts_with("registration is not the JSON"));
        assert!(why("addr").contains("\"10.0.0.300\" is not an IPv4 or IPv6 address"));
        assert!(
            why("other").contains("names node \"n3\" but is stored under node \"other\"'s key")
        );
        assert!(why("big").contains("at most 16384"));
        assert!(why("bad name!").contains("must be letters, digits"));
        assert_eq!(r.rejected.len(), 6);
        valid_inventory(&r.toml, Mode::Ipsec);
    }

    #[test]
    fn wireguard_mode_needs_a_distinct_well_formed_key() {
        let k = |b: u8| crate::config::wgkey::to_base64(&[b; 32]);
        let wg = |name: &str, a: &str, key: Option<String>| {
            Registration {
                name: name.into(),
                addresses: vec![a.into()],
                subnets: vec![],
                wireguard_public_key: key,
            }
            .to_json()
            .into_bytes()
        };
        let mut m = BTreeMap::new();
        put(&mut m, 1, "a", wg("a", "10.0.0.1", Some(k(1))));
        put(&mut m, 2, "same", wg("same", "10.0.0.2", Some(k(1))));
        put(
            &mut m,
            3,
            "short",
            wg("short", "10.0.0.3", Some("AAAA".into())),
        );
        put(&mut m, 4, "none", wg("none", "10.0.0.4", None));
        put(&mut m, 5, "b", wg("b", "10.0.0.5", Some(k(2))));
        let r = render(&m, P, Mode::Wireguard);
        assert_eq!(r.accepted, ["a", "b"]);
        let why = |n: &str| r.rejected[&node_key(P, n)].clone();
        assert!(why("same").contains("wireguard_public_key is node \"a\"'s"));
        assert!(why("short").contains("32 bytes in base64"));
        assert!(why("none").contains("missing required field `wireguard_public_key`"));
        valid_inventory(&r.toml, Mode::Wireguard);
    }

    #[test]
    fn quoting_keeps_any_text_inside_its_string() {
        assert_eq!(quote("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000A\"");
    }
}
