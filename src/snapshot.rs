//! The Portage tree a session or build uses: a directory as it is, or a snapshot extracted
//! once into `portage/TAG`: a tarball (its single top-level directory stripped, as
//! `emerge-webrsync` does) or a squashfs image (whose root is the tree).
//!
//! A marker file records which snapshot (by SHA-256) the directory holds, so the same
//! snapshot is never extracted twice and a different one replaces it.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use anyhow::{Context, Result, bail};

use crate::archive::digest::sha256_file;
use crate::archive::{decompress, extract, squashfs};
use crate::progress::{self, Verbosity};

const MARKER: &str = ".gentoo-mkimg-snapshot";

/// Make `snapshot` available as a directory; `dest` is where a tarball gets extracted.
/// Returns the tree's directory and whether it was extracted now.
pub fn prepare(snapshot: &Path, dest: &Path, verbosity: Verbosity) -> Result<(PathBuf, bool)> {
    let meta = fs::metadata(snapshot)
        .with_context(|| format!("{}: cannot open the snapshot", snapshot.display()))?;
    if meta.is_dir() {
        check_tree(snapshot)?;
        return Ok((snapshot.to_path_buf(), false));
    }
    let digest = sha256_file(snapshot)?;
    let marker = dest.join(MARKER);
    if fs::read_to_string(&marker).is_ok_and(|m| m.trim() == digest) {
        return Ok((dest.to_path_buf(), false));
    }
    let parent = dest.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-snapshot-")
        .tempdir_in(parent)
        .with_context(|| format!("{}: cannot create a temporary dir", parent.display()))?;
    let opts = extract::ExtractOptions {
        preserve_owners: nix::unistd::geteuid().is_root(),
        strip_top_dir: true,
        ..Default::default()
    };
    if squashfs::is_squashfs(snapshot)? {
        // A squashfs snapshot's root is the tree: nothing to strip.
        let opts = extract::ExtractOptions {
            strip_top_dir: false,
            ..opts
        };
        let bar = progress::Bar::counting(verbosity, "extracting snapshot");
        squashfs::extract(snapshot, tmp.path(), opts, |done, total| {
            bar.set_of(done, total)
        })
        .with_context(|| format!("{}: cannot extract the snapshot", snapshot.display()))?;
        bar.finish();
    } else {
        let input = decompress::open(snapshot)?;
        let bar = progress::Bar::new(verbosity, "extracting snapshot", input.size);
        let consumed = input.consumed.clone();
        extract::extract(input.reader, tmp.path(), opts, || {
            bar.set(consumed.load(Ordering::Relaxed))
        })
        .with_context(|| format!("{}: cannot extract the snapshot", snapshot.display()))?;
        bar.finish();
    }
    check_tree(tmp.path()).with_context(|| format!("{}", snapshot.display()))?;
    fs::write(tmp.path().join(MARKER), format!("{digest}\n"))
        .context("cannot mark the snapshot extracted")?;
    if dest.exists() {
        fs::remove_dir_all(dest)
            .with_context(|| format!("{}: cannot replace the old snapshot", dest.display()))?;
    }
    let kept = tmp.keep();
    fs::rename(&kept, dest)
        .with_context(|| format!("{}: cannot move into place", dest.display()))?;
    Ok((dest.to_path_buf(), true))
}

/// A usable ebuild repository has `profiles/repo_name`.
pub fn check_tree(tree: &Path) -> Result<()> {
    let name = tree.join("profiles/repo_name");
    if !name.is_file() {
        bail!(
            "{}: not a Portage tree (no profiles/repo_name)",
            tree.display()
        );
    }
    Ok(())
}
