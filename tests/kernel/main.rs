//! Kernel tests: they need ESP, gcm, WireGuard and nftables, which this project's build
//! machines' own kernel lacks, so this binary boots Debian's stock kernel under qemu
//! (`tests/vm/vmrun.sh`) and runs itself again inside it, where network namespaces are the
//! nodes. Nothing here is skipped: if the VM cannot boot, every case fails.
//!
//! `ENCRYPTD_KERNEL_TESTS=host` runs the cases directly, for a root shell on a kernel that
//! has the modules (a real Debian host, or already inside the VM).

mod fleet;
mod rig;

mod daemon;
mod ipsec;
mod nft;
mod xfrm;

use std::process::{Command, ExitCode};
use std::time::Instant;

/// A kernel test case: its name and the function; `Err` carries what went wrong.
pub type Case = (&'static str, fn() -> Result<(), String>);

const IN_VM: &str = "ENCRYPTD_KERNEL_TESTS";

fn cases() -> Vec<Case> {
    [xfrm::CASES, nft::CASES, daemon::CASES, ipsec::CASES].concat()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cases = cases();
    if args.iter().any(|a| a == "--list") {
        for (name, _) in &cases {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let selected: Vec<&Case> = cases
        .iter()
        .filter(|(n, _)| filters.is_empty() || filters.iter().any(|f| n.contains(f.as_str())))
        .collect();
    if std::env::var(IN_VM).is_ok_and(|v| v == "host" || v == "vm") {
        return run_here(&selected, cases.len() - selected.len());
    }
    boot_vm(&args)
}

/// Re-run this binary inside the VM with the same arguments; its output is the result.
fn boot_vm(args: &[String]) -> ExitCode {
    let vmrun = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vm/vmrun.sh");
    let exe = std::env::current_exe().expect("current_exe");
    let status = Command::new(vmrun)
        .arg(&exe)
        .args(args)
        .env(IN_VM, "vm")
        .env("VM_ENV", format!("{IN_VM} ENCRYPTD_BIN"))
        .env("ENCRYPTD_BIN", env!("CARGO_BIN_EXE_encryptd"))
        .status();
    match status {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => {
            eprintln!("kernel tests in the VM failed ({s})");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("cannot start {vmrun}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_here(selected: &[&Case], filtered_out: usize) -> ExitCode {
    println!("\nrunning {} kernel tests", selected.len());
    let (mut passed, mut failed) = (0, Vec::new());
    for (name, f) in selected {
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
                println!("test {name} ... ok ({secs:.1}s)");
            }
            Err(e) => {
                println!(
                    "test {name} ... FAILED ({secs:.1}s)\n    {}",
                    e.replace('\n', "\n    ")
                );
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
    let verdict = if failed.is_empty() { "ok" } else { "FAILED" };
    println!(
        "\ntest result: {verdict}. {passed} passed; {} failed; 0 ignored; 0 measured; {filtered_out} filtered out\n",
        failed.len()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
