//! HTTP client pieces shared by publishing (registries) and inputs (mirrors): the TLS
//! configuration with the system's CA roots, one-line descriptions of request errors, and
//! the redaction of credentials in URLs (`http://user:password@host/`) for messages and paths;
//! and the Docker Engine API connection ([`docker`]).

pub mod docker;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};

/// Roots for verified TLS: the system's bundle, plus `SSL_CERT_FILE`, `SSL_CERT_DIR` and
/// `extra` files.
pub fn tls_config(extra: &[PathBuf]) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    const SYSTEM_BUNDLES: &[&str] = &[
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/ca-bundle.pem",
        "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
        "/etc/ssl/cert.pem",
    ];
    let mut files: Vec<PathBuf> = SYSTEM_BUNDLES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .into_iter()
        .collect();
    if let Some(file) = std::env::var_os("SSL_CERT_FILE").filter(|v| !v.is_empty()) {
        let file = PathBuf::from(file);
        if !file.is_file() {
            bail!("SSL_CERT_FILE={}: no such file", file.display());
        }
        files.push(file);
    }
    if let Some(dirs) = std::env::var_os("SSL_CERT_DIR").filter(|v| !v.is_empty()) {
        for dir in std::env::split_paths(&dirs) {
            // The system bundle is made from the certificates of its own directory.
            if files.first().and_then(|f| f.parent()) == Some(dir.as_path()) {
                continue;
            }
            if let Ok(entries) = std::fs::read_dir(&dir) {
                files.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_file()));
            }
        }
    }
    files.extend(extra.iter().cloned());
    // Each file once (SSL_CERT_FILE is often the system bundle itself; hash links).
    let mut seen = BTreeSet::new();
    files.retain(|f| seen.insert(std::fs::canonicalize(f).unwrap_or_else(|_| f.clone())));
    let mut certs = Vec::new();
    for file in &files {
        let iter = CertificateDer::pem_file_iter(file)
            .with_context(|| format!("{}: cannot read certificates", file.display()))?;
        certs.extend(iter.flatten());
    }
    let mut roots = rustls::RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(certs);
    tracing::debug!(
        "{added} CA certificates ({ignored} unusable) from {} files",
        files.len()
    );
    if roots.is_empty() {
        tracing::warn!("no CA certificates found: TLS registries will not be trusted");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("cannot set up TLS")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The tool's HTTP client: TLS by `tls` (`None`: any certificate, for the hosts the user
/// called insecure), connections given up after `connect_timeout`, our user agent.
pub fn http_client(
    tls: Option<rustls::ClientConfig>,
    connect_timeout: std::time::Duration,
) -> Result<reqwest::Client> {
    let builder = match tls {
        Some(tls) => reqwest::Client::builder().tls_backend_preconfigured(tls),
        None => reqwest::Client::builder()
            .tls_backend_rustls()
            .tls_danger_accept_invalid_certs(true),
    };
    builder
        .connect_timeout(connect_timeout)
        .user_agent(concat!("gentoo-mkimg/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("cannot set up the HTTP client")
}

/// A reqwest error with its causes, on one line, credentials in URLs redacted.
pub fn describe(err: &reqwest::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    redact(&text)
}

/// `text` with the credentials of every URL in it (`scheme://user:password@host`) replaced
/// by `***`: what messages, logs and cache paths may show of a URL.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let authority_end = tail
            .find(|c: char| matches!(c, '/' | '?' | '#') || c.is_whitespace())
            .unwrap_or(tail.len());
        rest = match tail[..authority_end].rfind('@') {
            Some(at) => {
                out.push_str("***");
                &tail[at..]
            }
            None => tail,
        };
    }
    out.push_str(rest);
    out
}

/// Whether `err` is TLS refusing the server (its certificate, its protocol versions): no
/// use trying again.
pub fn is_tls_refusal(err: &reqwest::Error) -> bool {
    // io::Error hides the error it wraps from `source()`: look inside it too.
    fn is_rustls(e: &(dyn std::error::Error + 'static)) -> bool {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return matches!(
                tls,
                rustls::Error::InvalidCertificate(_)
                    | rustls::Error::NoCertificatesPresented
                    | rustls::Error::PeerIncompatible(_)
            );
        }
        match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => is_rustls(inner),
            None => false,
        }
    }
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        if is_rustls(s) {
            return true;
        }
        source = s.source();
    }
    false
}

/// How often and how patiently a request is tried: downloads (inputs) and registry calls
/// (publish) alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries per request (a download, a blob upload), the first one included (1: no retries).
    pub tries: u32,
    /// Delay after the first failure; doubled after each further one.
    pub base_delay: std::time::Duration,
    /// Longest delay between tries, `Retry-After` included.
    pub max_delay: std::time::Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            tries: 5,
            base_delay: std::time::Duration::from_millis(500),
            max_delay: std::time::Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The wait after the `failures`th failure (1-based): what the server asked for
    /// (`Retry-After`), or `base_delay` doubled for each failure before; never more than
    /// `max_delay`.
    pub fn delay(&self, failures: u32, after: Option<std::time::Duration>) -> std::time::Duration {
        let backoff = self
            .base_delay
            .saturating_mul(1u32 << failures.saturating_sub(1).min(16));
        after.unwrap_or(backoff).min(self.max_delay)
    }
}

/// The failures of one request so far, against its [`RetryPolicy`]: one way to count, wait
/// and give up for downloads (inputs), registry calls and blob uploads (publish).
pub struct Retries<'a> {
    policy: &'a RetryPolicy,
    failures: u32,
}

impl<'a> Retries<'a> {
    pub fn new(policy: &'a RetryPolicy) -> Self {
        Retries {
            policy,
            failures: 0,
        }
    }

    /// Count a failure of `what` for `reason` (`after`: what the server's `Retry-After`
    /// asked for): the wait before the next try, said in a warning, or `None` when the tries
    /// are spent (see [`Retries::gave_up`]).
    fn failed(
        &mut self,
        what: &dyn std::fmt::Display,
        reason: &dyn std::fmt::Display,
        after: Option<std::time::Duration>,
    ) -> Option<std::time::Duration> {
        self.failures += 1;
        let tries = self.policy.tries.max(1);
        if self.failures >= tries {
            return None;
        }
        let delay = self.policy.delay(self.failures, after);
        tracing::warn!(
            "{what}: {reason}; trying again in {:.1} s ({}/{tries})",
            delay.as_secs_f64(),
            self.failures + 1
        );
        Some(delay)
    }

    /// Why the request ended: `gave up after N tries`.
    fn gave_up(&self) -> String {
        format!("gave up after {} tries", self.failures)
    }

    /// Count `failure` of `what`: `Ok` with the wait before the next try, or `Err` with the
    /// error that ends the request: a fatal one as it is; the last of several tries as
    /// `WHAT: gave up after N tries: ERROR`; the only try's as `WHAT: ERROR`.
    pub fn judge(
        &mut self,
        what: &dyn std::fmt::Display,
        failure: Failure,
    ) -> Result<std::time::Duration> {
        match failure {
            Failure::Fatal(err) => Err(err),
            Failure::Retry { err, after } => {
                match self.failed(what, &format_args!("{err:#}"), after) {
                    Some(delay) => Ok(delay),
                    None if self.failures > 1 => {
                        Err(err.context(format!("{what}: {}", self.gave_up())))
                    }
                    None => Err(err.context(what.to_string())),
                }
            }
        }
    }
}

/// What ended one try of a request, and what to do about it: the one outcome that
/// downloads (inputs), registry calls and blob uploads (publish) give [`Retries::judge`].
#[derive(Debug)]
pub enum Failure {
    /// Worth another try: after `after` when the server said so (`Retry-After`).
    Retry {
        err: anyhow::Error,
        after: Option<std::time::Duration>,
    },
    /// No use trying again.
    Fatal(anyhow::Error),
}

impl Failure {
    /// A failure worth another try, as soon as the backoff allows.
    pub fn retry(err: anyhow::Error) -> Self {
        Failure::Retry { err, after: None }
    }
}

/// An error inside a try (a file that cannot be read, a bad answer) ends the request.
impl From<anyhow::Error> for Failure {
    fn from(err: anyhow::Error) -> Self {
        Failure::Fatal(err)
    }
}

/// The result of one try of a request.
pub type Tried<T> = std::result::Result<T, Failure>;

/// How long a response's `Retry-After` asks to wait (callers cap it): delay-seconds, or an
/// HTTP-date (RFC 9110 section 10.2.3), a date already past being no wait at all.
pub fn retry_after(resp: &reqwest::Response) -> Option<std::time::Duration> {
    let v = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?;
    parse_retry_after(v, std::time::SystemTime::now())
}

/// A `Retry-After` value as a wait from `now`; `None` when it is neither form.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<std::time::Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(std::time::Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::{Failure, Retries, RetryPolicy, parse_retry_after, redact};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    #[test]
    fn delays_double_up_to_the_cap_and_follow_retry_after() {
        let p = RetryPolicy {
            tries: 5,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(30),
        };
        assert_eq!(p.delay(1, None), Duration::from_millis(100));
        assert_eq!(p.delay(2, None), Duration::from_millis(200));
        assert_eq!(p.delay(4, None), Duration::from_millis(800));
        assert_eq!(p.delay(1000, None), Duration::from_secs(30));
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(70))),
            Duration::from_secs(30)
        );
        // Five tries: four waits, then the fifth failure gives up.
        let mut r = Retries::new(&p);
        let waits: Vec<_> = (0..5)
            .map(|_| r.failed(&"GET x", &"HTTP 503", None))
            .collect();
        let want: Vec<_> = [100, 200, 400, 800]
            .map(|ms| Some(Duration::from_millis(ms)))
            .into_iter()
            .chain([None])
            .collect();
        assert_eq!(waits, want);
        assert_eq!(r.gave_up(), "gave up after 5 tries");
        let once = RetryPolicy { tries: 0, ..p };
        assert_eq!(Retries::new(&once).failed(&"x", &"y", None), None);
    }

    /// The one outcome: a retry waits (as the server asked, capped), a fatal failure ends at
    /// once as it is, the last retry ends with what was tried and how often.
    #[test]
    fn failures_are_judged_into_waits_or_the_final_error() {
        let p = RetryPolicy {
            tries: 3,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(30),
        };
        let mut r = Retries::new(&p);
        let retry = |after| Failure::Retry {
            err: anyhow::anyhow!("HTTP 503"),
            after,
        };
        let wait = r.judge(&"GET x", retry(Some(Duration::from_secs(2))));
        assert_eq!(wait.unwrap(), Duration::from_secs(2));
        assert_eq!(
            r.judge(&"GET x", Failure::retry(anyhow::anyhow!("reset")))
                .unwrap(),
            Duration::from_millis(200)
        );
        let last = r.judge(&"GET x", retry(None)).unwrap_err();
        assert_eq!(
            format!("{last:#}"),
            "GET x: gave up after 3 tries: HTTP 503"
        );
        let fatal = Retries::new(&p).judge(&"GET x", anyhow::anyhow!("refused").into());
        assert_eq!(format!("{:#}", fatal.unwrap_err()), "refused");
        let once = RetryPolicy { tries: 1, ..p };
        let only = Retries::new(&once)
            .judge(&"GET x", retry(None))
            .unwrap_err();
        assert_eq!(format!("{only:#}"), "GET x: HTTP 503");
    }

    #[test]
    fn retry_after_takes_seconds_and_http_dates() {
        // Sun, 06 Nov 1994 08:49:37 GMT, the RFC's example, is 784111777.
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777 - 90);
        let secs = |v| parse_retry_after(v, now).map(|d| d.as_secs());
        assert_eq!(secs(" 120 "), Some(120));
        assert_eq!(secs("Sun, 06 Nov 1994 08:49:37 GMT"), Some(90));
        // The obsolete forms HTTP-date still allows.
        assert_eq!(secs("Sunday, 06-Nov-94 08:49:37 GMT"), Some(90));
        assert_eq!(secs("Sun Nov  6 08:49:37 1994"), Some(90));
        // Past: no wait. Neither form: none.
        assert_eq!(secs("Sat, 05 Nov 1994 08:49:37 GMT"), Some(0));
        assert_eq!(secs("soon"), None);
        assert_eq!(secs("-5"), None);
        assert!(parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", SystemTime::now()).is_some());
    }

    #[test]
    fn credentials_in_urls_are_redacted() {
        let table = [
            ("http://u:p@h/x", "http://***@h/x"),
            ("https://user@h:8080", "https://***@h:8080"),
            (
                "cannot get http://a:b%40c@h/x (from https://t0k3n@h2/y?q=a@b): refused",
                "cannot get http://***@h/x (from https://***@h2/y?q=a@b): refused",
            ),
            (
                "http://h/a@b and mail@example.org",
                "http://h/a@b and mail@example.org",
            ),
            ("no url: a@b", "no url: a@b"),
        ];
        for (text, want) in table {
            assert_eq!(redact(text), want, "{text}");
        }
    }
}
