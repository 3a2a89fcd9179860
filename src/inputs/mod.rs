//! Inputs: where a stage3 or a snapshot comes from (a path, a URL, `stage3:VARIANT`,
//! `snapshot:latest`), how it is fetched into the cache, and how it is verified
//! (OpenPGP signatures by pinned keys, digest files) before anything uses it.
//!
//! Downloads keep the mirror's layout under `CACHE/downloads/HOST/PATH`. A file is renamed
//! into place only after it passed every check, and a `NAME.verified` record beside it
//! holds the digest of the companions it was checked with and the file's own SHA-256: when
//! a moving name (`gentoo-latest.tar.xz`) gets new companions on the mirror, or the file
//! changed on disk, the old file is dropped and fetched (and verified) again; otherwise a
//! verified file is never fetched again. `--no-verify` downloads go to
//! `CACHE/unverified/HOST/PATH` instead, so nothing unverified is ever taken for verified.
//!
//! A `latest-stage3-VARIANT.txt` is trusted only if it is not older than the newest one
//! verified before from the same mirror (recorded in `latest-stage3-VARIANT.txt.seen` beside
//! its cached copy): an old signed list replayed by a mirror would pin an old stage.
//!
//! Credentials in a URL (`http://user:password@host/`) are used for the requests but appear
//! in no message and no cache path.

pub mod digests;
pub mod fetch;
pub mod pgp;
pub mod verify;

use std::cell::OnceCell;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::image::config::Platform;
use crate::net::redact;
use crate::progress::Verbosity;
use fetch::{FetchError, Fetcher};
use pgp::{Fingerprint, Keyring};
use verify::{Check, Companion, Trust};

/// Gentoo's main distfiles mirror, the default for `stage3:` and `snapshot:` sources.
pub const DEFAULT_MIRROR: &str = "https://distfiles.gentoo.org";

/// The stage3 a bare `build` uses.
pub const DEFAULT_STAGE3: &str = "stage3:amd64-musl-openrc";
/// The snapshot a bare `build` uses.
pub const DEFAULT_SNAPSHOT: &str = "snapshot:latest";

/// Where Gentoo installs its release keys (app-crypt/openpgp-keys-gentoo-release).
pub const SYSTEM_KEYRING: &str = "/usr/share/openpgp-keys/gentoo-release.asc";

/// Where `--no-verify` downloads go, beside the verified `downloads/`.
const UNVERIFIED_DIR: &str = "unverified";

/// The addresses whose keys WKD serves: releases and snapshots.
const WKD_ADDRESSES: [&str; 2] = ["releng@gentoo.org", "infrastructure@gentoo.org"];

/// Where an input comes from, as written on the command line or in the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A local file or directory.
    Path(PathBuf),
    /// An `http://` or `https://` URL.
    Url(String),
    /// `stage3:VARIANT[@TIMESTAMP]`: the newest (or the given) autobuild of a variant.
    Stage3 {
        variant: String,
        timestamp: Option<String>,
    },
    /// `snapshot:latest`, `snapshot:YYYYMMDD`, `snapshot:sqfs:latest`, `snapshot:sqfs:YYYYMMDD`.
    Snapshot {
        date: Option<String>,
        squashfs: bool,
    },
}

impl Source {
    /// Parse a source; anything that is neither a URL nor a `stage3:`/`snapshot:` name is a
    /// path.
    pub fn parse(spec: &str) -> Result<Source> {
        if spec.starts_with("http://") || spec.starts_with("https://") {
            return Ok(Source::Url(spec.to_string()));
        }
        if let Some(rest) = spec.strip_prefix("stage3:") {
            let (variant, timestamp) = match rest.split_once('@') {
                Some((v, ts)) => (v, Some(ts)),
                None => (rest, None),
            };
            if variant.is_empty()
                || !variant
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            {
                bail!("{spec}: expected stage3:VARIANT[@TIMESTAMP], e.g. stage3:amd64-musl-openrc");
            }
            digests::arch_dir(variant).with_context(|| spec.to_string())?;
            if let Some(ts) = timestamp {
                let probe = format!("stage3-{variant}-{ts}.tar.xz");
                if digests::parse_stage_name(&probe).is_none() {
                    bail!("{spec}: {ts:?} is not a stage timestamp (like 20260214T170533Z)");
                }
            }
            return Ok(Source::Stage3 {
                variant: variant.to_string(),
                timestamp: timestamp.map(str::to_string),
            });
        }
        if let Some(rest) = spec.strip_prefix("snapshot:") {
            let (squashfs, version) = match rest.strip_prefix("sqfs:") {
                Some(v) => (true, v),
                None => (false, rest),
            };
            let date = match version {
                "latest" => None,
                d if d.len() == 8 && d.bytes().all(|b| b.is_ascii_digit()) => Some(d.to_string()),
                _ => bail!(
                    "{spec}: expected snapshot:latest, snapshot:YYYYMMDD, snapshot:sqfs:latest \
                     or snapshot:sqfs:YYYYMMDD"
                ),
            };
            return Ok(Source::Snapshot { date, squashfs });
        }
        Ok(Source::Path(PathBuf::from(spec)))
    }

    /// The same stage for another platform: `stage3:VARIANT` with the variant's architecture
    /// replaced by the platform's (`amd64-musl-openrc` becomes `arm64-musl-openrc` for
    /// linux/arm64). Only a `stage3:VARIANT` of a known architecture can be carried over.
    pub fn for_platform(&self, platform: &Platform) -> Result<Source> {
        /// OCI architecture (with variant), and Gentoo's first word of a stage's variant.
        const ARCHES: &[(&str, &str)] = &[
            ("amd64", "amd64"),
            ("arm64", "arm64"),
            ("386", "i686"),
            ("ppc64le", "ppc64le"),
            ("s390x", "s390x"),
        ];
        let Source::Stage3 { variant, timestamp } = self else {
            bail!("only a stage3:VARIANT names the stages of other platforms");
        };
        let (first, rest) = variant.split_once('-').unwrap_or((variant.as_str(), ""));
        if !ARCHES.iter().any(|(_, gentoo)| *gentoo == first) {
            bail!("stage3:{variant}: no other platform's variant is known for {first}");
        }
        let plain = platform.variant.is_none()
            || platform.architecture == "arm64" && platform.variant.as_deref() == Some("v8");
        let Some((_, arch)) = ARCHES
            .iter()
            .find(|(oci, _)| plain && *oci == platform.architecture)
        else {
            bail!("no stage3 variant name is known for {platform}");
        };
        let variant = if rest.is_empty() {
            arch.to_string()
        } else {
            format!("{arch}-{rest}")
        };
        Ok(Source::Stage3 {
            variant,
            timestamp: timestamp.clone(),
        })
    }

    /// Whether this is a local path (config files resolve those relative to themselves).
    pub fn is_path(&self) -> bool {
        matches!(self, Source::Path(_))
    }
}

/// Whether to verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VerifyMode {
    /// Downloads always; local files when their companions sit beside them.
    #[default]
    Auto,
    /// Local files too; a missing companion is an error.
    Always,
    /// Nothing (with a loud warning).
    Never,
}

/// Settings for getting inputs.
#[derive(Debug, Clone)]
pub struct InputOptions {
    /// Base URL of a Gentoo mirror (its `releases/` and `snapshots/` directories).
    pub mirror: String,
    /// Cache root: downloads go to `downloads/`, WKD keys to `keys/`.
    pub cache_dir: PathBuf,
    /// Keys to check signatures with (default: the system keyring, else WKD).
    pub keyring: Option<PathBuf>,
    /// Fingerprints of the keys whose signatures count.
    pub pins: Vec<Fingerprint>,
    pub verify: VerifyMode,
    pub verbosity: Verbosity,
}

impl InputOptions {
    pub fn new(cache_dir: PathBuf, verbosity: Verbosity) -> Self {
        InputOptions {
            mirror: DEFAULT_MIRROR.to_string(),
            cache_dir,
            keyring: None,
            pins: pgp::gentoo_pins(),
            verify: VerifyMode::Auto,
            verbosity,
        }
    }
}

/// An input ready to use.
#[derive(Debug, Clone)]
pub struct Input {
    /// The local file or directory.
    pub path: PathBuf,
    /// The checks it passed (empty when not verified).
    pub checks: Vec<Check>,
    /// Bytes downloaded for it in this run.
    pub downloaded: u64,
}

/// A file on a mirror, with what is known about it before downloading.
struct Remote {
    url: String,
    /// Its companions' base URL (the directory).
    dir_url: String,
    name: String,
    expected_size: Option<u64>,
}

/// Gets inputs: resolves sources, downloads, verifies. Keys and the HTTP client are set up
/// only when first needed.
pub struct Inputs {
    opts: InputOptions,
    fetcher: OnceCell<Fetcher>,
    keyring: OnceCell<Keyring>,
}

impl Inputs {
    pub fn new(opts: InputOptions) -> Self {
        Inputs {
            opts,
            fetcher: OnceCell::new(),
            keyring: OnceCell::new(),
        }
    }

    fn fetcher(&self) -> Result<&Fetcher> {
        if let Some(f) = self.fetcher.get() {
            return Ok(f);
        }
        let f = Fetcher::new(&self.opts.cache_dir.join("downloads"), self.opts.verbosity)?;
        Ok(self.fetcher.get_or_init(|| f))
    }

    /// The trusted keys: `--keyring`, else the system keyring, else WKD (fetched keys are
    /// kept only when pinned).
    fn keyring(&self) -> Result<&Keyring> {
        if let Some(k) = self.keyring.get() {
            return Ok(k);
        }
        let keyring = match &self.opts.keyring {
            Some(path) => Keyring::load(path)?,
            None if Path::new(SYSTEM_KEYRING).is_file() => {
                Keyring::load(Path::new(SYSTEM_KEYRING))?
            }
            None => self.wkd_keys()?,
        };
        if keyring.is_empty() {
            bail!("no OpenPGP keys to verify with (give --keyring FILE)");
        }
        Ok(self.keyring.get_or_init(|| keyring))
    }

    fn wkd_keys(&self) -> Result<Keyring> {
        let fetcher = self.fetcher()?;
        let mut all: Option<Keyring> = None;
        let mut errors = Vec::new();
        for address in WKD_ADDRESSES {
            let dest = self
                .opts
                .cache_dir
                .join("keys")
                .join(format!("{address}.pgp"));
            let mut got = None;
            for url in pgp::wkd_urls(address)? {
                match fetcher
                    .fetch_small(&url, &dest, false)
                    .and_then(|bytes| Keyring::parse(&bytes, &url))
                {
                    Ok(k) => {
                        got = Some(k);
                        break;
                    }
                    Err(e) => {
                        let _ = fs::remove_file(&dest);
                        errors.push(format!("{e:#}"));
                    }
                }
            }
            if let Some(mut k) = got {
                k.retain_pinned(&self.opts.pins);
                match &mut all {
                    Some(a) => a.extend(k),
                    None => all = Some(k),
                }
            }
        }
        match all {
            Some(k) if !k.is_empty() => Ok(k),
            _ => bail!(
                "cannot get Gentoo's release keys: no --keyring, no {SYSTEM_KEYRING}, and WKD \
                 gave no pinned key ({})",
                errors.join("; ")
            ),
        }
    }

    /// Make `source` a verified local file (or a directory, for a snapshot).
    pub fn get(&self, source: &Source) -> Result<Input> {
        match source {
            Source::Path(path) => self.local(path),
            Source::Url(url) => {
                let (dir_url, name) = split_url(url)?;
                self.download(Remote {
                    url: url.clone(),
                    dir_url,
                    name,
                    expected_size: None,
                })
            }
            Source::Stage3 { variant, timestamp } => {
                let remote = self.resolve_stage3(variant, timestamp.as_deref())?;
                self.download(remote)
            }
            Source::Snapshot { date, squashfs } => {
                let mirror = self.opts.mirror.trim_end_matches('/');
                let (dir_url, name) = match (squashfs, date) {
                    (false, d) => (
                        format!("{mirror}/snapshots"),
                        format!("gentoo-{}.tar.xz", d.as_deref().unwrap_or("latest")),
                    ),
                    (true, d) => (
                        format!("{mirror}/snapshots/squashfs"),
                        format!("gentoo-{}.xz.sqfs", d.as_deref().unwrap_or("current")),
                    ),
                };
                self.download(Remote {
                    url: format!("{dir_url}/{name}"),
                    dir_url,
                    name,
                    expected_size: None,
                })
            }
        }
    }

    /// `latest-stage3-VARIANT.txt` (clearsigned; only its verified payload is read), or the
    /// given timestamp's directory.
    fn resolve_stage3(&self, variant: &str, timestamp: Option<&str>) -> Result<Remote> {
        let mirror = self.opts.mirror.trim_end_matches('/');
        let base = format!(
            "{mirror}/releases/{}/autobuilds",
            digests::arch_dir(variant)?
        );
        if let Some(ts) = timestamp {
            let name = format!("stage3-{variant}-{ts}.tar.xz");
            return Ok(Remote {
                url: format!("{base}/{ts}/{name}"),
                dir_url: format!("{base}/{ts}"),
                name,
                expected_size: None,
            });
        }
        let latest_name = format!("latest-stage3-{variant}.txt");
        let latest_url = format!("{base}/{latest_name}");
        let text = self
            .fetcher()?
            .fetch_small(&latest_url, &cache_path(&latest_url)?, true)
            .map_err(|e| missing_or(e, &latest_name, "the list of the newest stages"))?;
        let text = String::from_utf8_lossy(&text);
        let payload = if self.opts.verify == VerifyMode::Never {
            cleartext_payload(&text).unwrap_or_else(|| text.to_string())
        } else {
            let (payload, _) = pgp::verify_cleartext(self.keyring()?, &self.opts.pins, &text)
                .map_err(|e| anyhow::anyhow!("{latest_name}: signature check failed: {e}"))?;
            payload
        };
        let entries = digests::parse_latest(&payload).with_context(|| latest_name.clone())?;
        let (entry, stage) = entries
            .iter()
            .find_map(|e| {
                let file = e.path.rsplit('/').next().unwrap_or(&e.path);
                digests::parse_stage_name(file)
                    .filter(|s| s.variant == variant)
                    .map(|s| (e, s))
            })
            .with_context(|| format!("{latest_name}: lists no stage3-{variant}-* file"))?;
        if self.opts.verify != VerifyMode::Never {
            let seen = self
                .opts
                .cache_dir
                .join("downloads")
                .join(cache_path(&format!("{latest_url}.seen"))?);
            let this = Seen {
                ts: digests::latest_ts(&payload),
                stage: stage.timestamp,
            };
            this.check_and_record(&seen, &latest_name, variant)?;
        }
        let (dir, name) = match entry.path.rsplit_once('/') {
            Some((d, n)) => (format!("{base}/{d}"), n.to_string()),
            None => (base.clone(), entry.path.clone()),
        };
        Ok(Remote {
            url: format!("{dir}/{name}"),
            dir_url: dir,
            name,
            expected_size: Some(entry.size),
        })
    }

    fn download(&self, remote: Remote) -> Result<Input> {
        let fetcher = self.fetcher()?;
        let unverified = self.opts.verify == VerifyMode::Never;
        let dest = self
            .opts
            .cache_dir
            .join(if unverified {
                UNVERIFIED_DIR
            } else {
                "downloads"
            })
            .join(cache_path(&remote.url)?);
        if unverified {
            warn_unverified(&remote.name, "--no-verify");
            let got =
                fetcher.fetch_verified(&remote.url, &dest, remote.expected_size, |_| Ok(()))?;
            return Ok(Input {
                path: got.path,
                checks: Vec::new(),
                downloaded: got.downloaded,
            });
        }
        // Companions first: a missing one fails before hundreds of MB are fetched.
        let mut found = Vec::new();
        for companion in verify::companions(&remote.name) {
            let url = format!("{}/{}", remote.dir_url, companion.name);
            let content = match fetcher.fetch_small(&url, &cache_path(&url)?, true) {
                Ok(bytes) => Some(bytes),
                Err(e) if is_not_found(&e) => None,
                Err(e) => return Err(e),
            };
            found.push((companion, content));
        }
        check_companions_present(&remote.name, &found)?;
        let record = record_path(&dest);
        let companions = companions_digest(&found);
        if dest.is_file() && !self.is_recorded(&record, &companions, &dest)? {
            // A moving name with new companions, a file changed since it was verified, or
            // one of unknown origin: fetch again.
            fs::remove_file(&dest)
                .with_context(|| format!("{}: cannot drop the outdated copy", dest.display()))?;
        }
        let trust = Trust {
            keyring: self.keyring()?,
            pins: &self.opts.pins,
            verbosity: self.opts.verbosity,
        };
        let mut checks = Vec::new();
        let got = fetcher.fetch_verified(&remote.url, &dest, remote.expected_size, |part| {
            checks = verify::check_file(part, &remote.name, &found, &trust);
            verify::ensure_trusted(&remote.name, &checks)?;
            let text = self.record_text(&companions, part)?;
            fs::write(&record, text)
                .with_context(|| format!("{}: cannot record the verification", record.display()))
        })?;
        self.report(&remote.name, &checks);
        Ok(Input {
            path: got.path,
            checks,
            downloaded: got.downloaded,
        })
    }

    /// A local file: verified when its companions sit beside it, or always with
    /// [`VerifyMode::Always`].
    fn local(&self, path: &Path) -> Result<Input> {
        let meta =
            fs::metadata(path).with_context(|| format!("{}: cannot open", path.display()))?;
        let plain = Input {
            path: path.to_path_buf(),
            checks: Vec::new(),
            downloaded: 0,
        };
        if meta.is_dir() {
            return Ok(plain); // a tree has no companions to check
        }
        if self.opts.verify == VerifyMode::Never {
            warn_unverified(&path.display().to_string(), "--no-verify");
            return Ok(plain);
        }
        let checks = self.check_local(path)?;
        if checks.is_empty() {
            warn_unverified(
                &path.display().to_string(),
                "no companion files beside it; --verify requires them",
            );
            return Ok(plain);
        }
        verify::ensure_trusted(&path.display().to_string(), &checks)?;
        self.report(&file_name(path)?, &checks);
        Ok(Input { checks, ..plain })
    }

    /// One line on stderr saying what made a file trusted (or that it was verified before).
    fn report(&self, name: &str, checks: &[Check]) {
        if self.opts.verbosity == Verbosity::Quiet {
            return;
        }
        if checks.is_empty() {
            eprintln!("{name}: verified when it was downloaded");
            return;
        }
        eprintln!("{name}: verified: {}", verify::summary(checks));
    }

    /// What the `.verified` record of `file` says: the digest of the companions it was
    /// verified with, and its own SHA-256.
    fn record_text(&self, companions: &str, file: &Path) -> Result<String> {
        let size = fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        let name = file.file_name().unwrap_or_default().to_string_lossy();
        let bar = crate::progress::Bar::new(self.opts.verbosity, &format!("checking {name}"), size);
        let hashes = digests::hash_file(file, &[digests::Algorithm::Sha256], |n| bar.set(n))?;
        bar.finish();
        let sha256 = hashes
            .get(digests::Algorithm::Sha256)
            .with_context(|| format!("{}: no SHA-256 computed", file.display()))?;
        Ok(format!("companions {companions}\nsha256 {sha256}\n"))
    }

    /// Whether `record` says `file` was verified with these companions, and the file is
    /// still what was verified.
    fn is_recorded(&self, record: &Path, companions: &str, file: &Path) -> Result<bool> {
        let Ok(text) = fs::read_to_string(record) else {
            return Ok(false);
        };
        if text.lines().next() != Some(&format!("companions {companions}")) {
            return Ok(false); // new companions: no need to hash the old file
        }
        Ok(text == self.record_text(companions, file)?)
    }

    /// The checks for a local file (for `verify` and local inputs); empty when there is
    /// nothing to check with and verification is not required.
    pub fn check_local(&self, path: &Path) -> Result<Vec<Check>> {
        let name = file_name(path)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut found = Vec::new();
        for companion in verify::companions(&name) {
            let beside = dir.join(&companion.name);
            let content = match fs::read(&beside) {
                Ok(bytes) => Some(bytes),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    return Err(e).with_context(|| format!("{}: cannot read", beside.display()));
                }
            };
            found.push((companion, content));
        }
        let any = found.iter().any(|(_, c)| c.is_some());
        if !any && self.opts.verify != VerifyMode::Always {
            return Ok(Vec::new());
        }
        let trust = Trust {
            keyring: self.keyring()?,
            pins: &self.opts.pins,
            verbosity: self.opts.verbosity,
        };
        let mut checks = verify::check_file(path, &name, &found, &trust);
        if !any {
            checks.push(Check {
                what: "companions".into(),
                outcome: Err(format!(
                    "none found beside {} (looked for {})",
                    path.display(),
                    found
                        .iter()
                        .map(|(c, _)| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
                anchor: false,
            });
        }
        Ok(checks)
    }
}

/// The text of a clearsigned document without checking its signature (`--no-verify` only).
fn cleartext_payload(text: &str) -> Option<String> {
    use ::pgp::composed::CleartextSignedMessage;
    CleartextSignedMessage::from_string(text)
        .ok()
        .map(|(msg, _)| msg.signed_text())
}

fn check_companions_present(name: &str, found: &[(Companion, Option<Vec<u8>>)]) -> Result<()> {
    for (companion, content) in found {
        if companion.required && content.is_none() {
            bail!(
                "{name}: missing companion file {} on the mirror: cannot verify it",
                companion.name
            );
        }
    }
    Ok(())
}

/// SHA-256 over the companions a file was verified with.
fn companions_digest(found: &[(Companion, Option<Vec<u8>>)]) -> String {
    let mut h = Sha256::new();
    for (companion, content) in found {
        h.update(companion.name.as_bytes());
        h.update([0]);
        if let Some(c) = content {
            h.update((c.len() as u64).to_le_bytes());
            h.update(c);
        }
    }
    hex::encode(h.finalize())
}

fn record_path(dest: &Path) -> PathBuf {
    let mut s = dest.as_os_str().to_os_string();
    s.push(".verified");
    PathBuf::from(s)
}

fn warn_unverified(what: &str, why: &str) {
    eprintln!("WARNING: {what} is NOT verified ({why}): its origin and integrity are unknown");
}

/// How new a verified `latest-stage3-VARIANT.txt` is: its `# ts=` line, and the timestamp of
/// the stage it names.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    ts: Option<u64>,
    stage: String,
}

impl Seen {
    fn parse(text: &str) -> Option<Seen> {
        let mut ts = None;
        let mut stage = None;
        for line in text.lines() {
            match line.split_once('=') {
                Some(("ts", v)) => ts = Some(v.parse().ok()?),
                Some(("stage", v)) => stage = Some(v.to_string()),
                _ => return None,
            }
        }
        Some(Seen { ts, stage: stage? })
    }

    fn text(&self) -> String {
        let ts = self.ts.map(|t| format!("ts={t}\n")).unwrap_or_default();
        format!("{ts}stage={}\n", self.stage)
    }

    /// Older than `other`: by `# ts=` when both have one (a list made later may name an
    /// older stage when a broken one was withdrawn), else by the stage's timestamp.
    fn is_older_than(&self, other: &Seen) -> bool {
        match (self.ts, other.ts) {
            (Some(a), Some(b)) => a < b,
            _ => self.stage < other.stage,
        }
    }

    /// Refuse this list if it is older than the one recorded in `record` (the newest seen
    /// from this mirror), else record it.
    fn check_and_record(&self, record: &Path, latest_name: &str, variant: &str) -> Result<()> {
        let before = match fs::read_to_string(record) {
            Ok(text) => Some(Seen::parse(&text).with_context(|| {
                format!(
                    "{}: not a record of a {latest_name} (delete it to start over)",
                    record.display()
                )
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(e).with_context(|| format!("{}: cannot read", record.display()));
            }
        };
        if let Some(before) = &before {
            if self.is_older_than(before) {
                bail!(
                    "{latest_name}: older than the one this mirror gave before ({} < {}, \
                     recorded in {}): a stale mirror or a replayed old file, refused. Try again \
                     later or another --mirror; to use an older stage on purpose, name it: \
                     stage3:{variant}@{}",
                    self.describe(),
                    before.describe(),
                    record.display(),
                    self.stage
                );
            }
            if before == self {
                return Ok(());
            }
        }
        if let Some(dir) = record.parent() {
            fs::create_dir_all(dir)
                .with_context(|| format!("cannot create the directory {}", dir.display()))?;
        }
        fetch::write_atomic(record, self.text().as_bytes())
    }

    fn describe(&self) -> String {
        match self.ts {
            Some(ts) => format!("ts={ts}, stage {}", self.stage),
            None => format!("stage {}", self.stage),
        }
    }
}

fn is_not_found(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<FetchError>(),
        Some(FetchError::NotFound { .. })
    )
}

fn missing_or(e: anyhow::Error, name: &str, what: &str) -> anyhow::Error {
    if is_not_found(&e) {
        anyhow::anyhow!("{name}: not on the mirror ({what}): {e}")
    } else {
        e
    }
}

fn file_name(path: &Path) -> Result<String> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .with_context(|| format!("{}: not a file name", path.display()))
}

/// `DIR_URL` and `NAME` of a URL to a file.
fn split_url(url: &str) -> Result<(String, String)> {
    let path_start = url.find("://").map(|i| i + 3).unwrap_or(0);
    let no_query = url.split(['?', '#']).next().unwrap_or(url);
    match no_query.rsplit_once('/') {
        Some((dir, name)) if dir.len() >= path_start && !name.is_empty() => {
            Ok((dir.to_string(), name.to_string()))
        }
        _ => bail!("{}: the URL names no file", redact(url)),
    }
}

/// The cache path for a URL: `HOST[_PORT]/PATH`, with nothing that could leave the cache and
/// no credentials.
fn cache_path(url: &str) -> Result<PathBuf> {
    let rest = url
        .split_once("://")
        .map(|(_, r)| r)
        .with_context(|| format!("{}: not a URL", redact(url)))?;
    let rest = rest.split(['?', '#']).next().unwrap_or(rest);
    let mut out = PathBuf::new();
    for (i, part) in rest.split('/').enumerate() {
        if part.is_empty() || part == "." {
            continue;
        }
        if part == ".." || part.contains('\0') {
            bail!("{}: refusing a URL with `..` in its path", redact(url));
        }
        out.push(if i == 0 {
            let host = part.rsplit_once('@').map_or(part, |(_, host)| host);
            host.replace(':', "_")
        } else {
            part.to_string()
        });
    }
    if out.components().count() < 2 {
        bail!("{}: the URL names no file", redact(url));
    }
    Ok(out)
}

/// A tag from a stage file name: its release timestamp (`20260214T170533Z`) when it has
/// one, otherwise the name without its tarball extensions.
pub fn tag_from_stage(stage: &Path) -> String {
    let name = stage
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let bytes = name.as_bytes();
    for i in 0..bytes.len() {
        let rest = &bytes[i..];
        if rest.len() >= 16
            && rest[..8].iter().all(u8::is_ascii_digit)
            && rest[8] == b'T'
            && rest[9..15].iter().all(u8::is_ascii_digit)
            && rest[15] == b'Z'
        {
            return name[i..i + 16].to_string();
        }
    }
    let mut stem = name.as_str();
    for ext in [
        ".xz", ".bz2", ".gz", ".zst", ".tar", ".tgz", ".tbz2", ".txz",
    ] {
        stem = stem.strip_suffix(ext).unwrap_or(stem);
    }
    let tag: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(128)
        .collect();
    let tag = tag.trim_start_matches(['.', '-']).to_string();
    if tag.is_empty() {
        "latest".to_string()
    } else {
        tag
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_come_from_stage_names() {
        let t = |n: &str| tag_from_stage(Path::new(n));
        assert_eq!(
            t("stage3-amd64-musl-openrc-20260214T170533Z.tar.xz"),
            "20260214T170533Z"
        );
        assert_eq!(
            t("/x/stage3-amd64-musl-20200101T000000Z.tar.bz2"),
            "20200101T000000Z"
        );
        assert_eq!(t("my stage.tar.zst"), "my_stage");
        assert_eq!(t(".tar"), "latest");
    }

    #[test]
    fn sources_parse() {
        let table: &[(&str, Source)] = &[
            (
                "stage3:amd64-musl-openrc",
                Source::Stage3 {
                    variant: "amd64-musl-openrc".into(),
                    timestamp: None,
                },
            ),
            (
                "stage3:arm64-musl-hardened-systemd@20260214T170533Z",
                Source::Stage3 {
                    variant: "arm64-musl-hardened-systemd".into(),
                    timestamp: Some("20260214T170533Z".into()),
                },
            ),
            (
                "snapshot:latest",
                Source::Snapshot {
                    date: None,
                    squashfs: false,
                },
            ),
            (
                "snapshot:20261127",
                Source::Snapshot {
                    date: Some("20261127".into()),
                    squashfs: false,
                },
            ),
            (
                "snapshot:sqfs:latest",
                Source::Snapshot {
                    date: None,
                    squashfs: true,
                },
            ),
            (
                "https://example.org/x/stage3-amd64-openrc-20260101T000000Z.tar.xz",
                Source::Url(
                    "https://example.org/x/stage3-amd64-openrc-20260101T000000Z.tar.xz".into(),
                ),
            ),
            ("stage3.tar.xz", Source::Path("stage3.tar.xz".into())),
            ("./snap", Source::Path("./snap".into())),
        ];
        for (spec, want) in table {
            assert_eq!(&Source::parse(spec).unwrap(), want, "{spec}");
        }
        for bad in [
            "stage3:",
            "stage3:vax-openrc",
            "stage3:amd64-musl@yesterday",
            "snapshot:tomorrow",
            "snapshot:sqfs:2026",
            "stage3:amd64/../x",
        ] {
            assert!(Source::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn cache_paths_stay_in_the_cache() {
        assert_eq!(
            cache_path("https://distfiles.gentoo.org/snapshots/gentoo-latest.tar.xz").unwrap(),
            Path::new("distfiles.gentoo.org/snapshots/gentoo-latest.tar.xz")
        );
        assert_eq!(
            cache_path("http://127.0.0.1:8080/a//b/c.txt?x=1").unwrap(),
            Path::new("127.0.0.1_8080/a/b/c.txt")
        );
        assert!(cache_path("http://h/a/../../etc/passwd").is_err());
        assert!(cache_path("http://h").is_err());
        assert_eq!(
            split_url("http://h/a/b.tar.xz").unwrap(),
            ("http://h/a".to_string(), "b.tar.xz".to_string())
        );
        assert!(split_url("http://h/").is_err());
    }

    #[test]
    fn cache_paths_and_errors_have_no_credentials() {
        assert_eq!(
            cache_path("http://user:s3cret@127.0.0.1:8080/a/b.txt").unwrap(),
            Path::new("127.0.0.1_8080/a/b.txt")
        );
        for bad in ["http://u:s3cret@h/../x", "http://u:s3cret@h/"] {
            let err = format!("{:#}", cache_path(bad).unwrap_err());
            assert!(!err.contains("s3cret"), "{err}");
        }
        let err = format!("{:#}", split_url("http://u:s3cret@h/").unwrap_err());
        assert!(
            !err.contains("s3cret") && err.contains("http://***@h/"),
            "{err}"
        );
    }

    #[test]
    fn latest_lists_are_ordered_by_ts_then_by_stage() {
        let seen = |ts: Option<u64>, stage: &str| Seen {
            ts,
            stage: stage.to_string(),
        };
        let before = seen(Some(200), "20260101T000000Z");
        assert!(seen(Some(199), "20260201T000000Z").is_older_than(&before));
        // A newer list naming an older stage (a broken one withdrawn) is not a rollback.
        assert!(!seen(Some(201), "20251201T000000Z").is_older_than(&before));
        assert!(!before.is_older_than(&before));
        assert!(seen(None, "20251231T235959Z").is_older_than(&before));
        assert!(!seen(None, "20260101T000000Z").is_older_than(&before));
        for s in [before.clone(), seen(None, "20171208")] {
            assert_eq!(Seen::parse(&s.text()), Some(s));
        }
        assert_eq!(Seen::parse("ts=1\n"), None);
        assert_eq!(Seen::parse("<html>\n"), None);

        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join("m/latest-stage3-x.txt.seen");
        before.check_and_record(&record, "latest.txt", "x").unwrap();
        let newer = seen(Some(300), "20260301T000000Z");
        newer.check_and_record(&record, "latest.txt", "x").unwrap();
        let err = before
            .check_and_record(&record, "latest.txt", "x")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("latest.txt: older") && err.contains("stage3:x@20260101T000000Z"),
            "{err}"
        );
        assert_eq!(
            Seen::parse(&fs::read_to_string(&record).unwrap()),
            Some(newer)
        );
    }

    #[test]
    fn companions_follow_the_file_kind() {
        let names = |n: &str| -> Vec<(String, bool)> {
            verify::companions(n)
                .into_iter()
                .map(|c| (c.name, c.required))
                .collect()
        };
        let stage = "stage3-amd64-musl-openrc-20260214T170533Z.tar.xz";
        assert_eq!(
            names(stage),
            vec![
                (format!("{stage}.asc"), false),
                (format!("{stage}.DIGESTS"), true),
                (format!("{stage}.DIGESTS.asc"), false),
                (format!("{stage}.sha256"), false)
            ]
        );
        assert_eq!(
            names("gentoo-latest.tar.xz"),
            vec![
                ("gentoo-latest.tar.xz.gpgsig".to_string(), true),
                ("gentoo-latest.tar.xz.md5sum".to_string(), false)
            ]
        );
        assert_eq!(
            names("gentoo-20261127.xz.sqfs"),
            vec![("sha512sum.txt".to_string(), true)]
        );
    }
}
