//! `gentoo-mkimg inspect`: what an image is and what it holds — its platform, its layers, and
//! the packages of its own `/var/db/pkg` (CAT/PF, SLOT, USE, LICENSE, SIZE, repository).
//!
//! The image comes from the store or, with `--remote`, from a registry (see
//! [`crate::publish::pull`]). Its layers are read as tar streams, lowest first, and never
//! extracted: of each entry only the path is looked at, and of the vdb only the five small
//! files above are kept. OCI whiteouts (`.wh.NAME`, `.wh..wh..opq`) hide what lower layers
//! put there, and a later layer's files override an earlier layer's. This module does not
//! look inside `CONTENTS` or check anything (that is [`crate::audit`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::archive::entries::walk_layer;
use crate::image::layer::EntryKind;
use crate::image::store::{Descriptor, Store};
use crate::images::human_size;
use crate::publish::pull::Puller;

/// The vdb files reported, as named in `/var/db/pkg/CAT/PF/`.
const KEYS: [&str; 5] = ["SLOT", "USE", "LICENSE", "SIZE", "repository"];
/// The most of one vdb file kept (USE and LICENSE of real packages are far smaller).
const VALUE_MAX: u64 = 1 << 20;

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

/// The parts of an image config read here.
#[derive(Deserialize)]
struct ConfigPlatform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

/// The platform an image config names.
pub fn platform_of_config(bytes: &[u8]) -> Result<Platform> {
    let c: ConfigPlatform =
        serde_json::from_slice(bytes).context("the image config is not valid JSON")?;
    if c.architecture.is_empty() {
        bail!("the image config names no architecture");
    }
    Ok(Platform {
        os: if c.os.is_empty() {
            "linux".to_string()
        } else {
            c.os
        },
        architecture: c.architecture,
        variant: c.variant.filter(|v| !v.is_empty()),
    })
}

/// Inspect the image tagged `reference` in `store`.
pub fn inspect_store(store: &Store, reference: &str) -> Result<Inspection> {
    let reference = reference
        .parse::<crate::image::reference::Reference>()?
        .to_string();
    let image = || format!("image {reference}");
    let manifest_desc = store.resolve(&reference)?;
    let manifest = store.read_manifest(&manifest_desc).with_context(image)?;
    let config = store
        .read_descriptor(&manifest.config)
        .with_context(image)?;
    let platform = platform_of_config(&config)
        .with_context(|| format!("image {reference}: config {}", manifest.config.digest))?;
    let mut vdb = Vdb::default();
    for (i, layer) in manifest.layers.iter().enumerate() {
        let what = || {
            format!(
                "image {reference}: layer {} of {} ({})",
                i + 1,
                manifest.layers.len(),
                layer.digest
            )
        };
        let blob = store.open_blob(layer).with_context(what)?;
        vdb.apply_layer(
            crate::image::layer::open_stream(&layer.media_type, blob).with_context(what)?,
            i,
        )
        .with_context(what)?;
    }
    Ok(Inspection {
        reference,
        source: "store".to_string(),
        digest: manifest_desc.digest.to_string(),
        platform,
        layers: layer_rows(&manifest.layers),
        packages: vdb.packages(),
    })
}

/// Inspect the image `reference` in its registry (the manifest for this host's platform when
/// the tag names an index), streaming the layers.
pub fn inspect_remote(puller: &mut Puller, reference: &str) -> Result<Inspection> {
    let image = puller.manifest(reference)?;
    let name = image.reference.clone();
    let config = puller.read_small(&image, &image.manifest.config)?;
    let platform = platform_of_config(&config)
        .with_context(|| format!("image {name}: config {}", image.manifest.config.digest))?;
    let layers = &image.manifest.layers;
    let mut vdb = Vdb::default();
    for (i, layer) in layers.iter().enumerate() {
        let what = || {
            format!(
                "image {name}: layer {} of {} ({})",
                i + 1,
                layers.len(),
                layer.digest
            )
        };
        let blob = puller.open_blob(&image, layer).with_context(what)?;
        vdb.apply_layer(
            crate::image::layer::open_stream(&layer.media_type, blob).with_context(what)?,
            i,
        )
        .with_context(what)?;
    }
    Ok(Inspection {
        reference: name,
        source: "registry".to_string(),
        digest: image.digest.to_string(),
        platform,
        layers: layer_rows(layers),
        packages: vdb.packages(),
    })
}

/// The layer rows of a manifest's layer descriptors.
pub fn layer_rows(layers: &[Descriptor]) -> Vec<Layer> {
    layers
        .iter()
        .map(|l| Layer {
            digest: l.digest.to_string(),
            media_type: l.media_type.clone(),
            size: l.size,
        })
        .collect()
}

/// One package directory as the layers so far leave it.
#[derive(Debug, Default)]
struct Entry {
    /// The last layer with an entry in (or for) the package directory.
    seen: usize,
    /// vdb key → (value, layer that wrote it).
    values: BTreeMap<&'static str, (Vec<u8>, usize)>,
}

/// The `/var/db/pkg` of an image, built up layer by layer.
#[derive(Debug, Default)]
pub struct Vdb {
    /// `var/db/pkg/CAT/PF` (raw path) → what is known of it.
    packages: BTreeMap<Vec<u8>, Entry>,
}

/// `var/db/pkg/CAT/PF` and the rest of the path below it, for a path in a package directory.
fn split_package(path: &[u8]) -> Option<(&[u8], &[u8])> {
    let rest = path.strip_prefix(b"var/db/pkg/")?;
    let mut parts = rest.splitn(3, |&b| b == b'/');
    let (cat, pf) = (parts.next()?, parts.next()?);
    if cat.is_empty() || pf.is_empty() || pf.starts_with(b"-MERGING-") {
        return None;
    }
    let dir_len = "var/db/pkg/".len() + cat.len() + 1 + pf.len();
    let below = path.get(dir_len + 1..).unwrap_or(b"");
    Some((&path[..dir_len], below))
}

fn split_parent(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (b"", path),
    }
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = dir.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// `a` is `b` or below it.
fn is_under(a: &[u8], b: &[u8]) -> bool {
    b.is_empty() || a == b || (a.starts_with(b) && a.get(b.len()) == Some(&b'/'))
}

fn key_of(name: &[u8]) -> Option<&'static str> {
    KEYS.into_iter().find(|k| k.as_bytes() == name)
}

impl Vdb {
    /// Hide what layers below `layer` put at `path` and below (`only_below`: not `path`
    /// itself). A package directory some entry of `layer` itself names stays, with only
    /// the values `layer` wrote.
    fn hide_lower(&mut self, path: &[u8], only_below: bool, layer: usize) {
        self.packages.retain(|dir, entry| {
            if is_under(dir, path) {
                entry.values.retain(|_, (_, l)| *l >= layer);
                // An opaque package directory stays, emptied of what lower layers wrote.
                return (only_below && dir.as_slice() == path) || entry.seen >= layer;
            }
            // A vdb file inside the package directory: that file only.
            if !only_below
                && let Some(key) = path
                    .strip_prefix(dir.as_slice())
                    .and_then(|rest| rest.strip_prefix(b"/"))
                    .and_then(key_of)
                && entry.values.get(key).is_some_and(|(_, l)| *l < layer)
            {
                entry.values.remove(key);
            }
            true
        });
    }

    fn touch(&mut self, dir: &[u8], layer: usize) -> &mut Entry {
        let entry = self.packages.entry(dir.to_vec()).or_default();
        entry.seen = layer;
        entry
    }

    /// Apply one layer (a tar stream) on top of what is there.
    pub fn apply_layer(&mut self, input: impl Read, layer: usize) -> Result<()> {
        walk_layer(input, |meta, mut entry, last| {
            let (parent, name) = split_parent(&meta.path);
            if name == b".wh..wh..opq" {
                if let Some((dir, b"")) = split_package(parent) {
                    self.touch(dir, layer);
                }
                self.hide_lower(parent, true, layer);
                return Ok(());
            }
            if let Some(hidden) = name.strip_prefix(b".wh.") {
                if !hidden.starts_with(b".wh.") {
                    self.hide_lower(&join(parent, hidden), false, layer);
                }
                return Ok(());
            }
            if meta.kind != EntryKind::Directory {
                // A file, link or device hides any directory of that name below.
                self.hide_lower(&meta.path, true, layer);
            }
            let Some((dir, below)) = split_package(&meta.path) else {
                return Ok(());
            };
            if below.is_empty() {
                if meta.kind == EntryKind::Directory {
                    self.touch(dir, layer);
                } else {
                    // Not a directory: no package there any more.
                    self.packages.remove(dir);
                }
                return Ok(());
            }
            let key = key_of(below);
            let value = match (&meta.kind, key) {
                (EntryKind::Regular { size }, Some(_)) => {
                    let mut value = Vec::new();
                    (&mut entry)
                        .take(VALUE_MAX.min(*size))
                        .read_to_end(&mut value)
                        .map_err(|e| anyhow!("entry {last:?}: cannot read: {e}"))?;
                    Some(value)
                }
                (EntryKind::HardLink { target }, Some(_)) => {
                    split_package(target).and_then(|(d, b)| {
                        let k = key_of(b)?;
                        self.packages.get(d)?.values.get(k).map(|(v, _)| v.clone())
                    })
                }
                _ => None,
            };
            let package = self.touch(dir, layer);
            if let Some(key) = key {
                match value {
                    Some(v) => {
                        package.values.insert(key, (v, layer));
                    }
                    None => {
                        package.values.remove(key);
                    }
                }
            }
            Ok(())
        })
    }

    /// The packages, sorted by CAT/PF.
    pub fn packages(&self) -> Vec<Package> {
        self.packages
            .iter()
            .map(|(dir, entry)| {
                let text = |key: &str| {
                    entry
                        .values
                        .get(key)
                        .map(|(v, _)| String::from_utf8_lossy(v).trim().to_string())
                };
                let name = String::from_utf8_lossy(&dir["var/db/pkg/".len()..]).into_owned();
                let size = text("SIZE").and_then(|s| match s.parse::<u64>() {
                    Ok(n) => Some(n),
                    Err(_) => {
                        tracing::warn!("{name}: SIZE {s:?} is not a number of bytes");
                        None
                    }
                });
                Package {
                    package: name,
                    slot: text("SLOT"),
                    use_flags: text("USE"),
                    license: text("LICENSE"),
                    size,
                    repository: text("repository"),
                }
            })
            .collect()
    }
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

    fn tar_of(entries: &[(&str, Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            match data {
                Some(d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(d.len() as u64);
                    b.append_data(&mut h, path, d.as_bytes()).unwrap();
                }
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    b.append_data(&mut h, path, std::io::empty()).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    fn names(vdb: &Vdb) -> Vec<String> {
        vdb.packages().into_iter().map(|p| p.package).collect()
    }

    #[test]
    fn reads_the_vdb_files_of_each_package() {
        let mut vdb = Vdb::default();
        let layer = tar_of(&[
            ("var/db/pkg/", None),
            ("var/db/pkg/app-misc/", None),
            ("var/db/pkg/app-misc/hello-1/", None),
            ("var/db/pkg/app-misc/hello-1/SLOT", Some("0\n")),
            ("var/db/pkg/app-misc/hello-1/USE", Some("amd64 nls\n")),
            ("var/db/pkg/app-misc/hello-1/LICENSE", Some("GPL-2 MIT\n")),
            ("var/db/pkg/app-misc/hello-1/SIZE", Some("12345\n")),
            ("var/db/pkg/app-misc/hello-1/repository", Some("gentoo\n")),
            ("var/db/pkg/app-misc/hello-1/CONTENTS", Some("obj /x a 1\n")),
            ("var/db/pkg/sys-libs/-MERGING-demo-1/SLOT", Some("0\n")),
            ("var/db/pkg/sys-libs/demo-2/SIZE", Some("lots\n")),
            ("usr/bin/hello", Some("#!/bin/sh\n")),
        ]);
        vdb.apply_layer(&layer[..], 0).unwrap();
        let got = vdb.packages();
        assert_eq!(
            got[0],
            Package {
                package: "app-misc/hello-1".into(),
                slot: Some("0".into()),
                use_flags: Some("amd64 nls".into()),
                license: Some("GPL-2 MIT".into()),
                size: Some(12345),
                repository: Some("gentoo".into()),
            }
        );
        assert_eq!(got[1].package, "sys-libs/demo-2");
        assert_eq!((got[1].size, got[1].slot.as_deref()), (None, None));
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn later_layers_override_and_whiteouts_hide() {
        let mut vdb = Vdb::default();
        let base = tar_of(&[
            ("var/db/pkg/a/old-1/SLOT", Some("0")),
            ("var/db/pkg/a/keep-1/SLOT", Some("1")),
            ("var/db/pkg/a/keep-1/USE", Some("x")),
            ("var/db/pkg/b/gone-1/SLOT", Some("0")),
            ("var/db/pkg/c/opq-1/SLOT", Some("0")),
        ]);
        vdb.apply_layer(&base[..], 0).unwrap();
        let top = tar_of(&[
            ("var/db/pkg/a/.wh.old-1", Some("")),
            ("var/db/pkg/a/new-2/SLOT", Some("2")),
            ("var/db/pkg/a/keep-1/SLOT", Some("3")),
            ("var/db/pkg/a/keep-1/.wh.USE", Some("")),
            ("var/db/pkg/.wh.b", Some("")),
            ("var/db/pkg/c/.wh..wh..opq", Some("")),
        ]);
        vdb.apply_layer(&top[..], 1).unwrap();
        assert_eq!(names(&vdb), ["a/keep-1", "a/new-2"]);
        let keep = &vdb.packages()[0];
        assert_eq!(keep.slot.as_deref(), Some("3"));
        assert_eq!(keep.use_flags, None);
    }

    #[test]
    fn a_truncated_layer_is_an_error() {
        let layer = tar_of(&[("var/db/pkg/a/b-1/SLOT", Some("0"))]);
        let cut = &layer[..1024];
        let err = Vdb::default().apply_layer(cut, 0).unwrap_err();
        assert!(format!("{err:#}").contains("truncated"), "{err:#}");
    }

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
