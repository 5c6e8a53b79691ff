//! Removing what encryptd put in the kernel, told apart from everything else: the
//! WireGuard interface (by name) with its policy rules (by table and priority), the
//! XFRM states and policies (by reqid and priority band), the `inet encryptd` table.
//! `encryptd teardown` removes all of it; a daemon starting in one mode removes what
//! the other mode left (a `mode` change is a restart), because IPsec policies would
//! otherwise also catch the WireGuard UDP between the same addresses.

use crate::kernel::link::{LinkError, Rtnl};
use crate::kernel::wireguard::uapi_socket;
use crate::kernel::xfrm::{Xfrm, XfrmError};
use crate::wgplan;

/// Remove WireGuard mode's interface `ifname` (the kernel's, or a userspace
/// implementation's `tun`, which then exits), its policy rules and routes. Returns
/// (whether the interface was there, the number of rules and routes removed).
pub fn wireguard(ifname: &str) -> Result<(bool, usize), LinkError> {
    let mut r = Rtnl::open()?;
    let link = r.link(ifname)?.filter(|l| match l.kind.as_deref() {
        Some("wireguard") => true,
        Some("tun") => uapi_socket(ifname).exists(),
        _ => false,
    });
    if let Some(l) = &link {
        r.delete_link(l.index)?;
    }
    let rules: Vec<_> = r.rules()?.into_iter().filter(wgplan::is_our_rule).collect();
    r.delete_rules(&rules)?;
    // strict mode's blackhole and throw routes outlive the interface
    let mut routes = r.routes(wgplan::TABLE)?;
    routes.extend(r.routes(wgplan::BLACKHOLE_TABLE)?);
    r.delete_routes(&routes)?;
    Ok((link.is_some(), rules.len() + routes.len()))
}

/// Remove strict mode's part of WireGuard mode's routing (the blackhole and throw routes,
/// the exception rules), leaving the tunnel; the number of objects removed.
pub fn wireguard_strict() -> Result<usize, LinkError> {
    let mut r = Rtnl::open()?;
    let rules: Vec<_> = r
        .rules()?
        .into_iter()
        .filter(|x| {
            wgplan::is_our_rule(x) && (x.sport.is_some() || x.table == wgplan::BLACKHOLE_TABLE)
        })
        .collect();
    r.delete_rules(&rules)?;
    let routes = r.routes(wgplan::BLACKHOLE_TABLE)?;
    r.delete_routes(&routes)?;
    Ok(rules.len() + routes.len())
}

/// Remove IPsec mode's XFRM policies and states. Returns (states, policies) removed.
pub fn ipsec() -> Result<(usize, usize), XfrmError> {
    let mut x = Xfrm::open()?;
    let states: Vec<_> = x
        .dump_states()?
        .into_iter()
        .filter(|d| d.is_ours())
        .map(|d| d.state)
        .collect();
    let policies: Vec<_> = x
        .dump_policies()?
        .into_iter()
        .filter(|d| d.is_ours())
        .map(|d| d.policy)
        .collect();
    x.delete_policies(&policies)?;
    x.delete_states(&states)?;
    Ok((states.len(), policies.len()))
}
