//! A small synchronous netlink socket (after netavark's `src/network/netlink.rs`) over
//! `netlink-sys`, generic over the protocol and the `netlink-packet-*` message type.
//!
//! * [`NetlinkSocket::execute`] sends a *batch* of requests: as many messages per `sendmsg`
//!   as fit in [`MAX_BATCH_BYTES`] / [`MAX_BATCH_MESSAGES`]. Only the last message of each
//!   chunk asks for an ACK (`NLM_F_ACK`); the kernel processes a chunk in order, keeps going
//!   after a failed message and reports every failure with an `NLMSG_ERROR` carrying the
//!   failed message's sequence number, so the final ACK marks the end of the replies and a
//!   successful chunk costs one `sendmsg` and one `recv`. Failures are mapped back to the
//!   index of the request that caused them.
//! * [`NetlinkSocket::dump`] sends one `NLM_F_DUMP` request and reads until `NLMSG_DONE`.
//! * [`NetlinkStats`] counts messages, `sendmsg` and `recv` calls.
//!
//! Requests may carry key material (XFRM states): the send and receive buffers are wiped
//! after every use, and `NETLINK_CAP_ACK` stops the kernel from echoing a failed request's
//! payload (its keys) back in the error.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use netlink_packet_core::{
    Emitable, NLM_F_ACK, NLM_F_ACK_TLVS, NLM_F_CAPPED, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
    NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN, NetlinkDeserializable, NetlinkHeader,
    NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};
use netlink_sys::{Socket, SocketAddr};
use zeroize::Zeroize;

pub use netlink_sys::protocols::{NETLINK_ROUTE, NETLINK_XFRM};

/// A netlink protocol and the one message type its sockets carry, so that an XFRM
/// message cannot be sent to an rtnetlink socket: the compiler refuses it.
///
/// ```no_run
/// use encryptd::kernel::netlink::{NetlinkSocket, XfrmNetlink};
/// use netlink_packet_xfrm::{XfrmMessage, state::GetDumpMessage};
/// let mut xfrm = NetlinkSocket::<XfrmNetlink>::open().unwrap();
/// xfrm.dump("states", &XfrmMessage::GetDumpSa(GetDumpMessage::default())).unwrap();
/// ```
///
/// The same request to an rtnetlink socket does not compile:
///
/// ```compile_fail,E0308
/// use encryptd::kernel::netlink::{NetlinkSocket, Rtnetlink};
/// use netlink_packet_xfrm::{XfrmMessage, state::GetDumpMessage};
/// let mut route = NetlinkSocket::<Rtnetlink>::open().unwrap();
/// route.dump("states", &XfrmMessage::GetDumpSa(GetDumpMessage::default())).unwrap();
/// ```
pub trait Protocol {
    const NUMBER: isize;
    type Message: NetlinkSerializable + NetlinkDeserializable<Error: fmt::Display>;

    /// Whether a dump reply of type `ty` with `payload` bytes after the header may be
    /// handed to the message crate: some of its parsers slice their fixed header without
    /// a length check and panic on a short message.
    fn dump_reply_ok(_ty: u16, _payload: usize) -> Result<(), String> {
        Ok(())
    }
}

/// `NETLINK_XFRM`: kernel IPsec.
pub struct XfrmNetlink;

impl Protocol for XfrmNetlink {
    const NUMBER: isize = NETLINK_XFRM;
    type Message = netlink_packet_xfrm::XfrmMessage;

    /// A state or policy dump brings states and policies only, each at least its fixed
    /// header long (netlink-packet-xfrm 0.5 slices those unchecked: found by fuzzing).
    fn dump_reply_ok(ty: u16, payload: usize) -> Result<(), String> {
        use netlink_packet_xfrm::*;
        let need = match ty {
            XFRM_MSG_NEWSA | XFRM_MSG_UPDSA => XFRM_USER_SA_INFO_LEN,
            XFRM_MSG_NEWPOLICY | XFRM_MSG_UPDPOLICY => XFRM_USER_POLICY_INFO_LEN,
            _ => return Err(format!("message type {ty} is not a state or a policy")),
        };
        if payload < need {
            return Err(format!(
                "message type {ty}: {payload} bytes, shorter than its {need}-byte header"
            ));
        }
        Ok(())
    }
}

/// `NETLINK_ROUTE`: links, addresses, routes, rules.
pub struct Rtnetlink;

impl Protocol for Rtnetlink {
    const NUMBER: isize = NETLINK_ROUTE;
    type Message = netlink_packet_route::RouteNetlinkMessage;
}

/// Upper bound of the bytes one `sendmsg` carries (the kernel refuses more than the
/// socket's send buffer; the socket asks for twice this much).
pub const MAX_BATCH_BYTES: usize = 64 * 1024;
/// Upper bound of the messages one `sendmsg` carries, so that even a chunk whose every
/// message fails cannot overrun the receive buffer with error replies.
pub const MAX_BATCH_MESSAGES: usize = 128;
/// How long a reply may take before the request is declared lost.
pub const REPLY_TIMEOUT_SECS: i64 = 10;
/// Size of the receive buffer: larger than the biggest dump datagram the kernel builds
/// (it caps dump skbs at 32 KiB unless a single object is bigger).
const RECV_BUF_LEN: usize = 64 * 1024;
const SOCKET_RCVBUF: usize = 1024 * 1024;
const HDR_LEN: usize = 16;
const DUMP_ATTEMPTS: usize = 3;
/// `NLMSGERR_ATTR_MSG`: the extended ACK's human-readable message.
const NLMSGERR_ATTR_MSG: u16 = 1;

/// What the kernel said about one request: errno (positive) and, when the kernel gave one,
/// its extended-ACK message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelError {
    pub errno: i32,
    pub message: Option<String>,
}

impl KernelError {
    pub fn io(&self) -> io::Error {
        io::Error::from_raw_os_error(self.errno)
    }
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.io())?;
        if let Some(m) = &self.message {
            write!(f, " ({m})")?;
        }
        Ok(())
    }
}

impl std::error::Error for KernelError {}

/// A request of a batch that the kernel rejected; `index` is its position in the slice
/// given to [`NetlinkSocket::execute`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub index: usize,
    pub error: KernelError,
}

/// Errors of the socket itself; rejected requests of a batch are not errors of this kind
/// (see [`NetlinkSocket::execute`]).
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open netlink socket (protocol {protocol}): {source}")]
    Open { protocol: isize, source: io::Error },
    #[error("netlink sendmsg ({what}): {source}")]
    Send { what: String, source: io::Error },
    #[error("netlink recv ({what}): {source}")]
    Recv { what: String, source: io::Error },
    #[error(
        "netlink ({what}): the kernel dropped replies (receive buffer overrun); \
         the outcome of the batch is unknown, dump to find out"
    )]
    Overrun { what: String },
    #[error("netlink ({what}): a reply of {len} bytes exceeds the {buf}-byte receive buffer")]
    Truncated {
        what: String,
        len: usize,
        buf: usize,
    },
    #[error("netlink ({what}): cannot decode reply: {reason}")]
    Decode { what: String, reason: String },
    #[error("netlink ({what}): the kernel refused: {source}")]
    Kernel { what: String, source: KernelError },
    #[error("netlink ({what}): dump interrupted by concurrent changes {attempts} times")]
    DumpInterrupted { what: String, attempts: usize },
}

/// Counters of what went over the socket; the daemon and benchmarks read them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetlinkStats {
    /// Netlink messages sent (requests, including dump requests).
    pub messages_sent: u64,
    /// `sendmsg` calls.
    pub send_calls: u64,
    /// `recv` calls that returned data.
    pub recv_calls: u64,
}

/// A connected netlink socket for one protocol, in the network namespace of the thread
/// that opened it.
pub struct NetlinkSocket<P: Protocol> {
    sock: Socket,
    protocol: isize,
    /// The kernel-assigned port, stamped in every request's header: the kernel copies
    /// it into the notifications a change causes, which tells ours from other programs'.
    port: u32,
    seq: u32,
    send_buf: Vec<u8>,
    recv_buf: Vec<u8>,
    stats: NetlinkStats,
    _protocol: std::marker::PhantomData<P>,
}

impl<P: Protocol> fmt::Debug for NetlinkSocket<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetlinkSocket")
            .field("fd", &self.sock.as_raw_fd())
            .field("protocol", &self.protocol)
            .field("seq", &self.seq)
            .field("stats", &self.stats)
            .finish()
    }
}

impl<P: Protocol> AsRawFd for NetlinkSocket<P> {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

/// Raw view of one netlink message inside a receive buffer.
struct RawMsg<'a> {
    ty: u16,
    flags: u16,
    seq: u32,
    bytes: &'a [u8],
}

impl<P: Protocol> NetlinkSocket<P> {
    /// Open, bind (kernel-assigned port) and connect a socket for `P`.
    pub fn open() -> Result<NetlinkSocket<P>, NetlinkError> {
        let protocol = P::NUMBER;
        let err = |source| NetlinkError::Open { protocol, source };
        let mut sock = Socket::new(protocol).map_err(err)?;
        let port = sock.bind_auto().map_err(err)?.port_number();
        sock.connect(&SocketAddr::new(0, 0)).map_err(err)?;
        // Best effort: old kernels lack these; errors then simply carry less detail.
        let _ = sock.set_ext_ack(true);
        let _ = sock.set_cap_ack(true);
        let fd = sock.as_raw_fd();
        if setsockopt_int(fd, libc::SO_RCVBUFFORCE, SOCKET_RCVBUF).is_err() {
            let _ = setsockopt_int(fd, libc::SO_RCVBUF, SOCKET_RCVBUF);
        }
        let _ = setsockopt_int(fd, libc::SO_SNDBUF, 2 * MAX_BATCH_BYTES);
        let tv = libc::timeval {
            tv_sec: REPLY_TIMEOUT_SECS,
            tv_usec: 0,
        };
        // SAFETY: setsockopt with a valid fd and a pointer to a timeval of the given size.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(err(io::Error::last_os_error()));
        }
        Ok(NetlinkSocket {
            sock,
            protocol,
            port,
            seq: 0,
            send_buf: Vec::with_capacity(MAX_BATCH_BYTES),
            recv_buf: vec![0; RECV_BUF_LEN],
            stats: NetlinkStats::default(),
            _protocol: std::marker::PhantomData,
        })
    }

    pub fn protocol(&self) -> isize {
        self.protocol
    }

    /// The socket's netlink port (see the field).
    pub fn port(&self) -> u32 {
        self.port
    }

    pub fn stats(&self) -> NetlinkStats {
        self.stats
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        if self.seq == 0 {
            self.seq = 1;
        }
        self.seq
    }

    /// Send `requests` (each with `NLM_F_REQUEST | flags`) in as few `sendmsg` calls as
    /// the size limits allow and collect the kernel's verdicts.
    ///
    /// `Ok` holds the requests the kernel rejected, in order (empty: all applied); the
    /// others were applied. `Err` means the socket failed and the outcome of the current
    /// chunk is unknown (earlier chunks were applied or reported as usual).
    pub fn execute(
        &mut self,
        what: &str,
        requests: &[P::Message],
        flags: u16,
    ) -> Result<Vec<Failure>, NetlinkError> {
        let mut failures = Vec::new();
        let mut start = 0;
        while start < requests.len() {
            // Fill one chunk.
            self.send_buf.clear();
            let first_seq = self.seq.wrapping_add(1);
            let mut end = start;
            let mut last_at = 0;
            while end < requests.len() && end - start < MAX_BATCH_MESSAGES {
                let len = align4(HDR_LEN + requests[end].buffer_len());
                if end > start && self.send_buf.len() + len > MAX_BATCH_BYTES {
                    break;
                }
                last_at = self.send_buf.len();
                let seq = self.next_seq();
                push_message(
                    &mut self.send_buf,
                    &requests[end],
                    NLM_F_REQUEST | flags,
                    (seq, self.port),
                );
                end += 1;
            }
            // Only the chunk's last message asks for an ACK: it ends the replies.
            let f = u16::from_ne_bytes([self.send_buf[last_at + 6], self.send_buf[last_at + 7]]);
            self.send_buf[last_at + 6..last_at + 8].copy_from_slice(&(f | NLM_F_ACK).to_ne_bytes());
            let last_seq = self.seq;
            let sent = self.send_chunk(what, end - start);
            self.send_buf.zeroize();
            sent?;
            // Read the replies: errors for failed messages, then the final ACK (or error).
            let mut done = false;
            while !done {
                let n = self.recv(what)?;
                let r = for_each_message(&self.recv_buf[..n], |m| {
                    let off = m.seq.wrapping_sub(first_seq) as usize;
                    if off >= end - start {
                        log::debug!("netlink ({what}): ignoring stale reply seq {}", m.seq);
                        return Ok(());
                    }
                    match m.ty {
                        NLMSG_ERROR => {
                            if let Some(error) = parse_error(&m)? {
                                failures.push(Failure {
                                    index: start + off,
                                    error,
                                });
                            }
                            if m.seq == last_seq {
                                done = true;
                            }
                            Ok(())
                        }
                        NLMSG_NOOP => Ok(()),
                        NLMSG_OVERRUN => Err(NetlinkError::Overrun { what: what.into() }),
                        t => {
                            log::debug!("netlink ({what}): ignoring reply of type {t}");
                            Ok(())
                        }
                    }
                });
                self.recv_buf[..n].zeroize();
                r.map_err(|e| e.with_what(what))?;
            }
            start = end;
        }
        Ok(failures)
    }

    /// Send one dump request (`NLM_F_REQUEST | NLM_F_DUMP`) and collect every reply until
    /// `NLMSG_DONE`. A dump the kernel marks as interrupted (`NLM_F_DUMP_INTR`) is retried.
    pub fn dump(
        &mut self,
        what: &str,
        request: &P::Message,
    ) -> Result<Vec<P::Message>, NetlinkError> {
        for _ in 0..DUMP_ATTEMPTS {
            if let Some(v) = self.dump_once(what, request)? {
                return Ok(v);
            }
        }
        Err(NetlinkError::DumpInterrupted {
            what: what.into(),
            attempts: DUMP_ATTEMPTS,
        })
    }

    fn dump_once(
        &mut self,
        what: &str,
        request: &P::Message,
    ) -> Result<Option<Vec<P::Message>>, NetlinkError> {
        self.send_buf.clear();
        let seq = self.next_seq();
        push_message(
            &mut self.send_buf,
            request,
            NLM_F_REQUEST | NLM_F_DUMP,
            (seq, self.port),
        );
        let sent = self.send_chunk(what, 1);
        self.send_buf.zeroize();
        sent?;
        let mut out = Vec::new();
        let mut interrupted = false;
        let mut done = false;
        while !done {
            let n = self.recv(what)?;
            let r = for_each_message(&self.recv_buf[..n], |m| {
                if m.seq != seq {
                    log::debug!("netlink ({what}): ignoring stale reply seq {}", m.seq);
                    return Ok(());
                }
                interrupted |= m.flags & NLM_F_DUMP_INTR != 0;
                match m.ty {
                    NLMSG_DONE => {
                        done = true;
                        let code = m
                            .bytes
                            .get(HDR_LEN..HDR_LEN + 4)
                            .map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("4 bytes")));
                        if code < 0 {
                            return Err(NetlinkError::Kernel {
                                what: String::new(),
                                source: KernelError {
                                    errno: -code,
                                    message: None,
                                },
                            });
                        }
                        Ok(())
                    }
                    NLMSG_ERROR => match parse_error(&m)? {
                        Some(source) => Err(NetlinkError::Kernel {
                            what: String::new(),
                            source,
                        }),
                        None => {
                            done = true;
                            Ok(())
                        }
                    },
                    NLMSG_NOOP => Ok(()),
                    NLMSG_OVERRUN => Err(NetlinkError::Overrun {
                        what: String::new(),
                    }),
                    _ => {
                        P::dump_reply_ok(m.ty, m.bytes.len() - HDR_LEN).map_err(|reason| {
                            NetlinkError::Decode {
                                what: String::new(),
                                reason,
                            }
                        })?;
                        let msg =
                            NetlinkMessage::<P::Message>::deserialize(m.bytes).map_err(|e| {
                                NetlinkError::Decode {
                                    what: String::new(),
                                    reason: format!("message type {}: {e}", m.ty),
                                }
                            })?;
                        if let NetlinkPayload::InnerMessage(inner) = msg.payload {
                            out.push(inner);
                        }
                        Ok(())
                    }
                }
            });
            self.recv_buf[..n].zeroize();
            r.map_err(|e| e.with_what(what))?;
        }
        Ok((!interrupted).then_some(out))
    }

    fn send_chunk(&mut self, what: &str, messages: usize) -> Result<(), NetlinkError> {
        let sent = self
            .sock
            .send(&self.send_buf, 0)
            .map_err(|source| NetlinkError::Send {
                what: what.into(),
                source,
            })?;
        self.stats.send_calls += 1;
        self.stats.messages_sent += messages as u64;
        if sent != self.send_buf.len() {
            return Err(NetlinkError::Send {
                what: what.into(),
                source: io::Error::other(format!(
                    "short send: {sent} of {} bytes",
                    self.send_buf.len()
                )),
            });
        }
        Ok(())
    }

    /// One datagram into `recv_buf`; returns its length.
    fn recv(&mut self, what: &str) -> Result<usize, NetlinkError> {
        let buf_len = self.recv_buf.len();
        let n = loop {
            match self.sock.recv(&mut &mut self.recv_buf[..], libc::MSG_TRUNC) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    return Err(NetlinkError::Overrun { what: what.into() });
                }
                Err(e) => {
                    let source = if e.kind() == io::ErrorKind::WouldBlock {
                        io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("no reply within {REPLY_TIMEOUT_SECS} s"),
                        )
                    } else {
                        e
                    };
                    return Err(NetlinkError::Recv {
                        what: what.into(),
                        source,
                    });
                }
            }
        };
        self.stats.recv_calls += 1;
        if n > buf_len {
            self.recv_buf.zeroize();
            self.recv_buf.resize(buf_len, 0);
            return Err(NetlinkError::Truncated {
                what: what.into(),
                len: n,
                buf: buf_len,
            });
        }
        Ok(n)
    }
}

impl NetlinkError {
    /// Fill in the context of errors raised inside reply parsing.
    fn with_what(self, w: &str) -> NetlinkError {
        match self {
            NetlinkError::Kernel { what, source } if what.is_empty() => NetlinkError::Kernel {
                what: w.into(),
                source,
            },
            NetlinkError::Overrun { what } if what.is_empty() => {
                NetlinkError::Overrun { what: w.into() }
            }
            NetlinkError::Decode { what, reason } if what.is_empty() => NetlinkError::Decode {
                what: w.into(),
                reason,
            },
            e => e,
        }
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Append header + payload of one message (padded to 4 bytes) to `buf`.
fn push_message<M: NetlinkSerializable>(
    buf: &mut Vec<u8>,
    msg: &M,
    flags: u16,
    (seq, port): (u32, u32),
) {
    let len = HDR_LEN + msg.buffer_len();
    let mut header = NetlinkHeader::default();
    header.length = len as u32;
    header.message_type = msg.message_type();
    header.flags = flags;
    header.sequence_number = seq;
    header.port_number = port;
    let at = buf.len();
    buf.resize(at + align4(len), 0);
    header.emit(&mut buf[at..at + HDR_LEN]);
    msg.serialize(&mut buf[at + HDR_LEN..at + len]);
}

/// Walk the netlink messages of one datagram.
fn for_each_message(
    buf: &[u8],
    mut f: impl FnMut(RawMsg<'_>) -> Result<(), NetlinkError>,
) -> Result<(), NetlinkError> {
    let mut off = 0;
    while off + HDR_LEN <= buf.len() {
        let h = &buf[off..];
        let len = u32::from_ne_bytes(h[0..4].try_into().expect("4 bytes")) as usize;
        if len < HDR_LEN || off + len > buf.len() {
            return Err(NetlinkError::Decode {
                what: String::new(),
                reason: format!("bad message length {len} at offset {off} of {}", buf.len()),
            });
        }
        f(RawMsg {
            ty: u16::from_ne_bytes(h[4..6].try_into().expect("2 bytes")),
            flags: u16::from_ne_bytes(h[6..8].try_into().expect("2 bytes")),
            seq: u32::from_ne_bytes(h[8..12].try_into().expect("4 bytes")),
            bytes: &h[..len],
        })?;
        off += align4(len);
    }
    Ok(())
}

/// `None` for an ACK, the error (with the extended-ACK message, if any) otherwise.
fn parse_error(m: &RawMsg<'_>) -> Result<Option<KernelError>, NetlinkError> {
    let b = m.bytes;
    let bad = || NetlinkError::Decode {
        what: String::new(),
        reason: format!("short NLMSG_ERROR ({} bytes)", b.len()),
    };
    let code = i32::from_ne_bytes(b.get(16..20).ok_or_else(bad)?.try_into().expect("4 bytes"));
    if code == 0 {
        return Ok(None);
    }
    let mut message = None;
    if m.flags & NLM_F_ACK_TLVS != 0 {
        // After the code comes the echoed request: its header only when capped.
        let echoed = if m.flags & NLM_F_CAPPED != 0 {
            HDR_LEN
        } else {
            let l = b.get(20..24).ok_or_else(bad)?;
            align4(u32::from_ne_bytes(l.try_into().expect("4 bytes")) as usize)
        };
        let mut tlv = b.get(20 + echoed..).unwrap_or(&[]);
        while tlv.len() >= 4 {
            let len = u16::from_ne_bytes([tlv[0], tlv[1]]) as usize;
            let kind = u16::from_ne_bytes([tlv[2], tlv[3]]) & 0x3fff;
            if len < 4 || len > tlv.len() {
                break;
            }
            if kind == NLMSGERR_ATTR_MSG {
                let s = &tlv[4..len];
                let s = s.split(|&c| c == 0).next().unwrap_or(&[]);
                message = Some(String::from_utf8_lossy(s).into_owned());
            }
            tlv = tlv.get(align4(len)..).unwrap_or(&[]);
        }
    }
    Ok(Some(KernelError {
        errno: code.checked_neg().unwrap_or(i32::MAX),
        message,
    }))
}

fn setsockopt_int(fd: RawFd, opt: libc::c_int, value: usize) -> io::Result<()> {
    let v = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt with a valid fd and a pointer to a c_int of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A netlink socket bound to multicast groups: the kernel's change notifications, read
/// on the poll loop. Only a wake-up for its owner, which reads what changed from a dump.
pub struct Watch {
    sock: Socket,
    /// Kept: drained at every wake-up of the poll loop.
    buf: Vec<u8>,
}

impl Watch {
    /// Subscribe to the groups of `protocol` whose bits (`1 << (group - 1)`) are in
    /// `groups`.
    pub fn open(protocol: isize, groups: u32) -> io::Result<Watch> {
        let mut sock = Socket::new(protocol)?;
        sock.bind(&SocketAddr::new(0, groups))?;
        sock.set_non_blocking(true)?;
        Ok(Watch {
            sock,
            buf: vec![0u8; 64 * 1024],
        })
    }

    /// Hand every pending datagram to `each`. `true` if notifications were lost to a
    /// full socket buffer (`ENOBUFS`) since the last drain.
    pub fn drain(&mut self, mut each: impl FnMut(&[u8])) -> bool {
        let mut lost = false;
        loop {
            // SAFETY: recv into a buffer of the length given, on our own socket.
            let n = unsafe {
                libc::recv(
                    self.sock.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            };
            if n < 0 {
                match io::Error::last_os_error().raw_os_error() {
                    Some(libc::ENOBUFS) => {
                        lost = true;
                        continue;
                    }
                    Some(libc::EINTR) => continue,
                    _ => break,
                }
            }
            each(&self.buf[..n as usize]);
        }
        lost
    }
}

impl AsRawFd for Watch {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

/// The messages of one notification datagram: (type, sender's port, the message with its
/// header), or `None` once a length does not fit (the rest is unreadable).
pub fn notifications(mut at: &[u8]) -> impl Iterator<Item = Option<(u16, u32, &[u8])>> {
    std::iter::from_fn(move || {
        if at.len() < 16 {
            return None;
        }
        let len = u32::from_ne_bytes(at[0..4].try_into().expect("4 bytes")) as usize;
        let ty = u16::from_ne_bytes(at[4..6].try_into().expect("2 bytes"));
        let pid = u32::from_ne_bytes(at[12..16].try_into().expect("4 bytes"));
        if len < 16 || len > at.len() {
            at = &[];
            return Some(None);
        }
        let msg = &at[..len];
        at = at.get(len.next_multiple_of(4)..).unwrap_or(&[]);
        Some(Some((ty, pid, msg)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_reply(seq: u32, code: i32, flags: u16, msg: Option<&str>) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&0u32.to_ne_bytes()); // length, patched below
        b.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        b.extend_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&code.to_ne_bytes());
        // echoed header of the request (capped)
        b.extend_from_slice(&16u32.to_ne_bytes());
        b.extend_from_slice(&[0u8; 12]);
        if let Some(m) = msg {
            let mut v = m.as_bytes().to_vec();
            v.push(0);
            b.extend_from_slice(&((4 + v.len()) as u16).to_ne_bytes());
            b.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
            b.extend_from_slice(&v);
            while b.len() % 4 != 0 {
                b.push(0);
            }
        }
        let l = b.len() as u32;
        b[0..4].copy_from_slice(&l.to_ne_bytes());
        b
    }

    #[test]
    fn parses_errors_with_extended_ack() {
        let mut buf = error_reply(7, -22, NLM_F_CAPPED | NLM_F_ACK_TLVS, Some("bad key"));
        buf.extend(error_reply(8, 0, NLM_F_CAPPED, None));
        let mut seen = Vec::new();
        for_each_message(&buf, |m| {
            seen.push((m.seq, parse_error(&m)?));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].0, 7);
        let e = seen[0].1.clone().unwrap();
        assert_eq!(e.errno, libc::EINVAL);
        assert_eq!(e.message.as_deref(), Some("bad key"));
        assert!(e.to_string().contains("Invalid argument"), "{e}");
        assert!(e.to_string().contains("(bad key)"), "{e}");
        assert_eq!(seen[1], (8, None));
    }

    #[test]
    fn rejects_bad_lengths() {
        let mut buf = error_reply(1, -1, 0, None);
        buf[0..4].copy_from_slice(&999u32.to_ne_bytes());
        assert!(matches!(
            for_each_message(&buf, |_| Ok(())),
            Err(NetlinkError::Decode { .. })
        ));
    }
}
