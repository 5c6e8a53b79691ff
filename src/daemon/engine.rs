//! The mode's engine, as the daemon's poll loop drives it: IPsec (XFRM and the hello
//! socket) or WireGuard (one interface). Both have the same shape: `apply` makes the
//! kernel match the plan, `tick` runs the timers, `reconfigure` takes a new
//! configuration, `peers_up` feeds STATUS=.

use std::time::Instant;

use crate::config::Config;
use crate::{ipsec, wireguard};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ipsec: {0}")]
    Ipsec(#[from] ipsec::Error),
    #[error("wireguard: {0}")]
    Wireguard(#[from] wireguard::Error),
}

// One per daemon, made once and never moved about: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Engine {
    Ipsec(ipsec::Engine),
    Wireguard(wireguard::Engine),
}

impl Engine {
    /// The hello socket has data (IPsec). Returns whether the plan may have changed.
    pub fn on_readable(&mut self, cfg: &Config) -> bool {
        match self {
            Engine::Ipsec(e) => e.on_readable(cfg),
            Engine::Wireguard(e) => e.on_readable(),
        }
    }

    pub fn apply(&mut self, cfg: &Config) -> Result<usize, Error> {
        Ok(match self {
            Engine::Ipsec(e) => e.apply(cfg)?,
            Engine::Wireguard(e) => e.apply(cfg)?,
        })
    }

    pub fn tick(&mut self, cfg: &Config, now: Instant) -> Result<(), Error> {
        match self {
            Engine::Ipsec(e) => e.tick(cfg, now)?,
            Engine::Wireguard(e) => e.tick(cfg, now)?,
        }
        Ok(())
    }

    pub fn reconfigure(&mut self, cfg: &Config) -> Result<usize, Error> {
        Ok(match self {
            Engine::Ipsec(e) => e.reconfigure(cfg)?,
            Engine::Wireguard(e) => e.reconfigure(cfg)?,
        })
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        match self {
            Engine::Ipsec(e) => e.next_deadline(),
            Engine::Wireguard(e) => e.next_deadline(),
        }
    }

    pub fn peers_up(&self, cfg: &Config) -> (usize, usize) {
        match self {
            Engine::Ipsec(e) => e.peers_up(cfg),
            Engine::Wireguard(e) => e.peers_up(cfg),
        }
    }

    /// Per-peer state for `encryptd status` (WireGuard: last handshake for last hello).
    pub fn peer_statuses(&self, cfg: &Config, now: Instant) -> Vec<crate::cli::status::PeerStatus> {
        match self {
            Engine::Ipsec(e) => e.peer_statuses(cfg, now),
            Engine::Wireguard(e) => e.peer_statuses(cfg),
        }
    }

    /// IPsec: encryptd's SAs in the kernel and the highest sequence number sent, as the
    /// last reconcile found them.
    pub fn sa_summary(&self) -> Option<(u64, u64)> {
        match self {
            Engine::Ipsec(e) => Some(e.sa_summary),
            Engine::Wireguard(_) => None,
        }
    }

    /// What the poll loop waits on for the engine (IPsec: the hello sockets and the XFRM
    /// watch; WireGuard: the rtnetlink watch).
    pub fn hello_fds(&self) -> Vec<std::os::fd::RawFd> {
        match self {
            Engine::Ipsec(e) => e.hello_fds(),
            Engine::Wireguard(e) => vec![e.watch_fd()],
        }
    }

    /// Hellos dropped by the kernel at the sockets' full buffers (IPsec mode only).
    pub fn socket_overflows(&self, cfg: &Config) -> u64 {
        match self {
            Engine::Ipsec(e) => e.socket_overflows(cfg),
            Engine::Wireguard(_) => 0,
        }
    }

    /// Full reads (dumps) of the kernel's XFRM policies or states (IPsec mode only).
    pub fn xfrm_dumps(&self) -> u64 {
        match self {
            Engine::Ipsec(e) => e.dumps,
            Engine::Wireguard(_) => 0,
        }
    }

    /// Reads of links, addresses, routes and rules (WireGuard mode only).
    pub fn rtnl_dumps(&self) -> u64 {
        match self {
            Engine::Ipsec(_) => 0,
            Engine::Wireguard(e) => e.dumps,
        }
    }

    /// SAs re-keyed at their soft limit (IPsec mode only).
    pub fn rekeys(&self) -> u64 {
        match self {
            Engine::Ipsec(e) => e.rekeys,
            Engine::Wireguard(_) => 0,
        }
    }

    /// The hello socket's counters (IPsec mode only).
    pub fn hello_stats(&self) -> Option<&ipsec::drops::HelloStats> {
        match self {
            Engine::Ipsec(e) => Some(&e.stats),
            Engine::Wireguard(_) => None,
        }
    }
}
