//! The WireGuard executor: a device's key, port, fwmark and peers through the kernel's
//! WireGuard generic-netlink API (`wireguard-uapi`, synchronous), read back as plain data.
//! The interface itself is created with rtnetlink ([`super::link`]).
//!
//! What the kernel API does (and the engine relies on):
//! * setting a peer without `REPLACE_ALLOWEDIPS` *adds* its allowed IPs; an allowed IP
//!   belongs to one peer only, so adding it to a peer moves it there from any other;
//! * there is no way (before Linux 6.16's `WGALLOWEDIP_F_REMOVE_ME`) to remove one
//!   allowed IP from a peer short of replacing its whole list, which leaves the peer
//!   with no allowed IPs for a moment. [`Wg::detach_ips`] instead moves the IPs to a
//!   throw-away peer and removes that peer (Cilium's dummy peer, PR #34612): the real
//!   peer's other IPs never leave it.
//!
//! Key material: the private key reaches the kernel in a `SET_DEVICE` message and comes
//! back in every `GET_DEVICE` reply. The copy in the parsed reply is wiped here; the
//! socket buffers belong to `neli` and are not wiped (they hold the same key the daemon
//! holds for its whole life anyway). `neli` logs whole messages at debug level: the
//! logger drops its records (see `crate::logging`).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, UNIX_EPOCH};

use std::path::{Path, PathBuf};

use wireguard_uapi::set::{self, WgPeerF};
use wireguard_uapi::xplatform;
use wireguard_uapi::{DeviceInterface, WgSocket};
use zeroize::{Zeroize, Zeroizing};

use crate::config::wgkey::{PresharedKey, PrivateKey};
use crate::net::Cidr;
use crate::objects::wireguard::{Device, Peer, PeerUpdate};

#[derive(Debug, thiserror::Error)]
pub enum WgError {
    #[error("cannot talk to the kernel's WireGuard (is the module loaded?): {0}")]
    Connect(String),
    #[error("reading WireGuard device {ifname}: {reason}")]
    Get { ifname: String, reason: String },
    #[error("WireGuard device {ifname}: {what}: {reason}")]
    Set {
        ifname: String,
        what: String,
        reason: String,
    },
}

/// Where the device lives: the kernel's module (generic netlink), or a userspace
/// implementation (wireguard-go, boringtun) behind its UAPI socket.
enum Backend {
    Kernel(WgSocket),
    Userspace(PathBuf),
}

pub struct Wg {
    backend: Backend,
}

impl std::fmt::Debug for Wg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.backend {
            Backend::Kernel(_) => f.write_str("Wg(kernel)"),
            Backend::Userspace(p) => write!(f, "Wg(userspace, {})", p.display()),
        }
    }
}

fn b64(k: &[u8; 32]) -> String {
    crate::config::wgkey::to_base64(k)
}

/// Where userspace implementations put their UAPI socket (wireguard-go and boringtun
/// both use this directory, fixed at build time).
pub const UAPI_DIR: &str = "/var/run/wireguard";

pub fn uapi_socket(ifname: &str) -> PathBuf {
    Path::new(UAPI_DIR).join(format!("{ifname}.sock"))
}

/// One change to send, independent of the backend.
#[derive(Default)]
struct Change<'a> {
    private_key: Option<&'a PrivateKey>,
    listen_port: Option<u16>,
    fwmark: Option<u32>,
    peers: Vec<PeerChange<'a>>,
}

struct PeerChange<'a> {
    public_key: &'a [u8; 32],
    remove: bool,
    endpoint: Option<&'a SocketAddr>,
    keepalive: Option<u16>,
    preshared_key: Option<&'a PresharedKey>,
    allowed_ips: Vec<(IpAddr, u8)>,
}

impl<'a> PeerChange<'a> {
    fn update(u: &'a PeerUpdate) -> PeerChange<'a> {
        PeerChange {
            public_key: &u.public_key,
            remove: false,
            endpoint: u.endpoint.as_ref(),
            keepalive: u.keepalive,
            preshared_key: u.preshared_key.as_ref(),
            allowed_ips: u
                .add_ips
                .iter()
                .map(|c| (c.addr(), c.prefix_len()))
                .collect(),
        }
    }

    fn remove(public_key: &'a [u8; 32]) -> PeerChange<'a> {
        PeerChange {
            public_key,
            remove: true,
            endpoint: None,
            keepalive: None,
            preshared_key: None,
            allowed_ips: Vec::new(),
        }
    }
}

/// A connection to a UAPI socket, with timeouts: a hung implementation must not hang
/// the daemon's only thread.
fn uapi_connect(path: &Path) -> Result<std::os::unix::net::UnixStream, String> {
    let stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| e.to_string())?;
    let limit = Some(Duration::from_secs(5));
    stream.set_read_timeout(limit).map_err(|e| e.to_string())?;
    stream.set_write_timeout(limit).map_err(|e| e.to_string())?;
    Ok(stream)
}

/// A `get=1` request, parsed by `wireguard-uapi` (whose parser keeps the private key's
/// line in a string it does not wipe, as the kernel path's `neli` buffers do).
fn uapi_get(path: &Path) -> Result<wireguard_uapi::get::Device, String> {
    use std::io::{BufRead, BufReader, Write as _};
    let mut stream = uapi_connect(path)?;
    stream.write_all(b"get=1\n\n").map_err(|e| e.to_string())?;
    parse_get(BufReader::new(stream).lines())
}

/// A `get=1` answer. wireguard-go answers a device that has neither a private key nor a
/// listen port yet (the moments after it starts, before its first bind) with nothing but
/// `errno=0`, which the crate's parser calls an incomplete response (it is the only
/// answer it does: the end line before any key). That is a device with nothing set, the
/// state the daemon is about to configure; refusing it made a daemon that read its
/// fresh device a few milliseconds early fail to start.
///
/// The crate's parser panics (an `unwrap` on its device builder, `Duration::new`
/// overflowing) on some answers no WireGuard sends: peers without the device's
/// `listen_port`, nanoseconds past a second.
/// Found by fuzzing (`fuzz/`, target `uapi_get`); such an answer is refused here, before
/// the crate sees it, so that a broken or hostile program on the UAPI socket cannot stop
/// the daemon.
pub fn parse_get(
    lines: impl Iterator<Item = std::io::Result<String>>,
) -> Result<wireguard_uapi::get::Device, String> {
    use wireguard_uapi::xplatform::parser::ParseGetResponseError as E;
    let lines: Vec<String> = lines
        .take_while(|l| l.as_ref().map_or(true, |l| !l.is_empty()))
        .collect::<std::io::Result<_>>()
        .map_err(|e| e.to_string())?;
    if let Some(why) = incomplete_answer(&lines) {
        return Err(format!("malformed UAPI answer: {why}"));
    }
    let lines = lines
        .into_iter()
        .chain(std::iter::once(String::new()))
        .map(Ok);
    match xplatform::parser::parse(lines) {
        Err(E::IncompleteResponse) => Ok(wireguard_uapi::get::Device {
            ifindex: 0,
            ifname: String::new(),
            private_key: None,
            public_key: None,
            listen_port: 0,
            fwmark: 0,
            peers: Vec::new(),
        }),
        r => r.map_err(|e| e.to_string()),
    }
}

/// What makes `wireguard-uapi`'s parser panic rather than refuse (see `parse_get`): its
/// last step builds the device with an `unwrap`, which fails without `listen_port` once
/// a peer was read; and `Duration::new` overflows on a handshake time in seconds near
/// 2^64 with a second's worth of nanoseconds or more.
fn incomplete_answer(lines: &[String]) -> Option<String> {
    fn key(l: &str) -> &str {
        l.split_once('=').map_or(l, |(k, _)| k)
    }
    if let Some(first_peer) = lines.iter().position(|l| key(l) == "public_key")
        && !lines[..first_peer].iter().any(|l| key(l) == "listen_port")
    {
        return Some("peers but no listen_port".into());
    }
    lines.iter().find_map(|l| {
        let v = l.strip_prefix("last_handshake_time_nsec=")?;
        v.parse::<u64>()
            .is_ok_and(|n| n >= 1_000_000_000)
            .then(|| format!("last_handshake_time_nsec={v} is a second or more"))
    })
}

/// A `set=1` request of the cross-platform UAPI (wireguard.com/xplatform), written
/// here rather than by `wireguard-uapi`'s client so that the text, which holds keys in
/// hex, is built in one buffer that is wiped afterwards.
fn uapi_set(path: &Path, c: &Change<'_>) -> Result<(), String> {
    use std::fmt::Write as _;
    use std::io::{BufRead, BufReader, Write as _};
    let mut req = Zeroizing::new(String::with_capacity(256));
    let w = &mut *req;
    // Infallible: writing to a String.
    let _ = (|| -> std::fmt::Result {
        writeln!(w, "set=1")?;
        if let Some(k) = c.private_key {
            writeln!(w, "private_key={}", hex::encode(k.as_bytes()))?;
        }
        if let Some(p) = c.listen_port {
            writeln!(w, "listen_port={p}")?;
        }
        if let Some(m) = c.fwmark {
            writeln!(w, "fwmark={m}")?;
        }
        for p in &c.peers {
            writeln!(w, "public_key={}", hex::encode(p.public_key))?;
            if p.remove {
                writeln!(w, "remove=true")?;
                continue;
            }
            if let Some(k) = p.preshared_key {
                writeln!(w, "preshared_key={}", hex::encode(k.as_bytes()))?;
            }
            if let Some(e) = p.endpoint {
                writeln!(w, "endpoint={e}")?;
            }
            if let Some(k) = p.keepalive {
                writeln!(w, "persistent_keepalive_interval={k}")?;
            }
            for (a, len) in &p.allowed_ips {
                writeln!(w, "allowed_ip={a}/{len}")?;
            }
        }
        writeln!(w)
    })();
    let mut stream = uapi_connect(path)?;
    stream
        .write_all(req.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    match line.trim().strip_prefix("errno=") {
        Some("0") => Ok(()),
        // wireguard-go answers a negative errno.
        Some(n) => Err(format!(
            "refused: {}",
            n.parse::<i32>().map_or_else(
                |_| format!("errno {n}"),
                |n| std::io::Error::from_raw_os_error(n.abs()).to_string()
            )
        )),
        None => Err(format!("unexpected answer {:?}", line.trim())),
    }
}

/// How an existing interface is driven: `Some(false)` by the kernel's WireGuard (a
/// `wireguard` link), `Some(true)` by a userspace implementation (a `tun` link with its
/// UAPI socket), `None` when it is neither (not ours to drive). The engine and `status`
/// both decide here.
pub fn userspace_backend(ifname: &str, kind: Option<&str>) -> Option<bool> {
    match kind {
        Some("wireguard") => Some(false),
        Some("tun") if uapi_socket(ifname).exists() => Some(true),
        _ => None,
    }
}

impl Wg {
    /// The WireGuard behind `ifname`: userspace (see [`userspace_backend`]) or the
    /// kernel's.
    pub fn open(ifname: &str, userspace: bool) -> Result<Wg, WgError> {
        if userspace {
            Ok(Wg::userspace(ifname))
        } else {
            Wg::connect()
        }
    }

    /// The kernel's WireGuard.
    pub fn connect() -> Result<Wg, WgError> {
        WgSocket::connect()
            .map(|sock| Wg {
                backend: Backend::Kernel(sock),
            })
            .map_err(|e| WgError::Connect(e.to_string()))
    }

    /// A userspace implementation's device, through its UAPI socket (one connection
    /// per request, as the protocol wants).
    pub fn userspace(ifname: &str) -> Wg {
        Wg {
            backend: Backend::Userspace(uapi_socket(ifname)),
        }
    }

    pub fn is_userspace(&self) -> bool {
        matches!(self.backend, Backend::Userspace(_))
    }

    /// The device named `ifname` (which must exist and be a WireGuard interface).
    pub fn device(&mut self, ifname: &str) -> Result<Device, WgError> {
        let got = match &mut self.backend {
            Backend::Kernel(sock) => sock
                .get_device(DeviceInterface::from_name(ifname))
                .map_err(|e| e.to_string()),
            Backend::Userspace(path) => {
                uapi_get(path).map_err(|e| format!("{}: {e}", path.display()))
            }
        };
        let mut d = got.map_err(|reason| WgError::Get {
            ifname: ifname.into(),
            reason,
        })?;
        // Userspace implementations report only the private key: derive the public one.
        // Never keep the private key (nor preshared keys).
        let public_key = d.public_key.or_else(|| {
            d.private_key
                .filter(|k| k.iter().any(|b| *b != 0))
                .map(|k| PrivateKey::from_bytes(k).public())
        });
        if let Some(k) = d.private_key.as_mut() {
            k.zeroize();
        }
        d.private_key = None;
        let peers = d
            .peers
            .iter_mut()
            .map(|p| {
                let psk_tag = PresharedKey::tag(&p.preshared_key);
                p.preshared_key.zeroize();
                Peer {
                    public_key: p.public_key,
                    endpoint: p.endpoint,
                    allowed_ips: p
                        .allowed_ips
                        .iter()
                        .filter_map(|a| Cidr::new(a.ipaddr, a.cidr_mask))
                        .collect(),
                    keepalive: p.persistent_keepalive_interval,
                    psk_tag,
                    last_handshake: (p.last_handshake_time != Duration::ZERO)
                        .then(|| UNIX_EPOCH + p.last_handshake_time),
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                }
            })
            .collect();
        Ok(Device {
            public_key,
            listen_port: d.listen_port,
            fwmark: d.fwmark,
            peers,
        })
    }

    fn send(&mut self, ifname: &str, what: String, c: &Change<'_>) -> Result<(), WgError> {
        let result = match &mut self.backend {
            Backend::Kernel(sock) => {
                let mut dev = set::Device::from_ifname(ifname);
                dev.private_key = c.private_key.map(PrivateKey::as_bytes);
                dev.listen_port = c.listen_port;
                dev.fwmark = c.fwmark;
                for p in &c.peers {
                    let mut sp = set::Peer::from_public_key(p.public_key);
                    if p.remove {
                        sp = sp.flags(vec![WgPeerF::RemoveMe]);
                    }
                    sp.endpoint = p.endpoint;
                    sp.persistent_keepalive_interval = p.keepalive;
                    sp.preshared_key = p.preshared_key.map(PresharedKey::as_bytes);
                    sp.allowed_ips = p
                        .allowed_ips
                        .iter()
                        .map(|(a, len)| set::AllowedIp {
                            ipaddr: a,
                            cidr_mask: Some(*len),
                        })
                        .collect();
                    dev.peers.push(sp);
                }
                sock.set_device(dev).map_err(|e| e.to_string())
            }
            Backend::Userspace(path) => {
                uapi_set(path, c).map_err(|e| format!("{}: {e}", path.display()))
            }
        };
        result.map_err(|reason| WgError::Set {
            ifname: ifname.into(),
            what,
            reason,
        })
    }

    /// Set the device's own parameters; `None` leaves one as it is.
    pub fn set_device(
        &mut self,
        ifname: &str,
        private_key: Option<&PrivateKey>,
        listen_port: Option<u16>,
        fwmark: Option<u32>,
    ) -> Result<(), WgError> {
        let mut what = Vec::new();
        if let Some(k) = private_key {
            what.push(format!("private key (public {})", b64(&k.public())));
        }
        if let Some(p) = listen_port {
            what.push(format!("listen port {p}"));
        }
        if let Some(m) = fwmark {
            what.push(format!("fwmark {m:#x}"));
        }
        let c = Change {
            private_key,
            listen_port,
            fwmark,
            ..Change::default()
        };
        self.send(ifname, format!("setting {}", what.join(", ")), &c)
    }

    /// Create or change peers (additive: allowed IPs are added, never replaced).
    pub fn set_peers(&mut self, ifname: &str, updates: &[PeerUpdate]) -> Result<(), WgError> {
        if updates.is_empty() {
            return Ok(());
        }
        let c = Change {
            peers: updates.iter().map(PeerChange::update).collect(),
            ..Change::default()
        };
        let names: Vec<String> = updates.iter().map(|u| b64(&u.public_key)).collect();
        self.send(ifname, format!("setting peers {}", names.join(", ")), &c)
    }

    pub fn remove_peers(&mut self, ifname: &str, keys: &[[u8; 32]]) -> Result<(), WgError> {
        if keys.is_empty() {
            return Ok(());
        }
        let c = Change {
            peers: keys.iter().map(PeerChange::remove).collect(),
            ..Change::default()
        };
        let names: Vec<String> = keys.iter().map(b64).collect();
        self.send(ifname, format!("removing peers {}", names.join(", ")), &c)
    }
    /// Take `ips` away from whichever peers have them without touching those peers'
    /// other allowed IPs: move them to a new throw-away peer, then remove that peer.
    pub fn detach_ips(&mut self, ifname: &str, ips: &[Cidr]) -> Result<(), WgError> {
        if ips.is_empty() {
            return Ok(());
        }
        let dummy = PrivateKey::generate().public();
        self.set_peers(
            ifname,
            &[PeerUpdate {
                public_key: dummy,
                endpoint: None,
                keepalive: None,
                preshared_key: None,
                add_ips: ips.to_vec(),
            }],
        )?;
        self.remove_peers(ifname, &[dummy])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> impl Iterator<Item = std::io::Result<String>> + '_ {
        text.lines().map(|l| Ok(l.to_string()))
    }

    /// What wireguard-go answers right after it starts: a device with nothing set.
    #[test]
    fn a_fresh_userspace_device_is_empty_not_an_error() {
        let d = parse_get(lines("errno=0\n\n")).unwrap();
        assert_eq!(
            (d.private_key, d.listen_port, d.fwmark, d.peers.len()),
            (None, 0, 0, 0)
        );
    }

    #[test]
    fn a_configured_device_and_a_refusal() {
        let d = parse_get(lines(&format!(
            "private_key={}\nlisten_port=51871\nfwmark=51871\npublic_key={}\nallowed_ip=10.0.0.2/32\nerrno=0\n\n",
            "11".repeat(32),
            "22".repeat(32)
        )))
        .unwrap();
        assert_eq!((d.listen_port, d.fwmark, d.peers.len()), (51871, 51871, 1));
        assert!(parse_get(lines("errno=-22\n\n")).is_err());
    }

    /// Found by fuzzing: these made the crate's parser panic, and so the daemon.
    #[test]
    fn answers_the_crate_would_panic_on_are_refused() {
        let peer = format!("public_key={}\nrx_bytes=1\n", "22".repeat(32));
        for (answer, why) in [
            (
                format!("private_key={}\n{peer}errno=0\n\n", "11".repeat(32)),
                "no listen_port",
            ),
            (
                format!(
                    "listen_port=1\n{peer}last_handshake_time_sec=18446744073709551615\nlast_handshake_time_nsec=1000000000\n\n"
                ),
                "a second or more",
            ),
        ] {
            let e = parse_get(lines(&answer)).unwrap_err();
            assert!(
                e.contains("malformed UAPI answer") && e.contains(why),
                "{e}"
            );
        }
        let crash = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fuzz/corpus/uapi_get/crash-no-listen-port"
        ))
        .unwrap();
        crate::fuzz::uapi_get(&crash);
    }
}
