//! What this node knows about one peer, learned from hellos, and the decisions the hello
//! protocol drives: which SPIs to offer (inbound SAs), which offers to take (outbound
//! SAs), when a reboot invalidates a pair. Pure: no I/O, no clock reads, randomness and
//! time passed in. See docs/hello.md.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::ipsec::derive::BootId;
use crate::ipsec::hello::{Family, Hello, Offer, Outbound};

/// (family, key-id): one SA slot per direction of a pair.
pub type Slot = (Family, u8);

/// Earlier nonces of a peer remembered at most (restarts of its daemon while ours runs).
const MAX_RETIRED: usize = 32;

/// Peer nonces whose stale hellos we remember the newest sequence number of, at most.
const MAX_STALE_SEEN: usize = 8;

/// An SA this node receives on: SPI chosen here, offered to the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InSa {
    pub spi: u32,
    /// The peer nonce the offer was made for; only that peer instance may take it.
    pub bound: [u8; 16],
    /// The peer's boot ID the key is derived with.
    pub peer_boot: BootId,
    /// The peer reported sending with it.
    pub confirmed: bool,
}

/// An inbound SA replaced by a re-key, kept while the peer may still send on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Draining {
    pub slot: Slot,
    pub sa: InSa,
    /// Set once the peer reports sending on the SA that replaced it: removed then, after
    /// the packets still in flight had time to land.
    pub release_at: Option<Instant>,
}

/// How long a replaced inbound SA stays after the peer moved off it.
pub const DRAIN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// An SA this node sends with: SPI offered by the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutSa {
    pub spi: u32,
    pub peer_boot: BootId,
}

/// What one hello changed, for the caller's logging and reconciling.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The hello was authentic but not fresh: answer it, change nothing.
    pub stale: bool,
    /// A hello under the same nonce that this family already delivered, or an older
    /// one: a replay (or a reordering within one family). Ignored.
    pub replayed: bool,
    /// A hello already accepted over the other family: every hello goes out over each
    /// family the pair shares, so its second copy lands here, sometimes after a newer
    /// hello (two sent in quick succession, one family's path slower). Ignored, and not
    /// a replay.
    pub duplicate: bool,
    /// First boot ID heard, or a changed one (`Some(old)`).
    pub boot_changed: Option<Option<BootId>>,
    /// The set of desired SAs changed.
    pub sas_changed: bool,
    /// The peer holds other key-ids than it said before (a key was added or removed
    /// there): it waits for our offers under the new key, so answer without delay.
    pub peer_keys_changed: bool,
    /// The peer no longer offers the SPI of one of our outbound SAs: it lost that inbound
    /// SA and will offer a new SPI on our next hello, so answer without delay.
    pub offer_withdrawn: bool,
}

impl Outcome {
    /// The exchange is not settled: the caller should answer at once rather than at the
    /// next interval.
    pub fn wants_answer(&self) -> bool {
        self.stale || self.sas_changed || self.peer_keys_changed || self.offer_withdrawn
    }
}

#[derive(Debug, Clone)]
pub struct Peer {
    pub name: String,
    /// The peer's boot ID, once a fresh hello told it.
    pub boot: Option<BootId>,
    /// This node's nonce for the peer.
    pub nonce: [u8; 16],
    /// What the peer last said about itself (echoed in our hellos).
    pub heard_boot: BootId,
    pub heard_nonce: [u8; 16],
    /// Our hello sequence number under `nonce`.
    pub seq_out: u64,
    /// Highest sequence number accepted under the peer's nonce.
    pub seq_in: Option<([u8; 16], u64)>,
    /// Highest sequence number under that nonce that each family (v4, v6) delivered:
    /// tells a late copy over the other family from a replay.
    pub seq_by_family: [u64; 2],
    /// The peer's earlier nonces that we accepted hellos under: earlier instances of its
    /// daemon (and of its earlier boots), oldest first. Hellos under one are replays and
    /// change nothing, not even what we echo. Their hellos may echo our current nonce, so
    /// without this list a replay of one would pass as fresh (and could hand us an offer
    /// the peer has since replaced: an SPI, and so a key, we already sent with); and one
    /// from before our nonce last changed would, as a stale hello, turn our echo back to
    /// an instance that is gone. Kept across our own nonce changes for that reason.
    pub retired: Vec<[u8; 16]>,
    /// Our nonce when the peer's current instance (`seq_in`) last proved itself fresh.
    /// While it is still our nonce, the pair is live and a stale hello under another
    /// nonce does not turn our echo: it is as likely a replay of an instance we never
    /// heard fresh as a new instance (the wire carries no order among a peer's nonces).
    /// It earns one answer echoing it (`answer_to`) instead, which is all a new instance
    /// needs to prove itself.
    pub fresh_under: Option<[u8; 16]>,
    /// (boot, nonce) the next hello echoes once, instead of `heard_*`.
    pub answer_to: Option<(BootId, [u8; 16])>,
    /// Newest sequence number of a stale hello under each of a few peer nonces: a stale
    /// hello repeated (a replay, or the other family's copy) earns neither an answer nor
    /// a turn of the echo.
    pub stale_seen: Vec<([u8; 16], u64)>,
    pub inbound: BTreeMap<Slot, InSa>,
    pub outbound: BTreeMap<Slot, OutSa>,
    /// Inbound SAs replaced by a re-key (make-before-break), still installed.
    pub draining: Vec<Draining>,
    /// Key-ids the peer holds (bitmap), from its last fresh hello.
    pub peer_key_ids: u16,
    pub last_fresh: Option<Instant>,
}

/// The local facts a decision needs.
pub struct Local<'a> {
    pub boot: &'a BootId,
    /// Key-ids this node can make new SAs with, oldest first (the last is current).
    pub key_ids: &'a [u8],
    /// Families both ends have an endpoint in.
    pub families: &'a [Family],
}

fn family_index(f: Family) -> usize {
    match f {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

impl Peer {
    pub fn new(name: &str, nonce: [u8; 16]) -> Peer {
        Peer {
            name: name.to_string(),
            boot: None,
            nonce,
            heard_boot: [0; 16],
            heard_nonce: [0; 16],
            seq_out: 0,
            seq_in: None,
            seq_by_family: [0; 2],
            retired: Vec::new(),
            fresh_under: None,
            answer_to: None,
            stale_seen: Vec::new(),
            inbound: BTreeMap::new(),
            outbound: BTreeMap::new(),
            draining: Vec::new(),
            peer_key_ids: 0,
            last_fresh: None,
        }
    }

    /// Take a verified hello from this peer. `spi` allocates a fresh inbound SPI for a
    /// key-id, one never handed out before in this boot (`None`: none to be had, and the
    /// slot stays without an offer); `nonce` makes a fresh nonce.
    pub fn on_hello(
        &mut self,
        h: &Hello,
        family: Family,
        local: &Local,
        now: Instant,
        spi: &mut dyn FnMut(u8) -> Option<u32>,
        nonce: &mut dyn FnMut() -> [u8; 16],
    ) -> Outcome {
        if let Some(not_fresh) = self.check_fresh(h, family, local, now, nonce) {
            return not_fresh;
        }
        let mut out = Outcome {
            peer_keys_changed: self.peer_key_ids != h.key_ids,
            ..Outcome::default()
        };
        self.peer_key_ids = h.key_ids;
        if self.boot != Some(h.boot) {
            out.boot_changed = Some(self.boot);
            if self.boot.is_some() {
                out.sas_changed = self.rebooted(h.boot, nonce());
                return out;
            }
            self.first_word(h.boot);
        }
        out.offer_withdrawn = self.outbound.keys().any(|&(f, k)| {
            local.families.contains(&f)
                && local.key_ids.contains(&k)
                && !h.offers.iter().any(|o| (o.family, o.key_id) == (f, k))
        });
        out.sas_changed |= self.offer_inbound(h, local, now, spi);
        out.sas_changed |= self.take_offers(h, local);
        out
    }

    /// `None` when `h` is fresh (recorded as the newest heard); else what it was: a
    /// replay, a duplicate over the other family, or stale (it does not echo our
    /// current nonce and boot).
    fn check_fresh(
        &mut self,
        h: &Hello,
        family: Family,
        local: &Local,
        now: Instant,
        nonce: &mut dyn FnMut() -> [u8; 16],
    ) -> Option<Outcome> {
        let mut out = Outcome::default();
        if self.retired.contains(&h.nonce) {
            out.replayed = true;
            return Some(out);
        }
        if h.echo_nonce != self.nonce || h.echo_boot != *local.boot {
            match self.stale_seen.iter_mut().find(|(n, _)| *n == h.nonce) {
                Some((_, s)) if h.seq < *s => out.replayed = true,
                Some((_, s)) if h.seq == *s => out.duplicate = true,
                Some((_, s)) => *s = h.seq,
                None => {
                    if self.stale_seen.len() == MAX_STALE_SEEN {
                        self.stale_seen.remove(0);
                    }
                    self.stale_seen.push((h.nonce, h.seq));
                }
            }
            if out.replayed || out.duplicate {
                return Some(out);
            }
            if self.fresh_under != Some(self.nonce) {
                self.heard_boot = h.boot;
                self.heard_nonce = h.nonce;
            } else if h.nonce != self.heard_nonce {
                self.answer_to = Some((h.boot, h.nonce));
            }
            out.stale = true;
            return Some(out);
        }
        self.heard_boot = h.boot;
        self.heard_nonce = h.nonce;
        if let Some((n, s)) = self.seq_in
            && n == h.nonce
            && h.seq <= s
        {
            let seen = &mut self.seq_by_family[family_index(family)];
            if h.seq > *seen {
                // Accepted before over the other family (nothing above `s` was sent
                // under this nonce), new on this one.
                *seen = h.seq;
                out.duplicate = true;
            } else {
                out.replayed = true;
            }
            return Some(out);
        }
        if let Some((n, _)) = self.seq_in
            && n != h.nonce
        {
            // A new instance of the peer: the earlier one must never be heard again.
            self.retired.push(n);
            if self.retired.len() > MAX_RETIRED {
                // The oldest is forgotten; so that a replay of it cannot pass as fresh,
                // start over under a new nonce of ours: every hello said before it is
                // stale from now on, this one included.
                self.retired.remove(0);
                self.new_nonce(nonce());
                out.stale = true;
                return Some(out);
            }
        }
        if self.seq_in.is_none_or(|(n, _)| n != h.nonce) {
            self.seq_by_family = [0; 2];
        }
        self.seq_in = Some((h.nonce, h.seq));
        self.seq_by_family[family_index(family)] = h.seq;
        self.last_fresh = Some(now);
        self.fresh_under = Some(self.nonce);
        None
    }

    /// The peer rebooted: every SA of the pair is keyed to the old epoch. Drop them all
    /// and start over under a new nonce, so that nothing said before the reboot (or
    /// replayed from then) counts. `true` if there were SAs to drop.
    fn rebooted(&mut self, boot: BootId, nonce: [u8; 16]) -> bool {
        let had =
            !self.inbound.is_empty() || !self.outbound.is_empty() || !self.draining.is_empty();
        self.inbound.clear();
        self.outbound.clear();
        self.draining.clear();
        self.new_nonce(nonce);
        self.boot = Some(boot);
        had
    }

    /// First word from the peer since this daemon started: SAs adopted from the kernel
    /// get this epoch. If they belong to an older one, their keys will not match the
    /// derived ones and the caller re-keys them.
    fn first_word(&mut self, boot: BootId) {
        for sa in self
            .inbound
            .values_mut()
            .filter(|sa| sa.peer_boot == [0; 16])
        {
            sa.peer_boot = boot;
        }
        for sa in self
            .outbound
            .values_mut()
            .filter(|sa| sa.peer_boot == [0; 16])
        {
            sa.peer_boot = boot;
        }
        for d in self
            .draining
            .iter_mut()
            .filter(|d| d.sa.peer_boot == [0; 16])
        {
            d.sa.peer_boot = boot;
        }
        self.boot = Some(boot);
    }

    /// Our offers: one inbound SA per family and key-id we hold, new where there is none,
    /// where it belongs to the peer's earlier epoch, or where it was offered to an earlier
    /// instance of the peer that never took it. `true` if any changed.
    fn offer_inbound(
        &mut self,
        h: &Hello,
        local: &Local,
        now: Instant,
        spi: &mut dyn FnMut(u8) -> Option<u32>,
    ) -> bool {
        let reported = |slot: Slot| {
            h.outbound
                .iter()
                .find(|o| (o.family, o.key_id) == slot)
                .map(|o| o.spi)
        };
        let mut changed = false;
        for &f in local.families {
            for &k in local.key_ids {
                let slot = (f, k);
                let fresh_needed = match self.inbound.get_mut(&slot) {
                    None => true,
                    Some(sa) if sa.peer_boot != h.boot => true,
                    Some(sa) if reported(slot) == Some(sa.spi) => {
                        sa.confirmed = true;
                        for d in self.draining.iter_mut().filter(|d| d.slot == slot) {
                            d.release_at.get_or_insert(now + DRAIN_GRACE);
                        }
                        false
                    }
                    // Offered to an earlier instance of the peer, which is gone without
                    // having taken it (or having lost it): offer anew.
                    Some(sa) => sa.bound != h.nonce,
                };
                if !fresh_needed {
                    continue;
                }
                // Without a new SPI the old SA is no use either: it is keyed to another
                // epoch or offered to a peer instance that is gone.
                changed = match spi(k) {
                    Some(spi) => {
                        let sa = InSa {
                            spi,
                            bound: h.nonce,
                            peer_boot: h.boot,
                            confirmed: false,
                        };
                        self.inbound.insert(slot, sa);
                        true
                    }
                    None => self.inbound.remove(&slot).is_some() || changed,
                };
            }
        }
        changed
    }

    /// Take the peer's offers made for our current nonce, for keys we hold. `true` if
    /// any outbound SA changed.
    fn take_offers(&mut self, h: &Hello, local: &Local) -> bool {
        let mut changed = false;
        for o in h.offers.iter().filter(|o| o.bound) {
            let slot = (o.family, o.key_id);
            if !local.families.contains(&o.family) || !local.key_ids.contains(&o.key_id) {
                continue;
            }
            let want = OutSa {
                spi: o.spi,
                peer_boot: h.boot,
            };
            if self.outbound.get(&slot) != Some(&want) {
                self.outbound.insert(slot, want);
                changed = true;
            }
        }
        changed
    }

    /// Our inbound SA `spi` in `slot` reached its soft limit: offer its successor under
    /// `new_spi` and keep it until the peer sends on the successor (make-before-break).
    /// `false` if `spi` is not the slot's current SA or the peer's instance is not known
    /// yet (nothing to bind the offer to).
    pub fn rekey_inbound(&mut self, slot: Slot, spi: u32, new_spi: u32) -> bool {
        let (Some((peer_nonce, _)), Some(boot)) = (self.seq_in, self.boot) else {
            return false;
        };
        let Some(old) = self.inbound.get(&slot).copied().filter(|sa| sa.spi == spi) else {
            return false;
        };
        self.draining.push(Draining {
            slot,
            sa: old,
            release_at: None,
        });
        self.inbound.insert(
            slot,
            InSa {
                spi: new_spi,
                bound: peer_nonce,
                peer_boot: boot,
                confirmed: false,
            },
        );
        true
    }

    /// Drop the replaced SAs whose grace is over, and `gone` ones (the kernel deleted
    /// them at their hard limit). `true` if any went.
    pub fn release_drained(&mut self, now: Instant, gone: &[u32]) -> bool {
        let before = self.draining.len();
        self.draining
            .retain(|d| d.release_at.is_none_or(|t| t > now) && !gone.contains(&d.sa.spi));
        self.draining.len() != before
    }

    /// When the next replaced SA is due to go.
    pub fn next_release(&self) -> Option<Instant> {
        self.draining.iter().filter_map(|d| d.release_at).min()
    }

    /// Whether `spi` is one of the replaced SAs still kept.
    pub fn is_draining(&self, spi: u32) -> bool {
        self.draining.iter().any(|d| d.sa.spi == spi)
    }

    /// One of our outbound SAs to this peer vanished from the kernel (flushed from under
    /// us). Its SPI, and so its key, must never be used again: forget it and take a new
    /// nonce, so the peer offers a new SPI for it.
    pub fn outbound_lost(&mut self, slot: Slot, nonce: [u8; 16]) {
        self.outbound.remove(&slot);
        self.new_nonce(nonce);
    }

    /// Our nonce for the peer changes: whatever the peer said before is stale from now
    /// on. Its retired nonces stay retired (see `retired`).
    fn new_nonce(&mut self, nonce: [u8; 16]) {
        self.nonce = nonce;
        self.seq_out = 0;
    }

    /// The next hellos to this peer: one, echoing what we heard from its current
    /// instance, after the answer to a stale hello under another nonce if one is due (see
    /// `fresh_under`). Both, so that a replay slipped in before our send cannot keep the
    /// live instance from hearing us.
    pub fn hellos(&mut self, me: &str, local: &Local, key_bits: u16) -> Vec<Hello> {
        let answer = self
            .answer_to
            .take()
            .filter(|(_, n)| *n != self.heard_nonce);
        answer
            .into_iter()
            .chain([(self.heard_boot, self.heard_nonce)])
            .map(|echo| self.hello_echoing(me, local, key_bits, echo))
            .collect()
    }

    fn hello_echoing(
        &mut self,
        me: &str,
        local: &Local,
        key_bits: u16,
        (echo_boot, echo_nonce): (BootId, [u8; 16]),
    ) -> Hello {
        self.seq_out += 1;
        Hello {
            sender: me.to_string(),
            receiver: self.name.clone(),
            boot: *local.boot,
            nonce: self.nonce,
            seq: self.seq_out,
            echo_boot,
            echo_nonce,
            key_ids: key_bits,
            offers: self
                .inbound
                .iter()
                .map(|(&(family, key_id), sa)| Offer {
                    family,
                    key_id,
                    spi: sa.spi,
                    bound: sa.bound == echo_nonce,
                })
                .collect(),
            outbound: self
                .outbound
                .iter()
                .map(|(&(family, key_id), sa)| Outbound {
                    family,
                    key_id,
                    spi: sa.spi,
                })
                .collect(),
        }
    }

    /// Up: for every family, the newest key-id both hold has SAs both ways, and the peer
    /// confirmed sending on ours.
    pub fn is_up(&self, families: &[Family]) -> bool {
        !families.is_empty()
            && families.iter().all(|f| {
                // A re-key under way keeps the pair up: the peer still sends on the
                // replaced SA until it takes the new one.
                self.outbound.keys().any(|(of, _)| of == f)
                    && self
                        .inbound
                        .iter()
                        .chain(self.draining.iter().map(|d| (&d.slot, &d.sa)))
                        .any(|((inf, _), sa)| inf == f && sa.confirmed)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two nodes exchanging hellos in memory, with deterministic SPIs and nonces.
    #[derive(Clone)]
    struct Node {
        name: &'static str,
        boot: BootId,
        keys: Vec<u8>,
        peer: Peer,
        counter: u32,
        /// The SPI ledger has nothing to give (its file cannot be written).
        no_spi: bool,
        nonces: u8,
    }

    const FAM: &[Family] = &[Family::V4, Family::V6];

    impl Node {
        fn new(name: &'static str, other: &str, boot: u8, seed: u32) -> Node {
            Node {
                name,
                boot: [boot; 16],
                keys: vec![1],
                peer: Peer::new(other, [seed as u8; 16]),
                counter: seed * 1000,
                no_spi: false,
                nonces: (seed as u8).wrapping_mul(40),
            }
        }
        fn bits(&self) -> u16 {
            self.keys.iter().fold(0, |b, k| b | 1 << k)
        }
        fn send_all(&mut self) -> Vec<Hello> {
            let keys = self.keys.clone();
            let bits = self.bits();
            let local = Local {
                boot: &self.boot,
                key_ids: &keys,
                families: FAM,
            };
            self.peer.hellos(self.name, &local, bits)
        }
        /// The hello that echoes the peer's current instance (the last one sent).
        fn send(&mut self) -> Hello {
            self.send_all().pop().expect("at least one hello")
        }
        fn deliver(&mut self, to: &mut Node) {
            for h in self.send_all() {
                to.recv(&h);
            }
        }
        fn recv(&mut self, h: &Hello) -> Outcome {
            self.recv_over(h, Family::V4)
        }
        fn recv_over(&mut self, h: &Hello, family: Family) -> Outcome {
            let keys = self.keys.clone();
            let local = Local {
                boot: &self.boot,
                key_ids: &keys,
                families: FAM,
            };
            let c = &mut self.counter;
            let none = self.no_spi;
            let mut spi = |k: u8| {
                *c += 1;
                (!none).then(|| crate::ipsec::plan::make_spi(*c, k))
            };
            let n = &mut self.nonces;
            let mut nonce2 = || {
                *n += 1;
                [*n; 16]
            };
            self.peer
                .on_hello(h, family, &local, Instant::now(), &mut spi, &mut nonce2)
        }
    }

    fn exchange(a: &mut Node, b: &mut Node, rounds: usize) {
        for _ in 0..rounds {
            a.deliver(b);
            b.deliver(a);
        }
    }

    /// What a hello that changes nothing must leave as it was (the per-family counters
    /// may move).
    fn settled(p: &Peer) -> String {
        format!(
            "{:?}",
            (
                &p.boot,
                &p.nonce,
                &p.seq_in,
                &p.retired,
                &p.inbound,
                &p.outbound
            )
        )
    }

    fn pair() -> (Node, Node) {
        (Node::new("a", "b", 1, 1), Node::new("b", "a", 2, 2))
    }

    /// Outbound of one side uses exactly the inbound SPIs of the other.
    fn consistent(a: &Node, b: &Node) -> bool {
        a.peer
            .outbound
            .iter()
            .all(|(s, o)| b.peer.inbound.get(s).is_some_and(|i| i.spi == o.spi))
            && b.peer
                .outbound
                .iter()
                .all(|(s, o)| a.peer.inbound.get(s).is_some_and(|i| i.spi == o.spi))
    }

    #[test]
    fn two_nodes_come_up_in_a_few_round_trips() {
        let (mut a, mut b) = pair();
        // The first hello is not fresh (a has not heard b's nonce): nothing changes.
        let h = a.send();
        assert!(b.recv(&h).stale);
        assert!(b.peer.inbound.is_empty());
        exchange(&mut a, &mut b, 3);
        assert!(
            a.peer.is_up(FAM) && b.peer.is_up(FAM),
            "{:?}\n{:?}",
            a.peer,
            b.peer
        );
        assert!(consistent(&a, &b));
        assert_eq!(a.peer.boot, Some([2; 16]));
        // Steady state: more hellos change nothing.
        let before = (a.peer.inbound.clone(), a.peer.outbound.clone());
        for _ in 0..3 {
            let h = b.send();
            assert!(!a.recv(&h).sas_changed);
            let h = a.send();
            b.recv(&h);
        }
        assert_eq!(before, (a.peer.inbound.clone(), a.peer.outbound.clone()));
    }

    #[test]
    fn without_a_new_spi_a_slot_goes_without_rather_than_keep_an_old_epoch() {
        let (mut a, mut b) = pair();
        exchange(&mut a, &mut b, 3);
        assert!(a.peer.is_up(FAM));
        a.no_spi = true;
        b = Node::new("b", "a", 3, 3); // rebooted
        exchange(&mut a, &mut b, 3);
        assert!(a.peer.inbound.is_empty(), "{:?}", a.peer.inbound);
        assert!(b.peer.outbound.is_empty(), "{:?}", b.peer.outbound);
        assert!(!a.peer.is_up(FAM));
        a.no_spi = false;
        exchange(&mut a, &mut b, 3);
        assert!(a.peer.is_up(FAM) && b.peer.is_up(FAM) && consistent(&a, &b));
    }

    #[test]
    fn a_rekey_offers_a_successor_and_keeps_the_old_sa_until_the_peer_moved() {
        let (mut a, mut b) = pair();
        exchange(&mut a, &mut b, 3);
        let recorded = a.send();
        b.recv(&recorded);
        let slot = (Family::V4, 1);
        let old = a.peer.inbound[&slot].spi;
        let b_out = b.peer.outbound[&slot].spi;
        assert_eq!(old, b_out);
        assert!(
            !a.peer.rekey_inbound(slot, old + 1, 7777),
            "not the current SA"
        );
        assert!(a.peer.rekey_inbound(slot, old, 7777));
        assert_eq!(a.peer.inbound[&slot].spi, 7777);
        assert_eq!(a.peer.draining.len(), 1);
        assert_eq!(a.peer.next_release(), None, "kept until the peer moves");
        assert!(a.peer.is_up(FAM), "a re-key under way is not a pair down");
        // a's next hello carries the offer bound to b's nonce; b switches at once.
        let h = a.send();
        assert!(b.recv(&h).sas_changed);
        assert_eq!(b.peer.outbound[&slot].spi, 7777);
        // b's report lets a release the old SA after the grace, not before.
        let h = b.send();
        let t = Instant::now();
        a.recv(&h);
        let release = a.peer.next_release().expect("released after the grace");
        assert!(release >= t + DRAIN_GRACE);
        assert!(!a.peer.release_drained(t, &[]));
        assert!(a.peer.release_drained(release, &[]));
        assert!(a.peer.draining.is_empty());
        assert!(a.peer.is_up(FAM) && b.peer.is_up(FAM) && consistent(&a, &b));
        // A replaced SA the kernel deleted (hard limit) just goes.
        let cur = a.peer.inbound[&slot].spi;
        assert!(a.peer.rekey_inbound(slot, cur, 8888));
        assert!(a.peer.is_draining(cur));
        assert!(a.peer.release_drained(Instant::now(), &[cur]));
        // A replayed hello from before the rekey does not bring the old offer back.
        let snapshot = format!("{:?}", b.peer.outbound);
        let o = b.recv(&recorded);
        assert!(o.replayed, "{o:?}");
        assert_eq!(snapshot, format!("{:?}", b.peer.outbound));
    }

    #[test]
    fn replayed_and_reordered_hellos_change_nothing() {
        let (mut a, mut b) = pair();
        exchange(&mut a, &mut b, 3);
        let old = b.send();
        exchange(&mut a, &mut b, 1);
        let snapshot = format!("{:?}", a.peer);
        let o = a.recv(&old);
        assert!(o.replayed, "{o:?}");
        assert_eq!(snapshot, format!("{:?}", a.peer));
    }

    #[test]
    fn the_copy_over_the_other_family_is_a_duplicate_not_a_replay() {
        let (mut a, mut b) = pair();
        exchange(&mut a, &mut b, 3);
        let older = b.send();
        let h = b.send();
        let first = a.recv_over(&h, Family::V4);
        assert!(!first.duplicate && !first.replayed && !first.stale);
        let snapshot = settled(&a.peer);
        let again = a.recv_over(&h, Family::V6);
        assert!(again.duplicate && !again.replayed, "{again:?}");
        assert_eq!(snapshot, settled(&a.peer));
        // The same hello once more over a family that delivered it is a replay, and so
        // is an older one the other family delivered.
        let o = a.recv_over(&h, Family::V6);
        assert!(o.replayed && !o.duplicate, "{o:?}");
        let o = a.recv_over(&older, Family::V4);
        assert!(o.replayed && !o.duplicate, "{o:?}");
    }

    #[test]
    fn a_late_copy_over_the_other_family_is_a_duplicate_even_after_a_newer_hello() {
        // Seen in the kernel VM: two hellos sent back to back over both families, the v6
        // copy of the first arriving after the v4 copy of the second. It was counted as
        // a replay; it is the expected second copy.
        let (mut a, mut b) = pair();
        exchange(&mut a, &mut b, 3);
        let first = b.send();
        let second = b.send();
        assert!(!a.recv_over(&first, Family::V4).replayed);
        assert!(!a.recv_over(&second, Family::V4).replayed);
        let snapshot = settled(&a.peer);
        let late = a.recv_over(&first, Family::V6);
        assert!(late.duplicate && !late.replayed, "{late:?}");
        let late = a.recv_over(&second, Family::V6);
        assert!(late.duplicate && !late.replayed, "{late:?}");
        assert_eq!(snapshot, settled(&a.peer));
        // Once v6 delivered the second, the first over v6 again is a replay.
        let o = a.recv_over(&first, Family::V6);
        assert!(o.replayed && !o.duplicate, "{o:?}");
    }

    #[test]
    fn a_reboot_rekeys_the_pair_and_old_hellos_cannot_roll_it_back() {
        let (mut a, mut b) = pair();
        exchange(&mut a, &mut b, 3);
        let old_out = a.peer.outbound.clone();
        let pre_reboot = b.send();
        // b reboots: new boot ID, new daemon state.
        b = Node::new("b", "a", 9, 5);
        exchange(&mut a, &mut b, 4);
        assert!(a.peer.is_up(FAM) && b.peer.is_up(FAM));
        assert!(consistent(&a, &b));
        assert_eq!(a.peer.boot, Some([9; 16]));
        for (slot, sa) in &a.peer.outbound {
            assert_eq!(sa.peer_boot, [9; 16]);
            assert_ne!(old_out.get(slot).map(|o| o.spi), Some(sa.spi));
        }
        // A hello recorded before the reboot is from a retired instance now: a replay,
        // no rollback to boot 2, and not even an answer.
        let o = a.recv(&pre_reboot);
        assert!(o.replayed && !o.stale && o.boot_changed.is_none(), "{o:?}");
        assert_eq!(a.peer.heard_boot, [9; 16]);
        assert_eq!(a.peer.boot, Some([9; 16]));
    }

    #[test]
    fn daemon_restart_adopts_without_rekeying() {
        let (mut a, mut b) = pair();
        exchange(&mut a, &mut b, 3);
        let (ain, aout) = (a.peer.inbound.clone(), a.peer.outbound.clone());
        // b's daemon restarts on the same boot: new nonce, but it adopted its SAs from the
        // kernel (the caller restores inbound/outbound from the dump).
        let mut nb = Node::new("b", "a", 2, 7);
        nb.peer.inbound = b.peer.inbound.clone();
        nb.peer.outbound = b.peer.outbound.clone();
        nb.peer.boot = b.peer.boot;
        exchange(&mut a, &mut nb, 3);
        assert_eq!(a.peer.outbound, aout);
        assert_eq!(
            a.peer.inbound.values().map(|s| s.spi).collect::<Vec<_>>(),
            ain.values().map(|s| s.spi).collect::<Vec<_>>()
        );
        assert!(consistent(&a, &nb));
    }

    #[test]
    fn hellos_of_an_earlier_instance_of_the_peer_are_never_fresh_again() {
        let (mut a, mut b) = pair();
        exchange(&mut a, &mut b, 3);
        let slot = (Family::V4, 1);
        let first_spi = a.peer.outbound[&slot].spi;
        // Said by b's first daemon, fresh when sent (it echoes a's nonce, which stays).
        let old = b.send();
        // b's daemon restarts (new nonce, same boot, SAs adopted), then loses its inbound
        // SA for the slot and offers a new SPI for it.
        let mut nb = Node::new("b", "a", 2, 7);
        nb.peer.inbound = b.peer.inbound.clone();
        nb.peer.outbound = b.peer.outbound.clone();
        nb.peer.boot = b.peer.boot;
        exchange(&mut a, &mut nb, 3);
        nb.peer.inbound.remove(&slot);
        exchange(&mut a, &mut nb, 3);
        let now = a.peer.outbound.clone();
        assert_ne!(now[&slot].spi, first_spi);
        // The first daemon's hello, replayed: ignored, a keeps sending on the new SPI
        // (taking the old offer again would reuse the old SA's key from sequence 1).
        let o = a.recv(&old);
        assert!(o.replayed && !o.sas_changed, "{o:?}");
        assert_eq!(a.peer.outbound, now);
        assert_eq!(
            a.peer.heard_nonce, nb.peer.nonce,
            "nothing heard from it either"
        );
        assert!(consistent(&a, &nb));
    }

    /// Every hello b ever sent, across three restarts of its daemon, a key rotation, an
    /// SA that vanished at a and a reboot of b, replayed to a afterwards in three orders:
    /// none changes what a echoes or sends with. (Before the retired nonces outlived a's
    /// own nonce changes, the replays from before b's reboot turned a's echo back.)
    #[test]
    fn no_recorded_hello_in_any_order_turns_the_echo_back_or_changes_an_sa() {
        fn talk(a: &mut Node, b: &mut Node, rounds: usize, tape: &mut Vec<Hello>) {
            for _ in 0..rounds {
                let h = a.send();
                b.recv(&h);
                let h = b.send();
                tape.push(h.clone());
                a.recv(&h);
            }
        }
        let (mut a, mut b) = pair();
        let mut tape = Vec::new();
        talk(&mut a, &mut b, 3, &mut tape);
        for seed in [10, 11, 12] {
            // A restart of b's daemon: the kernel keeps the SAs, the nonce is new.
            let mut nb = Node::new("b", "a", 2, seed);
            nb.peer.inbound = b.peer.inbound.clone();
            nb.peer.outbound = b.peer.outbound.clone();
            nb.peer.boot = b.peer.boot;
            b = nb;
            talk(&mut a, &mut b, 3, &mut tape);
        }
        a.keys = vec![1, 2];
        b.keys = vec![1, 2];
        talk(&mut a, &mut b, 3, &mut tape);
        a.peer.outbound_lost((Family::V4, 2), [0x55; 16]);
        talk(&mut a, &mut b, 3, &mut tape);
        // b reboots: a new boot ID, nothing kept.
        b = Node::new("b", "a", 3, 13);
        b.keys = vec![1, 2];
        talk(&mut a, &mut b, 4, &mut tape);
        assert!(a.peer.is_up(FAM) && b.peer.is_up(FAM) && consistent(&a, &b));
        let settled_a = (
            a.peer.heard_nonce,
            a.peer.heard_boot,
            a.peer.outbound.clone(),
        );
        assert_eq!(settled_a.0, b.peer.nonce);
        let n = tape.len();
        let orders: [Vec<usize>; 3] = [
            (0..n).collect(),
            (0..n).rev().collect(),
            (0..n).map(|i| (i * 7 + 3) % n).collect(),
        ];
        assert!(n % 7 != 0, "the third order must be a permutation");
        for order in orders {
            for i in order {
                let o = a.recv(&tape[i]);
                assert!(!o.sas_changed, "hello {i} changed SAs: {o:?}");
                assert_eq!(
                    (
                        a.peer.heard_nonce,
                        a.peer.heard_boot,
                        a.peer.outbound.clone()
                    ),
                    settled_a,
                    "hello {i} of {n} turned the echo back or changed an SA"
                );
            }
        }
        // And the pair still talks.
        exchange(&mut a, &mut b, 2);
        assert!(a.peer.is_up(FAM) && b.peer.is_up(FAM) && consistent(&a, &b));
    }

    /// b's daemon as a's previous daemon heard it: a restarted, adopting its SAs, and b's
    /// daemon restarted after it. The hellos of b's first instance echo a nonce a no
    /// longer has, and a never heard that instance fresh, so nothing marks them old.
    fn instance_a_never_heard_fresh() -> (Node, Node, Vec<Hello>) {
        let (mut a0, mut b) = pair();
        exchange(&mut a0, &mut b, 3);
        let tape: Vec<Hello> = (0..4)
            .map(|_| {
                let h = b.send();
                a0.recv(&h);
                h
            })
            .collect();
        let adopt = |n: &mut Node, from: &Node| {
            n.peer.inbound = from.peer.inbound.clone();
            n.peer.outbound = from.peer.outbound.clone();
            n.peer.boot = from.peer.boot;
        };
        let mut a = Node::new("a", "b", 1, 30);
        adopt(&mut a, &a0);
        let mut nb = Node::new("b", "a", 2, 31);
        adopt(&mut nb, &b);
        exchange(&mut a, &mut nb, 3);
        assert!(a.peer.is_up(FAM) && nb.peer.is_up(FAM) && consistent(&a, &nb));
        (a, nb, tape)
    }

    /// Replayed to a live pair, those hellos do not turn the echo, and each earns at
    /// most one answer (which echoes it, and which the real peer ignores as stale). Fails
    /// on the rule before `fresh_under`, where every stale hello turned the echo.
    #[test]
    fn hellos_of_an_instance_never_heard_fresh_do_not_turn_the_echo_of_a_live_pair() {
        let (mut a, mut nb, tape) = instance_a_never_heard_fresh();
        let settled_a = (
            a.peer.heard_nonce,
            a.peer.heard_boot,
            a.peer.outbound.clone(),
        );
        let mut answers = 0;
        for i in (0..tape.len()).chain((0..tape.len()).rev()) {
            let o = a.recv(&tape[i]);
            assert!(!o.sas_changed, "replay {i}: {o:?}");
            answers += usize::from(o.wants_answer());
            assert_eq!(
                (
                    a.peer.heard_nonce,
                    a.peer.heard_boot,
                    a.peer.outbound.clone()
                ),
                settled_a,
                "replay {i} turned the echo"
            );
            // a's answer echoes the replayed instance, and b, live, ignores it; the
            // hello after it is an ordinary one.
            let sent = a.send_all();
            assert_eq!(sent.len(), 1 + usize::from(o.wants_answer()));
            if o.wants_answer() {
                let before = settled(&nb.peer);
                let o = nb.recv(&sent[0]);
                assert!(o.stale && !o.sas_changed, "{o:?}");
                assert_eq!(settled(&nb.peer), before);
            }
            let o = nb.recv(sent.last().unwrap());
            assert!(!o.stale && !o.replayed && !o.sas_changed, "{o:?}");
        }
        assert!(
            answers <= tape.len(),
            "{answers} answers to {} hellos",
            tape.len()
        );
        exchange(&mut a, &mut nb, 2);
        assert!(a.peer.is_up(FAM) && nb.peer.is_up(FAM) && consistent(&a, &nb));
        assert_eq!(a.peer.heard_nonce, nb.peer.nonce);
    }

    /// Right after a's own nonce changed (a lost SA), nothing proves the peer's instance
    /// fresh under it, and a stale hello turns the echo again. A replay slipped in before
    /// every hello a sends still does not keep the pair from settling in as many round
    /// trips as without: the answer to a replay goes out beside the ordinary hello.
    #[test]
    fn replays_between_every_hello_after_a_nonce_change_do_not_stall_the_pair() {
        let (mut a, mut nb, tape) = instance_a_never_heard_fresh();
        let out_before = a.peer.outbound.clone();
        a.peer.outbound_lost((Family::V4, 1), [0x66; 16]);
        let (mut a2, mut nb2) = (a.clone(), nb.clone());
        exchange(&mut a2, &mut nb2, 3);
        assert!(a2.peer.is_up(FAM) && nb2.peer.is_up(FAM), "without replays");
        for h in &tape[..3] {
            a.recv(h);
            a.deliver(&mut nb);
            nb.deliver(&mut a);
        }
        assert!(a.peer.is_up(FAM) && nb.peer.is_up(FAM) && consistent(&a, &nb));
        assert_eq!(a.peer.heard_nonce, nb.peer.nonce);
        assert_eq!(a.peer.fresh_under, Some([0x66; 16]));
        assert_ne!(
            a.peer.outbound[&(Family::V4, 1)],
            out_before[&(Family::V4, 1)],
            "the lost SA's slot is sent on under a new SPI"
        );
    }

    /// Both ends change their nonce for each other at once: neither is live, so each
    /// takes the other's new nonce from its stale hello, and the pair settles.
    #[test]
    fn both_ends_changing_nonce_at_once_still_settle() {
        let (mut a, mut b) = pair();
        exchange(&mut a, &mut b, 3);
        a.peer.outbound_lost((Family::V4, 1), [0x71; 16]);
        b.peer.outbound_lost((Family::V6, 1), [0x72; 16]);
        exchange(&mut a, &mut b, 4);
        assert!(a.peer.is_up(FAM) && b.peer.is_up(FAM) && consistent(&a, &b));
        assert_eq!(a.peer.heard_nonce, b.peer.nonce);
        assert_eq!(b.peer.heard_nonce, a.peer.nonce);
    }

    #[test]
    fn a_peer_restarting_again_and_again_keeps_the_pair_up() {
        let (mut a, mut b) = pair();
        exchange(&mut a, &mut b, 3);
        for seed in 10..(10 + 2 * MAX_RETIRED as u32) {
            let mut nb = Node::new("b", "a", 2, seed);
            nb.peer.inbound = b.peer.inbound.clone();
            nb.peer.outbound = b.peer.outbound.clone();
            nb.peer.boot = b.peer.boot;
            b = nb;
            exchange(&mut a, &mut b, 3);
            assert!(a.peer.is_up(FAM) && b.peer.is_up(FAM) && consistent(&a, &b));
            assert!(a.peer.retired.len() <= MAX_RETIRED);
        }
    }

    #[test]
    fn a_lost_outbound_sa_is_never_recreated_under_its_old_spi() {
        let (mut a, mut b) = pair();
        exchange(&mut a, &mut b, 3);
        let slot = (Family::V4, 1);
        let old = a.peer.outbound[&slot].spi;
        a.peer.outbound_lost(slot, [0x77; 16]);
        exchange(&mut a, &mut b, 3);
        let new = a.peer.outbound[&slot].spi;
        assert_ne!(old, new);
        assert!(consistent(&a, &b));
        assert!(a.peer.is_up(FAM));
    }

    #[test]
    fn a_lost_inbound_sa_gets_a_new_spi_and_an_answer_at_once() {
        let (mut a, mut b) = pair();
        exchange(&mut a, &mut b, 3);
        let recorded = a.send();
        b.recv(&recorded);
        let slot = (Family::V4, 1);
        let old = a.peer.inbound[&slot].spi;
        // The caller's reaction to an inbound SA that vanished from the kernel.
        a.peer.inbound.remove(&slot);
        let h = a.send();
        let o = b.recv(&h);
        assert!(o.offer_withdrawn && o.wants_answer(), "{o:?}");
        let h = b.send();
        assert!(a.recv(&h).sas_changed, "a offers a new SPI");
        exchange(&mut a, &mut b, 2);
        assert_ne!(a.peer.inbound[&slot].spi, old);
        assert_eq!(b.peer.outbound[&slot].spi, a.peer.inbound[&slot].spi);
        assert!(consistent(&a, &b) && a.peer.is_up(FAM) && b.peer.is_up(FAM));
        // Settled: nothing more to answer.
        let h = a.send();
        assert!(!b.recv(&h).wants_answer());
    }

    #[test]
    fn rotation_moves_outbound_only_when_both_hold_the_key() {
        let (mut a, mut b) = pair();
        exchange(&mut a, &mut b, 3);
        a.keys = vec![1, 2];
        exchange(&mut a, &mut b, 3);
        // a offers key 2, but b does not hold it: nobody sends with key 2 yet.
        assert!(!b.peer.outbound.keys().any(|(_, k)| *k == 2));
        assert!(!a.peer.outbound.keys().any(|(_, k)| *k == 2));
        b.keys = vec![1, 2];
        // b's first hello with key 2 changes nothing at a (b has offered nothing under
        // it yet) but must be answered at once: b offers key 2 only on a's next hello.
        let h = b.send();
        let o = a.recv(&h);
        assert!(o.peer_keys_changed && !o.sas_changed, "{o:?}");
        let h = a.send();
        assert!(b.recv(&h).sas_changed, "b offers key 2 on a's answer");
        exchange(&mut a, &mut b, 3);
        for f in FAM {
            assert!(
                a.peer.outbound.contains_key(&(*f, 2)) && b.peer.outbound.contains_key(&(*f, 2))
            );
            // The old key's SAs are still there until they are retired.
            assert!(a.peer.inbound.contains_key(&(*f, 1)));
        }
        assert!(consistent(&a, &b));
    }
}
