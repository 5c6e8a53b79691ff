//! Strict mode: the `inet encryptd` nftables table that drops, instead of sending or
//! accepting in plaintext, traffic to or from a protected range that is not encrypted.
//! [`plan`] renders it from the configuration (pure); [`Strict`] applies it, checks
//! that it is still in the kernel as applied, puts it back when another program removed
//! or changed it, and keeps it for the next boot.

pub mod plan;

use std::io;
use std::path::Path;

use log::{error, info, warn};

use crate::kernel::nft::{Listing, Nft, NftError, replace_script};

/// The file, in `state_dir`, holding the rules in force as an nft script, which
/// `encryptd-strict.service` installs at boot before the network comes up: without it
/// a node would send plaintext between the network coming up and the daemon starting.
pub const BOOT_RULES: &str = "strict.nft";

/// Keep `script` (the `nft -f` script that installs the table) for the next boot, or
/// remove the file (`None`: strict mode off, torn down, or not kept on stop). Written
/// durably (see [`crate::daemon::files`]).
pub fn keep_for_boot(state_dir: &Path, script: Option<&str>) -> io::Result<()> {
    let path = state_dir.join(BOOT_RULES);
    match script {
        Some(script) => crate::files::replace(&path, script.as_bytes(), true),
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        },
    }
}

/// The daemon's strict table: what it applied, and what it knows of the kernel's copy.
#[derive(Debug, Default)]
pub struct Strict {
    /// The table last applied (`None`: strict mode off).
    table: Option<String>,
    /// How often the table was found missing or changed and put back.
    reinstalls: u64,
    /// The last check found the table in the kernel as applied (or put it back).
    verified: bool,
    /// The kernel's own listing of the table, [`canonical`], taken right after
    /// installing it: what every later check compares against.
    listing: Option<String>,
    /// The listing the last check found as applied, counters included: the metrics
    /// read the drop counters from it instead of listing the table again.
    seen: Option<Listing>,
}

impl Strict {
    pub fn is_on(&self) -> bool {
        self.table.is_some()
    }

    pub fn reinstalls(&self) -> u64 {
        self.reinstalls
    }

    pub fn verified(&self) -> bool {
        self.verified
    }

    /// The drop counters of the table as the last check listed it (none before the
    /// first check, or right after a reinstall).
    pub fn counters(&self) -> Vec<crate::kernel::nft::RuleCounter> {
        self.seen
            .as_ref()
            .and_then(|l| l.counters().ok())
            .unwrap_or_default()
    }

    /// Install (or replace, or remove) the table; unchanged text is not re-sent. The
    /// rules in force are kept for boot in `state_dir`.
    pub fn apply(&mut self, table: &Option<String>, state_dir: &Path) -> Result<(), NftError> {
        if *table == self.table && table.is_some() {
            return Ok(());
        }
        let nft = Nft::default();
        match table {
            Some(t) => {
                nft.apply(t)?;
                self.verified = true;
                self.listing = listed(&nft);
                info!("strict mode: rules installed (table inet encryptd)");
            }
            // Strict mode off: a table left from when it was on goes.
            None => {
                self.verified = false;
                self.listing = None;
                self.seen = None;
                match nft.delete() {
                    Ok(()) if self.table.is_some() => info!("strict mode off: rules removed"),
                    Ok(()) => {}
                    Err(e) => {
                        warn!("strict mode is off, but the old table could not be removed: {e}")
                    }
                }
            }
        }
        self.table = table.clone();
        keep(state_dir, table.as_deref().map(replace_script).as_deref());
        Ok(())
    }

    /// Check that the table applied last is in the kernel as applied; put it back if
    /// another program removed or changed it (`nft flush ruleset`, which is what
    /// `systemctl restart nftables` does, a firewall manager's reload). Returns whether
    /// it found it changed (status and metrics should say so now).
    pub fn verify(&mut self) -> bool {
        let Some(want) = self.table.clone() else {
            return false;
        };
        let nft = Nft::default();
        let what = match nft.list() {
            Ok(None) => "was removed from the kernel",
            Ok(Some(listing))
                if !match &self.listing {
                    Some(canon) => listing.canonical() == *canon,
                    None => listing.holds(&want),
                } =>
            {
                "was changed by another program (a rule, a chain or a set's elements)"
            }
            Ok(Some(listing)) => {
                self.verified = true;
                self.seen = Some(listing);
                return false;
            }
            Err(e) => {
                warn!("strict mode: cannot check table inet encryptd: {e}");
                self.verified = false;
                return false;
            }
        };
        self.reinstalls += 1;
        // A new table starts its counters at 0.
        self.seen = None;
        let r = nft.apply(&want);
        self.verified = r.is_ok();
        self.listing = r.is_ok().then(|| listed(&nft)).flatten();
        match r {
            Ok(()) => warn!(
                "strict mode: table inet encryptd {what} (a ruleset flush or firewall reload?); reinstalled ({} time(s) since start)",
                self.reinstalls
            ),
            Err(e) => {
                error!("strict mode: table inet encryptd {what}, and reinstalling it failed: {e}")
            }
        }
        true
    }

    /// The daemon stops: the rules stay (the default) or go, with the boot copy and, in
    /// WireGuard mode, the blackhole routes.
    pub fn on_stop(&mut self, keep_on_stop: bool, wireguard: bool, state_dir: &Path) {
        if self.table.is_some() && !keep_on_stop {
            match Nft::default().delete() {
                Ok(()) => info!("strict mode: rules removed (keep_on_stop = false)"),
                Err(e) => error!("strict mode: removing the rules: {e}"),
            }
            if wireguard {
                for e in crate::cli::teardown::wireguard_strict().errors {
                    error!("strict mode: removing the blackhole routes: {e}");
                }
            }
            keep(state_dir, None);
        } else if self.table.is_some() {
            info!("strict mode: rules stay in place while the daemon is stopped");
        }
    }
}

fn keep(dir: &Path, script: Option<&str>) {
    if let Err(e) = keep_for_boot(dir, script) {
        warn!(
            "strict mode: cannot keep the rules for the next boot in {}: {e}; until this works, the network comes up without them at boot",
            dir.join(BOOT_RULES).display()
        );
    }
}

/// The table as the kernel lists it now, canonical; `None` if it cannot be listed (the
/// next check then falls back to the coarse comparison with the applied text).
fn listed(nft: &Nft) -> Option<String> {
    match nft.list() {
        Ok(l) => l.map(|l| l.canonical()),
        Err(e) => {
            warn!("strict mode: cannot list table inet encryptd after installing it: {e}");
            None
        }
    }
}
