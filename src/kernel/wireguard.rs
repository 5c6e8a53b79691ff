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
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use wireguard_uapi::set::{self, WgPeerF};
use wireguard_uapi::{DeviceInterface, WgSocket};
use zeroize::Zeroize;

use crate::config::wgkey::{PresharedKey, PrivateKey};
use crate::net::Cidr;

/// A WireGuard device as the kernel reports it (without its private key).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Device {
    /// Public key of the device's private key; `None` when it has none.
    pub public_key: Option<[u8; 32]>,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: Vec<Peer>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub public_key: [u8; 32],
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<Cidr>,
    /// Persistent keepalive interval in seconds, 0 when off.
    pub keepalive: u16,
    /// [`PresharedKey::tag`] of the peer's preshared key (`None`: none); the key itself
    /// is wiped as soon as it is read.
    pub psk_tag: Option<[u8; 8]>,
    /// Wall-clock time of the last completed handshake; `None` if there was none.
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// One peer to create or change. A peer that does not exist is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerUpdate {
    pub public_key: [u8; 32],
    pub endpoint: Option<SocketAddr>,
    pub keepalive: Option<u16>,
    /// The preshared key to set ([`PresharedKey::none`] removes it); `None` leaves it.
    pub preshared_key: Option<PresharedKey>,
    /// Allowed IPs to add (moved from any other peer that has them).
    pub add_ips: Vec<Cidr>,
}

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

pub struct Wg {
    sock: WgSocket,
}

impl std::fmt::Debug for Wg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Wg")
    }
}

fn b64(k: &[u8; 32]) -> String {
    crate::config::wgkey::to_base64(k)
}

impl Wg {
    pub fn connect() -> Result<Wg, WgError> {
        WgSocket::connect()
            .map(|sock| Wg { sock })
            .map_err(|e| WgError::Connect(e.to_string()))
    }

    /// The device named `ifname` (which must exist and be a WireGuard interface).
    pub fn device(&mut self, ifname: &str) -> Result<Device, WgError> {
        let mut d = self
            .sock
            .get_device(DeviceInterface::from_name(ifname))
            .map_err(|e| WgError::Get {
                ifname: ifname.into(),
                reason: e.to_string(),
            })?;
        // Never keep the kernel's copy of the private key (nor preshared keys).
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
            public_key: d.public_key,
            listen_port: d.listen_port,
            fwmark: d.fwmark,
            peers,
        })
    }

    fn set(&mut self, ifname: &str, what: String, dev: set::Device<'_>) -> Result<(), WgError> {
        self.sock.set_device(dev).map_err(|e| WgError::Set {
            ifname: ifname.into(),
            what,
            reason: e.to_string(),
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
        let mut dev = set::Device::from_ifname(ifname);
        dev.private_key = private_key.map(PrivateKey::as_bytes);
        dev.listen_port = listen_port;
        dev.fwmark = fwmark;
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
        self.set(ifname, format!("setting {}", what.join(", ")), dev)
    }

    /// Create or change peers (additive: allowed IPs are added, never replaced).
    pub fn set_peers(&mut self, ifname: &str, updates: &[PeerUpdate]) -> Result<(), WgError> {
        if updates.is_empty() {
            return Ok(());
        }
        let ips: Vec<Vec<IpAddr>> = updates
            .iter()
            .map(|u| u.add_ips.iter().map(Cidr::addr).collect())
            .collect();
        let mut dev = set::Device::from_ifname(ifname);
        for (u, addrs) in updates.iter().zip(&ips) {
            let mut p = set::Peer::from_public_key(&u.public_key);
            p.endpoint = u.endpoint.as_ref();
            p.persistent_keepalive_interval = u.keepalive;
            p.preshared_key = u.preshared_key.as_ref().map(PresharedKey::as_bytes);
            p.allowed_ips = u
                .add_ips
                .iter()
                .zip(addrs)
                .map(|(c, a)| set::AllowedIp {
                    ipaddr: a,
                    cidr_mask: Some(c.prefix_len()),
                })
                .collect();
            dev.peers.push(p);
        }
        let names: Vec<String> = updates.iter().map(|u| b64(&u.public_key)).collect();
        self.set(ifname, format!("setting peers {}", names.join(", ")), dev)
    }

    pub fn remove_peers(&mut self, ifname: &str, keys: &[[u8; 32]]) -> Result<(), WgError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut dev = set::Device::from_ifname(ifname);
        for k in keys {
            dev.peers
                .push(set::Peer::from_public_key(k).flags(vec![WgPeerF::RemoveMe]));
        }
        let names: Vec<String> = keys.iter().map(b64).collect();
        self.set(ifname, format!("removing peers {}", names.join(", ")), dev)
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
