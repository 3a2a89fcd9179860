//! Unpacking a tarball into a directory, as root, for a build root or a snapshot: owners,
//! modes (setuid/setgid/sticky), mtimes, extended attributes, hard links, symlinks, device
//! nodes and fifos are recreated as they were.
//!
//! The tar crate's own unpacker turns device nodes into empty files and reads no xattrs,
//! so this is a loop of our own. Paths come from [`entry_meta`] (no absolute paths, no
//! `..`), and no entry is written through a symlink: a tarball made from a filesystem never
//! needs that, and a crafted one must not reach outside `dest`. Entries are created relative
//! to directory file descriptors ([`crate::archive::pinned`]), and an entry for the root
//! itself (`./`) must be a directory: a symlink there would turn `dest` into a link to
//! wherever it points.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::rc::Rc;

use anyhow::{Context, Result, bail};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{
    FchmodatFlags, Mode, SFlag, UtimensatFlags, fchmodat, fstatat, mkdirat, mknodat, utimensat,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchownat, linkat, symlinkat, unlinkat};

use crate::archive::entries::{EntryKind, EntryMeta};
use crate::archive::entries::{TopDirStripper, display_path, walk_tar};
use crate::archive::ids::IdShift;
use crate::archive::pinned::Dir;

/// What an extraction did.
#[derive(Debug, Clone, Default)]
pub struct Extracted {
    pub entries: u64,
    pub bytes: u64,
    /// Device nodes and `trusted.*` attributes left out ([`ExtractOptions::unprivileged`]).
    pub skipped: u64,
}

/// Options for [`extract`].
#[derive(Debug, Clone, Copy)]
pub struct ExtractOptions {
    /// Set owners from the archive (needs root). Off: files belong to the caller.
    pub preserve_owners: bool,
    /// Drop one leading path component (a snapshot's `portage/` or `gentoo-YYYYMMDD/`).
    pub strip_top_dir: bool,
    /// Owners are written shifted into the sandbox's range of host ids.
    pub ids: IdShift,
    /// Running in a user namespace, which cannot make device nodes or set `trusted.*`
    /// attributes: those are skipped (and counted) instead of failing the extraction.
    pub unprivileged: bool,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions {
            preserve_owners: true,
            strip_top_dir: false,
            ids: IdShift::NONE,
            unprivileged: false,
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
    let mut state = Unpacker::new(dest, opts)?;
    let mut stripper = TopDirStripper::default();
    let mut done = Extracted::default();
    walk_tar(input, "archive", |mut meta, data, name| {
        if opts.strip_top_dir && !stripper.strip(&mut meta)? {
            return Ok(());
        }
        state
            .unpack(&meta, data)
            .with_context(|| format!("entry {name:?}"))?;
        done.entries += 1;
        if let EntryKind::Regular { size } = meta.kind {
            done.bytes += size;
        }
        progress();
        Ok(())
    })?;
    state.finish()?;
    done.skipped = state.skipped.get();
    Ok(done)
}

/// Writes entries into a directory, one at a time, from any source of [`EntryMeta`] and
/// data (a tar stream, a squashfs image). Paths must already be normalised
/// ([`crate::archive::entries::normalize_path`]); parents must come before children.
/// Call [`Unpacker::finish`] at the end: directory mtimes are set last.
///
/// Everything is created relative to directory file descriptors opened from `dest` one
/// name at a time without following symlinks ([`pinned::Dir::child`]), and no entry may
/// replace `dest` itself with anything but a directory.
pub struct Unpacker {
    root: Rc<Dir>,
    /// The parent directory of the last entry, kept open (entries come grouped by
    /// directory); dropped whenever a directory is removed.
    last_parent: Option<(Vec<u8>, Rc<Dir>)>,
    /// Directory mtimes, applied last (writing into a directory changes its mtime).
    dir_times: Vec<(Vec<u8>, u64)>,
    opts: ExtractOptions,
    skipped: std::cell::Cell<u64>,
}

/// Split `rel` into its parent and last name; the root itself is `("", ".")`.
fn split(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None if rel.is_empty() => (b"", b"."),
        None => (b"", rel),
    }
}

/// An entry to work on: its directory (pinned) and its name there.
struct At<'a> {
    dir: &'a Dir,
    name: &'a [u8],
}

impl At<'_> {
    fn show(&self) -> String {
        self.dir.display(self.name)
    }
}

impl Unpacker {
    /// Unpack into `dest`, an existing directory (not a symlink).
    pub fn new(dest: &Path, opts: ExtractOptions) -> Result<Self> {
        Ok(Unpacker {
            root: Rc::new(Dir::open(dest)?),
            last_parent: None,
            dir_times: Vec::new(),
            opts,
            skipped: std::cell::Cell::new(0),
        })
    }

    /// The directory `rel` (relative to `dest`), every component a real directory; missing
    /// ones are created (mode 0755) when `create`.
    fn dir(&mut self, rel: &[u8], create: bool) -> Result<Rc<Dir>> {
        if rel.is_empty() {
            return Ok(self.root.clone());
        }
        if let Some((path, dir)) = &self.last_parent
            && path == rel
        {
            return Ok(dir.clone());
        }
        let mut dir = self.root.clone();
        let mut so_far: Vec<u8> = Vec::new();
        for name in rel.split(|&b| b == b'/') {
            if !so_far.is_empty() {
                so_far.push(b'/');
            }
            so_far.extend_from_slice(name);
            let shown = || display_path(&so_far);
            let next = match dir.child(name) {
                Ok(d) => d,
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    mkdirat(dir.fd(), name, Mode::from_bits_truncate(0o755))
                        .with_context(|| format!("cannot create {}", dir.display(name)))?;
                    dir.child(name)
                        .with_context(|| format!("cannot open {}", dir.display(name)))?
                }
                Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                    bail!("refusing to write through the symlink {:?}", shown())
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                    bail!("{:?} is not a directory", shown())
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot open {}", dir.display(name)));
                }
            };
            dir = Rc::new(next);
        }
        self.last_parent = Some((rel.to_vec(), dir.clone()));
        Ok(dir)
    }

    /// Remove whatever is at `at` unless it is a directory and `keep_dir`.
    fn clear(&mut self, at: &At<'_>, keep_dir: bool) -> Result<()> {
        match fstatat(at.dir.fd(), at.name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR => {
                if !keep_dir {
                    unlinkat(at.dir.fd(), at.name, UnlinkatFlags::RemoveDir)
                        .with_context(|| format!("cannot replace the directory {}", at.show()))?;
                    self.last_parent = None;
                }
            }
            Ok(_) => unlinkat(at.dir.fd(), at.name, UnlinkatFlags::NoRemoveDir)
                .with_context(|| format!("cannot replace {}", at.show()))?,
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(e).with_context(|| format!("cannot stat {}", at.show())),
        }
        Ok(())
    }

    /// Create one entry; `data` is read for regular files only.
    pub fn unpack(&mut self, meta: &EntryMeta, data: &mut dyn Read) -> Result<()> {
        let rel = meta.path.as_slice();
        if rel.is_empty() && meta.kind != EntryKind::Directory {
            bail!(
                "refusing an entry that would replace the extraction root {} (the archive's \
                 top is not a directory)",
                self.root.path().display()
            );
        }
        let (parent, name) = split(rel);
        let dir = self.dir(parent, true)?;
        let at = At { dir: &dir, name };
        let mode = |bits| Mode::from_bits_truncate(bits);
        match &meta.kind {
            EntryKind::Directory => {
                self.clear(&at, true)?;
                match mkdirat(dir.fd(), name, mode(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => {
                        return Err(e).with_context(|| format!("cannot create {}", at.show()));
                    }
                }
                self.dir_times.push((rel.to_vec(), meta.mtime));
            }
            EntryKind::Regular { size } => {
                self.clear(&at, false)?;
                let fd = openat(
                    dir.fd(),
                    name,
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    mode(0o600),
                )
                .with_context(|| format!("cannot create {}", at.show()))?;
                let mut file = File::from(fd);
                let copied = io::copy(&mut data.take(*size), &mut file)
                    .with_context(|| format!("cannot write {}", at.show()))?;
                if copied != *size {
                    bail!("file data ended early (truncated input?)");
                }
            }
            EntryKind::Symlink { target } => {
                self.clear(&at, false)?;
                symlinkat(OsStr::from_bytes(target), dir.fd(), name)
                    .with_context(|| format!("cannot create the symlink {}", at.show()))?;
            }
            EntryKind::HardLink { target } => {
                self.clear(&at, false)?;
                if target.is_empty() {
                    bail!("a hard link to the archive's top directory");
                }
                let (target_parent, target_name) = split(target);
                let source_dir = self.dir(target_parent, false)?;
                // Flags 0: a symlink is linked itself, never followed.
                linkat(
                    source_dir.fd(),
                    target_name,
                    dir.fd(),
                    name,
                    AtFlags::empty(),
                )
                .with_context(|| {
                    format!(
                        "cannot link {} to {}",
                        at.show(),
                        source_dir.display(target_name)
                    )
                })?;
                return Ok(()); // shares the target's inode and metadata
            }
            EntryKind::Char { .. } | EntryKind::Block { .. } if self.opts.unprivileged => {
                self.skipped.set(self.skipped.get() + 1);
                return Ok(());
            }
            EntryKind::Char { major, minor } | EntryKind::Block { major, minor } => {
                self.clear(&at, false)?;
                let kind = if matches!(meta.kind, EntryKind::Char { .. }) {
                    SFlag::S_IFCHR
                } else {
                    SFlag::S_IFBLK
                };
                let dev = libc::makedev(*major, *minor);
                mknodat(dir.fd(), name, kind, mode(0o600), dev)
                    .with_context(|| format!("cannot create the device {}", at.show()))?;
            }
            EntryKind::Fifo => {
                self.clear(&at, false)?;
                mknodat(dir.fd(), name, SFlag::S_IFIFO, mode(0o600), 0)
                    .with_context(|| format!("cannot create the fifo {}", at.show()))?;
            }
        }
        self.set_metadata(meta, &at)
    }

    fn set_metadata(&self, meta: &EntryMeta, at: &At<'_>) -> Result<()> {
        let is_link = matches!(meta.kind, EntryKind::Symlink { .. });
        if self.opts.preserve_owners {
            let uid = self.opts.ids.to_host(meta.uid)?;
            let gid = self.opts.ids.to_host(meta.gid)?;
            fchownat(
                at.dir.fd(),
                at.name,
                Some(Uid::from_raw(uid)),
                Some(Gid::from_raw(gid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .with_context(|| format!("cannot set the owner of {}", at.show()))?;
        }
        for (name, value) in &meta.xattrs {
            if name.starts_with("trusted.overlay.") || name.starts_with("user.overlay.") {
                continue; // would steer the overlay filesystem a session runs on
            }
            if self.opts.unprivileged && name.starts_with("trusted.") {
                self.skipped.set(self.skipped.get() + 1);
                continue;
            }
            // lsetxattr on /proc/self/fd/N/NAME: the pinned directory, the name not followed.
            if let Err(e) = xattr::set(at.dir.proc_child(at.name), name, value) {
                if is_link && name.starts_with("user.") {
                    continue; // Linux allows no user.* xattrs on symlinks
                }
                return Err(e).with_context(|| {
                    format!("cannot set the extended attribute {name} on {}", at.show())
                });
            }
        }
        if !is_link {
            // After chown, which clears setuid/setgid. Not followed: we just made this
            // entry and it is no symlink.
            fchmodat(
                at.dir.fd(),
                at.name,
                Mode::from_bits_truncate(meta.mode & 0o7777),
                FchmodatFlags::NoFollowSymlink,
            )
            .with_context(|| format!("cannot set the mode of {}", at.show()))?;
        }
        if meta.kind != EntryKind::Directory {
            set_mtime(at, meta.mtime)?;
        }
        Ok(())
    }

    /// Set the directories' mtimes (children change them while they are written).
    pub fn finish(&mut self) -> Result<()> {
        for (rel, mtime) in std::mem::take(&mut self.dir_times).into_iter().rev() {
            let (parent, name) = split(&rel);
            let dir = self.dir(parent, false)?;
            set_mtime(&At { dir: &dir, name }, mtime)?;
        }
        Ok(())
    }
}

fn set_mtime(at: &At<'_>, mtime: u64) -> Result<()> {
    let t = TimeSpec::new(mtime.min(i64::MAX as u64) as i64, 0);
    utimensat(
        at.dir.fd(),
        at.name,
        &t,
        &t,
        UtimensatFlags::NoFollowSymlink,
    )
    .with_context(|| format!("cannot set the mtime of {}", at.show()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
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
            ..Default::default()
        };
        let err = extract(&data[..], dir.path(), opts, || {}).unwrap_err();
        assert!(format!("{err:#}").contains("symlink"), "{err:#}");
        assert!(!outside.path().join("pwned").exists());
    }

    #[test]
    fn an_entry_for_the_root_must_be_a_directory() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("canary"), "host").unwrap();
        let target = outside.path().to_str().unwrap();
        for root in ["./", ".", ""] {
            let data = build(|b| {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                h.set_link_name(target).unwrap();
                // `append_link` refuses an empty path; write the name into the header.
                h.as_old_mut().name[..root.len()].copy_from_slice(root.as_bytes());
                h.set_cksum();
                b.append(&h, io::empty()).unwrap();
                b.append_data(
                    &mut header(tar::EntryType::Regular, 0o644, 1),
                    "pwned",
                    &b"x"[..],
                )
                .unwrap();
            });
            let dir = tempfile::tempdir().unwrap();
            let dest = dir.path().join("rootfs");
            fs::create_dir(&dest).unwrap();
            let opts = ExtractOptions {
                preserve_owners: false,
                strip_top_dir: false,
                ..Default::default()
            };
            let err = extract(&data[..], &dest, opts, || {}).unwrap_err();
            assert!(
                format!("{err:#}").contains("would replace the extraction root"),
                "{root:?}: {err:#}"
            );
            assert!(fs::symlink_metadata(&dest).unwrap().is_dir(), "{root:?}");
            let names: Vec<_> = fs::read_dir(outside.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, ["canary"], "{root:?}: the host dir was written to");
        }
    }

    #[test]
    fn a_hard_link_is_never_made_through_a_symlink() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), "host").unwrap();
        let data = build(|b| {
            b.append_link(
                &mut header(tar::EntryType::Symlink, 0o777, 0),
                "esc",
                outside.path().to_str().unwrap(),
            )
            .unwrap();
            b.append_link(
                &mut header(tar::EntryType::Link, 0, 0),
                "copy",
                "esc/secret",
            )
            .unwrap();
        });
        let dir = tempfile::tempdir().unwrap();
        let opts = ExtractOptions {
            preserve_owners: false,
            strip_top_dir: false,
            ..Default::default()
        };
        let err = extract(&data[..], dir.path(), opts, || {}).unwrap_err();
        assert!(format!("{err:#}").contains("symlink"), "{err:#}");
        assert!(!dir.path().join("copy").exists());
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
            ..Default::default()
        };
        let err = extract(&data[..], dir.path(), opts, || {}).unwrap_err();
        assert!(
            format!("{err:#}").contains("one top-level directory"),
            "{err:#}"
        );
    }
}
