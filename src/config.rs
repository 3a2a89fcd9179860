//! The build's settings: each declared once in [`Settings`] (or [`InputSettings`]) as both a
//! command-line option and a key of the TOML file (see `examples/gentoo-mkimg.toml`), merged
//! once (the command line wins), their defaults filled in one place ([`Settings::into_plan`])
//! to make the plain [`BuildPlan`]. Unknown keys in the file are errors, so a typo never goes
//! unnoticed. Fetching the stage3 and snapshot is the inputs step's: this module only names
//! them ([`Settings::sources`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::engine::EngineKind;
use crate::image::config::Platform;
use crate::image::layer::{DEFAULT_MAX_LAYERS, LayerCompression, LayerSplit, MIN_LAYERS};
use crate::inputs::{self, Source};

/// The runtime set installed into rt: the old tool's set, updated for today's ::gentoo. Since
/// 2022 `/bin/sh` and `awk` are symlinks owned by app-alternatives packages that nothing
/// depends on; `useradd`/`groupadd` (sys-apps/shadow) are needed by every acct-* package a
/// later `emerge -K` brings; and libstdc++/libgcc_s come only from sys-devel/gcc, whose
/// compiler parts INSTALL_MASK leaves out.
pub const DEFAULT_RT_PACKAGES: &[&str] = &[
    "sys-apps/baselayout",
    "app-alternatives/sh",
    "app-alternatives/awk",
    "app-arch/bzip2",
    "app-arch/gzip",
    "app-arch/tar",
    "app-arch/xz-utils",
    "app-shells/bash",
    "net-misc/iputils",
    "net-misc/rsync",
    "net-misc/wget",
    "sys-apps/coreutils",
    "sys-apps/file",
    "sys-apps/findutils",
    "sys-apps/gawk",
    "sys-apps/grep",
    "sys-apps/kbd",
    "sys-apps/less",
    "sys-apps/openrc",
    "sys-process/procps",
    "sys-process/psmisc",
    "sys-apps/sed",
    "sys-apps/shadow",
    "sys-apps/which",
    "sys-apps/util-linux",
    "sys-devel/gcc",
    "virtual/libc",
    "virtual/package-manager",
    "virtual/service-manager",
];

/// What rt leaves out: docs, headers, static libraries, and of gcc everything but its runtime
/// libraries (the compiler programs live in libexec on Gentoo, in lib where a gcc is built
/// with libexecdir=/usr/lib; the drivers in gcc-bin).
pub const DEFAULT_INSTALL_MASK: &[&str] = &[
    "/usr/share/man",
    "/usr/share/info",
    "/usr/share/doc",
    "/usr/share/gtk-doc",
    "/usr/include",
    "/usr/lib/charset.alias",
    "/usr/lib64/charset.alias",
    "/usr/share/gcc-data/*/man",
    "/usr/share/gcc-data/*/info",
    "/usr/*-linux-*/gcc-bin",
    "/usr/lib/gcc/*/*/plugin",
    "/usr/lib/gcc/*/*/include",
    "/usr/lib/gcc/*/*/include-fixed",
    "/usr/lib/gcc/*/*/cc1*",
    "/usr/lib/gcc/*/*/lto1",
    "/usr/lib/gcc/*/*/lto-wrapper",
    "/usr/lib/gcc/*/*/collect2",
    "/usr/libexec/gcc",
    "*.a",
    "*.la",
    "*.h",
    "*.o",
];

/// An extra ebuild repository from a host directory.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraRepo {
    /// The repository's name (its profiles/repo_name).
    pub name: String,
    /// Host directory holding it; mounted read-only at /var/db/repos/NAME.
    pub path: PathBuf,
    #[serde(default)]
    pub priority: Option<i32>,
}

/// Space-separated package atoms on the command line, a list of them in the file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Atoms(pub Vec<String>);

impl std::str::FromStr for Atoms {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Atoms(s.split_whitespace().map(str::to_string).collect()))
    }
}

/// Declares a settings struct whose every field is optional, with `or`, which merges two of
/// them field by field: a setting is written once, with its flag, its file key and its help.
macro_rules! settings {
    ($(#[$meta:meta])* pub struct $name:ident {
        $( $(#[$field_meta:meta])* pub $field:ident: Option<$ty:ty>, )*
    }) => {
        $(#[$meta])*
        pub struct $name {
            $( $(#[$field_meta])* pub $field: Option<$ty>, )*
        }

        impl $name {
            /// `self`'s values, and `under`'s where `self` has none.
            pub fn or(self, under: Self) -> Self {
                Self { $( $field: self.$field.or(under.$field), )* }
            }
        }
    };
}

settings! {
    /// Every setting of a build: an option or argument of `build` and a key of the config
    /// file alike (the key is the option's name with `_` for `-`; `check` is `--no-check`).
    /// Nothing here has a default: [`Settings::into_plan`] fills them in, in one place.
    #[derive(Debug, Default, Clone, clap::Args, Deserialize)]
    pub struct Settings {
        /// The stage3: a tarball, a URL, or stage3:VARIANT[@TIMESTAMP] from the mirror
        /// [default without arguments: stage3:ARCH-musl-openrc, ARCH the --platform's, else
        /// the host's: stage3:amd64-musl-openrc on amd64].
        pub stage3: Option<String>,
        /// The Portage tree: a snapshot tarball, a squashfs snapshot, a directory, a URL, or
        /// snapshot:latest, snapshot:YYYYMMDD, snapshot:sqfs:latest [default: snapshot:latest].
        pub snapshot: Option<String>,
        /// Registry/namespace part of the image names, e.g. `localhost` or `docker.io/me`
        /// [default: localhost].
        pub repo: Option<String>,
        /// Prefix of the image names: REPO/BASENAME-{raw,dev,rt}:TAG [default: gentoo-musl
        /// without a STAGE3, else gentoo].
        pub basename: Option<String>,
        /// Tag of the images; also names packages/TAG and portage/TAG [default: the stage's
        /// timestamp or name].
        #[arg(value_name = "TAG")]
        pub tag: Option<String>,
        /// Where the build runs [default: sandbox].
        #[arg(long, value_enum)]
        pub engine: Option<EngineKind>,
        /// Parallel jobs for make and emerge; above 1, dev and rt are merged at the same time
        /// [default: the CPU count].
        #[arg(long)]
        pub jobs: Option<usize>,
        /// USE flags added for the build, e.g. "-X ipv6" (a value may start with "-").
        #[arg(long = "use", value_name = "FLAGS", allow_hyphen_values = true)]
        #[serde(rename = "use")]
        pub use_flags: Option<String>,
        /// The runtime package set installed into rt (space-separated atoms) [default:
        /// sys-apps/baselayout app-alternatives/sh app-alternatives/awk app-arch/bzip2
        /// app-arch/gzip app-arch/tar app-arch/xz-utils app-shells/bash net-misc/iputils
        /// net-misc/rsync net-misc/wget sys-apps/coreutils sys-apps/file sys-apps/findutils
        /// sys-apps/gawk sys-apps/grep sys-apps/kbd sys-apps/less sys-apps/openrc
        /// sys-process/procps sys-process/psmisc sys-apps/sed sys-apps/shadow sys-apps/which
        /// sys-apps/util-linux sys-devel/gcc (its runtime libraries: the compiler is masked)
        /// virtual/libc virtual/package-manager virtual/service-manager].
        #[arg(long, value_name = "ATOMS")]
        pub rt_packages: Option<Atoms>,
        /// Extra packages built and installed into dev (space-separated atoms).
        #[arg(long, value_name = "ATOMS")]
        pub dev_packages: Option<Atoms>,
        /// What rt leaves out (INSTALL_MASK patterns; config file only) [default: docs,
        /// headers, static libraries and gcc's compiler programs].
        #[arg(skip)]
        pub install_mask: Option<Vec<String>>,
        /// The Portage profile to build with, as under the snapshot's profiles/ (e.g.
        /// default/linux/amd64/23.0/hardened) [default: the stage's]. For the whole build: the
        /// stage must have the profile's layout (split-usr or merged-usr).
        #[arg(long, value_name = "PROFILE")]
        pub profile: Option<String>,
        /// The platform the stage must be, e.g. linux/arm64 (a stage of another architecture
        /// is refused) [default: the stage's, read from its programs]. A stage of another
        /// architecture than the host's runs through a qemu-user binfmt_misc handler. Several,
        /// comma-separated (linux/amd64,linux/arm64): each is built from its own stage3 (a
        /// stage3:VARIANT names each platform's, or see stage3_by_platform) as REF:TAG-ARCH,
        /// and raw, dev and rt are each stored as one image index of them.
        #[arg(long, value_name = "PLATFORM[,PLATFORM...]")]
        pub platform: Option<String>,
        /// The stage3 of each platform of a multi-platform build, by platform (config file
        /// only: `[stage3_by_platform]` with `"linux/arm64" = "stage3-arm64-....tar.xz"`);
        /// a tarball, a URL or stage3:VARIANT each.
        #[arg(skip)]
        pub stage3_by_platform: Option<BTreeMap<String, String>>,
        /// Do not check rt after the build (every ELF's interpreter and libraries, every #!
        /// interpreter, /bin/sh); a warning says so. In the file: `check = false`.
        #[arg(long = "no-check", num_args = 0, default_missing_value = "false")]
        pub check: Option<bool>,
        /// Go on building other packages when one fails (emerge --keep-going).
        #[arg(long, num_args = 0, default_missing_value = "true")]
        pub keep_going: Option<bool>,
        /// Compression of the image layers [default: gzip].
        #[arg(long, value_enum)]
        pub compression: Option<LayerCompression>,
        /// How dev and rt are cut into layers: by package (an update changes only the layers
        /// of the packages that changed, and dev and rt share the layers of packages they
        /// hold alike), or one layer each [default: packages].
        #[arg(long, value_enum, value_name = "HOW")]
        pub layers: Option<LayerSplit>,
        /// With --layers packages: at most this many layers per image (default 32; at least
        /// 2).
        #[arg(long, value_name = "N")]
        pub max_layers: Option<usize>,
        /// Also write the SPDX 2.3 SBOMs of dev and rt to DIR/dev.spdx.json and
        /// DIR/rt.spdx.json (the store keeps them anyway, attached to the images; `push`
        /// sends them along).
        #[arg(long, value_name = "DIR")]
        pub sbom: Option<PathBuf>,
        /// Lines added to the stage's make.conf (config file only).
        #[arg(skip)]
        pub make_conf: Option<Vec<String>>,
        /// Lines of /etc/portage/package.use (config file only).
        #[arg(skip)]
        pub package_use: Option<Vec<String>>,
        /// Lines of /etc/portage/package.accept_keywords (config file only).
        #[arg(skip)]
        pub package_accept_keywords: Option<Vec<String>>,
        /// Lines of /etc/portage/package.mask (config file only).
        #[arg(skip)]
        pub package_mask: Option<Vec<String>>,
        /// Lines of /etc/portage/package.unmask (config file only).
        #[arg(skip)]
        pub package_unmask: Option<Vec<String>>,
        /// Extra ebuild repositories from host directories (config file only: `[[repos]]`).
        #[arg(skip)]
        pub repos: Option<Vec<ExtraRepo>>,
    }
}

settings! {
    /// Where inputs come from and how they are checked (build, shell, import, fetch): options,
    /// and keys of `build`'s config file.
    #[derive(Debug, Default, Clone, PartialEq, Eq, clap::Args, Deserialize)]
    pub struct InputSettings {
        /// Gentoo mirror for stage3:VARIANT and snapshot:... sources
        /// [default: https://distfiles.gentoo.org].
        #[arg(long, value_name = "URL")]
        pub mirror: Option<String>,
        /// OpenPGP keys to verify with [default: /usr/share/openpgp-keys/gentoo-release.asc,
        /// else Gentoo's keys fetched by WKD].
        #[arg(long, value_name = "FILE")]
        pub keyring: Option<PathBuf>,
        /// Trust signatures by this key (fingerprint; repeatable). Replaces the built-in pins
        /// (Gentoo's release and snapshot keys).
        #[arg(long = "trusted-key", value_name = "FINGERPRINT")]
        pub trusted_keys: Option<Vec<String>>,
        /// Verify local files too: their companion files must sit beside them. In the file:
        /// `verify = true`, or `false` for --no-verify.
        #[arg(long, num_args = 0, default_missing_value = "true", conflicts_with = "no_verify")]
        pub verify: Option<bool>,
        /// Verify nothing, not even downloads (prints a warning).
        #[arg(long, num_args = 0, default_missing_value = "true")]
        #[serde(skip)]
        pub no_verify: Option<bool>,
    }
}

impl InputSettings {
    /// `Some(true)`: verify local files too; `Some(false)`: verify nothing; `None`: verify
    /// downloads.
    pub fn verify(&self) -> Option<bool> {
        match self.no_verify {
            Some(true) => Some(false),
            _ => self.verify,
        }
    }
}

/// A config file: the build's settings and the inputs' (see `examples/gentoo-mkimg.toml`).
/// Relative paths in it are taken relative to its directory.
#[derive(Debug, Default, Clone)]
pub struct ConfigFile {
    pub settings: Settings,
    pub inputs: InputSettings,
}

impl ConfigFile {
    /// Read and check a config file: a key that neither the build's nor the inputs' settings
    /// know is an error naming its line.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the config file", path.display()))?;
        let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
        let mut unknown = Vec::new();
        let settings: Settings = parse(&text, path, &line_of, &mut unknown)?;
        let mut unknown_to_inputs = Vec::new();
        let inputs: InputSettings = parse(&text, path, &line_of, &mut unknown_to_inputs)?;
        if let Some(key) = unknown.iter().find(|k| unknown_to_inputs.contains(k)) {
            let line = key_line(&text, key)
                .map(|l| format!(":{l}"))
                .unwrap_or_default();
            bail!("{}{line}: unknown key `{key}`", path.display());
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let rel = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
        let source = |spec: String| match Source::parse(&spec) {
            Ok(Source::Path(p)) if p.is_relative() => base.join(p).to_string_lossy().into_owned(),
            _ => spec,
        };
        Ok(ConfigFile {
            settings: Settings {
                stage3: settings.stage3.map(source),
                stage3_by_platform: settings.stage3_by_platform.map(|by| {
                    by.into_iter()
                        .map(|(platform, spec)| (platform, source(spec)))
                        .collect()
                }),
                snapshot: settings.snapshot.map(source),
                sbom: settings.sbom.map(rel),
                repos: settings.repos.map(|repos| {
                    repos
                        .into_iter()
                        .map(|r| ExtraRepo {
                            path: rel(r.path),
                            ..r
                        })
                        .collect()
                }),
                ..settings
            },
            inputs: InputSettings {
                keyring: inputs.keyring.map(rel),
                ..inputs
            },
        })
    }
}

/// One reading of a config file as `T`, gathering the top-level keys `T` does not know.
fn parse<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &Path,
    line_of: &dyn Fn(usize) -> usize,
    unknown: &mut Vec<String>,
) -> Result<T> {
    let located = |e: toml::de::Error| match e.span() {
        Some(span) => anyhow::anyhow!(
            "{}:{}: {}",
            path.display(),
            line_of(span.start),
            e.message()
        ),
        None => anyhow::anyhow!("{}: {}", path.display(), e.message()),
    };
    let de = toml::de::Deserializer::parse(text).map_err(located)?;
    serde_ignored::deserialize(de, |key| unknown.push(key.to_string())).map_err(located)
}

/// The line where a top-level key or table is written.
fn key_line(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|line| {
            let line = line.trim_start().trim_start_matches('[').trim_start();
            line.strip_prefix(key)
                .or_else(|| line.strip_prefix(&format!("\"{key}\"")))
                .is_some_and(|rest| rest.trim_start().starts_with(['=', ']', '.']))
        })
        .map(|i| i + 1)
}

/// Everything a build needs, resolved.
#[derive(Debug, Clone)]
pub struct BuildPlan {
    pub stage3: PathBuf,
    pub snapshot: PathBuf,
    pub repo: String,
    pub basename: String,
    pub tag: String,
    pub engine: EngineKind,
    pub jobs: usize,
    pub use_flags: String,
    pub dev_packages: Vec<String>,
    pub rt_packages: Vec<String>,
    pub install_mask: Vec<String>,
    /// The profile to build with, relative to the snapshot's profiles/ (`None`: the stage's).
    pub profile: Option<String>,
    /// The platform the stage must be (`None`: whatever it is).
    pub platform: Option<Platform>,
    /// Audit rt before tagging it (see [`crate::audit`]).
    pub check: bool,
    pub keep_going: bool,
    pub compression: LayerCompression,
    /// How dev and rt are cut into layers, and into at most how many.
    pub layers: LayerSplit,
    pub max_layers: usize,
    /// Where to write `dev.spdx.json` and `rt.spdx.json` besides the store (see
    /// [`crate::sbom`]); the store gets them anyway.
    pub sbom: Option<PathBuf>,
    pub make_conf: Vec<String>,
    pub package_use: Vec<String>,
    pub package_accept_keywords: Vec<String>,
    pub package_mask: Vec<String>,
    pub package_unmask: Vec<String>,
    pub repos: Vec<ExtraRepo>,
}

/// A profile name as under a repository's profiles/, e.g. `default/linux/amd64/23.0/musl`:
/// relative, without `..`, so it cannot point outside the snapshot.
fn check_profile(name: &str) -> Result<String> {
    let name = name.trim().trim_end_matches('/');
    if name.is_empty()
        || name.starts_with('/')
        || name
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        || name.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        bail!(
            "profile {name:?}: expected a path under the snapshot's profiles/, \
             e.g. default/linux/amd64/23.0/musl"
        );
    }
    Ok(name.to_string())
}

impl Settings {
    /// The engine the build runs in.
    pub fn engine(&self) -> EngineKind {
        self.engine.unwrap_or(EngineKind::Sandbox)
    }

    /// The stage3 and the snapshot to fetch, once the settings are found sound (so nothing
    /// is downloaded for a build that cannot start). Without any stage3, the newest musl
    /// OpenRC stage of the platform (see [`Settings::default_stage3`]) with the latest
    /// snapshot.
    pub fn sources(&self) -> Result<(Source, Source)> {
        self.checked()?;
        let stage3 = match &self.stage3 {
            Some(given) => Source::parse(given)?,
            None => self.default_stage3()?,
        };
        let snapshot = match (&self.snapshot, &self.stage3) {
            (Some(s), _) => Source::parse(s)?,
            (None, None) => Source::parse(inputs::DEFAULT_SNAPSHOT)?,
            (None, Some(_)) => bail!("no snapshot given (argument or config key `snapshot`)"),
        };
        Ok((stage3, snapshot))
    }

    /// The stage3 when none is named: the musl OpenRC stage of the one `--platform` given,
    /// else of the host's architecture (`stage3:amd64-musl-openrc` on amd64,
    /// `stage3:arm64-musl-openrc` on arm64). A named stage3 is never changed: with
    /// `--platform`, the build checks that it is that platform.
    fn default_stage3(&self) -> Result<Source> {
        let platform = match self.platforms()?.as_slice() {
            [one] => one.clone(),
            _ => Platform {
                architecture: crate::image::config::host_architecture().to_string(),
                variant: None,
            },
        };
        Source::parse(inputs::DEFAULT_STAGE3)?
            .for_platform(&platform)
            .with_context(|| format!("no default stage3 for {platform}: name a stage3"))
    }

    /// The platforms to build, as `--platform` lists them (none: the stage's own).
    pub fn platforms(&self) -> Result<Vec<Platform>> {
        match &self.platform {
            Some(list) => Platform::parse_list(list),
            None => Ok(Vec::new()),
        }
    }

    /// The stage3 of each platform of a multi-platform build: the config file's
    /// `stage3_by_platform`, else the stage3:VARIANT given, for each platform's architecture.
    pub fn platform_sources(&self) -> Result<Vec<(Platform, Source)>> {
        let platforms = self.platforms()?;
        if let Some(by) = &self.stage3_by_platform {
            let mut named: Vec<(Platform, &String)> = Vec::new();
            for (key, spec) in by {
                let platform: Platform = key
                    .parse()
                    .with_context(|| format!("stage3_by_platform: key {key:?}"))?;
                if !platforms.contains(&platform) {
                    bail!(
                        "stage3_by_platform names {platform}, which --platform does not list \
                         ({})",
                        self.platform.as_deref().unwrap_or("none")
                    );
                }
                named.push((platform, spec));
            }
            return platforms
                .into_iter()
                .map(|platform| {
                    let Some((_, spec)) = named.iter().find(|(p, _)| *p == platform) else {
                        bail!("stage3_by_platform names no stage3 for {platform}");
                    };
                    Ok((platform, Source::parse(spec)?))
                })
                .collect();
        }
        let given = self.stage3.as_deref().unwrap_or(inputs::DEFAULT_STAGE3);
        platforms
            .into_iter()
            .map(|platform| {
                let source = Source::parse(given)?
                    .for_platform(&platform)
                    .with_context(|| {
                        format!(
                            "the stage3 of {platform}: give a stage3:VARIANT, or each platform's \
                         stage3 in the config file's stage3_by_platform"
                        )
                    })?;
                Ok((platform, source))
            })
            .collect()
    }

    /// The settings' own checks: jobs, max layers, profile, platform.
    fn checked(&self) -> Result<(usize, Option<String>, Option<Platform>)> {
        if self.jobs == Some(0) {
            bail!("jobs must be at least 1");
        }
        let max_layers = self.max_layers.unwrap_or(DEFAULT_MAX_LAYERS);
        if max_layers < MIN_LAYERS {
            bail!(
                "max-layers must be at least {MIN_LAYERS} (one layer shared by the packages, \
                 and the last); --layers single makes one-layer images"
            );
        }
        let profile = self.profile.as_deref().map(check_profile).transpose()?;
        // One platform: the stage must be it; several: each build gets its own.
        let platforms = self.platforms()?;
        let platform = match platforms.as_slice() {
            [one] => Some(one.clone()),
            _ => None,
        };
        Ok((max_layers, profile, platform))
    }

    /// The plan: every default filled in, with the local stage3 and snapshot that the
    /// inputs step made of [`Settings::sources`].
    pub fn into_plan(self, stage3: PathBuf, snapshot: PathBuf) -> Result<BuildPlan> {
        let (max_layers, profile, platform) = self.checked()?;
        let defaulted = self.stage3.is_none();
        let engine = self.engine();
        let owned = |list: &[&str]| list.iter().map(|s| s.to_string()).collect();
        Ok(BuildPlan {
            tag: self.tag.unwrap_or_else(|| inputs::tag_from_stage(&stage3)),
            stage3,
            snapshot,
            repo: self.repo.unwrap_or_else(|| "localhost".to_string()),
            basename: self
                .basename
                .unwrap_or_else(|| if defaulted { "gentoo-musl" } else { "gentoo" }.to_string()),
            engine,
            jobs: self.jobs.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            }),
            use_flags: self.use_flags.unwrap_or_default(),
            dev_packages: self.dev_packages.unwrap_or_default().0,
            rt_packages: self
                .rt_packages
                .map(|a| a.0)
                .unwrap_or_else(|| owned(DEFAULT_RT_PACKAGES)),
            install_mask: self
                .install_mask
                .unwrap_or_else(|| owned(DEFAULT_INSTALL_MASK)),
            profile,
            platform,
            check: self.check.unwrap_or(true),
            keep_going: self.keep_going.unwrap_or(false),
            compression: self.compression.unwrap_or_default(),
            layers: self.layers.unwrap_or_default(),
            max_layers,
            sbom: self.sbom,
            make_conf: self.make_conf.unwrap_or_default(),
            package_use: self.package_use.unwrap_or_default(),
            package_accept_keywords: self.package_accept_keywords.unwrap_or_default(),
            package_mask: self.package_mask.unwrap_or_default(),
            package_unmask: self.package_unmask.unwrap_or_default(),
            repos: self.repos.unwrap_or_default(),
        })
    }
}

impl BuildPlan {
    /// `REPO/BASENAME-KIND:TAG`.
    pub fn reference(&self, kind: &str) -> String {
        format!("{}/{}-{kind}:{}", self.repo, self.basename, self.tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The build's steps for tests: the file under the command line, local inputs only.
    fn resolve(file: Option<&ConfigFile>, cli: Settings) -> Result<BuildPlan> {
        let settings = match file {
            Some(f) => cli.or(f.settings.clone()),
            None => cli,
        };
        let (stage3, snapshot) = settings.sources()?;
        let stage3 = local(&stage3).context("the stage3")?;
        let snapshot = local(&snapshot).context("the snapshot")?;
        settings.into_plan(stage3, snapshot)
    }

    /// The inputs step for tests: local paths only.
    fn local(source: &Source) -> Result<PathBuf> {
        match source {
            Source::Path(p) => Ok(p.clone()),
            other => bail!("not local: {other:?}"),
        }
    }

    #[test]
    fn unknown_keys_are_errors_with_a_line_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "stage3 = \"s.tar.xz\"\n\nrt_pakages = [\"a\"]\n").unwrap();
        let err = ConfigFile::load(&path).unwrap_err().to_string();
        assert!(err.contains("c.toml:3"), "{err}");
        assert!(err.contains("rt_pakages"), "{err}");
        // A table of an unknown name, and a key that only the command line has.
        std::fs::write(&path, "mirror = \"http://127.0.0.1:1/m\"\n[extra]\na = 1\n").unwrap();
        let err = ConfigFile::load(&path).unwrap_err().to_string();
        assert!(err.contains("c.toml:2") && err.contains("extra"), "{err}");
        std::fs::write(&path, "no_verify = true\n").unwrap();
        let err = ConfigFile::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("c.toml:1") && err.contains("no_verify"),
            "{err}"
        );
        // A value of the wrong type is named with its line too.
        std::fs::write(&path, "stage3 = \"s\"\njobs = \"many\"\n").unwrap();
        let err = ConfigFile::load(&path).unwrap_err().to_string();
        assert!(err.contains("c.toml:2"), "{err}");
    }

    #[test]
    fn command_line_wins_and_paths_are_relative_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "stage3 = \"stage3-amd64-musl-openrc-20260214T170533Z.tar.xz\"\n\
             snapshot = \"snap\"\nuse = \"-X\"\njobs = 3\nrt_packages = [\"app-misc/hello\"]\n\
             sbom = \"sboms\"\n[[repos]]\nname = \"local\"\npath = \"overlay\"\n",
        )
        .unwrap();
        let file = ConfigFile::load(&path).unwrap();
        let cli = Settings {
            use_flags: Some("ipv6".into()),
            basename: Some("musl".into()),
            ..Default::default()
        };
        let plan = resolve(Some(&file), cli).unwrap();
        assert_eq!(plan.use_flags, "ipv6");
        assert_eq!(plan.jobs, 3);
        assert_eq!(plan.snapshot, dir.path().join("snap"));
        assert_eq!(plan.sbom, Some(dir.path().join("sboms")));
        assert_eq!(plan.repos[0].path, dir.path().join("overlay"));
        assert_eq!(plan.tag, "20260214T170533Z");
        assert_eq!(plan.rt_packages, ["app-misc/hello"]);
        assert_eq!(plan.reference("rt"), "localhost/musl-rt:20260214T170533Z");
        assert!(plan.install_mask.iter().any(|m| m == "*.a"));
    }

    #[test]
    fn the_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/gentoo-mkimg.toml");
        let file = ConfigFile::load(&path).unwrap();
        assert_eq!(file.settings.basename.as_deref(), Some("gentoo-musl"));
        assert_eq!(file.settings.engine, Some(EngineKind::Sandbox));
        let plan = resolve(Some(&file), Settings::default()).unwrap();
        assert_eq!(plan.tag, "20260214T170533Z");
        assert_eq!(plan.rt_packages.len(), DEFAULT_RT_PACKAGES.len());
    }

    #[test]
    fn profiles_stay_inside_the_snapshot_and_the_check_is_on_by_default() {
        let cli = |profile: &str| Settings {
            stage3: Some("stage3-amd64-musl-openrc-20260101T000000Z.tar.xz".into()),
            snapshot: Some("snap".into()),
            profile: Some(profile.into()),
            ..Default::default()
        };
        let plan = resolve(None, cli("default/linux/amd64/23.0/split-usr/")).unwrap();
        assert_eq!(
            plan.profile.as_deref(),
            Some("default/linux/amd64/23.0/split-usr")
        );
        assert!(plan.check);
        for bad in ["/etc", "../x", "a/../../b", "", "a b"] {
            // Refused before anything is fetched.
            let err = cli(bad).sources().unwrap_err();
            assert!(err.to_string().contains("profile"), "{bad}: {err}");
        }
        let no_check = Settings {
            check: Some(false),
            ..cli("default/linux/amd64/23.0")
        };
        assert!(!resolve(None, no_check).unwrap().check);
    }

    #[test]
    fn missing_inputs_are_named() {
        let cli = Settings {
            stage3: Some("stage3-amd64-openrc-20260101T000000Z.tar.xz".into()),
            ..Default::default()
        };
        let err = resolve(None, cli).unwrap_err();
        assert!(err.to_string().contains("snapshot"), "{err}");
    }

    /// On an amd64 host: the amd64 musl stage (an arm64 host gets the arm64 one, below).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn without_inputs_the_newest_musl_stage_and_snapshot_are_built() {
        let settings = Settings::default();
        let asked = settings.sources().unwrap();
        assert_eq!(
            asked,
            (
                Source::parse("stage3:amd64-musl-openrc").unwrap(),
                Source::parse("snapshot:latest").unwrap()
            )
        );
        let plan = settings
            .into_plan(
                "/c/stage3-amd64-musl-openrc-20261122T170547Z.tar.xz".into(),
                "/c/gentoo-latest.tar.xz".into(),
            )
            .unwrap();
        assert_eq!(
            plan.reference("dev"),
            "localhost/gentoo-musl-dev:20261122T170547Z"
        );
    }

    #[test]
    fn without_a_stage3_the_platforms_own_musl_stage_is_built() {
        let stage3 = |platform: Option<&str>, stage3: Option<&str>| -> Result<Source> {
            let settings = Settings {
                platform: platform.map(str::to_string),
                stage3: stage3.map(str::to_string),
                snapshot: stage3.map(|_| "snapshot:latest".to_string()),
                ..Default::default()
            };
            Ok(settings.sources()?.0)
        };
        let parse = |s: &str| Source::parse(s).unwrap();
        assert_eq!(
            stage3(Some("linux/arm64"), None).unwrap(),
            parse("stage3:arm64-musl-openrc")
        );
        assert_eq!(
            stage3(Some("linux/amd64"), None).unwrap(),
            parse("stage3:amd64-musl-openrc")
        );
        assert_eq!(
            stage3(Some("linux/386"), None).unwrap(),
            parse("stage3:i686-musl-openrc")
        );
        // a named stage3 is kept: the build then checks it against --platform
        assert_eq!(
            stage3(Some("linux/arm64"), Some("stage3:amd64-musl-openrc")).unwrap(),
            parse("stage3:amd64-musl-openrc")
        );
        // the host's own, on the hosts whose Gentoo name is known
        let host = crate::image::config::host_architecture();
        let gentoo = match host {
            "amd64" | "arm64" | "ppc64le" | "s390x" => Some(host),
            "386" => Some("i686"),
            _ => None,
        };
        if let Some(gentoo) = gentoo {
            assert_eq!(
                stage3(None, None).unwrap(),
                parse(&format!("stage3:{gentoo}-musl-openrc"))
            );
        }
        let err = stage3(Some("linux/arm/v7"), None).unwrap_err();
        assert!(
            format!("{err:#}").contains("no default stage3 for linux/arm/v7: name a stage3"),
            "{err:#}"
        );
    }

    #[test]
    fn each_platform_gets_its_stage3() {
        let platforms = |list: &str, stage3: Option<&str>| -> Result<Vec<String>> {
            let settings = Settings {
                platform: Some(list.to_string()),
                stage3: stage3.map(str::to_string),
                snapshot: Some("snapshot:latest".to_string()),
                ..Settings::default()
            };
            Ok(settings
                .platform_sources()?
                .into_iter()
                .map(|(p, s)| format!("{p}={s:?}"))
                .collect())
        };
        let variant = |v: &str| format!("{:?}", Source::parse(v).unwrap());
        assert_eq!(
            platforms("linux/amd64,linux/arm64,linux/386", None).unwrap(),
            [
                format!("linux/amd64={}", variant("stage3:amd64-musl-openrc")),
                format!("linux/arm64={}", variant("stage3:arm64-musl-openrc")),
                format!("linux/386={}", variant("stage3:i686-musl-openrc")),
            ]
        );
        assert_eq!(
            platforms(
                "linux/arm64/v8",
                Some("stage3:amd64-musl-hardened@20260214T170533Z")
            )
            .unwrap(),
            [format!(
                "linux/arm64/v8={}",
                variant("stage3:arm64-musl-hardened@20260214T170533Z")
            )]
        );
        for (list, stage3, error) in [
            (
                "linux/amd64,linux/amd64",
                None,
                "platform linux/amd64 is listed twice",
            ),
            (
                "linux/amd64,linux/arm/v7",
                None,
                "no stage3 variant name is known for linux/arm/v7",
            ),
            (
                "linux/amd64,linux/arm64",
                Some("/x/stage3.tar.xz"),
                "only a stage3:VARIANT names the stages of other platforms",
            ),
        ] {
            let got = format!("{:#}", platforms(list, stage3).unwrap_err());
            assert!(got.contains(error), "{list}: {got}");
        }
        // The config file's table: every platform needs its stage, and only listed ones.
        let by = |pairs: &[(&str, &str)]| Settings {
            platform: Some("linux/amd64,linux/arm64".to_string()),
            stage3_by_platform: Some(
                pairs
                    .iter()
                    .map(|(p, s)| (p.to_string(), s.to_string()))
                    .collect(),
            ),
            ..Settings::default()
        };
        let got = by(&[("linux/arm64", "/b.tar"), ("linux/amd64", "/a.tar")])
            .platform_sources()
            .unwrap();
        assert_eq!(
            got.iter()
                .map(|(p, s)| format!("{p} {s:?}"))
                .collect::<Vec<_>>(),
            [
                format!("linux/amd64 {:?}", Source::Path("/a.tar".into())),
                format!("linux/arm64 {:?}", Source::Path("/b.tar".into())),
            ]
        );
        let err = by(&[("linux/amd64", "/a.tar"), ("linux/riscv64", "/r.tar")])
            .platform_sources()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("names linux/riscv64, which --platform does not list"),
            "{err}"
        );
    }

    #[test]
    fn input_settings_merge_with_the_command_line_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "mirror = \"http://127.0.0.1:1/m\"\nkeyring = \"keys.asc\"\n\
             trusted_keys = [\"AAAA\"]\nverify = false\n",
        )
        .unwrap();
        let file = ConfigFile::load(&path).unwrap();
        let merged = InputSettings::default().or(file.inputs.clone());
        assert_eq!(merged.mirror.as_deref(), Some("http://127.0.0.1:1/m"));
        assert_eq!(merged.keyring, Some(dir.path().join("keys.asc")));
        assert_eq!(
            merged.trusted_keys.as_deref(),
            Some(&["AAAA".to_string()][..])
        );
        assert_eq!(merged.verify(), Some(false));
        let cli = InputSettings {
            trusted_keys: Some(vec!["BBBB".into()]),
            verify: Some(true),
            ..Default::default()
        };
        let merged = cli.or(file.inputs);
        assert_eq!(
            merged.trusted_keys.as_deref(),
            Some(&["BBBB".to_string()][..])
        );
        assert_eq!(merged.verify(), Some(true));
    }

    /// Each setting's flag sets it, and an absent flag leaves the file's value: `--no-check`
    /// and `--keep-going` are flags of `check` and `keep_going`, atoms split on spaces.
    #[test]
    fn flags_set_their_settings_and_absent_flags_set_nothing() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Probe {
            #[command(flatten)]
            settings: Settings,
            #[command(flatten)]
            inputs: InputSettings,
        }
        let none = Probe::try_parse_from(["probe"]).unwrap();
        assert_eq!(
            (none.settings.check, none.settings.keep_going),
            (None, None)
        );
        assert_eq!(
            (none.inputs.verify(), none.inputs.trusted_keys),
            (None, None)
        );
        let given = Probe::try_parse_from([
            "probe",
            "s.tar",
            "snap",
            "--no-check",
            "--keep-going",
            "--rt-packages",
            "a/b  c/d",
            "--no-verify",
            "--trusted-key",
            "K1",
            "--trusted-key",
            "K2",
        ])
        .unwrap();
        let s = given.settings;
        assert_eq!((s.check, s.keep_going), (Some(false), Some(true)));
        assert_eq!(s.rt_packages, Some(Atoms(vec!["a/b".into(), "c/d".into()])));
        assert_eq!(s.snapshot.as_deref(), Some("snap"));
        assert_eq!(given.inputs.verify(), Some(false));
        assert_eq!(given.inputs.trusted_keys.map(|k| k.len()), Some(2));
        assert!(Probe::try_parse_from(["probe", "--verify", "--no-verify"]).is_err());
    }

    /// The keys a serde struct reads (its `deserialize_struct` fields), without reading any.
    fn keys<T: serde::de::DeserializeOwned>() -> &'static [&'static str] {
        use serde::de::{Error as _, Visitor, value::Error};
        struct Fields(&'static [&'static str]);
        impl<'de> serde::Deserializer<'de> for &mut Fields {
            type Error = Error;
            fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
                Err(Error::custom("not a struct"))
            }
            fn deserialize_struct<V: Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Error> {
                self.0 = fields;
                Err(Error::custom("fields read"))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
                byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
                identifier ignored_any
            }
        }
        let mut fields = Fields(&[]);
        let _ = T::deserialize(&mut fields);
        fields.0
    }

    /// A setting added to `Settings` or `InputSettings` is documented where users look: the
    /// example config (set or commented out) and the README's table of keys.
    #[test]
    fn every_key_is_in_the_example_config_and_the_readme() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let example = std::fs::read_to_string(root.join("examples/gentoo-mkimg.toml")).unwrap();
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        let all: Vec<&str> = keys::<Settings>()
            .iter()
            .chain(keys::<InputSettings>())
            .copied()
            .collect();
        assert!(all.len() > 25 && all.contains(&"use") && all.contains(&"verify"));
        for key in all {
            let in_example = example.lines().any(|line| {
                let line = line.trim_start_matches('#').trim_start();
                line.starts_with(&format!("{key} ="))
                    || line.starts_with(&format!("[[{key}]]"))
                    || line.starts_with(&format!("[{key}]"))
            });
            assert!(in_example, "key {key} is not in examples/gentoo-mkimg.toml");
            let in_readme =
                readme.contains(&format!("`{key}`")) || readme.contains(&format!("`[[{key}]]`"));
            assert!(in_readme, "key {key} is not in the README's table of keys");
        }
    }
}
