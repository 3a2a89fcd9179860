//! `gentoo-mkimg gc`: remove from the store what no image uses.
//!
//! The walk starts at `index.json`: every manifest or index an entry names, their configs and
//! layers (and, for indexes, their manifests) are in use; every other blob under
//! `blobs/sha256/` goes, and so do the temporary files of runs that were killed. It is
//! refused while another command writes to the store, and removes nothing when an image's
//! manifest cannot be read (what it uses would be unknown). See [`Store::collect_garbage`].

use std::fmt;

use anyhow::Result;

use crate::image::store::{Garbage, Store};

/// What `gc` removed, or would remove with `dry_run`.
#[derive(Debug, Clone)]
pub struct GcReport {
    pub removed: Vec<Garbage>,
    pub dry_run: bool,
}

impl GcReport {
    /// Bytes freed (or that would be).
    pub fn bytes(&self) -> u64 {
        self.removed.iter().map(|g| g.size).sum()
    }
}

/// Collect the store's garbage; with `dry_run` only find it.
pub fn gc(store: &Store, dry_run: bool) -> Result<GcReport> {
    Ok(GcReport {
        removed: store.collect_garbage(dry_run)?,
        dry_run,
    })
}

impl fmt::Display for GcReport {
    /// One line per file, then the total.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.dry_run {
            "would remove"
        } else {
            "removed"
        };
        for g in &self.removed {
            let what = if g.temporary {
                "temporary file"
            } else {
                "unused blob"
            };
            writeln!(f, "{verb} {what} {} ({} bytes)", g.path.display(), g.size)?;
        }
        let bytes = self.bytes();
        let n = self.removed.len();
        let files = if n == 1 { "file" } else { "files" };
        let size = crate::progress::human_size(bytes);
        if self.dry_run {
            writeln!(
                f,
                "{n} {files} would be removed, {size} ({bytes} bytes) would be freed"
            )
        } else {
            writeln!(f, "{n} {files} removed, {size} ({bytes} bytes) freed")
        }
    }
}
