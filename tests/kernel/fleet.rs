//! A fleet under test: the rig's namespaces as nodes, each with its own files (config,
//! inventory, keys, boot ID) and an `encryptd run` of its own, watched through its log
//! and a datagram socket standing in for systemd's NOTIFY_SOCKET.

#![allow(dead_code)]

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use encryptd::config::wgkey::{self, PrivateKey};

use crate::rig::{Topo, ensure, sh, wait_for};

pub const KEY1: &str = "1+ rfc4106(gcm(aes)) 6b1c3f0e2d4a59788a9b0c1d2e3f40516273849a 128\n";
/// Strict mode as the strict-mode cases configure it: the wire's and the subnets'
/// ranges protected, tcp/22 the exception.
pub const STRICT: &str = "\n[strict]\nenabled = true\ncidrs = [\"10.77.0.0/16\", \"10.1.0.0/16\", \"fd77::/16\"]\nexceptions = [{ proto = \"tcp\", port = 22 }]\n";

/// A management host's addresses: on the wire, inside a protected range, in no inventory.
pub const MGMT4: &str = "10.77.0.50";
pub const MGMT6: &str = "fd77::50";

pub const KEY2: &str = "2+ rfc4106(gcm(aes)) 00112233445566778899aabbccddeeff01020304 128\n";

/// A boot ID as the kernel prints it, made from `seed`.
pub fn boot_id(seed: u32) -> String {
    format!(
        "{seed:08x}-0000-4000-8000-{:012x}\n",
        u64::from(seed) * 7919
    )
}

pub fn write(path: &Path, content: &str) -> Result<(), String> {
    std::fs::write(path, content).map_err(|e| format!("{}: {e}", path.display()))
}

/// Replace `path` the way Ansible does: a temporary file renamed over it.
pub fn rename_over(path: &Path, content: &str) -> Result<(), String> {
    let tmp = path.with_extension("tmp~");
    write(&tmp, content)?;
    std::fs::rename(&tmp, path).map_err(|e| e.to_string())
}

pub fn write_keys(path: &Path, content: &str) -> Result<(), String> {
    rename_over(path, content)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| e.to_string())
}

/// `n` nodes named n0.., node i at 10.77.0.(i+1) and fd77::(i+1), with 10.1.i.0/24 (a
/// dummy interface holding 10.1.i.1) routed behind it.
pub struct Fleet {
    pub topo: Topo,
    pub n: usize,
    pub dirs: Vec<PathBuf>,
    pub daemons: Vec<Option<TestDaemon>>,
}

pub fn node_entry(i: usize) -> String {
    format!(
        "[[node]]\nname = \"n{i}\"\naddresses = [\"10.77.0.{a}\", \"fd77::{a}\"]\nsubnets = [\"10.1.{i}.0/24\"]\n\n",
        a = i + 1
    )
}

/// The first ESP SA of a boot makes the kernel look its algorithms up by name, and each
/// lookup of a name not yet registered runs modprobe (`crypto-rfc4106(gcm(aes))`,
/// `crypto-seqiv(...)`, `crypto-stdrng`, ... ten of them): 5-12 s in the VM, which held
/// the daemons of whichever case came first past READY's 10 s with no peer up. Paid once
/// per boot here, in a namespace of its own, so that the cases time the daemons.
fn warm_up_crypto() {
    static DONE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let _ = sh(
            "ip netns add encryptd-warmup && ip -n encryptd-warmup xfrm state add \
             src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x1000 reqid 1 mode tunnel \
             aead 'rfc4106(gcm(aes))' 0x6b1c3f0e2d4a59788a9b0c1d2e3f40516273849a 128 \
             replay-window 4096 flag esn; ip netns del encryptd-warmup",
        );
    });
}

/// The mode a fleet's daemons run in.
#[derive(Clone, Copy)]
pub enum Kind<'a> {
    /// IPsec with this `ipsec.keys` content.
    Ipsec(&'a str),
    /// WireGuard: node i's private key is [`wg_key`]`(i)`, in `wireguard.key`.
    Wireguard,
}

/// Node i's WireGuard private key (fixed, so inventories can be written ahead).
pub fn wg_key(i: usize) -> PrivateKey {
    PrivateKey::from_bytes([i as u8 + 1; 32])
}

pub fn wg_public(i: usize) -> String {
    wgkey::to_base64(&wg_key(i).public())
}

/// [`node_entry`] with node i's WireGuard public key.
pub fn wg_node_entry(i: usize) -> String {
    node_entry(i).trim_end().to_string()
        + &format!("\nwireguard_public_key = \"{}\"\n\n", wg_public(i))
}

impl Fleet {
    pub fn new(tag: &str, n: usize, keys: &str) -> Result<Fleet, String> {
        Fleet::new_with(tag, n, Kind::Ipsec(keys))
    }

    pub fn new_with(tag: &str, n: usize, kind: Kind) -> Result<Fleet, String> {
        warm_up_crypto();
        let topo = Topo::new(tag, n)?;
        let root = std::env::temp_dir().join(format!("encryptd-{tag}"));
        let _ = std::fs::remove_dir_all(&root);
        let inventory: String = match kind {
            Kind::Ipsec(_) => (0..n).map(node_entry).collect(),
            Kind::Wireguard => (0..n).map(wg_node_entry).collect(),
        };
        let mut dirs = Vec::new();
        for i in 0..n {
            let dir = root.join(format!("n{i}"));
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let common = format!(
                "node = \"n{i}\"\nruntime_dir = \"run\"\nstate_dir = \"state\"\nboot_id_path = \"boot_id\"\n"
            );
            match kind {
                Kind::Ipsec(keys) => {
                    write(
                        &dir.join("encryptd.toml"),
                        &format!(
                            "mode = \"ipsec\"\n{common}\n[ipsec]\nkey_rotation_duration = \"3s\"\n"
                        ),
                    )?;
                    write_keys(&dir.join("ipsec.keys"), keys)?;
                }
                Kind::Wireguard => {
                    write(
                        &dir.join("encryptd.toml"),
                        &format!(
                            "mode = \"wireguard\"\n{common}\n[wireguard]\nprivate_key = \"wireguard.key\"\n"
                        ),
                    )?;
                    write_keys(&dir.join("wireguard.key"), &wg_key(i).to_base64())?;
                }
            }
            write(&dir.join("nodes.toml"), &inventory)?;
            write(&dir.join("boot_id"), &boot_id(1000 + i as u32))?;
            let ns = topo.ns(i).to_string();
            let mut cmds = format!(
                "ip -n {ns} link add sub0 type dummy && ip -n {ns} addr add 10.1.{i}.1/24 dev sub0 && ip -n {ns} link set sub0 up"
            );
            for j in (0..n).filter(|j| *j != i) {
                cmds += &format!(
                    " && ip -n {ns} route add 10.1.{j}.0/24 via 10.77.0.{}",
                    j + 1
                );
            }
            sh(&cmds)?;
            dirs.push(dir);
        }
        Ok(Fleet {
            topo,
            n,
            dirs,
            daemons: (0..n).map(|_| None).collect(),
        })
    }

    /// Add the management host ([`MGMT4`], [`MGMT6`]) to the wire; its namespace.
    pub fn add_management_host(&mut self) -> Result<String, String> {
        self.topo
            .add_wire_host("m", MGMT4.parse().unwrap(), MGMT6.parse().unwrap())
    }

    /// Start every node's daemon and wait until all have every peer up.
    pub fn start_all(&mut self, timeout: Duration) -> Result<(), String> {
        for i in 0..self.n {
            self.start(i)?;
        }
        self.wait_all_up(timeout)
            .map_err(|e| format!("{e}\n{}", self.logs()))
    }

    /// Append `toml` (e.g. a `[strict]` table) to every node's encryptd.toml.
    pub fn configure_all(&self, toml: &str) -> Result<(), String> {
        for d in &self.dirs {
            let p = d.join("encryptd.toml");
            let s = std::fs::read_to_string(&p).map_err(|e| e.to_string())?;
            write(&p, &(s + toml))?;
        }
        Ok(())
    }

    pub fn start(&mut self, i: usize) -> Result<(), String> {
        let d = TestDaemon::spawn(&self.dirs[i], self.topo.ns(i))?;
        self.daemons[i] = Some(d);
        Ok(())
    }

    pub fn daemon(&mut self, i: usize) -> &mut TestDaemon {
        self.daemons[i].as_mut().expect("daemon started")
    }

    /// Every running daemon reports READY=1, and then (in that READY's STATUS= or a later
    /// one) all its peers up.
    pub fn wait_all_up(&mut self, timeout: Duration) -> Result<(), String> {
        let want = format!("{}/{} peers up", self.n - 1, self.n - 1);
        for i in 0..self.n {
            if let Some(d) = self.daemons[i].as_mut() {
                d.wait_notify("READY=1", timeout)?;
                let last = d.notes.last().cloned().unwrap_or_default();
                if !last.contains(&want) {
                    d.wait_notify(&want, timeout)
                        .map_err(|e| format!("n{i} never had all peers up: {e}"))?;
                }
            }
        }
        Ok(())
    }

    /// `ip xfrm` output of node i (keys included: for comparing across events).
    pub fn xfrm_states(&self, i: usize) -> Result<String, String> {
        self.topo.exec(i, "ip xfrm state")
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        for (i, d) in self.daemons.iter().enumerate() {
            if let Some(d) = d {
                s += &format!("---- n{i}\n{}", d.log());
            }
        }
        s
    }
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
    /// Start `encryptd run` on `dir/encryptd.toml`, inside network namespace `ns`.
    pub fn spawn(dir: &Path, ns: &str) -> Result<TestDaemon, String> {
        let sock = dir.join("notify.sock");
        let _ = std::fs::remove_file(&sock);
        let notify =
            UnixDatagram::bind(&sock).map_err(|e| format!("bind {}: {e}", sock.display()))?;
        notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(|e| e.to_string())?;
        let log = dir.join("daemon.log");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                env!("CARGO_BIN_EXE_encryptd"),
                "run",
                "--config",
            ])
            .arg(dir.join("encryptd.toml"))
            .env("NOTIFY_SOCKET", &sock)
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .map_err(|e| e.to_string())?,
            )
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

    /// Wait for the daemon to exit on its own; its exit code and log.
    pub fn wait_exit(mut self, timeout: Duration) -> Result<(i32, String), String> {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Ok((st.code().unwrap_or(-1), self.log()));
            }
            if t0.elapsed() > timeout {
                return Err(format!(
                    "the daemon still runs after {timeout:?}; log:\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Where the daemon's thread waits, and its children (for a daemon that hangs).
    fn where_stuck(&self) -> String {
        let pid = self.child.id();
        let read =
            |f: &str| std::fs::read_to_string(format!("/proc/{pid}/{f}")).unwrap_or_default();
        format!(
            "wchan {}; kernel stack:\n{}children: {}",
            read("wchan"),
            read("stack"),
            crate::rig::sh(&format!("ps -o pid,stat,etimes,args --ppid {pid}")).unwrap_or_default()
        )
    }

    /// SIGKILL: the daemon gets no chance to clean up (as in a crash).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
            // systemd allows 30 s (TimeoutStopSec); under TCG everything is far slower
            // than that budget assumes, but a stop should not take long even here.
            if t0.elapsed() > Duration::from_secs(15) {
                return Err(format!(
                    "daemon did not exit within 15 s of SIGTERM; it was in {}\nlog:\n{}",
                    self.where_stuck(),
                    self.log()
                ));
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

/// Capture lines that are plaintext: anything but ARP, neighbour discovery, MLD and the
/// patterns of `allowed` (ESP, hellos or WireGuard's UDP, as the case expects).
pub fn plaintext<'a>(lines: &'a [String], allowed: &[&str]) -> Vec<&'a String> {
    const ALWAYS: [&str; 5] = [
        "ARP,",
        "neighbor solicitation",
        "neighbor advertisement",
        "router solicitation",
        "multicast listener",
    ];
    lines
        .iter()
        .filter(|l| !(l.trim().is_empty() || ALWAYS.iter().chain(allowed).any(|p| l.contains(p))))
        .collect()
}

/// `Err` listing (the first 20 of) `clear`, the plaintext lines a capture held, unless none.
pub fn no_plaintext(clear: &[&String]) -> Result<(), String> {
    crate::rig::ensure(
        clear.is_empty(),
        format!("plaintext on the wire:\n{}", first_lines(clear, 20)),
    )
}

/// The first `n` of `lines`, one per line.
pub fn first_lines(lines: &[&String], n: usize) -> String {
    lines
        .iter()
        .take(n)
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Send `n` bytes over TCP from node `from` to `addr` (in node `to`), echoed back.
pub fn tcp_echo(
    f: &Fleet,
    from: usize,
    to: usize,
    addr: std::net::SocketAddr,
    n: usize,
) -> Result<(), String> {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let listener = crate::rig::in_netns(f.topo.ns(to), || TcpListener::bind(addr))
        .map_err(|e| format!("bind {addr}: {e}"))?;
    std::thread::scope(|s| {
        let server = s.spawn(move || -> std::io::Result<()> {
            let mut c = crate::rig::accept_within(
                &listener,
                Duration::from_secs(10),
                Duration::from_secs(20),
            )?;
            let mut buf = vec![0u8; n];
            c.read_exact(&mut buf)?;
            c.write_all(&buf)
        });
        let payload: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
        let got = crate::rig::in_netns(f.topo.ns(from), || -> std::io::Result<Vec<u8>> {
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            c.set_read_timeout(Some(Duration::from_secs(20)))?;
            c.set_write_timeout(Some(Duration::from_secs(20)))?;
            c.write_all(&payload)?;
            let mut back = vec![0u8; n];
            c.read_exact(&mut back)?;
            Ok(back)
        })
        .map_err(|e| format!("tcp n{from} -> {addr}: {e}"))?;
        server
            .join()
            .map_err(|_| "server panicked".to_string())?
            .map_err(|e| format!("server {addr}: {e}"))?;
        crate::rig::ensure(
            got == payload,
            format!("tcp n{from} -> {addr}: echo differs"),
        )
    })
}

/// A TCP connection from node `from` to port 22 of node `to` (the management exception).
/// In a three-node fleet, every node pings every other over IPv4, IPv6 and into its
/// subnet, and TCP crosses three pairs (both families, a subnet), under a capture on the
/// wire; the capture's lines, or what failed.
pub fn three_node_traffic(f: &Fleet) -> Result<Vec<String>, String> {
    let cap = f.topo.capture("")?;
    let mut failures = Vec::new();
    for i in 0..3 {
        for j in (0..3).filter(|j| *j != i) {
            for dst in [
                format!("10.77.0.{}", j + 1),
                format!("fd77::{}", j + 1),
                format!("10.1.{j}.1"),
            ] {
                if let Err(e) = f.topo.exec(i, &format!("ping -c 2 -i 0.2 -W 2 {dst}")) {
                    failures.push(format!("n{i} -> {dst}: {e}"));
                }
            }
        }
    }
    let tcp = [
        tcp_echo(f, 0, 1, "10.77.0.2:5001".parse().unwrap(), 200_000),
        tcp_echo(f, 2, 0, "[fd77::1]:5002".parse().unwrap(), 200_000),
        tcp_echo(f, 1, 2, "10.1.2.1:5003".parse().unwrap(), 50_000),
    ];
    let lines = cap.stop();
    failures.extend(tcp.into_iter().filter_map(Result::err));
    crate::rig::ensure(
        failures.is_empty(),
        format!("{}\n{}", failures.join("\n"), f.logs()),
    )?;
    Ok(lines)
}

pub fn ssh_like(f: &Fleet, from: usize, to: usize) -> Result<(), String> {
    use std::net::{SocketAddr, TcpListener, TcpStream};
    let addr: SocketAddr = format!("10.77.0.{}:22", to + 1).parse().unwrap();
    let l = crate::rig::in_netns(f.topo.ns(to), || TcpListener::bind(addr))
        .map_err(|e| format!("bind {addr}: {e}"))?;
    let c = crate::rig::in_netns(f.topo.ns(from), || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(3))
    });
    drop(l);
    c.map(|_| ())
        .map_err(|e| format!("tcp/22 n{from} -> n{to}: {e}"))
}

/// A TCP connection to port 22 of node `to` from a host that is no node (namespace
/// `ns`, address `src`): strict mode's door, which needs no tunnel.
pub fn ssh_from_host(f: &Fleet, ns: &str, src: std::net::IpAddr, to: usize) -> Result<(), String> {
    use std::net::{SocketAddr, TcpListener};
    let addr: SocketAddr = format!("10.77.0.{}:22", to + 1).parse().unwrap();
    let l = crate::rig::in_netns(f.topo.ns(to), || TcpListener::bind(addr))
        .map_err(|e| format!("bind {addr}: {e}"))?;
    let c = crate::rig::in_netns(ns, || {
        crate::rig::tcp_connect_from(SocketAddr::new(src, 0), addr, Duration::from_secs(3))
    });
    drop(l);
    c.map_err(|e| format!("tcp/22 {src} -> n{to}: {e}"))
}

/// Node i's snapshot (`run/status.json`) as the daemon next rewrites it, and when.
pub fn next_snapshot(f: &Fleet, i: usize) -> Result<(Instant, serde_json::Value), String> {
    let path = f.dirs[i].join("run/status.json");
    let read = || std::fs::read_to_string(&path).unwrap_or_default();
    let before = read();
    let mut now = before.clone();
    let changed = wait_for(Duration::from_secs(15), || {
        now = read();
        now != before && !now.is_empty()
    });
    ensure(
        changed,
        format!("{} not rewritten within 15 s", path.display()),
    )?;
    let at = Instant::now();
    let v = serde_json::from_str(&now).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((at, v))
}
