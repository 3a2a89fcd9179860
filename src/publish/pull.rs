//! Reading images from a registry (OCI distribution API), for `inspect --remote`: the
//! manifest (an index resolved to this host's platform), the config, and layer blobs as
//! streams whose digest is checked as they are read.
//!
//! Connections, authentication (a `pull` token scope only), TLS and retries are those of
//! [`registry`](super::registry)'s push; this module only formats the read requests. It
//! does not write anything to the store.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::registry::{
    PushOptions, Registry, auth_host, body_text, content_digest, runtime_and_clients,
};
use crate::image::index::choose;
use crate::image::oci::Platform;
use crate::image::reference::Reference;
use crate::image::store::{
    Descriptor, DescriptorExt, Digest, INDEX_MEDIA_TYPE, ImageManifest, MANIFEST_MEDIA_TYPE,
};

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Manifests and indexes larger than this are refused (the registry's own limit is 4 MiB).
const MANIFEST_MAX: usize = 4 << 20;
/// Image configs larger than this are refused.
pub(super) const CONFIG_MAX: u64 = 16 << 20;

/// An image manifest read from a registry.
#[derive(Debug, Clone)]
pub struct RemoteImage {
    /// `HOST/REPOSITORY:TAG` as given.
    pub reference: String,
    /// The registry host as credentials are filed (`docker.io` for Docker Hub).
    pub host: String,
    pub repository: String,
    /// Digest of the image manifest (the platform's, when the tag names an index).
    pub digest: Digest,
    pub manifest: ImageManifest,
    /// When the tag names an index: its digest and the platforms of its entries.
    pub index: Option<(Digest, Vec<Platform>)>,
}

#[derive(Deserialize)]
struct IndexOnly {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

/// Reads images from registries; keeps connections and tokens between requests.
pub struct Puller {
    opts: PushOptions,
    runtime: Arc<tokio::runtime::Runtime>,
    secure: reqwest::Client,
    insecure: reqwest::Client,
    registries: BTreeMap<String, Arc<Registry>>,
}

impl Puller {
    /// `opts`: the insecure hosts, timeouts and retries (as for push).
    pub fn new(opts: PushOptions) -> Result<Self> {
        let (runtime, secure, insecure) = runtime_and_clients(&opts)?;
        Ok(Puller {
            opts,
            runtime: Arc::new(runtime),
            secure,
            insecure,
            registries: BTreeMap::new(),
        })
    }

    fn registry(&mut self, host: &str) -> Result<Arc<Registry>> {
        if let Some(r) = self.registries.get(host) {
            return Ok(r.clone());
        }
        let r = Arc::new(self.runtime.block_on(Registry::connect(
            host,
            &self.opts,
            &self.secure,
            &self.insecure,
        ))?);
        self.registries.insert(host.to_string(), r.clone());
        Ok(r)
    }

    /// The image manifest `reference` names; an index is resolved to `platform`'s entry (by
    /// default the host's).
    pub fn manifest(
        &mut self,
        reference: &str,
        platform: Option<&crate::image::config::Platform>,
    ) -> Result<RemoteImage> {
        let dest: Reference = reference.parse()?;
        let (host, repository) = locate(&dest);
        let registry = self.registry(&host)?;
        registry.set_pull_scope(&repository);
        let what = dest.to_string();
        let (bytes, digest) = self
            .runtime
            .block_on(get_manifest(&registry, &repository, &dest.tag, None))
            .with_context(|| format!("image {what}"))?;
        let mut index = None;
        let (bytes, digest) = match index_entries(&bytes)? {
            None => (bytes, digest),
            Some(entries) => {
                let chosen = choose(&entries, &format!("image {what}"), platform)
                    .with_context(|| format!("the index {digest}"))?;
                let child = chosen
                    .blob()
                    .with_context(|| format!("image {what}: the index {digest}"))?;
                let platforms = entries
                    .iter()
                    .filter_map(|d| d.platform().clone())
                    .collect();
                index = Some((digest, platforms));
                self.runtime
                    .block_on(get_manifest(
                        &registry,
                        &repository,
                        child.as_str(),
                        Some(&child),
                    ))
                    .with_context(|| format!("image {what}: manifest {child} of the index"))?
            }
        };
        let manifest: ImageManifest = serde_json::from_slice(&bytes)
            .with_context(|| format!("image {what}: manifest {digest} is not an image manifest"))?;
        Ok(RemoteImage {
            reference: what,
            host,
            repository,
            digest,
            manifest,
            index,
        })
    }

    /// The whole (small) blob `desc` names, checked against its digest and size.
    pub fn read_small(&mut self, image: &RemoteImage, desc: &Descriptor) -> Result<Vec<u8>> {
        if desc.size() > CONFIG_MAX {
            bail!(
                "image {}: blob {} is {} bytes, more than the {CONFIG_MAX} expected",
                image.reference,
                desc.digest(),
                desc.size()
            );
        }
        let mut bytes = Vec::with_capacity(desc.size() as usize);
        self.open_blob(image, desc)?
            .read_to_end(&mut bytes)
            .with_context(|| format!("image {}: blob {}", image.reference, desc.digest()))?;
        Ok(bytes)
    }

    /// A stream of the blob `desc` names, failing at its end if the digest or the size is
    /// not the descriptor's (and as soon as it is longer).
    pub fn open_blob(
        &mut self,
        image: &RemoteImage,
        desc: &Descriptor,
    ) -> Result<Box<dyn Read + Send>> {
        let registry = self.registry(&image.host)?;
        let repo = image.repository.clone();
        let resp = self
            .runtime
            .block_on(get_blob(&registry, &repo, &desc.blob()?))?;
        Ok(Box::new(CheckedBody::new(
            Body {
                runtime: self.runtime.clone(),
                resp,
                chunk: Bytes::new(),
                stall: registry.stall,
            },
            format!("{}/{repo}: blob {}", registry.host, desc.digest()),
            desc.blob()?,
            desc.size(),
        )))
    }
}

/// `GET /v2/REPO/blobs/DIGEST`: the answer, once it is a success.
pub(super) async fn get_blob(
    registry: &Registry,
    repo: &str,
    digest: &Digest,
) -> Result<reqwest::Response> {
    let url = registry.url(&format!("v2/{repo}/blobs/{digest}"))?;
    let what = format!("GET blob {digest}");
    let resp = registry
        .send(Some(repo), &what, true, || {
            Ok(registry.client.get(url.clone()))
        })
        .await?;
    if !resp.status().is_success() {
        bail!(
            "{}: {what} in {repo}: {}",
            registry.host,
            body_text(resp, registry.stall).await
        );
    }
    Ok(resp)
}

/// The registry host (as credentials are filed: `docker.io` for Docker Hub) and the
/// repository a reference names (`library/NAME` for Docker Hub's one-part names).
pub(super) fn locate(reference: &Reference) -> (String, String) {
    let host = reference.registry.as_deref().unwrap_or("docker.io");
    let host = auth_host(host).to_string();
    let repository = if host == "docker.io" && !reference.repository.contains('/') {
        format!("library/{}", reference.repository)
    } else {
        reference.repository.clone()
    };
    (host, repository)
}

/// `GET /v2/REPO/manifests/REF`: the bytes and their digest (checked against `want`, and
/// against the registry's `Docker-Content-Digest` when it sends one).
pub(super) async fn get_manifest(
    registry: &Registry,
    repo: &str,
    reference: &str,
    want: Option<&Digest>,
) -> Result<(Vec<u8>, Digest)> {
    let url = registry.url(&format!("v2/{repo}/manifests/{reference}"))?;
    let what = format!("GET manifest {repo}:{reference}");
    let accept = [
        MANIFEST_MEDIA_TYPE,
        INDEX_MEDIA_TYPE,
        DOCKER_MANIFEST,
        DOCKER_LIST,
    ]
    .join(", ");
    let resp = registry
        .send(Some(repo), &what, true, || {
            Ok(registry
                .client
                .get(url.clone())
                .header(header::ACCEPT, accept.as_str()))
        })
        .await?;
    match resp.status() {
        s if s.is_success() => {}
        StatusCode::NOT_FOUND => bail!(
            "{}: {what}: not found ({})",
            registry.host,
            body_text(resp, registry.stall).await
        ),
        _ => bail!(
            "{}: {what}: {}",
            registry.host,
            body_text(resp, registry.stall).await
        ),
    }
    let said = content_digest(&resp);
    let mut resp = resp;
    let mut bytes = Vec::new();
    loop {
        let chunk = tokio::time::timeout(registry.stall, resp.chunk())
            .await
            .map_err(|_| anyhow!("{}: {what}: the answer stalled", registry.host))?
            .map_err(|e| anyhow!("{}: {what}: {}", registry.host, crate::net::describe(&e)))?;
        let Some(chunk) = chunk else { break };
        bytes.extend_from_slice(&chunk);
        if bytes.len() > MANIFEST_MAX {
            bail!(
                "{}: {what}: larger than {MANIFEST_MAX} bytes",
                registry.host
            );
        }
    }
    let digest = Digest::of(&bytes);
    let expected = match want {
        Some(d) => Some(d.to_string()),
        // Only a sha256 digest can be compared with ours.
        None => said.filter(|d| d.starts_with("sha256:")),
    };
    if let Some(expected) = expected
        && expected != digest.as_str()
    {
        bail!(
            "{}: {what}: the manifest's digest is {digest}, expected {expected}",
            registry.host
        );
    }
    Ok((bytes, digest))
}

/// The entries of an image index (OCI or Docker list), or `None` for anything else.
pub(super) fn index_entries(bytes: &[u8]) -> Result<Option<Vec<Descriptor>>> {
    let parsed: IndexOnly =
        serde_json::from_slice(bytes).context("the manifest is not valid JSON")?;
    let is_index = matches!(
        parsed.media_type.as_deref(),
        Some(INDEX_MEDIA_TYPE | DOCKER_LIST)
    ) || (parsed.media_type.is_none() && parsed.manifests.is_some());
    Ok(if is_index {
        Some(parsed.manifests.unwrap_or_default())
    } else {
        None
    })
}

/// An answer's body as a blocking reader, driven on the puller's runtime.
struct Body {
    runtime: Arc<tokio::runtime::Runtime>,
    resp: reqwest::Response,
    chunk: Bytes,
    stall: std::time::Duration,
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            let (stall, resp) = (self.stall, &mut self.resp);
            let next = self
                .runtime
                .block_on(async move { tokio::time::timeout(stall, resp.chunk()).await });
            match next {
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no data for {} s", self.stall.as_secs_f64()),
                    ));
                }
                Ok(Err(e)) => return Err(io::Error::other(crate::net::describe(&e))),
                Ok(Ok(None)) => return Ok(0),
                Ok(Ok(Some(chunk))) => self.chunk = chunk,
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        let _ = self.chunk.split_to(n);
        Ok(n)
    }
}

/// Checks a blob's size and digest as it streams.
struct CheckedBody<R> {
    body: R,
    what: String,
    digest: Digest,
    size: u64,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> CheckedBody<R> {
    fn new(body: R, what: String, digest: Digest, size: u64) -> Self {
        CheckedBody {
            body,
            what,
            digest,
            size,
            hasher: Sha256::new(),
            count: 0,
        }
    }
}

impl<R: Read> Read for CheckedBody<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self
            .body
            .read(buf)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.what)))?;
        self.count += n as u64;
        if self.count > self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: longer than the {} bytes expected",
                    self.what, self.size
                ),
            ));
        }
        self.hasher.update(&buf[..n]);
        if n == 0 || self.count == self.size {
            if self.count < self.size {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "{}: ends after {} of {} bytes",
                        self.what, self.count, self.size
                    ),
                ));
            }
            let found = Digest::from_sha256(self.hasher.clone().finalize().as_slice());
            if found != self.digest {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: the content's digest is {found}", self.what),
                ));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_are_told_from_manifests_and_resolved_by_platform() {
        let index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json",
            "manifests":[
              {"mediaType":"application/vnd.oci.image.manifest.v1+json","size":1,
               "digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111",
               "platform":{"os":"linux","architecture":"arm64"}},
              {"mediaType":"application/vnd.oci.image.manifest.v1+json","size":1,
               "digest":"sha256:2222222222222222222222222222222222222222222222222222222222222222",
               "platform":{"os":"linux","architecture":"amd64"}}]}"#;
        let entries = index_entries(index).unwrap().unwrap();
        let want = |arch: &str| crate::image::config::Platform {
            architecture: arch.to_string(),
            variant: None,
        };
        let amd = choose(&entries, "i", Some(&want("amd64"))).unwrap();
        assert!(amd.digest().to_string().ends_with("2222"));
        let arm = choose(&entries, "i", Some(&want("arm64"))).unwrap();
        assert!(arm.digest().to_string().ends_with("1111"));
        let err = choose(&entries, "i", Some(&want("s390x"))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "i is an image index of linux/arm64, linux/amd64: none is for linux/s390x"
        );
        let manifest = br#"{"schemaVersion":2,"config":{},"layers":[]}"#;
        assert!(index_entries(manifest).unwrap().is_none());
    }

    #[test]
    fn blobs_are_checked_against_their_digest_and_size() {
        let data = vec![7u8; 100_000];
        let digest = Digest::of(&data);
        let read = |body: &[u8], size: u64| {
            let mut out = Vec::new();
            CheckedBody::new(body, "blob".into(), digest.clone(), size)
                .read_to_end(&mut out)
                .map(|_| out)
        };
        assert_eq!(read(&data, 100_000).unwrap(), data);
        let err = read(&data[..99_999], 100_000).unwrap_err().to_string();
        assert!(err.contains("ends after 99999 of 100000"), "{err}");
        let err = read(&data, 99_999).unwrap_err().to_string();
        assert!(err.contains("longer than"), "{err}");
        let mut other = data.clone();
        other[50_000] = 8;
        let err = read(&other, 100_000).unwrap_err().to_string();
        assert!(err.contains("digest is sha256:"), "{err}");
    }
}
