//! `cargo bench --bench hello`: what one hello datagram costs the daemon on one core, by
//! kind of datagram, through the daemon's own admission (`drops::admit`) and protocol
//! (`Peer::on_hello`) code, for a node with 1,000 peers. No socket and no kernel: this is
//! the work a flood buys, not the network's share (the kernel's UDP receive path comes on
//! top, and in the VM it was the limit: about 2,600 datagrams/s from one sender, issue 13).
//!
//! Kinds: garbage; a well-formed hello from a peer under a wrong key (bad MAC); one from a
//! name not in the inventory; a recorded authentic hello replayed (the on-path attacker
//! without the PSK); and, for comparison, the admission as it was before the hello keys
//! were derived once per configuration (an HKDF per key line and a linear scan of the
//! inventory per datagram).
//!
//! Without `--bench` (e.g. `cargo test --benches`) it does nothing: it is not a test.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use encryptd::config::Config;
use encryptd::config::inventory::{Inventory, Node};
use encryptd::config::keys::{Algorithm as KeyAlg, KeyEntry, KeyRing};
use encryptd::config::settings;
use encryptd::ipsec::drops::{self, HelloKeys};
use encryptd::ipsec::hello::{self, Family, Hello};
use encryptd::ipsec::peer::{Local, Peer};
use zeroize::Zeroizing;

const PEERS: usize = 1000;
const ME: &str = "bench-0";
const MY_BOOT: [u8; 16] = [0xB0; 16];
const RUN: Duration = Duration::from_secs(1);

fn addr(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0A00_0001u32 + i as u32))
}

fn config(psk: u8) -> Config {
    let nodes = (0..=PEERS)
        .map(|i| Node {
            name: format!("bench-{i}"),
            addresses: vec![addr(i)],
            subnets: vec![],
            wireguard_public_key: None,
            span: 0..0,
        })
        .collect();
    let text = format!("mode = \"ipsec\"\nnode = \"{ME}\"\n");
    Config {
        settings: settings::parse_str(Path::new("/etc/encryptd/encryptd.toml"), &text)
            .expect("valid settings"),
        inventory: Inventory::new(nodes),
        keys: Some(KeyRing {
            entries: [1u8, 2]
                .iter()
                .map(|&id| KeyEntry {
                    id,
                    algorithm: KeyAlg::Gcm {
                        key_bits: 128,
                        icv_bits: 128,
                    },
                    psk: Zeroizing::new(vec![psk.wrapping_add(id); 20]),
                    line: usize::from(id),
                })
                .collect(),
        }),
        psk: None,
    }
}

/// The last peer's hello to this node, echoing `echo` (its fresh first delivery).
fn hello_from_last(echo: [u8; 16]) -> Hello {
    Hello {
        sender: format!("bench-{PEERS}"),
        receiver: ME.into(),
        boot: [0x11; 16],
        nonce: [0x22; 16],
        seq: 7,
        echo_boot: MY_BOOT,
        echo_nonce: echo,
        key_ids: 0b110,
        offers: Vec::new(),
        outbound: Vec::new(),
    }
}

fn seal(cfg: &Config, h: &Hello) -> Vec<u8> {
    let keys = drops::hello_keys(cfg, &h.sender, &h.receiver);
    let refs: Vec<(u8, &[u8])> = keys.iter().map(|(i, k)| (*i, k.as_slice())).collect();
    h.encode(&refs)
}

/// Datagrams through `f` for `RUN`: (datagrams per second, µs per datagram).
fn rate(mut f: impl FnMut()) -> (f64, f64) {
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed() < RUN {
        for _ in 0..256 {
            f();
        }
        n += 256;
    }
    let s = t.elapsed().as_secs_f64();
    (n as f64 / s, s * 1e6 / n as f64)
}

/// The admission as it was: an HKDF per key line and a scan of the inventory, per datagram.
fn admit_before(cfg: &Config, bytes: &[u8], from: IpAddr) -> Result<Hello, &'static str> {
    let u = hello::parse(bytes).map_err(|_| "parse")?;
    let sender = u.hello.sender.clone();
    let node = cfg
        .inventory
        .peers(ME)
        .find(|n| n.name == sender)
        .ok_or("unknown_sender")?;
    if !node.addresses.contains(&from) {
        return Err("wrong_source");
    }
    let keys = drops::hello_keys(cfg, &sender, ME);
    let refs: Vec<(u8, &[u8])> = keys.iter().map(|(i, k)| (*i, k.as_slice())).collect();
    u.verify(&refs).map_err(|_| "bad_mac")
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let cfg = config(7);
    let wrong = config(99);
    let keys = HelloKeys::new(&cfg);
    let from = addr(PEERS);
    let my_nonce = [0x33; 16];
    let mut peer = Peer::new(&format!("bench-{PEERS}"), my_nonce);
    let ids = [1u8, 2];
    let local = Local {
        boot: &MY_BOOT,
        key_ids: &ids,
        families: &[Family::V4],
    };
    let authentic = seal(&cfg, &hello_from_last(my_nonce));
    // First delivery: fresh, accepted, so that every later copy is a replay.
    let h = drops::admit(&cfg, &keys, &authentic, from).expect("authentic");
    let mut spi = 0x1000u32;
    let first = peer.on_hello(
        &h,
        Family::V4,
        &local,
        Instant::now(),
        &mut |_| {
            spi += 16;
            Some(spi)
        },
        &mut || [0x44; 16],
    );
    assert!(!first.stale && !first.replayed, "{first:?}");

    let mut x = 0x1234_5678u32;
    let garbage: Vec<u8> = (0..200)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect();
    let bad_mac = seal(&wrong, &hello_from_last(my_nonce));
    let mut unknown = hello_from_last(my_nonce);
    unknown.sender = "stranger".into();
    let unknown = seal(&cfg, &unknown);

    let mut rows: Vec<(&str, &str, (f64, f64))> = Vec::new();
    for (kind, bytes) in [
        ("garbage", &garbage),
        ("bad MAC", &bad_mac),
        ("unknown sender", &unknown),
    ] {
        rows.push((
            kind,
            "now",
            rate(|| {
                black_box(drops::admit(&cfg, &keys, black_box(bytes), from).ok());
            }),
        ));
        rows.push((
            kind,
            "before",
            rate(|| {
                black_box(admit_before(&cfg, black_box(bytes), from).ok());
            }),
        ));
    }
    let mut replays = 0u64;
    let r = rate(|| {
        if let Ok(h) = drops::admit(&cfg, &keys, black_box(&authentic), from) {
            let o = peer.on_hello(
                &h,
                Family::V4,
                &local,
                Instant::now(),
                &mut |_| None,
                &mut || [0x55; 16],
            );
            replays += u64::from(o.replayed);
        }
    });
    rows.push(("replayed authentic", "now", r));
    let r = rate(|| {
        if let Ok(h) = admit_before(&cfg, black_box(&authentic), from) {
            black_box(h);
        }
    });
    rows.push(("replayed authentic", "before (admission only)", r));
    assert!(replays > 0, "the replays were not counted as replays");

    println!("hello path, one core, {PEERS} peers, 2 key lines (release build)");
    println!();
    println!("| datagram | code | datagrams/s | µs each |");
    println!("|---|---|---:|---:|");
    for (kind, code, (per_s, us)) in rows {
        println!("| {kind} | {code} | {per_s:.0} | {us:.2} |");
    }
}
