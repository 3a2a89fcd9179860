//! Downloads into the cache: resumable, verified before they are renamed into place.
//!
//! Large artifacts (stage3 tarballs, snapshots) go through [`Fetcher::fetch_verified`]: they
//! are streamed into `DEST.part`, resumed with `Range: bytes=N-` when a `.part` is left from
//! an earlier try or run, checked against the expected size, handed to a verification
//! callback, and only then renamed to `DEST` (fsync'd). A `DEST` that exists was verified
//! before and is returned without asking the mirror. A `.part` that fails verification is
//! deleted, so a bad download is neither kept nor resumed.
//!
//! Small companion files (signatures, DIGESTS, `latest-*.txt`) go through
//! [`Fetcher::fetch_small`]: cached at `DEST` with the server's validators (`ETag`,
//! `Last-Modified`) in `DEST.http.json`, revalidated with a conditional request.
//!
//! Connection errors, stalls (no bytes for [`FetchOptions::idle_timeout`]), 408, 429 and 5xx
//! answers are tried again with exponential backoff (`Retry-After` honoured), a download
//! resuming from what is on disk. Plain HTTP is allowed (a local mirror); HTTPS is verified
//! against the system's CA roots.
//!
//! Credentials in a URL (`http://user:password@host/`) are used for the requests and shown
//! nowhere: messages, logs and the validators files have them replaced by `***`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures_util::StreamExt;
use nix::fcntl::{Flock, FlockArg};
use reqwest::header::{self, HeaderValue};
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};

use crate::net::{
    Failure, Retries, RetryPolicy, Tried, describe, is_tls_refusal, redact, retry_after,
};
use crate::progress::{self, Verbosity};

/// Extended attribute on a `.part` holding the version it is a prefix of (a strong ETag or
/// Last-Modified), sent as `If-Range` when resuming. It goes with the file, so it needs no
/// cleanup; where the filesystem has no user xattrs, resuming just goes without it.
const IF_RANGE_XATTR: &str = "user.gentoo-mkimg.if-range";

/// Record which version of the file a fresh download (a `200`) is.
fn remember_version(part: &Path, resp: &reqwest::Response) {
    let headers = resp.headers();
    let validator = headers
        .get(header::ETAG)
        .filter(|v| !v.as_bytes().starts_with(b"W/")) // If-Range needs a strong ETag
        .or_else(|| headers.get(header::LAST_MODIFIED));
    let _ = match validator {
        Some(v) => xattr::set(part, IF_RANGE_XATTR, v.as_bytes()),
        None => xattr::remove(part, IF_RANGE_XATTR),
    };
}

/// Largest small file [`Fetcher::fetch_small`] accepts by default.
pub const SMALL_LIMIT: u64 = 16 << 20;

/// Errors a caller may want to tell apart (reach them with `anyhow::Error::downcast_ref`).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The mirror answered 404 or 410.
    #[error("{url}: no such file on the mirror (not found)")]
    NotFound { url: String },
    /// A small file larger than the limit.
    #[error("{url}: larger than {limit} bytes, refused")]
    TooLarge { url: String, limit: u64 },
}

/// How downloads are made.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    pub verbosity: Verbosity,
    /// Tries per download and the delays between them.
    pub retry: RetryPolicy,
    pub connect_timeout: Duration,
    /// A try fails when no answer or no body bytes came for this long.
    pub idle_timeout: Duration,
    /// Largest file [`Fetcher::fetch_small`] accepts.
    pub small_limit: u64,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            verbosity: Verbosity::Normal,
            retry: RetryPolicy {
                tries: 5,
                base_delay: Duration::from_secs(1),
                max_delay: Duration::from_secs(30),
            },
            connect_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            small_limit: SMALL_LIMIT,
        }
    }
}

/// What [`Fetcher::fetch_verified`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The verified file (`dest`).
    pub path: PathBuf,
    /// Body bytes received by this call (0 when `dest` was there already).
    pub downloaded: u64,
    /// Where this call first resumed the `.part` (a `206` answer), or None when it was
    /// downloaded from the start (or restarted after a `200`) or not at all.
    pub resumed_from: Option<u64>,
}

/// Downloads into a cache directory; blocking to callers (a current-thread async runtime
/// inside, so it must not be used from async code).
pub struct Fetcher {
    cache_dir: PathBuf,
    opts: FetchOptions,
    runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
}

/// The validators of a cached small file, in `DEST.http.json`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Validators {
    url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_modified: Option<String>,
}

/// A header of `resp` as text, if it is there and is text.
fn header_str(resp: &reqwest::Response, name: header::HeaderName) -> Option<&str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

/// A failure after which the `.part` is worthless (more bytes than announced, another
/// size than expected): the download ends and the `.part` is deleted.
#[derive(Debug)]
struct Worthless(String);

impl std::fmt::Display for Worthless {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Worthless {}

fn discard(text: String) -> Failure {
    Failure::Fatal(Worthless(text).into())
}

/// One large download in progress.
struct Download<'a> {
    /// The URL as shown (credentials redacted).
    url: &'a Url,
    /// The URL as requested.
    request: &'a Url,
    part_path: &'a Path,
    /// The `.part`, locked against other processes for the whole download.
    file: Flock<File>,
    expected: Option<u64>,
    downloaded: u64,
    resumed_from: Option<u64>,
    label: String,
    bar: Option<progress::Bar>,
}

/// What one try of a small download got.
enum Small {
    NotModified,
    Fresh {
        body: Vec<u8>,
        etag: Option<String>,
        last_modified: Option<String>,
    },
}

impl Fetcher {
    /// A fetcher for `cache_dir` (created if missing) with the default options.
    pub fn new(cache_dir: &Path, verbosity: Verbosity) -> Result<Fetcher> {
        Fetcher::with_options(
            cache_dir,
            FetchOptions {
                verbosity,
                ..FetchOptions::default()
            },
        )
    }

    pub fn with_options(cache_dir: &Path, opts: FetchOptions) -> Result<Fetcher> {
        fs::create_dir_all(cache_dir)
            .with_context(|| format!("cannot create the cache {}", cache_dir.display()))?;
        // Other parts of the program may have installed it already: one provider wins.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        let tls = crate::net::tls_config(&[])?;
        let client = crate::net::http_client(Some(tls), opts.connect_timeout)?;
        Ok(Fetcher {
            cache_dir: cache_dir.to_path_buf(),
            opts,
            runtime,
            client,
        })
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// `dest` as given when absolute, else under the cache directory.
    fn resolve(&self, dest: &Path) -> PathBuf {
        if dest.is_absolute() {
            dest.to_path_buf()
        } else {
            self.cache_dir.join(dest)
        }
    }

    /// A large artifact at `dest` (relative paths are under the cache directory).
    ///
    /// If `dest` exists it is returned untouched: it was verified before. Otherwise `url` is
    /// downloaded into `DEST.part` (resumed when one exists), its size checked against
    /// `expected_size` when given, `verify` called on the `.part`, and only when that
    /// succeeds is the `.part` renamed to `dest`. A `.part` that fails the size check or
    /// verification is deleted; one left by a network failure is kept for the next call.
    pub fn fetch_verified(
        &self,
        url: &str,
        dest: &Path,
        expected_size: Option<u64>,
        verify: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<Fetched> {
        let dest = self.resolve(dest);
        if dest.is_file() {
            return Ok(Fetched {
                path: dest,
                downloaded: 0,
                resumed_from: None,
            });
        }
        let (request, parsed) = parse_url(url)?;
        let part_path = with_suffix(&dest, ".part");
        if let Some(dir) = dest.parent() {
            fs::create_dir_all(dir)
                .with_context(|| format!("cannot create the directory {}", dir.display()))?;
        }
        let file = lock_part(&part_path)?;
        // Another process may have finished it while we were looking.
        if dest.is_file() {
            if file.metadata().is_ok_and(|m| m.len() == 0) {
                let _ = fs::remove_file(&part_path);
            }
            return Ok(Fetched {
                path: dest,
                downloaded: 0,
                resumed_from: None,
            });
        }
        let label = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| parsed.to_string());
        let mut dl = Download {
            url: &parsed,
            request: &request,
            part_path: &part_path,
            file,
            expected: expected_size,
            downloaded: 0,
            resumed_from: None,
            label,
            bar: None,
        };
        let result = self.runtime.block_on(self.download(&mut dl));
        if let Some(bar) = dl.bar.take() {
            bar.finish();
        }
        if let Err(err) = result {
            let empty = dl.file.metadata().is_ok_and(|m| m.len() == 0);
            let kept = if err.downcast_ref::<Worthless>().is_some() || empty {
                let _ = fs::remove_file(&part_path);
                "deleted"
            } else {
                "kept for resuming"
            };
            return Err(err.context(format!(
                "cannot download {parsed} to {} ({kept})",
                part_path.display()
            )));
        }
        let discard = |err: anyhow::Error| {
            let _ = fs::remove_file(&part_path);
            err.context(format!(
                "{parsed}: the download {} was rejected and deleted",
                part_path.display()
            ))
        };
        let size = dl
            .file
            .metadata()
            .with_context(|| format!("cannot read {}", part_path.display()))?
            .len();
        if let Some(expected) = expected_size
            && size != expected
        {
            return Err(discard(anyhow!("{size} bytes instead of {expected}")));
        }
        if let Err(err) = verify(&part_path) {
            // The verifier's message names the file and the failed check; say no more.
            let _ = fs::remove_file(&part_path);
            tracing::info!("{parsed}: rejected, {} deleted", part_path.display());
            return Err(err);
        }
        // Durable before it is renamed into place (and not paid for a rejected download).
        dl.file
            .sync_all()
            .with_context(|| format!("cannot write {}", part_path.display()))?;
        fs::rename(&part_path, &dest).with_context(|| {
            format!(
                "cannot rename {} to {}",
                part_path.display(),
                dest.display()
            )
        })?;
        sync_dir(&dest)?;
        Ok(Fetched {
            path: dest,
            downloaded: dl.downloaded,
            resumed_from: dl.resumed_from,
        })
    }

    /// A small companion or index file, cached at `dest` (relative paths are under the cache
    /// directory). With `refresh`, a cached copy is revalidated (`If-None-Match`,
    /// `If-Modified-Since`) and downloaded again only when it changed; without, a cached
    /// copy is returned without any request. Files larger than
    /// [`FetchOptions::small_limit`] are refused; a missing file is [`FetchError::NotFound`].
    pub fn fetch_small(&self, url: &str, dest: &Path, refresh: bool) -> Result<Vec<u8>> {
        let dest = self.resolve(dest);
        let meta_path = with_suffix(&dest, ".http.json");
        let limit = self.opts.small_limit;
        if !refresh && dest.is_file() {
            return read_small(&dest, limit);
        }
        let (request, parsed) = parse_url(url)?;
        let validators = if dest.is_file() {
            fs::read(&meta_path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Validators>(&b).ok())
                .filter(|v| v.url == parsed.as_str())
        } else {
            None
        };
        let got = self.runtime.block_on(self.retrying(&parsed, async || {
            self.small_attempt(&parsed, &request, validators.as_ref(), limit)
                .await
        }))?;
        match got {
            Small::NotModified => read_small(&dest, limit),
            Small::Fresh {
                body,
                etag,
                last_modified,
            } => {
                if let Some(dir) = dest.parent() {
                    fs::create_dir_all(dir).with_context(|| {
                        format!("cannot create the directory {}", dir.display())
                    })?;
                }
                write_atomic(&dest, &body)?;
                if etag.is_none() && last_modified.is_none() {
                    match fs::remove_file(&meta_path) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => {
                            return Err(e)
                                .with_context(|| format!("cannot remove {}", meta_path.display()));
                        }
                        _ => {}
                    }
                } else {
                    let v = Validators {
                        url: parsed.to_string(),
                        etag,
                        last_modified,
                    };
                    let text = serde_json::to_vec_pretty(&v).context("cannot encode validators")?;
                    write_atomic(&meta_path, &text)?;
                }
                Ok(body)
            }
        }
    }

    /// `attempt` until it succeeds, fails for good, or the tries are spent.
    async fn retrying<T>(
        &self,
        url: &Url,
        mut attempt: impl AsyncFnMut() -> Tried<T>,
    ) -> Result<T> {
        let mut retries = Retries::new(&self.opts.retry);
        loop {
            match attempt().await {
                Ok(v) => return Ok(v),
                Err(failure) => tokio::time::sleep(retries.judge(url, failure)?).await,
            }
        }
    }

    async fn download(&self, dl: &mut Download<'_>) -> Result<()> {
        let url = dl.url;
        self.retrying(url, async || self.download_attempt(dl).await)
            .await
    }

    /// Send `req`; no answer for the idle timeout is a failure to retry.
    async fn send(&self, req: reqwest::RequestBuilder) -> Tried<reqwest::Response> {
        let idle = self.opts.idle_timeout;
        match tokio::time::timeout(idle, req.send()).await {
            Err(_) => Err(Failure::retry(anyhow!(
                "no answer for {} s",
                idle.as_secs_f64()
            ))),
            Ok(Err(e)) if e.is_builder() || is_tls_refusal(&e) => {
                Err(Failure::Fatal(anyhow!(describe(&e))))
            }
            Ok(Err(e)) => Err(Failure::retry(anyhow!(describe(&e)))),
            Ok(Ok(resp)) => Ok(resp),
        }
    }

    /// An answer that is not a success: what to do.
    fn bad_status(url: &Url, resp: &reqwest::Response) -> Failure {
        let status = resp.status();
        if status == StatusCode::NOT_FOUND || status == StatusCode::GONE {
            return Failure::Fatal(
                FetchError::NotFound {
                    url: url.to_string(),
                }
                .into(),
            );
        }
        if status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
        {
            Failure::Retry {
                err: anyhow!("HTTP {status}"),
                after: retry_after(resp),
            }
        } else {
            Failure::Fatal(anyhow!("{url}: HTTP {status}"))
        }
    }

    /// One try of a large download: from the end of the `.part`.
    async fn download_attempt(&self, dl: &mut Download<'_>) -> Tried<()> {
        let part_display = dl.part_path.display().to_string();
        let io_fail = |e: io::Error, what: &str| {
            Failure::Fatal(anyhow::Error::new(e).context(format!("cannot {what} {part_display}")))
        };
        let mut offset = dl.file.metadata().map_err(|e| io_fail(e, "read"))?.len();
        if dl.expected.is_some_and(|exp| offset > exp) {
            truncate(&dl.file).map_err(|e| io_fail(e, "truncate"))?;
            offset = 0;
        }
        let (resp, total) = loop {
            let mut req = self.client.get(dl.request.clone());
            if offset > 0 {
                req = req.header(header::RANGE, format!("bytes={offset}-"));
                // Only the rest of the same version: a changed file comes whole (200).
                if let Some(v) = xattr::get(dl.part_path, IF_RANGE_XATTR).ok().flatten()
                    && let Ok(v) = HeaderValue::from_bytes(&v)
                {
                    req = req.header(header::IF_RANGE, v);
                }
            }
            let resp = self.send(req).await?;
            match resp.status() {
                StatusCode::PARTIAL_CONTENT if offset > 0 => {
                    let range =
                        header_str(&resp, header::CONTENT_RANGE).and_then(parse_content_range);
                    let Some((start, _end, total)) = range else {
                        truncate(&dl.file).map_err(|e| io_fail(e, "truncate"))?;
                        return Err(Failure::retry(anyhow!(
                            "206 answer without a usable Content-Range; starting over"
                        )));
                    };
                    if start != offset {
                        truncate(&dl.file).map_err(|e| io_fail(e, "truncate"))?;
                        return Err(Failure::retry(anyhow!(
                            "asked for bytes {offset}-, got bytes {start}-; starting over"
                        )));
                    }
                    dl.file
                        .seek(SeekFrom::Start(offset))
                        .map_err(|e| io_fail(e, "seek in"))?;
                    if dl.resumed_from.is_none() {
                        dl.resumed_from = Some(offset);
                    }
                    tracing::debug!("{}: resuming at byte {offset}", dl.url);
                    break (resp, total);
                }
                StatusCode::OK => {
                    if offset > 0 {
                        tracing::debug!("{}: range not honoured; starting over", dl.url);
                    }
                    truncate(&dl.file).map_err(|e| io_fail(e, "truncate"))?;
                    offset = 0;
                    dl.resumed_from = None;
                    remember_version(dl.part_path, &resp);
                    let total = resp.content_length();
                    break (resp, total);
                }
                StatusCode::RANGE_NOT_SATISFIABLE if offset > 0 => {
                    let total =
                        header_str(&resp, header::CONTENT_RANGE).and_then(parse_unsatisfied_range);
                    if dl.expected.or(total) == Some(offset) {
                        tracing::debug!("{}: {part_display} is complete", dl.url);
                        return Ok(());
                    }
                    tracing::debug!("{}: 416 for bytes {offset}-; starting over", dl.url);
                    truncate(&dl.file).map_err(|e| io_fail(e, "truncate"))?;
                    offset = 0;
                    dl.resumed_from = None;
                }
                _ => return Err(Self::bad_status(dl.url, &resp)),
            }
        };
        if let (Some(expected), Some(total)) = (dl.expected, total)
            && expected != total
        {
            return Err(discard(format!(
                "{}: the mirror has {total} bytes, {expected} were expected",
                dl.url
            )));
        }
        if dl.bar.is_none() {
            let len = total.or(dl.expected).unwrap_or(0);
            dl.bar = Some(progress::Bar::new(self.opts.verbosity, &dl.label, len));
        }
        let idle = self.opts.idle_timeout;
        let mut stream = resp.bytes_stream();
        let mut pos = offset;
        let file: &File = &dl.file;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let failure = loop {
            let chunk = match tokio::time::timeout(idle, stream.next()).await {
                Err(_) => {
                    break Some(Failure::retry(anyhow!(
                        "no data for {} s at byte {pos}",
                        idle.as_secs_f64()
                    )));
                }
                Ok(None) => break None,
                Ok(Some(Err(e))) => {
                    break Some(Failure::retry(anyhow!(
                        "transfer broken at byte {pos}: {}",
                        describe(&e)
                    )));
                }
                Ok(Some(Ok(chunk))) => chunk,
            };
            let len = chunk.len() as u64;
            // The .part holds what the server announced (or, without a length, what the
            // caller expects); more than that is nonsense and must not fill the disk.
            let cap = total.or(dl.expected);
            if cap.is_some_and(|t| pos + len > t) {
                break Some(discard(format!(
                    "{}: more data than the expected {} bytes",
                    dl.url,
                    cap.unwrap_or(0)
                )));
            }
            if let Err(e) = out.write_all(&chunk) {
                return Err(io_fail(e, "write"));
            }
            pos += len;
            dl.downloaded += len;
            if let Some(bar) = &dl.bar {
                bar.set(pos);
            }
        };
        // What arrived stays on disk for the next try to resume from.
        out.flush().map_err(|e| io_fail(e, "write"))?;
        if let Some(failure) = failure {
            return Err(failure);
        }
        match total {
            Some(t) if pos != t => Err(Failure::retry(anyhow!(
                "transfer ended at byte {pos} of {t}"
            ))),
            _ => Ok(()),
        }
    }

    /// One try of a small download of `request` (`url` is how it is shown).
    async fn small_attempt(
        &self,
        url: &Url,
        request: &Url,
        validators: Option<&Validators>,
        limit: u64,
    ) -> Tried<Small> {
        let mut req = self.client.get(request.clone());
        if let Some(v) = validators {
            if let Some(etag) = v
                .etag
                .as_deref()
                .and_then(|e| HeaderValue::from_str(e).ok())
            {
                req = req.header(header::IF_NONE_MATCH, etag);
            }
            if let Some(lm) = v
                .last_modified
                .as_deref()
                .and_then(|l| HeaderValue::from_str(l).ok())
            {
                req = req.header(header::IF_MODIFIED_SINCE, lm);
            }
        }
        let resp = self.send(req).await?;
        let status = resp.status();
        if status == StatusCode::NOT_MODIFIED && validators.is_some() {
            return Ok(Small::NotModified);
        }
        if status != StatusCode::OK {
            return Err(Self::bad_status(url, &resp));
        }
        let too_large = || {
            Failure::Fatal(
                FetchError::TooLarge {
                    url: url.to_string(),
                    limit,
                }
                .into(),
            )
        };
        if resp.content_length().is_some_and(|n| n > limit) {
            return Err(too_large());
        }
        let etag = header_str(&resp, header::ETAG).map(str::to_string);
        let last_modified = header_str(&resp, header::LAST_MODIFIED).map(str::to_string);
        let idle = self.opts.idle_timeout;
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        loop {
            match tokio::time::timeout(idle, stream.next()).await {
                Err(_) => {
                    return Err(Failure::retry(anyhow!(
                        "no data for {} s",
                        idle.as_secs_f64()
                    )));
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    return Err(Failure::retry(anyhow!("transfer broken: {}", describe(&e))));
                }
                Ok(Some(Ok(chunk))) => {
                    if body.len() as u64 + chunk.len() as u64 > limit {
                        return Err(too_large());
                    }
                    body.extend_from_slice(&chunk);
                }
            }
        }
        Ok(Small::Fresh {
            body,
            etag,
            last_modified,
        })
    }
}

/// The URL to request, and the same URL to show: its credentials, if any, replaced by `***`.
fn parse_url(url: &str) -> Result<(Url, Url)> {
    let parsed = Url::parse(url).with_context(|| format!("{}: not a valid URL", redact(url)))?;
    let mut shown = parsed.clone();
    if !shown.username().is_empty() || shown.password().is_some() {
        // Both only fail for URLs without a host, which http and https URLs always have.
        let _ = shown.set_password(None);
        let _ = shown.set_username("***");
    }
    match parsed.scheme() {
        "http" | "https" => Ok((parsed, shown)),
        other => bail!(
            "{}: cannot download {other}: URLs (only http and https)",
            redact(url)
        ),
    }
}

/// `path` with `suffix` appended to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// The `.part` opened for writing (created if missing, kept otherwise) and locked, so two
/// processes never write one download.
fn lock_part(path: &Path) -> Result<Flock<File>> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        anyhow!(
            "{}: cannot lock ({errno}): is another gentoo-mkimg downloading it?",
            path.display()
        )
    })
}

fn truncate(file: &File) -> io::Result<()> {
    file.set_len(0)?;
    let mut f = file;
    f.seek(SeekFrom::Start(0))?;
    Ok(())
}

/// Make a rename into `path`'s directory durable.
fn sync_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync the directory {}", dir.display()))
}

/// Replace `path` with `data`: a temporary file in the same directory, synced, renamed.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    tmp.write_all(data)
        .and_then(|_| tmp.as_file().sync_all())
        .with_context(|| format!("cannot write {}", tmp.path().display()))?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot write {}", path.display()))?;
    sync_dir(path)
}

/// A cached small file, refused when larger than `limit`.
fn read_small(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let len = fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    if len > limit {
        bail!("{}: larger than {limit} bytes, refused", path.display());
    }
    fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// `bytes START-END/TOTAL` (TOTAL may be `*`): (start, end, total).
fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.trim().split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = end.trim().parse().ok()?;
    if end < start {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => {
            let t: u64 = t.parse().ok()?;
            if end >= t {
                return None;
            }
            Some(t)
        }
    };
    Some((start, end, total))
}

/// `bytes */TOTAL` of a 416 answer.
fn parse_unsatisfied_range(v: &str) -> Option<u64> {
    v.trim()
        .strip_prefix("bytes")?
        .trim_start()
        .strip_prefix("*/")?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        assert_eq!(
            parse_content_range("bytes 100-199/200"),
            Some((100, 199, Some(200)))
        );
        assert_eq!(parse_content_range("bytes 0-0/*"), Some((0, 0, None)));
        assert_eq!(parse_content_range("bytes 5-4/10"), None);
        assert_eq!(parse_content_range("bytes 0-10/10"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert_eq!(parse_content_range("bytes */10"), None);
        assert_eq!(parse_unsatisfied_range("bytes */10"), Some(10));
        assert_eq!(parse_unsatisfied_range("bytes 0-1/10"), None);
    }

    #[test]
    fn suffix_appends_to_the_name() {
        assert_eq!(
            with_suffix(Path::new("/c/stage3.tar.xz"), ".part"),
            PathBuf::from("/c/stage3.tar.xz.part")
        );
    }

    #[test]
    fn only_http_and_https() {
        assert!(parse_url("http://127.0.0.1/x").is_ok());
        assert!(parse_url("https://example.org/x").is_ok());
        let err = parse_url("ftp://example.org/x").unwrap_err();
        assert!(err.to_string().contains("ftp://example.org/x"), "{err}");
        assert!(parse_url("not a url").is_err());
        let (request, shown) = parse_url("https://u:s3cret@example.org/x").unwrap();
        assert_eq!(request.as_str(), "https://u:s3cret@example.org/x");
        assert_eq!(shown.as_str(), "https://***@example.org/x");
        let err = parse_url("ftp://u:s3cret@example.org/x").unwrap_err();
        assert!(!format!("{err:#}").contains("s3cret"), "{err:#}");
    }

    #[test]
    fn relative_dest_is_under_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let f = Fetcher::new(dir.path(), Verbosity::Quiet).unwrap();
        assert_eq!(f.resolve(Path::new("a/b")), dir.path().join("a/b"));
        assert_eq!(f.resolve(Path::new("/x/y")), PathBuf::from("/x/y"));
    }

    #[test]
    fn second_lock_on_a_part_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.part");
        let held = lock_part(&p).unwrap();
        let err = lock_part(&p).unwrap_err();
        assert!(err.to_string().contains("f.part"), "{err}");
        drop(held);
        assert!(lock_part(&p).is_ok());
    }
}
