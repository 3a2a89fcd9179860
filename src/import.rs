//! `gentoo-mkimg import`: a stage3 tarball becomes a one-layer image in the store.
//!
//! One streaming pass: decompress, check each entry, re-write it into the normalised layer
//! tar, compress, hash, and watch for the newest mtime and the stage's architecture on the
//! way. Nothing reaches the store's index unless the whole tarball was read without fault.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};

use crate::archive::decompress;
use crate::archive::entries::{TrailerCheck, display_path, entry_meta};
use crate::image::config::{ImageSpec, Platform, platform_from_elf};
use crate::image::layer::{EntryKind, LayerCompression, LayerInfo, LayerWriter};
use crate::image::reference::Reference;
use crate::image::store::Store;
use crate::image::{StoredImage, commit_image};
use crate::portage::vdb;
use crate::progress::{self, Verbosity};

/// The config label that names the stage an image was imported from: `sha256:<hex>` of the
/// stage file. The docker engine checks it before it reuses a stored raw image.
pub const STAGE_LABEL: &str = "org.gentoo-mkimg.stage";

/// What to import, as plain values.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    pub stage: PathBuf,
    pub reference: Reference,
    pub compression: LayerCompression,
    /// Set the platform instead of reading it from the stage's binaries.
    pub platform: Option<Platform>,
    /// SOURCE_DATE_EPOCH; otherwise the newest mtime in the stage is the creation time.
    pub source_date_epoch: Option<i64>,
    pub verbosity: Verbosity,
    /// The stage's SHA-256 (hex) when the caller hashed it already; otherwise hashed here.
    pub stage_digest: Option<String>,
}

/// What a pass over a tarball learned besides the layer itself.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    pub entries: u64,
    pub newest_mtime: u64,
    pub platform: Option<Platform>,
    /// Whether `usr/bin/emerge` is there.
    pub has_portage: bool,
    /// Installed packages (`CAT/PF`) seen in `var/db/pkg`.
    pub packages: Vec<String>,
    /// The profile `etc/portage/make.profile` points to, as under a repository's
    /// `profiles/` (e.g. `default/linux/amd64/23.0/musl`).
    pub profile: Option<String>,
}

/// How entries are rewritten on the way into the layer.
#[derive(Debug, Clone, Copy, Default)]
pub struct TarOptions {
    /// No mtime later than this (SOURCE_DATE_EPOCH).
    pub clamp_mtime: Option<u64>,
}

/// Largest binary read whole to find the platform (ARM keeps it at the end of the file).
const ELF_PROBE_LIMIT: u64 = 16 << 20;

fn is_binary_dir(path: &[u8]) -> bool {
    let dir = match path.iter().rposition(|&b| b == b'/') {
        Some(i) => &path[..i],
        None => return false,
    };
    matches!(dir, b"bin" | b"sbin" | b"usr/bin" | b"usr/sbin")
}

/// Copy every entry of the tar stream `input` into `layer`, checking each one.
/// `progress` is called now and then with nothing (the caller reads its own counters).
pub fn append_tar(
    input: impl Read,
    layer: &mut LayerWriter,
    opts: TarOptions,
    mut progress: impl FnMut(),
) -> Result<Scan> {
    let mut checked = TrailerCheck::new(input);
    let mut scan = Scan::default();
    let mut last = String::from("(start of archive)");
    {
        let mut archive = tar::Archive::new(&mut checked);
        let entries = archive.entries().context("cannot read the tar stream")?;
        for entry in entries {
            let mut entry = entry
                .map_err(|e| anyhow!("corrupt or truncated data after entry {last:?}: {e}"))?;
            let mut meta = entry_meta(&mut entry)?;
            last = display_path(&meta.path);
            if meta.path.is_empty() && meta.kind != EntryKind::Directory {
                // A runtime unpacking the layer would make its root a link to wherever
                // this points (or a file).
                bail!("entry {last:?}: the archive's root (./) is not a directory");
            }
            if let Some(clamp) = opts.clamp_mtime {
                meta.mtime = meta.mtime.min(clamp);
            }
            scan.entries += 1;
            scan.newest_mtime = scan.newest_mtime.max(meta.mtime);
            if meta.path == b"usr/bin/emerge" {
                scan.has_portage = true;
            }
            if meta.path == b"etc/portage/make.profile"
                && let EntryKind::Symlink { target } = &meta.kind
            {
                scan.profile = profile_name(target);
            }
            if meta.kind == EntryKind::Directory
                && let Some(pkg) = vdb::package_of_path(&meta.path)
            {
                scan.packages.push(pkg);
            }
            let appended = match meta.kind {
                EntryKind::Regular { size }
                    if scan.platform.is_none()
                        && (64..=ELF_PROBE_LIMIT).contains(&size)
                        && is_binary_dir(&meta.path) =>
                {
                    let mut data = Vec::with_capacity(size as usize);
                    (&mut entry)
                        .take(size)
                        .read_to_end(&mut data)
                        .map_err(|e| anyhow!("entry {last:?}: cannot read: {e}"))?;
                    scan.platform = platform_from_elf(&data);
                    layer.append(&meta, &mut data.as_slice())
                }
                _ => layer.append(&meta, &mut entry),
            };
            appended.map_err(|e| anyhow!("entry {last:?}: {e} (truncated or corrupt input?)"))?;
            progress();
        }
    }
    if scan.entries == 0 {
        bail!("the archive holds no entries");
    }
    if !checked.saw_end_marker() {
        bail!(
            "truncated: the archive ends after entry {last:?} without tar's end-of-archive marker"
        );
    }
    scan.packages.sort();
    Ok(scan)
}

/// The profile a make.profile link points to, from its target: what follows `profiles/`.
fn profile_name(target: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(target).ok()?;
    let (_, name) = text.rsplit_once("profiles/")?;
    let name = name.trim_end_matches('/');
    (!name.is_empty()).then(|| name.to_string())
}

/// SOURCE_DATE_EPOCH, when set: a reproducible creation time.
pub fn source_date_epoch() -> Result<Option<i64>> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map(Some)
            .with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds")),
        _ => Ok(None),
    }
}

/// Import `opts.stage` into `store` as `opts.reference`.
pub fn import(store: &Store, opts: &ImportOptions) -> Result<StoredImage> {
    Ok(import_scanned(store, opts)?.0)
}

/// [`import`], also returning what the pass learned about the stage.
pub fn import_scanned(store: &Store, opts: &ImportOptions) -> Result<(StoredImage, Scan)> {
    let blobs = store.session(); // a failure below removes the blobs written here
    let file = opts.stage.display().to_string();
    let stage_digest = match &opts.stage_digest {
        Some(known) => known.clone(),
        None => crate::archive::digest::sha256_file(&opts.stage)?,
    };
    let input = decompress::open(&opts.stage)?;
    tracing::info!(
        "importing {file} ({}, {} bytes) as {}",
        input.compression,
        input.size,
        opts.reference
    );
    let bar = progress::Bytes::new(opts.verbosity, "import", input.size);
    let consumed = input.consumed.clone();
    let mut layer = LayerWriter::new(store, opts.compression)?;
    let scan = append_tar(input.reader, &mut layer, TarOptions::default(), || {
        bar.set(consumed.load(std::sync::atomic::Ordering::Relaxed))
    })
    .with_context(|| file.clone())?;
    let info: LayerInfo = layer.finish(store).with_context(|| file.clone())?;
    bar.finish();

    let platform = match (&opts.platform, &scan.platform) {
        (Some(p), _) => p.clone(),
        (None, Some(p)) => p.clone(),
        (None, None) => bail!(
            "{file}: no ELF executable found in /bin, /sbin, /usr/bin or /usr/sbin, so the \
             architecture is unknown; is this a stage3? (--platform sets it)"
        ),
    };
    let created = opts
        .source_date_epoch
        .unwrap_or(scan.newest_mtime.min(i64::MAX as u64) as i64);
    let mut spec = ImageSpec::gentoo(platform, created);
    spec.labels = standard_labels(
        &opts.reference,
        created,
        "Gentoo stage3, imported by gentoo-mkimg",
    );
    spec.labels
        .insert(STAGE_LABEL.to_string(), format!("sha256:{stage_digest}"));
    spec.history = vec!["gentoo-mkimg import".to_string()];
    let image = commit_image(
        store,
        &opts.reference.to_string(),
        &spec,
        std::slice::from_ref(&info),
    )?;
    tracing::info!(
        "{} entries, layer {} ({} bytes, {} uncompressed)",
        scan.entries,
        info.digest,
        info.size,
        info.tar_size
    );
    blobs.commit();
    Ok((image, scan))
}

/// The `org.opencontainers.image.*` labels every image of ours carries.
pub fn standard_labels(
    reference: &Reference,
    created: i64,
    description: &str,
) -> std::collections::BTreeMap<String, String> {
    [
        ("created", crate::image::config::rfc3339(created)),
        ("title", reference.name().to_string()),
        ("version", reference.tag.clone()),
        ("description", description.to_string()),
        ("vendor", "gentoo-mkimg".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (format!("org.opencontainers.image.{k}"), v))
    .collect()
}
