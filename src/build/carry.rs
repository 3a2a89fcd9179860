//! Binary packages carried across tags: a new TAG's `packages/TAG` starts as hard links of
//! the newest earlier `packages/*` built for the same profile, so a build with a new
//! snapshot compiles only what changed. Portage decides what is still valid: the build runs
//! `--usepkg` with `--binpkg-respect-use=y --binpkg-changed-deps=y`, and Portage itself
//! refuses binary packages of another CHOST.
//!
//! The profile of a package dir is the `PROFILE:` line of its `Packages` index, which Portage
//! writes with every binary package.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};

use crate::archive::pinned::Dir;

/// Where a new TAG's binary packages came from.
#[derive(Debug, Clone)]
pub struct Carried {
    pub from: PathBuf,
    pub files: usize,
}

/// Whether `dir` holds no binary package index yet (missing, empty, or never built into).
pub fn is_fresh(dir: &Path) -> bool {
    !dir.join("Packages").exists()
}

/// The `PROFILE:` of a package dir's `Packages` index (its header ends at the first empty
/// line), and the index's mtime. The index is opened without following a symlink: a build
/// writes these dirs.
fn profile_of(dir: &Path) -> Option<(String, i64)> {
    use std::os::unix::fs::OpenOptionsExt;
    let index = dir.join("Packages");
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&index)
        .ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() {
        return None;
    }
    for line in BufReader::new(file).lines() {
        let line = line.ok()?;
        if line.is_empty() {
            break;
        }
        if let Some(profile) = line.strip_prefix("PROFILE:") {
            return Some((profile.trim().to_string(), meta.mtime()));
        }
    }
    None
}

/// Fill the fresh `packages_root/tag` with hard links of the newest other package dir of
/// `packages_root` built for `profile`. `None` when there is none.
pub fn carry(packages_root: &Path, tag: &str, profile: &str) -> Result<Option<Carried>> {
    let Ok(entries) = fs::read_dir(packages_root) else {
        return Ok(None);
    };
    let mut best: Option<(i64, PathBuf)> = None;
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_name() == tag || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if let Some((p, mtime)) = profile_of(&path)
            && p == profile
            && best.as_ref().is_none_or(|(t, _)| mtime > *t)
        {
            best = Some((mtime, path));
        }
    }
    let Some((_, from)) = best else {
        return Ok(None);
    };
    let dest = packages_root.join(tag);
    let files = link_tree(&from, &dest)
        .with_context(|| format!("cannot carry {} into {}", from.display(), dest.display()))?;
    Ok(Some(Carried { from, files }))
}

/// Recreate `from`'s directories under `to` and hard-link its regular files; symlinks and
/// anything else are left out (a package dir holds neither). The number of files linked.
///
/// `from` was written by an earlier build, which may still be running (another TAG): both
/// trees are walked by directory fd and nothing in them is followed, so a directory swapped
/// for a symlink cannot make this link a host file into `to`.
fn link_tree(from: &Path, to: &Path) -> Result<usize> {
    use nix::fcntl::AtFlags;
    use nix::sys::stat::{Mode, SFlag, fstatat, mkdirat};
    fn walk(from: &Dir, to: &Dir) -> Result<usize> {
        let mut linked = 0;
        for name in from.names()? {
            let st = fstatat(from.fd(), name.as_slice(), AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(|e| anyhow!("{}: cannot read: {e}", from.display(&name)))?;
            match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
                SFlag::S_IFDIR => {
                    match mkdirat(to.fd(), name.as_slice(), Mode::from_bits_truncate(0o755)) {
                        Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                        Err(e) => bail!("{}: cannot create: {e}", to.display(&name)),
                    }
                    let sub_from = from
                        .child(&name)
                        .map_err(|e| anyhow!("{}: cannot open: {e}", from.display(&name)))?;
                    let sub_to = to
                        .child(&name)
                        .map_err(|e| anyhow!("{}: cannot open: {e}", to.display(&name)))?;
                    linked += walk(&sub_from, &sub_to)?;
                }
                SFlag::S_IFREG => {
                    // linkat without AT_SYMLINK_FOLLOW: the name itself is never followed.
                    match nix::unistd::linkat(
                        from.fd(),
                        name.as_slice(),
                        to.fd(),
                        name.as_slice(),
                        AtFlags::empty(),
                    ) {
                        Ok(()) => linked += 1,
                        Err(nix::errno::Errno::EEXIST) => {}
                        Err(e) => bail!(
                            "{}: cannot link to {}: {e}",
                            to.display(&name),
                            from.display(&name)
                        ),
                    }
                }
                _ => {}
            }
        }
        Ok(linked)
    }
    fs::create_dir_all(to).with_context(|| format!("{}: cannot create", to.display()))?;
    walk(&Dir::open(from)?, &Dir::open(to)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn package_dir(root: &Path, tag: &str, profile: &str) {
        let dir = root.join(tag);
        fs::create_dir_all(dir.join("app-misc/hello")).unwrap();
        fs::write(
            dir.join("Packages"),
            format!("ARCH: amd64\nPROFILE: {profile}\nVERSION: 0\n\nCPV: app-misc/hello-1\n"),
        )
        .unwrap();
        fs::write(dir.join("app-misc/hello/hello-1-1.gpkg.tar"), tag).unwrap();
    }

    #[test]
    fn a_new_tag_links_the_newest_dir_of_its_profile() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        package_dir(root, "old", "default/linux/amd64/23.0/musl");
        std::thread::sleep(std::time::Duration::from_millis(20));
        package_dir(root, "other", "default/linux/amd64/23.0");
        std::thread::sleep(std::time::Duration::from_millis(20));
        package_dir(root, "newer", "default/linux/amd64/23.0/musl");

        assert!(is_fresh(&root.join("new")));
        let carried = carry(root, "new", "default/linux/amd64/23.0/musl")
            .unwrap()
            .unwrap();
        assert_eq!(carried.from, root.join("newer"));
        assert_eq!(carried.files, 2);
        let linked = root.join("new/app-misc/hello/hello-1-1.gpkg.tar");
        assert_eq!(fs::read_to_string(&linked).unwrap(), "newer");
        let (a, b) = (
            fs::metadata(&linked).unwrap(),
            fs::metadata(root.join("newer/app-misc/hello/hello-1-1.gpkg.tar")).unwrap(),
        );
        assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()), "a copy, not a link");
        assert!(!is_fresh(&root.join("new")));

        // No dir of that profile: nothing carried.
        assert!(
            carry(root, "x", "default/linux/arm64/23.0")
                .unwrap()
                .is_none()
        );
        assert!(!root.join("x").exists());
    }

    #[test]
    fn links_and_a_linked_index_in_the_source_are_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("packages");
        package_dir(&root, "old", "p");
        let host = tmp.path().join("host");
        fs::create_dir_all(&host).unwrap();
        fs::write(host.join("secret"), "host file").unwrap();
        std::os::unix::fs::symlink(&host, root.join("old/app-admin")).unwrap();
        std::os::unix::fs::symlink(host.join("secret"), root.join("old/stolen")).unwrap();
        let carried = carry(&root, "new", "p").unwrap().unwrap();
        assert_eq!(carried.files, 2, "only the index and the package");
        assert!(fs::symlink_metadata(root.join("new/app-admin")).is_err());
        assert!(fs::symlink_metadata(root.join("new/stolen")).is_err());
        assert_eq!(fs::metadata(host.join("secret")).unwrap().nlink(), 1);

        // A Packages index that is a symlink gives no profile.
        package_dir(&root, "linked", "p");
        fs::remove_file(root.join("linked/Packages")).unwrap();
        std::os::unix::fs::symlink(root.join("old/Packages"), root.join("linked/Packages"))
            .unwrap();
        assert!(profile_of(&root.join("linked")).is_none());
    }
}
