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
use crate::kernel::wireguard::userspace_backend;
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

    /// Of what was read (`dumped`), delete the objects `ours` keeps with `delete`. The
    /// number deleted; 0 when reading or deleting failed (recorded, naming `what`).
    fn remove<D, O, E: Display, F: Display>(
        &mut self,
        what: &str,
        dumped: Result<Vec<D>, E>,
        ours: impl FnMut(D) -> Option<O>,
        delete: impl FnOnce(&[O]) -> Result<(), F>,
    ) -> usize {
        let Some(dumped) = self.step(&format!("reading {what}"), dumped) else {
            return 0;
        };
        let ours: Vec<O> = dumped.into_iter().filter_map(ours).collect();
        match delete(&ours) {
            Ok(()) => ours.len(),
            Err(e) => {
                self.errors.push(format!("deleting {what}: {e}"));
                0
            }
        }
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
    let link = link
        .flatten()
        .filter(|l| userspace_backend(ifname, l.kind.as_deref()).is_some());
    if let Some(l) = &link
        && out
            .step(&format!("deleting link {ifname}"), r.delete_link(l.index))
            .is_some()
    {
        out.removed.0 = true;
    }
    out.removed.1 += out.remove(
        "policy rules",
        r.rules(),
        |x| plan::is_our_rule(&x).then_some(x),
        |rules| r.delete_rules(rules),
    );
    // strict mode's blackhole and throw routes outlive the interface
    for table in [plan::TABLE, plan::BLACKHOLE_TABLE] {
        out.removed.1 += out.remove(
            &format!("routes of table {table}"),
            r.routes(table),
            Some,
            |routes| r.delete_routes(routes),
        );
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
    out.removed += out.remove(
        "policy rules",
        r.rules(),
        |x| {
            (plan::is_our_rule(&x) && (x.sport.is_some() || x.table == plan::BLACKHOLE_TABLE))
                .then_some(x)
        },
        |rules| r.delete_rules(rules),
    );
    let table = plan::BLACKHOLE_TABLE;
    out.removed += out.remove(
        &format!("routes of table {table}"),
        r.routes(table),
        Some,
        |routes| r.delete_routes(routes),
    );
    out
}

/// Remove IPsec mode's XFRM policies and states. Removed: (states, policies).
pub fn ipsec() -> Report<(usize, usize)> {
    let mut out = Report::default();
    let Some(mut x) = out.step("XFRM", Xfrm::open()) else {
        return out;
    };
    out.removed.1 = out.remove(
        "XFRM policies",
        x.dump_policies(),
        |d| d.is_ours().then_some(d.policy),
        |p| x.delete_policies(p),
    );
    out.removed.0 = out.remove(
        "XFRM states",
        x.dump_states(),
        |d| d.is_ours().then_some(d.state),
        |st| x.delete_states(st),
    );
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

    /// Only our objects are deleted and counted; a failed read or delete is named.
    #[test]
    fn remove_deletes_ours_and_names_what_failed() {
        let mut out: Report<usize> = Report::default();
        let mut deleted = Vec::new();
        out.removed += out.remove(
            "things",
            Ok::<_, String>(vec![1, 2, 3, 4]),
            |n| (n % 2 == 0).then_some(n),
            |ours| {
                deleted.extend_from_slice(ours);
                Ok::<(), String>(())
            },
        );
        assert_eq!((out.removed, deleted), (2, vec![2, 4]));
        out.removed += out.remove(
            "rules",
            Err::<Vec<u8>, _>("EPERM".to_string()),
            Some,
            |_| -> Result<(), String> { panic!("nothing read, nothing to delete") },
        );
        out.removed += out.remove("routes", Ok::<_, String>(vec![7]), Some, |_| {
            Err::<(), _>("EBUSY".to_string())
        });
        assert_eq!(out.removed, 2);
        assert_eq!(
            out.errors,
            ["reading rules: EPERM", "deleting routes: EBUSY"]
        );
    }
}
