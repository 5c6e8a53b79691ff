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
    #[error("unexpected `nft -j list table inet encryptd` output: {0}")]
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

/// `nft -j list table inet encryptd`, parsed: the table's objects (table, sets,
/// chains, rules, ...) in listing order, each `{"kind": {...}}` as nft's JSON schema
/// has it. JSON rather than the text listing: the schema is nft's interface for
/// programs, and no quoting, multi-line set or `# handle` comment can mislead a reader.
#[derive(Debug, Clone, PartialEq)]
pub struct Listing {
    objects: Vec<serde_json::Map<String, serde_json::Value>>,
}

#[derive(serde::Deserialize)]
struct ListingDoc {
    nftables: Vec<serde_json::Map<String, serde_json::Value>>,
}

impl Listing {
    pub fn parse(json: &str) -> Result<Listing, ParseError> {
        let doc: ListingDoc = serde_json::from_str(json).map_err(|e| ParseError {
            line: e.line(),
            message: e.to_string(),
        })?;
        let mut objects = Vec::with_capacity(doc.nftables.len());
        for (i, o) in doc.nftables.into_iter().enumerate() {
            if o.len() != 1 {
                return Err(ParseError {
                    line: 1,
                    message: format!("object {i} has {} kinds, not one", o.len()),
                });
            }
            // metainfo: nft's version, not the table's content.
            if !o.contains_key("metainfo") {
                objects.push(o);
            }
        }
        Ok(Listing { objects })
    }

    fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a serde_json::Value> {
        self.objects.iter().filter_map(move |o| o.get(kind))
    }

    /// Every rule with an inline `counter`, with its chain and comment, in listing order.
    /// A malformed counter is an error: the drop counts in status and metrics must not
    /// silently read 0.
    pub fn counters(&self) -> Result<Vec<RuleCounter>, ParseError> {
        let mut out = Vec::new();
        for (i, rule) in self.of_kind("rule").enumerate() {
            let bad = |what: &str| ParseError {
                line: 1,
                message: format!("rule {i}: {what}"),
            };
            let chain = rule["chain"].as_str().ok_or_else(|| bad("no chain"))?;
            let exprs = rule["expr"].as_array().ok_or_else(|| bad("no expr list"))?;
            // `{"counter": "name"}` refers to a named counter object: not a rule's own.
            let Some(c) = exprs.iter().find_map(|e| e.get("counter")?.as_object()) else {
                continue;
            };
            let num = |k: &str| c.get(k).and_then(serde_json::Value::as_u64);
            let (Some(packets), Some(bytes)) = (num("packets"), num("bytes")) else {
                return Err(bad("bad counter"));
            };
            out.push(RuleCounter {
                chain: chain.to_string(),
                comment: rule["comment"].as_str().map(str::to_string),
                packets,
                bytes,
            });
        }
        Ok(out)
    }

    /// The listing with what the kernel changes on its own taken out (the counters'
    /// values, which packets move): two canonical listings of one table differ only when
    /// someone changed a rule, a chain or a set's elements. One object per line, keys
    /// sorted (serde_json's map is ordered).
    pub fn canonical(&self) -> String {
        let mut out = String::new();
        for o in &self.objects {
            let mut o = serde_json::Value::Object(o.clone());
            if let Some(exprs) = o
                .get_mut("rule")
                .and_then(|r| r.get_mut("expr"))
                .and_then(|e| e.as_array_mut())
            {
                for c in exprs.iter_mut().filter_map(|e| e.get_mut("counter")) {
                    if let Some(c) = c.as_object_mut() {
                        c.insert("packets".into(), 0.into());
                        c.insert("bytes".into(), 0.into());
                    }
                }
            }
            out.push_str(&o.to_string());
            out.push('\n');
        }
        out
    }

    /// Whether the listing still holds what `table_text` installed: every chain, and as
    /// many drops (rules and chain policies). Another program may have deleted a chain
    /// or a rule without removing the table. Coarse: it is the check for a table whose
    /// own listing was not taken when it was installed; [`Listing::canonical`] listings
    /// compare everything.
    pub fn holds(&self, table_text: &str) -> bool {
        let mut listed: Vec<&str> = self
            .of_kind("chain")
            .filter_map(|c| c["name"].as_str())
            .collect();
        listed.sort_unstable();
        let mut wanted: Vec<&str> = table_text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("chain "))
            .map(|c| c.trim_end_matches(['{', ' ']))
            .collect();
        wanted.sort_unstable();
        let drop_rules = self
            .of_kind("rule")
            .filter(|r| {
                r["expr"]
                    .as_array()
                    .is_some_and(|e| e.iter().any(|x| x.get("drop").is_some()))
            })
            .count();
        let drop_policies = self
            .of_kind("chain")
            .filter(|c| c["policy"] == "drop")
            .count();
        let text_drops = table_text
            .lines()
            .filter(|l| l.trim_end().contains(" drop"))
            .count();
        listed == wanted && drop_rules + drop_policies == text_drops
    }
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

    /// `nft -j list table inet encryptd`, or `None` when the table does not exist.
    pub fn list(&self) -> Result<Option<Listing>, NftError> {
        match self.run(&["-j", "list", "table", "inet", "encryptd"], None) {
            Ok(out) => Ok(Some(Listing::parse(&out)?)),
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
            Some(listing) => Ok(listing.counters()?),
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
        let toks = tokens(&stmt);
        let words: Vec<&str> = toks.iter().map(String::as_str).collect();
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

/// Whitespace-separated words; a `"quoted string"` is one word, without its quotes.
fn tokens(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '"' {
            chars.next();
            let text: String = chars.by_ref().take_while(|&c| c != '"').collect();
            out.push(text);
        } else {
            let mut text = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() || c == '"' {
                    break;
                }
                text.push(c);
                chars.next();
            }
            out.push(text);
        }
    }
    out
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

    use super::*;

    /// Verbatim `nft -j list table inet encryptd` output of nftables 1.0.6 (Debian 12)
    /// for a table with a set, two chains, rules with and without drops and a comment
    /// with a brace in it.
    const LISTING: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "inet", "name": "encryptd", "handle": 1}}, {"set": {"family": "inet", "name": "prot4", "table": "encryptd", "type": "ipv4_addr", "handle": 3, "flags": ["interval"], "elem": [{"prefix": {"addr": "10.0.0.0", "len": 8}}, {"prefix": {"addr": "192.168.0.0", "len": 16}}]}}, {"chain": {"family": "inet", "table": "encryptd", "name": "out", "handle": 1, "type": "filter", "hook": "output", "prio": 0, "policy": "accept"}}, {"chain": {"family": "inet", "table": "encryptd", "name": "in", "handle": 2, "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}}, {"rule": {"family": "inet", "table": "encryptd", "chain": "out", "handle": 4, "comment": "strict-out-v4", "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "@prot4"}}, {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "protocol"}}, "right": "esp"}}, {"match": {"op": "==", "left": {"rt": {"key": "ipsec"}}, "right": false}}, {"counter": {"packets": 2, "bytes": 168}}, {"drop": null}]}}, {"rule": {"family": "inet", "table": "encryptd", "chain": "out", "handle": 5, "comment": "exc-ssh", "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": {"range": ["10.1.0.0", "10.13.255.255"]}}}, {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 22}}, {"counter": {"packets": 0, "bytes": 0}}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "encryptd", "chain": "out", "handle": 6, "comment": "icmp", "expr": [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "icmp"}}, {"counter": {"packets": 0, "bytes": 0}}]}}, {"rule": {"family": "inet", "table": "encryptd", "chain": "out", "handle": 7, "comment": "with { brace", "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "daddr"}}, "right": {"prefix": {"addr": "fd00::", "len": 8}}}}, {"counter": {"packets": 5, "bytes": 100}}, {"drop": null}]}}]}"#;

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
            Listing::parse(LISTING).unwrap().counters().unwrap(),
            vec![
                rc("out", Some("strict-out-v4"), 2, 168),
                rc("out", Some("exc-ssh"), 0, 0),
                rc("out", Some("icmp"), 0, 0),
                rc("out", Some("with { brace"), 5, 100),
            ]
        );
    }

    #[test]
    fn rules_without_an_inline_counter_are_skipped() {
        let doc = r#"{"nftables": [
            {"rule": {"family": "inet", "table": "encryptd", "chain": "in", "handle": 4, "expr": [{"drop": null}]}},
            {"rule": {"family": "inet", "table": "encryptd", "chain": "in", "handle": 5, "expr": [{"counter": "named"}, {"drop": null}]}},
            {"rule": {"family": "inet", "table": "encryptd", "chain": "in", "handle": 6, "expr": [{"counter": {"packets": 7, "bytes": 588}}]}}]}"#;
        assert_eq!(
            Listing::parse(doc).unwrap().counters().unwrap(),
            vec![rc("in", None, 7, 588)]
        );
    }

    #[test]
    fn empty_and_garbage_listings() {
        let empty = Listing::parse(r#"{"nftables": []}"#).unwrap();
        assert_eq!(empty.counters().unwrap(), vec![]);
        assert_eq!(empty.canonical(), "");
        for bad in [
            "",
            "table inet encryptd {\n}\n",
            r#"{"nftables": {}}"#,
            r#"{"nftables": [{"rule": {}, "chain": {}}]}"#,
        ] {
            assert!(Listing::parse(bad).is_err(), "{bad:?}");
        }
        let bad_counter = r#"{"nftables": [{"rule": {"chain": "x", "expr": [{"counter": {"packets": -1, "bytes": 1}}]}}]}"#;
        let e = Listing::parse(bad_counter).unwrap().counters().unwrap_err();
        assert!(e.message.contains("bad counter"), "{e}");
        let no_chain = r#"{"nftables": [{"rule": {"expr": []}}]}"#;
        assert!(Listing::parse(no_chain).unwrap().counters().is_err());
    }

    #[test]
    fn canonical_ignores_counters_and_sees_everything_else() {
        let canon = |j: &str| Listing::parse(j).unwrap().canonical();
        let a = canon(LISTING);
        assert!(!a.contains("metainfo"), "nft's version is not the table's");
        let moved = LISTING.replace(
            r#""packets": 2, "bytes": 168"#,
            r#""packets": 9, "bytes": 900"#,
        );
        assert_ne!(moved, LISTING);
        assert_eq!(canon(&moved), a);
        // a flushed set, an inserted accept, a rule's verdict turned: all seen
        let flushed = LISTING.replace(
            r#", "elem": [{"prefix": {"addr": "10.0.0.0", "len": 8}}, {"prefix": {"addr": "192.168.0.0", "len": 16}}]"#,
            "",
        );
        let opened = LISTING.replace(
            r#"{"rule": {"family": "inet", "table": "encryptd", "chain": "out", "handle": 4,"#,
            r#"{"rule": {"family": "inet", "table": "encryptd", "chain": "out", "handle": 9, "expr": [{"accept": null}]}}, {"rule": {"family": "inet", "table": "encryptd", "chain": "out", "handle": 4,"#,
        );
        let turned = LISTING.replacen(r#"{"drop": null}"#, r#"{"accept": null}"#, 1);
        for (what, changed) in [
            ("flushed", &flushed),
            ("opened", &opened),
            ("turned", &turned),
        ] {
            assert_ne!(changed.as_str(), LISTING, "{what}: the fixture changed");
            assert_ne!(canon(changed), a, "{what}");
        }
        // what the coarse check misses, and what it sees
        let text = "table inet encryptd {\n\tchain out {\n\t\tx drop\n\t\ty drop\n\t}\n\tchain in {\n\t}\n}\n";
        let l = |j: &str| Listing::parse(j).unwrap();
        assert!(l(LISTING).holds(text));
        assert!(l(&flushed).holds(text) && l(&opened).holds(text));
        assert!(!l(&turned).holds(text), "a drop less");
        assert!(!l(LISTING).holds(&text.replace("chain in", "chain input")));
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
