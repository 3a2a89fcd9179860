//! Pushing images from the store to registries, with the OCI distribution API.
//!
//! For each image: every blob (config and layers) is checked with `HEAD`; a blob the
//! repository lacks is cross-mounted from a sibling repository of the same registry when one
//! is known to hold it (repositories this process pushed to, and the store's images naming
//! the same registry), and otherwise uploaded, streamed from the store's file (one streaming
//! `PUT`, or `PATCH` chunks for very large blobs). Every blob is confirmed with `HEAD` before
//! the manifest is put, so a tag never points at missing content; the manifest is the
//! store's own bytes, so the pushed digest is the store's.
//!
//! Connection errors, stalls, 429 and 5xx answers are retried with exponential backoff
//! (`Retry-After` honoured) a bounded number of times; an interrupted upload resumes where
//! the registry says it stands (chunked) or starts over. Authentication: anonymous, HTTP
//! basic, and bearer tokens from the realm a `WWW-Authenticate` challenge names, with
//! credentials from [`auth`](super::auth). Secrets never reach a message or a log line.
//!
//! TLS is verified against the system's roots plus `SSL_CERT_FILE`/`SSL_CERT_DIR`. Plain
//! HTTP (and unverified TLS) is used only for `--insecure-registry` hosts and loopback
//! hosts, which are tried with HTTPS first, as Docker does.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{IsTerminal, Read, Seek, SeekFrom};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use futures_util::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::header::{self, HeaderValue};
use reqwest::{StatusCode, Url};
use sha2::{Digest as _, Sha256};

use super::auth::{self, Credential};
use crate::image::reference::Reference;
use crate::image::store::{CorruptBlob, Descriptor, Digest, Found, INDEX_MEDIA_TYPE, Index, Store};
use crate::image::{StoredImage, open_image};
pub use crate::net::RetryPolicy;
use crate::net::{describe, is_tls_refusal, retry_after, tls_config};
use crate::progress::Verbosity;

/// How to push.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// Hosts (`HOST` or `HOST:PORT`) reached over plain HTTP or unverified TLS.
    pub insecure_registries: Vec<String>,
    /// Treat loopback hosts (127.0.0.0/8, ::1, localhost) as insecure too.
    pub loopback_insecure: bool,
    pub verbosity: Verbosity,
    pub retry: RetryPolicy,
    /// A request that sends nothing and gets no answer for this long has timed out.
    pub stall_timeout: Duration,
    pub connect_timeout: Duration,
    /// Blobs at least this large are uploaded in `chunk_size` pieces (each resumable).
    pub chunk_threshold: u64,
    pub chunk_size: u64,
    /// Blobs of one image handled at once.
    pub concurrency: usize,
    /// Most repositories tried as a mount source for one blob.
    pub max_mount_sources: usize,
    /// More CA certificates (PEM files) to trust, besides the system's and those of
    /// `SSL_CERT_FILE` / `SSL_CERT_DIR`.
    pub ca_files: Vec<PathBuf>,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            insecure_registries: Vec::new(),
            loopback_insecure: true,
            verbosity: Verbosity::Normal,
            retry: RetryPolicy::default(),
            stall_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(30),
            chunk_threshold: 1 << 30,
            chunk_size: 128 << 20,
            concurrency: 3,
            max_mount_sources: 3,
            ca_files: Vec::new(),
        }
    }
}

/// What pushing one image did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushReport {
    /// Where it went, e.g. `registry.example/gentoo/musl-rt:1`.
    pub reference: String,
    /// The manifest digest, the same as the store's.
    pub digest: Digest,
    /// Blobs sent to the registry.
    pub uploaded: usize,
    /// Blobs cross-mounted from another repository of the registry.
    pub mounted: usize,
    /// Blobs the repository had already.
    pub skipped: usize,
    /// Blob bytes sent, retries included.
    pub bytes_sent: u64,
    /// The store's artifacts about the image (its SBOMs) pushed with it, by digest.
    pub referrers: Vec<Referrer>,
}

impl fmt::Display for PushReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pushed {}@{}: {} blobs uploaded, {} mounted, {} skipped, {} bytes sent",
            self.reference, self.digest, self.uploaded, self.mounted, self.skipped, self.bytes_sent
        )?;
        if !self.referrers.is_empty() {
            write!(f, ", {} referrers", self.referrers.len())?;
        }
        Ok(())
    }
}

/// Push the store's image `reference` to the registry its name says.
pub fn push(store: &Store, reference: &str, opts: &PushOptions) -> Result<PushReport> {
    Pusher::new(store, opts.clone())?.push(reference)
}

/// The store references to push for `refs`: each one itself, or with `all_tags` every store
/// entry of the same registry and repository.
pub fn expand_references(store: &Store, refs: &[String], all_tags: bool) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    let index = if all_tags {
        Some(store.read_index()?)
    } else {
        None
    };
    for text in refs {
        let wanted: Reference = text.parse()?;
        let names: Vec<String> = match &index {
            None => vec![wanted.to_string()],
            Some(index) => {
                let names: Vec<String> = index
                    .manifests
                    .iter()
                    .filter_map(|d| d.ref_name())
                    .filter(|name| {
                        name.parse::<Reference>().is_ok_and(|r| {
                            r.registry == wanted.registry && r.repository == wanted.repository
                        })
                    })
                    .map(str::to_string)
                    .collect();
                if names.is_empty() {
                    bail!(
                        "{}: no image of repository {} in the store",
                        store.root().display(),
                        match &wanted.registry {
                            Some(host) => format!("{host}/{}", wanted.repository),
                            None => wanted.repository.clone(),
                        }
                    );
                }
                names
            }
        };
        for name in names {
            if !out.contains(&name) {
                out.push(name);
            }
        }
    }
    Ok(out)
}

/// Blobs this process knows to be in a repository: host → repository → digests.
static KNOWN: Mutex<BTreeMap<String, BTreeMap<String, BTreeSet<Digest>>>> =
    Mutex::new(BTreeMap::new());

fn known() -> std::sync::MutexGuard<'static, BTreeMap<String, BTreeMap<String, BTreeSet<Digest>>>> {
    // The map stays consistent whatever panicked while holding it.
    KNOWN.lock().unwrap_or_else(|p| p.into_inner())
}

/// Pushes images of one store; keeps connections, tokens and what it learnt between pushes.
pub struct Pusher {
    store: Store,
    opts: PushOptions,
    runtime: tokio::runtime::Runtime,
    secure: reqwest::Client,
    insecure: reqwest::Client,
    registries: BTreeMap<String, Arc<Registry>>,
    bars: Option<MultiProgress>,
}

impl Pusher {
    pub fn new(store: &Store, opts: PushOptions) -> Result<Self> {
        // Several pushers (or other parts of the program) may try: one provider wins.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        let (secure, insecure) = http_clients(&opts)?;
        let bars = (opts.verbosity != Verbosity::Quiet && std::io::stderr().is_terminal())
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Ok(Pusher {
            store: store.clone(),
            opts,
            runtime,
            secure,
            insecure,
            registries: BTreeMap::new(),
            bars,
        })
    }

    /// Push the store's image `reference` to the registry and repository it names.
    pub fn push(&mut self, reference: &str) -> Result<PushReport> {
        let dest: Reference = reference.parse()?;
        let image = open_image(&self.store, &dest.to_string())?;
        let host = dest
            .registry
            .clone()
            .unwrap_or_else(|| "docker.io".to_string());
        let host = if auth_host(&host) == "docker.io" {
            "docker.io".to_string()
        } else {
            host
        };
        let repository = if host == "docker.io" && !dest.repository.contains('/') {
            format!("library/{}", dest.repository)
        } else {
            dest.repository.clone()
        };
        let registry = match self.registries.get(&host) {
            Some(r) => r.clone(),
            None => {
                let r = Arc::new(self.runtime.block_on(Registry::connect(
                    &host,
                    &self.opts,
                    &self.secure,
                    &self.insecure,
                ))?);
                self.registries.insert(host.clone(), r.clone());
                r
            }
        };
        let job = ImagePush {
            registry: &registry,
            store: &self.store,
            opts: &self.opts,
            image: &image,
            repository: &repository,
            tag: &dest.tag,
            sources: mount_sources(&self.store, &host, &repository, &image)?,
            bars: self.bars.as_ref(),
            sent: Arc::new(AtomicU64::new(0)),
        };
        let mut counts = self
            .runtime
            .block_on(job.run())
            .with_context(|| format!("cannot push {dest}"))?;
        let mut bytes_sent = job.sent.load(Ordering::Relaxed);
        let mut referrers = Vec::new();
        for artifact in self.store.referrers(&image.manifest.digest, None)? {
            let what = || format!("cannot push the referrer {} of {dest}", artifact.digest);
            let manifest = self.store.read_manifest(&artifact).with_context(what)?;
            let stored = StoredImage {
                reference: format!("{dest}@{}", artifact.digest),
                manifest: artifact.clone(),
                config: manifest.config,
                layers: manifest.layers,
            };
            let job = ImagePush {
                image: &stored,
                tag: artifact.digest.as_str(),
                sources: BTreeMap::new(),
                sent: Arc::new(AtomicU64::new(0)),
                ..job
            };
            let c = self.runtime.block_on(job.run()).with_context(what)?;
            counts.uploaded += c.uploaded;
            counts.mounted += c.mounted;
            counts.skipped += c.skipped;
            bytes_sent += job.sent.load(Ordering::Relaxed);
            let api = c.subject_kept
                || self
                    .runtime
                    .block_on(registry.has_referrers_api(&repository, &image.manifest.digest))
                    .with_context(what)?;
            if !api {
                self.runtime
                    .block_on(registry.add_to_referrers_tag(
                        &repository,
                        &image.manifest.digest,
                        &artifact,
                    ))
                    .with_context(what)?;
            }
            referrers.push(Referrer {
                digest: artifact.digest.clone(),
                artifact_type: artifact.artifact_type.clone(),
                by_api: api,
            });
        }
        Ok(PushReport {
            reference: dest.to_string(),
            digest: image.manifest.digest.clone(),
            uploaded: counts.uploaded,
            mounted: counts.mounted,
            skipped: counts.skipped,
            bytes_sent,
            referrers,
        })
    }
}

/// An artifact pushed along with its image (an SBOM, say).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Referrer {
    pub digest: Digest,
    pub artifact_type: Option<String>,
    /// The registry keeps its referrers (OCI distribution 1.1 referrers API); otherwise the
    /// artifact was added to the index tagged `sha256-<subject hex>` (the tag scheme).
    pub by_api: bool,
}

/// The verified and the unverified (insecure hosts only) HTTP clients.
pub(super) fn http_clients(opts: &PushOptions) -> Result<(reqwest::Client, reqwest::Client)> {
    let tls = tls_config(&opts.ca_files)?;
    let secure = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(opts.connect_timeout)
        .user_agent(concat!("gentoo-mkimg/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("cannot set up the HTTP client")?;
    let insecure = reqwest::Client::builder()
        .tls_backend_rustls()
        .tls_danger_accept_invalid_certs(true)
        .connect_timeout(opts.connect_timeout)
        .user_agent(concat!("gentoo-mkimg/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("cannot set up the HTTP client")?;
    Ok((secure, insecure))
}

/// The host credentials and known blobs are filed under (Docker Hub's aliases as one).
pub(super) fn auth_host(host: &str) -> &str {
    match host {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io"
        }
        h => h,
    }
}

/// Mount sources for each blob of `image`: repositories of `host` (other than `repository`)
/// known to hold it first, then other repositories this process pushed to.
fn mount_sources(
    store: &Store,
    host: &str,
    repository: &str,
    image: &StoredImage,
) -> Result<BTreeMap<Digest, Vec<String>>> {
    let mut holders: BTreeMap<Digest, Vec<String>> = BTreeMap::new();
    let mut others: Vec<String> = Vec::new();
    {
        let known = known();
        if let Some(repos) = known.get(host) {
            for (repo, digests) in repos {
                if repo == repository {
                    continue;
                }
                others.push(repo.clone());
                for d in digests {
                    holders.entry(d.clone()).or_default().push(repo.clone());
                }
            }
        }
    }
    // The store's images for the same registry were probably pushed there before.
    for entry in store.read_index()?.manifests {
        let Some(r) = entry.ref_name().and_then(|n| n.parse::<Reference>().ok()) else {
            continue;
        };
        let r_host = r.registry.as_deref().unwrap_or("docker.io");
        if auth_host(r_host) != host || r.repository == repository {
            continue;
        }
        let Ok(manifest) = store.read_manifest(&entry) else {
            continue;
        };
        for d in std::iter::once(&manifest.config).chain(&manifest.layers) {
            let list = holders.entry(d.digest.clone()).or_default();
            if !list.contains(&r.repository) {
                list.push(r.repository.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    for blob in image.layers.iter().chain(std::iter::once(&image.config)) {
        let mut list = holders.get(&blob.digest).cloned().unwrap_or_default();
        for o in &others {
            if !list.contains(o) {
                list.push(o.clone());
            }
        }
        out.insert(blob.digest.clone(), list);
    }
    Ok(out)
}

/// The name part of `host` (`name`, `name:port`, `[v6]:port` or a bare IPv6 address).
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    if host.parse::<IpAddr>().is_ok() {
        return host;
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

fn is_loopback(host: &str) -> bool {
    let name = host_name(host);
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn is_insecure(host: &str, opts: &PushOptions) -> bool {
    let name = host_name(host);
    (opts.loopback_insecure && is_loopback(host))
        || opts
            .insecure_registries
            .iter()
            .any(|i| i == host || (host_name(i) == i && i == name))
}

/// Time of the last sign of progress on a request.
#[derive(Clone)]
struct Activity {
    start: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis().min(u64::MAX as u128) as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn idle(&self) -> Duration {
        self.start
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// A request that got no answer.
struct Failure {
    text: String,
    /// Not worth another try (TLS refused the server).
    fatal: bool,
}

/// Send `req`, failing when it makes no progress (body sent, answer head) for `stall`.
async fn exchange(
    req: reqwest::RequestBuilder,
    activity: &Activity,
    stall: Duration,
) -> std::result::Result<reqwest::Response, Failure> {
    let send = req.send();
    tokio::pin!(send);
    let tick = (stall / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
    loop {
        tokio::select! {
            r = &mut send => return r.map_err(|e| Failure { text: describe(&e), fatal: is_tls_refusal(&e) }),
            _ = tokio::time::sleep(tick) => {
                if activity.idle() >= stall {
                    return Err(Failure {
                        text: format!("no progress for {} s (timed out)", stall.as_secs_f64()),
                        fatal: false,
                    });
                }
            }
        }
    }
}

/// The start of an answer's body, for error messages (registries answer with JSON errors).
pub(super) async fn body_text(resp: reqwest::Response, stall: Duration) -> String {
    let status = resp.status();
    let text = match tokio::time::timeout(stall, resp.bytes()).await {
        Ok(Ok(b)) => String::from_utf8_lossy(&b[..b.len().min(400)])
            .trim()
            .to_string(),
        _ => String::new(),
    };
    if text.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {text}")
    }
}

fn is_retryable(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// What one try of a request gave.
enum Outcome {
    Done(reqwest::Response),
    Unauthorized(reqwest::Response),
    Retry {
        reason: String,
        after: Option<Duration>,
    },
}

#[derive(Clone)]
enum AuthMode {
    Anonymous,
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

/// One registry: where it is, how to authenticate, tokens per repository.
pub(super) struct Registry {
    /// As in references (`docker.io` for Docker Hub).
    pub(super) host: String,
    base: Url,
    pub(super) client: reqwest::Client,
    /// For token realms on hosts that are not insecure.
    secure: reqwest::Client,
    insecure: reqwest::Client,
    insecure_hosts: PushOptions,
    credential: Option<auth::Found>,
    mode: Mutex<AuthMode>,
    /// Bearer header per repository (and the scopes it was asked for).
    tokens: Mutex<BTreeMap<String, HeaderValue>>,
    scopes: Mutex<BTreeMap<String, Vec<String>>>,
    /// One token request at a time, so blobs pushed together share one token.
    token_fetch: tokio::sync::Mutex<()>,
    retry: RetryPolicy,
    pub(super) stall: Duration,
}

fn sensitive(value: &str) -> Result<HeaderValue> {
    let mut v = HeaderValue::from_str(value)
        .map_err(|_| anyhow!("a credential holds characters not allowed in an HTTP header"))?;
    v.set_sensitive(true);
    Ok(v)
}

impl Registry {
    pub(super) async fn connect(
        host: &str,
        opts: &PushOptions,
        secure: &reqwest::Client,
        insecure: &reqwest::Client,
    ) -> Result<Registry> {
        let api_host = if host == "docker.io" {
            "registry-1.docker.io"
        } else {
            host
        };
        let credential = auth::find_credential(host, "")?;
        if let Some(found) = &credential {
            tracing::info!("{host}: credentials from {}", found.source);
        }
        let https = Url::parse(&format!("https://{api_host}/"))
            .with_context(|| format!("{host}: not a valid registry host"))?;
        let mut registry = Registry {
            host: host.to_string(),
            base: https.clone(),
            client: secure.clone(),
            secure: secure.clone(),
            insecure: insecure.clone(),
            insecure_hosts: opts.clone(),
            credential,
            mode: Mutex::new(AuthMode::Anonymous),
            tokens: Mutex::new(BTreeMap::new()),
            scopes: Mutex::new(BTreeMap::new()),
            token_fetch: tokio::sync::Mutex::new(()),
            retry: opts.retry.clone(),
            stall: opts.stall_timeout,
        };
        if is_insecure(host, opts) {
            // HTTPS without verification first, then plain HTTP (Docker's way).
            registry.client = insecure.clone();
            let probe = insecure
                .get(https.join("v2/")?)
                .timeout(opts.connect_timeout);
            match probe.send().await {
                Ok(resp) => {
                    tracing::debug!("{host}: HTTPS answers ({})", resp.status());
                }
                Err(e) => {
                    tracing::debug!("{host}: no HTTPS ({}), using plain HTTP", describe(&e));
                    registry.base = Url::parse(&format!("http://{api_host}/"))
                        .with_context(|| format!("{host}: not a valid registry host"))?;
                }
            }
        }
        registry.ping().await?;
        Ok(registry)
    }

    pub(super) fn url(&self, path: &str) -> Result<Url> {
        self.base
            .join(path)
            .with_context(|| format!("{}: cannot make a URL of {path:?}", self.host))
    }

    fn auth_failed(&self, why: impl fmt::Display) -> anyhow::Error {
        anyhow!("authentication failed for {}: {why}", self.host)
    }

    /// `GET /v2/`: is the registry there, and how does it want us to authenticate?
    async fn ping(&self) -> Result<()> {
        let url = self.url("v2/")?;
        let resp = self
            .send(None, "GET /v2/", false, || Ok(self.client.get(url.clone())))
            .await?;
        match resp.status() {
            s if s.is_success() => {
                tracing::debug!("{}: anonymous access", self.host);
                Ok(())
            }
            StatusCode::UNAUTHORIZED => {
                self.take_challenge(&resp, None).await?;
                if matches!(self.current_mode(), AuthMode::Basic) {
                    // Check the credentials now, for a clear message.
                    let resp = self
                        .send(None, "GET /v2/", false, || Ok(self.client.get(url.clone())))
                        .await?;
                    if resp.status() == StatusCode::UNAUTHORIZED {
                        return Err(self.auth_failed(self.refused()));
                    }
                }
                Ok(())
            }
            StatusCode::NOT_FOUND => bail!(
                "{}: {} does not speak the registry API (GET /v2/: HTTP 404)",
                self.host,
                self.base
            ),
            _ => bail!(
                "{}: GET /v2/: {}",
                self.host,
                body_text(resp, self.stall).await
            ),
        }
    }

    fn refused(&self) -> String {
        match &self.credential {
            Some(found) => format!("the registry refused the credentials from {}", found.source),
            None => "the registry wants credentials and none were found for it (docker \
                     config.json, credential helpers, Podman auth.json)"
                .to_string(),
        }
    }

    fn current_mode(&self) -> AuthMode {
        self.mode.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Learn the authentication scheme from a 401 answer; get a token for `repo` if bearer.
    async fn take_challenge(&self, resp: &reqwest::Response, repo: Option<&str>) -> Result<()> {
        let challenges: Vec<auth::Challenge> = resp
            .headers()
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(auth::parse_challenges)
            .collect();
        if let Some(bearer) = challenges.iter().find(|c| c.scheme == "bearer") {
            let Some(realm) = bearer.params.get("realm") else {
                return Err(self.auth_failed("a bearer challenge without a realm"));
            };
            *self.mode.lock().unwrap_or_else(|p| p.into_inner()) = AuthMode::Bearer {
                realm: realm.clone(),
                service: bearer.params.get("service").cloned(),
            };
            if let Some(repo) = repo {
                self.tokens
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(repo);
                self.token_for(repo).await?;
            }
            return Ok(());
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            let was_basic = matches!(self.current_mode(), AuthMode::Basic);
            if was_basic || self.credential.is_none() {
                return Err(self.auth_failed(self.refused()));
            }
            if matches!(
                self.credential.as_ref().map(|f| &f.credential),
                Some(Credential::IdentityToken(_))
            ) {
                return Err(self.auth_failed(
                    "the registry wants a user name and password, and only an identity token \
                     was found",
                ));
            }
            *self.mode.lock().unwrap_or_else(|p| p.into_inner()) = AuthMode::Basic;
            return Ok(());
        }
        Err(self.auth_failed("HTTP 401 without a usable WWW-Authenticate challenge"))
    }

    /// Scopes for pushing to `repo`, mounting from `sources`.
    fn set_scopes(&self, repo: &str, sources: &[String]) {
        let mut scopes = vec![auth::repository_scope(repo, "pull,push")];
        scopes.extend(sources.iter().map(|s| auth::repository_scope(s, "pull")));
        let mut map = self.scopes.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(repo) != Some(&scopes) {
            map.insert(repo.to_string(), scopes);
            self.tokens
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(repo);
        }
    }

    /// Scopes for reading `repo` only (`inspect --remote`).
    pub(super) fn set_pull_scope(&self, repo: &str) {
        let scopes = vec![auth::repository_scope(repo, "pull")];
        let mut map = self.scopes.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(repo) != Some(&scopes) {
            map.insert(repo.to_string(), scopes);
            self.tokens
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(repo);
        }
    }

    /// The `Authorization` header for a request on `repo` (None: anonymous).
    async fn authorization(&self, repo: Option<&str>) -> Result<Option<HeaderValue>> {
        match self.current_mode() {
            AuthMode::Anonymous => Ok(None),
            AuthMode::Basic => match self
                .credential
                .as_ref()
                .and_then(|f| f.credential.basic_header())
            {
                Some(h) => Ok(Some(sensitive(h.expose())?)),
                None => Err(self.auth_failed(self.refused())),
            },
            AuthMode::Bearer { .. } => match repo {
                Some(repo) => self.token_for(repo).await.map(Some),
                None => Ok(None),
            },
        }
    }

    fn realm_client(&self, realm: &Url) -> Result<&reqwest::Client> {
        let realm_host = match (realm.host_str(), realm.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            _ => bail!("token realm {realm} names no host"),
        };
        let insecure = is_insecure(&realm_host, &self.insecure_hosts)
            || is_insecure(&self.host, &self.insecure_hosts);
        if realm.scheme() != "https" && !insecure {
            return Err(self.auth_failed(format!(
                "the token realm {realm} is not HTTPS (pass --insecure-registry {realm_host} to \
                 allow it)"
            )));
        }
        Ok(if insecure {
            &self.insecure
        } else {
            &self.secure
        })
    }

    /// A bearer token for pushing to `repo` (cached until refused).
    async fn token_for(&self, repo: &str) -> Result<HeaderValue> {
        let cached = || {
            self.tokens
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(repo)
                .cloned()
        };
        if let Some(h) = cached() {
            return Ok(h);
        }
        let _one_at_a_time = self.token_fetch.lock().await;
        if let Some(h) = cached() {
            return Ok(h); // fetched while we waited
        }
        let AuthMode::Bearer { realm, service } = self.current_mode() else {
            bail!("internal error: a token asked for without a bearer challenge");
        };
        let scopes = self
            .scopes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(repo)
            .cloned()
            .unwrap_or_else(|| vec![auth::repository_scope(repo, "pull,push")]);
        let realm_url = Url::parse(&realm)
            .map_err(|_| self.auth_failed(format!("the token realm {realm:?} is not a URL")))?;
        let client = self.realm_client(&realm_url)?;
        let credential = self.credential.as_ref().map(|f| &f.credential);
        let build = || -> Result<reqwest::RequestBuilder> {
            Ok(match credential {
                Some(Credential::IdentityToken(refresh)) => {
                    let form = auth::refresh_token_form(refresh, service.as_deref(), &scopes);
                    client
                        .post(realm_url.clone())
                        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                        .body(form.expose().to_string())
                }
                other => {
                    let mut url = realm_url.clone();
                    {
                        let mut q = url.query_pairs_mut();
                        if let Some(service) = &service {
                            q.append_pair("service", service);
                        }
                        for scope in &scopes {
                            q.append_pair("scope", scope);
                        }
                    }
                    let mut req = client.get(url);
                    if let Some(h) = other.and_then(Credential::basic_header) {
                        req = req.header(header::AUTHORIZATION, sensitive(h.expose())?);
                    }
                    req
                }
            })
        };
        tracing::debug!("{}: asking {realm} for {}", self.host, scopes.join(" "));
        // Boxed: `send` may come back here for other requests (a token for a repository).
        let resp = Box::pin(self.send(None, "token request", false, build)).await?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(self.auth_failed(match &self.credential {
                Some(found) => format!(
                    "the token service refused the credentials from {} (HTTP {status})",
                    found.source
                ),
                None => format!(
                    "the token service wants credentials (HTTP {status}) and none were found \
                     for {} (docker config.json, credential helpers, Podman auth.json)",
                    self.host
                ),
            }));
        }
        if !status.is_success() {
            return Err(self.auth_failed(format!("the token service answered HTTP {status}")));
        }
        let body = tokio::time::timeout(self.stall, resp.bytes())
            .await
            .map_err(|_| self.auth_failed("the token service's answer timed out"))?
            .map_err(|e| self.auth_failed(format!("reading the token: {}", describe(&e))))?;
        let token = auth::parse_token_answer(&body).map_err(|e| self.auth_failed(e))?;
        let value = sensitive(&format!("Bearer {}", token.expose()))?;
        drop(token);
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(repo.to_string(), value.clone());
        Ok(value)
    }

    fn delay(&self, failures: u32, after: Option<Duration>) -> Duration {
        self.retry.delay(failures, after)
    }

    /// `req` with `Authorization: value` when it goes to the registry itself (an upload
    /// `Location` may name another host, which gets no credentials).
    fn with_authorization(
        &self,
        req: reqwest::RequestBuilder,
        value: HeaderValue,
    ) -> Result<reqwest::RequestBuilder> {
        let (client, built) = req.build_split();
        let mut built = built.map_err(|e| anyhow!("{}: cannot make a request: {e}", self.host))?;
        let url = built.url();
        if url.scheme() == self.base.scheme()
            && url.host_str() == self.base.host_str()
            && url.port_or_known_default() == self.base.port_or_known_default()
        {
            built.headers_mut().insert(header::AUTHORIZATION, value);
        }
        Ok(reqwest::RequestBuilder::from_parts(client, built))
    }

    /// One try: send, classify the answer.
    async fn attempt(
        &self,
        repo: Option<&str>,
        req: reqwest::RequestBuilder,
        activity: &Activity,
    ) -> Result<Outcome> {
        let req = match self.authorization(repo).await? {
            Some(h) => self.with_authorization(req, h)?,
            None => req,
        };
        activity.touch();
        match exchange(req, activity, self.stall).await {
            Err(f) if f.fatal => bail!("{}: {}", self.host, f.text),
            Err(f) => Ok(Outcome::Retry {
                reason: f.text,
                after: None,
            }),
            Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED => {
                Ok(Outcome::Unauthorized(resp))
            }
            Ok(resp) if is_retryable(resp.status()) => {
                let after = retry_after(&resp);
                Ok(Outcome::Retry {
                    reason: body_text(resp, self.stall).await,
                    after,
                })
            }
            Ok(resp) => Ok(Outcome::Done(resp)),
        }
    }

    /// Send a request built by `build` (again for each try), retrying transient failures
    /// and re-authenticating once on 401 when `handle_auth`; 403 is an authentication error.
    pub(super) async fn send(
        &self,
        repo: Option<&str>,
        what: &str,
        handle_auth: bool,
        build: impl Fn() -> Result<reqwest::RequestBuilder>,
    ) -> Result<reqwest::Response> {
        let mut failures = 0u32;
        let mut reauthenticated = false;
        loop {
            let activity = Activity::new();
            match self.attempt(repo, build()?, &activity).await? {
                Outcome::Done(resp) if resp.status() == StatusCode::FORBIDDEN && handle_auth => {
                    let text = body_text(resp, self.stall).await;
                    return Err(self.auth_failed(format!("{what}: access denied ({text})")));
                }
                Outcome::Done(resp) => return Ok(resp),
                Outcome::Unauthorized(resp) if handle_auth && !reauthenticated => {
                    reauthenticated = true;
                    self.take_challenge(&resp, repo).await?;
                }
                Outcome::Unauthorized(resp) if handle_auth => {
                    let text = body_text(resp, self.stall).await;
                    return Err(self.auth_failed(format!("{what}: {text}")));
                }
                Outcome::Unauthorized(resp) => return Ok(resp),
                Outcome::Retry { reason, after } => {
                    failures += 1;
                    if failures >= self.retry.tries {
                        bail!(
                            "{}: {what}: gave up after {failures} tries: {reason}",
                            self.host
                        );
                    }
                    let delay = self.delay(failures, after);
                    tracing::warn!(
                        "{}: {what}: {reason}; retrying in {:.1} s ({failures}/{})",
                        self.host,
                        delay.as_secs_f64(),
                        self.retry.tries
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Whether `repo` has blob `digest` (`HEAD`).
    async fn has_blob(&self, repo: &str, digest: &Digest) -> Result<bool> {
        let url = self.url(&format!("v2/{repo}/blobs/{digest}"))?;
        let what = format!("HEAD blob {digest}");
        let resp = self
            .send(Some(repo), &what, true, || {
                Ok(self.client.head(url.clone()))
            })
            .await?;
        match resp.status() {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            s => bail!("{}: {what} in {repo}: HTTP {s}", self.host),
        }
    }

    fn location(&self, resp: &reqwest::Response, what: &str) -> Result<Url> {
        let loc = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| anyhow!("{}: {what}: the answer has no Location", self.host))?;
        self.base
            .join(loc)
            .with_context(|| format!("{}: {what}: bad Location {loc:?}", self.host))
    }

    /// Start an upload session, or mount `digest` from `from`: Ok(None) when mounted.
    async fn start_upload(
        &self,
        repo: &str,
        digest: &Digest,
        from: Option<&str>,
    ) -> Result<Option<Url>> {
        let mut url = self.url(&format!("v2/{repo}/blobs/uploads/"))?;
        let what = match from {
            Some(from) => {
                url.query_pairs_mut()
                    .append_pair("mount", digest.as_str())
                    .append_pair("from", from);
                format!("mount {digest} from {from}")
            }
            None => format!("start upload of {digest}"),
        };
        let resp = self
            .send(Some(repo), &what, true, || {
                Ok(self
                    .client
                    .post(url.clone())
                    .header(header::CONTENT_LENGTH, "0"))
            })
            .await?;
        match resp.status() {
            StatusCode::CREATED if from.is_some() => Ok(None),
            StatusCode::ACCEPTED => Ok(Some(self.location(&resp, &what)?)),
            _ => bail!(
                "{}: {what} in {repo}: {}",
                self.host,
                body_text(resp, self.stall).await
            ),
        }
    }

    /// Cancel an upload session we do not need (best effort).
    async fn cancel_upload(&self, repo: &str, location: Url) {
        let activity = Activity::new();
        let req = self.client.delete(location);
        let req = match self.authorization(Some(repo)).await {
            Ok(Some(h)) => self.with_authorization(req, h),
            Ok(None) => Ok(req),
            Err(e) => Err(e),
        };
        if let Ok(req) = req {
            let _ = exchange(req, &activity, self.stall).await;
        }
    }

    /// Put the manifest `bytes` under `tag` (or a digest); returns the digest the registry
    /// reports and whether it answered with `OCI-Subject` (it keeps referrers itself).
    async fn put_manifest(
        &self,
        repo: &str,
        tag: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<(Option<String>, bool)> {
        let url = self.url(&format!("v2/{repo}/manifests/{tag}"))?;
        let what = format!("PUT manifest {repo}:{tag}");
        let resp = self
            .send(Some(repo), &what, true, || {
                Ok(self
                    .client
                    .put(url.clone())
                    .header(header::CONTENT_TYPE, media_type)
                    .body(bytes.clone()))
            })
            .await?;
        if resp.status() != StatusCode::CREATED && !resp.status().is_success() {
            bail!(
                "{}: {what}: {}",
                self.host,
                body_text(resp, self.stall).await
            );
        }
        let digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok((digest, resp.headers().contains_key("oci-subject")))
    }

    /// Whether `repo` answers the referrers API (OCI distribution 1.1) for `subject`.
    async fn has_referrers_api(&self, repo: &str, subject: &Digest) -> Result<bool> {
        let what = format!("GET referrers of {subject}");
        let resp = self
            .get_index(repo, &format!("referrers/{subject}"), &what)
            .await?;
        let is_index = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with(INDEX_MEDIA_TYPE));
        Ok(resp.status() == StatusCode::OK && is_index)
    }

    /// `GET /v2/REPO/PATH`, asking for an OCI index.
    async fn get_index(&self, repo: &str, path: &str, what: &str) -> Result<reqwest::Response> {
        let url = self.url(&format!("v2/{repo}/{path}"))?;
        self.send(Some(repo), what, true, || {
            Ok(self
                .client
                .get(url.clone())
                .header(header::ACCEPT, INDEX_MEDIA_TYPE))
        })
        .await
    }

    /// Add `artifact` to the referrers tag scheme's index of `subject` (tag
    /// `sha256-<hex>`), made when missing, kept as it is when it lists `artifact` already.
    async fn add_to_referrers_tag(
        &self,
        repo: &str,
        subject: &Digest,
        artifact: &Descriptor,
    ) -> Result<()> {
        let tag = format!("sha256-{}", subject.hex());
        let what = format!("GET referrers index {repo}:{tag}");
        let resp = self
            .get_index(repo, &format!("manifests/{tag}"), &what)
            .await?;
        let mut index = match resp.status() {
            StatusCode::NOT_FOUND => Index::default(),
            StatusCode::OK => {
                let bytes = read_limited(resp, MANIFEST_MAX, self.stall)
                    .await
                    .with_context(|| format!("{}: {what}", self.host))?;
                serde_json::from_slice::<Index>(&bytes).with_context(|| {
                    format!("{}: {what}: not an OCI index; left as it is", self.host)
                })?
            }
            s => bail!(
                "{}: {what}: HTTP {s}: {}",
                self.host,
                body_text(resp, self.stall).await
            ),
        };
        if index.manifests.iter().any(|d| d.digest == artifact.digest) {
            return Ok(());
        }
        let mut entry = artifact.plain();
        entry.artifact_type = artifact.artifact_type.clone();
        entry.annotations = artifact.annotations.clone();
        entry.annotations.remove(crate::image::store::REF_NAME);
        index.manifests.push(entry);
        index.media_type = Some(INDEX_MEDIA_TYPE.to_string());
        let bytes = serde_json::to_vec(&index).context("cannot write the referrers index")?;
        self.put_manifest(repo, &tag, INDEX_MEDIA_TYPE, Bytes::from(bytes))
            .await?;
        Ok(())
    }
}

/// The most of a manifest or index read from a registry.
const MANIFEST_MAX: usize = 4 << 20;

/// The body of `resp`, at most `limit` bytes (more is an error), each chunk within `stall`.
async fn read_limited(resp: reqwest::Response, limit: usize, stall: Duration) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    loop {
        let chunk = tokio::time::timeout(stall, stream.next())
            .await
            .map_err(|_| anyhow!("no data for {} s", stall.as_secs()))?;
        let Some(chunk) = chunk else { break };
        let chunk = chunk.map_err(|e| anyhow!("cannot read the answer: {}", describe(&e)))?;
        if body.len() + chunk.len() > limit {
            bail!("the answer is larger than {limit} bytes");
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    uploaded: usize,
    mounted: usize,
    skipped: usize,
    /// The registry answered the manifest's `PUT` with `OCI-Subject`.
    subject_kept: bool,
}

enum BlobOutcome {
    Skipped,
    Mounted,
    Uploaded,
}

/// Pushing one image.
struct ImagePush<'a> {
    registry: &'a Registry,
    store: &'a Store,
    opts: &'a PushOptions,
    image: &'a StoredImage,
    repository: &'a str,
    tag: &'a str,
    sources: BTreeMap<Digest, Vec<String>>,
    bars: Option<&'a MultiProgress>,
    sent: Arc<AtomicU64>,
}

/// The check of one blob's upload: its bytes hashed in order, once, however often retries
/// and resumed chunks read them again. The reader that reaches the blob's end gets the
/// verdict before it sends the last bytes, so a wrong blob never completes an upload.
struct UploadCheck {
    path: PathBuf,
    digest: Digest,
    size: u64,
    state: Mutex<CheckState>,
}

struct CheckState {
    hasher: Sha256,
    /// Bytes hashed so far (from the start of the blob).
    hashed: u64,
    /// Set once the blob turned out wrong.
    corrupt: Option<CorruptBlob>,
}

impl UploadCheck {
    fn new(path: PathBuf, desc: &Descriptor) -> Self {
        UploadCheck {
            path,
            digest: desc.digest.clone(),
            size: desc.size,
            state: Mutex::new(CheckState {
                hasher: Sha256::new(),
                hashed: 0,
                corrupt: None,
            }),
        }
    }

    fn corrupt(&self, found: Found) -> CorruptBlob {
        CorruptBlob {
            path: self.path.clone(),
            digest: self.digest.clone(),
            size: Some(self.size),
            found,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, CheckState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What was found wrong with the blob, if anything yet.
    fn failure(&self) -> Option<CorruptBlob> {
        self.state().corrupt.clone()
    }

    fn fail(&self, found: Found) -> CorruptBlob {
        let mut state = self.state();
        state
            .corrupt
            .get_or_insert_with(|| self.corrupt(found))
            .clone()
    }

    /// Take `data`, read from `file` at `at`: hash what is new, and once the whole blob is
    /// hashed, judge it (a blob longer than its descriptor says is wrong too).
    fn feed(&self, file: &std::fs::File, at: u64, data: &[u8]) -> Result<(), CorruptBlob> {
        use std::os::unix::fs::FileExt;
        let mut state = self.state();
        if let Some(c) = &state.corrupt {
            return Err(c.clone());
        }
        if at > state.hashed {
            // A resumed upload skipped bytes no reader of ours read: hash them from the file.
            let mut gap = vec![0u8; (at - state.hashed) as usize];
            if file.read_exact_at(&mut gap, state.hashed).is_err() {
                let found = Found::Size(file.metadata().map(|m| m.len()).unwrap_or(0));
                return Err(state.corrupt.insert(self.corrupt(found)).clone());
            }
            state.hasher.update(&gap);
            state.hashed = at;
        }
        let end = at + data.len() as u64;
        if end > state.hashed {
            let new = &data[(state.hashed - at) as usize..];
            state.hasher.update(new);
            state.hashed = end;
            if end == self.size {
                let mut probe = [0u8; 1];
                let found = if file.read_at(&mut probe, self.size).is_ok_and(|n| n > 0) {
                    Some(Found::Longer)
                } else {
                    let got = Digest::from_sha256(state.hasher.clone().finalize().as_slice());
                    (got != self.digest).then_some(Found::Content(self.size, got))
                };
                if let Some(found) = found {
                    return Err(state.corrupt.insert(self.corrupt(found)).clone());
                }
            }
        }
        Ok(())
    }
}

/// Read `len` bytes of `path` from `offset` on a blocking thread, a few chunks ahead of the
/// network, as a request body; `check` sees every byte, and a blob that is not what it
/// should be ends the body with an error instead of its last bytes.
fn file_body(
    check: &Arc<UploadCheck>,
    offset: u64,
    len: u64,
    activity: Activity,
    sent: Arc<AtomicU64>,
    bar: Option<ProgressBar>,
) -> Result<reqwest::Body> {
    const CHUNK: u64 = 1 << 20;
    let path = &check.path;
    let mut file = std::fs::File::open(path)
        .with_context(|| format!("{}: cannot open blob", path.display()))?;
    file.seek(SeekFrom::Start(offset))
        .with_context(|| format!("{}: cannot seek", path.display()))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    let shown = path.display().to_string();
    let check = check.clone();
    std::thread::Builder::new()
        .name("blob-reader".into())
        .spawn(move || {
            let mut at = offset;
            let end = offset + len;
            while at < end {
                let n = (end - at).min(CHUNK) as usize;
                let mut buf = vec![0u8; n];
                let item = match file.read_exact(&mut buf) {
                    Ok(()) => check
                        .feed(&file, at, &buf)
                        .map(|()| Bytes::from(buf))
                        .map_err(std::io::Error::other),
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        let on_disk = file.metadata().map(|m| m.len()).unwrap_or(0);
                        Err(std::io::Error::other(check.fail(Found::Size(on_disk))))
                    }
                    Err(e) => Err(std::io::Error::new(
                        e.kind(),
                        format!("{shown}: cannot read: {e}"),
                    )),
                };
                let failed = item.is_err();
                if tx.blocking_send(item).is_err() || failed {
                    return; // the request is gone, or we told it why
                }
                at += n as u64;
            }
        })
        .context("cannot start a reader thread")?;
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
    .map(move |item| {
        if let Ok(chunk) = &item {
            activity.touch();
            sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            if let Some(bar) = &bar {
                bar.inc(chunk.len() as u64);
            }
        }
        item
    });
    Ok(reqwest::Body::wrap_stream(stream))
}

impl ImagePush<'_> {
    async fn run(&self) -> Result<Counts> {
        let registry = self.registry;
        let repo = self.repository;
        let mut all_sources: Vec<String> = Vec::new();
        for list in self.sources.values() {
            for s in list.iter().take(self.opts.max_mount_sources) {
                if !all_sources.contains(s) {
                    all_sources.push(s.clone());
                }
            }
        }
        all_sources.truncate(16);
        registry.set_scopes(repo, &all_sources);

        // Layers first, the config last, a few at a time.
        let blobs: Vec<&Descriptor> = self
            .image
            .layers
            .iter()
            .chain(std::iter::once(&self.image.config))
            .collect();
        let results: Vec<Result<BlobOutcome>> = futures_util::stream::iter(blobs.iter())
            .map(|d| self.ensure_blob(d))
            .buffer_unordered(self.opts.concurrency.max(1))
            .collect()
            .await;
        let mut counts = Counts::default();
        for r in results {
            match r? {
                BlobOutcome::Skipped => counts.skipped += 1,
                BlobOutcome::Mounted => counts.mounted += 1,
                BlobOutcome::Uploaded => counts.uploaded += 1,
            }
        }
        // Every blob is confirmed before the tag can point at them.
        for d in &blobs {
            if !registry.has_blob(repo, &d.digest).await? {
                bail!(
                    "{}: blob {} is not in {repo} after its upload; the manifest was not pushed",
                    registry.host,
                    d.digest
                );
            }
        }
        let bytes = self.store.read_descriptor(&self.image.manifest)?;
        let (reported, subject_kept) = registry
            .put_manifest(
                repo,
                self.tag,
                &self.image.manifest.media_type,
                Bytes::from(bytes),
            )
            .await?;
        if let Some(reported) = reported
            && reported != self.image.manifest.digest.as_str()
        {
            bail!(
                "{}: the registry stored the manifest as {reported}, not {}",
                registry.host,
                self.image.manifest.digest
            );
        }
        counts.subject_kept = subject_kept;
        known()
            .entry(registry.host.clone())
            .or_default()
            .entry(repo.to_string())
            .or_default()
            .extend(blobs.iter().map(|d| d.digest.clone()));
        tracing::info!(
            "{}/{repo}:{} is {}",
            registry.host,
            self.tag,
            self.image.manifest.digest
        );
        Ok(counts)
    }

    /// Make sure the repository has blob `desc`: skip, mount or upload it.
    async fn ensure_blob(&self, desc: &Descriptor) -> Result<BlobOutcome> {
        let registry = self.registry;
        let repo = self.repository;
        let digest = &desc.digest;
        if registry.has_blob(repo, digest).await? {
            tracing::info!("{repo}: {digest} is there already");
            return Ok(BlobOutcome::Skipped);
        }
        let mut session: Option<Url> = None;
        let sources = self.sources.get(digest).cloned().unwrap_or_default();
        for from in sources.iter().take(self.opts.max_mount_sources) {
            if let Some(old) = session.take() {
                registry.cancel_upload(repo, old).await;
            }
            match registry.start_upload(repo, digest, Some(from)).await? {
                None => {
                    tracing::info!("{repo}: mounted {digest} from {from}");
                    return Ok(BlobOutcome::Mounted);
                }
                Some(location) => session = Some(location),
            }
        }
        self.upload(desc, session).await?;
        Ok(BlobOutcome::Uploaded)
    }

    fn bar(&self, desc: &Descriptor) -> Option<ProgressBar> {
        let multi = self.bars?;
        let bar = multi.add(ProgressBar::new(desc.size));
        let style = ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(format!("push {}", &desc.digest.hex()[..12]));
        Some(bar)
    }

    /// Upload blob `desc` from the store, starting over (or resuming, chunked) after a
    /// failure, `retry.tries` times at most.
    async fn upload(&self, desc: &Descriptor, mut session: Option<Url>) -> Result<()> {
        let registry = self.registry;
        let repo = self.repository;
        let digest = &desc.digest;
        let path = self.store.blob_path(digest);
        let on_disk = std::fs::metadata(&path)
            .with_context(|| format!("{}: cannot read blob {digest}", path.display()))?
            .len();
        let check = Arc::new(UploadCheck::new(path, desc));
        if on_disk != desc.size {
            return Err(check.fail(Found::Size(on_disk)).into());
        }
        let bar = self.bar(desc);
        let chunked = desc.size >= self.opts.chunk_threshold && self.opts.chunk_size > 0;
        let mut failures = 0u32;
        let mut fail = |reason: String, after: Option<Duration>| -> Result<Duration> {
            failures += 1;
            if failures >= registry.retry.tries {
                bail!(
                    "{}: upload of {digest} to {repo}: gave up after {failures} tries: {reason}",
                    registry.host
                );
            }
            let delay = registry.delay(failures, after);
            tracing::warn!(
                "{}: upload of {digest}: {reason}; retrying in {:.1} s ({failures}/{})",
                registry.host,
                delay.as_secs_f64(),
                registry.retry.tries
            );
            Ok(delay)
        };
        // (session URL, bytes the registry has) of an upload in progress.
        let mut resume: Option<(Url, u64)> = None;
        loop {
            let (mut location, mut offset) = match resume.take() {
                Some(r) => r,
                None => match session.take() {
                    Some(s) => (s, 0),
                    None => match registry.start_upload(repo, digest, None).await? {
                        Some(s) => (s, 0),
                        None => bail!("internal error: an upload started as a mount"),
                    },
                },
            };
            if let Some(bar) = &bar {
                bar.set_position(offset);
            }
            let result = if chunked {
                self.send_chunks(desc, &check, &mut location, &mut offset, bar.clone())
                    .await
            } else {
                self.send_whole(desc, &check, &location, bar.clone()).await
            };
            // A corrupt blob is what failed the request (or would fail every retry).
            if let Some(corrupt) = check.failure() {
                if let Some(bar) = &bar {
                    bar.abandon();
                }
                registry.cancel_upload(repo, location).await;
                return Err(corrupt.into());
            }
            match result {
                Ok(()) => {
                    if let Some(bar) = &bar {
                        bar.finish_and_clear();
                    }
                    tracing::info!("{repo}: uploaded {digest} ({} bytes)", desc.size);
                    return Ok(());
                }
                Err(UploadError::Fatal(e)) => return Err(e),
                Err(UploadError::Retry { reason, after }) => {
                    let delay = fail(reason, after)?;
                    tokio::time::sleep(delay).await;
                    if chunked {
                        resume = self.upload_status(&location).await;
                        if let Some((_, at)) = &resume {
                            tracing::info!("{repo}: resuming the upload of {digest} at byte {at}");
                        }
                    }
                    if resume.is_none() {
                        registry.cancel_upload(repo, location).await;
                    }
                }
            }
        }
    }

    /// Where an interrupted upload stands, if the registry still has it consistent.
    async fn upload_status(&self, location: &Url) -> Option<(Url, u64)> {
        let registry = self.registry;
        let activity = Activity::new();
        let Ok(Outcome::Done(resp)) = registry
            .attempt(
                Some(self.repository),
                registry.client.get(location.clone()),
                &activity,
            )
            .await
        else {
            return None;
        };
        if resp.status() != StatusCode::NO_CONTENT {
            return None;
        }
        let range = resp.headers().get(header::RANGE)?.to_str().ok()?;
        let end: u64 = range.split_once('-')?.1.trim().parse().ok()?;
        let next = registry.location(&resp, "upload status").ok()?;
        Some((next, end + 1))
    }

    /// One streaming `PUT` of the whole blob to the session at `location`.
    async fn send_whole(
        &self,
        desc: &Descriptor,
        check: &Arc<UploadCheck>,
        location: &Url,
        bar: Option<ProgressBar>,
    ) -> std::result::Result<(), UploadError> {
        let registry = self.registry;
        let mut url = location.clone();
        url.query_pairs_mut()
            .append_pair("digest", desc.digest.as_str());
        let activity = Activity::new();
        let body = file_body(
            check,
            0,
            desc.size,
            activity.clone(),
            self.sent.clone(),
            bar,
        )
        .map_err(UploadError::Fatal)?;
        let req = registry
            .client
            .put(url)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, desc.size)
            .body(body);
        let outcome = registry
            .attempt(Some(self.repository), req, &activity)
            .await
            .map_err(UploadError::Fatal)?;
        self.finished(outcome, StatusCode::CREATED, "PUT blob")
            .await
            .map(|_| ())
    }

    /// `PATCH` the rest of the blob from `offset` in chunks, then the closing `PUT`.
    async fn send_chunks(
        &self,
        desc: &Descriptor,
        check: &Arc<UploadCheck>,
        location: &mut Url,
        offset: &mut u64,
        bar: Option<ProgressBar>,
    ) -> std::result::Result<(), UploadError> {
        let registry = self.registry;
        while *offset < desc.size {
            let len = (desc.size - *offset).min(self.opts.chunk_size);
            let activity = Activity::new();
            let body = file_body(
                check,
                *offset,
                len,
                activity.clone(),
                self.sent.clone(),
                bar.clone(),
            )
            .map_err(UploadError::Fatal)?;
            let req = registry
                .client
                .patch(location.clone())
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .header(header::CONTENT_LENGTH, len)
                .header(
                    header::CONTENT_RANGE,
                    format!("{}-{}", *offset, *offset + len - 1),
                )
                .body(body);
            let outcome = registry
                .attempt(Some(self.repository), req, &activity)
                .await
                .map_err(UploadError::Fatal)?;
            let resp = self
                .finished(outcome, StatusCode::ACCEPTED, "PATCH blob")
                .await?;
            *location = registry
                .location(&resp, "PATCH blob")
                .map_err(UploadError::Fatal)?;
            *offset += len;
        }
        let mut url = location.clone();
        url.query_pairs_mut()
            .append_pair("digest", desc.digest.as_str());
        let activity = Activity::new();
        let req = registry.client.put(url).header(header::CONTENT_LENGTH, "0");
        let outcome = registry
            .attempt(Some(self.repository), req, &activity)
            .await
            .map_err(UploadError::Fatal)?;
        self.finished(outcome, StatusCode::CREATED, "PUT blob")
            .await
            .map(|_| ())
    }

    /// Judge the answer to an upload request.
    async fn finished(
        &self,
        outcome: Outcome,
        expected: StatusCode,
        what: &str,
    ) -> std::result::Result<reqwest::Response, UploadError> {
        let registry = self.registry;
        match outcome {
            Outcome::Done(resp) if resp.status() == expected => Ok(resp),
            Outcome::Done(resp) => {
                let status = resp.status();
                let text = body_text(resp, registry.stall).await;
                if matches!(
                    status,
                    StatusCode::NOT_FOUND | StatusCode::RANGE_NOT_SATISFIABLE
                ) {
                    // The session is gone or out of step: start over.
                    return Err(UploadError::Retry {
                        reason: format!("{what}: {text}"),
                        after: None,
                    });
                }
                if status == StatusCode::FORBIDDEN {
                    return Err(UploadError::Fatal(
                        registry.auth_failed(format!("{what}: access denied ({text})")),
                    ));
                }
                Err(UploadError::Fatal(anyhow!(
                    "{}: {what} {} to {}: {text}",
                    registry.host,
                    self.image.reference,
                    self.repository
                )))
            }
            Outcome::Unauthorized(resp) => {
                // A token that expired during a long upload: a new one, and start over.
                registry
                    .take_challenge(&resp, Some(self.repository))
                    .await
                    .map_err(UploadError::Fatal)?;
                Err(UploadError::Retry {
                    reason: format!("{what}: HTTP 401, authenticated again"),
                    after: Some(Duration::ZERO),
                })
            }
            Outcome::Retry { reason, after } => Err(UploadError::Retry {
                reason: format!("{what}: {reason}"),
                after,
            }),
        }
    }
}

enum UploadError {
    Fatal(anyhow::Error),
    Retry {
        reason: String,
        after: Option<Duration>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_insecure_hosts() {
        let opts = PushOptions {
            insecure_registries: vec!["reg.example".into(), "other.example:5000".into()],
            ..Default::default()
        };
        for h in [
            "127.0.0.1:5000",
            "127.1.2.3",
            "localhost:80",
            "[::1]:5000",
            "::1",
        ] {
            assert!(is_loopback(h), "{h}");
            assert!(is_insecure(h, &opts), "{h}");
        }
        for h in ["10.0.0.1:5000", "localhost.example", "docker.io"] {
            assert!(!is_loopback(h), "{h}");
        }
        assert!(is_insecure("reg.example:443", &opts));
        assert!(is_insecure("other.example:5000", &opts));
        assert!(!is_insecure("other.example:5001", &opts));
        assert!(!is_insecure("docker.io", &opts));
        let strict = PushOptions {
            loopback_insecure: false,
            ..Default::default()
        };
        assert!(!is_insecure("127.0.0.1:5000", &strict));
    }

    #[test]
    fn report_reads_well() {
        let r = PushReport {
            reference: "r.example/a:1".into(),
            digest: Digest::of(b"x"),
            uploaded: 2,
            mounted: 1,
            skipped: 0,
            bytes_sent: 10,
            referrers: vec![],
        };
        let text = r.to_string();
        assert!(
            text.contains("2 blobs uploaded, 1 mounted, 0 skipped, 10 bytes sent"),
            "{text}"
        );
    }
}
