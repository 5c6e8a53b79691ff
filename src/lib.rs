//! encryptd: kernel IPsec/WireGuard between the nodes of a fleet, with a strict mode that
//! drops what would leave or arrive unencrypted.
//!
//! Functional core, imperative shell: `config` turns files into a validated model; each
//! mode's `plan` (and IPsec's `reconcile`, `peer`, `hello`) is pure and speaks the
//! vocabulary of `objects`; `kernel` holds the codecs and executors, touched only by the
//! engine shells (`ipsec`, `wireguard`, `strict`), `daemon` (the one poll loop) and `cli`.

/// This build's version, and the commit it was built from (build.rs).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const COMMIT: &str = env!("ENCRYPTD_COMMIT");

pub mod cli;
pub mod config;
pub mod daemon;
pub mod files;
#[doc(hidden)]
pub mod fuzz;
pub mod ipsec;
pub mod kernel;
pub mod logging;
pub mod net;
pub mod objects;
pub mod random;
pub mod strict;
pub mod sync;
pub mod wireguard;
