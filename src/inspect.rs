//! `gentoo-mkimg inspect`: what an image is and what it holds — its platform, its layers, and
//! the packages of its own `/var/db/pkg` (CAT/PF, SLOT, USE, LICENSE, SIZE, repository).
//!
//! The image comes from the store or, with `--remote`, from a registry (see
//! [`crate::publish::pull`]). Its layers are read as tar streams, lowest first, and never
//! extracted: of each entry only the path is looked at, and of the vdb only the five small
//! files above are kept. OCI whiteouts (`.wh.NAME`, `.wh..wh..opq`) hide what lower layers
//! put there, and a later layer's files override an earlier layer's. This module does not
//! look inside `CONTENTS` or check anything (that is [`crate::audit`]).

use std::fmt::Write as _;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::image::index::{is_index, pick};
use crate::image::store::{Descriptor, DescriptorExt, Store};
use crate::portage::vdb::{Installed, Vdb};
use crate::progress::human_size;
use crate::publish::pull::Puller;

/// The vdb files reported, as named in `/var/db/pkg/CAT/PF/`.
const KEYS: [&str; 5] = ["SLOT", "USE", "LICENSE", "SIZE", "repository"];

/// What `inspect` reports. The JSON field names are stable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Inspection {
    /// The reference as given (normalised: a missing tag is `latest`).
    pub reference: String,
    /// `store` or `registry`.
    pub source: String,
    /// Digest of the image manifest (for a registry index, the platform's manifest).
    pub digest: String,
    pub platform: Platform,
    /// When the name is an image index (in the store or the registry): the index's digest
    /// and the platforms of its entries; the rest of the report is about the entry of
    /// `platform`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<IndexInfo>,
    pub layers: Vec<Layer>,
    /// Sorted by `package`.
    pub packages: Vec<Package>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// The image index a name is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IndexInfo {
    pub digest: String,
    pub platforms: Vec<Platform>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Layer {
    pub digest: String,
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// Bytes of the blob (compressed).
    pub size: u64,
}

/// One installed package; a field is `None` when the package has no such file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Package {
    /// `CAT/PF`, e.g. `sys-apps/sed-4.9`.
    pub package: String,
    pub slot: Option<String>,
    /// The `USE` file: the flags the package was built with, space-separated.
    #[serde(rename = "use")]
    pub use_flags: Option<String>,
    pub license: Option<String>,
    /// The `SIZE` file: bytes the package installed.
    pub size: Option<u64>,
    pub repository: Option<String>,
}

impl From<&crate::image::oci::Platform> for Platform {
    fn from(p: &crate::image::oci::Platform) -> Self {
        Platform {
            os: p.os().to_string(),
            architecture: p.architecture().to_string(),
            variant: p.variant().clone(),
        }
    }
}

/// The platform an image config names.
pub fn platform_of_config(bytes: &[u8]) -> Result<Platform> {
    Ok(Platform::from(&crate::image::oci::config_platform(bytes)?))
}

/// Inspect the image tagged `reference` in `store`; when the name is an image index, its
/// entry for `platform` (`None`: the host's architecture).
pub fn inspect_store(
    store: &Store,
    reference: &str,
    platform: Option<&crate::image::config::Platform>,
) -> Result<Inspection> {
    let reference = reference
        .parse::<crate::image::reference::Reference>()?
        .to_string();
    let image = || format!("image {reference}");
    let mut manifest_desc = store.resolve(&reference)?;
    let mut index = None;
    if is_index(&manifest_desc) {
        let platforms = crate::image::index::platforms(store, &manifest_desc)?
            .iter()
            .map(Platform::from)
            .collect();
        index = Some(IndexInfo {
            digest: manifest_desc.digest().to_string(),
            platforms,
        });
        manifest_desc = pick(store, &reference, &manifest_desc, platform)?;
    }
    let manifest = store.read_manifest(&manifest_desc).with_context(image)?;
    let config = store
        .read_descriptor(manifest.config())
        .with_context(image)?;
    let platform = platform_of_config(&config)
        .with_context(|| format!("image {reference}: config {}", manifest.config().digest()))?;
    let installed = installed_in_store(store, &reference, manifest.layers(), &KEYS)?;
    Ok(Inspection {
        reference,
        source: "store".to_string(),
        digest: manifest_desc.digest().to_string(),
        platform,
        index,
        layers: layer_rows(manifest.layers()),
        packages: packages(&installed),
    })
}

/// The installed packages (with `keys`) of the image `name` in `store` whose layers are
/// `layers`: its own `/var/db/pkg`, without extracting the image.
pub(crate) fn installed_in_store(
    store: &Store,
    name: &str,
    layers: &[Descriptor],
    keys: &'static [&'static str],
) -> Result<Vec<Installed>> {
    installed_in_layers(name, layers, keys, |layer| store.open_blob(layer))
}

/// The installed packages (with `keys`) of the image `name` whose layers are `layers`, each
/// blob opened by `open`, read in order.
fn installed_in_layers<R: std::io::Read + Send + 'static>(
    name: &str,
    layers: &[Descriptor],
    keys: &'static [&'static str],
    mut open: impl FnMut(&Descriptor) -> Result<R>,
) -> Result<Vec<Installed>> {
    let mut vdb = Vdb::new(keys);
    for (i, layer) in layers.iter().enumerate() {
        let what = || {
            format!(
                "image {name}: layer {} of {} ({})",
                i + 1,
                layers.len(),
                layer.digest()
            )
        };
        let blob = open(layer).with_context(what)?;
        vdb.apply_layer(
            crate::image::layer::open_stream(layer.kind(), blob).with_context(what)?,
            i,
        )
        .with_context(what)?;
    }
    Ok(vdb.installed())
}

/// Inspect the image `reference` in its registry, streaming the layers; when the tag names an
/// index, its entry for `platform` (`None`: the host's architecture).
pub fn inspect_remote(
    puller: &mut Puller,
    reference: &str,
    platform: Option<&crate::image::config::Platform>,
) -> Result<Inspection> {
    let image = puller.manifest(reference, platform)?;
    let name = image.reference.clone();
    let config = puller.read_small(&image, image.manifest.config())?;
    let platform = platform_of_config(&config)
        .with_context(|| format!("image {name}: config {}", image.manifest.config().digest()))?;
    let layers = image.manifest.layers();
    let installed = installed_in_layers(&name, layers, &KEYS, |layer| {
        puller.open_blob(&image, layer)
    })?;
    Ok(Inspection {
        reference: name,
        source: "registry".to_string(),
        digest: image.digest.to_string(),
        platform,
        index: image.index.as_ref().map(|(digest, platforms)| IndexInfo {
            digest: digest.to_string(),
            platforms: platforms.iter().map(Platform::from).collect(),
        }),
        layers: layer_rows(layers),
        packages: packages(&installed),
    })
}

/// The layer rows of a manifest's layer descriptors.
pub fn layer_rows(layers: &[Descriptor]) -> Vec<Layer> {
    layers
        .iter()
        .map(|l| Layer {
            digest: l.digest().to_string(),
            media_type: l.kind().to_string(),
            size: l.size(),
        })
        .collect()
}

/// The report's rows of `installed`, in its order.
fn packages(installed: &[Installed]) -> Vec<Package> {
    installed
        .iter()
        .map(|p| {
            let size = p.text("SIZE").and_then(|s| match s.parse::<u64>() {
                Ok(n) => Some(n),
                Err(_) => {
                    tracing::warn!("{}: SIZE {s:?} is not a number of bytes", p.package);
                    None
                }
            });
            Package {
                package: p.package.clone(),
                slot: p.text("SLOT"),
                use_flags: p.text("USE"),
                license: p.text("LICENSE"),
                size,
                repository: p.text("repository"),
            }
        })
        .collect()
}

impl Inspection {
    /// The human-readable report: a header, the layers, then one line per package (USE
    /// last, as it is the longest).
    pub fn render_table(&self) -> String {
        let mut out = String::new();
        let total: u64 = self.layers.iter().map(|l| l.size).sum();
        let _ = writeln!(out, "Image:     {} ({})", self.reference, self.source);
        let _ = writeln!(out, "Digest:    {}", self.digest);
        let _ = writeln!(out, "Platform:  {}", self.platform);
        if let Some(index) = &self.index {
            let platforms: Vec<String> = index.platforms.iter().map(|p| p.to_string()).collect();
            let _ = writeln!(
                out,
                "Index:     {} ({})",
                index.digest,
                platforms.join(", ")
            );
        }
        let _ = writeln!(
            out,
            "Layers:    {} ({})",
            self.layers.len(),
            human_size(total)
        );
        let media_w = self
            .layers
            .iter()
            .map(|l| l.media_type.len())
            .max()
            .unwrap_or(0)
            .max("MEDIA TYPE".len());
        let _ = writeln!(
            out,
            "  {:71}  {:media_w$}  {:>10}",
            "DIGEST", "MEDIA TYPE", "SIZE"
        );
        for l in &self.layers {
            let _ = writeln!(
                out,
                "  {:71}  {:media_w$}  {:>10}",
                l.digest,
                l.media_type,
                human_size(l.size)
            );
        }
        let _ = writeln!(out, "Packages:  {}", self.packages.len());
        let dash = |v: &Option<String>| match v.as_deref() {
            None | Some("") => "-".to_string(),
            Some(s) => s.to_string(),
        };
        let rows: Vec<[String; 6]> = self
            .packages
            .iter()
            .map(|p| {
                [
                    p.package.clone(),
                    dash(&p.slot),
                    dash(&p.repository),
                    p.size.map_or_else(|| "-".to_string(), human_size),
                    dash(&p.license),
                    dash(&p.use_flags),
                ]
            })
            .collect();
        let header = ["PACKAGE", "SLOT", "REPOSITORY", "SIZE", "LICENSE", "USE"];
        let mut widths = header.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: [&str; 6]| {
            let [w0, w1, w2, w3, w4, _] = widths;
            format!(
                "{:w0$}  {:w1$}  {:w2$}  {:>w3$}  {:w4$}  {}",
                cells[0], cells[1], cells[2], cells[3], cells[4], cells[5]
            )
            .trim_end()
            .to_string()
        };
        let _ = writeln!(out, "{}", line(header));
        for row in &rows {
            let _ = writeln!(out, "{}", line(row.each_ref().map(String::as_str)));
        }
        out
    }

    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).context("cannot write the report as JSON")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lists_every_package() {
        let i = Inspection {
            reference: "localhost/x:1".into(),
            source: "store".into(),
            digest: "sha256:00".into(),
            platform: Platform {
                os: "linux".into(),
                architecture: "amd64".into(),
                variant: None,
            },
            index: None,
            layers: vec![],
            packages: vec![Package {
                package: "a/b-1".into(),
                slot: Some("0".into()),
                use_flags: None,
                license: Some("MIT".into()),
                size: Some(2048),
                repository: Some("gentoo".into()),
            }],
        };
        let t = i.render_table();
        assert!(t.contains("Platform:  linux/amd64"), "{t}");
        let row = t.lines().last().unwrap();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells, ["a/b-1", "0", "gentoo", "2.0", "KiB", "MIT", "-"]);
    }
}
