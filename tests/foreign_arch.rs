//! A stage of another architecture (#14): `build` with the sandbox engine runs an arm64 stage
//! on this amd64 host through binfmt_misc and qemu-user-static (the aarch64 handler that
//! `scripts/setup-host` registers with the F flag), and the images say arm64; without such a
//! handler, or with `--platform` naming another platform, the build stops with one line
//! before anything is stored. Never uses Podman.
#![cfg(target_arch = "x86_64")]

mod common;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use support::tiny_arm64_stage;

/// The handler Debian's qemu-user-static registers (as the kernel shows it), with `flags`.
fn aarch64_handler(enabled: bool, flags: &str) -> String {
    format!(
        "{}\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: {flags}\noffset 0\n\
         magic 7f454c460201010000000000000000000200b700\n\
         mask ffffffffffffff00fffffffffffffffffeffffff\n",
        if enabled { "enabled" } else { "disabled" }
    )
}

/// binfmt_misc handler files: (name, text).
type Handlers<'a> = Vec<(&'a str, String)>;

/// A binfmt_misc directory of our own (GENTOO_MKIMG_BINFMT_MISC) with these handlers.
fn binfmt_dir(root: &Path, handlers: &[(&str, String)]) -> PathBuf {
    let dir = root.join("binfmt_misc");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("status"), "enabled\n").unwrap();
    std::fs::write(dir.join("register"), "").unwrap();
    for (name, text) in handlers {
        std::fs::write(dir.join(name), text).unwrap();
    }
    dir
}

fn mkimg(root: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gentoo-mkimg"));
    cmd.arg("--store")
        .arg(root.join("images"))
        .arg("--work-dir")
        .arg(root)
        .arg("--cache-dir")
        .arg(root.join("cache"))
        .env_remove("SOURCE_DATE_EPOCH")
        .env_remove("GENTOO_MKIMG_BINFMT_MISC")
        .stdin(Stdio::null());
    cmd
}

/// stderr's lines but the warning that the local stage is not verified (it has no companion
/// files).
fn stderr_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !(l.starts_with("WARNING: ") && l.contains(" is NOT verified ")))
        .map(str::to_string)
        .collect()
}

/// Every blob file in the store (none after a refused build: nothing stored).
fn blobs(store: &Path) -> Vec<PathBuf> {
    let dir = store.join("blobs").join("sha256");
    match std::fs::read_dir(&dir) {
        Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

fn tagged(store: &Path) -> Vec<String> {
    let Ok(bytes) = std::fs::read(store.join("index.json")) else {
        return Vec::new();
    };
    let index: Value = serde_json::from_slice(&bytes).unwrap();
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str())
        .map(str::to_string)
        .collect()
}

fn refused(root: &Path, stage: &Path, binfmt: &Path, extra: &[&str]) -> String {
    let out = mkimg(root)
        .arg("build")
        .arg(stage)
        .arg(common::repo())
        .args(["localhost", "foreign", "t1"])
        .args(extra)
        .env("GENTOO_MKIMG_BINFMT_MISC", binfmt)
        .output()
        .unwrap();
    let lines = stderr_lines(&out);
    assert!(!out.status.success(), "the build did not fail: {lines:#?}");
    assert_eq!(lines.len(), 1, "not one line: {lines:#?}");
    let store = root.join("images");
    assert_eq!(tagged(&store), Vec::<String>::new(), "something was tagged");
    assert_eq!(blobs(&store), Vec::<PathBuf>::new(), "blobs were stored");
    lines[0].clone()
}

#[test]
fn without_a_handler_with_the_f_flag_a_foreign_stage_is_refused_before_anything_is_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let stage = root.join("stage3-arm64.tar");
    tiny_arm64_stage(&stage);
    let prefix = format!(
        "gentoo-mkimg: error: stage3 {} is arm64 (aarch64), this host is amd64: running it \
         needs a qemu-user binfmt_misc handler registered with the F flag (Debian: apt install \
         qemu-user-static); ",
        stage.display()
    );
    let cases: [(&str, Handlers, &str); 3] = [
        ("none", vec![], "has no handler for arm64 programs"),
        (
            "disabled",
            vec![("qemu-aarch64", aarch64_handler(false, "POF"))],
            "/qemu-aarch64 is disabled",
        ),
        (
            "no F",
            vec![("qemu-aarch64", aarch64_handler(true, "PO"))],
            "so its interpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P would be looked for \
             inside the stage",
        ),
    ];
    for (what, handlers, reason) in cases {
        let case = root.join(what.replace(' ', "-"));
        let binfmt = binfmt_dir(&case, &handlers);
        let line = refused(&case, &stage, &binfmt, &[]);
        assert!(line.starts_with(&prefix), "{what}: {line}");
        assert!(line.ends_with(reason), "{what}: {line}");
    }
}

#[test]
fn platform_refuses_a_stage_of_another_platform() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let stage = root.join("stage3-arm64.tar");
    tiny_arm64_stage(&stage);
    let binfmt = binfmt_dir(root, &[("qemu-aarch64", aarch64_handler(true, "POF"))]);
    let line = refused(root, &stage, &binfmt, &["--platform", "linux/amd64"]);
    assert_eq!(
        line,
        format!(
            "gentoo-mkimg: error: stage3 {} is linux/arm64/v8, not linux/amd64 (--platform)",
            stage.display()
        )
    );
}

/// A build of two platforms imports and checks every stage before it builds anything: the
/// arm64 stage without a handler stops it in one line, after the amd64 stage was imported,
/// and that import is undone (nothing tagged, no blob left). The stages come from the config
/// file's `stage3_by_platform`, relative to it.
#[test]
fn a_two_platform_build_checks_every_stage_before_building_and_stores_nothing_on_refusal() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    support::make_stage(&root.join("amd64.tar"), 1, 4096);
    tiny_arm64_stage(&root.join("arm64.tar"));
    let config = root.join("multi.toml");
    let head = format!(
        "snapshot = {:?}\nrepo = \"localhost\"\nbasename = \"multi\"\ntag = \"t1\"\n\
         platform = \"linux/amd64,linux/arm64\"\n[stage3_by_platform]\n",
        common::repo().display().to_string()
    );
    std::fs::write(
        &config,
        format!("{head}\"linux/amd64\" = \"amd64.tar\"\n\"linux/arm64\" = \"arm64.tar\"\n"),
    )
    .unwrap();
    let binfmt = binfmt_dir(root, &[]);
    let out = mkimg(root)
        .args(["build", "--config"])
        .arg(&config)
        .env("GENTOO_MKIMG_BINFMT_MISC", &binfmt)
        .output()
        .unwrap();
    let lines = stderr_lines(&out);
    assert!(!out.status.success(), "the build did not fail: {lines:#?}");
    assert_eq!(lines.len(), 1, "not one line: {lines:#?}");
    assert!(
        lines[0].starts_with(&format!(
            "gentoo-mkimg: error: stage3 {} is arm64 (aarch64), this host is amd64",
            root.join("arm64.tar").display()
        )),
        "{}",
        lines[0]
    );
    let store = root.join("images");
    assert_eq!(tagged(&store), Vec::<String>::new(), "something was tagged");
    assert_eq!(blobs(&store), Vec::<PathBuf>::new(), "blobs were stored");

    // A platform the config names no stage for is named before anything is read.
    std::fs::write(&config, format!("{head}\"linux/amd64\" = \"amd64.tar\"\n")).unwrap();
    let out = mkimg(root)
        .args(["build", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let lines = stderr_lines(&out);
    assert_eq!(
        lines,
        ["gentoo-mkimg: error: stage3_by_platform names no stage3 for linux/arm64"]
    );
}
