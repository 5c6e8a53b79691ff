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
//! Key bytes live in [`Zeroizing`] buffers and are never printed by `Debug`; the netlink
//! messages that carry them are wiped after sending.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_xfrm::{
    self as nx, AF_INET, AF_INET6, Address, Alg, AlgAead, AlgAuth, IPPROTO_ESP, LifetimeConfig,
    ReplayEsn, UserPolicyId, UserPolicyInfo, UserSaId, UserSaInfo, UserTemplate,
    XFRM_MODE_TRANSPORT, XFRM_MODE_TUNNEL, XFRM_POLICY_ALLOW, XFRM_POLICY_BLOCK, XFRM_POLICY_FWD,
    XFRM_POLICY_IN, XFRM_POLICY_OUT, XFRM_STATE_ESN, XfrmAttrs, XfrmMessage,
};
use zeroize::{Zeroize, Zeroizing};

use super::netlink::{
    Failure, KernelError, NETLINK_XFRM, NetlinkError, NetlinkSocket, NetlinkStats,
};
use crate::net::Cidr;
use crate::objects::xfrm::*;

const ALG_NAME_LEN: usize = 64;

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

/// `XFRM_POLICY_MAX`: dumped policies at or past this direction are sockets' own.
const SOCKET_POLICY_DIR: u8 = 3;

// The codec of the object model: encryptd's values to the kernel's and back.
impl EncapMode {
    fn to_kernel(self) -> u8 {
        match self {
            EncapMode::Transport => XFRM_MODE_TRANSPORT,
            EncapMode::Tunnel => XFRM_MODE_TUNNEL,
            EncapMode::Other(m) => m,
        }
    }

    fn from_kernel(m: u8) -> EncapMode {
        match m {
            XFRM_MODE_TRANSPORT => EncapMode::Transport,
            XFRM_MODE_TUNNEL => EncapMode::Tunnel,
            m => EncapMode::Other(m),
        }
    }
}

impl Direction {
    fn to_kernel(self) -> u8 {
        match self {
            Direction::In => XFRM_POLICY_IN,
            Direction::Out => XFRM_POLICY_OUT,
            Direction::Fwd => XFRM_POLICY_FWD,
        }
    }

    fn from_kernel(d: u8) -> Option<Direction> {
        match d {
            XFRM_POLICY_IN => Some(Direction::In),
            XFRM_POLICY_OUT => Some(Direction::Out),
            XFRM_POLICY_FWD => Some(Direction::Fwd),
            _ => None,
        }
    }
}

impl Selector {
    fn to_kernel(self) -> nx::Selector {
        let mut k = nx::Selector::default();
        k.source_prefix(&self.src.addr(), self.src.prefix_len());
        k.destination_prefix(&self.dst.addr(), self.dst.prefix_len());
        k.proto = self.proto.unwrap_or(0);
        if let Some(p) = self.sport {
            k.sport = p;
            k.sport_mask = u16::MAX;
        }
        if let Some(p) = self.dport {
            k.dport = p;
            k.dport_mask = u16::MAX;
        }
        k
    }

    /// The selector of a dumped policy; what does not fit is appended to `extras`.
    fn from_kernel(k: &nx::Selector, extras: &mut Vec<String>) -> Selector {
        let (src, dst) = match k.family {
            AF_INET | AF_INET6 => (
                kernel_cidr(k.family, &k.saddr, k.prefixlen_s, "source", extras),
                kernel_cidr(k.family, &k.daddr, k.prefixlen_d, "destination", extras),
            ),
            fam => {
                extras.push(format!("selector family {fam}"));
                let any = Cidr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0).expect("0.0.0.0/0");
                (any, any)
            }
        };
        let mut port = |v: u16, mask: u16, what: &str| match mask {
            0 => None,
            u16::MAX => Some(v),
            m => {
                extras.push(format!("{what} port {v} mask 0x{m:04x}"));
                Some(v & m)
            }
        };
        let sport = port(k.sport, k.sport_mask, "source");
        let dport = port(k.dport, k.dport_mask, "destination");
        if k.ifindex != 0 {
            extras.push(format!("selector ifindex {}", k.ifindex));
        }
        if k.user != 0 {
            extras.push(format!("selector user {}", k.user));
        }
        Selector {
            src,
            dst,
            proto: (k.proto != 0).then_some(k.proto),
            sport,
            dport,
        }
    }
}

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
    sock: NetlinkSocket,
}

impl Xfrm {
    pub fn open() -> Result<Xfrm, XfrmError> {
        let sock = NetlinkSocket::open(NETLINK_XFRM).map_err(|source| XfrmError::Netlink {
            op: Op::Open,
            source,
        })?;
        Ok(Xfrm { sock })
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
        let r = self.sock.execute(&op.to_string(), &msgs, 0);
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

fn alg_name(op: Op, s: &XfrmState, name: &str) -> Result<[u8; ALG_NAME_LEN], XfrmError> {
    let mut out = [0u8; ALG_NAME_LEN];
    if name.is_empty() || name.len() >= ALG_NAME_LEN || name.contains('\0') {
        return Err(refuse(op, s, format!("bad algorithm name {name:?}")));
    }
    out[..name.len()].copy_from_slice(name.as_bytes());
    Ok(out)
}

fn key_bits(op: Op, s: &XfrmState, key: &[u8]) -> Result<u32, XfrmError> {
    u32::try_from(key.len() * 8).map_err(|_| refuse(op, s, "key too long"))
}

fn state_message(op: Op, s: &XfrmState) -> Result<nx::state::ModifyMessage, XfrmError> {
    check_state_owner(op, s)?;
    if s.src.is_ipv4() != s.dst.is_ipv4() {
        return Err(refuse(
            op,
            s,
            "source and destination of different families",
        ));
    }
    if s.spi == 0 {
        return Err(refuse(op, s, "SPI 0 is reserved"));
    }
    if s.replay_window > MAX_REPLAY_WINDOW {
        return Err(refuse(
            op,
            s,
            format!(
                "replay window {} exceeds {MAX_REPLAY_WINDOW}",
                s.replay_window
            ),
        ));
    }
    let mut info = UserSaInfo::default();
    info.source(&s.src);
    info.destination(&s.dst);
    info.id.spi = s.spi;
    info.id.proto = IPPROTO_ESP;
    info.reqid = s.reqid;
    info.mode = s.mode.to_kernel();
    info.lifetime_cfg = LifetimeConfig::default();
    info.selector.family = info.family;
    // Validate everything before the first key copy exists.
    let mut nlas = Vec::with_capacity(3);
    match &s.algorithm {
        Algorithm::Aead {
            name,
            key,
            icv_bits,
        } => {
            let (alg_name, alg_key_len) = (alg_name(op, s, name)?, key_bits(op, s, key)?);
            nlas.push(XfrmAttrs::EncryptionAlgAead(AlgAead {
                alg_name,
                alg_key_len,
                alg_icv_len: *icv_bits,
                alg_key: key.to_vec(),
            }));
        }
        Algorithm::EncAuth {
            enc,
            enc_key,
            auth,
            auth_key,
            trunc_bits,
        } => {
            let (enc_name, enc_bits) = (alg_name(op, s, enc)?, key_bits(op, s, enc_key)?);
            let (auth_name, auth_bits) = (alg_name(op, s, auth)?, key_bits(op, s, auth_key)?);
            nlas.push(XfrmAttrs::EncryptionAlg(Alg {
                alg_name: enc_name,
                alg_key_len: enc_bits,
                alg_key: enc_key.to_vec(),
            }));
            nlas.push(XfrmAttrs::AuthenticationAlgTrunc(AlgAuth {
                alg_name: auth_name,
                alg_key_len: auth_bits,
                alg_trunc_len: *trunc_bits,
                alg_key: auth_key.to_vec(),
            }));
        }
        Algorithm::Unsupported(what) => {
            return Err(refuse(op, s, format!("unsupported algorithm {what}")));
        }
    }
    // The legacy 32-bit bitmap only holds 32 packets; bigger windows (and ESN) use the
    // ESN replay state, whose bitmap length is given in 32-bit words. The header alone is
    // enough: the kernel allocates and zeroes the bitmap.
    if s.esn || s.replay_window > 32 {
        if s.esn {
            info.flags |= XFRM_STATE_ESN;
        }
        nlas.push(XfrmAttrs::ReplayStateEsn(ReplayEsn {
            bmp_len: s.replay_window.div_ceil(32),
            replay_window: s.replay_window,
            ..Default::default()
        }));
    } else {
        info.replay_window = s.replay_window as u8;
    }
    Ok(nx::state::ModifyMessage {
        user_sa_info: info,
        nlas,
    })
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

fn policy_message(p: &XfrmPolicy) -> nx::policy::ModifyMessage {
    let info = UserPolicyInfo {
        selector: p.selector.to_kernel(),
        lifetime_cfg: LifetimeConfig::default(),
        priority: p.priority,
        direction: p.dir.to_kernel(),
        action: match p.action {
            Action::Allow => XFRM_POLICY_ALLOW,
            Action::Block => XFRM_POLICY_BLOCK,
        },
        ..Default::default()
    };
    let mut nlas = Vec::new();
    if let Some(t) = &p.template {
        let mut k = UserTemplate::default();
        k.source(&t.src);
        k.destination(&t.dst);
        k.id.proto = IPPROTO_ESP;
        k.reqid = t.reqid;
        k.mode = t.mode.to_kernel();
        nlas.push(XfrmAttrs::Template(vec![k]));
    }
    nx::policy::ModifyMessage {
        user_policy_info: info,
        nlas,
    }
}

fn kernel_ip(family: u16, a: &Address) -> IpAddr {
    if family == AF_INET {
        IpAddr::V4(a.to_ipv4())
    } else {
        IpAddr::V6(a.to_ipv6())
    }
}

fn kernel_cidr(family: u16, a: &Address, len: u8, what: &str, extras: &mut Vec<String>) -> Cidr {
    let ip = kernel_ip(family, a);
    let max = if family == AF_INET { 32 } else { 128 };
    let len = if len > max {
        extras.push(format!("{what} prefix length {len}"));
        max
    } else {
        len
    };
    let masked = match ip {
        IpAddr::V4(v) => {
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v) & m))
        }
        IpAddr::V6(v) => {
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v) & m))
        }
    };
    if masked != ip {
        extras.push(format!("{what} {ip}/{len} has host bits set"));
    }
    Cidr::new(masked, len).expect("masked prefix of valid length")
}

fn c_name(name: &[u8]) -> String {
    let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
    String::from_utf8_lossy(&name[..end]).into_owned()
}

/// The key bytes of an algorithm attribute (the attribute may be padded).
fn key_of(key: &mut Vec<u8>, bits: u32) -> Key {
    let n = (bits as usize).div_ceil(8).min(key.len());
    let k = Zeroizing::new(key[..n].to_vec());
    key.zeroize();
    k
}

fn parse_state(info: &UserSaInfo, nlas: &[XfrmAttrs]) -> Result<DumpedState, XfrmError> {
    // Work on a copy whose keys we wipe as we take them.
    let mut nlas = Scrubbed(vec![XfrmMessage::AddSa(nx::state::ModifyMessage {
        user_sa_info: *info,
        nlas: nlas.to_vec(),
    })]);
    let XfrmMessage::AddSa(m) = &mut nlas.0[0] else {
        unreachable!()
    };
    let mut extras = Vec::new();
    let (mut aead, mut enc, mut auth_trunc, mut auth, mut esn_state, mut legacy) =
        (None, None, None, None, None, None);
    for a in m.nlas.iter_mut() {
        match a {
            XfrmAttrs::EncryptionAlgAead(a) => {
                aead = Some((
                    c_name(&a.alg_name),
                    key_of(&mut a.alg_key, a.alg_key_len),
                    a.alg_icv_len,
                ))
            }
            XfrmAttrs::EncryptionAlg(a) => {
                enc = Some((c_name(&a.alg_name), key_of(&mut a.alg_key, a.alg_key_len)))
            }
            XfrmAttrs::AuthenticationAlgTrunc(a) => {
                auth_trunc = Some((
                    c_name(&a.alg_name),
                    key_of(&mut a.alg_key, a.alg_key_len),
                    a.alg_trunc_len,
                ))
            }
            // The kernel also reports the truncated auth in the old format.
            XfrmAttrs::AuthenticationAlg(a) => {
                auth = Some((c_name(&a.alg_name), key_of(&mut a.alg_key, a.alg_key_len)))
            }
            XfrmAttrs::ReplayStateEsn(r) => esn_state = Some(r.clone()),
            XfrmAttrs::ReplayState(r) => legacy = Some(*r),
            XfrmAttrs::LastUsed(_)
            | XfrmAttrs::Pad()
            | XfrmAttrs::ReplayThreshold(_)
            | XfrmAttrs::EventTimeThreshold(_)
            | XfrmAttrs::LifetimeBytes(_) => {}
            XfrmAttrs::ExtraFlags(0) | XfrmAttrs::IfId(0) => {}
            XfrmAttrs::Mark(nx::Mark { value: 0, mask: 0 }) => {}
            XfrmAttrs::CompressionAlg(a) => {
                extras.push(format!("compression {}", c_name(&a.alg_name)))
            }
            other => extras.push(format!("attribute {other:?}")),
        }
    }
    let info = &m.user_sa_info;
    let family = info.family;
    if family != AF_INET && family != AF_INET6 {
        return Err(XfrmError::Unexpected {
            op: Op::DumpStates,
            reason: format!("state with address family {family}"),
        });
    }
    let src = kernel_ip(family, &info.saddr);
    let dst = kernel_ip(family, &info.id.daddr);
    if info.id.proto != IPPROTO_ESP {
        extras.push(format!("IPsec protocol {}", info.id.proto));
    }
    let algorithm = match (aead, enc, auth_trunc.or(auth.map(|(n, k)| (n, k, 0)))) {
        (Some((name, key, icv_bits)), None, None) => Algorithm::Aead {
            name,
            key,
            icv_bits,
        },
        (None, Some((enc, enc_key)), Some((auth, auth_key, trunc_bits))) => Algorithm::EncAuth {
            enc,
            enc_key,
            auth,
            auth_key,
            trunc_bits,
        },
        (a, e, t) => {
            let names: Vec<String> = [
                a.map(|x| format!("aead {}", x.0)),
                e.map(|x| format!("enc {}", x.0)),
                t.map(|x| format!("auth {}", x.0)),
            ]
            .into_iter()
            .flatten()
            .collect();
            let s = if names.is_empty() {
                "no algorithm".to_string()
            } else {
                names.join(" + ")
            };
            extras.push(format!("transform {s}"));
            Algorithm::Unsupported(s)
        }
    };
    let esn = info.flags & XFRM_STATE_ESN != 0;
    let other_flags = info.flags & !XFRM_STATE_ESN;
    if other_flags != 0 {
        extras.push(format!("flags 0x{other_flags:02x}"));
    }
    let default_sel = nx::Selector {
        family,
        ..Default::default()
    };
    if info.selector != default_sel {
        let mut ignored = Vec::new();
        let sel = Selector::from_kernel(&info.selector, &mut ignored);
        extras.push(format!("selector {sel}"));
    }
    if info.lifetime_cfg != LifetimeConfig::default() {
        extras.push("lifetime limits".into());
    }
    let mut counters = StateCounters {
        bytes: info.lifetime_cur.bytes,
        packets: info.lifetime_cur.packets,
        add_time: info.lifetime_cur.add_time,
        use_time: info.lifetime_cur.use_time,
        replay_window_drops: info.stats.replay_window,
        replay_drops: info.stats.replay,
        integrity_failures: info.stats.integrity_failed,
        ..Default::default()
    };
    let replay_window = match (&esn_state, &legacy) {
        (Some(r), _) => {
            counters.oseq = u64::from(r.oseq_hi) << 32 | u64::from(r.oseq);
            counters.seq = u64::from(r.seq_hi) << 32 | u64::from(r.seq);
            r.replay_window
        }
        (None, Some(r)) => {
            counters.oseq = r.oseq.into();
            counters.seq = r.seq.into();
            info.replay_window.into()
        }
        (None, None) => info.replay_window.into(),
    };
    Ok(DumpedState {
        state: XfrmState {
            src,
            dst,
            spi: info.id.spi,
            reqid: info.reqid,
            mode: EncapMode::from_kernel(info.mode),
            algorithm,
            replay_window,
            esn,
        },
        proto: info.id.proto,
        counters,
        extras,
    })
}

fn parse_policy(
    op: Op,
    info: &UserPolicyInfo,
    nlas: &[XfrmAttrs],
) -> Result<DumpedPolicy, XfrmError> {
    let mut extras = Vec::new();
    let selector = Selector::from_kernel(&info.selector, &mut extras);
    let dir = Direction::from_kernel(info.direction).ok_or_else(|| XfrmError::Unexpected {
        op,
        reason: format!("policy direction {}", info.direction),
    })?;
    let action = match info.action {
        XFRM_POLICY_ALLOW => Action::Allow,
        XFRM_POLICY_BLOCK => Action::Block,
        a => {
            return Err(XfrmError::Unexpected {
                op,
                reason: format!("policy action {a}"),
            });
        }
    };
    if info.flags != 0 {
        extras.push(format!("flags 0x{:02x}", info.flags));
    }
    if info.lifetime_cfg != LifetimeConfig::default() {
        extras.push("lifetime limits".into());
    }
    let mut template = None;
    for a in nlas {
        match a {
            XfrmAttrs::Template(ts) => {
                if ts.len() > 1 {
                    extras.push(format!("{} templates", ts.len()));
                }
                if let Some(t) = ts.first() {
                    if t.id.proto != IPPROTO_ESP {
                        extras.push(format!("template protocol {}", t.id.proto));
                    }
                    if t.id.spi != 0 || t.optional != 0 || t.share != 0 {
                        extras.push("template spi/optional/share".into());
                    }
                    let any = u32::MAX;
                    if (t.aalgos, t.ealgos, t.calgos) != (any, any, any) {
                        extras.push("template algorithm restrictions".into());
                    }
                    template = Some(Template {
                        src: kernel_ip(t.family, &t.saddr),
                        dst: kernel_ip(t.family, &t.id.daddr),
                        reqid: t.reqid,
                        mode: EncapMode::from_kernel(t.mode),
                    });
                }
            }
            XfrmAttrs::PolicyType(t) if t.ptype == nx::XFRM_POLICY_TYPE_MAIN => {}
            XfrmAttrs::Mark(nx::Mark { value: 0, mask: 0 }) | XfrmAttrs::IfId(0) => {}
            XfrmAttrs::Pad() => {}
            other => extras.push(format!("attribute {other:?}")),
        }
    }
    Ok(DumpedPolicy {
        policy: XfrmPolicy {
            selector,
            dir,
            priority: info.priority,
            action,
            template,
        },
        index: info.index,
        extras,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
