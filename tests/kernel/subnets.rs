//! The inventory's `subnets` are ranges routed behind a node: hosts on a veth behind n1
//! and n2 (h1: 10.1.1.2, fd01:1::2; h2: 10.1.2.2, fd01:2::2) reach every node and each
//! other, and their node reaches them, in both modes, both families, with strict mode
//! on and off; the wire shows no plaintext. (Before: with strict mode on, decrypted
//! traffic forwarded to a host behind a node hit the forward chain's egress drop.)

use std::time::Duration;

use crate::Case;
use crate::fleet::{
    Fleet, KEY1, Kind, no_plaintext, node_entry, plaintext, rename_over, wg_node_entry, write,
};
use crate::rig::{ensure, sh, wait_for};

pub const CASES: &[Case] = &[
    ("subnets_ipsec_hosts_behind_nodes", || hosts_behind(true)),
    ("subnets_wireguard_hosts_behind_nodes", || {
        hosts_behind(false)
    }),
];

const STRICT: &str = "\n[strict]\nenabled = true\ncidrs = [\"10.77.0.0/16\", \"10.1.0.0/16\", \"fd77::/16\", \"fd01::/16\"]\nexceptions = [{ proto = \"tcp\", port = 22 }]\n";

fn hosts_behind(ipsec: bool) -> Result<(), String> {
    let (tag, kind, wire): (_, _, &[&str]) = if ipsec {
        ("hi", Kind::Ipsec(KEY1), crate::ipsec::IPSEC_WIRE)
    } else {
        ("hw", Kind::Wireguard, &[".51871: UDP"])
    };
    let mut f = Fleet::new_with(tag, 3, kind)?;
    // Every node routes a v4 and a v6 subnet.
    let inventory: String = (0..3)
        .map(|i| {
            let e = if ipsec {
                node_entry(i)
            } else {
                wg_node_entry(i)
            };
            e.replace(
                &format!("subnets = [\"10.1.{i}.0/24\"]"),
                &format!("subnets = [\"10.1.{i}.0/24\", \"fd01:{i}::/64\"]"),
            )
        })
        .collect();
    let mut hosts = Vec::new();
    for i in 0..3 {
        write(&f.dirs[i].join("nodes.toml"), &inventory)?;
        let ns = f.topo.ns(i).to_string();
        for j in (0..3).filter(|j| *j != i) {
            sh(&format!(
                "ip -n {ns} -6 route add fd01:{j}::/64 via fd77::{}",
                j + 1
            ))?;
        }
        if i == 0 {
            sh(&format!("ip -n {ns} addr add fd01:0::1/64 dev sub0 nodad"))?;
            hosts.push(String::new());
            continue;
        }
        // n1 and n2: the subnet is a host on a veth, not a local dummy.
        sh(&format!("ip -n {ns} link del sub0"))?;
        let h = f.topo.add_host_behind(
            i,
            format!("10.1.{i}.1").parse().unwrap(),
            format!("10.1.{i}.2").parse().unwrap(),
            format!("fd01:{i}::1").parse().unwrap(),
            format!("fd01:{i}::2").parse().unwrap(),
        )?;
        hosts.push(h);
    }
    f.configure_all(STRICT)?;
    for i in 0..3 {
        f.start(i)?;
    }
    f.wait_all_up(Duration::from_secs(40))
        .map_err(|e| format!("{e}\n{}", f.logs()))?;

    // (who, from namespace, to)
    let node = |i: usize| f.topo.ns(i).to_string();
    let paths: Vec<(String, String, &str)> = vec![
        ("h1".into(), hosts[1].clone(), "10.77.0.3"),
        ("h1".into(), hosts[1].clone(), "fd77::3"),
        ("h1".into(), hosts[1].clone(), "10.1.2.2"),
        ("h1".into(), hosts[1].clone(), "fd01:2::2"),
        ("n0".into(), node(0), "10.1.2.2"),
        ("n0".into(), node(0), "fd01:2::2"),
        ("h2".into(), hosts[2].clone(), "10.77.0.1"),
        ("h2".into(), hosts[2].clone(), "fd77::1"),
        ("h2".into(), hosts[2].clone(), "10.1.0.1"),
        ("h2".into(), hosts[2].clone(), "fd01:0::1"),
        ("n1".into(), node(1), "10.1.1.2"),
        ("h1".into(), hosts[1].clone(), "10.77.0.2"),
    ];
    let mut report = Vec::new();
    for strict in [true, false] {
        if !strict {
            for d in &f.dirs {
                let p = d.join("encryptd.toml");
                let s = std::fs::read_to_string(&p).map_err(|e| e.to_string())?;
                rename_over(&p, &s.replace("enabled = true", "enabled = false"))?;
            }
            for i in 0..3 {
                let off = wait_for(Duration::from_secs(15), || {
                    f.topo.exec(i, "nft list table inet encryptd").is_err()
                });
                ensure(off, format!("n{i} kept its strict table\n{}", f.logs()))?;
            }
        }
        let cap = f.topo.capture("")?;
        let mut failed = Vec::new();
        for (who, ns, dst) in &paths {
            if let Err(e) = f.topo.exec_ns(ns, &format!("ping -c 2 -i 0.2 -W 2 {dst}")) {
                failed.push(format!("{who} -> {dst}: {e}"));
            }
        }
        let lines = cap.stop();
        ensure(
            failed.is_empty(),
            format!(
                "strict {}: {} of {} paths failed:\n{}\n{}",
                if strict { "on" } else { "off" },
                failed.len(),
                paths.len(),
                failed.join("\n"),
                f.logs()
            ),
        )?;
        no_plaintext(&plaintext(&lines, wire))?;
        report.push(format!(
            "strict {}: {} paths ok, {} packets on the wire, 0 plaintext",
            if strict { "on" } else { "off" },
            paths.len(),
            lines.len()
        ));
    }
    println!(
        "    {} mode, hosts behind n1 and n2 on veths: {}",
        if ipsec { "IPsec" } else { "WireGuard" },
        report.join("; ")
    );
    Ok(())
}
