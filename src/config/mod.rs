//! From files to a validated model, in two phases: `doc` reads TOML with positions and
//! reports every syntax, key and type problem; `settings`, `inventory` and `keys` turn the
//! values into the model and check them; `load` adds the checks that span files.

pub mod diag;
pub mod doc;
pub mod inventory;
pub mod keys;
pub mod settings;
pub mod wgkey;

use std::path::{Path, PathBuf};

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
    /// `[wireguard] preshared_key` (Ansible validates a candidate file with it).
    pub preshared_key: Option<PathBuf>,
}

/// Everything the daemon runs on, validated as a whole.
#[derive(Debug, PartialEq, Eq)]
pub struct Config {
    pub settings: Settings,
    pub inventory: Inventory,
    /// `None` in WireGuard mode.
    pub keys: Option<KeyRing>,
    /// WireGuard mode: the cluster preshared key, if `[wireguard] preshared_key` is set.
    pub psk: Option<wgkey::PresharedKey>,
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

/// Where the package puts the annotated examples (both packages).
pub const EXAMPLES: &str = "/usr/share/doc/encryptd/examples";

/// A node without an inventory has not been configured yet (the package installs none):
/// one line saying what to write, instead of a problem for every file that is not there.
pub fn unconfigured(settings: &settings::Settings) -> Option<Diagnostic> {
    let missing = matches!(
        std::fs::symlink_metadata(&settings.inventory),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound
    );
    if !missing {
        return None;
    }
    let keys = if settings.mode == Mode::Ipsec {
        format!(" and the IPsec keys in {}", settings.ipsec.keys.display())
    } else {
        String::new()
    };
    Some(file_diag(
        &settings.inventory,
        format!(
            "this node is not configured yet: write the inventory here (every node of the fleet){keys}; examples in {EXAMPLES}, see encryptd.toml(5)"
        ),
    ))
}

/// Whether this node has been configured (`encryptd check --configured`, the unit's
/// ExecCondition=): only the settings are read, and only the inventory's existence is
/// looked at. Everything else is the daemon's start to report, loudly.
pub fn configured(config: &Path) -> Result<(), Diagnostic> {
    // An unreadable or broken encryptd.toml is not "unconfigured": the start reports it.
    let Ok(text) = std::fs::read_to_string(config) else {
        return Ok(());
    };
    let settings = settings::read(&Source::new(config, &text), &Diags::default());
    unconfigured(&settings).map_or(Ok(()), Err)
}

/// Load and validate all files; on failure every problem found, sorted by file and position.
pub fn load(paths: &Paths) -> Result<Config, Vec<Diagnostic>> {
    let diags = Diags::default();
    let text = read_text(&paths.config).map_err(|d| vec![d])?;
    let src = Source::new(&paths.config, &text);
    let mut settings = settings::read(&src, &diags);
    settings::on_this_machine(&mut settings, &src, &diags);
    if let Some(p) = &paths.inventory {
        settings.inventory = p.clone();
    }
    if let Some(p) = &paths.keys {
        settings.ipsec.keys = p.clone();
    }
    if let Some(p) = &paths.preshared_key {
        settings.wireguard.preshared_key = Some(p.clone());
    }

    if let Some(d) = unconfigured(&settings) {
        return Err(vec![d]);
    }
    let inventory = match read_text(&settings.inventory) {
        Ok(t) => {
            let isrc = Source::new(&settings.inventory, &t);
            let inv = inventory::read(&isrc, &diags, settings.mode);
            if settings.mode == Mode::Wireguard && diags.is_empty() {
                check_own_public_key(&settings, &inv, &isrc, &diags);
            }
            inv
        }
        Err(d) => {
            diags.push(d);
            Inventory::default()
        }
    };

    let keys = (settings.mode == Mode::Ipsec).then(|| {
        let path = &settings.ipsec.keys;
        match diag::read_secret_file(path, "keys") {
            Ok(bytes) => match std::str::from_utf8(&bytes) {
                Ok(t) => keys::read(&Source::new(path, t), &diags),
                Err(_) => {
                    diags.push(file_diag(path, "the keys file is not text (UTF-8)"));
                    KeyRing::default()
                }
            },
            Err(d) => {
                diags.push(d);
                KeyRing::default()
            }
        }
    });

    let psk = match (&settings.mode, &settings.wireguard.preshared_key) {
        (Mode::Wireguard, Some(path)) => wgkey::read_psk(path).map_err(|d| diags.push(d)).ok(),
        _ => None,
    };

    cross_check(&src, &settings, &inventory, &diags);
    if diags.is_empty() {
        Ok(Config {
            settings,
            inventory,
            keys,
            psk,
        })
    } else {
        Err(diags.into_sorted())
    }
}

/// WireGuard: if this node's private key file exists, it must be private and be the key
/// whose public half the inventory lists for this node (a missing file is created at the
/// daemon's first start, or by `encryptd pubkey`).
fn check_own_public_key(s: &Settings, inv: &Inventory, isrc: &Source, diags: &Diags) {
    let path = &s.wireguard.private_key;
    if std::fs::symlink_metadata(path).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
        return;
    }
    let key = match wgkey::read(path) {
        Ok(k) => k,
        Err(d) => {
            diags.push(d);
            return;
        }
    };
    let Some(me) = inv.node(&s.node) else {
        return; // reported by cross_check
    };
    if let Some(listed) = me.wireguard_public_key
        && let Some(d) = public_key_mismatch(isrc, me, &listed, &key.public(), path)
    {
        diags.push(d);
    }
}

/// The message when the inventory's key for this node is not this node's public key.
fn public_key_mismatch(
    isrc: &Source,
    me: &Node,
    listed: &[u8; 32],
    actual: &[u8; 32],
    key_path: &Path,
) -> Option<Diagnostic> {
    (listed != actual).then(|| {
        isrc.diag(
            me.span.clone(),
            format!(
                "wireguard_public_key of this node \"{}\" is not the public key of its private key {} ({}): put the output of `encryptd pubkey` on this node here",
                me.name,
                key_path.display(),
                wgkey::to_base64(actual)
            ),
        )
    })
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

/// What is valid but probably not meant, for `check` and the daemon's log: strict mode
/// protecting the nodes' addresses of one family and not of the other (traffic between
/// the IPv6 addresses would then travel unprotected by the strict rules).
pub fn warnings(cfg: &Config) -> Vec<String> {
    let strict = &cfg.settings.strict;
    if !strict.enabled {
        return Vec::new();
    }
    let covered = |a: &std::net::IpAddr| strict.cidrs.iter().any(|c| c.contains(*a));
    let addrs: Vec<(&str, std::net::IpAddr)> = cfg
        .inventory
        .nodes
        .iter()
        .flat_map(|n| n.addresses.iter().map(move |a| (n.name.as_str(), *a)))
        .collect();
    let mut out = Vec::new();
    for (fam, other, v4) in [("IPv4", "IPv6", true), ("IPv6", "IPv4", false)] {
        let some_other = addrs.iter().any(|(_, a)| a.is_ipv4() != v4 && covered(a));
        let missed: Vec<String> = addrs
            .iter()
            .filter(|(_, a)| a.is_ipv4() == v4 && !covered(a))
            .map(|(n, a)| format!("{a} ({n})"))
            .collect();
        if some_other && !missed.is_empty() {
            let more = if missed.len() > 3 {
                format!(" and {} more", missed.len() - 3)
            } else {
                String::new()
            };
            out.push(format!(
                "[strict] cidrs cover the nodes' {other} addresses but not their {fam} addresses {}{more}: strict mode does not protect traffic to and from those; add their range to cidrs if it should",
                missed[..missed.len().min(3)].join(", ")
            ));
        }
    }
    out
}

/// The mode's engine is chosen at start: a reload cannot switch it.
pub fn check_mode_change(old: &Config, new: &Config, config_path: &Path) -> Option<Diagnostic> {
    let (o, n) = (old.settings.mode, new.settings.mode);
    (o != n).then(|| {
        file_diag(
            config_path,
            format!(
                "`mode` changed from \"{}\" to \"{}\": a change of mode takes a restart (systemctl restart encryptd)",
                o.as_str(),
                n.as_str()
            ),
        )
    })
}

/// A reload may add a key-id or drop one, but never change the key under a key-id that is
/// in use: peers would decrypt with the old key (XfrmInStateProtoError everywhere).
pub fn check_key_change(old: &Config, new: &Config) -> Vec<Diagnostic> {
    let (Some(o), Some(n)) = (&old.keys, &new.keys) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in &n.entries {
        if let Some(prev) = o.get(e.id)
            && prev != e
        {
            out.push(Diagnostic {
                file: new.settings.ipsec.keys.clone(),
                line: e.line,
                col: 1,
                message: format!(
                    "key-id {} is in use with another key; a new key needs a new key-id ({}), the old key stays in force",
                    e.id,
                    keys::next_id(n.entries.last().map_or(e.id, |l| l.id))
                ),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(mode: &str) -> Config {
        let text = format!("mode = \"{mode}\"\nnode = \"a\"\n");
        let diags = Diags::default();
        let settings = settings::read(&Source::new(Path::new("e.toml"), &text), &diags);
        assert!(diags.is_empty());
        Config {
            settings,
            inventory: Inventory::default(),
            keys: None,
            psk: None,
        }
    }

    #[test]
    fn a_reload_cannot_change_the_mode() {
        let p = Path::new("/etc/encryptd/encryptd.toml");
        assert_eq!(
            check_mode_change(&config("ipsec"), &config("ipsec"), p),
            None
        );
        let d = check_mode_change(&config("ipsec"), &config("wireguard"), p).unwrap();
        assert_eq!(
            d.to_string(),
            "/etc/encryptd/encryptd.toml:1:1: `mode` changed from \"ipsec\" to \"wireguard\": a change of mode takes a restart (systemctl restart encryptd)"
        );
    }
}
