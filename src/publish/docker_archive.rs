//! Writing a docker-archive: the tarball `docker load` and `podman load` read.
//!
//! The archive is laid out as Docker 25+ writes it: an OCI image layout (`oci-layout`,
//! `index.json`, `blobs/sha256/...`) plus the legacy `manifest.json` that older Docker
//! releases and Podman's docker-archive transport read. Layers are copied from the store as
//! they are (compressed); both engines decompress them on load. Blobs are streamed from the
//! store and checked against their descriptors on the way ([`Store::open_blob`]): a corrupt
//! blob fails the archive before its last bytes are written. The file appears under its name
//! only when complete; a failure removes the partial file.

use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::json;

use crate::image::StoredImage;
use crate::image::oci::{ImageIndex, MediaType};
use crate::image::store::{DescriptorExt, REF_NAME, Store, blob_error, to_json};

/// Write `images` (all from `store`) to `dest` as one docker-archive.
pub fn write(store: &Store, images: &[StoredImage], dest: &Path) -> Result<()> {
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-archive-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .tempfile_in(dir)
        .with_context(|| format!("{}: cannot create a temporary file", dir.display()))?;
    let (file, tmp_path) = tmp.into_parts();
    let mut out = write_to(store, images, BufWriter::with_capacity(1 << 20, file))
        .with_context(|| format!("{}: cannot write the docker archive", dest.display()))?;
    out.flush()
        .with_context(|| format!("{}: cannot write", dest.display()))?;
    drop(out);
    tmp_path
        .persist(dest)
        .map_err(|e| e.error)
        .with_context(|| format!("{}: cannot rename into place", dest.display()))?;
    Ok(())
}

/// Write `images` (all from `store`) as one docker-archive to `out`, streaming the blobs, and
/// hand `out` back (not flushed) once the archive is complete.
pub fn write_to<W: Write>(store: &Store, images: &[StoredImage], out: W) -> Result<W> {
    let mut tar = tar::Builder::new(out);
    write_entries(store, images, &mut tar)?;
    tar.into_inner().context("cannot finish the archive")
}

fn header(size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h
}

fn add_bytes<W: Write>(tar: &mut tar::Builder<W>, name: &str, bytes: &[u8]) -> Result<()> {
    let mut h = header(bytes.len() as u64);
    tar.append_data(&mut h, name, bytes)
        .with_context(|| format!("cannot add {name}"))
}

fn write_entries<W: Write>(
    store: &Store,
    images: &[StoredImage],
    tar: &mut tar::Builder<W>,
) -> Result<()> {
    let mut dir = tar::Header::new_ustar();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_mtime(0);
    dir.set_size(0);
    for d in ["blobs/", "blobs/sha256/"] {
        tar.append_data(&mut dir.clone(), d, std::io::empty())?;
    }
    let mut written = std::collections::BTreeSet::new();
    let mut index_entries = Vec::new();
    let mut legacy = Vec::new();
    for image in images {
        let blobs = image.layers.iter().chain([&image.config, &image.manifest]);
        for desc in blobs {
            if !written.insert(desc.digest().to_string()) {
                continue;
            }
            let mut blob = store.open_blob(desc)?;
            let mut h = header(desc.size());
            tar.append_data(
                &mut h,
                format!("blobs/sha256/{}", desc.blob()?.hex()),
                &mut blob,
            )
            .map_err(|e| blob_error(e, blob.path(), "cannot copy blob"))?;
        }
        let tag = image
            .reference
            .rsplit_once(':')
            .map(|(_, t)| t)
            .unwrap_or("latest");
        let mut entry = image.manifest.plain();
        entry.set_annotation("io.containerd.image.name", &image.reference);
        entry.set_annotation(REF_NAME, tag);
        index_entries.push(entry);
        legacy.push(json!({
            "Config": format!("blobs/sha256/{}", image.config.blob()?.hex()),
            "RepoTags": [image.reference],
            "Layers": image.layers.iter()
                .map(|l| Ok(format!("blobs/sha256/{}", l.blob()?.hex())))
                .collect::<Result<Vec<_>>>()?,
        }));
    }
    add_bytes(tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let mut index = ImageIndex::default();
    index.set_media_type(Some(MediaType::ImageIndex));
    index.set_manifests(index_entries);
    add_bytes(tar, "index.json", &to_json(&index)?)?;
    add_bytes(tar, "manifest.json", &serde_json::to_vec(&legacy)?)?;
    Ok(())
}
