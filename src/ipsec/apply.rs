//! The one ordered executor of an XFRM diff: the engine's, and the benchmark's, so that
//! what is measured is what runs.

use std::time::{Duration, Instant};

use crate::ipsec::reconcile::Ops;
use crate::kernel::xfrm::{Xfrm, XfrmError};

/// How long the policy and the state halves took (the benchmark reports them).
#[derive(Debug, Default, Clone, Copy)]
pub struct Timings {
    pub policies: Duration,
    pub states: Duration,
}

/// Send `ops`. Policies first, so traffic is dropped rather than leaked while SAs change;
/// new SAs before old ones go; stale policies last, once nothing needs them.
pub fn apply(x: &mut Xfrm, ops: &Ops) -> Result<Timings, XfrmError> {
    let t = Instant::now();
    x.add_policies(&ops.add_policies)?;
    x.update_policies(&ops.update_policies)?;
    let policies = t.elapsed();
    let t = Instant::now();
    x.add_states(&ops.add_states)?;
    x.update_states(&ops.update_states)?;
    x.delete_states(&ops.delete_states)?;
    let states = t.elapsed();
    let t = Instant::now();
    x.delete_policies(&ops.delete_policies)?;
    Ok(Timings {
        policies: policies + t.elapsed(),
        states,
    })
}
