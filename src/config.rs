//! The build's settings: a TOML file (see `examples/gentoo-mkimg.toml`) and the command line,
//! merged into one plain [`BuildPlan`]. Command-line options win over the file; unknown keys
//! in the file are errors, so a typo never goes unnoticed.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::engine::EngineKind;
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

/// The TOML file, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub stage3: Option<String>,
    pub snapshot: Option<String>,
    pub repo: Option<String>,
    pub basename: Option<String>,
    pub tag: Option<String>,
    pub engine: Option<EngineKind>,
    pub jobs: Option<usize>,
    #[serde(rename = "use")]
    pub use_flags: Option<String>,
    pub dev_packages: Option<Vec<String>>,
    pub rt_packages: Option<Vec<String>>,
    pub install_mask: Option<Vec<String>>,
    pub profile: Option<String>,
    pub check: Option<bool>,
    pub keep_going: Option<bool>,
    pub compression: Option<LayerCompression>,
    pub layers: Option<LayerSplit>,
    pub max_layers: Option<usize>,
    /// Also write the SPDX SBOMs of dev and rt here (relative to the file).
    pub sbom: Option<PathBuf>,
    pub make_conf: Option<Vec<String>>,
    pub package_use: Option<Vec<String>>,
    pub package_accept_keywords: Option<Vec<String>>,
    pub package_mask: Option<Vec<String>>,
    pub package_unmask: Option<Vec<String>>,
    #[serde(default)]
    pub repos: Vec<ExtraRepo>,
    pub mirror: Option<String>,
    pub keyring: Option<PathBuf>,
    pub trusted_keys: Option<Vec<String>>,
    pub verify: Option<bool>,
}

/// Where inputs come from and how they are checked: the file's keys and the command line's
/// options, merged (the command line wins).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InputSettings {
    pub mirror: Option<String>,
    pub keyring: Option<PathBuf>,
    /// Replaces the built-in pins when not empty.
    pub trusted_keys: Vec<String>,
    /// `Some(true)`: verify local files too; `Some(false)`: verify nothing.
    pub verify: Option<bool>,
}

impl InputSettings {
    /// Merge the file (if any) under `self`; a relative keyring path in the file is taken
    /// relative to the file.
    pub fn merge_file(self, file: Option<(&Path, &FileConfig)>) -> InputSettings {
        let Some((path, f)) = file else { return self };
        let base = path.parent().unwrap_or(Path::new("."));
        InputSettings {
            mirror: self.mirror.or_else(|| f.mirror.clone()),
            keyring: self
                .keyring
                .or_else(|| f.keyring.as_ref().map(|k| base.join(k))),
            trusted_keys: if self.trusted_keys.is_empty() {
                f.trusted_keys.clone().unwrap_or_default()
            } else {
                self.trusted_keys
            },
            verify: self.verify.or(f.verify),
        }
    }
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the config file", path.display()))?;
        toml::from_str(&text).map_err(|e| {
            let msg = e.message().to_string();
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            match line {
                Some(l) => anyhow::anyhow!("{}:{l}: {msg}", path.display()),
                None => anyhow::anyhow!("{}: {msg}", path.display()),
            }
        })
    }
}

/// Command-line values for `build` (each `None` leaves the file's value).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub stage3: Option<String>,
    pub snapshot: Option<String>,
    pub repo: Option<String>,
    pub basename: Option<String>,
    pub tag: Option<String>,
    pub engine: Option<EngineKind>,
    pub jobs: Option<usize>,
    pub use_flags: Option<String>,
    pub dev_packages: Option<Vec<String>>,
    pub rt_packages: Option<Vec<String>>,
    pub profile: Option<String>,
    /// `--no-check`: skip the runtime audit of rt.
    pub no_check: bool,
    pub keep_going: bool,
    pub compression: Option<LayerCompression>,
    pub layers: Option<LayerSplit>,
    pub max_layers: Option<usize>,
    /// `--sbom DIR`.
    pub sbom: Option<PathBuf>,
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

/// The engine a build runs in: the command line's, else the config file's, else the sandbox.
pub fn engine(cli: Option<EngineKind>, file: Option<&FileConfig>) -> EngineKind {
    cli.or(file.and_then(|f| f.engine))
        .unwrap_or(EngineKind::Sandbox)
}

impl BuildPlan {
    /// Merge the file (if any) and the command line. Relative paths in the file are taken
    /// relative to the file's directory.
    ///
    /// `get` turns a stage3 or snapshot source (a path, a URL, `stage3:VARIANT`,
    /// `snapshot:latest`) into a local path: the inputs step. Without any stage3, the
    /// default is the newest amd64 musl OpenRC stage with the latest snapshot, named
    /// `gentoo-musl`.
    pub fn resolve(
        file: Option<(&Path, FileConfig)>,
        cli: Overrides,
        mut get: impl FnMut(&Source) -> Result<PathBuf>,
    ) -> Result<Self> {
        let (base, f) = match file {
            Some((path, f)) => (path.parent().map(Path::to_path_buf), f),
            None => (None, FileConfig::default()),
        };
        let engine = engine(cli.engine, Some(&f));
        let rel = |p: String| -> PathBuf {
            let p = PathBuf::from(p);
            match (&base, p.is_relative()) {
                (Some(b), true) => b.join(p),
                _ => p,
            }
        };
        // A source from the file: paths relative to the file.
        let from_file = |spec: String| -> Result<Source> {
            Ok(match Source::parse(&spec)? {
                Source::Path(p) => Source::Path(rel(p.to_string_lossy().into_owned())),
                other => other,
            })
        };
        let defaulted = cli.stage3.is_none() && f.stage3.is_none();
        let stage3 = match (cli.stage3, f.stage3) {
            (Some(s), _) => Source::parse(&s)?,
            (None, Some(s)) => from_file(s)?,
            (None, None) => Source::parse(inputs::DEFAULT_STAGE3)?,
        };
        let snapshot = match (cli.snapshot, f.snapshot) {
            (Some(s), _) => Source::parse(&s)?,
            (None, Some(s)) => from_file(s)?,
            (None, None) if defaulted => Source::parse(inputs::DEFAULT_SNAPSHOT)?,
            (None, None) => bail!("no snapshot given (argument or config key `snapshot`)"),
        };
        // Check the cheap things before fetching anything.
        let jobs_given = cli.jobs.or(f.jobs);
        if jobs_given == Some(0) {
            bail!("jobs must be at least 1");
        }
        let max_layers = cli
            .max_layers
            .or(f.max_layers)
            .unwrap_or(DEFAULT_MAX_LAYERS);
        if max_layers < MIN_LAYERS {
            bail!(
                "max-layers must be at least {MIN_LAYERS} (one layer shared by the packages, \
                 and the last); --layers single makes one-layer images"
            );
        }
        let profile = cli
            .profile
            .or(f.profile)
            .map(|p| check_profile(&p))
            .transpose()?;
        let stage3 = get(&stage3).context("the stage3")?;
        let snapshot = get(&snapshot).context("the snapshot")?;
        let tag = match cli.tag.or(f.tag) {
            Some(t) => t,
            None => crate::inputs::tag_from_stage(&stage3),
        };
        let jobs = jobs_given.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
        let repos = f
            .repos
            .into_iter()
            .map(|mut r| {
                r.path = rel(r.path.to_string_lossy().into_owned());
                r
            })
            .collect();
        Ok(BuildPlan {
            stage3,
            snapshot,
            repo: cli
                .repo
                .or(f.repo)
                .unwrap_or_else(|| "localhost".to_string()),
            basename: cli
                .basename
                .or(f.basename)
                .unwrap_or_else(|| if defaulted { "gentoo-musl" } else { "gentoo" }.to_string()),
            tag,
            engine,
            jobs,
            use_flags: cli.use_flags.or(f.use_flags).unwrap_or_default(),
            dev_packages: cli.dev_packages.or(f.dev_packages).unwrap_or_default(),
            rt_packages: cli
                .rt_packages
                .or(f.rt_packages)
                .unwrap_or_else(|| DEFAULT_RT_PACKAGES.iter().map(|s| s.to_string()).collect()),
            install_mask: f
                .install_mask
                .unwrap_or_else(|| DEFAULT_INSTALL_MASK.iter().map(|s| s.to_string()).collect()),
            profile,
            check: !cli.no_check && f.check.unwrap_or(true),
            keep_going: cli.keep_going || f.keep_going.unwrap_or(false),
            compression: cli.compression.or(f.compression).unwrap_or_default(),
            layers: cli.layers.or(f.layers).unwrap_or_default(),
            max_layers,
            sbom: cli
                .sbom
                .or(f.sbom.map(|p| rel(p.to_string_lossy().into_owned()))),
            make_conf: f.make_conf.unwrap_or_default(),
            package_use: f.package_use.unwrap_or_default(),
            package_accept_keywords: f.package_accept_keywords.unwrap_or_default(),
            package_mask: f.package_mask.unwrap_or_default(),
            package_unmask: f.package_unmask.unwrap_or_default(),
            repos,
        })
    }

    /// `REPO/BASENAME-KIND:TAG`.
    pub fn reference(&self, kind: &str) -> String {
        format!("{}/{}-{kind}:{}", self.repo, self.basename, self.tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_errors_with_a_line_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "stage3 = \"s.tar.xz\"\n\nrt_pakages = [\"a\"]\n").unwrap();
        let err = FileConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("c.toml:3"), "{err}");
        assert!(err.contains("rt_pakages"), "{err}");
    }

    #[test]
    fn command_line_wins_and_paths_are_relative_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "stage3 = \"stage3-amd64-musl-openrc-20260214T170533Z.tar.xz\"\n\
             snapshot = \"snap\"\nuse = \"-X\"\njobs = 3\nrt_packages = [\"app-misc/hello\"]\n",
        )
        .unwrap();
        let file = FileConfig::load(&path).unwrap();
        let cli = Overrides {
            use_flags: Some("ipv6".into()),
            basename: Some("musl".into()),
            ..Default::default()
        };
        let plan = BuildPlan::resolve(Some((&path, file)), cli, local).unwrap();
        assert_eq!(plan.use_flags, "ipv6");
        assert_eq!(plan.jobs, 3);
        assert_eq!(plan.snapshot, dir.path().join("snap"));
        assert_eq!(plan.tag, "20260214T170533Z");
        assert_eq!(plan.rt_packages, ["app-misc/hello"]);
        assert_eq!(plan.reference("rt"), "localhost/musl-rt:20260214T170533Z");
        assert!(plan.install_mask.iter().any(|m| m == "*.a"));
    }

    #[test]
    fn the_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/gentoo-mkimg.toml");
        let file = FileConfig::load(&path).unwrap();
        assert_eq!(file.basename.as_deref(), Some("gentoo-musl"));
        assert_eq!(file.engine, Some(EngineKind::Sandbox));
        let plan = BuildPlan::resolve(Some((&path, file)), Overrides::default(), local).unwrap();
        assert_eq!(plan.tag, "20260214T170533Z");
        assert_eq!(plan.rt_packages.len(), DEFAULT_RT_PACKAGES.len());
    }

    /// The inputs step for tests: local paths only.
    fn local(source: &Source) -> Result<PathBuf> {
        match source {
            Source::Path(p) => Ok(p.clone()),
            other => bail!("not local: {other:?}"),
        }
    }

    #[test]
    fn profiles_stay_inside_the_snapshot_and_the_check_is_on_by_default() {
        let cli = |profile: &str| Overrides {
            stage3: Some("stage3-amd64-musl-openrc-20260101T000000Z.tar.xz".into()),
            snapshot: Some("snap".into()),
            profile: Some(profile.into()),
            ..Default::default()
        };
        let plan =
            BuildPlan::resolve(None, cli("default/linux/amd64/23.0/split-usr/"), local).unwrap();
        assert_eq!(
            plan.profile.as_deref(),
            Some("default/linux/amd64/23.0/split-usr")
        );
        assert!(plan.check);
        for bad in ["/etc", "../x", "a/../../b", "", "a b"] {
            let err = BuildPlan::resolve(None, cli(bad), local).unwrap_err();
            assert!(err.to_string().contains("profile"), "{bad}: {err}");
        }
        let no_check = Overrides {
            no_check: true,
            ..cli("default/linux/amd64/23.0")
        };
        assert!(!BuildPlan::resolve(None, no_check, local).unwrap().check);
    }

    #[test]
    fn missing_inputs_are_named() {
        let cli = Overrides {
            stage3: Some("stage3-amd64-openrc-20260101T000000Z.tar.xz".into()),
            ..Default::default()
        };
        let err = BuildPlan::resolve(None, cli, local).unwrap_err();
        assert!(err.to_string().contains("snapshot"), "{err}");
    }

    #[test]
    fn without_inputs_the_newest_musl_stage_and_snapshot_are_built() {
        let mut asked = Vec::new();
        let plan = BuildPlan::resolve(None, Overrides::default(), |s| {
            asked.push(s.clone());
            Ok(match s {
                Source::Stage3 { .. } => "/c/stage3-amd64-musl-openrc-20261122T170547Z.tar.xz",
                _ => "/c/gentoo-latest.tar.xz",
            }
            .into())
        })
        .unwrap();
        assert_eq!(
            asked,
            [
                Source::parse("stage3:amd64-musl-openrc").unwrap(),
                Source::parse("snapshot:latest").unwrap()
            ]
        );
        assert_eq!(
            plan.reference("dev"),
            "localhost/gentoo-musl-dev:20261122T170547Z"
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
        let file = FileConfig::load(&path).unwrap();
        let merged = InputSettings::default().merge_file(Some((&path, &file)));
        assert_eq!(merged.mirror.as_deref(), Some("http://127.0.0.1:1/m"));
        assert_eq!(merged.keyring, Some(dir.path().join("keys.asc")));
        assert_eq!(merged.trusted_keys, ["AAAA"]);
        assert_eq!(merged.verify, Some(false));
        let cli = InputSettings {
            trusted_keys: vec!["BBBB".into()],
            verify: Some(true),
            ..Default::default()
        };
        let merged = cli.merge_file(Some((&path, &file)));
        assert_eq!(merged.trusted_keys, ["BBBB"]);
        assert_eq!(merged.verify, Some(true));
    }
}
