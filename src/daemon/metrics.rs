//! The node_exporter textfile the daemon keeps current (`[metrics] path`): the status
//! snapshot and the kernel's counters, every metric documented in docs/metrics.md.

use std::path::Path;

use crate::cli::status::{PeerStatus, Snapshot};

/// What the metrics file adds from the kernel to the snapshot.
#[derive(Debug, Default)]
pub struct KernelCounters {
    /// Every counter of `/proc/net/xfrm_stat`, zeros included.
    pub xfrm_stat: Vec<(String, u64)>,
    /// Strict mode's drop rules: (`chain/comment`, packets), one entry per rule (the
    /// IPv4 and IPv6 rules of one comment are summed here).
    pub strict_drops: Vec<(String, u64)>,
}

/// The snapshot and the kernel's counters in the node_exporter textfile format.
/// Long on purpose: one metric family after another, in the file's order, each with
/// its HELP and TYPE next to the values (docs/metrics.md follows the same order).
/// Every labelled family carries all its labels from the start (0 until something
/// happens), so that `rate()` and `increase()` have a baseline.
pub fn metrics(s: &Snapshot, k: &KernelCounters, per_peer: bool) -> String {
    let mut m = String::new();
    let mut metric = |name: &str, help: &str, ty: &str, samples: &[(String, u64)]| {
        m += &format!("# HELP encryptd_{name} {help}\n# TYPE encryptd_{name} {ty}\n");
        for (labels, v) in samples {
            m += &format!("encryptd_{name}{labels} {v}\n");
        }
    };
    let one = |v: u64| [(String::new(), v)];
    let ipsec = s.mode == "ipsec";
    metric(
        "build_info",
        "The running daemon's version and mode (always 1).",
        "gauge",
        &[(
            format!(
                "{{version=\"{}\",commit=\"{}\",mode=\"{}\"}}",
                label(&s.version),
                label(crate::COMMIT),
                label(&s.mode)
            ),
            1,
        )],
    );
    metric(
        "last_update_timestamp_seconds",
        "When the daemon wrote this file (it rewrites it every 10 s): older means the daemon stopped.",
        "gauge",
        &one(s.written),
    );
    metric(
        "peers",
        "Inventoried peers.",
        "gauge",
        &one(s.peers.len() as u64),
    );
    let up = s.peers.iter().filter(|p| p.state == "up").count() as u64;
    metric(
        "peers_up",
        "Peers with working SAs or handshakes.",
        "gauge",
        &one(up),
    );
    let by_state: Vec<(String, u64)> = ["up", "waiting", "stale"]
        .iter()
        .map(|st| {
            let n = s.peers.iter().filter(|p| p.state == *st).count() as u64;
            (format!("{{state=\"{st}\"}}"), n)
        })
        .collect();
    metric("peers_by_state", "Peers by state.", "gauge", &by_state);
    // Counters although an IPsec rotation starts each SA's count again: Prometheus
    // counters may reset, and rate() reads a drop as a reset.
    let (rx, tx) = s
        .peers
        .iter()
        .fold((0u64, 0u64), |(r, t), p| (r + p.rx_bytes, t + p.tx_bytes));
    metric(
        "receive_bytes_total",
        "Bytes received from all peers (IPsec: through the current SAs).",
        "counter",
        &one(rx),
    );
    metric(
        "transmit_bytes_total",
        "Bytes sent to all peers (IPsec: through the current SAs).",
        "counter",
        &one(tx),
    );
    if per_peer {
        let per = |f: fn(&PeerStatus) -> u64| -> Vec<(String, u64)> {
            s.peers
                .iter()
                .map(|p| (format!("{{peer=\"{}\"}}", label(&p.name)), f(p)))
                .collect()
        };
        metric(
            "peer_up",
            "1 when the peer is up.",
            "gauge",
            &per(|p| u64::from(p.state == "up")),
        );
        metric(
            "peer_receive_bytes_total",
            "Bytes received from the peer (IPsec: through the current SAs).",
            "counter",
            &per(|p| p.rx_bytes),
        );
        metric(
            "peer_transmit_bytes_total",
            "Bytes sent to the peer (IPsec: through the current SAs).",
            "counter",
            &per(|p| p.tx_bytes),
        );
    }
    if ipsec {
        if let Some(id) = s.current_key_id {
            metric(
                "key_id",
                "Current IPsec key-id.",
                "gauge",
                &one(u64::from(id)),
            );
        }
        metric(
            "keys_in_use",
            "encryptd's XFRM states (SAs): 2 per peer and family, 4 during a rotation.",
            "gauge",
            &one(s.keys_in_use),
        );
        metric(
            "sa_rekeys_total",
            "SAs re-keyed at their soft limit (sa_lifetime, sa_packets) since the daemon started.",
            "counter",
            &one(s.sa_rekeys),
        );
        metric(
            "xfrm_dumps_total",
            "Dumps of the kernel's XFRM policies or states since the daemon started (notifications say when; resync_interval bounds the wait).",
            "counter",
            &one(s.xfrm_dumps),
        );
        metric(
            "rtnl_dumps_total",
            "WireGuard: reads of the links, addresses, routes and rules since the daemon started (rtnetlink's notifications say when; every 5 min regardless).",
            "counter",
            &one(s.rtnl_dumps),
        );
        metric(
            "sequence_number_max",
            "Highest ESP sequence number sent on any SA (the limit is 2^64 - 1, ESN).",
            "gauge",
            &one(s.max_seq),
        );
    }
    metric(
        "strict_enabled",
        "1 when strict mode is on in the configuration.",
        "gauge",
        &one(u64::from(s.strict)),
    );
    metric(
        "strict_table_present",
        "1 when the daemon's last check found table inet encryptd in the kernel.",
        "gauge",
        &one(u64::from(s.strict_in_kernel)),
    );
    metric(
        "strict_reinstalls_total",
        "Times the strict table was found removed or changed by another program and put back.",
        "counter",
        &one(s.strict_reinstalls),
    );
    let drops: Vec<(String, u64)> = k
        .strict_drops
        .iter()
        .map(|(rule, v)| (format!("{{rule=\"{}\"}}", label(rule)), *v))
        .collect();
    metric(
        "strict_dropped_packets_total",
        "Packets strict mode dropped, by rule (chain/comment; docs/strict.md); restarts when the table is replaced.",
        "counter",
        &drops,
    );
    metric(
        "config_refused",
        "1 while the newest configuration files are refused (the daemon runs on the last good ones).",
        "gauge",
        &one(u64::from(s.config_refused.is_some())),
    );
    if ipsec {
        metric(
            "hello_received_total",
            "Hello datagrams received.",
            "counter",
            &one(s.hello_received),
        );
        metric(
            "hello_accepted_total",
            "Hello datagrams accepted (authentic, fresh, from a peer's own address).",
            "counter",
            &one(s.hello_accepted),
        );
        metric(
            "hello_socket_overflows_total",
            "Hellos the kernel dropped at the daemon's full socket buffer (a flood).",
            "counter",
            &one(s.hello_socket_overflows),
        );
        metric(
            "hello_duplicates_total",
            "Second copies of accepted hellos over the pair's other address family.",
            "counter",
            &one(s.hello_duplicates),
        );
        let drops: Vec<(String, u64)> = crate::ipsec::drops::DROP_REASONS
            .iter()
            .map(|r| {
                let v = s.hello_dropped.get(*r).copied().unwrap_or(0);
                (format!("{{reason=\"{r}\"}}"), v)
            })
            .collect();
        metric(
            "hello_dropped_total",
            "Hello datagrams dropped, by reason.",
            "counter",
            &drops,
        );
    }
    let x: Vec<(String, u64)> = k
        .xfrm_stat
        .iter()
        .map(|(c, v)| (format!("{{counter=\"{}\"}}", label(c)), *v))
        .collect();
    metric(
        "xfrm_errors_total",
        "The kernel's /proc/net/xfrm_stat counters, every one (docs/status.md has their meaning).",
        "counter",
        &x,
    );
    m
}

/// A label value as the text format wants it: backslash, quote and newline escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The strict table's drop counters by rule, IPv4 and IPv6 of one comment summed (two
/// samples with the same labels would make node_exporter refuse the whole file).
pub fn strict_drop_totals(counters: &[crate::kernel::nft::RuleCounter]) -> Vec<(String, u64)> {
    let mut by: std::collections::BTreeMap<String, u64> = Default::default();
    for c in counters {
        if let Some(comment) = &c.comment {
            *by.entry(format!("{}/{comment}", c.chain)).or_default() += c.packets;
        }
    }
    by.into_iter().collect()
}

/// Write the metrics file whole (node_exporter must never read half a file) and
/// readable by node_exporter's unprivileged user.
pub fn write_metrics(path: &Path, text: &str) -> std::io::Result<()> {
    crate::files::replace_readable(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::status::tests::{peer, snapshot};

    #[test]
    fn metrics_text_format() {
        let mut b = peer("b", "up");
        (b.rx_bytes, b.tx_bytes) = (1500, 900);
        let s = Snapshot {
            current_key_id: Some(3),
            hello_dropped: [("bad_mac".to_string(), 4)].into_iter().collect(),
            strict: true,
            keys_in_use: 8,
            max_seq: 77,
            ..snapshot(vec![b, peer("c", "waiting")])
        };
        let k = KernelCounters {
            xfrm_stat: vec![("XfrmInError".into(), 0), ("XfrmOutNoStates".into(), 7)],
            strict_drops: strict_drop_totals(&[
                crate::kernel::nft::RuleCounter {
                    chain: "output".into(),
                    comment: Some("egress".into()),
                    packets: 2,
                    bytes: 0,
                },
                crate::kernel::nft::RuleCounter {
                    chain: "output".into(),
                    comment: Some("egress".into()),
                    packets: 3,
                    bytes: 0,
                },
            ]),
        };
        let m = metrics(&s, &k, true);
        for line in [
            &format!(
                "encryptd_build_info{{version=\"0.1.0\",commit=\"{}\",mode=\"ipsec\"}} 1",
                crate::COMMIT
            ),
            "encryptd_last_update_timestamp_seconds 1700000000",
            "# TYPE encryptd_peers_up gauge",
            "encryptd_peers_up 1",
            "encryptd_peers 2",
            "encryptd_peers_by_state{state=\"waiting\"} 1",
            "encryptd_peers_by_state{state=\"stale\"} 0",
            "encryptd_receive_bytes_total 1500",
            "encryptd_peer_up{peer=\"b\"} 1",
            "encryptd_peer_up{peer=\"c\"} 0",
            "# TYPE encryptd_peer_receive_bytes_total counter",
            "encryptd_peer_receive_bytes_total{peer=\"b\"} 1500",
            "encryptd_peer_transmit_bytes_total{peer=\"b\"} 900",
            "encryptd_key_id 3",
            "encryptd_keys_in_use 8",
            "encryptd_sequence_number_max 77",
            "encryptd_strict_enabled 1",
            "encryptd_strict_table_present 0",
            "encryptd_strict_dropped_packets_total{rule=\"output/egress\"} 5",
            "encryptd_hello_dropped_total{reason=\"bad_mac\"} 4",
            // Every reason from the start, at 0.
            "encryptd_hello_dropped_total{reason=\"replayed\"} 0",
            "encryptd_xfrm_errors_total{counter=\"XfrmInError\"} 0",
            "encryptd_xfrm_errors_total{counter=\"XfrmOutNoStates\"} 7",
        ] {
            assert!(m.lines().any(|l| l == line), "missing {line:?} in\n{m}");
        }
        // One sample per label set: node_exporter refuses a file with duplicates.
        let samples: Vec<&str> = m
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.rsplit_once(' ').unwrap().0)
            .collect();
        let unique: std::collections::BTreeSet<&&str> = samples.iter().collect();
        assert_eq!(unique.len(), samples.len(), "{m}");
        // No gauge named like a counter, no counter without _total.
        for l in m.lines().filter(|l| l.starts_with("# TYPE")) {
            let (name, ty) = l[7..].split_once(' ').unwrap();
            assert_eq!(name.ends_with("_total"), ty == "counter", "{l}");
        }
    }

    #[test]
    fn per_peer_series_are_optional_and_aggregates_stay() {
        let s = snapshot(vec![peer("b", "up")]);
        let m = metrics(&s, &KernelCounters::default(), false);
        assert!(!m.contains("peer=\""), "{m}");
        assert!(m.lines().any(|l| l == "encryptd_peers_up 1"), "{m}");
        assert!(
            m.lines().any(|l| l == "encryptd_receive_bytes_total 0"),
            "{m}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
