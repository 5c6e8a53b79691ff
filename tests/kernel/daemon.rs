//! The daemon's skeleton, as systemd and operators see it: readiness and reload
//! notifications in order, reloads on rename-over and SIGHUP, and a bad file refused
//! with its position while the last good configuration stays.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Case;
use crate::rig::{ensure, wait_for};

pub const CASES: &[Case] = &[("daemon_reload_and_notify", reload_and_notify)];

const KEYS: &str = "1+ rfc4106(gcm(aes)) 6b1c3f0e2d4a59788a9b0c1d2e3f40516273849a 128\n";

fn node(name: &str, addr: &str) -> String {
    format!("[[node]]\nname = \"{name}\"\naddresses = [\"{addr}\"]\n\n")
}

/// A daemon under test: its files in a directory, stderr to a log, and a datagram
/// socket standing in for systemd's NOTIFY_SOCKET.
pub struct TestDaemon {
    pub dir: PathBuf,
    child: Child,
    notify: UnixDatagram,
    log: PathBuf,
    pub notes: Vec<String>,
}

impl TestDaemon {
    pub fn start(
        dir: &Path,
        config: &str,
        inventory: &str,
        keys: &str,
    ) -> Result<TestDaemon, String> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let w = |f: &str, s: &str| std::fs::write(dir.join(f), s).map_err(|e| format!("{f}: {e}"));
        w("encryptd.toml", config)?;
        w("nodes.toml", inventory)?;
        w("ipsec.keys", keys)?;
        std::fs::set_permissions(
            dir.join("ipsec.keys"),
            std::fs::Permissions::from_mode(0o600),
        )
        .map_err(|e| e.to_string())?;
        let sock = dir.join("notify.sock");
        let notify =
            UnixDatagram::bind(&sock).map_err(|e| format!("bind {}: {e}", sock.display()))?;
        notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(|e| e.to_string())?;
        let log = dir.join("daemon.log");
        let child = Command::new(env!("CARGO_BIN_EXE_encryptd"))
            .args(["run", "--config"])
            .arg(dir.join("encryptd.toml"))
            .env("NOTIFY_SOCKET", &sock)
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| format!("spawn encryptd: {e}"))?;
        Ok(TestDaemon {
            dir: dir.to_path_buf(),
            child,
            notify,
            log,
            notes: Vec::new(),
        })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until the log holds `needle`; the time it took.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> Result<Duration, String> {
        let t0 = Instant::now();
        if wait_for(timeout, || self.log().contains(needle)) {
            Ok(t0.elapsed())
        } else {
            Err(format!(
                "no `{needle}` in the log within {timeout:?}; log:\n{}",
                self.log()
            ))
        }
    }

    /// Receive notifications until one contains `needle`.
    pub fn wait_notify(&mut self, needle: &str, timeout: Duration) -> Result<String, String> {
        let t0 = Instant::now();
        let mut buf = [0u8; 4096];
        while t0.elapsed() < timeout {
            if let Ok(n) = self.notify.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.notes.push(msg.clone());
                if msg.contains(needle) {
                    return Ok(msg);
                }
            }
        }
        Err(format!(
            "no {needle} notification within {timeout:?}; got {:?}; log:\n{}",
            self.notes,
            self.log()
        ))
    }

    /// Replace `file` the way Ansible does: write a temporary file, rename it over.
    pub fn rename_over(&self, file: &str, content: &str) -> Result<(), String> {
        let tmp = self.dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, content).map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, self.dir.join(file)).map_err(|e| e.to_string())
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// SIGTERM and wait; the exit status code.
    pub fn stop(mut self) -> Result<(i32, Vec<String>, String), String> {
        self.signal(libc::SIGTERM);
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().map_err(|e| e.to_string())? {
                let _ = self.wait_notify("STOPPING=1", Duration::from_millis(300));
                let mut rest = String::new();
                let _ =
                    std::fs::File::open(&self.log).and_then(|mut f| f.read_to_string(&mut rest));
                return Ok((
                    st.code().unwrap_or(-1),
                    std::mem::take(&mut self.notes),
                    rest,
                ));
            }
            if t0.elapsed() > Duration::from_secs(5) {
                return Err("daemon did not exit within 5 s of SIGTERM".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn reload_and_notify() -> Result<(), String> {
    let dir = std::env::temp_dir().join("encryptd-daemon-reload");
    let config =
        "mode = \"ipsec\"\nnode = \"a\"\nruntime_dir = \"run\"\n[strict]\nenabled = false\n";
    let inv = node("a", "10.99.0.1") + &node("b", "10.99.0.2");
    let mut d = TestDaemon::start(&dir, config, &inv, KEYS)?;
    let ready = d.wait_notify("READY=1", Duration::from_secs(10))?;
    ensure(
        ready.contains("STATUS=ipsec: 0/1 peers up, key 1, strict off"),
        format!("first READY=1 should carry the status line, got {ready:?}"),
    )?;

    // A new valid inventory renamed over the old one: logged within one second.
    d.rename_over("nodes.toml", &(inv.clone() + &node("c", "10.99.0.3")))?;
    let took = d.wait_log(
        "configuration reloaded after a file change: 3 nodes; added c",
        Duration::from_secs(1),
    )?;
    d.wait_notify("RELOADING=1", Duration::from_secs(1))?;
    let st = d.wait_notify("READY=1", Duration::from_secs(1))?;
    ensure(
        st.contains("0/2 peers up"),
        format!("status after reload: {st:?}"),
    )?;
    println!("    reload logged {} ms after the rename", took.as_millis());

    // An invalid one: the error with file:line:col, and the last good one stays.
    let bad = inv.clone() + &node("c", "10.99.0.300");
    d.rename_over("nodes.toml", &bad)?;
    let nodes = dir.join("nodes.toml");
    d.wait_log(
        &format!(
            "reload refused: {}:11:14: \"10.99.0.300\" is not an IPv4 or IPv6 address",
            nodes.display()
        ),
        Duration::from_secs(1),
    )?;
    d.wait_log(
        "keeping the last good configuration",
        Duration::from_secs(1),
    )?;
    let st = d.wait_notify("READY=1", Duration::from_secs(1))?;
    ensure(
        st.contains("0/2 peers up") && st.contains("newest configuration refused"),
        format!("status after a refused reload: {st:?}"),
    )?;

    // Fixed again, by SIGHUP this time (no file event in between is needed).
    std::fs::write(
        &nodes,
        inv.clone() + &node("c", "10.99.0.3") + &node("d", "10.99.0.4"),
    )
    .map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(400)); // let the write's own reload pass
    d.signal(libc::SIGHUP);
    d.wait_log(
        "reload after SIGHUP: configuration unchanged",
        Duration::from_secs(2),
    )?;
    let st = d.wait_notify("READY=1", Duration::from_secs(1))?;
    ensure(
        st.contains("0/3 peers up") && !st.contains("refused"),
        format!("status after SIGHUP: {st:?}"),
    )?;

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
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
