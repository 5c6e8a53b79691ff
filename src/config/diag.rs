//! Problems found in the input files, each pinned to `file:line:col`.

use std::cell::RefCell;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem in one file. Messages never contain key material.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.message
        )
    }
}

/// A file's path and text, able to turn byte offsets into 1-based line and column.
pub struct Source<'a> {
    pub path: &'a Path,
    pub text: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> Source<'a> {
    pub fn new(path: &'a Path, text: &'a str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Source {
            path,
            text,
            line_starts,
        }
    }

    /// 1-based line and column (in characters) of byte offset `at`.
    pub fn line_col(&self, at: usize) -> (usize, usize) {
        let at = at.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= at) - 1;
        let start = self.line_starts[line];
        let col = self.text[start..at].chars().count() + 1;
        (line + 1, col)
    }

    pub fn diag(&self, span: Range<usize>, message: impl Into<String>) -> Diagnostic {
        let (line, col) = self.line_col(span.start);
        Diagnostic {
            file: self.path.to_path_buf(),
            line,
            col,
            message: message.into(),
        }
    }
}

/// Read a secret's file (`what`: "keys", "private key", "preshared key"), opened once:
/// without following a symbolic link (whoever can write the directory could point it
/// anywhere), and checked on that descriptor, so that what is checked is what is read:
/// a regular file, of the user encryptd runs as (root in production; another owner
/// could replace the key), readable by nobody else (0600).
pub fn read_secret_file(
    path: &Path,
    what: &str,
) -> Result<zeroize::Zeroizing<Vec<u8>>, Diagnostic> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    // O_NONBLOCK: a FIFO put in the key's place must not hang the open.
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                file_diag(
                    path,
                    format!("the {what} file is a symbolic link: refused (name the file itself)"),
                )
            } else {
                file_diag(path, format!("cannot read the {what} file: {e}"))
            }
        })?;
    let meta = f
        .metadata()
        .map_err(|e| file_diag(path, format!("cannot read the {what} file: {e}")))?;
    if !meta.is_file() {
        return Err(file_diag(
            path,
            format!("the {what} file is not a regular file: refused"),
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(file_diag(
            path,
            format!(
                "{what} file is accessible by group or others (mode {mode:04o}); it must be 0600: chmod 0600 {}",
                path.display()
            ),
        ));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(file_diag(
            path,
            format!(
                "{what} file belongs to uid {}, not to uid {me} that encryptd runs as: chown {me} {}",
                meta.uid(),
                path.display()
            ),
        ));
    }
    // Key files are a few lines; a bound keeps a wrong path from filling memory. The
    // buffer is sized first so that no reallocation leaves a copy behind.
    const MAX: u64 = 64 * 1024;
    if meta.len() > MAX {
        return Err(file_diag(
            path,
            format!(
                "the {what} file is {} bytes, more than a key file's {MAX}",
                meta.len()
            ),
        ));
    }
    let mut bytes = zeroize::Zeroizing::new(Vec::with_capacity(meta.len() as usize + 1));
    f.by_ref()
        .take(MAX)
        .read_to_end(&mut bytes)
        .map_err(|e| file_diag(path, format!("cannot read the {what} file: {e}")))?;
    Ok(bytes)
}

/// A problem about a whole file (unreadable, wrong mode): reported at 1:1.
pub fn file_diag(path: &Path, message: impl Into<String>) -> Diagnostic {
    Diagnostic {
        file: path.to_path_buf(),
        line: 1,
        col: 1,
        message: message.into(),
    }
}

/// Collects diagnostics from code that holds shared borrows of the parsed document.
#[derive(Default)]
pub struct Diags(RefCell<Vec<Diagnostic>>);

impl Diags {
    pub fn push(&self, d: Diagnostic) {
        self.0.borrow_mut().push(d);
    }

    pub fn is_empty(&self) -> bool {
        self.0.borrow().is_empty()
    }

    pub fn into_sorted(self) -> Vec<Diagnostic> {
        let mut v = self.0.into_inner();
        v.sort();
        v.dedup();
        v
    }
}

/// The closest of `candidates` to `word`, if it is a plausible typo (edit distance ≤ 2).
pub fn suggest<'c>(word: &str, candidates: &[&'c str]) -> Option<&'c str> {
    candidates
        .iter()
        .map(|c| (distance(word, c), *c))
        .filter(|(d, c)| *d <= 2.min(c.len() / 2).max(1))
        .min()
        .map(|(_, c)| c)
}

fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(tag: &str, mode: u32) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = std::env::temp_dir().join(format!("encryptd-secret-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        std::fs::write(&p, "k").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn a_secret_file_of_another_user_is_refused() {
        let p = secret("owner", 0o600);
        assert_eq!(read_secret_file(&p, "keys").unwrap().as_slice(), b"k");
        // Giving the file away needs root; CI runs the suite as root.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&p, Some(65534), None).unwrap();
            let e = read_secret_file(&p, "keys").unwrap_err().to_string();
            assert!(
                e.contains("keys file belongs to uid 65534, not to uid 0"),
                "{e}"
            );
        } else {
            eprintln!("not root: the ownership half of this test needs root");
        }
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn a_secret_file_is_checked_where_it_is_read() {
        // Group-readable.
        let p = secret("mode", 0o640);
        let e = read_secret_file(&p, "keys").unwrap_err().to_string();
        assert!(
            e.contains("accessible by group or others (mode 0640)"),
            "{e}"
        );
        std::fs::remove_file(&p).unwrap();
        // A link to a perfectly good key file: refused, not followed.
        let target = secret("target", 0o600);
        let link = target.with_extension("link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = read_secret_file(&link, "private key")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("the private key file is a symbolic link: refused"),
            "{e}"
        );
        // A FIFO in the key's place: refused at once, without hanging in open().
        let fifo = target.with_extension("fifo");
        let _ = std::fs::remove_file(&fifo);
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_secret_file(&fifo, "keys").unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        // A directory.
        let e = read_secret_file(&std::env::temp_dir(), "keys")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not a regular file") || e.contains("accessible"),
            "{e}"
        );
        for f in [&target, &link, &fifo] {
            std::fs::remove_file(f).unwrap();
        }
    }

    #[test]
    fn line_and_column() {
        let s = Source::new(Path::new("f"), "ab\ncdé\nx");
        assert_eq!(s.line_col(0), (1, 1));
        assert_eq!(s.line_col(3), (2, 1));
        assert_eq!(s.line_col(8), (3, 1));
        assert_eq!(s.diag(4..5, "m").to_string(), "f:2:2: m");
    }

    #[test]
    fn typo_suggestions() {
        let keys = ["interface", "keys", "hello_port"];
        assert_eq!(suggest("intreface", &keys), Some("interface"));
        assert_eq!(suggest("hello-port", &keys), Some("hello_port"));
        assert_eq!(suggest("zzz", &keys), None);
    }
}
