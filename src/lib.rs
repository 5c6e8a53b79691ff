//! encryptd: kernel IPsec/WireGuard between the nodes of a fleet, with a strict mode that
//! drops what would leave or arrive unencrypted.
//!
//! Functional core, imperative shell: `config` turns files into a validated model, `plan`
//! and `reconcile` are pure, `kernel` holds the thin executors, `daemon` the one poll loop.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod files;
pub mod hello;
pub mod ipsec;
pub mod kernel;
pub mod keys;
pub mod logging;
pub mod net;
pub mod peer;
pub mod plan;
pub mod reconcile;
pub mod status;
pub mod strict;
pub mod teardown;
pub mod watch;
pub mod wgplan;
pub mod wireguard;
