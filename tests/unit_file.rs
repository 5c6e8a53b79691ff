//! The systemd unit (`systemd/encryptd.service`): it keeps the contract that operators and
//! the daemon rely on, `systemd-analyze verify` finds nothing to say about it, and
//! `systemd-analyze security` rates it OK or better.
//!
//! These tests need `systemd-analyze` (Debian: package `systemd`). Without it they fail:
//! a hardening regression must not pass unseen because a tool was missing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/encryptd.service");
/// Highest exposure systemd-analyze still calls "OK" (5.0 and up is "MEDIUM").
const MAX_EXPOSURE: f64 = 4.9;
const GOOD_RATINGS: &[&str] = &["PERFECT", "SAFE", "OK"];

fn unit_text() -> String {
    std::fs::read_to_string(UNIT).unwrap_or_else(|e| panic!("reading {UNIT}: {e}"))
}

/// `(section, key, value)` of every assignment, in order; comments and blank lines dropped,
/// backslash continuations joined.
fn parse(text: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut section = String::new();
    let mut pending = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with(';'))
        {
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(line);
        let full = std::mem::take(&mut pending);
        if let Some(name) = full.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = name.to_owned();
        } else if let Some((k, v)) = full.split_once('=') {
            out.push((section.clone(), k.trim().to_owned(), v.trim().to_owned()));
        } else {
            panic!("{UNIT}: not an assignment: {raw:?}");
        }
    }
    out
}

/// Every value assigned to `section`.`key`.
fn values<'a>(unit: &'a [(String, String, String)], section: &str, key: &str) -> Vec<&'a str> {
    unit.iter()
        .filter(|(s, k, _)| s == section && k == key)
        .map(|(_, _, v)| v.as_str())
        .collect()
}

/// The one value of `section`.`key`; fails if it is missing or assigned twice.
fn single<'a>(unit: &'a [(String, String, String)], section: &str, key: &str) -> &'a str {
    match values(unit, section, key)[..] {
        [v] => v,
        [] => panic!("{UNIT}: [{section}] {key}= is missing"),
        ref many => panic!("{UNIT}: [{section}] {key}= is set {} times", many.len()),
    }
}

/// Run systemd-analyze; a missing tool is a failure that says what to install.
fn analyze(args: &[&str]) -> Output {
    let mut cmd = Command::new("systemd-analyze");
    cmd.args(args)
        .env("SYSTEMD_COLORS", "0")
        .env("SYSTEMD_PAGER", "")
        .env("LC_ALL", "C");
    match common::run_within(&mut cmd, common::DEADLINE) {
        Ok((Some(status), stdout, stderr)) => Output {
            status,
            stdout,
            stderr,
        },
        Ok((None, ..)) => panic!(
            "systemd-analyze {args:?} did not finish within {:?}",
            common::DEADLINE
        ),
        Err(e) => panic!(
            "cannot run systemd-analyze ({e}). These tests need it and do not skip: \
             install systemd (Debian: `apt-get install systemd`) or put \
             systemd-analyze on PATH."
        ),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A fresh directory under cargo's per-target temp dir.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("unit_file-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    dir
}

#[test]
fn unit_keeps_the_contract() {
    let unit = parse(&unit_text());
    let service = "Service";

    assert_eq!(single(&unit, service, "Type"), "notify");
    assert_eq!(single(&unit, service, "NotifyAccess"), "main");
    assert_eq!(single(&unit, service, "ExecStart"), "/usr/bin/encryptd run");
    // An unconfigured node is skipped at boot, not failed (tests/check.rs has the exit
    // codes, tests/packages-guest.sh the boot).
    assert_eq!(
        single(&unit, service, "ExecCondition"),
        "/usr/bin/encryptd check --configured"
    );
    // The metrics file is written where node_exporter looks on Debian, out of the box.
    assert!(
        values(&unit, service, "ReadWritePaths").contains(&"-/var/lib/prometheus/node-exporter"),
        "ReadWritePaths= lacks node_exporter's textfile directory"
    );
    assert_eq!(single(&unit, service, "Restart"), "on-failure");

    // ExecReload sends SIGHUP to the main process.
    let reload = single(&unit, service, "ExecReload");
    let words: Vec<&str> = reload.split_whitespace().collect();
    let program = words
        .first()
        .map(|w| w.trim_start_matches(['-', '@', ':', '+', '!']))
        .unwrap_or("");
    assert!(
        program.rsplit('/').next() == Some("kill"),
        "ExecReload={reload}: expected kill"
    );
    let hup = words.windows(2).any(|w| w[0] == "-s" && w[1] == "HUP")
        || words
            .iter()
            .any(|w| matches!(*w, "-HUP" | "-SIGHUP" | "-1"));
    assert!(hup, "ExecReload={reload}: does not send HUP");
    assert!(
        words
            .iter()
            .any(|w| matches!(*w, "$MAINPID" | "${MAINPID}")),
        "ExecReload={reload}: does not signal $MAINPID"
    );

    // A watchdog, and a real one (not 0 / infinity).
    let watchdog = single(&unit, service, "WatchdogSec");
    let digits: String = watchdog.chars().take_while(char::is_ascii_digit).collect();
    assert!(
        digits.parse::<u64>().is_ok_and(|n| n > 0),
        "WatchdogSec={watchdog}: must be a positive time span"
    );

    // The files of DESIGN.md, and the host network (it configures it).
    assert_eq!(single(&unit, service, "RuntimeDirectory"), "encryptd");
    assert_eq!(single(&unit, service, "StateDirectory"), "encryptd");
    assert_eq!(single(&unit, service, "ConfigurationDirectory"), "encryptd");
    assert_eq!(single(&unit, service, "RuntimeDirectoryMode"), "0700");
    assert_eq!(single(&unit, service, "StateDirectoryMode"), "0700");
    for v in values(&unit, service, "PrivateNetwork") {
        assert!(
            matches!(v, "no" | "false" | "0" | "off"),
            "PrivateNetwork={v}: the daemon configures the host's network"
        );
    }
    assert!(
        single(&unit, service, "CapabilityBoundingSet")
            .split_whitespace()
            .any(|c| c == "CAP_NET_ADMIN"),
        "CapabilityBoundingSet= must keep CAP_NET_ADMIN"
    );
    // The process holds key material: no core dumps.
    assert_eq!(single(&unit, service, "LimitCORE"), "0");
}

#[test]
fn systemd_analyze_verify_is_silent() {
    // verify insists that ExecStart= (and ExecCondition=) exist and are executable: point them at the built
    // binary in a copy of the unit (same file name, so the same unit name).
    let bin = env!("CARGO_BIN_EXE_encryptd").replace('%', "%%");
    let bin = if bin.contains(char::is_whitespace) {
        format!("\"{bin}\"")
    } else {
        bin
    };
    let original = unit_text();
    let mut replaced = 0;
    let copy: String = original
        .lines()
        .map(|l| {
            for key in ["ExecStart", "ExecCondition"] {
                if let Some(args) = l.strip_prefix(&format!("{key}=/usr/bin/encryptd ")) {
                    replaced += 1;
                    return format!("{key}={bin} {args}\n");
                }
            }
            format!("{l}\n")
        })
        .collect();
    assert_eq!(
        replaced, 2,
        "expected one ExecStart= and one ExecCondition= of /usr/bin/encryptd in {UNIT}"
    );
    let dir = scratch("verify");
    let path = dir.join("encryptd.service");
    std::fs::write(&path, copy).unwrap();

    let out = analyze(&["verify", "--man=no", path.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    // verify exits 0 on unknown keys and unparsable values ("…, ignoring"): those are
    // mistakes too, so any diagnostic fails the test.
    assert!(
        out.status.success() && stderr.trim().is_empty() && text(&out.stdout).trim().is_empty(),
        "systemd-analyze verify on {UNIT} (ExecStart -> {bin}): {}\n{stderr}{}",
        out.status,
        text(&out.stdout)
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// `(exposure, rating)` from "→ Overall exposure level for encryptd.service: 1.8 OK 🙂".
fn overall(line: &str) -> Option<(f64, String)> {
    let rest = line.split("Overall exposure level for").nth(1)?;
    let (_, rest) = rest.split_once(':')?;
    let mut words = rest.split_whitespace();
    let exposure = words.next()?.parse().ok()?;
    Some((exposure, words.next()?.to_owned()))
}

#[test]
fn systemd_analyze_security_rates_it_ok_or_better() {
    let out = analyze(&["security", "--offline=true", "--no-pager", UNIT]);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze security --offline=true {UNIT}: {}\n{stdout}{stderr}",
        out.status
    );
    let (exposure, rating) = stdout
        .lines()
        .find_map(overall)
        .unwrap_or_else(|| panic!("no 'Overall exposure level' line in:\n{stdout}{stderr}"));
    assert!(
        exposure <= MAX_EXPOSURE && GOOD_RATINGS.contains(&rating.as_str()),
        "exposure {exposure} {rating}: must be OK or better (<= {MAX_EXPOSURE}):\n{stdout}"
    );

    // The header records the score; keep it honest for the systemd version it names.
    let unit = unit_text();
    let recorded = unit
        .lines()
        .take_while(|l| l.starts_with('#'))
        .find(|l| l.contains("Overall exposure level for"))
        .unwrap_or_else(|| panic!("{UNIT}: the header comment must record the exposure"));
    let (recorded_exposure, recorded_rating) =
        overall(recorded).unwrap_or_else(|| panic!("cannot read the score in {recorded:?}"));
    let version = text(&analyze(&["--version"]).stdout);
    let version = version.split_whitespace().nth(1).unwrap_or("?");
    if recorded.contains(&format!("(systemd {version},")) {
        assert!(
            (recorded_exposure, recorded_rating.as_str()) == (exposure, rating.as_str()),
            "{UNIT} records {recorded_exposure} {recorded_rating}, systemd {version} says \
             {exposure} {rating}: update the header comment"
        );
    }
}

const BOOT_UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/systemd/encryptd-strict.service"
);

/// `encryptd-strict.service` installs the rules the daemon kept (in the default
/// `state_dir`, under the name the daemon writes) before the network comes up, after
/// anything that flushes the ruleset, and before the daemon; systemd finds nothing to
/// say about it and rates it OK or better.
#[test]
fn boot_unit_installs_the_kept_rules_before_the_network() {
    let text_ = std::fs::read_to_string(BOOT_UNIT).unwrap();
    let unit = parse(&text_);
    let file = format!("/var/lib/encryptd/{}", encryptd::strict::BOOT_RULES);
    assert_eq!(single(&unit, "Service", "Type"), "oneshot");
    assert_eq!(
        single(&unit, "Service", "ExecStart"),
        format!("/usr/sbin/nft -f {file}")
    );
    assert_eq!(single(&unit, "Unit", "ConditionPathExists"), file);
    assert_eq!(single(&unit, "Unit", "DefaultDependencies"), "no");
    let words = |key: &str| -> Vec<String> {
        values(&unit, "Unit", key)
            .iter()
            .flat_map(|v| v.split_whitespace().map(str::to_owned))
            .collect()
    };
    for t in ["network-pre.target", "encryptd.service"] {
        assert!(words("Before").contains(&t.to_owned()), "Before= lacks {t}");
    }
    assert!(words("Wants").contains(&"network-pre.target".to_owned()));
    for t in ["nftables.service", "local-fs.target"] {
        assert!(words("After").contains(&t.to_owned()), "After= lacks {t}");
    }
    assert_eq!(single(&unit, "Install", "WantedBy"), "sysinit.target");

    verify_and_rate(BOOT_UNIT, BOOT_UNIT);
}

/// `systemd-analyze verify` of `verify_path` (the unit, or a copy naming a binary that
/// exists) prints nothing, and `security` rates `unit` OK or better.
fn verify_and_rate(unit: &str, verify_path: &str) -> (f64, String) {
    let out = analyze(&["verify", "--man=no", verify_path]);
    assert!(
        out.status.success() && text(&out.stderr).trim().is_empty(),
        "systemd-analyze verify {unit}: {}",
        text(&out.stderr)
    );
    let out = analyze(&["security", "--offline=true", "--no-pager", unit]);
    let stdout = text(&out.stdout);
    let (exposure, rating) = stdout
        .lines()
        .find_map(overall)
        .unwrap_or_else(|| panic!("no 'Overall exposure level' line in:\n{stdout}"));
    assert!(
        exposure <= MAX_EXPOSURE && GOOD_RATINGS.contains(&rating.as_str()),
        "{unit}: exposure {exposure} {rating}"
    );
    (exposure, rating)
}

const SYNC_UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/encryptd-sync.service");

/// `encryptd-sync.service`: runs `encryptd sync`, says READY before the daemon starts (so
/// that a first boot has an inventory), may write the inventory's directory and nothing
/// of the kernel's (no capabilities, no netlink); verify is silent and security OK.
#[test]
fn sync_unit_renders_before_the_daemon_without_privileges() {
    let text_ = std::fs::read_to_string(SYNC_UNIT).unwrap();
    let unit = parse(&text_);
    assert_eq!(single(&unit, "Service", "Type"), "notify");
    assert_eq!(
        single(&unit, "Service", "ExecStart"),
        "/usr/bin/encryptd sync"
    );
    assert_eq!(single(&unit, "Unit", "Before"), "encryptd.service");
    assert_eq!(single(&unit, "Service", "CapabilityBoundingSet"), "");
    assert_eq!(
        single(&unit, "Service", "RestrictAddressFamilies"),
        "AF_UNIX AF_INET AF_INET6"
    );
    assert_eq!(single(&unit, "Service", "ReadWritePaths"), "/etc/encryptd");

    let bin = env!("CARGO_BIN_EXE_encryptd").replace('%', "%%");
    let dir = scratch("verify-sync");
    let path = dir.join("encryptd-sync.service");
    std::fs::write(
        &path,
        text_.replace("ExecStart=/usr/bin/encryptd ", &format!("ExecStart={bin} ")),
    )
    .unwrap();
    let (exposure, rating) = verify_and_rate(SYNC_UNIT, path.to_str().unwrap());
    eprintln!("{SYNC_UNIT}: exposure {exposure} {rating}");
    let _ = std::fs::remove_dir_all(dir);
}
