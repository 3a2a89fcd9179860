//! What the audit keeps of a file's content: the dynamic-linking facts of an ELF file (read
//! with goblin) or the interpreter of a `#!` script.

use goblin::container::Ctx;
use goblin::elf::dynamic::{DT_NEEDED, DT_RPATH, DT_RUNPATH, DT_STRSZ, DT_STRTAB, Dynamic};
use goblin::elf::header::{EI_CLASS, ELFCLASS64};
use goblin::elf::program_header::{PT_INTERP, PT_LOAD, ProgramHeader};
use goblin::elf::{Elf, Header};

/// Linux reads at most this much of a `#!` line (BINPRM_BUF_SIZE).
pub const SHEBANG_MAX: usize = 256;

/// The dynamic-linking facts of one ELF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    pub is64: bool,
    pub machine: u16,
    pub e_type: u16,
    /// PT_INTERP.
    pub interp: Option<String>,
    /// DT_NEEDED, in order.
    pub needed: Vec<String>,
    /// DT_RPATH entries, each split at `:`.
    pub rpath: Vec<String>,
    /// DT_RUNPATH entries, each split at `:`.
    pub runpath: Vec<String>,
}

impl ElfInfo {
    /// Parse a whole ELF file. `None` when goblin cannot read its header or program headers
    /// (a truncated or foreign file: the audit treats it as plain data). A dynamic section that
    /// cannot be read leaves `needed` empty.
    pub fn parse(data: &[u8]) -> Option<ElfInfo> {
        let header: Header = Elf::parse_header(data).ok()?;
        let ctx = Ctx::new(header.container().ok()?, header.endianness().ok()?);
        let phdrs = ProgramHeader::parse(
            data,
            usize::try_from(header.e_phoff).ok()?,
            usize::from(header.e_phnum),
            ctx,
        )
        .ok()?;
        let interp = phdrs
            .iter()
            .find(|ph| ph.p_type == PT_INTERP)
            .and_then(|ph| {
                let off = usize::try_from(ph.p_offset).ok()?;
                let len = usize::try_from(ph.p_filesz).ok()?;
                let bytes = data.get(off..off.checked_add(len)?)?;
                let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
                Some(String::from_utf8_lossy(&bytes[..end]).into_owned())
            })
            .filter(|s| !s.is_empty());
        let mut info = ElfInfo {
            is64: header.e_ident[EI_CLASS] == ELFCLASS64,
            machine: header.e_machine,
            e_type: header.e_type,
            interp,
            needed: Vec::new(),
            rpath: Vec::new(),
            runpath: Vec::new(),
        };
        if let Ok(Some(dynamic)) = Dynamic::parse(data, &phdrs, ctx) {
            // The string table, located through the load segments (DT_STRTAB is an address).
            let mut strtab_addr = None;
            let mut strsz = None;
            for d in &dynamic.dyns {
                match d.d_tag {
                    DT_STRTAB => strtab_addr = Some(d.d_val),
                    DT_STRSZ => strsz = Some(d.d_val),
                    _ => {}
                }
            }
            let strtab = strtab_addr
                .and_then(|addr| vm_to_offset(&phdrs, addr))
                .and_then(|off| {
                    let off = usize::try_from(off).ok()?;
                    let end = match strsz.and_then(|s| usize::try_from(s).ok()) {
                        Some(size) => off.checked_add(size)?.min(data.len()),
                        None => data.len(),
                    };
                    data.get(off..end)
                })
                .unwrap_or_default();
            let string = |at: u64| -> Option<String> {
                let rest = strtab.get(usize::try_from(at).ok()?..)?;
                let end = rest.iter().position(|&b| b == 0)?;
                Some(String::from_utf8_lossy(&rest[..end]).into_owned())
            };
            let split = |s: String| -> Vec<String> {
                s.split(':')
                    .filter(|p| !p.is_empty())
                    .map(str::to_string)
                    .collect()
            };
            for d in &dynamic.dyns {
                match d.d_tag {
                    DT_NEEDED => info.needed.extend(string(d.d_val)),
                    DT_RPATH => info
                        .rpath
                        .extend(string(d.d_val).map(split).unwrap_or_default()),
                    DT_RUNPATH => info
                        .runpath
                        .extend(string(d.d_val).map(split).unwrap_or_default()),
                    _ => {}
                }
            }
        }
        Some(info)
    }
}

/// The file offset of a virtual address, through the PT_LOAD segments.
fn vm_to_offset(phdrs: &[ProgramHeader], addr: u64) -> Option<u64> {
    phdrs.iter().find_map(|ph| {
        (ph.p_type == PT_LOAD && addr >= ph.p_vaddr && addr - ph.p_vaddr < ph.p_filesz)
            .then(|| ph.p_offset.checked_add(addr - ph.p_vaddr))
            .flatten()
    })
}

/// The interpreter named by a `#!` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shebang {
    /// The first word after `#!`, e.g. `/bin/sh` or `/usr/bin/env`.
    pub interpreter: String,
    /// For an `env` interpreter: the command it runs (the first word after it that is neither
    /// an option nor a `NAME=VALUE` setting).
    pub env_command: Option<String>,
}

/// Parse the start of a file (up to [`SHEBANG_MAX`] bytes) that begins with `#!`. `None`
/// when no interpreter is named.
pub fn parse_shebang(head: &[u8]) -> Option<Shebang> {
    let line = head.strip_prefix(b"#!")?;
    let line = &line[..line.iter().position(|&b| b == b'\n').unwrap_or(line.len())];
    let line = String::from_utf8_lossy(line);
    let mut words = line.split([' ', '\t', '\r']).filter(|w| !w.is_empty());
    let interpreter = words.next()?.to_string();
    let env_command = if interpreter.rsplit('/').next() == Some("env") {
        words
            .find(|w| !w.starts_with('-') && !w.contains('='))
            .map(str::to_string)
    } else {
        None
    };
    Some(Shebang {
        interpreter,
        env_command,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shebang_lines() {
        let s = parse_shebang(b"#!/bin/sh -e\necho\n").unwrap();
        assert_eq!(s.interpreter, "/bin/sh");
        assert_eq!(s.env_command, None);
        let s = parse_shebang(b"#! /usr/bin/env  python3 -u\n").unwrap();
        assert_eq!(s.interpreter, "/usr/bin/env");
        assert_eq!(s.env_command.as_deref(), Some("python3"));
        let s = parse_shebang(b"#!/usr/bin/env -S LC_ALL=C perl -w\r\n").unwrap();
        assert_eq!(s.env_command.as_deref(), Some("perl"));
        let s = parse_shebang(b"#!/usr/bin/env").unwrap();
        assert_eq!(s.env_command, None);
        assert_eq!(parse_shebang(b"#!   \nfoo"), None);
        assert_eq!(parse_shebang(b"echo"), None);
    }

    #[test]
    fn non_elf_and_truncated_data_are_not_elf() {
        assert_eq!(ElfInfo::parse(b"#!/bin/sh\n"), None);
        assert_eq!(ElfInfo::parse(b"\x7fELF\x02\x01\x01"), None);
    }
}
