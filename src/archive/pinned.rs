//! Directories held by a file descriptor, for host-side work inside a tree that someone else
//! made: a stage being extracted, a session's root before `pivot_root`, a root a build
//! exported. Paths inside such a tree are never resolved by the host's rules, so a symlink
//! in it (`etc -> /root/.ssh`) cannot send a write or a read out of it.
//!
//! Three ways to go down from a [`Dir`]:
//! - [`Dir::child`]: one name, never a symlink (walking and extracting a tree);
//! - [`Dir::beneath`]: a relative path with no symlink anywhere in it (an exported root);
//! - [`Dir::in_root`]: a path as a process chrooted into the tree would see it — its
//!   symlinks are followed, but `/` and `..` stop at the tree's top (mount targets and
//!   files written into a session's root).
//!
//! Not here: the host paths the tool or its user chose (cache, work and bind-mount sources);
//! those are trusted and opened as usual.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};
use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{FileStat, Mode, fstat};

/// A directory opened `O_PATH`; `path` is only for messages.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

fn dir_flags() -> OFlag {
    OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC
}

fn join(base: &Path, rel: &[u8]) -> PathBuf {
    if rel.is_empty() || rel == b"." {
        base.to_path_buf()
    } else {
        base.join(OsStr::from_bytes(rel))
    }
}

impl Dir {
    /// Open the host directory `path`; a symlink as its last component is refused (the
    /// components above it are the caller's to trust).
    pub fn open(path: &Path) -> Result<Dir> {
        let fd = nix::fcntl::open(path, dir_flags() | OFlag::O_NOFOLLOW, Mode::empty()).map_err(
            |e| match e {
                Errno::ENOTDIR | Errno::ELOOP => {
                    anyhow!("{}: not a directory (a symlink?)", path.display())
                }
                e => anyhow!("{}: cannot open: {e}", path.display()),
            },
        )?;
        Ok(Dir {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// The path this directory was reached by, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `path()` with `rel` appended, for messages.
    pub fn display(&self, rel: &[u8]) -> String {
        join(&self.path, rel).display().to_string()
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// `/proc/self/fd/N`: this very directory, for calls that only take a path (mount,
    /// listing). Valid while `self` lives.
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    /// The entry `name` of this directory as a path for calls that do not follow their
    /// last component (`lgetxattr`, `lsetxattr`); `.` is the directory itself.
    pub fn proc_child(&self, name: &[u8]) -> PathBuf {
        self.proc_path().join(OsStr::from_bytes(name))
    }

    pub fn stat(&self) -> Result<FileStat> {
        fstat(&self.fd).map_err(|e| anyhow!("{}: cannot stat: {e}", self.path.display()))
    }

    /// Open the subdirectory `name` (one component): an error of kind
    /// [`io::ErrorKind::NotFound`] when it is missing, `ELOOP` when it is a symlink,
    /// `ENOTDIR` when it is something else.
    pub fn child(&self, name: &[u8]) -> io::Result<Dir> {
        if name.is_empty() || name.contains(&b'/') || name == b".." {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("not a plain name: {:?}", String::from_utf8_lossy(name)),
            ));
        }
        self.beneath(name)
    }

    /// Open the directory `rel` below this one, refusing a symlink anywhere on the way
    /// (`ELOOP`), a `..` that would leave, and mount points.
    pub fn beneath(&self, rel: &[u8]) -> io::Result<Dir> {
        let how = OpenHow::new().flags(dir_flags()).resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        );
        let fd = openat2(self.fd.as_fd(), OsStr::from_bytes(rel), how)?;
        Ok(Dir {
            fd,
            path: join(&self.path, rel),
        })
    }

    /// Open the directory `path` as seen from inside this tree: `/` is this directory,
    /// symlinks are followed but never out of it. With `create`, missing directories are
    /// made (mode 0755, owned as their parent) below real directories of the tree. Unless `cross_mounts`, a path
    /// that passes through a mount point is refused (another mount in a session's root is a
    /// host directory, not the stage).
    pub fn in_root(&self, path: &str, create: bool, cross_mounts: bool) -> Result<Dir> {
        let mut resolve = ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS;
        if !cross_mounts {
            resolve |= ResolveFlag::RESOLVE_NO_XDEV;
        }
        let how = OpenHow::new().flags(dir_flags()).resolve(resolve);
        let open = |rel: &str| -> nix::Result<Dir> {
            let fd = openat2(self.fd.as_fd(), if rel.is_empty() { "." } else { rel }, how)?;
            Ok(Dir {
                fd,
                path: join(&self.path, rel.as_bytes()),
            })
        };
        let components: Vec<&str> = path
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .collect();
        if components.contains(&"..") {
            bail!("{path}: '..' is not allowed here");
        }
        let whole = components.join("/");
        let fail = |e: Errno| {
            let why = match e {
                Errno::EXDEV => "it leads into another mount".to_string(),
                Errno::ENOTDIR => "not a directory".to_string(),
                e => e.to_string(),
            };
            anyhow!("{path} in {}: {why}", self.path.display())
        };
        match open(&whole) {
            Ok(dir) => return Ok(dir),
            Err(Errno::ENOENT) if create => {}
            Err(e) => return Err(fail(e)),
        }
        let mut done = String::new();
        let mut dir = open("").map_err(fail)?;
        for name in components {
            let next = if done.is_empty() {
                name.to_string()
            } else {
                format!("{done}/{name}")
            };
            dir = match open(&next) {
                Ok(d) => d,
                Err(Errno::ENOENT) => {
                    match nix::sys::stat::mkdirat(dir.fd(), name, Mode::from_bits_truncate(0o755)) {
                        Ok(()) => {
                            // Owned as its parent: in a session's root, by the stage's root
                            // (shifted), not by whoever runs the tool.
                            let parent = dir.stat()?;
                            nix::unistd::fchownat(
                                dir.fd(),
                                name,
                                Some(nix::unistd::Uid::from_raw(parent.st_uid)),
                                Some(nix::unistd::Gid::from_raw(parent.st_gid)),
                                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                            )
                            .map_err(|e| anyhow!("{path}: cannot set the owner of {next}: {e}"))?;
                        }
                        Err(Errno::EEXIST) => {}
                        Err(e) => {
                            bail!("{path}: cannot create {next} in {}: {e}", self.display(b""))
                        }
                    }
                    open(&next).map_err(|e| match e {
                        Errno::ENOENT => anyhow!(
                            "{path} in {}: /{next} is a symlink to a missing directory",
                            self.path.display()
                        ),
                        e => fail(e),
                    })?
                }
                Err(e) => return Err(fail(e)),
            };
            done = next;
        }
        Ok(dir)
    }

    /// Open the regular file `name` of this directory (one component) for reading. A
    /// symlink, a directory, a FIFO or a device is refused with `ELOOP`, `EISDIR`, or
    /// `EINVAL`: it is opened `O_PATH` first and only reopened (through `/proc/self/fd`)
    /// once it is known to be a regular file, so nothing else is ever opened.
    pub fn open_regular(&self, name: &[u8]) -> io::Result<std::fs::File> {
        if name.is_empty() || name.contains(&b'/') || name == b".." || name == b"." {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("not a plain name: {:?}", String::from_utf8_lossy(name)),
            ));
        }
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
        let fd = openat2(self.fd.as_fd(), OsStr::from_bytes(name), how)?;
        let stat = fstat(&fd)?;
        match stat.st_mode & libc::S_IFMT {
            libc::S_IFREG => {}
            libc::S_IFLNK => return Err(io::Error::from_raw_os_error(libc::ELOOP)),
            libc::S_IFDIR => return Err(io::Error::from_raw_os_error(libc::EISDIR)),
            _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
        std::fs::File::open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
    }

    /// Names in this directory (not `.` and `..`), sorted bytewise.
    pub fn names(&self) -> Result<Vec<Vec<u8>>> {
        let list = || anyhow!("{}: cannot list", self.path.display());
        let mut names = std::fs::read_dir(self.proc_path())
            .map_err(|e| list().context(e))?
            .map(|e| e.map(|e| e.file_name().as_bytes().to_vec()))
            .collect::<io::Result<Vec<_>>>()
            .map_err(|e| list().context(e))?;
        names.sort();
        Ok(names)
    }
}

/// Whether two stats are of the same file.
pub fn same_file(a: &FileStat, b: &FileStat) -> bool {
    (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    #[test]
    fn in_root_follows_symlinks_inside_and_creates_below_real_dirs() {
        let outside = tempfile::tempdir().unwrap();
        let tree = tempfile::tempdir().unwrap();
        let root = tree.path();
        // Absolute and escaping symlinks, as a hostile stage has them.
        symlink(outside.path(), root.join("etc")).unwrap();
        symlink("../../../..", root.join("up")).unwrap();
        // The symlink's target as the tree sees it: a directory inside the tree.
        let inner = root.join(outside.path().strip_prefix("/").unwrap());
        fs::create_dir_all(&inner).unwrap();
        let dir = Dir::open(root).unwrap();

        let etc = dir.in_root("/etc", true, false).unwrap();
        let inner_stat = nix::sys::stat::stat(&inner).unwrap();
        assert!(same_file(&etc.stat().unwrap(), &inner_stat));

        let made = dir.in_root("/up/var/cache/binpkgs", true, false).unwrap();
        assert!(
            root.join("var/cache/binpkgs").is_dir(),
            "made at the tree's top"
        );
        assert!(made.stat().is_ok());
        assert_eq!(
            fs::read_dir(outside.path()).unwrap().count(),
            0,
            "outside touched"
        );

        symlink("/nowhere", root.join("dangling")).unwrap();
        let err = dir.in_root("/dangling/x", true, false).unwrap_err();
        assert!(format!("{err:#}").contains("missing directory"), "{err:#}");
        assert!(dir.in_root("/a/../b", true, false).is_err());
    }

    #[test]
    fn beneath_and_child_refuse_symlinks() {
        let outside = tempfile::tempdir().unwrap();
        let tree = tempfile::tempdir().unwrap();
        fs::create_dir_all(tree.path().join("var/tmp")).unwrap();
        symlink(outside.path(), tree.path().join("var/tmp/dev")).unwrap();
        symlink(outside.path(), tree.path().join("link")).unwrap();
        let dir = Dir::open(tree.path()).unwrap();
        assert!(dir.beneath(b"var/tmp").is_ok());
        let err = dir.beneath(b"var/tmp/dev").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP));
        let err = dir.beneath(b"link/x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP));
        assert_eq!(
            dir.child(b"link").unwrap_err().raw_os_error(),
            Some(libc::ELOOP)
        );
        assert!(dir.child(b"..").is_err());
        assert!(Dir::open(&tree.path().join("link")).is_err());
        assert_eq!(dir.names().unwrap(), [b"link".to_vec(), b"var".to_vec()]);
    }
}
