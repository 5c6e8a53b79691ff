//! The fuzz targets' smoke run, on the stable toolchain and in every suite run: each
//! target (`encryptd::fuzz::TARGETS`) gets its committed corpus (`fuzz/corpus/<name>/`)
//! and then `ENCRYPTD_FUZZ_SMOKE_SECS` (default 10) seconds of mutations of it. Not
//! coverage-guided: the long runs are `cargo fuzz`'s (docs/fuzzing.md); this catches a
//! parser change that panics or hangs on what the fuzzer already found.
//!
//! A panic fails the test with the input in hex; an input that takes more than
//! `STUCK` fails it as a hang, with the input, instead of holding the run.
//!
//! `ENCRYPTD_FUZZ_WRITE_SEEDS=DIR` writes the programmatic seeds (a sealed hello, XFRM
//! dump replies) into `DIR/<target>/` for the corpus.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use encryptd::ipsec::hello::{Family, Hello, Offer, Outbound};

/// Longer than this on one input is a hang.
const STUCK: Duration = Duration::from_secs(5);

fn sealed_hello() -> Vec<u8> {
    Hello {
        sender: "node-b".into(),
        receiver: "node-a".into(),
        boot: [1; 16],
        nonce: [2; 16],
        seq: 3,
        echo_boot: [4; 16],
        echo_nonce: [5; 16],
        key_ids: 0b110,
        offers: vec![Offer {
            family: Family::V4,
            key_id: 1,
            spi: 0x1234_5671,
            bound: true,
        }],
        outbound: vec![Outbound {
            family: Family::V6,
            key_id: 2,
            spi: 0x0abc_def2,
        }],
    }
    .encode(&[(1, &[7u8; 32]), (2, &[9u8; 32])])
}

fn seeds(name: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(name);
    let mut v: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .map(|d| {
            d.filter_map(|e| std::fs::read(e.ok()?.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    if name == "hello" {
        v.push(sealed_hello());
    }
    assert!(!v.is_empty(), "no corpus in {}", dir.display());
    v
}

/// xorshift64: the same mutations on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: &[u8] = b"\x00\xff\x7f\x80\"'[]{}=\n\r\t#.,:/\\ 0123456789abcdefxyz-_";

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut d = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(8) {
        let at = rng.below(d.len() + 1);
        match rng.below(7) {
            0 if !d.is_empty() => {
                let (i, bit) = (at.min(d.len() - 1), rng.below(8));
                d[i] ^= 1 << bit;
            }
            1 => d.insert(at, INTERESTING[rng.below(INTERESTING.len())]),
            2 if at < d.len() => {
                let n = rng.below(d.len() - at).min(16);
                d.drain(at..at + n);
            }
            3 => {
                let o = &seeds[rng.below(seeds.len())];
                let from = rng.below(o.len());
                let n = rng.below(o.len() - from + 1).min(64);
                d.splice(at..at, o[from..from + n].iter().copied());
            }
            4 if !d.is_empty() => {
                let from = rng.below(d.len());
                let n = rng.below(d.len() - from).min(32) + 1;
                let chunk: Vec<u8> = d[from..(from + n).min(d.len())].to_vec();
                d.splice(at..at, chunk);
            }
            5 if !d.is_empty() => {
                let (i, b) = (at.min(d.len() - 1), rng.next() as u8);
                d[i] = b;
            }
            _ => d.truncate(at),
        }
    }
    d
}

fn smoke(name: &str) {
    let target = encryptd::fuzz::TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
        .expect("a target of that name");
    let secs = std::env::var("ENCRYPTD_FUZZ_SMOKE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10u64);
    let seeds = seeds(name);
    let done = Arc::new(AtomicU64::new(0));
    let current: Arc<Mutex<Vec<u8>>> = Arc::default();
    let (d, c) = (done.clone(), current.clone());
    let until = Instant::now() + Duration::from_secs(secs);
    let worker = std::thread::spawn(move || {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ seeds.len() as u64);
        let mut i = 0usize;
        loop {
            let input = if i < seeds.len() {
                seeds[i].clone()
            } else if Instant::now() < until {
                mutate(&mut rng, &seeds)
            } else {
                break;
            };
            *c.lock().unwrap() = input.clone();
            target(&input);
            d.fetch_add(1, Ordering::Relaxed);
            i += 1;
        }
    });
    let mut last = (0, Instant::now());
    while !worker.is_finished() {
        std::thread::sleep(Duration::from_millis(50));
        let n = done.load(Ordering::Relaxed);
        if n != last.0 {
            last = (n, Instant::now());
        } else if last.1.elapsed() > STUCK {
            panic!(
                "{name}: one input took over {STUCK:?} (a hang); input in hex: {}",
                hex(&current.lock().unwrap_or_else(|e| e.into_inner()))
            );
        }
    }
    if worker.join().is_err() {
        panic!(
            "{name}: the target panicked; input in hex: {}",
            hex(&current.lock().unwrap_or_else(|e| e.into_inner()))
        );
    }
    println!(
        "{name}: {} inputs, 0 panics, 0 hangs",
        done.load(Ordering::Relaxed)
    );
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn write_seeds_when_asked() {
    if let Ok(dir) = std::env::var("ENCRYPTD_FUZZ_WRITE_SEEDS") {
        let d = Path::new(&dir).join("hello");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("sealed"), sealed_hello()).unwrap();
        let d = Path::new(&dir).join("xfrm_dump");
        std::fs::create_dir_all(&d).unwrap();
        for (i, m) in encryptd::kernel::xfrm::example_dump_replies()
            .iter()
            .enumerate()
        {
            std::fs::write(d.join(format!("reply-{i}")), m).unwrap();
        }
    }
}

#[test]
fn hello() {
    smoke("hello");
}

#[test]
fn ipsec_keys() {
    smoke("ipsec_keys");
}

#[test]
fn nodes_toml() {
    smoke("nodes_toml");
}

#[test]
fn encryptd_toml() {
    smoke("encryptd_toml");
}

#[test]
fn wireguard_key() {
    smoke("wireguard_key");
}

#[test]
fn uapi_get() {
    smoke("uapi_get");
}

#[test]
fn xfrm_dump() {
    smoke("xfrm_dump");
}

#[test]
fn nft_listing() {
    smoke("nft_listing");
}
