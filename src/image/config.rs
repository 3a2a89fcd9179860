//! The image config and manifest: platform (from the stage's own ELF binaries), environment,
//! command, volumes, labels and the creation time.
//!
//! Everything here is a pure function of its inputs, written as oci-spec's documents with
//! their keys sorted ([`to_json`]), so the same layer and settings always give the same
//! config and manifest digests.

use std::collections::BTreeMap;

use std::collections::HashMap;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::image::layer::LayerInfo;
use crate::image::oci::{
    Arch, ConfigBuilder, Descriptor, HistoryBuilder, ImageConfigurationBuilder,
    ImageManifestBuilder, MediaType, Os, RootFsBuilder, to_json,
};

/// OS/architecture/variant, in OCI (GOARCH) terms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Platform {
    pub architecture: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "linux/{}", self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Platform {
    type Err = anyhow::Error;

    /// `[linux/]ARCH[/VARIANT]`, e.g. `linux/arm/v7` or `amd64`.
    fn from_str(s: &str) -> Result<Self> {
        let s = s.strip_prefix("linux/").unwrap_or(s);
        let mut parts = s.split('/');
        let arch = parts.next().unwrap_or_default();
        let variant = parts.next().map(str::to_string);
        if arch.is_empty() || parts.next().is_some() || variant.as_deref() == Some("") {
            bail!("platform {s:?}: expected [linux/]ARCH[/VARIANT], e.g. linux/arm64");
        }
        Ok(Platform {
            architecture: arch.to_string(),
            variant,
        })
    }
}

impl Platform {
    /// A comma-separated list of platforms (`linux/amd64,linux/arm64`), each once.
    pub fn parse_list(text: &str) -> Result<Vec<Platform>> {
        let mut platforms: Vec<Platform> = Vec::new();
        for item in text.split(',').map(str::trim) {
            let platform: Platform = item.parse()?;
            if platforms.contains(&platform) {
                bail!("platform {platform} is listed twice");
            }
            platforms.push(platform);
        }
        Ok(platforms)
    }
}

/// The host's architecture in OCI terms (`amd64`, `arm64`, ...), as this program was built
/// for it.
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "x86" => "386",
        "aarch64" => "arm64",
        "arm" => "arm",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "powerpc64" => "ppc64",
        "powerpc" => "ppc",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        "loongarch64" => "loong64",
        other => other,
    }
}

const SHT_ARM_ATTRIBUTES: u32 = 0x7000_0003;

/// Largest program read whole to find the platform (ARM keeps it at the end of the file).
pub const ELF_PROBE_LIMIT: u64 = 16 << 20;

/// Read the platform from the start of an ELF file (for ARM, the whole file: the CPU
/// architecture is in the `.ARM.attributes` section). `None` when `data` is not an ELF
/// executable or shared object of a known machine.
pub fn platform_from_elf(data: &[u8]) -> Option<Platform> {
    use goblin::elf::header::{
        EI_CLASS, EI_DATA, ELFCLASS32, ELFCLASS64, ELFDATA2LSB, ELFDATA2MSB, EM_386, EM_AARCH64,
        EM_ARM, EM_LOONGARCH, EM_PPC, EM_PPC64, EM_RISCV, EM_S390, EM_X86_64, ET_DYN, ET_EXEC,
    };
    if !data.starts_with(b"\x7fELF") {
        return None;
    }
    let header = goblin::elf::Elf::parse_header(data).ok()?;
    let is64 = match header.e_ident[EI_CLASS] {
        ELFCLASS32 => false,
        ELFCLASS64 => true,
        _ => return None,
    };
    let le = match header.e_ident[EI_DATA] {
        ELFDATA2LSB => true,
        ELFDATA2MSB => false,
        _ => return None,
    };
    if header.e_type != ET_EXEC && header.e_type != ET_DYN {
        return None;
    }
    let (arch, variant) = match (header.e_machine, is64, le) {
        (EM_X86_64, true, true) => ("amd64", None),
        (EM_386, false, true) => ("386", None),
        (EM_AARCH64, true, true) => ("arm64", Some("v8".to_string())),
        (EM_ARM, false, true) => ("arm", arm_variant(data, &header)),
        (EM_PPC64, true, true) => ("ppc64le", None),
        (EM_PPC64, true, false) => ("ppc64", None),
        (EM_PPC, false, false) => ("ppc", None),
        (EM_S390, true, false) => ("s390x", None),
        (EM_RISCV, true, true) => ("riscv64", None),
        (EM_LOONGARCH, true, true) => ("loong64", None),
        _ => return None,
    };
    Some(Platform {
        architecture: arch.to_string(),
        variant,
    })
}

/// `v5`, `v6`, `v7` or `v8` from Tag_CPU_arch in a 32-bit little-endian ARM ELF's
/// `.ARM.attributes` section, found through goblin's section headers.
fn arm_variant(data: &[u8], header: &goblin::elf::Header) -> Option<String> {
    let ctx = goblin::container::Ctx::new(header.container().ok()?, header.endianness().ok()?);
    let sections = goblin::elf::SectionHeader::parse(
        data,
        usize::try_from(header.e_shoff).ok()?,
        usize::from(header.e_shnum),
        ctx,
    )
    .ok()?;
    let section = sections.iter().find_map(|sh| {
        (sh.sh_type == SHT_ARM_ATTRIBUTES).then_some(())?;
        let off = usize::try_from(sh.sh_offset).ok()?;
        let size = usize::try_from(sh.sh_size).ok()?;
        data.get(off..off.checked_add(size)?)
    })?;
    let arch = tag_cpu_arch(section)?;
    Some(
        match arch {
            0..=5 => "v5",
            6..=9 => "v6",
            10 | 13 => "v7",
            _ => "v8",
        }
        .to_string(),
    )
}

/// Tag_CPU_arch (tag 6) from the "aeabi" file attributes of an attributes section.
fn tag_cpu_arch(section: &[u8]) -> Option<u64> {
    fn uleb(d: &[u8], pos: &mut usize) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *d.get(*pos)?;
            *pos += 1;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
    if section.first() != Some(&b'A') {
        return None;
    }
    let mut pos = 1;
    while pos + 4 <= section.len() {
        let len = u32::from_le_bytes(section[pos..pos + 4].try_into().ok()?) as usize;
        let sub = section.get(pos..pos.checked_add(len)?)?;
        pos += len.max(1);
        let name_end = sub[4..].iter().position(|&b| b == 0)? + 4;
        if &sub[4..name_end] != b"aeabi" {
            continue;
        }
        let mut p = name_end + 1;
        while p + 5 <= sub.len() {
            let tag = sub[p];
            let size = u32::from_le_bytes(sub[p + 1..p + 5].try_into().ok()?) as usize;
            let block = sub.get(p..p.checked_add(size)?)?;
            p += size.max(1);
            if tag != 1 {
                continue; // only file-scope attributes
            }
            let mut q = 5;
            while q < block.len() {
                let t = uleb(block, &mut q)?;
                match t {
                    6 => return uleb(block, &mut q),
                    4 | 5 | 67 => {
                        q += block[q..].iter().position(|&b| b == 0)? + 1;
                    }
                    32 => {
                        uleb(block, &mut q)?;
                        q += block[q..].iter().position(|&b| b == 0)? + 1;
                    }
                    t if t > 32 && t % 2 == 1 => {
                        q += block[q..].iter().position(|&b| b == 0)? + 1;
                    }
                    _ => {
                        uleb(block, &mut q)?;
                    }
                }
            }
        }
    }
    None
}

/// What goes into an image config besides the layers.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    pub platform: Platform,
    /// Seconds since the epoch.
    pub created: i64,
    pub env: Vec<String>,
    pub cmd: Vec<String>,
    pub volumes: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// One history line per layer.
    pub history: Vec<String>,
}

impl ImageSpec {
    /// The settings every gentoo-mkimg image shares, as the old tool's images had them.
    pub fn gentoo(platform: Platform, created: i64) -> Self {
        ImageSpec {
            platform,
            created,
            env: vec![
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            ],
            cmd: vec!["/bin/bash".to_string()],
            volumes: vec!["/var/db/repos/gentoo".to_string()],
            labels: BTreeMap::new(),
            history: Vec::new(),
        }
    }
}

/// The config JSON for `spec` over `layers`.
pub fn config_json(spec: &ImageSpec, layers: &[LayerInfo]) -> Result<Vec<u8>> {
    let created = rfc3339(spec.created)?;
    let run = ConfigBuilder::default()
        .env(spec.env.clone())
        .cmd(spec.cmd.clone())
        .volumes(spec.volumes.clone())
        .labels(
            spec.labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<HashMap<_, _>>(),
        )
        .build()
        .context("cannot make the image config")?;
    let rootfs = RootFsBuilder::default()
        .typ("layers")
        .diff_ids(
            layers
                .iter()
                .map(|l| l.diff_id.to_string())
                .collect::<Vec<_>>(),
        )
        .build()
        .context("cannot make the image config")?;
    let history = spec
        .history
        .iter()
        .map(|h| {
            HistoryBuilder::default()
                .created(created.clone())
                .created_by(h.clone())
                .build()
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .context("cannot make the image config")?;
    let mut config = ImageConfigurationBuilder::default()
        .created(created)
        .architecture(Arch::from(spec.platform.architecture.as_str()))
        .os(Os::Linux)
        .config(run)
        .rootfs(rootfs)
        .history(history)
        .build()
        .context("cannot make the image config")?;
    config.set_variant(spec.platform.variant.clone());
    to_json(&config)
}

/// The manifest JSON for a stored config and layers.
pub fn manifest_json(
    config: &Descriptor,
    layers: &[LayerInfo],
    annotations: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config.clone())
        .layers(layers.iter().map(LayerInfo::descriptor).collect::<Vec<_>>())
        .annotations(
            annotations
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<HashMap<_, _>>(),
        )
        .build()
        .context("cannot make the image manifest")?;
    to_json(&manifest)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the epoch (UTC); an error for a time outside
/// the years 0001 to 9999 (a file time in a tarball can be anything).
pub fn rfc3339(secs: i64) -> Result<String> {
    let time = jiff::Timestamp::from_second(secs)
        .with_context(|| format!("the time {secs} (seconds since 1970) is out of range"))?;
    Ok(time.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use goblin::elf::header::{EM_386, EM_AARCH64, EM_ARM, EM_PPC64, EM_RISCV, EM_S390, EM_X86_64};

    fn elf(class: u8, data: u8, machine: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = class;
        h[5] = data;
        let put = |h: &mut Vec<u8>, o: usize, v: u16| {
            let b = if data == 1 {
                v.to_le_bytes()
            } else {
                v.to_be_bytes()
            };
            h[o..o + 2].copy_from_slice(&b);
        };
        put(&mut h, 16, 3);
        put(&mut h, 18, machine);
        h
    }

    #[test]
    fn detects_common_architectures() {
        let cases = [
            (elf(2, 1, EM_X86_64), "linux/amd64"),
            (elf(2, 1, EM_AARCH64), "linux/arm64/v8"),
            (elf(1, 1, EM_386), "linux/386"),
            (elf(2, 1, EM_PPC64), "linux/ppc64le"),
            (elf(2, 2, EM_PPC64), "linux/ppc64"),
            (elf(2, 1, EM_RISCV), "linux/riscv64"),
            (elf(2, 2, EM_S390), "linux/s390x"),
        ];
        for (bytes, want) in cases {
            assert_eq!(platform_from_elf(&bytes).unwrap().to_string(), want);
        }
        assert_eq!(platform_from_elf(b"#!/bin/sh\necho hi\n"), None);
        let mut relocatable = elf(2, 1, EM_X86_64);
        relocatable[16] = 1;
        assert_eq!(platform_from_elf(&relocatable), None);
    }

    /// A 32-bit ARM ELF with one `.ARM.attributes` section saying Tag_CPU_arch = `arch`.
    fn arm_elf(arch: u8) -> Vec<u8> {
        let mut h = elf(1, 1, EM_ARM);
        h.truncate(52);
        let mut attrs = vec![b'A'];
        let mut file_attrs = vec![5u8];
        file_attrs.extend_from_slice(b"7-A\0"); // Tag_CPU_name, a string
        file_attrs.extend_from_slice(&[6, arch, 10, 2]); // Tag_CPU_arch, Tag_FP_arch
        let mut sub = b"aeabi\0".to_vec();
        sub.push(1);
        sub.extend_from_slice(&((file_attrs.len() + 5) as u32).to_le_bytes());
        sub.extend_from_slice(&file_attrs);
        attrs.extend_from_slice(&((sub.len() + 4) as u32).to_le_bytes());
        attrs.extend_from_slice(&sub);
        let attrs_off = h.len();
        h.extend_from_slice(&attrs);
        let shoff = h.len();
        h.extend_from_slice(&[0u8; 40]); // null section
        let mut sh = [0u8; 40];
        sh[4..8].copy_from_slice(&SHT_ARM_ATTRIBUTES.to_le_bytes());
        sh[16..20].copy_from_slice(&(attrs_off as u32).to_le_bytes());
        sh[20..24].copy_from_slice(&(attrs.len() as u32).to_le_bytes());
        h.extend_from_slice(&sh);
        h[32..36].copy_from_slice(&(shoff as u32).to_le_bytes());
        h[46..48].copy_from_slice(&40u16.to_le_bytes());
        h[48..50].copy_from_slice(&2u16.to_le_bytes());
        h
    }

    #[test]
    fn arm_variant_comes_from_the_attributes_section() {
        assert_eq!(
            platform_from_elf(&arm_elf(10)).unwrap().to_string(),
            "linux/arm/v7"
        );
        assert_eq!(
            platform_from_elf(&arm_elf(6)).unwrap().to_string(),
            "linux/arm/v6"
        );
        let mut no_sections = arm_elf(10);
        no_sections[48] = 0;
        assert_eq!(
            platform_from_elf(&no_sections).unwrap().to_string(),
            "linux/arm"
        );
    }

    /// A real executable of the host, as goblin reads it.
    #[test]
    fn the_host_binaries_give_the_host_platform() {
        let data = std::fs::read("/bin/true").unwrap();
        let want = match std::env::consts::ARCH {
            "x86_64" => "linux/amd64",
            "aarch64" => "linux/arm64/v8",
            other => return eprintln!("no expectation for {other}"),
        };
        assert_eq!(platform_from_elf(&data).unwrap().to_string(), want);
    }

    #[test]
    fn timestamps_format_as_rfc3339() {
        assert_eq!(rfc3339(0).unwrap(), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_771_088_733).unwrap(), "2026-02-14T17:05:33Z");
        assert_eq!(rfc3339(951_782_400).unwrap(), "2000-02-29T00:00:00Z");
        let err = rfc3339(i64::MAX / 2).unwrap_err();
        assert!(format!("{err:#}").contains("out of range"), "{err:#}");
    }

    #[test]
    fn platform_strings_parse() {
        let p: Platform = "linux/arm/v7".parse().unwrap();
        assert_eq!(p.variant.as_deref(), Some("v7"));
        assert!("linux/".parse::<Platform>().is_err());
        assert!("a/b/c/d".parse::<Platform>().is_err());
    }
}
