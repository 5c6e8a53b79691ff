//! Kernel tests: they need ESP, gcm, WireGuard and nftables, which this project's build
//! machines' own kernel lacks, so this binary boots Debian's stock kernel under qemu
//! (`tests/vm/vmrun.sh`) and runs itself again inside it, where network namespaces are the
//! nodes. Nothing here is skipped: if the VM cannot boot, every case fails.
//!
//! `ENCRYPTD_KERNEL_TESTS=host` runs the cases directly, for a root shell on a kernel that
//! has the modules (a real Debian host, or already inside the VM). Inside a VM started by
//! `tests/vm/vmrun.sh` (which sets `ENCRYPTD_VM`) they also run directly, so the script
//! can be the cargo runner as well.
//!
//! Arguments as with libtest: name filters (substring, or whole with `--exact`), `--skip`,
//! `--list`, `--ignored` (none are). With nothing selected no VM is booted.

mod fleet;
mod rig;

mod daemon;
mod ipsec;
mod ipsec_ops;
mod leaks;
mod nft;
mod strict;
mod wireguard;
mod xfrm;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A kernel test case: its name and the function; `Err` carries what went wrong.
pub type Case = (&'static str, fn() -> Result<(), String>);

const IN_VM: &str = "ENCRYPTD_KERNEL_TESTS";

fn cases() -> Vec<Case> {
    [
        xfrm::CASES,
        nft::CASES,
        daemon::CASES,
        ipsec::CASES,
        ipsec_ops::CASES,
        strict::CASES,
        leaks::CASES,
        wireguard::CASES,
    ]
    .concat()
}

/// What libtest-style arguments ask for (`cargo test -- ARGS`); unknown flags are ignored.
struct Args {
    filters: Vec<String>,
    skip: Vec<String>,
    exact: bool,
    list: bool,
    /// `--ignored`: run only ignored tests, and there are none.
    only_ignored: bool,
}

impl Args {
    fn parse(args: &[String]) -> Args {
        let mut a = Args {
            filters: Vec::new(),
            skip: Vec::new(),
            exact: false,
            list: false,
            only_ignored: false,
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--list" => a.list = true,
                "--exact" => a.exact = true,
                "--ignored" => a.only_ignored = true,
                "--skip" => a.skip.extend(it.next().cloned()),
                // flags with a value: skip the value too
                "--test-threads" | "--format" | "--color" | "--logfile" | "-Z"
                | "--report-time" => {
                    it.next();
                }
                f if f.starts_with('-') => {}
                f => a.filters.push(f.to_string()),
            }
        }
        a
    }

    fn selects(&self, name: &str) -> bool {
        let hit = |f: &String| {
            if self.exact {
                name == f
            } else {
                name.contains(f.as_str())
            }
        };
        !self.only_ignored
            && (self.filters.is_empty() || self.filters.iter().any(hit))
            && !self.skip.iter().any(hit)
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = Args::parse(&args);
    let cases = cases();
    if parsed.list {
        for (name, _) in &cases {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    let selected: Vec<&Case> = cases.iter().filter(|(n, _)| parsed.selects(n)).collect();
    let filtered_out = cases.len() - selected.len();
    // inside the VM (vmrun.sh sets ENCRYPTD_VM), or told to run here
    let here = std::env::var(IN_VM).is_ok_and(|v| v == "host" || v == "vm")
        || std::env::var_os("ENCRYPTD_VM").is_some();
    if here {
        return run_here(&selected, filtered_out);
    }
    if selected.is_empty() {
        // e.g. `cargo test some_unit_test`: no reason to boot a VM
        println!("\nrunning 0 kernel tests\n");
        print_result(0, 0, filtered_out);
        return ExitCode::SUCCESS;
    }
    boot_vm(&args, selected.len(), filtered_out)
}

/// Re-run this binary inside the VM with the same arguments; its output is the result.
fn boot_vm(args: &[String], selected: usize, filtered_out: usize) -> ExitCode {
    let vmrun = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vm/vmrun.sh");
    let exe = std::env::current_exe().expect("current_exe");
    let _ = std::io::stdout().flush();
    let status = Command::new(vmrun)
        .arg(&exe)
        .args(args)
        .env(IN_VM, "vm")
        .env("VM_ENV", format!("{IN_VM} ENCRYPTD_BIN"))
        .env("ENCRYPTD_BIN", env!("CARGO_BIN_EXE_encryptd"))
        // The whole suite in one boot: about 10 min on 2 idle cores, and TCG slows
        // down a lot on a busy host; vmrun.sh's 900 s default cut a run on a host at
        // load 6 short. The run's own limit is CI's.
        .env(
            "VM_TIMEOUT",
            std::env::var("VM_TIMEOUT").unwrap_or_else(|_| "1800".into()),
        )
        .status();
    match status {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        // 1: this binary ran in the VM and reported its failures itself
        Ok(s) if s.code() == Some(1) => {
            eprintln!("kernel tests in the VM failed ({s})");
            ExitCode::FAILURE
        }
        // 125: the VM itself failed (no boot, panic, host timeout), vmrun.sh said why;
        // anything else: the run was cut short (e.g. 143, the guest watchdog's SIGTERM)
        Ok(s) => {
            let why = if s.code() == Some(125) {
                "the VM failed (see above)".to_string()
            } else {
                format!("the run in the VM did not finish ({s})")
            };
            eprintln!("kernel tests: {why}");
            println!("\nkernel tests: {why}; counting all {selected} selected cases as failed");
            print_result(0, selected, filtered_out);
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("kernel tests: cannot start {vmrun}: {e}");
            print_result(0, selected, filtered_out);
            ExitCode::FAILURE
        }
    }
}

fn print_result(passed: usize, failed: usize, filtered_out: usize) {
    let verdict = if failed == 0 { "ok" } else { "FAILED" };
    println!(
        "test result: {verdict}. {passed} passed; {failed} failed; 0 ignored; 0 measured; {filtered_out} filtered out\n"
    );
}

fn run_here(selected: &[&Case], filtered_out: usize) -> ExitCode {
    println!("\nrunning {} kernel tests", selected.len());
    // A test daemon's notifications queue on the harness's socket until a case reads
    // them; the default queue of 10 fills up in a long case. (The daemon drops a
    // notification that finds no room within 1 s; a case would then miss it.)
    if let Err(e) = std::fs::write("/proc/sys/net/unix/max_dgram_qlen", "4096\n") {
        println!("cannot raise net.unix.max_dgram_qlen: {e}");
        return ExitCode::FAILURE;
    }
    let (mut passed, mut failed) = (0, Vec::new());
    for (name, f) in selected {
        // The name first: if a case hangs, the output says which one. What the case (or a
        // process it starts) prints comes on the lines below, and then the whole result
        // line again, so that every case ends in a complete `test NAME ... ok` line.
        print!("test {name} ... ");
        let capture = Capture::start();
        let t0 = Instant::now();
        let r = std::panic::catch_unwind(f).unwrap_or_else(|p| {
            Err(p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panicked".into()))
        });
        let secs = t0.elapsed().as_secs_f64();
        if capture.map(Capture::stop).unwrap_or(false) {
            print!("test {name} ... ");
        }
        match r {
            Ok(()) => {
                passed += 1;
                println!("ok ({secs:.1}s)");
            }
            Err(e) => {
                println!("FAILED ({secs:.1}s)\n    {}", e.replace('\n', "\n    "));
                failed.push(*name);
            }
        }
    }
    if !failed.is_empty() {
        println!("\nfailures:");
        for n in &failed {
            println!("    {n}");
        }
    }
    println!();
    print_result(passed, failed.len(), filtered_out);
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Fds 1 and 2 redirected into a pipe for the duration of one case; a thread copies what
/// comes through to the real stdout, starting on a new line.
struct Capture {
    saved_out: OwnedFd,
    saved_err: OwnedFd,
    done: mpsc::Receiver<()>,
    wrote: Arc<AtomicBool>,
}

impl Capture {
    /// `None` (no capture, output goes straight through) if the fds cannot be set up.
    fn start() -> Option<Capture> {
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        let mut p = [0; 2];
        // SAFETY: plain fd syscalls on fds this function owns or on 1 and 2; every result
        // is checked, and the fds are wrapped in OwnedFd right away.
        unsafe {
            if libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
                return None;
            }
            let (r, w) = (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1]));
            let out = libc::fcntl(1, libc::F_DUPFD_CLOEXEC, 3);
            let err = libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3);
            if out < 0 || err < 0 {
                return None;
            }
            let (saved_out, saved_err) = (OwnedFd::from_raw_fd(out), OwnedFd::from_raw_fd(err));
            let mut sink = File::from(saved_out.try_clone().ok()?);
            if libc::dup2(w.as_raw_fd(), 1) < 0 || libc::dup2(w.as_raw_fd(), 2) < 0 {
                libc::dup2(saved_out.as_raw_fd(), 1);
                libc::dup2(saved_err.as_raw_fd(), 2);
                return None;
            }
            drop(w);
            let wrote = Arc::new(AtomicBool::new(false));
            let (tx, done) = mpsc::channel();
            let flag = wrote.clone();
            std::thread::spawn(move || {
                let mut r = File::from(r);
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = r.read(&mut buf) {
                    if !flag.swap(true, Ordering::SeqCst) {
                        let _ = sink.write_all(b"\n");
                    }
                    let _ = sink.write_all(&buf[..n]);
                }
                let _ = tx.send(());
            });
            Some(Capture {
                saved_out,
                saved_err,
                done,
                wrote,
            })
        }
    }

    /// Put fds 1 and 2 back; whether anything was printed meanwhile.
    fn stop(self) -> bool {
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        // SAFETY: dup2 of fds this struct owns back onto 1 and 2.
        unsafe {
            libc::dup2(self.saved_out.as_raw_fd(), 1);
            libc::dup2(self.saved_err.as_raw_fd(), 2);
        }
        // a process the case left running may hold the pipe open: do not wait for it long
        let _ = self.done.recv_timeout(Duration::from_secs(2));
        self.wrote.load(Ordering::SeqCst)
    }
}
