//! Shared helpers for the integration tests (`mod common;` in each `tests/*.rs`).
//!
//! Fixtures are built by scripts under `tests/fixtures/` and cached outside the
//! work tree (see each script's header); the helpers here run a script once per
//! test process and hand back the paths it produced.
#![allow(dead_code)] // not every test file uses every helper

pub mod engine;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// `tests/fixtures` in the source tree.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

/// Runs a fixture build script with bash and returns the single path it prints on
/// stdout. Panics with the script's stderr if it fails.
pub fn run_fixture_script(script: &Path) -> PathBuf {
    let out = Command::new("bash")
        .arg(script)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        panic!(
            "fixture script {} failed ({}):\n{stderr}",
            script.display(),
            out.status
        );
    }
    let stdout = String::from_utf8(out.stdout)
        .unwrap_or_else(|e| panic!("{} printed a non-UTF-8 path: {e}", script.display()));
    let mut lines = stdout.lines().filter(|l| !l.trim().is_empty());
    let (Some(dir), None) = (lines.next(), lines.next()) else {
        panic!(
            "fixture script {} must print exactly one path, printed {stdout:?}\nstderr:\n{stderr}",
            script.display()
        );
    };
    let dir = PathBuf::from(dir.trim());
    assert!(
        dir.is_absolute() && dir.is_dir(),
        "fixture script {} printed {}, which is not an absolute directory",
        script.display(),
        dir.display()
    );
    dir
}

/// The stand-in Gentoo stage3 built by `tests/fixtures/stage/build-stage.sh`:
/// a Debian rootfs with Portage (from PyPI) in a venv plus hand-made fidelity
/// entries under `./opt/fidelity/`, packed as a tar and four compressed copies.
#[derive(Debug, Clone)]
pub struct Stage {
    pub dir: PathBuf,
}

impl Stage {
    /// Uncompressed `stage.tar` (pax format, with xattrs, numeric owners).
    pub fn tar(&self) -> PathBuf {
        self.dir.join("stage.tar")
    }
    /// `stage.tar.xz`, multi-block (compressed with `xz -T0 --block-size=...`).
    pub fn xz(&self) -> PathBuf {
        self.dir.join("stage.tar.xz")
    }
    pub fn bz2(&self) -> PathBuf {
        self.dir.join("stage.tar.bz2")
    }
    pub fn gz(&self) -> PathBuf {
        self.dir.join("stage.tar.gz")
    }
    pub fn zst(&self) -> PathBuf {
        self.dir.join("stage.tar.zst")
    }
    /// All five archives: `[tar, xz, bz2, gz, zst]`.
    pub fn archives(&self) -> [PathBuf; 5] {
        [self.tar(), self.xz(), self.bz2(), self.gz(), self.zst()]
    }
    pub fn fidelity_list(&self) -> PathBuf {
        self.dir.join("fidelity.list")
    }
    /// Raw bytes of each fidelity path exactly as stored in the archive
    /// (`./opt/fidelity/...`, directories with a trailing `/`), decoded from
    /// `fidelity.list`.
    pub fn fidelity_paths(&self) -> Vec<Vec<u8>> {
        let list = self.fidelity_list();
        let text =
            std::fs::read(&list).unwrap_or_else(|e| panic!("cannot read {}: {e}", list.display()));
        parse_fidelity_list(&text).unwrap_or_else(|e| panic!("malformed {}: {e}", list.display()))
    }
}

/// The stand-in stage3, built (or found in the cache) once per test process.
pub fn stage() -> Stage {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR
        .get_or_init(|| run_fixture_script(&fixtures_dir().join("stage").join("build-stage.sh")));
    Stage { dir: dir.clone() }
}

/// Decodes `fidelity.list`: one path per line; `#` lines and empty lines are
/// skipped; `\xNN` (two hex digits) stands for the byte 0xNN; any other byte
/// stands for itself; a `\` not starting `\xNN` is an error.
pub fn parse_fidelity_list(text: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut paths = Vec::new();
    for (no, line) in text.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() || line[0] == b'#' {
            continue;
        }
        let mut path = Vec::with_capacity(line.len());
        let mut i = 0;
        while i < line.len() {
            if line[i] == b'\\' {
                let hex = line
                    .get(i + 1..i + 4)
                    .filter(|h| h[0] == b'x' && h[1..].iter().all(u8::is_ascii_hexdigit))
                    .and_then(|h| std::str::from_utf8(&h[1..]).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("line {}: bad escape", no + 1))?;
                path.push(hex);
                i += 4;
            } else {
                path.push(line[i]);
                i += 1;
            }
        }
        paths.push(path);
    }
    Ok(paths)
}
