//! `encryptd run`: one thread, one `mio::Poll` holding the inotify fd and the signals;
//! timers are the poll timeout. A configuration is swapped in only when it is valid as a
//! whole; otherwise the last good one stays in force and STATUS= says so.

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

use crate::config::{self, Config, Diagnostic, Paths};
use crate::watch::Watcher;

const INOTIFY: Token = Token(0);
const SIGNALS: Token = Token(1);

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
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// Tell systemd; outside systemd (no NOTIFY_SOCKET) this does nothing.
fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!("sd_notify: {e}");
    }
}

pub fn run(paths: Paths) -> i32 {
    crate::logging::init(log::LevelFilter::Info);
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
    watcher: Watcher,
    reload_at: Option<Instant>,
    /// Interval and next deadline of WATCHDOG=1 pings.
    watchdog: Option<(Duration, Instant)>,
}

impl Daemon {
    fn new(paths: Paths, config: Config) -> Result<Daemon, Error> {
        let watchdog = sd_notify::watchdog_enabled().map(|usec| (usec / 2, Instant::now()));
        Ok(Daemon {
            paths,
            config,
            refused: None,
            watcher: Watcher::new().map_err(io_err("inotify"))?,
            reload_at: None,
            watchdog,
        })
    }

    /// The files whose change means a reload.
    fn watched_files(&self) -> Vec<PathBuf> {
        let s = &self.config.settings;
        let mut v = vec![self.paths.config.clone(), s.inventory.clone()];
        if self.config.keys.is_some() {
            v.push(s.ipsec.keys.clone());
        }
        v
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
        let peers = self.config.inventory.peers(&s.node).count();
        let mut line = format!("{}: 0/{peers} peers up", s.mode.as_str());
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
        let ifd = self.watcher.as_raw_fd();
        poll.registry()
            .register(&mut SourceFd(&ifd), INOTIFY, Interest::READABLE)
            .map_err(io_err("register inotify"))?;
        self.rewatch();

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
        notify(&[NotifyState::Ready, NotifyState::Status(&self.status_line())]);

        let mut events = Events::with_capacity(16);
        loop {
            let now = Instant::now();
            let next = [self.reload_at, self.watchdog.map(|w| w.1)]
                .into_iter()
                .flatten()
                .min();
            let timeout = next.map(|t| t.saturating_duration_since(now));
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
                match ev.token() {
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
                                    return Ok(());
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
            let now = Instant::now();
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
        }
    }

    /// Re-read every file; apply only a configuration that is valid as a whole.
    fn reload(&mut self, why: &str) {
        let mut states = vec![NotifyState::Reloading];
        states.extend(NotifyState::monotonic_usec_now().ok());
        notify(&states);
        match config::load(&self.paths) {
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
        notify(&[NotifyState::Ready, NotifyState::Status(&self.status_line())]);
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
