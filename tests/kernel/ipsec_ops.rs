//! IPsec mode in operation, the IPsec issue's acceptance tests: key rotation, a daemon
//! killed and restarted, a node's reboot, a node added to the inventory, and forged or
//! replayed hellos; each with real daemons in three or more namespace nodes, under a
//! 10 ms ping, checked against what `ip xfrm` and /proc/net/xfrm_stat report.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Case;
use crate::fleet::plaintext;
use crate::fleet::{
    Fleet, KEY1, KEY2, TestDaemon, boot_id, next_snapshot, no_plaintext, node_entry, rename_over,
    write_keys,
};
use crate::ipsec::IPSEC_WIRE;
use crate::rig::{ensure, sh, wait_for};

/// How long a fixed-count ping may take: under TCG on a loaded 2-core host, `ping -i
/// 0.01` falls far behind its schedule (a count meant for 30 s took over 60 s).
const PING_LIMIT: Duration = Duration::from_secs(240);

pub const CASES: &[Case] = &[
    ("ipsec_ops_rotation_under_ping", rotation_under_ping),
    (
        "ipsec_ops_kill_and_restart_under_ping",
        kill_and_restart_under_ping,
    ),
    ("ipsec_ops_reboot_rekeys_without_plaintext", reboot_rekeys),
    ("ipsec_ops_add_node_touches_only_it", add_node),
    (
        "ipsec_ops_forged_and_replayed_hellos",
        forged_and_replayed_hellos,
    ),
    (
        "ipsec_ops_replay_from_an_earlier_instance",
        replay_from_an_earlier_instance,
    ),
    (
        "ipsec_ops_restart_after_a_flush_reuses_no_spi",
        restart_after_a_flush_reuses_no_spi,
    ),
    (
        "ipsec_ops_rekey_at_the_soft_limit_loses_no_packet",
        rekey_at_the_soft_limit_loses_no_packet,
    ),
    (
        "ipsec_ops_idle_reads_nothing_and_hears_other_programs",
        idle_reads_nothing_and_hears_other_programs,
    ),
    (
        "ipsec_ops_hello_sockets_are_bound_to_the_node_address",
        hello_sockets_are_bound_to_the_node_address,
    ),
];

/// One SA as `ip -s xfrm state` shows it: what identifies it and when the kernel added it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Sa {
    src: String,
    dst: String,
    spi: String,
    /// The algorithm lines (key material included).
    key: String,
    /// The kernel's add time (one-second resolution).
    added: String,
}

impl Sa {
    /// The key-id this SA was made for: the low 4 bits of the SPI (plan::make_spi).
    fn key_id(&self) -> u32 {
        u32::from_str_radix(self.spi.trim_start_matches("0x"), 16).unwrap_or(0) & 0xF
    }
}

/// A captured UDP packet: source, destination, payload, time.
type Captured = (String, String, Vec<u8>, f64);

/// How much node i's daemon log holds now (on disk, so a killed daemon's counts too):
/// where to read from for what comes after.
fn log_len(f: &Fleet, i: usize) -> usize {
    f.dirs[i]
        .join("daemon.log")
        .metadata()
        .map(|m| m.len() as usize)
        .unwrap_or(0)
}

/// A node's policies and SAs.
type Snapshot = (Vec<Pol>, Vec<Sa>);

/// One policy as `ip -s xfrm policy` shows it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Pol {
    /// Selector, direction and priority: what makes it this policy.
    what: String,
    index: String,
    added: String,
    tmpl: String,
}

/// `ip` output split into objects: each starts on an unindented line.
fn blocks(out: &str) -> Vec<Vec<&str>> {
    let mut v: Vec<Vec<&str>> = Vec::new();
    for l in out.lines() {
        if l.trim().is_empty() {
            continue;
        }
        if !l.starts_with(char::is_whitespace) || v.is_empty() {
            v.push(Vec::new());
        }
        v.last_mut().unwrap().push(l);
    }
    v
}

fn word_after<'a>(line: &'a str, word: &str) -> Option<&'a str> {
    let mut it = line.split_whitespace();
    it.find(|w| *w == word)?;
    it.next()
}

fn added(block: &[&str]) -> String {
    block
        .iter()
        .map(|l| l.trim())
        .find(|l| l.starts_with("add "))
        .map(|l| l.split(" use ").next().unwrap_or(l).to_string())
        .unwrap_or_default()
}

fn parse_sas(out: &str) -> Vec<Sa> {
    let mut v: Vec<Sa> = blocks(out)
        .into_iter()
        .filter(|b| b[0].starts_with("src "))
        .map(|b| Sa {
            src: word_after(b[0], "src").unwrap_or("").into(),
            dst: word_after(b[0], "dst").unwrap_or("").into(),
            spi: b
                .iter()
                .find_map(|l| word_after(l, "spi"))
                .map(|s| s.split('(').next().unwrap_or(s).to_string())
                .unwrap_or_default(),
            key: b
                .iter()
                .map(|l| l.trim())
                .filter(|l| {
                    ["aead ", "enc ", "auth", "auth-trunc "]
                        .iter()
                        .any(|p| l.starts_with(p))
                })
                .collect::<Vec<_>>()
                .join(" | "),
            added: added(&b),
        })
        .collect();
    v.sort();
    v
}

fn parse_policies(out: &str) -> Vec<Pol> {
    let mut v: Vec<Pol> = blocks(out)
        .into_iter()
        .filter(|b| b[0].starts_with("src ") && b.len() > 1)
        .map(|b| {
            let dir = word_after(b[1], "dir").unwrap_or("?");
            let prio = word_after(b[1], "priority").unwrap_or("?");
            Pol {
                what: format!("{} dir {dir} priority {prio}", b[0].trim()),
                index: word_after(b[1], "index").unwrap_or("?").into(),
                added: added(&b),
                tmpl: b
                    .iter()
                    .map(|l| l.trim())
                    .find(|l| l.starts_with("tmpl "))
                    .unwrap_or("")
                    .into(),
            }
        })
        .collect();
    v.sort();
    v
}

fn sas(f: &Fleet, i: usize) -> Result<Vec<Sa>, String> {
    Ok(parse_sas(&f.topo.exec(i, "ip -s xfrm state")?))
}

/// The SAs without their counters and add times: quicker, for polling.
fn sas_quick(f: &Fleet, i: usize) -> Result<Vec<Sa>, String> {
    Ok(parse_sas(&f.topo.exec(i, "ip xfrm state")?))
}

fn policies(f: &Fleet, i: usize) -> Result<Vec<Pol>, String> {
    Ok(parse_policies(&f.topo.exec(i, "ip -s xfrm policy")?))
}

fn v4(i: usize) -> String {
    format!("10.77.0.{}", i + 1)
}

fn v6(i: usize) -> String {
    format!("fd77::{}", i + 1)
}

/// The SAs between nodes `i` and `j` in family `fam` (4 or 6), in either direction.
fn pair_sas(all: &[Sa], i: usize, j: usize, fam: u8) -> Vec<Sa> {
    let a = |k| if fam == 4 { v4(k) } else { v6(k) };
    let (x, y) = (a(i), a(j));
    all.iter()
        .filter(|s| (s.src == x && s.dst == y) || (s.src == y && s.dst == x))
        .cloned()
        .collect()
}

/// /proc/net/xfrm_stat of node i's namespace.
fn xfrm_stat(f: &Fleet, i: usize) -> Result<BTreeMap<String, u64>, String> {
    Ok(f.topo
        .exec(i, "cat /proc/net/xfrm_stat")?
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.parse().ok()?))
        })
        .collect())
}

/// Counters that must not move while a pair is healthy.
const ERRORS: [&str; 2] = ["XfrmInNoStates", "XfrmInStateProtoError"];

fn error_counters(f: &Fleet, nodes: usize) -> Result<Vec<BTreeMap<String, u64>>, String> {
    (0..nodes).map(|i| xfrm_stat(f, i)).collect()
}

fn counters_unchanged(
    before: &[BTreeMap<String, u64>],
    after: &[BTreeMap<String, u64>],
) -> Result<(), String> {
    println!(
        "    xfrm_stat counters that moved: {}",
        deltas(before, after)
    );
    let mut bad = Vec::new();
    for (i, (b, a)) in before.iter().zip(after).enumerate() {
        for c in ERRORS {
            let (x, y) = (
                b.get(c).copied().unwrap_or(0),
                a.get(c).copied().unwrap_or(0),
            );
            if y != x {
                bad.push(format!("n{i} {c} {x} -> {y}"));
            }
        }
    }
    ensure(
        bad.is_empty(),
        format!("xfrm_stat counters moved: {}", bad.join(", ")),
    )
}

/// A `ping -D` running in a node, its output in a file.
struct Ping {
    child: Child,
    out: PathBuf,
    what: String,
}

#[derive(Debug)]
struct PingStats {
    sent: u64,
    received: u64,
    /// The longest time between two consecutive replies.
    max_gap: Duration,
}

impl Ping {
    fn start(
        f: &Fleet,
        from: usize,
        dst: &str,
        count: u32,
        interval: &str,
    ) -> Result<Ping, String> {
        let what = format!("n{from} -> {dst}");
        let out = std::env::temp_dir().join(format!(
            "{}-ping-n{from}-{}.txt",
            f.topo.wire,
            dst.replace(':', "_")
        ));
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                f.topo.ns(from),
                "ping",
                "-D",
                "-n",
                "-W",
                "2",
            ])
            .args(["-i", interval, "-c", &count.to_string(), dst])
            .stdout(File::create(&out).map_err(|e| e.to_string())?)
            .stderr(Stdio::null())
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("ping: {e}"))?;
        Ok(Ping { child, out, what })
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Wait for ping to send its count and collect the replies.
    fn finish(mut self, timeout: Duration) -> Result<PingStats, String> {
        let t0 = Instant::now();
        while self.running() {
            if t0.elapsed() > timeout {
                return Err(format!(
                    "{}: ping still running after {timeout:?}",
                    self.what
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let text = std::fs::read_to_string(&self.out).map_err(|e| e.to_string())?;
        let summary = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .ok_or_else(|| format!("{}: no summary in\n{text}", self.what))?;
        let num = |w: &str| -> u64 {
            let ws: Vec<&str> = summary.split_whitespace().collect();
            ws.iter()
                .position(|x| x.starts_with(w))
                .and_then(|p| ws.get(p.checked_sub(1)?))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        let stamps: Vec<f64> = text
            .lines()
            .filter(|l| l.contains("icmp_seq=") && !l.contains("DUP"))
            .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
            .collect();
        let max_gap = stamps
            .windows(2)
            .map(|w| w[1] - w[0])
            .fold(0.0f64, f64::max);
        Ok(PingStats {
            sent: num("packets"),
            received: num("received"),
            max_gap: Duration::from_secs_f64(max_gap.max(0.0)),
        })
    }
}

impl Drop for Ping {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PingStats {
    fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.received)
    }
}

fn ping_report(what: &str, s: &PingStats) -> String {
    format!(
        "{what}: {} sent, {} received, {} lost, longest gap between replies {} ms",
        s.sent,
        s.received,
        s.lost(),
        s.max_gap.as_millis()
    )
}

/// Every running daemon of nodes `0..n` says READY=1 with all `n - 1` peers up.
fn wait_ready(f: &mut Fleet, n: usize, timeout: Duration) -> Result<(), String> {
    let want = format!("{}/{} peers up", n - 1, n - 1);
    for i in 0..n {
        let d = f.daemon(i);
        let st = d.wait_notify("READY=1", timeout)?;
        if !st.contains(&want) {
            return Err(format!(
                "n{i} ready with {st:?}, want {want}; log:\n{}",
                d.log()
            ));
        }
    }
    Ok(())
}

/// Wait until the daemon's log after byte `from` holds `needle`; the time it took.
fn wait_log_after(
    d: &TestDaemon,
    from: usize,
    needle: &str,
    timeout: Duration,
) -> Result<Duration, String> {
    let t0 = Instant::now();
    let hit = wait_for(timeout, || {
        d.log().get(from..).is_some_and(|s| s.contains(needle))
    });
    if hit {
        Ok(t0.elapsed())
    } else {
        Err(format!(
            "no `{needle}` in the log within {timeout:?}; log since:\n{}",
            d.log().get(from..).unwrap_or("")
        ))
    }
}

fn start_fleet(tag: &str, n: usize) -> Result<Fleet, String> {
    let mut f = Fleet::new(tag, n, KEY1)?;
    let cap = f.topo.capture("udp port 4510")?;
    let t0 = Instant::now();
    for i in 0..n {
        f.start(i)?;
    }
    let r = wait_ready(&mut f, n, Duration::from_secs(30));
    let lines = cap.stop();
    if let Err(e) = r {
        let states: Vec<String> = (0..n)
            .map(|i| {
                f.topo
                    .exec(i, "ip xfrm state | grep -c ^src")
                    .unwrap_or_else(|e| e)
            })
            .collect();
        return Err(format!(
            "{e}\n{}\nstart at {t0:?}; states per node {states:?}\nhellos:\n{}",
            f.logs(),
            lines.join("\n")
        ));
    }
    Ok(f)
}

/// Case 1: Appending key-id 2 everywhere (node by node) moves every pair to it without
/// losing a packet:
/// SAs per peer per family 2 -> 4 -> 2, and the kernel's error counters stay still.
fn rotation_under_ping() -> Result<(), String> {
    let f = start_fleet("ir", 3)?;
    let before = error_counters(&f, 3)?;
    let s0 = sas_quick(&f, 0)?;
    for fam in [4, 6] {
        let p = pair_sas(&s0, 0, 1, fam);
        ensure(
            p.len() == 2 && p.iter().all(|s| s.key_id() == 1),
            format!("before: n0-n1 IPv{fam} SAs {p:#?}"),
        )?;
    }
    let mut p4 = Ping::start(&f, 0, &v4(1), 3000, "0.01")?;
    let mut p6 = Ping::start(&f, 1, &v6(0), 3000, "0.01")?;
    let psub = Ping::start(&f, 2, "10.1.0.1", 1500, "0.02")?;
    std::thread::sleep(Duration::from_secs(1));

    // The new key reaches the nodes one after the other, as a serial Ansible run would:
    // n0, then n2, then n1. Until n1 holds it, n0 must keep sending to n1 with key 1.
    let t0 = Instant::now();
    let mut rollout = vec![
        (Duration::ZERO, 0),
        (Duration::from_millis(1500), 2),
        (Duration::from_secs(3), 1),
    ];
    // Count n0's SAs towards n1 per family until they are back to 2 after having been 4.
    let mut seen: BTreeMap<u8, Vec<usize>> = [(4, vec![2]), (6, vec![2])].into();
    let (mut at4, mut at2, mut n1_has_key) = (None, None, None);
    while t0.elapsed() < Duration::from_secs(40) {
        while rollout.first().is_some_and(|(at, _)| t0.elapsed() >= *at) {
            let (_, i) = rollout.remove(0);
            if i == 1 {
                let early: Vec<Sa> = sas_quick(&f, 0)?
                    .into_iter()
                    .filter(|s| {
                        s.key_id() == 2
                            && [v4(0), v6(0)].contains(&s.src)
                            && [v4(1), v6(1)].contains(&s.dst)
                    })
                    .collect();
                ensure(
                    early.is_empty(),
                    format!("n0 sends to n1 with key 2 before n1 holds it: {early:#?}"),
                )?;
            }
            write_keys(&f.dirs[i].join("ipsec.keys"), &(KEY1.to_string() + KEY2))?;
            if i == 1 {
                n1_has_key = Some(t0.elapsed());
            }
        }
        let all = sas_quick(&f, 0)?;
        for fam in [4u8, 6] {
            let n = pair_sas(&all, 0, 1, fam).len();
            let v = seen.entry(fam).or_default();
            if v.last() != Some(&n) {
                v.push(n);
            }
        }
        let done = |want: usize| seen.values().all(|v| v.contains(&want));
        if at4.is_none() && done(4) {
            at4 = Some(t0.elapsed());
        }
        if rollout.is_empty() && at4.is_some() && seen.values().all(|v| v.last() == Some(&2)) {
            at2 = Some(t0.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let finished_early = !p4.running() || !p6.running();
    let after_all = sas(&f, 0)?;
    let (Some(at4), Some(at2)) = (at4, at2) else {
        return Err(format!(
            "n0's SAs for n1 per family went {seen:?}, want 2 -> 4 -> 2\n{}",
            f.logs()
        ));
    };
    for (fam, v) in &seen {
        ensure(
            v.first() == Some(&2) && v.iter().all(|n| *n <= 4),
            format!("IPv{fam}: SA counts {v:?}"),
        )?;
    }
    for fam in [4, 6] {
        let p = pair_sas(&after_all, 0, 1, fam);
        ensure(
            p.iter().all(|s| s.key_id() == 2),
            format!("after: n0-n1 IPv{fam} SAs not all key 2: {p:#?}"),
        )?;
    }
    ensure(
        !finished_early,
        "ping finished before the rotation did: raise its count",
    )?;
    let r4 = p4.finish(PING_LIMIT)?;
    let r6 = p6.finish(PING_LIMIT)?;
    let rs = psub.finish(PING_LIMIT)?;
    // Every node and pair moved: all SAs on every node are key 2 now.
    for i in 0..3 {
        let all = sas(&f, i)?;
        ensure(
            all.len() == 8 && all.iter().all(|s| s.key_id() == 2),
            format!("n{i} after the rotation: {all:#?}"),
        )?;
    }
    let after = error_counters(&f, 3)?;
    println!(
        "    n0-n1 SAs per family: {seen:?}; n1 got the key after {} ms, 4 SAs seen after {} ms, 2 after {} ms",
        n1_has_key.unwrap_or_default().as_millis(),
        at4.as_millis(),
        at2.as_millis()
    );
    println!("    {}", ping_report("n0 -> n1 IPv4", &r4));
    println!("    {}", ping_report("n1 -> n0 IPv6", &r6));
    println!("    {}", ping_report("n2 -> n0's subnet", &rs));
    ensure(
        [&r4, &r6, &rs].iter().all(|r| r.lost() == 0 && r.sent > 0),
        format!("packets lost during the rotation\n{}", f.logs()),
    )?;
    counters_unchanged(&before, &after)
}

/// The counters that moved, per node.
fn deltas(before: &[BTreeMap<String, u64>], after: &[BTreeMap<String, u64>]) -> String {
    before
        .iter()
        .zip(after)
        .enumerate()
        .map(|(i, (b, a))| {
            let nz: Vec<String> = a
                .iter()
                .filter_map(|(k, v)| {
                    let d = v - b.get(k).copied().unwrap_or(0);
                    (d > 0).then(|| format!("{k} +{d}"))
                })
                .collect();
            format!("n{i} [{}]", nz.join(", "))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Case 2: SIGKILL a daemon and start it again: the kernel's SAs carry on and the new process
/// adopts them (same SPIs, same add times), no packet lost.
fn kill_and_restart_under_ping() -> Result<(), String> {
    let mut f = start_fleet("ik", 3)?;
    let before: Vec<Vec<Sa>> = (0..3).map(|i| sas(&f, i)).collect::<Result<_, _>>()?;
    let stat0 = error_counters(&f, 3)?;
    // Add times have a one-second resolution: a re-created SA must show another one.
    std::thread::sleep(Duration::from_millis(1100));
    let p4 = Ping::start(&f, 1, &v4(0), 1200, "0.01")?;
    let p6 = Ping::start(&f, 0, &v6(2), 1200, "0.01")?;
    std::thread::sleep(Duration::from_secs(1));
    f.daemons[0].take().unwrap().kill();
    let from = log_len(&f, 0);
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    f.start(0)?;
    let d = f.daemon(0);
    let up1 = wait_log_after(d, from, "peer n1 up", Duration::from_secs(20))?;
    wait_log_after(d, from, "peer n2 up", Duration::from_secs(20))?;
    let up2 = t0.elapsed();
    // Past one periodic re-read of the kernel (every 5 s), which would re-key what it
    // thinks is stale.
    std::thread::sleep(Duration::from_secs(6));
    let after: Vec<Vec<Sa>> = (0..3).map(|i| sas(&f, i)).collect::<Result<_, _>>()?;
    let r4 = p4.finish(PING_LIMIT)?;
    let r6 = p6.finish(PING_LIMIT)?;
    let stat1 = error_counters(&f, 3)?;
    let log = f.daemon(0).log()[from..].to_string();
    println!(
        "    restarted daemon: peers up after {} / {} ms",
        up1.as_millis(),
        up2.as_millis()
    );
    println!("    {}", ping_report("n1 -> n0 IPv4", &r4));
    println!("    {}", ping_report("n0 -> n2 IPv6", &r6));
    for i in 0..3 {
        ensure(
            before[i] == after[i],
            format!(
                "n{i}'s SAs changed across the restart of n0's daemon:\nbefore {:#?}\nafter {:#?}\nlog of the new n0:\n{log}",
                before[i], after[i]
            ),
        )?;
    }
    ensure(
        log.contains("adopted 8 SAs from the kernel"),
        format!("the new daemon did not adopt the 8 SAs:\n{log}"),
    )?;
    ensure(
        r4.lost() == 0 && r6.lost() == 0,
        format!("packets lost across the restart\n{}", f.logs()),
    )?;
    ensure(
        up2 < Duration::from_secs(15),
        "the restarted daemon took 15 s or more to see its peers up",
    )?;
    counters_unchanged(&stat0, &stat1)
}

/// A restart of n0's daemon after its SAs were flushed, three times, in one boot: the
/// SPIs it offers anew are above every one it offered before, so no key comes back
/// (random SPIs, as before the SPI ledger, would pass this by chance 1 time in 70 per
/// round).
fn restart_after_a_flush_reuses_no_spi() -> Result<(), String> {
    let mut f = start_fleet("is", 2)?;
    let spi_of = |s: &Sa| u32::from_str_radix(s.spi.trim_start_matches("0x"), 16).unwrap_or(0);
    let inbound = |f: &Fleet| -> Result<Vec<u32>, String> {
        Ok(sas_quick(f, 0)?
            .iter()
            .filter(|s| s.dst == v4(0) || s.dst == v6(0))
            .map(spi_of)
            .collect())
    };
    let ledger = f.dirs[0].join("state/spi-ledger");
    let first = f.daemon(0).log();
    ensure(
        first.contains("there is none yet; starting one"),
        format!("no INFO about a new SPI ledger:\n{first}"),
    )?;
    let mut seen: Vec<u32> = inbound(&f)?;
    ensure(
        seen.len() == 2,
        format!("n0 has not 2 inbound SAs (one peer, two families): {seen:x?}"),
    )?;
    let ns = f.topo.ns(0).to_string();
    for round in 1..=3 {
        f.daemons[0].take().unwrap().kill();
        let from = log_len(&f, 0);
        crate::rig::sh(&format!("ip -n {ns} xfrm state flush"))?;
        f.start(0)?;
        wait_log_after(f.daemon(0), from, "peer n1 up", Duration::from_secs(20))?;
        let now = inbound(&f)?;
        let max_before = *seen.iter().max().unwrap();
        ensure(
            now.len() == 2 && now.iter().all(|s| *s > max_before && !seen.contains(s)),
            format!(
                "round {round}: n0's new inbound SPIs {now:x?} are not all above {max_before:#x} \
                 (earlier: {seen:x?}); ledger:\n{}\n{}",
                std::fs::read_to_string(&ledger).unwrap_or_else(|e| e.to_string()),
                f.logs()
            ),
        )?;
        println!("    round {round}: inbound SPIs {now:x?}, all above {max_before:#x}");
        seen.extend(now);
    }
    let text =
        std::fs::read_to_string(&ledger).map_err(|e| format!("{}: {e}", ledger.display()))?;
    ensure(
        text.contains("node n0") && text.contains("reserved "),
        format!("the ledger does not name n0 and its reservation:\n{text}"),
    )
}

/// `sa_packets = 500` (soft limit at 250) under a ping every 10 ms each way and family:
/// every SA is re-keyed every few seconds, each time under a new SPI and a new key, no
/// ping is lost and no SA reaches its hard limit on the wire (the kernel deletes an SA
/// at 500 packets, so a re-key that came late would show). ESP only on the wire.
fn rekey_at_the_soft_limit_loses_no_packet() -> Result<(), String> {
    let mut f = Fleet::new("ir", 2, KEY1)?;
    for d in &f.dirs {
        let cfg = d.join("encryptd.toml");
        let text = std::fs::read_to_string(&cfg).map_err(|e| e.to_string())?;
        // [ipsec] is the file's last table. The handover takes ~0.4 s here (a debug build
        // in an emulated VM, measured on the wire: packet 450 of an SA to the first of its
        // successor); the 250 packets between soft and hard limit leave 2.5 s. With the
        // soft limit at 450 (50 packets, 0.5 s) SAs reached 495 and one CI run lost a ping.
        crate::fleet::write(&cfg, &format!("{text}sa_packets = 500\n"))?;
    }
    f.start_all(Duration::from_secs(30))?;
    let cap = f.topo.capture("")?;
    let p4 = Ping::start(&f, 1, &v4(0), 1800, "0.01")?;
    let p6 = Ping::start(&f, 0, &v6(1), 1800, "0.01")?;
    // Every SA seen while the pings run: (src, dst, spi) -> key.
    let mut seen: BTreeMap<(String, String, String), String> = BTreeMap::new();
    let until = Instant::now() + Duration::from_secs(18);
    while Instant::now() < until {
        for i in 0..2 {
            for sa in sas_quick(&f, i)? {
                seen.insert(
                    (sa.src.clone(), sa.dst.clone(), sa.spi.clone()),
                    sa.key.clone(),
                );
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let r4 = p4.finish(PING_LIMIT)?;
    let r6 = p6.finish(PING_LIMIT)?;
    let lines = cap.stop();
    println!("    {}", ping_report("n1 -> n0 IPv4", &r4));
    println!("    {}", ping_report("n0 -> n1 IPv6", &r6));
    let logs: Vec<String> = (0..2).map(|i| f.daemon(i).log()).collect();
    let counts: Vec<usize> = logs
        .iter()
        .map(|l| l.matches("reached its soft limit").count())
        .collect();
    let mut per_direction: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for (src, dst, spi) in seen.keys() {
        per_direction
            .entry((src.clone(), dst.clone()))
            .or_default()
            .push(spi.clone());
    }
    for ((src, dst), spis) in &per_direction {
        println!(
            "    {src} > {dst}: {} SAs seen ({})",
            spis.len(),
            spis.join(" ")
        );
    }
    println!("    re-keys logged: n0 {}, n1 {}", counts[0], counts[1]);
    // How close each handover came to the hard limit, on the wire: the highest sequence
    // number every SPI reached. An SPI at 500 ran into the limit and lost packets.
    let highest = highest_esp_seq(&lines);
    let closest = highest.values().max().copied().unwrap_or(0);
    println!(
        "    {} SPIs on the wire; the highest sequence number any reached: {closest} (re-key at 250, hard limit 500)",
        highest.len()
    );
    ensure(
        (250..500).contains(&closest),
        format!(
            "an SA reached sequence number {closest}: re-keyed at 250, it should end between 250 and 499\n{}",
            f.logs()
        ),
    )?;
    let clear = plaintext(&lines, IPSEC_WIRE);
    no_plaintext(&clear)?;
    ensure(
        r4.lost() == 0 && r6.lost() == 0,
        format!("pings lost across the re-keys\n{}", f.logs()),
    )?;
    ensure(
        per_direction.len() == 4 && per_direction.values().all(|v| v.len() >= 3),
        format!(
            "fewer than 3 SAs per direction and family: {per_direction:?}\n{}",
            f.logs()
        ),
    )?;
    ensure(
        counts.iter().all(|c| *c >= 4),
        format!("fewer than 4 re-keys per node: {counts:?}\n{}", f.logs()),
    )?;
    let keys: std::collections::BTreeSet<&String> = seen.values().collect();
    ensure(
        keys.len() == seen.len(),
        format!(
            "{} SAs but {} distinct keys: a key was reused",
            seen.len(),
            keys.len()
        ),
    )?;
    let mut cmd = std::process::Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        f.topo.ns(0),
        env!("CARGO_BIN_EXE_encryptd"),
        "status",
        "--config",
    ])
    .arg(f.dirs[0].join("encryptd.toml"));
    let (_, status, _) =
        crate::rig::run_within(&mut cmd, Duration::from_secs(30)).map_err(|e| e.to_string())?;
    ensure(
        status.lines().any(|l| {
            l.strip_prefix("SA rekeys: ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse::<usize>().ok())
                .is_some_and(|n| n >= 1)
        }),
        format!("status does not count the re-keys:\n{status}"),
    )
}

/// Delete n0's inbound SA `spi` from n1 (IPv4) by hand, as another program would.
fn delete_sa_from_n1(f: &Fleet, spi: &str) -> Result<(), String> {
    f.topo
        .exec(
            0,
            &format!(
                "ip xfrm state delete src {} dst {} proto esp spi {spi}",
                v4(1),
                v4(0)
            ),
        )
        .map(drop)
}

/// An idle daemon does not read the kernel's XFRM objects at every pass (before: two
/// dumps every 5 s, so every SA and policy of a 10,000-node mesh, for nothing): over a
/// settled 10 s it reads at most the SA counters once. Yet what another program does is
/// noticed at once, from the kernel's notifications: an SA deleted by hand is re-keyed
/// within a second or two (before: at the next 5 s rescan), with nothing in plaintext
/// meanwhile, and a flush of every SA and policy is repaired.
fn idle_reads_nothing_and_hears_other_programs() -> Result<(), String> {
    let f = start_fleet("iq", 2)?;
    // Let the start's exchange settle (answers, confirmations).
    std::thread::sleep(Duration::from_secs(3));
    let dumps = |v: &serde_json::Value| v["xfrm_dumps"].as_u64().unwrap_or(u64::MAX);
    let (t1, s1) = next_snapshot(&f, 0)?;
    let (t2, s2) = next_snapshot(&f, 0)?;
    let idle = dumps(&s2).saturating_sub(dumps(&s1));
    println!(
        "    idle n0: {idle} XFRM dumps in {} ms between two snapshots ({} in all since the start)",
        (t2 - t1).as_millis(),
        dumps(&s2)
    );
    ensure(
        dumps(&s1) != u64::MAX && t2 - t1 >= Duration::from_secs(5) && idle <= 1,
        format!(
            "an idle daemon read the kernel {idle} times in {:?}:\n{s2}",
            t2 - t1
        ),
    )?;

    let cap = f.topo.capture("")?;
    let ping = Ping::start(&f, 1, &v4(0), 1000, "0.01")?;
    std::thread::sleep(Duration::from_millis(300));
    let spi_of = |all: &[Sa]| {
        all.iter()
            .find(|s| s.src == v4(1) && s.dst == v4(0))
            .map(|s| s.spi.clone())
    };
    let x = spi_of(&sas(&f, 0)?).ok_or("n0 has no SA from n1")?;
    let t0 = Instant::now();
    delete_sa_from_n1(&f, &x)?;
    let rekeyed = wait_for(Duration::from_secs(20), || {
        sas_quick(&f, 0).is_ok_and(|all| spi_of(&all).is_some_and(|s| s != x))
    });
    let deleted_ms = t0.elapsed().as_millis();
    ensure(
        rekeyed,
        format!("n0 did not replace the SA deleted by hand\n{}", f.logs()),
    )?;
    println!("    n0's inbound SA {x} deleted by hand: a new one in {deleted_ms} ms");
    let r = ping.finish(PING_LIMIT)?;
    let lines = cap.stop();
    println!("    {}", ping_report("n1 -> n0 IPv4", &r));
    no_plaintext(&plaintext(&lines, IPSEC_WIRE))?;

    // (Without strict mode a policy flush lets plaintext out until the policies are
    // back: here only how soon they are.)
    let t0 = Instant::now();
    f.topo
        .exec(0, "ip xfrm state flush && ip xfrm policy flush")?;
    let repaired = wait_for(Duration::from_secs(20), || {
        f.topo
            .exec(0, "ip xfrm policy | grep -c ^src")
            .is_ok_and(|n| n.trim() != "0")
            && sas_quick(&f, 0).is_ok_and(|all| all.len() >= 4)
            && f.topo.exec(1, &format!("ping -c 1 -W 1 {}", v4(0))).is_ok()
    });
    let flushed_ms = t0.elapsed().as_millis();
    ensure(repaired, format!("n0 did not repair a flush\n{}", f.logs()))?;
    println!(
        "    every SA and policy of n0 flushed by hand: policies, SAs and traffic back in {flushed_ms} ms"
    );
    // Each was seen at once, not at a rescan: well under the old 5 s.
    ensure(
        deleted_ms < 3000,
        format!("the deleted SA took {deleted_ms} ms to come back"),
    )
}

/// The highest ESP sequence number seen per SPI in tcpdump lines
/// (`... ESP(spi=0x387762b1,seq=0x1c2), length 120`).
fn highest_esp_seq(lines: &[String]) -> BTreeMap<u32, u32> {
    let mut highest = BTreeMap::new();
    for l in lines {
        let Some(rest) = l.split("ESP(spi=0x").nth(1) else {
            continue;
        };
        let Some((spi, rest)) = rest.split_once(",seq=0x") else {
            continue;
        };
        let seq = rest.split(')').next().unwrap_or("");
        if let (Ok(spi), Ok(seq)) = (u32::from_str_radix(spi, 16), u32::from_str_radix(seq, 16)) {
            let h = highest.entry(spi).or_insert(0);
            *h = seq.max(*h);
        }
    }
    highest
}

/// Case 3: A node reboots (its XFRM state gone, a new boot ID, its daemon starting afresh):
/// the pair recovers within seconds under new keys, and nothing crosses the wire in
/// plaintext meanwhile.
fn reboot_rekeys() -> Result<(), String> {
    let mut f = start_fleet("ib", 3)?;
    let of_n0 = |all: &[Sa]| -> Vec<Sa> {
        all.iter()
            .filter(|s| [v4(0), v6(0)].contains(&s.src) || [v4(0), v6(0)].contains(&s.dst))
            .cloned()
            .collect()
    };
    let before: Vec<Vec<Sa>> = [1, 2]
        .iter()
        .map(|i| sas(&f, *i).map(|s| of_n0(&s)))
        .collect::<Result<_, _>>()?;
    let cap = f.topo.capture("")?;
    let p4 = Ping::start(&f, 1, &v4(0), 1500, "0.01")?;
    let p6 = Ping::start(&f, 2, &v6(0), 1500, "0.01")?;
    let psub = Ping::start(&f, 1, "10.1.0.1", 150, "0.1")?;
    std::thread::sleep(Duration::from_secs(1));

    // The reboot: the daemon dies with the kernel's state, the node comes back with a
    // new boot ID and no XFRM objects, and its daemon starts.
    f.daemons[0].take().unwrap().kill();
    let from = log_len(&f, 0);
    let ns = f.topo.ns(0).to_string();
    crate::rig::sh(&format!(
        "ip -n {ns} xfrm state flush && ip -n {ns} xfrm policy flush"
    ))?;
    crate::fleet::write(&f.dirs[0].join("boot_id"), &boot_id(5000))?;
    let t0 = Instant::now();
    f.start(0)?;
    let d = f.daemon(0);
    wait_log_after(d, from, "peer n1 up", Duration::from_secs(20))?;
    wait_log_after(d, from, "peer n2 up", Duration::from_secs(20))?;
    let recovered = t0.elapsed();
    let r4 = p4.finish(PING_LIMIT)?;
    let r6 = p6.finish(PING_LIMIT)?;
    let rs = psub.finish(PING_LIMIT)?;
    let lines = cap.stop();

    println!(
        "    n0 rebooted: its peers up after {} ms",
        recovered.as_millis()
    );
    println!("    {}", ping_report("n1 -> n0 IPv4", &r4));
    println!("    {}", ping_report("n2 -> n0 IPv6", &r6));
    println!("    {}", ping_report("n1 -> n0's subnet", &rs));
    let clear = plaintext(&lines, IPSEC_WIRE);
    no_plaintext(&clear)?;
    let esp = lines.iter().filter(|l| l.contains("ESP(")).count();
    println!(
        "    {} packets captured, {esp} ESP, 0 plaintext",
        lines.len()
    );
    ensure(
        recovered < Duration::from_secs(10),
        "recovery took 10 s or more",
    )?;
    // Traffic flows again on the new SAs: the replies resumed, and the outage is the
    // restart's, not the whole run's.
    for (what, r) in [("IPv4", &r4), ("IPv6", &r6), ("subnet", &rs)] {
        ensure(
            r.received > r.sent / 3 && r.max_gap < Duration::from_secs(10),
            format!("{what}: {r:?}\n{}", f.logs()),
        )?;
    }
    for (k, i) in [1, 2].into_iter().enumerate() {
        let now = of_n0(&sas(&f, i)?);
        println!("    n{i}'s SAs with n0 before the reboot:");
        for s in &before[k] {
            println!("      {} > {} spi {} {}", s.src, s.dst, s.spi, s.key);
        }
        println!("    and after:");
        for s in &now {
            println!("      {} > {} spi {} {}", s.src, s.dst, s.spi, s.key);
        }
        ensure(
            now.len() == 4,
            format!("n{i} has {} SAs with n0, want 4", now.len()),
        )?;
        for s in &now {
            ensure(
                !before[k].iter().any(|b| b.key == s.key || b.spi == s.spi),
                format!(
                    "n{i}: SA {} > {} spi {} kept its key or SPI across n0's reboot",
                    s.src, s.dst, s.spi
                ),
            )?;
        }
        // Printing keys is for this test's output only: the daemons never log them.
        let logs = f.logs();
        for s in before[k].iter().chain(&now) {
            let hex = s
                .key
                .split_whitespace()
                .find(|w| w.starts_with("0x"))
                .unwrap_or("?");
            ensure(
                !logs.contains(hex.trim_start_matches("0x")),
                format!(
                    "key material of {} > {} spi {} in a daemon's log",
                    s.src, s.dst, s.spi
                ),
            )?;
        }
        let log = f.daemons[i].as_ref().unwrap().log();
        ensure(
            log.contains("peer n0 rebooted"),
            format!("n{i} did not log n0's reboot:\n{log}"),
        )?;
    }
    Ok(())
}

/// Case 4: A fourth node added to every inventory: the existing nodes add only objects for it
/// and leave every object they had as it was.
fn add_node() -> Result<(), String> {
    let mut f = Fleet::new("ia", 4, KEY1)?;
    let three: String = (0..3).map(node_entry).collect();
    let four: String = (0..4).map(node_entry).collect();
    for i in 0..3 {
        crate::fleet::write(&f.dirs[i].join("nodes.toml"), &three)?;
        f.start(i)?;
    }
    wait_ready(&mut f, 3, Duration::from_secs(30)).map_err(|e| format!("{e}\n{}", f.logs()))?;
    let snap = |f: &Fleet| -> Result<Vec<Snapshot>, String> {
        (0..3).map(|i| Ok((policies(f, i)?, sas(f, i)?))).collect()
    };
    let before = snap(&f)?;
    let offsets: Vec<usize> = (0..3).map(|i| f.daemon(i).log().len()).collect();
    std::thread::sleep(Duration::from_millis(1100));

    for i in 0..3 {
        rename_over(&f.dirs[i].join("nodes.toml"), &four)?;
    }
    f.start(3)?;
    let t0 = Instant::now();
    let mut applied = Vec::new();
    for (i, from) in offsets.iter().enumerate() {
        let d = f.daemon(i);
        wait_log_after(d, *from, "peer n3 up", Duration::from_secs(20))?;
        let log = d.log()[*from..].to_string();
        applied.push(
            log.lines()
                .find(|l| l.contains("applied: "))
                .map(|l| l.split("applied: ").nth(1).unwrap_or("").to_string())
                .unwrap_or_default(),
        );
    }
    let up = t0.elapsed();
    f.daemon(3)
        .wait_notify("READY=1", Duration::from_secs(20))?;
    std::thread::sleep(Duration::from_secs(2));
    let after = snap(&f)?;
    println!(
        "    n3 up on every node {} ms after the rename-over",
        up.as_millis()
    );

    let new_addrs = [v4(3), v6(3), "10.1.3.0".to_string()];
    let concerns_n3 = |s: &str| {
        new_addrs.iter().any(|a| {
            s.contains(&format!(" {a}/"))
                || s.contains(&format!(" {a} "))
                || s.ends_with(&format!(" {a}"))
        })
    };
    for i in 0..3 {
        let (bp, bs) = &before[i];
        let (ap, as_) = &after[i];
        let gone_p: Vec<&Pol> = bp.iter().filter(|p| !ap.contains(p)).collect();
        let gone_s: Vec<&Sa> = bs.iter().filter(|s| !as_.contains(s)).collect();
        ensure(
            gone_p.is_empty() && gone_s.is_empty(),
            format!(
                "n{i}: objects changed or removed by adding n3:\npolicies {gone_p:#?}\nSAs {gone_s:#?}"
            ),
        )?;
        let new_p: Vec<&Pol> = ap.iter().filter(|p| !bp.contains(p)).collect();
        let new_s: Vec<&Sa> = as_.iter().filter(|s| !bs.contains(s)).collect();
        let foreign_p: Vec<&&Pol> = new_p.iter().filter(|p| !concerns_n3(&p.what)).collect();
        let foreign_s: Vec<&&Sa> = new_s
            .iter()
            .filter(|s| !(new_addrs.contains(&s.src) || new_addrs.contains(&s.dst)))
            .collect();
        ensure(
            foreign_p.is_empty() && foreign_s.is_empty(),
            format!("n{i}: new objects not about n3:\n{foreign_p:#?}\n{foreign_s:#?}"),
        )?;
        // n_i <-> n3: IPv4 {address, subnet} x {address, subnet}, IPv6 address x address,
        // in/out/fwd each; SAs in and out per family.
        ensure(
            new_p.len() == 15 && new_s.len() == 4,
            format!(
                "n{i}: {} new policies (want 15), {} new SAs (want 4):\n{new_p:#?}\n{new_s:#?}",
                new_p.len(),
                new_s.len()
            ),
        )?;
        ensure(
            applied[i].starts_with("15 kernel object(s) changed"),
            format!("n{i}: the reload applied `{}`, want 15 objects", applied[i]),
        )?;
        println!(
            "    n{i}: {} policies and {} SAs unchanged, {} + {} new ones all for n3; reload: {}",
            bp.len(),
            bs.len(),
            new_p.len(),
            new_s.len(),
            applied[i]
        );
    }
    for i in 0..3 {
        f.topo
            .exec(3, &format!("ping -c 2 -i 0.2 -W 2 {}", v4(i)))?;
        f.topo.exec(i, "ping -c 2 -i 0.2 -W 2 10.1.3.1")?;
    }
    Ok(())
}

/// Case 5: Hellos replayed, forged, cut short, too long or plain garbage, sent to a peer's
/// hello port from a node's own address: dropped and counted, the SAs stay as they are
/// and the pair keeps working.
fn forged_and_replayed_hellos() -> Result<(), String> {
    let (mut f, captured) = fleet_recording_hellos("if", 3)?;
    let v4_hellos = hellos_to(&captured, 0, &v4(1));
    let v6_hellos = hellos_to(&captured, 0, &v6(1));
    ensure(
        v4_hellos.len() >= 2 && !v6_hellos.is_empty(),
        format!(
            "captured {} IPv4 and {} IPv6 hellos n0 -> n1",
            v4_hellos.len(),
            v6_hellos.len()
        ),
    )?;
    let latest = v4_hellos.last().unwrap().clone();

    let before: Vec<Vec<Sa>> = (0..3).map(|i| sas(&f, i)).collect::<Result<_, _>>()?;
    let stat0 = error_counters(&f, 3)?;
    let from = f.daemon(1).log().len();
    let ping = Ping::start(&f, 0, &v4(1), 600, "0.01")?;
    std::thread::sleep(Duration::from_millis(500));

    // n0's name and n1's name are 2 bytes each: the sender's boot ID starts at byte 12,
    // its nonce at 28, the sequence number at 44.
    let mut forged_boot = latest.clone();
    forged_boot[12] ^= 0x01;
    // A forged reboot that is new in every way but its MAC: another boot ID, a sequence
    // number far ahead.
    let mut forged_reboot = forged_boot.clone();
    forged_reboot[44..52].copy_from_slice(&(1u64 << 40).to_be_bytes());
    let mut forged_mac = latest.clone();
    *forged_mac.last_mut().unwrap() ^= 0x80;
    let truncated = latest[..latest.len() / 2].to_vec();
    let mut oversized = latest.clone();
    oversized.resize(1500, 0);
    let mut x: u32 = 0x1234_5678;
    let garbage: Vec<u8> = (0..64)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect();
    let mut attack: Vec<(&str, Vec<u8>)> =
        v4_hellos.iter().map(|h| ("replay", h.clone())).collect();
    attack.extend([
        ("flipped boot ID", forged_boot),
        ("forged reboot", forged_reboot),
        ("flipped MAC", forged_mac),
        ("truncated", truncated),
        ("oversized", oversized),
        ("garbage", garbage),
    ]);
    let sent_v4 = send_udp(f.topo.ns(0), &v4(0), &v4(1), &attack)?;
    let v6_attack: Vec<(&str, Vec<u8>)> = v6_hellos.iter().map(|h| ("replay", h.clone())).collect();
    let sent_v6 = send_udp(f.topo.ns(0), &v6(0), &v6(1), &v6_attack)?;
    // A real hello of n0, from n2's address.
    let sent_n2 = send_udp(
        f.topo.ns(2),
        &v4(2),
        &v4(1),
        &[("wrong source", latest.clone())],
    )?;

    // n1 reports the drops in its log.
    let want = [
        ("bad_mac", 3),
        ("truncated", 1),
        ("oversized", 1),
        ("not_a_hello", 1),
        ("wrong_source", 1),
        ("replayed", 1),
    ];
    let d1 = f.daemon(1);
    let mut counted = BTreeMap::new();
    let seen = wait_for(Duration::from_secs(20), || {
        counted = drop_counts(&d1.log()[from..]);
        want.iter()
            .all(|(k, n)| counted.get(*k).copied().unwrap_or(0) >= *n)
    });
    let log1 = d1.log()[from..].to_string();
    ensure(
        seen,
        format!("n1 reported drops {counted:?}, want at least {want:?}; log:\n{log1}"),
    )?;
    let r = ping.finish(PING_LIMIT)?;
    std::thread::sleep(Duration::from_secs(1));
    let after: Vec<Vec<Sa>> = (0..3).map(|i| sas(&f, i)).collect::<Result<_, _>>()?;
    let stat1 = error_counters(&f, 3)?;
    println!(
        "    sent {sent_v4} datagrams to n1 over IPv4 ({} replays of captured hellos), {sent_v6} over IPv6, {sent_n2} from n2's address",
        v4_hellos.len()
    );
    println!("    n1 counted: {counted:?}");
    println!("    {}", ping_report("n0 -> n1 IPv4", &r));
    for i in 0..3 {
        ensure(
            before[i] == after[i],
            format!(
                "n{i}'s SAs changed:\nbefore {:#?}\nafter {:#?}\n{}",
                before[i],
                after[i],
                f.logs()
            ),
        )?;
    }
    for bad in ["rebooted", "re-keying", "down"] {
        ensure(!log1.contains(bad), format!("n1 logged `{bad}`:\n{log1}"))?;
    }
    ensure(r.lost() == 0 && r.sent > 0, format!("packets lost: {r:?}"))?;
    counters_unchanged(&stat0, &stat1)?;
    // Still working: a fresh exchange of hellos (a reload) keeps the pair up.
    f.topo
        .exec(0, &format!("ping -c 2 -i 0.2 -W 2 {}", v6(1)))?;
    Ok(())
}

/// Case 6: hellos of an earlier instance of a peer's daemon, replayed after it restarted
/// and after one of its SAs was re-keyed, must not take the pair back to the SPI it had:
/// that SPI means that key again, with sequence numbers from 1 (nonce reuse).
fn replay_from_an_earlier_instance() -> Result<(), String> {
    let (mut f, captured) = fleet_recording_hellos("io", 3)?;
    let old = hellos_to(&captured, 0, &v4(1));
    ensure(!old.is_empty(), "no hellos n0 -> n1 recorded")?;
    let first = sas(&f, 1)?;
    let out_1_0 = |all: &[Sa]| -> Vec<Sa> {
        all.iter()
            .filter(|s| s.src == v4(1) && s.dst == v4(0))
            .cloned()
            .collect()
    };
    let x = out_1_0(&first)
        .first()
        .map(|s| s.spi.clone())
        .ok_or("n1 has no SA to n0")?;

    // n0's daemon restarts (a new nonce; the kernel's SAs stay and are adopted)...
    f.daemons[0].take().unwrap().kill();
    let from = log_len(&f, 0);
    f.start(0)?;
    wait_log_after(f.daemon(0), from, "peer n1 up", Duration::from_secs(20))?;
    // ...and loses its inbound SA from n1 (IPv4): it offers n1 a new SPI for it.
    delete_sa_from_n1(&f, &x)?;
    let t0 = Instant::now();
    let rekeyed = wait_for(Duration::from_secs(40), || {
        sas_quick(&f, 1).is_ok_and(|all| {
            let o = out_1_0(&all);
            o.len() == 1 && o[0].spi != x
        }) && f.topo.exec(1, &format!("ping -c 1 -W 1 {}", v4(0))).is_ok()
    });
    ensure(
        rekeyed,
        format!(
            "n1 did not move to a new SPI for n0 after n0 lost {x}\n{}",
            f.logs()
        ),
    )?;
    println!(
        "    n0 lost its inbound SA {x}; n1 sends with a new SPI {} ms later",
        t0.elapsed().as_millis()
    );
    std::thread::sleep(Duration::from_secs(2));

    let before: Vec<Vec<Sa>> = (0..3).map(|i| sas(&f, i)).collect::<Result<_, _>>()?;
    let stat0 = error_counters(&f, 3)?;
    let from1 = f.daemon(1).log().len();
    let ping = Ping::start(&f, 1, &v4(0), 500, "0.01")?;
    std::thread::sleep(Duration::from_millis(500));
    let replays: Vec<(&str, Vec<u8>)> = old.iter().map(|h| ("replay", h.clone())).collect();
    send_udp(f.topo.ns(0), &v4(0), &v4(1), &replays)?;
    std::thread::sleep(Duration::from_secs(2));
    let during = sas(&f, 1)?;
    let r = ping.finish(PING_LIMIT)?;
    let after: Vec<Vec<Sa>> = (0..3).map(|i| sas(&f, i)).collect::<Result<_, _>>()?;
    let stat1 = error_counters(&f, 3)?;
    let d1 = f.daemon(1);
    let counted = wait_for(Duration::from_secs(15), || {
        drop_counts(&d1.log()[from1..])
            .get("replayed")
            .copied()
            .unwrap_or(0)
            >= old.len() as u64
    });
    println!(
        "    replayed {} hellos of n0's first instance to n1; n1 counted {:?}",
        old.len(),
        drop_counts(&d1.log()[from1..])
    );
    ensure(counted, "n1 did not count every replay as such")?;
    println!("    {}", ping_report("n1 -> n0 IPv4", &r));
    let back: Vec<Sa> = out_1_0(&during)
        .into_iter()
        .chain(out_1_0(&after[1]))
        .filter(|s| s.spi == x)
        .collect();
    ensure(
        back.is_empty(),
        format!(
            "n1 went back to sending to n0 with SPI {x} (the same key as before, sequence numbers from 1 again):\n{back:#?}\nn1's log since the replay:\n{}",
            &f.daemon(1).log()[from1..]
        ),
    )?;
    for i in 0..3 {
        ensure(
            before[i] == after[i],
            format!(
                "n{i}'s SAs changed after the replay:\nbefore {:#?}\nafter {:#?}",
                before[i], after[i]
            ),
        )?;
    }
    ensure(r.lost() == 0, format!("packets lost: {r:?}"))?;
    counters_unchanged(&stat0, &stat1)
}

/// The hello sockets are bound to the node's endpoint addresses, not the wildcard:
/// - n0's daemon starts before its addresses exist (`IP_FREEBIND`), and the pair comes up
///   once they are added;
/// - `ss` shows n0 listening on 10.77.0.1:4510 and [fd77::1]:4510 only;
/// - datagrams to another address of n0 (10.77.0.99, fd77::99) reach no socket (the
///   kernel's UDP NoPorts counters take them) and the daemon counts none of them, while
///   as many to its endpoint addresses are counted;
/// - a reload that moves n0 to the other addresses moves the sockets, and the pair comes
///   back up there.
fn hello_sockets_are_bound_to_the_node_address() -> Result<(), String> {
    let mut f = Fleet::new("ib", 2, KEY1)?;
    let ns0 = f.topo.ns(0).to_string();
    let ns1 = f.topo.ns(1).to_string();
    sh(&format!(
        "ip -n {ns0} addr del 10.77.0.1/24 dev eth0 && ip -n {ns0} addr del fd77::1/64 dev eth0"
    ))?;
    f.start(0)?;
    f.start(1)?;
    std::thread::sleep(Duration::from_secs(2));
    let log0 = f.daemon(0).log();
    ensure(
        !log0.contains("hello socket on") && !log0.contains("<3>"),
        format!("n0's daemon did not start without its addresses:\n{log0}"),
    )?;
    sh(&format!(
        "ip -n {ns0} addr add 10.77.0.1/24 dev eth0 && ip -n {ns0} addr add fd77::1/64 dev eth0 nodad"
    ))?;
    let t0 = Instant::now();
    f.wait_all_up(Duration::from_secs(40))
        .map_err(|e| format!("after n0's addresses appeared: {e}\n{}", f.logs()))?;
    println!(
        "    n0 started without its addresses; the pair was up {} ms after they were added",
        t0.elapsed().as_millis()
    );

    let listening = |ns: &str| -> Result<Vec<String>, String> {
        let out = sh(&format!("ip netns exec {ns} ss -H -uln 'sport = :4510'"))?;
        let mut v: Vec<String> = out
            .lines()
            .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
            .collect();
        v.sort();
        Ok(v)
    };
    let l = listening(&ns0)?;
    println!("    n0 listens on {l:?}");
    ensure(
        l == ["10.77.0.1:4510", "[fd77::1]:4510"],
        format!("n0's hello sockets: {l:?}"),
    )?;

    sh(&format!(
        "ip -n {ns0} addr add 10.77.0.99/24 dev eth0 && ip -n {ns0} addr add fd77::99/64 dev eth0 nodad"
    ))?;
    let no_ports = || -> Result<u64, String> {
        let snmp = sh(&format!(
            "ip netns exec {ns0} cat /proc/net/snmp /proc/net/snmp6"
        ))?;
        let mut lines = snmp.lines();
        let mut v4 = 0;
        while let Some(l) = lines.next() {
            if l.starts_with("Udp: InDatagrams") {
                let names: Vec<&str> = l.split_whitespace().collect();
                let vals: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
                let at = names
                    .iter()
                    .position(|n| *n == "NoPorts")
                    .ok_or("no NoPorts")?;
                v4 = vals
                    .get(at)
                    .and_then(|x| x.parse().ok())
                    .ok_or("bad NoPorts")?;
            }
        }
        let v6: u64 = snmp
            .lines()
            .find(|l| l.starts_with("Udp6NoPorts"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .ok_or("no Udp6NoPorts")?;
        Ok(v4 + v6)
    };
    let garbage: Vec<(&str, Vec<u8>)> = (0..5u8)
        .map(|i| ("garbage", vec![0xee, i, 1, 2, 3]))
        .collect();
    let from = f.daemon(0).log().len();
    let np0 = no_ports()?;
    send_udp(&ns1, &v4(1), "10.77.0.99", &garbage)?;
    send_udp(&ns1, &v6(1), "fd77::99", &garbage)?;
    let np1 = no_ports()?;
    // The control: as many to the endpoint addresses, which the daemon must count.
    send_udp(&ns1, &v4(1), &v4(0), &garbage[..3])?;
    send_udp(&ns1, &v6(1), &v6(0), &garbage[..3])?;
    let d0 = f.daemon(0);
    // Garbage is `not_a_hello`; the pair's own exchange may add a drop of another kind
    // meanwhile (a late copy of a stale hello over the other family counts as replayed).
    let counted = |d: &TestDaemon| {
        drop_counts(&d.log()[from..])
            .get("not_a_hello")
            .copied()
            .unwrap_or(0)
    };
    wait_for(Duration::from_secs(15), || counted(d0) >= 6);
    std::thread::sleep(Duration::from_secs(1));
    let n = counted(d0);
    println!(
        "    10 datagrams to n0's other addresses: UDP NoPorts +{}; 6 to its endpoints: the daemon counted {n} drop(s)",
        np1 - np0
    );
    ensure(
        np1 - np0 >= 10,
        format!(
            "the datagrams to n0's other addresses found a socket (NoPorts +{})",
            np1 - np0
        ),
    )?;
    ensure(
        n == 6,
        format!(
            "n0 counted {n} garbage datagrams, wanted the 6 sent to its endpoints:\n{}",
            &d0.log()[from..]
        ),
    )?;

    // n0 moves to its other addresses: both inventories change, the sockets follow.
    let moved = "[[node]]\nname = \"n0\"\naddresses = [\"10.77.0.99\", \"fd77::99\"]\nsubnets = [\"10.1.0.0/24\"]\n\n"
        .to_string()
        + &node_entry(1);
    let from = f.daemon(0).log().len();
    for i in 0..2 {
        f.daemon(i).rename_over("nodes.toml", &moved)?;
    }
    let d0 = f.daemon(0);
    wait_log_after(
        d0,
        from,
        "hello sockets bound to 10.77.0.99:4510, [fd77::99]:4510",
        Duration::from_secs(20),
    )?;
    let l = listening(&ns0)?;
    println!("    after the reload n0 listens on {l:?}");
    ensure(
        l == ["10.77.0.99:4510", "[fd77::99]:4510"],
        format!("n0's hello sockets after the reload: {l:?}"),
    )?;
    let t0 = Instant::now();
    let up = wait_for(Duration::from_secs(40), || {
        f.topo.exec(1, "ping -c 1 -W 1 10.77.0.99").is_ok()
            && f.topo.exec(1, "ping -c 1 -W 1 fd77::99").is_ok()
            && sas_quick(&f, 1).is_ok_and(|all| all.iter().any(|s| s.dst == "10.77.0.99"))
    });
    ensure(
        up,
        format!(
            "the pair did not come up at n0's new addresses:\n{}",
            f.logs()
        ),
    )?;
    println!(
        "    the pair is up at n0's new addresses {} ms after the reload",
        t0.elapsed().as_millis()
    );
    let log0 = f.daemon(0).log();
    ensure(
        !log0[from..].contains("<3>"),
        format!("errors after the reload:\n{}", &log0[from..]),
    )
}

/// A fleet started while the wire's hellos are recorded, as an on-path attacker would;
/// the recording is stopped once every daemon is up.
fn fleet_recording_hellos(tag: &str, n: usize) -> Result<(Fleet, Vec<Captured>), String> {
    let mut f = Fleet::new(tag, n, KEY1)?;
    let pcap = std::env::temp_dir().join(format!("{tag}-hellos.pcap"));
    let err = std::env::temp_dir().join(format!("{tag}-hellos.err"));
    let mut dump = Command::new("ip")
        .args([
            "netns",
            "exec",
            &f.topo.wire,
            "tcpdump",
            "-Z",
            "root",
            "-U",
            "-n",
        ])
        .args(["-i", "br0", "-w"])
        .arg(&pcap)
        .args(["udp", "port", "4510"])
        .stdout(Stdio::null())
        .stderr(File::create(&err).map_err(|e| e.to_string())?)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("tcpdump: {e}"))?;
    let listening = wait_for(Duration::from_secs(10), || {
        std::fs::read_to_string(&err).is_ok_and(|s| s.contains("listening"))
    });
    ensure(listening, "tcpdump did not start")?;
    for i in 0..n {
        f.start(i)?;
    }
    let ready = wait_ready(&mut f, n, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    // The cases replay an older hello as well as the latest: keep recording until n0 has
    // sent n1 two over IPv4 and one over IPv6. A fast setup may have needed only one
    // round; the next comes within HELLO_SLOW (10 s).
    let enough = || {
        read_pcap(&pcap).is_ok_and(|c| {
            hellos_to(&c, 0, &v4(1)).len() >= 2 && !hellos_to(&c, 0, &v6(1)).is_empty()
        })
    };
    if ready.is_ok() {
        wait_for(Duration::from_secs(12), enough);
    }
    // SAFETY: kill(2) of our own child; SIGINT makes tcpdump flush and exit.
    unsafe { libc::kill(dump.id() as i32, libc::SIGINT) };
    crate::rig::finish_child(&mut dump, Duration::from_secs(10), "tcpdump")?;
    let captured = read_pcap(&pcap)?;
    ready.map_err(|e| {
        let t0 = captured.first().map_or(0.0, |c| c.3);
        let hellos: Vec<String> = captured
            .iter()
            .map(|(s, d, p, t)| format!("{:8.3} {s} > {d}: {}", t - t0, describe_hello(p)))
            .collect();
        format!("{e}\n{}\nhellos:\n{}", f.logs(), hellos.join("\n"))
    })?;
    Ok((f, captured))
}

/// The hellos node `from` sent to address `dst`.
fn hellos_to(captured: &[Captured], from: usize, dst: &str) -> Vec<Vec<u8>> {
    captured
        .iter()
        .filter(|(s, d, _, _)| (*s == v4(from) || *s == v6(from)) && d == dst)
        .map(|(_, _, p, _)| p.clone())
        .collect()
}

/// Sum the daemon's `hello: dropped` summaries by reason.
fn drop_counts(log: &str) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for l in log.lines().filter(|l| l.contains("hello: dropped")) {
        let Some(inner) = l
            .split("datagram(s) (")
            .nth(1)
            .and_then(|s| s.split(')').next())
        else {
            continue;
        };
        for part in inner.split(", ") {
            let mut w = part.split_whitespace();
            if let (Some(k), Some(n)) = (w.next(), w.next().and_then(|n| n.parse::<u64>().ok())) {
                *m.entry(k.to_string()).or_default() += n;
            }
        }
    }
    m
}

/// Send datagrams to `dst`:4510 from `src` (any port) inside namespace `ns`, in
/// plaintext as an attacker on the wire would: the socket bypasses the node's tunnel
/// policies as the daemon's own does. (Through the tunnel they would not even reach the
/// daemon: its socket takes plaintext hellos only.)
fn send_udp(ns: &str, src: &str, dst: &str, dgrams: &[(&str, Vec<u8>)]) -> Result<usize, String> {
    use std::os::fd::AsRawFd;
    let src: std::net::IpAddr = src.parse().map_err(|e| format!("{src}: {e}"))?;
    let dst: std::net::IpAddr = dst.parse().map_err(|e| format!("{dst}: {e}"))?;
    crate::rig::in_netns(ns, || {
        let s = std::net::UdpSocket::bind((src, 0)).map_err(|e| format!("bind {src}: {e}"))?;
        encryptd::kernel::xfrm::bypass_socket(s.as_raw_fd(), src.is_ipv6())
            .map_err(|e| format!("XFRM bypass for the sending socket: {e}"))?;
        for (what, d) in dgrams {
            s.send_to(d, (dst, 4510))
                .map_err(|e| format!("{what} ({} bytes) to {dst}: {e}", d.len()))?;
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(dgrams.len())
    })
}

/// A hello's header fields, for a failure's report (docs/hello.md has the layout).
fn describe_hello(p: &[u8]) -> String {
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let parse = || -> Option<String> {
        let mut at = 6;
        let mut name = || {
            let n = usize::from(*p.get(at)?);
            let s = String::from_utf8_lossy(p.get(at + 1..at + 1 + n)?).into_owned();
            at += 1 + n;
            Some(s)
        };
        let (from, to) = (name()?, name()?);
        let f = |o: usize, n: usize| p.get(at + o..at + o + n);
        let seq = u64::from_be_bytes(f(32, 8)?.try_into().ok()?);
        let offers = usize::from(f(74, 1)?[0]);
        let outb = usize::from(*p.get(at + 75 + offers * 7)?);
        Some(format!(
            "{from}->{to} boot {} nonce {} seq {seq} echo boot {} nonce {} keys {:04x} offers {offers} outbound {outb}",
            hex(f(0, 2)?),
            hex(f(16, 4)?),
            hex(f(40, 2)?),
            hex(f(56, 4)?),
            u16::from_be_bytes(f(72, 2)?.try_into().ok()?),
        ))
    };
    parse().unwrap_or_else(|| format!("{} bytes, not a hello", p.len()))
}

/// (source, destination, UDP payload, time) of every IPv4/IPv6 UDP packet in a pcap file
/// of an Ethernet capture.
fn read_pcap(path: &std::path::Path) -> Result<Vec<Captured>, String> {
    let b = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    ensure(
        b.len() >= 24 && b[..4] == [0xd4, 0xc3, 0xb2, 0xa1],
        "not a little-endian pcap file",
    )?;
    let u32le = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap()) as usize;
    let time = |i: usize| u32le(i) as f64 + u32le(i + 4) as f64 / 1e6;
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= b.len() {
        let len = u32le(at + 8);
        let t = time(at);
        let frame = b
            .get(at + 16..at + 16 + len)
            .ok_or("truncated pcap record")?;
        at += 16 + len;
        if frame.len() < 14 {
            continue;
        }
        let ip = &frame[14..];
        let (src, dst, l4) = match u16::from_be_bytes([frame[12], frame[13]]) {
            0x0800 if ip.len() >= 20 && ip[9] == 17 => {
                let ihl = usize::from(ip[0] & 0xF) * 4;
                let a = |i: usize| {
                    std::net::Ipv4Addr::new(ip[i], ip[i + 1], ip[i + 2], ip[i + 3]).to_string()
                };
                (a(12), a(16), &ip[ihl.min(ip.len())..])
            }
            0x86dd if ip.len() >= 40 && ip[6] == 17 => {
                let a = |i: usize| {
                    std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&ip[i..i + 16]).unwrap())
                        .to_string()
                };
                (a(8), a(24), &ip[40..])
            }
            _ => continue,
        };
        if l4.len() < 8 {
            continue;
        }
        let ulen = usize::from(u16::from_be_bytes([l4[4], l4[5]]));
        out.push((src, dst, l4[8..ulen.clamp(8, l4.len())].to_vec(), t));
    }
    Ok(out)
}
