//! XFRM objects as the planner produces them and the reconciler diffs them: states (SAs),
//! policies, selectors, and the number bands that mark encryptd's own. Plain data: the
//! codec and the executor are [`crate::kernel::xfrm`].
//!
//! # Ownership
//! encryptd recognises its own kernel objects by number bands and never touches others:
//! * states (SAs) whose **reqid** is in [`REQID_MIN`]`..=`[`REQID_MAX`];
//! * policies whose **priority** is in [`PRIORITY_MIN`]`..=`[`PRIORITY_MAX`] (a policy
//!   with a template must also name an encryptd reqid).
//!
//! Dumps return every object of the namespace, foreign ones included (see `is_ours()`);
//! the mutating calls refuse, before sending anything, a batch that names an object
//! outside the bands. XFRM priorities: the *lower* number wins, so within the band the
//! exemptions ([`PRIORITY_EXEMPT`]) come before the tunnels ([`PRIORITY_TUNNEL`]), and the
//! catch-all blocks ([`PRIORITY_BLOCK`]) come last. Foreign policies of other IPsec
//! daemons (strongSwan, libreswan, `ip xfrm` defaults to 0) usually sit at lower numbers
//! and therefore take precedence over encryptd's.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;

use zeroize::Zeroizing;

use crate::net::Cidr;

/// First reqid of encryptd's band.
pub const REQID_MIN: u32 = 0xE000_0000;
/// Last reqid of encryptd's band.
pub const REQID_MAX: u32 = 0xEFFF_FFFF;
/// First (highest-precedence) policy priority of encryptd's band.
pub const PRIORITY_MIN: u32 = 0xE000_0000;
/// Last (lowest-precedence) policy priority of encryptd's band.
pub const PRIORITY_MAX: u32 = 0xE000_FFFF;
/// Suggested base for exemptions (IPv6 neighbour discovery, own prefixes): before tunnels.
pub const PRIORITY_EXEMPT: u32 = 0xE000_1000;
/// Suggested base for tunnel policies (subtract a prefix length to prefer specific ones).
pub const PRIORITY_TUNNEL: u32 = 0xE000_2000;
/// The replies of strict mode's management exceptions: after the tunnels (a peer's
/// replies are encrypted like everything else), before the `block` policies (a
/// management host in a protected range gets its replies).
pub const PRIORITY_REPLY: u32 = 0xE000_E000;
/// Suggested base for the catch-all `block` policies of protected ranges: last.
pub const PRIORITY_BLOCK: u32 = 0xE000_F000;

/// The replay window encryptd uses (with ESN); the kernel's ESN maximum.
pub const DEFAULT_REPLAY_WINDOW: u32 = 4096;
/// The largest replay window the kernel accepts (`XFRMA_REPLAY_ESN_MAX` bits).
pub const MAX_REPLAY_WINDOW: u32 = 4096;

/// AEAD of the `rfc4106(gcm(aes))` key line (key = AES key + 4-byte salt).
pub const AEAD_GCM_AES: &str = "rfc4106(gcm(aes))";
pub const ENC_CBC_AES: &str = "cbc(aes)";
pub const AUTH_HMAC_SHA256: &str = "hmac(sha256)";

/// Whether a reqid belongs to encryptd.
pub fn is_our_reqid(reqid: u32) -> bool {
    (REQID_MIN..=REQID_MAX).contains(&reqid)
}

/// Whether a policy priority belongs to encryptd.
pub fn is_our_priority(priority: u32) -> bool {
    (PRIORITY_MIN..=PRIORITY_MAX).contains(&priority)
}

/// Key material; wiped when dropped.
pub type Key = Zeroizing<Vec<u8>>;

/// Encapsulation mode of a state or template.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EncapMode {
    Transport,
    Tunnel,
    /// Any other kernel mode (BEET, route optimisation…), as seen in dumps.
    Other(u8),
}

impl fmt::Display for EncapMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncapMode::Transport => f.write_str("transport"),
            EncapMode::Tunnel => f.write_str("tunnel"),
            EncapMode::Other(m) => write!(f, "mode {m}"),
        }
    }
}

/// The transform of an ESP state.
#[derive(Clone, PartialEq, Eq)]
pub enum Algorithm {
    /// Combined mode, e.g. [`AEAD_GCM_AES`] with a 20-byte key (incl. 4-byte salt).
    Aead {
        name: String,
        key: Key,
        icv_bits: u32,
    },
    /// Encryption plus truncated authentication, e.g. [`ENC_CBC_AES`] + [`AUTH_HMAC_SHA256`].
    EncAuth {
        enc: String,
        enc_key: Key,
        auth: String,
        auth_key: Key,
        trunc_bits: u32,
    },
    /// Only produced by dumps, for foreign states whose transform the two shapes above
    /// cannot express (AH, compression, encryption without authentication…): a summary.
    /// Installing it is refused.
    Unsupported(String),
}

impl Algorithm {
    /// `rfc4106(gcm(aes))` with the given key (AES key + 4-byte salt) and ICV length.
    pub fn gcm_aes(key: Key, icv_bits: u32) -> Algorithm {
        Algorithm::Aead {
            name: AEAD_GCM_AES.into(),
            key,
            icv_bits,
        }
    }

    /// `cbc(aes)` + `hmac(sha256)` truncated to `trunc_bits`.
    pub fn cbc_aes_hmac_sha256(enc_key: Key, auth_key: Key, trunc_bits: u32) -> Algorithm {
        Algorithm::EncAuth {
            enc: ENC_CBC_AES.into(),
            enc_key,
            auth: AUTH_HMAC_SHA256.into(),
            auth_key,
            trunc_bits,
        }
    }
}

impl fmt::Debug for Algorithm {
    /// Names and lengths only: key bytes are never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Redacted(usize);
        impl fmt::Debug for Redacted {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "<{} bytes redacted>", self.0)
            }
        }
        match self {
            Algorithm::Aead {
                name,
                key,
                icv_bits,
            } => f
                .debug_struct("Aead")
                .field("name", name)
                .field("key", &Redacted(key.len()))
                .field("icv_bits", icv_bits)
                .finish(),
            Algorithm::EncAuth {
                enc,
                enc_key,
                auth,
                auth_key,
                trunc_bits,
            } => f
                .debug_struct("EncAuth")
                .field("enc", enc)
                .field("enc_key", &Redacted(enc_key.len()))
                .field("auth", auth)
                .field("auth_key", &Redacted(auth_key.len()))
                .field("trunc_bits", trunc_bits)
                .finish(),
            Algorithm::Unsupported(s) => f.debug_tuple("Unsupported").field(s).finish(),
        }
    }
}

impl Hash for Algorithm {
    fn hash<H: Hasher>(&self, h: &mut H) {
        std::mem::discriminant(self).hash(h);
        match self {
            Algorithm::Aead {
                name,
                key,
                icv_bits,
            } => {
                name.hash(h);
                key.as_slice().hash(h);
                icv_bits.hash(h);
            }
            Algorithm::EncAuth {
                enc,
                enc_key,
                auth,
                auth_key,
                trunc_bits,
            } => {
                enc.hash(h);
                enc_key.as_slice().hash(h);
                auth.hash(h);
                auth_key.as_slice().hash(h);
                trunc_bits.hash(h);
            }
            Algorithm::Unsupported(s) => s.hash(h),
        }
    }
}

/// An ESP security association (one direction between two underlay addresses).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct XfrmState {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub spi: u32,
    pub reqid: u32,
    pub mode: EncapMode,
    pub algorithm: Algorithm,
    /// Replay window in packets (up to [`MAX_REPLAY_WINDOW`] with `esn`).
    pub replay_window: u32,
    /// Extended (64-bit) sequence numbers: `XFRM_STATE_ESN` + `XFRMA_REPLAY_ESN_VAL`.
    pub esn: bool,
    pub lifetime: Lifetime,
}

/// When the kernel expires a state: at the soft limits it tells userspace
/// (`XFRM_MSG_EXPIRE`, soft), at the hard ones it deletes the state. `None`: no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Lifetime {
    pub soft_packets: Option<u64>,
    pub hard_packets: Option<u64>,
    /// Seconds after the state was added.
    pub soft_secs: Option<u64>,
    pub hard_secs: Option<u64>,
}

/// What identifies a state in the kernel (destination, SPI; always ESP), plus the source
/// and reqid for messages and the ownership check. The reconciler's diff key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StateId {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub spi: u32,
    pub reqid: u32,
}

impl fmt::Display for StateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "state {}→{} spi 0x{:08x} reqid 0x{:08x}",
            self.src, self.dst, self.spi, self.reqid
        )
    }
}

impl XfrmState {
    /// A tunnel-mode state with ESN and the default replay window.
    pub fn tunnel(src: IpAddr, dst: IpAddr, spi: u32, reqid: u32, algorithm: Algorithm) -> Self {
        XfrmState {
            src,
            dst,
            spi,
            reqid,
            mode: EncapMode::Tunnel,
            algorithm,
            replay_window: DEFAULT_REPLAY_WINDOW,
            esn: true,
            lifetime: Lifetime::default(),
        }
    }

    pub fn id(&self) -> StateId {
        StateId {
            src: self.src,
            dst: self.dst,
            spi: self.spi,
            reqid: self.reqid,
        }
    }

    pub fn is_ours(&self) -> bool {
        is_our_reqid(self.reqid)
    }
}

impl fmt::Display for XfrmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.id().fmt(f)
    }
}

/// Counters the kernel keeps per state, as a dump returns them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StateCounters {
    /// Bytes and packets processed (current lifetime).
    pub bytes: u64,
    pub packets: u64,
    /// Seconds since the epoch when the state was added / first used (0: never).
    pub add_time: u64,
    pub use_time: u64,
    /// Highest sequence number sent (outbound SA); with ESN the 64-bit value
    /// `oseq_hi << 32 | oseq`. Rekey long before it nears `u32::MAX` (no ESN) / `u64::MAX`.
    pub oseq: u64,
    /// Highest sequence number received (inbound SA), 64-bit with ESN.
    pub seq: u64,
    /// Packets dropped: outside the replay window / replayed / failing integrity.
    pub replay_window_drops: u32,
    pub replay_drops: u32,
    pub integrity_failures: u32,
}

/// A state as the kernel reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DumpedState {
    pub state: XfrmState,
    /// The IPsec protocol (`IPPROTO_ESP` for everything encryptd installs).
    pub proto: u8,
    pub counters: StateCounters,
    /// Kernel attributes that `state` cannot express (marks, selectors, encapsulation…);
    /// empty for the states encryptd installs. Non-empty means `state` is not exact.
    pub extras: Vec<String>,
}

impl DumpedState {
    pub fn is_ours(&self) -> bool {
        self.state.is_ours()
    }

    pub fn id(&self) -> StateId {
        self.state.id()
    }
}

/// Policy direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    In,
    Out,
    Fwd,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::In => "in",
            Direction::Out => "out",
            Direction::Fwd => "fwd",
        })
    }
}

/// Policy action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Block,
}

/// Traffic a policy matches. For ICMP / ICMPv6 the kernel matches the message *type* in
/// the source-port field and the *code* in the destination-port field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    pub src: Cidr,
    pub dst: Cidr,
    /// IP protocol number (`libc::IPPROTO_UDP` …); `None` = any.
    pub proto: Option<u8>,
    /// Source port, or the ICMP type; `None` = any.
    pub sport: Option<u16>,
    /// Destination port, or the ICMP code; `None` = any.
    pub dport: Option<u16>,
}

impl Selector {
    /// Every protocol between two prefixes.
    pub fn new(src: Cidr, dst: Cidr) -> Selector {
        Selector {
            src,
            dst,
            proto: None,
            sport: None,
            dport: None,
        }
    }

    /// Every protocol between two addresses (/32 or /128).
    pub fn hosts(src: IpAddr, dst: IpAddr) -> Selector {
        Selector::new(Cidr::host(src), Cidr::host(dst))
    }

    /// Only UDP to `port`.
    pub fn udp_dport(mut self, port: u16) -> Selector {
        self.proto = Some(libc::IPPROTO_UDP as u8);
        self.dport = Some(port);
        self
    }

    /// Only UDP from `port`.
    pub fn udp_sport(mut self, port: u16) -> Selector {
        self.proto = Some(libc::IPPROTO_UDP as u8);
        self.sport = Some(port);
        self
    }

    /// Only ICMP (IPv4) or ICMPv6 (IPv6, by the selector's family) messages of `icmp_type`
    /// (e.g. 135/136: neighbour solicitation/advertisement).
    pub fn icmp_type(mut self, icmp_type: u8) -> Selector {
        self.proto = Some(if self.src.is_ipv4() {
            libc::IPPROTO_ICMP as u8
        } else {
            libc::IPPROTO_ICMPV6 as u8
        });
        self.sport = Some(icmp_type.into());
        self
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} → {}", self.src, self.dst)?;
        let icmp = matches!(
            self.proto.map(i32::from),
            Some(libc::IPPROTO_ICMP | libc::IPPROTO_ICMPV6)
        );
        match self.proto.map(i32::from) {
            None => {}
            Some(libc::IPPROTO_UDP) => f.write_str(" udp")?,
            Some(libc::IPPROTO_TCP) => f.write_str(" tcp")?,
            Some(libc::IPPROTO_ICMP) => f.write_str(" icmp")?,
            Some(libc::IPPROTO_ICMPV6) => f.write_str(" icmpv6")?,
            Some(p) => write!(f, " proto {p}")?,
        }
        if let Some(p) = self.sport {
            write!(f, " {} {p}", if icmp { "type" } else { "sport" })?;
        }
        if let Some(p) = self.dport {
            write!(f, " {} {p}", if icmp { "code" } else { "dport" })?;
        }
        Ok(())
    }
}

/// The ESP tunnel a policy sends matching traffic through (outer addresses, reqid).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Template {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub reqid: u32,
    pub mode: EncapMode,
}

/// An XFRM policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct XfrmPolicy {
    pub selector: Selector,
    pub dir: Direction,
    /// Lower number = higher precedence; encryptd's lie in [`PRIORITY_MIN`]..=[`PRIORITY_MAX`].
    pub priority: u32,
    pub action: Action,
    /// With `Allow`: require (in) / apply (out, fwd) this ESP transform; `None` lets the
    /// traffic pass in the clear (exemptions).
    pub template: Option<Template>,
}

/// What identifies a policy in the kernel: selector and direction (the priority is an
/// attribute that `update_policies` may change). The reconciler's diff key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyId {
    pub selector: Selector,
    pub dir: Direction,
}

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "policy {} {}", self.dir, self.selector)
    }
}

impl XfrmPolicy {
    pub fn id(&self) -> PolicyId {
        PolicyId {
            selector: self.selector,
            dir: self.dir,
        }
    }

    /// Priority in encryptd's band (and, with a template, an encryptd reqid).
    pub fn is_ours(&self) -> bool {
        is_our_priority(self.priority) && self.template.is_none_or(|t| is_our_reqid(t.reqid))
    }
}

impl fmt::Display for XfrmPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} priority 0x{:08x}", self.id(), self.priority)
    }
}

/// A policy as the kernel reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DumpedPolicy {
    pub policy: XfrmPolicy,
    /// The kernel's index of the policy.
    pub index: u32,
    /// Kernel attributes `policy` cannot express (marks, more templates, lifetimes…);
    /// empty for the policies encryptd installs. Non-empty means `policy` is not exact.
    pub extras: Vec<String>,
}

impl DumpedPolicy {
    pub fn is_ours(&self) -> bool {
        self.policy.is_ours()
    }

    pub fn id(&self) -> PolicyId {
        self.policy.id()
    }
}
