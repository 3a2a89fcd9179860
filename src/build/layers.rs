//! Package-aware layers: a root split into layers by the package that owns each file (its
//! `CONTENTS` in the vdb), so that a rebuild in which a few packages changed changes only
//! their layers and the last one, and dev and rt share the layers of the packages they hold
//! alike.
//!
//! The root comes in as one stream of entries in name order (see engine::export). Each entry
//! is spooled to a temporary file as the normalised tar it will be in its layer; the package
//! database passes by in the same stream and its `CONTENTS` files are kept. Then every entry
//! gets its layer:
//! - a file, symlink, fifo or device that a package's `CONTENTS` records goes to that
//!   package's layer: its path is resolved through the root's symlinks on the way (`/bin/sh`
//!   of a merged-usr root is `usr/bin/sh`), and a file must still have the mtime recorded at
//!   its merge (a file that something changed later, a postinst or another package, is not
//!   the package's own bytes);
//! - a hard link goes where the file it links to went;
//! - everything else, every directory with its own metadata, and the package database go to
//!   the last layer.
//!
//! Packages are ordered by their bytes, largest first, then by name: with more than `max - 1`
//! packages the first `max - 2` get a layer each and the rest share one, so an image has at
//! most `max` layers. A package layer holds the package's entries in stream order, each
//! preceded by the directories on its way with their owner, mode and extended attributes
//! but mtime 0: its bytes depend on the package's files alone (their mtimes come from the
//! binary package), so the same package gives the same layer in a later build and in dev and
//! rt alike. The last layer, applied after them, gives every directory its real metadata.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};

use anyhow::{Context, Result, bail};

use crate::audit::tree::{Step, resolve_in_root};
use crate::image::layer::{
    EntryKind, EntryMeta, EntrySink, LayerCompression, LayerInfo, LayerWriter, MIN_LAYERS, TarOut,
};
use crate::image::store::Store;
use crate::portage::contents::{self, Kind};

/// The most of one `CONTENTS` file kept (the largest in ::gentoo are a few MB).
const CONTENTS_MAX: u64 = 64 << 20;

/// A layer made here, with the packages (`CAT/PF`) whose files it holds; none for the last.
#[derive(Debug, Clone)]
pub struct PackageLayer {
    pub layer: LayerInfo,
    pub packages: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum What {
    Dir,
    File,
    Symlink,
    HardLink,
    Special,
}

/// One entry in the spool: its bytes are `start..end` there.
struct Spooled {
    path: Vec<u8>,
    what: What,
    mtime: u64,
    start: u64,
    end: u64,
    /// A symlink, fifo or device: written again with the package's time in a package layer.
    meta: Option<Box<EntryMeta>>,
}

/// A writer that counts what passes through it.
struct Counting<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Takes a root's entries (an [`EntrySink`]), then makes its layers with [`Spool::finish`].
pub struct Spool {
    out: TarOut<Counting<BufWriter<File>>>,
    entries: Vec<Spooled>,
    /// Every directory's metadata, for the directories on the way in package layers.
    dirs: HashMap<Vec<u8>, EntryMeta>,
    /// Every symlink: path -> target.
    symlinks: HashMap<Vec<u8>, Vec<u8>>,
    /// `CAT/PF` -> its `CONTENTS`.
    contents: BTreeMap<String, Vec<u8>>,
    /// `CAT/PF` -> its `BUILD_TIME`.
    build_times: HashMap<String, u64>,
    /// Hard link -> the file it links to.
    links: HashMap<usize, Vec<u8>>,
}

impl Spool {
    /// A spool in a temporary file of `store`'s directory (removed when it is dropped).
    pub fn new(store: &Store) -> Result<Spool> {
        let dir = store.root();
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        let file = tempfile::tempfile_in(dir)
            .with_context(|| format!("{}: cannot create a temporary file", dir.display()))?;
        Ok(Spool {
            out: TarOut::new(Counting {
                inner: BufWriter::with_capacity(1 << 20, file),
                count: 0,
            }),
            entries: Vec::new(),
            dirs: HashMap::new(),
            symlinks: HashMap::new(),
            contents: BTreeMap::new(),
            build_times: HashMap::new(),
            links: HashMap::new(),
        })
    }
}

/// The files of a package's vdb entry kept here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VdbFile {
    Contents,
    BuildTime,
}

/// `var/db/pkg/CAT/PF/CONTENTS` -> (`CAT/PF`, Contents); the same for `BUILD_TIME`.
fn vdb_file(path: &[u8]) -> Option<(String, VdbFile)> {
    let rest = path.strip_prefix(b"var/db/pkg/")?;
    let parts: Vec<&[u8]> = rest.split(|&b| b == b'/').collect();
    let (cat, pf, file) = match parts.as_slice() {
        [cat, pf, b"CONTENTS"] => (cat, pf, VdbFile::Contents),
        [cat, pf, b"BUILD_TIME"] => (cat, pf, VdbFile::BuildTime),
        _ => return None,
    };
    if cat.is_empty() || pf.is_empty() {
        return None;
    }
    let cat = std::str::from_utf8(cat).ok()?;
    let pf = std::str::from_utf8(pf).ok()?;
    Some((format!("{cat}/{pf}"), file))
}

impl EntrySink for Spool {
    fn append(&mut self, meta: &EntryMeta, data: &mut dyn Read) -> io::Result<()> {
        let start = self.out.get_ref().count;
        let what = match &meta.kind {
            EntryKind::Directory => What::Dir,
            EntryKind::Regular { .. } => What::File,
            EntryKind::Symlink { target } => {
                self.symlinks.insert(meta.path.clone(), target.clone());
                What::Symlink
            }
            EntryKind::HardLink { target } => {
                self.links.insert(self.entries.len(), target.clone());
                What::HardLink
            }
            EntryKind::Char { .. } | EntryKind::Block { .. } | EntryKind::Fifo => What::Special,
        };
        match (&meta.kind, vdb_file(&meta.path)) {
            (EntryKind::Regular { size }, Some((package, file))) => {
                if *size > CONTENTS_MAX {
                    return Err(io::Error::other(format!(
                        "{package}: {file:?} is larger than {CONTENTS_MAX} bytes"
                    )));
                }
                let mut text = Vec::with_capacity(*size as usize);
                data.take(*size).read_to_end(&mut text)?;
                self.out.append(meta, &mut text.as_slice())?;
                match file {
                    VdbFile::Contents => {
                        self.contents.insert(package, text);
                    }
                    VdbFile::BuildTime => {
                        if let Some(t) = std::str::from_utf8(&text)
                            .ok()
                            .and_then(|t| t.trim().parse().ok())
                        {
                            self.build_times.insert(package, t);
                        }
                    }
                }
            }
            _ => self.out.append(meta, data)?,
        }
        if what == What::Dir {
            self.dirs.insert(meta.path.clone(), meta.clone());
        }
        self.entries.push(Spooled {
            path: meta.path.clone(),
            what,
            mtime: meta.mtime,
            start,
            end: self.out.get_ref().count,
            meta: matches!(what, What::Symlink | What::Special).then(|| Box::new(meta.clone())),
        });
        Ok(())
    }
}

/// `path` (absolute, as `CONTENTS` records it) as a path of the root's stream: every
/// directory on the way that is a symlink in the root is followed, inside the root (the last
/// component is the entry itself, a link or not).
fn resolve(
    path: &[u8],
    dirs: &HashMap<Vec<u8>, EntryMeta>,
    symlinks: &HashMap<Vec<u8>, Vec<u8>>,
) -> Option<Vec<u8>> {
    resolve_in_root(path, false, |p| {
        if let Some(target) = symlinks.get(p) {
            Some(Step::Symlink(target))
        } else {
            dirs.contains_key(p).then_some(Step::Dir)
        }
    })
}

/// Which package owns each path of the root, and the mtime an owned file must still have.
fn owners(
    contents: &BTreeMap<String, Vec<u8>>,
    dirs: &HashMap<Vec<u8>, EntryMeta>,
    symlinks: &HashMap<Vec<u8>, Vec<u8>>,
) -> HashMap<Vec<u8>, (usize, Kind, Option<u64>)> {
    let mut map = HashMap::new();
    for (i, text) in contents.values().enumerate() {
        for entry in contents::entries(text) {
            if entry.kind == Kind::Dir {
                continue;
            }
            if let Some(path) = resolve(entry.path, dirs, symlinks) {
                map.entry(path).or_insert((i, entry.kind, entry.mtime));
            }
        }
    }
    map
}

/// The layer (an index into the packages; `None` for the last) of each spooled entry.
fn assign(spool: &Spool, clamp: u64) -> Vec<Option<usize>> {
    let owners = owners(&spool.contents, &spool.dirs, &spool.symlinks);
    let mut placed: HashMap<&[u8], Option<usize>> = HashMap::new();
    let mut out = Vec::with_capacity(spool.entries.len());
    for (i, e) in spool.entries.iter().enumerate() {
        let owner = owners.get(&e.path);
        let layer = match e.what {
            What::Dir => None,
            _ if e.path.starts_with(b"var/db/pkg/") => None,
            What::HardLink => spool
                .links
                .get(&i)
                .and_then(|target| placed.get(target.as_slice()).copied())
                .flatten(),
            What::File => match owner {
                Some((pkg, Kind::Obj, Some(mtime))) if e.mtime == (*mtime).min(clamp) => Some(*pkg),
                _ => None,
            },
            What::Symlink => match owner {
                Some((pkg, Kind::Sym, _)) => Some(*pkg),
                _ => None,
            },
            What::Special => match owner {
                Some((pkg, Kind::Fif | Kind::Dev, _)) => Some(*pkg),
                _ => None,
            },
        };
        if e.what == What::File {
            placed.insert(&e.path, layer);
        }
        out.push(layer);
    }
    out
}

/// The directories on the way to `path`, outermost first (not the root itself).
fn parents(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    path.iter()
        .enumerate()
        .filter(|(_, b)| **b == b'/')
        .map(move |(i, _)| &path[..i])
}

impl Spool {
    /// Make the layers, at most `max_layers` (at least [`MIN_LAYERS`]). `clamp` is the
    /// time the root's mtimes were clamped to (an owned file's mtime is compared with the
    /// one recorded at its merge, clamped alike).
    pub fn finish(
        self,
        store: &Store,
        compression: LayerCompression,
        max_layers: usize,
        clamp: u64,
    ) -> Result<Vec<PackageLayer>> {
        if max_layers < MIN_LAYERS {
            bail!("at least {MIN_LAYERS} layers are needed for package layers, not {max_layers}");
        }
        let placed = assign(&self, clamp);
        let names: Vec<String> = self.contents.keys().cloned().collect();
        let times: Vec<u64> = names
            .iter()
            .map(|n| self.build_times.get(n).copied().unwrap_or(0))
            .collect();
        // Bytes per package, for the order.
        let mut bytes = vec![0u64; names.len()];
        for (e, layer) in self.entries.iter().zip(&placed) {
            if let Some(p) = layer {
                bytes[*p] += e.end - e.start;
            }
        }
        let mut order: Vec<usize> = (0..names.len()).filter(|p| bytes[*p] > 0).collect();
        order.sort_by(|a, b| bytes[*b].cmp(&bytes[*a]).then(names[*a].cmp(&names[*b])));
        let own = if order.len() < max_layers {
            order.len()
        } else {
            max_layers - 2
        };
        // Package -> its group (0..own: its own layer; own: the shared one).
        let mut group = vec![usize::MAX; names.len()];
        for (rank, p) in order.iter().enumerate() {
            group[*p] = rank.min(own);
        }
        let groups = if order.len() > own { own + 1 } else { own };
        let mut members: Vec<Vec<String>> = vec![Vec::new(); groups];
        for p in &order {
            members[group[*p]].push(names[*p].clone());
        }
        for m in &mut members {
            m.sort();
        }

        let mut file = self
            .out
            .finish()
            .context("cannot finish the spool")?
            .inner
            .into_inner()
            .map_err(|e| e.into_error())
            .context("cannot write the spool")?;
        let mut layers = Vec::new();
        for (g, packages) in members.into_iter().enumerate() {
            let mut layer = LayerWriter::new(store, compression)?;
            let mut made: HashSet<&[u8]> = HashSet::new();
            for (e, p) in self.entries.iter().zip(&placed) {
                if p.map(|p| group[p]) != Some(g) {
                    continue;
                }
                for dir in parents(&e.path) {
                    if made.insert(dir)
                        && let Some(meta) = self.dirs.get(dir)
                    {
                        let mut meta = meta.clone();
                        meta.mtime = 0;
                        layer
                            .append(&meta, &mut io::empty())
                            .context("cannot write a layer")?;
                    }
                }
                match (&e.meta, p) {
                    // Merged now, so stamped with the time of this build (clamped): the
                    // package's build time instead, the same in every build.
                    (Some(meta), Some(p)) => {
                        let mut meta = (**meta).clone();
                        meta.mtime = times[*p].min(clamp);
                        layer
                            .append(&meta, &mut io::empty())
                            .context("cannot write a layer")?;
                    }
                    _ => copy_entry(&mut file, e, &mut layer)?,
                }
            }
            layers.push(PackageLayer {
                layer: layer.finish(store)?,
                packages,
            });
        }
        let mut last = LayerWriter::new(store, compression)?;
        for (e, p) in self.entries.iter().zip(&placed) {
            if p.is_none() {
                copy_entry(&mut file, e, &mut last)?;
            }
        }
        layers.push(PackageLayer {
            layer: last.finish(store)?,
            packages: Vec::new(),
        });
        Ok(layers)
    }
}

fn copy_entry(spool: &mut File, e: &Spooled, layer: &mut LayerWriter) -> Result<()> {
    spool
        .seek(SeekFrom::Start(e.start))
        .context("cannot read the spool")?;
    let n = layer
        .append_written(&mut (&mut *spool).take(e.end - e.start))
        .context("cannot write a layer")?;
    if n != e.end - e.start {
        bail!("the spool ended early");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: EntryKind, mtime: u64) -> EntryMeta {
        EntryMeta {
            path: path.as_bytes().to_vec(),
            kind,
            mode: 0o755,
            uid: 0,
            gid: 0,
            uname: Vec::new(),
            gname: Vec::new(),
            mtime,
            xattrs: Vec::new(),
        }
    }

    /// A small merged-usr root, in name order as the driver's tar writes it: packages
    /// app-misc/a (a file, a link, and /etc/passwd which something changed after its merge)
    /// and app-misc/b (recorded as /bin/b, stored as usr/bin/b); unowned /etc/motd; a hard
    /// link to a's file. `with_a`: whether a is installed.
    fn spool_root(store: &Store, with_a: bool) -> Spool {
        let mut spool = Spool::new(store).unwrap();
        let dir = |p: &str| entry(p, EntryKind::Directory, 500);
        let file = |p: &str, data: &str, mtime: u64| {
            (
                entry(
                    p,
                    EntryKind::Regular {
                        size: data.len() as u64,
                    },
                    mtime,
                ),
                data.to_string(),
            )
        };
        let mut all: Vec<(EntryMeta, String)> = vec![
            (dir(""), String::new()),
            (
                entry(
                    "bin",
                    EntryKind::Symlink {
                        target: b"usr/bin".to_vec(),
                    },
                    1,
                ),
                String::new(),
            ),
            (dir("etc"), String::new()),
            file("etc/motd", "hello\n", 300),
        ];
        if with_a {
            all.push(file("etc/passwd", "root:x:0:0::/root:/bin/sh\n", 400));
        }
        all.push((dir("usr"), String::new()));
        all.push((dir("usr/bin"), String::new()));
        if with_a {
            all.push(file("usr/bin/a", "#!/bin/sh\necho a\n", 100));
        }
        all.push(file("usr/bin/b", "#!/bin/sh\necho b\n", 100));
        all.push((dir("usr/lib"), String::new()));
        if with_a {
            all.push((
                entry(
                    "usr/lib/a.so",
                    EntryKind::Symlink {
                        target: b"a".to_vec(),
                    },
                    100,
                ),
                String::new(),
            ));
            all.push((
                entry(
                    "usr/lib/also-a",
                    EntryKind::HardLink {
                        target: b"usr/bin/a".to_vec(),
                    },
                    100,
                ),
                String::new(),
            ));
        }
        for d in ["var", "var/db", "var/db/pkg", "var/db/pkg/app-misc"] {
            all.push((dir(d), String::new()));
        }
        if with_a {
            all.push((dir("var/db/pkg/app-misc/a-1"), String::new()));
            all.push(file("var/db/pkg/app-misc/a-1/BUILD_TIME", "90\n", 600));
            all.push(file(
                "var/db/pkg/app-misc/a-1/CONTENTS",
                "dir /usr\nobj /usr/bin/a 0123 100\nobj /etc/passwd 0123 50\n\
                 sym /usr/lib/a.so -> a 100\n",
                600,
            ));
        }
        all.push((dir("var/db/pkg/app-misc/b-1"), String::new()));
        all.push(file(
            "var/db/pkg/app-misc/b-1/CONTENTS",
            "obj /bin/b 0123 100\n",
            600,
        ));
        for (meta, data) in all {
            spool.append(&meta, &mut data.as_bytes()).unwrap();
        }
        spool
    }

    fn paths(store: &Store, layer: &LayerInfo) -> Vec<(String, u64)> {
        let blob = store.open_blob(&layer.descriptor()).unwrap();
        let stream = crate::image::layer::open_stream(layer.media_type, blob).unwrap();
        let mut archive = tar::Archive::new(stream);
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let path = String::from_utf8(e.path_bytes().to_vec()).unwrap();
                (path, e.header().mtime().unwrap())
            })
            .collect()
    }

    #[test]
    fn files_go_to_their_packages_layers_and_the_rest_to_the_last() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("store"));
        let layers = spool_root(&store, true)
            .finish(&store, LayerCompression::Gzip, 32, 1_000)
            .unwrap();
        type Listing = Vec<(String, u64)>;
        let got: Vec<(Vec<String>, Listing)> = layers
            .iter()
            .map(|l| (l.packages.clone(), paths(&store, &l.layer)))
            .collect();
        let s = |v: &[(&str, u64)]| -> Vec<(String, u64)> {
            v.iter().map(|(p, t)| (p.to_string(), *t)).collect()
        };
        // a has more bytes than b: its layer comes first. Directories on the way have mtime 0.
        assert_eq!(got[0].0, ["app-misc/a-1"]);
        assert_eq!(
            got[0].1,
            s(&[
                ("usr/", 0),
                ("usr/bin/", 0),
                ("usr/bin/a", 100),
                ("usr/lib/", 0),
                // A symlink gets its package's build time (merged now, stamped now).
                ("usr/lib/a.so", 90),
                ("usr/lib/also-a", 100),
            ])
        );
        assert_eq!(got[1].0, ["app-misc/b-1"]);
        assert_eq!(
            got[1].1,
            s(&[("usr/", 0), ("usr/bin/", 0), ("usr/bin/b", 100)])
        );
        // The last: directories as they are, what no package owns, /etc/passwd (changed
        // since its merge), the package database.
        assert!(got[2].0.is_empty());
        let last: Vec<&str> = got[2].1.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            last,
            [
                "./",
                "bin",
                "etc/",
                "etc/motd",
                "etc/passwd",
                "usr/",
                "usr/bin/",
                "usr/lib/",
                "var/",
                "var/db/",
                "var/db/pkg/",
                "var/db/pkg/app-misc/",
                "var/db/pkg/app-misc/a-1/",
                "var/db/pkg/app-misc/a-1/BUILD_TIME",
                "var/db/pkg/app-misc/a-1/CONTENTS",
                "var/db/pkg/app-misc/b-1/",
                "var/db/pkg/app-misc/b-1/CONTENTS",
            ]
        );
        assert!(got[2].1.iter().any(|(p, t)| p == "usr/" && *t == 500));
        assert_eq!(layers.len(), 3);

        // b's layer does not depend on what else the root holds.
        let alone = spool_root(&store, false)
            .finish(&store, LayerCompression::Gzip, 32, 1_000)
            .unwrap();
        assert_eq!(alone[0].packages, ["app-misc/b-1"]);
        assert_eq!(alone[0].layer.digest, layers[1].layer.digest);
        assert_ne!(alone[1].layer.digest, layers[2].layer.digest);
    }

    #[test]
    fn past_the_most_layers_the_smaller_packages_share_one() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("store"));
        let layers = spool_root(&store, true)
            .finish(&store, LayerCompression::Gzip, 2, 1_000)
            .unwrap();
        assert_eq!(layers.len(), 2);
        assert_eq!(layers[0].packages, ["app-misc/a-1", "app-misc/b-1"]);
        let shared: Vec<String> = paths(&store, &layers[0].layer)
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(
            shared,
            [
                "usr/",
                "usr/bin/",
                "usr/bin/a",
                "usr/bin/b",
                "usr/lib/",
                "usr/lib/a.so",
                "usr/lib/also-a"
            ]
        );
        let three = spool_root(&store, true)
            .finish(&store, LayerCompression::Gzip, 3, 1_000)
            .unwrap();
        assert_eq!(three.len(), 3);
        assert!(
            spool_root(&store, true)
                .finish(&store, LayerCompression::Gzip, 1, 1_000)
                .is_err()
        );
    }

    fn links(pairs: &[(&str, &str)]) -> HashMap<Vec<u8>, Vec<u8>> {
        pairs
            .iter()
            .map(|(a, b)| (a.as_bytes().to_vec(), b.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn paths_resolve_through_the_roots_directory_links() {
        // A merged-usr root: bin -> usr/bin, sbin -> usr/bin, usr/sbin -> bin, lib -> usr/lib.
        let l = links(&[
            ("bin", "usr/bin"),
            ("sbin", "usr/bin"),
            ("usr/sbin", "bin"),
            ("lib", "usr/lib"),
            ("usr/lib/libz.so", "libz.so.1"),
            ("evil", "/../../etc"),
            ("loop", "loop"),
        ]);
        let dirs: HashMap<Vec<u8>, EntryMeta> = ["usr", "usr/bin", "usr/lib", "etc"]
            .into_iter()
            .map(|d| (d.as_bytes().to_vec(), entry(d, EntryKind::Directory, 0)))
            .collect();
        let r = |p: &str| resolve(p.as_bytes(), &dirs, &l).map(|v| String::from_utf8(v).unwrap());
        assert_eq!(r("/bin/sh").as_deref(), Some("usr/bin/sh"));
        assert_eq!(r("/sbin/ldconfig").as_deref(), Some("usr/bin/ldconfig"));
        assert_eq!(r("/usr/sbin/nologin").as_deref(), Some("usr/bin/nologin"));
        assert_eq!(
            r("/lib/ld-musl-x86_64.so.1").as_deref(),
            Some("usr/lib/ld-musl-x86_64.so.1")
        );
        // The last part is the entry itself, a link or not.
        assert_eq!(r("/usr/lib/libz.so").as_deref(), Some("usr/lib/libz.so"));
        assert_eq!(r("/bin").as_deref(), Some("bin"));
        // Never above the root; a loop ends.
        assert_eq!(r("/evil/passwd").as_deref(), Some("etc/passwd"));
        assert_eq!(r("/loop/x"), None);
    }

    #[test]
    fn parents_are_listed_outermost_first() {
        let got: Vec<&[u8]> = parents(b"usr/share/doc/x").collect();
        assert_eq!(got, [&b"usr"[..], b"usr/share", b"usr/share/doc"]);
        assert_eq!(parents(b"top").count(), 0);
    }

    #[test]
    fn vdb_files_are_recognised() {
        assert_eq!(
            vdb_file(b"var/db/pkg/app-misc/hello-1.0/CONTENTS"),
            Some(("app-misc/hello-1.0".to_string(), VdbFile::Contents))
        );
        assert_eq!(
            vdb_file(b"var/db/pkg/app-misc/hello-1.0/BUILD_TIME"),
            Some(("app-misc/hello-1.0".to_string(), VdbFile::BuildTime))
        );
        assert_eq!(vdb_file(b"var/db/pkg/app-misc/hello-1.0/SLOT"), None);
        assert_eq!(vdb_file(b"var/db/pkg/CONTENTS"), None);
        assert_eq!(vdb_file(b"var/db/pkg/a/b/c/CONTENTS"), None);
    }
}
