//! Unpacking a tarball into a directory, as root, for a build root or a snapshot: owners,
//! modes (setuid/setgid/sticky), mtimes, extended attributes, hard links, symlinks, device
//! nodes and fifos are recreated as they were.
//!
//! The tar crate's own unpacker turns device nodes into empty files and reads no xattrs,
//! so this is a loop of our own. Paths come from [`entry_meta`] (no absolute paths, no
//! `..`), and no entry is written through a symlink: a tarball made from a filesystem never
//! needs that, and a crafted one must not reach outside `dest`.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags, mknod, utimensat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, fchownat};

use crate::archive::entries::{TopDirStripper, TrailerCheck, display_path, entry_meta};
use crate::image::layer::{EntryKind, EntryMeta};

/// What an extraction did.
#[derive(Debug, Clone, Default)]
pub struct Extracted {
    pub entries: u64,
    pub bytes: u64,
}

/// Options for [`extract`].
#[derive(Debug, Clone, Copy)]
pub struct ExtractOptions {
    /// Set owners from the archive (needs root). Off: files belong to the caller.
    pub preserve_owners: bool,
    /// Drop one leading path component (a snapshot's `portage/` or `gentoo-YYYYMMDD/`).
    pub strip_top_dir: bool,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions {
            preserve_owners: true,
            strip_top_dir: false,
        }
    }
}

/// Unpack the tar stream `input` into `dest` (which must exist).
/// `progress` is called after each entry.
pub fn extract(
    input: impl Read,
    dest: &Path,
    opts: ExtractOptions,
    mut progress: impl FnMut(),
) -> Result<Extracted> {
    let mut checked = TrailerCheck::new(input);
    let mut state = Unpacker::new(dest, opts);
    let mut stripper = TopDirStripper::default();
    let mut done = Extracted::default();
    let mut last = String::from("(start of archive)");
    {
        let mut archive = tar::Archive::new(&mut checked);
        let entries = archive.entries().context("cannot read the tar stream")?;
        for entry in entries {
            let mut entry = entry
                .map_err(|e| anyhow!("corrupt or truncated data after entry {last:?}: {e}"))?;
            let mut meta = entry_meta(&mut entry)?;
            last = display_path(&meta.path);
            if opts.strip_top_dir && !stripper.strip(&mut meta)? {
                continue;
            }
            state
                .unpack(&meta, &mut entry)
                .with_context(|| format!("entry {last:?}"))?;
            done.entries += 1;
            if let EntryKind::Regular { size } = meta.kind {
                done.bytes += size;
            }
            progress();
        }
    }
    if !checked.saw_end_marker() {
        bail!(
            "truncated: the archive ends after entry {last:?} without tar's end-of-archive marker"
        );
    }
    state.finish()?;
    Ok(done)
}

/// Writes entries into a directory, one at a time, from any source of [`EntryMeta`] and
/// data (a tar stream, a squashfs image). Paths must already be normalised
/// ([`crate::archive::entries::normalize_path`]); parents must come before children.
/// Call [`Unpacker::finish`] at the end: directory mtimes are set last.
pub struct Unpacker {
    dest: PathBuf,
    /// Relative paths known to be real directories (created or checked by us).
    real_dirs: HashSet<Vec<u8>>,
    /// Directory mtimes, applied last (writing into a directory changes its mtime).
    dir_times: Vec<(PathBuf, u64)>,
    opts: ExtractOptions,
}

fn parent_of(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => &path[..i],
        None => b"",
    }
}

impl Unpacker {
    pub fn new(dest: &Path, opts: ExtractOptions) -> Self {
        Unpacker {
            dest: dest.to_path_buf(),
            real_dirs: HashSet::from([Vec::new()]),
            dir_times: Vec::new(),
            opts,
        }
    }

    fn full(&self, rel: &[u8]) -> PathBuf {
        if rel.is_empty() {
            self.dest.clone()
        } else {
            self.dest.join(OsStr::from_bytes(rel))
        }
    }

    /// Make sure every directory above `rel` is a real directory inside `dest`, creating
    /// missing ones (mode 0755) and refusing symlinks.
    fn ensure_parent(&mut self, rel: &[u8]) -> Result<()> {
        let parent = parent_of(rel);
        if self.real_dirs.contains(parent) {
            return Ok(());
        }
        let mut so_far: Vec<u8> = Vec::new();
        for component in parent.split(|&b| b == b'/') {
            if !so_far.is_empty() {
                so_far.push(b'/');
            }
            so_far.extend_from_slice(component);
            if self.real_dirs.contains(&so_far) {
                continue;
            }
            let path = self.full(&so_far);
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => bail!(
                    "refusing to write through the symlink {:?}",
                    display_path(&so_far)
                ),
                Ok(_) => bail!("{:?} is not a directory", display_path(&so_far)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&path)
                        .with_context(|| format!("cannot create {}", path.display()))?;
                }
                Err(e) => return Err(e).with_context(|| format!("cannot stat {}", path.display())),
            }
            self.real_dirs.insert(so_far.clone());
        }
        Ok(())
    }

    /// Remove whatever is at `path` unless it is a directory and `keep_dir`.
    fn clear(&mut self, rel: &[u8], path: &Path, keep_dir: bool) -> Result<()> {
        match fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => {
                if !keep_dir {
                    fs::remove_dir(path).with_context(|| {
                        format!("cannot replace the directory {}", path.display())
                    })?;
                    self.real_dirs.remove(rel);
                }
            }
            Ok(_) => fs::remove_file(path)
                .with_context(|| format!("cannot replace {}", path.display()))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot stat {}", path.display())),
        }
        Ok(())
    }

    /// Create one entry; `data` is read for regular files only.
    pub fn unpack(&mut self, meta: &EntryMeta, data: &mut dyn Read) -> Result<()> {
        let rel = meta.path.as_slice();
        let path = self.full(rel);
        if !rel.is_empty() {
            self.ensure_parent(rel)?;
        }
        match &meta.kind {
            EntryKind::Directory => {
                self.clear(rel, &path, true)?;
                if !path.is_dir() {
                    fs::create_dir(&path)
                        .with_context(|| format!("cannot create {}", path.display()))?;
                }
                self.real_dirs.insert(rel.to_vec());
                self.dir_times.push((path.clone(), meta.mtime));
            }
            EntryKind::Regular { size } => {
                self.clear(rel, &path, false)?;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&path)
                    .with_context(|| format!("cannot create {}", path.display()))?;
                let copied = io::copy(&mut data.take(*size), &mut file)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                if copied != *size {
                    bail!("file data ended early (truncated input?)");
                }
                drop::<File>(file);
            }
            EntryKind::Symlink { target } => {
                self.clear(rel, &path, false)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(target), &path)
                    .with_context(|| format!("cannot create the symlink {}", path.display()))?;
            }
            EntryKind::HardLink { target } => {
                self.clear(rel, &path, false)?;
                self.ensure_parent(target)?;
                let source = self.full(target);
                fs::hard_link(&source, &path).with_context(|| {
                    format!("cannot link {} to {}", path.display(), source.display())
                })?;
                return Ok(()); // shares the target's inode and metadata
            }
            EntryKind::Char { major, minor } | EntryKind::Block { major, minor } => {
                self.clear(rel, &path, false)?;
                let kind = if matches!(meta.kind, EntryKind::Char { .. }) {
                    SFlag::S_IFCHR
                } else {
                    SFlag::S_IFBLK
                };
                let dev = libc::makedev(*major, *minor);
                mknod(&path, kind, Mode::from_bits_truncate(0o600), dev)
                    .with_context(|| format!("cannot create the device {}", path.display()))?;
            }
            EntryKind::Fifo => {
                self.clear(rel, &path, false)?;
                mknod(&path, SFlag::S_IFIFO, Mode::from_bits_truncate(0o600), 0)
                    .with_context(|| format!("cannot create the fifo {}", path.display()))?;
            }
        }
        self.set_metadata(meta, &path)
    }

    fn set_metadata(&self, meta: &EntryMeta, path: &Path) -> Result<()> {
        let is_link = matches!(meta.kind, EntryKind::Symlink { .. });
        if self.opts.preserve_owners {
            fchownat(
                nix::fcntl::AT_FDCWD,
                path,
                Some(Uid::from_raw(meta.uid as u32)),
                Some(Gid::from_raw(meta.gid as u32)),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .with_context(|| format!("cannot set the owner of {}", path.display()))?;
        }
        for (name, value) in &meta.xattrs {
            if name.starts_with("trusted.overlay.") {
                continue; // would steer the overlay filesystem a session runs on
            }
            if let Err(e) = xattr::set(path, name, value) {
                if is_link && name.starts_with("user.") {
                    continue; // Linux allows no user.* xattrs on symlinks
                }
                return Err(e).with_context(|| {
                    format!(
                        "cannot set the extended attribute {name} on {}",
                        path.display()
                    )
                });
            }
        }
        if !is_link {
            // After chown, which clears setuid/setgid.
            fs::set_permissions(path, fs::Permissions::from_mode(meta.mode & 0o7777))
                .with_context(|| format!("cannot set the mode of {}", path.display()))?;
        }
        if meta.kind != EntryKind::Directory {
            set_mtime(path, meta.mtime)?;
        }
        Ok(())
    }

    /// Set the directories' mtimes (children change them while they are written).
    pub fn finish(&mut self) -> Result<()> {
        for (path, mtime) in self.dir_times.iter().rev() {
            set_mtime(path, *mtime)?;
        }
        Ok(())
    }
}

fn set_mtime(path: &Path, mtime: u64) -> Result<()> {
    let t = TimeSpec::new(mtime.min(i64::MAX as u64) as i64, 0);
    utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &t,
        &t,
        UtimensatFlags::NoFollowSymlink,
    )
    .with_context(|| format!("cannot set the mtime of {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(1234);
        h.set_gid(5678);
        h.set_mtime(1_600_000_000);
        h
    }

    fn build(f: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        f(&mut b);
        b.into_inner().unwrap()
    }

    fn running_as_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn recreates_owners_modes_devices_links_and_xattrs() {
        if !running_as_root() {
            panic!("this test needs root (mknod, chown); run the suite as root");
        }
        let data = build(|b| {
            b.append_data(
                &mut header(tar::EntryType::Directory, 0o1777, 0),
                "top/d",
                io::empty(),
            )
            .unwrap();
            b.append_pax_extensions([("SCHILY.xattr.user.k", &b"v"[..])])
                .unwrap();
            b.append_data(
                &mut header(tar::EntryType::Regular, 0o4755, 3),
                "top/d/f",
                &b"abc"[..],
            )
            .unwrap();
            b.append_link(&mut header(tar::EntryType::Link, 0, 0), "top/h", "top/d/f")
                .unwrap();
            b.append_link(
                &mut header(tar::EntryType::Symlink, 0o777, 0),
                "top/s",
                "/etc/passwd",
            )
            .unwrap();
            let mut dev = header(tar::EntryType::Char, 0o666, 0);
            dev.set_device_major(1).unwrap();
            dev.set_device_minor(3).unwrap();
            b.append_data(&mut dev, "top/null", io::empty()).unwrap();
            b.append_data(
                &mut header(tar::EntryType::Fifo, 0o644, 0),
                "top/p",
                io::empty(),
            )
            .unwrap();
        });
        let dir = tempfile::tempdir().unwrap();
        let opts = ExtractOptions {
            strip_top_dir: true,
            ..Default::default()
        };
        let done = extract(&data[..], dir.path(), opts, || {}).unwrap();
        assert_eq!(done.entries, 6);
        let m = |p: &str| fs::symlink_metadata(dir.path().join(p)).unwrap();
        assert_eq!(m("d").mode() & 0o7777, 0o1777);
        assert_eq!(m("d").mtime(), 1_600_000_000);
        let f = m("d/f");
        assert_eq!(
            (f.mode() & 0o7777, f.uid(), f.gid(), f.len()),
            (0o4755, 1234, 5678, 3)
        );
        assert_eq!(
            xattr::get(dir.path().join("d/f"), "user.k").unwrap(),
            Some(b"v".to_vec())
        );
        assert_eq!(m("h").ino(), f.ino());
        assert_eq!(
            fs::read_link(dir.path().join("s")).unwrap(),
            Path::new("/etc/passwd")
        );
        assert!(m("null").file_type().is_char_device());
        assert_eq!(m("null").rdev(), libc::makedev(1, 3));
        assert!(m("p").file_type().is_fifo());
    }

    #[test]
    fn never_writes_through_a_symlink() {
        let outside = tempfile::tempdir().unwrap();
        let data = build(|b| {
            let target = outside.path().to_str().unwrap();
            b.append_link(
                &mut header(tar::EntryType::Symlink, 0o777, 0),
                "esc",
                target,
            )
            .unwrap();
            b.append_data(
                &mut header(tar::EntryType::Regular, 0o644, 1),
                "esc/pwned",
                &b"x"[..],
            )
            .unwrap();
        });
        let dir = tempfile::tempdir().unwrap();
        let opts = ExtractOptions {
            preserve_owners: false,
            strip_top_dir: false,
        };
        let err = extract(&data[..], dir.path(), opts, || {}).unwrap_err();
        assert!(format!("{err:#}").contains("symlink"), "{err:#}");
        assert!(!outside.path().join("pwned").exists());
    }

    #[test]
    fn two_top_level_dirs_cannot_be_stripped() {
        let data = build(|b| {
            for p in ["a/x", "b/y"] {
                b.append_data(
                    &mut header(tar::EntryType::Regular, 0o644, 0),
                    p,
                    io::empty(),
                )
                .unwrap();
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let opts = ExtractOptions {
            preserve_owners: false,
            strip_top_dir: true,
        };
        let err = extract(&data[..], dir.path(), opts, || {}).unwrap_err();
        assert!(
            format!("{err:#}").contains("one top-level directory"),
            "{err:#}"
        );
    }
}
