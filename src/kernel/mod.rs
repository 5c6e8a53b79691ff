//! Thin executors over the kernel's interfaces; no policy decisions live here.

pub mod link;
pub mod netlink;
pub mod nft;
pub mod wireguard;
pub mod xfrm;
