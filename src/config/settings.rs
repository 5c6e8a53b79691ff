//! `encryptd.toml`: mode, this node's name, paths, strict mode and tunables.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::diag::{Diags, Source};
use super::doc::{At, Table, parse};
use crate::net::Cidr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Ipsec,
    Wireguard,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Ipsec => "ipsec",
            Mode::Wireguard => "wireguard",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipsec {
    pub keys: PathBuf,
    pub key_rotation_duration: Duration,
    pub replay_window: u32,
    pub hello_port: u16,
    /// No SA lives longer, or carries more packets: it is re-keyed before (see
    /// `ipsec::plan::lifetime`).
    pub sa_lifetime: Duration,
    pub sa_packets: u64,
    /// How often the kernel's SAs and policies are read in full whatever its
    /// notifications said (they say when to read at all).
    pub resync_interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wireguard {
    pub interface: String,
    pub listen_port: u16,
    pub private_key: PathBuf,
    /// The cluster preshared key file, from which each pair's preshared key is derived.
    pub preshared_key: Option<PathBuf>,
    /// A userspace WireGuard (wireguard-go, boringtun) to run when the kernel has none.
    pub userspace: Option<PathBuf>,
    /// Where `userspace` was written, for [`on_this_machine`]'s message.
    pub userspace_span: Option<std::ops::Range<usize>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// Traffic that strict mode lets through in plaintext (management, such as SSH).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Exception {
    pub proto: Proto,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Strict {
    pub enabled: bool,
    /// Leave the rules in place when the daemon stops (fail closed); `teardown` removes them.
    pub keep_on_stop: bool,
    pub cidrs: Vec<Cidr>,
    pub ingress: bool,
    pub allow_remote_node_identities: bool,
    pub exceptions: Vec<Exception>,
}

/// The validated `encryptd.toml`. Relative paths are resolved against its directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub mode: Mode,
    pub node: String,
    /// Where `node` was written, for messages about it (`None`: taken from the hostname).
    pub node_span: Option<std::ops::Range<usize>>,
    pub inventory: PathBuf,
    pub runtime_dir: PathBuf,
    /// Persistent state (the strict rules kept for the next boot).
    pub state_dir: PathBuf,
    pub boot_id_path: PathBuf,
    pub ipsec: Ipsec,
    pub wireguard: Wireguard,
    pub strict: Strict,
    /// node_exporter textfile to keep current (`None`: no metrics).
    pub metrics_path: Option<PathBuf>,
    /// Series per peer besides the per-node aggregates: 3 per peer, which at 500
    /// nodes is 1,500 series on every node (500² fleet-wide); a large fleet turns it off.
    pub metrics_per_peer: bool,
    /// Spans of `strict.cidrs` entries, parallel to `strict.cidrs`.
    pub strict_cidr_spans: Vec<std::ops::Range<usize>>,
    /// `[sync]`: what `encryptd sync` registers and where (`None`: no such table).
    pub sync: Option<Sync>,
}

/// `[sync]`: the etcd cluster `encryptd sync` registers this node in and renders the
/// inventory from, and this node's entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sync {
    /// `https://host:port` (or `http://` with `plaintext = true`), tried in turn.
    pub endpoints: Vec<String>,
    /// Registrations live under `<prefix>/nodes/<name>`.
    pub prefix: String,
    pub addresses: Vec<std::net::IpAddr>,
    pub subnets: Vec<Cidr>,
    /// CA that signed the etcd members' certificates.
    pub ca: Option<PathBuf>,
    /// This node's client certificate and key (TLS client authentication).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The etcd user this node writes as (RBAC: its own key only), and its password file.
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    pub plaintext: bool,
}

pub const DEFAULT_CONFIG: &str = "/etc/encryptd/encryptd.toml";

/// Parse a duration such as `300ms`, `30s`, `5m`, `1h`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let ms = match unit {
        "ms" => n,
        "s" => n.checked_mul(1000)?,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(ms))
}

/// The second phase's look at this machine, for what the text alone cannot say: the
/// hostname when `node` is not set, and that `userspace` names a file (`None` then, with
/// the error at the line that names it).
pub fn on_this_machine(s: &mut Settings, src: &Source, diags: &Diags) {
    if s.node_span.is_none() {
        s.node = hostname();
    }
    let w = &mut s.wireguard;
    if let Some(p) = &w.userspace
        && !p.is_file()
    {
        let message = format!(
            "`userspace` {} is not a file (a userspace WireGuard such as /usr/bin/wireguard-go, package wireguard-go)",
            p.display()
        );
        diags.push(src.diag(w.userspace_span.clone().unwrap_or(0..0), message));
        w.userspace = None;
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn port(t: &Table, key: &'static str, default: u16) -> u16 {
    t.integer(key, 1..65536).map_or(default, |n| n.value as u16)
}

/// Read `encryptd.toml`. Problems go to `diags`; the result is meaningful only if none were added.
pub fn read(src: &Source, diags: &Diags) -> Settings {
    let doc = parse(src, diags);
    let base = src.path.parent().unwrap_or(Path::new("/"));
    let top = Table::new(src, diags, &doc, "the top level");
    let path = |t: &Table, key: &'static str, default: &str| path(t, base, key, default);

    let mode = match top.required_string("mode") {
        Some(At { value, span }) => match value.as_str() {
            "ipsec" => Mode::Ipsec,
            "wireguard" => Mode::Wireguard,
            other => {
                top.error(
                    span,
                    format!("`mode` must be \"ipsec\" or \"wireguard\", not \"{other}\""),
                );
                Mode::Ipsec
            }
        },
        None => Mode::Ipsec,
    };
    let (node, node_span) = match top.string("node") {
        Some(At { value, span }) if value.is_empty() => {
            top.error(
                span.clone(),
                "`node` must not be empty (omit it to use the hostname)",
            );
            (value, Some(span))
        }
        Some(At { value, span }) => (value, Some(span)),
        // The hostname, filled in by `on_this_machine`: this phase reads only the text.
        None => (String::new(), None),
    };
    let inventory = path(&top, "inventory", "nodes.toml");
    let runtime_dir = path(&top, "runtime_dir", "/run/encryptd");
    let state_dir = path(&top, "state_dir", "/var/lib/encryptd");
    let boot_id_path = path(&top, "boot_id_path", "/proc/sys/kernel/random/boot_id");

    let empty = toml::Spanned::new(0..0, toml::de::DeTable::new());
    let sub = |key: &'static str| {
        top.table(key)
            .unwrap_or_else(|| Table::new(src, diags, &empty, format!("[{key}]")))
    };

    let ipsec = read_ipsec(&sub("ipsec"), base);
    let wireguard = read_wireguard(&sub("wireguard"), base);
    let (strict, strict_cidr_spans) = read_strict(&sub("strict"));
    let t = sub("metrics");
    let metrics_path = t
        .string("path")
        .filter(|v| !v.value.is_empty())
        .map(|v| resolve(base, &v.value));
    let metrics_per_peer = t.boolean("per_peer").unwrap_or(true);
    t.finish();
    let sync = top.table("sync").map(|t| read_sync(&t, base));
    top.finish();

    Settings {
        mode,
        node,
        node_span,
        inventory,
        runtime_dir,
        state_dir,
        boot_id_path,
        ipsec,
        wireguard,
        strict,
        metrics_path,
        metrics_per_peer,
        strict_cidr_spans,
        sync,
    }
}

fn read_sync(t: &Table, base: &Path) -> Sync {
    let plaintext = t.boolean("plaintext").unwrap_or(false);
    let mut endpoints = Vec::new();
    match t.strings("endpoints") {
        None if t.has_key("endpoints") => {}
        None => t.missing("endpoints"),
        Some(v) if v.is_empty() => t.error(t.span(), "`endpoints` lists no etcd endpoint"),
        Some(v) => {
            for At { value, span } in v {
                let rest = value
                    .strip_prefix("https://")
                    .or_else(|| value.strip_prefix("http://"));
                let authority = rest.map(|r| r.trim_end_matches('/'));
                match authority {
                    Some(a) if !a.is_empty() && !a.contains('/') && a.contains(':') => {
                        if value.starts_with("http://") && !plaintext {
                            t.error(
                                span,
                                format!(
                                    "endpoint \"{value}\" is plaintext HTTP: use https://, or set `plaintext = true` to send registrations unencrypted and unauthenticated"
                                ),
                            );
                        } else {
                            endpoints.push(value.trim_end_matches('/').to_string());
                        }
                    }
                    _ => t.error(
                        span,
                        format!(
                            "endpoint \"{value}\" is not a URL such as \"https://10.0.0.1:2379\" (scheme, host and port, no path)"
                        ),
                    ),
                }
            }
        }
    }
    let prefix = match t.required_string("prefix") {
        Some(At { value, span }) => {
            if !value.starts_with('/') || value.ends_with('/') || value.len() < 2 {
                t.error(
                    span,
                    format!(
                        "`prefix` \"{value}\" must start with '/' and not end with one, such as \"/encryptd/prod\""
                    ),
                );
            }
            value
        }
        None => String::new(),
    };
    let mut addresses = Vec::new();
    match t.strings("addresses") {
        None if t.has_key("addresses") => {}
        None => t.missing("addresses"),
        Some(v) if v.is_empty() => t.error(t.span(), "`addresses` lists no address of this node"),
        Some(v) => {
            for At { value, span } in v {
                match value.parse::<std::net::IpAddr>() {
                    Ok(ip) if !(ip.is_unspecified() || ip.is_loopback() || ip.is_multicast()) => {
                        addresses.push(ip)
                    }
                    _ => t.error(
                        span,
                        format!(
                            "\"{value}\" is not a node address (an IPv4 or IPv6 address, not unspecified, loopback or multicast)"
                        ),
                    ),
                }
            }
        }
    }
    let mut subnets = Vec::new();
    for At { value, span } in t.strings("subnets").unwrap_or_default() {
        match value.parse::<Cidr>() {
            Ok(c) => subnets.push(c),
            Err(e) => t.error(span, format!("subnet: {e}")),
        }
    }
    let opt_path = |key: &'static str| {
        t.string(key)
            .filter(|v| !v.value.is_empty())
            .map(|v| resolve(base, &v.value))
    };
    let (ca, cert, key) = (opt_path("ca"), opt_path("cert"), opt_path("key"));
    let user = t
        .string("user")
        .filter(|v| !v.value.is_empty())
        .map(|v| v.value);
    let password_file = opt_path("password_file");
    let tls = endpoints.iter().any(|e| e.starts_with("https://"));
    if tls && ca.is_none() {
        t.error(
            t.span(),
            "`ca` is required with https:// endpoints: the CA that signed the etcd members' certificates",
        );
    }
    if cert.is_some() != key.is_some() {
        t.error(
            t.span(),
            "`cert` and `key` go together: the client certificate and its private key",
        );
    }
    if user.is_some() != password_file.is_some() {
        t.error(
            t.span(),
            "`user` and `password_file` go together: the etcd user this node writes as, and its password",
        );
    }
    t.finish();
    Sync {
        endpoints,
        prefix,
        addresses,
        subnets,
        ca,
        cert,
        key,
        user,
        password_file,
        plaintext,
    }
}

/// A path setting, relative to the file's directory; `default` when absent.
fn path(t: &Table, base: &Path, key: &'static str, default: &str) -> PathBuf {
    match t.string(key) {
        Some(At { value, span }) if value.is_empty() => {
            t.error(span, format!("`{key}` must not be empty"));
            PathBuf::new()
        }
        Some(v) => resolve(base, &v.value),
        None => resolve(base, default),
    }
}

/// SA limits unless set: a day, and 2^32 less a margin (about 2^26 packets, minutes
/// at line rate, to re-key in).
pub const DEFAULT_SA_LIFETIME: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_RESYNC_INTERVAL: Duration = Duration::from_secs(300);
const MIN_RESYNC_INTERVAL: Duration = Duration::from_secs(10);
const MAX_RESYNC_INTERVAL: Duration = Duration::from_secs(3600);
pub const DEFAULT_SA_PACKETS: u64 = (1 << 32) - (1 << 26);
/// Shorter would re-key faster than a hello round trip can be relied on.
const MIN_SA_LIFETIME: Duration = Duration::from_secs(10);

fn read_ipsec(t: &Table, base: &Path) -> Ipsec {
    let ipsec = Ipsec {
        keys: path(t, base, "keys", "ipsec.keys"),
        key_rotation_duration: match t.string("key_rotation_duration") {
            None => Duration::from_secs(300),
            Some(At { value, span }) => parse_duration(&value).unwrap_or_else(|| {
                t.error(
                    span,
                    format!(
                        "`key_rotation_duration` \"{value}\" is not a duration such as \"30s\", \"5m\" or \"1h\""
                    ),
                );
                Duration::from_secs(300)
            }),
        },
        // 4096 is the kernel's limit for the ESN replay bitmap.
        replay_window: t
            .integer("replay_window", 1..4097)
            .map_or(4096, |n| n.value as u32),
        hello_port: port(t, "hello_port", 4510),
        sa_lifetime: match t.string("sa_lifetime") {
            None => DEFAULT_SA_LIFETIME,
            Some(At { value, span }) => match parse_duration(&value) {
                Some(d) if d >= MIN_SA_LIFETIME => d,
                _ => {
                    t.error(
                        span,
                        format!(
                            "`sa_lifetime` \"{value}\" is not a duration of at least 10s, such as \"8h\" or \"24h\""
                        ),
                    );
                    DEFAULT_SA_LIFETIME
                }
            },
        },
        // Below 2^32: a sender without ESN would run out of sequence numbers there.
        sa_packets: t
            .integer("sa_packets", 100..(1 << 32))
            .map_or(DEFAULT_SA_PACKETS, |n| n.value as u64),
        resync_interval: match t.string("resync_interval") {
            None => DEFAULT_RESYNC_INTERVAL,
            Some(At { value, span }) => match parse_duration(&value) {
                Some(d) if (MIN_RESYNC_INTERVAL..=MAX_RESYNC_INTERVAL).contains(&d) => d,
                _ => {
                    t.error(
                        span,
                        format!(
                            "`resync_interval` \"{value}\" is not a duration from 10s to 1h, such as \"5m\""
                        ),
                    );
                    DEFAULT_RESYNC_INTERVAL
                }
            },
        },
    };
    // It once claimed to name "the link whose traffic is encrypted", which nothing read:
    // XFRM encrypts by policy whatever link a packet takes, and decrypts on whichever link
    // ESP arrives. An empty value (the old default) still loads, so that configs written
    // for earlier versions keep working; a name is refused rather than silently ignored.
    if let Some(At { value, span }) = t.string("interface")
        && !value.is_empty()
    {
        t.error(
            span,
            format!(
                "`[ipsec] interface` is no longer a setting (\"{value}\" was never used): IPsec encrypts by policy whatever link a packet leaves by and decrypts on whichever link ESP arrives; remove this line"
            ),
        );
    }
    t.finish();
    ipsec
}

fn read_wireguard(t: &Table, base: &Path) -> Wireguard {
    let userspace = t.string("userspace").filter(|v| !v.value.is_empty());
    let wireguard = Wireguard {
        interface: match t.string("interface") {
            Some(At { value, span }) if !is_interface_name(&value) => {
                t.error(span, INTERFACE_NAME_RULE);
                value
            }
            Some(v) => v.value,
            None => "encryptd0".into(),
        },
        listen_port: port(t, "listen_port", 51871),
        private_key: path(t, base, "private_key", "/var/lib/encryptd/wireguard.key"),
        // Absent or empty: no preshared keys (an empty string lets a template switch it off).
        preshared_key: t
            .string("preshared_key")
            .filter(|v| !v.value.is_empty())
            .map(|v| resolve(base, &v.value)),
        userspace: userspace.as_ref().map(|v| resolve(base, &v.value)),
        userspace_span: userspace.map(|v| v.span),
    };
    t.finish();
    wireguard
}

/// `[strict]`, and where each protected range was written (for `cross_check`).
fn read_strict(t: &Table) -> (Strict, Vec<std::ops::Range<usize>>) {
    let mut cidrs = Vec::new();
    let mut strict_cidr_spans = Vec::new();
    for At { value, span } in t.strings("cidrs").unwrap_or_default() {
        match value.parse::<Cidr>() {
            Ok(c) => {
                cidrs.push(c);
                strict_cidr_spans.push(span);
            }
            Err(e) => t.error(span, format!("strict.cidrs: {e}")),
        }
    }
    let mut exceptions = Vec::new();
    for e in t.tables("exceptions") {
        let proto = match e.required_string("proto") {
            Some(At { value, span }) => match value.as_str() {
                "tcp" => Some(Proto::Tcp),
                "udp" => Some(Proto::Udp),
                other => {
                    e.error(
                        span,
                        format!("`proto` must be \"tcp\" or \"udp\", not \"{other}\""),
                    );
                    None
                }
            },
            None => None,
        };
        let port = e.integer("port", 1..65536);
        if port.is_none() && !diags_has_port_error(&e) {
            e.missing("port");
        }
        if let (Some(proto), Some(port)) = (proto, port) {
            exceptions.push(Exception {
                proto,
                port: port.value as u16,
            });
        }
        e.finish();
    }
    let strict = Strict {
        enabled: t.boolean("enabled").unwrap_or(false),
        keep_on_stop: t.boolean("keep_on_stop").unwrap_or(true),
        cidrs,
        ingress: t.boolean("ingress").unwrap_or(true),
        allow_remote_node_identities: t.boolean("allow_remote_node_identities").unwrap_or(false),
        exceptions,
    };
    if strict.enabled && strict.cidrs.is_empty() {
        t.error(
            t.span(),
            "strict mode is enabled but `cidrs` lists no protected range",
        );
    }
    t.finish();
    (strict, strict_cidr_spans)
}

/// Settings from TOML text alone (tests, benchmarks): the same defaults and checks as
/// the file, without the cross-file checks of `config::load`.
pub fn parse_str(path: &Path, text: &str) -> Result<Settings, Vec<super::Diagnostic>> {
    let diags = Diags::default();
    let src = Source::new(path, text);
    let mut s = read(&src, &diags);
    on_this_machine(&mut s, &src, &diags);
    if diags.is_empty() {
        Ok(s)
    } else {
        Err(diags.into_sorted())
    }
}

/// `port` was present but bad (already reported) rather than absent.
fn diags_has_port_error(t: &Table) -> bool {
    t.has_key("port")
}

const INTERFACE_NAME_RULE: &str = "`interface` must be a Linux interface name: 1 to 15 of the characters A-Z a-z 0-9 - _ . (not \".\" or \"..\")";

/// A name the kernel takes for an interface, restricted to the characters that need no
/// quoting anywhere it is written (nft rules, `ip` commands, file names).
pub fn is_interface_name(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("m"), None);
        assert_eq!(parse_duration("5 m"), None);
    }
}
