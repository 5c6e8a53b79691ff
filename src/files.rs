//! Files encryptd writes: root's alone (0600 in a 0700 directory), and published whole,
//! so that a reader sees the old file or the new one, never a half-written one.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Replace `path` with `bytes`: a temporary file in the same directory renamed over it.
/// `durable`: synced to disk, file and directory, before returning (a file read at the
/// next boot must survive a power cut).
pub fn replace(path: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
    let (dir, tmp) = write_temp(path, bytes, durable)?;
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
    let (dir, tmp) = write_temp(path, bytes, true)?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    linked?;
    fs::File::open(dir)?.sync_all()
}

/// A new temporary file next to `path` (0600, its directory created 0700) holding
/// `bytes`. Returns the directory and the temporary file.
fn write_temp(path: &Path, bytes: &[u8], sync: bool) -> io::Result<(PathBuf, PathBuf)> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other("no file name"))?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp);
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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
}
