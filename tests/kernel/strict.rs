//! Strict mode in IPsec mode: nothing to or from a protected range crosses the wire in
//! plaintext, from before READY=1 through crashes, and spoofed plaintext arriving from a
//! protected source is dropped on ingress; the management exception keeps working.

use std::time::Duration;

use crate::Case;
use crate::fleet::{Fleet, KEY1, no_plaintext, plaintext, ssh_like};
use crate::ipsec::IPSEC_WIRE;
use crate::rig::{ensure, sh};

pub const CASES: &[Case] = &[("strict_ipsec_leaks_nothing", ipsec_leaks_nothing)];

const STRICT: &str = "\n[strict]\nenabled = true\ncidrs = [\"10.77.0.0/16\", \"10.1.0.0/16\", \"fd77::/16\"]\nexceptions = [{ proto = \"tcp\", port = 22 }]\n";

fn drop_counter(f: &Fleet, i: usize, comment: &str) -> Result<u64, String> {
    let out = f.topo.exec(i, "nft list table inet encryptd")?;
    Ok(out
        .lines()
        .filter(|l| l.contains(&format!("comment \"{comment}\"")))
        .filter_map(|l| {
            l.split("packets ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum())
}

fn ipsec_leaks_nothing() -> Result<(), String> {
    let mut f = Fleet::new("sx", 3, KEY1)?;
    f.configure_all(STRICT)?;
    let mut report = Vec::new();

    // Cold start: from the moment every node's strict rules are in (the first thing its
    // daemon does), n0 pings n1 all along while the tunnels come up; the wire is watched.
    // (Before a node's daemon runs, nothing protects it: that is the boot order's job.)
    for i in 0..3 {
        f.start(i)?;
    }
    for i in 0..3 {
        f.daemon(i)
            .wait_log("strict mode: rules installed", Duration::from_secs(10))?;
    }
    let cap = f.topo.capture("")?;
    let mut ping = f.topo.exec_bg(
        0,
        "ping -i 0.05 -c 100 -W 1 10.77.0.2; ping -6 -i 0.05 -c 40 -W 1 fd77::2",
    )?;
    f.wait_all_up(Duration::from_secs(30))
        .map_err(|e| format!("{e}\n{}", f.logs()))?;
    let _ = ping.wait();
    report.push("cold start".to_string());

    // A protected destination that is not in the inventory: dropped at the source, by
    // the XFRM block policy (XfrmOutPolBlock) before nft's egress rule would see it.
    let blocked = || -> Result<u64, String> {
        let s = f.topo.exec(0, "cat /proc/net/xfrm_stat")?;
        Ok(s.lines()
            .find(|l| l.starts_with("XfrmOutPolBlock"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0))
    };
    let b0 = blocked()?;
    let unknown = f.topo.exec(0, "ping -c 3 -i 0.2 -W 1 10.77.0.99").is_err();
    ensure(
        unknown,
        "ping to 10.77.0.99 (protected, not inventoried) got an answer?",
    )?;
    let b1 = blocked()?;
    ensure(
        b1 > b0,
        format!("XfrmOutPolBlock {b0} -> {b1} after pinging 10.77.0.99"),
    )?;

    // The management exception works.
    ssh_like(&f, 1, 0)?;

    // The daemon SIGKILLed, then its SAs flushed from under it: drops, no plaintext.
    f.daemons[0].take().unwrap().kill();
    sh(&format!("ip -n {} xfrm state flush", f.topo.ns(0)))?;
    let lost = f.topo.exec(0, "ping -c 3 -i 0.2 -W 1 10.77.0.2").is_err();
    ensure(lost, "ping from n0 with no SAs and no daemon went through")?;
    ensure(
        f.topo.exec(0, "nft list table inet encryptd").is_ok(),
        "strict table gone after SIGKILL",
    )?;
    ssh_like(&f, 1, 0)?;

    let lines = cap.stop();
    // SSH-like traffic (the exception) is the only plaintext allowed.
    let clear: Vec<&String> = plaintext(&lines, IPSEC_WIRE)
        .into_iter()
        .filter(|l| !l.contains(".22:") && !l.contains(".22 "))
        .collect();
    no_plaintext(&clear)?;
    // Spoofed plaintext arriving at n0 from a protected source: n1 without policies
    // or strict rules sends in the clear; n0 must drop it on ingress.
    let before = drop_counter(&f, 0, "ingress")?;
    f.daemons[1].take().unwrap().kill();
    let ns1 = f.topo.ns(1).to_string();
    sh(&format!(
        "ip -n {ns1} xfrm policy flush; ip -n {ns1} xfrm state flush; ip netns exec {ns1} nft delete table inet encryptd"
    ))?;
    let spoof_cap = f.topo.capture("icmp")?;
    let answered = f.topo.exec(1, "ping -c 3 -i 0.2 -W 1 10.77.0.1").is_ok();
    let spoof_lines = spoof_cap.stop();
    ensure(!answered, "n0 answered plaintext from a protected source")?;
    let after = drop_counter(&f, 0, "ingress")?;
    ensure(
        after > before,
        format!("ingress drop counter {before} -> {after}"),
    )?;
    ensure(
        !spoof_lines.iter().any(|l| l.contains("echo reply")),
        "n0 replied to spoofed plaintext",
    )?;

    // `encryptd teardown` (package purge) removes what encryptd owns in n0, nothing else.
    let ns0 = f.topo.ns(0).to_string();
    sh(&format!(
        "ip -n {ns0} xfrm state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x4242 mode tunnel \
         aead 'rfc4106(gcm(aes))' 0x0000000000000000000000000000000000000000 128"
    ))?;
    f.topo
        .exec(0, &format!("{} teardown", env!("CARGO_BIN_EXE_encryptd")))?;
    let states = f.topo.exec(0, "ip xfrm state")?;
    let policies = f.topo.exec(0, "ip xfrm policy")?;
    ensure(
        states.lines().filter(|l| l.starts_with("src")).count() == 1
            && states.contains("spi 0x00004242"),
        format!("after teardown, only the foreign state should remain:\n{states}"),
    )?;
    ensure(
        policies.trim().is_empty(),
        format!("policies left after teardown:\n{policies}"),
    )?;
    ensure(
        f.topo.exec(0, "nft list table inet encryptd").is_err(),
        "the strict table survived teardown",
    )?;

    report.push(format!("{} packets captured, 0 plaintext", lines.len()));
    println!("    {}", report.join("; "));
    Ok(())
}
