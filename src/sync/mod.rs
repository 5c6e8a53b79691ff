//! `encryptd sync`: this node's registration in etcd, and `nodes.toml` rendered from every
//! registration there. A process of its own (encryptd-sync.service) that never touches the
//! kernel's objects: the daemon notices the rendered file by inotify, as it notices
//! Ansible's. One thread, blocking calls with deadlines.
//!
//! etcd unreachable: the last file stays, and the sync retries under backoff with one log
//! line per change of state, not per retry. Nothing but an explicit delete removes a node
//! (`encryptd sync --deregister`, or an operator's `etcdctl del`).

pub mod etcd;
pub mod registry;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{error, info, warn};

use crate::config::diag::{Diags, Source};
use crate::config::settings::{self, Mode, Sync};
use crate::config::{inventory, wgkey};
use etcd::{Client, Error, Event, WatchEnd};
use registry::{Kv, Registration};

const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// After losing a connected member, other members are tried this long, every
/// `FAILOVER_RETRY`, before etcd is reported unreachable.
const QUIET_FAILOVER: Duration = Duration::from_secs(10);
const FAILOVER_RETRY: Duration = Duration::from_millis(500);
/// `--deregister` gives up after this long without an answer.
const DEREGISTER_DEADLINE: Duration = Duration::from_secs(60);

/// What this node registers, and where its inventory goes.
struct Me {
    name: String,
    key: String,
    value: Vec<u8>,
    prefix: String,
    dir: String,
    mode: Mode,
    inventory: PathBuf,
}

/// The settings and this node's registration, or the problems (printed already).
fn load(config: &Path) -> Result<(Sync, Me), ()> {
    let text = std::fs::read_to_string(config)
        .map_err(|e| eprintln!("{}:1:1: cannot read: {e}", config.display()))?;
    let diags = Diags::default();
    let src = Source::new(config, &text);
    let mut s = settings::read(&src, &diags);
    settings::on_this_machine(&mut s, &src, &diags);
    if !diags.is_empty() {
        for d in diags.into_sorted() {
            eprintln!("{d}");
        }
        return Err(());
    }
    let Some(sync) = s.sync.clone() else {
        eprintln!(
            "{}:1:1: no [sync] table: `encryptd sync` needs the etcd endpoints, the prefix and this node's addresses (see docs/sync.md)",
            config.display()
        );
        return Err(());
    };
    let wireguard_public_key = match s.mode {
        Mode::Ipsec => None,
        // The same key `encryptd pubkey` prints (created on first use, as there).
        Mode::Wireguard => match wgkey::load_or_create(&s.wireguard.private_key) {
            Ok((k, _)) => Some(wgkey::to_base64(&k.public())),
            Err(d) => {
                eprintln!("{d}");
                return Err(());
            }
        },
    };
    let reg = Registration {
        name: s.node.clone(),
        addresses: sync.addresses.iter().map(|a| a.to_string()).collect(),
        subnets: sync.subnets.iter().map(|c| c.to_string()).collect(),
        wireguard_public_key,
    };
    let me = Me {
        key: registry::node_key(&sync.prefix, &s.node),
        dir: registry::nodes_dir(&sync.prefix),
        prefix: sync.prefix.clone(),
        name: s.node,
        value: reg.to_json().into_bytes(),
        mode: s.mode,
        inventory: s.inventory,
    };
    Ok((sync, me))
}

pub fn main(config: &Path, deregister: bool) -> i32 {
    let level =
        crate::logging::level_from(std::env::var(crate::logging::LEVEL_VAR).ok().as_deref());
    crate::logging::init(*level.as_ref().unwrap_or(&log::LevelFilter::Info));
    let Ok((sync, me)) = load(config) else {
        return 1;
    };
    let mut client = match Client::new(&sync) {
        Ok(c) => c,
        Err(e) => {
            error!("{e}");
            return 1;
        }
    };
    if deregister {
        return self::deregister(&mut client, &me);
    }
    Syncer::new(client, me).run()
}

fn deregister(client: &mut Client, me: &Me) -> i32 {
    let t0 = std::time::Instant::now();
    let mut backoff = BACKOFF_FIRST;
    loop {
        match client.delete(&me.key) {
            Ok(true) => {
                info!("deregistered: {} deleted from etcd", me.key);
                return 0;
            }
            Ok(false) => {
                info!("{} was not registered in etcd", me.key);
                return 0;
            }
            Err(Error::Refused(e)) => {
                error!("deregister: {e}");
                return 1;
            }
            Err(Error::Unreachable(e)) if t0.elapsed() + backoff > DEREGISTER_DEADLINE => {
                error!(
                    "deregister: etcd unreachable for {} s, {} not deleted: {e}",
                    DEREGISTER_DEADLINE.as_secs(),
                    me.key
                );
                return 1;
            }
            Err(Error::Unreachable(_)) => {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// The sync's state between sessions.
struct Syncer {
    client: Client,
    me: Me,
    entries: BTreeMap<String, Kv>,
    /// Keys left out at the last rendering, with why (logged when they change).
    reported: BTreeMap<String, String>,
    /// Why this node's own entry was not rendered, last time (logged once).
    own_problem: Option<String>,
    /// What the inventory file holds (not rewritten when a rendering is the same).
    written: String,
    /// The last problem with etcd (`None`: connected).
    down: Option<String>,
    /// When etcd last answered.
    last_ok: Instant,
    /// READY=1 sent: an inventory is in place for the daemon (see [`Syncer::ready`]).
    ready: bool,
}

impl Syncer {
    fn new(client: Client, me: Me) -> Syncer {
        let written = std::fs::read_to_string(&me.inventory).unwrap_or_default();
        Syncer {
            client,
            me,
            entries: BTreeMap::new(),
            reported: BTreeMap::new(),
            own_problem: None,
            written,
            down: Some("starting".into()),
            last_ok: Instant::now(),
            ready: false,
        }
    }

    /// Tell systemd how things stand; READY=1 once an inventory is in place, so that
    /// encryptd.service, ordered after this unit, finds one at its first boot, and with
    /// a file from an earlier run, at once (etcd may be down: the file serves).
    fn status(&mut self, status: &str) {
        use sd_notify::NotifyState;
        let ready = !self.ready && !self.written.is_empty();
        let status = NotifyState::Status(status);
        if ready {
            self.ready = true;
            crate::daemon::notify::notify(&[NotifyState::Ready, status]);
        } else {
            crate::daemon::notify::notify(&[status]);
        }
    }

    fn run(mut self) -> i32 {
        info!(
            "registering {} at {} ({} endpoint(s)); rendering {}",
            self.me.name,
            self.me.key,
            self.client.endpoints(),
            self.me.inventory.display()
        );
        self.status("connecting to etcd");
        let mut backoff = BACKOFF_FIRST;
        loop {
            match self.session(&mut backoff) {
                Ok(()) => {}
                Err(e) => {
                    let what = match &e {
                        Error::Unreachable(_) => "etcd unreachable",
                        Error::Refused(_) => "etcd refused",
                    };
                    // A member that stops ends its watches, and the cluster may take a few
                    // seconds to elect another leader: quiet while the others carry on.
                    let quiet = self.down.is_none() && self.last_ok.elapsed() < QUIET_FAILOVER;
                    if !quiet && self.down.as_deref() != Some(what) {
                        if self.down.is_none() || self.down.as_deref() == Some("starting") {
                            warn!(
                                "{what} ({e}): {} stays as it is; retrying with backoff up to {} s",
                                self.me.inventory.display(),
                                BACKOFF_MAX.as_secs()
                            );
                        } else {
                            warn!("{what} ({e}); retrying");
                        }
                        self.down = Some(what.into());
                        let s = format!("{what}; {} kept as it is", self.me.inventory.display());
                        self.status(&s);
                    }
                    std::thread::sleep(if quiet { FAILOVER_RETRY } else { backoff });
                    if !quiet {
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
        }
    }

    /// Read everything, register if needed, then follow the watch until it fails
    /// (`Err`) or must be re-read (`Ok`: compacted or cancelled).
    fn session(&mut self, backoff: &mut Duration) -> Result<(), Error> {
        let (mut entries, mut rev) = self.client.range(&self.me.dir)?;
        if entries.get(&self.me.key).map(|kv| &kv.value) != Some(&self.me.value) {
            self.client.put(&self.me.key, &self.me.value)?;
            info!("registered {} in etcd", self.me.key);
            (entries, rev) = self.client.range(&self.me.dir)?;
        }
        self.entries = entries;
        self.last_ok = Instant::now();
        if self.down.take().is_some() {
            info!(
                "etcd reachable at {}: {} registration(s)",
                self.client.endpoint(),
                self.entries.len()
            );
        }
        *backoff = BACKOFF_FIRST;
        self.publish();
        let mut from = rev + 1;
        loop {
            let mut watch = self.client.watch(&self.me.dir, from)?;
            self.last_ok = Instant::now();
            loop {
                match watch.message() {
                    Ok(msg) => {
                        self.last_ok = Instant::now();
                        if msg.canceled {
                            return Ok(());
                        }
                        if msg.events.is_empty() {
                            continue;
                        }
                        for e in msg.events {
                            match e {
                                Event::Put(k, kv, m) => {
                                    from = from.max(m + 1);
                                    self.entries.insert(k, kv);
                                }
                                Event::Delete(k, m) => {
                                    from = from.max(m + 1);
                                    if k == self.me.key {
                                        warn!(
                                            "this node's registration {k} was deleted in etcd: it is not registered again until encryptd-sync restarts"
                                        );
                                    }
                                    self.entries.remove(&k);
                                }
                            }
                        }
                        self.publish();
                    }
                    // Quiet, or a member gone without a word: watch again from here.
                    Err(WatchEnd::Idle) => break,
                    Err(WatchEnd::Failed(e)) => {
                        self.client.next_endpoint();
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Render the inventory and write it if it changed; report what was left out.
    fn publish(&mut self) {
        let r = registry::render(&self.entries, &self.me.prefix, self.me.mode);
        for (k, why) in &r.rejected {
            if self.reported.get(k) != Some(why) {
                error!("left out of the inventory: {k}: {why}");
            }
        }
        for k in self.reported.keys() {
            if !r.rejected.contains_key(k) && self.entries.contains_key(k) {
                info!("{k} is in the inventory now");
            }
        }
        self.reported = r.rejected.clone();
        if !r.accepted.contains(&self.me.name) {
            let why = r
                .rejected
                .get(&self.me.key)
                .cloned()
                .unwrap_or_else(|| "not registered".into());
            if self.own_problem.as_ref() != Some(&why) {
                error!(
                    "this node's own registration is not in the inventory ({why}): {} stays as it is (the daemon cannot run on an inventory without its node)",
                    self.me.inventory.display()
                );
                self.own_problem = Some(why);
            }
            return;
        }
        self.own_problem = None;
        if r.toml != self.written {
            self.write(&r);
        }
        let s = format!(
            "{} node(s) from etcd at {}, {} left out",
            r.accepted.len(),
            self.client.endpoint(),
            r.rejected.len()
        );
        self.status(&s);
    }

    fn write(&mut self, r: &registry::Rendered) {
        // The whole file, as `encryptd check` and the daemon will read it.
        let diags = Diags::default();
        inventory::read(
            &Source::new(&self.me.inventory, &r.toml),
            &diags,
            self.me.mode,
        );
        if let Some(d) = diags.into_sorted().into_iter().next() {
            error!("the rendered inventory does not validate, not written: {d}");
            return;
        }
        match crate::files::replace_readable(&self.me.inventory, r.toml.as_bytes()) {
            Ok(()) => {
                info!(
                    "wrote {}: {} node(s), {} left out",
                    self.me.inventory.display(),
                    r.accepted.len(),
                    r.rejected.len()
                );
                self.written = r.toml.clone();
            }
            Err(e) => error!("cannot write {}: {e}", self.me.inventory.display()),
        }
    }
}
