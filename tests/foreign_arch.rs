//! A stage of another architecture (#14): `build` with the sandbox engine runs an arm64 stage
//! on this amd64 host through binfmt_misc and qemu-user-static (the aarch64 handler that
//! `scripts/setup-host` registers with the F flag), and the images say arm64; without such a
//! handler, or with `--platform` naming another platform, the build stops with one line
//! before anything is stored. Never uses Podman.
#![cfg(target_arch = "x86_64")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

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

/// The 64-byte header of an aarch64 PIE program, padded: all the import reads to learn the
/// stage's platform.
fn aarch64_elf() -> Vec<u8> {
    let mut h = vec![0u8; 128];
    h[..8].copy_from_slice(b"\x7fELF\x02\x01\x01\x00");
    h[16..18].copy_from_slice(&3u16.to_le_bytes()); // ET_DYN
    h[18..20].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
    h[20..24].copy_from_slice(&1u32.to_le_bytes());
    h[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    h[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    h[58..60].copy_from_slice(&64u16.to_le_bytes()); // e_shentsize
    h
}

/// A tiny "arm64 stage": ./usr/bin/true is an aarch64 ELF header, ./usr/bin/emerge a script.
fn tiny_arm64_stage(path: &Path) {
    let mut tar = tar::Builder::new(std::fs::File::create(path).unwrap());
    let mut add = |name: &str, kind: tar::EntryType, mode: u32, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(data.len() as u64);
        tar.append_data(&mut h, name, data).unwrap();
    };
    for d in ["./", "./usr/", "./usr/bin/"] {
        add(d, tar::EntryType::Directory, 0o755, &[]);
    }
    add(
        "./usr/bin/true",
        tar::EntryType::Regular,
        0o755,
        &aarch64_elf(),
    );
    add(
        "./usr/bin/emerge",
        tar::EntryType::Regular,
        0o755,
        b"#!/bin/sh\nexit 1\n",
    );
    tar.into_inner().unwrap().sync_all().unwrap();
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
