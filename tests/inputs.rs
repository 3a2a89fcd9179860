//! Trusted inputs end to end: a Gentoo-shaped mirror served from 127.0.0.1 by the test,
//! holding the stand-in stage and the test repository as a snapshot, with companion files
//! signed by GnuPG keys made here and pinned with `--trusted-key`. GnuPG only makes the
//! fixtures: the tool verifies in-process.

mod common;
mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use support::mirror::Mirror;

const TS: &str = "20260101T000000Z";
const VARIANT: &str = "amd64-musl-openrc";

fn stage_name() -> String {
    format!("stage3-{VARIANT}-{TS}.tar.xz")
}

/// A GnuPG home with keys made for the test.
struct Gpg {
    home: PathBuf,
}

impl Gpg {
    fn new(home: PathBuf) -> Gpg {
        fs::create_dir_all(&home).unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&home, fs::Permissions::from_mode(0o700)).unwrap();
        Gpg { home }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("gpg");
        c.arg("--homedir")
            .arg(&self.home)
            .args(["--batch", "--yes", "--pinentry-mode", "loopback"])
            .args(["--passphrase", ""])
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = self.cmd().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "gpg {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// A new signing key; returns its fingerprint.
    fn key(&self, uid: &str, faked_time: Option<&str>) -> String {
        let mut args = vec![];
        if let Some(t) = faked_time {
            args.extend(["--faked-system-time", t]);
        }
        args.extend(["--quick-gen-key", uid, "ed25519", "sign", "never"]);
        self.run(&args);
        let out = self.run(&["--with-colons", "--list-keys", uid]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.strip_prefix("fpr:"))
            .map(|l| l.trim_matches(':').to_string())
            .unwrap()
    }

    fn export(&self, fprs: &[&str], out: &Path) {
        let mut args = vec!["--armor", "--export"];
        args.extend(fprs);
        let exported = self.run(&args);
        fs::write(out, exported.stdout).unwrap();
    }

    fn detach_sign(&self, fpr: &str, file: &Path, out: &Path, faked_time: Option<&str>) {
        let mut args = vec![];
        if let Some(t) = faked_time {
            args.extend(["--faked-system-time", t]);
        }
        args.extend(["--local-user", fpr, "--armor", "--detach-sign", "--output"]);
        let (o, f) = (out.to_str().unwrap(), file.to_str().unwrap());
        args.extend([o, f]);
        self.run(&args);
    }

    fn clearsign(&self, fpr: &str, text: &str, out: &Path) {
        let plain = out.with_extension("plain");
        fs::write(&plain, text).unwrap();
        let (o, p) = (out.to_str().unwrap(), plain.to_str().unwrap());
        self.run(&["--local-user", fpr, "--clearsign", "--output", o, p]);
        fs::remove_file(plain).unwrap();
    }
}

impl Drop for Gpg {
    fn drop(&mut self) {
        let _ = Command::new("gpgconf")
            .arg("--homedir")
            .arg(&self.home)
            .args(["--kill", "gpg-agent"])
            .status();
    }
}

fn hash(tool: &str, file: &Path) -> String {
    let out = Command::new(tool).arg(file).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// The mirror's tree and the keys that signed it.
struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    gpg: Gpg,
    releng: String,
    intruder: String,
    expired: String,
    /// All public keys (pinned and not): what `--keyring` gets.
    keyring: PathBuf,
    work: PathBuf,
}

impl Fixture {
    fn autobuilds(&self) -> PathBuf {
        self.root.join("releases/amd64/autobuilds")
    }

    fn stage(&self) -> PathBuf {
        self.autobuilds().join(TS).join(stage_name())
    }

    fn snapshot(&self) -> PathBuf {
        self.root.join("snapshots/gentoo-latest.tar.xz")
    }

    /// Write the DIGESTS file (2022+ layout: BLAKE2B then SHA512, tarball then CONTENTS.gz)
    /// with `sha512` for the tarball, clearsigned by `fpr`.
    fn write_digests(&self, fpr: &str, sha512: &str) {
        let stage = self.stage();
        let name = stage_name();
        let text = format!(
            "# BLAKE2B HASH\n{}  {name}\n{}  {name}.CONTENTS.gz\n\
             # SHA512 HASH\n{sha512}  {name}\n{}  {name}.CONTENTS.gz\n",
            hash("b2sum", &stage),
            "0".repeat(128),
            "0".repeat(128),
        );
        self.gpg.clearsign(
            fpr,
            &text,
            &self.autobuilds().join(TS).join(format!("{name}.DIGESTS")),
        );
    }

    fn write_latest(&self, fpr: &str, size: u64) -> PathBuf {
        self.write_latest_at(fpr, size, 1_767_225_600)
    }

    /// The latest file, made at `ts` (its `# ts=` line).
    fn write_latest_at(&self, fpr: &str, size: u64, ts: u64) -> PathBuf {
        let latest = self
            .autobuilds()
            .join(format!("latest-stage3-{VARIANT}.txt"));
        let text = format!(
            "# Latest as of Thu, 01 Jan 2026 00:00:00 +0000\n# ts={ts}\n{TS}/{} {size}\n",
            stage_name()
        );
        self.gpg.clearsign(fpr, &text, &latest);
        latest
    }

    /// Sign the stage with `fpr` (its .asc).
    fn sign_stage(&self, fpr: &str, faked_time: Option<&str>) {
        let stage = self.stage();
        let asc = PathBuf::from(format!("{}.asc", stage.display()));
        self.gpg.detach_sign(fpr, &stage, &asc, faked_time);
    }

    fn mkimg(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gentoo-mkimg"));
        cmd.arg("--work-dir")
            .arg(&self.work)
            .arg("--store")
            .arg(self.work.join("images"))
            .arg("--cache-dir")
            .arg(self.work.join("cache"))
            .env_remove("SOURCE_DATE_EPOCH")
            .stdin(Stdio::null());
        cmd
    }

    fn input_args(&self, mirror: &Mirror) -> Vec<String> {
        self.input_args_from(&mirror.url())
    }

    fn input_args_from(&self, mirror_url: &str) -> Vec<String> {
        vec![
            "--mirror".into(),
            mirror_url.to_string(),
            "--keyring".into(),
            self.keyring.display().to_string(),
            "--trusted-key".into(),
            self.releng.clone(),
            "--trusted-key".into(),
            self.expired.clone(),
        ]
    }

    fn fetch(&self, mirror: &Mirror, sources: &[&str]) -> Output {
        self.fetch_from(&mirror.url(), sources)
    }

    /// `fetch` with `--mirror URL`.
    fn fetch_from(&self, url: &str, sources: &[&str]) -> Output {
        let mut args = self.input_args_from(url);
        args.extend(sources.iter().map(|s| s.to_string()));
        self.mkimg().arg("fetch").args(args).output().unwrap()
    }

    /// Files with `.tar.xz` in their name anywhere under the verified downloads (complete
    /// or partial).
    fn cached_artifacts(&self) -> Vec<PathBuf> {
        files_under(&self.work.join("cache/downloads"))
            .into_iter()
            .filter(|p| {
                let n = p.file_name().unwrap().to_string_lossy();
                n.ends_with(".tar.xz") || n.ends_with(".tar.xz.part")
            })
            .collect()
    }
}

/// Every file and directory under `dir`.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

/// A mirror tree with a good stage (signed, DIGESTS, .sha256, latest file) and a good
/// snapshot (.gpgsig, .md5sum).
fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("mirror");
    let work = tmp.path().join("work");
    fs::create_dir_all(&work).unwrap();
    let gpg = Gpg::new(tmp.path().join("gnupg"));
    let releng = gpg.key("Test Releng <releng@test.invalid>", None);
    let intruder = gpg.key("Intruder <intruder@test.invalid>", None);
    // Made on 2020-01-01 without expiry, used on 2020-01-05, then given an expiry of one day:
    // its signature postdates its expiry.
    let expired = gpg.key("Old Key <old@test.invalid>", Some("20200101T000000"));
    let keyring = tmp.path().join("keys.asc");
    let fx = Fixture {
        _tmp: tmp,
        root,
        gpg,
        releng: releng.clone(),
        intruder: intruder.clone(),
        expired: expired.clone(),
        keyring,
        work,
    };
    let dir = fx.autobuilds().join(TS);
    fs::create_dir_all(&dir).unwrap();
    fs::copy(common::stage().xz(), fx.stage()).unwrap();
    let size = fs::metadata(fx.stage()).unwrap().len();
    fx.sign_stage(&releng, None);
    fx.write_digests(&releng, &hash("sha512sum", &fx.stage()));
    fx.gpg.clearsign(
        &releng,
        &format!(
            "# SHA256 HASH\n{}  {}\n",
            hash("sha256sum", &fx.stage()),
            stage_name()
        ),
        &dir.join(format!("{}.sha256", stage_name())),
    );
    fx.write_latest(&releng, size);

    // The snapshot: the test repository under gentoo-20260101/.
    let snapshots = fx.root.join("snapshots");
    fs::create_dir_all(&snapshots).unwrap();
    common::snapshot_tarball(&fx.snapshot(), "gentoo-20260101");
    let snap = fx.snapshot();
    fx.gpg.detach_sign(
        &releng,
        &snap,
        &snapshots.join("gentoo-latest.tar.xz.gpgsig"),
        None,
    );
    fs::write(
        snapshots.join("gentoo-latest.tar.xz.md5sum"),
        format!("{}  gentoo-latest.tar.xz\n", hash("md5sum", &snap)),
    )
    .unwrap();
    fx.gpg.export(&[&releng, &intruder, &expired], &fx.keyring);
    fx
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_fails(out: &Output, needles: &[&str], case: &str) {
    let err = stderr(out);
    assert!(!out.status.success(), "{case}: succeeded: {err}");
    for n in needles {
        assert!(err.contains(n), "{case}: {n:?} not in the error: {err}");
    }
}

/// GETs of `suffix` that transferred a body (status 200 or 206).
fn downloads(mirror: &Mirror, suffix: &str) -> usize {
    mirror
        .requests()
        .iter()
        .filter(|r| {
            r.method == "GET" && r.path.ends_with(suffix) && (r.status == 200 || r.status == 206)
        })
        .count()
}

#[test]
fn fetch_resolves_downloads_and_verifies_then_reuses_the_cache() {
    let fx = fixture();
    let mirror = Mirror::start(&fx.root);
    let out = fx.fetch(
        &mirror,
        &["stage3:amd64-musl-openrc", "snapshot:latest", "-v"],
    );
    assert!(out.status.success(), "fetch failed: {}", stderr(&out));
    let printed = String::from_utf8_lossy(&out.stdout);
    let paths: Vec<&str> = printed.lines().collect();
    assert_eq!(paths.len(), 2, "{printed}");
    assert!(paths[0].ends_with(&stage_name()), "{printed}");
    assert_eq!(fs::read(paths[0]).unwrap(), fs::read(fx.stage()).unwrap());
    assert_eq!(
        fs::read(paths[1]).unwrap(),
        fs::read(fx.snapshot()).unwrap()
    );
    let err = stderr(&out);
    for check in [".asc", "BLAKE2B", "SHA512", "SHA256", ".gpgsig", "MD5"] {
        assert!(
            err.lines().any(|l| l.contains("ok") && l.contains(check)),
            "no passed {check} check reported: {err}"
        );
    }
    assert_eq!(downloads(&mirror, &stage_name()), 1);
    assert_eq!(downloads(&mirror, "gentoo-latest.tar.xz"), 1);

    // Again: the index and companions are revalidated (304), nothing is downloaded.
    mirror.clear_log();
    let out = fx.fetch(&mirror, &["stage3:amd64-musl-openrc", "snapshot:latest"]);
    assert!(
        out.status.success(),
        "second fetch failed: {}",
        stderr(&out)
    );
    let log = mirror.requests();
    assert!(!log.is_empty(), "the latest file was not revalidated");
    let transferred: Vec<_> = log
        .iter()
        .filter(|r| r.status == 200 || r.status == 206)
        .collect();
    assert!(transferred.is_empty(), "downloaded again: {transferred:?}");

    // A new snapshot under the same moving name (new signature): fetched again.
    fs::write(fx.snapshot(), b"not even a tarball").unwrap();
    fx.gpg.detach_sign(
        &fx.releng,
        &fx.snapshot(),
        &fx.root.join("snapshots/gentoo-latest.tar.xz.gpgsig"),
        None,
    );
    fs::remove_file(fx.root.join("snapshots/gentoo-latest.tar.xz.md5sum")).unwrap();
    mirror.clear_log();
    let out = fx.fetch(&mirror, &["snapshot:latest"]);
    assert!(out.status.success(), "refetch failed: {}", stderr(&out));
    assert_eq!(downloads(&mirror, "gentoo-latest.tar.xz"), 1);
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(fs::read(printed.trim()).unwrap(), b"not even a tarball");
}

/// Each broken input fails with the file and the check named, and nothing is kept as
/// verified.
#[test]
fn tampered_or_untrusted_inputs_are_refused() {
    type Breaker = fn(&Fixture);
    let cases: &[(&str, Breaker, &[&str])] = &[
        (
            "tampered stage byte",
            |fx| {
                let mut data = fs::read(fx.stage()).unwrap();
                let mid = data.len() / 2;
                data[mid] ^= 0x01;
                fs::write(fx.stage(), data).unwrap();
            },
            &[".tar.xz", "signature (", ".asc) failed"],
        ),
        (
            "DIGESTS with a wrong hash",
            |fx| fx.write_digests(&fx.releng, &"ab".repeat(64)),
            &[".tar.xz", "SHA512 (", ".DIGESTS) failed", "mismatch"],
        ),
        (
            "signature by an unpinned key",
            |fx| fx.sign_stage(&fx.intruder, None),
            &[".asc) failed", "not one of the trusted keys"],
        ),
        (
            "bad signature",
            |fx| {
                // A good signature, but over other data.
                let other = fx.work.join("other");
                fs::write(&other, b"other data").unwrap();
                let asc = PathBuf::from(format!("{}.asc", fx.stage().display()));
                fx.gpg.detach_sign(&fx.releng, &other, &asc, None);
            },
            &[".asc) failed", "does not match"],
        ),
        (
            "expired key",
            |fx| {
                fx.sign_stage(&fx.expired, Some("20200105T000000"));
                fx.gpg.run(&[
                    "--faked-system-time",
                    "20200101T000010",
                    "--quick-set-expire",
                    &fx.expired,
                    "1d",
                ]);
                fx.gpg
                    .export(&[&fx.releng, &fx.intruder, &fx.expired], &fx.keyring);
            },
            &[".asc) failed", "expired"],
        ),
        (
            "altered latest file",
            |fx| {
                let latest = fx.write_latest(&fx.releng, 1);
                let text = fs::read_to_string(&latest).unwrap();
                let changed = text.replace(&format!("{TS}/"), &format!("{TS}/../{TS}/"));
                assert_ne!(text, changed);
                fs::write(latest, changed).unwrap();
            },
            &["latest-stage3-amd64-musl-openrc.txt", "signature"],
        ),
        (
            "missing companion",
            |fx| {
                fs::remove_file(format!("{}.DIGESTS", fx.stage().display())).unwrap();
            },
            &[".DIGESTS", "missing companion"],
        ),
    ];
    for (case, breaker, needles) in cases {
        let fx = fixture();
        breaker(&fx);
        let mirror = Mirror::start(&fx.root);
        let out = fx.fetch(&mirror, &["stage3:amd64-musl-openrc"]);
        eprintln!("{case}: {}", stderr(&out).trim());
        assert_fails(&out, needles, case);
        assert_eq!(
            fx.cached_artifacts(),
            Vec::<PathBuf>::new(),
            "{case}: something was kept"
        );
    }
}

/// A failing input stops `build` before anything is built: no image, no packages dir.
#[test]
fn build_builds_nothing_from_an_unverified_stage() {
    let fx = fixture();
    let mut data = fs::read(fx.stage()).unwrap();
    let last = data.len() - 100;
    data[last] ^= 0x80;
    fs::write(fx.stage(), data).unwrap();
    let mirror = Mirror::start(&fx.root);
    let out = fx
        .mkimg()
        .arg("build")
        .args(fx.input_args(&mirror))
        .output()
        .unwrap();
    assert_fails(&out, &[&stage_name(), "failed"], "build");
    assert!(
        !fx.work.join("images/index.json").exists(),
        "an image was written"
    );
    assert!(!fx.work.join("packages").exists(), "a build started");
}

/// A download cut off halfway resumes with a Range request on the next run.
#[test]
fn an_interrupted_download_resumes_on_the_next_run() {
    let fx = fixture();
    let mirror = Mirror::start(&fx.root);
    let path = format!("/releases/amd64/autobuilds/{TS}/{}", stage_name());
    let size = fs::metadata(fx.stage()).unwrap().len();
    let half = size / 2;
    mirror.stall_after(&path, half, std::time::Duration::from_secs(20));
    let mut child = fx
        .mkimg()
        .arg("fetch")
        .arg("stage3:amd64-musl-openrc")
        .args(fx.input_args(&mirror))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the transfer stalls halfway with data on disk, then cut the run off.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut last = (0u64, std::time::Instant::now());
    let part = loop {
        let part = fx
            .cached_artifacts()
            .into_iter()
            .find(|p| p.to_string_lossy().ends_with(".part"));
        if let Some(p) = part {
            let len = fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            if len != last.0 {
                last = (len, std::time::Instant::now());
            } else if len > 0 && last.1.elapsed() > std::time::Duration::from_secs(1) {
                break p;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no half-done download"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    nix_kill(child.id());
    let _ = child.wait();
    let kept = fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    assert!(
        kept > 0 && kept <= half,
        "the partial download was not kept: {kept}"
    );
    mirror.clear_log();
    let out = fx.fetch(&mirror, &["stage3:amd64-musl-openrc"]);
    assert!(out.status.success(), "resume failed: {}", stderr(&out));
    let resumed = mirror.requests().into_iter().find(|r| {
        r.path == path && r.status == 206 && r.range.as_deref() == Some(&format!("bytes={kept}-"))
    });
    assert!(
        resumed.is_some(),
        "no Range request: {:?}",
        mirror.requests()
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        fs::read(printed.trim()).unwrap(),
        fs::read(fx.stage()).unwrap()
    );
}

fn nix_kill(pid: u32) {
    let status = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// `verify` on local files with their companions beside them reports every check.
#[test]
fn verify_reports_every_check_on_local_files() {
    let fx = fixture();
    let run = |files: &[PathBuf], trusted: &str| {
        Command::new(env!("CARGO_BIN_EXE_gentoo-mkimg"))
            .arg("verify")
            .args(files)
            .arg("--keyring")
            .arg(&fx.keyring)
            .args(["--trusted-key", trusted])
            .output()
            .unwrap()
    };
    let out = run(&[fx.stage(), fx.snapshot()], &fx.releng);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", stderr(&out));
    let oks = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("ok"))
        .count();
    // stage: .asc, .DIGESTS signature, BLAKE2B, SHA512, .sha256 signature, SHA256;
    // snapshot: .gpgsig, MD5.
    assert_eq!(oks, 8, "{stdout}");
    assert_eq!(stdout.matches("  verified").count(), 2, "{stdout}");
    // With another key pinned the same files are refused, per check.
    let out = run(&[fx.stage()], &fx.intruder);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("FAILED  signature"), "{stdout}");
    assert!(stdout.contains("NOT VERIFIED"), "{stdout}");
}

/// With no inputs named, `build` makes localhost/gentoo-musl-{raw,dev,rt}:<stage timestamp>
/// from the newest stage3:amd64-musl-openrc and snapshot:latest; a second run downloads
/// nothing.
#[test]
fn bare_build_uses_the_newest_musl_stage_and_the_latest_snapshot() {
    let fx = fixture();
    let mirror = Mirror::start(&fx.root);
    let build = || {
        fx.mkimg()
            .arg("build")
            .args(fx.input_args(&mirror))
            .arg("--rt-packages")
            .arg(common::RT_PACKAGES.join(" "))
            .output()
            .unwrap()
    };
    let out = build();
    assert!(out.status.success(), "build failed: {}", stderr(&out));
    let index = fs::read_to_string(fx.work.join("images/index.json")).unwrap();
    for kind in ["raw", "dev", "rt"] {
        let name = format!("localhost/gentoo-musl-{kind}:{TS}");
        assert!(index.contains(&name), "{name} not in the store: {index}");
    }
    assert_eq!(downloads(&mirror, &stage_name()), 1);
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains("inputs (fetch, verify)"),
        "the summary lacks the inputs phase: {summary}"
    );
    mirror.clear_log();
    let out = build();
    assert!(
        out.status.success(),
        "second build failed: {}",
        stderr(&out)
    );
    let transferred: Vec<_> = mirror
        .requests()
        .into_iter()
        .filter(|r| r.status == 200 || r.status == 206)
        .collect();
    assert!(transferred.is_empty(), "downloaded again: {transferred:?}");
}

/// Local files: verified when their companions sit beside them, required with `--verify`,
/// skipped (loudly) with `--no-verify`.
#[test]
fn local_files_are_verified_by_their_companions() {
    let fx = fixture();
    let mirror = Mirror::start(&fx.root);
    let stage = fx.stage().display().to_string();
    let out = fx.fetch(&mirror, &[&stage]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), stage);
    assert!(!stderr(&out).contains("WARNING"), "{}", stderr(&out));

    // The same bytes elsewhere, without companions: used as they are with a one-line
    // warning, refused with --verify.
    let lone = fx.work.join(stage_name());
    fs::copy(fx.stage(), &lone).unwrap();
    let lone = lone.display().to_string();
    let out = fx.fetch(&mirror, &[&lone]);
    assert!(out.status.success(), "{}", stderr(&out));
    let warnings: Vec<_> = stderr(&out)
        .lines()
        .filter(|l| l.starts_with("WARNING:"))
        .map(str::to_string)
        .collect();
    assert!(
        warnings.len() == 1
            && warnings[0].contains(&lone)
            && warnings[0].contains("NOT verified")
            && warnings[0].contains("no companion files"),
        "no warning about the unverified file: {}",
        stderr(&out)
    );
    let out = fx.fetch(&mirror, &[&lone, "--verify"]);
    assert_fails(
        &out,
        &[".DIGESTS failed: missing"],
        "--verify without companions",
    );

    // A tampered local stage with its companions: refused, unless --no-verify.
    let mut data = fs::read(fx.stage()).unwrap();
    data[1000] ^= 0x10;
    fs::write(fx.stage(), data).unwrap();
    let out = fx.fetch(&mirror, &[&stage]);
    assert_fails(
        &out,
        &[&stage_name(), ".asc) failed"],
        "tampered local stage",
    );
    let out = fx.fetch(&mirror, &[&stage, "--no-verify"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("NOT verified"), "{}", stderr(&out));
}

/// `snapshot:sqfs:latest`: gentoo-current.xz.sqfs, checked against the clearsigned
/// sha512sum.txt beside it.
#[test]
fn squashfs_snapshots_are_checked_against_the_signed_sha512sum() {
    let fx = fixture();
    let dir = fx.root.join("snapshots/squashfs");
    fs::create_dir_all(&dir).unwrap();
    let sqfs = dir.join("gentoo-current.xz.sqfs");
    common::snapshot_squashfs(&sqfs);
    let sums = |sha: &str| {
        format!(
            "{sha}  gentoo-20260101.xz.sqfs\n{sha}  gentoo-current.xz.sqfs\n{}  gentoo-20251231.xz.sqfs\n",
            "1".repeat(128)
        )
    };
    fx.gpg.clearsign(
        &fx.releng,
        &sums(&hash("sha512sum", &sqfs)),
        &dir.join("sha512sum.txt"),
    );
    let mirror = Mirror::start(&fx.root);
    let out = fx.fetch(&mirror, &["snapshot:sqfs:latest", "-v"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out)
            .lines()
            .any(|l| l.contains("ok") && l.contains("SHA512 (sha512sum.txt)")),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        fs::read(String::from_utf8_lossy(&out.stdout).trim()).unwrap(),
        fs::read(&sqfs).unwrap()
    );

    // A sha512sum.txt that lists another digest for it: refused, nothing kept.
    let fx2 = fixture();
    let dir2 = fx2.root.join("snapshots/squashfs");
    fs::create_dir_all(&dir2).unwrap();
    fs::copy(&sqfs, dir2.join("gentoo-current.xz.sqfs")).unwrap();
    fx2.gpg.clearsign(
        &fx2.releng,
        &sums(&"2".repeat(128)),
        &dir2.join("sha512sum.txt"),
    );
    let mirror2 = Mirror::start(&fx2.root);
    let out = fx2.fetch(&mirror2, &["snapshot:sqfs:latest"]);
    assert_fails(
        &out,
        &["gentoo-current.xz.sqfs", "SHA512 (sha512sum.txt) failed"],
        "wrong sha512",
    );
}

/// A stage from before 2022: no `.asc`, a DIGESTS that is not clearsigned but has a detached
/// `.DIGESTS.asc`, with MD5/SHA1/SHA512/WHIRLPOOL blocks and catalyst build paths.
#[test]
fn pre_2022_stages_verify_through_their_detached_digests_signature() {
    let fx = fixture();
    let dir = fx.work.join("old");
    fs::create_dir_all(&dir).unwrap();
    let name = "stage3-amd64-20180204.tar.bz2";
    let stage = dir.join(name);
    fs::copy(common::stage().bz2(), &stage).unwrap();
    let built = format!("/var/tmp/catalyst/builds/default/{name}");
    let digests = dir.join(format!("{name}.DIGESTS"));
    fs::write(
        &digests,
        format!(
            "# MD5 HASH\n{}  {built}\n# SHA1 HASH\n{}  {built}\n\
             # SHA512 HASH\n{}  {built}\n# WHIRLPOOL HASH\n{}  {built}\n",
            hash("md5sum", &stage),
            "a".repeat(40),
            hash("sha512sum", &stage),
            "b".repeat(128),
        ),
    )
    .unwrap();
    let asc = dir.join(format!("{name}.DIGESTS.asc"));
    fx.gpg.detach_sign(&fx.releng, &digests, &asc, None);
    let verify = || {
        Command::new(env!("CARGO_BIN_EXE_gentoo-mkimg"))
            .arg("verify")
            .arg(&stage)
            .arg("--keyring")
            .arg(&fx.keyring)
            .args(["--trusted-key", &fx.releng])
            .output()
            .unwrap()
    };
    let out = verify();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", stderr(&out));
    for check in [".DIGESTS.asc", "MD5", "SHA512"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.trim_start().starts_with("ok") && l.contains(check)),
            "no passed {check} check: {stdout}"
        );
    }
    // The WHIRLPOOL line is not checked, but it is signed: changing it breaks the signature.
    let text = fs::read_to_string(&digests).unwrap();
    fs::write(&digests, text.replace(&"b".repeat(128), &"c".repeat(128))).unwrap();
    let out = verify();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("FAILED  signature (stage3-amd64-20180204.tar.bz2.DIGESTS.asc)"),
        "{stdout}"
    );
}

/// A non-root user asking the sandbox engine for a build is told so before anything is
/// fetched.
#[test]
fn an_unusable_engine_is_refused_before_any_download() {
    use std::os::unix::fs::PermissionsExt;
    let fx = fixture();
    let mirror = Mirror::start(&fx.root);
    let home = tempfile::tempdir().unwrap();
    fs::set_permissions(home.path(), fs::Permissions::from_mode(0o777)).unwrap();
    fs::set_permissions(&fx.keyring, fs::Permissions::from_mode(0o644)).unwrap();
    let out = common::mkimg_as_nobody()
        .arg("--work-dir")
        .arg(home.path())
        .arg("--cache-dir")
        .arg(home.path().join("cache"))
        .args(["build", "--engine", "sandbox"])
        .args(fx.input_args(&mirror))
        .env("HOME", home.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_fails(
        &out,
        &["/etc/subuid", "--engine docker"],
        "non-root sandbox build",
    );
    assert_eq!(mirror.requests(), Vec::new(), "something was fetched");
}

/// A verified download changed on disk under the same path (its `.verified` record and the
/// mirror's companions unchanged) is not used: it is fetched and verified again.
#[test]
fn a_cached_download_changed_on_disk_is_fetched_and_verified_again() {
    let fx = fixture();
    let mirror = Mirror::start(&fx.root);
    let out = fx.fetch(&mirror, &["stage3:amd64-musl-openrc"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let cached = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let mut data = fs::read(&cached).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0x01;
    fs::write(&cached, &data).unwrap();

    mirror.clear_log();
    let out = fx.fetch(&mirror, &["stage3:amd64-musl-openrc"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        downloads(&mirror, &stage_name()),
        1,
        "the changed file was used as verified"
    );
    assert_eq!(
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        cached
    );
    assert_eq!(fs::read(&cached).unwrap(), fs::read(fx.stage()).unwrap());

    // Unchanged, it is used again without a download.
    mirror.clear_log();
    let out = fx.fetch(&mirror, &["stage3:amd64-musl-openrc"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(downloads(&mirror, &stage_name()), 0);
}

/// `--no-verify` downloads never land where verified ones are kept, so a later verified run
/// never takes one for verified.
#[test]
fn no_verify_downloads_are_kept_apart_from_verified_ones() {
    let fx = fixture();
    let good = fs::read(fx.stage()).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x01;
    fs::write(fx.stage(), &bad).unwrap();
    let mirror = Mirror::start(&fx.root);

    let out = fx.fetch(&mirror, &["stage3:amd64-musl-openrc", "--no-verify"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("NOT verified"), "{}", stderr(&out));
    let unverified = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert_eq!(fs::read(&unverified).unwrap(), bad);
    assert_eq!(
        fx.cached_artifacts(),
        Vec::<PathBuf>::new(),
        "an unverified download is among the verified ones"
    );
    let out = fx.fetch(&mirror, &["stage3:amd64-musl-openrc"]);
    assert_fails(&out, &[&stage_name(), "failed"], "tampered stage, verified");

    // The good stage back on the mirror: verified, and kept apart from the unverified copy.
    fs::write(fx.stage(), &good).unwrap();
    let out = fx.fetch(&mirror, &["stage3:amd64-musl-openrc"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let verified = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert_ne!(verified, unverified);
    assert_eq!(fs::read(&verified).unwrap(), good);
    assert_eq!(fs::read(&unverified).unwrap(), bad);
}

/// A signed `latest-*.txt` older than the one this mirror gave before is refused (a mirror
/// replaying an old list would pin an old stage); a newer one is accepted.
#[test]
fn an_older_latest_list_than_the_one_seen_is_refused() {
    let fx = fixture();
    let size = fs::metadata(fx.stage()).unwrap().len();
    let mirror = Mirror::start(&fx.root);
    let out = fx.fetch(&mirror, &["stage3:amd64-musl-openrc"]);
    assert!(out.status.success(), "{}", stderr(&out));

    fx.write_latest_at(&fx.releng, size, 1_767_225_600 - 3600);
    let out = fx.fetch(&mirror, &["stage3:amd64-musl-openrc"]);
    assert_fails(
        &out,
        &[
            "latest-stage3-amd64-musl-openrc.txt",
            "older than the one this mirror gave before",
            &format!("stage3:amd64-musl-openrc@{TS}"),
        ],
        "older latest list",
    );

    // The same list again, and a newer one: accepted.
    fx.write_latest_at(&fx.releng, size, 1_767_225_600);
    let out = fx.fetch(&mirror, &["stage3:amd64-musl-openrc"]);
    assert!(out.status.success(), "{}", stderr(&out));
    fx.write_latest_at(&fx.releng, size, 1_767_225_600 + 3600);
    let out = fx.fetch(&mirror, &["stage3:amd64-musl-openrc"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // What was seen last is now the bar.
    fx.write_latest_at(&fx.releng, size, 1_767_225_600);
    let out = fx.fetch(&mirror, &["stage3:amd64-musl-openrc"]);
    assert_fails(&out, &["older"], "list older than the newest seen");
}

/// Credentials in the mirror URL are sent to the mirror and appear in no output, no log
/// line, no error and no cache path or file.
#[test]
fn credentials_in_urls_are_used_but_never_shown_or_kept() {
    use base64::Engine as _;
    let fx = fixture();
    let mirror = Mirror::start(&fx.root);
    let secret = "s3cr3t-pw";
    let with_creds = format!("http://mkimg:{secret}@{}", mirror.addr());
    let outputs = [
        fx.fetch_from(
            &with_creds,
            &["stage3:amd64-musl-openrc", "snapshot:latest", "-vv"],
        ),
        // A list the mirror does not have: the error names its URL.
        fx.fetch_from(&with_creds, &["stage3:amd64-openrc"]),
        fx.fetch_from(
            &with_creds,
            &[
                &format!("{with_creds}/snapshots/gentoo-latest.tar.xz"),
                "--no-verify",
            ],
        ),
    ];
    assert!(outputs[0].status.success(), "{}", stderr(&outputs[0]));
    assert_fails(&outputs[1], &["http://***@", "not found"], "missing list");
    assert!(outputs[2].status.success(), "{}", stderr(&outputs[2]));
    for out in &outputs {
        let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(out));
        assert!(!all.contains(secret), "the password is shown: {all}");
    }
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("mkimg:{secret}"))
    );
    let requests = mirror.requests();
    assert!(
        requests
            .iter()
            .all(|r| r.authorization.as_deref() == Some(&basic)),
        "not every request carried the credentials: {requests:?}"
    );
    for path in files_under(&fx.work.join("cache")) {
        assert!(
            !path.to_string_lossy().contains(secret) && !path.to_string_lossy().contains('@'),
            "credentials in a cache path: {}",
            path.display()
        );
        if path.is_file() && fs::metadata(&path).unwrap().len() < 1 << 20 {
            let text = String::from_utf8_lossy(&fs::read(&path).unwrap()).into_owned();
            assert!(!text.contains(secret), "credentials in {}", path.display());
        }
    }
}
