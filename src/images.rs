//! `gentoo-mkimg images`: what the store holds.

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::image::index::{is_index, read_index};
use crate::image::oci::{config_platform, platform_text};
use crate::image::store::{Descriptor, DescriptorExt, Digest, Store};

/// One line of the listing.
#[derive(Debug, Clone)]
pub struct ImageRow {
    pub reference: String,
    pub digest: Digest,
    /// Config plus compressed layers, in bytes (of every platform, for an index).
    pub size: u64,
    pub created: String,
    /// `linux/ARCH[/VARIANT]` of the image, or of each entry of an index.
    pub platforms: Vec<String>,
}

#[derive(Deserialize)]
struct CreatedOnly {
    #[serde(default)]
    created: String,
}

/// One image's size, creation time and platform.
fn image_row(store: &Store, desc: &Descriptor, reference: &str) -> Result<(u64, String, String)> {
    let manifest = store
        .read_manifest(desc)
        .with_context(|| format!("image {reference}"))?;
    let config = store
        .read_descriptor(manifest.config())
        .with_context(|| format!("image {reference}"))?;
    let created: CreatedOnly = serde_json::from_slice(&config)
        .with_context(|| format!("image {reference}: config is not valid JSON"))?;
    let platform = match config_platform(&config) {
        Ok(p) => platform_text(&p),
        Err(_) => "-".to_string(),
    };
    let size = manifest.config().size() + manifest.layers().iter().map(|l| l.size()).sum::<u64>();
    Ok((size, created.created, platform))
}

/// Every tagged image in the store, in index order; an image index is one row with the
/// platforms of its entries.
pub fn list(store: &Store) -> Result<Vec<ImageRow>> {
    let index = store.read_index()?;
    let mut rows = Vec::new();
    for desc in index.manifests() {
        let Some(reference) = desc.ref_name().map(str::to_string) else {
            continue;
        };
        let (size, created, platforms) = if is_index(desc) {
            let entries = read_index(store, desc).with_context(|| format!("image {reference}"))?;
            let mut size = 0;
            let mut created = String::new();
            let mut platforms = Vec::new();
            for entry in entries.manifests() {
                if is_index(entry) {
                    continue;
                }
                let (s, c, p) = image_row(store, entry, &reference)?;
                size += s;
                created = created.max(c);
                platforms.push(p);
            }
            (size, created, platforms)
        } else {
            let (size, created, platform) = image_row(store, desc, &reference)?;
            (size, created, vec![platform])
        };
        rows.push(ImageRow {
            reference,
            digest: desc.blob()?,
            size,
            created,
            platforms,
        });
    }
    Ok(rows)
}
