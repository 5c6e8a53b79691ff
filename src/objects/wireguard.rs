//! A WireGuard device and its peers as plain data: what WireGuard mode plans and diffs,
//! and what the executor ([`crate::kernel::wireguard`], kernel or userspace) reports.
//! Keys: the device's private key never appears here, a peer's preshared key only as a
//! tag or (to set it) in a wiping [`PresharedKey`].

use std::net::SocketAddr;
use std::time::SystemTime;

use crate::config::wgkey::PresharedKey;
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
