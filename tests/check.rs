//! `encryptd check`: exit codes and the exact message of every problem it must catch.
//! Each case starts from the shipped example (etc/) and breaks one thing.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

const EXAMPLE_KEY: &str = "6b1c3f0e2d4a59788a9b0c1d2e3f40516273849a";

struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    /// A copy of etc/ in a fresh directory, with the keys file at 0600.
    fn new() -> Fixture {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "encryptd-check-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let etc = Path::new(env!("CARGO_MANIFEST_DIR")).join("etc");
        for f in ["encryptd.toml", "nodes.toml", "ipsec.keys"] {
            std::fs::copy(etc.join(f), dir.join(f)).unwrap();
        }
        let f = Fixture { dir };
        f.chmod("ipsec.keys", 0o600);
        f
    }

    fn chmod(&self, file: &str, mode: u32) {
        std::fs::set_permissions(self.dir.join(file), std::fs::Permissions::from_mode(mode))
            .unwrap();
    }

    /// Replace `from` by `to` in `file`; the text must be there.
    fn edit(&self, file: &str, from: &str, to: &str) -> &Self {
        let p = self.dir.join(file);
        let s = std::fs::read_to_string(&p).unwrap();
        assert!(s.contains(from), "{file} does not contain {from:?}");
        std::fs::write(&p, s.replacen(from, to, 1)).unwrap();
        self
    }

    fn append(&self, file: &str, text: &str) -> &Self {
        let p = self.dir.join(file);
        let s = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, s + text).unwrap();
        self
    }

    /// Run `encryptd check <dir>/encryptd.toml ARGS`: exit code, stdout, stderr with the
    /// directory stripped so messages read `nodes.toml:3:1: ...`.
    fn check(&self, args: &[&str]) -> (i32, String, String) {
        let out = common::output(
            Command::new(env!("CARGO_BIN_EXE_encryptd"))
                .arg("check")
                .arg(self.dir.join("encryptd.toml"))
                .args(args),
        );
        let strip =
            |b: &[u8]| String::from_utf8_lossy(b).replace(&format!("{}/", self.dir.display()), "");
        (
            out.status.code().unwrap(),
            strip(&out.stdout),
            strip(&out.stderr),
        )
    }

    /// Assert the check fails with exactly these problems, in this order.
    fn fails_with(&self, expected: &[&str]) {
        let (code, _, err) = self.check(&[]);
        let mut lines: Vec<&str> = err.lines().collect();
        let summary = lines.pop().unwrap_or_default();
        assert_eq!(lines, expected, "stderr was:\n{err}");
        assert_eq!(
            summary,
            format!("encryptd: {} problem(s) found", expected.len())
        );
        assert_eq!(code, 1);
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn the_shipped_example_is_valid() {
    let (code, out, err) = Fixture::new().check(&[]);
    assert_eq!(err, "");
    assert_eq!(
        out,
        "encryptd.toml: valid: mode ipsec, node node-a, 3 nodes, key 1\n"
    );
    assert_eq!(code, 0);
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["check", "--bogus"][..],
        &["nonsense"],
        &[],
        &["check", "a", "b"],
    ] {
        let out = common::output(Command::new(env!("CARGO_BIN_EXE_encryptd")).args(args));
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("Usage: encryptd"));
    }
}

#[test]
fn toml_syntax() {
    Fixture::new()
        .edit(
            "nodes.toml",
            "[[node]]\nname = \"node-b\"",
            "[[node]\nname = \"node-b\"",
        )
        .fails_with(&["nodes.toml:16:8: TOML syntax: unclosed array table, expected `]`"]);
}

#[test]
fn unknown_keys_are_typos() {
    Fixture::new()
        .edit("encryptd.toml", "replay_window = 4096", "replay_windwo = 4096")
        .edit(
            "nodes.toml",
            "subnets = [\"10.1.1.0/24\"",
            "subnet = [\"10.1.1.0/24\"",
        )
        .fails_with(&[
            "encryptd.toml:43:1: unknown key `replay_windwo` in [ipsec]; did you mean `replay_window`?",
            "nodes.toml:19:1: unknown key `subnet` in [[node]] #2; did you mean `subnets`?",
        ]);
}

#[test]
fn missing_required_fields() {
    Fixture::new()
        .edit("encryptd.toml", "mode = \"ipsec\"", "")
        .edit("nodes.toml", "addresses = [\"192.0.2.12\"]\n", "")
        .edit("nodes.toml", "name = \"node-b\"\n", "")
        .fails_with(&[
            "encryptd.toml:1:1: missing required field `mode` in the top level",
            "nodes.toml:16:1: missing required field `name` in [[node]] #2",
            "nodes.toml:21:1: missing required field `addresses` in [[node]] #3",
        ]);
}

#[test]
fn wrong_types_and_values() {
    Fixture::new()
        .edit("encryptd.toml", "mode = \"ipsec\"", "mode = \"ipsek\"")
        .edit("encryptd.toml", "replay_window = 4096", "replay_window = 8192")
        .edit("encryptd.toml", "ingress = true", "ingress = \"yes\"")
        .edit("encryptd.toml", "key_rotation_duration = \"5m\"", "key_rotation_duration = \"5 minutes\"")
        .fails_with(&[
            "encryptd.toml:12:8: `mode` must be \"ipsec\" or \"wireguard\", not \"ipsek\"",
            "encryptd.toml:39:25: `key_rotation_duration` \"5 minutes\" is not a duration such as \"30s\", \"5m\" or \"1h\"",
            "encryptd.toml:43:17: `replay_window` must be between 1 and 4096",
            "encryptd.toml:87:11: `ingress` must be true or false, not a string",
        ]);
}

#[test]
fn bad_addresses_and_cidrs() {
    Fixture::new()
        .edit("nodes.toml", "\"192.0.2.11\"", "\"192.0.2.300\"")
        .edit("nodes.toml", "\"192.0.2.12\"", "\"192.0.2.12/24\"")
        .edit("nodes.toml", "\"10.1.1.0/24\"", "\"10.1.1.7/24\"")
        .edit("nodes.toml", "\"fd00:2::/64\"", "\"fd00:2::1/64\"")
        .edit("encryptd.toml", "\"10.0.0.0/8\"", "\"10.0.0.0/40\"")
        .fails_with(&[
            "encryptd.toml:84:10: strict.cidrs: '40' is not a prefix length (0..=32)",
            "nodes.toml:18:14: \"192.0.2.300\" is not an IPv4 or IPv6 address",
            "nodes.toml:19:12: subnet 10.1.1.7/24 has host bits set; did you mean 10.1.1.0/24?",
            "nodes.toml:19:27: subnet fd00:2::1/64 has host bits set; did you mean fd00:2::/64?",
            "nodes.toml:24:14: address \"192.0.2.12/24\" has a prefix length; `addresses` are single addresses, put routed ranges in `subnets`",
        ]);
}

#[test]
fn duplicates_and_overlaps() {
    Fixture::new()
        .edit("nodes.toml", "name = \"node-c\"", "name = \"node-a\"")
        .edit("nodes.toml", "\"192.0.2.11\"", "\"192.0.2.10\"")
        .edit("nodes.toml", "\"10.1.1.0/24\"", "\"10.1.0.128/25\"")
        .fails_with(&[
            "nodes.toml:18:14: duplicate address 192.0.2.10: node \"node-a\" has it too (line 12)",
            "nodes.toml:19:12: subnet 10.1.0.128/25 overlaps subnet 10.1.0.0/24 of node \"node-a\" (line 13)",
            "nodes.toml:23:8: duplicate node name \"node-a\" (first defined on line 11)",
        ]);
}

#[test]
fn address_inside_another_nodes_subnet() {
    Fixture::new()
        .edit("nodes.toml", "\"192.0.2.12\"", "\"10.1.1.5\"")
        .fails_with(&[
            "nodes.toml:19:12: subnet 10.1.1.0/24 of node \"node-b\" contains address 10.1.1.5 of node \"node-c\"",
        ]);
}

#[test]
fn this_node_missing_from_inventory() {
    Fixture::new()
        .edit("encryptd.toml", "node = \"node-a\"", "node = \"node-x\"")
        .fails_with(&[
            "encryptd.toml:15:8: this node \"node-x\" (from `node`) is not in the inventory nodes.toml",
        ]);
}

#[test]
fn key_lines() {
    let f = Fixture::new();
    f.append(
        "ipsec.keys",
        &format!(
            "2 rfc4106(gcm(aes)) {EXAMPLE_KEY} 100\n\
             16 rfc4106(gcm(aes)) {EXAMPLE_KEY} 128\n\
             3 rfc4106(gcm(aes)) {} 128\n\
             4 rfc4106(gcm(aes)) {}zz 128\n\
             5 gcm(aes) {EXAMPLE_KEY} 128\n\
             6 rfc4309(ccm(aes)) {EXAMPLE_KEY} 128\n\
             7 hmac(sha256) {EXAMPLE_KEY} cbc(aes) 00112233445566778899aabbccddeeff\n",
            &EXAMPLE_KEY[..38],
            &EXAMPLE_KEY[..38]
        ),
    );
    f.fails_with(&[
        "ipsec.keys:9:62: ICV length must be 64, 96 or 128 bits, not \"100\"",
        "ipsec.keys:10:1: key-id 16 is out of range 1..15",
        "ipsec.keys:11:21: rfc4106(gcm(aes)) key (AES key + 32-bit salt) must be 40, 56 or 72 hex digits, not 38",
        "ipsec.keys:12:21: rfc4106(gcm(aes)) key (AES key + 32-bit salt) is not hexadecimal",
        "ipsec.keys:13:3: unknown algorithm \"gcm(aes)\": XFRM defines no such algorithm (use rfc4106(gcm(aes)), or hmac(sha256) with cbc(aes))",
        "ipsec.keys:14:3: algorithm rfc4309(ccm(aes)) is not supported by encryptd (use rfc4106(gcm(aes)), or hmac(sha256) with cbc(aes))",
        "ipsec.keys:15:16: hmac(sha256) key must be 64 hex digits, not 40",
    ]);
    // Whatever went wrong, no key bytes reach the output.
    let (_, out, err) = f.check(&[]);
    for secret in [EXAMPLE_KEY, &EXAMPLE_KEY[..38], &EXAMPLE_KEY[4..20]] {
        assert!(
            !out.contains(secret) && !err.contains(secret),
            "key bytes leaked"
        );
    }
}

#[test]
fn key_rotation_lines() {
    let f = Fixture::new();
    f.append(
        "ipsec.keys",
        &format!(
            "3 rfc4106(gcm(aes)) {EXAMPLE_KEY} 128\n\
             1 rfc4106(gcm(aes)) {EXAMPLE_KEY} 128\n"
        ),
    );
    f.fails_with(&[
        "ipsec.keys:9:1: key-id 3 does not follow key-id 1 of line 8: a rotation appends key-id 2 (old + 1, 15 wraps to 1)",
        "ipsec.keys:10:1: key-id 1 appears twice (lines 8 and 10); remove the older line",
    ]);
    let f = Fixture::new();
    f.append(
        "ipsec.keys",
        &format!("2 rfc4106(gcm(aes)) {EXAMPLE_KEY}0011223344556677 128\n"),
    );
    f.fails_with(&[
        "ipsec.keys:9:1: key-id 2 changes the algorithm from rfc4106(gcm(aes)) 128-bit key, 128-bit ICV to rfc4106(gcm(aes)) 192-bit key, 128-bit ICV; a rotation must keep the algorithm and key length",
    ]);
    // A proper rotation line, and the 15 -> 1 wrap, are valid.
    let f = Fixture::new();
    f.edit("ipsec.keys", "\n1+ rfc4106", "\n15+ rfc4106")
        .append(
            "ipsec.keys",
            &format!("1+ rfc4106(gcm(aes)) {EXAMPLE_KEY} 128\n"),
        );
    let (code, out, _) = f.check(&[]);
    assert_eq!((code, out.contains("key 1")), (0, true));
}

#[test]
fn keys_file_readable_by_others_is_refused() {
    let f = Fixture::new();
    f.chmod("ipsec.keys", 0o640);
    f.fails_with(&[
        &format!(
            "ipsec.keys:1:1: keys file is accessible by group or others (mode 0640); it must be 0600: chmod 0600 {}/ipsec.keys",
            "" // the directory is stripped by the fixture
        )
        .replace(" /ipsec.keys", " ipsec.keys"),
    ]);
}

#[test]
fn wireguard_public_keys() {
    Fixture::new()
        .edit("encryptd.toml", "mode = \"ipsec\"", "mode = \"wireguard\"")
        .edit("nodes.toml", "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=", "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8D==")
        .edit("nodes.toml", "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=", "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=")
        .fails_with(&[
            "nodes.toml:20:24: wireguard_public_key must be 32 bytes in base64 (44 characters, as `wg pubkey` or `encryptd pubkey` prints)",
            "nodes.toml:25:24: wireguard_public_key is also the key of node \"node-a\" (line 14); every node needs its own key pair",
        ]);
    Fixture::new()
        .edit("encryptd.toml", "mode = \"ipsec\"", "mode = \"wireguard\"")
        .edit("nodes.toml", "wireguard_public_key = \"TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=\"\n", "")
        .fails_with(&[
            "nodes.toml:22:1: missing required field `wireguard_public_key` in [[node]] #3 (mode = \"wireguard\"; `encryptd pubkey` on that node prints it)",
        ]);
}

#[test]
fn strict_range_containing_own_address_needs_an_exception() {
    Fixture::new()
        .edit("encryptd.toml", "cidrs = [\"10.0.0.0/8\", \"fd00::/8\"]", "cidrs = [\"10.0.0.0/8\", \"192.0.2.0/24\"]")
        .edit("encryptd.toml", "exceptions = [{ proto = \"tcp\", port = 22 }]", "exceptions = []")
        .fails_with(&[
            "encryptd.toml:84:24: protected range 192.0.2.0/24 contains this node's address 192.0.2.10, and no exception keeps it reachable: add to [strict] exceptions = [{ proto = \"tcp\", port = 22 }] (or the port you manage it by)",
        ]);
    // With the exception it is valid.
    let f = Fixture::new();
    f.edit(
        "encryptd.toml",
        "cidrs = [\"10.0.0.0/8\", \"fd00::/8\"]",
        "cidrs = [\"192.0.2.0/24\"]",
    );
    let (code, _, err) = f.check(&[]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn every_problem_in_one_run() {
    Fixture::new()
        .edit("encryptd.toml", "hello_port = 4510", "hello_port = 0")
        .edit("nodes.toml", "\"192.0.2.12\"", "\"nope\"")
        .append("ipsec.keys", "0 rfc4106(gcm(aes)) 00 128\n")
        .fails_with(&[
            "encryptd.toml:46:14: `hello_port` must be between 1 and 65535",
            "ipsec.keys:9:1: key-id 0 is out of range 1..15",
            "nodes.toml:24:14: \"nope\" is not an IPv4 or IPv6 address",
        ]);
}

#[test]
fn inventory_override_for_ansible_validate() {
    // Ansible: `validate: encryptd check --inventory %s` with the new file in a temp path.
    let f = Fixture::new();
    let candidate = f.dir.join("candidate.toml");
    std::fs::write(
        &candidate,
        "[[node]]\nname = \"node-a\"\naddresses = [\"192.0.2.10\"]\n",
    )
    .unwrap();
    let (code, out, _) = f.check(&["--inventory", candidate.to_str().unwrap()]);
    assert_eq!((code, out.contains("1 nodes")), (0, true));
    std::fs::write(
        &candidate,
        "[[node]]\nname = \"node-a\"\naddresses = [\"192.0.2.1000\"]\n",
    )
    .unwrap();
    let (code, _, err) = f.check(&["--inventory", candidate.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("candidate.toml:3:14: \"192.0.2.1000\" is not an IPv4 or IPv6 address"),
        "{err}"
    );
}

#[test]
fn wireguard_key_pair_commands() {
    let f = Fixture::new();
    f.edit("encryptd.toml", "mode = \"ipsec\"", "mode = \"wireguard\"")
        .edit(
            "encryptd.toml",
            "private_key = \"/var/lib/encryptd/wireguard.key\"",
            "private_key = \"state/wireguard.key\"",
        );
    let run = |args: &[&str]| {
        let out = common::output(Command::new(env!("CARGO_BIN_EXE_encryptd")).args(args));
        (
            out.status.code().unwrap(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, key, _) = run(&["keygen"]);
    assert_eq!(code, 0);
    assert_eq!(key.len(), 45, "{key:?}");
    assert_ne!(run(&["keygen"]).1, key, "two keygens, two keys");

    // `pubkey` creates the missing key file (0600) and prints the same key every time.
    let config = f.dir.join("encryptd.toml");
    let config = config.to_str().unwrap();
    let (code, public, err) = run(&["pubkey", "--config", config]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("created a new private key in"), "{err}");
    let keyfile = f.dir.join("state/wireguard.key");
    let mode = std::fs::metadata(&keyfile).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(
        run(&["pubkey", "--config", config]),
        (0, public.clone(), String::new())
    );

    // The inventory lists another key for this node: `check` says which one to put there.
    f.fails_with(&[&format!(
        "nodes.toml:10:1: wireguard_public_key of this node \"node-a\" is not the public key of its private key state/wireguard.key ({}): put the output of `encryptd pubkey` on this node here",
        public.trim()
    )]);
    f.edit(
        "nodes.toml",
        "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=",
        public.trim(),
    );
    let (code, _, err) = f.check(&[]);
    assert_eq!(code, 0, "{err}");

    // A private key file others can read is refused, by `check` and by `pubkey`.
    f.chmod("state/wireguard.key", 0o644);
    let msg = "state/wireguard.key:1:1: private key file is accessible by group or others (mode 0644); it must be 0600: chmod 0600 state/wireguard.key";
    f.fails_with(&[msg]);
    let (code, out, err) = run(&["pubkey", "--config", config]);
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(err.contains("it must be 0600"), "{err}");
}

#[test]
fn wireguard_preshared_key_file() {
    let f = Fixture::new();
    f.edit("encryptd.toml", "mode = \"ipsec\"", "mode = \"wireguard\"")
        .edit(
            "encryptd.toml",
            "preshared_key = \"\"",
            "preshared_key = \"cluster.psk\"",
        );
    f.fails_with(&[
        "cluster.psk:1:1: cannot read the preshared key file: No such file or directory (os error 2)",
    ]);
    let psk = f.dir.join("cluster.psk");
    let secret = "2B1nDh6Kv0Ry0x3sQjX4hG0mJ9v1cL8pT5wZ7aE3fUo=";
    std::fs::write(&psk, format!("{secret}\n")).unwrap();
    f.chmod("cluster.psk", 0o640);
    f.fails_with(&[
        "cluster.psk:1:1: preshared key file is accessible by group or others (mode 0640); it must be 0600: chmod 0600 cluster.psk",
    ]);
    f.chmod("cluster.psk", 0o600);
    std::fs::write(&psk, &secret[..40]).unwrap();
    f.fails_with(&[
        "cluster.psk:1:1: the preshared key file is not one WireGuard key (44 characters of base64, as `encryptd keygen` or `wg genkey` prints)",
    ]);
    std::fs::write(&psk, format!("{}\n", "A".repeat(43) + "=")).unwrap();
    f.fails_with(&[
        "cluster.psk:1:1: the preshared key file holds an all-zero key, which WireGuard takes as no key: make one with `wg genpsk` or `head -c 32 /dev/urandom | base64`",
    ]);
    std::fs::write(&psk, format!("{secret}\n")).unwrap();
    f.edit(
        "encryptd.toml",
        "userspace = \"\"",
        "userspace = \"/nonexistent/wireguard-go\"",
    );
    f.fails_with(&[
        "encryptd.toml:76:13: `userspace` /nonexistent/wireguard-go is not a file (a userspace WireGuard such as /usr/bin/wireguard-go, package wireguard-go)",
    ]);
    f.edit(
        "encryptd.toml",
        "userspace = \"/nonexistent/wireguard-go\"",
        "userspace = \"\"",
    );
    let (code, out, err) = f.check(&[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        !out.contains(secret) && !err.contains(secret),
        "key bytes printed"
    );
    // Ansible's `validate`: a candidate file checked in place of the configured one.
    let candidate = f.dir.join("candidate.psk");
    std::fs::write(&candidate, "not a key\n").unwrap();
    f.chmod("candidate.psk", 0o600);
    let (code, _, err) = f.check(&["--preshared-key", candidate.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("candidate.psk:1:1: the preshared key file is not one WireGuard key"),
        "{err}"
    );
}

#[test]
fn interface_names_are_linux_names_that_need_no_quoting() {
    Fixture::new()
        .edit(
            "encryptd.toml",
            "interface = \"encryptd0\"",
            "interface = \"wg0\\\" accept\"",
        )
        .fails_with(&[
            "encryptd.toml:59:13: `interface` must be a Linux interface name: 1 to 15 of the characters A-Z a-z 0-9 - _ . (not \".\" or \"..\")",
        ]);
}

/// `[ipsec] interface` never did anything (XFRM encrypts by policy on any link): a config
/// that names a link is told so, where it says it; the old default, empty, still loads.
#[test]
fn ipsec_interface_is_refused_where_it_names_a_link() {
    Fixture::new()
        .edit("encryptd.toml", "[ipsec]\n", "[ipsec]\ninterface = \"eth1\"\n")
        .fails_with(&[
            "encryptd.toml:33:13: `[ipsec] interface` is no longer a setting (\"eth1\" was never used): IPsec encrypts by policy whatever link a packet leaves by and decrypts on whichever link ESP arrives; remove this line",
        ]);
    let f = Fixture::new();
    f.edit("encryptd.toml", "[ipsec]\n", "[ipsec]\ninterface = \"\"\n");
    let (code, _, err) = f.check(&[]);
    assert_eq!((code, err.as_str()), (0, ""));
}

/// Both modes' strict rulesets pass `nft -c` (run by `check` as root): a syntax error in
/// the rendered table is caught here, not first in the kernel VM.
#[test]
fn both_modes_strict_rulesets_pass_nft_check() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test needs root (nft -c talks to the kernel); run the suite as root");
    }
    for mode in ["ipsec", "wireguard"] {
        let f = Fixture::new();
        let f = f.edit(
            "encryptd.toml",
            "mode = \"ipsec\"",
            &format!("mode = \"{mode}\""),
        );
        let (code, out, err) = f.check(&[]);
        assert_eq!((code, err.as_str()), (0, ""), "{mode}: {out}{err}");
        assert!(!out.contains("not checked with `nft -c`"), "{out}");
    }
}

#[test]
fn protected_ranges_covering_one_family_only_are_a_warning() {
    let f = Fixture::new();
    let f = f.edit(
        "encryptd.toml",
        "cidrs = [\"10.0.0.0/8\", \"fd00::/8\"]",
        "cidrs = [\"192.0.2.0/24\"]",
    );
    let (code, out, err) = f.check(&[]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        err,
        "encryptd.toml: warning: [strict] cidrs cover the nodes' IPv4 addresses but not their IPv6 addresses 2001:db8::10 (node-a), 2001:db8::11 (node-b): strict mode does not protect traffic to and from those; add their range to cidrs if it should\n"
    );
    // covering both families: no warning
    let (code, _, err) = f
        .edit(
            "encryptd.toml",
            "cidrs = [\"192.0.2.0/24\"]",
            "cidrs = [\"192.0.2.0/24\", \"2001:db8::/32\"]",
        )
        .check(&[]);
    assert_eq!((code, err.as_str()), (0, ""));
}

/// The package's /etc/encryptd/encryptd.toml on a node nobody has configured: the
/// daemon and `check` say in one line what to write, and the unit's condition
/// (`check --configured`) keeps it from failing at every boot until then.
#[test]
fn an_unconfigured_node_is_told_what_to_write() {
    let f = Fixture::new();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/etc/encryptd.toml");
    std::fs::copy(shipped, f.dir.join("encryptd.toml")).unwrap();
    for gone in ["nodes.toml", "ipsec.keys"] {
        std::fs::remove_file(f.dir.join(gone)).unwrap();
    }
    let want = "nodes.toml:1:1: this node is not configured yet: write the inventory here \
                (every node of the fleet) and the IPsec keys in ipsec.keys; examples in \
                /usr/share/doc/encryptd/examples, see encryptd.toml(5)";
    let (code, _, err) = f.check(&[]);
    assert_eq!((code, err.lines().next()), (1, Some(want)), "{err}");
    assert_eq!(err.lines().count(), 2, "one problem and the count:\n{err}");
    let (code, _, err) = f.check(&["--configured"]);
    assert_eq!((code, err.trim_end()), (1, want));
    // The daemon refuses to start with the same line (before it touches the kernel).
    let out = common::output(
        Command::new(env!("CARGO_BIN_EXE_encryptd"))
            .args(["run", "--config"])
            .arg(f.dir.join("encryptd.toml")),
    );
    let err = String::from_utf8_lossy(&out.stderr).replace(&format!("{}/", f.dir.display()), "");
    assert!(
        out.status.code() == Some(1) && err.contains(want),
        "run: {:?}\n{err}",
        out.status
    );
    // With an inventory the node counts as configured: what is still wrong (no key
    // file here) is for the start to report, loudly.
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("etc/nodes.toml"),
        f.dir.join("nodes.toml"),
    )
    .unwrap();
    assert_eq!(f.check(&["--configured"]).0, 0);
    let (code, _, err) = f.check(&[]);
    assert!(code == 1 && err.contains("ipsec.keys"), "{err}");
}

#[test]
fn sync_table_is_checked_field_by_field() {
    let f = Fixture::new();
    f.append(
        "encryptd.toml",
        "\n[sync]\nendpoints = [\"http://10.0.0.9:2379\", \"10.0.0.8\"]\nprefix = \"encryptd/\"\naddresses = [\"10.0.0.300\"]\nsubnets = [\"10.9.0.1/24\"]\ncert = \"node.pem\"\nuser = \"n1\"\n",
    );
    let (code, _, err) = f.check(&[]);
    assert_eq!(code, 1, "{err}");
    for want in [
        "endpoint \"http://10.0.0.9:2379\" is plaintext HTTP: use https://, or set `plaintext = true`",
        "endpoint \"10.0.0.8\" is not a URL such as \"https://10.0.0.1:2379\"",
        "`prefix` \"encryptd/\" must start with '/' and not end with one",
        "\"10.0.0.300\" is not a node address",
        "subnet: 10.9.0.1/24",
        "`cert` and `key` go together",
        "`user` and `password_file` go together",
    ] {
        assert!(err.contains(want), "no {want:?} in:\n{err}");
    }
    // Every problem names the file and a line inside the [sync] table.
    assert!(
        err.lines()
            .filter(|l| l.starts_with("encryptd.toml:"))
            .count()
            >= 7,
        "{err}"
    );
}

#[test]
fn sync_secrets_must_be_private() {
    let f = Fixture::new();
    for (file, text) in [
        ("ca.pem", "x"),
        ("node.pem", "x"),
        ("node.key", "x"),
        ("pw", "secret\n"),
    ] {
        std::fs::write(f.dir.join(file), text).unwrap();
    }
    f.chmod("node.key", 0o600);
    f.chmod("pw", 0o644);
    f.append(
        "encryptd.toml",
        "\n[sync]\nendpoints = [\"https://10.0.0.9:2379\"]\nprefix = \"/encryptd/prod\"\naddresses = [\"10.0.0.1\"]\nca = \"ca.pem\"\ncert = \"node.pem\"\nkey = \"node.key\"\nuser = \"n1\"\npassword_file = \"pw\"\n",
    );
    let (code, _, err) = f.check(&[]);
    assert_eq!(code, 1, "{err}");
    // The CA file holds no certificate: named first, before any secret is read.
    assert!(
        err.contains("ca.pem: no certificate in the CA file"),
        "{err}"
    );
    let ca = "-----BEGIN CERTIFICATE-----\nMIIBeTCCAR+gAwIBAgIUQ2Vy\n-----END CERTIFICATE-----\n";
    std::fs::write(f.dir.join("ca.pem"), ca).unwrap();
    std::fs::write(f.dir.join("node.pem"), ca).unwrap();
    std::fs::write(
        f.dir.join("node.key"),
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIK+Nq6ZmvXC8mB3DkR4cIGbnfhXoJ1q0xqkdZ8aIqDGx\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let (code, _, err) = f.check(&[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("etcd password file is accessible by group or others (mode 0644)"),
        "{err}"
    );
    f.chmod("pw", 0o600);
    let (code, out, err) = f.check(&[]);
    assert_eq!((code, err.as_str()), (0, ""), "{out}");
}
