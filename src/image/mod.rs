//! Making images: layers, config, manifest, and the image store that holds them.

pub mod config;
pub mod gc;
pub mod index;
pub mod layer;
pub mod oci;
pub mod reference;
pub mod store;

use std::collections::BTreeMap;

use anyhow::Result;

use config::ImageSpec;
use layer::LayerInfo;
use store::{Descriptor, Store};

/// A stored, tagged image.
#[derive(Debug, Clone)]
pub struct StoredImage {
    pub reference: String,
    pub manifest: Descriptor,
    pub config: Descriptor,
    /// Layer descriptors, as in the manifest.
    pub layers: Vec<Descriptor>,
}

impl StoredImage {
    /// Bytes of the image as stored: config plus compressed layers.
    pub fn size(&self) -> u64 {
        self.config.size() + self.layers.iter().map(|l| l.size()).sum::<u64>()
    }
}

/// Write an image (config, manifest) for `reference` into `store` without tagging it: the
/// caller tags it with [`Store::tag`] once everything that belongs with it is stored.
pub fn write_image(
    store: &Store,
    reference: &str,
    spec: &ImageSpec,
    layers: &[LayerInfo],
) -> Result<StoredImage> {
    let config_bytes = config::config_json(spec, layers)?;
    let config = store.put_bytes(store::CONFIG_MEDIA_TYPE, &config_bytes)?;
    let mut annotations = BTreeMap::new();
    annotations.insert(
        "org.opencontainers.image.created".to_string(),
        config::rfc3339(spec.created)?,
    );
    let manifest_bytes = config::manifest_json(&config, layers, &annotations)?;
    let manifest = store.put_bytes(store::MANIFEST_MEDIA_TYPE, &manifest_bytes)?;
    Ok(StoredImage {
        reference: reference.to_string(),
        manifest,
        config,
        layers: layers.iter().map(LayerInfo::descriptor).collect(),
    })
}

/// Write the config and manifest for `layers` (already in the store) and tag the result.
pub fn commit_image(
    store: &Store,
    reference: &str,
    spec: &ImageSpec,
    layers: &[LayerInfo],
) -> Result<StoredImage> {
    let image = write_image(store, reference, spec, layers)?;
    store.tag(reference, image.manifest.clone())?;
    Ok(image)
}

/// The image tagged `reference` in `store`; when the name is an image index of several
/// platforms, its entry for the host's architecture.
pub fn open_image(store: &Store, reference: &str) -> Result<StoredImage> {
    open_image_for(store, reference, None)
}

/// The image tagged `reference` in `store`; when the name is an image index, its entry for
/// `platform` (`None`: the host's architecture).
pub fn open_image_for(
    store: &Store,
    reference: &str,
    platform: Option<&config::Platform>,
) -> Result<StoredImage> {
    let mut manifest = store.resolve(reference)?;
    if index::is_index(&manifest) {
        manifest = index::pick(store, reference, &manifest, platform)?;
    }
    let parsed = store.read_manifest(&manifest)?;
    Ok(StoredImage {
        reference: reference.to_string(),
        config: parsed.config().clone(),
        layers: parsed.layers().clone(),
        manifest,
    })
}
