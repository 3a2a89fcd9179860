//! A build of several platforms (`build --platform linux/amd64,linux/arm64`): every stage is
//! imported and checked first, so that a stage of the wrong platform, or one this host cannot
//! run, stops the build before anything is built; then each platform is built as a build of
//! its own, named `REF:TAG-ARCH` (its binary packages in `packages/TAG-ARCH`, its logs in
//! `logs/TAG-ARCH`, the snapshot shared in `portage/TAG`); at last raw, dev and rt are each
//! tagged `REF:TAG` as an image index of the platforms' images.
//!
//! Each platform's images stay tagged under their own names: a later build redoes only the
//! platforms whose inputs changed (each one's build key is its own), and a failed platform
//! leaves the others' images for the next run. The indexes are tagged only when every
//! platform was built.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{BuildOptions, BuildSummary, absolute, lock, runnable};
use crate::image::config::Platform;
use crate::image::index::write_index;
use crate::image::reference::Reference;
use crate::image::store::Descriptor;
use crate::import::{self, ImportOptions};

/// What a build of several platforms did.
#[derive(Debug, Clone)]
pub struct PlatformsSummary {
    /// Importing and checking every stage.
    pub stages_took: Duration,
    /// Each platform's build, in the order of `--platform`.
    pub builds: Vec<(Platform, BuildSummary)>,
    /// raw, dev and rt: each name and its index.
    pub indexes: Vec<(String, Descriptor)>,
}

/// Build every platform of `stages` (each platform with its stage3), as the module says.
pub fn build_platforms(
    opts: &BuildOptions,
    stages: &[(Platform, PathBuf)],
) -> Result<PlatformsSummary> {
    let plan = &opts.plan;
    if stages.len() < 2 {
        bail!("a multi-platform build needs at least two platforms");
    }
    let work = absolute(&opts.work_dir)?;
    // TAG is this build's, and so is portage/TAG, which every platform's build reads.
    let _lock = lock::lock_tag(&work, &plan.tag, "build")?;
    if plan.engine == crate::engine::EngineKind::Sandbox {
        crate::engine::sandbox::check_usable()?;
    }
    let reference = |kind: &str| -> Result<Reference> {
        plan.reference(kind)
            .parse()
            .context("REPO, BASENAME and TAG must make valid image names")
    };
    let raw = reference("raw")?;

    // Every stage first: its platform, and whether this host can run it.
    let t = Instant::now();
    let stages: Vec<(Platform, PathBuf)> = stages
        .iter()
        .map(|(p, stage)| Ok((p.clone(), absolute(stage)?)))
        .collect::<Result<_>>()?;
    let imported = import::import_platforms(
        &opts.store,
        &ImportOptions {
            stage: stages[0].1.clone(),
            reference: raw.clone(),
            compression: plan.compression,
            platform: None,
            source_date_epoch: opts.source_date_epoch,
            verbosity: opts.verbosity,
            stage_digest: None,
        },
        &stages,
        &|stage, found| runnable(plan.engine, stage, found),
    )?;
    let stages_took = t.elapsed();

    // Each platform, as a build of its own.
    let mut builds = Vec::with_capacity(stages.len());
    for ((want, stage), (found, stored)) in stages.iter().zip(&imported.images) {
        let tag = raw.for_platform(want)?.tag;
        let mut one = opts.clone();
        one.plan.stage3 = stage.clone();
        one.plan.platform = Some(want.clone());
        one.plan.sbom = plan
            .sbom
            .as_ref()
            .map(|dir| dir.join(&tag[plan.tag.len() + 1..]));
        one.plan.tag = tag;
        one.snapshot_tag = Some(opts.snapshot_tag.clone().unwrap_or(plan.tag.clone()));
        // just read by the import: not read again for the build key
        one.stage_digest = Some(stored.stage_digest.clone());
        if opts.verbosity != crate::progress::Verbosity::Quiet {
            eprintln!(
                "gentoo-mkimg: building {want} as {}",
                one.plan.reference("*")
            );
        }
        let summary = super::build(&one).with_context(|| format!("the {want} build"))?;
        builds.push((found.clone(), summary));
    }

    // The indexes: raw's was tagged with the stages; dev's and rt's now.
    let mut indexes = vec![(raw.to_string(), imported.index.clone())];
    for kind in ["dev", "rt"] {
        let name = reference(kind)?.to_string();
        let entries: Vec<(Platform, Descriptor)> = builds
            .iter()
            .map(|(platform, summary)| {
                let image = if kind == "dev" {
                    &summary.dev.image
                } else {
                    &summary.rt.image
                };
                (platform.clone(), image.manifest.clone())
            })
            .collect();
        let index = write_index(&opts.store, &entries).with_context(|| name.clone())?;
        indexes.push((name, index));
    }
    for (name, index) in &indexes[1..] {
        opts.store.tag(name, index.clone())?;
    }
    Ok(PlatformsSummary {
        stages_took,
        builds,
        indexes,
    })
}

impl PlatformsSummary {
    /// The end-of-build report: each platform's, then the indexes.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "stages (import, check)         {:>7.1}s\n",
            self.stages_took.as_secs_f64()
        );
        for (platform, summary) in &self.builds {
            let _ = writeln!(s, "== {platform}");
            s.push_str(&summary.render());
            s.push('\n');
        }
        let _ = writeln!(s, "{:<44} {:<30} digest", "index", "platforms");
        for (name, index) in &self.indexes {
            let platforms: Vec<String> = self.builds.iter().map(|(p, _)| p.to_string()).collect();
            let _ = writeln!(
                s,
                "{name:<44} {:<30} {}",
                platforms.join(","),
                index.digest()
            );
        }
        s
    }
}
