//! `cargo bench --bench mesh`: the full IPsec mesh of one node with 1,000 and 10,000
//! simulated peers, installed through encryptd's own plan → dump → diff → apply path into
//! one network namespace, against the same objects installed by `ip -batch`.
//!
//! Like `tests/kernel`, it needs ESP and gcm, which the build machines' kernel lacks: unless
//! it already runs inside the project's VM (`ENCRYPTD_VM`, set by `tests/vm/vmrun.sh`) or
//! is told to run here (`ENCRYPTD_BENCH=host`, a root shell on a kernel with ESP), it
//! re-runs itself in the VM. Inside, each size runs in a child process of its own, so that
//! its peak RSS (`VmHWM`) is its own.
//!
//! Each peer has one IPv4 address and an agreed hello state (one inbound and one outbound
//! SA slot, key-id 1, both boot IDs known), so the plan holds 3 policies (out/in/fwd) and
//! 2 states per peer (the hello's exemption is a per-socket policy, not in the plan).
//!
//! Without `--bench` (e.g. `cargo test --benches`) it does nothing: it is not a test.
//!
//! Environment: `ENCRYPTD_BENCH_PEERS` (default `1000,10000`) the sizes;
//! `ENCRYPTD_BENCH_SUBNETS=1` gives every node (and this one) a /24 behind it as well
//! (then 12 policies per peer); `ENCRYPTD_BENCH_HTHRESH4="24 24"` sets the namespaces' XFRM
//! policy hash thresholds (`ip xfrm policy set hthresh4 24 24`); `VM_MEM`, `VM_TIMEOUT` as for `tests/vm/vmrun.sh`.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use encryptd::config::Config;
use encryptd::config::inventory::{Inventory, Node};
use encryptd::config::keys::{Algorithm as KeyAlg, KeyEntry, KeyRing};
use encryptd::config::settings;
use encryptd::ipsec::Engine;
use encryptd::ipsec::derive::BootId;
use encryptd::ipsec::hello::Family;
use encryptd::ipsec::peer::{InSa, OutSa, Peer};
use encryptd::ipsec::plan::{self, DesiredStates};
use encryptd::ipsec::reconcile::{self, Ops};
use encryptd::kernel::xfrm::Xfrm;
use encryptd::net::Cidr;
use encryptd::objects::xfrm::{Action, Algorithm, Direction, XfrmPolicy, XfrmState};
use zeroize::Zeroizing;

const HERE: &str = "ENCRYPTD_BENCH";
const PEERS: &str = "ENCRYPTD_BENCH_PEERS";
const SUBNETS: &str = "ENCRYPTD_BENCH_SUBNETS";
const HTHRESH4: &str = "ENCRYPTD_BENCH_HTHRESH4";
const ME: &str = "bench-0";
const MY_BOOT: BootId = [0xB0; 16];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let n = args
            .get(i + 1)
            .and_then(|s| s.parse().ok())
            .expect("--child N");
        return match child(n) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mesh bench, {n} peers: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if !args.iter().any(|a| a == "--bench") {
        println!("mesh: a benchmark, not a test; run it with `cargo bench --bench mesh`");
        return ExitCode::SUCCESS;
    }
    let here = std::env::var(HERE).is_ok_and(|v| v == "host" || v == "vm")
        || std::env::var_os("ENCRYPTD_VM").is_some();
    if here { parent() } else { boot_vm(&args) }
}

/// Re-run this binary inside the VM with the same arguments. 20,000 SAs with their crypto
/// transforms need more than the default 1 GiB guest.
fn boot_vm(args: &[String]) -> ExitCode {
    common::boot_vm("mesh", args, HERE, &[PEERS, SUBNETS, HTHRESH4], "2048")
}

/// One row of results, as a child prints it (`key=value` on one `RESULT` line).
type Row = BTreeMap<String, String>;

fn parent() -> ExitCode {
    let sizes: Vec<usize> = std::env::var(PEERS)
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let exe = std::env::current_exe().expect("current_exe");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    eprintln!(
        "mesh bench: kernel {}, {cpus} CPUs, sizes {sizes:?}",
        kernel.trim()
    );
    // The first SAs of a boot load esp4, gcm, aes… and run the crypto self-tests: seconds
    // under emulation. A small run first keeps that out of the figures.
    let t0 = Instant::now();
    let warm = Command::new(&exe)
        .args(["--child", "10"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let warmup = format!(
        "warm-up (10 peers: module loads, crypto self-tests): {:.1} s, {}",
        t0.elapsed().as_secs_f64(),
        match warm {
            Ok(s) if s.success() => "ok".to_string(),
            Ok(s) => format!("failed ({s})"),
            Err(e) => format!("failed ({e})"),
        }
    );
    eprintln!("mesh bench: {warmup}");
    let mut rows = Vec::new();
    let mut failed = false;
    for &n in &sizes {
        let t0 = Instant::now();
        let out = Command::new(&exe)
            .args(["--child", &n.to_string()])
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output();
        let wall = t0.elapsed();
        match out {
            Ok(o) if o.status.success() => {
                let text = String::from_utf8_lossy(&o.stdout);
                let row: Option<Row> = text.lines().find_map(|l| {
                    l.strip_prefix("RESULT ").map(|r| {
                        r.split_whitespace()
                            .filter_map(|kv| kv.split_once('='))
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect()
                    })
                });
                match row {
                    Some(mut r) => {
                        r.insert("wall_s".into(), format!("{:.1}", wall.as_secs_f64()));
                        rows.push(r);
                    }
                    None => {
                        eprintln!("mesh bench, {n} peers: no RESULT line in:\n{text}");
                        failed = true;
                    }
                }
            }
            Ok(o) => {
                eprintln!(
                    "mesh bench, {n} peers: failed ({}) after {:.1} s",
                    o.status,
                    wall.as_secs_f64()
                );
                failed = true;
            }
            Err(e) => {
                eprintln!("mesh bench: cannot start {}: {e}", exe.display());
                failed = true;
            }
        }
    }
    print!("{}", table(&rows, kernel.trim(), cpus));
    println!("\n{warmup}");
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn table(rows: &[Row], kernel: &str, cpus: usize) -> String {
    let g = |r: &Row, k: &str| r.get(k).cloned().unwrap_or_else(|| "?".into());
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nmesh bench: kernel {kernel}, {cpus} CPUs; times are wall clock, RSS of the bench process\n"
    );
    s += "| peers | objects (policies + states) | plan | converge (plan + dump + diff + apply) | netlink messages | sendmsg / recv calls | RSS before plan → peak | no-op reconcile: changes / messages / time | ip -batch (same objects) | ip -batch == ours |\n";
    s += "|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|\n";
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} + {} | {} ms | {} ms | {} | {} / {} | {} → {} MiB | {} / {} / {} ms | {} ms | {} |",
            g(r, "peers"),
            g(r, "policies"),
            g(r, "states"),
            g(r, "plan_ms"),
            g(r, "converge_ms"),
            g(r, "messages"),
            g(r, "sendmsg"),
            g(r, "recv"),
            g(r, "rss_base_mib"),
            g(r, "hwm_mib"),
            g(r, "noop_changes"),
            g(r, "noop_messages"),
            g(r, "noop_ms"),
            g(r, "ipbatch_ms"),
            g(r, "ipbatch_same"),
        );
    }
    s += "\nBreakdown (ms):\n\n";
    s += "| peers | plan: policies | plan: states (HKDF) | dump policies | dump states | diff | add policies | add states | no-op: plan | no-op: dumps | no-op: diff | RSS after plan | child wall (s) |\n";
    s += "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} MiB | {} |",
            g(r, "peers"),
            g(r, "plan_policies_ms"),
            g(r, "plan_states_ms"),
            g(r, "dump_policies_ms"),
            g(r, "dump_states_ms"),
            g(r, "diff_ms"),
            g(r, "add_policies_ms"),
            g(r, "add_states_ms"),
            g(r, "noop_plan_ms"),
            g(r, "noop_dump_ms"),
            g(r, "noop_diff_ms"),
            g(r, "rss_plan_mib"),
            g(r, "wall_s"),
        );
    }
    s += "\nNo-op dumps and ip -batch in two parts (ms):\n\n";
    s += "| peers | no-op: dump policies | no-op: dump states | ip -batch: policies only | ip -batch: states only |\n";
    s += "|---:|---:|---:|---:|---:|\n";
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            g(r, "peers"),
            g(r, "noop_dump_policies_ms"),
            g(r, "noop_dump_states_ms"),
            g(r, "ipbatch_policies_ms"),
            g(r, "ipbatch_states_ms"),
        );
    }
    s += "\nThe daemon's Engine on the installed mesh, as after a daemon restart:\n\n";
    s += "| peers | slot_of × states found (adopt's lookups) | Engine::start (adopt + apply) | SA slots held after start (of adopted) | next apply: changes / time | peers_up | reconfigure, same config: changes / time | settled: apply changes / time | idle pass: changes / dumps / keys derived / time | peak RSS |\n";
    s += "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} ms | {} ms | {} of {} | {} / {} ms | {} ms | {} / {} ms | {} / {} ms | {} / {} / {} / {} ms | {} MiB |",
            g(r, "peers"),
            g(r, "slot_of_ms"),
            g(r, "engine_start_ms"),
            g(r, "slots_after_start"),
            g(r, "adopted"),
            g(r, "apply_after_start_changes"),
            g(r, "apply_after_start_ms"),
            g(r, "peers_up_ms"),
            g(r, "reconfigure_changes"),
            g(r, "reconfigure_ms"),
            g(r, "settle_changes"),
            g(r, "settle_ms"),
            g(r, "idle_changes"),
            g(r, "idle_dumps"),
            g(r, "idle_derived"),
            g(r, "idle_ms"),
            g(r, "engine_hwm_mib"),
        );
    }
    s
}

/// Peer `i`'s underlay address: 10.0.0.1 is this node, peers from 10.0.0.2 on.
fn addr(i: usize) -> IpAddr {
    let v = 0x0A00_0001u32 + i as u32;
    IpAddr::V4(Ipv4Addr::from(v))
}

/// The /24 behind node `i` (with `ENCRYPTD_BENCH_SUBNETS=1`): 10.128.0.0/24 onwards.
fn subnet(i: usize) -> Cidr {
    let v = 0x0A80_0000u32 + ((i as u32) << 8);
    Cidr::new(IpAddr::V4(Ipv4Addr::from(v)), 24).expect("/24")
}

fn config(n: usize, subnets: bool) -> Config {
    let nodes = (0..=n)
        .map(|i| Node {
            name: format!("bench-{i}"),
            addresses: vec![addr(i)],
            subnets: if subnets { vec![subnet(i)] } else { vec![] },
            wireguard_public_key: None,
            span: 0..0,
        })
        .collect();
    let text = format!("mode = \"ipsec\"\nnode = \"{ME}\"\n");
    Config {
        settings: settings::parse_str(Path::new("/etc/encryptd/encryptd.toml"), &text)
            .expect("valid settings"),
        inventory: Inventory::new(nodes),
        keys: Some(KeyRing {
            entries: vec![KeyEntry {
                id: 1,
                algorithm: KeyAlg::Gcm {
                    key_bits: 128,
                    icv_bits: 128,
                },
                psk: Zeroizing::new((0..20).map(|b| b * 7 + 3).collect()),
                line: 1,
            }],
        }),
        psk: None,
    }
}

/// Every peer as if the hello exchange had settled: both boot IDs known, one inbound SA
/// (SPI chosen here) and one outbound SA (SPI chosen by the peer) for key-id 1.
fn peers(n: usize) -> BTreeMap<String, Peer> {
    (1..=n)
        .map(|i| {
            let name = format!("bench-{i}");
            let mut boot = [0u8; 16];
            boot[..8].copy_from_slice(&(i as u64).to_be_bytes());
            let mut p = Peer::new(&name, [0x11; 16]);
            p.boot = Some(boot);
            p.inbound.insert(
                (Family::V4, 1),
                InSa {
                    spi: plan::make_spi(i as u32, 1),
                    bound: [0x22; 16],
                    peer_boot: boot,
                    confirmed: true,
                },
            );
            p.outbound.insert(
                (Family::V4, 1),
                OutSa {
                    spi: plan::make_spi(0x0100_0000 + i as u32, 1),
                    peer_boot: boot,
                },
            );
            (name, p)
        })
        .collect()
}

/// (VmRSS, VmHWM) of this process in KiB.
fn rss() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.2}")
    } else {
        format!("{ms:.0}")
    }
}

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace for the run, removed when dropped.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Result<Netns, String> {
        let _ = sh(&["ip", "netns", "del", &name]);
        sh(&["ip", "netns", "add", &name])?;
        let ns = Netns(name);
        // XFRM hashes a policy only when both its prefixes are at least this long
        // (default 32 32: host pairs only); the others go to the inexact lists.
        if let Ok(t) = std::env::var(HTHRESH4) {
            let mut args = vec!["ip", "-n", &ns.0, "xfrm", "policy", "set", "hthresh4"];
            args.extend(t.split_whitespace());
            sh(&args)?;
        }
        Ok(ns)
    }

    /// Run `f` on a thread that has entered this namespace: the netlink sockets it opens
    /// belong to it (setns changes only the calling thread).
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.0);
        std::thread::scope(|s| {
            s.spawn(|| {
                let fd = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                // SAFETY: setns on a valid fd; affects only this thread.
                let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.0]);
    }
}

/// The engine's executor, with the progress lines a long run wants.
fn apply(x: &mut Xfrm, ops: &Ops) -> Result<(Duration, Duration), String> {
    let t = encryptd::ipsec::apply::apply(x, ops).map_err(|e| e.to_string())?;
    if !ops.add_policies.is_empty() {
        eprintln!(
            "    +{} policies in {:.1} s",
            ops.add_policies.len(),
            t.policies.as_secs_f64()
        );
    }
    if !ops.add_states.is_empty() {
        eprintln!(
            "    +{} states in {:.1} s",
            ops.add_states.len(),
            t.states.as_secs_f64()
        );
    }
    Ok((t.policies, t.states))
}

fn child(n: usize) -> Result<(), String> {
    let subnets = std::env::var(SUBNETS).is_ok_and(|v| v == "1");
    let mut r = Row::new();
    let mut put = |k: &str, v: String| {
        r.insert(k.to_string(), v);
    };
    put("peers", n.to_string());
    let cfg = config(n, subnets);
    let peers = peers(n);
    let (rss_base, _) = rss();
    put("rss_base_mib", mib(rss_base));

    let ns = Netns::new(format!("encb-{n}-ours"))?;
    eprintln!(
        "mesh bench, {n} peers: plan, dump, diff, apply in netns {}",
        ns.0
    );
    let (policies, states) = ns.run(|| -> Result<(Vec<XfrmPolicy>, DesiredStates), String> {
        let mut x = Xfrm::open().map_err(|e| e.to_string())?;
        let s0 = x.stats();
        // Converge: what Engine::apply does, phase by phase.
        let t0 = Instant::now();
        let policies = plan::policies(&cfg);
        let t_pp = t0.elapsed();
        let t = Instant::now();
        let states = plan::states(&cfg, &MY_BOOT, &peers);
        let t_ps = t.elapsed();
        let (rss_plan, _) = rss();
        eprintln!(
            "    plan: {} policies, {} states in {:.1} s",
            policies.len(),
            states.len(),
            (t_pp + t_ps).as_secs_f64()
        );
        let t = Instant::now();
        let kp = x.dump_policies().map_err(|e| e.to_string())?;
        let t_dp = t.elapsed();
        let t = Instant::now();
        let ks = x.dump_states().map_err(|e| e.to_string())?;
        let t_ds = t.elapsed();
        let t = Instant::now();
        let ops = reconcile::diff(&policies, &states, &kp, &ks, &Default::default());
        let t_diff = t.elapsed();
        drop((kp, ks));
        let (t_ap, t_as) = apply(&mut x, &ops)?;
        let converge = t0.elapsed();
        let s1 = x.stats();
        eprintln!(
            "mesh bench, {n} peers: converged in {:.1} s (+{} policies, +{} states)",
            converge.as_secs_f64(),
            ops.add_policies.len(),
            ops.add_states.len()
        );
        if ops.add_policies.len() != policies.len() || ops.add_states.len() != states.len() {
            return Err(format!(
                "the first diff should add everything: {} of {} policies, {} of {} states",
                ops.add_policies.len(),
                policies.len(),
                ops.add_states.len(),
                states.len()
            ));
        }
        put("policies", policies.len().to_string());
        put("states", states.len().to_string());
        put("plan_policies_ms", ms(t_pp));
        put("plan_states_ms", ms(t_ps));
        put("plan_ms", ms(t_pp + t_ps));
        put("rss_plan_mib", mib(rss_plan));
        put("dump_policies_ms", ms(t_dp));
        put("dump_states_ms", ms(t_ds));
        put("diff_ms", ms(t_diff));
        put("add_policies_ms", ms(t_ap));
        put("add_states_ms", ms(t_as));
        put("converge_ms", ms(converge));
        put(
            "messages",
            (s1.messages_sent - s0.messages_sent).to_string(),
        );
        put("sendmsg", (s1.send_calls - s0.send_calls).to_string());
        put("recv", (s1.recv_calls - s0.recv_calls).to_string());
        drop(ops);

        // No-op: the same again, as the daemon does on every hello and every 5 s rescan.
        let t0 = Instant::now();
        let policies2 = plan::policies(&cfg);
        let states2 = plan::states(&cfg, &MY_BOOT, &peers);
        let t_plan = t0.elapsed();
        let t = Instant::now();
        let kp = x.dump_policies().map_err(|e| e.to_string())?;
        let t_dp = t.elapsed();
        let t = Instant::now();
        let ks = x.dump_states().map_err(|e| e.to_string())?;
        let t_ds = t.elapsed();
        let t_dump = t_dp + t_ds;
        let t = Instant::now();
        let ops = reconcile::diff(&policies2, &states2, &kp, &ks, &Default::default());
        let t_diff = t.elapsed();
        let (kernel_policies, kernel_states) = (
            kp.iter().filter(|p| p.is_ours()).count(),
            ks.iter().filter(|s| s.is_ours()).count(),
        );
        drop((kp, ks, policies2, states2));
        if !ops.is_empty() {
            apply(&mut x, &ops)?;
        }
        let noop = t0.elapsed();
        let s2 = x.stats();
        if kernel_policies != policies.len() || kernel_states != states.len() {
            return Err(format!(
                "the kernel holds {kernel_policies} policies and {kernel_states} states, \
                 the plan {} and {}",
                policies.len(),
                states.len()
            ));
        }
        put("noop_changes", ops.changes().to_string());
        put(
            "noop_messages",
            (s2.messages_sent - s1.messages_sent).to_string(),
        );
        put("noop_sendmsg", (s2.send_calls - s1.send_calls).to_string());
        put(
            "noop_conflicts",
            (ops.conflicts.len() + ops.missing.len()).to_string(),
        );
        put("noop_ms", ms(noop));
        put("noop_plan_ms", ms(t_plan));
        put("noop_dump_ms", ms(t_dump));
        put("noop_dump_policies_ms", ms(t_dp));
        put("noop_dump_states_ms", ms(t_ds));
        put("noop_diff_ms", ms(t_diff));
        Ok((policies, states))
    })?;
    let (_, hwm) = rss();
    put("hwm_mib", mib(hwm));
    for (k, v) in engine(&ns, cfg)? {
        put(k, v);
    }
    let (_, hwm) = rss();
    put("engine_hwm_mib", mib(hwm));
    drop(ns);

    // The same objects with `ip -batch`, in a fresh namespace.
    let ns = Netns::new(format!("encb-{n}-ip"))?;
    let batch = ip_batch(&policies, &states);
    let path = std::env::temp_dir().join(format!("encb-{n}.batch"));
    std::fs::write(&path, &batch).map_err(|e| format!("{}: {e}", path.display()))?;
    eprintln!(
        "mesh bench, {n} peers: ip -batch of {} lines in netns {}",
        batch.lines().count(),
        ns.0
    );
    let t = Instant::now();
    let res = sh(&["ip", "-n", &ns.0, "-batch", &path.to_string_lossy()]);
    let t_ip = t.elapsed();
    let _ = std::fs::remove_file(&path);
    res?;
    put("ipbatch_ms", ms(t_ip));
    // The same again in two parts, policies then states, in another fresh namespace.
    let ns2 = Netns::new(format!("encb-{n}-ip2"))?;
    let (pol_lines, st_lines) = batch.split_at(batch.find("xfrm state").unwrap_or(batch.len()));
    for (what, lines) in [("policies", pol_lines), ("states", st_lines)] {
        std::fs::write(&path, lines).map_err(|e| format!("{}: {e}", path.display()))?;
        let t = Instant::now();
        let res = sh(&["ip", "-n", &ns2.0, "-batch", &path.to_string_lossy()]);
        let took = t.elapsed();
        let _ = std::fs::remove_file(&path);
        res?;
        put(&format!("ipbatch_{what}_ms"), ms(took));
    }
    drop(ns2);
    // Same objects: encryptd's diff of its plan against what `ip` installed finds nothing.
    let same = ns.run(|| -> Result<String, String> {
        let mut x = Xfrm::open().map_err(|e| e.to_string())?;
        let kp = x.dump_policies().map_err(|e| e.to_string())?;
        let ks = x.dump_states().map_err(|e| e.to_string())?;
        let ops = reconcile::diff(&policies, &states, &kp, &ks, &Default::default());
        let ours = kp.iter().filter(|p| p.is_ours()).count() == policies.len()
            && ks.iter().filter(|s| s.is_ours()).count() == states.len();
        Ok(
            if ops.is_empty() && ops.conflicts.is_empty() && ops.missing.is_empty() && ours {
                "yes".into()
            } else {
                format!(
                    "no:+{}p/~{}p/-{}p/+{}s/~{}s/-{}s/{}conflicts",
                    ops.add_policies.len(),
                    ops.update_policies.len(),
                    ops.delete_policies.len(),
                    ops.add_states.len(),
                    ops.update_states.len(),
                    ops.delete_states.len(),
                    ops.conflicts.len()
                )
            },
        )
    })?;
    put("ipbatch_same", same);
    drop(ns);

    let line: Vec<String> = r.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("RESULT {}", line.join(" "));
    std::io::stdout().flush().map_err(|e| e.to_string())
}

/// The daemon's own `Engine` against the installed mesh, as after a restart of the daemon:
/// `Engine::start` (adopts the kernel's SAs, then applies), `peers_up` (the STATUS= line,
/// and every loop iteration until READY=1), `reconfigure` with the same configuration (a
/// reload), and the apply that follows.
fn engine(ns: &Netns, mut cfg: Config) -> Result<Vec<(&'static str, String)>, String> {
    let n = cfg.inventory.nodes.len() - 1;
    let boot_path = std::env::temp_dir().join(format!("encb-{n}.boot_id"));
    let uuid: String = MY_BOOT.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&boot_path, uuid).map_err(|e| e.to_string())?;
    cfg.settings.boot_id_path = boot_path.clone();
    eprintln!("mesh bench, {n} peers: the daemon's Engine on the installed mesh (restart)");
    let r = ns.run(|| -> Result<_, String> {
        let mut out = Vec::new();
        let mut put = |k, v| out.push((k, v));
        // What `adopt` costs: one `slot_of` per state found in the kernel.
        let mut x = Xfrm::open().map_err(|e| e.to_string())?;
        let ks = x.dump_states().map_err(|e| e.to_string())?;
        let t = Instant::now();
        let found = ks
            .iter()
            .filter(|d| d.is_ours())
            .filter_map(|d| plan::slot_of(&cfg, &d.id()))
            .count();
        put("slot_of_ms", ms(t.elapsed()));
        drop((ks, x));
        let t = Instant::now();
        let mut e = Engine::start(&cfg).map_err(|e| e.to_string())?;
        put("engine_start_ms", ms(t.elapsed()));
        let slots: usize = e
            .peers
            .values()
            .map(|p| p.inbound.len() + p.outbound.len())
            .sum();
        put("adopted", found.to_string());
        put("slots_after_start", slots.to_string());
        let t = Instant::now();
        let (up, total) = e.peers_up(&cfg);
        put("peers_up_ms", ms(t.elapsed()));
        put("peers_up", format!("{up}/{total}"));
        let t = Instant::now();
        let changed = e.apply(&cfg).map_err(|e| e.to_string())?;
        put("apply_after_start_ms", ms(t.elapsed()));
        put("apply_after_start_changes", changed.to_string());
        let t = Instant::now();
        let changed = e.reconfigure(&cfg).map_err(|e| e.to_string())?;
        put("reconfigure_ms", ms(t.elapsed()));
        put("reconfigure_changes", changed.to_string());
        // Settled: every peer's hello state as the exchange would leave it, installed by
        // one apply; then the idle daemon's pass, which the kernel's notifications say
        // needs no read (nothing foreign changed): its dumps and time.
        e.peers = peers(n);
        let t = Instant::now();
        let mut changed = e.apply(&cfg).map_err(|e| e.to_string())?;
        // Its own notifications (ignored, or lost to the full socket buffer: then one
        // more full read, as the daemon would do next).
        if e.on_readable(&cfg) {
            changed += e.apply(&cfg).map_err(|e| e.to_string())?;
        }
        put("settle_ms", ms(t.elapsed()));
        put("settle_changes", changed.to_string());
        let (dumps, derived) = (e.dumps, e.key_cache.derived);
        let t = Instant::now();
        let changed = e.apply(&cfg).map_err(|e| e.to_string())?;
        put("idle_ms", ms(t.elapsed()));
        put("idle_changes", changed.to_string());
        put("idle_dumps", (e.dumps - dumps).to_string());
        put("idle_derived", (e.key_cache.derived - derived).to_string());
        Ok(out)
    });
    let _ = std::fs::remove_file(&boot_path);
    r
}

/// `ip -batch` lines that install exactly `policies` and `states`.
fn ip_batch(policies: &[XfrmPolicy], states: &DesiredStates) -> String {
    let mut s = String::new();
    for p in policies {
        let sel = &p.selector;
        let _ = write!(s, "xfrm policy add src {} dst {}", sel.src, sel.dst);
        if let Some(proto) = sel.proto {
            let icmp = proto == libc::IPPROTO_ICMP as u8 || proto == libc::IPPROTO_ICMPV6 as u8;
            let _ = write!(s, " proto {proto}");
            if let Some(v) = sel.sport {
                let _ = write!(s, " {} {v}", if icmp { "type" } else { "sport" });
            }
            if let Some(v) = sel.dport {
                let _ = write!(s, " {} {v}", if icmp { "code" } else { "dport" });
            }
        }
        let dir = match p.dir {
            Direction::In => "in",
            Direction::Out => "out",
            Direction::Fwd => "fwd",
        };
        let action = match p.action {
            Action::Allow => "allow",
            Action::Block => "block",
        };
        let _ = write!(s, " dir {dir} priority {} action {action}", p.priority);
        if let Some(t) = &p.template {
            let _ = write!(
                s,
                " tmpl src {} dst {} proto esp reqid {} mode {}",
                t.src, t.dst, t.reqid, t.mode
            );
        }
        s.push('\n');
    }
    for st in states.values().flatten() {
        state_line(&mut s, st);
    }
    s
}

fn state_line(s: &mut String, st: &XfrmState) {
    let hex = |k: &[u8]| -> String { k.iter().map(|b| format!("{b:02x}")).collect() };
    let _ = write!(
        s,
        "xfrm state add src {} dst {} proto esp spi 0x{:08x} reqid {} mode {} replay-window {}",
        st.src, st.dst, st.spi, st.reqid, st.mode, st.replay_window
    );
    if st.esn {
        s.push_str(" flag esn");
    }
    match &st.algorithm {
        Algorithm::Aead {
            name,
            key,
            icv_bits,
        } => {
            let _ = write!(s, " aead {name} 0x{} {icv_bits}", hex(key));
        }
        Algorithm::EncAuth {
            enc,
            enc_key,
            auth,
            auth_key,
            trunc_bits,
        } => {
            let _ = write!(
                s,
                " enc {enc} 0x{} auth-trunc {auth} 0x{} {trunc_bits}",
                hex(enc_key),
                hex(auth_key)
            );
        }
        Algorithm::Unsupported(_) => unreachable!("the plan never holds one"),
    }
    // The SA's limits, as `ip xfrm state add ... limit` takes them.
    let l = &st.lifetime;
    for (what, v) in [
        ("time-soft", l.soft_secs),
        ("time-hard", l.hard_secs),
        ("packet-soft", l.soft_packets),
        ("packet-hard", l.hard_packets),
    ] {
        if let Some(v) = v {
            let _ = write!(s, " limit {what} {v}");
        }
    }
    s.push('\n');
}
