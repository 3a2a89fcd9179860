//! `gentoo-mkimg import`: a stage3 tarball becomes a one-layer image in the store.
//!
//! One streaming pass: decompress, check each entry, re-write it into the normalised layer
//! tar, compress, hash, and watch for the newest mtime and the stage's architecture on the
//! way. Nothing reaches the store's index unless the whole tarball was read without fault.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};

use crate::archive::decompress;
use crate::archive::entries::walk_tar;
use crate::image::config::{ELF_PROBE_LIMIT, ImageSpec, Platform, platform_from_elf};
use crate::image::layer::{EntryKind, EntrySink, LayerCompression, LayerInfo, LayerWriter};
use crate::image::reference::Reference;
use crate::image::store::{Descriptor, DescriptorExt, Store};
use crate::image::{StoredImage, commit_image, open_image};
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
    layer: &mut dyn EntrySink,
    opts: TarOptions,
    progress: impl FnMut(),
) -> Result<Scan> {
    append_tar_checked(input, layer, opts, progress, &|_| Ok(()))
}

/// [`append_tar`], with `accept` asked about the platform as soon as it is found: its error
/// ends the walk there.
fn append_tar_checked(
    input: impl Read,
    layer: &mut dyn EntrySink,
    opts: TarOptions,
    mut progress: impl FnMut(),
    accept: &dyn Fn(&Platform) -> Result<()>,
) -> Result<Scan> {
    let mut scan = Scan::default();
    walk_tar(input, "archive", |mut meta, entry, last| {
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
                entry
                    .take(size)
                    .read_to_end(&mut data)
                    .map_err(|e| anyhow!("entry {last:?}: cannot read: {e}"))?;
                scan.platform = platform_from_elf(&data);
                if let Some(platform) = &scan.platform {
                    accept(platform)?;
                }
                layer.append(&meta, &mut data.as_slice())
            }
            _ => layer.append(&meta, entry),
        };
        appended.map_err(|e| anyhow!("entry {last:?}: {e} (truncated or corrupt input?)"))?;
        progress();
        Ok(())
    })?;
    if scan.entries == 0 {
        bail!("the archive holds no entries");
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
    Ok(import_stage(store, opts)?.image)
}

/// The config label that keeps what the import learned about the stage ([`StageFacts`], as
/// JSON), so that a later build that finds the image in the store need not read the stage.
pub const FACTS_LABEL: &str = "org.gentoo-mkimg.stage-facts";

/// What an import learned about the stage besides the layer, as kept in [`FACTS_LABEL`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageFacts {
    pub entries: u64,
    pub newest_mtime: u64,
    /// The platform of the stage's binaries (`linux/ARCH[/VARIANT]`), whatever the image was
    /// told to be.
    pub platform: Option<String>,
    /// Whether `usr/bin/emerge` is there.
    pub has_portage: bool,
    /// The profile `etc/portage/make.profile` points to (see [`Scan::profile`]).
    pub profile: Option<String>,
}

impl StageFacts {
    fn of(scan: &Scan) -> Self {
        StageFacts {
            entries: scan.entries,
            newest_mtime: scan.newest_mtime,
            platform: scan.platform.as_ref().map(Platform::to_string),
            has_portage: scan.has_portage,
            profile: scan.profile.clone(),
        }
    }

    /// The platform of the stage's binaries, if one was found.
    pub fn platform(&self) -> Result<Option<Platform>> {
        let Some(text) = &self.platform else {
            return Ok(None);
        };
        let platform: Platform = text.parse()?;
        if platform.to_string() != *text {
            bail!("platform {text:?}: expected linux/ARCH[/VARIANT]");
        }
        Ok(Some(platform))
    }
}

/// What [`import_stage`] did.
#[derive(Debug, Clone)]
pub struct Imported {
    pub image: StoredImage,
    pub facts: StageFacts,
    /// The stage's SHA-256 (hex).
    pub stage_digest: String,
    /// The store held this very image already (same stage, same options): the stage was not
    /// read.
    pub reused: bool,
}

/// [`import`], also returning what the import learned about the stage. When the store
/// already holds `opts.reference` as importing the stage with these options would make it
/// (its [`STAGE_LABEL`] names the stage's digest and its config is the one this import
/// would write), that image is the result and the stage is not read; given no digest, the
/// stage is hashed first only when the store has an image of that name from some stage,
/// otherwise while it is imported (one pass).
pub fn import_stage(store: &Store, opts: &ImportOptions) -> Result<Imported> {
    import_stage_checked(store, opts, &|_| Ok(()))
}

/// [`import_stage`], with `accept` asked about the platform of the stage's programs as soon as
/// the import finds it (or, when the store holds the image already, before it is returned):
/// its error, as it is, ends the import with nothing stored, e.g. for a stage this host
/// cannot run.
pub fn import_stage_checked(
    store: &Store,
    opts: &ImportOptions,
    accept: &dyn Fn(&Platform) -> Result<()>,
) -> Result<Imported> {
    let file = opts.stage.display().to_string();
    let reference = opts.reference.to_string();
    let stored = store
        .read_index()?
        .manifests()
        .iter()
        .any(|d| d.ref_name() == Some(reference.as_str()));
    let known = match &opts.stage_digest {
        Some(digest) => Some(digest.clone()),
        None if stored => Some(crate::archive::digest::sha256_file(&opts.stage)?),
        None => None,
    };
    if stored && let Some(digest) = &known {
        match stored_import(store, opts, digest) {
            Ok(Some((image, facts))) => {
                if let Some(platform) = facts.platform()? {
                    accept(&platform)?;
                }
                tracing::info!(
                    "{reference} in the store was imported from this stage ({file}, \
                     sha256:{digest}) with the same settings; not reading the stage again"
                );
                return Ok(Imported {
                    image,
                    facts,
                    stage_digest: digest.clone(),
                    reused: true,
                });
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("{reference} in the store: {e:#}; importing {file} again"),
        }
    }
    import_read(store, opts, known, accept)
}

/// The stage `stage` is of the platform `want` asks for: the same architecture, and the same
/// variant when `want` names one (`found`: the platform of its programs).
pub fn check_platform(stage: &Path, want: &Platform, found: &Platform) -> Result<()> {
    if want.architecture != found.architecture
        || want.variant.is_some() && want.variant != found.variant
    {
        bail!(
            "stage3 {} is {found}, not {want} (--platform)",
            stage.display()
        );
    }
    Ok(())
}

/// What [`import_platforms`] did.
#[derive(Debug, Clone)]
pub struct ImportedIndex {
    /// Each platform's image, named as [`Reference::for_platform`] says, in the order given.
    pub images: Vec<(Platform, Imported)>,
    /// The image index of them, tagged `opts.reference`.
    pub index: Descriptor,
}

/// Stages of several platforms under one name: each stage is imported as its platform's
/// image (`REF-ARCH`, see [`Reference::for_platform`]; reused when the store has it from this
/// stage), refused unless its programs are of that platform and `accept` takes it; then an
/// image index of them is tagged `opts.reference`. `opts` gives the name, compression, time
/// and verbosity; the stage, its platform and digest are each entry's of `stages`.
pub fn import_platforms(
    store: &Store,
    opts: &ImportOptions,
    stages: &[(Platform, PathBuf)],
    accept: &dyn Fn(&Path, &Platform) -> Result<()>,
) -> Result<ImportedIndex> {
    let blobs = store.session(); // all or nothing: a failure below removes what was written
    // The entries this call (re)tagged, with what they named before, to put back on failure.
    let mut retagged: Vec<(String, Option<Descriptor>)> = Vec::new();
    let result = (|| -> Result<ImportedIndex> {
        let mut images = Vec::with_capacity(stages.len());
        for (want, stage) in stages {
            let one = ImportOptions {
                stage: stage.clone(),
                reference: opts.reference.for_platform(want)?,
                platform: None,
                stage_digest: None,
                ..opts.clone()
            };
            let check = |found: &Platform| {
                check_platform(stage, want, found)?;
                accept(stage, found)
            };
            let name = one.reference.to_string();
            let before = store.resolve(&name).ok();
            let imported = import_stage_checked(store, &one, &check)?;
            if !imported.reused {
                retagged.push((name, before));
            }
            let platform = imported.facts.platform()?.unwrap_or_else(|| want.clone());
            images.push((platform, imported));
        }
        let entries: Vec<_> = images
            .iter()
            .map(|(p, i)| (p.clone(), i.image.manifest.clone()))
            .collect();
        let index = crate::image::index::write_index(store, &entries)
            .with_context(|| format!("the index {}", opts.reference))?;
        store.tag(&opts.reference.to_string(), index.clone())?;
        Ok(ImportedIndex { images, index })
    })();
    if result.is_ok() {
        blobs.commit();
    } else {
        for (name, before) in retagged.into_iter().rev() {
            let undone = match before {
                Some(desc) => store.tag(&name, desc),
                None => store.untag(&name),
            };
            if let Err(e) = undone {
                tracing::warn!("{name}: cannot undo its import: {e:#}");
            }
        }
    }
    result
}

/// The image `opts.reference` in `store` when it is exactly what importing the stage of
/// digest `stage_digest` with `opts` would make, with the facts its label keeps.
fn stored_import(
    store: &Store,
    opts: &ImportOptions,
    stage_digest: &str,
) -> Result<Option<(StoredImage, StageFacts)>> {
    let reference = opts.reference.to_string();
    let image = open_image(store, &reference)?;
    let bytes = store.read_descriptor(&image.config)?;
    let config: serde_json::Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("the config {} is not JSON", image.config.digest()))?;
    let labels = &config["config"]["Labels"];
    if labels[STAGE_LABEL].as_str() != Some(format!("sha256:{stage_digest}").as_str()) {
        return Ok(None); // another stage, or none recorded
    }
    let Some(facts) = labels[FACTS_LABEL].as_str() else {
        return Ok(None); // imported before the facts were kept
    };
    let facts: StageFacts = serde_json::from_str(facts)
        .with_context(|| format!("its label {FACTS_LABEL} is not valid"))?;
    let [layer] = image.layers.as_slice() else {
        return Ok(None);
    };
    if layer.kind() != opts.compression.media_type() || !store.has_blob(&layer.blob()?) {
        return Ok(None);
    }
    let diff_id = match config["rootfs"]["diff_ids"].as_array().map(Vec::as_slice) {
        Some([one]) => serde_json::from_value(one.clone())
            .with_context(|| format!("the config {}: a bad diff_id", image.config.digest()))?,
        _ => return Ok(None),
    };
    // The config this import would write over the stored layer; only the layer's digests
    // go into it (not its uncompressed size).
    let info = LayerInfo {
        digest: layer.blob()?,
        diff_id,
        size: layer.size(),
        tar_size: 0,
        media_type: opts.compression.media_type(),
    };
    let spec = import_spec(opts, &facts, stage_digest)?;
    let want = crate::image::config::config_json(&spec, std::slice::from_ref(&info))?;
    if crate::image::store::Digest::of(&want) != image.config.blob()? {
        return Ok(None); // other settings (compression, platform, creation time, name)
    }
    // The layer must be whole (read through, its digest checked; far cheaper than importing):
    // a corrupt blob, which push and archive refuse with the advice to import again, is
    // replaced by importing again.
    let mut blob = store.open_blob(layer)?;
    std::io::copy(&mut blob, &mut std::io::sink())
        .map_err(|e| crate::image::store::blob_error(e, blob.path(), "the layer"))?;
    Ok(Some((image, facts)))
}

/// The image spec of a stage imported with `opts`.
fn import_spec(opts: &ImportOptions, facts: &StageFacts, stage_digest: &str) -> Result<ImageSpec> {
    let file = opts.stage.display();
    let platform = match (&opts.platform, facts.platform()?) {
        (Some(p), _) => p.clone(),
        (None, Some(p)) => p,
        (None, None) => bail!(
            "{file}: no ELF executable found in /bin, /sbin, /usr/bin or /usr/sbin, so the \
             architecture is unknown; is this a stage3? (--platform sets it)"
        ),
    };
    let created = opts
        .source_date_epoch
        .unwrap_or(facts.newest_mtime.min(i64::MAX as u64) as i64);
    let mut spec = ImageSpec::gentoo(platform, created);
    spec.labels = standard_labels(
        &opts.reference,
        created,
        "Gentoo stage3, imported by gentoo-mkimg",
    )?;
    spec.labels
        .insert(STAGE_LABEL.to_string(), format!("sha256:{stage_digest}"));
    spec.labels.insert(
        FACTS_LABEL.to_string(),
        serde_json::to_string(facts).context("cannot write the stage's facts")?,
    );
    spec.history = vec!["gentoo-mkimg import".to_string()];
    Ok(spec)
}

/// Read the stage into a new image (hashing it on the way when `stage_digest` is unknown).
fn import_read(
    store: &Store,
    opts: &ImportOptions,
    stage_digest: Option<String>,
    accept: &dyn Fn(&Platform) -> Result<()>,
) -> Result<Imported> {
    let blobs = store.session(); // a failure below removes the blobs written here
    let file = opts.stage.display().to_string();
    let (input, hash) = match &stage_digest {
        Some(_) => (decompress::open(&opts.stage)?, None),
        None => {
            let (input, hash) = decompress::open_hashed(&opts.stage)?;
            (input, Some(hash))
        }
    };
    tracing::info!(
        "importing {file} ({}, {} bytes) as {}",
        input.compression,
        input.size,
        opts.reference
    );
    let bar = progress::Bar::new(opts.verbosity, "import", input.size);
    let consumed = input.consumed.clone();
    let mut layer = LayerWriter::new(store, opts.compression)?;
    // accept's refusal is the error as it is, without the walk's context
    let refused = std::cell::RefCell::new(None);
    let scan = append_tar_checked(
        input.reader,
        &mut layer,
        TarOptions::default(),
        || bar.set(consumed.load(std::sync::atomic::Ordering::Relaxed)),
        &|platform| {
            accept(platform).map_err(|e| {
                let text = format!("{e:#}");
                *refused.borrow_mut() = Some(e);
                anyhow!(text)
            })
        },
    );
    let scan = match (scan, refused.into_inner()) {
        (Ok(scan), _) => scan,
        (Err(_), Some(refusal)) => return Err(refusal),
        (Err(e), None) => return Err(e.context(file.clone())),
    };
    let info: LayerInfo = layer.finish(store).with_context(|| file.clone())?;
    bar.finish();
    let stage_digest = match (hash, stage_digest) {
        (Some(hash), _) => hash.finish()?,
        (None, Some(known)) => known,
        (None, None) => bail!("{file}: neither hashed before nor while importing"),
    };

    let facts = StageFacts::of(&scan);
    let spec = import_spec(opts, &facts, &stage_digest)?;
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
    Ok(Imported {
        image,
        facts,
        stage_digest,
        reused: false,
    })
}

/// The `org.opencontainers.image.*` labels every image of ours carries.
pub fn standard_labels(
    reference: &Reference,
    created: i64,
    description: &str,
) -> Result<std::collections::BTreeMap<String, String>> {
    Ok([
        ("created", crate::image::config::rfc3339(created)?),
        ("title", reference.name().to_string()),
        ("version", reference.tag.clone()),
        ("description", description.to_string()),
        ("vendor", "gentoo-mkimg".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (format!("org.opencontainers.image.{k}"), v))
    .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(platform: Option<&str>) -> StageFacts {
        StageFacts {
            entries: 3,
            newest_mtime: 1_700_000_000,
            platform: platform.map(str::to_string),
            has_portage: true,
            profile: Some("default/linux/amd64/23.0/musl".to_string()),
        }
    }

    /// The facts label is parsed strictly: unknown fields and a platform that is not
    /// written as we write it are refused.
    #[test]
    fn the_facts_label_round_trips_and_is_parsed_strictly() {
        let f = facts(Some("linux/arm/v7"));
        let text = serde_json::to_string(&f).unwrap();
        let back: StageFacts = serde_json::from_str(&text).unwrap();
        assert_eq!(back, f);
        assert_eq!(
            back.platform().unwrap(),
            Some(Platform {
                architecture: "arm".to_string(),
                variant: Some("v7".to_string()),
            })
        );
        assert_eq!(facts(None).platform().unwrap(), None);
        assert!(facts(Some("amd64")).platform().is_err());
        assert!(facts(Some("linux/")).platform().is_err());
        let extra = text.replacen('{', r#"{"packages":[],"#, 1);
        assert!(
            serde_json::from_str::<StageFacts>(&extra).is_err(),
            "{extra}"
        );
        let missing = r#"{"entries":1,"newest_mtime":2,"platform":null,"profile":null}"#;
        assert!(serde_json::from_str::<StageFacts>(missing).is_err());
    }
}
