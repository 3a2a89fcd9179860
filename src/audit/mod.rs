//! A runtime audit of an image: does everything in it load?
//!
//! The layers are applied in order (OCI whiteouts included) into an in-memory table of
//! paths, streaming: of each file only what the checks need is kept (the dynamic-linking
//! facts of ELF files, the interpreter of `#!` scripts, the vdb's `CONTENTS` and the
//! dynamic loader's configuration). Then, resolving paths inside the image only:
//!
//! - every ELF executable or shared object with a PT_INTERP finds its interpreter;
//! - every DT_NEEDED of every ELF file is found, as the dynamic loader would search for it
//!   (DT_RPATH, DT_RUNPATH, then musl's `/etc/ld-musl-ARCH.path` or glibc's
//!   `/etc/ld.so.conf` and default directories), as a file of the same ELF class and machine;
//!   a shared library's dependency its own search misses also counts as found when an
//!   object in the image that loads it (directly or further up) finds that name itself;
//! - every executable `#!` script finds its interpreter (and, through `/usr/bin/env`, its
//!   command in `PATH`);
//! - `/bin/sh` exists.
//!
//! Each problem names the package owning the file, from the image's own `/var/db/pkg`.

mod elf;
pub mod tree;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;

use anyhow::{Context, Result};
use goblin::elf::header::{ET_DYN, ET_EXEC};

use crate::image::store::{Descriptor, DescriptorExt, Store};
use elf::ElfInfo;
use tree::{Content, Kind, Tree};

/// What a file needs and the image lacks.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Missing {
    /// The ELF interpreter (PT_INTERP), as recorded in the file.
    Interpreter(String),
    /// A DT_NEEDED library, as recorded in the file.
    Library(String),
    /// The interpreter of a `#!` line.
    ShebangInterpreter(String),
    /// The command a `#!/usr/bin/env NAME` line runs, not found in `PATH`.
    EnvCommand(String),
    /// `/bin/sh` itself.
    BinSh,
}

/// One thing that will not load.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    /// Absolute path in the image (symbolic links resolved, except for `/bin/sh`).
    pub file: String,
    pub missing: Missing,
    /// `CAT/PF` of the package owning the file, from `/var/db/pkg/*/*/CONTENTS`.
    pub owner: Option<String>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = &self.file;
        match &self.missing {
            Missing::Interpreter(p) => write!(f, "{file}: interpreter {p} not found")?,
            Missing::Library(l) => write!(f, "{file}: needs {l}, not found in the image")?,
            Missing::ShebangInterpreter(p) => write!(f, "{file}: #! interpreter {p} not found")?,
            Missing::EnvCommand(c) => write!(
                f,
                "{file}: #! interpreter {c} (through env) not found in PATH"
            )?,
            Missing::BinSh => write!(f, "{file}: not found")?,
        }
        match (&self.owner, &self.missing) {
            (Some(owner), _) => write!(f, " ({owner})"),
            (None, Missing::BinSh) => {
                f.write_str(" (no package provides it; app-alternatives/sh does on Gentoo)")
            }
            (None, _) => f.write_str(" (no package owns it)"),
        }
    }
}

/// What the audit found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Sorted by file, then by what is missing.
    pub problems: Vec<Problem>,
    /// ELF executables and shared objects checked.
    pub elf_files: usize,
    /// Executable `#!` scripts checked.
    pub scripts: usize,
    /// Regular files in the image.
    pub files: usize,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

impl fmt::Display for Report {
    /// One line per problem, then a summary line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.problems {
            writeln!(f, "{p}")?;
        }
        f.write_str(&self.summary())
    }
}

impl Report {
    /// `N files, N ELF files, N scripts checked: N problems`.
    pub fn summary(&self) -> String {
        format!(
            "{} files, {} ELF files, {} scripts checked: {} problem{}",
            self.files,
            self.elf_files,
            self.scripts,
            self.problems.len(),
            if self.problems.len() == 1 { "" } else { "s" }
        )
    }
}

/// Audit the image tagged `reference` in `store`.
pub fn audit_image(store: &Store, reference: &str) -> Result<Report> {
    let manifest = store.resolve(reference)?;
    let parsed = store
        .read_manifest(&manifest)
        .with_context(|| format!("image {reference}"))?;
    audit_layers(store, parsed.layers()).with_context(|| format!("image {reference}"))
}

/// Audit the image made of `layers` (blobs in `store`, lowest first).
pub fn audit_layers(store: &Store, layers: &[Descriptor]) -> Result<Report> {
    Ok(check(&tree_of(store, layers)?))
}

/// The file tree of the image made of `layers`, read from the store.
fn tree_of(store: &Store, layers: &[Descriptor]) -> Result<Tree> {
    let mut tree = Tree::new();
    for (i, layer) in layers.iter().enumerate() {
        let what = || format!("layer {} of {} ({})", i + 1, layers.len(), layer.digest());
        let reader = open_layer(store, layer).with_context(what)?;
        tree.apply_layer(reader, i).with_context(what)?;
    }
    Ok(tree)
}

/// `CAT/PF` of every package in the /var/db/pkg of the image made of `layers`, sorted.
pub fn installed_packages(store: &Store, layers: &[Descriptor]) -> Result<Vec<String>> {
    let mut packages: Vec<String> = tree_of(store, layers)?
        .iter()
        .filter_map(|(path, _)| crate::portage::vdb::package_of_path(path))
        .collect();
    packages.sort();
    packages.dedup();
    Ok(packages)
}

/// The decompressed tar stream of a layer blob of the store, checked against its size and
/// digest while it streams.
fn open_layer(store: &Store, layer: &Descriptor) -> Result<Box<dyn Read + Send>> {
    let path = store.blob_path(&layer.blob()?);
    let file = store.open_blob(layer)?;
    crate::image::layer::open_stream(layer.kind(), file).with_context(|| path.display().to_string())
}

/// Where commands are looked up by `env` (the PATH of our images).
const ENV_PATH: [&str; 6] = [
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];
const MUSL_DEFAULT_PATH: [&str; 3] = ["/lib", "/usr/local/lib", "/usr/lib"];
const GLIBC_DEFAULT_64: [&str; 4] = ["/lib64", "/usr/lib64", "/lib", "/usr/lib"];
const GLIBC_DEFAULT_32: [&str; 2] = ["/lib", "/usr/lib"];
/// How deep `include` lines of ld.so.conf may nest.
const MAX_INCLUDE_DEPTH: usize = 16;

fn display(path: &[u8]) -> String {
    format!("/{}", String::from_utf8_lossy(path))
}

/// The library search directories of the image, worked out once.
struct Search<'a> {
    tree: &'a Tree,
    /// The first musl interpreter any ELF file names (libraries without PT_INTERP in an image
    /// that has one are loaded by musl).
    musl_interp: Option<String>,
    /// `/etc/ld.so.conf`, includes expanded.
    ld_so_conf: Vec<String>,
    /// musl's search path per interpreter.
    musl_paths: BTreeMap<String, Vec<String>>,
}

fn is_musl(interp: &str) -> bool {
    interp
        .rsplit('/')
        .next()
        .unwrap_or("")
        .starts_with("ld-musl-")
}

impl<'a> Search<'a> {
    fn new(tree: &'a Tree) -> Self {
        let mut musl_interp = None;
        let mut musl_paths = BTreeMap::new();
        for (_, kind) in tree.iter() {
            if let Kind::File {
                content: Content::Elf(info),
                ..
            } = kind
                && let Some(interp) = &info.interp
                && is_musl(interp)
                && !musl_paths.contains_key(interp)
            {
                musl_interp.get_or_insert_with(|| interp.clone());
                musl_paths.insert(interp.clone(), musl_path(tree, interp));
            }
        }
        let mut ld_so_conf = Vec::new();
        read_ld_so_conf(tree, b"/etc/ld.so.conf", 0, &mut ld_so_conf);
        Search {
            tree,
            musl_interp,
            ld_so_conf,
            musl_paths,
        }
    }

    /// Where `name`, needed by the ELF file at `path`, is found (its resolved path).
    fn find(&self, path: &[u8], info: &ElfInfo, name: &str) -> Option<Vec<u8>> {
        let fits = |candidate: &[u8]| match self.tree.resolve(candidate) {
            Some((
                found,
                Kind::File {
                    content: Content::Elf(lib),
                    ..
                },
            )) if lib.is64 == info.is64 && lib.machine == info.machine => Some(found),
            _ => None,
        };
        if name.contains('/') {
            return fits(name.as_bytes());
        }
        let origin = display(tree_parent(path));
        let lib = if info.is64 { "lib64" } else { "lib" };
        let expand = |dir: &String| -> Option<String> {
            let d = dir
                .replace("${ORIGIN}", &origin)
                .replace("$ORIGIN", &origin)
                .replace("${LIB}", lib)
                .replace("$LIB", lib);
            (!d.contains('$')).then_some(d)
        };
        let rpath: &[String] = if info.runpath.is_empty() {
            &info.rpath
        } else {
            &[]
        };
        let own = rpath.iter().chain(&info.runpath).filter_map(expand);
        let interp = info.interp.as_ref().or(self.musl_interp.as_ref());
        let system: Vec<&str> = match interp.filter(|i| is_musl(i)) {
            Some(i) => self
                .musl_paths
                .get(i)
                .into_iter()
                .flatten()
                .map(String::as_str)
                .collect(),
            None => {
                let defaults: &[&str] = if info.is64 {
                    &GLIBC_DEFAULT_64
                } else {
                    &GLIBC_DEFAULT_32
                };
                self.ld_so_conf
                    .iter()
                    .map(String::as_str)
                    .chain(defaults.iter().copied())
                    .collect()
            }
        };
        own.chain(system.into_iter().map(str::to_string))
            .find_map(|dir| fits(format!("{dir}/{name}").as_bytes()))
    }
}

fn tree_parent(path: &[u8]) -> &[u8] {
    &path[..path.iter().rposition(|&b| b == b'/').unwrap_or(0)]
}

/// The text of a loader configuration file at `path`, if the image has it.
fn config_text<'t>(tree: &'t Tree, path: &[u8]) -> Option<&'t [u8]> {
    match tree.resolve(path) {
        Some((
            _,
            Kind::File {
                content: Content::Text(text),
                ..
            },
        )) => Some(text),
        _ => None,
    }
}

/// musl's library path for `interp` (`/lib/ld-musl-ARCH.so.1`): `/etc/ld-musl-ARCH.path`,
/// entries separated by newlines or colons, or the built-in default without that file.
fn musl_path(tree: &Tree, interp: &str) -> Vec<String> {
    let name = interp.rsplit('/').next().unwrap_or(interp);
    let arch = name.strip_prefix("ld-musl-").unwrap_or(name);
    let arch = arch.split(".so").next().unwrap_or(arch);
    let file = format!("/etc/ld-musl-{arch}.path");
    let exists = tree.is_file(file.as_bytes());
    match config_text(tree, file.as_bytes()) {
        Some(text) => {
            let text = &text[..text.iter().position(|&b| b == 0).unwrap_or(text.len())];
            String::from_utf8_lossy(text)
                .split([':', '\n'])
                .filter(|d| !d.is_empty())
                .map(str::to_string)
                .collect()
        }
        None if exists => Vec::new(),
        None => MUSL_DEFAULT_PATH.iter().map(|s| s.to_string()).collect(),
    }
}

/// The directories listed in glibc's ld.so.conf at `path`, `include GLOB...` lines expanded
/// (a relative glob is relative to the including file's directory), comments dropped.
fn read_ld_so_conf(tree: &Tree, path: &[u8], depth: usize, out: &mut Vec<String>) {
    if depth > MAX_INCLUDE_DEPTH {
        return;
    }
    let Some(text) = config_text(tree, path) else {
        return;
    };
    let dir = String::from_utf8_lossy(tree_parent(path)).into_owned();
    for line in String::from_utf8_lossy(text).lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        match words.next() {
            None => {}
            Some("include") => {
                for pattern in words {
                    let pattern = if pattern.starts_with('/') {
                        pattern.to_string()
                    } else {
                        format!("{dir}/{pattern}")
                    };
                    for file in glob(tree, pattern.as_bytes()) {
                        read_ld_so_conf(tree, &file, depth + 1, out);
                    }
                }
            }
            Some("hwcap") => {}
            Some(_) => {
                let entry = line.trim_end_matches('/');
                out.push(if entry.is_empty() { "/" } else { entry }.to_string());
            }
        }
    }
}

/// The paths in the image matching `pattern` (absolute; `*`, `?`, `[...]` in any
/// component), sorted; hidden names only when the pattern component starts with a dot.
fn glob(tree: &Tree, pattern: &[u8]) -> Vec<Vec<u8>> {
    let mut found: Vec<Vec<u8>> = vec![Vec::new()];
    let components: Vec<&[u8]> = pattern
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty())
        .collect();
    for (i, component) in components.iter().enumerate() {
        let last = i + 1 == components.len();
        let wild = component.iter().any(|b| b"*?[".contains(b));
        let mut next = Vec::new();
        for base in &found {
            let join = |name: &[u8]| {
                let mut p = base.clone();
                p.push(b'/');
                p.extend_from_slice(name);
                p
            };
            if !wild {
                next.push(join(component));
                continue;
            }
            let Some(dir) = tree.resolve_path(base, true) else {
                continue;
            };
            if !matches!(tree.get(&dir), Some(Kind::Dir)) {
                continue;
            }
            for name in tree.children(&dir) {
                if (name.starts_with(b".") && !component.starts_with(b"."))
                    || !fnmatch(component, name)
                {
                    continue;
                }
                next.push(join(name));
            }
        }
        found = next
            .into_iter()
            .filter(|p| {
                tree.resolve_path(p, true)
                    .is_some_and(|r| last || matches!(tree.get(&r), Some(Kind::Dir)))
            })
            .collect();
    }
    found.sort();
    found.dedup();
    found
}

/// Shell-style matching of one path component: `*`, `?`, `[abc]`, `[a-z]`, `[!x]`.
fn fnmatch(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|i| fnmatch(rest, &name[i..])),
        Some((b'?', rest)) => !name.is_empty() && fnmatch(rest, &name[1..]),
        Some((b'[', rest)) => {
            let Some((&c, name_rest)) = name.split_first() else {
                return false;
            };
            let (negate, set) = match rest.first() {
                Some(b'!' | b'^') => (true, &rest[1..]),
                _ => (false, rest),
            };
            // A `]` right at the start is part of the set.
            let Some(end) = set.iter().skip(1).position(|&b| b == b']').map(|i| i + 1) else {
                return c == b'[' && fnmatch(rest, name_rest);
            };
            let class = &set[..end];
            let mut hit = false;
            let mut i = 0;
            while i < class.len() {
                if i + 2 < class.len() && class[i + 1] == b'-' {
                    hit |= (class[i]..=class[i + 2]).contains(&c);
                    i += 3;
                } else {
                    hit |= class[i] == c;
                    i += 1;
                }
            }
            hit != negate && fnmatch(&set[end + 1..], name_rest)
        }
        Some((&p, rest)) => name.first() == Some(&p) && fnmatch(rest, &name[1..]),
    }
}

/// `CAT/PF` of each path the vdb records, by its path in the image (parent directories
/// resolved through the image's symbolic links, so `/bin/bash` counts for `usr/bin/bash`
/// when `bin -> usr/bin`). When packages collide the first in name order wins.
fn owners(tree: &Tree) -> BTreeMap<Vec<u8>, String> {
    let mut owners = BTreeMap::new();
    for (path, kind) in tree.iter() {
        let Kind::File {
            content: Content::Contents(recorded),
            ..
        } = kind
        else {
            continue;
        };
        let Some(package) = tree::vdb_package(path) else {
            continue;
        };
        for p in recorded {
            if let Some(key) = tree.resolve_path(p, false) {
                owners.entry(key).or_insert_with(|| package.clone());
            }
        }
    }
    owners
}

/// A DT_NEEDED name and the path it was found at.
type Needed<'a> = (&'a str, Option<Vec<u8>>);

/// Run every check over the merged table.
fn check(tree: &Tree) -> Report {
    let search = Search::new(tree);
    let owners = owners(tree);
    let mut report = Report::default();
    let problem = |path: &[u8], missing: Missing| Problem {
        file: display(path),
        missing,
        owner: owners.get(path).cloned(),
    };
    let mut problems = Vec::new();
    // Per ELF file: each DT_NEEDED and where it was found.
    let mut needs: BTreeMap<&[u8], (&ElfInfo, Vec<Needed>)> = BTreeMap::new();
    for (path, kind) in tree.iter() {
        let Kind::File { mode, content } = kind else {
            continue;
        };
        report.files += 1;
        match content {
            Content::Elf(info) if info.e_type == ET_EXEC || info.e_type == ET_DYN => {
                report.elf_files += 1;
                if let Some(interp) = &info.interp
                    && !tree.is_file(interp.as_bytes())
                {
                    problems.push(problem(path, Missing::Interpreter(interp.clone())));
                }
                let found = info
                    .needed
                    .iter()
                    .map(|name| (name.as_str(), search.find(path, info, name)))
                    .collect();
                needs.insert(path, (info, found));
            }
            Content::Script(shebang) if mode & 0o111 != 0 => {
                report.scripts += 1;
                if !tree.is_file(shebang.interpreter.as_bytes()) {
                    problems.push(problem(
                        path,
                        Missing::ShebangInterpreter(shebang.interpreter.clone()),
                    ));
                } else if let Some(command) = &shebang.env_command {
                    let found = if command.contains('/') {
                        tree.is_file(command.as_bytes())
                    } else {
                        ENV_PATH
                            .iter()
                            .any(|dir| tree.is_file(format!("{dir}/{command}").as_bytes()))
                    };
                    if !found {
                        problems.push(problem(path, Missing::EnvCommand(command.clone())));
                    }
                }
            }
            _ => {}
        }
    }
    // Who loads each library found: a library's dependency that its own search misses is
    // still there at run time when an object loading it (directly or further up) finds a
    // library of that name itself, since the loaders match loaded objects by name first.
    let mut loaders: BTreeMap<&[u8], Vec<&[u8]>> = BTreeMap::new();
    for (path, (_, found)) in &needs {
        for lib in found.iter().filter_map(|(_, at)| at.as_deref()) {
            loaders.entry(lib).or_default().push(path);
        }
    }
    let loaded_with = |lib: &[u8], name: &str| -> bool {
        let mut seen = std::collections::BTreeSet::new();
        let mut todo = vec![lib];
        while let Some(l) = todo.pop() {
            for &up in loaders.get(l).into_iter().flatten() {
                if !seen.insert(up) {
                    continue;
                }
                if needs[up].1.iter().any(|(n, at)| *n == name && at.is_some()) {
                    return true;
                }
                todo.push(up);
            }
        }
        false
    };
    for (path, (info, found)) in &needs {
        for (name, _) in found.iter().filter(|(_, at)| at.is_none()) {
            if info.interp.is_none() && loaded_with(path, name) {
                continue;
            }
            problems.push(problem(path, Missing::Library(name.to_string())));
        }
    }
    if !tree.is_file(b"/bin/sh") {
        let key = tree.resolve_path(b"/bin/sh", false).unwrap_or_default();
        problems.push(Problem {
            file: "/bin/sh".to_string(),
            missing: Missing::BinSh,
            owner: owners.get(&key).cloned(),
        });
    }
    problems.sort();
    problems.dedup();
    report.problems = problems;
    report
}
