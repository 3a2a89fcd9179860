//! `gentoo-mkimg images`: what the store holds.

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::image::store::{DescriptorExt, Digest, Store};

/// One line of the listing.
#[derive(Debug, Clone)]
pub struct ImageRow {
    pub reference: String,
    pub digest: Digest,
    /// Config plus compressed layers, in bytes.
    pub size: u64,
    pub created: String,
}

#[derive(Deserialize)]
struct CreatedOnly {
    #[serde(default)]
    created: String,
}

/// Every tagged image in the store, in index order.
pub fn list(store: &Store) -> Result<Vec<ImageRow>> {
    let index = store.read_index()?;
    let mut rows = Vec::new();
    for desc in index.manifests() {
        let Some(reference) = desc.ref_name().map(str::to_string) else {
            continue;
        };
        let manifest = store
            .read_manifest(desc)
            .with_context(|| format!("image {reference}"))?;
        let config = store
            .read_descriptor(manifest.config())
            .with_context(|| format!("image {reference}"))?;
        let config: CreatedOnly = serde_json::from_slice(&config)
            .with_context(|| format!("image {reference}: config is not valid JSON"))?;
        rows.push(ImageRow {
            reference,
            digest: desc.blob()?,
            size: manifest.config().size()
                + manifest.layers().iter().map(|l| l.size()).sum::<u64>(),
            created: config.created,
        });
    }
    Ok(rows)
}
