//! The command line: `run`, `check`, `status`, `keygen`, `pubkey`, `teardown`.
//! Exit codes are part of the interface: 0 success, 1 failure (invalid input, daemon
//! error), 2 usage.

pub mod status;
pub mod teardown;

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::config::diag::{Diags, Source};
use crate::config::wgkey::{self, PrivateKey};
use crate::config::{self, Paths, settings, settings::DEFAULT_CONFIG};

pub const USAGE: &str = "\
usage: encryptd <command> [options]

commands:
  run [--config PATH]                      run the daemon in the foreground
  check [--config PATH] [--inventory PATH] [--keys PATH] [--preshared-key PATH] [CONFIG]
                                           validate the files offline; exit 0 valid, 1 invalid
                                           (the options check another file than the config names)
  check --configured [--config PATH]       exit 0 if this node has an inventory, else 1 saying
                                           what to write (the unit's ExecCondition=)
  status [--json] [--verbose] [--peer NAME] [--config PATH]
                                           show peers, keys and counters; exit 0 OK,
                                           1 WARNING, 2 CRITICAL, 3 UNKNOWN (docs/status.md)
  keygen                                   print a new WireGuard private key
  pubkey [--config PATH]                   print this node's WireGuard public key (from
                                           [wireguard] private_key, created if missing)
  teardown [--config PATH]                 remove every kernel object encryptd owns

The default config is /etc/encryptd/encryptd.toml.";

pub const EXIT_OK: i32 = 0;
pub const EXIT_FAIL: i32 = 1;
pub const EXIT_USAGE: i32 = 2;

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run(Paths),
    Check(Paths),
    Configured(PathBuf),
    Teardown(Paths),
    Status(Paths, status::Options),
    Keygen,
    Pubkey(PathBuf),
    Help,
    Version,
}

/// Parse arguments (without the program name). `Err` is a usage message.
pub fn parse(args: Vec<OsString>) -> Result<Command, String> {
    let mut it = args.into_iter().map(|a| {
        a.into_string()
            .map_err(|a| format!("argument {a:?} is not UTF-8"))
    });
    let cmd = match it.next().transpose()? {
        None => return Err("missing command".into()),
        Some(c) => c,
    };
    let (allowed, allow_positional): (&[&str], bool) = match cmd.as_str() {
        "-h" | "--help" | "help" => return Ok(Command::Help),
        "-V" | "--version" => return Ok(Command::Version),
        "run" => (&["--config"], false),
        "check" => (
            &[
                "--config",
                "--inventory",
                "--keys",
                "--preshared-key",
                "--configured",
            ],
            true,
        ),
        // Ownership is by encryptd's reqid/priority bands and table name, not by the
        // configuration, so teardown works even when the files are gone or broken.
        "teardown" => (&["--config"], false),
        "status" => (&["--config", "--json", "--verbose", "--peer"], false),
        "keygen" => (&[], false),
        "pubkey" => (&["--config"], false),
        other => return Err(format!("unknown command \"{other}\"")),
    };
    let mut paths = Paths {
        config: PathBuf::new(),
        inventory: None,
        keys: None,
        preshared_key: None,
    };
    let mut config = None;
    let mut json = false;
    let mut verbose = false;
    let mut configured = false;
    let mut peer = None;
    while let Some(arg) = it.next().transpose()? {
        if arg == "-h" || arg == "--help" {
            return Ok(Command::Help);
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        if flag.starts_with('-') {
            if !allowed.contains(&flag.as_str()) {
                return Err(format!("{cmd}: unknown option {flag}"));
            }
            let switch = match flag.as_str() {
                "--json" => Some(&mut json),
                "--verbose" => Some(&mut verbose),
                "--configured" => Some(&mut configured),
                _ => None,
            };
            if let Some(on) = switch {
                *on = true;
                continue;
            }
            let value = match inline {
                Some(v) => v,
                None => it.next().transpose()?.ok_or_else(|| {
                    let what = if flag == "--peer" { "name" } else { "path" };
                    format!("{cmd}: {flag} needs a {what}")
                })?,
            };
            if flag == "--peer" {
                if peer.replace(value).is_some() {
                    return Err(format!("{cmd}: {flag} given twice"));
                }
                continue;
            }
            let slot = match flag.as_str() {
                "--config" => &mut config,
                "--inventory" => &mut paths.inventory,
                "--preshared-key" => &mut paths.preshared_key,
                _ => &mut paths.keys,
            };
            if slot.replace(PathBuf::from(value)).is_some() {
                return Err(format!("{cmd}: {flag} given twice"));
            }
        } else if allow_positional && config.is_none() {
            config = Some(PathBuf::from(arg));
        } else {
            return Err(format!("{cmd}: unexpected argument \"{arg}\""));
        }
    }
    paths.config = config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    Ok(match cmd.as_str() {
        "run" => Command::Run(paths),
        "teardown" => Command::Teardown(paths),
        "status" => Command::Status(
            paths,
            status::Options {
                json,
                verbose,
                peer,
            },
        ),
        "keygen" => Command::Keygen,
        "pubkey" => Command::Pubkey(paths.config),
        _ if configured => {
            if paths.inventory.is_some() || paths.keys.is_some() || paths.preshared_key.is_some() {
                return Err("check: --configured takes only --config".into());
            }
            Command::Configured(paths.config)
        }
        _ => Command::Check(paths),
    })
}

/// Every command but help and version may hold keys: the PSKs and derived SA keys
/// (`run`, `check`), the SA keys the kernel reports (`status` dumps every SA), the
/// WireGuard private key (`pubkey`, `keygen`). Not dumpable: no core file, and no
/// ptrace or /proc/PID/mem by other processes of the same user.
fn undumpable() {
    // SAFETY: PR_SET_DUMPABLE takes an integer argument and touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        eprintln!(
            "encryptd: prctl(PR_SET_DUMPABLE, 0): {}",
            std::io::Error::last_os_error()
        );
    }
}

pub fn main(args: Vec<OsString>) -> i32 {
    let command = parse(args);
    if !matches!(command, Err(_) | Ok(Command::Help | Command::Version)) {
        undumpable();
    }
    match command {
        Err(e) => {
            eprintln!("encryptd: {e}\n\n{USAGE}");
            EXIT_USAGE
        }
        Ok(Command::Help) => {
            println!("{USAGE}");
            EXIT_OK
        }
        Ok(Command::Version) => {
            println!("encryptd {} (commit {})", crate::VERSION, crate::COMMIT);
            EXIT_OK
        }
        Ok(Command::Check(paths)) => check(&paths),
        Ok(Command::Configured(config)) => match config::configured(&config) {
            Ok(()) => EXIT_OK,
            Err(d) => {
                eprintln!("{d}");
                EXIT_FAIL
            }
        },
        Ok(Command::Keygen) => keygen(),
        Ok(Command::Pubkey(config)) => pubkey(&config),
        Ok(Command::Run(paths)) => crate::daemon::run(paths),
        Ok(Command::Teardown(paths)) => teardown(&paths),
        Ok(Command::Status(paths, opts)) => status::main(&paths, &opts),
    }
}

/// Remove every kernel object encryptd owns in this network namespace: its XFRM states
/// and policies (by reqid and priority band), its WireGuard interface (by name from the
/// configuration when it can be read, else the default) with its policy rules (by table
/// and priority), and the `inet encryptd` table. Foreign objects are never touched.
fn teardown(paths: &Paths) -> i32 {
    let mut failed = false;
    let (ifname, state_dir) = config::load(paths)
        .map(|c| (c.settings.wireguard.interface, c.settings.state_dir))
        .unwrap_or_else(|_| ("encryptd0".into(), PathBuf::from("/var/lib/encryptd")));
    let wg = crate::cli::teardown::wireguard(&ifname);
    let (link, rules) = wg.removed;
    if link {
        println!("removed the WireGuard interface {ifname}");
    }
    if rules > 0 {
        println!(
            "removed {rules} policy rule(s) and route(s) of tables {} and {}",
            crate::wireguard::plan::TABLE,
            crate::wireguard::plan::BLACKHOLE_TABLE
        );
    }
    let xfrm = crate::cli::teardown::ipsec();
    let (s, p) = xfrm.removed;
    println!("removed {p} XFRM policies and {s} XFRM states");
    for e in wg.errors.iter().chain(&xfrm.errors) {
        eprintln!("encryptd teardown: {e}");
        failed = true;
    }
    // The boot copy first: a teardown that fails half-way must not leave rules that
    // come back at the next boot.
    if let Err(e) = crate::strict::keep_for_boot(&state_dir, None) {
        eprintln!(
            "encryptd teardown: removing {}: {e}",
            state_dir.join(crate::strict::BOOT_RULES).display()
        );
        failed = true;
    }
    match crate::kernel::nft::Nft::default().delete() {
        Ok(()) => println!("removed the nftables table inet encryptd (if it was there)"),
        Err(e) => {
            eprintln!("encryptd teardown: nftables: {e}");
            failed = true;
        }
    }
    if failed { EXIT_FAIL } else { EXIT_OK }
}

fn check(paths: &Paths) -> i32 {
    match config::load(paths) {
        Ok(c) => {
            let key = c
                .keys
                .as_ref()
                .and_then(|k| k.current())
                .map(|k| format!(", key {}", k.id))
                .unwrap_or_default();
            if let Some(table) = crate::strict::plan::ruleset(&c) {
                // nft -c needs CAP_NET_ADMIN: as another user the ruleset is only rendered.
                // SAFETY: geteuid has no preconditions.
                if unsafe { libc::geteuid() } == 0 {
                    if let Err(e) = crate::kernel::nft::Nft::default().check(&table) {
                        eprintln!(
                            "{}: the strict-mode ruleset is rejected by nft: {e}",
                            paths.config.display()
                        );
                        return EXIT_FAIL;
                    }
                } else {
                    eprintln!(
                        "note: not root, the strict-mode ruleset was not checked with `nft -c`"
                    );
                }
            }
            for w in config::warnings(&c) {
                eprintln!("{}: warning: {w}", paths.config.display());
            }
            println!(
                "{}: valid: mode {}, node {}, {} nodes{key}",
                paths.config.display(),
                c.settings.mode.as_str(),
                c.settings.node,
                c.inventory.nodes.len()
            );
            EXIT_OK
        }
        Err(diags) => {
            for d in &diags {
                eprintln!("{d}");
            }
            eprintln!("encryptd: {} problem(s) found", diags.len());
            EXIT_FAIL
        }
    }
}

/// `encryptd keygen`: a new private key on stdout (as `wg genkey`).
fn keygen() -> i32 {
    let key = PrivateKey::generate();
    let mut out = std::io::stdout().lock();
    match out
        .write_all(key.to_base64().as_bytes())
        .and_then(|()| out.flush())
    {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("encryptd: keygen: {e}");
            EXIT_FAIL
        }
    }
}

/// `encryptd pubkey`: this node's public key, from the private key file that
/// `encryptd.toml` names. Only `encryptd.toml` is read: the inventory may not list this
/// node's key yet (this command is how Ansible collects the keys for it). A missing key
/// file is created, as the daemon's first start would.
fn pubkey(config: &Path) -> i32 {
    let text = match std::fs::read_to_string(config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}:1:1: cannot read: {e}", config.display());
            return EXIT_FAIL;
        }
    };
    let diags = Diags::default();
    let src = Source::new(config, &text);
    let mut settings = settings::read(&src, &diags);
    settings::on_this_machine(&mut settings, &src, &diags);
    if !diags.is_empty() {
        let diags = diags.into_sorted();
        for d in &diags {
            eprintln!("{d}");
        }
        eprintln!("encryptd: {} problem(s) found", diags.len());
        return EXIT_FAIL;
    }
    let path = &settings.wireguard.private_key;
    match wgkey::load_or_create(path) {
        Ok((key, created)) => {
            if created {
                eprintln!("encryptd: created a new private key in {}", path.display());
            }
            println!("{}", wgkey::to_base64(&key.public()));
            EXIT_OK
        }
        Err(d) => {
            eprintln!("{d}");
            EXIT_FAIL
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, String> {
        parse(args.iter().map(OsString::from).collect())
    }

    #[test]
    fn check_arguments() {
        let Command::Check(paths) = p(&["check", "etc/encryptd.toml", "--keys=k"]).unwrap() else {
            panic!()
        };
        assert_eq!(paths.config, PathBuf::from("etc/encryptd.toml"));
        assert_eq!(paths.keys, Some(PathBuf::from("k")));
        let Command::Check(paths) = p(&["check", "--inventory", "/tmp/x"]).unwrap() else {
            panic!()
        };
        assert_eq!(paths.config, PathBuf::from(DEFAULT_CONFIG));
        assert_eq!(paths.inventory, Some(PathBuf::from("/tmp/x")));
    }

    #[test]
    fn a_process_holding_keys_is_not_dumpable() {
        undumpable();
        // SAFETY: PR_GET_DUMPABLE only returns a value.
        assert_eq!(unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) }, 0);
    }

    #[test]
    fn status_arguments() {
        let Command::Status(paths, opts) = p(&["status", "--verbose", "--peer=n7"]).unwrap() else {
            panic!()
        };
        assert_eq!(paths.config, PathBuf::from(DEFAULT_CONFIG));
        assert_eq!(
            opts,
            status::Options {
                json: false,
                verbose: true,
                peer: Some("n7".into())
            }
        );
        assert_eq!(
            p(&["status", "--peer"]).unwrap_err(),
            "status: --peer needs a name"
        );
        assert_eq!(
            p(&["status", "--peer", "a", "--peer", "b"]).unwrap_err(),
            "status: --peer given twice"
        );
    }

    #[test]
    fn configured_takes_only_the_config() {
        assert_eq!(
            p(&["check", "--configured", "--config", "x.toml"]).unwrap(),
            Command::Configured(PathBuf::from("x.toml"))
        );
        assert_eq!(
            p(&["check", "--configured", "--inventory", "n.toml"]).unwrap_err(),
            "check: --configured takes only --config"
        );
    }

    #[test]
    fn key_commands() {
        assert_eq!(p(&["keygen"]).unwrap(), Command::Keygen);
        assert_eq!(
            p(&["pubkey"]).unwrap(),
            Command::Pubkey(PathBuf::from(DEFAULT_CONFIG))
        );
        assert_eq!(
            p(&["pubkey", "--config", "x.toml"]).unwrap(),
            Command::Pubkey(PathBuf::from("x.toml"))
        );
        assert_eq!(
            p(&["keygen", "--config", "x"]).unwrap_err(),
            "keygen: unknown option --config"
        );
        assert_eq!(
            p(&["pubkey", "x"]).unwrap_err(),
            "pubkey: unexpected argument \"x\""
        );
    }

    #[test]
    fn usage_errors() {
        assert_eq!(p(&[]).unwrap_err(), "missing command");
        assert_eq!(
            p(&["frobnicate"]).unwrap_err(),
            "unknown command \"frobnicate\""
        );
        assert_eq!(
            p(&["run", "--keys", "x"]).unwrap_err(),
            "run: unknown option --keys"
        );
        assert_eq!(
            p(&["check", "--config"]).unwrap_err(),
            "check: --config needs a path"
        );
        assert_eq!(
            p(&["run", "x"]).unwrap_err(),
            "run: unexpected argument \"x\""
        );
        assert_eq!(
            p(&["check", "--config", "a", "--config", "b"]).unwrap_err(),
            "check: --config given twice"
        );
    }
}
