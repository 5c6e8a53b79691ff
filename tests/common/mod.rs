//! Shared by the test binaries: every child process is waited for with a deadline, so a
//! command that hangs becomes a failure that says which, never a stuck run.

#![allow(dead_code)]

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a command of the host tests (`encryptd check`, `systemd-analyze`) may take.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Run `cmd` in a process group of its own with its output collected, for at most
/// `deadline`: its status (`None` when it was killed at the deadline), stdout, stderr.
pub fn run_within(
    cmd: &mut Command,
    deadline: Duration,
) -> std::io::Result<(Option<ExitStatus>, Vec<u8>, Vec<u8>)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()?;
    // Read on threads, handed over by channel: a process that left the group (a daemon
    // that put itself in the background) may hold a pipe open for good.
    let drain = |r: Option<Box<dyn Read + Send>>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut s = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut s);
            }
            let _ = tx.send(s);
        });
        rx
    };
    let collect = |rx: std::sync::mpsc::Receiver<Vec<u8>>| {
        rx.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|_| {
            b"(output not collected: a process that left the group holds the pipe)".to_vec()
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let status = wait_child(&mut child, deadline);
    // Past the deadline the command goes, and in any case whatever it left running in
    // its group, which would hold the pipes open.
    // SAFETY: kill(2) of the process group this function created; it may be empty.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    if status.is_none() {
        let _ = child.wait();
    }
    Ok((status, collect(out), collect(err)))
}

/// Wait at most `deadline` for `child` to exit; its status, or `None` if it still runs.
pub fn wait_child(child: &mut Child, deadline: Duration) -> Option<ExitStatus> {
    let t0 = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) if t0.elapsed() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => return None,
        }
    }
}

/// `cmd.output()` with [`DEADLINE`]; panics (failing the test) with what it had printed
/// if the command does not finish in time or cannot start.
pub fn output(cmd: &mut Command) -> Output {
    let what = format!("{cmd:?}");
    match run_within(cmd, DEADLINE) {
        Ok((Some(status), stdout, stderr)) => Output {
            status,
            stdout,
            stderr,
        },
        Ok((None, stdout, stderr)) => panic!(
            "{what} did not finish within {DEADLINE:?}; killed. It had printed:\n{}{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
        Err(e) => panic!("cannot run {what}: {e}"),
    }
}
