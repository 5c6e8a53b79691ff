//! From files to a validated model, in two phases: `doc` reads TOML with positions and
//! reports every syntax, key and type problem; `settings`, `inventory` and `keys` turn the
//! values into the model and check them; `load` adds the checks that span files.

pub mod diag;
pub mod doc;
pub mod inventory;
pub mod keys;
pub mod settings;

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

pub use diag::Diagnostic;
use diag::{Diags, Source, file_diag};
pub use inventory::{Inventory, Node};
pub use keys::KeyRing;
pub use settings::{Mode, Settings};

/// Where the three files are; `inventory` and `keys` override what `encryptd.toml` says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Paths {
    pub config: PathBuf,
    pub inventory: Option<PathBuf>,
    pub keys: Option<PathBuf>,
}

/// Everything the daemon runs on, validated as a whole.
#[derive(Debug, PartialEq, Eq)]
pub struct Config {
    pub settings: Settings,
    pub inventory: Inventory,
    /// `None` in WireGuard mode.
    pub keys: Option<KeyRing>,
}

impl Config {
    pub fn me(&self) -> &Node {
        self.inventory
            .node(&self.settings.node)
            .expect("validated: this node is in the inventory")
    }
}

fn read_text(path: &Path) -> Result<String, Diagnostic> {
    std::fs::read_to_string(path).map_err(|e| file_diag(path, format!("cannot read: {e}")))
}

/// Load and validate all files; on failure every problem found, sorted by file and position.
pub fn load(paths: &Paths) -> Result<Config, Vec<Diagnostic>> {
    let diags = Diags::default();
    let text = read_text(&paths.config).map_err(|d| vec![d])?;
    let src = Source::new(&paths.config, &text);
    let mut settings = settings::read(&src, &diags);
    if let Some(p) = &paths.inventory {
        settings.inventory = p.clone();
    }
    if let Some(p) = &paths.keys {
        settings.ipsec.keys = p.clone();
    }

    let inventory = match read_text(&settings.inventory) {
        Ok(t) => inventory::read(&Source::new(&settings.inventory, &t), &diags, settings.mode),
        Err(d) => {
            diags.push(d);
            Inventory::default()
        }
    };

    let keys = (settings.mode == Mode::Ipsec).then(|| {
        let path = &settings.ipsec.keys;
        if let Err(d) = keys::check_mode(path) {
            diags.push(d);
            return KeyRing::default();
        }
        match std::fs::read(path) {
            Ok(bytes) => {
                let bytes = Zeroizing::new(bytes);
                match std::str::from_utf8(&bytes) {
                    Ok(t) => keys::read(&Source::new(path, t), &diags),
                    Err(_) => {
                        diags.push(file_diag(path, "the keys file is not text (UTF-8)"));
                        KeyRing::default()
                    }
                }
            }
            Err(e) => {
                diags.push(file_diag(path, format!("cannot read: {e}")));
                KeyRing::default()
            }
        }
    });

    cross_check(&src, &settings, &inventory, &diags);
    if diags.is_empty() {
        Ok(Config {
            settings,
            inventory,
            keys,
        })
    } else {
        Err(diags.into_sorted())
    }
}

/// Checks that need more than one file: this node is inventoried, and strict mode does not lock this node out.
fn cross_check(src: &Source, s: &Settings, inv: &Inventory, diags: &Diags) {
    if inv.nodes.is_empty() {
        return; // the inventory's own problems are already reported
    }
    let at = s.node_span.clone().unwrap_or(0..0);
    let Some(me) = inv.node(&s.node) else {
        let from = if s.node_span.is_some() {
            "`node`"
        } else {
            "the hostname (no `node` set)"
        };
        diags.push(src.diag(
            at,
            format!(
                "this node \"{}\" (from {from}) is not in the inventory {}",
                s.node,
                s.inventory.display()
            ),
        ));
        return;
    };
    if s.strict.enabled && s.strict.exceptions.is_empty() {
        for (c, span) in s.strict.cidrs.iter().zip(&s.strict_cidr_spans) {
            if let Some(a) = me.addresses.iter().find(|a| c.contains(**a)) {
                diags.push(src.diag(
                    span.clone(),
                    format!(
                        "protected range {c} contains this node's address {a}, and no exception keeps it reachable: add to [strict] exceptions = [{{ proto = \"tcp\", port = 22 }}] (or the port you manage it by)"
                    ),
                ));
            }
        }
    }
}
