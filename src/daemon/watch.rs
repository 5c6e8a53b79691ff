//! Noticing that a configuration file changed.
//!
//! Ansible, vim and `sed -i` replace a file by renaming a new one over it, which ends a
//! watch on the file itself; so the *directories* are watched and events are filtered by
//! name. Bursts (an editor's write + rename + chmod) are collapsed by the caller's
//! debounce timer.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use inotify::{Inotify, WatchDescriptor, WatchMask};

pub struct Watcher {
    inotify: Inotify,
    /// Watched directory per descriptor, and the file names that matter in each.
    dirs: HashMap<WatchDescriptor, (PathBuf, HashSet<OsString>)>,
}

fn split(file: &Path) -> (PathBuf, OsString) {
    let dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    (dir, file.file_name().unwrap_or_default().to_os_string())
}

impl Watcher {
    pub fn new() -> io::Result<Watcher> {
        Ok(Watcher {
            inotify: Inotify::init()?,
            dirs: HashMap::new(),
        })
    }

    /// Watch exactly these files from now on (replacing any earlier set). A directory that
    /// cannot be watched is returned with its error; the others are still watched.
    pub fn set_files(&mut self, files: &[&Path]) -> Vec<(PathBuf, io::Error)> {
        let mut watches = self.inotify.watches();
        let mut wanted: HashMap<PathBuf, HashSet<OsString>> = HashMap::new();
        for f in files {
            let (dir, name) = split(f);
            wanted.entry(dir).or_default().insert(name);
        }
        // Only directories no longer wanted lose their watch: removing and adding one
        // again gives it a new descriptor, and the events already queued under the old
        // one (a file replaced while the daemon was reloading) would be ignored.
        self.dirs.retain(|wd, (dir, _)| {
            let keep = wanted.contains_key(dir);
            if !keep {
                let _ = watches.remove(wd.clone());
            }
            keep
        });
        for (_, names) in self.dirs.values_mut() {
            names.clear();
        }
        let mask = WatchMask::CLOSE_WRITE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::ATTRIB;
        let mut failed = Vec::new();
        for (dir, names) in wanted {
            match watches.add(&dir, mask) {
                // Two paths to one directory share a descriptor: merge their names.
                Ok(wd) => self
                    .dirs
                    .entry(wd)
                    .or_insert_with(|| (dir, HashSet::new()))
                    .1
                    .extend(names),
                Err(e) => failed.push((dir, e)),
            }
        }
        failed
    }

    /// Drain pending events; the watched files that changed (empty if none did).
    pub fn changed(&mut self) -> io::Result<Vec<PathBuf>> {
        let mut buf = [0u8; 4096];
        let mut out = Vec::new();
        loop {
            let events = match self.inotify.read_events(&mut buf) {
                Ok(ev) => ev,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(out),
                Err(e) => return Err(e),
            };
            for ev in events {
                let Some((dir, names)) = self.dirs.get(&ev.wd) else {
                    continue;
                };
                if let Some(name) = ev.name.filter(|n| names.contains(*n)) {
                    let p = dir.join(name);
                    if !out.contains(&p) {
                        out.push(p);
                    }
                }
            }
        }
    }
}

impl AsRawFd for Watcher {
    fn as_raw_fd(&self) -> RawFd {
        self.inotify.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        crate::files::test_dir(&format!("watch-{tag}"))
    }

    #[test]
    fn a_change_before_the_files_are_set_again_is_not_lost() {
        let d = tmpdir("reset");
        let f = d.join("encryptd.toml");
        std::fs::write(&f, "a").unwrap();
        let mut w = Watcher::new().unwrap();
        assert!(w.set_files(&[&f]).is_empty());
        // replaced while the daemon reloads, which then sets its files again
        std::fs::write(d.join(".tmp"), "b").unwrap();
        std::fs::rename(d.join(".tmp"), &f).unwrap();
        assert!(w.set_files(&[&f, &d.join("nodes.toml")]).is_empty());
        assert_eq!(w.changed().unwrap(), vec![f.clone()]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn rename_over_is_seen_every_time() {
        let d = tmpdir("rename");
        let f = d.join("nodes.toml");
        std::fs::write(&f, "a").unwrap();
        let mut w = Watcher::new().unwrap();
        assert!(w.set_files(&[&f]).is_empty());
        for i in 0..3 {
            let tmp = d.join(format!(".tmp{i}"));
            std::fs::write(&tmp, "b").unwrap();
            std::fs::rename(&tmp, &f).unwrap();
            assert_eq!(w.changed().unwrap(), vec![f.clone()], "rename #{i}");
        }
        // Other files in the same directory are not reported.
        std::fs::write(d.join("unrelated"), "x").unwrap();
        assert!(w.changed().unwrap().is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn in_place_write_and_chmod_are_seen() {
        let d = tmpdir("write");
        let f = d.join("ipsec.keys");
        std::fs::write(&f, "1").unwrap();
        let mut w = Watcher::new().unwrap();
        assert!(w.set_files(&[&f]).is_empty());
        std::fs::write(&f, "2").unwrap();
        assert_eq!(w.changed().unwrap(), vec![f.clone()]);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(w.changed().unwrap(), vec![f.clone()]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn missing_directory_is_reported() {
        let mut w = Watcher::new().unwrap();
        let failed = w.set_files(&[Path::new("/nonexistent-encryptd-dir/x")]);
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].0, PathBuf::from("/nonexistent-encryptd-dir"));
    }
}
