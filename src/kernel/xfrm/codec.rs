//! The codec of the XFRM object model: encryptd's values to `netlink-packet-xfrm`'s
//! messages and back. Pure; the executor ([`super::Xfrm`]) sends what this builds.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_xfrm::{
    self as nx, AF_INET, AF_INET6, Address, Alg, AlgAead, AlgAuth, IPPROTO_ESP, LifetimeConfig,
    ReplayEsn, UserPolicyInfo, UserSaInfo, UserTemplate, XFRM_MODE_TRANSPORT, XFRM_MODE_TUNNEL,
    XFRM_POLICY_ALLOW, XFRM_POLICY_BLOCK, XFRM_POLICY_FWD, XFRM_POLICY_IN, XFRM_POLICY_OUT,
    XFRM_STATE_ESN, XfrmAttrs, XfrmMessage,
};
use zeroize::{Zeroize, Zeroizing};

use super::{Op, Scrubbed, XfrmError, check_state_owner, refuse};
use crate::net::Cidr;
use crate::objects::xfrm::*;

const ALG_NAME_LEN: usize = 64;

impl EncapMode {
    pub(super) fn to_kernel(self) -> u8 {
        match self {
            EncapMode::Transport => XFRM_MODE_TRANSPORT,
            EncapMode::Tunnel => XFRM_MODE_TUNNEL,
            EncapMode::Other(m) => m,
        }
    }

    pub(super) fn from_kernel(m: u8) -> EncapMode {
        match m {
            XFRM_MODE_TRANSPORT => EncapMode::Transport,
            XFRM_MODE_TUNNEL => EncapMode::Tunnel,
            m => EncapMode::Other(m),
        }
    }
}

impl Direction {
    pub(super) fn to_kernel(self) -> u8 {
        match self {
            Direction::In => XFRM_POLICY_IN,
            Direction::Out => XFRM_POLICY_OUT,
            Direction::Fwd => XFRM_POLICY_FWD,
        }
    }

    pub(super) fn from_kernel(d: u8) -> Option<Direction> {
        match d {
            XFRM_POLICY_IN => Some(Direction::In),
            XFRM_POLICY_OUT => Some(Direction::Out),
            XFRM_POLICY_FWD => Some(Direction::Fwd),
            _ => None,
        }
    }
}

impl Selector {
    pub(super) fn to_kernel(self) -> nx::Selector {
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
    pub(super) fn from_kernel(k: &nx::Selector, extras: &mut Vec<String>) -> Selector {
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

pub(super) fn alg_name(op: Op, s: &XfrmState, name: &str) -> Result<[u8; ALG_NAME_LEN], XfrmError> {
    let mut out = [0u8; ALG_NAME_LEN];
    if name.is_empty() || name.len() >= ALG_NAME_LEN || name.contains('\0') {
        return Err(refuse(op, s, format!("bad algorithm name {name:?}")));
    }
    out[..name.len()].copy_from_slice(name.as_bytes());
    Ok(out)
}

pub(super) fn key_bits(op: Op, s: &XfrmState, key: &[u8]) -> Result<u32, XfrmError> {
    u32::try_from(key.len() * 8).map_err(|_| refuse(op, s, "key too long"))
}

/// An SA as the kernel's add/update message. Long on purpose: the attributes in the
/// kernel's order, each refused here (before anything is sent) when it cannot be
/// encoded.
pub(super) fn state_message(op: Op, s: &XfrmState) -> Result<nx::state::ModifyMessage, XfrmError> {
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
    info.lifetime_cfg = lifetime_to_kernel(&s.lifetime);
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

pub(super) fn policy_message(p: &XfrmPolicy) -> nx::policy::ModifyMessage {
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

pub(super) fn kernel_ip(family: u16, a: &Address) -> IpAddr {
    if family == AF_INET {
        IpAddr::V4(a.to_ipv4())
    } else {
        IpAddr::V6(a.to_ipv6())
    }
}

pub(super) fn kernel_cidr(
    family: u16,
    a: &Address,
    len: u8,
    what: &str,
    extras: &mut Vec<String>,
) -> Cidr {
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

pub(super) fn c_name(name: &[u8]) -> String {
    let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
    String::from_utf8_lossy(&name[..end]).into_owned()
}

/// The key bytes of an algorithm attribute (the attribute may be padded).
pub(super) fn key_of(key: &mut Vec<u8>, bits: u32) -> Key {
    let n = (bits as usize).div_ceil(8).min(key.len());
    let k = Zeroizing::new(key[..n].to_vec());
    key.zeroize();
    k
}

/// A dumped SA back into the object model, extras (what encryptd does not model)
/// listed so that a foreign shape is a conflict, not a match. Long on purpose: one pass
/// over the attributes, one arm per attribute, with the key bytes wiped as they are
/// taken; split up, the half-built state and the scrubbed copy would travel between
/// functions.
pub(super) fn parse_state(info: &UserSaInfo, nlas: &[XfrmAttrs]) -> Result<DumpedState, XfrmError> {
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
    let (lifetime, other_limits) = lifetime_from_kernel(&info.lifetime_cfg);
    if other_limits {
        extras.push("byte or use-time lifetime limits".into());
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
            lifetime,
        },
        proto: info.id.proto,
        counters,
        extras,
    })
}

pub(super) fn parse_policy(
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

/// The kernel's `XFRM_INF` (no limit) for packet counts, 0 (no timer) for seconds.
fn lifetime_to_kernel(l: &Lifetime) -> LifetimeConfig {
    let inf = LifetimeConfig::default();
    LifetimeConfig {
        soft_packet_limit: l.soft_packets.unwrap_or(inf.soft_packet_limit),
        hard_packet_limit: l.hard_packets.unwrap_or(inf.hard_packet_limit),
        soft_add_expires_seconds: l.soft_secs.unwrap_or(0),
        hard_add_expires_seconds: l.hard_secs.unwrap_or(0),
        ..inf
    }
}

/// The limits encryptd sets, and whether the state has others (byte counts, use time),
/// which it never sets.
fn lifetime_from_kernel(c: &LifetimeConfig) -> (Lifetime, bool) {
    let inf = LifetimeConfig::default();
    let packets = |v: u64| (v != inf.hard_packet_limit).then_some(v);
    let secs = |v: u64| (v != 0).then_some(v);
    let l = Lifetime {
        soft_packets: packets(c.soft_packet_limit),
        hard_packets: packets(c.hard_packet_limit),
        soft_secs: secs(c.soft_add_expires_seconds),
        hard_secs: secs(c.hard_add_expires_seconds),
    };
    let others = c.soft_byte_limit != inf.soft_byte_limit
        || c.hard_byte_limit != inf.hard_byte_limit
        || c.soft_use_expires_seconds != 0
        || c.hard_use_expires_seconds != 0;
    (l, others)
}
