//! The test network: one namespace holding a bridge ("the wire") and one namespace per
//! node, each joined to the bridge by a veth pair. Every address lives inside these
//! namespaces; nothing outside them is ever a target.

#![allow(dead_code)]

use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Run a shell command; `Err` holds the command, its status and its output.
pub fn sh(cmd: &str) -> Result<String, String> {
    let out = Command::new("bash")
        .args(["-c", cmd])
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "`{cmd}` failed ({}):\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// `ip [-n NS] -batch -` with `lines` (one `ip` command each, without the `ip`).
pub fn ip_batch(ns: Option<&str>, lines: &str) -> Result<String, String> {
    let netns = ns.map(|n| format!("-n {n} ")).unwrap_or_default();
    sh(&format!("ip {netns}-batch - <<'EOF'\n{lines}EOF"))
}

/// `Err(msg)` unless `cond`.
pub fn ensure(cond: bool, msg: impl Into<String>) -> Result<(), String> {
    if cond { Ok(()) } else { Err(msg.into()) }
}

/// Poll `f` until it returns true or `timeout` passes.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// Run `f` on a fresh thread that has entered network namespace `ns`: sockets it opens
/// belong to that namespace (setns changes only the calling thread).
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
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

pub struct Node {
    pub ns: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

/// `n` nodes on one bridge: node i has 10.77.0.(i+1)/24 and fd77::(i+1)/64 on `eth0`.
pub struct Topo {
    pub wire: String,
    pub nodes: Vec<Node>,
    children: Vec<Child>,
}

impl Topo {
    pub fn new(tag: &str, n: usize) -> Result<Topo, String> {
        let wire = format!("{tag}-sw");
        let mut t = Topo {
            wire: wire.clone(),
            nodes: Vec::new(),
            children: Vec::new(),
        };
        for i in 0..n {
            t.nodes.push(Node {
                ns: format!("{tag}-n{i}"),
                v4: Ipv4Addr::new(10, 77, 0, i as u8 + 1),
                v6: format!("fd77::{}", i + 1).parse().unwrap(),
            });
        }
        // `ip -batch`: under the VM's emulation every process costs ~0.1 s, so this is one
        // `ip` for the namespaces, one for the wire and one per node (not ~7 per node).
        // A batch stops at its first failing line; Drop removes whatever was created.
        let mut names = format!("netns add {wire}\n");
        let mut wiring = "link set lo up\nlink add br0 type bridge\nlink set br0 up\n".to_string();
        for (i, node) in t.nodes.iter().enumerate() {
            names += &format!("netns add {}\n", node.ns);
            wiring += &format!(
                "link add p{i} type veth peer name eth0 netns {}\nlink set p{i} master br0 up\n",
                node.ns
            );
        }
        ip_batch(None, &names)?;
        ip_batch(Some(&wire), &wiring)?;
        for node in &t.nodes {
            ip_batch(
                Some(&node.ns),
                &format!(
                    "link set lo up\nlink set eth0 up\naddr add {}/24 dev eth0\n\
                     addr add {}/64 dev eth0 nodad\n",
                    node.v4, node.v6
                ),
            )?;
        }
        Ok(t)
    }

    pub fn ns(&self, i: usize) -> &str {
        &self.nodes[i].ns
    }

    /// Run `cmd` inside node i's namespace.
    /// Start `cmd` inside node i's namespace without waiting (output discarded).
    pub fn exec_bg(&self, i: usize, cmd: &str) -> Result<Child, String> {
        Command::new("ip")
            .args(["netns", "exec", self.ns(i), "bash", "-c", cmd])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{cmd}: {e}"))
    }

    /// Run `cmd` (a whole shell command line: `a; b`, pipes) in node i's namespace.
    pub fn exec(&self, i: usize, cmd: &str) -> Result<String, String> {
        let quoted = format!("'{}'", cmd.replace('\'', r"'\''"));
        sh(&format!("ip netns exec {} bash -c {quoted}", self.ns(i)))
    }

    /// Start tcpdump on the bridge with a capture filter; `Capture::stop` returns its lines.
    pub fn capture(&self, filter: &str) -> Result<Capture, String> {
        let path = std::env::temp_dir().join(format!("{}-{}.cap", self.wire, self.children.len()));
        let err = std::env::temp_dir().join(format!("{}.caperr", self.wire));
        let out = File::create(&path).map_err(|e| e.to_string())?;
        let child = Command::new("ip")
            .args([
                "netns", "exec", &self.wire, "tcpdump", "-Z", "root", "-l", "-n", "-i", "br0",
            ])
            .args(filter.split_whitespace())
            .stdout(out)
            .stderr(File::create(&err).map_err(|e| e.to_string())?)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("tcpdump: {e}"))?;
        let listening = wait_for(Duration::from_secs(10), || {
            std::fs::read_to_string(&err).is_ok_and(|s| s.contains("listening"))
        });
        let cap = Capture { child, path };
        ensure(listening, "tcpdump did not start listening")?;
        Ok(cap)
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let mut dels: String = self
            .nodes
            .iter()
            .map(|n| format!("netns del {}\n", n.ns))
            .collect();
        dels += &format!("netns del {}\n", self.wire);
        let _ = sh(&format!("ip -force -batch - <<'EOF'\n{dels}EOF"));
    }
}

pub struct Capture {
    child: Child,
    path: std::path::PathBuf,
}

impl Capture {
    /// Stop the capture (after a short grace for packets in flight) and return its lines.
    pub fn stop(mut self) -> Vec<String> {
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: plain kill(2) of our own child; SIGINT makes tcpdump flush.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}
