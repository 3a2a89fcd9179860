//! A small HTTP/1.1 file server on 127.0.0.1 for the download tests: GET and HEAD of the
//! files under a directory, single byte ranges, `ETag` / `Last-Modified` with conditional
//! requests, a request log, and injected faults (a body cut short, a stall, an error
//! status, ranges ignored). One thread per connection, one request per connection
//! (`Connection: close`).

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, UNIX_EPOCH};

/// A request the mirror got, in the order of arrival.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path, query removed.
    pub path: String,
    /// The `Range` header as sent.
    pub range: Option<String>,
    pub if_none_match: Option<String>,
    pub if_modified_since: Option<String>,
    /// The `If-Range` header as sent.
    pub if_range: Option<String>,
    pub user_agent: Option<String>,
    /// The `Authorization` header as sent (the mirror serves with or without one).
    pub authorization: Option<String>,
    /// 0 until answered.
    pub status: u16,
    /// Body bytes actually written.
    pub body_bytes: u64,
}

#[derive(Default)]
struct Faults {
    /// Path → body bytes to send before closing (next GET only).
    cut: HashMap<String, u64>,
    /// Path → (body bytes, pause) before the rest (next GET only).
    stall: HashMap<String, (u64, Duration)>,
    /// Path → statuses to answer, one per GET, in order.
    status: HashMap<String, Vec<u16>>,
}

/// The request log. `clear_log` starts a new generation: an answer that was still in flight
/// (a stalled one, say) completes its entry only in the generation it was logged in.
#[derive(Default)]
struct Log {
    generation: u64,
    entries: Vec<Request>,
}

struct State {
    root: PathBuf,
    log: Mutex<Log>,
    faults: Mutex<Faults>,
    ignore_range: AtomicBool,
    /// Connections being served.
    active: AtomicUsize,
}

pub struct Mirror {
    addr: SocketAddr,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Mirror {
    /// Serve the files under `root`.
    pub fn start(root: &Path) -> Mirror {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the mirror");
        let addr = listener.local_addr().expect("mirror address");
        let state = Arc::new(State {
            root: root.to_path_buf(),
            log: Mutex::new(Log::default()),
            faults: Mutex::new(Faults::default()),
            ignore_range: AtomicBool::new(false),
            active: AtomicUsize::new(0),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let acceptor = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                st.active.fetch_add(1, Ordering::SeqCst);
                let st = st.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, &st);
                    st.active.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Mirror {
            addr,
            state,
            stop,
            acceptor: Some(acceptor),
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The requests answered so far (waits a little for connections still being served, so
    /// a request the client has finished is logged).
    pub fn requests(&self) -> Vec<Request> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.state.active.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        lock(&self.state.log).entries.clone()
    }

    pub fn clear_log(&self) {
        // Let answers in flight finish; one that takes longer (a stall) is not logged anew.
        let _ = self.requests();
        let mut log = lock(&self.state.log);
        log.generation += 1;
        log.entries.clear();
    }

    /// The next GET of `path` announces the whole length but closes after `n` body bytes.
    pub fn cut_after(&self, path: &str, n: u64) {
        lock(&self.state.faults).cut.insert(path.to_string(), n);
    }

    /// The next GET of `path` sends `n` body bytes, then nothing for `pause`, then the rest.
    pub fn stall_after(&self, path: &str, n: u64, pause: Duration) {
        lock(&self.state.faults)
            .stall
            .insert(path.to_string(), (n, pause));
    }

    /// The next GET of `path` is answered with `status` (and an empty body).
    pub fn fail_next(&self, path: &str, status: u16) {
        lock(&self.state.faults)
            .status
            .entry(path.to_string())
            .or_default()
            .push(status);
    }

    /// Answer every GET with the whole file (200), whatever `Range` says.
    pub fn set_ignore_range(&self, on: bool) {
        self.state.ignore_range.store(on, Ordering::SeqCst);
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wakes the accept loop
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A parsed request head.
struct Head {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }
}

fn read_head(r: &mut impl BufRead) -> io::Result<Head> {
    let mut line = String::new();
    let mut lines = Vec::new();
    let mut total = 0;
    loop {
        line.clear();
        let n = r.read_line(&mut line)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
        }
        total += n;
        if total > 64 * 1024 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too big"));
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            if lines.is_empty() {
                continue; // stray CRLF before a request
            }
            break;
        }
        lines.push(l.to_string());
    }
    let mut parts = lines[0].split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("/");
    let path = target.split('?').next().unwrap_or("/").to_string();
    let headers = lines[1..]
        .iter()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Head {
        method,
        path,
        headers,
    })
}

/// The file `path` names under `root`, if the path is plain (no `..`).
fn resolve(root: &Path, path: &str) -> Option<PathBuf> {
    let rel = Path::new(path.trim_start_matches('/'));
    if rel
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return None;
    }
    let full = root.join(rel);
    full.is_file().then_some(full)
}

/// `bytes=N-` or `bytes=N-M` (one range): (first, last inclusive or None).
fn parse_range(v: &str) -> Option<(u64, Option<u64>)> {
    let spec = v.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let first = a.trim().parse().ok()?;
    let last = match b.trim() {
        "" => None,
        b => Some(b.parse().ok()?),
    };
    if last.is_some_and(|l| l < first) {
        return None;
    }
    Some((first, last))
}

/// An IMF-fixdate: `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn http_date(secs: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
    httpdate::fmt_http_date(t)
}

pub fn parse_http_date(s: &str) -> Option<i64> {
    let t = httpdate::parse_http_date(s).ok()?;
    let secs = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
    i64::try_from(secs).ok()
}

fn status_text(code: u16) -> &'static str {
    match code {
        200 => "OK",
        206 => "Partial Content",
        304 => "Not Modified",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        416 => "Range Not Satisfiable",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn serve(conn: TcpStream, st: &State) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let head = match read_head(&mut reader) {
        Ok(h) => h,
        Err(_) => return Ok(()), // the wake-up connection of Drop, or garbage
    };
    let mut out = conn;
    let mut entry = Request {
        method: head.method.clone(),
        path: head.path.clone(),
        range: head.header("Range"),
        if_none_match: head.header("If-None-Match"),
        if_range: head.header("If-Range"),
        if_modified_since: head.header("If-Modified-Since"),
        user_agent: head.header("User-Agent"),
        authorization: head.header("Authorization"),
        status: 0,
        body_bytes: 0,
    };
    // Logged in the order requests arrive, completed when answered.
    let (generation, at) = {
        let mut log = lock(&st.log);
        log.entries.push(entry.clone());
        (log.generation, log.entries.len() - 1)
    };
    let result = answer(&head, st, &mut out, &mut entry);
    let mut log = lock(&st.log);
    if log.generation == generation
        && let Some(e) = log.entries.get_mut(at)
    {
        *e = entry;
    }
    drop(log);
    let _ = out.shutdown(Shutdown::Both);
    result
}

fn simple(out: &mut TcpStream, entry: &mut Request, code: u16, extra: &str) -> io::Result<()> {
    entry.status = code;
    write!(
        out,
        "HTTP/1.1 {code} {}\r\nContent-Length: 0\r\nConnection: close\r\n{extra}\r\n",
        status_text(code)
    )?;
    out.flush()
}

fn answer(head: &Head, st: &State, out: &mut TcpStream, entry: &mut Request) -> io::Result<()> {
    let get = head.method == "GET";
    if !get && head.method != "HEAD" {
        return simple(out, entry, 405, "Allow: GET, HEAD\r\n");
    }
    if get {
        let forced = {
            let mut faults = lock(&st.faults);
            faults
                .status
                .get_mut(&head.path)
                .and_then(|q| (!q.is_empty()).then(|| q.remove(0)))
        };
        if let Some(code) = forced {
            return simple(out, entry, code, "");
        }
    }
    let Some(file) = resolve(&st.root, &head.path) else {
        return simple(out, entry, 404, "");
    };
    let meta = std::fs::metadata(&file)?;
    let size = meta.len();
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .unwrap_or_default();
    let etag = format!("\"{size:x}-{:x}\"", mtime.as_nanos());
    let last_modified = http_date(mtime.as_secs() as i64);
    let validators = format!("ETag: {etag}\r\nLast-Modified: {last_modified}\r\n");

    // If-None-Match wins over If-Modified-Since (RFC 9110 13.2.2).
    let not_modified = match (&entry.if_none_match, &entry.if_modified_since) {
        (Some(inm), _) => inm
            .split(',')
            .map(|t| t.trim().trim_start_matches("W/"))
            .any(|t| t == "*" || t == etag),
        (None, Some(ims)) => parse_http_date(ims).is_some_and(|t| mtime.as_secs() as i64 <= t),
        (None, None) => false,
    };
    if not_modified {
        return simple(out, entry, 304, &validators);
    }

    // If-Range (RFC 9110 13.1.5): the range only if the file is still that version.
    let same_version = entry
        .if_range
        .as_deref()
        .is_none_or(|v| v == etag || v == last_modified);
    let range = entry
        .range
        .as_deref()
        .filter(|_| same_version && !st.ignore_range.load(Ordering::SeqCst))
        .and_then(parse_range);
    let (code, start, len, content_range) = match range {
        Some((first, _)) if first >= size => {
            return simple(
                out,
                entry,
                416,
                &format!("Content-Range: bytes */{size}\r\n{validators}"),
            );
        }
        Some((first, last)) => {
            let last = last.map_or(size - 1, |l| l.min(size - 1));
            (
                206,
                first,
                last - first + 1,
                format!("Content-Range: bytes {first}-{last}/{size}\r\n"),
            )
        }
        None => (200, 0, size, String::new()),
    };
    entry.status = code;
    write!(
        out,
        "HTTP/1.1 {code} {}\r\nContent-Length: {len}\r\nContent-Type: application/octet-stream\r\n\
         Accept-Ranges: bytes\r\n{content_range}{validators}Connection: close\r\n\r\n",
        status_text(code)
    )?;
    if !get {
        return out.flush();
    }
    let (cut, stall) = {
        let mut faults = lock(&st.faults);
        (
            faults.cut.remove(&head.path),
            faults.stall.remove(&head.path),
        )
    };
    let mut f = std::fs::File::open(&file)?;
    f.seek(SeekFrom::Start(start))?;
    let limit = cut.map_or(len, |n| n.min(len));
    let mut body = f.take(limit);
    let mut buf = vec![0u8; 64 * 1024];
    let mut stalled = false;
    loop {
        let mut want = buf.len();
        if let Some((at, pause)) = stall
            && !stalled
        {
            if entry.body_bytes >= at {
                out.flush()?;
                std::thread::sleep(pause);
                stalled = true;
            } else {
                want = want.min((at - entry.body_bytes) as usize);
            }
        }
        let n = body.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        entry.body_bytes += n as u64;
    }
    out.flush()
}
