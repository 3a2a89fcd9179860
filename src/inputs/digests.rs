//! Digest files (DIGESTS, .sha256, .md5sum, sha512sum.txt), latest-*.txt and release file names.
//!
//! Gentoo publishes its release checksums in a handful of shapes that changed over the years
//! (see `shared/notes/gentoo-formats.md`). Everything here is pure parsing plus one streaming
//! multi-algorithm hasher, so the fetch and verify steps can stay small. Parsers are strict:
//! a line that fits none of the known shapes is an error with its line number, because a
//! silently skipped checksum line is a silently skipped verification.
//!
//! The text given to [`parse`] and [`parse_latest`] is expected to be the payload of an
//! already verified OpenPGP signature where the file is clearsigned.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::path::Path;
use std::sync::{Arc, mpsc};

use anyhow::{Context, Result, bail, ensure};
use blake2::Blake2b512;
use md5::Md5;
use sha2::{Digest, Sha256, Sha512};

/// A hash algorithm this crate can compute and check.
///
/// The order (BLAKE2b first) is the order of preference when several are listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// BLAKE2b with a 512-bit output (`b2sum`).
    Blake2b,
    /// SHA-512 (`sha512sum`).
    Sha512,
    /// SHA-256 (`sha256sum`).
    Sha256,
    /// MD5 (`md5sum`): only an integrity check against transfer errors, never a trust anchor.
    Md5,
}

impl Algorithm {
    /// Every supported algorithm, in order of preference.
    pub const ALL: [Algorithm; 4] = [
        Algorithm::Blake2b,
        Algorithm::Sha512,
        Algorithm::Sha256,
        Algorithm::Md5,
    ];

    /// Whether a matching digest of this algorithm from a signed digest file is enough to
    /// trust the file it describes. False only for MD5, which is collision-broken.
    pub fn trust_anchor(&self) -> bool {
        !matches!(self, Algorithm::Md5)
    }

    /// Length of the digest in hex characters.
    pub fn hex_len(&self) -> usize {
        match self {
            Algorithm::Blake2b | Algorithm::Sha512 => 128,
            Algorithm::Sha256 => 64,
            Algorithm::Md5 => 32,
        }
    }

    /// The algorithm for a name as it appears in a DIGESTS header (`SHA512`,
    /// `BLAKE2 (b2sum)`) or in a BSD-style line (`BLAKE2b`, `BLAKE2B-512`).
    /// Case-insensitive; `None` for anything unsupported (SHA1, WHIRLPOOL, ...).
    pub fn from_name(name: &str) -> Option<Algorithm> {
        let upper = name.trim().to_ascii_uppercase();
        Some(match upper.as_str() {
            "BLAKE2B" | "BLAKE2B-512" | "BLAKE2B512" | "BLAKE2 (B2SUM)" | "B2SUM" => {
                Algorithm::Blake2b
            }
            "SHA512" | "SHA-512" => Algorithm::Sha512,
            "SHA256" | "SHA-256" => Algorithm::Sha256,
            "MD5" => Algorithm::Md5,
            _ => return None,
        })
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Algorithm::Blake2b => "BLAKE2B",
            Algorithm::Sha512 => "SHA512",
            Algorithm::Sha256 => "SHA256",
            Algorithm::Md5 => "MD5",
        })
    }
}

/// One digest of one file, as listed in a digest file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DigestLine {
    /// The algorithm, from the block header, the BSD tag, the caller's default or the length.
    pub algorithm: Algorithm,
    /// The digest in lower-case hex, length checked against `algorithm`.
    pub hex: String,
    /// The file name as written, possibly with a build path
    /// (`/var/tmp/catalyst/builds/...`); compare with [`DigestLine::basename`].
    pub name: String,
}

impl DigestLine {
    /// The last path component of the listed name: what a downloaded file is matched by.
    pub fn basename(&self) -> &str {
        basename(&self.name)
    }
}

fn basename(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

/// What the lines seen so far are under.
enum Block {
    /// No `# ... HASH` header yet: algorithm from the default or the hex length.
    None,
    /// Under a header of a supported algorithm.
    Supported(Algorithm),
    /// Under a header of an unsupported algorithm (WHIRLPOOL, SHA1, ...): lines skipped.
    Unsupported,
}

/// Parse a digest file's text into its digest lines, in file order.
///
/// Accepts Gentoo DIGESTS (blocks headed `# <ALG> HASH` in any order, including unsupported
/// algorithms whose lines are skipped), GNU coreutils lines (`HEX  NAME`, `HEX *NAME`, one or
/// two spaces, `\`-escaped names), BSD-style lines anywhere (`SHA512 (NAME) = HEX`), and
/// header-less files where the algorithm is `default` or, without one, follows from the hex
/// length (32 → MD5, 64 → SHA256; 128 is ambiguous between SHA512 and BLAKE2b → error).
/// Blank lines and other `#` comments are ignored; anything else is an error naming the line.
pub fn parse(text: &str, default: Option<Algorithm>) -> Result<Vec<DigestLine>> {
    let mut out = Vec::new();
    let mut block = Block::None;
    for (idx, raw) in text.lines().enumerate() {
        let lineno = idx + 1;
        let line = raw.trim_end();
        if line.trim_start().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            if let Some(name) = header_algorithm_name(comment) {
                block = match Algorithm::from_name(name) {
                    Some(a) => Block::Supported(a),
                    None => Block::Unsupported,
                };
            }
            continue;
        }
        if let Some(bsd) = parse_bsd(line) {
            let (tag, name, hex) = bsd;
            // A well-formed line of an unsupported algorithm (`SHA1 (x) = ...`) is skipped
            // like an unsupported DIGESTS block.
            if let Some(algorithm) = Algorithm::from_name(tag) {
                out.push(make_line(algorithm, hex, name, lineno)?);
            }
            continue;
        }
        let from_header = match block {
            Block::Unsupported => continue,
            Block::Supported(a) => Some(a),
            Block::None => None,
        };
        let Some((hex, name)) = parse_gnu(line) else {
            bail!("line {lineno}: not a digest line: {:?}", truncate(line));
        };
        let algorithm = match from_header {
            Some(a) => a,
            None => match default {
                Some(a) => a,
                None => match hex.len() {
                    32 => Algorithm::Md5,
                    64 => Algorithm::Sha256,
                    128 => bail!(
                        "line {lineno}: a 128-digit digest without a header is SHA512 or \
                         BLAKE2B; cannot tell which"
                    ),
                    n => bail!("line {lineno}: no algorithm has a {n}-digit digest"),
                },
            },
        };
        out.push(make_line(algorithm, hex, &name, lineno)?);
    }
    Ok(out)
}

/// `# SHA512 HASH` → `SHA512`; `# BLAKE2 (b2sum) HASH` → `BLAKE2 (b2sum)`.
fn header_algorithm_name(comment: &str) -> Option<&str> {
    let body = comment.trim();
    let cut = body.len().checked_sub(" HASH".len())?;
    let (name, tail) = (body.get(..cut)?, body.get(cut..)?);
    if !tail.eq_ignore_ascii_case(" HASH") {
        return None;
    }
    let name = name.trim();
    (!name.is_empty()).then_some(name)
}

/// `TAG (NAME) = HEX` → (tag, name, hex). The tag is a single word of letters, digits and `-`.
fn parse_bsd(line: &str) -> Option<(&str, &str, &str)> {
    let (tag, rest) = line.split_once(" (")?;
    if tag.is_empty()
        || !tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return None;
    }
    let (name, hex) = rest.rsplit_once(") = ")?;
    let hex = hex.trim();
    if name.is_empty() || hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((tag, name, hex))
}

/// `HEX  NAME`, `HEX NAME`, `HEX *NAME`, `HEX  *NAME`, and coreutils' escaped form
/// `\HEX  NA\\ME` (backslash and newline escaped in the name).
fn parse_gnu(line: &str) -> Option<(&str, String)> {
    let (escaped, line) = match line.strip_prefix('\\') {
        Some(rest) => (true, rest),
        None => (false, line),
    };
    let end = line.find([' ', '\t'])?;
    let (hex, rest) = line.split_at(end);
    if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    // One separator, optionally a second space, then optionally the `*` binary-mode marker.
    let rest = &rest[1..];
    let rest = rest.strip_prefix(' ').unwrap_or(rest);
    let rest = rest.strip_prefix('*').unwrap_or(rest);
    if rest.is_empty() || rest.starts_with([' ', '\t']) {
        return None;
    }
    let name = if escaped {
        unescape(rest)?
    } else {
        rest.to_owned()
    };
    Some((hex, name))
}

fn unescape(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next()? {
                '\\' => out.push('\\'),
                'n' => out.push('\n'),
                'r' => out.push('\r'),
                _ => return None,
            }
        } else {
            out.push(c);
        }
    }
    Some(out)
}

fn make_line(algorithm: Algorithm, hex: &str, name: &str, lineno: usize) -> Result<DigestLine> {
    ensure!(
        hex.len() == algorithm.hex_len(),
        "line {lineno}: a {algorithm} digest has {} hex digits, found {}",
        algorithm.hex_len(),
        hex.len()
    );
    ensure!(
        hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "line {lineno}: digest is not hex"
    );
    ensure!(!name.is_empty(), "line {lineno}: no file name");
    Ok(DigestLine {
        algorithm,
        hex: hex.to_ascii_lowercase(),
        name: name.to_owned(),
    })
}

fn truncate(line: &str) -> &str {
    match line.char_indices().nth(80) {
        Some((i, _)) => &line[..i],
        None => line,
    }
}

/// The lines that apply to file `basename`, matched by the basename of the listed name (so
/// `/var/tmp/catalyst/builds/.../stage3-...tar.bz2` applies to `stage3-...tar.bz2`). A path
/// given as `basename` is reduced to its last component too.
pub fn for_file<'a>(lines: &'a [DigestLine], basename: &str) -> Vec<&'a DigestLine> {
    let want = self::basename(basename);
    lines.iter().filter(|l| l.basename() == want).collect()
}

/// The distinct algorithms the lines list, in order of preference: what to hash.
pub fn algorithms(lines: &[&DigestLine]) -> Vec<Algorithm> {
    let mut algs: Vec<Algorithm> = lines.iter().map(|l| l.algorithm).collect();
    algs.sort();
    algs.dedup();
    algs
}

/// Digests of one file, one per algorithm asked for, in lower-case hex.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hashes {
    values: BTreeMap<Algorithm, String>,
    size: u64,
}

impl Hashes {
    /// The digest for `a`, if it was computed.
    pub fn get(&self, a: Algorithm) -> Option<&str> {
        self.values.get(&a).map(String::as_str)
    }

    /// Number of bytes hashed.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The computed digests, in order of preference.
    pub fn iter(&self) -> impl Iterator<Item = (Algorithm, &str)> {
        self.values.iter().map(|(a, h)| (*a, h.as_str()))
    }
}

/// One algorithm's running state.
enum State {
    Blake2b(Box<Blake2b512>),
    Sha512(Box<Sha512>),
    Sha256(Box<Sha256>),
    Md5(Box<Md5>),
}

impl State {
    fn new(a: Algorithm) -> State {
        match a {
            Algorithm::Blake2b => State::Blake2b(Box::default()),
            Algorithm::Sha512 => State::Sha512(Box::default()),
            Algorithm::Sha256 => State::Sha256(Box::default()),
            Algorithm::Md5 => State::Md5(Box::default()),
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            State::Blake2b(h) => h.update(data),
            State::Sha512(h) => h.update(data),
            State::Sha256(h) => h.update(data),
            State::Md5(h) => h.update(data),
        }
    }

    fn finish(self) -> (Algorithm, String) {
        match self {
            State::Blake2b(h) => (Algorithm::Blake2b, hex::encode(h.finalize())),
            State::Sha512(h) => (Algorithm::Sha512, hex::encode(h.finalize())),
            State::Sha256(h) => (Algorithm::Sha256, hex::encode(h.finalize())),
            State::Md5(h) => (Algorithm::Md5, hex::encode(h.finalize())),
        }
    }
}

/// Incremental hashing with several algorithms at once, for data that arrives in pieces
/// (a download being written to disk). Also an [`std::io::Write`] sink.
pub struct Hasher {
    states: Vec<State>,
    size: u64,
}

impl Hasher {
    /// A hasher computing each of `algs` (duplicates ignored).
    pub fn new(algs: &[Algorithm]) -> Hasher {
        let mut algs = algs.to_vec();
        algs.sort();
        algs.dedup();
        Hasher {
            states: algs.into_iter().map(State::new).collect(),
            size: 0,
        }
    }

    /// Feed the next piece of data.
    pub fn update(&mut self, data: &[u8]) {
        for s in &mut self.states {
            s.update(data);
        }
        self.size += data.len() as u64;
    }

    /// The digests of everything fed.
    pub fn finish(self) -> Hashes {
        Hashes {
            values: self.states.into_iter().map(State::finish).collect(),
            size: self.size,
        }
    }
}

impl std::io::Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Read buffer for [`hash_file`]: large enough that per-read overhead vanishes, fixed so
/// memory does not grow with the file.
const HASH_BUF: usize = 1 << 20;

/// Buffers in flight between the reading thread and the second hashing thread.
const HASH_BUFS: usize = 3;

impl Algorithm {
    /// Rough single-core cost in tenths of a ns per byte (release builds of the hash crates
    /// on x86-64 with SHA-NI and AVX2): only used to split the work between two threads.
    fn cost(&self) -> u32 {
        match self {
            Algorithm::Blake2b => 14,
            Algorithm::Sha512 => 23,
            Algorithm::Sha256 => 8,
            Algorithm::Md5 => 19,
        }
    }
}

/// Split `algs` into two groups of about equal cost (largest first, each to the cheaper
/// group). The first group is hashed by the reading thread.
fn split_work(algs: &[Algorithm]) -> (Vec<Algorithm>, Vec<Algorithm>) {
    let mut algs = algs.to_vec();
    algs.sort();
    algs.dedup();
    algs.sort_by_key(|a| std::cmp::Reverse(a.cost()));
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let (mut cost_a, mut cost_b) = (0, 0);
    for alg in algs {
        if cost_a <= cost_b {
            cost_a += alg.cost();
            a.push(alg);
        } else {
            cost_b += alg.cost();
            b.push(alg);
        }
    }
    (a, b)
}

/// Hash the file at `path` with all of `algs` in one streaming pass over fixed-size buffers.
/// `progress` gets the number of bytes hashed so far after each buffer and once at the end.
///
/// With two or more algorithms and more than one CPU, a second thread takes about half of
/// the work (release build, two cores, 512 MiB in the page cache): BLAKE2B + SHA512, what a
/// DIGESTS file lists, goes from ~275 to ~430 MB/s; all four from ~155 to ~340 MB/s.
pub fn hash_file(path: &Path, algs: &[Algorithm], progress: impl FnMut(u64)) -> Result<Hashes> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let parallel = std::thread::available_parallelism().is_ok_and(|n| n.get() > 1);
    hash_reader(file, algs, parallel, progress)
        .with_context(|| format!("reading {}", path.display()))
}

/// [`hash_file`] over any reader; `parallel` allows the second thread.
fn hash_reader(
    mut reader: impl Read,
    algs: &[Algorithm],
    parallel: bool,
    mut progress: impl FnMut(u64),
) -> Result<Hashes> {
    let (mine, theirs) = split_work(algs);
    if !parallel || theirs.is_empty() {
        let mut hasher = Hasher::new(algs);
        let mut buf = vec![0u8; HASH_BUF];
        while let Some(n) = read_some(&mut reader, &mut buf)? {
            hasher.update(&buf[..n]);
            progress(hasher.size);
        }
        progress(hasher.size);
        return Ok(hasher.finish());
    }

    // The calling thread reads into a buffer, hands a reference to the worker, hashes its own
    // share, and drops its reference; the worker sends each buffer back when done, so a
    // returned buffer is never shared and the HASH_BUFS buffers are all the memory used.
    std::thread::scope(|scope| {
        let (full_tx, full_rx) = mpsc::sync_channel::<(Arc<Vec<u8>>, usize)>(HASH_BUFS);
        let (back_tx, back_rx) = mpsc::sync_channel::<Arc<Vec<u8>>>(HASH_BUFS);
        let mut hasher = Hasher::new(&mine);
        let worker = scope.spawn(move || {
            let mut hasher = Hasher::new(&theirs);
            for (buf, n) in full_rx {
                hasher.update(&buf[..n]);
                // The reader stops taking buffers back once it is done or failed.
                let _ = back_tx.send(buf);
            }
            hasher.finish()
        });
        let mut pool: Vec<Arc<Vec<u8>>> = (0..HASH_BUFS)
            .map(|_| Arc::new(vec![0u8; HASH_BUF]))
            .collect();
        let read_result = (|| -> Result<()> {
            loop {
                let mut buf = match pool.pop() {
                    Some(buf) => buf,
                    // Only fails when the worker is gone (it panicked): join reports it.
                    None => match back_rx.recv() {
                        Ok(buf) => buf,
                        Err(_) => return Ok(()),
                    },
                };
                let Some(data) = Arc::get_mut(&mut buf) else {
                    bail!("internal error: hash buffer still shared");
                };
                let Some(n) = read_some(&mut reader, data)? else {
                    return Ok(());
                };
                if full_tx.send((Arc::clone(&buf), n)).is_err() {
                    return Ok(());
                }
                hasher.update(&buf[..n]);
                progress(hasher.size);
            }
        })();
        drop(full_tx);
        let theirs = worker
            .join()
            .map_err(|_| anyhow::anyhow!("internal error: hashing thread panicked"))?;
        read_result?;
        progress(hasher.size);
        ensure!(
            theirs.size == hasher.size,
            "internal error: hashing threads disagree on the size"
        );
        let mut hashes = hasher.finish();
        hashes.values.extend(theirs.values);
        Ok(hashes)
    })
}

/// One `read` into `buf`, retrying on EINTR; `None` at end of file.
fn read_some(reader: &mut impl Read, buf: &mut [u8]) -> Result<Option<usize>> {
    loop {
        match reader.read(buf) {
            Ok(0) => return Ok(None),
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// The outcome of checking one digest line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckResult {
    /// The line's algorithm.
    pub algorithm: Algorithm,
    /// The digest the line lists (lower-case hex).
    pub expected: String,
    /// The computed digest, `None` when `hashes` lacks this algorithm.
    pub actual: Option<String>,
    /// Whether `actual` equals `expected`.
    pub ok: bool,
}

/// Check `hashes` against every line (normally [`for_file`]'s result for one file): one
/// result per line, so each listed algorithm must match. An algorithm that was not computed
/// counts as a mismatch. Errors when `lines` is empty: a file no line lists is unverified.
pub fn check(lines: &[&DigestLine], hashes: &Hashes) -> Result<Vec<CheckResult>> {
    ensure!(!lines.is_empty(), "no digest line lists the file");
    Ok(lines
        .iter()
        .map(|l| {
            let actual = hashes.get(l.algorithm).map(str::to_owned);
            CheckResult {
                algorithm: l.algorithm,
                expected: l.hex.clone(),
                ok: actual.as_deref() == Some(l.hex.as_str()),
                actual,
            }
        })
        .collect())
}

/// Verify the file named `file_name` (a basename or path) against a parsed digest file:
/// every line listing it must match, and at least one must exist. The error names the file
/// and each failing algorithm.
pub fn verify(all: &[DigestLine], file_name: &str, hashes: &Hashes) -> Result<Vec<CheckResult>> {
    let lines = for_file(all, file_name);
    let results =
        check(&lines, hashes).with_context(|| format!("verifying {}", basename(file_name)))?;
    let bad: Vec<String> = results
        .iter()
        .filter(|r| !r.ok)
        .map(|r| match &r.actual {
            Some(actual) => format!("{}: expected {}, got {actual}", r.algorithm, r.expected),
            None => format!("{}: not computed", r.algorithm),
        })
        .collect();
    ensure!(
        bad.is_empty(),
        "digest mismatch for {}: {}",
        basename(file_name),
        bad.join("; ")
    );
    Ok(results)
}

/// One entry of a `latest-stage3-<variant>.txt` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LatestEntry {
    /// Path relative to the `autobuilds/` directory, e.g. `20260214T170533Z/stage3-...tar.xz`.
    pub path: String,
    /// Size of that file in bytes.
    pub size: u64,
}

/// Parse the (verified) payload of a `latest-stage3*.txt` file: `#` comments (`# Latest as
/// of ...`, `# ts=EPOCH`), then `RELPATH SIZE` lines, returned in order. The path is joined to
/// a mirror URL later, so absolute paths and `..` components are rejected.
pub fn parse_latest(text: &str) -> Result<Vec<LatestEntry>> {
    let mut out = Vec::new();
    for (idx, raw) in text.lines().enumerate() {
        let lineno = idx + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(path), Some(size), None) = (fields.next(), fields.next(), fields.next()) else {
            bail!(
                "line {lineno}: expected `RELPATH SIZE`, found {:?}",
                truncate(line)
            );
        };
        ensure!(
            !size.is_empty() && size.bytes().all(|b| b.is_ascii_digit()),
            "line {lineno}: size {size:?} is not a decimal number"
        );
        let size: u64 = size
            .parse()
            .with_context(|| format!("line {lineno}: size {size:?} out of range"))?;
        ensure!(
            !path.starts_with('/') && !path.split('/').any(|c| c == ".." || c.is_empty()),
            "line {lineno}: path {path:?} is not a plain relative path"
        );
        out.push(LatestEntry {
            path: path.to_owned(),
            size,
        });
    }
    ensure!(!out.is_empty(), "no `RELPATH SIZE` entry");
    Ok(out)
}

/// The `# ts=EPOCH` line of a (verified) `latest-stage3*.txt` payload: when it was made.
pub fn latest_ts(text: &str) -> Option<u64> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix('#'))
        .find_map(|c| c.trim().strip_prefix("ts="))
        .and_then(|ts| ts.trim().parse().ok())
}

/// The parts of a stage3 tarball name `stage3-<variant>-<TS>.tar.<ext>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageName {
    /// E.g. `amd64-musl-openrc`, `armv7a_hardfp_musl-openrc`, `amd64-musl` (old).
    pub variant: String,
    /// `20260214T170533Z`, or date-only `20171208` on old stages.
    pub timestamp: String,
    /// `xz`, `bz2`, ...
    pub compression_ext: String,
}

/// Split a stage3 tarball name; `None` for anything else, including companions such as
/// `.tar.xz.asc`, `.tar.xz.DIGESTS` and `.tar.xz.CONTENTS.gz`.
pub fn parse_stage_name(file_name: &str) -> Option<StageName> {
    let rest = file_name.strip_prefix("stage3-")?;
    let (stem, ext) = rest.rsplit_once(".tar.")?;
    if ext.is_empty() || !ext.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    let (variant, ts) = stem.rsplit_once('-')?;
    if !is_timestamp(ts) || !is_variant(variant) {
        return None;
    }
    Some(StageName {
        variant: variant.to_owned(),
        timestamp: ts.to_owned(),
        compression_ext: ext.to_owned(),
    })
}

/// `YYYYMMDD` or `YYYYMMDDTHHMMSSZ`.
fn is_timestamp(ts: &str) -> bool {
    let b = ts.as_bytes();
    let date_ok = |d: &[u8]| d.len() == 8 && d.iter().all(u8::is_ascii_digit);
    match b.len() {
        8 => date_ok(b),
        16 => {
            date_ok(&b[..8])
                && b[8] == b'T'
                && b[9..15].iter().all(u8::is_ascii_digit)
                && b[15] == b'Z'
        }
        _ => false,
    }
}

fn is_variant(v: &str) -> bool {
    !v.is_empty()
        && !v.starts_with('-')
        && !v.ends_with('-')
        && !v.contains("--")
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_+.".contains(&b))
}

/// The `releases/<arch>/` directory that holds a stage3 variant, from the variant's first
/// `-`-separated token (`armv7a_hardfp_musl-openrc` → `arm`, `i686-musl` → `x86`).
pub fn arch_dir(variant: &str) -> Result<&'static str> {
    let first = variant.split('-').next().unwrap_or(variant);
    const EXACT: &[(&str, &str)] = &[
        ("amd64", "amd64"),
        ("arm64", "arm64"),
        ("i486", "x86"),
        ("i686", "x86"),
        ("x86", "x86"),
        ("armv4tl", "arm"),
        ("armv5tel", "arm"),
        ("ppc", "ppc"),
        ("ppc64", "ppc"),
        ("ppc64le", "ppc"),
        ("s390", "s390"),
        ("s390x", "s390"),
        ("sparc64", "sparc"),
        ("alpha", "alpha"),
        ("m68k", "m68k"),
    ];
    const PREFIX: &[(&str, &str)] = &[
        ("armv6j", "arm"),
        ("armv7a", "arm"),
        ("rv32", "riscv"),
        ("rv64", "riscv"),
        ("hppa", "hppa"),
        ("loong", "loong"),
        ("mips", "mips"),
    ];
    if let Some((_, dir)) = EXACT.iter().find(|(k, _)| *k == first) {
        return Ok(dir);
    }
    if let Some((_, dir)) = PREFIX.iter().find(|(k, _)| first.starts_with(k)) {
        return Ok(dir);
    }
    bail!("unknown architecture {first:?} in stage3 variant {variant:?}")
}

/// How a Portage tree snapshot is packed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotKind {
    /// `gentoo-*.tar.xz` / `portage-*.tar.bz2`: one top-level directory holding the tree.
    Tarball,
    /// `gentoo-*.xz.sqfs`: the image root is the tree.
    Squashfs,
}

/// The parts of a snapshot name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotName {
    /// `gentoo` or `portage`.
    pub prefix: String,
    /// Tarball or SquashFS image.
    pub kind: SnapshotKind,
    /// `YYYYMMDD`, or `latest` (tarballs) / `current` (SquashFS) for the moving name.
    pub date: String,
    /// `xz`, `bz2`, ... (`xz` in `.xz.sqfs` for SquashFS).
    pub compression_ext: String,
}

impl SnapshotName {
    /// Whether the name is a moving one (`latest`, `current`) rather than a dated one.
    pub fn is_moving(&self) -> bool {
        !self.date.bytes().all(|b| b.is_ascii_digit())
    }
}

/// Split a snapshot name: `{gentoo,portage}-{YYYYMMDD,latest}.tar.{xz,bz2}` or
/// `gentoo-{YYYYMMDD,current}.<comp>.sqfs`. `None` for anything else, including
/// companions (`.md5sum`, `.gpgsig`).
pub fn parse_snapshot_name(file_name: &str) -> Option<SnapshotName> {
    let (prefix, rest) = file_name.split_once('-')?;
    if prefix != "gentoo" && prefix != "portage" {
        return None;
    }
    let (date, kind, ext) = if let Some(stem) = rest.strip_suffix(".sqfs") {
        let (date, ext) = stem.split_once('.')?;
        if prefix != "gentoo" || !(date == "current" || is_date(date)) {
            return None;
        }
        (date, SnapshotKind::Squashfs, ext)
    } else {
        let (date, ext) = rest.split_once(".tar.")?;
        if !(date == "latest" || is_date(date)) {
            return None;
        }
        (date, SnapshotKind::Tarball, ext)
    };
    if ext.is_empty() || !ext.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    Some(SnapshotName {
        prefix: prefix.to_owned(),
        kind,
        date: date.to_owned(),
        compression_ext: ext.to_owned(),
    })
}

fn is_date(d: &str) -> bool {
    d.len() == 8 && d.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::Command;

    /// A recognisable hex digest of `len` digits: `seed` repeated (upper-case when asked, to
    /// check normalisation).
    fn hx(seed: char, len: usize) -> String {
        std::iter::repeat_n(seed, len).collect()
    }

    const TS: &str = "20260214T170533Z";

    fn stage(ts: &str) -> String {
        format!("stage3-amd64-musl-openrc-{ts}.tar.xz")
    }

    /// (algorithm, hex seed, name) triples for compact expectations.
    fn triples(lines: &[DigestLine]) -> Vec<(Algorithm, String, String)> {
        lines
            .iter()
            .map(|l| (l.algorithm, l.hex.clone(), l.name.clone()))
            .collect()
    }

    #[test]
    fn parses_digest_file_shapes() {
        let tar = stage(TS);
        let contents = format!("{tar}.CONTENTS.gz");
        let old_tar = "stage3-amd64-hardened-20171208.tar.bz2";
        let build = "/var/tmp/catalyst/builds/hardened";
        use Algorithm::*;
        struct Case {
            what: &'static str,
            text: String,
            default: Option<Algorithm>,
            want: Vec<(Algorithm, String, String)>,
        }
        let cases = vec![
            Case {
                what: "DIGESTS, 2022 layout: BLAKE2B block then SHA512, tarball then CONTENTS.gz",
                text: format!(
                    "# BLAKE2B HASH\n{}  {tar}\n{}  {contents}\n# SHA512 HASH\n{}  {tar}\n{}  {contents}\n",
                    hx('a', 128),
                    hx('b', 128),
                    hx('c', 128),
                    hx('d', 128)
                ),
                default: None,
                want: vec![
                    (Blake2b, hx('a', 128), tar.clone()),
                    (Blake2b, hx('b', 128), contents.clone()),
                    (Sha512, hx('c', 128), tar.clone()),
                    (Sha512, hx('d', 128), contents.clone()),
                ],
            },
            Case {
                what: "DIGESTS, reverse order, upper-case hex, CRLF, blank lines",
                text: format!(
                    "# SHA512 HASH\r\n{}  {tar}\r\n\r\n# BLAKE2B HASH\r\n{}  {tar}\r\n",
                    hx('C', 128),
                    hx('A', 128)
                ),
                default: Some(Md5), // headers win over the default
                want: vec![
                    (Sha512, hx('c', 128), tar.clone()),
                    (Blake2b, hx('a', 128), tar.clone()),
                ],
            },
            Case {
                what: "pre-2022 DIGESTS: b2sum header, WHIRLPOOL and SHA1 blocks, build paths",
                text: format!(
                    "# BLAKE2 (b2sum) HASH\n{b2}  {build}/{old_tar}\n{b2c}  {build}/{old_tar}.CONTENTS\n\
                     # SHA1 HASH\n{sha1}  {build}/{old_tar}\n\
                     # SHA512 HASH\n{s5}  {build}/{old_tar}\n{s5c}  {build}/{old_tar}.CONTENTS\n\
                     # WHIRLPOOL HASH\n{wp}  {build}/{old_tar}\n{wp}  {build}/{old_tar}.CONTENTS\n\
                     # MD5 HASH\n{md5} *{old_tar}.DIGESTS\n",
                    b2 = hx('1', 128),
                    b2c = hx('2', 128),
                    sha1 = hx('9', 40),
                    s5 = hx('3', 128),
                    s5c = hx('4', 128),
                    wp = hx('e', 128),
                    md5 = hx('5', 32),
                ),
                default: None,
                want: vec![
                    (Blake2b, hx('1', 128), format!("{build}/{old_tar}")),
                    (Blake2b, hx('2', 128), format!("{build}/{old_tar}.CONTENTS")),
                    (Sha512, hx('3', 128), format!("{build}/{old_tar}")),
                    (Sha512, hx('4', 128), format!("{build}/{old_tar}.CONTENTS")),
                    (Md5, hx('5', 32), format!("{old_tar}.DIGESTS")),
                ],
            },
            Case {
                what: "BSD style, mixed case tags, unsupported tag skipped",
                text: format!(
                    "SHA512 ({tar}) = {}\nBLAKE2b ({tar}) = {}\nblake2b-512 (x (1).tar) = {}\n\
                     SHA1 ({tar}) = {}\nSHA256 ({tar}) = {}\n",
                    hx('a', 128),
                    hx('b', 128),
                    hx('c', 128),
                    hx('d', 40),
                    hx('e', 64)
                ),
                default: None,
                want: vec![
                    (Sha512, hx('a', 128), tar.clone()),
                    (Blake2b, hx('b', 128), tar.clone()),
                    (Blake2b, hx('c', 128), "x (1).tar".into()),
                    (Sha256, hx('e', 64), tar.clone()),
                ],
            },
            Case {
                what: ".sha256 payload",
                text: format!("# SHA256 HASH\n{}  {tar}\n", hx('f', 64)),
                default: None,
                want: vec![(Sha256, hx('f', 64), tar.clone())],
            },
            Case {
                what: ".sha256 payload without header: SHA256 from the length",
                text: format!("{} {tar}\n", hx('f', 64)),
                default: None,
                want: vec![(Sha256, hx('f', 64), tar.clone())],
            },
            Case {
                what: ".md5sum: MD5 from the length",
                text: format!("{}  gentoo-20261127.tar.xz\n", hx('0', 32)),
                default: None,
                want: vec![(Md5, hx('0', 32), "gentoo-20261127.tar.xz".into())],
            },
            Case {
                what: "sha512sum.txt for squashfs: header-less, default SHA512, binary marker",
                text: format!(
                    "{}  gentoo-20261127.xz.sqfs\n{} *gentoo-current.xz.sqfs\n{}  gentoo-20261126.lz4.sqfs\n",
                    hx('1', 128),
                    hx('2', 128),
                    hx('3', 128)
                ),
                default: Some(Sha512),
                want: vec![
                    (Sha512, hx('1', 128), "gentoo-20261127.xz.sqfs".into()),
                    (Sha512, hx('2', 128), "gentoo-current.xz.sqfs".into()),
                    (Sha512, hx('3', 128), "gentoo-20261126.lz4.sqfs".into()),
                ],
            },
            Case {
                what: "coreutils escaped name, `*` belonging to the name after two spaces, comments",
                text: format!(
                    "# made by hand\n\\{}  a\\\\b\\nc\n{}  **star\n",
                    hx('1', 32),
                    hx('2', 32)
                ),
                default: None,
                want: vec![
                    (Md5, hx('1', 32), "a\\b\nc".into()),
                    (Md5, hx('2', 32), "*star".into()),
                ],
            },
        ];
        for c in cases {
            let got = parse(&c.text, c.default).unwrap_or_else(|e| panic!("{}: {e:#}", c.what));
            assert_eq!(triples(&got), c.want, "{}", c.what);
        }
    }

    #[test]
    fn rejects_malformed_digest_files_with_line_number() {
        let tar = stage(TS);
        let cases: Vec<(&str, String, Option<Algorithm>, &str)> = vec![
            (
                "short SHA512",
                format!(
                    "# SHA512 HASH\n{}  {tar}\n{}  {tar}\n",
                    hx('a', 128),
                    hx('a', 127)
                ),
                None,
                "line 3",
            ),
            (
                "SHA256 length under a BLAKE2B header",
                format!("\n# BLAKE2B HASH\n{}  {tar}\n", hx('a', 64)),
                None,
                "line 3",
            ),
            (
                "garbage",
                format!("# SHA512 HASH\n{}  {tar}\nhello world\n", hx('a', 128)),
                None,
                "line 3",
            ),
            (
                "non-hex digest",
                format!("{}g  {tar}\n", hx('a', 31)),
                None,
                "line 1",
            ),
            (
                "digest without name",
                format!("{}\n", hx('a', 32)),
                None,
                "line 1",
            ),
            (
                "128 digits without header or default",
                format!("{}  {tar}\n", hx('a', 128)),
                None,
                "line 1",
            ),
            (
                "unknown length",
                format!("{}  {tar}\n", hx('a', 40)),
                None,
                "line 1",
            ),
            (
                "default disagrees with length",
                format!("{}  {tar}\n", hx('a', 64)),
                Some(Algorithm::Sha512),
                "line 1",
            ),
            (
                "BSD line with wrong length",
                format!("# c\n\nSHA512 ({tar}) = {}\n", hx('a', 64)),
                None,
                "line 3",
            ),
            (
                "BSD line with wrong length (after valid lines)",
                format!(
                    "# SHA256 HASH\n{}  {tar}\nSHA512 ({tar}) = {}\n",
                    hx('a', 64),
                    hx('a', 64)
                ),
                None,
                "line 3",
            ),
            (
                "PGP armour left in a payload",
                format!(
                    "-----BEGIN PGP SIGNED MESSAGE-----\n{}  {tar}\n",
                    hx('a', 64)
                ),
                None,
                "line 1",
            ),
        ];
        for (what, text, default, want) in cases {
            match parse(&text, default) {
                Ok(v) => panic!("{what}: accepted as {v:?}"),
                Err(e) => {
                    let msg = format!("{e:#}");
                    assert!(msg.starts_with(&format!("{want}:")), "{what}: {msg}");
                }
            }
        }
    }

    #[test]
    fn lines_in_unsupported_blocks_are_skipped_until_the_next_header() {
        let text = format!(
            "# WHIRLPOOL HASH\nnot even a digest line\n{}  f\n# SHA512 HASH\n{}  f\n",
            hx('a', 128),
            hx('b', 128)
        );
        let got = parse(&text, None).expect("parse");
        assert_eq!(
            triples(&got),
            vec![(Algorithm::Sha512, hx('b', 128), "f".into())]
        );
    }

    #[test]
    fn for_file_matches_by_basename() {
        let name = "stage3-amd64-20180204T214502Z.tar.xz";
        let text = format!(
            "# SHA512 HASH\n{a}  {name}\n{a}  /var/tmp/catalyst/builds/default/{name}\n\
             {a}  ./{name}\n{a}  {name}.CONTENTS.gz\n{a}  other/{name}x\n{a}  x{name}\n",
            a = hx('a', 128)
        );
        let lines = parse(&text, None).expect("parse");
        let cases: &[(&str, usize)] = &[
            (name, 3),
            ("/srv/cache/stage3-amd64-20180204T214502Z.tar.xz", 3),
            ("stage3-amd64-20180204T214502Z.tar.xz.CONTENTS.gz", 1),
            ("stage3-amd64-20180204T214502Z.tar", 0),
            ("", 0),
        ];
        for (file, n) in cases {
            let got = for_file(&lines, file);
            assert_eq!(got.len(), *n, "{file}");
            assert!(got.iter().all(|l| l.basename() == basename(file)));
        }
    }

    /// Runs a coreutils `*sum` tool and returns its digest of `path`.
    fn coreutils(tool: &str, path: &Path) -> String {
        let out = Command::new(tool)
            .arg(path)
            .output()
            .expect("run coreutils");
        assert!(out.status.success(), "{tool} failed");
        let text = String::from_utf8(out.stdout).expect("utf-8");
        text.split_whitespace().next().expect("digest").to_owned()
    }

    /// A file of `len` pseudo-random bytes (xorshift), not a multiple of the buffer size.
    fn random_file(len: usize) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut data = Vec::with_capacity(len);
        while data.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.extend_from_slice(&x.to_le_bytes());
        }
        data.truncate(len);
        f.write_all(&data).expect("write");
        f.flush().expect("flush");
        f
    }

    #[test]
    fn hash_file_matches_coreutils() {
        let len = 5 * HASH_BUF + 12_345;
        let f = random_file(len);
        let mut calls = Vec::new();
        let hashes = hash_file(f.path(), &Algorithm::ALL, |n| calls.push(n)).expect("hash");
        assert_eq!(hashes.size(), len as u64);
        assert_eq!(calls.last(), Some(&(len as u64)));
        assert!(calls.len() >= 6, "progress called {} times", calls.len());
        assert!(calls.windows(2).all(|w| w[0] <= w[1]));
        for (alg, tool) in [
            (Algorithm::Blake2b, "b2sum"),
            (Algorithm::Sha512, "sha512sum"),
            (Algorithm::Sha256, "sha256sum"),
            (Algorithm::Md5, "md5sum"),
        ] {
            assert_eq!(
                hashes.get(alg),
                Some(coreutils(tool, f.path()).as_str()),
                "{alg}"
            );
        }
        // Only what was asked for is computed.
        let some = hash_file(f.path(), &[Algorithm::Md5, Algorithm::Md5], |_| {}).expect("hash");
        assert_eq!(some.iter().count(), 1);
        assert_eq!(some.get(Algorithm::Md5), hashes.get(Algorithm::Md5));
        assert_eq!(some.get(Algorithm::Sha512), None);
    }

    #[test]
    fn both_hashing_paths_and_the_incremental_hasher_agree_with_coreutils() {
        let f = random_file(3 * HASH_BUF + 1);
        let tools = [
            (Algorithm::Blake2b, "b2sum"),
            (Algorithm::Sha512, "sha512sum"),
            (Algorithm::Sha256, "sha256sum"),
            (Algorithm::Md5, "md5sum"),
        ];
        let want: Vec<(Algorithm, String)> = tools
            .iter()
            .map(|(a, tool)| (*a, coreutils(tool, f.path())))
            .collect();
        let as_vec = |h: &Hashes| -> Vec<(Algorithm, String)> {
            h.iter().map(|(a, x)| (a, x.to_owned())).collect()
        };
        for parallel in [false, true] {
            let file = File::open(f.path()).expect("open");
            let h = hash_reader(file, &Algorithm::ALL, parallel, |_| {}).expect("hash");
            assert_eq!(as_vec(&h), want, "parallel: {parallel}");
        }
        let mut hasher = Hasher::new(&Algorithm::ALL);
        let mut file = File::open(f.path()).expect("open");
        std::io::copy(&mut file, &mut hasher).expect("copy");
        assert_eq!(as_vec(&hasher.finish()), want, "Hasher");
    }

    /// A reader that yields `ok` zero bytes, then fails.
    struct FailingReader {
        ok: usize,
    }

    impl Read for FailingReader {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.ok == 0 {
                return Err(std::io::Error::other("disk on fire"));
            }
            let n = buf.len().min(self.ok);
            buf[..n].fill(0);
            self.ok -= n;
            Ok(n)
        }
    }

    #[test]
    fn read_errors_surface_from_both_paths() {
        for parallel in [false, true] {
            let r = FailingReader { ok: 10 * HASH_BUF };
            let err = hash_reader(r, &Algorithm::ALL, parallel, |_| {}).expect_err("error");
            assert!(format!("{err:#}").contains("disk on fire"), "{err:#}");
        }
    }

    #[test]
    fn work_split_is_balanced_and_complete() {
        use Algorithm::*;
        let cases: &[(&[Algorithm], &[Algorithm], &[Algorithm])] = &[
            (&[Md5], &[Md5], &[]),
            (&[Blake2b, Sha512], &[Sha512], &[Blake2b]),
            (&[Sha512, Blake2b, Sha512], &[Sha512], &[Blake2b]),
            (
                &[Blake2b, Sha512, Sha256, Md5],
                &[Sha512, Sha256],
                &[Md5, Blake2b],
            ),
            (&[], &[], &[]),
        ];
        for (algs, a, b) in cases {
            assert_eq!(split_work(algs), (a.to_vec(), b.to_vec()), "{algs:?}");
        }
    }

    #[test]
    fn hash_file_empty_and_missing() {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        let h = hash_file(f.path(), &[Algorithm::Sha256], |_| {}).expect("hash");
        assert_eq!(
            h.get(Algorithm::Sha256),
            Some("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        );
        let missing = f.path().with_extension("does-not-exist");
        let err = hash_file(&missing, &[Algorithm::Md5], |_| {}).expect_err("missing file");
        assert!(format!("{err:#}").contains("does-not-exist"), "{err:#}");
    }

    #[test]
    fn check_flags_the_one_mismatching_algorithm() {
        let f = random_file(300_000);
        let algs = [Algorithm::Blake2b, Algorithm::Sha512, Algorithm::Sha256];
        let hashes = hash_file(f.path(), &algs, |_| {}).expect("hash");
        let good = |a| hashes.get(a).expect("computed").to_uppercase();
        let mut bad_sha512 = good(Algorithm::Sha512);
        bad_sha512.replace_range(
            0..1,
            if bad_sha512.starts_with('0') {
                "1"
            } else {
                "0"
            },
        );
        let text = format!(
            "# BLAKE2B HASH\n{}  /builds/file.tar.xz\n# SHA512 HASH\n{bad_sha512}  file.tar.xz\n\
             # SHA256 HASH\n{}  file.tar.xz\n{}  other.tar.xz\n",
            good(Algorithm::Blake2b),
            good(Algorithm::Sha256),
            hx('0', 64),
        );
        let all = parse(&text, None).expect("parse");
        let lines = for_file(&all, "file.tar.xz");
        assert_eq!(
            algorithms(&lines),
            vec![Algorithm::Blake2b, Algorithm::Sha512, Algorithm::Sha256]
        );
        let results = check(&lines, &hashes).expect("check");
        let oks: Vec<(Algorithm, bool)> = results.iter().map(|r| (r.algorithm, r.ok)).collect();
        assert_eq!(
            oks,
            vec![
                (Algorithm::Blake2b, true),
                (Algorithm::Sha512, false),
                (Algorithm::Sha256, true)
            ]
        );
        assert_eq!(results[1].expected, bad_sha512.to_lowercase());
        assert_eq!(results[1].actual.as_deref(), hashes.get(Algorithm::Sha512));

        let err = verify(&all, "file.tar.xz", &hashes).expect_err("mismatch");
        let msg = format!("{err:#}");
        assert!(
            msg.contains("file.tar.xz") && msg.contains("SHA512"),
            "{msg}"
        );
        assert!(!msg.contains("BLAKE2B") && !msg.contains("SHA256"), "{msg}");

        // Without the bad line everything verifies; a file no line lists does not.
        let fine: Vec<DigestLine> = all
            .iter()
            .filter(|l| l.algorithm != Algorithm::Sha512)
            .cloned()
            .collect();
        assert_eq!(verify(&fine, "file.tar.xz", &hashes).expect("ok").len(), 2);
        assert!(check(&[], &hashes).is_err());
        let err = verify(&fine, "missing.tar.xz", &hashes).expect_err("unlisted");
        assert!(format!("{err:#}").contains("missing.tar.xz"), "{err:#}");

        // A listed algorithm that was not computed is a failure, not a pass.
        let md5_only = hash_file(f.path(), &[Algorithm::Md5], |_| {}).expect("hash");
        let r = check(&lines, &md5_only).expect("check");
        assert!(r.iter().all(|r| !r.ok && r.actual.is_none()));
    }

    #[test]
    fn algorithm_names_and_anchors() {
        let names = [
            ("BLAKE2B", Some(Algorithm::Blake2b)),
            ("BLAKE2 (b2sum)", Some(Algorithm::Blake2b)),
            ("blake2b-512", Some(Algorithm::Blake2b)),
            ("SHA512", Some(Algorithm::Sha512)),
            ("sha256", Some(Algorithm::Sha256)),
            ("MD5", Some(Algorithm::Md5)),
            ("WHIRLPOOL", None),
            ("SHA1", None),
            ("BLAKE2s", None),
        ];
        for (name, want) in names {
            assert_eq!(Algorithm::from_name(name), want, "{name}");
        }
        for a in Algorithm::ALL {
            assert_eq!(Algorithm::from_name(&a.to_string()), Some(a));
            assert_eq!(a.trust_anchor(), a != Algorithm::Md5);
        }
    }

    #[test]
    fn parses_latest_files() {
        let real = "# Latest as of Sat, 14 Feb 2026 17:05:33 +0000\n# ts=1771088733\n\
                    20260214T170533Z/stage3-amd64-musl-openrc-20260214T170533Z.tar.xz 229145684\n";
        let one = vec![LatestEntry {
            path: "20260214T170533Z/stage3-amd64-musl-openrc-20260214T170533Z.tar.xz".into(),
            size: 229_145_684,
        }];
        let crlf = real.replace('\n', " \t\r\n");
        let aggregate = "# Latest as of Sat, 14 Feb 2026 17:05:33 +0000\n# ts=1771088733\n\n\
                         20260214T170533Z/stage3-amd64-openrc-20260214T170533Z.tar.xz 300\n\
                         20171208/hardened/stage3-amd64-hardened-20171208.tar.bz2\t7\n";
        let ok: Vec<(&str, &str, Vec<LatestEntry>)> = vec![
            ("real", real, one.clone()),
            ("crlf + trailing whitespace", &crlf, one),
            (
                "several entries, tab separator",
                aggregate,
                vec![
                    LatestEntry {
                        path: "20260214T170533Z/stage3-amd64-openrc-20260214T170533Z.tar.xz".into(),
                        size: 300,
                    },
                    LatestEntry {
                        path: "20171208/hardened/stage3-amd64-hardened-20171208.tar.bz2".into(),
                        size: 7,
                    },
                ],
            ),
        ];
        for (what, text, want) in ok {
            assert_eq!(parse_latest(text).expect(what), want, "{what}");
        }
        assert_eq!(latest_ts(real), Some(1_771_088_733));
        assert_eq!(latest_ts(&crlf), Some(1_771_088_733));
        assert_eq!(latest_ts("# Latest as of\nx/y.tar.xz 1\n"), None);
        assert_eq!(latest_ts("# ts=soon\n"), None);
        let bad = [
            ("no size", "# ts=1\nfoo/stage3.tar.xz\n", "line 2"),
            ("three fields", "a/b.tar.xz 12 34\n", "line 1"),
            ("hex size", "a/b.tar.xz 0x12\n", "line 1"),
            ("negative size", "a/b.tar.xz -12\n", "line 1"),
            (
                "huge size",
                "a/b.tar.xz 99999999999999999999999\n",
                "line 1",
            ),
            ("absolute", "# c\n\n/etc/passwd 1\n", "line 3"),
            ("dot-dot", "../../x.tar.xz 1\n", "line 1"),
            ("html", "<html><body>Not Found</body></html>\n", "line 1"),
            (
                "only comments",
                "# Latest as of\n# ts=1\n",
                "no `RELPATH SIZE`",
            ),
        ];
        for (what, text, want) in bad {
            let err = parse_latest(text).expect_err(what);
            assert!(format!("{err:#}").starts_with(want), "{what}: {err:#}");
        }
    }

    #[test]
    fn parses_stage_names_and_arch_dirs() {
        let cases: &[(&str, &str, &str, &str, &str)] = &[
            // (file name, variant, timestamp, ext, arch dir)
            (
                "stage3-amd64-musl-openrc-20260214T170533Z.tar.xz",
                "amd64-musl-openrc",
                TS,
                "xz",
                "amd64",
            ),
            (
                "stage3-amd64-musl-20180204T214502Z.tar.xz",
                "amd64-musl",
                "20180204T214502Z",
                "xz",
                "amd64",
            ),
            (
                "stage3-amd64-musl-hardened-systemd-20260214T170533Z.tar.xz",
                "amd64-musl-hardened-systemd",
                TS,
                "xz",
                "amd64",
            ),
            (
                "stage3-amd64-musl-llvm-openrc-20260214T170533Z.tar.xz",
                "amd64-musl-llvm-openrc",
                TS,
                "xz",
                "amd64",
            ),
            (
                "stage3-arm64-musl-hardened-systemd-20260214T170533Z.tar.xz",
                "arm64-musl-hardened-systemd",
                TS,
                "xz",
                "arm64",
            ),
            (
                "stage3-amd64-openrc-20260214T170533Z.tar.xz",
                "amd64-openrc",
                TS,
                "xz",
                "amd64",
            ),
            (
                "stage3-amd64-desktop-systemd-mergedusr-20260214T170533Z.tar.xz",
                "amd64-desktop-systemd-mergedusr",
                TS,
                "xz",
                "amd64",
            ),
            (
                "stage3-i686-musl-20260214T170533Z.tar.xz",
                "i686-musl",
                TS,
                "xz",
                "x86",
            ),
            (
                "stage3-i486-openrc-20260214T170533Z.tar.xz",
                "i486-openrc",
                TS,
                "xz",
                "x86",
            ),
            (
                "stage3-x86-20171208.tar.bz2",
                "x86",
                "20171208",
                "bz2",
                "x86",
            ),
            (
                "stage3-ppc64le-musl-hardened-openrc-20260214T170533Z.tar.xz",
                "ppc64le-musl-hardened-openrc",
                TS,
                "xz",
                "ppc",
            ),
            (
                "stage3-ppc64-openrc-20260214T170533Z.tar.xz",
                "ppc64-openrc",
                TS,
                "xz",
                "ppc",
            ),
            (
                "stage3-ppc-openrc-20260214T170533Z.tar.xz",
                "ppc-openrc",
                TS,
                "xz",
                "ppc",
            ),
            (
                "stage3-armv7a_hardfp_musl-openrc-20260214T170533Z.tar.xz",
                "armv7a_hardfp_musl-openrc",
                TS,
                "xz",
                "arm",
            ),
            (
                "stage3-armv6j_hardfp-openrc-20260214T170533Z.tar.xz",
                "armv6j_hardfp-openrc",
                TS,
                "xz",
                "arm",
            ),
            (
                "stage3-armv5tel-openrc-20260214T170533Z.tar.xz",
                "armv5tel-openrc",
                TS,
                "xz",
                "arm",
            ),
            (
                "stage3-armv4tl-20180204.tar.bz2",
                "armv4tl",
                "20180204",
                "bz2",
                "arm",
            ),
            (
                "stage3-rv64_lp64d-openrc-20260214T170533Z.tar.xz",
                "rv64_lp64d-openrc",
                TS,
                "xz",
                "riscv",
            ),
            (
                "stage3-rv32_ilp32d-openrc-20260214T170533Z.tar.xz",
                "rv32_ilp32d-openrc",
                TS,
                "xz",
                "riscv",
            ),
            (
                "stage3-s390x-openrc-20260214T170533Z.tar.xz",
                "s390x-openrc",
                TS,
                "xz",
                "s390",
            ),
            (
                "stage3-s390-openrc-20260214T170533Z.tar.xz",
                "s390-openrc",
                TS,
                "xz",
                "s390",
            ),
            (
                "stage3-sparc64-openrc-20260214T170533Z.tar.xz",
                "sparc64-openrc",
                TS,
                "xz",
                "sparc",
            ),
            (
                "stage3-hppa2.0-openrc-20260214T170533Z.tar.xz",
                "hppa2.0-openrc",
                TS,
                "xz",
                "hppa",
            ),
            (
                "stage3-alpha-openrc-20260214T170533Z.tar.xz",
                "alpha-openrc",
                TS,
                "xz",
                "alpha",
            ),
            (
                "stage3-loong-lp64d-openrc-20260214T170533Z.tar.xz",
                "loong-lp64d-openrc",
                TS,
                "xz",
                "loong",
            ),
            (
                "stage3-m68k-openrc-20260214T170533Z.tar.xz",
                "m68k-openrc",
                TS,
                "xz",
                "m68k",
            ),
            (
                "stage3-mips64el_n64-openrc-20260214T170533Z.tar.xz",
                "mips64el_n64-openrc",
                TS,
                "xz",
                "mips",
            ),
            (
                "stage3-amd64-hardened-nomultilib-selinux-openrc-20260214T170533Z.tar.xz",
                "amd64-hardened-nomultilib-selinux-openrc",
                TS,
                "xz",
                "amd64",
            ),
            (
                "stage3-amd64-hardened+nomultilib-20171208.tar.bz2",
                "amd64-hardened+nomultilib",
                "20171208",
                "bz2",
                "amd64",
            ),
            (
                "stage3-amd64-20180204.tar.bz2",
                "amd64",
                "20180204",
                "bz2",
                "amd64",
            ),
        ];
        for &(file, variant, ts, ext, dir) in cases {
            let got = parse_stage_name(file).unwrap_or_else(|| panic!("{file}"));
            assert_eq!(
                got,
                StageName {
                    variant: variant.into(),
                    timestamp: ts.into(),
                    compression_ext: ext.into()
                },
                "{file}"
            );
            assert_eq!(arch_dir(&got.variant).expect(file), dir, "{file}");
        }
        let not_stages = [
            "stage3-amd64-musl-openrc-20260214T170533Z.tar.xz.asc",
            "stage3-amd64-musl-openrc-20260214T170533Z.tar.xz.DIGESTS",
            "stage3-amd64-musl-openrc-20260214T170533Z.tar.xz.CONTENTS.gz",
            "stage3-amd64-musl-openrc-20260214T170533Z.tar.xz.sha256",
            "stage3-amd64-musl-openrc-20260214T170533Z.tar",
            "stage3-amd64-musl-openrc-latest.tar.xz",
            "stage3-amd64-musl-openrc-2026021.tar.xz",
            "stage3-amd64-musl-openrc-20260214T1705Z.tar.xz",
            "stage3-amd64-musl-openrc-20260214T170533X.tar.xz",
            "stage3-amd64-musl-openrc-20260214X170533Z.tar.xz",
            "stage3-20260214T170533Z.tar.xz",
            "stage3--20260214T170533Z.tar.xz",
            "stage3-Amd64-20260214T170533Z.tar.xz",
            "stage4-amd64-openrc-20260214T170533Z.tar.xz",
            "latest-stage3-amd64-musl-openrc.txt",
            "",
        ];
        for file in not_stages {
            assert_eq!(parse_stage_name(file), None, "{file}");
        }
        for variant in ["x32-openrc", "ia64", "aarch64-musl", "", "-musl", "armv7"] {
            assert!(arch_dir(variant).is_err(), "{variant}");
        }
    }

    #[test]
    fn parses_snapshot_names() {
        use SnapshotKind::*;
        let cases: &[(&str, &str, SnapshotKind, &str, &str, bool)] = &[
            (
                "gentoo-20261127.tar.xz",
                "gentoo",
                Tarball,
                "20261127",
                "xz",
                false,
            ),
            (
                "gentoo-20261127.tar.bz2",
                "gentoo",
                Tarball,
                "20261127",
                "bz2",
                false,
            ),
            (
                "portage-20261127.tar.xz",
                "portage",
                Tarball,
                "20261127",
                "xz",
                false,
            ),
            (
                "portage-20180204.tar.bz2",
                "portage",
                Tarball,
                "20180204",
                "bz2",
                false,
            ),
            (
                "gentoo-latest.tar.xz",
                "gentoo",
                Tarball,
                "latest",
                "xz",
                true,
            ),
            (
                "portage-latest.tar.bz2",
                "portage",
                Tarball,
                "latest",
                "bz2",
                true,
            ),
            (
                "gentoo-20261127.xz.sqfs",
                "gentoo",
                Squashfs,
                "20261127",
                "xz",
                false,
            ),
            (
                "gentoo-current.xz.sqfs",
                "gentoo",
                Squashfs,
                "current",
                "xz",
                true,
            ),
            (
                "gentoo-current.zstd.sqfs",
                "gentoo",
                Squashfs,
                "current",
                "zstd",
                true,
            ),
        ];
        for &(file, prefix, kind, date, ext, moving) in cases {
            let got = parse_snapshot_name(file).unwrap_or_else(|| panic!("{file}"));
            assert_eq!(
                got,
                SnapshotName {
                    prefix: prefix.into(),
                    kind,
                    date: date.into(),
                    compression_ext: ext.into()
                },
                "{file}"
            );
            assert_eq!(got.is_moving(), moving, "{file}");
        }
        for file in [
            "gentoo-20261127.tar.xz.md5sum",
            "gentoo-20261127.tar.xz.gpgsig",
            "portage-latest.tar.bz2.md5sum",
            "gentoo-2026112.tar.xz",
            "gentoo-current.tar.xz",
            "gentoo-latest.xz.sqfs",
            "portage-20261127.xz.sqfs",
            "gentoo-20261127.sqfs",
            "gentoo-20261127.tar",
            "funtoo-20261127.tar.xz",
            "sha512sum.txt",
            "",
        ] {
            assert_eq!(parse_snapshot_name(file), None, "{file}");
        }
    }
}
