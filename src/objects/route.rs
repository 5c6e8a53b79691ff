//! Links, addresses, routes and policy rules as plain data: what WireGuard mode plans and
//! diffs (its own routing table, the rules that send traffic there, the fail-closed
//! table). The executor is [`crate::kernel::link`].

use std::fmt;
use std::net::IpAddr;

use crate::net::Cidr;

/// A network interface as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `IFLA_INFO_KIND` (`"wireguard"`, `"veth"`…); `None` for physical devices.
    pub kind: Option<String>,
    pub mtu: u32,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
}

/// An address on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address {
    pub index: u32,
    pub addr: IpAddr,
    pub prefix_len: u8,
}

/// A route `[blackhole|throw] dst [dev oif] [src src] table table proto protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    pub dst: Cidr,
    pub table: u32,
    /// The output interface (0 for blackhole and throw routes).
    pub oif: u32,
    /// Preferred source address (`RTA_PREFSRC`).
    pub src: Option<IpAddr>,
    pub protocol: u8,
    pub kind: RouteKind,
}

/// What a route does with the packets it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum RouteKind {
    /// Out through `oif`.
    #[default]
    Unicast,
    /// Dropped (the lookup fails with EINVAL for local senders).
    Blackhole,
    /// Not here: the lookup goes on with the next policy rule.
    Throw,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            RouteKind::Unicast => write!(f, "route {} dev #{}", self.dst, self.oif)?,
            RouteKind::Blackhole => write!(f, "route blackhole {}", self.dst)?,
            RouteKind::Throw => write!(f, "route throw {}", self.dst)?,
        }
        if let Some(s) = self.src {
            write!(f, " src {s}")?;
        }
        write!(f, " table {} proto {}", self.table, self.protocol)
    }
}

/// A policy rule `[not] fwmark MARK lookup TABLE` at `priority`, in one family. Rules
/// with other selectors are reported with `fwmark: None` and `other_selectors: true`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rule {
    pub v6: bool,
    pub priority: u32,
    pub invert: bool,
    pub fwmark: Option<u32>,
    /// `from SRC`.
    pub src: Option<Cidr>,
    /// `ipproto P sport N`.
    pub sport: Option<(u8, u16)>,
    pub table: u32,
    /// A dumped rule that also selects on something this type does not model (source,
    /// destination, interface…); never equal to a rule encryptd wants.
    pub other_selectors: bool,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} rule {}:",
            if self.v6 { "IPv6" } else { "IPv4" },
            self.priority
        )?;
        if self.invert {
            f.write_str(" not")?;
        }
        if let Some(src) = self.src {
            write!(f, " from {src}")?;
        }
        if let Some(m) = self.fwmark {
            write!(f, " fwmark {m:#x}")?;
        }
        if let Some((p, port)) = self.sport {
            write!(f, " ipproto {p} sport {port}")?;
        }
        if self.other_selectors {
            f.write_str(" (more selectors)")?;
        }
        write!(f, " lookup {}", self.table)
    }
}
