//! Desired XFRM objects against what the kernel reports: the operations that make the
//! kernel match, touching only encryptd's own objects. Pure.
//!
//! A state is never overwritten with a different key under the same SPI: a mismatch is
//! reported as `conflicts` and the caller re-keys through the hello protocol (a new SPI).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use crate::ipsec::plan::DesiredStates;
use crate::objects::xfrm::{DumpedPolicy, DumpedState, PolicyId, StateId, XfrmPolicy, XfrmState};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ops {
    pub add_policies: Vec<XfrmPolicy>,
    pub update_policies: Vec<XfrmPolicy>,
    pub delete_policies: Vec<XfrmPolicy>,
    pub add_states: Vec<XfrmState>,
    /// Present with the desired key but other lifetime limits (the settings changed):
    /// `UPDSA` changes those in place, counters and sequence numbers kept.
    pub update_states: Vec<XfrmState>,
    pub delete_states: Vec<XfrmState>,
    /// Desired but absent from the kernel, and either installed before (it vanished) or
    /// without a key to install it (kept SAs).
    pub missing: Vec<StateId>,
    /// Present under the desired SPI but with another key or shape: left alone.
    pub conflicts: Vec<StateId>,
}

impl Ops {
    pub fn is_empty(&self) -> bool {
        self.changes() == 0
    }

    /// Kernel objects the ops add, change or delete.
    pub fn changes(&self) -> usize {
        self.add_policies.len()
            + self.update_policies.len()
            + self.delete_policies.len()
            + self.add_states.len()
            + self.update_states.len()
            + self.delete_states.len()
    }
}

/// The kernel keys states by destination and SPI (ESP only).
fn state_key(dst: IpAddr, spi: u32) -> (IpAddr, u32) {
    (dst, spi)
}

/// `installed`: the states this process has seen in the kernel (installed or adopted). A
/// desired state absent from the kernel that was installed before vanished (deleted from
/// under us, e.g. by `ip xfrm state flush`): it goes to `missing`, never back in under the
/// same SPI. Outbound, the kernel would restart its sequence numbers under the same key
/// (GCM nonce reuse); inbound, its replay window would start empty.
pub fn diff(
    policies: &[XfrmPolicy],
    states: &DesiredStates,
    kernel_policies: &[DumpedPolicy],
    kernel_states: &[DumpedState],
    installed: &BTreeSet<StateId>,
) -> Ops {
    let mut ops = Ops::default();

    let have: HashMap<PolicyId, &XfrmPolicy> = kernel_policies
        .iter()
        .filter(|p| p.is_ours())
        .map(|p| (p.id(), &p.policy))
        .collect();
    let mut want: HashMap<PolicyId, &XfrmPolicy> = HashMap::with_capacity(policies.len());
    for p in policies {
        want.insert(p.id(), p);
        match have.get(&p.id()) {
            None => ops.add_policies.push(*p),
            Some(k) if *k != p => ops.update_policies.push(*p),
            Some(_) => {}
        }
    }
    for p in kernel_policies.iter().filter(|p| p.is_ours()) {
        if !want.contains_key(&p.id()) {
            ops.delete_policies.push(p.policy);
        }
    }

    let have: BTreeMap<(IpAddr, u32), &DumpedState> = kernel_states
        .iter()
        .filter(|s| s.is_ours())
        .map(|s| (state_key(s.state.dst, s.state.spi), s))
        .collect();
    let mut wanted_keys = BTreeSet::new();
    for (id, desired) in states {
        wanted_keys.insert(state_key(id.dst, id.spi));
        match (have.get(&state_key(id.dst, id.spi)), desired) {
            (None, Some(_)) if installed.contains(id) => ops.missing.push(*id),
            (None, Some(s)) => ops.add_states.push(s.clone()),
            (None, None) => ops.missing.push(*id),
            (Some(k), Some(s)) if same_but_lifetime(&k.state, s) => {
                if k.state.lifetime != s.lifetime {
                    ops.update_states.push(s.clone());
                }
            }
            (Some(_), Some(_)) => ops.conflicts.push(*id),
            (Some(k), None) if k.state.src != id.src => ops.conflicts.push(*id),
            (Some(_), _) => {}
        }
    }
    for s in have.values() {
        if !wanted_keys.contains(&state_key(s.state.dst, s.state.spi)) {
            ops.delete_states.push(s.state.clone());
        }
    }
    ops
}

/// Equal in everything `UPDSA` cannot change (it changes only lifetimes here).
fn same_but_lifetime(a: &XfrmState, b: &XfrmState) -> bool {
    let XfrmState {
        src,
        dst,
        spi,
        reqid,
        mode,
        algorithm,
        replay_window,
        esn,
        lifetime: _,
    } = b;
    a.src == *src
        && a.dst == *dst
        && a.spi == *spi
        && a.reqid == *reqid
        && a.mode == *mode
        && a.algorithm == *algorithm
        && a.replay_window == *replay_window
        && a.esn == *esn
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipsec::plan::REQID;
    use crate::objects::xfrm::{Algorithm, StateCounters};
    use zeroize::Zeroizing;

    fn st(spi: u32, key: u8) -> XfrmState {
        XfrmState::tunnel(
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            spi,
            REQID,
            Algorithm::gcm_aes(Zeroizing::new(vec![key; 20]), 128),
        )
    }

    fn dumped(s: XfrmState) -> DumpedState {
        DumpedState {
            state: s,
            proto: 50,
            counters: StateCounters::default(),
            extras: vec![],
        }
    }

    fn desired(v: &[(XfrmState, bool)]) -> DesiredStates {
        v.iter()
            .map(|(s, keep)| (s.id(), (!keep).then(|| s.clone())))
            .collect()
    }

    #[test]
    fn adds_deletes_and_leaves_equal_and_foreign_alone() {
        let foreign = {
            let mut s = st(0x999, 9);
            s.reqid = 7;
            dumped(s)
        };
        let kernel = vec![dumped(st(0x100, 1)), dumped(st(0x200, 2)), foreign];
        let ops = diff(
            &[],
            &desired(&[(st(0x100, 1), false), (st(0x300, 3), false)]),
            &[],
            &kernel,
            &BTreeSet::new(),
        );
        assert_eq!(ops.add_states, vec![st(0x300, 3)]);
        assert_eq!(ops.delete_states, vec![st(0x200, 2)]);
        assert!(ops.conflicts.is_empty() && ops.missing.is_empty());
    }

    #[test]
    fn no_change_means_no_operation() {
        let kernel = vec![dumped(st(0x100, 1))];
        let ops = diff(
            &[],
            &desired(&[(st(0x100, 1), false)]),
            &[],
            &kernel,
            &BTreeSet::new(),
        );
        assert!(ops.is_empty(), "{ops:?}");
    }

    #[test]
    fn new_lifetime_limits_are_an_update_in_place_not_a_rekey() {
        let mut limited = st(0x100, 1);
        limited.lifetime.hard_secs = Some(3600);
        limited.lifetime.soft_packets = Some(1000);
        let ops = diff(
            &[],
            &desired(&[(limited.clone(), false)]),
            &[],
            &[dumped(st(0x100, 1))],
            &BTreeSet::new(),
        );
        assert_eq!(ops.update_states, vec![limited.clone()]);
        assert!(ops.conflicts.is_empty() && ops.add_states.is_empty());
        // Another key as well: a conflict, never an update.
        let mut other = st(0x100, 2);
        other.lifetime = limited.lifetime;
        let ops = diff(
            &[],
            &desired(&[(other.clone(), false)]),
            &[],
            &[dumped(st(0x100, 1))],
            &BTreeSet::new(),
        );
        assert!(ops.update_states.is_empty());
        assert_eq!(ops.conflicts, vec![other.id()]);
    }

    #[test]
    fn a_different_key_under_an_installed_spi_is_a_conflict_not_an_overwrite() {
        let kernel = vec![dumped(st(0x100, 1))];
        let ops = diff(
            &[],
            &desired(&[(st(0x100, 2), false)]),
            &[],
            &kernel,
            &BTreeSet::new(),
        );
        assert!(ops.is_empty());
        assert_eq!(ops.conflicts, vec![st(0x100, 2).id()]);
    }

    #[test]
    fn kept_states_are_not_touched_and_missing_ones_reported() {
        let kernel = vec![dumped(st(0x100, 1))];
        let ops = diff(
            &[],
            &desired(&[(st(0x100, 7), true), (st(0x400, 1), true)]),
            &[],
            &kernel,
            &BTreeSet::new(),
        );
        assert!(ops.is_empty());
        assert_eq!(ops.missing, vec![st(0x400, 1).id()]);
    }

    #[test]
    fn a_vanished_state_is_missing_not_installed_again_under_its_spi() {
        let installed: BTreeSet<StateId> = [st(0x100, 1).id()].into();
        let want = desired(&[(st(0x100, 1), false), (st(0x200, 2), false)]);
        let ops = diff(&[], &want, &[], &[], &installed);
        assert_eq!(ops.missing, vec![st(0x100, 1).id()]);
        assert_eq!(ops.add_states, vec![st(0x200, 2)], "a new one is added");
    }
}
