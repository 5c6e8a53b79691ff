//! What the benches that need the project's VM share: re-running themselves inside it.

use std::process::{Command, ExitCode};

/// Re-run this bench binary inside the VM (`tests/vm/vmrun.sh`) with the same arguments,
/// `here` set to "vm" and the variables of `pass` passed in; `mem` MiB unless `VM_MEM`
/// says otherwise. The host's load average before and after goes to stderr: the VM is
/// CPU-bound, and other VMs or compiles on the host slow it down (up to twice).
pub fn boot_vm(bench: &str, args: &[String], here: &str, pass: &[&str], mem: &str) -> ExitCode {
    let vmrun = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vm/vmrun.sh");
    let exe = std::env::current_exe().expect("current_exe");
    eprintln!("{bench} bench: booting the kernel VM ({vmrun})");
    let mut cmd = Command::new(vmrun);
    cmd.arg(&exe).args(args).env(here, "vm").env(
        "VM_ENV",
        [here]
            .iter()
            .chain(pass)
            .copied()
            .collect::<Vec<_>>()
            .join(" "),
    );
    if std::env::var_os("VM_MEM").is_none() {
        cmd.env("VM_MEM", mem);
    }
    let load = || {
        std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    let before = load();
    let status = cmd.status();
    eprintln!(
        "{bench} bench: host load average (1/5/15 min) before {before}, after {}",
        load()
    );
    match status {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => {
            eprintln!("{bench} bench: the run in the VM failed ({s})");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{bench} bench: cannot start {vmrun}: {e}");
            ExitCode::FAILURE
        }
    }
}
