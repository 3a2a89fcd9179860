//! Squashfs images (Gentoo's `gentoo-YYYYMMDD.xz.sqfs` snapshots, whose root is the tree):
//! unpacked into a directory with the same [`Unpacker`] as tarballs, so the same path and
//! symlink safety rules apply. File data is streamed; only the inode table is in memory.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use backhand::{FilesystemReader, InnerNode};

use crate::archive::entries::{EntryKind, EntryMeta};
use crate::archive::entries::{display_path, normalize_path};
use crate::archive::extract::{ExtractOptions, Extracted, Unpacker};

/// The magic at the start of a squashfs 4 image (little-endian "hsqs").
const MAGIC: &[u8; 4] = b"hsqs";

/// Whether `path` starts with the squashfs magic.
pub fn is_squashfs(path: &Path) -> Result<bool> {
    let mut head = [0u8; 4];
    let mut file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    match file.read_exact(&mut head) {
        Ok(()) => Ok(&head == MAGIC),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e).with_context(|| format!("{}: cannot read", path.display())),
    }
}

/// Unpack the squashfs image at `path` into `dest` (which must exist). `progress` gets the
/// number of entries written so far and the total.
pub fn extract(
    path: &Path,
    dest: &Path,
    opts: ExtractOptions,
    mut progress: impl FnMut(u64, u64),
) -> Result<Extracted> {
    let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let fs = FilesystemReader::from_reader(BufReader::new(file))
        .map_err(|e| anyhow!("not a readable squashfs image: {e}"))?;
    let total = fs.files().count() as u64;
    let mut unpacker = Unpacker::new(dest, opts)?;
    let mut done = Extracted::default();
    for node in fs.files() {
        let raw = node.fullpath.as_os_str().as_bytes();
        let rel = normalize_path(raw.strip_prefix(b"/").unwrap_or(raw))
            .map_err(|e| anyhow!("entry {:?}: {e}", display_path(raw)))?;
        let kind = match &node.inner {
            InnerNode::Dir(_) => EntryKind::Directory,
            InnerNode::File(f) => EntryKind::Regular {
                size: f.file_len() as u64,
            },
            InnerNode::Symlink(l) => EntryKind::Symlink {
                target: l.link.as_os_str().as_bytes().to_vec(),
            },
            InnerNode::CharacterDevice(d) => {
                let (major, minor) = split_dev(d.device_number);
                EntryKind::Char { major, minor }
            }
            InnerNode::BlockDevice(d) => {
                let (major, minor) = split_dev(d.device_number);
                EntryKind::Block { major, minor }
            }
            InnerNode::NamedPipe => EntryKind::Fifo,
            InnerNode::Socket => continue, // sockets are made by programs, never archived
        };
        let meta = EntryMeta {
            path: rel,
            kind,
            mode: u32::from(node.header.permissions) & 0o7777,
            uid: u64::from(node.header.uid),
            gid: u64::from(node.header.gid),
            uname: Vec::new(),
            gname: Vec::new(),
            mtime: u64::from(node.header.mtime),
            xattrs: Vec::new(),
        };
        let result = match &node.inner {
            InnerNode::File(f) => {
                let mut reader = fs.file(f).reader();
                unpacker.unpack(&meta, &mut reader)
            }
            _ => unpacker.unpack(&meta, &mut io::empty()),
        };
        result.with_context(|| format!("entry {:?}", display_path(&meta.path)))?;
        done.entries += 1;
        if let EntryKind::Regular { size } = meta.kind {
            done.bytes += size;
        }
        progress(done.entries, total);
    }
    unpacker.finish()?;
    Ok(done)
}

/// Squashfs stores device numbers in Linux's `new_encode_dev` form.
fn split_dev(dev: u32) -> (u32, u32) {
    let major = (dev & 0xfff00) >> 8;
    let minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
    (major, minor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::process::Command;

    fn mksquashfs(src: &Path, out: &Path, comp: &str) {
        let status = Command::new("mksquashfs")
            .arg(src)
            .arg(out)
            .args(["-comp", comp, "-noappend", "-quiet", "-no-progress"])
            .status()
            .expect("mksquashfs (squashfs-tools) runs");
        assert!(status.success(), "mksquashfs failed");
    }

    #[test]
    fn unpacks_what_mksquashfs_packed() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("profiles")).unwrap();
        fs::create_dir_all(src.join("app-misc/hello")).unwrap();
        fs::write(src.join("profiles/repo_name"), "gentoo\n").unwrap();
        let big: Vec<u8> = (0..300_000u32).flat_map(|i| i.to_le_bytes()).collect();
        fs::write(src.join("app-misc/hello/big.bin"), &big).unwrap();
        fs::write(src.join("app-misc/hello/run.sh"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(
            src.join("app-misc/hello/run.sh"),
            fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::os::unix::fs::symlink("hello/run.sh", src.join("app-misc/link")).unwrap();
        for comp in ["xz", "gzip", "zstd"] {
            let img = tmp.path().join(format!("tree-{comp}.sqfs"));
            mksquashfs(&src, &img, comp);
            assert!(is_squashfs(&img).unwrap());
            let dest = tmp.path().join(format!("out-{comp}"));
            fs::create_dir(&dest).unwrap();
            let mut last = (0, 0);
            let done =
                extract(&img, &dest, ExtractOptions::default(), |d, t| last = (d, t)).unwrap();
            assert_eq!(last.0, last.1, "{comp}: progress reaches the total");
            assert_eq!(done.entries, 8, "{comp}: root, 3 dirs, 4 files and links");
            assert_eq!(
                fs::read(dest.join("app-misc/hello/big.bin")).unwrap(),
                big,
                "{comp}"
            );
            assert_eq!(
                fs::read_to_string(dest.join("profiles/repo_name")).unwrap(),
                "gentoo\n"
            );
            let mode = fs::metadata(dest.join("app-misc/hello/run.sh"))
                .unwrap()
                .mode();
            assert_eq!(mode & 0o7777, 0o755, "{comp}");
            assert_eq!(
                fs::read_link(dest.join("app-misc/link")).unwrap(),
                Path::new("hello/run.sh")
            );
            let src_mtime = fs::metadata(src.join("profiles")).unwrap().mtime();
            let out_mtime = fs::metadata(dest.join("profiles")).unwrap().mtime();
            assert_eq!(src_mtime, out_mtime, "{comp}: directory mtimes kept");
        }
    }

    #[test]
    fn a_tarball_is_not_squashfs_and_garbage_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let junk = tmp.path().join("junk.sqfs");
        fs::write(&junk, b"hsqs and then nothing sensible at all").unwrap();
        assert!(is_squashfs(&junk).unwrap());
        let dest = tmp.path().join("out");
        fs::create_dir(&dest).unwrap();
        let err = extract(&junk, &dest, ExtractOptions::default(), |_, _| {}).unwrap_err();
        assert!(
            format!("{err:#}").contains("not a readable squashfs image"),
            "{err:#}"
        );
        let short = tmp.path().join("short");
        fs::write(&short, b"hs").unwrap();
        assert!(!is_squashfs(&short).unwrap());
    }

    #[test]
    fn device_numbers_decode_like_linux() {
        // makedev(1, 3) = /dev/null, makedev(259, 1048575) exercises the high bits.
        assert_eq!(split_dev(0x0103), (1, 3));
        let (major, minor) = (259u32, 0xfffffu32);
        let enc = (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
        assert_eq!(split_dev(enc), (major, minor));
    }
}
