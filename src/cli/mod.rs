//! The command line: `run`, `check`, `status`, `keygen`, `pubkey`, `teardown`, `sync`,
//! `completions` (the grammar is in `args`). Exit codes are part of the interface:
//! 0 success, 1 failure (invalid input, daemon error), 2 usage.

pub mod args;
pub mod status;
pub mod teardown;

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::config::diag::{Diags, Source};
use crate::config::wgkey::{self, PrivateKey};
use crate::config::{self, Paths, settings, settings::DEFAULT_CONFIG};
use args::{Cli, Cmd};
use clap::Parser;

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
    Completions(clap_complete::Shell),
    Sync { config: PathBuf, deregister: bool },
}

/// Parse arguments (without the program name). `Err` is clap's: a usage error (exit 2),
/// or the help or version text asked for (exit 0).
pub fn parse(args: Vec<OsString>) -> Result<Command, clap::Error> {
    let cli = Cli::try_parse_from(std::iter::once(OsString::from("encryptd")).chain(args))?;
    let paths = |config: PathBuf| Paths {
        config,
        inventory: None,
        keys: None,
        preshared_key: None,
    };
    Ok(match cli.command {
        Cmd::Run(c) => Command::Run(paths(c.config)),
        Cmd::Teardown(c) => Command::Teardown(paths(c.config)),
        Cmd::Pubkey(c) => Command::Pubkey(c.config),
        Cmd::Keygen => Command::Keygen,
        Cmd::Sync(s) => Command::Sync {
            config: s.config.config,
            deregister: s.deregister,
        },
        Cmd::Completions { shell } => Command::Completions(shell),
        Cmd::Status(s) => Command::Status(
            paths(s.config.config),
            status::Options {
                json: s.json,
                verbose: s.verbose,
                peer: s.peer,
            },
        ),
        Cmd::Check(c) => {
            let config = c
                .config
                .or(c.file)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
            if c.configured {
                Command::Configured(config)
            } else {
                Command::Check(Paths {
                    config,
                    inventory: c.inventory,
                    keys: c.keys,
                    preshared_key: c.preshared_key,
                })
            }
        }
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
    let command = match parse(args) {
        Ok(c) => c,
        Err(e) => {
            // Help and version go to stdout with 0, usage errors to stderr with 2.
            let _ = e.print();
            return if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
        }
    };
    if !matches!(command, Command::Completions(_)) {
        undumpable();
    }
    match command {
        Command::Check(paths) => check(&paths),
        Command::Configured(config) => match config::configured(&config) {
            Ok(()) => EXIT_OK,
            Err(d) => {
                eprintln!("{d}");
                EXIT_FAIL
            }
        },
        Command::Keygen => keygen(),
        Command::Pubkey(config) => pubkey(&config),
        Command::Run(paths) => crate::daemon::run(paths),
        Command::Sync { config, deregister } => crate::sync::main(&config, deregister),
        Command::Teardown(paths) => teardown(&paths),
        Command::Status(paths, opts) => status::main(&paths, &opts),
        Command::Completions(shell) => {
            use clap::CommandFactory;
            // Into memory first: clap_complete panics on a write error (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "encryptd", &mut script);
            let mut out = std::io::stdout().lock();
            match out.write_all(&script).and_then(|()| out.flush()) {
                Ok(()) => EXIT_OK,
                Err(e) => {
                    eprintln!("encryptd: completions: {e}");
                    EXIT_FAIL
                }
            }
        }
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
            // The files `encryptd sync` reads, read as it reads them (0600 secrets).
            if let Some(sync) = &c.settings.sync
                && let Err(e) = crate::sync::etcd::Client::new(sync)
            {
                eprintln!("{e}");
                return EXIT_FAIL;
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
        parse(args.iter().map(OsString::from).collect()).map_err(|e| {
            // The first line of clap's message, without its styling.
            e.to_string().lines().next().unwrap_or("").to_string()
        })
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
        let Command::Check(paths) = p(&["check", "--preshared-key", "psk"]).unwrap() else {
            panic!()
        };
        assert_eq!(paths.preshared_key, Some(PathBuf::from("psk")));
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
        assert!(
            p(&["status", "--peer"])
                .unwrap_err()
                .contains("'--peer <NAME>'")
        );
        assert!(
            p(&["status", "--peer", "a", "--peer", "b"])
                .unwrap_err()
                .contains("cannot be used multiple times")
        );
    }

    #[test]
    fn configured_takes_only_the_config() {
        assert_eq!(
            p(&["check", "--configured", "--config", "x.toml"]).unwrap(),
            Command::Configured(PathBuf::from("x.toml"))
        );
        assert!(
            p(&["check", "--configured", "--inventory", "n.toml"])
                .unwrap_err()
                .contains("cannot be used with")
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
        assert!(
            p(&["keygen", "--config", "x"])
                .unwrap_err()
                .contains("unexpected argument '--config'")
        );
        assert!(
            p(&["pubkey", "x"])
                .unwrap_err()
                .contains("unexpected argument 'x'")
        );
    }

    #[test]
    fn usage_errors() {
        assert!(
            p(&["frobnicate"])
                .unwrap_err()
                .contains("unrecognized subcommand 'frobnicate'")
        );
        assert!(
            p(&["run", "--keys", "x"])
                .unwrap_err()
                .contains("unexpected argument '--keys'")
        );
        assert!(
            p(&["check", "--config"])
                .unwrap_err()
                .contains("a value is required for '--config <PATH>'")
        );
        assert!(
            p(&["check", "--config", "a", "b"])
                .unwrap_err()
                .contains("cannot be used with")
        );
        assert!(
            p(&["chek"])
                .unwrap_err()
                .contains("unrecognized subcommand")
        );
    }

    #[test]
    fn help_and_version_are_not_errors() {
        for args in [
            &["--help"][..],
            &["status", "--help"],
            &["-V"],
            &["help", "check"],
        ] {
            let e = parse(args.iter().map(OsString::from).collect()).unwrap_err();
            assert!(!e.use_stderr(), "{args:?}: {e}");
        }
        let e = parse(vec!["--version".into()]).unwrap_err();
        assert_eq!(
            e.to_string().trim(),
            format!("encryptd {} (commit {})", crate::VERSION, crate::COMMIT)
        );
    }

    #[test]
    fn the_grammar_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    /// docs/man/encryptd.8's SYNOPSIS is clap_mangen's rendering of the grammar.
    /// `ENCRYPTD_BLESS=1 cargo test --lib man_page_synopsis` rewrites it.
    #[test]
    fn man_page_synopsis_is_the_grammar() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/man/encryptd.8");
        let page = std::fs::read_to_string(path).unwrap();
        let (begin, end) = (".SH SYNOPSIS\n", "\n.SH DESCRIPTION");
        let a = page.find(begin).expect("a SYNOPSIS section") + begin.len();
        let b = page[a..].find(end).expect("DESCRIPTION after it") + a;
        let want = args::man_synopsis();
        if std::env::var_os("ENCRYPTD_BLESS").is_some() {
            std::fs::write(
                path,
                format!("{}{}{}", &page[..a], want.trim_end(), &page[b..]),
            )
            .unwrap();
            return;
        }
        assert_eq!(
            page[a..b].trim_end(),
            want.trim_end(),
            "docs/man/encryptd.8 SYNOPSIS differs from the command line; rewrite it with \
             ENCRYPTD_BLESS=1 cargo test --lib man_page_synopsis"
        );
    }
}
