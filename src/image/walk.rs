//! A directory tree as layer entries: the dev and rt roots become images without an
//! intermediate tarball.
//!
//! Entries come out in a fixed order (depth first, names sorted bytewise, a directory before
//! its contents), with numeric owners only, extended attributes, hard links (the second and
//! later names of an inode become links to the first), devices and fifos. Sockets cannot be
//! stored in a tar and are skipped. With `clamp_mtime` (SOURCE_DATE_EPOCH), no mtime is
//! later than that time, so the same tree gives the same layer.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use anyhow::{Context, Result};

use crate::image::layer::{EntryKind, EntryMeta, LayerWriter};

/// What a walk found.
#[derive(Debug, Clone, Default)]
pub struct WalkStats {
    pub entries: u64,
    pub bytes: u64,
    pub newest_mtime: u64,
    pub skipped_sockets: u64,
}

/// Append every entry below `root` (and `root` itself as `./`) to `layer`.
pub fn append_dir(
    root: &Path,
    layer: &mut LayerWriter,
    clamp_mtime: Option<u64>,
) -> Result<WalkStats> {
    let mut walker = Walker {
        root,
        layer,
        clamp_mtime,
        links: HashMap::new(),
        stats: WalkStats::default(),
    };
    let meta =
        fs::symlink_metadata(root).with_context(|| format!("{}: cannot read", root.display()))?;
    walker.entry(Vec::new(), &meta)?;
    walker.dir(Vec::new())?;
    Ok(walker.stats)
}

struct Walker<'a> {
    root: &'a Path,
    layer: &'a mut LayerWriter,
    clamp_mtime: Option<u64>,
    /// (device, inode) -> first path of a multiply-linked file.
    links: HashMap<(u64, u64), Vec<u8>>,
    stats: WalkStats,
}

impl Walker<'_> {
    fn full(&self, rel: &[u8]) -> std::path::PathBuf {
        if rel.is_empty() {
            self.root.to_path_buf()
        } else {
            self.root.join(OsStr::from_bytes(rel))
        }
    }

    fn dir(&mut self, rel: Vec<u8>) -> Result<()> {
        let path = self.full(&rel);
        let mut names: Vec<Vec<u8>> = fs::read_dir(&path)
            .with_context(|| format!("{}: cannot list", path.display()))?
            .map(|e| e.map(|e| e.file_name().as_bytes().to_vec()))
            .collect::<Result<_, _>>()
            .with_context(|| format!("{}: cannot list", path.display()))?;
        names.sort();
        for name in names {
            let mut child = rel.clone();
            if !child.is_empty() {
                child.push(b'/');
            }
            child.extend_from_slice(&name);
            let child_path = self.full(&child);
            let meta = fs::symlink_metadata(&child_path)
                .with_context(|| format!("{}: cannot read", child_path.display()))?;
            let is_dir = meta.is_dir();
            self.entry(child.clone(), &meta)?;
            if is_dir {
                self.dir(child)?;
            }
        }
        Ok(())
    }

    fn entry(&mut self, rel: Vec<u8>, meta: &fs::Metadata) -> Result<()> {
        let path = self.full(&rel);
        let ft = meta.file_type();
        let mut kind = if ft.is_dir() {
            EntryKind::Directory
        } else if ft.is_symlink() {
            let target = fs::read_link(&path)
                .with_context(|| format!("{}: cannot read the link", path.display()))?;
            EntryKind::Symlink {
                target: target.as_os_str().as_bytes().to_vec(),
            }
        } else if ft.is_file() {
            EntryKind::Regular { size: meta.len() }
        } else if ft.is_char_device() || ft.is_block_device() {
            let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
            if ft.is_char_device() {
                EntryKind::Char { major, minor }
            } else {
                EntryKind::Block { major, minor }
            }
        } else if ft.is_fifo() {
            EntryKind::Fifo
        } else {
            tracing::warn!("{}: skipping a socket", path.display());
            self.stats.skipped_sockets += 1;
            return Ok(());
        };
        if !ft.is_dir() && meta.nlink() > 1 {
            let key = (meta.dev(), meta.ino());
            match self.links.get(&key) {
                Some(first) => {
                    kind = EntryKind::HardLink {
                        target: first.clone(),
                    }
                }
                None => {
                    self.links.insert(key, rel.clone());
                }
            }
        }
        let mut xattrs = Vec::new();
        let mut names: Vec<_> = if matches!(kind, EntryKind::HardLink { .. }) {
            Vec::new() // the inode's attributes went with its first name
        } else {
            xattr::list(&path)
                .with_context(|| format!("{}: cannot list extended attributes", path.display()))?
                .collect()
        };
        names.sort();
        for name in names {
            let Some(text) = name.to_str() else { continue };
            if text.starts_with("trusted.overlay.") {
                continue; // overlayfs bookkeeping of the directory the root was built in
            }
            if let Some(value) = xattr::get(&path, &name)
                .with_context(|| format!("{}: cannot read the attribute {text}", path.display()))?
            {
                xattrs.push((text.to_string(), value));
            }
        }
        let mut mtime = meta.mtime().max(0) as u64;
        if let Some(clamp) = self.clamp_mtime {
            mtime = mtime.min(clamp);
        }
        self.stats.entries += 1;
        self.stats.newest_mtime = self.stats.newest_mtime.max(mtime);
        let entry = EntryMeta {
            path: rel,
            kind,
            mode: meta.mode() & 0o7777,
            uid: u64::from(meta.uid()),
            gid: u64::from(meta.gid()),
            uname: Vec::new(),
            gname: Vec::new(),
            mtime,
            xattrs,
        };
        if let EntryKind::Regular { size } = entry.kind {
            let mut file =
                File::open(&path).with_context(|| format!("{}: cannot open", path.display()))?;
            self.layer.append(&entry, &mut file).with_context(|| {
                format!(
                    "{}: cannot add to the layer (changed while read?)",
                    path.display()
                )
            })?;
            self.stats.bytes += size;
        } else {
            self.layer
                .append(&entry, &mut std::io::empty())
                .with_context(|| format!("{}: cannot add to the layer", path.display()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::layer::LayerCompression;
    use crate::image::store::Store;
    use std::io::Read;

    #[test]
    fn a_tree_becomes_a_sorted_layer_with_links_and_xattrs() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        fs::create_dir_all(root.join("usr/bin")).unwrap();
        fs::write(root.join("usr/bin/b"), "bee").unwrap();
        fs::hard_link(root.join("usr/bin/b"), root.join("usr/bin/a")).unwrap();
        std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
        xattr::set(root.join("usr/bin/b"), "user.k", b"v").unwrap();
        nix::unistd::mkfifo(
            &root.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();

        let store = Store::new(tmp.path().join("store"));
        let digest_of = |clamp| {
            let mut w = LayerWriter::new(&store, LayerCompression::None).unwrap();
            let stats = append_dir(&root, &mut w, clamp).unwrap();
            (w.finish(&store).unwrap(), stats)
        };
        let (info, stats) = digest_of(Some(1000));
        assert_eq!(stats.entries, 7);
        assert_eq!(stats.newest_mtime, 1000);
        assert_eq!(
            digest_of(Some(1000)).0.digest,
            info.digest,
            "not deterministic"
        );

        let bytes = fs::read(store.blob_path(&info.digest)).unwrap();
        let mut ar = tar::Archive::new(&bytes[..]);
        let mut seen = Vec::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let name = String::from_utf8(e.path_bytes().into_owned()).unwrap();
            let kind = e.header().entry_type();
            let xattr = e.pax_extensions().unwrap().map(|x| x.count()).unwrap_or(0);
            let mut data = String::new();
            e.read_to_string(&mut data).unwrap();
            seen.push((name, kind, xattr, data));
        }
        let names: Vec<_> = seen.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "./",
                "bin",
                "fifo",
                "usr/",
                "usr/bin/",
                "usr/bin/a",
                "usr/bin/b"
            ]
        );
        assert_eq!(seen[5].3, "bee", "the first name carries the data");
        assert_eq!(seen[6].1, tar::EntryType::Link);
        assert_eq!(seen[6].2, 0, "links carry no xattrs of their own");
        assert_eq!(seen[5].2, 1, "xattr on the data entry");
        assert_eq!(seen[2].1, tar::EntryType::Fifo);
    }
}
