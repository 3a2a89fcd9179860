//! A fault-injecting HTTP/1.1 proxy on loopback, between the tool and a real registry.
//!
//! It forwards requests as they are (head and body, keep-alive), records every request it
//! saw with the status the client got, and applies the first matching [`Rule`] to a
//! request: answer a status itself, drop the connection half-way through the request body,
//! or wait before forwarding. A TLS hello is refused at once (the tool tries HTTPS first
//! on loopback hosts).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with this status (and `Retry-After: N` when given), then close.
    Status { code: u16, retry_after: Option<u64> },
    /// Forward half the request body, then drop both connections.
    DropMidBody,
    /// Wait, then forward.
    Delay(Duration),
}

#[derive(Debug, Clone)]
pub struct Rule {
    /// Method to match ("" for any).
    pub method: String,
    /// Text the path must contain ("" for any).
    pub path_contains: String,
    /// Text the query must contain ("" for any).
    pub query_contains: String,
    pub fault: Fault,
    /// Matching requests to let through before applying it.
    pub skip: usize,
    /// How many more requests it applies to (None: forever).
    pub remaining: Option<usize>,
}

/// A request the proxy saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: String,
    /// Status the client got (0: connection dropped).
    pub status: u16,
    pub fault: Option<String>,
    pub body_len: u64,
}

struct State {
    upstream: SocketAddr,
    rules: Mutex<Vec<Rule>>,
    seen: Mutex<Vec<Seen>>,
}

pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(State {
            upstream,
            rules: Mutex::new(Vec::new()),
            seen: Mutex::new(Vec::new()),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, &st);
                });
            }
        });
        Proxy { addr, state, stop }
    }

    pub fn rule(&self, method: &str, path_contains: &str, fault: Fault, times: Option<usize>) {
        self.rule_q(method, path_contains, "", fault, times);
    }

    pub fn rule_q(
        &self,
        method: &str,
        path_contains: &str,
        query_contains: &str,
        fault: Fault,
        times: Option<usize>,
    ) {
        self.rule_nth(method, path_contains, query_contains, 0, fault, times);
    }

    /// A rule that lets the first `skip` matching requests through.
    pub fn rule_nth(
        &self,
        method: &str,
        path_contains: &str,
        query_contains: &str,
        skip: usize,
        fault: Fault,
        times: Option<usize>,
    ) {
        self.state.rules.lock().unwrap().push(Rule {
            method: method.to_string(),
            path_contains: path_contains.to_string(),
            query_contains: query_contains.to_string(),
            fault,
            skip,
            remaining: times,
        });
    }

    pub fn clear_rules(&self) {
        self.state.rules.lock().unwrap().clear();
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    pub fn clear_seen(&self) {
        self.state.seen.lock().unwrap().clear();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wakes the accept loop
    }
}

impl State {
    fn take_fault(&self, method: &str, path: &str, query: &str) -> Option<Fault> {
        let mut rules = self.rules.lock().unwrap();
        for rule in rules.iter_mut() {
            if (rule.method.is_empty() || rule.method == method)
                && path.contains(&rule.path_contains)
                && query.contains(&rule.query_contains)
                && rule.remaining != Some(0)
            {
                if rule.skip > 0 {
                    rule.skip -= 1;
                    continue;
                }
                if let Some(n) = &mut rule.remaining {
                    *n -= 1;
                }
                return Some(rule.fault.clone());
            }
        }
        None
    }

    /// Log a request as it arrives; its entry is completed by `done`.
    fn record(&self, seen: Seen) -> usize {
        let mut log = self.seen.lock().unwrap();
        log.push(seen);
        log.len() - 1
    }

    fn done(&self, at: usize, status: u16, body_len: u64) {
        if let Some(s) = self.seen.lock().unwrap().get_mut(at) {
            s.status = status;
            s.body_len = body_len;
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum BodyKind {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// The head of a message, raw, or None at a clean end of stream.
fn read_head(r: &mut impl BufRead) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    loop {
        let n = r.read_until(b'\n', &mut head)?;
        if n == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "truncated head",
                ))
            };
        }
        if head.ends_with(b"\r\n\r\n") || head == b"\r\n" {
            if head == b"\r\n" {
                head.clear(); // a stray empty line between messages
                continue;
            }
            return Ok(Some(head));
        }
        if head.len() > 64 << 10 {
            return Err(io::Error::other("head too long"));
        }
    }
}

fn header_values(head: &str) -> Vec<(String, String)> {
    head.split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect()
}

fn body_kind(headers: &[(String, String)], default: BodyKind) -> BodyKind {
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"))
    {
        return BodyKind::Chunked;
    }
    match headers.iter().find(|(k, _)| k == "content-length") {
        Some((_, v)) => BodyKind::Length(v.parse().unwrap_or(0)),
        None => default,
    }
}

fn copy_body(r: &mut impl BufRead, w: &mut impl Write, kind: BodyKind) -> io::Result<u64> {
    match kind {
        BodyKind::None => Ok(0),
        BodyKind::Length(n) => {
            let copied = io::copy(&mut r.take(n), w)?;
            if copied < n {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short body"));
            }
            Ok(copied)
        }
        BodyKind::UntilClose => io::copy(r, w),
        BodyKind::Chunked => {
            let mut total = 0;
            loop {
                let mut line = Vec::new();
                r.read_until(b'\n', &mut line)?;
                w.write_all(&line)?;
                let text = String::from_utf8_lossy(&line);
                let size_text = text.trim().split(';').next().unwrap_or("").trim();
                let size = u64::from_str_radix(size_text, 16)
                    .map_err(|_| io::Error::other("bad chunk size"))?;
                if size == 0 {
                    loop {
                        let mut t = Vec::new();
                        if r.read_until(b'\n', &mut t)? == 0 {
                            return Ok(total);
                        }
                        w.write_all(&t)?;
                        if t == b"\r\n" {
                            return Ok(total);
                        }
                    }
                }
                total += io::copy(&mut r.take(size + 2), w)?;
            }
        }
    }
}

fn serve(client: TcpStream, state: &State) -> io::Result<()> {
    let mut cr = BufReader::new(client.try_clone()?);
    let mut cw = client;
    let mut upstream: Option<(BufReader<TcpStream>, TcpStream)> = None;
    loop {
        let first = cr.fill_buf()?;
        if first.is_empty() || first[0] == 0x16 {
            return Ok(()); // end, or a TLS hello: not for us
        }
        let Some(head) = read_head(&mut cr)? else {
            return Ok(());
        };
        let text = String::from_utf8_lossy(&head).into_owned();
        let mut words = text.split_whitespace();
        let method = words.next().unwrap_or("").to_string();
        let target = words.next().unwrap_or("").to_string();
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p.to_string(), q.to_string()),
            None => (target.clone(), String::new()),
        };
        let headers = header_values(&text);
        let body = body_kind(&headers, BodyKind::None);
        let fault = state.take_fault(&method, &path, &query);
        let at = state.record(Seen {
            method: method.clone(),
            path,
            query,
            status: 0,
            fault: fault.as_ref().map(|f| format!("{f:?}")),
            body_len: 0,
        });
        match fault {
            Some(Fault::Status { code, retry_after }) => {
                let body_len = copy_body(&mut cr, &mut io::sink(), body)?;
                let msg = format!(
                    "{{\"errors\":[{{\"code\":\"UNAVAILABLE\",\"message\":\"injected {code}\"}}]}}"
                );
                let mut resp = format!(
                    "HTTP/1.1 {code} Injected\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
                    msg.len()
                );
                if let Some(s) = retry_after {
                    resp.push_str(&format!("Retry-After: {s}\r\n"));
                }
                resp.push_str("\r\n");
                resp.push_str(&msg);
                state.done(at, code, body_len);
                cw.write_all(resp.as_bytes())?;
                let _ = cw.shutdown(Shutdown::Both);
                return Ok(());
            }
            Some(Fault::DropMidBody) => {
                let up = TcpStream::connect(state.upstream)?;
                let mut uw = up.try_clone()?;
                uw.write_all(&head)?;
                let half = match body {
                    BodyKind::Length(n) => n / 2,
                    _ => 0,
                };
                let body_len = io::copy(&mut (&mut cr).take(half), &mut uw)?;
                state.done(at, 0, body_len);
                let _ = up.shutdown(Shutdown::Both);
                let _ = cw.shutdown(Shutdown::Both);
                return Ok(());
            }
            Some(Fault::Delay(d)) => std::thread::sleep(d),
            None => {}
        }
        if upstream.is_none() {
            let up = TcpStream::connect(state.upstream)?;
            upstream = Some((BufReader::new(up.try_clone()?), up));
        }
        let Some((ur, uw)) = upstream.as_mut() else {
            return Ok(());
        };
        uw.write_all(&head)?;
        let body_len = copy_body(&mut cr, uw, body)?;
        let Some(rhead) = read_head(ur)? else {
            return Ok(());
        };
        let rtext = String::from_utf8_lossy(&rhead).into_owned();
        let status: u16 = rtext
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let rheaders = header_values(&rtext);
        let rbody = if method == "HEAD" || status < 200 || status == 204 || status == 304 {
            BodyKind::None
        } else {
            body_kind(&rheaders, BodyKind::UntilClose)
        };
        state.done(at, status, body_len);
        cw.write_all(&rhead)?;
        copy_body(ur, &mut cw, rbody)?;
        let closing = matches!(rbody, BodyKind::UntilClose)
            || rheaders
                .iter()
                .chain(headers.iter())
                .any(|(k, v)| k == "connection" && v.eq_ignore_ascii_case("close"));
        if closing {
            let _ = cw.shutdown(Shutdown::Both);
            return Ok(());
        }
    }
}
