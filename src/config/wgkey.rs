//! This node's WireGuard private key: `[wireguard] private_key`, one line of base64 as
//! `wg genkey` writes it, mode 0600 on persistent storage (a key on tmpfs is a new key
//! at every boot, and every peer's inventory is then wrong).
//!
//! The daemon creates the file on its first start if it is missing, and so does
//! `encryptd pubkey` (Ansible collects the public keys before the inventory exists, so
//! before the daemon can start). The key bytes live only in zeroizing buffers; `Debug`
//! prints the public key, never the private one, and no message contains key material.

use std::fmt;
use std::fs;
use std::io;
use std::path::Path;

use base64::Engine as _;
use zeroize::Zeroizing;

use super::diag::{Diagnostic, file_diag, read_secret_file};

/// A Curve25519 key in base64: 44 characters.
const B64_LEN: usize = 44;

pub fn to_base64(key: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// A WireGuard (X25519) private key, clamped as `wg genkey` makes it.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey(Zeroizing<[u8; 32]>);

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(public {})", to_base64(&self.public()))
    }
}

impl PrivateKey {
    /// A new key from the kernel's random generator.
    pub fn generate() -> PrivateKey {
        let mut k = Zeroizing::new([0u8; 32]);
        crate::random::fill(&mut k[..]);
        // Clamping (RFC 7748) as `wg genkey` does; X25519 clamps anyway.
        k[0] &= 248;
        k[31] = (k[31] & 127) | 64;
        PrivateKey(k)
    }

    pub fn from_bytes(bytes: [u8; 32]) -> PrivateKey {
        PrivateKey(Zeroizing::new(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The public key: X25519 of the private key and the base point.
    pub fn public(&self) -> [u8; 32] {
        x25519_dalek::x25519(*self.0, x25519_dalek::X25519_BASEPOINT_BYTES)
    }

    /// The file's content: base64 and a newline.
    pub fn to_base64(&self) -> Zeroizing<String> {
        let mut s = Zeroizing::new(String::with_capacity(B64_LEN + 1));
        base64::engine::general_purpose::STANDARD.encode_string(*self.0, &mut s);
        s.push('\n');
        s
    }

    /// Parse the file's content; the error names what is wrong, never the content.
    pub fn from_base64(text: &str) -> Result<PrivateKey, &'static str> {
        decode(text).map(PrivateKey)
    }
}

/// 32 bytes from 44 characters of base64 (surrounding whitespace ignored).
fn decode(text: &str) -> Result<Zeroizing<[u8; 32]>, &'static str> {
    let t = text.trim();
    if t.len() != B64_LEN {
        return Err(
            "is not one WireGuard key (44 characters of base64, as `encryptd keygen` or `wg genkey` prints)",
        );
    }
    let mut buf = Zeroizing::new([0u8; 33]);
    match base64::engine::general_purpose::STANDARD.decode_slice(t, &mut buf[..]) {
        Ok(32) => {
            let mut k = Zeroizing::new([0u8; 32]);
            k.copy_from_slice(&buf[..32]);
            Ok(k)
        }
        _ => Err("is not valid base64 of 32 bytes (a WireGuard key)"),
    }
}

/// A WireGuard preshared key: the cluster's (`[wireguard] preshared_key`) or one pair's,
/// derived from it. All zeros means none, as in the kernel's API.
#[derive(Clone, PartialEq, Eq)]
pub struct PresharedKey(Zeroizing<[u8; 32]>);

impl fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PresharedKey(..)")
    }
}

impl PresharedKey {
    /// No preshared key.
    pub fn none() -> PresharedKey {
        PresharedKey(Zeroizing::new([0; 32]))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> PresharedKey {
        PresharedKey(Zeroizing::new(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn is_none(&self) -> bool {
        self.0.iter().all(|b| *b == 0)
    }

    /// A short one-way tag to compare keys by (what the kernel has with what the plan
    /// wants) without holding or printing the key itself; `None` for no key.
    pub fn tag(bytes: &[u8; 32]) -> Option<[u8; 8]> {
        use sha2::Digest;
        if bytes.iter().all(|b| *b == 0) {
            return None;
        }
        let d = sha2::Sha256::new_with_prefix(b"encryptd psk tag")
            .chain_update(bytes)
            .finalize();
        let mut t = [0; 8];
        t.copy_from_slice(&d[..8]);
        Some(t)
    }
}

/// Read the cluster preshared key file: mode 0600, one key in base64 (`wg genpsk`).
pub fn read_psk(path: &Path) -> Result<PresharedKey, Diagnostic> {
    let key = read_key_file(path, "preshared key").map(PresharedKey)?;
    if key.is_none() {
        return Err(file_diag(
            path,
            "the preshared key file holds an all-zero key, which WireGuard takes as no key: make one with `wg genpsk` or `head -c 32 /dev/urandom | base64`",
        ));
    }
    Ok(key)
}

/// A file holding one key in base64 (`what`: "private key", "preshared key"), its
/// mode checked first; the errors never quote the content.
fn read_key_file(path: &Path, what: &str) -> Result<Zeroizing<[u8; 32]>, Diagnostic> {
    let bytes = read_secret_file(path, what)?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| file_diag(path, format!("the {what} file is not text (base64)")))?;
    decode(text).map_err(|m| file_diag(path, format!("the {what} file {m}")))
}

/// Read the private key file (its mode checked first).
pub fn read(path: &Path) -> Result<PrivateKey, Diagnostic> {
    read_key_file(path, "private key").map(PrivateKey)
}

/// Read the key, or create the file with a new key if there is none. `true` when created.
pub fn load_or_create(path: &Path) -> Result<(PrivateKey, bool), Diagnostic> {
    match fs::symlink_metadata(path) {
        Ok(_) => return read(path).map(|k| (k, false)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(file_diag(path, format!("cannot read: {e}"))),
    }
    let key = PrivateKey::generate();
    create(path, &key)
        .map_err(|e| file_diag(path, format!("cannot create the private key file: {e}")))?;
    Ok((key, true))
}

/// Write `key` to a new file at `path`, 0600, durably, never replacing a key that
/// appeared meanwhile.
fn create(path: &Path, key: &PrivateKey) -> io::Result<()> {
    let text = key.to_base64();
    crate::files::create_new(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("encryptd-wgkey-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn rfc7748_public_key() {
        // RFC 7748 section 6.1: Alice's private and public key.
        let k = PrivateKey::from_bytes(
            hex::decode("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                .unwrap()
                .try_into()
                .unwrap(),
        );
        assert_eq!(
            hex::encode(k.public()),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
    }

    #[test]
    fn base64_round_trip_and_errors() {
        let k = PrivateKey::generate();
        let text = k.to_base64();
        assert_eq!(text.len(), 45);
        assert_eq!(PrivateKey::from_base64(&text).unwrap(), k);
        assert_eq!(k.as_bytes()[0] & 7, 0, "clamped");
        assert!(PrivateKey::from_base64("short").is_err());
        assert!(PrivateKey::from_base64(&"!".repeat(44)).is_err());
        let dbg = format!("{k:?}");
        assert!(dbg.contains(&to_base64(&k.public())), "{dbg}");
        assert!(
            !dbg.contains(text.trim()),
            "Debug must not print the private key"
        );
    }

    #[test]
    fn created_once_at_0600_then_read_back() {
        let d = dir("create");
        let p = d.join("sub/wireguard.key");
        let (k, created) = load_or_create(&p).unwrap();
        assert!(created);
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (k2, created) = load_or_create(&p).unwrap();
        assert!(!created);
        assert_eq!(k, k2);
        assert_eq!(
            fs::read_dir(p.parent().unwrap()).unwrap().count(),
            1,
            "no temporary left"
        );

        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        let e = read(&p).unwrap_err();
        assert_eq!(
            e.message,
            format!(
                "private key file is accessible by group or others (mode 0640); it must be 0600: chmod 0600 {}",
                p.display()
            )
        );
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&p, "not a key\n").unwrap();
        let e = read(&p).unwrap_err();
        assert!(
            e.message
                .starts_with("the private key file is not one WireGuard key"),
            "{e}"
        );
        let _ = fs::remove_dir_all(&d);
    }
}
