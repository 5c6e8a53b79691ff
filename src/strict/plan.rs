//! Strict mode: the `inet encryptd` nftables table that drops, instead of sending or
//! accepting in plaintext, traffic to or from a protected range that is not encrypted.
//! Rendered here as nft text (pure); [`super::Strict`] applies it in one transaction.
//!
//! IPsec mode: egress `rt ipsec missing` (no XFRM bundle on the route), ingress
//! `meta ipsec missing` (not decrypted). WireGuard mode: egress leaving by any interface
//! but the tunnel, ingress arriving by any but the tunnel. Both: IPv4 and IPv6, output,
//! input and forward (subnets routed behind the node). What must stay plaintext is
//! exempted first: loopback, ESP itself (it re-enters the output hook after encryption),
//! the daemons' hellos or the tunnel's UDP, IPv6 neighbour discovery, and the operator's
//! exceptions (e.g. tcp/22).

use std::fmt::Write;

use crate::config::settings::Mode;
use crate::config::{Config, Node, Settings};
use crate::net::Cidr;

/// Rule comments; `encryptd status` maps counters back by them.
pub const EGRESS: &str = "egress";
pub const INGRESS: &str = "ingress";
pub const FORWARD_OUT: &str = "forward-egress";
pub const FORWARD_IN: &str = "forward-ingress";

fn set(out: &mut String, name: &str, ty: &str, items: &[String]) {
    let _ = writeln!(out, "    set {name} {{\n        type {ty}; flags interval;");
    if !items.is_empty() {
        let _ = writeln!(out, "        elements = {{ {} }}", items.join(", "));
    }
    out.push_str("    }\n");
}

fn addrs(nodes: &[&Node], v4: bool) -> Vec<String> {
    nodes
        .iter()
        .flat_map(|n| n.addresses.iter())
        .filter(|a| a.is_ipv4() == v4)
        .map(ToString::to_string)
        .collect()
}

fn cidrs(c: &[Cidr], v4: bool) -> Vec<String> {
    c.iter()
        .filter(|c| c.is_ipv4() == v4)
        .map(ToString::to_string)
        .collect()
}

/// The table, or `None` when strict mode is off. docs/strict.md gives the reason for
/// every line; each exemption is as narrow as its purpose allows.
pub fn ruleset(cfg: &Config) -> Option<String> {
    let s = &cfg.settings;
    if !s.strict.enabled {
        return None;
    }
    let nodes: Vec<&Node> = cfg.inventory.nodes.iter().collect();
    let me = cfg.me();
    let mut t = String::from("table inet encryptd {\n");
    set(
        &mut t,
        "protected4",
        "ipv4_addr",
        &cidrs(&s.strict.cidrs, true),
    );
    set(
        &mut t,
        "protected6",
        "ipv6_addr",
        &cidrs(&s.strict.cidrs, false),
    );
    set(&mut t, "nodes4", "ipv4_addr", &addrs(&nodes, true));
    set(&mut t, "nodes6", "ipv6_addr", &addrs(&nodes, false));
    // The ranges routed behind this node (containers, VMs, a LAN).
    set(&mut t, "subnets4", "ipv4_addr", &cidrs(&me.subnets, true));
    set(&mut t, "subnets6", "ipv6_addr", &cidrs(&me.subnets, false));

    let nd = "        icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, nd-router-advert } accept\n";
    let (doors_in, doors_out) = doors(s);
    let Plain {
        tunnel_out,
        tunnel_in,
        plain_out,
        plain_in,
        plain_fwd,
    } = own_plaintext(s);
    let from_subnet = FROM_SUBNET;
    let (to_subnet_in, from_subnet_out) = subnets(s);
    let remote = |dir: &str| {
        if s.strict.allow_remote_node_identities {
            both(&format!("IP {dir} @X accept"))
        } else {
            String::new()
        }
    };
    let drops = |field: &str, cond: &str, comment: &str| {
        format!(
            "        ip {field} @protected4 {cond} counter drop comment \"{comment}\"\n        ip6 {field} @protected6 {cond} counter drop comment \"{comment}\"\n"
        )
    };

    let _ = write!(
        t,
        "    chain output {{\n        type filter hook output priority filter; policy accept;\n        oifname \"lo\" accept\n{plain_out}{nd}{doors_out}{}{}{}    }}\n",
        remote("daddr"),
        both("IP daddr @S accept"),
        drops("daddr", &tunnel_out, EGRESS)
    );
    if s.strict.ingress {
        let _ = write!(
            t,
            "    chain input {{\n        type filter hook input priority filter; policy accept;\n        iifname \"lo\" accept\n{plain_in}{nd}{doors_in}{}{}{}    }}\n",
            remote("saddr"),
            both(&format!("{from_subnet} accept")),
            drops("saddr", &tunnel_in, INGRESS)
        );
    }
    let fwd_in = if s.strict.ingress {
        drops("saddr", &tunnel_in, FORWARD_IN)
    } else {
        String::new()
    };
    let _ = write!(
        t,
        "    chain forward {{\n        type filter hook forward priority filter; policy accept;\n{plain_fwd}{nd}{}{to_subnet_in}{from_subnet_out}{}{}{fwd_in}    }}\n",
        remote("daddr"),
        both(&format!("{from_subnet} IP daddr @S accept")),
        drops("daddr", &tunnel_out, FORWARD_OUT)
    );
    t.push_str("}\n");
    Some(t)
}

/// One rule for each family: `IP` becomes `ip`/`ip6`, `@X` the node set, `@S` the
/// subnet set of that family.
fn both(rule: &str) -> String {
    format!(
        "        {}\n        {}\n",
        rule.replace("IP ", "ip ")
            .replace("@X", "@nodes4")
            .replace("@S", "@subnets4"),
        rule.replace("IP ", "ip6 ")
            .replace("@X", "@nodes6")
            .replace("@S", "@subnets6")
    )
}

/// A management exception is a door to this node's own service: in, to that port
/// (input only: what reaches `input` is addressed to this node); out, only the replies
/// of those connections. Never in `forward`, never a source port alone. (in, out)
fn doors(s: &Settings) -> (String, String) {
    let (mut doors_in, mut doors_out) = (String::new(), String::new());
    for e in &s.strict.exceptions {
        let (p, port) = (e.proto.as_str(), e.port);
        let _ = writeln!(doors_in, "        {p} dport {port} accept");
        let _ = writeln!(
            doors_out,
            "        {p} sport {port} ct direction reply accept"
        );
    }
    (doors_in, doors_out)
}

/// What counts as encrypted (the drop rules' condition, out and in), and the daemons'
/// own plaintext, out, in and forwarded.
struct Plain {
    tunnel_out: String,
    tunnel_in: String,
    plain_out: String,
    plain_in: String,
    plain_fwd: String,
}

/// The daemons' own plaintext only between node addresses: ESP and the hellos, or the
/// tunnel's UDP. (In IPsec mode the hello socket bypasses XFRM by itself; other
/// programs' datagrams to that port are encrypted, so this lets no plaintext out.)
fn own_plaintext(s: &Settings) -> Plain {
    let (tunnel_out, tunnel_in, plain_out, plain_in, plain_fwd) = match s.mode {
        Mode::Ipsec => {
            let hello = s.ipsec.hello_port;
            (
                "rt ipsec missing".to_string(),
                "meta ipsec missing".to_string(),
                both("IP daddr @X meta l4proto esp accept")
                    + &both(&format!(
                        "IP daddr @X udp sport {hello} udp dport {hello} accept"
                    )),
                both("IP saddr @X meta l4proto esp accept")
                    + &both(&format!(
                        "IP saddr @X udp sport {hello} udp dport {hello} accept"
                    )),
                // A node that routes between two others passes their ESP and hellos.
                both("IP saddr @X IP daddr @X meta l4proto esp accept")
                    + &both(&format!(
                        "IP saddr @X IP daddr @X udp sport {hello} udp dport {hello} accept"
                    )),
            )
        }
        Mode::Wireguard => {
            let p = s.wireguard.listen_port;
            (
                format!("oifname != \"{}\"", s.wireguard.interface),
                format!("iifname != \"{}\"", s.wireguard.interface),
                both(&format!("IP daddr @X udp sport {p} accept")),
                both(&format!("IP saddr @X udp dport {p} accept")),
                both(&format!("IP saddr @X IP daddr @X udp dport {p} accept"))
                    + &both(&format!("IP saddr @X IP daddr @X udp sport {p} accept")),
            )
        }
    };
    Plain {
        tunnel_out,
        tunnel_in,
        plain_out,
        plain_in,
        plain_fwd,
    }
}

/// Hosts behind this node. Their packets count only when they arrive on the interface
/// their subnet is routed through (`fib saddr . iif`: a reverse-path check), so a packet
/// from the wire that claims such a source is not one of them.
const FROM_SUBNET: &str = "IP saddr @S fib saddr . iif oif exists";

/// Traffic to this node's subnets that came through a tunnel, and theirs that leaves
/// through one: (forwarded in, forwarded out).
fn subnets(s: &Settings) -> (String, String) {
    let from_subnet = FROM_SUBNET;
    match s.mode {
        Mode::Ipsec => (
            both("IP daddr @S meta ipsec exists accept"),
            both(&format!("{from_subnet} rt ipsec exists accept")),
        ),
        Mode::Wireguard => {
            let i = &s.wireguard.interface;
            (
                both(&format!("iifname \"{i}\" IP daddr @S accept")),
                both(&format!("{from_subnet} oifname \"{i}\" accept")),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::settings::{Exception, Proto};

    fn cfg(mode: Mode) -> Config {
        let mut c = crate::ipsec::plan::tests::config(vec![
            crate::ipsec::plan::tests::node("a", &["10.0.0.1", "fd00::1"], &["10.1.0.0/24"]),
            crate::ipsec::plan::tests::node("b", &["10.0.0.2"], &[]),
        ]);
        c.settings.mode = mode;
        c.settings.strict.enabled = true;
        c.settings.strict.cidrs = vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
        c.settings.strict.exceptions = vec![Exception {
            proto: Proto::Tcp,
            port: 22,
        }];
        c
    }

    #[test]
    fn off_means_no_table() {
        let mut c = cfg(Mode::Ipsec);
        c.settings.strict.enabled = false;
        assert_eq!(ruleset(&c), None);
    }

    #[test]
    fn ipsec_rules_exempt_esp_hello_nd_and_exceptions_before_dropping() {
        let r = ruleset(&cfg(Mode::Ipsec)).unwrap();
        assert!(r.contains("elements = { 10.0.0.0/8 }"), "{r}");
        assert!(r.contains("elements = { fd00::/8 }"));
        assert!(r.contains("elements = { 10.0.0.1, 10.0.0.2 }"));
        for needle in [
            "ip daddr @protected4 rt ipsec missing counter drop comment \"egress\"",
            "ip6 daddr @protected6 rt ipsec missing counter drop comment \"egress\"",
            "ip saddr @protected4 meta ipsec missing counter drop comment \"ingress\"",
            "ip6 saddr @protected6 meta ipsec missing counter drop comment \"forward-ingress\"",
            "ip daddr @nodes4 meta l4proto esp accept",
            "ip6 saddr @nodes6 meta l4proto esp accept",
            "ip daddr @nodes4 udp sport 4510 udp dport 4510 accept",
            "ip6 saddr @nodes6 udp sport 4510 udp dport 4510 accept",
            "oifname \"lo\" accept",
            "nd-neighbor-solicit",
        ] {
            assert!(r.contains(needle), "missing `{needle}` in\n{r}");
        }
        let chain = |name: &str| {
            let c = &r[r.find(&format!("chain {name} ")).unwrap()..];
            c[..c.find("    }").unwrap()].to_string()
        };
        // The exception is a door: inbound to its port, in `input` only; outbound only
        // the replies; nothing in `forward`; no rule keyed on a source port alone.
        assert!(chain("input").contains("tcp dport 22 accept"), "{r}");
        assert!(chain("output").contains("tcp sport 22 ct direction reply accept"));
        assert!(!chain("output").contains("dport 22"));
        assert!(!chain("input").contains("sport 22"));
        assert!(!chain("forward").contains(" 22 "), "{}", chain("forward"));
        assert!(!r.contains("sport 22 accept"));
        // A node routing between two others passes their hellos, only between nodes.
        assert!(
            chain("forward")
                .contains("ip saddr @nodes4 ip daddr @nodes4 udp sport 4510 udp dport 4510 accept"),
            "{}",
            chain("forward")
        );
        // ESP and the hello are plaintext only between node addresses.
        assert!(
            r.lines()
                .filter(|l| l.contains("4510"))
                .all(|l| l.contains("@nodes"))
        );
        assert!(
            r.lines()
                .filter(|l| l.contains("esp"))
                .all(|l| l.contains("@nodes"))
        );
        // Every exemption comes before the first drop of its chain.
        for chain in r.split("    chain ").skip(1) {
            let first_drop = chain.find("drop").unwrap();
            assert!(chain.find("accept").unwrap() < first_drop, "{chain}");
            assert!(
                !chain[first_drop..].contains("accept"),
                "accept after drop in {chain}"
            );
        }
        assert!(
            !r.contains("@nodes4 accept"),
            "node identities are not allowed by default"
        );
    }

    #[test]
    fn wireguard_rules_use_the_tunnel_interface() {
        let r = ruleset(&cfg(Mode::Wireguard)).unwrap();
        assert!(
            r.contains("ip daddr @protected4 oifname != \"encryptd0\" counter drop"),
            "{r}"
        );
        assert!(r.contains("ip saddr @protected4 iifname != \"encryptd0\" counter drop"));
        assert!(r.contains("ip daddr @nodes4 udp sport 51871 accept"));
        assert!(r.contains("ip saddr @nodes4 udp dport 51871 accept"));
        assert!(r.contains("ip saddr @nodes4 ip daddr @nodes4 udp dport 51871 accept"));
        assert!(r.contains("ip saddr @nodes4 ip daddr @nodes4 udp sport 51871 accept"));
        assert!(!r.contains("esp"));
    }

    #[test]
    fn hosts_behind_this_node_pass_only_on_their_own_interface() {
        for (mode, to_in, from_out) in [
            (
                Mode::Ipsec,
                "ip daddr @subnets4 meta ipsec exists accept",
                "ip saddr @subnets4 fib saddr . iif oif exists rt ipsec exists accept",
            ),
            (
                Mode::Wireguard,
                "iifname \"encryptd0\" ip daddr @subnets4 accept",
                "ip saddr @subnets4 fib saddr . iif oif exists oifname \"encryptd0\" accept",
            ),
        ] {
            let r = ruleset(&cfg(mode)).unwrap();
            assert!(r.contains("set subnets4 {\n        type ipv4_addr; flags interval;\n        elements = { 10.1.0.0/24 }"), "{r}");
            let fwd = &r[r.find("chain forward").unwrap()..];
            for needle in [to_in, from_out] {
                let at = fwd
                    .find(needle)
                    .unwrap_or_else(|| panic!("no `{needle}` in {fwd}"));
                assert!(at < fwd.find("drop").unwrap(), "{needle} after a drop");
            }
            let input = &r[r.find("chain input").unwrap()..r.find("chain forward").unwrap()];
            assert!(input.contains("ip saddr @subnets4 fib saddr . iif oif exists accept"));
        }
    }

    #[test]
    fn ingress_off_and_remote_node_identities() {
        let mut c = cfg(Mode::Ipsec);
        c.settings.strict.ingress = false;
        c.settings.strict.allow_remote_node_identities = true;
        let r = ruleset(&c).unwrap();
        assert!(!r.contains("chain input"));
        assert!(!r.contains("saddr @protected4"));
        assert!(r.contains("ip daddr @nodes4 accept"));
    }
}
