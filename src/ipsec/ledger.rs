//! The SPIs this node hands out for its inbound SAs: never the same one twice in a boot.
//!
//! An SA's key is derived from the PSK, the pair's names and addresses, both boot IDs and
//! the SPI (see `derive`). Within one boot of this node everything but the SPI can repeat,
//! so a repeated SPI is a repeated key, and the peer that takes the offer starts its
//! sequence numbers at 1 again: ESP-GCM nonce reuse. Random SPIs make that unlikely; this
//! ledger makes it impossible while the ledger is intact. SPIs come from a counter that
//! only goes up, and the counter is written to disk *before* any value of it is handed out.
//! The write is made in blocks (`BLOCK` values at a time), so a crash costs at most one
//! block of unused values, never a repeat. The file names this node and its boot; in a new
//! boot every key is new anyway (the boot ID is in the derivation) and the counter starts
//! over.
//!
//! When the ledger is gone (deleted, unreadable, another node's), the counter starts above
//! the highest SPI of ours the kernel still holds, at a random point: no worse than random
//! SPIs, and said in the log. docs/hello.md has the whole argument.

use std::io;
use std::path::{Path, PathBuf};

use crate::ipsec::derive::BootId;
use crate::ipsec::plan::make_spi;

/// Counter values written down at a time (one durable write per this many new SAs).
const BLOCK: u32 = 256;
/// The counter fills the SPI's upper 28 bits; the lower 4 are the key-id.
const LIMIT: u32 = 1 << 28;
/// Counter values below this would make SPIs in the reserved range 0..=255.
const FIRST: u32 = 16;
/// Where a counter without a ledger starts, at most: leaves at least half the range.
const RANDOM_START_BELOW: u32 = 1 << 27;

/// `Start::Lost`'s reason when there is no file: a new install, or one deleted.
pub const NO_LEDGER: &str = "there is none yet";

/// How the counter found its starting point, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// The ledger of this node's current boot: the counter goes on where it stopped.
    Continued,
    /// The ledger of an earlier boot: every key of this boot is new, the counter starts over.
    NewBoot,
    /// No ledger, or one that cannot be trusted (the reason): a random start above the
    /// kernel's SPIs. Expected once on a new install.
    Lost(String),
}

pub struct SpiLedger {
    path: PathBuf,
    node: String,
    boot: BootId,
    next: u32,
    /// Counter values below this are on disk as possibly handed out.
    reserved: u32,
    /// The last allocation failed (logged once, until one succeeds again).
    failing: bool,
}

/// Why no SPI could be had. The slot then stays without an offer (no SA, and in strict
/// mode no traffic) rather than take an SPI that might repeat.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing the SPI ledger {path}: {source}")]
    Write { path: String, source: io::Error },
    #[error(
        "every SPI of this boot has been handed out (2^28 new SAs); reboot the node to \
         start a new key epoch"
    )]
    Exhausted,
}

impl SpiLedger {
    /// `kernel_max`: the highest SPI of our inbound SAs in the kernel (adopted ones);
    /// `random`: random bits for a start without a ledger.
    pub fn open(
        path: &Path,
        node: &str,
        boot: &BootId,
        kernel_max: Option<u32>,
        random: u32,
    ) -> (SpiLedger, Start) {
        let above_kernel = kernel_max.map_or(FIRST, |spi| (spi >> 4).saturating_add(1));
        let (next, start) = match std::fs::read_to_string(path) {
            Ok(text) => match parse(&text) {
                Ok((n, b, reserved)) if n == node && b == *boot => (reserved, Start::Continued),
                Ok((n, _, _)) if n == node => (FIRST, Start::NewBoot),
                Ok((n, _, _)) => (
                    0,
                    Start::Lost(format!("it belongs to node {n:?}, not {node:?}")),
                ),
                Err(why) => (0, Start::Lost(format!("it is unreadable: {why}"))),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => (0, Start::Lost(NO_LEDGER.into())),
            Err(e) => (0, Start::Lost(format!("reading it: {e}"))),
        };
        let next = match start {
            Start::Lost(_) => FIRST + random % (RANDOM_START_BELOW - FIRST),
            _ => next,
        };
        let next = next.max(above_kernel).max(FIRST);
        let ledger = SpiLedger {
            path: path.to_path_buf(),
            node: node.to_string(),
            boot: *boot,
            next,
            reserved: next,
            failing: false,
        };
        (ledger, start)
    }

    /// A ledger that hands out nothing: the engine's until the real one is opened.
    pub fn unopened() -> SpiLedger {
        SpiLedger {
            path: PathBuf::new(),
            node: String::new(),
            boot: [0; 16],
            next: LIMIT,
            reserved: LIMIT,
            failing: false,
        }
    }

    /// [`allocate`](Self::allocate) for the engine: `None` when no SPI can be had, the
    /// failure logged once (and the recovery), not at every hello that wants one.
    pub fn take(&mut self, key_id: u8) -> Option<u32> {
        match self.allocate(key_id) {
            Ok(spi) => {
                if std::mem::take(&mut self.failing) {
                    log::info!("new SPIs can be had again");
                }
                Some(spi)
            }
            Err(e) => {
                if !std::mem::replace(&mut self.failing, true) {
                    log::error!("no new inbound SA can be offered: {e}");
                }
                None
            }
        }
    }

    /// A new SPI for key-id `key_id`, never handed out before in this boot.
    pub fn allocate(&mut self, key_id: u8) -> Result<u32, Error> {
        if self.next >= LIMIT {
            return Err(Error::Exhausted);
        }
        if self.next >= self.reserved {
            let reserved = self.next.saturating_add(BLOCK).min(LIMIT);
            crate::files::replace(&self.path, self.render(reserved).as_bytes(), true).map_err(
                |source| Error::Write {
                    path: self.path.display().to_string(),
                    source,
                },
            )?;
            self.reserved = reserved;
        }
        let spi = make_spi(self.next, key_id);
        self.next += 1;
        Ok(spi)
    }

    fn render(&self, reserved: u32) -> String {
        format!(
            "# encryptd: SPIs handed out in this boot are below `reserved`; never edit.\n\
             node {}\nboot {}\nreserved {reserved}\n",
            self.node,
            hex::encode(self.boot)
        )
    }
}

fn parse(text: &str) -> Result<(String, BootId, u32), String> {
    let (mut node, mut boot, mut reserved) = (None, None, None);
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (k, v) = line
            .split_once(' ')
            .ok_or_else(|| format!("line {line:?} has no value"))?;
        match k {
            "node" => node = Some(v.to_string()),
            "boot" => {
                let mut b = [0u8; 16];
                hex::decode_to_slice(v, &mut b).map_err(|e| format!("boot {v:?}: {e}"))?;
                boot = Some(b);
            }
            "reserved" => {
                reserved = Some(
                    v.parse::<u32>()
                        .map_err(|e| format!("reserved {v:?}: {e}"))?,
                )
            }
            _ => return Err(format!("unknown field {k:?}")),
        }
    }
    match (node, boot, reserved) {
        (Some(n), Some(b), Some(r)) => Ok((n, b, r)),
        _ => Err("a field is missing (node, boot, reserved)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    const BOOT: BootId = [7; 16];

    fn take(l: &mut SpiLedger, n: usize, seen: &mut BTreeSet<u32>) {
        for i in 0..n {
            let spi = l.allocate((i % 3) as u8).unwrap();
            assert!(spi > 0xFF, "reserved SPI {spi:#x}");
            assert!(seen.insert(spi), "SPI {spi:#x} handed out twice");
        }
    }

    /// The gap the ledger closes: a restart after every SA vanished (nothing in the
    /// kernel to avoid) with a random source that repeats itself. Random SPIs would repeat
    /// here; the counter does not, restart after restart, crash mid-block included.
    #[test]
    fn restarts_never_repeat_an_spi_even_when_the_randomness_does() {
        let d = crate::files::test_dir("ledger-restart");
        let p = d.join("spi-ledger");
        let mut seen = BTreeSet::new();
        let (mut l, start) = SpiLedger::open(&p, "a", &BOOT, None, 5);
        assert_eq!(start, Start::Lost("there is none yet".into()));
        take(&mut l, 300, &mut seen);
        for _ in 0..5 {
            // A crash: nothing written beyond the last block reservation.
            drop(l);
            let (l2, start) = SpiLedger::open(&p, "a", &BOOT, None, 5);
            assert_eq!(start, Start::Continued);
            l = l2;
            take(&mut l, 70, &mut seen);
        }
    }

    #[test]
    fn a_new_boot_starts_over_and_the_kernel_s_spis_are_stepped_over() {
        let d = crate::files::test_dir("ledger-boot");
        let p = d.join("spi-ledger");
        let (mut l, _) = SpiLedger::open(&p, "a", &BOOT, None, 0);
        l.allocate(1).unwrap();
        let (mut l, start) = SpiLedger::open(&p, "a", &[8; 16], None, 0);
        assert_eq!(start, Start::NewBoot);
        assert_eq!(l.allocate(1).unwrap(), make_spi(FIRST, 1));
        // SAs of ours in the kernel (a faked boot ID in tests, or an adopted SA whose
        // ledger block was lost): the counter starts above them.
        let (mut l, _) = SpiLedger::open(&p, "a", &[9; 16], Some(make_spi(5000, 2)), 0);
        assert_eq!(l.allocate(1).unwrap(), make_spi(5001, 1));
    }

    #[test]
    fn an_untrusted_ledger_starts_at_random_above_the_kernel() {
        let d = crate::files::test_dir("ledger-untrusted");
        let p = d.join("spi-ledger");
        std::fs::write(
            &p,
            "node b\nboot 07070707070707070707070707070707\nreserved 9\n",
        )
        .unwrap();
        let (mut l, start) = SpiLedger::open(&p, "a", &BOOT, None, 1000);
        assert!(
            matches!(start, Start::Lost(ref w) if w.contains("node \"b\"")),
            "{start:?}"
        );
        assert_eq!(l.allocate(0).unwrap(), make_spi(FIRST + 1000, 0));
        std::fs::write(&p, "node a\nboot zz\nreserved 9\n").unwrap();
        let (_, start) = SpiLedger::open(&p, "a", &BOOT, None, 0);
        assert!(
            matches!(start, Start::Lost(ref w) if w.contains("unreadable")),
            "{start:?}"
        );
        let (mut l, _) = SpiLedger::open(&p, "a", &BOOT, Some(make_spi(LIMIT - 10, 0)), 3);
        assert_eq!(l.allocate(0).unwrap(), make_spi(LIMIT - 9, 0));
    }

    #[test]
    fn no_spi_rather_than_an_unrecorded_one() {
        let d = crate::files::test_dir("ledger-nowrite");
        let p = d.join("missing-dir/sub/spi-ledger");
        std::fs::write(d.join("missing-dir"), "a file where a directory should be").unwrap();
        let (mut l, _) = SpiLedger::open(&p, "a", &BOOT, None, 0);
        let e = l.allocate(0).unwrap_err();
        assert!(e.to_string().contains("writing the SPI ledger"), "{e}");
        let p = d.join("spi-ledger");
        let (mut l, _) = SpiLedger::open(&p, "a", &BOOT, Some(make_spi(LIMIT - 2, 0)), 0);
        l.allocate(0).unwrap();
        assert!(matches!(l.allocate(0), Err(Error::Exhausted)));
        // Exhaustion is not forgotten by a restart.
        let (mut l, start) = SpiLedger::open(&p, "a", &BOOT, None, 0);
        assert_eq!(start, Start::Continued);
        assert!(matches!(l.allocate(0), Err(Error::Exhausted)));
    }
}
