//! The nftables executor: applies the strict-mode table, checks it, deletes it, reads its
//! counters. It renders nothing: the planner hands over the text of `table inet encryptd
//! { ... }`, and this module drives the `nft` program with it.
//!
//! - Every change is one `nft -f -` transaction: [`REPLACE_PRELUDE`] first creates the table
//!   if it is missing and then deletes it, so the text that follows replaces the whole table
//!   atomically. The kernel applies all of it or none of it: there is no window without
//!   rules, and a rejected ruleset leaves the previous one in place.
//! - Only `inet encryptd` is ever touched: text whose top-level statements name another
//!   table (or `flush ruleset`) is refused before `nft` runs.
//! - Replacing the table resets its counters (the kernel objects are new); counters count
//!   since the last change.
//! - `nft` reads the ruleset from a memfd, not a pipe, so a large ruleset cannot deadlock
//!   this single-threaded process against nft's output.
//! - `nft` runs in the network namespace of the calling thread.
//!
//! Counters are mapped back to rules by their `comment "..."`, which the planner gives to
//! every rule it wants to report on.

use std::fs::File;
use std::io::{self, Seek, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};

/// The one table encryptd owns: `inet encryptd`.
pub const TABLE: &str = "inet encryptd";

/// Put before the table text so that one transaction replaces the whole table: declaring
/// an existing table is a no-op, and deleting it then removes the old contents.
pub const REPLACE_PRELUDE: &str = "table inet encryptd {}\ndelete table inet encryptd\n";
const PRELUDE_LINES: usize = 2;

/// Why talking to nftables failed. Messages carry nft's own stderr.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot hand the ruleset to nft: {0}")]
    Input(#[source] io::Error),
    #[error("`nft {args}` failed ({status}): {stderr}")]
    Failed {
        args: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("refusing a ruleset that touches more than `table inet encryptd`: {statement:?}")]
    Foreign { statement: String },
    #[error("unexpected `nft list table inet encryptd` output: {0}")]
    Parse(#[from] ParseError),
}

/// Where the listing did not look like nft's output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

/// One rule's counter, as `nft list table` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleCounter {
    /// The chain the rule is in.
    pub chain: String,
    /// The rule's `comment "..."`, the name the planner gave it.
    pub comment: Option<String>,
    pub packets: u64,
    pub bytes: u64,
}

/// nftables' change notifications (`NFNLGRP_NFTABLES`): every table, chain, rule or set
/// that any program adds or deletes in this network namespace. The daemon learns from
/// them that its table may be gone (`nft flush ruleset`, a firewall reload) and checks.
pub struct Monitor {
    socket: netlink_sys::Socket,
}

/// The multicast group of nftables' notifications.
const NFNLGRP_NFTABLES: u32 = 7;

impl Monitor {
    pub fn open() -> io::Result<Monitor> {
        let mut socket = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_NETFILTER)?;
        socket.bind(&netlink_sys::SocketAddr::new(0, 0))?;
        socket.add_membership(NFNLGRP_NFTABLES)?;
        socket.set_non_blocking(true)?;
        Ok(Monitor { socket })
    }

    /// Read what is pending: the number of notifications that concern `inet encryptd`
    /// (other programs' tables are their business, and checking costs an `nft` run), at
    /// least 1 when notifications were lost (`ENOBUFS`) or one did not fit the buffer:
    /// then something may have changed.
    pub fn drain(&mut self) -> usize {
        use std::os::fd::AsRawFd;
        let mut buf = [0u8; 16 * 1024];
        let mut n = 0;
        loop {
            // SAFETY: recv into a buffer of the length passed, on the socket's own fd.
            let r = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                )
            };
            if r > 0 {
                let len = r as usize;
                if len > buf.len() || concerns_our_table(&buf[..len]) {
                    n += 1;
                }
                continue;
            }
            match (r < 0)
                .then(|| io::Error::last_os_error().raw_os_error())
                .flatten()
            {
                Some(libc::EINTR) => continue,
                Some(libc::ENOBUFS) => n += 1,
                _ => return n,
            }
        }
    }
}

/// `NFNL_SUBSYS_NFTABLES`: the high byte of an nftables message's type.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWGEN: u16 = 15;
/// `NFPROTO_INET`, the family of `table inet ...`.
const NFPROTO_INET: u8 = 1;

/// Whether a datagram of nftables notifications holds one about `inet encryptd`. Every
/// notification of a table, chain, rule, set or element change names its table in
/// attribute 1 (`NFTA_TABLE_NAME`, `NFTA_CHAIN_TABLE`, `NFTA_RULE_TABLE`,
/// `NFTA_SET_TABLE`, `NFTA_SET_ELEM_LIST_TABLE`), after the 4-byte `nfgenmsg` whose
/// first byte is the family. Anything that does not parse counts as ours: a check too
/// many costs an `nft` run, one too few a table nobody looks at.
pub fn concerns_our_table(datagram: &[u8]) -> bool {
    let mut rest = datagram;
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        let ty = u16::from_ne_bytes([rest[4], rest[5]]);
        if len < 16 || len > rest.len() {
            return true;
        }
        let msg = &rest[16..len];
        if ty >> 8 == NFNL_SUBSYS_NFTABLES && ty & 0xff != NFT_MSG_NEWGEN {
            if msg.len() < 4 {
                return true;
            }
            if msg[0] == NFPROTO_INET && table_attr(&msg[4..]).is_none_or(|t| t == b"encryptd") {
                return true;
            }
        }
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    false
}

/// The value of attribute 1, without its NUL; `None` if absent or malformed.
fn table_attr(mut attrs: &[u8]) -> Option<&[u8]> {
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let ty = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if ty == 1 {
            let v = &attrs[4..len];
            return Some(v.strip_suffix(&[0]).unwrap_or(v));
        }
        attrs = &attrs[len.next_multiple_of(4).min(attrs.len())..];
    }
    None
}

impl std::os::fd::AsRawFd for Monitor {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.socket.as_raw_fd()
    }
}

/// A listing with what the kernel changes on its own taken out (the counters' values,
/// which packets move; blank lines): two canonical listings of one table differ only
/// when someone changed a rule, a chain or a set's elements.
pub fn canonical(listing: &str) -> String {
    let mut out = String::with_capacity(listing.len());
    for line in listing.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let mut words = line.split_whitespace().peekable();
        let mut first = true;
        while let Some(w) = words.next() {
            if !first {
                out.push(' ');
            }
            first = false;
            out.push_str(w);
            // `counter packets N bytes M` -> `counter`
            if w == "counter" && words.peek() == Some(&"packets") {
                for _ in 0..4 {
                    words.next();
                }
            }
        }
        out.push('\n');
    }
    out
}

/// Whether `listing` (`nft list table inet encryptd`) still holds what `table_text`
/// installed: every chain, and as many drop rules. Another program may have deleted
/// a chain or a rule without removing the table. Coarse: it is the check for a table
/// whose own listing was not taken when it was installed; [`canonical`] listings
/// compare everything.
pub fn holds(listing: &str, table_text: &str) -> bool {
    let chains = |t: &str| {
        let mut v: Vec<String> = t
            .lines()
            .filter_map(|l| l.trim().strip_prefix("chain "))
            .map(|c| c.trim_end_matches(['{', ' ']).to_string())
            .collect();
        v.sort();
        v
    };
    let drops = |t: &str| t.lines().filter(|l| l.trim_end().contains(" drop")).count();
    chains(listing) == chains(table_text) && drops(listing) == drops(table_text)
}

/// The `nft` program; [`Nft::default`] finds it on `PATH`.
#[derive(Debug, Clone)]
pub struct Nft {
    program: PathBuf,
}

impl Default for Nft {
    fn default() -> Self {
        Nft::with_program("nft")
    }
}

impl Nft {
    /// Use this program instead of `nft` from `PATH`.
    pub fn with_program(program: impl Into<PathBuf>) -> Nft {
        Nft {
            program: program.into(),
        }
    }

    /// Replace the table with `table_text` (`table inet encryptd { ... }`) in one
    /// transaction. On error the previous table is untouched.
    pub fn apply(&self, table_text: &str) -> Result<(), NftError> {
        check_scope(table_text)?;
        self.run(&["-f", "-"], Some(&replace_script(table_text)))
            .map(drop)
    }

    /// Validate `table_text` in the kernel without changing anything (`nft -c`); for
    /// `encryptd check`. Needs CAP_NET_ADMIN, as the kernel does the checking.
    pub fn check(&self, table_text: &str) -> Result<(), NftError> {
        check_scope(table_text)?;
        self.run(&["-c", "-f", "-"], Some(&replace_script(table_text)))
            .map(drop)
    }

    /// Remove the table (teardown); succeeds when it is already gone.
    pub fn delete(&self) -> Result<(), NftError> {
        self.run(&["-f", "-"], Some(REPLACE_PRELUDE)).map(drop)
    }

    /// `nft list table inet encryptd`, or `None` when the table does not exist.
    pub fn list(&self) -> Result<Option<String>, NftError> {
        match self.run(&["list", "table", "inet", "encryptd"], None) {
            Ok(out) => Ok(Some(out)),
            Err(NftError::Failed { stderr, .. })
                if stderr.contains("No such file or directory") =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The counters of the table's rules (those with a `counter`), in listing order;
    /// empty when the table does not exist.
    pub fn counters(&self) -> Result<Vec<RuleCounter>, NftError> {
        match self.list()? {
            Some(text) => Ok(parse_counters(&text)?),
            None => Ok(Vec::new()),
        }
    }

    /// Run nft with `args`, `input` as its stdin; its stdout on success.
    fn run(&self, args: &[&str], input: Option<&str>) -> Result<String, NftError> {
        let stdin = match input {
            Some(text) => Stdio::from(memfd_with(text).map_err(NftError::Input)?),
            None => Stdio::null(),
        };
        let out = Command::new(&self.program)
            .args(args)
            .stdin(stdin)
            .output()
            .map_err(|source| NftError::Spawn {
                program: self.program.display().to_string(),
                source,
            })?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let mut stderr = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
        if input.is_some_and(|i| i != REPLACE_PRELUDE) {
            stderr = relocate_stdin_lines(&stderr);
        }
        if stderr.is_empty() {
            stderr = "(no message)".into();
        }
        Err(NftError::Failed {
            args: args.join(" "),
            status: out.status,
            stderr,
        })
    }
}

/// What `apply` sends to `nft -f -`: the prelude, then the table text.
pub fn replace_script(table_text: &str) -> String {
    let mut s = String::with_capacity(REPLACE_PRELUDE.len() + table_text.len() + 1);
    s.push_str(REPLACE_PRELUDE);
    s.push_str(table_text);
    if !s.ends_with('\n') {
        s.push('\n');
    }
    s
}

/// nft reports `/dev/stdin:LINE:COL: Error: ...`, counting the prelude; report the line in
/// the caller's text instead (`ruleset:LINE:COL: ...`).
fn relocate_stdin_lines(stderr: &str) -> String {
    const TAG: &str = "/dev/stdin:";
    let mut out = String::with_capacity(stderr.len());
    let mut rest = stderr;
    while let Some(i) = rest.find(TAG) {
        out.push_str(&rest[..i]);
        let after = &rest[i + TAG.len()..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        match after[..digits].parse::<usize>() {
            Ok(n) if n > PRELUDE_LINES && after[digits..].starts_with(':') => {
                out.push_str(&format!("ruleset:{}", n - PRELUDE_LINES));
            }
            _ => out.push_str(&rest[i..i + TAG.len() + digits]),
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

/// An anonymous in-memory file holding `text`, positioned at its start.
fn memfd_with(text: &str) -> io::Result<OwnedFd> {
    // SAFETY: a NUL-terminated name and valid flags; the result is checked.
    let fd = unsafe { libc::memfd_create(c"encryptd-nft".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create just returned this fd, and nothing else owns it.
    let mut f = unsafe { File::from_raw_fd(fd) };
    f.write_all(text.as_bytes())?;
    f.rewind()?;
    Ok(f.into())
}

/// Refuse text whose top-level statements are not about `inet encryptd` (or `define`s):
/// a rendering bug must not flush or replace someone else's firewall.
fn check_scope(text: &str) -> Result<(), NftError> {
    for stmt in top_level_statements(text) {
        let toks: Vec<Token> = tokens(&stmt);
        let words: Vec<&str> = toks.iter().map(|t| t.text.as_str()).collect();
        let ok = match words.as_slice() {
            ["define", ..] => true,
            [verb, _object, family, table, ..]
                if matches!(
                    *verb,
                    "add" | "create" | "insert" | "replace" | "flush" | "delete"
                ) =>
            {
                *family == "inet" && *table == "encryptd"
            }
            [object, family, table, ..] if *object != "flush" => {
                *family == "inet" && *table == "encryptd"
            }
            _ => false,
        };
        if !ok {
            return Err(NftError::Foreign { statement: stmt });
        }
    }
    Ok(())
}

/// Statements at brace depth 0 (separated by newlines or `;`), with their blocks.
fn top_level_statements(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut depth = 0usize;
    for line in text.lines() {
        let (code, _) = strip_comment(line);
        let mut quoted = false;
        for c in code.chars() {
            match c {
                '"' => quoted = !quoted,
                '{' if !quoted => depth += 1,
                '}' if !quoted => depth = depth.saturating_sub(1),
                ';' if !quoted && depth == 0 => {
                    push_stmt(&mut out, &mut cur);
                    continue;
                }
                _ => {}
            }
            cur.push(c);
        }
        if depth == 0 {
            push_stmt(&mut out, &mut cur);
        } else {
            cur.push('\n');
        }
    }
    push_stmt(&mut out, &mut cur);
    out
}

fn push_stmt(out: &mut Vec<String>, cur: &mut String) {
    let s = cur.trim();
    if !s.is_empty() {
        out.push(s.to_string());
    }
    cur.clear();
}

/// `line` without a `# comment` (outside quotes), and whether a quote was left open.
fn strip_comment(line: &str) -> (&str, bool) {
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '#' if !quoted => return (&line[..i], false),
            _ => {}
        }
    }
    (line, quoted)
}

struct Token {
    text: String,
    quoted: bool,
}

/// Whitespace-separated words; a `"quoted string"` is one word, without its quotes.
fn tokens(s: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '"' {
            chars.next();
            let text: String = chars.by_ref().take_while(|&c| c != '"').collect();
            out.push(Token { text, quoted: true });
        } else {
            let mut text = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() || c == '"' {
                    break;
                }
                text.push(c);
                chars.next();
            }
            out.push(Token {
                text,
                quoted: false,
            });
        }
    }
    out
}

/// The counters in the output of `nft list table inet encryptd` (also with `-a`): every
/// rule with `counter packets N bytes M`, with its chain and comment. Sets, maps and other
/// blocks are skipped, also when they span several lines. Long on purpose: one
/// line-by-line state machine (which block, which chain) reads best in one piece.
pub fn parse_counters(listing: &str) -> Result<Vec<RuleCounter>, ParseError> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut chain: Option<String> = None;
    // a statement being read: its first line, the depth it started at, its text
    let mut pending: Option<(usize, usize, String)> = None;
    for (i, raw) in listing.lines().enumerate() {
        let lineno = i + 1;
        let err = |message: &str| ParseError {
            line: lineno,
            message: message.to_string(),
        };
        let (code, open_quote) = strip_comment(raw);
        if open_quote {
            return Err(err("unterminated string"));
        }
        if code.trim().is_empty() && pending.is_none() {
            continue;
        }
        let (first, start, mut stmt) = pending.take().unwrap_or((lineno, depth, String::new()));
        if !stmt.is_empty() {
            stmt.push(' ');
        }
        stmt.push_str(code.trim());
        let mut quoted = false;
        for c in code.chars() {
            match c {
                '"' => quoted = !quoted,
                '{' if !quoted => depth += 1,
                '}' if !quoted => {
                    depth = depth.checked_sub(1).ok_or_else(|| err("unbalanced `}`"))?;
                }
                _ => {}
            }
        }
        if depth > start {
            if start < 2 && depth == start + 1 && stmt.ends_with('{') {
                // a block header: `table ... {`, `chain NAME {`, `set NAME {`, ...
                let toks = tokens(&stmt);
                chain = match (start, toks.first().map(|t| t.text.as_str())) {
                    (1, Some("chain")) => Some(
                        toks.get(1)
                            .map(|t| t.text.clone())
                            .ok_or_else(|| err("chain without a name"))?,
                    ),
                    _ => None,
                };
            } else {
                pending = Some((first, start, stmt)); // a statement spanning lines
            }
            continue;
        }
        if depth < start {
            if depth < 2 {
                chain = None;
            }
            continue;
        }
        if let (2, Some(chain)) = (start, &chain) {
            let found = rule_counter(&stmt).map_err(|message| ParseError {
                line: first,
                message,
            })?;
            if let Some(c) = found {
                out.push(RuleCounter {
                    chain: chain.clone(),
                    ..c
                });
            }
        }
    }
    if let Some((first, _, _)) = pending {
        return Err(ParseError {
            line: first,
            message: "statement not closed by the end of the listing".into(),
        });
    }
    if depth != 0 {
        return Err(ParseError {
            line: listing.lines().count(),
            message: "block not closed by the end of the listing".into(),
        });
    }
    Ok(out)
}

/// The counter and comment of one rule, if it has a counter.
fn rule_counter(rule: &str) -> Result<Option<RuleCounter>, String> {
    let toks = tokens(rule);
    let word = |i: usize| toks.get(i).filter(|t| !t.quoted).map(|t| t.text.as_str());
    let num = |i: usize| -> Result<u64, String> {
        word(i)
            .and_then(|w| w.parse().ok())
            .ok_or_else(|| format!("bad counter in rule `{rule}`"))
    };
    let mut counter = None;
    let mut comment = None;
    for i in 0..toks.len() {
        match word(i) {
            Some("counter") if counter.is_none() && word(i + 1) == Some("packets") => {
                if word(i + 3) != Some("bytes") {
                    return Err(format!("bad counter in rule `{rule}`"));
                }
                counter = Some((num(i + 2)?, num(i + 4)?));
            }
            Some("comment") => {
                comment = toks.get(i + 1).filter(|t| t.quoted).map(|t| t.text.clone());
            }
            _ => {}
        }
    }
    Ok(counter.map(|(packets, bytes)| RuleCounter {
        chain: String::new(),
        comment,
        packets,
        bytes,
    }))
}

#[cfg(test)]
mod tests {
    /// One nftables notification: header, nfgenmsg (family), attribute 1 (the table).
    fn notification(msg: u16, family: u8, table: &str) -> Vec<u8> {
        let mut attr = Vec::new();
        let v = [table.as_bytes(), &[0]].concat();
        attr.extend(((4 + v.len()) as u16).to_ne_bytes());
        attr.extend(1u16.to_ne_bytes());
        attr.extend(&v);
        while attr.len() % 4 != 0 {
            attr.push(0);
        }
        let mut m = Vec::new();
        m.extend(((16 + 4 + attr.len()) as u32).to_ne_bytes());
        m.extend(((10u16 << 8) | msg).to_ne_bytes());
        m.extend([0u8; 10]);
        m.extend([family, 0, 0, 0]);
        m.extend(attr);
        m
    }

    #[test]
    fn only_notifications_of_our_table_count() {
        use super::concerns_our_table as ours;
        const DELTABLE: u16 = 2;
        const NEWRULE: u16 = 6;
        const DELSETELEM: u16 = 14;
        assert!(ours(&notification(DELTABLE, 1, "encryptd")));
        assert!(ours(&notification(DELSETELEM, 1, "encryptd")));
        assert!(!ours(&notification(NEWRULE, 1, "firewalld")));
        assert!(
            !ours(&notification(NEWRULE, 2, "encryptd")),
            "ip encryptd is not ours"
        );
        assert!(!ours(&notification(15, 1, "encryptd")), "NEWGEN");
        // `nft flush ruleset`: the other tables' notifications, then ours, in one read
        let batch = [
            notification(DELTABLE, 2, "filter"),
            notification(DELTABLE, 1, "encryptd"),
        ]
        .concat();
        assert!(ours(&batch));
        assert!(!ours(&notification(DELTABLE, 2, "filter")));
        // what does not parse counts
        let mut bad = notification(DELTABLE, 2, "filter");
        bad[0] = 200;
        assert!(ours(&bad));
    }

    #[test]
    fn canonical_ignores_counters_and_sees_everything_else() {
        let a = "table inet encryptd {\n\tset protected4 {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\telements = { 10.0.0.0/8 }\n\t}\n\n\tchain output {\n\t\tip daddr @protected4 rt ipsec missing counter packets 0 bytes 0 drop comment \"egress\"\n\t}\n}\n";
        let moved = a.replace("packets 0 bytes 0", "packets 12 bytes 1008");
        assert_eq!(super::canonical(a), super::canonical(&moved));
        assert!(super::canonical(a).contains("counter drop comment"));
        // a flushed set, an inserted accept: both seen
        let flushed = a.replace("\t\telements = { 10.0.0.0/8 }\n", "");
        assert_ne!(super::canonical(a), super::canonical(&flushed));
        let opened = a.replace("\tchain output {\n", "\tchain output {\n\t\taccept\n");
        assert_ne!(super::canonical(a), super::canonical(&opened));
        // what the coarse check misses
        assert!(super::holds(&flushed, a) && super::holds(&opened, a));
    }

    use super::*;

    /// Verbatim `nft list table inet encryptd` output of nftables 1.0.6 (Debian 12).
    const LISTING: &str = r#"table inet encryptd {
	set prot4 {
		type ipv4_addr
		flags interval
		elements = { 10.0.0.0/8, 192.168.0.0/16 }
	}

	chain out {
		type filter hook output priority filter; policy accept;
		ip daddr @prot4 ip protocol != esp rt ipsec missing counter packets 2 bytes 168 drop comment "strict-out-v4"
		ip daddr { 10.1.0.0-10.13.255.255 } tcp dport 22 counter packets 0 bytes 0 accept comment "exc-ssh"
		meta l4proto icmp counter packets 0 bytes 0 comment "icmp"
		ip6 daddr fd00::/8 counter packets 5 bytes 100 drop comment "with { brace"
	}

	chain in {
		type filter hook input priority filter; policy accept;
	}
}
"#;

    fn rc(chain: &str, comment: Option<&str>, packets: u64, bytes: u64) -> RuleCounter {
        RuleCounter {
            chain: chain.into(),
            comment: comment.map(str::to_string),
            packets,
            bytes,
        }
    }

    #[test]
    fn counters_of_a_real_listing() {
        assert_eq!(
            parse_counters(LISTING).unwrap(),
            vec![
                rc("out", Some("strict-out-v4"), 2, 168),
                rc("out", Some("exc-ssh"), 0, 0),
                rc("out", Some("icmp"), 0, 0),
                rc("out", Some("with { brace"), 5, 100),
            ]
        );
    }

    #[test]
    fn counters_with_handles() {
        // `nft -a list table` appends `# handle N` to blocks and rules
        let text = r#"table inet encryptd { # handle 2
	chain in { # handle 2
		type filter hook input priority filter; policy accept;
		ip saddr 10.0.0.0/8 meta ipsec missing counter packets 7 bytes 588 drop comment "strict-in-v4" # handle 4
		counter packets 1 bytes 2 # handle 5
	}
}
"#;
        assert_eq!(
            parse_counters(text).unwrap(),
            vec![rc("in", Some("strict-in-v4"), 7, 588), rc("in", None, 1, 2)]
        );
    }

    #[test]
    fn multi_line_sets_and_other_blocks_are_skipped() {
        let text = r#"table inet encryptd {
	set nodes {
		type ipv4_addr
		counter
		elements = { 10.0.0.1 counter packets 3 bytes 4,
			     10.0.0.2 counter packets 5 bytes 6 }
	}

	counter named {
		packets 9 bytes 9
	}

	chain out {
		type filter hook output priority filter; policy accept;
		ip daddr {
			10.1.0.0/16,
			10.2.0.0/16 } counter packets 11 bytes 12 drop comment "multi # line"
		ip daddr 10.3.0.0/16 drop comment "no counter"
	}
}
"#;
        assert_eq!(
            parse_counters(text).unwrap(),
            vec![rc("out", Some("multi # line"), 11, 12)]
        );
    }

    #[test]
    fn empty_and_garbage_listings() {
        assert_eq!(parse_counters("").unwrap(), vec![]);
        assert_eq!(
            parse_counters("table inet encryptd {\n}\n").unwrap(),
            vec![]
        );
        let e = parse_counters("table inet encryptd {\n\tchain x {\n").unwrap_err();
        assert!(e.message.contains("not closed"), "{e}");
        let e = parse_counters("}\n").unwrap_err();
        assert_eq!(e.line, 1);
        let e = parse_counters(
            "table inet encryptd {\n chain x {\n  counter packets many bytes 1\n }\n}\n",
        )
        .unwrap_err();
        assert_eq!((e.line, e.message.contains("bad counter")), (3, true));
        let e =
            parse_counters("table inet encryptd {\n chain x {\n  comment \"open\n").unwrap_err();
        assert!(e.message.contains("unterminated"), "{e}");
    }

    #[test]
    fn the_script_replaces_the_table() {
        let s = replace_script("table inet encryptd {\n}");
        assert_eq!(
            s,
            "table inet encryptd {}\ndelete table inet encryptd\ntable inet encryptd {\n}\n"
        );
    }

    #[test]
    fn error_lines_count_from_the_callers_text() {
        let e = "/dev/stdin:8:3-5: Error: syntax error\n  foo bar\n  ^^^";
        assert_eq!(
            relocate_stdin_lines(e),
            "ruleset:6:3-5: Error: syntax error\n  foo bar\n  ^^^"
        );
        // prelude lines and things that are not positions stay as they are
        assert_eq!(
            relocate_stdin_lines("/dev/stdin:2:1: x /dev/stdin: y"),
            "/dev/stdin:2:1: x /dev/stdin: y"
        );
    }

    #[test]
    fn only_our_table_is_touched() {
        let ok = [
            "table inet encryptd {\n chain out { type filter hook output priority 0; }\n}",
            "define P = { 10.0.0.0/8 }\ntable inet encryptd { }",
            "add table inet encryptd; add chain inet encryptd out",
            "flush chain inet encryptd out",
            "# a comment\n\ntable inet encryptd { comment \"; flush ruleset\" }",
        ];
        for t in ok {
            check_scope(t).unwrap_or_else(|e| panic!("{t:?}: {e}"));
        }
        let bad = [
            "flush ruleset",
            "table inet encryptd {}\nflush ruleset",
            "table inet encryptd {}; delete table ip filter",
            "table ip encryptd { }",
            "include \"/etc/nftables.conf\"",
            "table inet other {\n}",
        ];
        for t in bad {
            assert!(
                matches!(check_scope(t), Err(NftError::Foreign { .. })),
                "{t:?} accepted"
            );
        }
    }

    /// A stand-in for nft: a script in a temporary directory.
    fn fake_nft(name: &str, body: &str) -> (Nft, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let dir = crate::files::test_dir(&format!("nft-{name}"));
        let path = dir.join("nft");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        (Nft::with_program(&path), dir)
    }

    #[test]
    fn apply_sends_one_script_on_stdin() {
        let (nft, dir) = fake_nft(
            "stdin",
            "echo \"$@\" >\"$(dirname \"$0\")/args\"; cat >\"$(dirname \"$0\")/in\"",
        );
        // bigger than a pipe buffer: a memfd cannot block
        let big = format!(
            "table inet encryptd {{\n{}}}\n",
            "  # padding padding padding padding padding padding padding padding\n".repeat(4000)
        );
        nft.apply(&big).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("args")).unwrap(), "-f -\n");
        assert_eq!(
            std::fs::read_to_string(dir.join("in")).unwrap(),
            replace_script(&big)
        );
        nft.check("table inet encryptd {}").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("args")).unwrap(),
            "-c -f -\n"
        );
        nft.delete().unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("in")).unwrap(),
            REPLACE_PRELUDE
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn failures_carry_nfts_stderr() {
        let (nft, dir) = fake_nft(
            "fail",
            "cat >/dev/null; echo '/dev/stdin:4:3-5: Error: syntax error, unexpected junk' >&2; exit 1",
        );
        let e = nft.apply("table inet encryptd {\n}\n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("`nft -f -` failed"), "{msg}");
        assert!(
            msg.contains("ruleset:2:3-5: Error: syntax error, unexpected junk"),
            "{msg}"
        );
        std::fs::remove_dir_all(dir).unwrap();

        let (nft, dir) = fake_nft(
            "missing",
            "echo 'Error: No such file or directory' >&2; exit 1",
        );
        assert_eq!(nft.list().unwrap(), None);
        assert_eq!(nft.counters().unwrap(), vec![]);
        std::fs::remove_dir_all(dir).unwrap();

        let e = Nft::with_program("/nonexistent/nft").delete().unwrap_err();
        assert!(matches!(e, NftError::Spawn { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/nft"), "{e}");
    }

    #[test]
    fn foreign_text_never_reaches_nft() {
        let e = Nft::with_program("/nonexistent/nft")
            .apply("flush ruleset")
            .unwrap_err();
        assert!(matches!(e, NftError::Foreign { .. }), "{e}");
    }
}
