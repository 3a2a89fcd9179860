//! The image store: an OCI image layout directory (`oci-layout`, `index.json`,
//! `blobs/sha256/`) holding every image the tool makes.
//!
//! Each image is one manifest entry in `index.json`, named by the
//! `org.opencontainers.image.ref.name` annotation carrying the full reference
//! (`REPO/NAME:TAG`). Blobs are written to a temporary file in `blobs/sha256/`, synced,
//! and renamed into place (the directory synced after), so a reader never sees half a blob
//! and a crash leaves none; identical blobs are stored once, and a file already under a
//! digest's name is trusted only after its size and content were checked. `index.json` is
//! replaced the same way, under an exclusive lock, and re-tagging a reference replaces only
//! that entry. Files are created `0666` and directories `0777`, less the umask.
//!
//! Every read of a blob is checked against its digest (and its descriptor's size) as it
//! streams, by [`BlobReader`]: a wrong blob fails with a [`CorruptBlob`] error before its
//! last bytes are handed out. A [`BlobSession`] removes the blobs a failed command wrote, and
//! [`Store::collect_garbage`] whatever no entry of `index.json` reaches. Commands that write
//! hold `.writers` shared; gc and a failed command's clean-up hold it exclusive, so neither
//! removes a blob another command is about to tag.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::image::oci::{self, ImageManifestBuilder, MediaType};
pub use crate::image::oci::{Descriptor, DescriptorExt, ImageIndex, ImageManifest, to_json};
use sha2::{Digest as _, Sha256};

pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// The empty blob (`{}`) an artifact manifest names as its config.
pub const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
pub const EMPTY_BLOB: &[u8] = b"{}";

/// A content digest, always `sha256:<64 lowercase hex>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    pub fn from_sha256(raw: &[u8]) -> Self {
        Digest(format!("sha256:{}", hex::encode(raw)))
    }

    pub fn of(bytes: &[u8]) -> Self {
        Self::from_sha256(Sha256::digest(bytes).as_slice())
    }

    /// The 64 hex characters.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Digest {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        match s.strip_prefix("sha256:") {
            Some(h)
                if h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
            {
                Ok(Digest(s))
            }
            _ => Err(format!("unsupported or malformed digest {s:?}")),
        }
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A temporary blob file; removed when dropped unless committed.
pub struct PendingBlob {
    path: tempfile::TempPath,
}

/// The lock file every command that writes to the store holds shared while it may still tag
/// what it wrote, and that `gc` (or a failed command removing its own blobs) holds exclusive.
const WRITERS_LOCK: &str = ".writers";

/// Blobs written by the live [`BlobSession`]s of one store value and its clones.
type WrittenSet = Arc<Mutex<BTreeSet<Digest>>>;

#[derive(Debug, Default)]
struct Shared {
    /// Our shared lock on [`WRITERS_LOCK`], taken at the first write and held until the last
    /// clone of the store is dropped (or a session gives it up to remove its blobs).
    writer: Mutex<Option<File>>,
    sessions: Mutex<Vec<Weak<Mutex<BTreeSet<Digest>>>>>,
}

/// The image layout at a directory. Opening it touches nothing; the layout is created on the
/// first write. Clones share the lock and the sessions of the original.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    shared: Arc<Shared>,
}

impl Store {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Store {
            root: root.into(),
            shared: Arc::default(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs_dir().join(digest.hex())
    }

    /// Whether a file is stored under `digest` (its content is not checked).
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Create `oci-layout`, an empty `index.json` and `blobs/sha256/` if they are missing, and
    /// hold the store's writer lock from now on (`gc` waits for it).
    pub fn ensure_layout(&self) -> Result<()> {
        let blobs = self.blobs_dir();
        fs::create_dir_all(&blobs)
            .with_context(|| format!("{}: cannot create the image store", blobs.display()))?;
        self.hold_writer_lock()?;
        let layout = self.root.join("oci-layout");
        if !layout.exists() {
            write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        let index = self.root.join("index.json");
        if !index.exists() {
            let _lock = self.lock()?;
            if !index.exists() {
                write_atomic(&index, &to_json(&empty_index())?)?;
            }
        }
        sweep_stale_tmp(&blobs, STALE_TMP_AGE);
        sweep_stale_tmp(&self.root, STALE_TMP_AGE);
        Ok(())
    }

    /// Take the shared writer lock unless this store value holds it already.
    fn hold_writer_lock(&self) -> Result<()> {
        let mut held = relock(&self.shared.writer);
        if held.is_none() {
            let path = self.root.join(WRITERS_LOCK);
            let file = open_lock_file(&path)?;
            if let Err(fs::TryLockError::WouldBlock) = file.try_lock_shared() {
                tracing::warn!("{}: waiting for gc to finish", self.root.display());
                file.lock_shared()
                    .with_context(|| format!("{}: cannot lock the store", path.display()))?;
            }
            *held = Some(file);
        }
        Ok(())
    }

    /// Start recording the blobs this store value (and its clones) writes from now on, so
    /// that a command that fails leaves none of them behind; see [`BlobSession`].
    pub fn session(&self) -> BlobSession {
        let written = WrittenSet::default();
        let mut sessions = relock(&self.shared.sessions);
        sessions.retain(|w| w.strong_count() > 0);
        sessions.push(Arc::downgrade(&written));
        BlobSession {
            store: self.clone(),
            written,
            committed: false,
        }
    }

    fn record_written(&self, digest: &Digest) {
        for session in relock(&self.shared.sessions).iter() {
            if let Some(set) = session.upgrade() {
                relock(&set).insert(digest.clone());
            }
        }
    }

    /// Start writing a blob whose digest is not known yet.
    pub fn begin_blob(&self) -> Result<(PendingBlob, File)> {
        self.ensure_layout()?;
        let dir = self.blobs_dir();
        let tmp = temp_file_in(&dir)
            .with_context(|| format!("{}: cannot create a temporary blob", dir.display()))?;
        let (file, path) = tmp.into_parts();
        Ok((PendingBlob { path }, file))
    }

    /// Move a finished blob into place under its digest, durably: the file is synced before
    /// the rename, the directory after it. A file already stored under that digest is kept
    /// only when its size and content match; a wrong one is replaced.
    pub fn commit_blob(&self, pending: PendingBlob, digest: &Digest) -> Result<()> {
        let dest = self.blob_path(digest);
        let tmp: &Path = &pending.path;
        let size = fs::metadata(tmp)
            .with_context(|| format!("{}: cannot read the temporary blob", tmp.display()))?
            .len();
        match check_file(&dest, digest, size) {
            Ok(None) => return Ok(()), // the same blob is stored; `pending` is removed on drop
            Ok(Some(found)) => tracing::warn!(
                "{}: replacing a corrupt blob (expected {size} bytes with {digest}, found {found})",
                dest.display()
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("{}: replacing an unreadable blob ({e})", dest.display()),
        }
        File::open(tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("{}: cannot sync the blob", tmp.display()))?;
        pending
            .path
            .persist(&dest)
            .map_err(|e| e.error)
            .with_context(|| format!("{}: cannot store blob", dest.display()))?;
        sync_dir(&self.blobs_dir())?;
        self.record_written(digest);
        Ok(())
    }

    /// Store small content (a config or manifest) and describe it.
    pub fn put_bytes(&self, media_type: &str, bytes: &[u8]) -> Result<Descriptor> {
        let digest = Digest::of(bytes);
        let (pending, mut file) = self.begin_blob()?;
        file.write_all(bytes)
            .and_then(|_| file.flush())
            .context("cannot write a blob")?;
        drop(file);
        self.commit_blob(pending, &digest)?;
        Ok(oci::descriptor(media_type, &digest, bytes.len() as u64))
    }

    /// A reader of the blob `desc` names that checks its size and digest as it goes: it fails
    /// with a [`CorruptBlob`] (inside the `io::Error`) instead of handing out the last bytes
    /// of a wrong blob, and as soon as the blob turns out longer than `desc.size`.
    pub fn open_blob(&self, desc: &Descriptor) -> Result<BlobReader<File>> {
        let digest = desc.blob()?;
        let path = self.blob_path(&digest);
        let file =
            File::open(&path).with_context(|| format!("{}: cannot open blob", path.display()))?;
        Ok(BlobReader::new(file, path, digest, desc.size()))
    }

    /// The whole blob `desc` names, checked against its size and digest.
    pub fn read_descriptor(&self, desc: &Descriptor) -> Result<Vec<u8>> {
        let mut reader = self.open_blob(desc)?;
        let mut bytes = Vec::with_capacity(desc.size().min(1 << 20) as usize);
        reader
            .read_to_end(&mut bytes)
            .map_err(|e| blob_error(e, reader.path(), "cannot read blob"))?;
        Ok(bytes)
    }

    /// The whole blob stored under `digest`, checked against the digest.
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>> {
        let path = self.blob_path(digest);
        let bytes =
            fs::read(&path).with_context(|| format!("{}: cannot read blob", path.display()))?;
        let found = Digest::of(&bytes);
        if &found != digest {
            return Err(CorruptBlob {
                path,
                digest: digest.clone(),
                size: None,
                found: Found::Content(bytes.len() as u64, found),
            }
            .into());
        }
        Ok(bytes)
    }

    pub fn read_index(&self) -> Result<ImageIndex> {
        let path = self.root.join("index.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{}: not a valid OCI index", path.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(empty_index()),
            Err(e) => Err(e).with_context(|| format!("{}: cannot read", path.display())),
        }
    }

    /// Point `reference` at `manifest`, replacing only an earlier entry of the same name.
    pub fn tag(&self, reference: &str, mut manifest: Descriptor) -> Result<()> {
        self.ensure_layout()?;
        let _lock = self.lock()?;
        let mut index = self.read_index()?;
        manifest.set_annotation(REF_NAME, reference);
        let mut manifests = index.manifests().clone();
        match manifests
            .iter_mut()
            .find(|d| d.ref_name() == Some(reference))
        {
            Some(slot) => *slot = manifest,
            None => manifests.push(manifest),
        }
        index.set_manifests(manifests);
        write_atomic(&self.root.join("index.json"), &to_json(&index)?)
    }

    /// Remove the entry `reference` from `index.json` (nothing when there is none); its
    /// blobs stay until `gc`, or a failed command's [`BlobSession`], removes them.
    pub fn untag(&self, reference: &str) -> Result<()> {
        let _lock = self.lock()?;
        let mut index = self.read_index()?;
        let mut manifests = index.manifests().clone();
        let before = manifests.len();
        manifests.retain(|d| d.ref_name() != Some(reference));
        if manifests.len() == before {
            return Ok(());
        }
        index.set_manifests(manifests);
        write_atomic(&self.root.join("index.json"), &to_json(&index)?)
    }

    /// The manifest descriptor tagged `reference`.
    pub fn resolve(&self, reference: &str) -> Result<Descriptor> {
        let index = self.read_index()?;
        match index
            .manifests()
            .iter()
            .find(|d| d.ref_name() == Some(reference))
        {
            Some(d) => Ok(d.clone()),
            None => bail!(
                "{}: no image named {reference} in the store",
                self.root.display()
            ),
        }
    }

    /// The manifest `desc` names, checked against its size and digest.
    pub fn read_manifest(&self, desc: &Descriptor) -> Result<ImageManifest> {
        let bytes = self.read_descriptor(desc)?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("manifest {} is not valid JSON", desc.digest()))
    }

    /// Every blob an entry of `index.json` reaches: the manifests and indexes it names, their
    /// configs and layers, and so on down. Manifests and indexes are read checked; one that
    /// is missing or corrupt is an error, as nothing could tell what it references.
    ///
    /// A referrer (an untagged entry whose manifest has a `subject`, such as an SBOM
    /// [attached](Store::attach) to an image) counts only while its subject is reached
    /// otherwise: it goes with its image.
    pub fn reachable(&self) -> Result<BTreeSet<Digest>> {
        let mut roots = Vec::new();
        let mut referrers = Vec::new();
        for d in self.read_index()?.manifests() {
            let entry = match d.ref_name() {
                Some(name) => name.to_string(),
                None => d.digest().to_string(),
            };
            let subject = match d.ref_name() {
                Some(_) => None,
                None => self
                    .subject_of(d)
                    .with_context(|| format!("{entry}: cannot read its {}", d.kind()))?,
            };
            match subject {
                Some(subject) => referrers.push((entry, d.clone(), subject)),
                None => roots.push((entry, d.clone())),
            }
        }
        let mut seen = BTreeSet::new();
        self.reach(roots, &mut seen)?;
        loop {
            let (ready, waiting): (Vec<_>, Vec<_>) = referrers
                .into_iter()
                .partition(|(_, _, subject)| seen.contains(subject));
            if ready.is_empty() {
                break;
            }
            let ready = ready.into_iter().map(|(e, d, _)| (e, d)).collect();
            self.reach(ready, &mut seen)?;
            referrers = waiting;
        }
        Ok(seen)
    }

    /// The digest of the `subject` of the manifest `desc` names, if it is a manifest with one.
    fn subject_of(&self, desc: &Descriptor) -> Result<Option<Digest>> {
        if !is_manifest_type(desc.kind()) {
            return Ok(None);
        }
        let bytes = self.read_descriptor(desc)?;
        let refs: References = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a valid {}", desc.digest(), desc.kind()))?;
        refs.subject.map(|s| s.blob()).transpose()
    }

    /// Add to `seen` every blob reached from `todo` (entry name, descriptor).
    fn reach(
        &self,
        mut todo: Vec<(String, Descriptor)>,
        seen: &mut BTreeSet<Digest>,
    ) -> Result<()> {
        while let Some((entry, desc)) = todo.pop() {
            let digest = desc
                .blob()
                .with_context(|| format!("{entry}: cannot read its {}", desc.kind()))?;
            if !seen.insert(digest) || !is_manifest_type(desc.kind()) {
                continue;
            }
            let bytes = self
                .read_descriptor(&desc)
                .with_context(|| format!("{entry}: cannot read its {}", desc.kind()))?;
            let refs: References = serde_json::from_slice(&bytes).with_context(|| {
                format!("{entry}: {} is not a valid {}", desc.digest(), desc.kind())
            })?;
            todo.extend(
                refs.config
                    .into_iter()
                    .chain(refs.subject)
                    .chain(refs.layers)
                    .chain(refs.manifests)
                    .chain(refs.blobs)
                    .map(|d| (entry.clone(), d)),
            );
        }
        Ok(())
    }

    /// Store an artifact about `subject` (a manifest in the store): a manifest of
    /// `artifactType` `media_type` with the empty config, one layer of `media_type` holding
    /// `content`, and `subject`. It is kept in `index.json` untagged, and lives as long as its
    /// subject does (see [`Store::reachable`]). The same content stored again changes
    /// nothing. Returns the artifact manifest's descriptor.
    pub fn attach(
        &self,
        subject: &Descriptor,
        media_type: &str,
        content: &[u8],
        annotations: &BTreeMap<String, String>,
    ) -> Result<Descriptor> {
        let mut empty = self.put_bytes(EMPTY_MEDIA_TYPE, EMPTY_BLOB)?;
        empty.set_data(Some("e30=".to_string()));
        let layer = self.put_bytes(media_type, content)?;
        let annotations: std::collections::HashMap<_, _> =
            annotations.clone().into_iter().collect();
        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .artifact_type(MediaType::from(media_type))
            .config(empty)
            .layers(vec![layer])
            .subject(subject.plain())
            .annotations(annotations.clone())
            .build()
            .context("cannot make the artifact manifest")?;
        let mut desc = self.put_bytes(MANIFEST_MEDIA_TYPE, &to_json(&manifest)?)?;
        desc.set_artifact_type(Some(MediaType::from(media_type)));
        desc.set_annotations(Some(annotations));
        self.ensure_layout()?;
        let _lock = self.lock()?;
        let mut index = self.read_index()?;
        if !index
            .manifests()
            .iter()
            .any(|d| d.digest() == desc.digest() && d.ref_name().is_none())
        {
            let mut manifests = index.manifests().clone();
            manifests.push(desc.clone());
            index.set_manifests(manifests);
            write_atomic(&self.root.join("index.json"), &to_json(&index)?)?;
        }
        Ok(desc)
    }

    /// The artifacts in the store whose subject is `subject` (of `artifact_type` only, when
    /// given), as `index.json` lists them.
    pub fn referrers(
        &self,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Descriptor>> {
        let mut found = Vec::new();
        for d in self.read_index()?.manifests() {
            if d.ref_name().is_some()
                || artifact_type
                    .is_some_and(|t| d.artifact_type().as_ref().map(|a| a.as_ref()) != Some(t))
            {
                continue;
            }
            if self
                .subject_of(d)
                .with_context(|| format!("the store's entry {}", d.digest()))?
                .as_ref()
                == Some(subject)
            {
                found.push(d.clone());
            }
        }
        Ok(found)
    }

    /// Drop the entries of `index.json` that `reachable` does not hold (referrers whose
    /// subject is gone).
    fn drop_orphans(&self, reachable: &BTreeSet<Digest>) -> Result<()> {
        let _lock = self.lock()?;
        let mut index = self.read_index()?;
        let before = index.manifests().len();
        let mut manifests = index.manifests().clone();
        manifests.retain(|d| d.blob().is_ok_and(|b| reachable.contains(&b)));
        if manifests.len() != before {
            index.set_manifests(manifests);
            write_atomic(&self.root.join("index.json"), &to_json(&index)?)?;
        }
        Ok(())
    }

    /// An exclusive lock on the store, held while `index.json` is rewritten.
    fn lock(&self) -> Result<File> {
        lock_file(&self.root.join(".lock"), "the store")
    }

    /// The writer lock held exclusively: no other command is writing to the store. This
    /// store value's own shared lock is given up first. `Ok(None)`: another command is.
    fn lock_out_writers(&self) -> Result<Option<File>> {
        drop(relock(&self.shared.writer).take());
        let path = self.root.join(WRITERS_LOCK);
        let file = open_lock_file(&path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("{}: cannot lock the store", path.display()))
            }
        }
    }

    /// Remove what no entry of `index.json` reaches: blobs, and temporary files (a run that
    /// was killed left them). With `dry_run`, only say what would go. Refused while another
    /// command writes to the store: what it wrote is not tagged yet.
    pub fn collect_garbage(&self, dry_run: bool) -> Result<Vec<Garbage>> {
        if !self.root.join("index.json").is_file() {
            if self.root.exists() {
                bail!(
                    "{}: not an image store (no index.json)",
                    self.root.display()
                );
            }
            return Ok(Vec::new());
        }
        let Some(_writers) = self.lock_out_writers()? else {
            bail!(
                "{}: another gentoo-mkimg command is writing to the store; run gc when it has \
                 finished",
                self.root.display()
            );
        };
        let reachable = self.reachable().map_err(|e| {
            anyhow!(
                "{}: gc removes nothing, as it cannot tell which blobs an image uses: {e:#}; \
                 build or import that image again first",
                self.root.display()
            )
        })?;
        if !dry_run {
            self.drop_orphans(&reachable)?;
        }
        let mut garbage = Vec::new();
        for dir in [self.blobs_dir(), self.root.clone()] {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("{}: cannot list", dir.display())),
            };
            let mut found = Vec::new();
            for entry in entries {
                let entry = entry.with_context(|| format!("{}: cannot list", dir.display()))?;
                let name = entry.file_name();
                let temporary = name.as_encoded_bytes().starts_with(b".tmp-");
                let unreferenced = dir != self.root
                    && name
                        .to_str()
                        .and_then(|n| Digest::try_from(format!("sha256:{n}")).ok())
                        .is_some_and(|d| !reachable.contains(&d));
                let Ok(meta) = entry.metadata() else { continue };
                if (temporary || unreferenced) && meta.is_file() {
                    found.push(Garbage {
                        path: entry.path(),
                        size: meta.len(),
                        temporary,
                    });
                }
            }
            found.sort_by(|a, b| a.path.cmp(&b.path));
            if !dry_run && !found.is_empty() {
                for g in &found {
                    fs::remove_file(&g.path)
                        .with_context(|| format!("{}: cannot remove", g.path.display()))?;
                }
                sync_dir(&dir)?;
            }
            garbage.extend(found);
        }
        Ok(garbage)
    }
}

/// A file [`Store::collect_garbage`] removed (or would remove).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Garbage {
    pub path: PathBuf,
    pub size: u64,
    /// A temporary file rather than a blob.
    pub temporary: bool,
}

/// The blobs one command writes, removed again unless it succeeds.
///
/// [`Store::session`] starts one; every blob this store value or a clone of it newly stores
/// from then on is recorded (a blob that was there already is not). Dropping the session
/// without [`BlobSession::commit`] removes the recorded blobs that no entry of `index.json`
/// reaches, so a command that fails after writing layers (or while tagging) leaves none.
/// Nothing is removed while another command writes to the same store (it may be about to tag
/// an identical blob), nor when `index.json` cannot be read: `gentoo-mkimg gc` takes those.
pub struct BlobSession {
    store: Store,
    written: WrittenSet,
    committed: bool,
}

impl BlobSession {
    /// The command succeeded: keep every blob it wrote.
    pub fn commit(mut self) {
        self.committed = true;
    }

    /// The blobs recorded so far.
    pub fn written(&self) -> BTreeSet<Digest> {
        relock(&self.written).clone()
    }
}

impl Drop for BlobSession {
    fn drop(&mut self) {
        let written = std::mem::take(&mut *relock(&self.written));
        if self.committed || written.is_empty() {
            return;
        }
        let store = &self.store;
        let left = |why: &dyn fmt::Display| {
            tracing::warn!(
                "{}: {} blobs of the failed command are left for gentoo-mkimg gc: {why}",
                store.root.display(),
                written.len()
            )
        };
        let _writers = match store.lock_out_writers() {
            Ok(Some(lock)) => lock,
            Ok(None) => return left(&"another command is writing to the store"),
            Err(e) => return left(&format!("{e:#}")),
        };
        let reachable = match store.reachable() {
            Ok(r) => r,
            Err(e) => return left(&format!("{e:#}")),
        };
        let mut removed = 0;
        for digest in written.difference(&reachable) {
            let path = store.blob_path(digest);
            match fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("{}: cannot remove: {e}", path.display()),
            }
        }
        if removed > 0 {
            let _ = sync_dir(&store.blobs_dir());
            tracing::info!(
                "{}: removed {removed} blobs the failed command wrote",
                store.root.display()
            );
        }
    }
}

/// What a manifest or an index references (whatever its kind, all optional).
#[derive(Deserialize)]
struct References {
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    subject: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
    #[serde(default)]
    blobs: Vec<Descriptor>,
}

/// An `index.json` with no entries.
fn empty_index() -> ImageIndex {
    let mut index = ImageIndex::default();
    index.set_media_type(Some(MediaType::ImageIndex));
    index
}

/// Media types whose blobs reference others: OCI and Docker manifests, indexes and lists.
fn is_manifest_type(media_type: &str) -> bool {
    media_type.contains("manifest") || media_type.ends_with("image.index.v1+json")
}

/// What a blob turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// This many bytes (more or fewer than expected).
    Size(u64),
    /// This many bytes with this digest.
    Content(u64, Digest),
    /// More bytes than expected (reading stopped there).
    Longer,
}

/// A stored blob whose size or digest is not what its name and descriptor say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptBlob {
    pub path: PathBuf,
    pub digest: Digest,
    /// The size its descriptor gives, when one was read.
    pub size: Option<u64>,
    pub found: Found,
}

impl CorruptBlob {
    /// The [`CorruptBlob`] an `io::Error` of a [`BlobReader`] carries, or the error itself.
    pub fn take(err: io::Error) -> std::result::Result<CorruptBlob, io::Error> {
        if err.get_ref().is_some_and(|e| e.is::<CorruptBlob>()) {
            let inner = err.into_inner().expect("checked above");
            return Ok(*inner.downcast::<CorruptBlob>().expect("checked above"));
        }
        Err(err)
    }
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Found::Size(n) => write!(f, "{n} bytes"),
            Found::Content(n, d) => write!(f, "{n} bytes with {d}"),
            Found::Longer => f.write_str("more bytes"),
        }
    }
}

impl fmt::Display for CorruptBlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: corrupt blob (expected ", self.path.display())?;
        if let Some(size) = self.size {
            write!(f, "{size} bytes with ")?;
        }
        write!(
            f,
            "{}, found {}): run gentoo-mkimg gc, then build or import again",
            self.digest, self.found
        )
    }
}

impl std::error::Error for CorruptBlob {}

/// An error of reading blob `path`: its [`CorruptBlob`] as it is, anything else with `what`.
pub fn blob_error(err: io::Error, path: &Path, what: &str) -> anyhow::Error {
    match CorruptBlob::take(err) {
        Ok(corrupt) => corrupt.into(),
        Err(e) => anyhow::Error::new(e).context(format!("{}: {what}", path.display())),
    }
}

/// Reads a blob and checks it on the way: the bytes that complete it are handed out only once
/// its digest matched, a blob longer than expected fails as soon as that shows, and one that
/// ends early fails at its end. The errors carry a [`CorruptBlob`].
pub struct BlobReader<R> {
    inner: R,
    path: PathBuf,
    digest: Digest,
    size: u64,
    hasher: Sha256,
    count: u64,
    /// Set once the blob turned out wrong: every later read fails the same way.
    failed: Option<Found>,
}

impl<R: Read> BlobReader<R> {
    pub fn new(inner: R, path: PathBuf, digest: Digest, size: u64) -> Self {
        BlobReader {
            inner,
            path,
            digest,
            size,
            hasher: Sha256::new(),
            count: 0,
            failed: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn corrupt(&mut self, found: Found) -> io::Error {
        self.failed = Some(found.clone());
        io::Error::new(
            io::ErrorKind::InvalidData,
            CorruptBlob {
                path: self.path.clone(),
                digest: self.digest.clone(),
                size: Some(self.size),
                found,
            },
        )
    }
}

impl<R: Read> Read for BlobReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(found) = self.failed.clone() {
            return Err(self.corrupt(found));
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let left = self.size - self.count;
        if left == 0 {
            // Everything was handed out and checked; anything more was refused already.
            return Ok(0);
        }
        // Never more than the blob has left, so the end is seen where it should be.
        let want = buf.len().min(left.min(usize::MAX as u64) as usize);
        let n = loop {
            match self.inner.read(&mut buf[..want]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        if n == 0 {
            let digest = Digest::from_sha256(self.hasher.clone().finalize().as_slice());
            return Err(self.corrupt(Found::Content(self.count, digest)));
        }
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        if self.count == self.size {
            let mut probe = [0u8; 1];
            let more = loop {
                match self.inner.read(&mut probe) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => break other?,
                }
            };
            if more > 0 {
                return Err(self.corrupt(Found::Longer));
            }
            let digest = Digest::from_sha256(self.hasher.clone().finalize().as_slice());
            if digest != self.digest {
                return Err(self.corrupt(Found::Content(self.size, digest)));
            }
        }
        Ok(n)
    }
}

/// Whether `path` holds `size` bytes with `digest`: `Ok(None)` if so, what it holds if not.
fn check_file(path: &Path, digest: &Digest, size: u64) -> io::Result<Option<Found>> {
    let mut file = File::open(path)?;
    let on_disk = file.metadata()?.len();
    if on_disk != size {
        return Ok(Some(Found::Size(on_disk)));
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let found = Digest::from_sha256(hasher.finalize().as_slice());
    Ok((&found != digest).then_some(Found::Content(size, found)))
}

fn relock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A lock file, opened for writing if it can be (created as the umask allows), else for
/// reading: `flock` works on either, and a store may belong to another user.
fn open_lock_file(path: &Path) -> Result<File> {
    File::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .or_else(|e| match e.kind() {
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => File::open(path),
            _ => Err(e),
        })
        .with_context(|| format!("{}: cannot open the store lock", path.display()))
}

/// A `.tmp-*` file in `dir`, created `0666` less the umask (tempfile's own default is `0600`,
/// which would keep the store from other users and engines).
fn temp_file_in(dir: &Path) -> io::Result<tempfile::NamedTempFile> {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .prefix(".tmp-")
        .permissions(fs::Permissions::from_mode(0o666))
        .tempfile_in(dir)
}

/// Make the names in `dir` durable (after a rename or removal there).
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("{}: cannot sync the directory", dir.display()))
}

/// A temporary blob untouched for this long belongs to a run that was killed (a live writer
/// touches its file all the time; even a slow push of a big layer writes nothing here).
const STALE_TMP_AGE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Remove `.tmp-*` files in `dir` not modified for `max_age`: what a killed run left.
/// Best effort: a file that cannot be removed stays for the next sweep.
fn sweep_stale_tmp(dir: &Path, max_age: std::time::Duration) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().as_encoded_bytes().starts_with(b".tmp-") {
            continue;
        }
        let stale = entry
            .metadata()
            .ok()
            .filter(|m| m.is_file())
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > max_age);
        if stale && fs::remove_file(entry.path()).is_ok() {
            tracing::info!("removed {}, left by a killed run", entry.path().display());
        }
    }
}

/// Write `bytes` to `path` durably and atomically: a temporary file in the same directory
/// (created `0666` less the umask), synced, renamed over `path`, and the directory synced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = temp_file_in(dir)
        .with_context(|| format!("{}: cannot create a temporary file", dir.display()))?;
    tmp.write_all(bytes)
        .and_then(|_| tmp.as_file().sync_all())
        .with_context(|| format!("{}: cannot write", path.display()))?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("{}: cannot replace", path.display()))?;
    sync_dir(dir)
}

/// Open (or make) the lock file `path` and wait for its exclusive lock (flock: it goes with
/// the process), which keeps `what` (for messages) while the file is open.
pub fn lock_file(path: &Path, what: &str) -> Result<File> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("{}: cannot open {what} lock", path.display()))?;
    file.lock()
        .with_context(|| format!("{}: cannot lock {what}", path.display()))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_temporary_blobs_are_swept_and_fresh_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("store"));
        store.ensure_layout().unwrap();
        let blobs = store.blobs_dir();
        let old = blobs.join(".tmp-killed");
        let fresh = blobs.join(".tmp-writing");
        let real = blobs.join("0".repeat(64));
        for p in [&old, &fresh, &real] {
            fs::write(p, b"x").unwrap();
        }
        let two_days_ago =
            std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 86_400);
        for p in [&old, &real] {
            fs::File::options()
                .write(true)
                .open(p)
                .and_then(|f| f.set_modified(two_days_ago))
                .unwrap();
        }
        store.ensure_layout().unwrap();
        assert!(!old.exists(), "a stale temporary blob was kept");
        assert!(fresh.exists(), "a temporary blob being written was removed");
        assert!(real.exists(), "a stored blob was removed");
    }

    #[test]
    fn retagging_replaces_only_that_entry_and_blobs_are_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("images"));
        let a = store.put_bytes(MANIFEST_MEDIA_TYPE, b"{\"a\":1}").unwrap();
        let again = store.put_bytes(MANIFEST_MEDIA_TYPE, b"{\"a\":1}").unwrap();
        assert_eq!(a, again);
        let b = store.put_bytes(MANIFEST_MEDIA_TYPE, b"{\"b\":2}").unwrap();
        store.tag("localhost/x-raw:1", a.clone()).unwrap();
        store.tag("localhost/x-dev:1", a.clone()).unwrap();
        store.tag("localhost/x-raw:1", b.clone()).unwrap();
        let index = store.read_index().unwrap();
        let names: Vec<_> = index
            .manifests()
            .iter()
            .map(|d| d.ref_name().unwrap())
            .collect();
        assert_eq!(names, ["localhost/x-raw:1", "localhost/x-dev:1"]);
        assert_eq!(
            store.resolve("localhost/x-raw:1").unwrap().digest(),
            b.digest()
        );
        assert_eq!(
            store.resolve("localhost/x-dev:1").unwrap().digest(),
            a.digest()
        );
        let blobs: Vec<_> = fs::read_dir(store.root().join("blobs/sha256"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(blobs.len(), 2, "{blobs:?}");
        assert!(store.resolve("localhost/none:1").is_err());
    }

    /// Read `bytes` as a blob described as `size` bytes with `digest`: what came out, and
    /// the error, if any.
    fn read_checked(bytes: &[u8], digest: &Digest, size: u64) -> (Vec<u8>, Option<CorruptBlob>) {
        let mut reader = BlobReader::new(bytes, PathBuf::from("b"), digest.clone(), size);
        let mut out = Vec::new();
        let mut buf = [0u8; 7];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => return (out, None),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => return (out, Some(CorruptBlob::take(e).expect("a CorruptBlob"))),
            }
        }
    }

    #[test]
    fn reading_checks_size_and_digest_and_withholds_the_end_of_a_wrong_blob() {
        let good = b"0123456789abcdefghij".to_vec();
        let digest = Digest::of(&good);
        let size = good.len() as u64;
        assert_eq!(read_checked(&good, &digest, size), (good.clone(), None));

        let (out, err) = read_checked(&good[..15], &digest, size);
        assert_eq!(out, &good[..15]);
        let err = err.expect("a short blob fails");
        assert_eq!(err.found, Found::Content(15, Digest::of(&good[..15])));
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "b: corrupt blob (expected 20 bytes with {digest}, found 15 bytes with sha256:"
            )) && text.ends_with("): run gentoo-mkimg gc, then build or import again"),
            "{text}"
        );

        let mut flipped = good.clone();
        flipped[19] ^= 1;
        let (out, err) = read_checked(&flipped, &digest, size);
        assert!(out.len() < good.len(), "the last bytes were handed out");
        assert_eq!(
            err.map(|e| e.found),
            Some(Found::Content(20, Digest::of(&flipped)))
        );

        let longer = [&good[..], b"more"].concat();
        let (out, err) = read_checked(&longer, &digest, size);
        assert!(out.len() < good.len());
        assert_eq!(err.map(|e| e.found), Some(Found::Longer));
    }

    #[test]
    fn a_wrong_file_under_a_digest_is_replaced_and_a_right_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("images"));
        let desc = store.put_bytes(CONFIG_MEDIA_TYPE, b"{\"c\":1}").unwrap();
        let path = store.blob_path(&desc.blob().unwrap());
        for wrong in [&b"{\"c\":2}"[..], b"{\"c\"", b""] {
            fs::write(&path, wrong).unwrap();
            let err = store.read_descriptor(&desc).unwrap_err();
            assert!(format!("{err:#}").contains("corrupt blob"), "{err:#}");
            store.put_bytes(CONFIG_MEDIA_TYPE, b"{\"c\":1}").unwrap();
            assert_eq!(fs::read(&path).unwrap(), b"{\"c\":1}");
        }
        let before = fs::metadata(&path).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        store.put_bytes(CONFIG_MEDIA_TYPE, b"{\"c\":1}").unwrap();
        assert_eq!(fs::metadata(&path).unwrap().modified().unwrap(), before);
    }

    #[test]
    fn a_session_removes_its_untagged_blobs_unless_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("images"));
        let old = store.put_bytes(CONFIG_MEDIA_TYPE, b"old").unwrap();

        let session = store.session();
        let again = store.put_bytes(CONFIG_MEDIA_TYPE, b"old").unwrap();
        let tagged = store.put_bytes(MANIFEST_MEDIA_TYPE, b"{}").unwrap();
        let loose = store.put_bytes(CONFIG_MEDIA_TYPE, b"loose").unwrap();
        store.tag("localhost/x:1", tagged.clone()).unwrap();
        assert_eq!(
            session.written(),
            BTreeSet::from([tagged.blob().unwrap(), loose.blob().unwrap()]),
            "a blob that was there already is not the session's"
        );
        drop(session);
        assert!(store.has_blob(&old.blob().unwrap()) && store.has_blob(&again.blob().unwrap()));
        assert!(
            store.has_blob(&tagged.blob().unwrap()),
            "a tagged blob was removed"
        );
        assert!(
            !store.has_blob(&loose.blob().unwrap()),
            "an untagged blob was left"
        );

        let session = store.session();
        let kept = store.put_bytes(CONFIG_MEDIA_TYPE, b"kept").unwrap();
        session.commit();
        assert!(store.has_blob(&kept.blob().unwrap()));
    }

    #[test]
    fn nothing_is_removed_while_another_command_writes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("images");
        let other = Store::new(&root);
        other.put_bytes(CONFIG_MEDIA_TYPE, b"other").unwrap(); // holds the writer lock
        let store = Store::new(&root);
        let session = store.session();
        let loose = store.put_bytes(CONFIG_MEDIA_TYPE, b"loose").unwrap();
        drop(session);
        assert!(
            store.has_blob(&loose.blob().unwrap()),
            "removed while another wrote"
        );
        let err = store.collect_garbage(true).unwrap_err();
        assert!(
            format!("{err:#}").contains("is writing to the store"),
            "{err:#}"
        );
        drop(other);
        let garbage = store.collect_garbage(false).unwrap();
        let paths: Vec<_> = garbage.iter().map(|g| g.path.clone()).collect();
        assert_eq!(paths.len(), 2, "{paths:?}");
        assert!(!store.has_blob(&loose.blob().unwrap()));
    }

    #[test]
    fn malformed_digests_are_refused() {
        assert!(Digest::try_from("sha256:abc".to_string()).is_err());
        assert!(Digest::try_from(format!("md5:{}", "0".repeat(64))).is_err());
        assert!(Digest::try_from(format!("sha256:{}", "0".repeat(64))).is_ok());
    }
}
