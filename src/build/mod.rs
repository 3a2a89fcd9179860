//! `gentoo-mkimg build`: the whole job, in phases.
//!
//! 1. raw: the stage becomes `REPO/BASENAME-raw:TAG` (the import code);
//! 2. snapshot: the Portage tree is ready in `portage/TAG` (extracted once);
//! 3. build: inside the stage, `driver.sh` builds every package into `packages/TAG` and
//!    fills the dev and rt roots;
//! 4. images: the two roots become `REPO/BASENAME-dev:TAG` and `-rt:TAG` by the same layer
//!    code as import, straight from the directories (or the engine's tar stream);
//!    rt is audited first ([`crate::audit`]: interpreters, libraries, `#!`, /bin/sh) and
//!    nothing is tagged when it would not run;
//! 5. a summary: time per phase, package counts, image sizes and digests.
//!
//! Nothing is tagged for dev or rt unless the whole build succeeded; binary packages built
//! before a failure stay in `packages/TAG`.

mod carry;
mod key;
pub mod layers;
pub mod lock;
pub mod platforms;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::config::BuildPlan;
use crate::engine::{self, Mount, Session};
use crate::image::StoredImage;
use crate::image::config::{ImageSpec, Platform};
use crate::image::layer::{LayerInfo, LayerSplit, LayerWriter};
use crate::image::reference::Reference;
use crate::image::store::{DescriptorExt, Store};
use crate::import::{self, ImportOptions, standard_labels};
use crate::progress::Verbosity;
use crate::snapshot;

/// The script that runs inside the stage.
pub const DRIVER: &str = include_str!("driver.sh");

/// Where things are inside the stage (see driver.sh).
const INPUT_DIR: &str = "/var/tmp/gentoo-mkimg/input";
const LOG_DIR: &str = "/var/log/gentoo-mkimg";

/// Everything `build` needs besides the plan.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub plan: BuildPlan,
    pub work_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub store: Store,
    pub verbosity: Verbosity,
    pub source_date_epoch: Option<i64>,
    /// Build even when the images in the store carry this build's key.
    pub force: bool,
    /// Start a new TAG with no binary packages instead of those of an earlier TAG.
    pub fresh_packages: bool,
    /// The TAG of `portage/TAG` when it is not the plan's: the platforms of one build share
    /// their snapshot (see [`platforms`]).
    pub snapshot_tag: Option<String>,
    /// The stage's SHA-256 (hex) when the caller has just read it (a multi-platform build's
    /// import): the build key then does not read the stage again.
    pub stage_digest: Option<String>,
}

/// One finished image of the build.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    pub image: StoredImage,
    /// How many packages its /var/db/pkg holds.
    pub packages: usize,
}

/// The label in the dev and rt image configs that holds how many packages the image's
/// /var/db/pkg holds, so that an unchanged build can report it without reading the layers.
pub const PACKAGES_LABEL: &str = "org.gentoo-mkimg.packages";

/// What a build did.
#[derive(Debug, Clone)]
pub struct BuildSummary {
    pub phases: Vec<(String, Duration)>,
    pub raw: StoredImage,
    pub dev: BuiltImage,
    pub rt: BuiltImage,
    /// Binary packages in packages/TAG after the build.
    pub binary_packages: usize,
    /// The build key; `unchanged`: the store had dev and rt of this key, nothing was built.
    pub key: String,
    pub unchanged: bool,
    /// The earlier package dir a new TAG's binary packages were linked from.
    pub carried: Option<carry::Carried>,
}

/// The layers made from one exported root, waiting to be tagged.
struct RootLayer {
    layers: Vec<layers::PackageLayer>,
    /// `CAT/PF` of every package in the root's vdb.
    packages: Vec<String>,
}

impl RootLayer {
    fn infos(&self) -> Vec<LayerInfo> {
        self.layers.iter().map(|l| l.layer.clone()).collect()
    }
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("{}: cannot resolve", path.display()))
}

fn lines(items: &[String]) -> String {
    let mut s = String::new();
    for item in items {
        s.push_str(item);
        s.push('\n');
    }
    s
}

/// Quote a value for a POSIX shell assignment.
fn sh_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// Settings of the driver that change nothing in the images: not part of the build key.
const NOT_IN_KEY: [&str; 2] = ["MKIMG_VERBOSE", "MKIMG_OWNER"];

/// The driver and its inputs, as (file name, content); with `for_key`, less the settings
/// in [`NOT_IN_KEY`].
fn input_files(
    plan: &BuildPlan,
    verbosity: Verbosity,
    source_date_epoch: Option<i64>,
    for_key: bool,
) -> Vec<(&'static str, String)> {
    let owner = {
        let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
        if uid.is_root() {
            String::new()
        } else {
            format!("{uid}:{gid}")
        }
    };
    let settings = [
        ("MKIMG_JOBS", plan.jobs.to_string()),
        ("MKIMG_USE", plan.use_flags.clone()),
        ("MKIMG_DEV_PACKAGES", plan.dev_packages.join(" ")),
        ("MKIMG_RT_PACKAGES", plan.rt_packages.join(" ")),
        ("MKIMG_INSTALL_MASK", plan.install_mask.join(" ")),
        ("MKIMG_PROFILE", plan.profile.clone().unwrap_or_default()),
        ("MKIMG_KEEP_GOING", u8::from(plan.keep_going).to_string()),
        (
            "MKIMG_VERBOSE",
            u8::from(verbosity == Verbosity::Verbose).to_string(),
        ),
        ("MKIMG_OWNER", owner),
        (
            "MKIMG_SOURCE_DATE_EPOCH",
            source_date_epoch
                .map(|t| t.max(0).to_string())
                .unwrap_or_default(),
        ),
    ];
    let mut text = String::new();
    for (k, v) in settings {
        if !(for_key && NOT_IN_KEY.contains(&k)) {
            let _ = writeln!(text, "{k}={}", sh_quote(&v));
        }
    }
    let mut repos = String::new();
    for r in &plan.repos {
        let _ = writeln!(repos, "[{}]\nlocation = /var/db/repos/{}", r.name, r.name);
        if let Some(p) = r.priority {
            let _ = writeln!(repos, "priority = {p}");
        }
        repos.push('\n');
    }
    vec![
        ("settings", text),
        ("driver.sh", DRIVER.to_string()),
        ("make.conf", lines(&plan.make_conf)),
        ("package.use", lines(&plan.package_use)),
        (
            "package.accept_keywords",
            lines(&plan.package_accept_keywords),
        ),
        ("package.mask", lines(&plan.package_mask)),
        ("package.unmask", lines(&plan.package_unmask)),
        ("repos.conf", repos),
    ]
}

/// Write the driver and its inputs into `dir`.
fn write_inputs(
    dir: &Path,
    plan: &BuildPlan,
    verbosity: Verbosity,
    source_date_epoch: Option<i64>,
) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    for (name, content) in input_files(plan, verbosity, source_date_epoch, false) {
        let path = dir.join(name);
        fs::write(&path, content).with_context(|| format!("{}: cannot write", path.display()))?;
    }
    Ok(())
}

/// The part of the build key that the build does not change: the stage, the snapshot, the
/// repositories, the driver's inputs, the names and image settings (see [`key`]). Hashed
/// once per build.
fn input_key(
    opts: &BuildOptions,
    refs: &BTreeMap<&str, Reference>,
    stage_digest: &str,
) -> Result<key::KeyBuilder> {
    let plan = &opts.plan;
    let mut k = key::KeyBuilder::new();
    k.text("stage", stage_digest);
    k.path("snapshot", &plan.snapshot)
        .context("the build key: the snapshot")?;
    for repo in &plan.repos {
        k.path(&format!("repository {}", repo.name), &repo.path)
            .with_context(|| format!("the build key: repository {}", repo.name))?;
    }
    for (name, content) in input_files(plan, opts.verbosity, opts.source_date_epoch, true) {
        k.text(name, &content);
    }
    for (kind, reference) in refs {
        k.text(kind, &reference.to_string());
    }
    k.text("compression", &format!("{:?}", plan.compression));
    k.text("layers", &format!("{:?} {}", plan.layers, plan.max_layers));
    k.text("check", &plan.check.to_string());
    Ok(k)
}

/// The build key: `inputs` with the raw image now in the store and the binary packages now
/// in `packages`.
fn build_key(
    mut k: key::KeyBuilder,
    store: &Store,
    raw: &Reference,
    packages: &Path,
) -> Result<String> {
    let raw = match store.resolve(&raw.to_string()) {
        Ok(desc) => desc.digest().to_string(),
        Err(_) => String::new(),
    };
    k.text("raw", &raw);
    k.listing("packages", packages)
        .context("the build key: the binary packages")?;
    Ok(k.finish())
}

/// raw, dev and rt as the store has them, when dev and rt both carry `key`: the build they
/// came from had the same inputs. dev and rt with the count of packages of their label.
type Unchanged = (
    StoredImage,
    (StoredImage, Option<usize>),
    (StoredImage, Option<usize>),
);
fn unchanged_images(
    store: &Store,
    refs: &BTreeMap<&str, Reference>,
    key: &str,
) -> Result<Option<Unchanged>> {
    let mut found = Vec::new();
    let mut counts = Vec::new();
    for kind in ["raw", "dev", "rt"] {
        let reference = refs[kind].to_string();
        if store.resolve(&reference).is_err() {
            return Ok(None);
        }
        let image = crate::image::open_image(store, &reference)?;
        if kind != "raw" {
            let config: serde_json::Value =
                serde_json::from_slice(&store.read_descriptor(&image.config)?)
                    .with_context(|| format!("{reference}: the image config is not JSON"))?;
            let labels = &config["config"]["Labels"];
            if labels[key::LABEL].as_str() != Some(key) {
                return Ok(None);
            }
            counts.push(
                labels[PACKAGES_LABEL]
                    .as_str()
                    .and_then(|n| n.parse::<usize>().ok()),
            );
        }
        found.push(image);
    }
    let [raw, dev, rt]: [StoredImage; 3] = found
        .try_into()
        .map_err(|_| anyhow!("three images expected"))?;
    let [dev_count, rt_count]: [Option<usize>; 2] = counts
        .try_into()
        .map_err(|_| anyhow!("two counts expected"))?;
    Ok(Some((raw, (dev, dev_count), (rt, rt_count))))
}

/// A file the session wrote into the logs dir, as text (at most `limit` bytes): never
/// through a symlink the session left in its place, never a FIFO or device.
fn read_session_file(path: &Path, limit: u64) -> std::io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut bytes = Vec::new();
    file.take(limit).read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// What the driver reports in `result.json` (see driver.sh): when each of its phases
/// started, the time it clamped the roots' mtimes to, and the package an emerge failed on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DriverResult {
    phases: Vec<PhaseMark>,
    clamp: Option<u64>,
    failed: Option<FailedPackage>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PhaseMark {
    name: String,
    start: u64,
}

/// The package an emerge failed on: `CAT/PF`, the ebuild phase, and its build log relative
/// to the logs dir (none when Portage wrote none).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FailedPackage {
    package: String,
    phase: String,
    log: Option<String>,
}

/// The result file of the driver.
const RESULT_FILE: &str = "result.json";

/// `text` is one name of a package, phase or file as the driver writes them: not empty,
/// printable ASCII without spaces or quotes.
fn plain(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+_.-:/".contains(&b))
}

/// Parse the driver's result file (its text, `path` for the messages), checking every
/// name in it: a package is `CAT/PF`, a phase a word, a log a path inside the logs dir.
fn parse_result(path: &Path, text: &str) -> Result<DriverResult> {
    let result: DriverResult = serde_json::from_str(text)
        .with_context(|| format!("{}: not the driver's result", path.display()))?;
    for mark in &result.phases {
        if !plain(&mark.name) {
            bail!("{}: a phase named {:?}", path.display(), mark.name);
        }
    }
    if let Some(f) = &result.failed {
        let parts: Vec<&str> = f.package.split('/').collect();
        if !(plain(&f.package) && parts.len() == 2 && parts.iter().all(|p| !p.is_empty())) {
            bail!(
                "{}: not a package (CAT/PF): {:?}",
                path.display(),
                f.package
            );
        }
        if f.phase.is_empty() || !f.phase.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            bail!("{}: not an ebuild phase: {:?}", path.display(), f.phase);
        }
        if let Some(log) = &f.log
            && !(plain(log)
                && !log.starts_with('/')
                && log
                    .split('/')
                    .all(|c| !c.is_empty() && c != "." && c != ".."))
        {
            bail!(
                "{}: not a log file inside the logs dir: {log:?}",
                path.display()
            );
        }
    }
    Ok(result)
}

/// The driver's result file in the logs dir `logs`, as the session left it.
fn read_result(logs: &Path) -> Result<DriverResult> {
    let path = logs.join(RESULT_FILE);
    let text = read_session_file(&path, 1 << 20)
        .with_context(|| format!("{}: the build left no result", path.display()))?;
    parse_result(&path, &text)
}

/// The time the driver clamped the roots' mtimes to (SOURCE_DATE_EPOCH or the newest binary
/// package): also the images' creation time, so an unchanged rebuild gives the same digests.
fn read_clamp(logs: &Path) -> Result<u64> {
    clamp_of(&read_result(logs)?, logs)
}

/// The clamp of the driver's `result`, read from the logs dir `logs`.
fn clamp_of(result: &DriverResult, logs: &Path) -> Result<u64> {
    result.clamp.ok_or_else(|| {
        anyhow!(
            "{}: the build did not record its timestamp",
            logs.join(RESULT_FILE).display()
        )
    })
}

/// What a failed build says after its exit status: the failing package, its phase and its
/// build log as the host has it (from the driver's result), and the full log.
fn explain_failure(result: &Result<DriverResult>, host_logs: &Path) -> String {
    let mut s = String::new();
    match result {
        Ok(DriverResult {
            failed: Some(f), ..
        }) => {
            let _ = write!(s, ": {} failed ({} phase)", f.package, f.phase);
            if let Some(log) = &f.log {
                let _ = write!(s, "; build log: {}", host_logs.join(log).display());
            }
        }
        Ok(_) => {}
        Err(e) => {
            let _ = write!(s, " ({e:#})");
        }
    }
    let _ = write!(s, "; full log: {}", host_logs.join("build.log").display());
    s
}

/// Per-phase durations from the driver's phase marks: each phase lasts until the next.
fn driver_phases(result: &DriverResult) -> Vec<(String, Duration)> {
    result
        .phases
        .windows(2)
        .map(|w| {
            (
                format!("stage: {}", w[0].name),
                Duration::from_secs(w[1].start.saturating_sub(w[0].start)),
            )
        })
        .collect()
}

fn count_binary_packages(dir: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            } else if name.ends_with(".gpkg.tar")
                || name.ends_with(".tbz2")
                || name.ends_with(".xpak")
            {
                n += 1;
            }
        }
    }
    n
}

/// The SPDX SBOMs of dev and rt: attached to them in the store (kept when there already),
/// and written to the plan's `sbom` directory when it names one.
fn write_sboms(
    opts: &BuildOptions,
    packages: &Path,
    dev: &BuiltImage,
    rt: &BuiltImage,
) -> Result<()> {
    let images = [("dev", &dev.image), ("rt", &rt.image)];
    crate::sbom::for_build(&opts.store, &images, packages, opts.plan.sbom.as_deref())
}

/// One root, as the tar stream the driver wrote, into its layers (one, or by package: see
/// [`layers`]); its mtimes clamped to the driver's clamp.
fn read_root(
    input: &mut dyn BufRead,
    store: &Store,
    plan: &BuildPlan,
    clamp: u64,
) -> Result<RootLayer> {
    let opts = import::TarOptions {
        clamp_mtime: Some(clamp),
    };
    let (layers, scan) = match plan.layers {
        LayerSplit::Single => {
            let mut layer = LayerWriter::new(store, plan.compression)?;
            let scan = import::append_tar(input, &mut layer, opts, || {})?;
            let layer = layers::PackageLayer {
                layer: layer.finish(store)?,
                packages: Vec::new(),
            };
            (vec![layer], scan)
        }
        LayerSplit::Packages => {
            let mut spool = layers::Spool::new(store)?;
            let scan = import::append_tar(input, &mut spool, opts, || {})?;
            let layers = spool.finish(store, plan.compression, plan.max_layers, clamp)?;
            (layers, scan)
        }
    };
    Ok(RootLayer {
        layers,
        packages: scan.packages,
    })
}

/// One history line per layer: what it holds.
fn layer_history(kind: &str, layers: &[layers::PackageLayer]) -> Vec<String> {
    if layers.len() == 1 {
        return vec![format!("gentoo-mkimg build ({kind} root)")];
    }
    layers
        .iter()
        .map(|l| match l.packages.as_slice() {
            [] => format!(
                "gentoo-mkimg build ({kind} root): the package database, directories and \
                 files of no package"
            ),
            [one] => format!("gentoo-mkimg build ({kind} root): {one}"),
            many => format!(
                "gentoo-mkimg build ({kind} root): {} packages: {}",
                many.len(),
                many.join(" ")
            ),
        })
        .collect()
}

/// The runtime audit of the rt layers: every problem on its own line, and an error that says
/// nothing was tagged.
fn check_rt(store: &Store, layers: &[LayerInfo], reference: &Reference) -> Result<()> {
    let descriptors: Vec<_> = layers.iter().map(LayerInfo::descriptor).collect();
    let report = crate::audit::audit_layers(store, &descriptors)
        .with_context(|| format!("cannot check {reference}"))?;
    if report.problems.is_empty() {
        return Ok(());
    }
    for problem in &report.problems {
        eprintln!("{reference}: {problem}");
    }
    bail!(
        "{reference} would not work: {} problem(s), listed above; nothing was tagged \
         (add the missing packages to the rt set or to the RDEPEND of the packages named; \
         --no-check skips this check)",
        report.problems.len()
    )
}

/// Whether the engine can run the programs of `stage`, of platform `found`: the sandbox runs
/// another architecture's only through a binfmt_misc handler (see [`engine::binfmt`]).
fn runnable(engine: engine::EngineKind, stage: &Path, found: &Platform) -> Result<()> {
    if engine == engine::EngineKind::Sandbox {
        engine::binfmt::check_runnable(
            stage,
            found,
            crate::image::config::host_architecture(),
            &engine::binfmt::binfmt_dir(),
        )?;
    }
    Ok(())
}

/// Run the whole build.
pub fn build(opts: &BuildOptions) -> Result<BuildSummary> {
    let blobs = opts.store.session(); // a failed build leaves no untagged blob
    let plan = &opts.plan;
    let mut phases: Vec<(String, Duration)> = Vec::new();
    let refs: BTreeMap<&str, Reference> = ["raw", "dev", "rt"]
        .into_iter()
        .map(|k| Ok((k, plan.reference(k).parse::<Reference>()?)))
        .collect::<Result<_>>()
        .context("REPO, BASENAME and TAG must make valid image names")?;
    let work = absolute(&opts.work_dir)?;
    let stage = absolute(&plan.stage3)?;
    // packages/TAG, portage/TAG, logs/TAG and build/TAG are this build's until it ends.
    let _lock = lock::lock_tag(&work, &plan.tag, "build")?;

    // Checks that need no build: the snapshot and the extra repositories.
    let t = Instant::now();
    let (tree, extracted) = snapshot::prepare(
        &plan.snapshot,
        &work
            .join("portage")
            .join(opts.snapshot_tag.as_ref().unwrap_or(&plan.tag)),
        opts.verbosity,
    )?;
    phases.push((
        if extracted {
            "snapshot (extracted)"
        } else {
            "snapshot (ready)"
        }
        .to_string(),
        t.elapsed(),
    ));
    for repo in &plan.repos {
        snapshot::check_tree(&repo.path)
            .with_context(|| format!("extra repository {}", repo.name))?;
    }
    if plan.engine == engine::EngineKind::Sandbox {
        engine::sandbox::check_usable()?;
    }

    // Nothing changed since the build that made dev and rt: they are the result. That needs
    // a raw image in the store; without one the stage is hashed while it is imported.
    let packages = work.join("packages").join(&plan.tag);
    let raw_stored = opts
        .store
        .read_index()?
        .manifests()
        .iter()
        .any(|d| d.ref_name() == Some(refs["raw"].to_string().as_str()));
    let mut known: Option<(String, key::KeyBuilder)> = None;
    if raw_stored {
        let t = Instant::now();
        // The stage is hashed here once: the key, the raw image's label and the engines use
        // it.
        let stage_digest = match &opts.stage_digest {
            Some(digest) => digest.clone(),
            None => crate::archive::digest::sha256_file(&stage)
                .with_context(|| format!("{}: the build key", plan.stage3.display()))?,
        };
        let inputs_key = input_key(opts, &refs, &stage_digest)?;
        let key = build_key(inputs_key.clone(), &opts.store, &refs["raw"], &packages)?;
        if !opts.force
            && let Some((raw, dev, rt)) = unchanged_images(&opts.store, &refs, &key)?
        {
            phases.push(("build key (unchanged)".to_string(), t.elapsed()));
            // The count of packages from the image's label; images made before it had one
            // are read.
            let packages_of =
                |(image, counted): (StoredImage, Option<usize>)| -> Result<BuiltImage> {
                    let packages = match counted {
                        Some(n) => n,
                        None => crate::audit::installed_packages(&opts.store, &image.layers)
                            .with_context(|| {
                                format!("{}: cannot list its packages", image.reference)
                            })?
                            .len(),
                    };
                    Ok(BuiltImage { image, packages })
                };
            let (dev, rt) = (packages_of(dev)?, packages_of(rt)?);
            write_sboms(opts, &packages, &dev, &rt)?;
            return Ok(BuildSummary {
                unchanged: true,
                ..BuildSummary::new(phases, raw, dev, rt, &packages, key)
            });
        }
        phases.push(("build key".to_string(), t.elapsed()));
        known = Some((stage_digest, inputs_key));
    }

    // 1. raw: the stored one when it was imported from this stage with these settings (the
    // stage is not read again), else the stage imported
    let t = Instant::now();
    // Before the raw image is stored: the stage is of the platform asked for, and the
    // sandbox can run its programs (natively, or through a binfmt_misc handler).
    let accept = |found: &Platform| -> Result<()> {
        if let Some(want) = &plan.platform {
            import::check_platform(&plan.stage3, want, found)?;
        }
        runnable(plan.engine, &plan.stage3, found)
    };
    let imported = import::import_stage_checked(
        &opts.store,
        &ImportOptions {
            stage: stage.clone(),
            reference: refs["raw"].clone(),
            compression: plan.compression,
            platform: None,
            source_date_epoch: opts.source_date_epoch,
            verbosity: opts.verbosity,
            stage_digest: known.as_ref().map(|(digest, _)| digest.clone()),
        },
        &accept,
    )?;
    phases.push((
        if imported.reused {
            "raw image (stored)"
        } else {
            "raw image"
        }
        .to_string(),
        t.elapsed(),
    ));
    let (raw, facts, stage_digest) = (imported.image, imported.facts, imported.stage_digest);
    let inputs_key = match known {
        Some((_, inputs_key)) => inputs_key,
        None => input_key(opts, &refs, &stage_digest)?,
    };
    if !facts.has_portage {
        bail!(
            "{}: the stage has no Portage (no /usr/bin/emerge); a stage3 is needed",
            plan.stage3.display()
        );
    }
    let platform = facts
        .platform()
        .with_context(|| format!("{}: the raw image's {}", raw.reference, import::FACTS_LABEL))?
        .ok_or_else(|| anyhow!("{}: architecture unknown", plan.stage3.display()))?;

    // 2. the build inside the stage, a new TAG starting with the binary packages of the
    // newest earlier TAG of the same profile
    let carried = match plan.profile.as_ref().or(facts.profile.as_ref()) {
        Some(profile) if carry::is_fresh(&packages) && !opts.fresh_packages => {
            let t = Instant::now();
            let carried = carry::carry(&work.join("packages"), &plan.tag, profile)?;
            if carried.is_some() {
                phases.push(("binary packages carried".to_string(), t.elapsed()));
            }
            carried
        }
        _ => None,
    };
    let distfiles = work.join("distfiles");
    let logs = work.join("logs").join(&plan.tag);
    let input = work.join("build").join(&plan.tag).join("input");
    for dir in [&packages, &distfiles, &logs] {
        fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    }
    write_inputs(&input, plan, opts.verbosity, opts.source_date_epoch)?;
    let mut mounts = vec![
        Mount {
            source: absolute(&tree)?,
            target: "/var/db/repos/gentoo".into(),
            read_only: true,
        },
        Mount {
            source: packages.clone(),
            target: "/var/cache/binpkgs".into(),
            read_only: false,
        },
        Mount {
            source: distfiles,
            target: "/var/cache/distfiles".into(),
            read_only: false,
        },
        Mount {
            source: logs.clone(),
            target: LOG_DIR.into(),
            read_only: false,
        },
        Mount {
            source: input.clone(),
            target: INPUT_DIR.into(),
            read_only: true,
        },
    ];
    for repo in &plan.repos {
        mounts.push(Mount {
            source: absolute(&repo.path)?,
            target: format!("/var/db/repos/{}", repo.name),
            read_only: true,
        });
    }
    let session = Session {
        stage,
        stage_digest,
        store: opts.store.clone(),
        raw_reference: refs["raw"].clone(),
        mounts,
        env: crate::engine::session_env(&[])?,
        command: vec!["/bin/sh".into(), format!("{INPUT_DIR}/driver.sh")],
        interactive: false,
        hostname: "gentoo-mkimg-build".into(),
        cache_dir: absolute(&opts.cache_dir)?,
        keep: false,
        verbosity: opts.verbosity,
    };

    // Layers are made as the roots come out of the session (see engine::export: the driver
    // writes each as tar into a pipe); images are tagged only after every part succeeded.
    let t = Instant::now();
    let read = |name: &str, input: &mut dyn BufRead| -> Result<RootLayer> {
        read_clamp(&logs)
            .and_then(|clamp| read_root(input, &opts.store, plan, clamp))
            .with_context(|| format!("the {name} root"))
    };
    let outcome = engine::run_exporting(plan.engine, &session, &["dev", "rt"], &read)?;
    let status = outcome.status;
    let mut roots: BTreeMap<String, RootLayer> = BTreeMap::new();
    let mut layer_times: Vec<(String, Duration)> = Vec::new();
    match outcome.exports {
        Ok(exports) => {
            for e in exports {
                layer_times.push((format!("{} layer", e.name), e.took));
                roots.insert(e.name, e.value);
            }
        }
        // Reading a root failed: that is the cause, whatever the session did after.
        Err(e) => {
            return Err(e.context(format!(
                "cannot take the roots the build wrote (the stage's exit status: {status}; \
                 full log: {})",
                logs.join("build.log").display()
            )));
        }
    }
    let result = read_result(&logs);
    if let Ok(r) = &result {
        phases.extend(driver_phases(r));
    }
    phases.extend(layer_times);
    if status != 0 {
        bail!(
            "the build failed in the stage (exit status {status}){}",
            explain_failure(&result, &logs)
        );
    }
    let result = result?;
    let build_time = t.elapsed();
    if !phases.iter().any(|(n, _)| n.starts_with("stage:")) {
        phases.push(("build in stage".into(), build_time));
    }

    // 3. the runtime audit of rt, before anything is tagged
    if let Some(rt) = roots.get("rt") {
        if plan.check {
            let t = Instant::now();
            check_rt(&opts.store, &rt.infos(), &refs["rt"])?;
            phases.push(("check rt".to_string(), t.elapsed()));
        } else {
            eprintln!(
                "gentoo-mkimg: warning: --no-check: {} is not checked for missing \
                 interpreters and libraries",
                refs["rt"]
            );
        }
    }

    // 4. images, labelled with the key of this build taken with the binary packages it left
    let t = Instant::now();
    let key = build_key(inputs_key, &opts.store, &refs["raw"], &packages)?;
    let created = match opts.source_date_epoch {
        Some(t) => t,
        None => clamp_of(&result, &logs)? as i64,
    };
    let mut built = BTreeMap::new();
    for (kind, what) in [
        ("dev", "everything: compilers, headers, Portage"),
        ("rt", "runtime only"),
    ] {
        let root = roots
            .remove(kind)
            .ok_or_else(|| anyhow!("the session did not hand back the {kind} root"))?;
        let reference = &refs[kind];
        let mut spec = ImageSpec::gentoo(platform.clone(), created);
        spec.labels = standard_labels(
            reference,
            created,
            &format!("Gentoo {kind} image ({what}), built by gentoo-mkimg"),
        )?;
        spec.labels.insert(key::LABEL.to_string(), key.clone());
        spec.labels
            .insert(PACKAGES_LABEL.to_string(), root.packages.len().to_string());
        spec.history = layer_history(kind, &root.layers);
        let image =
            crate::image::write_image(&opts.store, &reference.to_string(), &spec, &root.infos())?;
        built.insert(
            kind,
            BuiltImage {
                image,
                packages: root.packages.len(),
            },
        );
    }
    let dev = built.remove("dev").ok_or_else(|| anyhow!("no dev image"))?;
    let rt = built.remove("rt").ok_or_else(|| anyhow!("no rt image"))?;
    phases.push(("dev and rt images".to_string(), t.elapsed()));
    // Their SBOMs, then the tags: a build whose SBOM fails tags nothing.
    let t = Instant::now();
    write_sboms(opts, &packages, &dev, &rt)?;
    phases.push(("SBOMs".to_string(), t.elapsed()));
    let t = Instant::now();
    for image in [&dev.image, &rt.image] {
        opts.store.tag(&image.reference, image.manifest.clone())?;
    }
    phases.push(("tag dev and rt".to_string(), t.elapsed()));
    blobs.commit();
    Ok(BuildSummary {
        carried,
        ..BuildSummary::new(phases, raw, dev, rt, &packages, key)
    })
}

impl BuildSummary {
    /// The summary of a build that built dev and rt, with the binary packages in `packages`.
    fn new(
        phases: Vec<(String, Duration)>,
        raw: StoredImage,
        dev: BuiltImage,
        rt: BuiltImage,
        packages: &Path,
        key: String,
    ) -> Self {
        BuildSummary {
            phases,
            raw,
            dev,
            rt,
            binary_packages: count_binary_packages(packages),
            key,
            unchanged: false,
            carried: None,
        }
    }

    /// The end-of-build report.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if self.unchanged {
            let _ = writeln!(
                s,
                "nothing changed since the build that made {} and {} (build key {}): \
                 nothing built (--force builds anyway)\n",
                self.dev.image.reference, self.rt.image.reference, self.key
            );
        }
        s.push_str("phase                          time\n");
        for (name, d) in &self.phases {
            let _ = writeln!(s, "{name:<30} {:>7.1}s", d.as_secs_f64());
        }
        let _ = writeln!(
            s,
            "\nbinary packages in the cache: {}",
            self.binary_packages
        );
        if let Some(c) = &self.carried {
            let _ = writeln!(
                s,
                "  started from {} ({} files, hard links)",
                c.from.display(),
                c.files
            );
        }
        let _ = writeln!(
            s,
            "{:<44} {:>9} {:>10}  digest",
            "image", "packages", "size"
        );
        let row = |s: &mut String, img: &StoredImage, pkgs: Option<usize>| {
            let _ = writeln!(
                s,
                "{:<44} {:>9} {:>10}  {}",
                img.reference,
                pkgs.map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
                crate::progress::human_size(img.size()),
                img.manifest.digest()
            );
        };
        row(&mut s, &self.raw, None);
        row(&mut s, &self.dev.image, Some(self.dev.packages));
        row(&mut s, &self.rt.image, Some(self.rt.packages));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed build names the package, its phase and its log as the host has it, from
    /// the driver's result file; phases and the clamp come from the same file.
    #[test]
    fn the_result_names_the_failing_package_and_its_log_on_the_host() {
        let tmp = tempfile::tempdir().unwrap();
        let logs = tmp.path().join("logs/t1");
        fs::create_dir_all(&logs).unwrap();
        fs::write(
            logs.join(RESULT_FILE),
            r#"{"phases":[{"name":"configure","start":100},{"name":"build","start":103},
                {"name":"roots","start":160}],"clamp":90,
                "failed":{"package":"app-shells/bash-5.2.15","phase":"install",
                "log":"portage/app-shells:bash-5.2.15:20261204-223959.log"}}"#,
        )
        .unwrap();
        let result = read_result(&logs);
        let text = explain_failure(&result, &logs);
        assert_eq!(
            text,
            format!(
                ": app-shells/bash-5.2.15 failed (install phase); build log: {}; full log: {}",
                logs.join("portage/app-shells:bash-5.2.15:20261204-223959.log")
                    .display(),
                logs.join("build.log").display()
            )
        );
        let result = result.unwrap();
        assert_eq!(read_clamp(&logs).unwrap(), 90);
        assert_eq!(
            driver_phases(&result),
            vec![
                ("stage: configure".to_string(), Duration::from_secs(3)),
                ("stage: build".to_string(), Duration::from_secs(57)),
            ]
        );

        // A failure without a log of its own; a result from before the clamp was known.
        fs::write(
            logs.join(RESULT_FILE),
            r#"{"phases":[{"name":"configure","start":100}],"clamp":null,
                "failed":{"package":"sys-apps/foo-1-r2","phase":"postinst","log":null}}"#,
        )
        .unwrap();
        let result = read_result(&logs);
        assert_eq!(
            explain_failure(&result, &logs),
            format!(
                ": sys-apps/foo-1-r2 failed (postinst phase); full log: {}",
                logs.join("build.log").display()
            )
        );
        let err = format!("{:#}", read_clamp(&logs).unwrap_err());
        assert!(
            err.contains("result.json") && err.contains("timestamp"),
            "{err}"
        );
    }

    /// What the result file may not hold: names a message would show or a path would follow
    /// out of the logs dir, unknown fields, anything but JSON. Each error names the file.
    #[test]
    fn a_result_with_bad_names_is_refused() {
        let path = Path::new("/w/logs/t1/result.json");
        let failed = |package: &str, phase: &str, log: &str| {
            format!(
                r#"{{"phases":[],"clamp":1,"failed":{{"package":{package},"phase":{phase},"log":{log}}}}}"#
            )
        };
        for (text, problem) in [
            (
                failed(r#""a/b-1""#, r#""compile""#, r#""../../etc/shadow""#),
                "logs dir",
            ),
            (
                failed(r#""a/b-1""#, r#""compile""#, r#""/etc/shadow""#),
                "logs dir",
            ),
            (
                failed(r#""a/b-1""#, r#""compile""#, r#""portage//x.log""#),
                "logs dir",
            ),
            (
                failed(r#""a/b-1""#, r#""compile""#, r#""portage/a b.log""#),
                "logs dir",
            ),
            (failed(r#""b-1""#, r#""compile""#, "null"), "CAT/PF"),
            (failed(r#""a/b/c-1""#, r#""compile""#, "null"), "CAT/PF"),
            (
                failed(r#""a/b-1\u001b[31m""#, r#""compile""#, "null"),
                "CAT/PF",
            ),
            (
                failed(r#""a/b-1""#, r#""compile phase""#, "null"),
                "ebuild phase",
            ),
            (failed(r#""a/b-1""#, r#""""#, "null"), "ebuild phase"),
            (
                r#"{"phases":[{"name":"a b","start":1}],"clamp":1,"failed":null}"#.into(),
                "a phase named",
            ),
            (
                r#"{"phases":[],"clamp":1,"failed":null,"extra":1}"#.into(),
                "not the driver's result",
            ),
            (
                r#"{"phases":[],"clamp":-1,"failed":null}"#.into(),
                "not the driver's result",
            ),
            ("configure 100\n".into(), "not the driver's result"),
        ] {
            let err = format!("{:#}", parse_result(path, &text).unwrap_err());
            assert!(
                err.starts_with("/w/logs/t1/result.json: ") && err.contains(problem),
                "{text}: {err}"
            );
        }
        // A good one, for contrast.
        let ok = failed(
            r#""dev-libs/a_b+c-1.0_p2-r1""#,
            r#""compile""#,
            r#""portage/rt/dev-libs:a_b+c-1.0_p2-r1:20261205-101010.log""#,
        );
        assert!(parse_result(path, &ok).is_ok());

        // No result file at all: the failure still points to the full log and says why there
        // is no more.
        let tmp = tempfile::tempdir().unwrap();
        let text = explain_failure(&read_result(tmp.path()), tmp.path());
        assert!(text.contains("the build left no result"), "{text}");
        assert!(
            text.ends_with(&format!(
                "; full log: {}",
                tmp.path().join("build.log").display()
            )),
            "{text}"
        );
    }
}
