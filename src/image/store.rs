//! The image store: an OCI image layout directory (`oci-layout`, `index.json`,
//! `blobs/sha256/`) holding every image the tool makes.
//!
//! Each image is one manifest entry in `index.json`, named by the
//! `org.opencontainers.image.ref.name` annotation carrying the full reference
//! (`REPO/NAME:TAG`). Blobs are written to a temporary file in `blobs/sha256/` and renamed
//! into place, so a reader never sees half a blob; identical blobs are stored once.
//! `index.json` is replaced atomically under an exclusive lock, and re-tagging a reference
//! replaces only that entry. The store never deletes blobs on its own.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";

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

/// An OCI content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<serde_json::Value>,
}

impl Descriptor {
    pub fn new(media_type: &str, digest: Digest, size: u64) -> Self {
        Descriptor {
            media_type: media_type.to_string(),
            digest,
            size,
            annotations: BTreeMap::new(),
            platform: None,
        }
    }

    pub fn ref_name(&self) -> Option<&str> {
        self.annotations.get(REF_NAME).map(String::as_str)
    }
}

/// `index.json` of an image layout.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Index {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

impl Default for Index {
    fn default() -> Self {
        Index {
            schema_version: 2,
            media_type: Some(INDEX_MEDIA_TYPE.to_string()),
            manifests: Vec::new(),
        }
    }
}

/// An image manifest (the fields we read back).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A temporary blob file; removed when dropped unless committed.
pub struct PendingBlob {
    path: tempfile::TempPath,
}

/// The image layout at a directory. Opening it touches nothing; the layout is created on the
/// first write.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Store { root: root.into() }
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

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Create `oci-layout`, an empty `index.json` and `blobs/sha256/` if they are missing.
    pub fn ensure_layout(&self) -> Result<()> {
        let blobs = self.blobs_dir();
        fs::create_dir_all(&blobs)
            .with_context(|| format!("{}: cannot create the image store", blobs.display()))?;
        let layout = self.root.join("oci-layout");
        if !layout.exists() {
            write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        let index = self.root.join("index.json");
        if !index.exists() {
            write_atomic(&index, &to_json(&Index::default())?)?;
        }
        sweep_stale_tmp(&blobs, STALE_TMP_AGE);
        sweep_stale_tmp(&self.root, STALE_TMP_AGE);
        Ok(())
    }

    /// Start writing a blob whose digest is not known yet.
    pub fn begin_blob(&self) -> Result<(PendingBlob, File)> {
        self.ensure_layout()?;
        let dir = self.blobs_dir();
        let tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(&dir)
            .with_context(|| format!("{}: cannot create a temporary blob", dir.display()))?;
        let (file, path) = tmp.into_parts();
        Ok((PendingBlob { path }, file))
    }

    /// Move a finished blob into place under its digest (or drop it if the store has it).
    pub fn commit_blob(&self, pending: PendingBlob, digest: &Digest) -> Result<()> {
        let dest = self.blob_path(digest);
        if dest.is_file() {
            return Ok(()); // `pending` is removed on drop
        }
        pending
            .path
            .persist(&dest)
            .map_err(|e| e.error)
            .with_context(|| format!("{}: cannot store blob", dest.display()))?;
        Ok(())
    }

    /// Store small content (a config or manifest) and describe it.
    pub fn put_bytes(&self, media_type: &str, bytes: &[u8]) -> Result<Descriptor> {
        let digest = Digest::of(bytes);
        if !self.has_blob(&digest) {
            let (pending, mut file) = self.begin_blob()?;
            file.write_all(bytes)
                .and_then(|_| file.flush())
                .context("cannot write a blob")?;
            drop(file);
            self.commit_blob(pending, &digest)?;
        }
        Ok(Descriptor::new(media_type, digest, bytes.len() as u64))
    }

    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>> {
        let path = self.blob_path(digest);
        fs::read(&path).with_context(|| format!("{}: cannot read blob", path.display()))
    }

    pub fn read_index(&self) -> Result<Index> {
        let path = self.root.join("index.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{}: not a valid OCI index", path.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Index::default()),
            Err(e) => Err(e).with_context(|| format!("{}: cannot read", path.display())),
        }
    }

    /// Point `reference` at `manifest`, replacing only an earlier entry of the same name.
    pub fn tag(&self, reference: &str, mut manifest: Descriptor) -> Result<()> {
        self.ensure_layout()?;
        let _lock = self.lock()?;
        let mut index = self.read_index()?;
        manifest
            .annotations
            .insert(REF_NAME.to_string(), reference.to_string());
        match index
            .manifests
            .iter_mut()
            .find(|d| d.ref_name() == Some(reference))
        {
            Some(slot) => *slot = manifest,
            None => index.manifests.push(manifest),
        }
        write_atomic(&self.root.join("index.json"), &to_json(&index)?)
    }

    /// The manifest descriptor tagged `reference`.
    pub fn resolve(&self, reference: &str) -> Result<Descriptor> {
        let index = self.read_index()?;
        match index
            .manifests
            .into_iter()
            .find(|d| d.ref_name() == Some(reference))
        {
            Some(d) => Ok(d),
            None => bail!(
                "{}: no image named {reference} in the store",
                self.root.display()
            ),
        }
    }

    pub fn read_manifest(&self, desc: &Descriptor) -> Result<Manifest> {
        let bytes = self.read_blob(&desc.digest)?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("manifest {} is not valid JSON", desc.digest))
    }

    /// An exclusive lock on the store, held while `index.json` is rewritten.
    fn lock(&self) -> Result<File> {
        let path = self.root.join(".lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("{}: cannot open the store lock", path.display()))?;
        file.lock()
            .with_context(|| format!("{}: cannot lock the store", path.display()))?;
        Ok(file)
    }
}

fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).context("cannot encode JSON")
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

/// Write `bytes` to `path` through a temporary file in the same directory and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .with_context(|| format!("{}: cannot create a temporary file", dir.display()))?;
    tmp.write_all(bytes)
        .and_then(|_| tmp.as_file().sync_all())
        .with_context(|| format!("{}: cannot write", path.display()))?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("{}: cannot replace", path.display()))?;
    Ok(())
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
            .manifests
            .iter()
            .map(|d| d.ref_name().unwrap())
            .collect();
        assert_eq!(names, ["localhost/x-raw:1", "localhost/x-dev:1"]);
        assert_eq!(store.resolve("localhost/x-raw:1").unwrap().digest, b.digest);
        assert_eq!(store.resolve("localhost/x-dev:1").unwrap().digest, a.digest);
        let blobs: Vec<_> = fs::read_dir(store.root().join("blobs/sha256"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(blobs.len(), 2, "{blobs:?}");
        assert!(store.resolve("localhost/none:1").is_err());
    }

    #[test]
    fn malformed_digests_are_refused() {
        assert!(Digest::try_from("sha256:abc".to_string()).is_err());
        assert!(Digest::try_from(format!("md5:{}", "0".repeat(64))).is_err());
        assert!(Digest::try_from(format!("sha256:{}", "0".repeat(64))).is_ok());
    }
}
