//! Logging through the `log` facade.
//!
//! Under systemd, when stderr *is* the journal stream (`$JOURNAL_STREAM` names stderr's
//! device:inode, see systemd.exec(5)) and the journal socket answers, records go natively to
//! the journal with `SYSLOG_IDENTIFIER=encryptd` and their key-values as fields:
//!
//! ```
//! log::info!(peer = "node-b", key_id = 3; "peer up");
//! // journal: MESSAGE=peer up PEER=node-b KEY_ID=3 PRIORITY=5
//! // stderr:  INFO peer up peer=node-b key_id=3
//! ```
//!
//! Otherwise one line per record goes to stderr: `LEVEL message key=value…` in a terminal,
//! `<PRIORITY>message key=value…` when stderr is the journal stream but the socket failed
//! (journald parses the prefix and adds its own timestamp, so none is written here).
//!
//! Messages and values are written with `Display` and capped ([`MAX_MESSAGE`],
//! [`MAX_VALUE`]), so a stray `?`-captured struct cannot flood the log. Never log key
//! material: that is the callers' job; this module only makes sure it adds nothing of its own.

use std::fmt::{self, Write as _};
use std::io::{self, Write};

use log::kv::{self, Key, Value, VisitSource};
use log::{Level, LevelFilter, Log, Metadata, Record};
use systemd_journal_logger::JournalLog;

/// `SYSLOG_IDENTIFIER=` of every journal entry (`journalctl -t encryptd`).
pub const SYSLOG_IDENTIFIER: &str = "encryptd";
/// Longest message written, in bytes; longer ones are cut and end in `…`.
pub const MAX_MESSAGE: usize = 4096;
/// Longest key-value value written, in bytes; longer ones are cut and end in `…`.
pub const MAX_VALUE: usize = 256;

/// Journal fields that the journal logger writes itself: a key-value of the same name is
/// renamed `KV_<NAME>` so it cannot override them.
const RESERVED_FIELDS: &[&str] = &[
    "MESSAGE",
    "PRIORITY",
    "SYSLOG_IDENTIFIER",
    "SYSLOG_PID",
    "CODE_FILE",
    "CODE_LINE",
    "CODE_MODULE",
    "TARGET",
];

/// The environment variable that sets the daemon's log level (`debug` for the per-hello
/// and per-batch lines; `trace` adds nothing more today).
pub const LEVEL_VAR: &str = "ENCRYPTD_LOG";

/// The level `ENCRYPTD_LOG` asks for: `error`, `warn`, `info` (unset or empty), `debug`
/// or `trace`, in any case. Anything else is refused with the accepted names, so that a
/// typo does not silently leave the level where it was.
pub fn level_from(value: Option<&str>) -> Result<LevelFilter, String> {
    match value.map(str::trim) {
        None | Some("") => Ok(LevelFilter::Info),
        Some(v) => match v.to_ascii_lowercase().as_str() {
            "error" => Ok(LevelFilter::Error),
            "warn" | "warning" => Ok(LevelFilter::Warn),
            "info" => Ok(LevelFilter::Info),
            "debug" => Ok(LevelFilter::Debug),
            "trace" => Ok(LevelFilter::Trace),
            _ => Err(format!(
                "{LEVEL_VAR}={v:?} is not a log level (error, warn, info, debug, trace); logging at info"
            )),
        },
    }
}

/// Install the process-wide logger and set the maximum level.
///
/// Native journal when stderr is the journal and the socket works, stderr otherwise (see
/// the module docs). Calling it again only changes the level: the first logger stays.
pub fn init(level: LevelFilter) {
    let logger: Box<dyn Log> = if systemd_journal_logger::connected_to_journal() {
        match JournalLog::empty() {
            Ok(journal) => Box::new(Journal(
                journal.with_syslog_identifier(SYSLOG_IDENTIFIER.to_owned()),
            )),
            Err(_) => Box::new(Stderr(Style::SyslogPrefix)),
        }
    } else {
        Box::new(Stderr(Style::Plain))
    };
    // An error means a logger is already installed; keep it.
    let _ = log::set_boxed_logger(logger);
    log::set_max_level(level);
}

/// How a record is written to stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// `INFO message key=value`: a terminal or a file.
    Plain,
    /// `<5>message key=value`: stderr is the journal stream, which reads the priority.
    SyslogPrefix,
}

/// Write `record` as one line to `out` (one `write_all`, so lines from one process do
/// not interleave). Control characters are escaped: one record is always one line.
pub fn write_record(out: &mut dyn Write, style: Style, record: &Record) -> io::Result<()> {
    let mut line = String::with_capacity(128);
    match style {
        Style::Plain => {
            let _ = write!(line, "{} ", record.level());
        }
        Style::SyslogPrefix => {
            let _ = write!(line, "<{}>", priority(record.level()));
        }
    }
    push_escaped(&mut line, &capped(record.args(), MAX_MESSAGE));
    let _ = record.key_values().visit(&mut LogfmtPairs(&mut line));
    line.push('\n');
    out.write_all(line.as_bytes())
}

/// syslog priority, as systemd-journal-logger maps it (info is "notice", debug is "info").
fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 5,
        Level::Debug => 6,
        Level::Trace => 7,
    }
}

/// `neli` (under `wireguard-uapi`) logs every netlink message whole at debug level,
/// WireGuard private keys included: its records are never written.
fn enabled(metadata: &Metadata) -> bool {
    metadata.level() <= log::max_level() && !metadata.target().starts_with("neli")
}

/// The stderr logger.
struct Stderr(Style);

impl Log for Stderr {
    fn enabled(&self, metadata: &Metadata) -> bool {
        enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            // Nowhere to report a failed write to stderr.
            let _ = write_record(&mut io::stderr().lock(), self.0, record);
        }
    }

    fn flush(&self) {}
}

/// The native journal logger, with messages and values capped and reserved names kept.
struct Journal(JournalLog);

impl Log for Journal {
    fn enabled(&self, metadata: &Metadata) -> bool {
        enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let (message, fields) = journal_fields(record);
        // journal_send's error is dropped, as JournalLog::log does: a log call cannot fail.
        let _ = self.0.journal_send(
            &Record::builder()
                .args(format_args!("{message}"))
                .level(record.level())
                .target(record.target())
                .module_path(record.module_path())
                .file(record.file())
                .line(record.line())
                .key_values(&fields)
                .build(),
        );
    }

    fn flush(&self) {}
}

/// The message and key-values that go to the journal: capped, with keys that would clash
/// with the logger's own fields renamed. The journal logger upper-cases the keys and
/// replaces what a field name may not hold with `_` (`key_id` → `KEY_ID`).
fn journal_fields(record: &Record) -> (String, Vec<(String, String)>) {
    struct Collect(Vec<(String, String)>);
    impl<'kvs> VisitSource<'kvs> for Collect {
        fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), kv::Error> {
            let mut name = key.as_str().to_owned();
            if RESERVED_FIELDS.contains(&name.to_ascii_uppercase().as_str()) {
                name.insert_str(0, "KV_");
            }
            self.0.push((name, capped(&value, MAX_VALUE)));
            Ok(())
        }
    }
    let mut collect = Collect(Vec::new());
    let _ = record.key_values().visit(&mut collect);
    (capped(record.args(), MAX_MESSAGE), collect.0)
}

/// Appends ` key=value` for each pair, logfmt style: values with spaces, quotes, `=` or
/// control characters (or empty ones) are quoted and escaped.
struct LogfmtPairs<'a>(&'a mut String);

impl<'kvs> VisitSource<'kvs> for LogfmtPairs<'_> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), kv::Error> {
        let out = &mut *self.0;
        out.push(' ');
        let key = key.as_str();
        if key.is_empty() {
            out.push('_');
        }
        out.extend(key.chars().map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '_'
            }
        }));
        out.push('=');
        let value = capped(&value, MAX_VALUE);
        let quote = value.is_empty()
            || value
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '=' | '\\'));
        if quote {
            out.push('"');
            for c in value.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    c => push_escaped_char(out, c),
                }
            }
            out.push('"');
        } else {
            out.push_str(&value);
        }
        Ok(())
    }
}

fn push_escaped(out: &mut String, s: &str) {
    for c in s.chars() {
        push_escaped_char(out, c);
    }
}

fn push_escaped_char(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c if c.is_control() => {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
        c => out.push(c),
    }
}

/// `Display` of `value`, at most `limit` bytes (cut at a char boundary, then `…`).
/// Formatting stops costing memory at the limit: the rest is discarded as it comes.
fn capped(value: &dyn fmt::Display, limit: usize) -> String {
    struct Capped {
        buf: String,
        limit: usize,
        cut: bool,
    }
    impl fmt::Write for Capped {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            if self.cut {
                return Ok(());
            }
            let room = self.limit - self.buf.len();
            if s.len() <= room {
                self.buf.push_str(s);
            } else {
                let mut end = room;
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                self.buf.push_str(&s[..end]);
                self.cut = true;
            }
            Ok(())
        }
    }
    let mut w = Capped {
        buf: String::new(),
        limit,
        cut: false,
    };
    // A Display impl that errors leaves what it wrote so far; that is all we can show.
    let _ = write!(w, "{value}");
    if w.cut {
        w.buf.push('…');
    }
    w.buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_level_switch_takes_level_names_and_refuses_the_rest() {
        assert_eq!(level_from(None), Ok(LevelFilter::Info));
        assert_eq!(level_from(Some(" ")), Ok(LevelFilter::Info));
        assert_eq!(level_from(Some("DEBUG")), Ok(LevelFilter::Debug));
        assert_eq!(level_from(Some("warning")), Ok(LevelFilter::Warn));
        let e = level_from(Some("verbose")).unwrap_err();
        assert!(
            e.contains("ENCRYPTD_LOG=\"verbose\"") && e.contains("debug"),
            "{e}"
        );
    }
    use std::cell::RefCell;

    fn line(style: Style, level: Level, msg: fmt::Arguments, kvs: &dyn kv::Source) -> String {
        let mut out = Vec::new();
        write_record(
            &mut out,
            style,
            &Record::builder()
                .args(msg)
                .level(level)
                .key_values(kvs)
                .build(),
        )
        .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn plain_line_has_level_message_and_pairs() {
        let kvs = [
            ("peer", Value::from("node-b")),
            ("key_id", Value::from(3u8)),
        ];
        assert_eq!(
            line(Style::Plain, Level::Info, format_args!("peer up"), &kvs),
            "INFO peer up peer=node-b key_id=3\n"
        );
        assert_eq!(
            line(
                Style::Plain,
                Level::Warn,
                format_args!("no kvs"),
                &None::<(&str, &str)>
            ),
            "WARN no kvs\n"
        );
    }

    #[test]
    fn syslog_prefix_under_systemd_has_priority_and_no_level_word() {
        let kvs = [("peer", "node-b")];
        assert_eq!(
            line(
                Style::SyslogPrefix,
                Level::Error,
                format_args!("boom"),
                &kvs
            ),
            "<3>boom peer=node-b\n"
        );
        let none = None::<(&str, &str)>;
        for (level, p) in [
            (Level::Warn, "<4>"),
            (Level::Info, "<5>"),
            (Level::Debug, "<6>"),
            (Level::Trace, "<7>"),
        ] {
            assert!(line(Style::SyslogPrefix, level, format_args!("x"), &none).starts_with(p));
        }
    }

    #[test]
    fn values_are_quoted_and_escaped_and_one_record_is_one_line() {
        let kvs = [
            ("error", "no such file"),
            ("empty", ""),
            ("q", "say \"hi\"\\"),
            ("nl", "a\nb"),
            ("weird key", "x"),
        ];
        assert_eq!(
            line(
                Style::Plain,
                Level::Error,
                format_args!("two\nlines\u{7}"),
                &kvs
            ),
            "ERROR two\\nlines\\u{7} error=\"no such file\" empty=\"\" q=\"say \\\"hi\\\"\\\\\" \
             nl=\"a\\nb\" weird_key=x\n"
        );
    }

    #[test]
    fn big_values_and_messages_are_capped() {
        let big = "é".repeat(MAX_VALUE); // 2 bytes each: the cut must land on a boundary
        let kvs = [("blob", big.as_str())];
        let out = line(
            Style::Plain,
            Level::Debug,
            format_args!("{}", "m".repeat(10_000)),
            &kvs,
        );
        let (msg, value) = out.trim_end().split_once(" blob=").unwrap();
        assert_eq!(msg.len(), "DEBUG ".len() + MAX_MESSAGE + '…'.len_utf8());
        assert!(msg.ends_with('…'));
        assert_eq!(value.len(), MAX_VALUE + '…'.len_utf8());
        assert!(value.ends_with('…'));
    }

    #[test]
    fn journal_fields_are_capped_and_do_not_override_the_loggers_own() {
        let big = "x".repeat(MAX_VALUE + 1);
        let kvs = [
            ("peer", "node-b"),
            ("priority", "1"),
            ("Message", "spoof"),
            ("blob", big.as_str()),
        ];
        let record = Record::builder()
            .args(format_args!("peer up"))
            .key_values(&kvs)
            .build();
        let (message, fields) = journal_fields(&record);
        assert_eq!(message, "peer up");
        let names: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["peer", "KV_priority", "KV_Message", "blob"]);
        assert_eq!(fields[0].1, "node-b");
        assert_eq!(fields[3].1.len(), MAX_VALUE + '…'.len_utf8());
    }

    thread_local! {
        static CAPTURED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }

    /// Goes through the real `log!` macros, capturing this thread's records.
    struct Capture;
    impl Log for Capture {
        fn enabled(&self, _: &Metadata) -> bool {
            true
        }
        fn log(&self, record: &Record) {
            CAPTURED.with(|c| write_record(&mut *c.borrow_mut(), Style::Plain, record).unwrap());
        }
        fn flush(&self) {}
    }

    #[test]
    fn the_macros_structured_fields_come_through() {
        static CAPTURE: Capture = Capture;
        log::set_logger(&CAPTURE).expect("no other test in this crate installs a logger");
        log::set_max_level(LevelFilter::Trace);
        let peer = "node-b";
        log::info!(peer, key_id = 3; "peer up");
        log::warn!(reason:% = format_args!("replay {}", "window"); "hello dropped");
        let out = CAPTURED.with(|c| String::from_utf8(c.take()).unwrap());
        assert_eq!(
            out,
            "INFO peer up peer=node-b key_id=3\nWARN hello dropped reason=\"replay window\"\n"
        );
    }
}
