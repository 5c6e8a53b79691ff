//! Per-pair, per-boot key derivation from the pre-shared key (HKDF-SHA256).
//!
//! Every SA gets its own key: the `info` binds the key-id, the direction (sender and
//! receiver names and addresses), both nodes' boot IDs and the SPI the receiver chose for
//! this SA. A reboot changes a boot ID and so every key of that node; a re-created SA gets
//! an SPI never handed out before in this boot (`ledger`) and so a fresh key. That is what keeps (key, sequence number) pairs
//! from ever repeating, which ESP-GCM's nonce construction needs (Cilium
//! GHSA-pwqm-x5x6-5586: one key on many tunnels).

use std::net::IpAddr;

use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

use crate::config::keys::{Algorithm, KeyEntry};
use crate::config::wgkey::PresharedKey;

/// A boot ID (or any 128-bit epoch value).
pub type BootId = [u8; 16];

/// Parse `/proc/sys/kernel/random/boot_id` (a UUID in text).
pub fn parse_boot_id(s: &str) -> Option<BootId> {
    let hex: String = s.trim().chars().filter(|c| *c != '-').collect();
    let mut out = [0u8; 16];
    hex::decode_to_slice(&hex, &mut out).ok()?;
    Some(out)
}

const SALT: &[u8] = b"encryptd v1";

/// Length-prefixed concatenation, so that no two different inputs give the same `info`.
fn info(label: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::with_capacity(64);
    v.extend_from_slice(label);
    for p in parts {
        v.extend_from_slice(&(p.len() as u16).to_be_bytes());
        v.extend_from_slice(p);
    }
    v
}

fn ip16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

fn expand(psk: &[u8], info: &[u8], len: usize) -> Zeroizing<Vec<u8>> {
    let hk = Hkdf::<Sha256>::new(Some(SALT), psk);
    let mut out = Zeroizing::new(vec![0u8; len]);
    hk.expand(info, &mut out)
        .expect("HKDF-SHA256 output length is far below its 8160-byte limit");
    out
}

/// One direction of one pair, for one SA.
#[derive(Debug, Clone, Copy)]
pub struct SaContext<'a> {
    pub sender: &'a str,
    pub receiver: &'a str,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sender_boot: &'a BootId,
    pub receiver_boot: &'a BootId,
    pub spi: u32,
}

/// Key bytes for one SA, laid out as XFRM wants them for the entry's algorithm.
#[derive(Clone, PartialEq, Eq)]
pub enum SaKey {
    /// AES key followed by the 4-byte salt.
    Gcm {
        key: Zeroizing<Vec<u8>>,
        icv_bits: u16,
    },
    CbcHmac {
        enc: Zeroizing<Vec<u8>>,
        auth: Zeroizing<Vec<u8>>,
    },
}

impl std::fmt::Debug for SaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SaKey::Gcm { icv_bits, .. } => {
                write!(f, "Gcm {{ key: <redacted>, icv_bits: {icv_bits} }}")
            }
            SaKey::CbcHmac { .. } => f.write_str("CbcHmac { <redacted> }"),
        }
    }
}

pub fn sa_key(entry: &KeyEntry, c: &SaContext) -> SaKey {
    let info = info(
        b"esp",
        &[
            &[entry.id],
            c.sender.as_bytes(),
            c.receiver.as_bytes(),
            &ip16(c.src),
            &ip16(c.dst),
            c.sender_boot,
            c.receiver_boot,
            &c.spi.to_be_bytes(),
        ],
    );
    match entry.algorithm {
        Algorithm::Gcm { key_bits, icv_bits } => SaKey::Gcm {
            key: expand(&entry.psk, &info, usize::from(key_bits) / 8 + 4),
            icv_bits,
        },
        Algorithm::CbcHmac { enc_bits } => {
            let enc_len = usize::from(enc_bits) / 8;
            let okm = expand(&entry.psk, &info, enc_len + 32);
            SaKey::CbcHmac {
                enc: Zeroizing::new(okm[..enc_len].to_vec()),
                auth: Zeroizing::new(okm[enc_len..].to_vec()),
            }
        }
    }
}

/// The key that authenticates hellos from `sender` to `receiver` under key-id `entry.id`.
pub fn hello_key(entry: &KeyEntry, sender: &str, receiver: &str) -> Zeroizing<Vec<u8>> {
    let info = info(
        b"hello",
        &[&[entry.id], sender.as_bytes(), receiver.as_bytes()],
    );
    expand(&entry.psk, &info, 32)
}

/// The WireGuard preshared key of the pair with public keys `a` and `b`: the same on
/// both sides (the keys are put in order), different for every pair, so one pair's key
/// says nothing about another's; a node with a new key pair gets new preshared keys.
pub fn wireguard_psk(cluster: &PresharedKey, a: &[u8; 32], b: &[u8; 32]) -> PresharedKey {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let okm = expand(cluster.as_bytes(), &info(b"wireguard psk", &[lo, hi]), 32);
    let mut k = [0u8; 32];
    k.copy_from_slice(&okm);
    let psk = PresharedKey::from_bytes(k);
    k.zeroize();
    psk
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wireguard_psk_per_pair_symmetric() {
        let c = PresharedKey::from_bytes([9; 32]);
        let (a, b, d) = ([1; 32], [2; 32], [3; 32]);
        let ab = wireguard_psk(&c, &a, &b);
        assert_eq!(ab, wireguard_psk(&c, &b, &a), "both ends agree");
        assert_ne!(ab, wireguard_psk(&c, &a, &d), "another pair, another key");
        assert_ne!(ab, c, "not the cluster key itself");
        assert_ne!(
            ab,
            wireguard_psk(&PresharedKey::from_bytes([8; 32]), &a, &b),
            "a new cluster key changes every pair's key"
        );
        assert!(!ab.is_none());
    }

    fn entry(id: u8, alg: Algorithm, psk: &[u8]) -> KeyEntry {
        KeyEntry {
            id,
            algorithm: alg,
            psk: Zeroizing::new(psk.to_vec()),
            line: 1,
        }
    }

    const GCM: Algorithm = Algorithm::Gcm {
        key_bits: 128,
        icv_bits: 128,
    };

    fn gcm_bytes(k: &SaKey) -> Vec<u8> {
        match k {
            SaKey::Gcm { key, .. } => key.to_vec(),
            _ => panic!(),
        }
    }

    #[test]
    fn boot_ids() {
        let b = parse_boot_id("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0\n").unwrap();
        assert_eq!(b[0], 0x0f);
        assert_eq!(b[15], 0xf0);
        assert!(parse_boot_id("nope").is_none());
    }

    #[test]
    fn every_input_changes_the_key() {
        let e = entry(3, GCM, &[7; 20]);
        let (b1, b2, b3) = ([1; 16], [2; 16], [3; 16]);
        let base = SaContext {
            sender: "a",
            receiver: "b",
            src: "192.0.2.1".parse().unwrap(),
            dst: "192.0.2.2".parse().unwrap(),
            sender_boot: &b1,
            receiver_boot: &b2,
            spi: 0x1000,
        };
        let k0 = gcm_bytes(&sa_key(&e, &base));
        assert_eq!(k0.len(), 20);
        let variants = [
            SaContext {
                sender: "b",
                receiver: "a",
                ..base
            },
            SaContext {
                src: "192.0.2.2".parse().unwrap(),
                dst: "192.0.2.1".parse().unwrap(),
                ..base
            },
            SaContext {
                src: "2001:db8::1".parse().unwrap(),
                ..base
            },
            SaContext {
                sender_boot: &b3,
                ..base
            },
            SaContext {
                receiver_boot: &b3,
                ..base
            },
            SaContext {
                spi: 0x1001,
                ..base
            },
            SaContext {
                sender: "ab",
                receiver: "",
                ..base
            },
        ];
        let mut seen = vec![k0.clone()];
        for v in &variants {
            let k = gcm_bytes(&sa_key(&e, v));
            assert!(!seen.contains(&k), "{v:?} repeats a key");
            seen.push(k);
        }
        // Another key-id or PSK changes it too; the same inputs give the same key.
        assert_ne!(gcm_bytes(&sa_key(&entry(4, GCM, &[7; 20]), &base)), k0);
        assert_ne!(gcm_bytes(&sa_key(&entry(3, GCM, &[8; 20]), &base)), k0);
        assert_eq!(gcm_bytes(&sa_key(&e, &base)), k0);
    }

    #[test]
    fn lengths_follow_the_algorithm() {
        let b = [0; 16];
        let c = SaContext {
            sender: "a",
            receiver: "b",
            src: "192.0.2.1".parse().unwrap(),
            dst: "192.0.2.2".parse().unwrap(),
            sender_boot: &b,
            receiver_boot: &b,
            spi: 1,
        };
        let k = sa_key(
            &entry(
                1,
                Algorithm::Gcm {
                    key_bits: 256,
                    icv_bits: 96,
                },
                &[1; 36],
            ),
            &c,
        );
        assert_eq!(gcm_bytes(&k).len(), 36);
        match sa_key(
            &entry(1, Algorithm::CbcHmac { enc_bits: 128 }, &[1; 48]),
            &c,
        ) {
            SaKey::CbcHmac { enc, auth } => {
                assert_eq!((enc.len(), auth.len()), (16, 32));
                assert_ne!(enc[..], auth[..16]);
            }
            _ => panic!(),
        }
        assert_eq!(format!("{k:?}"), "Gcm { key: <redacted>, icv_bits: 96 }");
    }

    #[test]
    fn hello_keys_are_directional() {
        let e = entry(1, GCM, &[9; 20]);
        assert_ne!(*hello_key(&e, "a", "b"), *hello_key(&e, "b", "a"));
        assert_eq!(hello_key(&e, "a", "b").len(), 32);
    }
}
