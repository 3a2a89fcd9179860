//! The registry connection: HTTP clients (verified, and unverified for insecure hosts),
//! one try of a request with its stall timeout, retries by the one [`crate::net::Retries`],
//! and authentication (anonymous, basic, bearer tokens per repository).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::header::{self, HeaderValue};
use reqwest::{StatusCode, Url};

use crate::image::oci::MediaType;
use crate::image::store::{
    Descriptor, DescriptorExt, Digest, INDEX_MEDIA_TYPE, ImageIndex, to_json,
};
pub use crate::net::RetryPolicy;
use crate::net::{
    Failure, Retries, Tried, describe, http_client, is_tls_refusal, retry_after, tls_config,
};
use crate::publish::auth::{self, Credential};

use super::PushOptions;

/// What a pusher or a puller runs on: its async runtime, and the verified and the
/// unverified (insecure hosts only) HTTP clients ([`http_clients`]).
pub(in crate::publish) fn runtime_and_clients(
    opts: &PushOptions,
) -> Result<(tokio::runtime::Runtime, reqwest::Client, reqwest::Client)> {
    // Several pushers (or other parts of the program) may try: one provider wins.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let (secure, insecure) = http_clients(opts)?;
    Ok((runtime, secure, insecure))
}

/// The verified and the unverified (insecure hosts only) HTTP clients.
fn http_clients(opts: &PushOptions) -> Result<(reqwest::Client, reqwest::Client)> {
    let secure = http_client(Some(tls_config(&opts.ca_files)?), opts.connect_timeout)?;
    let insecure = http_client(None, opts.connect_timeout)?;
    Ok((secure, insecure))
}

/// The host credentials and known blobs are filed under (Docker Hub's aliases as one).
pub(in crate::publish) fn auth_host(host: &str) -> &str {
    match host {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io"
        }
        h => h,
    }
}

/// The name part of `host` (`name`, `name:port`, `[v6]:port` or a bare IPv6 address).
pub(super) fn host_name(host: &str) -> &str {
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

pub(super) fn is_loopback(host: &str) -> bool {
    let name = host_name(host);
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

pub(super) fn is_insecure(host: &str, opts: &PushOptions) -> bool {
    let name = host_name(host);
    (opts.loopback_insecure && is_loopback(host))
        || opts
            .insecure_registries
            .iter()
            .any(|i| i == host || (host_name(i) == i && i == name))
}

/// Time of the last sign of progress on a request.
#[derive(Clone)]
pub(super) struct Activity {
    pub(super) start: Instant,
    pub(super) last_ms: Arc<AtomicU64>,
}

impl Activity {
    pub(super) fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    pub(super) fn touch(&self) {
        let ms = self.start.elapsed().as_millis().min(u64::MAX as u128) as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    pub(super) fn idle(&self) -> Duration {
        self.start
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Send `req`, failing when it makes no progress (body sent, answer head) for `stall`; a
/// request that got no answer is worth another try, unless TLS refused the server.
pub(super) async fn exchange(
    req: reqwest::RequestBuilder,
    activity: &Activity,
    stall: Duration,
) -> Tried<reqwest::Response> {
    let send = req.send();
    tokio::pin!(send);
    let tick = (stall / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
    loop {
        tokio::select! {
            r = &mut send => return r.map_err(|e| match is_tls_refusal(&e) {
                true => Failure::Fatal(anyhow!(describe(&e))),
                false => Failure::retry(anyhow!(describe(&e))),
            }),
            _ = tokio::time::sleep(tick) => {
                if activity.idle() >= stall {
                    return Err(Failure::retry(anyhow!(
                        "no progress for {} s (timed out)",
                        stall.as_secs_f64()
                    )));
                }
            }
        }
    }
}

/// The digest a registry says its answer's content has (`Docker-Content-Digest`).
pub(in crate::publish) fn content_digest(resp: &reqwest::Response) -> Option<String> {
    resp.headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The start of an answer's body, for error messages (registries answer with JSON errors).
pub(in crate::publish) async fn body_text(resp: reqwest::Response, stall: Duration) -> String {
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

pub(super) fn is_retryable(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

#[derive(Clone)]
pub(super) enum AuthMode {
    Anonymous,
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

/// One registry: where it is, how to authenticate, tokens per repository.
pub(in crate::publish) struct Registry {
    /// As in references (`docker.io` for Docker Hub).
    pub(in crate::publish) host: String,
    pub(super) base: Url,
    pub(in crate::publish) client: reqwest::Client,
    /// For token realms on hosts that are not insecure.
    pub(super) secure: reqwest::Client,
    pub(super) insecure: reqwest::Client,
    pub(super) insecure_hosts: PushOptions,
    pub(super) credential: Option<auth::Found>,
    pub(super) mode: Mutex<AuthMode>,
    /// Bearer header per repository (and the scopes it was asked for).
    pub(super) tokens: Mutex<BTreeMap<String, HeaderValue>>,
    pub(super) scopes: Mutex<BTreeMap<String, Vec<String>>>,
    /// One token request at a time, so blobs pushed together share one token.
    pub(super) token_fetch: tokio::sync::Mutex<()>,
    pub(super) retry: RetryPolicy,
    pub(in crate::publish) stall: Duration,
}

pub(super) fn sensitive(value: &str) -> Result<HeaderValue> {
    let mut v = HeaderValue::from_str(value)
        .map_err(|_| anyhow!("a credential holds characters not allowed in an HTTP header"))?;
    v.set_sensitive(true);
    Ok(v)
}

impl Registry {
    pub(in crate::publish) async fn connect(
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

    pub(in crate::publish) fn url(&self, path: &str) -> Result<Url> {
        self.base
            .join(path)
            .with_context(|| format!("{}: cannot make a URL of {path:?}", self.host))
    }

    pub(super) fn auth_failed(&self, why: impl fmt::Display) -> anyhow::Error {
        anyhow!("authentication failed for {}: {why}", self.host)
    }

    /// `GET /v2/`: is the registry there, and how does it want us to authenticate?
    pub(super) async fn ping(&self) -> Result<()> {
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

    pub(super) fn refused(&self) -> String {
        match &self.credential {
            Some(found) => format!("the registry refused the credentials from {}", found.source),
            None => "the registry wants credentials and none were found for it (docker \
                     config.json, credential helpers, Podman auth.json)"
                .to_string(),
        }
    }

    pub(super) fn current_mode(&self) -> AuthMode {
        self.mode.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Learn the authentication scheme from a 401 answer; get a token for `repo` if bearer.
    pub(super) async fn take_challenge(
        &self,
        resp: &reqwest::Response,
        repo: Option<&str>,
    ) -> Result<()> {
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
    pub(in crate::publish) fn set_scopes(&self, repo: &str, sources: &[String]) {
        let mut scopes = vec![auth::repository_scope(repo, "pull,push")];
        scopes.extend(sources.iter().map(|s| auth::repository_scope(s, "pull")));
        self.use_scopes(repo, scopes);
    }

    /// Scopes for reading `repo` only (`inspect --remote`).
    pub(in crate::publish) fn set_pull_scope(&self, repo: &str) {
        self.use_scopes(repo, vec![auth::repository_scope(repo, "pull")]);
    }

    /// Ask tokens for `repo` with `scopes` from now on (a token of other scopes is dropped).
    fn use_scopes(&self, repo: &str, scopes: Vec<String>) {
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
    pub(super) async fn authorization(&self, repo: Option<&str>) -> Result<Option<HeaderValue>> {
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

    pub(super) fn realm_client(&self, realm: &Url) -> Result<&reqwest::Client> {
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
    pub(super) async fn token_for(&self, repo: &str) -> Result<HeaderValue> {
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

    /// `req` with `Authorization: value` when it goes to the registry itself (an upload
    /// `Location` may name another host, which gets no credentials).
    pub(super) fn with_authorization(
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

    /// One try: send, and classify the answer: an answer to try again (429, 5xx) or no
    /// answer is a failure; any other answer, 401 included, is the caller's to judge.
    pub(super) async fn attempt(
        &self,
        repo: Option<&str>,
        req: reqwest::RequestBuilder,
        activity: &Activity,
    ) -> Tried<reqwest::Response> {
        let req = match self.authorization(repo).await? {
            Some(h) => self.with_authorization(req, h)?,
            None => req,
        };
        activity.touch();
        match exchange(req, activity, self.stall).await {
            Err(Failure::Fatal(e)) => Err(Failure::Fatal(anyhow!("{}: {e:#}", self.host))),
            Err(retry) => Err(retry),
            Ok(resp) if is_retryable(resp.status()) => {
                let after = retry_after(&resp);
                Err(Failure::Retry {
                    err: anyhow!(body_text(resp, self.stall).await),
                    after,
                })
            }
            Ok(resp) => Ok(resp),
        }
    }

    /// Send a request built by `build` (again for each try), retrying transient failures
    /// and re-authenticating once on 401 when `handle_auth`; 403 is an authentication error.
    pub(in crate::publish) async fn send(
        &self,
        repo: Option<&str>,
        what: &str,
        handle_auth: bool,
        build: impl Fn() -> Result<reqwest::RequestBuilder>,
    ) -> Result<reqwest::Response> {
        let mut retries = Retries::new(&self.retry);
        let mut reauthenticated = false;
        let what_here = format!("{}: {what}", self.host);
        loop {
            let activity = Activity::new();
            let resp = match self.attempt(repo, build()?, &activity).await {
                Ok(resp) => resp,
                Err(failure) => {
                    tokio::time::sleep(retries.judge(&what_here, failure)?).await;
                    continue;
                }
            };
            match resp.status() {
                StatusCode::FORBIDDEN if handle_auth => {
                    let text = body_text(resp, self.stall).await;
                    return Err(self.auth_failed(format!("{what}: access denied ({text})")));
                }
                StatusCode::UNAUTHORIZED if handle_auth && !reauthenticated => {
                    reauthenticated = true;
                    self.take_challenge(&resp, repo).await?;
                }
                StatusCode::UNAUTHORIZED if handle_auth => {
                    let text = body_text(resp, self.stall).await;
                    return Err(self.auth_failed(format!("{what}: {text}")));
                }
                _ => return Ok(resp),
            }
        }
    }

    /// Whether `repo` has blob `digest` (`HEAD`).
    pub(in crate::publish) async fn has_blob(&self, repo: &str, digest: &Digest) -> Result<bool> {
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

    pub(super) fn location(&self, resp: &reqwest::Response, what: &str) -> Result<Url> {
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
    pub(in crate::publish) async fn start_upload(
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
    pub(in crate::publish) async fn cancel_upload(&self, repo: &str, location: Url) {
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
    pub(in crate::publish) async fn put_manifest(
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
        let digest = content_digest(&resp);
        Ok((digest, resp.headers().contains_key("oci-subject")))
    }

    /// Whether `repo` answers the referrers API (OCI distribution 1.1) for `subject`.
    pub(super) async fn has_referrers_api(&self, repo: &str, subject: &Digest) -> Result<bool> {
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
    pub(super) async fn get_index(
        &self,
        repo: &str,
        path: &str,
        what: &str,
    ) -> Result<reqwest::Response> {
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
    pub(super) async fn add_to_referrers_tag(
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
            StatusCode::NOT_FOUND => ImageIndex::default(),
            StatusCode::OK => {
                let bytes = read_limited(resp, MANIFEST_MAX, self.stall)
                    .await
                    .with_context(|| format!("{}: {what}", self.host))?;
                serde_json::from_slice::<ImageIndex>(&bytes).with_context(|| {
                    format!("{}: {what}: not an OCI index; left as it is", self.host)
                })?
            }
            s => bail!(
                "{}: {what}: HTTP {s}: {}",
                self.host,
                body_text(resp, self.stall).await
            ),
        };
        if index
            .manifests()
            .iter()
            .any(|d| d.digest() == artifact.digest())
        {
            return Ok(());
        }
        let mut entry = artifact.plain();
        entry.set_artifact_type(artifact.artifact_type().clone());
        let mut annotations = artifact.annotations().clone().unwrap_or_default();
        annotations.remove(crate::image::store::REF_NAME);
        if !annotations.is_empty() {
            entry.set_annotations(Some(annotations));
        }
        let mut manifests = index.manifests().clone();
        manifests.push(entry);
        index.set_manifests(manifests);
        index.set_media_type(Some(MediaType::ImageIndex));
        let bytes = to_json(&index).context("cannot write the referrers index")?;
        self.put_manifest(repo, &tag, INDEX_MEDIA_TYPE, Bytes::from(bytes))
            .await?;
        Ok(())
    }
}

/// The most of a manifest or index read from a registry.
pub(super) const MANIFEST_MAX: usize = 4 << 20;

/// The body of `resp`, at most `limit` bytes (more is an error), each chunk within `stall`.
pub(in crate::publish) async fn read_limited(
    resp: reqwest::Response,
    limit: usize,
    stall: Duration,
) -> Result<Vec<u8>> {
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
