//! The image's file table: layers applied in order (with OCI whiteouts) into a map of paths,
//! and path resolution inside the image root.
//!
//! Paths are raw bytes relative to the root, without a leading `/` (the root itself is the
//! empty path). Only what the audit needs is kept of each file; file data never is.

use std::collections::BTreeMap;
use std::io::Read;

use anyhow::{Result, anyhow};

use crate::archive::entries::{join_path, split_parent, walk_layer, whiteout};
use crate::audit::elf::{ElfInfo, SHEBANG_MAX, Shebang, parse_shebang};
use crate::image::layer::EntryKind;
use crate::portage::contents;

/// Symbolic links followed in one resolution before giving up (Linux's MAXSYMLINKS).
pub const MAX_LINKS: usize = 40;

/// What a regular file's content told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// Nothing the audit looks at.
    Plain,
    Elf(Box<ElfInfo>),
    Script(Shebang),
    /// A vdb `CONTENTS` file: the paths it records (not directories).
    Contents(Vec<Vec<u8>>),
    /// A dynamic loader's configuration file (see [`is_loader_config`]), at most
    /// [`CONFIG_MAX`] bytes of it.
    Text(Vec<u8>),
}

/// How much of a loader configuration file is kept.
pub const CONFIG_MAX: u64 = 1 << 20;

/// The files whose text the library search needs: `/etc/ld.so.conf`, what it usually
/// includes (anything under `/etc` with `ld.so.conf` in its path) and musl's
/// `/etc/ld-musl-ARCH.path`.
pub fn is_loader_config(path: &[u8]) -> bool {
    let Some(rest) = path.strip_prefix(b"etc/") else {
        return false;
    };
    let name = split_parent(rest).1;
    rest.windows(10).any(|w| w == b"ld.so.conf")
        || (name.starts_with(b"ld-musl-") && name.ends_with(b".path"))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File {
        mode: u32,
        content: Content,
    },
    Symlink(Vec<u8>),
    /// Devices and FIFOs.
    Other,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub kind: Kind,
    /// Index of the layer that put it there: whiteouts only hide what lower layers hold.
    layer: usize,
}

/// The merged file table of an image.
#[derive(Debug, Default)]
pub struct Tree {
    nodes: BTreeMap<Vec<u8>, Node>,
}

/// `var/db/pkg/CAT/PF/CONTENTS` → `CAT/PF`.
pub fn vdb_package(path: &[u8]) -> Option<String> {
    let rest = path.strip_prefix(b"var/db/pkg/")?;
    let rest = rest.strip_suffix(b"/CONTENTS")?;
    let mut parts = rest.split(|&b| b == b'/');
    let (cat, pf) = (parts.next()?, parts.next()?);
    if parts.next().is_some() || cat.is_empty() || pf.is_empty() || pf.starts_with(b"-MERGING-") {
        return None;
    }
    Some(format!(
        "{}/{}",
        String::from_utf8_lossy(cat),
        String::from_utf8_lossy(pf)
    ))
}

/// Fill `buf` as far as `r` allows; the number of bytes read.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl Tree {
    pub fn new() -> Self {
        Tree::default()
    }

    pub fn get(&self, path: &[u8]) -> Option<&Kind> {
        if path.is_empty() {
            return Some(&Kind::Dir);
        }
        self.nodes.get(path).map(|n| &n.kind)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &Kind)> {
        self.nodes.iter().map(|(k, n)| (k.as_slice(), &n.kind))
    }

    /// The names directly inside directory `dir` (a resolved path), sorted.
    pub fn children(&self, dir: &[u8]) -> Vec<&[u8]> {
        let prefix = if dir.is_empty() {
            Vec::new()
        } else {
            join_path(dir, b"")
        };
        self.nodes
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| &k[prefix.len()..])
            .filter(|rest| !rest.is_empty() && !rest.contains(&b'/'))
            .collect()
    }

    /// Remove `path` (unless `only_below`) and everything under it that lower layers
    /// than `layer` put there.
    fn remove_lower(&mut self, path: &[u8], only_below: bool, layer: usize) {
        let prefix = if path.is_empty() {
            Vec::new()
        } else {
            join_path(path, b"")
        };
        let mut doomed: Vec<Vec<u8>> = self
            .nodes
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(_, n)| n.layer < layer)
            .map(|(k, _)| k.clone())
            .collect();
        if !only_below && self.nodes.get(path).is_some_and(|n| n.layer < layer) {
            doomed.push(path.to_vec());
        }
        for k in doomed {
            self.nodes.remove(&k);
        }
    }

    /// Remove everything under `path`, whatever layer it came from.
    fn remove_below(&mut self, path: &[u8]) {
        self.remove_lower(path, true, usize::MAX);
    }

    /// Put `kind` at `path`, creating missing parent directories.
    fn insert(&mut self, path: Vec<u8>, kind: Kind, layer: usize) {
        if path.is_empty() {
            return; // the root is always a directory
        }
        let mut end = 0;
        while let Some(i) = path[end..].iter().position(|&b| b == b'/') {
            end += i;
            let parent = &path[..end];
            if !self.nodes.contains_key(parent) {
                self.nodes.insert(
                    parent.to_vec(),
                    Node {
                        kind: Kind::Dir,
                        layer,
                    },
                );
            }
            end += 1;
        }
        if kind != Kind::Dir {
            // A non-directory hides whatever was below the same name.
            self.remove_below(&path);
        }
        self.nodes.insert(path, Node { kind, layer });
    }

    /// Apply one layer (a tar stream) on top of what is there.
    pub fn apply_layer(&mut self, input: impl Read, layer: usize) -> Result<()> {
        walk_layer(input, |meta, mut entry, last| {
            if let Some(hides) = whiteout(&meta.path) {
                if let Some((path, everything_in)) = hides {
                    self.remove_lower(&path, everything_in, layer);
                }
                return Ok(());
            }
            let kind = match meta.kind {
                EntryKind::Directory => Kind::Dir,
                EntryKind::Symlink { target } => Kind::Symlink(target),
                EntryKind::HardLink { target } => match self.nodes.get(&target) {
                    // The same inode: what is known of the target holds for the link.
                    Some(Node {
                        kind: Kind::File { content, .. },
                        ..
                    }) => Kind::File {
                        mode: meta.mode,
                        content: content.clone(),
                    },
                    _ => Kind::File {
                        mode: meta.mode,
                        content: Content::Plain,
                    },
                },
                EntryKind::Regular { size } => {
                    let content = read_content(&meta.path, size, &mut entry)
                        .map_err(|e| anyhow!("entry {last:?}: cannot read: {e}"))?;
                    Kind::File {
                        mode: meta.mode,
                        content,
                    }
                }
                EntryKind::Char { .. } | EntryKind::Block { .. } | EntryKind::Fifo => Kind::Other,
            };
            self.insert(meta.path, kind, layer);
            Ok(())
        })
    }

    /// Resolve `path` inside the image root (see [`resolve_in_root`]).
    pub fn resolve_path(&self, path: &[u8], follow_last: bool) -> Option<Vec<u8>> {
        resolve_in_root(path, follow_last, |p| {
            self.nodes.get(p).map(|n| match &n.kind {
                Kind::Dir => Step::Dir,
                Kind::Symlink(target) => Step::Symlink(target),
                _ => Step::Other,
            })
        })
    }

    /// The node `path` leads to, with every symbolic link followed.
    pub fn resolve(&self, path: &[u8]) -> Option<(Vec<u8>, &Kind)> {
        let resolved = self.resolve_path(path, true)?;
        let kind = self.get(&resolved)?;
        Some((resolved, kind))
    }

    /// Whether `path` leads to a regular file.
    pub fn is_file(&self, path: &[u8]) -> bool {
        matches!(self.resolve(path), Some((_, Kind::File { .. })))
    }
}

/// What a path of a root is, as far as resolving paths through it goes.
pub enum Step<'a> {
    Dir,
    Symlink(&'a [u8]),
    /// A file, device or anything else that is no directory.
    Other,
}

/// Resolve `path` inside a root whose entries `node` tells, following symbolic links (the
/// last component's too when `follow_last`); `..` at the root stays at the root. The
/// resolved path, or `None` when a component is missing, not a directory, or the links loop
/// or exceed [`MAX_LINKS`]. Without `follow_last` the last component need not exist. Only
/// the names are looked at: nothing on any filesystem is opened.
pub fn resolve_in_root<'a>(
    path: &[u8],
    follow_last: bool,
    node: impl Fn(&[u8]) -> Option<Step<'a>>,
) -> Option<Vec<u8>> {
    // Components still to walk, last first.
    let mut todo: Vec<Vec<u8>> = path
        .split(|&b| b == b'/')
        .rev()
        .map(<[u8]>::to_vec)
        .collect();
    let mut cur: Vec<u8> = Vec::new();
    let mut links = 0;
    while let Some(c) = todo.pop() {
        match c.as_slice() {
            b"" | b"." => continue,
            b".." => {
                cur.truncate(split_parent(&cur).0.len());
                continue;
            }
            _ => {}
        }
        let last = todo.iter().all(|c| c.is_empty() || c == b".");
        let next = join_path(&cur, &c);
        match node(&next) {
            None if last && !follow_last => cur = next,
            None => return None,
            Some(Step::Symlink(target)) if !last || follow_last => {
                links += 1;
                if links > MAX_LINKS {
                    return None;
                }
                if target.first() == Some(&b'/') {
                    cur.clear();
                }
                todo.extend(target.split(|&b| b == b'/').rev().map(<[u8]>::to_vec));
            }
            Some(Step::Dir) => cur = next,
            Some(_) if last => cur = next,
            // A file or device with more path after it, `..` included: not a directory.
            Some(_) => return None,
        }
    }
    Some(cur)
}

/// Read what the audit keeps of a regular file: ELF files are read whole, the first line of
/// `#!` scripts, vdb `CONTENTS` and loader configuration files whole; of anything else only
/// four bytes.
fn read_content(path: &[u8], size: u64, data: &mut impl Read) -> std::io::Result<Content> {
    if vdb_package(path).is_some() {
        let mut text = Vec::new();
        data.read_to_end(&mut text)?;
        let recorded = contents::entries(&text)
            .filter(|e| e.kind != contents::Kind::Dir)
            .map(|e| e.path.to_vec())
            .collect();
        return Ok(Content::Contents(recorded));
    }
    if is_loader_config(path) {
        let mut text = Vec::new();
        data.take(CONFIG_MAX).read_to_end(&mut text)?;
        return Ok(Content::Text(text));
    }
    let mut head = [0u8; SHEBANG_MAX];
    let n = read_up_to(data, &mut head[..4])?;
    if n == 4 && head[..4] == *b"\x7fELF" {
        let mut whole = Vec::with_capacity(size.min(64 << 20) as usize);
        whole.extend_from_slice(&head[..4]);
        data.read_to_end(&mut whole)?;
        return Ok(match ElfInfo::parse(&whole) {
            Some(info) => Content::Elf(Box::new(info)),
            None => Content::Plain,
        });
    }
    if n >= 2 && head[..2] == *b"#!" {
        let more = read_up_to(data, &mut head[n..])?;
        return Ok(match parse_shebang(&head[..n + more]) {
            Some(s) => Content::Script(s),
            None => Content::Plain,
        });
    }
    Ok(Content::Plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(entries: &[(&str, Kind)]) -> Tree {
        let mut t = Tree::new();
        for (p, k) in entries {
            t.insert(p.as_bytes().to_vec(), k.clone(), 0);
        }
        t
    }

    fn file() -> Kind {
        Kind::File {
            mode: 0o755,
            content: Content::Plain,
        }
    }

    fn link(t: &str) -> Kind {
        Kind::Symlink(t.as_bytes().to_vec())
    }

    fn resolved(t: &Tree, p: &str) -> Option<String> {
        t.resolve_path(p.as_bytes(), true)
            .map(|r| String::from_utf8(r).unwrap())
    }

    #[test]
    fn resolution_stays_inside_the_root_and_follows_merged_usr() {
        let t = tree(&[
            ("usr/bin/bash", file()),
            ("usr/sbin", link("bin")),
            ("bin", link("usr/bin")),
            ("sbin", link("/usr/../../usr/sbin")),
            ("lib", link("usr/lib")),
            ("usr/lib/libc.so", file()),
            ("usr/lib/ld-musl-x86_64.so.1", link("/lib/libc.so")),
            ("etc/up", link("../../../../usr/bin/bash")),
            ("loop1", link("loop2")),
            ("loop2", link("/loop1")),
            ("dangling", link("nowhere")),
        ]);
        assert_eq!(resolved(&t, "/bin/bash").as_deref(), Some("usr/bin/bash"));
        assert_eq!(resolved(&t, "sbin/bash").as_deref(), Some("usr/bin/bash"));
        assert_eq!(resolved(&t, "/etc/up").as_deref(), Some("usr/bin/bash"));
        assert_eq!(
            resolved(&t, "/lib/ld-musl-x86_64.so.1").as_deref(),
            Some("usr/lib/libc.so")
        );
        assert_eq!(
            resolved(&t, "/../../bin/./bash").as_deref(),
            Some("usr/bin/bash")
        );
        assert_eq!(resolved(&t, "/loop1"), None);
        assert_eq!(resolved(&t, "/dangling"), None);
        assert_eq!(
            resolved(&t, "/usr/bin/bash/x"),
            None,
            "a file is not a directory"
        );
        assert_eq!(resolved(&t, "/usr/bin/bash/.."), None);
        assert!(t.is_file(b"/bin/bash"));
        assert!(!t.is_file(b"/usr/bin"));
        // Without following the last link: the parents resolved, the name kept.
        assert_eq!(
            t.resolve_path(b"/bin/sh", false).as_deref(),
            Some(&b"usr/bin/sh"[..])
        );
        assert_eq!(
            t.resolve_path(b"/sbin", false).as_deref(),
            Some(&b"sbin"[..])
        );
    }

    #[test]
    fn at_most_forty_links() {
        let mut entries: Vec<(String, Kind)> = (0..45)
            .map(|i| (format!("l{i}"), link(&format!("l{}", i + 1))))
            .collect();
        entries.push(("l45".to_string(), file()));
        let refs: Vec<(&str, Kind)> = entries
            .iter()
            .map(|(p, k)| (p.as_str(), k.clone()))
            .collect();
        let t = tree(&refs);
        assert_eq!(resolved(&t, "l5").as_deref(), Some("l45"), "40 links");
        assert_eq!(resolved(&t, "l4"), None, "41 links");
    }

    #[test]
    fn whiteouts_hide_only_lower_layers() {
        let mut t = Tree::new();
        t.insert(b"a/old".to_vec(), file(), 0);
        t.insert(b"a/sub/deep".to_vec(), file(), 0);
        t.insert(b"b/x".to_vec(), file(), 0);
        // Layer 1: a new file in a/, then an opaque whiteout of a/, and b/ whited out.
        t.insert(b"a/new".to_vec(), file(), 1);
        t.remove_lower(b"a", true, 1);
        t.remove_lower(b"b", false, 1);
        let left: Vec<_> = t
            .iter()
            .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
            .collect();
        assert_eq!(left, ["a", "a/new"]);
        assert_eq!(t.children(b"a"), [&b"new"[..]]);
        // A file replacing a directory hides its contents.
        t.insert(b"a".to_vec(), file(), 2);
        assert_eq!(t.iter().count(), 1);
    }

    #[test]
    fn vdb_paths() {
        assert_eq!(
            vdb_package(b"var/db/pkg/app-misc/hello-1.0/CONTENTS").as_deref(),
            Some("app-misc/hello-1.0")
        );
        assert_eq!(
            vdb_package(b"var/db/pkg/app-misc/-MERGING-hello/CONTENTS"),
            None
        );
        assert_eq!(
            vdb_package(b"var/db/pkg/app-misc/hello-1.0/x/CONTENTS"),
            None
        );
        assert_eq!(vdb_package(b"var/db/pkg/app-misc/hello-1.0/SLOT"), None);
    }
}
