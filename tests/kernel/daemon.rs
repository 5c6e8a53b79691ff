//! The daemon's skeleton, as systemd and operators see it: readiness and reload
//! notifications in order, reloads on rename-over and SIGHUP, and a bad file refused
//! with its position while the last good configuration stays.

use std::time::Duration;

use crate::Case;
use crate::fleet::{Fleet, KEY1, node_entry, rename_over, write};
use crate::rig::ensure;

pub const CASES: &[Case] = &[("daemon_reload_and_notify", reload_and_notify)];

fn reload_and_notify() -> Result<(), String> {
    let mut f = Fleet::new("dr", 2, KEY1)?;
    f.start(0)?;
    f.start(1)?;
    f.wait_all_up(Duration::from_secs(20))?;
    let st = f.daemon(0).notes.last().cloned().unwrap_or_default();
    ensure(
        st.contains("STATUS=ipsec: 1/1 peers up, key 1, strict off"),
        format!("first READY=1 should carry the status line, got {st:?}"),
    )?;
    let nodes = f.dirs[0].join("nodes.toml");
    let inv = node_entry(0) + &node_entry(1);

    // A new valid inventory renamed over the old one: logged within one second (the
    // debounce is 100 ms; measured 100-400 ms in the VM). The bound here is 3 s because the
    // emulated VM runs at a third of its speed when the 2-core host is also busy with other
    // VMs (seen: load 4.8); the figure printed below is what the run measured.
    rename_over(&nodes, &(inv.clone() + &node_entry(2)))?;
    let d = f.daemon(0);
    let took = d.wait_log(
        "configuration reloaded after a file change: 3 nodes; added n2",
        Duration::from_secs(3),
    )?;
    d.wait_notify("RELOADING=1", Duration::from_secs(5))?;
    let st = d.wait_notify("READY=1", Duration::from_secs(5))?;
    ensure(
        st.contains("1/2 peers up"),
        format!("status after reload: {st:?}"),
    )?;
    println!("    reload logged {} ms after the rename", took.as_millis());

    // An invalid one: the error with file:line:col, and the last good one stays.
    let bad = inv.clone() + "[[node]]\nname = \"n2\"\naddresses = [\"10.77.0.300\"]\n";
    rename_over(&nodes, &bad)?;
    d.wait_log(
        &format!(
            "reload refused: {}:13:14: \"10.77.0.300\" is not an IPv4 or IPv6 address",
            nodes.display()
        ),
        Duration::from_secs(3),
    )?;
    d.wait_log(
        "keeping the last good configuration",
        Duration::from_secs(3),
    )?;
    let st = d.wait_notify("READY=1", Duration::from_secs(5))?;
    ensure(
        st.contains("1/2 peers up") && st.contains("newest configuration refused"),
        format!("status after a refused reload: {st:?}"),
    )?;

    // Fixed in place (no rename), then SIGHUP: the write's own reload applies it, the
    // signal finds nothing new.
    write(&nodes, &(inv.clone() + &node_entry(2) + &node_entry(3)))?;
    d.wait_log("added n3", Duration::from_secs(10))?;
    d.signal(libc::SIGHUP);
    d.wait_log(
        "reload after SIGHUP: configuration unchanged",
        Duration::from_secs(10),
    )?;
    let st = d.wait_notify("READY=1", Duration::from_secs(5))?;
    ensure(
        st.contains("1/3 peers up") && !st.contains("refused"),
        format!("status after SIGHUP: {st:?}"),
    )?;

    let d = f.daemons[0].take().unwrap();
    let (code, notes, log) = d.stop()?;
    ensure(
        code == 0,
        format!("exit code {code} after SIGTERM; log:\n{log}"),
    )?;
    // The order systemd relies on: READY first, each RELOADING followed by READY, STOPPING last.
    let kinds: Vec<&str> = notes
        .iter()
        .filter_map(|n| {
            ["READY=1", "RELOADING=1", "STOPPING=1"]
                .into_iter()
                .find(|k| n.lines().any(|l| l == *k))
        })
        .collect();
    ensure(
        kinds.first() == Some(&"READY=1"),
        format!("first: {kinds:?}"),
    )?;
    ensure(
        kinds.last() == Some(&"STOPPING=1"),
        format!("last: {kinds:?}"),
    )?;
    for w in kinds.windows(2) {
        if w[0] == "RELOADING=1" {
            ensure(
                w[1] == "READY=1",
                format!("RELOADING=1 not followed by READY=1: {kinds:?}"),
            )?;
        }
    }
    ensure(
        kinds.iter().filter(|k| **k == "RELOADING=1").count() >= 3,
        format!("expected a RELOADING=1 per reload: {kinds:?}"),
    )?;
    Ok(())
}
