//! The hello: a small authenticated UDP message between daemons. It tells the receiver
//! who the sender is (name, boot ID), which key-ids it holds, which SPIs the receiver may
//! use towards it (offers) and which SPIs it currently sends with (outbound), and it
//! echoes what it last heard from the receiver (boot ID, nonce) so that the receiver can
//! tell a fresh message from a replayed one. See docs/hello.md for the format and the
//! threat model. This module is pure: bytes in, bytes out.

use std::fmt;

use hmac::{KeyInit, Mac};
use sha2::Sha256;

use crate::ipsec::derive::BootId;

const MAGIC: &[u8; 4] = b"ENCD";
const VERSION: u8 = 1;
/// No hello is larger than this; anything bigger is dropped unread.
pub const MAX_LEN: usize = 1400;
const MAC_LEN: usize = 32;
/// At most this many MACs (one per key-id held; two during a rotation).
const MAX_MACS: usize = 4;

/// IP family of an SA, as carried on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn to_wire(self) -> u8 {
        match self {
            Family::V4 => 4,
            Family::V6 => 6,
        }
    }

    fn from_wire(b: u8) -> Option<Family> {
        match b {
            4 => Some(Family::V4),
            6 => Some(Family::V6),
            _ => None,
        }
    }
}

/// "Use SPI `spi` for your SA towards me, family `family`, key-id `key_id`." `bound` says
/// the offer was made for the receiver nonce this hello echoes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    pub family: Family,
    pub key_id: u8,
    pub spi: u32,
    pub bound: bool,
}

/// "I send to you with SPI `spi`" for (family, key-id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outbound {
    pub family: Family,
    pub key_id: u8,
    pub spi: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub sender: String,
    pub receiver: String,
    pub boot: BootId,
    /// The sender's nonce for this receiver: echoed back, it proves freshness.
    pub nonce: [u8; 16],
    /// Increases with every hello the sender sends under `nonce`.
    pub seq: u64,
    /// The receiver's boot ID and nonce as the sender last heard them (zeros: never).
    pub echo_boot: BootId,
    pub echo_nonce: [u8; 16],
    /// Key-ids the sender holds, bit k for key-id k.
    pub key_ids: u16,
    pub offers: Vec<Offer>,
    pub outbound: Vec<Outbound>,
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    Oversized,
    Truncated,
    NotAHello,
    Malformed,
    /// No MAC under a key-id we hold verifies.
    BadMac,
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DropReason::Oversized => "oversized",
            DropReason::Truncated => "truncated",
            DropReason::NotAHello => "not a hello",
            DropReason::Malformed => "malformed",
            DropReason::BadMac => "bad MAC",
        })
    }
}

fn put_name(out: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(255)];
    out.push(b.len() as u8);
    out.extend_from_slice(b);
}

fn mac(key: &[u8], body: &[u8]) -> [u8; MAC_LEN] {
    let mut m =
        <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(body);
    m.finalize().into_bytes().into()
}

impl Hello {
    /// Serialise and authenticate with one MAC per `(key_id, hello key)`.
    pub fn encode(&self, keys: &[(u8, &[u8])]) -> Vec<u8> {
        let mut b = Vec::with_capacity(256);
        b.extend_from_slice(MAGIC);
        b.push(VERSION);
        b.push(0);
        put_name(&mut b, &self.sender);
        put_name(&mut b, &self.receiver);
        b.extend_from_slice(&self.boot);
        b.extend_from_slice(&self.nonce);
        b.extend_from_slice(&self.seq.to_be_bytes());
        b.extend_from_slice(&self.echo_boot);
        b.extend_from_slice(&self.echo_nonce);
        b.extend_from_slice(&self.key_ids.to_be_bytes());
        b.push(self.offers.len() as u8);
        for o in &self.offers {
            b.extend_from_slice(&[o.family.to_wire(), o.key_id]);
            b.extend_from_slice(&o.spi.to_be_bytes());
            b.push(u8::from(o.bound));
        }
        b.push(self.outbound.len() as u8);
        for o in &self.outbound {
            b.extend_from_slice(&[o.family.to_wire(), o.key_id]);
            b.extend_from_slice(&o.spi.to_be_bytes());
        }
        let keys = &keys[..keys.len().min(MAX_MACS)];
        let body_len = b.len();
        b.push(keys.len() as u8);
        for (id, key) in keys {
            let m = mac(key, &b[..body_len]);
            b.push(*id);
            b.extend_from_slice(&m);
        }
        b
    }
}

/// A cursor that reports running past the end as `DropReason::Truncated`.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DropReason> {
        let s = self
            .b
            .get(self.at..self.at + n)
            .ok_or(DropReason::Truncated)?;
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DropReason> {
        Ok(self.take(1)?[0])
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], DropReason> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }
    fn name(&mut self) -> Result<String, DropReason> {
        let n = self.u8()? as usize;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| DropReason::Malformed)
    }
}

/// Parse without trusting anything; the caller then checks the MACs with `verify`.
pub struct Unverified {
    pub hello: Hello,
    body_len: usize,
    macs: Vec<(u8, [u8; MAC_LEN])>,
    bytes: Vec<u8>,
}

/// The wire format, field after field in the order of docs/hello.md's table, each
/// bounded before it is read. Long on purpose: an attacker's bytes go through this;
/// one straight reading is the easiest to check against the table.
pub fn parse(bytes: &[u8]) -> Result<Unverified, DropReason> {
    if bytes.len() > MAX_LEN {
        return Err(DropReason::Oversized);
    }
    let mut r = Reader { b: bytes, at: 0 };
    if r.take(4).map_err(|_| DropReason::NotAHello)? != MAGIC
        || r.u8().map_err(|_| DropReason::NotAHello)? != VERSION
    {
        return Err(DropReason::NotAHello);
    }
    let _flags = r.u8()?;
    let sender = r.name()?;
    let receiver = r.name()?;
    let boot = r.arr()?;
    let nonce = r.arr()?;
    let seq = u64::from_be_bytes(r.arr()?);
    let echo_boot = r.arr()?;
    let echo_nonce = r.arr()?;
    let key_ids = u16::from_be_bytes(r.arr()?);
    let key_id = |b: u8| {
        if (1..=15).contains(&b) {
            Ok(b)
        } else {
            Err(DropReason::Malformed)
        }
    };
    let mut offers = Vec::new();
    for _ in 0..r.u8()? {
        let [f, k] = r.arr()?;
        let spi = u32::from_be_bytes(r.arr()?);
        let bound = match r.u8()? {
            0 => false,
            1 => true,
            _ => return Err(DropReason::Malformed),
        };
        offers.push(Offer {
            family: Family::from_wire(f).ok_or(DropReason::Malformed)?,
            key_id: key_id(k)?,
            spi,
            bound,
        });
    }
    let mut outbound = Vec::new();
    for _ in 0..r.u8()? {
        let [f, k] = r.arr()?;
        let spi = u32::from_be_bytes(r.arr()?);
        outbound.push(Outbound {
            family: Family::from_wire(f).ok_or(DropReason::Malformed)?,
            key_id: key_id(k)?,
            spi,
        });
    }
    let body_len = r.at;
    let n = r.u8()? as usize;
    if n == 0 || n > MAX_MACS {
        return Err(DropReason::Malformed);
    }
    let mut macs = Vec::new();
    for _ in 0..n {
        let id = r.u8()?;
        macs.push((id, r.arr()?));
    }
    if r.at != bytes.len() {
        return Err(DropReason::Malformed);
    }
    Ok(Unverified {
        hello: Hello {
            sender,
            receiver,
            boot,
            nonce,
            seq,
            echo_boot,
            echo_nonce,
            key_ids,
            offers,
            outbound,
        },
        body_len,
        macs,
        bytes: bytes.to_vec(),
    })
}

impl Unverified {
    /// Key-ids whose MAC the sender included, so the caller can derive those hello keys.
    pub fn mac_key_ids(&self) -> impl Iterator<Item = u8> + '_ {
        self.macs.iter().map(|(id, _)| *id)
    }

    /// Accept if the MAC under any `(key_id, hello key)` verifies (constant-time compare).
    pub fn verify(self, keys: &[(u8, &[u8])]) -> Result<Hello, DropReason> {
        let body = &self.bytes[..self.body_len];
        for (id, m) in &self.macs {
            if let Some((_, key)) = keys.iter().find(|(k, _)| k == id) {
                let mut h =
                    <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("any key length");
                h.update(body);
                if h.verify_slice(m).is_ok() {
                    return Ok(self.hello);
                }
            }
        }
        Err(DropReason::BadMac)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Hello {
        Hello {
            sender: "node-a".into(),
            receiver: "node-b".into(),
            boot: [1; 16],
            nonce: [2; 16],
            seq: 42,
            echo_boot: [3; 16],
            echo_nonce: [4; 16],
            key_ids: 0b110,
            offers: vec![
                Offer {
                    family: Family::V4,
                    key_id: 1,
                    spi: 0xE100_0001,
                    bound: true,
                },
                Offer {
                    family: Family::V6,
                    key_id: 2,
                    spi: 0xE200_0002,
                    bound: false,
                },
            ],
            outbound: vec![Outbound {
                family: Family::V4,
                key_id: 1,
                spi: 0xE300_0003,
            }],
        }
    }

    const K1: &[u8] = &[0x11; 32];
    const K2: &[u8] = &[0x22; 32];

    #[test]
    fn round_trip() {
        let bytes = sample().encode(&[(1, K1), (2, K2)]);
        let u = parse(&bytes).unwrap();
        assert_eq!(u.mac_key_ids().collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(u.verify(&[(2, K2)]).unwrap(), sample());
        assert_eq!(parse(&bytes).unwrap().verify(&[(1, K1)]).unwrap(), sample());
    }

    #[test]
    fn forged_or_wrong_key_is_rejected() {
        let bytes = sample().encode(&[(1, K1)]);
        assert_eq!(
            parse(&bytes).unwrap().verify(&[(1, K2)]).unwrap_err(),
            DropReason::BadMac
        );
        assert_eq!(
            parse(&bytes).unwrap().verify(&[(2, K1)]).unwrap_err(),
            DropReason::BadMac
        );
        // Flip one bit anywhere in the body: the MAC no longer verifies (or parsing fails).
        for i in 6..bytes.len() - 33 {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            if let Ok(u) = parse(&b) {
                assert_eq!(
                    u.verify(&[(1, K1)]).unwrap_err(),
                    DropReason::BadMac,
                    "bit flip at {i}"
                );
            }
        }
    }

    #[test]
    fn truncated_oversized_and_garbage() {
        let bytes = sample().encode(&[(1, K1)]);
        for n in 6..bytes.len() {
            assert!(parse(&bytes[..n]).is_err(), "prefix of {n} bytes parsed");
        }
        assert_eq!(
            parse(&vec![0u8; MAX_LEN + 1]).err(),
            Some(DropReason::Oversized)
        );
        assert_eq!(parse(b"GET / HTTP/1.0").err(), Some(DropReason::NotAHello));
        assert_eq!(parse(b"").err(), Some(DropReason::NotAHello));
        let mut extra = bytes.clone();
        extra.push(0);
        assert_eq!(parse(&extra).err(), Some(DropReason::Malformed));
        let mut no_mac = sample().encode(&[]);
        assert_eq!(parse(&no_mac).err(), Some(DropReason::Malformed));
        no_mac.truncate(no_mac.len() - 1);
        assert!(parse(&no_mac).is_err());
    }

    #[test]
    fn fuzz_like_inputs_never_panic() {
        let bytes = sample().encode(&[(1, K1), (2, K2)]);
        let mut x: u32 = 12345;
        for _ in 0..20_000 {
            let mut b = bytes.clone();
            for _ in 0..4 {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                let i = (x as usize >> 8) % b.len();
                b[i] = (x >> 16) as u8;
            }
            if let Ok(u) = parse(&b) {
                let _ = u.verify(&[(1, K1)]);
            }
        }
    }
}
