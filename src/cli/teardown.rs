//! Removing what encryptd put in the kernel, told apart from everything else: the
//! WireGuard interface (by name) with its policy rules (by table and priority), the
//! XFRM states and policies (by reqid and priority band), the `inet encryptd` table.
//! `encryptd teardown` removes all of it; a daemon starting in one mode removes what
//! the other mode left (a `mode` change is a restart), because IPsec policies would
//! otherwise also catch the WireGuard UDP between the same addresses.
//!
//! Every step runs even when an earlier one failed (netavark's teardown does the same):
//! after a failure, what is left behind is what failed, not everything after it.

use std::fmt::Display;

use crate::kernel::link::Rtnl;
use crate::kernel::wireguard::uapi_socket;
use crate::kernel::xfrm::Xfrm;
use crate::wireguard::plan;

/// What a teardown removed, and why some of it could not be.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report<T> {
    pub removed: T,
    /// One line per failed step, naming it.
    pub errors: Vec<String>,
}

impl<T: Default> Report<T> {
    /// The value of a step, or `None` with its error recorded.
    fn step<V, E: Display>(&mut self, what: &str, r: Result<V, E>) -> Option<V> {
        r.map_err(|e| self.errors.push(format!("{what}: {e}"))).ok()
    }
}

/// Remove WireGuard mode's interface `ifname` (the kernel's, or a userspace
/// implementation's `tun`, which then exits), its policy rules and routes. Removed:
/// (whether the interface was there, the number of rules and routes).
pub fn wireguard(ifname: &str) -> Report<(bool, usize)> {
    let mut out = Report::default();
    let Some(mut r) = out.step("rtnetlink", Rtnl::open()) else {
        return out;
    };
    let link = out.step(&format!("reading link {ifname}"), r.link(ifname));
    let link = link.flatten().filter(|l| match l.kind.as_deref() {
        Some("wireguard") => true,
        Some("tun") => uapi_socket(ifname).exists(),
        _ => false,
    });
    if let Some(l) = &link
        && out
            .step(&format!("deleting link {ifname}"), r.delete_link(l.index))
            .is_some()
    {
        out.removed.0 = true;
    }
    if let Some(rules) = out.step("reading policy rules", r.rules()) {
        let rules: Vec<_> = rules.into_iter().filter(plan::is_our_rule).collect();
        if out
            .step("deleting policy rules", r.delete_rules(&rules))
            .is_some()
        {
            out.removed.1 += rules.len();
        }
    }
    // strict mode's blackhole and throw routes outlive the interface
    for table in [plan::TABLE, plan::BLACKHOLE_TABLE] {
        if let Some(routes) = out.step(&format!("reading routes of table {table}"), r.routes(table))
            && out
                .step(
                    &format!("deleting routes of table {table}"),
                    r.delete_routes(&routes),
                )
                .is_some()
        {
            out.removed.1 += routes.len();
        }
    }
    out
}

/// Remove strict mode's part of WireGuard mode's routing (the blackhole and throw routes,
/// the exception rules), leaving the tunnel. Removed: the number of objects.
pub fn wireguard_strict() -> Report<usize> {
    let mut out = Report::default();
    let Some(mut r) = out.step("rtnetlink", Rtnl::open()) else {
        return out;
    };
    if let Some(rules) = out.step("reading policy rules", r.rules()) {
        let rules: Vec<_> = rules
            .into_iter()
            .filter(|x| {
                plan::is_our_rule(x) && (x.sport.is_some() || x.table == plan::BLACKHOLE_TABLE)
            })
            .collect();
        if out
            .step("deleting policy rules", r.delete_rules(&rules))
            .is_some()
        {
            out.removed += rules.len();
        }
    }
    let table = plan::BLACKHOLE_TABLE;
    if let Some(routes) = out.step(&format!("reading routes of table {table}"), r.routes(table))
        && out
            .step(
                &format!("deleting routes of table {table}"),
                r.delete_routes(&routes),
            )
            .is_some()
    {
        out.removed += routes.len();
    }
    out
}

/// Remove IPsec mode's XFRM policies and states. Removed: (states, policies).
pub fn ipsec() -> Report<(usize, usize)> {
    let mut out = Report::default();
    let Some(mut x) = out.step("XFRM", Xfrm::open()) else {
        return out;
    };
    if let Some(policies) = out.step("reading XFRM policies", x.dump_policies()) {
        let policies: Vec<_> = policies
            .into_iter()
            .filter(|d| d.is_ours())
            .map(|d| d.policy)
            .collect();
        if out
            .step("deleting XFRM policies", x.delete_policies(&policies))
            .is_some()
        {
            out.removed.1 = policies.len();
        }
    }
    if let Some(states) = out.step("reading XFRM states", x.dump_states()) {
        let states: Vec<_> = states
            .into_iter()
            .filter(|d| d.is_ours())
            .map(|d| d.state)
            .collect();
        if out
            .step("deleting XFRM states", x.delete_states(&states))
            .is_some()
        {
            out.removed.0 = states.len();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed step is recorded under its name and the next steps still run.
    #[test]
    fn a_failed_step_does_not_stop_the_rest() {
        let mut out: Report<usize> = Report::default();
        let mut ran = Vec::new();
        for (what, r) in [
            ("first", Ok::<usize, String>(2)),
            ("second", Err("EPERM".into())),
            ("third", Ok(3)),
        ] {
            if let Some(n) = out.step(what, r) {
                out.removed += n;
            }
            ran.push(what);
        }
        assert_eq!(ran, ["first", "second", "third"]);
        assert_eq!(out.removed, 5);
        assert_eq!(out.errors, ["second: EPERM"]);
    }
}
