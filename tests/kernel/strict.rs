//! Strict mode in IPsec mode: nothing to or from a protected range crosses the wire in
//! plaintext, from before READY=1 through crashes, and spoofed plaintext arriving from a
//! protected source is dropped on ingress; the management exception keeps working.

use std::time::Duration;

use crate::Case;
use crate::fleet::{Fleet, KEY1, STRICT, no_plaintext, plaintext, ssh_from_host, ssh_like};
use crate::ipsec::IPSEC_WIRE;
use crate::rig::{ensure, sh};

pub const CASES: &[Case] = &[
    ("strict_ipsec_leaks_nothing", ipsec_leaks_nothing),
    (
        "strict_boot_rules_before_the_daemon",
        boot_rules_before_the_daemon,
    ),
    (
        "strict_refuses_to_lock_this_node_out",
        refuses_to_lock_this_node_out,
    ),
];

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
    let m = f.add_management_host()?;
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
    crate::rig::finish_child(&mut ping, Duration::from_secs(60), "the cold-start ping")?;
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
    // (A peer's SSH now waits for n0's tunnel; a management host's does not.)
    ssh_from_host(&f, &m, crate::fleet::MGMT4.parse().unwrap(), 0)?;

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

/// The rules the daemon keeps for the next boot: n0 "reboots" (daemon killed, ruleset
/// and XFRM flushed, as after a boot), the boot unit's `nft -f state/strict.nft` runs,
/// and before the daemon starts nothing reaches n1 in plaintext while SSH from a
/// management host passes; then the daemon takes over. Strict mode off removes the file, and so does
/// `encryptd teardown`.
fn boot_rules_before_the_daemon() -> Result<(), String> {
    let mut f = Fleet::new("sb", 2, KEY1)?;
    f.configure_all(STRICT)?;
    let m = f.add_management_host()?;
    f.start_all(Duration::from_secs(30))?;
    let kept = f.dirs[0].join("state/strict.nft");
    let script = std::fs::read_to_string(&kept).map_err(|e| format!("{}: {e}", kept.display()))?;
    let live = f.topo.exec(0, "nft list table inet encryptd")?;
    ensure(
        script.starts_with("table inet encryptd {}\ndelete table inet encryptd\n")
            && script.contains("10.77.0.0/16")
            && live.contains("10.77.0.0/16"),
        format!("kept rules:\n{script}"),
    )?;

    // The "reboot": nothing of encryptd's left in n0's kernel.
    f.daemons[0].take().unwrap().kill();
    for cmd in [
        "nft flush ruleset",
        "ip xfrm state flush",
        "ip xfrm policy flush",
    ] {
        f.topo.exec(0, cmd)?;
    }
    f.topo.exec(0, &format!("nft -f {}", kept.display()))?;
    let cap = f.topo.capture("")?;
    let ping = f.topo.exec(0, "ping -c 3 -i 0.2 -W 1 10.77.0.2");
    let ping6 = f.topo.exec(0, "ping -6 -c 3 -i 0.2 -W 1 fd77::2");
    // SSH from a management host (in a protected range, in no inventory): the door.
    // (A peer's SSH goes through its tunnel, which waits for n0's daemon.)
    let ssh = ssh_from_host(&f, &m, crate::fleet::MGMT4.parse().unwrap(), 0);
    let lines = cap.stop();
    ensure(
        ping.is_err() && ping6.is_err(),
        "n0 reached n1 before its daemon ran",
    )?;
    ssh?;
    // tcp/22 (the exception) is the only plaintext allowed.
    no_plaintext(&plaintext(&lines, &[".22:", ".22 ", ".4510: UDP", "ESP("]))?;
    f.start(0)?;
    f.daemon(0)
        .wait_notify("1/1 peers up", Duration::from_secs(30))
        .map_err(|e| format!("{e}\n{}", f.logs()))?;
    f.topo.exec(0, "ping -c 2 -i 0.2 -W 2 10.77.0.2")?;
    println!(
        "    boot rules in place before the daemon: n0 -> n1 dropped (IPv4, IPv6), tcp/22 passes, 0 plaintext; the daemon then takes over"
    );

    // Strict mode off: the kept rules go with the table.
    let p = f.dirs[0].join("encryptd.toml");
    let text = std::fs::read_to_string(&p).map_err(|e| e.to_string())?;
    crate::fleet::rename_over(&p, &text.replace("enabled = true", "enabled = false"))?;
    ensure(
        crate::rig::wait_for(Duration::from_secs(10), || !kept.exists()),
        format!(
            "strict mode off, but the boot rules are still kept:\n{}",
            f.daemon(0).log()
        ),
    )?;
    crate::fleet::rename_over(&p, &text)?;
    ensure(
        crate::rig::wait_for(Duration::from_secs(10), || kept.exists()),
        format!(
            "strict mode on again, but no boot rules kept:\n{}",
            f.daemon(0).log()
        ),
    )?;
    f.daemons[0].take().unwrap().kill();
    f.topo.exec(
        0,
        &format!(
            "{} teardown --config {}",
            env!("CARGO_BIN_EXE_encryptd"),
            p.display()
        ),
    )?;
    ensure(!kept.exists(), "teardown left the boot rules")?;
    Ok(())
}

/// A protected range holding this node's own address without an exception: the daemon
/// refuses to start, says which setting to add, and installs nothing.
fn refuses_to_lock_this_node_out() -> Result<(), String> {
    let mut f = Fleet::new("sl", 2, KEY1)?;
    f.configure_all("\n[strict]\nenabled = true\ncidrs = [\"10.77.0.0/16\"]\n")?;
    f.start(0)?;
    let (code, log) = f.daemons[0]
        .take()
        .unwrap()
        .wait_exit(Duration::from_secs(10))?;
    ensure(
        code == 1
            && log.contains("no exception keeps it reachable")
            && log.contains("add to [strict] exceptions = [{ proto = \"tcp\", port = 22 }]"),
        format!("exit {code}:\n{log}"),
    )?;
    let table = f.topo.exec(0, "nft list tables")?;
    let xfrm = f.topo.exec(0, "ip xfrm policy")?;
    ensure(
        !table.contains("encryptd") && xfrm.trim().is_empty(),
        format!("installed something:\n{table}\n{xfrm}"),
    )?;
    println!("    refused (exit {code}) with the setting to add; nothing installed");
    Ok(())
}
