//! `ipsec.keys`, in Cilium's line format:
//!
//! ```text
//! KEYID[+] rfc4106(gcm(aes)) HEX ICVBITS
//! KEYID[+] hmac(sha256) HEX cbc(aes) HEX
//! ```
//!
//! The last line is the current key; the line before it, if any, is the key being rotated
//! away from. Key bytes live only in zeroizing buffers and never reach a message: problems
//! name the line, the column and the field, not its content.

use std::fmt;

use zeroize::Zeroizing;

use super::diag::{Diagnostic, Diags, Source, file_diag};

/// The cipher suite of a key line, with key sizes but no key bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// `rfc4106(gcm(aes))`: AES key of `key_bits` plus a 32-bit salt.
    Gcm { key_bits: u16, icv_bits: u16 },
    /// `hmac(sha256)` for authentication, `cbc(aes)` for encryption.
    CbcHmac { enc_bits: u16 },
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Algorithm::Gcm { key_bits, icv_bits } => {
                write!(
                    f,
                    "rfc4106(gcm(aes)) {key_bits}-bit key, {icv_bits}-bit ICV"
                )
            }
            Algorithm::CbcHmac { enc_bits } => {
                write!(f, "hmac(sha256) with cbc(aes) {enc_bits}-bit key")
            }
        }
    }
}

/// One line of the keys file. `psk` holds the decoded key bytes as written: for GCM the
/// key and its salt, for CBC+HMAC the HMAC key followed by the AES key.
pub struct KeyEntry {
    pub id: u8,
    pub algorithm: Algorithm,
    pub psk: Zeroizing<Vec<u8>>,
    pub line: usize,
}

impl fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyEntry")
            .field("id", &self.id)
            .field("algorithm", &self.algorithm)
            .field("psk", &format_args!("<{} bytes redacted>", self.psk.len()))
            .field("line", &self.line)
            .finish()
    }
}

impl PartialEq for KeyEntry {
    fn eq(&self, o: &Self) -> bool {
        self.id == o.id && self.algorithm == o.algorithm && *self.psk == *o.psk
    }
}

impl Eq for KeyEntry {}

#[derive(Debug, PartialEq, Eq, Default)]
pub struct KeyRing {
    pub entries: Vec<KeyEntry>,
}

impl KeyRing {
    /// The key new outbound SAs use once both ends have it: the last line.
    pub fn current(&self) -> Option<&KeyEntry> {
        self.entries.last()
    }

    pub fn get(&self, id: u8) -> Option<&KeyEntry> {
        self.entries.iter().find(|e| e.id == id)
    }
}

/// The key-id after `id`: 15 wraps to 1.
pub fn next_id(id: u8) -> u8 {
    id % 15 + 1
}

/// Names the kernel's XFRM algorithm table knows (net/xfrm/xfrm_algo.c), so that a
/// misspelling is told apart from a real algorithm encryptd does not offer.
const XFRM_ALGORITHMS: &[&str] = &[
    "rfc4106(gcm(aes))",
    "rfc4309(ccm(aes))",
    "rfc4543(gcm(aes))",
    "rfc7539esp(chacha20,poly1305)",
    "digest_null",
    "hmac(md5)",
    "hmac(sha1)",
    "hmac(sha256)",
    "hmac(sha384)",
    "hmac(sha512)",
    "hmac(rmd160)",
    "hmac(sm3)",
    "xcbc(aes)",
    "cmac(aes)",
    "ecb(cipher_null)",
    "cbc(des)",
    "cbc(des3_ede)",
    "cbc(cast5)",
    "cbc(blowfish)",
    "cbc(aes)",
    "cbc(serpent)",
    "cbc(camellia)",
    "cbc(twofish)",
    "rfc3686(ctr(aes))",
    "cbc(sm4)",
];

const SUPPORTED: &str = "use rfc4106(gcm(aes)), or hmac(sha256) with cbc(aes)";

/// A whitespace-separated field of a line and where it starts in the file.
struct Field<'a> {
    text: &'a str,
    at: usize,
}

fn fields(line: &str, base: usize) -> Vec<Field<'_>> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in line
        .char_indices()
        .chain(std::iter::once((line.len(), ' ')))
    {
        match (c.is_whitespace(), start) {
            (true, Some(s)) => {
                out.push(Field {
                    text: &line[s..i],
                    at: base + s,
                });
                start = None;
            }
            (false, None) => start = Some(i),
            _ => {}
        }
    }
    out
}

/// Decode a hex key field into a zeroizing buffer; the message never echoes the field.
fn hex_key(
    f: &Field,
    what: &str,
    allowed_bytes: &[usize],
    src: &Source,
) -> Result<Zeroizing<Vec<u8>>, Diagnostic> {
    let digits = f.text.strip_prefix("0x").unwrap_or(f.text);
    let allowed = allowed_bytes
        .iter()
        .map(|b| (b * 2).to_string())
        .collect::<Vec<_>>();
    let allowed = match allowed.as_slice() {
        [one] => one.clone(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
        [] => unreachable!(),
    };
    if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(src.diag(f.at..f.at, format!("{what} is not hexadecimal")));
    }
    if !allowed_bytes.contains(&(digits.len() / 2)) || !digits.len().is_multiple_of(2) {
        return Err(src.diag(
            f.at..f.at,
            format!("{what} must be {allowed} hex digits, not {}", digits.len()),
        ));
    }
    let mut buf = Zeroizing::new(vec![0u8; digits.len() / 2]);
    hex::decode_to_slice(digits, buf.as_mut_slice())
        .map_err(|_| src.diag(f.at..f.at, format!("{what} is not hexadecimal")))?;
    Ok(buf)
}

/// One line of the keys file. Long on purpose: the fields left to right, each checked
/// where its column is known, so that every message names the exact spot (and never
/// the key bytes).
fn parse_line(
    fs: &[Field],
    src: &Source,
) -> Result<(u8, Algorithm, Zeroizing<Vec<u8>>), Diagnostic> {
    let at = |f: &Field| f.at..f.at;
    let id_text = fs[0].text.strip_suffix('+').unwrap_or(fs[0].text);
    let id = match id_text.parse::<u32>() {
        Ok(n @ 1..=15) => n as u8,
        Ok(n) => return Err(src.diag(at(&fs[0]), format!("key-id {n} is out of range 1..15"))),
        Err(_) => {
            return Err(src.diag(
                at(&fs[0]),
                format!(
                    "key-id must be a number from 1 to 15, not \"{}\"",
                    fs[0].text
                ),
            ));
        }
    };
    let Some(alg) = fs.get(1) else {
        return Err(src.diag(
            at(&fs[0]),
            format!("missing algorithm after key-id ({SUPPORTED})"),
        ));
    };
    let unsupported = |name: &str, f: &Field| {
        if XFRM_ALGORITHMS.contains(&name) {
            src.diag(
                at(f),
                format!("algorithm {name} is not supported by encryptd ({SUPPORTED})"),
            )
        } else {
            src.diag(
                at(f),
                format!(
                    "unknown algorithm \"{name}\": XFRM defines no such algorithm ({SUPPORTED})"
                ),
            )
        }
    };
    match alg.text {
        "rfc4106(gcm(aes))" => {
            let Some(key) = fs.get(2) else {
                return Err(src.diag(at(alg), "missing key after rfc4106(gcm(aes))"));
            };
            // An AES key of 128, 192 or 256 bits, then the 32-bit salt.
            let psk = hex_key(
                key,
                "rfc4106(gcm(aes)) key (AES key + 32-bit salt)",
                &[20, 28, 36],
                src,
            )?;
            let Some(icv) = fs.get(3) else {
                return Err(src.diag(at(key), "missing ICV length (64, 96 or 128) after the key"));
            };
            let icv_bits = match icv.text.parse::<u16>() {
                Ok(n @ (64 | 96 | 128)) => n,
                _ => {
                    return Err(src.diag(
                        at(icv),
                        format!(
                            "ICV length must be 64, 96 or 128 bits, not \"{}\"",
                            icv.text
                        ),
                    ));
                }
            };
            if let Some(extra) = fs.get(4) {
                return Err(src.diag(at(extra), "unexpected field after the ICV length"));
            }
            let key_bits = ((psk.len() - 4) * 8) as u16;
            Ok((id, Algorithm::Gcm { key_bits, icv_bits }, psk))
        }
        "hmac(sha256)" => {
            let Some(akey) = fs.get(2) else {
                return Err(src.diag(at(alg), "missing key after hmac(sha256)"));
            };
            let auth = hex_key(akey, "hmac(sha256) key", &[32], src)?;
            let Some(enc) = fs.get(3) else {
                return Err(src.diag(
                    at(akey),
                    "missing cipher after the hmac(sha256) key: expected cbc(aes)",
                ));
            };
            if enc.text != "cbc(aes)" {
                return Err(unsupported(enc.text, enc));
            }
            let Some(ekey) = fs.get(4) else {
                return Err(src.diag(at(enc), "missing key after cbc(aes)"));
            };
            let ekey_bytes = hex_key(ekey, "cbc(aes) key", &[16, 24, 32], src)?;
            if let Some(extra) = fs.get(5) {
                return Err(src.diag(at(extra), "unexpected field after the cbc(aes) key"));
            }
            let mut psk = Zeroizing::new(Vec::with_capacity(auth.len() + ekey_bytes.len()));
            psk.extend_from_slice(&auth);
            psk.extend_from_slice(&ekey_bytes);
            let enc_bits = (ekey_bytes.len() * 8) as u16;
            Ok((id, Algorithm::CbcHmac { enc_bits }, psk))
        }
        other => Err(unsupported(other, alg)),
    }
}

/// Parse the keys file's text (its file is opened and checked by the caller with `diag::read_secret_file`).
pub fn read(src: &Source, diags: &Diags) -> KeyRing {
    let mut ring = KeyRing::default();
    let mut offset = 0;
    let mut first_line = None;
    for (i, raw) in src.text.split_inclusive('\n').enumerate() {
        let base = offset;
        offset += raw.len();
        let line = raw.split('#').next().unwrap_or("");
        let fs = fields(line, base);
        if fs.is_empty() {
            continue;
        }
        let lineno = i + 1;
        match parse_line(&fs, src) {
            Err(d) => diags.push(d),
            Ok((id, algorithm, psk)) => {
                let at = fs[0].at..fs[0].at;
                if let Some(prev) = ring.get(id) {
                    diags.push(src.diag(
                        at,
                        format!("key-id {id} appears twice (lines {} and {lineno}); remove the older line", prev.line),
                    ));
                    continue;
                }
                if let Some(prev) = ring.entries.last() {
                    if id != next_id(prev.id) {
                        diags.push(src.diag(
                            at,
                            format!(
                                "key-id {id} does not follow key-id {} of line {}: a rotation appends key-id {} (old + 1, 15 wraps to 1)",
                                prev.id,
                                prev.line,
                                next_id(prev.id)
                            ),
                        ));
                    } else if prev.algorithm != algorithm {
                        diags.push(src.diag(
                            at,
                            format!(
                                "key-id {id} changes the algorithm from {} to {algorithm}; a rotation must keep the algorithm and key length",
                                prev.algorithm
                            ),
                        ));
                    }
                }
                first_line.get_or_insert(lineno);
                ring.entries.push(KeyEntry {
                    id,
                    algorithm,
                    psk,
                    line: lineno,
                });
            }
        }
    }
    if ring.entries.is_empty() && diags.is_empty() {
        diags.push(file_diag(
            src.path,
            "the keys file holds no key: add a line such as `1+ rfc4106(gcm(aes)) <40 hex digits> 128`",
        ));
    }
    ring
}
