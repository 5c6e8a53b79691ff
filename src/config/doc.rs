//! The low-level phase: a TOML document read with spans, key by key, so that every
//! problem — syntax, unknown key, wrong type, missing field — is reported with its
//! position, all of them in one pass.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::ops::Range;

use toml::Spanned;
use toml::de::{DeArray, DeTable, DeValue};

use super::diag::{Diagnostic, Diags, Source, suggest};

/// A value with the byte range it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct At<T> {
    pub value: T,
    pub span: Range<usize>,
}

/// Parse `src` as TOML; syntax errors go to `diags`, and what could be recovered is returned.
pub fn parse<'i>(src: &Source<'i>, diags: &Diags) -> Spanned<DeTable<'i>> {
    let (table, errors) = DeTable::parse_recoverable(src.text);
    for e in errors {
        let span = e.span().unwrap_or(0..0);
        diags.push(src.diag(span, format!("TOML syntax: {}", e.message().trim())));
    }
    table
}

/// One table being read: every key it holds must be asked for, or `finish` reports it.
pub struct Table<'a, 'i> {
    src: &'a Source<'a>,
    diags: &'a Diags,
    table: &'a DeTable<'i>,
    span: Range<usize>,
    /// How the table is named in messages: `[ipsec]`, `[[node]] #2`, `the top level`.
    name: String,
    asked: RefCell<BTreeSet<&'static str>>,
}

fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a datetime",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

impl<'a, 'i> Table<'a, 'i> {
    pub fn new(
        src: &'a Source<'a>,
        diags: &'a Diags,
        table: &'a Spanned<DeTable<'i>>,
        name: impl Into<String>,
    ) -> Self {
        Self::of(src, diags, table.get_ref(), table.span(), name.into())
    }

    fn of(
        src: &'a Source<'a>,
        diags: &'a Diags,
        table: &'a DeTable<'i>,
        span: Range<usize>,
        name: String,
    ) -> Self {
        Table {
            src,
            diags,
            table,
            span,
            name,
            asked: RefCell::default(),
        }
    }

    pub fn span(&self) -> Range<usize> {
        self.span.clone()
    }

    pub fn error(&self, span: Range<usize>, message: impl Into<String>) {
        self.diags.push(self.src.diag(span, message));
    }

    pub fn diag(&self, span: Range<usize>, message: impl Into<String>) -> Diagnostic {
        self.src.diag(span, message)
    }

    fn get(&self, key: &'static str) -> Option<&'a Spanned<DeValue<'i>>> {
        self.asked.borrow_mut().insert(key);
        self.table.get(key)
    }

    /// Whether the table holds `key` at all (valid or not).
    pub fn has_key(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    /// Report that a required `key` is absent, at the table.
    pub fn missing(&self, key: &str) {
        self.error(
            self.span(),
            format!("missing required field `{key}` in {}", self.name),
        );
    }

    fn wrong_type(&self, key: &str, v: &Spanned<DeValue<'_>>, want: &str) {
        self.error(
            v.span(),
            format!("`{key}` must be {want}, not {}", type_name(v.get_ref())),
        );
    }

    pub fn string(&self, key: &'static str) -> Option<At<String>> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::String(s) => Some(At {
                value: s.to_string(),
                span: v.span(),
            }),
            _ => {
                self.wrong_type(key, v, "a string");
                None
            }
        }
    }

    pub fn required_string(&self, key: &'static str) -> Option<At<String>> {
        if !self.table.contains_key(key) {
            self.asked.borrow_mut().insert(key);
            self.missing(key);
            return None;
        }
        self.string(key)
    }

    pub fn boolean(&self, key: &'static str) -> Option<bool> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            _ => {
                self.wrong_type(key, v, "true or false");
                None
            }
        }
    }

    /// An integer in `range`; out-of-range values are reported with the range.
    pub fn integer(&self, key: &'static str, range: Range<i64>) -> Option<At<i64>> {
        let v = self.get(key)?;
        let n = match v.get_ref() {
            DeValue::Integer(i) => {
                i64::from_str_radix(&i.as_str().replace('_', ""), i.radix()).ok()
            }
            _ => {
                self.wrong_type(key, v, "an integer");
                return None;
            }
        };
        match n {
            Some(n) if range.contains(&n) => Some(At {
                value: n,
                span: v.span(),
            }),
            _ => {
                self.error(
                    v.span(),
                    format!(
                        "`{key}` must be between {} and {}",
                        range.start,
                        range.end - 1
                    ),
                );
                None
            }
        }
    }

    /// An array of strings (an absent key is `None`, an empty array `Some(vec![])`).
    pub fn strings(&self, key: &'static str) -> Option<Vec<At<String>>> {
        let items = self.array(key)?;
        let mut out = Vec::new();
        for v in items.iter() {
            match v.get_ref() {
                DeValue::String(s) => out.push(At {
                    value: s.to_string(),
                    span: v.span(),
                }),
                other => self.error(
                    v.span(),
                    format!("`{key}` must hold strings, not {}", type_name(other)),
                ),
            }
        }
        Some(out)
    }

    fn array(&self, key: &'static str) -> Option<&'a DeArray<'i>> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::Array(a) => Some(a),
            _ => {
                self.wrong_type(key, v, "an array");
                None
            }
        }
    }

    /// A sub-table `[key]` (or inline table).
    pub fn table(&self, key: &'static str) -> Option<Table<'a, 'i>> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::Table(t) => Some(Self::of(
                self.src,
                self.diags,
                t,
                v.span(),
                format!("[{key}]"),
            )),
            _ => {
                self.wrong_type(key, v, "a table");
                None
            }
        }
    }

    /// An array of tables (`[[key]]`, or an array of inline tables).
    pub fn tables(&self, key: &'static str) -> Vec<Table<'a, 'i>> {
        let Some(items) = self.array(key) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, v) in items.iter().enumerate() {
            match v.get_ref() {
                DeValue::Table(t) => out.push(Self::of(
                    self.src,
                    self.diags,
                    t,
                    v.span(),
                    format!("[[{key}]] #{}", i + 1),
                )),
                other => self.error(
                    v.span(),
                    format!("`{key}` must hold tables, not {}", type_name(other)),
                ),
            }
        }
        out
    }

    /// Report every key nobody asked for: a typo must not pass silently.
    pub fn finish(&self) {
        let asked = self.asked.borrow();
        let known: Vec<&str> = asked.iter().copied().collect();
        for (k, _) in self.table.iter() {
            if asked.contains(k.get_ref().as_ref()) {
                continue;
            }
            let hint = suggest(k.get_ref(), &known)
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_else(|| format!(" (known keys: {})", known.join(", ")));
            self.error(
                k.span(),
                format!("unknown key `{}` in {}{hint}", k.get_ref(), self.name),
            );
        }
    }
}
