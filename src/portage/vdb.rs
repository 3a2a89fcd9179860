//! The installed-package database, `/var/db/pkg/CAT/PF/`, of a root filesystem.
//!
//! Only what the tool reports on: which packages a root holds, from the paths of a tree or
//! a layer. Partially merged entries (`-MERGING-` directories) are not installed packages
//! and are left out.

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
    fn package_dirs_are_cat_pf_and_nothing_else() {
        assert_eq!(package_of_path(b"var/db/pkg/a/b-1/"), Some("a/b-1".into()));
        assert_eq!(package_of_path(b"var/db/pkg/a/b-1"), Some("a/b-1".into()));
        assert_eq!(package_of_path(b"var/db/pkg/a/b-1/CONTENTS"), None);
        assert_eq!(package_of_path(b"var/db/pkg/a"), None);
        assert_eq!(package_of_path(b"var/db/pkg/a/-MERGING-b-1"), None);
        assert_eq!(package_of_path(b"usr/db/pkg/a/b-1"), None);
    }
}
