//! The kernel vocabulary, pure: the objects the planners produce and the reconcilers
//! diff, with no netlink in them. The executors in [`crate::kernel`] encode and decode
//! them.

pub mod route;
pub mod wireguard;
pub mod xfrm;
