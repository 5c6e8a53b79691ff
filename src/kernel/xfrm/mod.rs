//! The XFRM (kernel IPsec) executor: batched add/update/delete/dump of the objects of
//! [`crate::objects::xfrm`] over a `NETLINK_XFRM` socket (`netlink-packet-xfrm` messages,
//! [`NetlinkSocket`] transport). It refuses, before sending anything, a batch that names
//! an object outside encryptd's bands.
//!
//! # What the kernel lets one change
//! `UPDSA` ([`Xfrm::update_states`]) on an existing valid SA only changes its lifetimes,
//! encapsulation and marks: keys, algorithms and the replay window stay as they were. To
//! change those, add a state with a new SPI (or delete and re-add). `UPDPOLICY`
//! ([`Xfrm::update_policies`]) adds or replaces the policy with the same selector and
//! direction (priority, action and template change).
//!
//! Key bytes live in [`zeroize::Zeroizing`] buffers and are never printed by `Debug`; the netlink
//! messages that carry them are wiped after sending.

use std::fmt;

use netlink_packet_xfrm::{
    self as nx, AF_INET, AF_INET6, IPPROTO_ESP, UserPolicyId, UserPolicyInfo, UserSaId,
    XFRM_POLICY_ALLOW, XFRM_POLICY_IN, XFRM_POLICY_OUT, XfrmAttrs, XfrmMessage,
};
use zeroize::Zeroize;

use super::netlink::{
    Failure, KernelError, NetlinkError, NetlinkSocket, NetlinkStats, XfrmNetlink,
};
use crate::objects::xfrm::*;

mod codec;
use codec::*;

/// Let one socket's own traffic, both ways, bypass every XFRM policy, as IKE daemons do
/// for their sockets: the hello must travel before any SA exists, and a global exemption
/// for its port would also let any other program's datagrams to that port pass in
/// plaintext. `v6`: the socket is AF_INET6 (a dual-stack one covers IPv4 too: the
/// kernel matches a socket policy's empty selector whatever the packet's family).
pub fn bypass_socket(fd: std::os::fd::RawFd, v6: bool) -> std::io::Result<()> {
    use netlink_packet_core::Emitable;
    let (level, opt) = if v6 {
        (libc::SOL_IPV6, libc::IPV6_XFRM_POLICY)
    } else {
        (libc::SOL_IP, libc::IP_XFRM_POLICY)
    };
    for dir in [XFRM_POLICY_IN, XFRM_POLICY_OUT] {
        let mut p = UserPolicyInfo {
            action: XFRM_POLICY_ALLOW,
            direction: dir,
            ..Default::default()
        };
        p.selector.family = if v6 { AF_INET6 } else { AF_INET };
        let mut buf = vec![0u8; p.buffer_len()];
        p.emit(&mut buf);
        // SAFETY: setsockopt with a buffer of the length passed, on a caller's fd.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                buf.as_ptr().cast(),
                buf.len() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// What the kernel told about its XFRM objects since the last drain.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct XfrmEvents {
    /// SA soft limits reached: time to re-key.
    pub soft: usize,
    /// SA hard limits reached: the kernel deleted the SA.
    pub hard: usize,
    /// SAs or policies added, changed, deleted or flushed by another program (or
    /// another socket of ours): what the daemon last applied may no longer be there.
    pub foreign: usize,
    /// Notices lost to a full socket buffer (`ENOBUFS`), or one that did not parse.
    pub lost: bool,
}

impl XfrmEvents {
    /// Whether the kernel's XFRM objects must be read again.
    pub fn any(&self) -> bool {
        self.soft + self.hard + self.foreign > 0 || self.lost
    }
}

/// The kernel's XFRM notifications: SA expiry (`XFRMNLGRP_EXPIRE`, a soft limit reached
/// or a hard one) and every change of an SA or a policy (`XFRMNLGRP_SA`,
/// `XFRMNLGRP_POLICY`). The daemon learns from them when to read the kernel again, so an
/// idle daemon does not have to. Only a wake-up: what changed is read from a dump, which
/// also covers notices lost to a full socket buffer (`ENOBUFS`). Changes made through the
/// socket whose port is `ours` carry that port (the kernel copies the request header's
/// `nlmsg_pid`) and are not foreign.
pub struct XfrmWatch {
    watch: super::netlink::Watch,
    ours: u32,
}

impl XfrmWatch {
    pub fn open(ours: u32) -> std::io::Result<XfrmWatch> {
        let groups = [nx::XFRMNLGRP_EXPIRE, nx::XFRMNLGRP_SA, nx::XFRMNLGRP_POLICY]
            .iter()
            .fold(0u32, |m, g| m | 1 << (g - 1));
        let watch = super::netlink::Watch::open(super::netlink::NETLINK_XFRM, groups)?;
        Ok(XfrmWatch { watch, ours })
    }

    /// Read every pending notification.
    pub fn drain(&mut self) -> XfrmEvents {
        let mut ev = XfrmEvents::default();
        let ours = self.ours;
        let lost = self.watch.drain(|d| tally(d, ours, &mut ev));
        ev.lost |= lost;
        ev
    }
}

/// Count the notifications of one datagram into `ev`.
fn tally(at: &[u8], ours: u32, ev: &mut XfrmEvents) {
    for m in super::netlink::notifications(at) {
        let Some((ty, pid, msg)) = m else {
            ev.lost = true;
            break;
        };
        match ty {
            // payload xfrm_user_expire: xfrm_usersa_info, then the `hard` byte
            nx::XFRM_MSG_EXPIRE => match nx::UserExpire::parse(&msg[16..]) {
                Ok(e) if e.hard != 0 => ev.hard += 1,
                Ok(_) => ev.soft += 1,
                Err(_) => ev.lost = true,
            },
            nx::XFRM_MSG_NEWSA
            | nx::XFRM_MSG_DELSA
            | nx::XFRM_MSG_UPDSA
            | nx::XFRM_MSG_FLUSHSA
            | nx::XFRM_MSG_NEWPOLICY
            | nx::XFRM_MSG_DELPOLICY
            | nx::XFRM_MSG_UPDPOLICY
            | nx::XFRM_MSG_FLUSHPOLICY
                if pid != ours =>
            {
                ev.foreign += 1
            }
            _ => {}
        }
    }
}

impl std::os::fd::AsRawFd for XfrmWatch {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.watch.as_raw_fd()
    }
}

/// One netlink message as a dump reply brings it (header included), decoded and parsed
/// as `dump_states`/`dump_policies` do: the fuzz target of the kernel's replies.
#[doc(hidden)]
pub fn parse_dump_reply(bytes: &[u8]) {
    use super::netlink::Protocol;
    use netlink_packet_core::NetlinkMessage;
    if bytes.len() < 16 {
        return;
    }
    let ty = u16::from_ne_bytes([bytes[4], bytes[5]]);
    // The length the header claims, as the socket's reader checks it before this.
    let len = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    if len < 16 || len > bytes.len() {
        return;
    }
    let bytes = &bytes[..len];
    if super::netlink::XfrmNetlink::dump_reply_ok(ty, bytes.len() - 16).is_err() {
        return;
    }
    let Ok(m) = NetlinkMessage::<XfrmMessage>::deserialize(bytes) else {
        return;
    };
    if let netlink_packet_core::NetlinkPayload::InnerMessage(inner) = m.payload {
        match inner {
            XfrmMessage::AddSa(m) | XfrmMessage::UpdateSa(m) => {
                if let Ok(d) = parse_state(&m.user_sa_info, &m.nlas) {
                    let _ = (d.id(), d.is_ours(), format!("{:?}", d.extras));
                }
            }
            XfrmMessage::AddPolicy(m) | XfrmMessage::UpdatePolicy(m) => {
                let _ = parse_policy(Op::DumpPolicies, &m.user_policy_info, &m.nlas);
            }
            _ => {}
        }
    }
}

/// Dump replies as the kernel sends them, for the fuzz corpus: an AES-128-GCM tunnel
/// state with ESN and lifetimes, an AES-256-GCM one with the legacy replay window, and
/// a tunnel policy with a template.
#[doc(hidden)]
pub fn example_dump_replies() -> Vec<Vec<u8>> {
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload};
    let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("an address");
    let mut gcm = XfrmState::tunnel(
        ip("10.0.0.1"),
        ip("10.0.0.2"),
        0x1001,
        REQID_MIN + 1,
        Algorithm::gcm_aes(zeroize::Zeroizing::new(vec![0xAB; 20]), 128),
    );
    gcm.lifetime.soft_packets = Some(900);
    gcm.lifetime.hard_secs = Some(3600);
    let mut gcm256 = XfrmState::tunnel(
        ip("fd00::1"),
        ip("fd00::2"),
        0x2002,
        REQID_MIN + 1,
        Algorithm::gcm_aes(zeroize::Zeroizing::new(vec![0xCD; 36]), 128),
    );
    gcm256.replay_window = 32;
    gcm256.esn = false;
    let policy = XfrmPolicy {
        selector: Selector::hosts(ip("10.0.0.1"), ip("10.0.0.2")),
        dir: Direction::Out,
        priority: PRIORITY_TUNNEL,
        action: Action::Allow,
        template: Some(Template {
            src: ip("10.0.0.1"),
            dst: ip("10.0.0.2"),
            reqid: REQID_MIN + 1,
            mode: EncapMode::Tunnel,
        }),
    };
    let mut msgs: Vec<XfrmMessage> = [gcm, gcm256]
        .iter()
        .filter_map(|s| state_message(Op::AddStates, s).ok())
        .map(XfrmMessage::AddSa)
        .collect();
    msgs.push(XfrmMessage::AddPolicy(policy_message(&policy)));
    msgs.into_iter()
        .map(|m| {
            let mut n =
                NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::InnerMessage(m));
            n.finalize();
            let mut buf = vec![0; n.buffer_len()];
            n.serialize(&mut buf);
            buf
        })
        .collect()
}

/// `XFRM_POLICY_MAX`: dumped policies at or past this direction are sockets' own.
const SOCKET_POLICY_DIR: u8 = 3;

/// The operation of a batch, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Open,
    AddStates,
    UpdateStates,
    DeleteStates,
    AddPolicies,
    UpdatePolicies,
    DeletePolicies,
    DumpStates,
    DumpPolicies,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Open => "open the XFRM netlink socket",
            Op::AddStates => "add XFRM states",
            Op::UpdateStates => "update XFRM states",
            Op::DeleteStates => "delete XFRM states",
            Op::AddPolicies => "add XFRM policies",
            Op::UpdatePolicies => "update XFRM policies",
            Op::DeletePolicies => "delete XFRM policies",
            Op::DumpStates => "dump XFRM states",
            Op::DumpPolicies => "dump XFRM policies",
        })
    }
}

/// One object the kernel rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Position in the slice given to the call.
    pub index: usize,
    /// The object, e.g. `state 10.0.0.1→10.0.0.2 spi 0x… reqid 0x…` or
    /// `policy out 10.0.0.1/32 → 10.0.0.2/32`.
    pub object: String,
    pub error: KernelError,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.error)
    }
}

/// Errors of the XFRM executor.
#[derive(Debug, thiserror::Error)]
pub enum XfrmError {
    /// The socket failed; for a batch, the outcome of its unsent/unacknowledged part is
    /// unknown (dump to find out).
    #[error("{op}: {source}")]
    Netlink {
        op: Op,
        #[source]
        source: NetlinkError,
    },
    /// The kernel rejected some objects of a batch; all others were applied.
    #[error("{op}: the kernel rejected {} of {attempted}: {}", rejected.len(), list(rejected))]
    Rejected {
        op: Op,
        attempted: usize,
        rejected: Vec<Rejection>,
    },
    /// Nothing was sent: the batch names an object encryptd must not or cannot install.
    #[error("{op}: refusing {object}: {reason}")]
    Refused {
        op: Op,
        object: String,
        reason: String,
    },
    /// A dump reply did not have the expected shape.
    #[error("{op}: unexpected reply: {reason}")]
    Unexpected { op: Op, reason: String },
}

fn list(r: &[Rejection]) -> String {
    const SHOWN: usize = 5;
    let mut s = r
        .iter()
        .take(SHOWN)
        .map(Rejection::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    if r.len() > SHOWN {
        s.push_str(&format!("; and {} more", r.len() - SHOWN));
    }
    s
}

/// XFRM messages that may hold key copies: wiped on drop.
struct Scrubbed(Vec<XfrmMessage>);

impl Drop for Scrubbed {
    fn drop(&mut self) {
        for m in &mut self.0 {
            if let XfrmMessage::AddSa(m) | XfrmMessage::UpdateSa(m) = m {
                scrub(&mut m.nlas);
            }
        }
    }
}

fn scrub(nlas: &mut [XfrmAttrs]) {
    for a in nlas {
        match a {
            XfrmAttrs::EncryptionAlgAead(a) => a.alg_key.zeroize(),
            XfrmAttrs::EncryptionAlg(a) | XfrmAttrs::AuthenticationAlg(a) => a.alg_key.zeroize(),
            XfrmAttrs::AuthenticationAlgTrunc(a) => a.alg_key.zeroize(),
            _ => {}
        }
    }
}

/// The executor: one `NETLINK_XFRM` socket in the network namespace of the thread that
/// opened it.
#[derive(Debug)]
pub struct Xfrm {
    sock: NetlinkSocket<XfrmNetlink>,
}

impl Xfrm {
    pub fn open() -> Result<Xfrm, XfrmError> {
        let sock = NetlinkSocket::open().map_err(|source| XfrmError::Netlink {
            op: Op::Open,
            source,
        })?;
        Ok(Xfrm { sock })
    }

    /// The command socket's netlink port, which the notifications of its changes carry
    /// (see [`XfrmWatch`]).
    pub fn port(&self) -> u32 {
        self.sock.port()
    }

    /// Messages / `sendmsg` / `recv` counts of the socket.
    pub fn stats(&self) -> NetlinkStats {
        self.sock.stats()
    }

    /// Add new states (`XFRM_MSG_NEWSA`); an existing (dst, spi) is an error (EEXIST).
    pub fn add_states(&mut self, states: &[XfrmState]) -> Result<(), XfrmError> {
        self.write_states(Op::AddStates, states)
    }

    /// `XFRM_MSG_UPDSA`: see the module documentation for what the kernel changes.
    pub fn update_states(&mut self, states: &[XfrmState]) -> Result<(), XfrmError> {
        self.write_states(Op::UpdateStates, states)
    }

    /// Delete states by (dst, spi, ESP); the rest of each state is only checked for
    /// ownership. Deleting a state that is gone is an error (ESRCH).
    pub fn delete_states(&mut self, states: &[XfrmState]) -> Result<(), XfrmError> {
        let op = Op::DeleteStates;
        for s in states {
            check_state_owner(op, s)?;
        }
        let msgs: Vec<XfrmMessage> = states
            .iter()
            .map(|s| {
                let mut id = UserSaId::default();
                id.destination(&s.dst);
                id.spi = s.spi;
                id.proto = IPPROTO_ESP;
                XfrmMessage::DeleteSa(nx::state::DelGetMessage {
                    user_sa_id: id,
                    nlas: vec![],
                })
            })
            .collect();
        // ESRCH: gone already (the kernel deletes an SA at its hard limit, and may do so
        // between our dump and this delete): what the delete wanted.
        let r = self.sock.execute(&op.to_string(), &msgs, 0).map(|f| {
            f.into_iter()
                .filter(|f| f.error.errno != libc::ESRCH)
                .collect()
        });
        finish(op, r, states.len(), |i| states[i].to_string())
    }

    /// Add new policies (`XFRM_MSG_NEWPOLICY`); an existing selector+direction is EEXIST.
    pub fn add_policies(&mut self, policies: &[XfrmPolicy]) -> Result<(), XfrmError> {
        self.write_policies(Op::AddPolicies, policies)
    }

    /// Add or replace policies (`XFRM_MSG_UPDPOLICY`) by selector and direction.
    pub fn update_policies(&mut self, policies: &[XfrmPolicy]) -> Result<(), XfrmError> {
        self.write_policies(Op::UpdatePolicies, policies)
    }

    /// Delete policies by selector and direction (main policy type, no mark); the rest of
    /// each policy is only checked for ownership.
    pub fn delete_policies(&mut self, policies: &[XfrmPolicy]) -> Result<(), XfrmError> {
        let op = Op::DeletePolicies;
        for p in policies {
            check_policy(op, p)?;
        }
        let msgs: Vec<XfrmMessage> = policies
            .iter()
            .map(|p| {
                XfrmMessage::DeletePolicy(nx::policy::DelGetMessage {
                    user_policy_id: UserPolicyId {
                        selector: p.selector.to_kernel(),
                        index: 0,
                        direction: p.dir.to_kernel(),
                    },
                    nlas: vec![],
                })
            })
            .collect();
        let r = self.sock.execute(&op.to_string(), &msgs, 0);
        finish(op, r, policies.len(), |i| policies[i].id().to_string())
    }

    /// Every state of the namespace, encryptd's and foreign ones, with keys and counters.
    pub fn dump_states(&mut self) -> Result<Vec<DumpedState>, XfrmError> {
        let op = Op::DumpStates;
        let req = XfrmMessage::GetDumpSa(nx::state::GetDumpMessage::default());
        let replies = Scrubbed(
            self.sock
                .dump(&op.to_string(), &req)
                .map_err(|source| XfrmError::Netlink { op, source })?,
        );
        let mut out = Vec::with_capacity(replies.0.len());
        for m in &replies.0 {
            match m {
                XfrmMessage::AddSa(m) | XfrmMessage::UpdateSa(m) => {
                    out.push(parse_state(&m.user_sa_info, &m.nlas)?)
                }
                other => {
                    return Err(XfrmError::Unexpected {
                        op,
                        reason: format!("message type {}", other.message_type()),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Every policy of the namespace (main and sub policy types), encryptd's and foreign.
    pub fn dump_policies(&mut self) -> Result<Vec<DumpedPolicy>, XfrmError> {
        let op = Op::DumpPolicies;
        // An empty request: the crate's GetPolicy would carry a policy id the kernel's dump
        // start would try to parse as attributes.
        let req = XfrmMessage::Other((nx::XFRM_MSG_GETPOLICY, vec![]));
        let replies = self
            .sock
            .dump(&op.to_string(), &req)
            .map_err(|source| XfrmError::Netlink { op, source })?;
        let mut out = Vec::with_capacity(replies.len());
        for m in &replies {
            match m {
                // A socket's own policy (the hello socket's bypass, an IKE daemon's) is
                // dumped with XFRM_POLICY_MAX added to its direction: not in the SPD.
                XfrmMessage::AddPolicy(m) | XfrmMessage::UpdatePolicy(m)
                    if m.user_policy_info.direction >= SOCKET_POLICY_DIR => {}
                XfrmMessage::AddPolicy(m) | XfrmMessage::UpdatePolicy(m) => {
                    out.push(parse_policy(op, &m.user_policy_info, &m.nlas)?)
                }
                other => {
                    return Err(XfrmError::Unexpected {
                        op,
                        reason: format!("message type {}", other.message_type()),
                    });
                }
            }
        }
        Ok(out)
    }

    fn write_states(&mut self, op: Op, states: &[XfrmState]) -> Result<(), XfrmError> {
        let mut msgs = Scrubbed(Vec::with_capacity(states.len()));
        for s in states {
            let m = state_message(op, s)?;
            msgs.0.push(if op == Op::UpdateStates {
                XfrmMessage::UpdateSa(m)
            } else {
                XfrmMessage::AddSa(m)
            });
        }
        let r = self.sock.execute(&op.to_string(), &msgs.0, 0);
        drop(msgs);
        finish(op, r, states.len(), |i| states[i].to_string())
    }

    fn write_policies(&mut self, op: Op, policies: &[XfrmPolicy]) -> Result<(), XfrmError> {
        let mut msgs = Vec::with_capacity(policies.len());
        for p in policies {
            check_policy(op, p)?;
            let m = policy_message(p);
            msgs.push(if op == Op::UpdatePolicies {
                XfrmMessage::UpdatePolicy(m)
            } else {
                XfrmMessage::AddPolicy(m)
            });
        }
        let r = self.sock.execute(&op.to_string(), &msgs, 0);
        finish(op, r, policies.len(), |i| policies[i].id().to_string())
    }
}

/// Turn the socket's verdicts into the executor's result, naming each rejected object.
fn finish(
    op: Op,
    r: Result<Vec<Failure>, NetlinkError>,
    attempted: usize,
    name: impl Fn(usize) -> String,
) -> Result<(), XfrmError> {
    let failures = r.map_err(|source| XfrmError::Netlink { op, source })?;
    if failures.is_empty() {
        return Ok(());
    }
    Err(XfrmError::Rejected {
        op,
        attempted,
        rejected: failures
            .into_iter()
            .map(|f| Rejection {
                object: name(f.index),
                index: f.index,
                error: f.error,
            })
            .collect(),
    })
}

fn refuse(op: Op, object: impl fmt::Display, reason: impl Into<String>) -> XfrmError {
    XfrmError::Refused {
        op,
        object: object.to_string(),
        reason: reason.into(),
    }
}

fn check_state_owner(op: Op, s: &XfrmState) -> Result<(), XfrmError> {
    if !s.is_ours() {
        return Err(refuse(
            op,
            s,
            format!("reqid outside encryptd's band 0x{REQID_MIN:08x}..=0x{REQID_MAX:08x}"),
        ));
    }
    Ok(())
}

fn check_policy(op: Op, p: &XfrmPolicy) -> Result<(), XfrmError> {
    let id = p.id();
    if !is_our_priority(p.priority) {
        return Err(refuse(
            op,
            id,
            format!(
                "priority 0x{:08x} outside encryptd's band 0x{PRIORITY_MIN:08x}..=0x{PRIORITY_MAX:08x}",
                p.priority
            ),
        ));
    }
    if let Some(t) = &p.template {
        if !is_our_reqid(t.reqid) {
            return Err(refuse(
                op,
                id,
                format!("template reqid 0x{:08x} outside encryptd's band", t.reqid),
            ));
        }
        if t.src.is_ipv4() != t.dst.is_ipv4() {
            return Err(refuse(op, id, "template addresses of different families"));
        }
        if p.action == Action::Block {
            return Err(refuse(op, id, "a block policy with a template"));
        }
    }
    if p.selector.src.is_ipv4() != p.selector.dst.is_ipv4() {
        return Err(refuse(op, id, "selector prefixes of different families"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use netlink_packet_xfrm::XFRM_STATE_ESN;
    use zeroize::Zeroizing;

    use super::*;

    fn notice(ty: u16, pid: u32, payload: &[u8]) -> Vec<u8> {
        let len = 16 + payload.len();
        let mut m = Vec::new();
        m.extend((len as u32).to_ne_bytes());
        m.extend(ty.to_ne_bytes());
        m.extend(0u16.to_ne_bytes());
        m.extend(7u32.to_ne_bytes());
        m.extend(pid.to_ne_bytes());
        m.extend(payload);
        m.resize(len.next_multiple_of(4), 0);
        m
    }

    #[test]
    fn only_other_programs_changes_are_foreign() {
        const OURS: u32 = 4242;
        let count = |bytes: &[u8]| {
            let mut ev = XfrmEvents::default();
            tally(bytes, OURS, &mut ev);
            ev
        };
        let ours = [
            notice(nx::XFRM_MSG_NEWSA, OURS, &[0; 224]),
            notice(nx::XFRM_MSG_DELPOLICY, OURS, &[0; 64]),
        ]
        .concat();
        assert_eq!(count(&ours), XfrmEvents::default());
        assert!(!count(&ours).any(), "our own changes wake nothing");
        // `ip xfrm state flush` (pid 0), another daemon's policy, a deleted SA
        let theirs = [
            notice(nx::XFRM_MSG_FLUSHSA, 0, &[50, 0, 0, 0]),
            notice(nx::XFRM_MSG_NEWPOLICY, 77, &[0; 168]),
            notice(nx::XFRM_MSG_DELSA, 0, &[0; 24]),
            notice(nx::XFRM_MSG_NEWAE, 0, &[0; 24]),
        ]
        .concat();
        let ev = count(&theirs);
        assert_eq!((ev.foreign, ev.lost), (3, false), "{ev:?}");
        assert!(ev.any());
        // a cut message, an expiry that does not parse: lost, so the caller re-reads
        let cut = &theirs[..40];
        assert!(count(cut).lost);
        assert!(count(&notice(nx::XFRM_MSG_EXPIRE, 0, &[1, 2, 3])).lost);
    }
    use crate::net::Cidr;

    /// objects::xfrm states the kernel's limit as a number, without netlink.
    #[test]
    fn the_replay_window_limit_is_the_kernels() {
        assert_eq!(MAX_REPLAY_WINDOW as usize, nx::XFRMA_REPLAY_ESN_MAX);
    }

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn gcm_state() -> XfrmState {
        XfrmState::tunnel(
            v4("10.0.0.1"),
            v4("10.0.0.2"),
            0x1001,
            REQID_MIN + 1,
            Algorithm::gcm_aes(Zeroizing::new(vec![0xAB; 20]), 128),
        )
    }

    #[test]
    fn the_fuzz_seeds_are_replies_the_parser_takes() {
        use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
        let (mut states, mut policies) = (0, 0);
        for b in example_dump_replies() {
            let m = NetlinkMessage::<XfrmMessage>::deserialize(&b).expect("decodes");
            match m.payload {
                NetlinkPayload::InnerMessage(XfrmMessage::AddSa(m)) => {
                    let d = parse_state(&m.user_sa_info, &m.nlas).expect("parses");
                    assert!(d.extras.is_empty(), "{:?}", d.extras);
                    states += 1;
                }
                NetlinkPayload::InnerMessage(XfrmMessage::AddPolicy(m)) => {
                    parse_policy(Op::DumpPolicies, &m.user_policy_info, &m.nlas).expect("parses");
                    policies += 1;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!((states, policies), (2, 1));
    }

    /// Found by fuzzing: netlink-packet-xfrm slices a policy's fixed header unchecked.
    #[test]
    fn a_dump_reply_shorter_than_its_header_is_refused_not_a_panic() {
        use super::super::netlink::{Protocol, XfrmNetlink};
        let e = XfrmNetlink::dump_reply_ok(nx::XFRM_MSG_NEWPOLICY, 6).unwrap_err();
        assert!(e.contains("shorter than its 168-byte header"), "{e}");
        assert!(XfrmNetlink::dump_reply_ok(nx::XFRM_MSG_NEWSA, nx::XFRM_USER_SA_INFO_LEN).is_ok());
        assert!(XfrmNetlink::dump_reply_ok(nx::XFRM_MSG_EXPIRE, 500).is_err());
        let crash = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fuzz/corpus/xfrm_dump/crash-short-policy"
        ))
        .unwrap();
        parse_dump_reply(&crash);
    }

    #[test]
    fn debug_never_prints_keys() {
        let s = gcm_state();
        let d = format!("{s:?}");
        assert!(d.contains("20 bytes redacted"), "{d}");
        assert!(
            !d.contains("171") && !d.to_lowercase().contains("ab, "),
            "{d}"
        );
        let a = Algorithm::cbc_aes_hmac_sha256(
            Zeroizing::new(vec![0xCD; 16]),
            Zeroizing::new(vec![0xEF; 32]),
            128,
        );
        let d = format!("{a:?}");
        assert!(!d.contains("205") && !d.contains("239"), "{d}");
    }

    #[test]
    fn state_message_round_trips_through_the_parser() {
        let s = gcm_state();
        let m = state_message(Op::AddStates, &s).unwrap();
        assert_eq!(m.user_sa_info.flags & XFRM_STATE_ESN, XFRM_STATE_ESN);
        assert_eq!(m.user_sa_info.replay_window, 0);
        let esn = m.nlas.iter().find_map(|a| match a {
            XfrmAttrs::ReplayStateEsn(r) => Some(r.clone()),
            _ => None,
        });
        let esn = esn.unwrap();
        assert_eq!((esn.bmp_len, esn.replay_window), (128, 4096));
        let d = parse_state(&m.user_sa_info, &m.nlas).unwrap();
        assert_eq!(d.state, s);
        assert!(d.extras.is_empty(), "{:?}", d.extras);
        assert!(d.is_ours());
    }

    #[test]
    fn foreign_objects_are_refused() {
        let mut s = gcm_state();
        s.reqid = 7;
        let e = state_message(Op::AddStates, &s).unwrap_err();
        assert!(e.to_string().contains("spi 0x00001001"), "{e}");
        let p = XfrmPolicy {
            selector: Selector::hosts(v4("10.0.0.1"), v4("10.0.0.2")),
            dir: Direction::Out,
            priority: 0,
            action: Action::Allow,
            template: None,
        };
        assert!(!p.is_ours());
        let e = check_policy(Op::AddPolicies, &p).unwrap_err();
        assert!(
            e.to_string()
                .contains("policy out 10.0.0.1/32 → 10.0.0.2/32"),
            "{e}"
        );
    }

    #[test]
    fn policy_message_round_trips_through_the_parser() {
        let a: IpAddr = "fd00::1".parse().unwrap();
        let b: IpAddr = "fd00::2".parse().unwrap();
        for p in [
            XfrmPolicy {
                selector: Selector::hosts(a, b).icmp_type(135),
                dir: Direction::In,
                priority: PRIORITY_EXEMPT,
                action: Action::Allow,
                template: None,
            },
            XfrmPolicy {
                selector: Selector::new("fd00::/8".parse().unwrap(), Cidr::host(b)).udp_dport(4510),
                dir: Direction::Out,
                priority: PRIORITY_TUNNEL,
                action: Action::Allow,
                template: Some(Template {
                    src: a,
                    dst: b,
                    reqid: REQID_MAX,
                    mode: EncapMode::Tunnel,
                }),
            },
        ] {
            let m = policy_message(&p);
            let d = parse_policy(Op::DumpPolicies, &m.user_policy_info, &m.nlas).unwrap();
            assert_eq!(d.policy, p);
            assert!(d.extras.is_empty(), "{:?}", d.extras);
            assert!(d.is_ours());
        }
    }
}
