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

#[path = "../common/mod.rs"]
mod common;
mod fleet;
mod rig;
mod supervise;

mod daemon;
mod doors;
mod flush;
mod ipsec;
mod ipsec_ops;
mod leaks;
mod nft;
mod strict;
mod subnets;
mod sync;
mod wireguard;
mod xfrm;

use std::io::{BufRead, Write};
use std::process::{Command, ExitCode, Stdio};

/// A kernel test case: its name and the function; `Err` carries what went wrong.
pub type Case = (&'static str, fn() -> Result<(), String>);

const IN_VM: &str = "ENCRYPTD_KERNEL_TESTS";

fn cases() -> Vec<Case> {
    if std::env::var_os(supervise::SELFTEST).is_some() {
        return supervise::SELFTEST_CASES.to_vec();
    }
    [
        supervise::CASES,
        xfrm::CASES,
        nft::CASES,
        daemon::CASES,
        ipsec::CASES,
        ipsec_ops::CASES,
        strict::CASES,
        doors::CASES,
        flush::CASES,
        subnets::CASES,
        leaks::CASES,
        wireguard::CASES,
        sync::CASES,
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
    if let Ok(name) = std::env::var(supervise::CASE) {
        return supervise::run_one(&cases, &name);
    }
    if here {
        return supervise::run_all(&selected, filtered_out);
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
/// The output goes through line by line and the verdict lines are counted, so that if the
/// VM itself fails (no boot, panic, its time limit) the cases that had passed still count
/// as passed, and only the rest as failed.
fn boot_vm(args: &[String], selected: usize, filtered_out: usize) -> ExitCode {
    let vmrun = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vm/vmrun.sh");
    let exe = std::env::current_exe().expect("current_exe");
    let _ = std::io::stdout().flush();
    let child = Command::new(vmrun)
        .arg(&exe)
        .args(args)
        .env(IN_VM, "vm")
        .env(
            "VM_ENV",
            format!(
                "{IN_VM} ENCRYPTD_BIN {} {}",
                supervise::DEADLINE_VAR,
                supervise::REPEAT_VAR
            ),
        )
        .env("ENCRYPTD_BIN", env!("CARGO_BIN_EXE_encryptd"))
        // Every case has its own deadline inside; this bounds the boot and the whole
        // run (the suite takes about 10 min on 2 idle cores, TCG slows down a lot on a
        // busy host).
        .env(
            "VM_TIMEOUT",
            std::env::var("VM_TIMEOUT").unwrap_or_else(|_| "2400".into()),
        )
        .stdout(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kernel tests: cannot start {vmrun}: {e}");
            print_result(0, selected, filtered_out);
            return ExitCode::FAILURE;
        }
    };
    let mut passed = 0;
    if let Some(out) = child.stdout.take() {
        let mut out = std::io::BufReader::new(out);
        let mut line = Vec::new();
        let mut stdout = std::io::stdout();
        // byte-wise to the line end: `test NAME ... ` comes before the case's output
        while let Ok(n @ 1..) = out.read_until(b'\n', &mut line) {
            let _ = stdout.write_all(&line[..n]);
            let _ = stdout.flush();
            let l = String::from_utf8_lossy(&line);
            if l.starts_with("test ") && l.contains(" ... ok (") {
                passed += 1;
            }
            line.clear();
        }
    }
    let status = child.wait();
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
            let failed = selected.saturating_sub(passed);
            eprintln!("kernel tests: {why}");
            println!(
                "\nkernel tests: {why}; {passed} case(s) had passed, counting the other {failed} as failed"
            );
            print_result(passed, failed, filtered_out);
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("kernel tests: waiting for {vmrun}: {e}");
            print_result(passed, selected.saturating_sub(passed), filtered_out);
            ExitCode::FAILURE
        }
    }
}

pub fn print_result(passed: usize, failed: usize, filtered_out: usize) {
    let verdict = if failed == 0 { "ok" } else { "FAILED" };
    println!(
        "test result: {verdict}. {passed} passed; {failed} failed; 0 ignored; 0 measured; {filtered_out} filtered out\n"
    );
}
