//! Running the cases inside the VM: each case in a process of its own, under a deadline.
//!
//! A case that blocks (an `accept` nobody answers, a daemon that never logs what it waits
//! for) must become one failure with diagnostics, never a stuck run that takes the cases
//! that passed with it. So the harness re-runs this binary for one case at a time
//! ([`CASE`] names it), in its own process group, and waits for it with a deadline. Past
//! the deadline it records what was going on (processes and where each thread waits,
//! the daemons' logs, the kernel objects of every namespace, the last captured packets),
//! kills the group, and goes on. After every case, passed or not, it puts the VM back as
//! it was before: processes the case started (wireguard-go puts itself in the
//! background, out of the group), namespaces it made, the modprobe helper, modules it
//! unloaded.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use crate::Case;

/// Set in the process that runs one case: the case's name.
pub const CASE: &str = "ENCRYPTD_KERNEL_CASE";
/// Set with [`CASE`]: the file the case writes its verdict into (`ok`, or the error).
const RESULT: &str = "ENCRYPTD_KERNEL_RESULT";
/// The per-case deadline in seconds (default [`DEFAULT_DEADLINE`]).
pub const DEADLINE_VAR: &str = "KERNEL_CASE_TIMEOUT";
/// Run every selected case this many times (a flake hunt: `KERNEL_CASE_REPEAT=20
/// cargo test --test kernel -- NAME`).
pub const REPEAT_VAR: &str = "KERNEL_CASE_REPEAT";
const DEFAULT_DEADLINE: u64 = 180;

/// In the process started for one case: run it, write the verdict, exit 0 or 1.
pub fn run_one(cases: &[Case], name: &str) -> ExitCode {
    let Some((_, f)) = cases.iter().find(|(n, _)| *n == name) else {
        eprintln!("no kernel case named {name}");
        return ExitCode::from(2);
    };
    let r = std::panic::catch_unwind(f).unwrap_or_else(|p| {
        Err(p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".into()))
    });
    let _ = std::io::stdout().flush();
    let verdict = match &r {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("error\n{e}"),
    };
    if let Some(path) = std::env::var_os(RESULT) {
        let _ = std::fs::write(path, verdict);
    }
    if r.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

enum Verdict {
    Passed,
    Failed(String),
    TimedOut(String),
}

/// In the VM: every selected case in its own process, one after the other.
pub fn run_all(selected: &[&Case], filtered_out: usize) -> ExitCode {
    let repeat: usize = std::env::var(REPEAT_VAR)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(1);
    let count = selected.len() * repeat;
    println!("\nrunning {count} kernel tests");
    // What they run on: the cases' results hold for this kernel build.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let version = std::fs::read_to_string("/proc/sys/kernel/version").unwrap_or_default();
    println!("kernel {} {}", release.trim(), version.trim());
    // A test daemon's notifications queue on the harness's socket until a case reads
    // them; the default queue of 10 fills up in a long case. (The daemon drops a
    // notification that finds no room within 1 s; a case would then miss it.)
    // (Put back at the end: on a host the setting outlives the run.)
    const QLEN: &str = "/proc/sys/net/unix/max_dgram_qlen";
    let qlen = std::fs::read_to_string(QLEN).unwrap_or_else(|_| "10\n".into());
    if let Err(e) = std::fs::write(QLEN, "4096\n") {
        println!("cannot raise net.unix.max_dgram_qlen: {e}");
        return ExitCode::FAILURE;
    }
    let deadline = match std::env::var(DEADLINE_VAR) {
        Ok(v) => match v.parse::<u64>() {
            Ok(s) if s > 0 => Duration::from_secs(s),
            _ => {
                println!("{DEADLINE_VAR}={v}: not a number of seconds");
                return ExitCode::FAILURE;
            }
        },
        Err(_) => Duration::from_secs(DEFAULT_DEADLINE),
    };
    // Processes that put themselves in the background (wireguard-go) become the
    // harness's children instead of init's: so everything a case started can be found,
    // and nothing else is touched (on a host, other programs run beside the tests).
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let before = Baseline::take();
    let mut results: Vec<(&str, f64, &str)> = Vec::new();
    let mut failed = Vec::new();
    let runs = selected.iter().flat_map(|c| std::iter::repeat_n(c, repeat));
    for (name, _) in runs {
        // The name first: if a case hangs, the output says which one. What the case (or a
        // process it starts) prints comes on the lines below, and then the whole result
        // line again, so that every case ends in a complete `test NAME ... ok` line.
        print!("test {name} ... ");
        let _ = std::io::stdout().flush();
        let t0 = Instant::now();
        let (verdict, printed, restored) = run_child(name, deadline, &before);
        let secs = t0.elapsed().as_secs_f64();
        if printed {
            print!("test {name} ... ");
        }
        let word = match verdict {
            Verdict::Passed => {
                println!("ok ({secs:.1}s)");
                "ok"
            }
            Verdict::Failed(e) => {
                println!("FAILED ({secs:.1}s)\n    {}", e.replace('\n', "\n    "));
                failed.push(*name);
                "FAILED"
            }
            Verdict::TimedOut(diag) => {
                println!(
                    "FAILED ({secs:.1}s): past its deadline of {} s ({DEADLINE_VAR}); killed\n    {}",
                    deadline.as_secs(),
                    diag.replace('\n', "\n    ")
                );
                failed.push(*name);
                "TIMEOUT"
            }
        };
        if !restored.is_empty() {
            println!("    after {name}: {}", restored.join("; "));
        }
        results.push((name, secs, word));
    }
    if !failed.is_empty() {
        println!("\nfailures:");
        for n in &failed {
            println!("    {n}");
        }
    }
    let _ = std::fs::write(QLEN, qlen);
    print_times(&mut results);
    println!();
    crate::print_result(count - failed.len(), failed.len(), filtered_out);
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The cost of every case, slowest first, so that it stays visible.
fn print_times(results: &mut [(&str, f64, &str)]) {
    results.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = results.iter().map(|r| r.1).sum();
    println!("\nkernel case times, slowest first (total {total:.0} s):");
    for (name, secs, word) in results.iter() {
        println!("    {secs:7.1} s  {word:<7}  {name}");
    }
}

/// Run case `name` in a child process under `deadline`, then put the VM back as
/// `before`; the verdict, whether the case printed anything (its output goes through,
/// on the lines under the case's name), and what had to be undone.
fn run_child(name: &str, deadline: Duration, before: &Baseline) -> (Verdict, bool, Vec<String>) {
    let result = std::env::temp_dir().join(format!("encryptd-case-{}.result", std::process::id()));
    let _ = std::fs::remove_file(&result);
    let Some((reader, writer)) = pipe() else {
        return (
            Verdict::Failed("cannot make a pipe".into()),
            false,
            Vec::new(),
        );
    };
    let (out, err) = match (writer.try_clone(), writer.try_clone()) {
        (Ok(a), Ok(b)) => (a, b),
        _ => {
            return (
                Verdict::Failed("cannot dup the pipe".into()),
                false,
                Vec::new(),
            );
        }
    };
    drop(writer);
    let started = Clock::now();
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            return (
                Verdict::Failed(format!("current_exe: {e}")),
                false,
                Vec::new(),
            );
        }
    };
    let child = Command::new(exe)
        .env(CASE, name)
        .env(RESULT, &result)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        // its own group: a deadline kills the case and everything it started at once
        .process_group(0)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            return (
                Verdict::Failed(format!("cannot start the case: {e}")),
                false,
                Vec::new(),
            );
        }
    };
    let (done_tx, done) = mpsc::channel();
    let forward = std::thread::spawn(move || {
        let mut r = File::from(reader);
        let mut buf = [0u8; 4096];
        let mut wrote = false;
        let mut stdout = std::io::stdout();
        while let Ok(n @ 1..) = r.read(&mut buf) {
            if !wrote {
                wrote = true;
                let _ = stdout.write_all(b"\n");
            }
            let _ = stdout.write_all(&buf[..n]);
            let _ = stdout.flush();
        }
        let _ = done_tx.send(wrote);
    });
    let t0 = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if t0.elapsed() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => break None,
        }
    };
    let verdict = match status {
        Some(st) => {
            // the case's own process has ended: whatever it left running goes too
            kill_group(child.id());
            match std::fs::read_to_string(&result) {
                Ok(v) if v == "ok" && st.success() => Verdict::Passed,
                Ok(v) => Verdict::Failed(v.strip_prefix("error\n").unwrap_or(&v).to_string()),
                Err(_) => {
                    Verdict::Failed(format!("the case's process ended ({st}) without a verdict"))
                }
            }
        }
        None => {
            let diag = diagnostics(&started);
            kill_group(child.id());
            let _ = child.wait();
            Verdict::TimedOut(diag)
        }
    };
    let _ = std::fs::remove_file(&result);
    // Processes that left the group (a daemonized wireguard-go) may still hold the pipe:
    // they go now, and then the forwarder sees the end of the output.
    let restored = before.restore();
    let printed = done.recv_timeout(Duration::from_secs(2)).unwrap_or(true);
    if !printed {
        let _ = forward.join();
    }
    (verdict, printed, restored)
}

fn kill_group(pgid: u32) {
    // SAFETY: kill(2) of a process group this harness created.
    unsafe { libc::kill(-(pgid as i32), libc::SIGKILL) };
}

fn pipe() -> Option<(OwnedFd, OwnedFd)> {
    let mut p = [0; 2];
    // SAFETY: pipe2 fills two fds that nothing else owns; both are wrapped at once.
    unsafe {
        if libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return None;
        }
        Some((OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])))
    }
}

/// When the case started, as the file system's modification times see it.
struct Clock {
    wall: SystemTime,
}

impl Clock {
    fn now() -> Clock {
        Clock {
            wall: SystemTime::now(),
        }
    }
}

/// A process as /proc shows it.
struct Proc {
    pid: u32,
    ppid: u32,
    state: String,
    args: String,
}

fn processes() -> Vec<Proc> {
    let mut v = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return v;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // fields after the parenthesised command name, which may hold spaces
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let args = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| {
                String::from_utf8_lossy(&b)
                    .split('\0')
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        if args.is_empty() || f.len() < 2 {
            continue; // a kernel thread, or gone
        }
        v.push(Proc {
            pid,
            ppid: f[1].parse().unwrap_or(0),
            state: f[0].to_string(),
            args,
        });
    }
    v
}

/// The processes below this one (a subreaper: orphans of its cases are its children).
fn descendants() -> Vec<Proc> {
    let all = processes();
    let mut mine = BTreeSet::from([std::process::id()]);
    // parents before children is not guaranteed by pid order: repeat until stable
    loop {
        let before = mine.len();
        for p in &all {
            if mine.contains(&p.ppid) {
                mine.insert(p.pid);
            }
        }
        if mine.len() == before {
            break;
        }
    }
    all.into_iter()
        .filter(|p| p.pid != std::process::id() && mine.contains(&p.pid))
        .collect()
}

/// Collect the exit status of every child that has ended (orphans adopted as the
/// subreaper included), waiting up to `limit` for the killed ones to end.
fn reap(limit: Duration) {
    let t0 = Instant::now();
    loop {
        // SAFETY: waitpid with a null status pointer; no Child of this process is
        // outstanding while the harness restores (the case and its helpers were waited).
        let pid = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        if pid > 0 {
            continue;
        }
        if pid < 0 || descendants().is_empty() || t0.elapsed() > limit {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a case that ran past its deadline was doing, from the files and the kernel.
fn diagnostics(since: &Clock) -> String {
    let mut d = String::from("processes the case started, and where each thread waits:\n");
    for p in descendants() {
        let waits: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", p.pid))
            .into_iter()
            .flatten()
            .flatten()
            .map(|t| std::fs::read_to_string(t.path().join("wchan")).unwrap_or_else(|_| "?".into()))
            .collect();
        d += &format!(
            "  {} (parent {}, {}) waits in [{}]: {}\n",
            p.pid,
            p.ppid,
            p.state,
            waits.join(", "),
            p.args
        );
    }
    let tmp = std::env::temp_dir();
    for log in recent_files(&tmp, since, |p| p.ends_with("daemon.log"), 2) {
        d += &format!("{}, last lines:\n{}", log.display(), tail(&log, 25));
    }
    for cap in recent_files(
        &tmp,
        since,
        |p| p.extension().is_some_and(|e| e == "cap"),
        0,
    ) {
        d += &format!("capture {}, last lines:\n{}", cap.display(), tail(&cap, 10));
    }
    let script = "for ns in $(ip netns list | cut -d' ' -f1); do echo \"namespace $ns:\"; \
        ip -n $ns xfrm state count; ip -n $ns xfrm policy count; \
        ip netns exec $ns wg show all latest-handshakes 2>/dev/null | sed 's/^/  wg /'; \
        ip -n $ns -br link | sed 's/^/  /'; done";
    match crate::rig::sh_within(script, Duration::from_secs(30)) {
        Ok(s) => d += &s,
        Err(e) => d += &format!("kernel objects: {e}\n"),
    }
    d
}

/// Files under `dir` (down to `depth` more levels) changed since `since` and matching.
fn recent_files(
    dir: &Path,
    since: &Clock,
    want: impl Fn(&Path) -> bool + Copy,
    depth: usize,
) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        let Ok(md) = e.metadata() else { continue };
        if md.is_dir() && depth > 0 {
            v.extend(recent_files(&p, since, want, depth - 1));
        } else if md.is_file() && want(&p) && md.modified().is_ok_and(|m| m >= since.wall) {
            v.push(p);
        }
    }
    v.sort();
    v
}

fn tail(path: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    let from = lines.len().saturating_sub(n);
    lines[from..].iter().map(|l| format!("  {l}\n")).collect()
}

/// What the VM looked like before the first case.
struct Baseline {
    netns: BTreeSet<String>,
    modprobe: String,
    modules: BTreeSet<String>,
}

impl Baseline {
    fn take() -> Baseline {
        Baseline {
            netns: netns(),
            modprobe: std::fs::read_to_string("/proc/sys/kernel/modprobe").unwrap_or_default(),
            modules: modules(),
        }
    }

    /// Undo what the last case left behind; what had to be undone.
    fn restore(&self) -> Vec<String> {
        let mut did = Vec::new();
        let left = descendants();
        if !left.is_empty() {
            for p in &left {
                // SAFETY: kill(2) of a process this harness started (directly or not).
                unsafe { libc::kill(p.pid as i32, libc::SIGKILL) };
            }
            reap(Duration::from_secs(5));
            did.push(format!(
                "killed processes it left running: {}",
                left.iter()
                    .map(|p| format!("{} ({})", p.pid, p.args))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let extra: Vec<String> = netns().difference(&self.netns).cloned().collect();
        if !extra.is_empty() {
            let dels: String = extra.iter().map(|n| format!("netns del {n}\n")).collect();
            let _ = crate::rig::sh_within(
                &format!("ip -force -batch - <<'EOF'\n{dels}EOF"),
                Duration::from_secs(30),
            );
            did.push(format!("deleted namespaces it left: {}", extra.join(" ")));
        }
        let modprobe = std::fs::read_to_string("/proc/sys/kernel/modprobe").unwrap_or_default();
        if modprobe != self.modprobe {
            let _ = std::fs::write("/proc/sys/kernel/modprobe", &self.modprobe);
            did.push(format!(
                "put back kernel.modprobe (was {})",
                modprobe.trim()
            ));
        }
        let gone: Vec<String> = self.modules.difference(&modules()).cloned().collect();
        if !gone.is_empty() {
            // with the kernel's helper (in the VM it knows where the modules are)
            let r = crate::rig::sh_within(
                &format!("{} -a {}", self.modprobe.trim(), gone.join(" ")),
                Duration::from_secs(30),
            );
            did.push(match r {
                Ok(_) => format!("loaded the modules it unloaded: {}", gone.join(" ")),
                Err(e) => format!("cannot load the modules it unloaded: {e}"),
            });
        }
        did
    }
}

fn netns() -> BTreeSet<String> {
    std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

fn modules() -> BTreeSet<String> {
    std::fs::read_to_string("/proc/modules")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// The harness's own case: a case that blocks for good fails at its deadline with
/// diagnostics, what it left behind is cleaned up, the next case runs, and the closing
/// line counts both.
pub const CASES: &[Case] = &[("harness_deadline", harness_deadline)];

/// Selected only when [`SELFTEST`] is set, by [`harness_deadline`]'s inner run.
pub const SELFTEST: &str = "ENCRYPTD_KERNEL_SELFTEST";
pub const SELFTEST_CASES: &[Case] = &[
    ("selftest_hangs", selftest_hangs),
    ("selftest_passes", || Ok(())),
];

/// Blocks in `accept` on a socket nobody connects to, after leaving a namespace, a
/// process in its group and one that left the group (as wireguard-go does).
fn selftest_hangs() -> Result<(), String> {
    let t = crate::rig::Topo::new("hang", 1)?;
    let _child = t.exec_bg(0, "sleep 1001")?;
    // `sh` kills its process group once the command ends: return only once the sleep is
    // in a session of its own (its sid is its pid), or the kill may catch setsid's child
    // before it left the group (it did once, in CI).
    crate::rig::sh(
        "setsid -f sleep 1002 </dev/null >/dev/null 2>&1; for i in $(seq 200); do \
         p=$(pgrep -f '^sleep 1002$') && [ \"$(ps -o sid= -p $p | tr -d ' ')\" = \"$p\" ] && exit 0; \
         sleep 0.05; done; exit 1",
    )?;
    crate::rig::in_netns(t.ns(0), || {
        let l = std::net::TcpListener::bind("10.77.0.1:7").map_err(|e| e.to_string())?;
        let _ = l.accept(); // forever: nobody connects
        Err("accept returned".to_string())
    })
}

fn harness_deadline() -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    cmd.arg("selftest_")
        .env(SELFTEST, "1")
        .env(DEADLINE_VAR, "4")
        // A flake hunt of this case repeats this case, not the inner run's.
        .env_remove(REPEAT_VAR)
        .env_remove(CASE)
        .env_remove(RESULT);
    let (status, out, err) = crate::rig::run_within(&mut cmd, Duration::from_secs(60))
        .map_err(|e| format!("running the harness: {e}"))?;
    let all = format!("{out}{err}");
    let want = [
        "test selftest_hangs ... FAILED",
        "past its deadline of 4 s",
        // the thread blocked in accept(2), seen from /proc
        "inet_csk_accept",
        "sleep 1001",
        "killed processes it left running",
        "sleep 1002",
        "deleted namespaces it left: hang-n0 hang-sw",
        "test selftest_passes ... ok",
        "test result: FAILED. 1 passed; 1 failed;",
    ];
    let missing: Vec<&str> = want.iter().copied().filter(|w| !all.contains(w)).collect();
    crate::rig::ensure(
        missing.is_empty() && status.and_then(|s| s.code()) == Some(1),
        format!("exit {status:?}, missing {missing:?} in the harness output:\n{all}"),
    )?;
    let left = crate::rig::sh("pgrep -f 'sleep 100[12]' || true")?;
    let ns = crate::rig::sh("ip netns list")?;
    crate::rig::ensure(
        left.trim().is_empty() && !ns.contains("hang-"),
        format!("left behind: processes {left:?}, namespaces {ns:?}"),
    )?;
    println!(
        "    a case blocked in accept failed at its 4 s deadline with diagnostics; the next case ran"
    );
    Ok(())
}
