//! The build key: one digest over everything that decides what a build makes, recorded as
//! a label in the dev and rt images it made. A later build whose key is the same, with
//! those images still in the store, has nothing to do.
//!
//! What goes in: the tool's version; the stage's and the snapshot's bytes (a directory
//! snapshot or extra repository by its listing: names, types, modes, sizes, mtimes and
//! link targets); every file handed to the driver (settings, make.conf, package.*, the
//! driver itself), less the settings that change nothing in the images (verbosity, the
//! owner files are handed back to); the image names and the layer compression; the raw
//! image's manifest; and the binary packages in `packages/TAG` by their listing. The key
//! recorded after a build is taken with the packages that build left, so the next build
//! with the same inputs finds the same key before it starts.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest as _, Sha256};

/// The label in the dev and rt image configs that holds the key.
pub const LABEL: &str = "org.gentoo-mkimg.build-key";

/// Collects the parts of a key; each part is named, so two parts cannot run together.
#[derive(Clone)]
pub struct KeyBuilder {
    hasher: Sha256,
}

impl Default for KeyBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl KeyBuilder {
    pub fn new() -> Self {
        let mut k = Self {
            hasher: Sha256::new(),
        };
        k.text("tool", env!("CARGO_PKG_VERSION"));
        k
    }

    fn field(&mut self, name: &str, value: &[u8]) {
        self.hasher.update((name.len() as u64).to_le_bytes());
        self.hasher.update(name.as_bytes());
        self.hasher.update((value.len() as u64).to_le_bytes());
        self.hasher.update(value);
    }

    /// A named piece of text.
    pub fn text(&mut self, name: &str, value: &str) {
        self.field(name, value.as_bytes());
    }

    /// A file by its bytes, or a directory by its listing (see [`Self::listing`]).
    pub fn path(&mut self, name: &str, path: &Path) -> Result<()> {
        let meta =
            fs::metadata(path).with_context(|| format!("{}: cannot read", path.display()))?;
        if meta.is_dir() {
            return self.listing(name, path);
        }
        let digest = crate::archive::digest::sha256_file(path)?;
        self.field(name, digest.as_bytes());
        Ok(())
    }

    /// A directory by its listing: every entry's relative name, type, mode, size, mtime (ns)
    /// and symlink target, in name order; symlinks are not followed. A missing directory is
    /// an empty listing.
    pub fn listing(&mut self, name: &str, dir: &Path) -> Result<()> {
        let mut lines: Vec<u8> = Vec::new();
        let mut stack = vec![std::path::PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let here = dir.join(&rel);
            let entries = match fs::read_dir(&here) {
                Ok(e) => e,
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound && rel.as_os_str().is_empty() =>
                {
                    break;
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("{}: cannot list", here.display()));
                }
            };
            let mut names: Vec<_> = entries
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()
                .with_context(|| format!("{}: cannot list", here.display()))?;
            names.sort();
            for entry in names {
                let rel = rel.join(&entry);
                let path = dir.join(&rel);
                let meta = fs::symlink_metadata(&path)
                    .with_context(|| format!("{}: cannot read", path.display()))?;
                let target = if meta.file_type().is_symlink() {
                    fs::read_link(&path)
                        .with_context(|| format!("{}: cannot read the link", path.display()))?
                        .into_os_string()
                } else {
                    Default::default()
                };
                use std::os::unix::ffi::OsStrExt;
                lines.extend_from_slice(rel.as_os_str().as_bytes());
                lines.push(0);
                lines.extend_from_slice(
                    format!(
                        "{:o} {} {}.{:09} ",
                        meta.mode(),
                        if meta.is_dir() { 0 } else { meta.size() },
                        meta.mtime(),
                        meta.mtime_nsec()
                    )
                    .as_bytes(),
                );
                lines.extend_from_slice(target.as_bytes());
                lines.push(b'\n');
                if meta.is_dir() {
                    stack.push(rel);
                }
            }
        }
        self.field(name, &Sha256::digest(&lines));
        Ok(())
    }

    /// The key: `sha256:<hex>`.
    pub fn finish(self) -> String {
        format!("sha256:{}", hex::encode(self.hasher.finalize()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(dir: &Path) -> String {
        let mut k = KeyBuilder::new();
        k.path("tree", dir).unwrap();
        k.finish()
    }

    #[test]
    fn a_key_changes_with_any_part_and_only_then() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("packages");
        fs::create_dir_all(dir.join("app-misc")).unwrap();
        fs::write(dir.join("app-misc/hello-1.0.gpkg.tar"), "one").unwrap();
        let first = key_of(&dir);
        assert_eq!(first, key_of(&dir), "the same tree, another key");

        fs::write(dir.join("app-misc/extra-1.0.gpkg.tar"), "two").unwrap();
        let second = key_of(&dir);
        assert_ne!(first, second, "a new package, the same key");

        std::os::unix::fs::symlink("hello-1.0.gpkg.tar", dir.join("app-misc/link")).unwrap();
        let third = key_of(&dir);
        assert_ne!(second, third, "a new symlink, the same key");

        // A file by its bytes: the same bytes elsewhere give the same part.
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        fs::write(&a, "stage").unwrap();
        fs::write(&b, "stage").unwrap();
        assert_eq!(key_of(&a), key_of(&b));
        fs::write(&b, "stagE").unwrap();
        assert_ne!(key_of(&a), key_of(&b));

        // Parts are named and delimited: "ab"+"c" is not "a"+"bc".
        let mut x = KeyBuilder::new();
        x.text("p", "ab");
        x.text("q", "c");
        let mut y = KeyBuilder::new();
        y.text("p", "a");
        y.text("q", "bc");
        assert_ne!(x.finish(), y.finish());

        // No directory yet: an empty listing, not an error.
        let mut k = KeyBuilder::new();
        k.listing("packages", &tmp.path().join("none")).unwrap();
    }
}
