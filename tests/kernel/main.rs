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

mod rig;

mod daemon;
mod nft;
mod xfrm;

use std::io::Write;
use std::process::{Command, ExitCode};
use std::time::Instant;

/// A kernel test case: its name and the function; `Err` carries what went wrong.
pub type Case = (&'static str, fn() -> Result<(), String>);

const IN_VM: &str = "ENCRYPTD_KERNEL_TESTS";

fn cases() -> Vec<Case> {
    [xfrm::CASES, nft::CASES, daemon::CASES].concat()
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
        .status();
    match status {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        // 125: the VM itself failed (no boot, panic, timeout); vmrun.sh said why on stderr
        Ok(s) if s.code() == Some(125) => {
            eprintln!(
                "kernel tests: the VM did not complete the run ({vmrun} exit 125, see above)"
            );
            println!(
                "\nkernel tests: the VM failed; counting all {selected} selected cases as failed"
            );
            print_result(0, selected, filtered_out);
            ExitCode::FAILURE
        }
        Ok(s) => {
            eprintln!("kernel tests in the VM failed ({s})");
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
    let (mut passed, mut failed) = (0, Vec::new());
    for (name, f) in selected {
        // the name first: if a case hangs, the output says which one
        print!("test {name} ... ");
        let _ = std::io::stdout().flush();
        let t0 = Instant::now();
        let r = std::panic::catch_unwind(f).unwrap_or_else(|p| {
            Err(p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panicked".into()))
        });
        let secs = t0.elapsed().as_secs_f64();
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
