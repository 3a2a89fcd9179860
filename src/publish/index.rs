//! `gentoo-mkimg index`: one multi-platform image index made of images already in a registry.
//!
//! Each architecture can be built on its own machine (a CI matrix, one Kubernetes Job per
//! architecture) and pushed under its own tag; `index TARGET SOURCE...` then joins them: it
//! reads each source's manifest and config (for its platform), and puts one OCI image index
//! naming every source manifest, with its platform, under TARGET. A source that is itself an
//! index adds all its entries. Sources must be on TARGET's registry; a source in another
//! repository has its blobs mounted into TARGET's and its manifest put there by digest, so
//! the index never names content its repository lacks. Two sources of the same platform are
//! an error, and nothing is tagged then.

use std::fmt;

use anyhow::{Context, Result, bail};
use bytes::Bytes;

use crate::image::oci::{
    Descriptor, DescriptorExt, ImageIndex, ImageManifest, MediaType, config_platform, descriptor,
    platform_text, to_json,
};
use crate::image::reference::Reference;
use crate::image::store::{Digest, INDEX_MEDIA_TYPE, MANIFEST_MEDIA_TYPE};
use crate::publish::pull::{CONFIG_MAX, get_blob, get_manifest, index_entries, locate};
use crate::publish::registry::{PushOptions, Registry, read_limited, runtime_and_clients};

/// What `index` put where.
#[derive(Debug, Clone)]
pub struct IndexReport {
    /// The target, as given.
    pub reference: String,
    /// The index's digest.
    pub digest: Digest,
    /// One row per entry: its platform, its manifest digest and the source it came from.
    pub entries: Vec<(String, String, String)>,
}

impl fmt::Display for IndexReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: index of {} images",
            self.reference,
            self.entries.len()
        )?;
        for (platform, digest, source) in &self.entries {
            write!(f, "\n  {platform:<16} {digest}  ({source})")?;
        }
        Ok(())
    }
}

/// Put an image index under `target` naming the image manifests `sources` resolve to, each
/// with the platform its config names.
pub fn assemble(target: &str, sources: &[String], opts: &PushOptions) -> Result<IndexReport> {
    if sources.is_empty() {
        bail!("index {target}: name at least one source image");
    }
    let dest: Reference = target.parse()?;
    let (host, repo) = locate(&dest);
    let mut from = Vec::new();
    for source in sources {
        let r: Reference = source.parse()?;
        let (h, rp) = locate(&r);
        if h != host {
            bail!(
                "{source}: it is on {h}, not on {host} where {target} goes; push it to {host} \
                 first"
            );
        }
        from.push((source.clone(), r, rp));
    }
    let (runtime, secure, insecure) = runtime_and_clients(opts)?;
    runtime.block_on(async {
        let registry = Registry::connect(&host, opts, &secure, &insecure).await?;
        let others: Vec<String> = from
            .iter()
            .map(|(_, _, rp)| rp.clone())
            .filter(|rp| *rp != repo)
            .collect();
        registry.set_scopes(&repo, &others);
        let mut entries: Vec<(String, Descriptor)> = Vec::new();
        for (source, r, source_repo) in &from {
            for entry in source_entries(&registry, source, r, source_repo, &repo).await? {
                let platform = entry.platform().as_ref().map(platform_text);
                if let Some((other, _)) = entries
                    .iter()
                    .find(|(_, d)| d.platform().as_ref().map(platform_text) == platform)
                {
                    bail!(
                        "index {target}: {other} and {source} are both {}; nothing was tagged",
                        platform.unwrap_or_default()
                    );
                }
                entries.push((source.clone(), entry));
            }
        }
        let mut index = ImageIndex::default();
        index.set_media_type(Some(MediaType::ImageIndex));
        index.set_manifests(entries.iter().map(|(_, d)| d.clone()).collect());
        let bytes = to_json(&index)?;
        let digest = Digest::of(&bytes);
        let (reported, _) = registry
            .put_manifest(&repo, &dest.tag, INDEX_MEDIA_TYPE, Bytes::from(bytes))
            .await
            .with_context(|| format!("index {target}"))?;
        if let Some(reported) = reported
            && reported != digest.as_str()
        {
            bail!("index {target}: the registry stored it as {reported}, not {digest}");
        }
        Ok(IndexReport {
            reference: target.to_string(),
            digest,
            entries: entries
                .iter()
                .map(|(source, d)| {
                    let platform = d.platform().as_ref().map(platform_text);
                    (
                        platform.unwrap_or_default(),
                        d.digest().to_string(),
                        source.clone(),
                    )
                })
                .collect(),
        })
    })
}

/// The index entries `source` gives: its manifest with the platform of its config, or the
/// entries of its index. Their manifests end up in `repo`.
async fn source_entries(
    registry: &Registry,
    source: &str,
    r: &Reference,
    source_repo: &str,
    repo: &str,
) -> Result<Vec<Descriptor>> {
    let (bytes, digest) = get_manifest(registry, source_repo, &r.tag, None)
        .await
        .with_context(|| format!("source {source}"))?;
    if let Some(children) = index_entries(&bytes).with_context(|| format!("source {source}"))? {
        for child in &children {
            if child.platform().is_none() {
                bail!(
                    "source {source}: the entry {} of its index names no platform",
                    child.digest()
                );
            }
            if source_repo != repo {
                let child_digest = child.blob().with_context(|| format!("source {source}"))?;
                let (bytes, _) = get_manifest(
                    registry,
                    source_repo,
                    child_digest.as_str(),
                    Some(&child_digest),
                )
                .await
                .with_context(|| format!("source {source}"))?;
                copy_manifest(registry, source, source_repo, repo, &bytes, child.kind()).await?;
            }
        }
        return Ok(children);
    }
    let manifest: ImageManifest = serde_json::from_slice(&bytes)
        .with_context(|| format!("source {source}: {digest} is not an image manifest"))?;
    let config = read_config(registry, source_repo, manifest.config())
        .await
        .with_context(|| format!("source {source}"))?;
    let platform = config_platform(&config)
        .with_context(|| format!("source {source}: its config {}", manifest.config().digest()))?;
    let media_type = manifest
        .media_type()
        .as_ref()
        .map_or(MANIFEST_MEDIA_TYPE.to_string(), |m| m.to_string());
    if source_repo != repo {
        copy_manifest(registry, source, source_repo, repo, &bytes, &media_type).await?;
    }
    let mut entry = descriptor(&media_type, &digest, bytes.len() as u64);
    entry.set_platform(Some(platform));
    Ok(vec![entry])
}

/// Make the image manifest `bytes` of `source_repo` one of `repo`'s too: its blobs mounted,
/// then the manifest put by digest.
async fn copy_manifest(
    registry: &Registry,
    source: &str,
    source_repo: &str,
    repo: &str,
    bytes: &[u8],
    media_type: &str,
) -> Result<()> {
    let manifest: ImageManifest = serde_json::from_slice(bytes)
        .with_context(|| format!("source {source}: not an image manifest"))?;
    for blob in std::iter::once(manifest.config()).chain(manifest.layers()) {
        let digest = blob.blob().with_context(|| format!("source {source}"))?;
        if registry.has_blob(repo, &digest).await? {
            continue;
        }
        if let Some(session) = registry
            .start_upload(repo, &digest, Some(source_repo))
            .await?
        {
            registry.cancel_upload(repo, session).await;
            bail!(
                "source {source}: {} would not mount {digest} from {source_repo} into {repo}; \
                 push the source into {repo} instead",
                registry.host
            );
        }
    }
    let digest = Digest::of(bytes);
    registry
        .put_manifest(
            repo,
            digest.as_str(),
            media_type,
            Bytes::copy_from_slice(bytes),
        )
        .await
        .with_context(|| format!("source {source}: cannot copy its manifest into {repo}"))?;
    Ok(())
}

/// The image config `desc` names, checked against its digest.
async fn read_config(registry: &Registry, repo: &str, desc: &Descriptor) -> Result<Vec<u8>> {
    if desc.size() > CONFIG_MAX {
        bail!(
            "the config {} is {} bytes, too large",
            desc.digest(),
            desc.size()
        );
    }
    let want = desc.blob()?;
    let resp = get_blob(registry, repo, &want).await?;
    let bytes = read_limited(resp, CONFIG_MAX as usize, registry.stall)
        .await
        .with_context(|| format!("{}: GET blob {want}", registry.host))?;
    let found = Digest::of(&bytes);
    if found != want {
        bail!("{}: GET blob {want}: its digest is {found}", registry.host);
    }
    Ok(bytes)
}
