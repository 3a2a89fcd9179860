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

use anyhow::{Context, Result};

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
/// line), and the index's mtime.
fn profile_of(dir: &Path) -> Option<(String, i64)> {
    let index = dir.join("Packages");
    let meta = fs::symlink_metadata(&index).ok()?;
    if !meta.is_file() {
        return None;
    }
    let file = fs::File::open(&index).ok()?;
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
fn link_tree(from: &Path, to: &Path) -> Result<usize> {
    fs::create_dir_all(to).with_context(|| format!("{}: cannot create", to.display()))?;
    let mut linked = 0;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = from.join(&rel);
        for entry in
            fs::read_dir(&dir).with_context(|| format!("{}: cannot list", dir.display()))?
        {
            let entry = entry.with_context(|| format!("{}: cannot list", dir.display()))?;
            let rel = rel.join(entry.file_name());
            let kind = entry
                .file_type()
                .with_context(|| format!("{}: cannot read", entry.path().display()))?;
            let target = to.join(&rel);
            if kind.is_dir() {
                match fs::create_dir(&target) {
                    Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                        return Err(e)
                            .with_context(|| format!("{}: cannot create", target.display()));
                    }
                    _ => {}
                }
                stack.push(rel);
            } else if kind.is_file() {
                match fs::hard_link(entry.path(), &target) {
                    Ok(()) => linked += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!(
                                "{}: cannot link to {}",
                                target.display(),
                                entry.path().display()
                            )
                        });
                    }
                }
            }
        }
    }
    Ok(linked)
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
}
