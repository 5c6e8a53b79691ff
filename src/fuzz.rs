//! Entry points for fuzzing every parser that reads what others wrote: the hello datagram,
//! `ipsec.keys`, `nodes.toml`, `encryptd.toml`, the WireGuard key files, the UAPI
//! answer, the kernel's XFRM dump replies and `nft -j`'s listing. The libFuzzer targets under `fuzz/` call them, and `tests/fuzz_smoke.rs` runs
//! the committed corpus and a few seconds of mutations through them on every suite run
//! (docs/fuzzing.md). Each takes arbitrary bytes and must neither panic nor hang; what it
//! returns is thrown away, but every diagnostic is rendered, as `encryptd check` would.

use std::path::Path;

use crate::config::diag::{Diags, Source};
use crate::config::settings::Mode;
use crate::config::{inventory, keys, settings, wgkey};
use crate::ipsec::hello;

/// A target: arbitrary bytes in, nothing out.
pub type Target = fn(&[u8]);

/// Every target, by the name its corpus directory and `fuzz/` binary carry.
pub const TARGETS: &[(&str, Target)] = &[
    ("hello", hello_datagram),
    ("ipsec_keys", ipsec_keys),
    ("nodes_toml", nodes_toml),
    ("encryptd_toml", encryptd_toml),
    ("wireguard_key", wireguard_key),
    ("uapi_get", uapi_get),
    ("xfrm_dump", xfrm_dump),
    ("nft_listing", nft_listing),
];

pub fn hello_datagram(data: &[u8]) {
    if let Ok(u) = hello::parse(data) {
        let _ = u.mac_key_ids().count();
        let _ = u.verify(&[(1, &[7u8; 32]), (2, &[9u8; 32])]);
    }
}

fn text(data: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(data)
}

fn render(diags: Diags) {
    for d in diags.into_sorted() {
        let _ = d.to_string();
    }
}

pub fn ipsec_keys(data: &[u8]) {
    let t = text(data);
    let src = Source::new(Path::new("ipsec.keys"), &t);
    let diags = Diags::default();
    let _ = keys::read(&src, &diags);
    render(diags);
}

pub fn nodes_toml(data: &[u8]) {
    let t = text(data);
    let src = Source::new(Path::new("nodes.toml"), &t);
    for mode in [Mode::Ipsec, Mode::Wireguard] {
        let diags = Diags::default();
        let _ = inventory::read(&src, &diags, mode);
        render(diags);
    }
}

pub fn encryptd_toml(data: &[u8]) {
    let t = text(data);
    match settings::parse_str(Path::new("/etc/encryptd/encryptd.toml"), &t) {
        Ok(s) => {
            let _ = crate::config::unconfigured(&s);
        }
        Err(diags) => {
            for d in diags {
                let _ = d.to_string();
            }
        }
    }
}

pub fn wireguard_key(data: &[u8]) {
    let t = text(data);
    let _ = wgkey::PrivateKey::from_base64(&t).map(|k| k.public());
}

pub fn uapi_get(data: &[u8]) {
    let t = text(data);
    let lines = t.split('\n').map(|l| Ok(l.to_string()));
    let _ = crate::kernel::wireguard::parse_get(lines);
}

pub fn xfrm_dump(data: &[u8]) {
    crate::kernel::xfrm::parse_dump_reply(data);
}

pub fn nft_listing(data: &[u8]) {
    if let Ok(l) = crate::kernel::nft::Listing::parse(&text(data)) {
        let _ = l.counters();
        let _ = l.canonical();
        let _ = l.holds("table inet encryptd {\n\tchain out {\n\t\tx drop\n\t}\n}\n");
    }
}
