//! Can this host run a stage of another architecture? Through binfmt_misc: the kernel hands
//! a foreign ELF program to an interpreter (a static qemu-user) that a handler names.
//!
//! Inside the sandbox's new root the interpreter's path would mean the stage's file, which
//! is not there; a handler registered with the F (fix-binary) flag had its interpreter
//! opened by the kernel when it was registered, so it works in any root. So a foreign stage
//! needs an enabled handler with the F flag whose magic and mask match the stage's ELF
//! programs; this module checks for one before anything runs in the stage, and says what to
//! install when there is none. It does not register handlers (`scripts/setup-host` does, on
//! a host without systemd-binfmt).

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use goblin::elf::header::{
    EM_386, EM_AARCH64, EM_ARM, EM_LOONGARCH, EM_PPC, EM_PPC64, EM_RISCV, EM_S390, EM_X86_64,
};

use crate::archive::pinned::Dir;
use crate::image::config::{ELF_PROBE_LIMIT, Platform, platform_from_elf};

/// Where the kernel's binfmt_misc handlers are (one file each, plus `status` and `register`).
pub const BINFMT_MISC: &str = "/proc/sys/fs/binfmt_misc";

/// The binfmt_misc directory to read: [`BINFMT_MISC`], or `GENTOO_MKIMG_BINFMT_MISC` when set
/// (the tests point it at handler files of their own; it can only make a build refuse a
/// stage, or let one fail later when its programs cannot run).
pub fn binfmt_dir() -> PathBuf {
    std::env::var_os("GENTOO_MKIMG_BINFMT_MISC")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(BINFMT_MISC), PathBuf::from)
}

/// The ELF identity of an architecture's programs: (64-bit, little-endian, e_machine), and
/// the name the kernel and qemu give it.
fn elf_identity(architecture: &str) -> Option<(bool, bool, u16, &'static str)> {
    Some(match architecture {
        "amd64" => (true, true, EM_X86_64, "x86_64"),
        "386" => (false, true, EM_386, "i386"),
        "arm64" => (true, true, EM_AARCH64, "aarch64"),
        "arm" => (false, true, EM_ARM, "arm"),
        "ppc64le" => (true, true, EM_PPC64, "ppc64le"),
        "ppc64" => (true, false, EM_PPC64, "ppc64"),
        "ppc" => (false, false, EM_PPC, "ppc"),
        "s390x" => (true, false, EM_S390, "s390x"),
        "riscv64" => (true, true, EM_RISCV, "riscv64"),
        "loong64" => (true, true, EM_LOONGARCH, "loongarch64"),
        _ => return None,
    })
}

/// The first 20 bytes of an ELF program of `architecture` of type `e_type` (2: executable,
/// 3: position-independent executable), as a handler's magic sees them.
fn elf_prefix(architecture: &str, e_type: u16) -> Option<[u8; 20]> {
    let (is64, le, machine, _) = elf_identity(architecture)?;
    let mut h = [0u8; 20];
    h[..4].copy_from_slice(b"\x7fELF");
    h[4] = if is64 { 2 } else { 1 };
    h[5] = if le { 1 } else { 2 };
    h[6] = 1; // EI_VERSION
    let (t, m) = if le {
        (e_type.to_le_bytes(), machine.to_le_bytes())
    } else {
        (e_type.to_be_bytes(), machine.to_be_bytes())
    };
    h[16..18].copy_from_slice(&t);
    h[18..20].copy_from_slice(&m);
    Some(h)
}

/// Whether a program of `host` runs a program of `stage` natively.
fn runs_natively(host: &str, stage: &str) -> bool {
    host == stage || (host, stage) == ("amd64", "386")
}

/// One binfmt_misc handler, as its file under [`BINFMT_MISC`] shows it.
#[derive(Debug, Default, PartialEq, Eq)]
struct Handler {
    enabled: bool,
    interpreter: String,
    flags: String,
    offset: usize,
    /// `None` for an extension handler (`E`).
    magic: Option<Vec<u8>>,
    mask: Option<Vec<u8>>,
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Handler {
    fn parse(text: &str) -> Option<Handler> {
        let mut h = Handler::default();
        for line in text.lines() {
            let line = line.trim();
            if line == "enabled" {
                h.enabled = true;
            } else if let Some(v) = line.strip_prefix("interpreter ") {
                h.interpreter = v.to_string();
            } else if let Some(v) = line.strip_prefix("flags:") {
                h.flags = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("offset ") {
                h.offset = v.trim().parse().ok()?;
            } else if let Some(v) = line.strip_prefix("magic ") {
                h.magic = Some(unhex(v.trim())?);
            } else if let Some(v) = line.strip_prefix("mask ") {
                h.mask = Some(unhex(v.trim())?);
            }
        }
        Some(h)
    }

    /// Whether the kernel would hand a file starting with `prefix` to this handler.
    fn matches(&self, prefix: &[u8]) -> bool {
        let Some(magic) = &self.magic else {
            return false;
        };
        let end = self.offset.saturating_add(magic.len());
        let Some(data) = prefix.get(self.offset..end) else {
            return false;
        };
        magic.iter().enumerate().all(|(i, &m)| {
            let mask = self
                .mask
                .as_ref()
                .map_or(0xff, |k| k.get(i).copied().unwrap_or(0xff));
            (data[i] ^ m) & mask == 0
        })
    }
}

/// The directories whose first ELF program tells a stage's platform (as `import` reads a
/// stage's archive).
const PROGRAM_DIRS: [&str; 4] = ["bin", "sbin", "usr/bin", "usr/sbin"];

/// The platform of the programs of the stage extracted at `rootfs`: that of the first ELF
/// program (by name) in bin, sbin, usr/bin or usr/sbin. Nothing in the stage is followed: a
/// directory that is a symlink (merged /usr) is skipped, and only regular files are read.
/// `None` when there is no such program.
pub fn rootfs_platform(rootfs: &Path) -> Result<Option<Platform>> {
    let root = Dir::open(rootfs)?;
    for dir in PROGRAM_DIRS {
        let Ok(dir) = root.beneath(dir.as_bytes()) else {
            continue;
        };
        for name in dir.names()? {
            let Ok(file) = dir.open_regular(&name) else {
                continue;
            };
            let what = || dir.display(&name);
            let mut data = Vec::new();
            let mut file = file.take(ELF_PROBE_LIMIT);
            (&mut file)
                .take(4)
                .read_to_end(&mut data)
                .with_context(|| format!("{}: cannot read", what()))?;
            if data != b"\x7fELF" {
                continue;
            }
            file.read_to_end(&mut data)
                .with_context(|| format!("{}: cannot read", what()))?;
            if let Some(platform) = platform_from_elf(&data) {
                return Ok(Some(platform));
            }
        }
    }
    Ok(None)
}

/// [`check_runnable`] for the stage `stage` extracted at `rootfs`, whose platform its own
/// programs tell ([`rootfs_platform`]); a stage without an ELF program passes.
pub fn check_rootfs_runnable(stage: &Path, rootfs: &Path) -> Result<()> {
    match rootfs_platform(rootfs)? {
        Some(platform) => check_runnable(
            stage,
            &platform,
            crate::image::config::host_architecture(),
            &binfmt_dir(),
        ),
        None => Ok(()),
    }
}

/// Fails unless this host can run the programs of a stage of `platform`: natively, or through
/// an enabled binfmt_misc handler in `binfmt_dir` (normally [`BINFMT_MISC`]) with the F flag
/// that matches them. The error is one line naming `stage`, both architectures, what is
/// wrong and what to install.
pub fn check_runnable(
    stage: &Path,
    platform: &Platform,
    host: &str,
    binfmt_dir: &Path,
) -> Result<()> {
    let arch = platform.architecture.as_str();
    if runs_natively(host, arch) {
        return Ok(());
    }
    let (_, _, _, kernel_name) = elf_identity(arch).unwrap_or((true, true, 0, "unknown"));
    let problem = match find_handler(arch, binfmt_dir) {
        Ok(()) => return Ok(()),
        Err(problem) => problem,
    };
    bail!(
        "stage3 {} is {arch} ({kernel_name}), this host is {host}: running it needs a \
         qemu-user binfmt_misc handler registered with the F flag (Debian: apt install \
         qemu-user-static); {problem}",
        stage.display()
    )
}

/// `Ok` when `binfmt_dir` has an enabled handler with the F flag for programs of
/// `architecture` (executables and PIEs alike), else what was found instead.
fn find_handler(architecture: &str, binfmt_dir: &Path) -> std::result::Result<(), String> {
    let dir = binfmt_dir.display();
    let (Some(exec), Some(pie)) = (elf_prefix(architecture, 2), elf_prefix(architecture, 3)) else {
        return Err(format!("{architecture} is no architecture this tool knows"));
    };
    match std::fs::read_to_string(binfmt_dir.join("status")) {
        Ok(s) if s.trim() == "enabled" => {}
        Ok(_) => return Err(format!("binfmt_misc is disabled ({dir}/status)")),
        Err(e) => return Err(format!("binfmt_misc is not mounted at {dir} ({e})")),
    }
    let entries = std::fs::read_dir(binfmt_dir).map_err(|e| format!("{dir}: {e}"))?;
    let mut found: Vec<String> = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "status" || name == "register" {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let Some(handler) = Handler::parse(&text) else {
            continue;
        };
        if !(handler.matches(&exec) && handler.matches(&pie)) {
            continue;
        }
        match (handler.enabled, handler.flags.contains('F')) {
            (true, true) => return Ok(()),
            (false, _) => found.push(format!("{dir}/{name} is disabled")),
            (true, false) => found.push(format!(
                "{dir}/{name} has no F flag (flags: {:?}), so its interpreter {} would be \
                 looked for inside the stage",
                handler.flags, handler.interpreter
            )),
        }
    }
    if found.is_empty() {
        Err(format!("{dir} has no handler for {architecture} programs"))
    } else {
        found.sort();
        Err(found.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AARCH64: &str = "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\n\
        flags: POF\noffset 0\nmagic 7f454c460201010000000000000000000200b700\n\
        mask ffffffffffffff00fffffffffffffffffeffffff\n";

    fn arm64() -> Platform {
        "linux/arm64/v8".parse().unwrap()
    }

    fn binfmt(handlers: &[(&str, &str)], status: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("status"), status).unwrap();
        std::fs::write(dir.path().join("register"), "").unwrap();
        for (name, text) in handlers {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    fn check(dir: &Path, host: &str) -> Result<()> {
        check_runnable(Path::new("/x/stage3.tar.xz"), &arm64(), host, dir)
    }

    /// A 64-bit little-endian ELF executable header of `machine`.
    fn elf64(machine: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2; // 64-bit
        h[5] = 1; // little-endian
        h[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        h[18..20].copy_from_slice(&machine.to_le_bytes());
        h
    }

    #[test]
    fn an_extracted_stage_tells_its_platform_by_its_first_program_and_follows_nothing() {
        use std::os::unix::fs::symlink;
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        // merged /usr: bin is a link (skipped, not followed); sbin has only a link out of the
        // stage, a FIFO and a script
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::fs::create_dir_all(root.join("sbin")).unwrap();
        symlink("usr/bin", root.join("bin")).unwrap();
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(outside.path(), elf64(EM_X86_64)).unwrap();
        symlink(outside.path(), root.join("sbin/a-link")).unwrap();
        nix::unistd::mkfifo(&root.join("sbin/b-fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::fs::write(root.join("sbin/c-script"), "#!/bin/sh\nexit 0\n").unwrap();
        assert_eq!(rootfs_platform(root).unwrap(), None);
        std::fs::write(root.join("usr/bin/sh"), elf64(EM_AARCH64)).unwrap();
        assert_eq!(
            rootfs_platform(root).unwrap().unwrap().to_string(),
            "linux/arm64/v8"
        );
        // and so a session of that stage is refused without a handler, in one line
        let dir = binfmt(&[], "enabled\n");
        let e = format!(
            "{:#}",
            check_runnable(
                Path::new("s"),
                &rootfs_platform(root).unwrap().unwrap(),
                "amd64",
                dir.path()
            )
            .unwrap_err()
        );
        assert!(e.ends_with("has no handler for arm64 programs"), "{e}");
    }

    #[test]
    fn an_enabled_handler_with_the_f_flag_runs_the_stage() {
        let dir = binfmt(&[("qemu-aarch64", AARCH64)], "enabled\n");
        check(dir.path(), "amd64").unwrap();
    }

    #[test]
    fn the_host_runs_its_own_architecture_without_a_handler() {
        let dir = binfmt(&[], "enabled\n");
        check(dir.path(), "arm64").unwrap();
        let amd64: Platform = "linux/amd64".parse().unwrap();
        check_runnable(Path::new("s"), &amd64, "amd64", Path::new("/nonexistent")).unwrap();
    }

    #[test]
    fn no_handler_is_one_line_naming_the_stage_and_what_to_install() {
        // another architecture's handler is no help
        let arm = AARCH64.replace("0200b700", "02002800");
        let dir = binfmt(&[("qemu-arm", &arm)], "enabled\n");
        let e = format!("{:#}", check(dir.path(), "amd64").unwrap_err());
        assert!(!e.contains('\n'), "{e}");
        assert!(
            e.starts_with(
                "stage3 /x/stage3.tar.xz is arm64 (aarch64), this host is amd64: running it \
                 needs a qemu-user binfmt_misc handler registered with the F flag (Debian: \
                 apt install qemu-user-static); "
            ),
            "{e}"
        );
        assert!(e.ends_with("has no handler for arm64 programs"), "{e}");
    }

    #[test]
    fn a_disabled_handler_or_one_without_f_does_not_count() {
        let disabled = AARCH64.replace("enabled\n", "disabled\n");
        let dir = binfmt(&[("qemu-aarch64", &disabled)], "enabled\n");
        let e = format!("{:#}", check(dir.path(), "amd64").unwrap_err());
        assert!(e.ends_with("/qemu-aarch64 is disabled"), "{e}");

        let no_f = AARCH64.replace("flags: POF", "flags: P");
        let dir = binfmt(&[("qemu-aarch64", &no_f)], "enabled\n");
        let e = format!("{:#}", check(dir.path(), "amd64").unwrap_err());
        assert!(e.contains("/qemu-aarch64 has no F flag"), "{e}");
        assert!(!e.contains('\n'), "{e}");

        // binfmt_misc itself off, or not mounted
        let dir = binfmt(&[("qemu-aarch64", AARCH64)], "disabled\n");
        let e = format!("{:#}", check(dir.path(), "amd64").unwrap_err());
        assert!(e.contains("binfmt_misc is disabled"), "{e}");
        let e = format!(
            "{:#}",
            check(&dir.path().join("missing"), "amd64").unwrap_err()
        );
        assert!(e.contains("binfmt_misc is not mounted at"), "{e}");
    }

    #[test]
    fn a_handler_must_match_executables_and_pies() {
        // magic that matches ET_EXEC (2) only: PIE programs would not run
        let exec_only = AARCH64.replace("feffffff\n", "ffffffff\n");
        let dir = binfmt(&[("qemu-aarch64", &exec_only)], "enabled\n");
        assert!(check(dir.path(), "amd64").is_err());
    }

    #[test]
    fn handler_files_parse_as_the_kernel_writes_them() {
        let h = Handler::parse(AARCH64).unwrap();
        assert!(h.enabled);
        assert_eq!(h.flags, "POF");
        assert_eq!(h.offset, 0);
        assert_eq!(h.magic.as_ref().unwrap().len(), 20);
        assert!(h.matches(&elf_prefix("arm64", 3).unwrap()));
        assert!(!h.matches(&elf_prefix("amd64", 3).unwrap()));
        assert_eq!(Handler::parse("enabled\nmagic 7f4\n"), None);
    }

    #[test]
    fn the_host_architecture_has_an_elf_identity() {
        assert!(elf_identity(crate::image::config::host_architecture()).is_some());
    }
}
