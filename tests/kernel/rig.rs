//! The test network: one namespace holding a bridge ("the wire") and one namespace per
//! node, each joined to the bridge by a veth pair. Every address lives inside these
//! namespaces; nothing outside them is ever a target.

#![allow(dead_code)]

use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long one shell command of a case may take unless it says otherwise.
pub const SH_DEADLINE: Duration = Duration::from_secs(120);

/// Run a shell command (at most [`SH_DEADLINE`]); `Err` holds the command, its status
/// and its output.
pub fn sh(cmd: &str) -> Result<String, String> {
    sh_within(cmd, SH_DEADLINE)
}

/// [`sh`] with its own deadline: past it the command and everything it started are
/// killed, and `Err` holds what it had printed.
pub fn sh_within(cmd: &str, deadline: Duration) -> Result<String, String> {
    let mut c = Command::new("bash");
    c.args(["-c", cmd]);
    let (status, stdout, stderr) =
        run_within(&mut c, deadline).map_err(|e| format!("{cmd}: {e}"))?;
    match status {
        Some(st) if st.success() => Ok(stdout),
        Some(st) => Err(format!("`{cmd}` failed ({st}):\n{stdout}{stderr}")),
        None => Err(format!(
            "`{cmd}` did not finish within {deadline:?}, killed; it had printed:\n{stdout}{stderr}"
        )),
    }
}

/// [`crate::common::run_within`] with the output as text.
pub fn run_within(
    cmd: &mut Command,
    deadline: Duration,
) -> std::io::Result<(Option<std::process::ExitStatus>, String, String)> {
    let (st, out, err) = crate::common::run_within(cmd, deadline)?;
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    Ok((st, text(out), text(err)))
}

pub use crate::common::wait_child;

/// Wait at most `deadline` for `child`; past it, kill it. `Err` says it had to be killed.
pub fn finish_child(
    child: &mut Child,
    deadline: Duration,
    what: &str,
) -> Result<std::process::ExitStatus, String> {
    match wait_child(child, deadline) {
        Some(st) => Ok(st),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!("{what} did not finish within {deadline:?}; killed"))
        }
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
    /// Namespaces of hosts that are no node: on the wire, or behind a node.
    extra: Vec<String>,
}

impl Topo {
    pub fn new(tag: &str, n: usize) -> Result<Topo, String> {
        let wire = format!("{tag}-sw");
        let mut t = Topo {
            wire: wire.clone(),
            nodes: Vec::new(),
            children: Vec::new(),
            extra: Vec::new(),
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

    /// A host on the wire that is no node of any inventory (a management host, an
    /// attacker): namespace `{tag}-{name}` with `v4`/24 and `v6`/64 on its `eth0`.
    pub fn add_wire_host(
        &mut self,
        name: &str,
        v4: Ipv4Addr,
        v6: Ipv6Addr,
    ) -> Result<String, String> {
        let ns = format!("{}-{name}", self.wire.trim_end_matches("-sw"));
        let port = format!("p{}", name);
        ip_batch(None, &format!("netns add {ns}\n"))?;
        self.extra.push(ns.clone());
        ip_batch(
            Some(&self.wire),
            &format!(
                "link add {port} type veth peer name eth0 netns {ns}\nlink set {port} master br0 up\n"
            ),
        )?;
        ip_batch(
            Some(&ns),
            &format!(
                "link set lo up\nlink set eth0 up\naddr add {v4}/24 dev eth0\naddr add {v6}/64 dev eth0 nodad\n"
            ),
        )?;
        Ok(ns)
    }

    /// A host behind node i (a container, a VM), joined to it by a veth pair (`h0` in
    /// the node): the node holds `gw4`/24 and `gw6`/64 on `h0` and forwards; the host
    /// holds `host4`, `host6` with its default routes through the node.
    pub fn add_host_behind(
        &mut self,
        i: usize,
        gw4: Ipv4Addr,
        host4: Ipv4Addr,
        gw6: Ipv6Addr,
        host6: Ipv6Addr,
    ) -> Result<String, String> {
        let node = self.ns(i).to_string();
        let ns = format!("{node}-h");
        ip_batch(None, &format!("netns add {ns}\n"))?;
        self.extra.push(ns.clone());
        ip_batch(
            Some(&node),
            &format!(
                "link add h0 type veth peer name eth0 netns {ns}\nlink set h0 up\n\
                 addr add {gw4}/24 dev h0\naddr add {gw6}/64 dev h0 nodad\n"
            ),
        )?;
        ip_batch(
            Some(&ns),
            &format!(
                "link set lo up\nlink set eth0 up\naddr add {host4}/24 dev eth0\n\
                 addr add {host6}/64 dev eth0 nodad\nroute add default via {gw4}\n\
                 route add default via {gw6}\n"
            ),
        )?;
        sh(&format!(
            "ip netns exec {node} sysctl -q -w net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1"
        ))?;
        Ok(ns)
    }

    /// Run `cmd` in namespace `ns` (a host that is no node).
    pub fn exec_ns(&self, ns: &str, cmd: &str) -> Result<String, String> {
        let quoted = format!("'{}'", cmd.replace('\'', r"'\''"));
        sh(&format!("ip netns exec {ns} bash -c {quoted}"))
    }

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
        self.exec_ns(self.ns(i), cmd)
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
            .map(|n| &n.ns)
            .chain(&self.extra)
            .map(|ns| format!("netns del {ns}\n"))
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
        if wait_child(&mut self.child, Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }
}

/// `accept` with a deadline; the connection has read and write timeouts of `io` (a
/// server thread that waits for a client that failed would otherwise wait for good).
pub fn accept_within(
    listener: &std::net::TcpListener,
    deadline: Duration,
    io: Duration,
) -> std::io::Result<std::net::TcpStream> {
    listener.set_nonblocking(true)?;
    let t0 = Instant::now();
    loop {
        match listener.accept() {
            Ok((c, _)) => {
                c.set_nonblocking(false)?;
                c.set_read_timeout(Some(io))?;
                c.set_write_timeout(Some(io))?;
                return Ok(c);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && t0.elapsed() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {deadline:?}"),
                ));
            }
            Err(e) => return Err(e),
        }
    }
}

/// A TCP connection from `src` (address and port, e.g. a source port chosen to match a
/// rule) to `dst`, from this thread's namespace; `Ok` once the handshake completed.
pub fn tcp_connect_from(
    src: std::net::SocketAddr,
    dst: std::net::SocketAddr,
    timeout: Duration,
) -> std::io::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    fn sockaddr(a: std::net::SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
        // SAFETY: an all-zero sockaddr_storage is valid; the family's struct is written
        // into its start, which is large and aligned enough for either.
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match a {
            std::net::SocketAddr::V4(v4) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as u16,
                    sin_port: v4.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(*v4.ip()).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
                std::mem::size_of::<libc::sockaddr_in>()
            }
            std::net::SocketAddr::V6(v6) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as u16,
                    sin6_port: v6.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: v6.ip().octets(),
                    },
                    sin6_scope_id: 0,
                };
                unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        (ss, len as libc::socklen_t)
    }
    let fam = if src.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let last = std::io::Error::last_os_error;
    // SAFETY: plain socket syscalls on an fd owned here (closed by OwnedFd); the
    // sockaddr buffers outlive the calls.
    unsafe {
        let fd = libc::socket(
            fam,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        if fd < 0 {
            return Err(last());
        }
        let _owned = OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            4,
        );
        let (s, sl) = sockaddr(src);
        if libc::bind(fd, (&s as *const libc::sockaddr_storage).cast(), sl) != 0 {
            return Err(last());
        }
        let (d, dl) = sockaddr(dst);
        if libc::connect(fd, (&d as *const libc::sockaddr_storage).cast(), dl) != 0 {
            let e = last();
            if e.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(e);
            }
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        let n = libc::poll(&mut pfd, 1, timeout.as_millis() as i32);
        if n < 0 {
            return Err(last());
        }
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer",
            ));
        }
        let mut err: libc::c_int = 0;
        let mut len: libc::socklen_t = 4;
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        );
        if err != 0 {
            return Err(std::io::Error::from_raw_os_error(err));
        }
        Ok(())
    }
}

/// The source and destination (`address.port`) of a tcpdump `-n` line, if it has them.
pub fn endpoints(line: &str) -> Option<(&str, &str)> {
    let w: Vec<&str> = line.split_whitespace().collect();
    let at = w.iter().position(|x| *x == "IP" || *x == "IP6")?;
    let (src, arrow, dst) = (w.get(at + 1)?, w.get(at + 2)?, w.get(at + 3)?);
    (*arrow == ">").then(|| (*src, dst.trim_end_matches(':')))
}
