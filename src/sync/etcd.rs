//! A small synchronous client of etcd's v3 JSON gateway (`/v3/kv/*`, `/v3/watch`,
//! `/v3/auth/authenticate`) over HTTPS with a client certificate: what `encryptd sync`
//! needs, without an async runtime. Keys and values travel base64-encoded, 64-bit numbers
//! as strings (the gateway's JSON mapping of protobuf).
//!
//! The gateway does not map a client certificate's Common Name to an etcd user (etcd
//! refuses gateway requests whose certificate has one, PR etcd-io/etcd#10366): RBAC goes
//! by user and password, a token per session, and the certificate authenticates the
//! transport.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig};
use zeroize::Zeroizing;

use super::registry::Kv;
use crate::config::diag::read_secret_file;
use crate::config::settings::Sync;

/// A request (not a watch) that takes longer has failed: the member is down or cut off.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A watch that says nothing for this long is re-created from the last revision seen: a
/// member that vanished without closing the connection is noticed this soon.
pub const WATCH_IDLE: Duration = Duration::from_secs(30);
/// A range of every registration at 10,000 nodes is a few MB.
const BODY_LIMIT: u64 = 256 << 20;

#[derive(Debug)]
pub enum Error {
    /// No member answered (connection refused or timed out, TLS failed).
    Unreachable(String),
    /// A member answered with an error (permission denied, bad request).
    Refused(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Unreachable(s) | Error::Refused(s) => f.write_str(s),
        }
    }
}

/// One change seen by a watch.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A key written, and the revision it was written at.
    Put(String, Kv, i64),
    Delete(String, i64),
}

/// One message of a watch stream.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WatchMsg {
    pub revision: i64,
    pub events: Vec<Event>,
    /// The watch ended (its start revision was compacted away, or the member cancelled it).
    pub canceled: bool,
}

pub struct Client {
    agent: ureq::Agent,
    watch_agent: ureq::Agent,
    endpoints: Vec<String>,
    current: usize,
    auth: Option<(String, Zeroizing<String>)>,
    token: Option<Zeroizing<String>>,
}

fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: cannot read the {what}: {e}", path.display()))
}

fn tls_config(s: &Sync) -> Result<TlsConfig, String> {
    let mut b = TlsConfig::builder();
    if let Some(ca) = &s.ca {
        let pem = read_pem(ca, "CA certificate")?;
        let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
            .filter_map(|i| match i {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if certs.is_empty() {
            return Err(format!("{}: no certificate in the CA file", ca.display()));
        }
        b = b.root_certs(RootCerts::new_with_certs(&certs));
    }
    if let (Some(cert), Some(key)) = (&s.cert, &s.key) {
        let pem = read_pem(cert, "client certificate")?;
        let chain: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
            .filter_map(|i| match i {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if chain.is_empty() {
            return Err(format!("{}: no certificate in the file", cert.display()));
        }
        let key_pem = read_secret_file(key, "client key").map_err(|d| d.to_string())?;
        let key = PrivateKey::from_pem(&key_pem)
            .map_err(|e| format!("{}: not a PEM private key: {e}", key.display()))?;
        b = b.client_cert(Some(ClientCert::new_with_certs(&chain, key)));
    }
    Ok(b.build())
}

impl Client {
    /// A client for `[sync]`; the files it names are read now (errors name them).
    pub fn new(s: &Sync) -> Result<Client, String> {
        let tls = tls_config(s)?;
        let agent = |read: Duration, call: Option<Duration>| -> ureq::Agent {
            ureq::Agent::config_builder()
                .tls_config(tls.clone())
                .timeout_connect(Some(CONNECT_TIMEOUT))
                .timeout_per_read(Some(read))
                .timeout_per_call(call)
                .http_status_as_error(false)
                .max_redirects(0)
                .build()
                .into()
        };
        let auth = match (&s.user, &s.password_file) {
            (Some(u), Some(p)) => {
                let bytes = read_secret_file(p, "etcd password").map_err(|d| d.to_string())?;
                let text = std::str::from_utf8(&bytes)
                    .map_err(|_| format!("{}: the password is not text", p.display()))?;
                Some((
                    u.clone(),
                    Zeroizing::new(text.trim_end_matches('\n').to_string()),
                ))
            }
            _ => None,
        };
        Ok(Client {
            agent: agent(CALL_TIMEOUT, Some(CALL_TIMEOUT)),
            watch_agent: agent(WATCH_IDLE, None),
            endpoints: s.endpoints.clone(),
            current: 0,
            auth,
            token: None,
        })
    }

    pub fn endpoints(&self) -> usize {
        self.endpoints.len()
    }

    /// Use the next member (the current one's watch failed).
    pub fn next_endpoint(&mut self) {
        // The token stays: etcd's tokens are agreed through raft, valid at every member
        // (a restarted member forgets them: "invalid auth token", and a new one is asked).
        self.current = (self.current + 1) % self.endpoints.len();
    }

    /// The endpoint in use.
    pub fn endpoint(&self) -> &str {
        &self.endpoints[self.current]
    }

    fn post(
        &self,
        agent: &ureq::Agent,
        path: &str,
        body: &Value,
    ) -> Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        let mut req = agent
            .post(format!("{}{path}", self.endpoint()))
            .header("Content-Type", "application/json");
        if let Some(t) = &self.token
            && path != "/v3/auth/authenticate"
        {
            req = req.header("Authorization", t.as_str());
        }
        req.send(body.to_string().as_bytes())
    }

    /// One request, at the current member or, if it does not answer, the next ones.
    fn call(&mut self, path: &str, body: &Value) -> Result<Value, Error> {
        let authenticating = path == "/v3/auth/authenticate";
        if self.auth.is_some() && self.token.is_none() && !authenticating {
            self.authenticate()?;
        }
        let mut last = Error::Unreachable("no endpoint".into());
        for _ in 0..self.endpoints.len() {
            match self.exchange(path, body) {
                // An expired token (the member restarted, or its TTL passed): a new one, once.
                Err(Error::Refused(m))
                    if m.contains("invalid auth token")
                        && self.auth.is_some()
                        && !authenticating =>
                {
                    self.token = None;
                    self.authenticate()?;
                    return self.exchange(path, body);
                }
                Err(e @ Error::Unreachable(_)) => {
                    last = e;
                    self.next_endpoint();
                }
                done => return done,
            }
        }
        Err(last)
    }

    /// One request at the current member: its JSON answer, or what went wrong.
    fn exchange(&self, path: &str, body: &Value) -> Result<Value, Error> {
        let at = self.endpoint();
        let resp = self
            .post(&self.agent, path, body)
            .map_err(|e| Error::Unreachable(format!("{at}: {e}")))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .with_config()
            .limit(BODY_LIMIT)
            .read_to_vec()
            .map_err(|e| Error::Unreachable(format!("{at}: {e}")))?;
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Refused(format!("{at}{path}: HTTP {status}, not JSON: {e}")))?;
        if status == 200 {
            return Ok(v);
        }
        let msg = v["message"]
            .as_str()
            .or(v["error"].as_str())
            .unwrap_or("no message");
        Err(Error::Refused(format!("{at}{path}: HTTP {status}: {msg}")))
    }

    fn authenticate(&mut self) -> Result<(), Error> {
        let Some((user, password)) = &self.auth else {
            return Ok(());
        };
        let body = json!({ "name": user, "password": password.as_str() });
        let v = self.call("/v3/auth/authenticate", &body)?;
        let token = v["token"].as_str().ok_or_else(|| {
            Error::Refused(format!("{}: authenticate: no token", self.endpoint()))
        })?;
        self.token = Some(Zeroizing::new(token.to_string()));
        Ok(())
    }

    pub fn put(&mut self, key: &str, value: &[u8]) -> Result<(), Error> {
        self.call(
            "/v3/kv/put",
            &json!({ "key": B64.encode(key), "value": B64.encode(value) }),
        )
        .map(|_| ())
    }

    pub fn delete(&mut self, key: &str) -> Result<bool, Error> {
        let v = self.call("/v3/kv/deleterange", &json!({ "key": B64.encode(key) }))?;
        Ok(int(&v["deleted"]) > 0)
    }

    /// Every key under `dir`, and the revision they were read at.
    pub fn range(&mut self, dir: &str) -> Result<(BTreeMap<String, Kv>, i64), Error> {
        // Serializable: the member's own copy, readable while the cluster elects a leader
        // (a member lost); the watch from the revision read brings whatever came later.
        let v = self.call(
            "/v3/kv/range",
            &json!({
                "key": B64.encode(dir),
                "range_end": B64.encode(range_end(dir)),
                "serializable": true,
            }),
        )?;
        let mut out = BTreeMap::new();
        for kv in v["kvs"].as_array().into_iter().flatten() {
            if let Some((k, kv)) = decode_kv(kv) {
                out.insert(k, kv);
            }
        }
        Ok((out, int(&v["header"]["revision"])))
    }

    /// Watch `dir` from revision `from` on: a stream of messages until it ends, fails, or
    /// stays silent for [`WATCH_IDLE`].
    pub fn watch(&mut self, dir: &str, from: i64) -> Result<Watch, Error> {
        if self.auth.is_some() && self.token.is_none() {
            self.authenticate()?;
        }
        let body = json!({ "create_request": {
            "key": B64.encode(dir),
            "range_end": B64.encode(range_end(dir)),
            "start_revision": from.to_string(),
        }});
        let resp = match self.post(&self.watch_agent, "/v3/watch", &body) {
            Ok(r) => r,
            Err(e) => {
                let e = Error::Unreachable(format!("{}: watch: {e}", self.endpoint()));
                self.next_endpoint();
                return Err(e);
            }
        };
        if resp.status().as_u16() != 200 {
            self.token = None;
            return Err(Error::Refused(format!(
                "{}: watch: HTTP {}",
                self.endpoint(),
                resp.status()
            )));
        }
        let reader: Box<dyn Read> = Box::new(resp.into_body().into_reader());
        Ok(Watch {
            stream: serde_json::Deserializer::from_reader(reader).into_iter(),
            endpoint: self.endpoint().to_string(),
        })
    }
}

pub struct Watch {
    stream: serde_json::StreamDeserializer<'static, serde_json::de::IoRead<Box<dyn Read>>, Value>,
    endpoint: String,
}

/// Why a watch stream stopped.
#[derive(Debug)]
pub enum WatchEnd {
    /// Nothing for [`WATCH_IDLE`]: quiet, or the member is gone; re-create it.
    Idle,
    Failed(Error),
}

impl Watch {
    pub fn message(&mut self) -> Result<WatchMsg, WatchEnd> {
        match self.stream.next() {
            None => Err(WatchEnd::Failed(Error::Unreachable(format!(
                "{}: the watch stream ended",
                self.endpoint
            )))),
            // ureq's per-read timeout, wrapped in an io::Error.
            Some(Err(e)) if e.is_io() && e.to_string().contains("timeout: per read") => {
                Err(WatchEnd::Idle)
            }
            Some(Err(e)) => Err(WatchEnd::Failed(Error::Unreachable(format!(
                "{}: watch: {e}",
                self.endpoint
            )))),
            Some(Ok(v)) => {
                // The gateway reports a broken stream (a member stopping) this way.
                if let Some(err) = v.get("error") {
                    return Err(WatchEnd::Failed(Error::Unreachable(format!(
                        "{}: watch: {}",
                        self.endpoint,
                        err["message"].as_str().unwrap_or("error")
                    ))));
                }
                Ok(decode_watch(&v["result"]))
            }
        }
    }
}

fn decode_watch(r: &Value) -> WatchMsg {
    let mut msg = WatchMsg {
        revision: int(&r["header"]["revision"]),
        canceled: r["canceled"].as_bool().unwrap_or(false) || int(&r["compact_revision"]) > 0,
        events: Vec::new(),
    };
    for e in r["events"].as_array().into_iter().flatten() {
        let Some(key) = e["kv"]["key"].as_str().and_then(b64_text) else {
            continue;
        };
        let at = int(&e["kv"]["mod_revision"]);
        if e["type"].as_str() == Some("DELETE") {
            msg.events.push(Event::Delete(key, at));
        } else if let Some((k, kv)) = decode_kv(&e["kv"]) {
            msg.events.push(Event::Put(k, kv, at));
        }
    }
    msg
}

fn decode_kv(kv: &Value) -> Option<(String, Kv)> {
    let key = kv["key"].as_str().and_then(b64_text)?;
    let value = kv["value"]
        .as_str()
        .map(|v| B64.decode(v).unwrap_or_default())
        .unwrap_or_default();
    Some((
        key,
        Kv {
            create_revision: int(&kv["create_revision"]),
            value,
        },
    ))
}

fn b64_text(s: &str) -> Option<String> {
    String::from_utf8(B64.decode(s).ok()?).ok()
}

/// A protobuf int64 in the gateway's JSON: a string, or absent for 0.
fn int(v: &Value) -> i64 {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| v.as_i64())
        .unwrap_or(0)
}

/// The end of the range of keys that start with `prefix`: its last byte plus one.
fn range_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_message_of_the_gateway_decodes() {
        // As etcd 3.4's gateway streams it: int64 as strings, PUT's type omitted.
        let v: Value = serde_json::from_str(
            r#"{"result":{"header":{"cluster_id":"1","revision":"42"},"events":[
                {"kv":{"key":"L2Uvbm9kZXMvYQ==","create_revision":"40","mod_revision":"42","version":"2","value":"e30="}},
                {"type":"DELETE","kv":{"key":"L2Uvbm9kZXMvYg==","mod_revision":"42"}}]}}"#,
        )
        .unwrap();
        let m = decode_watch(&v["result"]);
        assert_eq!(m.revision, 42);
        assert!(!m.canceled);
        assert_eq!(
            m.events,
            [
                Event::Put(
                    "/e/nodes/a".into(),
                    Kv {
                        create_revision: 40,
                        value: b"{}".to_vec()
                    },
                    42
                ),
                Event::Delete("/e/nodes/b".into(), 42)
            ]
        );
        let c: Value = serde_json::from_str(
            r#"{"result":{"header":{"revision":"9"},"compact_revision":"5","canceled":true}}"#,
        )
        .unwrap();
        assert!(decode_watch(&c["result"]).canceled);
    }

    #[test]
    fn the_range_of_a_prefix_ends_after_its_last_key() {
        assert_eq!(range_end("/e/nodes/"), b"/e/nodes0");
        assert_eq!(range_end("a\u{7f}"), b"a\x80");
    }
}
