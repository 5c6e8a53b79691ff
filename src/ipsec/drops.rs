//! What the hello socket lets through, and what it drops and why. Pure: the engine reads
//! the datagram and counts; [`admit`] decides, from the configuration alone, whether a
//! datagram is an authentic hello from a peer for this node, before any per-peer state
//! is touched, so that nothing an outsider sends costs more than a parse and the MACs.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use zeroize::Zeroizing;

use crate::config::Config;
use crate::ipsec::derive;
use crate::ipsec::hello::{self, DropReason, Hello};

/// Counters of what the hello socket received, accepted and dropped, by reason.
#[derive(Debug, Default, Clone)]
pub struct HelloStats {
    pub received: u64,
    pub accepted: u64,
    /// Second copies of accepted hellos (one per extra family): normal, not drops.
    pub duplicates: u64,
    pub dropped: BTreeMap<&'static str, u64>,
}

/// Every reason a hello is dropped for, as the metrics and `status` name them: the
/// metrics file carries each from the start, at 0, so that a rate has a baseline.
pub const DROP_REASONS: [&str; 9] = [
    "bad_mac",
    "malformed",
    "not_a_hello",
    "oversized",
    "replayed",
    "truncated",
    "unknown_sender",
    "wrong_receiver",
    "wrong_source",
];

impl HelloStats {
    pub fn drop(&mut self, why: &'static str) {
        debug_assert!(DROP_REASONS.contains(&why), "{why} is not in DROP_REASONS");
        *self.dropped.entry(why).or_default() += 1;
    }
}

/// The hello keys of a (sender, receiver) pair, one per key-id this node holds.
pub fn hello_keys(cfg: &Config, sender: &str, receiver: &str) -> Vec<(u8, Zeroizing<Vec<u8>>)> {
    cfg.keys
        .iter()
        .flat_map(|k| k.entries.iter())
        .map(|e| (e.id, derive::hello_key(e, sender, receiver)))
        .collect()
}

/// Key-id and key, as `Hello::encode` and `verify` take them.
pub type KeyRefs<'a> = Vec<(u8, &'a [u8])>;

/// Every peer's hello keys, both ways, derived once per configuration: a hello costs a
/// hash lookup and one MAC, not an HKDF per key line (a flood of authentic-looking
/// datagrams would otherwise buy the attacker a key derivation each).
#[derive(Default)]
pub struct HelloKeys {
    by_peer: HashMap<String, PairKeys>,
}

struct PairKeys {
    /// Peer to us (what we verify), us to peer (what we seal).
    rx: Vec<(u8, Zeroizing<Vec<u8>>)>,
    tx: Vec<(u8, Zeroizing<Vec<u8>>)>,
}

impl HelloKeys {
    pub fn new(cfg: &Config) -> HelloKeys {
        let me = &cfg.settings.node;
        let by_peer = cfg
            .inventory
            .peers(me)
            .map(|n| {
                let keys = PairKeys {
                    rx: hello_keys(cfg, &n.name, me),
                    tx: hello_keys(cfg, me, &n.name),
                };
                (n.name.clone(), keys)
            })
            .collect();
        HelloKeys { by_peer }
    }

    /// The keys hellos from `peer` are verified with (`None`: not a peer).
    pub fn rx(&self, peer: &str) -> Option<KeyRefs<'_>> {
        self.by_peer.get(peer).map(|k| refs(&k.rx))
    }

    /// The keys hellos to `peer` are sealed with.
    pub fn tx(&self, peer: &str) -> Option<KeyRefs<'_>> {
        self.by_peer.get(peer).map(|k| refs(&k.tx))
    }
}

fn refs(keys: &[(u8, Zeroizing<Vec<u8>>)]) -> KeyRefs<'_> {
    keys.iter().map(|(i, k)| (*i, k.as_slice())).collect()
}

/// Datagrams the kernel dropped because a socket bound to `port` had a full receive
/// buffer (a flood faster than the daemon reads), summed from `/proc/net/udp` or `udp6`
/// text (the last column, `drops`).
pub fn socket_overflows(proc_net_udp: &str, port: u16) -> u64 {
    proc_net_udp
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = f.get(1)?.rsplit_once(':')?.1;
            (u16::from_str_radix(local_port, 16).ok()? == port)
                .then(|| f.last()?.parse::<u64>().ok())
                .flatten()
        })
        .sum()
}

/// The hello in `bytes` from `from`, if it is one a peer of this node sent to this node
/// from one of its own addresses, under a key this node holds. Else the drop reason, as
/// the metrics and the log name it.
pub fn admit(
    cfg: &Config,
    keys: &HelloKeys,
    bytes: &[u8],
    from: IpAddr,
) -> Result<Hello, &'static str> {
    let me = cfg.me();
    let u = hello::parse(bytes).map_err(|d| match d {
        DropReason::Oversized => "oversized",
        DropReason::Truncated => "truncated",
        DropReason::NotAHello => "not_a_hello",
        DropReason::Malformed => "malformed",
        DropReason::BadMac => "bad_mac",
    })?;
    if u.hello.receiver != me.name {
        return Err("wrong_receiver");
    }
    let sender = &u.hello.sender;
    let (Some(node), Some(refs)) = (
        cfg.inventory.node(sender).filter(|n| n.name != me.name),
        keys.rx(sender),
    ) else {
        return Err("unknown_sender");
    };
    if !node.addresses.contains(&from) {
        return Err("wrong_source");
    }
    u.verify(&refs).map_err(|_| "bad_mac")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipsec::plan::tests::{config, node};

    fn hello(sender: &str, receiver: &str) -> Hello {
        Hello {
            sender: sender.into(),
            receiver: receiver.into(),
            boot: [1; 16],
            nonce: [2; 16],
            seq: 1,
            echo_boot: [0; 16],
            echo_nonce: [0; 16],
            key_ids: 1 << 1,
            offers: Vec::new(),
            outbound: Vec::new(),
        }
    }

    fn sealed(cfg: &Config, h: &Hello) -> Vec<u8> {
        let keys = hello_keys(cfg, &h.sender, &h.receiver);
        let refs: Vec<(u8, &[u8])> = keys.iter().map(|(i, k)| (*i, k.as_slice())).collect();
        h.encode(&refs)
    }

    #[test]
    fn socket_overflows_are_the_drops_of_the_hello_port_only() {
        let udp = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
            \x20 1: 00000000:119E 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1111 2 0000000000000000 17\n\
            \x20 2: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 2222 2 0000000000000000 900\n";
        assert_eq!(socket_overflows(udp, 4510), 17);
        let udp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
            \x20 3: 00000000000000000000000000000000:119E 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 3333 2 0000000000000000 5\n";
        assert_eq!(socket_overflows(udp6, 4510), 5);
        assert_eq!(socket_overflows("", 4510), 0);
    }

    #[test]
    fn only_a_peers_authentic_hello_from_its_own_address_gets_in() {
        // The test config's node is "a".
        let cfg = config(vec![
            node("a", &["10.0.0.1"], &[]),
            node("b", &["10.0.0.2"], &[]),
        ]);
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let good = hello("b", "a");
        assert_eq!(
            admit(&cfg, &HelloKeys::new(&cfg), &sealed(&cfg, &good), b),
            Ok(good.clone())
        );
        // Spoofed source: b's hello from an address b does not have.
        let other: IpAddr = "10.0.0.9".parse().unwrap();
        assert_eq!(
            admit(&cfg, &HelloKeys::new(&cfg), &sealed(&cfg, &good), other),
            Err("wrong_source")
        );
        assert_eq!(
            admit(
                &cfg,
                &HelloKeys::new(&cfg),
                &sealed(&cfg, &hello("b", "c")),
                b
            ),
            Err("wrong_receiver")
        );
        assert_eq!(
            admit(
                &cfg,
                &HelloKeys::new(&cfg),
                &sealed(&cfg, &hello("z", "a")),
                b
            ),
            Err("unknown_sender")
        );
        // A flipped bit in the MAC, or in the sequence number: it no longer verifies.
        let mut bytes = sealed(&cfg, &good);
        *bytes.last_mut().unwrap() ^= 1;
        assert_eq!(
            admit(&cfg, &HelloKeys::new(&cfg), &bytes, b),
            Err("bad_mac")
        );
        let mut other_seq = good.clone();
        other_seq.seq = 2;
        let mut bytes = sealed(&cfg, &good);
        let body = sealed(&cfg, &other_seq);
        let at = (0..bytes.len()).find(|&i| bytes[i] != body[i]).unwrap();
        bytes[at] = body[at];
        assert_eq!(
            admit(&cfg, &HelloKeys::new(&cfg), &bytes, b),
            Err("bad_mac")
        );
        assert!(matches!(
            admit(&cfg, &HelloKeys::new(&cfg), b"hello?", b),
            Err("truncated" | "not_a_hello")
        ));
    }
}
