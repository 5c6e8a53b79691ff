//! Strict mode's management exceptions are a door to this node's own service, never a
//! bypass: probed as an attacker would, in both modes and both families, with the wire
//! captured. A management host `m` (10.77.0.50, fd77::50) sits in a protected range and
//! is in no inventory; n0 and n1 are nodes; tcp/22 is the exception.
//! - m → n0:22 connects (the door), in plaintext, and that is the only plaintext;
//! - m from source port 22 → n0:5555 gets nothing (was accepted: `tcp sport 22 accept`);
//! - n1 from source port 22 → n0:5555 connects, encrypted (was plaintext: an XFRM
//!   exemption for source port 22 outranked the tunnel);
//! - n1 → n0:22 works, through the tunnel;
//! - n0 from source port 22 → m:5555 (not a reply) does not leave.

use std::net::SocketAddr;
use std::time::Duration;

use crate::Case;
use crate::fleet::{Fleet, KEY1, Kind, STRICT};
use crate::rig::{endpoints, ensure, in_netns, tcp_connect_from};

pub const CASES: &[Case] = &[
    ("doors_ipsec_exception_is_no_bypass", || doors(true)),
    ("doors_wireguard_exception_is_no_bypass", || doors(false)),
];

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn doors(ipsec: bool) -> Result<(), String> {
    let (tag, kind) = if ipsec {
        ("di", Kind::Ipsec(KEY1))
    } else {
        ("dw", Kind::Wireguard)
    };
    let mut f = Fleet::new_with(tag, 2, kind)?;
    f.configure_all(STRICT)?;
    let m = f.add_management_host()?;
    f.start_all(Duration::from_secs(30))?;
    // n0 serves on 22 and 5555, m on 5555 (listening is enough: the kernel completes
    // the handshake into the backlog).
    let mut listeners = Vec::new();
    for a in [
        "10.77.0.1:22",
        "[fd77::1]:22",
        "10.77.0.1:5555",
        "[fd77::1]:5555",
    ] {
        listeners.push(
            in_netns(f.topo.ns(0), || std::net::TcpListener::bind(a))
                .map_err(|e| format!("bind {a} in n0: {e}"))?,
        );
    }
    for a in ["10.77.0.50:5555", "[fd77::50]:5555"] {
        listeners.push(
            in_netns(&m, || std::net::TcpListener::bind(a))
                .map_err(|e| format!("bind {a} in m: {e}"))?,
        );
    }

    let cap = f.topo.capture("tcp")?;
    let t = Duration::from_secs(3);
    let mut wrong = Vec::new();
    let mut probe = |ns: &str, src: &str, dst: &str, want_ok: bool| {
        let r = in_netns(ns, || tcp_connect_from(addr(src), addr(dst), t));
        if r.is_ok() != want_ok {
            wrong.push(format!(
                "{src} -> {dst}: {} (wanted {})",
                r.map_or_else(|e| format!("failed: {e}"), |_| "connected".into()),
                if want_ok { "a connection" } else { "nothing" }
            ));
        }
    };
    let n0 = f.topo.ns(0).to_string();
    let n1 = f.topo.ns(1).to_string();
    for (m_a, n0_a, n1_a) in [
        ("10.77.0.50", "10.77.0.1", "10.77.0.2"),
        ("[fd77::50]", "[fd77::1]", "[fd77::2]"),
    ] {
        probe(&m, &format!("{m_a}:0"), &format!("{n0_a}:22"), true);
        probe(&m, &format!("{m_a}:22"), &format!("{n0_a}:5555"), false);
        probe(&n1, &format!("{n1_a}:0"), &format!("{n0_a}:22"), true);
        // Through the tunnel a connection from port 22 is ordinary traffic: it
        // connects, encrypted (the capture shows no plaintext of it).
        probe(&n1, &format!("{n1_a}:22"), &format!("{n0_a}:5555"), true);
        probe(&n0, &format!("{n0_a}:22"), &format!("{m_a}:5555"), false);
    }
    let lines = cap.stop();
    drop(listeners);

    // Plaintext TCP on the wire: only m's own packets (the door's connection, and its
    // probes) and n0's replies on the door's connection: from n0:22 to m's ephemeral
    // port, never to m:5555 (n0's own connection from port 22, which must not leave).
    let is_m = |e: &str| e.starts_with("10.77.0.50.") || e.starts_with("fd77::50.");
    let is_m_5555 = |e: &str| e == "10.77.0.50.5555" || e == "fd77::50.5555";
    let is_n0_22 = |e: &str| e == "10.77.0.1.22" || e == "fd77::1.22";
    let bad: Vec<&String> = lines
        .iter()
        .filter(|l| match endpoints(l) {
            Some((src, dst)) => !(is_m(src) || (is_n0_22(src) && is_m(dst) && !is_m_5555(dst))),
            None => false,
        })
        .collect();
    // n0 answered none of m's probes from port 22 (no SYN-ACK, no RST).
    let answered: Vec<&String> = lines
        .iter()
        .filter(|l| {
            endpoints(l).is_some_and(|(src, dst)| {
                (src == "10.77.0.1.5555" || src == "fd77::1.5555") && is_m(dst)
            })
        })
        .collect();
    let door = lines
        .iter()
        .filter(|l| {
            endpoints(l).is_some_and(|(src, dst)| is_n0_22(src) && is_m(dst) && !is_m_5555(dst))
        })
        .count();
    ensure(
        wrong.is_empty() && bad.is_empty() && answered.is_empty() && door > 0,
        format!(
            "probes: {wrong:#?}\nplaintext that is no door traffic: {bad:#?}\nn0 answered m's port-22 probes: {answered:#?}\ndoor replies seen: {door}\n{}",
            f.logs()
        ),
    )?;
    println!(
        "    {} mode, IPv4 and IPv6: the door to n0:22 opens (from m and through n1's tunnel); from port 22 to n0:5555 nothing (m) or encrypted only (n1); n0 from port 22 to m: nothing; {} TCP lines on the wire, {door} of them door replies, 0 other plaintext",
        if ipsec { "IPsec" } else { "WireGuard" },
        lines.len()
    );
    Ok(())
}
