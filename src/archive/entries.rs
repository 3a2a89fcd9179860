//! Reading tarball entries safely: every entry of an input archive becomes an
//! [`EntryMeta`] after its path has been checked.
//!
//! Refused: absolute paths, `..` components, hard links that leave the tree, and entry types
//! a root filesystem cannot hold (GNU sparse and multi-volume parts). GNU long names, PAX
//! paths and `SCHILY.xattr.*` records are understood; names are kept as raw bytes.

use std::borrow::Cow;
use std::io::{self, Read};

use anyhow::{Result, anyhow, bail};

/// What an entry is, with what only that kind carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Regular { size: u64 },
    Directory,
    Symlink { target: Vec<u8> },
    HardLink { target: Vec<u8> },
    Char { major: u32, minor: u32 },
    Block { major: u32, minor: u32 },
    Fifo,
}

/// One filesystem entry as it goes into a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryMeta {
    /// Relative path without a leading `./`; empty for the root directory itself.
    pub path: Vec<u8>,
    pub kind: EntryKind,
    /// Permission bits including setuid, setgid and sticky.
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub uname: Vec<u8>,
    pub gname: Vec<u8>,
    pub mtime: u64,
    /// Extended attributes, in the order they are to be written.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// Strip a leading `./` (any number) and check that `path` stays inside the tree.
/// The root itself (`.` or `./`) becomes the empty path.
pub fn normalize_path(path: &[u8]) -> Result<Vec<u8>, String> {
    if path.first() == Some(&b'/') {
        return Err("absolute path".to_string());
    }
    let mut out: Vec<u8> = Vec::with_capacity(path.len());
    for component in path.split(|&b| b == b'/') {
        match component {
            b"" | b"." => continue,
            b".." => return Err("path leaves the tree ('..')".to_string()),
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Ok(out)
}

/// Show a raw path for a message: lossy UTF-8, at most 200 characters.
pub fn display_path(path: &[u8]) -> String {
    let s = String::from_utf8_lossy(path);
    if s.chars().count() > 200 {
        let cut: String = s.chars().take(200).collect();
        format!("{cut}…")
    } else {
        s.into_owned()
    }
}

/// Turn one input entry into an [`EntryMeta`], or explain why it cannot be part of an image.
pub fn entry_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<EntryMeta> {
    let raw_path: Vec<u8> = entry.path_bytes().into_owned();
    let path = normalize_path(&raw_path)
        .map_err(|why| anyhow::anyhow!("entry {:?}: {why}", display_path(&raw_path)))?;
    let header = entry.header();
    let what = || format!("entry {:?}", display_path(&raw_path));
    let num = |r: io::Result<u64>, field: &str| -> Result<u64> {
        r.map_err(|e| anyhow::anyhow!("{}: bad {field} field: {e}", what()))
    };
    let mode = num(header.mode().map(u64::from), "mode")? as u32;
    let uid = num(header.uid(), "uid")?;
    let gid = num(header.gid(), "gid")?;
    let mtime = num(header.mtime(), "mtime")?;
    let uname = header.username_bytes().unwrap_or_default().to_vec();
    let gname = header.groupname_bytes().unwrap_or_default().to_vec();
    let link = || -> Result<Vec<u8>> {
        match entry.link_name_bytes() {
            Some(Cow::Borrowed(b)) => Ok(b.to_vec()),
            Some(Cow::Owned(b)) => Ok(b),
            None => bail!("{}: link without a target", what()),
        }
    };
    let device = |r: io::Result<Option<u32>>| -> Result<u32> {
        r.map_err(|e| anyhow::anyhow!("{}: bad device number: {e}", what()))
            .map(Option::unwrap_or_default)
    };
    let kind = match header.entry_type() {
        tar::EntryType::Regular | tar::EntryType::Continuous => {
            EntryKind::Regular { size: entry.size() }
        }
        tar::EntryType::Directory => EntryKind::Directory,
        tar::EntryType::Symlink => EntryKind::Symlink { target: link()? },
        tar::EntryType::Link => {
            let target = normalize_path(&link()?)
                .map_err(|why| anyhow::anyhow!("{}: hard link target: {why}", what()))?;
            EntryKind::HardLink { target }
        }
        tar::EntryType::Char => EntryKind::Char {
            major: device(header.device_major())?,
            minor: device(header.device_minor())?,
        },
        tar::EntryType::Block => EntryKind::Block {
            major: device(header.device_major())?,
            minor: device(header.device_minor())?,
        },
        tar::EntryType::Fifo => EntryKind::Fifo,
        other => bail!("{}: unsupported entry type {other:?}", what()),
    };
    let mut xattrs = Vec::new();
    if let Some(exts) = entry
        .pax_extensions()
        .map_err(|e| anyhow::anyhow!("{}: bad PAX header: {e}", what()))?
    {
        for ext in exts {
            let ext = ext.map_err(|e| anyhow::anyhow!("{}: bad PAX record: {e}", what()))?;
            if let Ok(key) = ext.key()
                && let Some(name) = key
                    .strip_prefix("SCHILY.xattr.")
                    .or_else(|| key.strip_prefix("LIBARCHIVE.xattr."))
            {
                xattrs.push((name.to_string(), ext.value_bytes().to_vec()));
            }
        }
    }
    Ok(EntryMeta {
        path,
        kind,
        mode: mode & 0o7777,
        uid,
        gid,
        uname,
        gname,
        mtime,
        xattrs,
    })
}

/// Drops the single top-level directory of an archive from entry paths (a snapshot's
/// `portage/`, Docker's `BASENAME/` in an archive of a directory).
#[derive(Debug, Default)]
pub struct TopDirStripper {
    top: Option<Vec<u8>>,
}

impl TopDirStripper {
    /// Rewrite `meta` without the top directory; false for entries to skip (the top
    /// directory itself is kept as the root, the archive's own `./` is skipped).
    pub fn strip(&mut self, meta: &mut EntryMeta) -> Result<bool> {
        let (first, rest) = match meta.path.iter().position(|&b| b == b'/') {
            Some(i) => (meta.path[..i].to_vec(), meta.path[i + 1..].to_vec()),
            None => (meta.path.clone(), Vec::new()),
        };
        if first.is_empty() {
            return Ok(false);
        }
        match &self.top {
            None => self.top = Some(first.clone()),
            Some(top) if *top == first => {}
            Some(top) => bail!(
                "expected one top-level directory, found {:?} and {:?}",
                display_path(top),
                display_path(&first)
            ),
        }
        if let EntryKind::HardLink { target } = &mut meta.kind {
            let prefix = [first.as_slice(), b"/"].concat();
            match target.strip_prefix(prefix.as_slice()) {
                Some(t) => *target = t.to_vec(),
                None => bail!("hard link target outside the top-level directory"),
            }
        }
        meta.path = rest;
        Ok(!meta.path.is_empty() || meta.kind == EntryKind::Directory)
    }
}

/// A relative path's directory and last name (`("", path)` for a top-level name).
pub fn split_parent(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (b"", path),
    }
}

/// `dir/name` (`name` alone in the top directory `""`).
pub fn join_path(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(dir.len() + 1 + name.len());
    p.extend_from_slice(dir);
    if !dir.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// What an OCI whiteout entry (image-spec `layer.md`) at `path` hides of the layers below:
/// `Some((dir, true))` everything in `dir` (`dir/.wh..wh..opq`), `Some((path, false))` that
/// path (`.wh.NAME`), `None` nothing (another name the spec reserves); the outer `None`:
/// `path` is no whiteout but an entry.
pub fn whiteout(path: &[u8]) -> Option<Option<(Vec<u8>, bool)>> {
    let (parent, name) = split_parent(path);
    if name == b".wh..wh..opq" {
        return Some(Some((parent.to_vec(), true)));
    }
    let hidden = name.strip_prefix(b".wh.")?;
    Some((!hidden.starts_with(b".wh.")).then(|| (join_path(parent, hidden), false)))
}

/// Walk one image layer's tar stream as [`walk_tar`] does, except that a layer with no
/// entries at all needs no end-of-archive marker.
pub fn walk_layer<R: Read>(
    input: R,
    each: impl FnMut(EntryMeta, &mut dyn Read, &str) -> Result<()>,
) -> Result<()> {
    walk(input, "layer", true, each)
}

/// Walk a tar stream (`what` names it in messages, e.g. "archive"): `each` gets every entry's
/// metadata, its data and its name for messages. Fails on corrupt data and on a stream that
/// ends without tar's end-of-archive marker (so an empty or cut file is no archive); what
/// follows the marker is read too, so a reader that checks a digest as it streams sees all
/// of it.
pub fn walk_tar<R: Read>(
    input: R,
    what: &str,
    each: impl FnMut(EntryMeta, &mut dyn Read, &str) -> Result<()>,
) -> Result<()> {
    walk(input, what, false, each)
}

fn walk<R: Read>(
    input: R,
    what: &str,
    empty_ok: bool,
    mut each: impl FnMut(EntryMeta, &mut dyn Read, &str) -> Result<()>,
) -> Result<()> {
    let mut checked = TrailerCheck::new(input);
    let mut last = format!("(start of {what})");
    let mut any = false;
    {
        let mut archive = tar::Archive::new(&mut checked);
        let entries = archive
            .entries()
            .map_err(|e| anyhow!("cannot read the tar stream: {e}"))?;
        for entry in entries {
            let mut entry = entry
                .map_err(|e| anyhow!("corrupt or truncated data after entry {last:?}: {e}"))?;
            let meta = entry_meta(&mut entry)?;
            last = display_path(&meta.path);
            any = true;
            each(meta, &mut entry, &last)?;
        }
    }
    if (any || !empty_ok) && !checked.saw_end_marker() {
        bail!(
            "truncated: the {what} ends after entry {last:?} without tar's end-of-archive marker"
        );
    }
    io::copy(&mut checked, &mut io::sink())
        .map_err(|e| anyhow!("after the end of the tar stream: {e}"))?;
    Ok(())
}

/// Passes bytes through and remembers whether the stream ended with a zero block, so that
/// an uncompressed tarball cut at an entry boundary is still reported as truncated.
pub struct TrailerCheck<R> {
    inner: R,
    trailing_zeros: u64,
}

impl<R> TrailerCheck<R> {
    pub fn new(inner: R) -> Self {
        TrailerCheck {
            inner,
            trailing_zeros: 0,
        }
    }

    /// True when at least one all-zero 512-byte block ended what was read.
    pub fn saw_end_marker(&self) -> bool {
        self.trailing_zeros >= 512
    }
}

impl<R: Read> Read for TrailerCheck<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        match buf[..n].iter().rposition(|&b| b != 0) {
            Some(i) => self.trailing_zeros = (n - i - 1) as u64,
            None => self.trailing_zeros += n as u64,
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalised_and_escapes_refused() {
        assert_eq!(normalize_path(b"./usr/bin/").unwrap(), b"usr/bin");
        assert_eq!(normalize_path(b"./").unwrap(), b"");
        assert_eq!(normalize_path(b".").unwrap(), b"");
        assert_eq!(normalize_path(b"a//b/./c").unwrap(), b"a/b/c");
        assert!(normalize_path(b"/etc/passwd").is_err());
        assert!(normalize_path(b"./a/../../etc").is_err());
        assert!(normalize_path(b"..").is_err());
        assert_eq!(normalize_path(b"a/..b").unwrap(), b"a/..b");
    }

    #[test]
    fn trailer_check_needs_a_zero_block_at_the_end() {
        let mut data = vec![1u8; 1000];
        let mut r = TrailerCheck::new(&data[..]);
        io::copy(&mut r, &mut io::sink()).unwrap();
        assert!(!r.saw_end_marker());
        data.extend_from_slice(&[0u8; 1024]);
        let mut r = TrailerCheck::new(&data[..]);
        io::copy(&mut r, &mut io::sink()).unwrap();
        assert!(r.saw_end_marker());
    }

    /// An empty or cut stream is no archive; an empty layer is a layer.
    #[test]
    fn an_archive_needs_its_end_marker_and_an_empty_layer_none() {
        let none = |_: EntryMeta, _: &mut dyn Read, _: &str| Ok(());
        let err = walk_tar(&b""[..], "archive", none).unwrap_err();
        assert!(err.to_string().contains("truncated: the archive"), "{err}");
        walk_layer(&b""[..], none).unwrap();
        walk_tar(&[0u8; 1024][..], "archive", none).unwrap();
    }
}
