//! The installed-package database, `/var/db/pkg/CAT/PF/`, of a root filesystem.
//!
//! Only what the tool reports on: which packages a root holds. Partially merged entries
//! (`-MERGING-` directories) are not installed packages and are left out.

use std::path::Path;

use anyhow::{Context, Result};

/// `CAT/PF` of every package installed in `root`, sorted.
pub fn installed(root: &Path) -> Result<Vec<String>> {
    let vdb = root.join("var/db/pkg");
    let mut packages = Vec::new();
    let categories = match std::fs::read_dir(&vdb) {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(packages),
        Err(e) => return Err(e).with_context(|| format!("{}: cannot list", vdb.display())),
    };
    for category in categories {
        let category = category.with_context(|| format!("{}: cannot list", vdb.display()))?;
        if !category.file_type()?.is_dir() {
            continue;
        }
        let cat = category.file_name().to_string_lossy().into_owned();
        for pkg in std::fs::read_dir(category.path())
            .with_context(|| format!("{}: cannot list", category.path().display()))?
        {
            let pkg = pkg?;
            let pf = pkg.file_name().to_string_lossy().into_owned();
            if pkg.file_type()?.is_dir() && !pf.starts_with("-MERGING-") {
                packages.push(format!("{cat}/{pf}"));
            }
        }
    }
    packages.sort();
    Ok(packages)
}

/// `CAT/PF` from a path inside a root, when the path is a vdb package directory
/// (`var/db/pkg/CAT/PF`).
pub fn package_of_path(path: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(path).ok()?;
    let rest = text.strip_prefix("var/db/pkg/")?.trim_end_matches('/');
    let mut parts = rest.split('/');
    let (cat, pf) = (parts.next()?, parts.next()?);
    (parts.next().is_none() && !pf.starts_with("-MERGING-")).then(|| format!("{cat}/{pf}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_installed_packages() {
        let dir = tempfile::tempdir().unwrap();
        for p in [
            "app-misc/hello-1",
            "sys-libs/libdemo-1.0",
            "sys-libs/-MERGING-x-1",
        ] {
            std::fs::create_dir_all(dir.path().join("var/db/pkg").join(p)).unwrap();
        }
        assert_eq!(
            installed(dir.path()).unwrap(),
            ["app-misc/hello-1", "sys-libs/libdemo-1.0"]
        );
        assert!(installed(&dir.path().join("none")).unwrap().is_empty());
        assert_eq!(package_of_path(b"var/db/pkg/a/b-1/"), Some("a/b-1".into()));
        assert_eq!(package_of_path(b"var/db/pkg/a/b-1/CONTENTS"), None);
        assert_eq!(package_of_path(b"var/db/pkg/a"), None);
    }
}
