//! The installed-package database, `/var/db/pkg/CAT/PF/`, of a root filesystem.
//!
//! Which packages a root holds, from the paths of a tree or a layer, and [`Vdb`]: a few
//! small files of each package directory, read from an image's layers as tar streams,
//! lowest first, without extracting anything. OCI whiteouts (`.wh.NAME`, `.wh..wh..opq`)
//! hide what lower layers put there, and a later layer's files override an earlier
//! layer's. Partially merged entries (`-MERGING-` directories) are not installed packages
//! and are left out.

use std::collections::BTreeMap;
use std::io::Read;

use anyhow::{Result, anyhow};

use crate::archive::entries::{EntryKind, walk_layer, whiteout};

/// The most of one vdb file kept (USE, LICENSE and RDEPEND of real packages are far smaller).
pub const VALUE_MAX: u64 = 1 << 20;

/// One installed package: `CAT/PF` and the kept vdb files that it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// `CAT/PF`, e.g. `sys-apps/sed-4.9`.
    pub package: String,
    /// vdb file name → its bytes as read.
    pub values: BTreeMap<&'static str, Vec<u8>>,
}

impl Installed {
    /// The file `key` as text, trimmed (`None`: the package has no such file).
    pub fn text(&self, key: &str) -> Option<String> {
        self.values
            .get(key)
            .map(|v| String::from_utf8_lossy(v).trim().to_string())
    }
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

/// One package directory as the layers so far leave it.
#[derive(Debug, Default)]
struct Entry {
    /// The last layer with an entry in (or for) the package directory.
    seen: usize,
    /// vdb key → (value, layer that wrote it).
    values: BTreeMap<&'static str, (Vec<u8>, usize)>,
}

/// The `/var/db/pkg` of an image, built up layer by layer: of each package directory only
/// the files named by `keys` are kept (each at most [`VALUE_MAX`] bytes).
#[derive(Debug)]
pub struct Vdb {
    keys: &'static [&'static str],
    /// `var/db/pkg/CAT/PF` (raw path) → what is known of it.
    packages: BTreeMap<Vec<u8>, Entry>,
}

/// `var/db/pkg/CAT/PF` and the rest of the path below it, for a path in a package directory.
fn split_package(path: &[u8]) -> Option<(&[u8], &[u8])> {
    let rest = path.strip_prefix(b"var/db/pkg/")?;
    let mut parts = rest.splitn(3, |&b| b == b'/');
    let (cat, pf) = (parts.next()?, parts.next()?);
    if cat.is_empty() || pf.is_empty() || pf.starts_with(b"-MERGING-") {
        return None;
    }
    let dir_len = "var/db/pkg/".len() + cat.len() + 1 + pf.len();
    let below = path.get(dir_len + 1..).unwrap_or(b"");
    Some((&path[..dir_len], below))
}

/// `a` is `b` or below it.
fn is_under(a: &[u8], b: &[u8]) -> bool {
    b.is_empty() || a == b || (a.starts_with(b) && a.get(b.len()) == Some(&b'/'))
}

fn key_of(keys: &'static [&'static str], name: &[u8]) -> Option<&'static str> {
    keys.iter().copied().find(|k| k.as_bytes() == name)
}

impl Vdb {
    /// An empty database that keeps the files `keys` of each package directory.
    pub fn new(keys: &'static [&'static str]) -> Vdb {
        Vdb {
            keys,
            packages: BTreeMap::new(),
        }
    }

    /// Hide what layers below `layer` put at `path` and below (`only_below`: not `path`
    /// itself). A package directory some entry of `layer` itself names stays, with only
    /// the values `layer` wrote.
    fn hide_lower(&mut self, path: &[u8], only_below: bool, layer: usize) {
        let keys = self.keys;
        self.packages.retain(|dir, entry| {
            if is_under(dir, path) {
                entry.values.retain(|_, (_, l)| *l >= layer);
                // An opaque package directory stays, emptied of what lower layers wrote.
                return (only_below && dir.as_slice() == path) || entry.seen >= layer;
            }
            // A vdb file inside the package directory: that file only.
            if !only_below
                && let Some(key) = path
                    .strip_prefix(dir.as_slice())
                    .and_then(|rest| rest.strip_prefix(b"/"))
                    .and_then(|name| key_of(keys, name))
                && entry.values.get(key).is_some_and(|(_, l)| *l < layer)
            {
                entry.values.remove(key);
            }
            true
        });
    }

    fn touch(&mut self, dir: &[u8], layer: usize) -> &mut Entry {
        let entry = self.packages.entry(dir.to_vec()).or_default();
        entry.seen = layer;
        entry
    }

    /// Apply one layer (a tar stream) on top of what is there.
    pub fn apply_layer(&mut self, input: impl Read, layer: usize) -> Result<()> {
        walk_layer(input, |meta, mut entry, last| {
            if let Some(hides) = whiteout(&meta.path) {
                if let Some((path, everything_in)) = hides {
                    if let (true, Some((dir, b""))) = (everything_in, split_package(&path)) {
                        self.touch(dir, layer);
                    }
                    self.hide_lower(&path, everything_in, layer);
                }
                return Ok(());
            }
            if meta.kind != EntryKind::Directory {
                // A file, link or device hides any directory of that name below.
                self.hide_lower(&meta.path, true, layer);
            }
            let Some((dir, below)) = split_package(&meta.path) else {
                return Ok(());
            };
            if below.is_empty() {
                if meta.kind == EntryKind::Directory {
                    self.touch(dir, layer);
                } else {
                    // Not a directory: no package there any more.
                    self.packages.remove(dir);
                }
                return Ok(());
            }
            let keys = self.keys;
            let key = key_of(keys, below);
            let value = match (&meta.kind, key) {
                (EntryKind::Regular { size }, Some(_)) => {
                    let mut value = Vec::new();
                    (&mut entry)
                        .take(VALUE_MAX.min(*size))
                        .read_to_end(&mut value)
                        .map_err(|e| anyhow!("entry {last:?}: cannot read: {e}"))?;
                    Some(value)
                }
                (EntryKind::HardLink { target }, Some(_)) => {
                    split_package(target).and_then(|(d, b)| {
                        let k = key_of(keys, b)?;
                        self.packages.get(d)?.values.get(k).map(|(v, _)| v.clone())
                    })
                }
                _ => None,
            };
            let package = self.touch(dir, layer);
            if let Some(key) = key {
                match value {
                    Some(v) => {
                        package.values.insert(key, (v, layer));
                    }
                    None => {
                        package.values.remove(key);
                    }
                }
            }
            Ok(())
        })
    }

    /// The installed packages, sorted by CAT/PF.
    pub fn installed(&self) -> Vec<Installed> {
        self.packages
            .iter()
            .map(|(dir, entry)| Installed {
                package: String::from_utf8_lossy(&dir["var/db/pkg/".len()..]).into_owned(),
                values: entry
                    .values
                    .iter()
                    .map(|(k, (v, _))| (*k, v.clone()))
                    .collect(),
            })
            .collect()
    }
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

    fn tar_of(entries: &[(&str, Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            match data {
                Some(d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(d.len() as u64);
                    b.append_data(&mut h, path, d.as_bytes()).unwrap();
                }
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    b.append_data(&mut h, path, std::io::empty()).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    const KEYS: [&str; 5] = ["SLOT", "USE", "LICENSE", "SIZE", "repository"];

    fn names(vdb: &Vdb) -> Vec<String> {
        vdb.installed().into_iter().map(|p| p.package).collect()
    }

    #[test]
    fn reads_the_vdb_files_of_each_package() {
        let mut vdb = Vdb::new(&KEYS);
        let layer = tar_of(&[
            ("var/db/pkg/", None),
            ("var/db/pkg/app-misc/", None),
            ("var/db/pkg/app-misc/hello-1/", None),
            ("var/db/pkg/app-misc/hello-1/SLOT", Some("0\n")),
            ("var/db/pkg/app-misc/hello-1/USE", Some("amd64 nls\n")),
            ("var/db/pkg/app-misc/hello-1/LICENSE", Some("GPL-2 MIT\n")),
            ("var/db/pkg/app-misc/hello-1/SIZE", Some("12345\n")),
            ("var/db/pkg/app-misc/hello-1/repository", Some("gentoo\n")),
            ("var/db/pkg/app-misc/hello-1/CONTENTS", Some("obj /x a 1\n")),
            ("var/db/pkg/sys-libs/-MERGING-demo-1/SLOT", Some("0\n")),
            ("var/db/pkg/sys-libs/demo-2/SIZE", Some("lots\n")),
            ("usr/bin/hello", Some("#!/bin/sh\n")),
        ]);
        vdb.apply_layer(&layer[..], 0).unwrap();
        let got = vdb.installed();
        assert_eq!(got[0].package, "app-misc/hello-1");
        let texts: Vec<_> = KEYS.iter().map(|k| got[0].text(k)).collect();
        let want = ["0", "amd64 nls", "GPL-2 MIT", "12345", "gentoo"];
        assert_eq!(texts, want.map(|w| Some(w.to_string())));
        assert_eq!(got[1].package, "sys-libs/demo-2");
        assert_eq!(got[1].text("SIZE").as_deref(), Some("lots"));
        assert_eq!(got[1].text("SLOT"), None);
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn later_layers_override_and_whiteouts_hide() {
        let mut vdb = Vdb::new(&KEYS);
        let base = tar_of(&[
            ("var/db/pkg/a/old-1/SLOT", Some("0")),
            ("var/db/pkg/a/keep-1/SLOT", Some("1")),
            ("var/db/pkg/a/keep-1/USE", Some("x")),
            ("var/db/pkg/b/gone-1/SLOT", Some("0")),
            ("var/db/pkg/c/opq-1/SLOT", Some("0")),
        ]);
        vdb.apply_layer(&base[..], 0).unwrap();
        let top = tar_of(&[
            ("var/db/pkg/a/.wh.old-1", Some("")),
            ("var/db/pkg/a/new-2/SLOT", Some("2")),
            ("var/db/pkg/a/keep-1/SLOT", Some("3")),
            ("var/db/pkg/a/keep-1/.wh.USE", Some("")),
            ("var/db/pkg/.wh.b", Some("")),
            ("var/db/pkg/c/.wh..wh..opq", Some("")),
        ]);
        vdb.apply_layer(&top[..], 1).unwrap();
        assert_eq!(names(&vdb), ["a/keep-1", "a/new-2"]);
        let keep = &vdb.installed()[0];
        assert_eq!(keep.text("SLOT").as_deref(), Some("3"));
        assert_eq!(keep.text("USE"), None);
    }

    #[test]
    fn a_truncated_layer_is_an_error() {
        let layer = tar_of(&[("var/db/pkg/a/b-1/SLOT", Some("0"))]);
        let cut = &layer[..1024];
        let err = Vdb::new(&KEYS).apply_layer(cut, 0).unwrap_err();
        assert!(format!("{err:#}").contains("truncated"), "{err:#}");
    }
}
