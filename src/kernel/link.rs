//! The rtnetlink executor: the links, addresses, routes and policy rules of
//! [`crate::objects::route`] over a `NETLINK_ROUTE` [`NetlinkSocket`] with
//! `netlink-packet-route` messages.
//!
//! WireGuard mode uses it to create its interface (`type wireguard`), set its MTU and
//! bring it up, read the underlay's MTU, and keep the routes of its own table and the
//! policy rules that send traffic there. What is encryptd's is decided by the caller (a
//! table number, a rule priority); this module never deletes anything it was not given.

use std::net::IpAddr;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::address::AddressMessage;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage, address::AddressAttribute};

use super::netlink::{Failure, NetlinkError, NetlinkSocket, NetlinkStats, Rtnetlink};
use crate::net::Cidr;
use crate::objects::route::{Address, Link, Route, RouteKind, Rule};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: NetlinkError,
    },
    #[error("{what}: the kernel refused {}: {}", .failures.len(), list(.failures))]
    Rejected {
        what: String,
        failures: Vec<(String, super::netlink::KernelError)>,
    },
}

impl LinkError {
    /// Whether the kernel refused with this errno.
    pub fn refused_with(&self, errno: i32) -> bool {
        matches!(self, LinkError::Rejected { failures, .. } if failures.iter().any(|(_, e)| e.errno == errno))
    }
}

fn list(f: &[(String, super::netlink::KernelError)]) -> String {
    f.iter()
        .take(5)
        .map(|(o, e)| format!("{o}: {e}"))
        .collect::<Vec<_>>()
        .join("; ")
        + if f.len() > 5 { "; …" } else { "" }
}

/// A `NETLINK_ROUTE` socket in the caller's network namespace.
#[derive(Debug)]
pub struct Rtnl {
    sock: NetlinkSocket<Rtnetlink>,
}

impl Rtnl {
    pub fn open() -> Result<Rtnl, LinkError> {
        let sock = NetlinkSocket::open().map_err(|source| LinkError::Netlink {
            what: "rtnetlink".into(),
            source,
        })?;
        Ok(Rtnl { sock })
    }

    pub fn stats(&self) -> NetlinkStats {
        self.sock.stats()
    }

    /// The socket's port: the kernel stamps it on the notifications our changes cause.
    pub fn port(&self) -> u32 {
        self.sock.port()
    }

    fn dump(
        &mut self,
        what: &str,
        req: RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, LinkError> {
        self.sock
            .dump(what, &req)
            .map_err(|source| LinkError::Netlink {
                what: what.into(),
                source,
            })
    }

    /// Send `reqs` as one batch; `names` describe each request for error messages.
    fn execute(
        &mut self,
        what: &str,
        reqs: &[RouteNetlinkMessage],
        names: impl Fn(usize) -> String,
        flags: u16,
    ) -> Result<(), LinkError> {
        if reqs.is_empty() {
            return Ok(());
        }
        let failures: Vec<Failure> =
            self.sock
                .execute(what, reqs, flags)
                .map_err(|source| LinkError::Netlink {
                    what: what.into(),
                    source,
                })?;
        if failures.is_empty() {
            Ok(())
        } else {
            Err(LinkError::Rejected {
                what: what.into(),
                failures: failures
                    .into_iter()
                    .map(|f| (names(f.index), f.error))
                    .collect(),
            })
        }
    }

    /// Every link of the namespace.
    pub fn links(&mut self) -> Result<Vec<Link>, LinkError> {
        let replies = self.dump(
            "dump links",
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(parse_link(&l)),
                _ => None,
            })
            .collect())
    }

    pub fn link(&mut self, name: &str) -> Result<Option<Link>, LinkError> {
        Ok(self.links()?.into_iter().find(|l| l.name == name))
    }

    /// `ip link add NAME type wireguard` (fails if the name is taken).
    pub fn add_wireguard(&mut self, name: &str) -> Result<(), LinkError> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.into()));
        m.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                InfoKind::Wireguard,
            )]));
        self.execute(
            &format!("create interface {name} (type wireguard)"),
            &[RouteNetlinkMessage::NewLink(m)],
            |_| name.to_string(),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Set the MTU and/or the administrative state of link `index`.
    pub fn set_link(
        &mut self,
        index: u32,
        mtu: Option<u32>,
        up: Option<bool>,
    ) -> Result<(), LinkError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        if let Some(up) = up {
            m.header.change_mask = LinkFlags::Up;
            if up {
                m.header.flags = LinkFlags::Up;
            }
        }
        if let Some(mtu) = mtu {
            m.attributes.push(LinkAttribute::Mtu(mtu));
        }
        self.execute(
            &format!("set link #{index}"),
            &[RouteNetlinkMessage::SetLink(m)],
            |_| format!("link #{index}"),
            0,
        )
    }

    pub fn delete_link(&mut self, index: u32) -> Result<(), LinkError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        self.execute(
            &format!("delete link #{index}"),
            &[RouteNetlinkMessage::DelLink(m)],
            |_| format!("link #{index}"),
            0,
        )
    }

    /// Every address of the namespace, both families.
    pub fn addresses(&mut self) -> Result<Vec<Address>, LinkError> {
        let replies = self.dump(
            "dump addresses",
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
        )?;
        let mut out = Vec::new();
        for m in replies {
            let RouteNetlinkMessage::NewAddress(a) = m else {
                continue;
            };
            // IFA_LOCAL is the local address on point-to-point links, IFA_ADDRESS otherwise.
            let local = a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = local.or_else(|| {
                a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(addr) = addr {
                out.push(Address {
                    index: a.header.index,
                    addr,
                    prefix_len: a.header.prefix_len,
                });
            }
        }
        Ok(out)
    }

    /// The unicast routes of `table`, IPv4 and IPv6.
    pub fn routes(&mut self, table: u32) -> Result<Vec<Route>, LinkError> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut req = RouteMessage::default();
            req.header.address_family = family;
            let replies = self.dump("dump routes", RouteNetlinkMessage::GetRoute(req))?;
            out.extend(replies.into_iter().filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => parse_route(&r).filter(|r| r.table == table),
                _ => None,
            }));
        }
        Ok(out)
    }

    /// Add or replace routes (`ip route replace`).
    pub fn replace_routes(&mut self, routes: &[Route]) -> Result<(), LinkError> {
        let reqs: Vec<_> = routes
            .iter()
            .map(|r| RouteNetlinkMessage::NewRoute(route_message(r)))
            .collect();
        self.execute(
            "install routes",
            &reqs,
            |i| routes[i].to_string(),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    pub fn delete_routes(&mut self, routes: &[Route]) -> Result<(), LinkError> {
        let reqs: Vec<_> = routes
            .iter()
            .map(|r| RouteNetlinkMessage::DelRoute(route_message(r)))
            .collect();
        self.execute("delete routes", &reqs, |i| routes[i].to_string(), 0)
    }

    /// Every policy rule, IPv4 and IPv6.
    pub fn rules(&mut self) -> Result<Vec<Rule>, LinkError> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut req = RuleMessage::default();
            req.header.family = family;
            let replies = self.dump("dump rules", RouteNetlinkMessage::GetRule(req))?;
            out.extend(replies.into_iter().filter_map(|m| match m {
                RouteNetlinkMessage::NewRule(r) => Some(parse_rule(&r)),
                _ => None,
            }));
        }
        Ok(out)
    }

    pub fn add_rules(&mut self, rules: &[Rule]) -> Result<(), LinkError> {
        let reqs: Vec<_> = rules
            .iter()
            .map(|r| RouteNetlinkMessage::NewRule(rule_message(r)))
            .collect();
        self.execute(
            "add rules",
            &reqs,
            |i| rules[i].to_string(),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    pub fn delete_rules(&mut self, rules: &[Rule]) -> Result<(), LinkError> {
        let reqs: Vec<_> = rules
            .iter()
            .map(|r| RouteNetlinkMessage::DelRule(rule_message(r)))
            .collect();
        self.execute("delete rules", &reqs, |i| rules[i].to_string(), 0)
    }
}

fn parse_link(l: &LinkMessage) -> Link {
    let mut link = Link {
        index: l.header.index,
        name: String::new(),
        kind: None,
        mtu: 0,
        up: l.header.flags.contains(LinkFlags::Up),
    };
    for a in &l.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Mtu(m) => link.mtu = *m,
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        link.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    link
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// A unicast route with a destination and an output interface; `None` for anything else
/// (multipath, gateways, local/broadcast routes).
fn parse_route(r: &RouteMessage) -> Option<Route> {
    let kind = match r.header.kind {
        RouteType::Unicast => RouteKind::Unicast,
        RouteType::BlackHole => RouteKind::Blackhole,
        RouteType::Throw => RouteKind::Throw,
        _ => return None,
    };
    let mut table = u32::from(r.header.table);
    let (mut dst, mut oif, mut src) = (None, None, None);
    for a in &r.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(d) => dst = ip_of(d),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::PrefSource(s) => src = ip_of(s),
            RouteAttribute::Gateway(_) | RouteAttribute::MultiPath(_) => return None,
            _ => {}
        }
    }
    let dst = match dst {
        Some(d) => Cidr::new(d, r.header.destination_prefix_length)?,
        None => {
            let any: IpAddr = if r.header.address_family == AddressFamily::Inet6 {
                std::net::Ipv6Addr::UNSPECIFIED.into()
            } else {
                std::net::Ipv4Addr::UNSPECIFIED.into()
            };
            Cidr::new(any, 0)?
        }
    };
    Some(Route {
        dst,
        table,
        oif: if kind == RouteKind::Unicast { oif? } else { 0 },
        src,
        protocol: u8::from(r.header.protocol),
        kind,
    })
}

fn route_message(r: &Route) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = if r.dst.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    m.header.destination_prefix_length = r.dst.prefix_len();
    // The table goes in RTA_TABLE: the header's byte holds only 0..=255.
    m.header.table = if r.table < 256 {
        r.table as u8
    } else {
        RouteHeader::RT_TABLE_UNSPEC
    };
    m.header.protocol = RouteProtocol::from(r.protocol);
    m.header.scope = RouteScope::Link;
    m.header.kind = match r.kind {
        RouteKind::Unicast => RouteType::Unicast,
        RouteKind::Blackhole => RouteType::BlackHole,
        RouteKind::Throw => RouteType::Throw,
    };
    if r.kind != RouteKind::Unicast {
        m.header.scope = RouteScope::Universe;
    }
    m.attributes.push(RouteAttribute::Table(r.table));
    m.attributes
        .push(RouteAttribute::Destination(r.dst.addr().into()));
    if r.kind == RouteKind::Unicast {
        m.attributes.push(RouteAttribute::Oif(r.oif));
    }
    if let Some(s) = r.src {
        m.attributes.push(RouteAttribute::PrefSource(s.into()));
    }
    m
}

fn parse_rule(r: &RuleMessage) -> Rule {
    let mut rule = Rule {
        v6: r.header.family == AddressFamily::Inet6,
        priority: 0,
        invert: r.header.flags.contains(RuleFlags::Invert),
        fwmark: None,
        src: None,
        sport: None,
        table: u32::from(r.header.table),
        other_selectors: r.header.dst_len != 0
            || r.header.tos != 0
            || r.header.action != RuleAction::ToTable,
    };
    let mut has_src = false;
    for a in &r.attributes {
        if matches!(a, RuleAttribute::Source(_)) {
            has_src = true;
        }
        match a {
            RuleAttribute::Priority(p) => rule.priority = *p,
            RuleAttribute::FwMark(m) => rule.fwmark = Some(*m),
            RuleAttribute::FwMask(m) if *m != u32::MAX => rule.other_selectors = true,
            RuleAttribute::FwMask(_) => {}
            RuleAttribute::Table(t) => rule.table = *t,
            RuleAttribute::Protocol(_) => {}
            RuleAttribute::Source(a) => rule.src = Cidr::new(*a, r.header.src_len),
            RuleAttribute::IpProtocol(p) => {
                let p = u8::from(*p);
                rule.sport = Some((p, rule.sport.map_or(0, |s| s.1)));
            }
            RuleAttribute::SourcePortRange(range) if range.start == range.end => {
                rule.sport = Some((rule.sport.map_or(0, |s| s.0), range.start));
            }
            // -1: not set (the kernel reports these on every rule)
            RuleAttribute::SuppressPrefixLen(u32::MAX)
            | RuleAttribute::SuppressIfGroup(u32::MAX) => {}
            _ => rule.other_selectors = true,
        }
    }
    // a source length without an address, or a port without its protocol: not ours
    if (r.header.src_len != 0 && !has_src) || rule.sport.is_some_and(|(p, n)| p == 0 || n == 0) {
        rule.other_selectors = true;
    }
    rule
}

fn rule_message(r: &Rule) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = if r.v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    m.header.action = RuleAction::ToTable;
    m.header.table = if r.table < 256 { r.table as u8 } else { 0 };
    if r.invert {
        m.header.flags = RuleFlags::Invert;
    }
    m.attributes.push(RuleAttribute::Priority(r.priority));
    m.attributes.push(RuleAttribute::Table(r.table));
    if let Some(mark) = r.fwmark {
        m.attributes.push(RuleAttribute::FwMark(mark));
        m.attributes.push(RuleAttribute::FwMask(u32::MAX));
    }
    if let Some(src) = r.src {
        m.header.src_len = src.prefix_len();
        m.attributes.push(RuleAttribute::Source(src.addr()));
    }
    if let Some((p, port)) = r.sport {
        m.attributes.push(RuleAttribute::IpProtocol(
            netlink_packet_route::IpProtocol::from(p),
        ));
        m.attributes.push(RuleAttribute::SourcePortRange(
            netlink_packet_route::rule::RulePortRange {
                start: port,
                end: port,
            },
        ));
    }
    m
}

/// What the kernel told about links, addresses, routes and rules since the last drain.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RtnlEvents {
    /// Changes made by another program (or by the kernel itself, say an address going
    /// with its link): what the daemon last read may no longer be so.
    pub foreign: usize,
    /// Notices lost to a full socket buffer (`ENOBUFS`), or one that did not parse.
    pub lost: bool,
}

impl RtnlEvents {
    /// Whether links, addresses, routes and rules must be read again.
    pub fn any(&self) -> bool {
        self.foreign > 0 || self.lost
    }
}

/// rtnetlink's notifications of link, address, route and rule changes, both families
/// (WireGuard mode reads those objects again only when one says so, or at its slow
/// resync). Changes made through the socket whose port is `ours` are not foreign.
pub struct RtnlWatch {
    watch: super::netlink::Watch,
    ours: u32,
}

impl RtnlWatch {
    pub fn open(ours: u32) -> std::io::Result<RtnlWatch> {
        let groups = [
            libc::RTNLGRP_LINK,
            libc::RTNLGRP_IPV4_IFADDR,
            libc::RTNLGRP_IPV4_ROUTE,
            libc::RTNLGRP_IPV4_RULE,
            libc::RTNLGRP_IPV6_IFADDR,
            libc::RTNLGRP_IPV6_ROUTE,
            libc::RTNLGRP_IPV6_RULE,
        ]
        .iter()
        .fold(0u32, |m, g| m | 1 << (g - 1));
        let watch = super::netlink::Watch::open(super::netlink::NETLINK_ROUTE, groups)?;
        Ok(RtnlWatch { watch, ours })
    }

    /// Read every pending notification.
    pub fn drain(&mut self) -> RtnlEvents {
        let mut ev = RtnlEvents::default();
        let ours = self.ours;
        let lost = self.watch.drain(|d| tally(d, ours, &mut ev));
        ev.lost |= lost;
        ev
    }
}

impl std::os::fd::AsRawFd for RtnlWatch {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.watch.as_raw_fd()
    }
}

/// Count the notifications of one datagram into `ev`.
fn tally(at: &[u8], ours: u32, ev: &mut RtnlEvents) {
    for m in super::netlink::notifications(at) {
        let Some((ty, pid, _)) = m else {
            ev.lost = true;
            break;
        };
        let watched = matches!(
            ty,
            libc::RTM_NEWLINK
                | libc::RTM_DELLINK
                | libc::RTM_NEWADDR
                | libc::RTM_DELADDR
                | libc::RTM_NEWROUTE
                | libc::RTM_DELROUTE
                | libc::RTM_NEWRULE
                | libc::RTM_DELRULE
        );
        if watched && pid != ours {
            ev.foreign += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{Emitable, Parseable};

    /// A notification as the kernel sends it: the header, then `body` bytes.
    fn note(ty: u16, pid: u32, body: usize) -> Vec<u8> {
        let len = 16 + body;
        let mut m = Vec::new();
        m.extend((len as u32).to_ne_bytes());
        m.extend(ty.to_ne_bytes());
        m.extend(0u16.to_ne_bytes());
        m.extend(0u32.to_ne_bytes());
        m.extend(pid.to_ne_bytes());
        m.resize(len.next_multiple_of(4), 0);
        m
    }

    #[test]
    fn notifications_count_other_programs_changes_only() {
        let ours = 4242;
        let mut d = note(libc::RTM_NEWROUTE, ours, 12);
        d.extend(note(libc::RTM_DELROUTE, 0, 13)); // the kernel's own (padded)
        d.extend(note(libc::RTM_NEWRULE, 777, 12));
        d.extend(note(libc::RTM_NEWNEIGH, 777, 12)); // not watched
        d.extend(note(libc::RTM_NEWLINK, ours, 12));
        let mut ev = RtnlEvents::default();
        tally(&d, ours, &mut ev);
        assert_eq!(
            ev,
            RtnlEvents {
                foreign: 2,
                lost: false
            }
        );
        assert!(ev.any());

        let mut ev = RtnlEvents::default();
        tally(&note(libc::RTM_NEWADDR, ours, 8), ours, &mut ev);
        assert!(!ev.any(), "our own change is no reason to read again");

        // A length past the datagram: the rest cannot be read, so read everything.
        let mut bad = note(libc::RTM_NEWLINK, ours, 8);
        bad[0] = 200;
        let mut ev = RtnlEvents::default();
        tally(&bad, ours, &mut ev);
        assert!(ev.lost && ev.any());
    }

    #[test]
    fn route_round_trip() {
        let r = Route {
            kind: RouteKind::Unicast,
            dst: "10.1.2.0/24".parse().unwrap(),
            table: 51871,
            oif: 7,
            src: Some("10.77.0.1".parse().unwrap()),
            protocol: 0xec,
        };
        let m = route_message(&r);
        let mut buf = vec![0; m.buffer_len()];
        m.emit(&mut buf);
        let back = RouteMessage::parse(&buf[..]).unwrap();
        assert_eq!(parse_route(&back), Some(r));
    }

    #[test]
    fn rule_round_trip() {
        let r = Rule {
            src: None,
            sport: None,
            v6: true,
            priority: 31871,
            invert: true,
            fwmark: Some(0xca9f),
            table: 51871,
            other_selectors: false,
        };
        let mut m = rule_message(&r);
        // The kernel reports these on every rule, with -1 for "not set".
        m.attributes
            .push(RuleAttribute::SuppressPrefixLen(u32::MAX));
        m.attributes.push(RuleAttribute::SuppressIfGroup(u32::MAX));
        let mut buf = vec![0; m.buffer_len()];
        m.emit(&mut buf);
        let back = RuleMessage::parse(&buf[..]).unwrap();
        assert_eq!(parse_rule(&back), r);
        assert_eq!(
            r.to_string(),
            "IPv6 rule 31871: not fwmark 0xca9f lookup 51871"
        );
    }
}
