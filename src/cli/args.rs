//! The command line's grammar, declared once: clap parses it, prints every command's
//! `--help`, writes the shell completions (`encryptd completions`) and the man page's
//! synopsis (docs/man/encryptd.8, checked by a test against this definition).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::settings::DEFAULT_CONFIG;

const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("ENCRYPTD_COMMIT"),
    ")"
);

#[derive(Debug, Parser)]
#[command(
    name = "encryptd",
    version = VERSION,
    about = "Encrypt all traffic between the nodes of a fleet with kernel IPsec or WireGuard",
    after_help = "The default config is /etc/encryptd/encryptd.toml. Exit codes: 0 success, \
                  1 failure, 2 usage (status: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN).",
    subcommand_required = true,
    arg_required_else_help = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// The daemon's configuration
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run the daemon in the foreground (what encryptd.service starts)
    Run(ConfigArg),
    /// Validate the files offline; exit 0 valid, 1 invalid
    #[command(
        long_about = "Validate the configuration, the inventory and the keys offline, as the \
                      daemon would load them; exit 0 valid, 1 invalid, with every problem \
                      named by file, line and field. The options check another file than \
                      the configuration names (how Ansible validates a candidate file)."
    )]
    Check(CheckArgs),
    /// Show peers, keys and counters; exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN
    #[command(
        long_about = "Show the daemon's peers, keys and counters. The exit code follows the \
                      monitoring-plugin convention: 0 OK, 1 WARNING (some peers not up, a \
                      rotation taking too long), 2 CRITICAL (daemon down, strict rules \
                      missing, no peer up), 3 UNKNOWN (the state cannot be read). See \
                      docs/status.md."
    )]
    Status(StatusArgs),
    /// Print a new WireGuard private key
    Keygen,
    /// Print this node's WireGuard public key (the private key is created if missing)
    Pubkey(ConfigArg),
    /// Remove every kernel object encryptd owns (XFRM, WireGuard, nftables)
    #[command(
        long_about = "Remove every kernel object encryptd owns in this network namespace: its \
                      XFRM states and policies, its WireGuard interface and policy rules, the \
                      nftables table inet encryptd and the copy of it the boot unit installs. \
                      Ownership is by encryptd's reqid and priority bands and table names, so \
                      teardown works when the files are gone or broken."
    )]
    Teardown(ConfigArg),
    /// Register this node in etcd and render the inventory from etcd (encryptd-sync.service)
    #[command(
        long_about = "Register this node in etcd under [sync] prefix (its addresses, subnets and \
                      WireGuard public key) and keep the inventory rendered from every \
                      registration there. A registration that fails validation is left out \
                      by name; etcd unreachable leaves the last file in place. See docs/sync.md."
    )]
    Sync(SyncArgs),
    /// Print a shell completion script (bash, zsh, fish)
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The daemon's configuration [default: /etc/encryptd/encryptd.toml]
    #[arg(long, value_name = "PATH", conflicts_with = "file")]
    pub config: Option<PathBuf>,
    /// Check this inventory instead of the one the configuration names
    #[arg(long, value_name = "PATH")]
    pub inventory: Option<PathBuf>,
    /// Check these IPsec keys instead of the ones the configuration names
    #[arg(long, value_name = "PATH")]
    pub keys: Option<PathBuf>,
    /// Check this WireGuard preshared key instead of the one the configuration names
    #[arg(long, value_name = "PATH")]
    pub preshared_key: Option<PathBuf>,
    /// Exit 0 if this node has an inventory, else 1 saying what to write (the unit's
    /// ExecCondition=)
    #[arg(long, conflicts_with_all = ["inventory", "keys", "preshared_key"])]
    pub configured: bool,
    /// The configuration, as --config
    #[arg(value_name = "CONFIG")]
    pub file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    /// Delete this node's registration from etcd and exit (package purge, decommissioning)
    #[arg(long)]
    pub deregister: bool,
    #[command(flatten)]
    pub config: ConfigArg,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Machine-readable output (the daemon's snapshot)
    #[arg(long)]
    pub json: bool,
    /// Every peer, with its SAs: SPI, direction, age, bytes, next re-key
    #[arg(long)]
    pub verbose: bool,
    /// Only this peer: its line, and its problems among the node's own
    #[arg(long, value_name = "NAME")]
    pub peer: Option<String>,
    #[command(flatten)]
    pub config: ConfigArg,
}

/// The man page's SYNOPSIS, one `encryptd <command>` line each, from the definition
/// above. Rendered here rather than by clap_mangen, whose synopsis drops the value names
/// (`[--config]` for `[--config PATH]`).
#[cfg(test)]
pub fn man_synopsis() -> String {
    use clap::CommandFactory;
    let roff = |s: &str| s.replace('-', "\\-");
    let mut out = String::new();
    for sub in Cli::command().get_subcommands() {
        out.push_str(&format!(".B encryptd {}\n", sub.get_name()));
        for arg in sub.get_arguments().filter(|a| a.get_id() != "help") {
            let value = arg
                .get_value_names()
                .and_then(|v| v.first())
                .map(|v| v.to_string());
            let (open, close) = if arg.is_required_set() {
                ("", "")
            } else {
                ("[ ", " ]")
            };
            match (arg.get_long(), value) {
                (Some(long), Some(v)) if arg.get_action().takes_values() => {
                    out.push_str(&format!(".RB {open}\\-\\-{}\n", roff(long)));
                    out.push_str(&format!(".IR {v}{close}\n"));
                }
                (Some(long), _) => {
                    out.push_str(&format!(".RB {open}\\-\\-{}{close}\n", roff(long)))
                }
                (None, v) => {
                    let v = v.unwrap_or_else(|| arg.get_id().to_string().to_uppercase());
                    let macro_ = if arg.is_required_set() { "I" } else { "RI" };
                    out.push_str(&format!(".{macro_} {open}{v}{close}\n"));
                }
            }
        }
        out.push_str(".br\n");
    }
    out.push_str(".B encryptd\n.BR \\-\\-help \" | \" \\-\\-version\n");
    out
}
