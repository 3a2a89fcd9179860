//! A directory tree as layer entries: the dev and rt roots become images without an
//! intermediate tarball.
//!
//! Entries come out in a fixed order (depth first, names sorted bytewise, a directory before
//! its contents), with numeric owners only, extended attributes, hard links (the second and
//! later names of an inode become links to the first), devices and fifos. Sockets cannot be
//! stored in a tar and are skipped. With `clamp_mtime` (SOURCE_DATE_EPOCH), no mtime is
//! later than that time, so the same tree gives the same layer.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat2, readlinkat};
use nix::sys::stat::{FileStat, SFlag, fstat, fstatat};
use std::os::unix::ffi::OsStrExt;

use crate::archive::ids::IdShift;
use crate::archive::pinned::{Dir, same_file};
use crate::image::layer::{EntryKind, EntryMeta, LayerWriter};

/// What a walk found.
#[derive(Debug, Clone, Default)]
pub struct WalkStats {
    pub entries: u64,
    pub bytes: u64,
    pub newest_mtime: u64,
    pub skipped_sockets: u64,
    /// `CAT/PF` of every package directory in the tree's `var/db/pkg`, sorted.
    pub packages: Vec<String>,
}

/// Append every entry below `root` (and `root` itself as `./`) to `layer`.
///
/// Owners are read back through `ids`: a tree a sandbox session made in its user namespace
/// has host owners shifted by the namespace's base; the layer gets the stage's own ids.
///
/// The tree is walked by directory file descriptor and no symlink in it is ever followed:
/// `root` itself must be a directory, not a link to one, and a link inside the tree
/// becomes a symlink entry, whatever it points at.
pub fn append_dir(
    root: &Path,
    layer: &mut LayerWriter,
    clamp_mtime: Option<u64>,
    ids: IdShift,
) -> Result<WalkStats> {
    let dir = Dir::open(root)?;
    let mut walker = Walker {
        layer,
        clamp_mtime,
        ids,
        links: HashMap::new(),
        stats: WalkStats::default(),
    };
    let st = dir.stat()?;
    walker.entry(&dir, b".", Vec::new(), &st)?;
    walker.dir(&dir, Vec::new())?;
    walker.stats.packages.sort();
    Ok(walker.stats)
}

struct Walker<'a> {
    layer: &'a mut LayerWriter,
    clamp_mtime: Option<u64>,
    ids: IdShift,
    /// (device, inode) -> first path of a multiply-linked file.
    links: HashMap<(u64, u64), Vec<u8>>,
    stats: WalkStats,
}

fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT
}

impl Walker<'_> {
    fn dir(&mut self, dir: &Dir, rel: Vec<u8>) -> Result<()> {
        for name in dir.names()? {
            let mut child = rel.clone();
            if !child.is_empty() {
                child.push(b'/');
            }
            child.extend_from_slice(&name);
            let st = fstatat(dir.fd(), name.as_slice(), AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(|e| anyhow!("{}: cannot read: {e}", dir.display(&name)))?;
            self.entry(dir, &name, child.clone(), &st)?;
            if file_type(&st) == SFlag::S_IFDIR {
                let sub = dir
                    .child(&name)
                    .with_context(|| format!("{}: cannot open", dir.display(&name)))?;
                if !same_file(&sub.stat()?, &st) {
                    bail!("{}: changed while read", dir.display(&name));
                }
                self.dir(&sub, child)?;
            }
        }
        Ok(())
    }

    /// Add the entry `name` of `dir` (`.` for `dir` itself) as `rel`.
    fn entry(&mut self, dir: &Dir, name: &[u8], rel: Vec<u8>, st: &FileStat) -> Result<()> {
        let shown = || dir.display(name);
        let ft = file_type(st);
        let mut kind = match ft {
            SFlag::S_IFDIR => {
                if let Some(package) = crate::portage::vdb::package_of_path(&rel) {
                    self.stats.packages.push(package);
                }
                EntryKind::Directory
            }
            SFlag::S_IFLNK => {
                let target = readlinkat(dir.fd(), name)
                    .map_err(|e| anyhow!("{}: cannot read the link: {e}", shown()))?;
                EntryKind::Symlink {
                    target: target.as_bytes().to_vec(),
                }
            }
            SFlag::S_IFREG => EntryKind::Regular {
                size: st.st_size as u64,
            },
            SFlag::S_IFCHR | SFlag::S_IFBLK => {
                let (major, minor) = (libc::major(st.st_rdev), libc::minor(st.st_rdev));
                if ft == SFlag::S_IFCHR {
                    EntryKind::Char { major, minor }
                } else {
                    EntryKind::Block { major, minor }
                }
            }
            SFlag::S_IFIFO => EntryKind::Fifo,
            _ => {
                tracing::warn!("{}: skipping a socket", shown());
                self.stats.skipped_sockets += 1;
                return Ok(());
            }
        };
        if ft != SFlag::S_IFDIR && st.st_nlink > 1 {
            let key = (st.st_dev, st.st_ino);
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
        // llistxattr/lgetxattr on /proc/self/fd/N/NAME: the name is not followed.
        let at = dir.proc_child(name);
        let mut xattrs = Vec::new();
        let mut names: Vec<_> = if matches!(kind, EntryKind::HardLink { .. }) {
            Vec::new() // the inode's attributes went with its first name
        } else {
            xattr::list(&at)
                .with_context(|| format!("{}: cannot list extended attributes", shown()))?
                .collect()
        };
        names.sort();
        for attr in names {
            let Some(text) = attr.to_str() else { continue };
            if text.starts_with("trusted.overlay.") || text.starts_with("user.overlay.") {
                continue; // overlayfs bookkeeping of the directory the root was built in
            }
            if let Some(value) = xattr::get(&at, &attr)
                .with_context(|| format!("{}: cannot read the attribute {text}", shown()))?
            {
                let value = if text == "security.capability" {
                    self.ids.unshift_capability(&value)
                } else {
                    value
                };
                xattrs.push((text.to_string(), value));
            }
        }
        let mut mtime = st.st_mtime.max(0) as u64;
        if let Some(clamp) = self.clamp_mtime {
            mtime = mtime.min(clamp);
        }
        self.stats.entries += 1;
        self.stats.newest_mtime = self.stats.newest_mtime.max(mtime);
        let owner = |id: u32| {
            self.ids.to_inside(id).ok_or_else(|| {
                anyhow!(
                    "{}: owned by host id {id}, which is none of the session's ids",
                    shown()
                )
            })
        };
        let entry = EntryMeta {
            path: rel,
            kind,
            mode: st.st_mode & 0o7777,
            uid: u64::from(owner(st.st_uid)?),
            gid: u64::from(owner(st.st_gid)?),
            uname: Vec::new(),
            gname: Vec::new(),
            mtime,
            xattrs,
        };
        if let EntryKind::Regular { size } = entry.kind {
            let mut file = open_regular(dir, name, st)?;
            self.layer.append(&entry, &mut file).with_context(|| {
                format!("{}: cannot add to the layer (changed while read?)", shown())
            })?;
            self.stats.bytes += size;
        } else {
            self.layer
                .append(&entry, &mut std::io::empty())
                .with_context(|| format!("{}: cannot add to the layer", shown()))?;
        }
        Ok(())
    }
}

/// Open the regular file `name` of `dir` for reading: never through a symlink, never
/// blocking on a fifo put in its place, and only if it is still the file `st` describes.
fn open_regular(dir: &Dir, name: &[u8], st: &FileStat) -> Result<File> {
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    let fd = openat2(dir.fd(), name, how)
        .map_err(|e| anyhow!("{}: cannot open: {e}", dir.display(name)))?;
    let now = fstat(&fd).map_err(|e| anyhow!("{}: cannot stat: {e}", dir.display(name)))?;
    if file_type(&now) != SFlag::S_IFREG || !same_file(&now, st) {
        bail!("{}: changed while read", dir.display(name));
    }
    Ok(File::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::layer::LayerCompression;
    use crate::image::store::Store;
    use std::fs;
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
            let stats = append_dir(&root, &mut w, clamp, IdShift::NONE).unwrap();
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

    fn names_in_layer(store: &Store, digest: &crate::image::store::Digest) -> Vec<String> {
        let bytes = fs::read(store.blob_path(digest)).unwrap();
        let mut ar = tar::Archive::new(&bytes[..]);
        ar.entries()
            .unwrap()
            .map(|e| String::from_utf8(e.unwrap().path_bytes().into_owned()).unwrap())
            .collect()
    }

    #[test]
    fn symlinks_are_never_followed_root_or_inside() {
        let host = tempfile::tempdir().unwrap();
        fs::write(host.path().join("canary"), "host secret").unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("store"));

        // A root replaced by a link to a host directory (what a hostile build can leave).
        let linked = tmp.path().join("dev");
        std::os::unix::fs::symlink(host.path(), &linked).unwrap();
        let mut w = LayerWriter::new(&store, LayerCompression::None).unwrap();
        let err = append_dir(&linked, &mut w, None, IdShift::NONE).unwrap_err();
        assert!(format!("{err:#}").contains("not a directory"), "{err:#}");

        // Links inside the tree stay links.
        let root = tmp.path().join("root");
        fs::create_dir(&root).unwrap();
        std::os::unix::fs::symlink(host.path(), root.join("etc")).unwrap();
        let mut w = LayerWriter::new(&store, LayerCompression::None).unwrap();
        append_dir(&root, &mut w, None, IdShift::NONE).unwrap();
        let info = w.finish(&store).unwrap();
        assert_eq!(names_in_layer(&store, &info.digest), ["./", "etc"]);
    }

    #[test]
    fn the_walk_lists_the_package_database_without_following_links() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("store"));
        let root = tmp.path().join("root");
        for p in [
            "app-misc/hello-1",
            "sys-libs/libdemo-1.0",
            "sys-libs/-MERGING-x-1",
        ] {
            fs::create_dir_all(root.join("var/db/pkg").join(p)).unwrap();
        }
        fs::write(root.join("var/db/pkg/app-misc/hello-1/SLOT"), "0\n").unwrap();
        let mut w = LayerWriter::new(&store, LayerCompression::None).unwrap();
        let stats = append_dir(&root, &mut w, None, IdShift::NONE).unwrap();
        assert_eq!(stats.packages, ["app-misc/hello-1", "sys-libs/libdemo-1.0"]);

        // A category that links to a host directory lists nothing of that directory.
        let host = tempfile::tempdir().unwrap();
        fs::create_dir(host.path().join("secret-1")).unwrap();
        std::os::unix::fs::symlink(host.path(), root.join("var/db/pkg/dev-libs")).unwrap();
        let mut w = LayerWriter::new(&store, LayerCompression::None).unwrap();
        let stats = append_dir(&root, &mut w, None, IdShift::NONE).unwrap();
        assert_eq!(stats.packages, ["app-misc/hello-1", "sys-libs/libdemo-1.0"]);
    }
}
