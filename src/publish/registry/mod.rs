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
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use indicatif::{MultiProgress, ProgressDrawTarget};

use crate::image::index::{is_index, read_index};
use crate::image::reference::Reference;
use crate::image::store::{DescriptorExt, Digest, Store};
use crate::image::{StoredImage, open_image};
pub use crate::net::RetryPolicy;
use crate::progress::Verbosity;

mod client;
mod upload;

pub(in crate::publish) use client::{
    Registry, auth_host, body_text, content_digest, read_limited, runtime_and_clients,
};
use upload::*;

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
                    .manifests()
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
        let (runtime, secure, insecure) = runtime_and_clients(&opts)?;
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

    /// Push the store's image `reference` to the registry and repository it names. A name
    /// that is an image index of several platforms is pushed whole: each platform's image
    /// (with its referrers) by digest, then the index under the tag.
    pub fn push(&mut self, reference: &str) -> Result<PushReport> {
        let dest: Reference = reference.parse()?;
        let desc = self.store.resolve(&dest.to_string())?;
        if !is_index(&desc) {
            let image = open_image(&self.store, &dest.to_string())?;
            return self.push_image(&dest, &image, &dest.tag);
        }
        let index = read_index(&self.store, &desc)?;
        let mut report = PushReport {
            reference: dest.to_string(),
            digest: desc.blob()?,
            uploaded: 0,
            mounted: 0,
            skipped: 0,
            bytes_sent: 0,
            referrers: Vec::new(),
        };
        for entry in index.manifests() {
            if is_index(entry) {
                bail!(
                    "{dest}: an index inside an index ({}) is not pushed",
                    entry.digest()
                );
            }
            let manifest = self
                .store
                .read_manifest(entry)
                .with_context(|| format!("{dest}: its entry {}", entry.digest()))?;
            let image = StoredImage {
                reference: format!("{dest}@{}", entry.digest()),
                manifest: entry.clone(),
                config: manifest.config().clone(),
                layers: manifest.layers().clone(),
            };
            let one = self.push_image(&dest, &image, entry.digest().as_ref())?;
            report.uploaded += one.uploaded;
            report.mounted += one.mounted;
            report.skipped += one.skipped;
            report.bytes_sent += one.bytes_sent;
            report.referrers.extend(one.referrers);
        }
        // Every platform's manifest is there: the tag can point at the index.
        let (_, repository, registry) = self.registry_for(&dest)?;
        let bytes = bytes::Bytes::from(self.store.read_descriptor(&desc)?);
        let (reported, _) = self
            .runtime
            .block_on(registry.put_manifest(&repository, &dest.tag, desc.kind(), bytes))
            .with_context(|| format!("cannot push {dest}"))?;
        if let Some(reported) = reported
            && reported != desc.digest().to_string()
        {
            bail!(
                "{}: the registry stored the index {dest} as {reported}, not {}",
                registry.host,
                desc.digest()
            );
        }
        Ok(report)
    }

    /// The registry host (as its credentials are keyed), the repository and the connection
    /// for `dest`, connected once per host.
    fn registry_for(&mut self, dest: &Reference) -> Result<(String, String, Arc<Registry>)> {
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
        Ok((host, repository, registry))
    }

    /// Push one image (a manifest, its blobs, and its referrers) as `tag` (a tag, or the
    /// manifest's digest) to where `dest` names.
    fn push_image(
        &mut self,
        dest: &Reference,
        image: &StoredImage,
        tag: &str,
    ) -> Result<PushReport> {
        let (host, repository, registry) = self.registry_for(dest)?;
        let job = ImagePush {
            registry: &registry,
            store: &self.store,
            opts: &self.opts,
            image,
            repository: &repository,
            tag,
            sources: mount_sources(&self.store, &host, &repository, image)?,
            bars: self.bars.as_ref(),
            sent: Arc::new(AtomicU64::new(0)),
        };
        let mut counts = self
            .runtime
            .block_on(job.run())
            .with_context(|| format!("cannot push {dest}"))?;
        let mut bytes_sent = job.sent.load(Ordering::Relaxed);
        let mut referrers = Vec::new();
        let manifest_digest = image.manifest.blob()?;
        for artifact in self.store.referrers(&manifest_digest, None)? {
            let what = || format!("cannot push the referrer {} of {dest}", artifact.digest());
            let manifest = self.store.read_manifest(&artifact).with_context(what)?;
            let stored = StoredImage {
                reference: format!("{dest}@{}", artifact.digest()),
                manifest: artifact.clone(),
                config: manifest.config().clone(),
                layers: manifest.layers().clone(),
            };
            let tag = artifact.digest().to_string();
            let job = ImagePush {
                image: &stored,
                tag: &tag,
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
                    .block_on(registry.has_referrers_api(&repository, &manifest_digest))
                    .with_context(what)?;
            if !api {
                self.runtime
                    .block_on(registry.add_to_referrers_tag(
                        &repository,
                        &manifest_digest,
                        &artifact,
                    ))
                    .with_context(what)?;
            }
            referrers.push(Referrer {
                digest: artifact.blob().with_context(what)?,
                artifact_type: artifact.artifact_type().as_ref().map(|t| t.to_string()),
                by_api: api,
            });
        }
        Ok(PushReport {
            reference: dest.to_string(),
            digest: manifest_digest,
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
    for entry in store.read_index()?.manifests() {
        let Some(r) = entry.ref_name().and_then(|n| n.parse::<Reference>().ok()) else {
            continue;
        };
        let r_host = r.registry.as_deref().unwrap_or("docker.io");
        if auth_host(r_host) != host || r.repository == repository {
            continue;
        }
        let Ok(manifest) = store.read_manifest(entry) else {
            continue;
        };
        for d in std::iter::once(manifest.config()).chain(manifest.layers()) {
            let Ok(digest) = d.blob() else { continue };
            let list = holders.entry(digest).or_default();
            if !list.contains(&r.repository) {
                list.push(r.repository.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    for blob in image.layers.iter().chain(std::iter::once(&image.config)) {
        let digest = blob.blob()?;
        let mut list = holders.get(&digest).cloned().unwrap_or_default();
        for o in &others {
            if !list.contains(o) {
                list.push(o.clone());
            }
        }
        out.insert(digest, list);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::client::*;
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
