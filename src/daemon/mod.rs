//! `encryptd run`: one thread, one `mio::Poll` holding the inotify fd and the signals;
//! timers are the poll timeout. A configuration is swapped in only when it is valid as a
//! whole; otherwise the last good one stays in force and STATUS= says so.

pub mod engine;
pub mod metrics;
pub mod notify;
pub mod watch;

use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use sd_notify::NotifyState;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

use self::engine::Engine;
use self::notify::notify;
use self::watch::Watcher;
use crate::config::{self, Config, Diagnostic, Mode, Paths};
use crate::{ipsec, wireguard};

const INOTIFY: Token = Token(0);
const SIGNALS: Token = Token(1);
const HELLO: Token = Token(2);
const NFTABLES: Token = Token(3);

/// Whether the loop goes on after an event.
#[derive(PartialEq, Eq)]
enum Flow {
    Go,
    Stop,
}

/// After an nftables notification, check the strict table this much later: one check
/// for a burst of changes (a ruleset reload is many), well within a second.
const STRICT_CHECK_DELAY: Duration = Duration::from_millis(20);

/// READY=1 waits at most this long, after the engine has configured the kernel, for
/// peers to come up (peers that do not run encryptd yet must not hold the boot of this
/// one).
const READY_WAIT: Duration = Duration::from_secs(10);

/// The status snapshot is rewritten on every change and at least this often.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(10);

/// Editors and config management touch a file several times in a row (write, rename,
/// chmod); wait this long after the last event before reading.
const DEBOUNCE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Engine(#[from] engine::Error),
    #[error("strict mode: {0}")]
    Strict(#[from] crate::kernel::nft::NftError),
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Io { what, source }
}

pub fn run(paths: Paths) -> i32 {
    let level =
        crate::logging::level_from(std::env::var(crate::logging::LEVEL_VAR).ok().as_deref());
    crate::logging::init(*level.as_ref().unwrap_or(&log::LevelFilter::Info));
    match level {
        Err(e) => warn!("{e}"),
        Ok(l) if l > log::LevelFilter::Info => {
            info!("log level {l} ({})", crate::logging::LEVEL_VAR)
        }
        Ok(_) => {}
    }
    let config = match config::load(&paths) {
        Ok(c) => c,
        Err(diags) => {
            for d in &diags {
                error!("{d}");
            }
            let status = format!(
                "refusing to start: {} problem(s) in the configuration, first: {}",
                diags.len(),
                diags[0]
            );
            error!("{status}");
            notify(&[NotifyState::Status(&status)]);
            return 1;
        }
    };
    match Daemon::new(paths, config).and_then(Daemon::run) {
        Ok(()) => 0,
        Err(e) => {
            error!("{e}");
            notify(&[NotifyState::Status(&format!("failed: {e}"))]);
            1
        }
    }
}

struct Daemon {
    paths: Paths,
    config: Config,
    /// Why the newest files were not applied, while that is so.
    refused: Option<String>,
    /// Why the metrics file cannot be written, while that is so: logged when it starts
    /// and when it ends, not every 10 s.
    metrics_failing: Option<String>,
    watcher: Watcher,
    reload_at: Option<Instant>,
    /// Interval and next deadline of WATCHDOG=1 pings.
    watchdog: Option<(Duration, Instant)>,
    engine: Option<Engine>,
    strict: crate::strict::Strict,
    /// nftables' notifications, to notice another program removing the table.
    nft_monitor: Option<crate::kernel::nft::Monitor>,
    /// When to check the strict table in the kernel next.
    strict_check_at: Option<Instant>,
    /// The STATUS= line last sent, so that a change (a peer up or down) is sent once.
    last_status: String,
    /// Next periodic rewrite of the status snapshot.
    snapshot_at: Instant,
    /// Until READY=1 is sent: the latest time to send it.
    ready_by: Option<Instant>,
    /// The poll loop's registry, for sockets opened after the start (the hello sockets
    /// follow this node's addresses).
    registry: Option<mio::Registry>,
}

impl Daemon {
    fn new(paths: Paths, config: Config) -> Result<Daemon, Error> {
        let watchdog = sd_notify::watchdog_enabled().map(|usec| (usec / 2, Instant::now()));
        Ok(Daemon {
            paths,
            config,
            refused: None,
            metrics_failing: None,
            watcher: Watcher::new().map_err(io_err("inotify"))?,
            reload_at: None,
            watchdog,
            engine: None,
            strict: Default::default(),
            nft_monitor: None,
            strict_check_at: None,
            last_status: String::new(),
            snapshot_at: Instant::now(),
            ready_by: Some(Instant::now() + READY_WAIT),
            registry: None,
        })
    }

    /// The files whose change means a reload.
    fn watched_files(&self) -> Vec<PathBuf> {
        let s = &self.config.settings;
        let mut v = vec![self.paths.config.clone(), s.inventory.clone()];
        if self.config.keys.is_some() {
            v.push(s.ipsec.keys.clone());
        }
        if s.mode == Mode::Wireguard {
            v.push(s.wireguard.private_key.clone());
            v.extend(s.wireguard.preshared_key.clone());
        }
        v
    }

    /// What the other mode left in the kernel (the node ran it before a `mode` change).
    fn remove_other_mode(&self) {
        match self.config.settings.mode {
            Mode::Ipsec => {
                let ifname = &self.config.settings.wireguard.interface;
                let r = crate::cli::teardown::wireguard(ifname);
                match r.removed {
                    (false, 0) => {}
                    (link, rules) => warn!(
                        "mode ipsec: removed what mode wireguard left: {}{rules} policy rule(s)",
                        if link {
                            format!("interface {ifname}, ")
                        } else {
                            String::new()
                        }
                    ),
                }
                for e in r.errors {
                    error!("mode ipsec: removing mode wireguard's objects: {e}");
                }
            }
            Mode::Wireguard => {
                let r = crate::cli::teardown::ipsec();
                match r.removed {
                    (0, 0) => {}
                    (states, policies) => warn!(
                        "mode wireguard: removed what mode ipsec left: {policies} XFRM policies, {states} XFRM states"
                    ),
                }
                for e in r.errors {
                    error!("mode wireguard: removing mode ipsec's objects: {e}");
                }
            }
        }
    }

    fn rewatch(&mut self) {
        let files = self.watched_files();
        let refs: Vec<&std::path::Path> = files.iter().map(PathBuf::as_path).collect();
        for (dir, e) in self.watcher.set_files(&refs) {
            warn!(
                "cannot watch {}: {e}; changes there are picked up on `systemctl reload` only",
                dir.display()
            );
        }
    }

    fn status_line(&self) -> String {
        let s = &self.config.settings;
        let (up, peers) = match &self.engine {
            Some(e) => e.peers_up(&self.config),
            None => (0, self.config.inventory.peers(&s.node).count()),
        };
        let mut line = format!("{}: {up}/{peers} peers up", s.mode.as_str());
        if let Some(k) = self.config.keys.as_ref().and_then(|k| k.current()) {
            line += &format!(", key {}", k.id);
        }
        line += if s.strict.enabled {
            ", strict on"
        } else {
            ", strict off"
        };
        if let Some(r) = &self.refused {
            line += &format!("; newest configuration refused ({r}), running the last good one");
        }
        line
    }

    fn run(mut self) -> Result<(), Error> {
        let mut poll = Poll::new().map_err(io_err("poll"))?;
        let mut signals = Signals::new([SIGHUP, SIGTERM, SIGINT]).map_err(io_err("signals"))?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .map_err(io_err("register signals"))?;
        self.start(&poll)?;
        let mut events = Events::with_capacity(16);
        loop {
            let timeout = self
                .next_deadline()
                .map(|t| t.saturating_duration_since(Instant::now()));
            if let Err(e) = poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Io {
                    what: "poll",
                    source: e,
                });
            }
            for ev in events.iter() {
                if self.on_event(ev.token(), &mut signals)? == Flow::Stop {
                    return Ok(());
                }
            }
            self.on_timers(Instant::now())?;
        }
    }

    /// Register what the loop waits for; put the strict rules in, then start the engine.
    fn start(&mut self, poll: &Poll) -> Result<(), Error> {
        let ifd = self.watcher.as_raw_fd();
        poll.registry()
            .register(&mut SourceFd(&ifd), INOTIFY, Interest::READABLE)
            .map_err(io_err("register inotify"))?;
        self.rewatch();
        // Subscribed before the table goes in, so that no removal goes unseen.
        match crate::kernel::nft::Monitor::open() {
            Ok(m) => {
                poll.registry()
                    .register(&mut SourceFd(&m.as_raw_fd()), NFTABLES, Interest::READABLE)
                    .map_err(io_err("register nftables notifications"))?;
                self.nft_monitor = Some(m);
            }
            Err(e) => warn!(
                "nftables notifications unavailable ({e}): the strict table is checked every {} s only",
                SNAPSHOT_EVERY.as_secs()
            ),
        }
        // Strict rules go in before any tunnel: nothing may leave in plaintext while the
        // tunnels are being built. If they cannot be installed, the daemon does not start.
        self.strict.apply(
            &crate::strict::plan::ruleset(&self.config),
            &self.config.settings.state_dir,
        )?;
        self.remove_other_mode();
        match self.config.settings.mode {
            Mode::Ipsec => {
                let engine = ipsec::Engine::start(&self.config).map_err(engine::Error::from)?;
                self.registry = Some(poll.registry().try_clone().map_err(io_err("poll"))?);
                let mut engine = Engine::Ipsec(engine);
                self.register_hello(&engine)?;
                engine.tick(&self.config, Instant::now())?;
                self.engine = Some(engine);
            }
            Mode::Wireguard => {
                let engine = wireguard::Engine::start(&self.config).map_err(engine::Error::from)?;
                self.registry = Some(poll.registry().try_clone().map_err(io_err("poll"))?);
                let engine = Engine::Wireguard(engine);
                self.register_hello(&engine)?;
                self.engine = Some(engine);
            }
        }

        // The wait for peers counts from when the tunnels are configured: a slow start
        // (the kernel busy, a big inventory) must not use it up.
        self.ready_by = Some(Instant::now() + READY_WAIT);
        for w in config::warnings(&self.config) {
            warn!("{}: {w}", self.paths.config.display());
        }
        let me = self.config.me();
        info!(
            "started: mode {}, node {} ({}), {} peers",
            self.config.settings.mode.as_str(),
            me.name,
            me.addresses
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            self.config.inventory.nodes.len() - 1
        );
        Ok(())
    }

    /// The soonest timer: a debounced reload, the watchdog, the wait for READY, a strict
    /// check, the snapshot, the engine's own.
    fn next_deadline(&self) -> Option<Instant> {
        [
            self.reload_at,
            self.watchdog.map(|w| w.1),
            self.ready_by,
            self.strict_check_at,
            Some(self.snapshot_at),
            self.engine.as_ref().and_then(Engine::next_deadline),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn on_event(&mut self, token: Token, signals: &mut Signals) -> Result<Flow, Error> {
        match token {
            INOTIFY => {
                let changed = self.watcher.changed().map_err(io_err("inotify read"))?;
                if !changed.is_empty() {
                    self.reload_at = Some(Instant::now() + DEBOUNCE);
                }
            }
            SIGNALS => {
                for sig in signals.pending() {
                    match sig {
                        SIGHUP => self.reload("SIGHUP"),
                        _ => {
                            info!("stopping on signal {sig}");
                            notify(&[NotifyState::Stopping]);
                            self.on_stop();
                            return Ok(Flow::Stop);
                        }
                    }
                }
            }
            NFTABLES => {
                let n = self.nft_monitor.as_mut().map_or(0, |m| m.drain());
                if n > 0 && self.strict.is_on() && self.strict_check_at.is_none() {
                    self.strict_check_at = Some(Instant::now() + STRICT_CHECK_DELAY);
                }
            }
            HELLO => {
                if let Some(e) = &mut self.engine
                    && e.on_readable(&self.config)
                    && let Err(err) = e.apply(&self.config)
                {
                    error!("reconcile: {err}");
                }
            }
            _ => {}
        }
        Ok(Flow::Go)
    }

    /// Put the engine's hello sockets (and XFRM watch) on the poll loop, again after a
    /// reconfiguration that may have opened new ones; those it closed left the loop
    /// when they were closed.
    fn register_hello(&self, engine: &Engine) -> Result<(), Error> {
        let Some(reg) = &self.registry else {
            return Ok(());
        };
        for fd in engine.hello_fds() {
            let r = match reg.register(&mut SourceFd(&fd), HELLO, Interest::READABLE) {
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    reg.reregister(&mut SourceFd(&fd), HELLO, Interest::READABLE)
                }
                r => r,
            };
            r.map_err(io_err("register hello socket"))?;
        }
        Ok(())
    }

    /// Whatever is due at `now`, after the events of one wake-up.
    fn on_timers(&mut self, now: Instant) -> Result<(), Error> {
        if let Some(e) = &mut self.engine {
            e.tick(&self.config, now)?;
        }
        self.maybe_ready(now);
        if self.ready_by.is_none() {
            let status = self.status_line();
            if status != self.last_status {
                notify(&[NotifyState::Status(&status)]);
                self.last_status = status;
                self.snapshot_at = now;
            }
        }
        if self.strict_check_at.is_some_and(|t| t <= now) {
            self.strict_check_at = None;
            if self.strict.verify() {
                // `encryptd status` and the metrics say so now, not at the next
                // periodic write
                self.snapshot_at = Instant::now();
            }
        }
        if self.snapshot_at <= now {
            // the backstop, should a notification have been missed
            self.strict.verify();
            self.write_snapshot(now);
            self.snapshot_at = now + SNAPSHOT_EVERY;
        }
        if self.reload_at.is_some_and(|t| t <= now) {
            self.reload_at = None;
            self.reload("a file change");
        }
        if let Some((every, due)) = &mut self.watchdog
            && *due <= now
        {
            notify(&[NotifyState::Watchdog]);
            *due = now + *every;
        }
        Ok(())
    }

    /// The state `encryptd status` shows, in the runtime directory.
    fn write_snapshot(&mut self, now: Instant) {
        let c = &self.config;
        let hello = self.engine.as_ref().and_then(|e| e.hello_stats());
        let (keys_in_use, max_seq) = self
            .engine
            .as_ref()
            .and_then(|e| e.sa_summary())
            .unwrap_or_default();
        let snap = crate::cli::status::Snapshot {
            version: crate::VERSION.into(),
            commit: crate::COMMIT.into(),
            mode: c.settings.mode.as_str().into(),
            node: c.settings.node.clone(),
            pid: std::process::id(),
            written: crate::cli::status::now_secs(),
            status_line: self.status_line(),
            current_key_id: c.keys.as_ref().and_then(|k| k.current()).map(|k| k.id),
            rotation_limit_secs: match c.settings.mode {
                Mode::Ipsec => c.settings.ipsec.key_rotation_duration.as_secs() + 60,
                Mode::Wireguard => 0,
            },
            strict: self.strict.is_on(),
            strict_reinstalls: self.strict.reinstalls(),
            strict_in_kernel: self.strict.verified(),
            config_refused: self.refused.clone(),
            peers: self
                .engine
                .as_ref()
                .map(|e| e.peer_statuses(c, now))
                .unwrap_or_default(),
            hello_received: hello.map_or(0, |h| h.received),
            hello_accepted: hello.map_or(0, |h| h.accepted),
            hello_duplicates: hello.map_or(0, |h| h.duplicates),
            hello_dropped: hello
                .map(|h| h.dropped.iter().map(|(k, v)| (k.to_string(), *v)).collect())
                .unwrap_or_default(),
            keys_in_use,
            sa_rekeys: self.engine.as_ref().map_or(0, |e| e.rekeys()),
            xfrm_dumps: self.engine.as_ref().map_or(0, |e| e.xfrm_dumps()),
            rtnl_dumps: self.engine.as_ref().map_or(0, |e| e.rtnl_dumps()),
            hello_socket_overflows: self.engine.as_ref().map_or(0, |e| e.socket_overflows(c)),
            max_seq,
        };
        if let Err(e) = crate::cli::status::write(&c.settings.runtime_dir, &snap) {
            warn!("writing {}: {e}", c.settings.runtime_dir.display());
        }
        if let Some(path) = &c.settings.metrics_path {
            let text =
                metrics::metrics(&snap, &self.kernel_counters(), c.settings.metrics_per_peer);
            match metrics::write_metrics(path, &text) {
                Err(e) => {
                    let e = format!("writing metrics to {}: {e}", path.display());
                    if self.metrics_failing.as_ref() != Some(&e) {
                        warn!(
                            "{e} (the unit may write to /var/lib/prometheus/node-exporter; another directory needs ReadWritePaths=)"
                        );
                        self.metrics_failing = Some(e);
                    }
                }
                Ok(()) => {
                    if self.metrics_failing.take().is_some() {
                        info!("writing metrics to {} again", path.display());
                    }
                }
            }
        }
    }

    /// What the metrics add from the kernel: xfrm_stat (a file read) and the strict
    /// drop counters, from the listing the table check just before took.
    fn kernel_counters(&self) -> metrics::KernelCounters {
        metrics::KernelCounters {
            xfrm_stat: crate::cli::status::xfrm_stat(),
            strict_drops: metrics::strict_drop_totals(&self.strict.counters()),
        }
    }

    fn on_stop(&mut self) {
        let s = &self.config.settings;
        self.strict.on_stop(
            s.strict.keep_on_stop,
            s.mode == Mode::Wireguard,
            &s.state_dir,
        );
    }

    /// READY=1 once every peer is up, or after READY_WAIT for those that are not.
    fn maybe_ready(&mut self, now: Instant) {
        let Some(by) = self.ready_by else {
            return;
        };
        let (up, total) = self
            .engine
            .as_ref()
            .map_or((0, 0), |e| e.peers_up(&self.config));
        if up == total || now >= by {
            self.ready_by = None;
            if up < total {
                warn!("ready with {up}/{total} peers up; the others come up when they answer");
            }
            notify(&[NotifyState::Ready, NotifyState::Status(&self.status_line())]);
        }
    }

    /// Re-read every file; apply only a configuration that is valid as a whole.
    fn reload(&mut self, why: &str) {
        let mut states = vec![NotifyState::Reloading];
        states.extend(NotifyState::monotonic_usec_now().ok());
        notify(&states);
        let loaded = config::load(&self.paths).and_then(|new| {
            let mut problems = config::check_key_change(&self.config, &new);
            problems.extend(config::check_mode_change(
                &self.config,
                &new,
                &self.paths.config,
            ));
            if problems.is_empty() {
                Ok(new)
            } else {
                Err(problems)
            }
        });
        // The new strict table must install before the new configuration counts as applied.
        let loaded = loaded.and_then(|new| {
            let table = crate::strict::plan::ruleset(&new);
            match self.strict.apply(&table, &self.config.settings.state_dir) {
                Ok(()) => Ok(new),
                Err(e) => Err(vec![config::diag::file_diag(
                    &self.paths.config,
                    e.to_string(),
                )]),
            }
        });
        match loaded {
            Ok(new) => {
                self.refused = None;
                if new == self.config {
                    info!("reload after {why}: configuration unchanged");
                } else {
                    info!(
                        "configuration reloaded after {why}: {}",
                        describe_change(&self.config, &new)
                    );
                    self.config = new;
                    self.rewatch();
                    if let Some(mut e) = self.engine.take() {
                        match e.reconfigure(&self.config) {
                            Ok(n) => info!("applied: {n} kernel object(s) changed"),
                            Err(err) => error!("applying the new configuration: {err}"),
                        }
                        if let Err(err) = self.register_hello(&e) {
                            error!("{err}");
                        }
                        self.engine = Some(e);
                    }
                }
            }
            Err(diags) => {
                for d in &diags {
                    error!("reload refused: {d}");
                }
                warn!(
                    "keeping the last good configuration ({} problem(s) in the new files)",
                    diags.len()
                );
                self.refused = Some(summary(&diags));
            }
        }
        if self.ready_by.is_none() {
            notify(&[NotifyState::Ready, NotifyState::Status(&self.status_line())]);
        }
    }
}

fn summary(diags: &[Diagnostic]) -> String {
    match diags {
        [one] => one.to_string(),
        [first, rest @ ..] => format!("{first} and {} more", rest.len()),
        [] => "no details".into(),
    }
}

/// One line on what a reload changes, for the journal.
fn describe_change(old: &Config, new: &Config) -> String {
    let names =
        |c: &Config| -> Vec<String> { c.inventory.nodes.iter().map(|n| n.name.clone()).collect() };
    let (o, n) = (names(old), names(new));
    let mut parts = Vec::new();
    let added: Vec<_> = n.iter().filter(|x| !o.contains(x)).cloned().collect();
    let removed: Vec<_> = o.iter().filter(|x| !n.contains(x)).cloned().collect();
    let changed: Vec<_> = new
        .inventory
        .nodes
        .iter()
        .filter(|nn| {
            old.inventory.node(&nn.name).is_some_and(|on| {
                on.addresses != nn.addresses
                    || on.subnets != nn.subnets
                    || on.wireguard_public_key != nn.wireguard_public_key
            })
        })
        .map(|nn| nn.name.clone())
        .collect();
    if !added.is_empty() {
        parts.push(format!("added {}", added.join(", ")));
    }
    if !removed.is_empty() {
        parts.push(format!("removed {}", removed.join(", ")));
    }
    if !changed.is_empty() {
        parts.push(format!("changed {}", changed.join(", ")));
    }
    if old.settings != new.settings {
        parts.push("settings changed".into());
    }
    if old.keys != new.keys {
        let id = new.keys.as_ref().and_then(|k| k.current()).map(|k| k.id);
        parts.push(match id {
            Some(id) => format!("keys changed (current key-id {id})"),
            None => "keys changed".into(),
        });
    }
    format!(
        "{} nodes; {}",
        new.inventory.nodes.len(),
        if parts.is_empty() {
            "no change to nodes".into()
        } else {
            parts.join("; ")
        }
    )
}
