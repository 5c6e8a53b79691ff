//! Files encryptd writes: root's alone (0600 in a 0700 directory) unless meant for other
//! readers, and published whole, so that a reader sees the old file or the new one,
//! never a half-written one.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Replace `path` with `bytes`: a temporary file in the same directory renamed over it.
/// `durable`: synced to disk, file and directory, before returning (a file read at the
/// next boot must survive a power cut).
pub fn replace(path: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
    replace_with_mode(path, bytes, durable, 0o600)
}

/// [`replace`] with a file that others may read (`mode`, whatever the umask): the
/// metrics file, which node_exporter reads as an unprivileged user.
pub fn replace_readable(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace_with_mode(path, bytes, false, 0o644)
}

fn replace_with_mode(path: &Path, bytes: &[u8], durable: bool, mode: u32) -> io::Result<()> {
    let (dir, tmp) = write_temp(path, bytes, durable, mode)?;
    let renamed = fs::rename(&tmp, path);
    if renamed.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    renamed?;
    if durable {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Create `path` with `bytes`, durably, unless it exists: the temporary file is linked
/// into place, which fails rather than replace a file that appeared meanwhile (another
/// process creating the same key).
pub fn create_new(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let (dir, tmp) = write_temp(path, bytes, true, 0o600)?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    linked?;
    fs::File::open(dir)?.sync_all()
}

/// A new temporary file next to `path` (`mode`; for a private file a missing directory
/// is created 0700) holding `bytes`. Returns the directory and the temporary file.
fn write_temp(path: &Path, bytes: &[u8], sync: bool, mode: u32) -> io::Result<(PathBuf, PathBuf)> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other("no file name"))?;
    // Only a private file's directory is made here: one made 0700 for a readable file
    // would hide it from its reader, so that directory must exist.
    if mode == 0o600 {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
    }
    // Unpredictable, so that nobody else who may write the directory (node_exporter's
    // may be shared) can put a file or a link there first; create_new below refuses
    // one that exists anyway, and never follows a link.
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        hex::encode(crate::random::bytes::<8>())
    ));
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        // The unit's UMask=0077 would mask a wider mode given to open().
        if mode != 0o600 {
            f.set_permissions(fs::Permissions::from_mode(mode))?;
        }
        f.write_all(bytes)?;
        if sync {
            f.sync_all()?;
        }
        Ok(())
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok((dir, tmp))
}

/// A fresh, empty directory for one unit test (`tag` tells the tests apart; the process
/// ID tells runs apart).
#[cfg(test)]
pub fn test_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("encryptd-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_overwrites_and_create_new_does_not() {
        let d = std::env::temp_dir().join(format!("encryptd-files-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        let p = d.join("sub/f");
        replace(&p, b"one", false).unwrap();
        replace(&p, b"two", true).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let e = create_new(&p, b"three").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&p).unwrap(), b"two");
        create_new(&d.join("sub/g"), b"four").unwrap();
        assert_eq!(fs::read(d.join("sub/g")).unwrap(), b"four");
        // No temporary file is left behind.
        let mut names: Vec<_> = fs::read_dir(d.join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["f", "g"]);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_readable_file_is_0644_under_the_units_umask() {
        let d = test_dir("files-r");
        let p = d.join("encryptd.prom");
        // SAFETY: umask has no preconditions. It is per process: only making files more
        // private for the moment, which no other test minds.
        let old = unsafe { libc::umask(0o077) };
        let r = replace_readable(&p, b"m 1\n");
        unsafe { libc::umask(old) };
        r.unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        assert_eq!(fs::read(&p).unwrap(), b"m 1\n");
        fs::remove_dir_all(&d).unwrap();
    }
}
