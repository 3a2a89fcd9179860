//! `gentoo-mkimg build` end to end on the stand-in stage and the test ebuild repository:
//! raw, dev and rt images with the right contents (the profile's merged-usr links, root and
//! every acct user, /bin/sh and awk, gcc's runtime libraries without the compiler), nothing
//! merged into the stage's / while the roots are made, an unchanged build that builds nothing
//! (its build key), a new TAG that starts from the binary packages of the last one, compiles
//! nothing and gives the same layers,
//! `check` on good images, the old README's container usage (a C++ program that needs an
//! acct user, built in dev and installed in rt), failures that keep the binary packages and
//! tag nothing (a package that fails, a program whose library is not in its RDEPEND),
//! publishing straight from `build` (docker archive and registry), both engines, a split-usr
//! stage and profile (real directories instead of the links), and inputs refused before any
//! build starts.

mod common;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

struct Work {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    store: PathBuf,
    cache: PathBuf,
    snapshot: PathBuf,
}

/// A work dir with the test repository packed as a gentoo-YYYYMMDD snapshot tarball.
fn work() -> Work {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let snapshot = dir.join("gentoo-20260101.tar.xz");
    common::snapshot_tarball(&snapshot, "gentoo-20260101");
    Work {
        store: dir.join("images"),
        cache: dir.join("cache"),
        snapshot,
        dir,
        _tmp: tmp,
    }
}

fn mkimg(w: &Work) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gentoo-mkimg"));
    cmd.arg("--store")
        .arg(&w.store)
        .arg("--work-dir")
        .arg(&w.dir)
        .arg("--cache-dir")
        .arg(&w.cache)
        .env_remove("SOURCE_DATE_EPOCH")
        .stdin(Stdio::null());
    cmd
}

/// A build of t1, with two jobs: dev and rt are merged at the same time, each with parallel
/// merges (whatever the machine's core count).
fn build(w: &Work, stage: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["--jobs", "2"];
    args.extend_from_slice(extra);
    build_tag(w, stage, "t1", &args)
}

fn build_tag(w: &Work, stage: &Path, tag: &str, extra: &[&str]) -> Output {
    mkimg(w)
        .arg("build")
        .arg(stage)
        .arg(&w.snapshot)
        .args(["localhost", "fixture", tag, "--rt-packages"])
        .arg(common::RT_PACKAGES.join(" "))
        .args(extra)
        .output()
        .unwrap()
}

fn ok(out: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// reference -> manifest digest, from the store's index.json (its tagged entries: the
/// SBOMs attached to images are entries without a name).
fn tags(store: &Path) -> BTreeMap<String, String> {
    let Ok(bytes) = std::fs::read(store.join("index.json")) else {
        return BTreeMap::new();
    };
    let index: Value = serde_json::from_slice(&bytes).unwrap();
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| {
            Some((
                m["annotations"]["org.opencontainers.image.ref.name"]
                    .as_str()?
                    .to_string(),
                m["digest"].as_str().unwrap().to_string(),
            ))
        })
        .collect()
}

fn blob(store: &Path, digest: &str) -> PathBuf {
    store
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// The layer blobs of an image, bottom first.
fn layer_blobs(store: &Path, reference: &str) -> Vec<PathBuf> {
    let manifest = json(&blob(store, &tags(store)[reference]));
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| blob(store, l["digest"].as_str().unwrap()))
        .collect()
}

/// The layers of an image as (path -> "type+mode uid/gid[ -> target]") entries, via GNU
/// tar; an entry of a later layer replaces one of an earlier layer.
fn listing(store: &Path, reference: &str) -> BTreeMap<String, String> {
    let mut all = BTreeMap::new();
    for layer in layer_blobs(store, reference) {
        let out = Command::new("tar")
            .args(["--numeric-owner", "-tvf"])
            .arg(layer)
            .output()
            .unwrap();
        assert!(out.status.success());
        all.extend(layer_listing(&String::from_utf8_lossy(&out.stdout)));
    }
    all
}

fn layer_listing(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let name = f[5]
                .trim_end_matches('/')
                .trim_start_matches("./")
                .to_string();
            // Symlinks: "NAME -> TARGET" (names with spaces are not in these images).
            let target = match f.get(6..8) {
                Some(["->", target]) => format!(" -> {target}"),
                _ => String::new(),
            };
            (name, format!("{} {}{target}", f[0], f[1]))
        })
        .collect()
}

fn has(list: &BTreeMap<String, String>, suffix: &str) -> bool {
    list.keys()
        .any(|k| k == suffix || k.ends_with(&format!("/{suffix}")))
}

fn compiled(work_dir: &Path) -> Vec<String> {
    compiled_in(work_dir, "t1")
}

fn compiled_in(work_dir: &Path, tag: &str) -> Vec<String> {
    let log = std::fs::read_to_string(work_dir.join(format!("logs/{tag}/build.log"))).unwrap();
    log.lines()
        .filter(|l| l.starts_with(">>> Emerging ("))
        .map(str::to_string)
        .collect()
}

/// The merges of the dev and rt phases that did not go into their root: emerge names the
/// root of every merge outside `/` ("... for /var/tmp/gentoo-mkimg/dev/").
fn merges_into_the_stage(work_dir: &Path, tag: &str) -> Vec<String> {
    let log = std::fs::read_to_string(work_dir.join(format!("logs/{tag}/build.log"))).unwrap();
    let roots = log
        .lines()
        .skip_while(|l| *l != ">>> gentoo-mkimg: roots")
        .collect::<Vec<_>>();
    assert!(!roots.is_empty(), "no roots phase in the log");
    roots
        .into_iter()
        .filter(|l| l.starts_with(">>> Emerging") && !l.contains("/var/tmp/gentoo-mkimg/"))
        .map(str::to_string)
        .collect()
}

/// What the driver says when it merges dev and rt at the same time (more than one job) or
/// one after the other.
const CONCURRENT_ROOTS: &str = ">>> gentoo-mkimg: dev and rt at the same time, 2 jobs each";
const SEQUENTIAL_ROOTS: &str = ">>> gentoo-mkimg: dev, then rt, one package at a time";

/// The package COUNTERs of an image: 1..N, each once, baselayout (merged first into every
/// root) 1, and in the "metadata" file (where Portage keeps one) as in COUNTER.
fn assert_counters_in_order(store: &Path, reference: &str) {
    let tmp = tempfile::tempdir().unwrap();
    for layer in layer_blobs(store, reference) {
        // A layer without the package database fails the pattern: that is fine.
        let _ = Command::new("tar")
            .arg("-xf")
            .arg(layer)
            .arg("-C")
            .arg(tmp.path())
            .args(["--wildcards", "*var/db/pkg/*"])
            .stderr(Stdio::null())
            .status()
            .unwrap();
    }
    let vdb = tmp.path().join("var/db/pkg");
    assert!(vdb.is_dir(), "{reference}: no var/db/pkg");
    let mut counters = BTreeMap::new();
    for cat in std::fs::read_dir(&vdb).unwrap() {
        let cat = cat.unwrap().path();
        if !cat.is_dir() {
            continue;
        }
        for pkg in std::fs::read_dir(&cat).unwrap() {
            let pkg = pkg.unwrap().path();
            let name = pkg.strip_prefix(&vdb).unwrap().display().to_string();
            let text = std::fs::read_to_string(pkg.join("COUNTER"))
                .unwrap_or_else(|e| panic!("{reference}: {name}: COUNTER: {e}"));
            let n: u64 = text
                .parse()
                .unwrap_or_else(|e| panic!("{reference}: {name}: COUNTER {text:?}: {e}"));
            if let Ok(meta) = std::fs::read_to_string(pkg.join("metadata")) {
                assert!(
                    meta.lines().any(|l| l == format!("COUNTER={n}")),
                    "{reference}: {name}'s metadata disagrees with COUNTER {n}"
                );
            }
            assert!(
                counters.insert(n, name).is_none(),
                "{reference}: COUNTER {n} twice"
            );
        }
    }
    let numbers: Vec<u64> = counters.keys().copied().collect();
    assert_eq!(
        numbers,
        (1..=counters.len() as u64).collect::<Vec<_>>(),
        "{reference}: COUNTERs not 1..N"
    );
    assert!(
        counters[&1].starts_with("sys-apps/baselayout-"),
        "{reference}: COUNTER 1 is {}",
        counters[&1]
    );
}

/// The packages compiled in TAG's build, as CAT/PF (">>> Emerging (1 of 9) CAT/PF::REPO").
fn compiled_packages(work_dir: &Path, tag: &str) -> BTreeSet<String> {
    compiled_in(work_dir, tag)
        .iter()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.split("::").next().unwrap_or(p).to_string())
        .collect()
}

/// A new snapshot (the test repository with app-misc/hello bumped to 1.1) built as t3 with
/// USE=-extras, starting from the binary packages of t2: first interrupted (SIGINT) once its
/// build phase started, which leaves the carried packages as they were, no tag and nothing
/// mounted; then built: exactly hello-1.1 (new) and depdemo (whose USE flag changed) are
/// compiled, and the images hold hello 1.1 and depdemo without extras.
/// `cold_merges`: the merges into / of t1's build phase, which compiled everything.
fn new_snapshot_compiles_only_what_changed(w: &Work, stage: &Path, cold_merges: usize) {
    use std::os::unix::fs::MetadataExt;
    let staging = tempfile::tempdir().unwrap();
    let top = staging.path().join("gentoo-20260102");
    let status = Command::new("cp")
        .arg("-a")
        .arg(common::repo())
        .arg(&top)
        .status()
        .unwrap();
    assert!(status.success());
    let hello = top.join("app-misc/hello");
    std::fs::copy(
        hello.join("hello-1.0.ebuild"),
        hello.join("hello-1.1.ebuild"),
    )
    .unwrap();
    let snapshot = w.dir.join("gentoo-20260102.tar.xz");
    let status = Command::new("tar")
        .arg("-cJf")
        .arg(&snapshot)
        .arg("-C")
        .arg(staging.path())
        .arg("gentoo-20260102")
        .status()
        .unwrap();
    assert!(status.success());
    let t3 = |cmd: &mut Command| {
        cmd.arg("build")
            .arg(stage)
            .arg(&snapshot)
            .args(["localhost", "fixture", "t3", "--rt-packages"])
            .arg(common::RT_PACKAGES.join(" "))
            .args(["--use", "-extras"]);
    };
    let before = tags(&w.store);
    let carried_from = common::binpkgs(&w.dir.join("packages/t2"));

    // Interrupted once the build phase started (long before hello, a leaf, would compile).
    let mut cmd = mkimg(w);
    t3(&mut cmd);
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = w.dir.join("logs/t3/build.log");
    let started = std::time::Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .any(|l| l == ">>> gentoo-mkimg: build")
    {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(600),
            "t3 never reached its build phase"
        );
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            panic!("t3 ended early ({status}): {err}");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    std::thread::sleep(std::time::Duration::from_secs(2));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "the interrupted build succeeded: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The raw image is tagged when the stage is imported, before the session (it is the
    // build environment); dev and rt only after a build that succeeded.
    let finished = |tags: BTreeMap<String, String>| -> BTreeMap<String, String> {
        tags.into_iter()
            .filter(|(r, _)| !r.contains("-raw:"))
            .collect()
    };
    assert_eq!(
        finished(tags(&w.store)),
        finished(before),
        "the interrupted build tagged dev or rt"
    );
    let carried = common::binpkgs(&w.dir.join("packages/t3"));
    for (name, files) in &carried_from {
        let kept = carried
            .get(name)
            .unwrap_or_else(|| panic!("{name}: lost by the interrupted build"));
        for file in files {
            let here = w
                .dir
                .join("packages/t3")
                .join(file.strip_prefix(w.dir.join("packages/t2")).unwrap());
            assert!(kept.contains(&here), "{}: lost", here.display());
            assert_eq!(
                std::fs::metadata(&here).unwrap().ino(),
                std::fs::metadata(file).unwrap().ino(),
                "{}: replaced by the interrupted build",
                here.display()
            );
        }
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains(w.cache.to_str().unwrap()),
        "mounts left by the interrupted build"
    );

    // Built: only the bumped package and the one whose USE flag changed are compiled.
    let mut cmd = mkimg(w);
    t3(&mut cmd);
    let out = cmd.output().unwrap();
    ok(&out, "build of the new snapshot");
    // The build root / got the dependency trees of those two, not the whole graph again.
    let log = std::fs::read_to_string(w.dir.join("logs/t3/build.log")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.starts_with(">>> gentoo-mkimg: compiling 2 of the packages")),
        "t3 did not say it compiles 2 packages"
    );
    let into_stage = build_phase_merges(&w.dir, "t3");
    assert!(
        into_stage.len() < cold_merges / 2,
        "t3 reinstalled the build root: {into_stage:?}"
    );
    assert_eq!(
        compiled_packages(&w.dir, "t3"),
        BTreeSet::from([
            "app-misc/depdemo-1.0".to_string(),
            "app-misc/hello-1.1".to_string()
        ]),
        "t3 compiled other packages than the changed ones"
    );
    for kind in ["dev", "rt"] {
        let reference = format!("localhost/fixture-{kind}:t3");
        let list = listing(&w.store, &reference);
        assert!(
            has(&list, "var/db/pkg/app-misc/hello-1.1/CONTENTS"),
            "{kind}: no hello 1.1"
        );
        assert!(
            !list
                .keys()
                .any(|k| k.contains("var/db/pkg/app-misc/hello-1.0")),
            "{kind}: still hello 1.0"
        );
        assert_counters_in_order(&w.store, &reference);
    }
    let dev = "localhost/fixture-dev:t3";
    let use_flags = file_in(&w.store, dev, "var/db/pkg/app-misc/depdemo-1.0/USE");
    assert!(
        !use_flags.split_whitespace().any(|f| f == "extras"),
        "depdemo still has USE=extras: {use_flags}"
    );
}

/// (digest, history line) of each layer of an image, bottom first.
fn layers_with_history(store: &Path, reference: &str) -> Vec<(String, String)> {
    let manifest = json(&blob(store, &tags(store)[reference]));
    let config = json(&blob(store, manifest["config"]["digest"].as_str().unwrap()));
    let layers = manifest["layers"].as_array().unwrap();
    let history = config["history"].as_array().unwrap();
    assert_eq!(
        layers.len(),
        history.len(),
        "{reference}: one history line per layer"
    );
    layers
        .iter()
        .zip(history)
        .map(|(l, h)| {
            (
                l["digest"].as_str().unwrap().to_string(),
                h["created_by"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Package layers: between t2 and t3 (hello bumped to 1.1, depdemo rebuilt without USE
/// extras) only the layers holding those two packages and the last layer differ, in dev
/// and rt; dev and rt share layers; and a push of t3's dev after t2's uploads only the
/// changed layers, at most 15% of the image's bytes.
fn package_layers_change_with_their_packages(w: &Work) {
    let changed_packages = ["app-misc/hello-", "app-misc/depdemo-"];
    for kind in ["dev", "rt"] {
        let old = layers_with_history(&w.store, &format!("localhost/fixture-{kind}:t2"));
        let new = layers_with_history(&w.store, &format!("localhost/fixture-{kind}:t3"));
        assert!(
            new.len() > 3 && new.len() <= 32,
            "{kind}: {} layers: {new:#?}",
            new.len()
        );
        let before: BTreeSet<&str> = old.iter().map(|(d, _)| d.as_str()).collect();
        let changed: Vec<(usize, &str)> = new
            .iter()
            .enumerate()
            .filter(|(_, (d, _))| !before.contains(d.as_str()))
            .map(|(i, (_, h))| (i, h.as_str()))
            .collect();
        for (i, history) in &changed {
            assert!(
                *i == new.len() - 1 || changed_packages.iter().any(|p| history.contains(p)),
                "{kind}: layer {i} changed, holding neither hello nor depdemo: {history}"
            );
        }
        assert!(
            changed.iter().any(|(i, _)| *i == new.len() - 1),
            "{kind}: the last layer (package database) did not change"
        );
        assert!(
            new.len() - changed.len() >= new.len() / 2,
            "{kind}: {} of {} layers changed: {changed:#?}",
            changed.len(),
            new.len()
        );
    }
    let dev: BTreeSet<String> = layers_with_history(&w.store, "localhost/fixture-dev:t3")
        .into_iter()
        .map(|(d, _)| d)
        .collect();
    let shared = layers_with_history(&w.store, "localhost/fixture-rt:t3")
        .into_iter()
        .filter(|(d, _)| dev.contains(d))
        .count();
    assert!(shared > 0, "dev and rt share no layer");

    // The push of the update: t2's dev first, then t3's, to the same repository.
    let reg = support::Registry::start(&w.dir.join("registry-layers"), support::RegistryAuth::None);
    let host = reg.host();
    let mut sent = 0;
    for tag in ["t2", "t3"] {
        let target = format!("{host}/up/fixture-dev:{tag}");
        let out = mkimg(w)
            .args(["tag", &format!("localhost/fixture-dev:{tag}"), &target])
            .output()
            .unwrap();
        ok(&out, "tag");
        let out = mkimg(w)
            .args(["push", &target, "--insecure-registry", &host])
            .env("HOME", &w.dir)
            .env_remove("DOCKER_CONFIG")
            .output()
            .unwrap();
        ok(&out, "push");
        let report = String::from_utf8_lossy(&out.stderr).into_owned();
        sent = report
            .split(", ")
            .find_map(|part| part.strip_suffix(" bytes sent"))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no bytes sent in the push report: {report}"));
    }
    let manifest = json(&blob(&w.store, &tags(&w.store)["localhost/fixture-dev:t3"]));
    let size: u64 = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["size"].as_u64().unwrap())
        .sum::<u64>()
        + manifest["config"]["size"].as_u64().unwrap();
    assert!(
        sent * 100 <= size * 15,
        "the push of the update sent {sent} bytes of {size}"
    );
}

/// What the driver says when the build phase has nothing to compile.
const NOT_REINSTALLED: &str = ">>> gentoo-mkimg: nothing needs compiling: the build root / is not reinstalled from binary packages";

/// The merges into the stage's / in the build phase: emerge names no root for them.
fn build_phase_merges(work_dir: &Path, tag: &str) -> Vec<String> {
    let log = std::fs::read_to_string(work_dir.join(format!("logs/{tag}/build.log"))).unwrap();
    log.lines()
        .skip_while(|l| *l != ">>> gentoo-mkimg: build")
        .take_while(|l| *l != ">>> gentoo-mkimg: roots")
        .filter(|l| l.starts_with(">>> Emerging") && !l.contains(" for /"))
        .map(str::to_string)
        .collect()
}

/// @system of the test repository's profiles: the `*CAT/PN` lines of every `packages` file.
fn system_set() -> BTreeSet<String> {
    let out = Command::new("find")
        .arg(common::repo().join("profiles"))
        .args(["-name", "packages", "-type", "f"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .flat_map(|file| {
            std::fs::read_to_string(file)
                .unwrap()
                .lines()
                .filter_map(|l| l.trim().strip_prefix('*').map(str::to_string))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// One file of an image's layer, as text (GNU tar).
fn file_in(store: &Path, reference: &str, path: &str) -> String {
    // The topmost layer that has it; layers name entries "etc/passwd" or "./etc/passwd".
    let mut errors = String::new();
    for layer in layer_blobs(store, reference).iter().rev() {
        for name in [path.to_string(), format!("./{path}")] {
            let out = Command::new("tar")
                .arg("-xOf")
                .arg(layer)
                .arg(&name)
                .output()
                .unwrap();
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            errors.push_str(&String::from_utf8_lossy(&out.stderr));
        }
    }
    panic!("{reference} has no {path}: {errors}")
}

/// Profile 23.0's merged-usr links, as baselayout (USE=build) makes them.
const MERGED_USR_LINKS: &[(&str, &str)] = &[
    ("bin", "usr/bin"),
    ("sbin", "usr/bin"),
    ("lib", "usr/lib"),
    ("usr/sbin", "bin"),
];

/// dev and rt of BASENAME:TAG: the layout of the profile (profile 23.0's merged-usr links, or real
/// directories for split-usr), and account files holding root and every acct-* user and
/// group installed.
fn assert_roots_work(store: &Path, basename: &str, tag: &str, merged_usr: bool) {
    for kind in ["dev", "rt"] {
        let reference = format!("localhost/{basename}-{kind}:{tag}");
        let list = listing(store, &reference);
        for (link, target) in MERGED_USR_LINKS {
            let entry = list.get(*link).map(String::as_str).unwrap_or("missing");
            if merged_usr {
                assert!(
                    entry.starts_with('l') && entry.ends_with(&format!(" -> {target}")),
                    "{reference}: /{link} is {entry}, not a link to {target}"
                );
            } else {
                assert!(
                    entry.starts_with('d'),
                    "{reference}: /{link} is {entry}, not a directory (split-usr)"
                );
            }
        }
        for (file, category) in [("etc/passwd", "acct-user"), ("etc/group", "acct-group")] {
            let text = file_in(store, &reference, file);
            let names: Vec<&str> = text.lines().filter_map(|l| l.split(':').next()).collect();
            let prefix = format!("var/db/pkg/{category}/");
            let accounts: BTreeSet<String> = list
                .keys()
                .filter_map(|k| k.strip_prefix(&prefix))
                .filter(|pf| !pf.contains('/'))
                .map(|pf| package_name(pf).to_string())
                .collect();
            assert!(
                accounts.contains("portage"),
                "{reference}: no {category}/portage: {accounts:?}"
            );
            for name in std::iter::once("root").chain(accounts.iter().map(String::as_str)) {
                assert!(
                    names.contains(&name),
                    "{reference}: {file} lacks {name}:\n{text}"
                );
            }
        }
    }
}

/// PN of a PF: "portage-0-r3" -> "portage".
fn package_name(pf: &str) -> &str {
    let bytes = pf.as_bytes();
    (1..bytes.len())
        .find(|&i| bytes[i - 1] == b'-' && bytes[i].is_ascii_digit())
        .map_or(pf, |i| &pf[..i - 1])
}

#[test]
fn sandbox_build_makes_usable_images_and_rebuilds_nothing() {
    let stage = common::stage();
    let w = work();
    let out = build(&w, &stage.xz(), &[]);
    let summary = ok(&out, "first build");
    let first_summary = summary.clone();
    assert!(
        summary.contains("stage: build"),
        "no phase summary: {summary}"
    );
    let first = tags(&w.store);
    for kind in ["raw", "dev", "rt"] {
        assert!(
            first.contains_key(&format!("localhost/fixture-{kind}:t1")),
            "{first:?}"
        );
    }
    assert!(
        !compiled(&w.dir).is_empty(),
        "the first build compiled nothing"
    );
    let cold_merges = build_phase_merges(&w.dir, "t1").len();
    let binpkgs = count_binpkgs(&w.dir.join("packages/t1"));
    assert!(binpkgs >= 10, "only {binpkgs} binary packages");

    // Both roots: the profile's merged-usr links, root and every acct user; nothing merged
    // into the stage's own / while they were made.
    assert_roots_work(&w.store, "fixture", "t1", true);
    let stray = merges_into_the_stage(&w.dir, "t1");
    assert!(
        stray.is_empty(),
        "merged into / in the root phases: {stray:?}"
    );

    // rt: the runtime closure, without build-only tools, headers, docs or static libs; with
    // /bin/sh and awk (app-alternatives), useradd, and gcc's runtime libraries only.
    let rt = listing(&w.store, "localhost/fixture-rt:t1");
    for want in [
        "usr/bin/hello",
        "libdemo.so.1",
        "usr/bin/sh",
        "usr/bin/awk",
        "usr/bin/useradd",
        "libstdc++.so.6",
        "libgcc_s.so.1",
        "usr/bin/emerge",
        "var/db/pkg/app-misc",
    ] {
        assert!(has(&rt, want), "rt lacks {want}");
    }
    for name in rt.keys() {
        let base = name.rsplit('/').next().unwrap_or(name);
        assert!(
            !["cc1", "cc1plus", "lto1", "collect2"].contains(&base),
            "rt has the compiler: {name}"
        );
    }
    let rt_conf = file_in(&w.store, "localhost/fixture-rt:t1", "etc/portage/make.conf");
    for want in ["INSTALL_MASK=", "-buildpkg", "--usepkgonly"] {
        assert!(
            rt_conf.contains(want),
            "rt's make.conf lacks {want}:\n{rt_conf}"
        );
    }
    // @world is the world file and @system: Portage records in the world file only what
    // @system does not hold already. Either way a later --depclean keeps the whole rt set.
    let rt_world = file_in(&w.store, "localhost/fixture-rt:t1", "var/lib/portage/world");
    let system = system_set();
    for atom in common::RT_PACKAGES {
        assert!(
            rt_world.lines().any(|l| l == *atom) || system.contains(*atom),
            "rt's @world lacks {atom}: world file\n{rt_world}"
        );
    }
    assert!(
        rt_world.lines().any(|l| l == "app-misc/hello"),
        "rt's world file lacks app-misc/hello:\n{rt_world}"
    );
    assert!(rt.keys().any(|k| k.contains("python3")), "rt lacks Python");
    assert!(
        rt.keys()
            .any(|k| k.starts_with("var/db/pkg/app-misc/hello-")),
        "rt lacks hello's vdb entry"
    );
    for name in rt.keys() {
        assert!(
            !name.contains("devtool"),
            "rt has the build-only tool: {name}"
        );
        assert!(!name.starts_with("usr/include/"), "rt has headers: {name}");
        assert!(
            !name.starts_with("usr/share/doc/") && !name.starts_with("usr/share/man/"),
            "rt has docs: {name}"
        );
        assert!(
            !name.ends_with(".a") && !name.ends_with(".la"),
            "rt has static libs: {name}"
        );
    }
    // dev: everything, headers and docs included.
    let dev = listing(&w.store, "localhost/fixture-dev:t1");
    for want in ["usr/bin/hello", "usr/include/demo.h", "usr/bin/devtool"] {
        assert!(has(&dev, want), "dev lacks {want}");
    }
    assert!(
        dev.keys()
            .any(|k| k.starts_with("usr/share/man/man1/hello.1")),
        "dev lacks the man page"
    );
    assert!(
        dev.keys().any(|k| k.starts_with("usr/share/doc/hello")),
        "dev lacks hello's docs"
    );

    // A build with the same inputs: the images of the store carry its build key, so nothing
    // runs: no session (the build log stays as it was), the snapshot is not extracted again,
    // the same tags.
    let log = w.dir.join("logs/t1/build.log");
    let logged = std::fs::read(&log).unwrap();
    let marker = w.dir.join("portage/t1/.gentoo-mkimg-snapshot");
    let extracted_at = std::fs::metadata(&marker).unwrap().modified().unwrap();
    let out = build(&w, &stage.xz(), &[]);
    let summary = ok(&out, "unchanged build");
    assert!(
        summary.contains("nothing changed since the build"),
        "the unchanged build did not say so: {summary}"
    );
    assert_eq!(
        std::fs::read(&log).unwrap(),
        logged,
        "the unchanged build ran"
    );
    assert_eq!(
        std::fs::metadata(&marker).unwrap().modified().unwrap(),
        extracted_at
    );
    assert!(summary.contains("snapshot (ready)"), "{summary}");
    assert_eq!(tags(&w.store), first, "tags changed on an unchanged build");
    assert!(
        summary.contains("localhost/fixture-rt:t1")
            && summary.contains(&first["localhost/fixture-rt:t1"]),
        "{summary}"
    );
    // The same image rows (package counts, sizes, digests), without reading the layers:
    // the counts come from the images' labels.
    let rows = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with("localhost/fixture-"))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        rows(&summary),
        rows(&first_summary),
        "the image rows differ"
    );

    // A new TAG, same inputs otherwise: packages/t2 starts as hard links of packages/t1 (the
    // same profile), so nothing is compiled, and dev and rt get the very layers of t1: the
    // roots are reproducible. t1 merged dev and rt at the same time, with parallel merges
    // (two jobs); t2, with one job, one after the other, one package at a time: the package
    // COUNTERs, numbered in merge-list order after the merge, do not depend on that.
    assert!(
        std::fs::read_to_string(w.dir.join("logs/t1/build.log"))
            .unwrap()
            .lines()
            .any(|l| l == CONCURRENT_ROOTS),
        "t1 did not merge dev and rt at the same time"
    );
    let out = build_tag(&w, &stage.xz(), "t2", &["--jobs", "1"]);
    let summary = ok(&out, "build of a new TAG");
    assert!(
        summary.contains(&format!(
            "started from {}",
            w.dir.join("packages/t1").display()
        )),
        "the new TAG did not start from packages/t1: {summary}"
    );
    assert_eq!(
        compiled_in(&w.dir, "t2"),
        Vec::<String>::new(),
        "the new TAG compiled packages"
    );
    // Nothing to compile, so the build root / is not reinstalled from binary packages, and
    // a line says so: the build phase merges into / only what the roots' merges need there
    // at install time (the acct-* packages' IDEPEND on sys-apps/shadow, whose useradd they
    // run, with its libraries; a real stage3 has it registered already, the stand-in stage
    // only its C library), none of @world or of the build dependencies, which t1 merged.
    let into_stage = build_phase_merges(&w.dir, "t2");
    assert!(
        into_stage.len() < cold_merges / 2,
        "the build root was reinstalled: {into_stage:?}"
    );
    for line in &into_stage {
        assert!(
            line.starts_with(">>> Emerging binary (")
                && !["app-misc/", "dev-util/devtool", "sys-devel/gcc"]
                    .iter()
                    .any(|p| line.contains(p)),
            "merged into / in the build phase of t2: {line}"
        );
    }
    assert!(
        into_stage.iter().any(|l| l.contains(" sys-apps/shadow-")),
        "{into_stage:?}"
    );
    let log = std::fs::read_to_string(w.dir.join("logs/t2/build.log")).unwrap();
    assert!(
        log.lines().any(|l| l == NOT_REINSTALLED),
        "no line says the build root was not reinstalled"
    );
    let t1_log = std::fs::read_to_string(w.dir.join("logs/t1/build.log")).unwrap();
    assert!(
        !t1_log.lines().any(|l| l == NOT_REINSTALLED),
        "t1 compiled, yet its build root was not reinstalled"
    );
    let stray = merges_into_the_stage(&w.dir, "t2");
    assert!(
        stray.is_empty(),
        "merged into / in the root phases of t2: {stray:?}"
    );
    let linked = common::binpkgs(&w.dir.join("packages/t2"));
    let (name, files) = linked.iter().next().expect("no binary package in t2");
    {
        use std::os::unix::fs::MetadataExt;
        let a = std::fs::metadata(&files[0]).unwrap();
        let b = std::fs::metadata(
            w.dir
                .join("packages/t1")
                .join(files[0].strip_prefix(w.dir.join("packages/t2")).unwrap()),
        )
        .unwrap();
        assert_eq!(a.ino(), b.ino(), "{name}: copied, not linked");
    }
    let second = tags(&w.store);
    for kind in ["dev", "rt"] {
        let layers = |tag: &str| {
            let manifest = json(&blob(
                &w.store,
                &second[&format!("localhost/fixture-{kind}:{tag}")],
            ));
            manifest["layers"].clone()
        };
        assert_eq!(layers("t1"), layers("t2"), "{kind}: the roots differ");
    }
    assert!(
        std::fs::read_to_string(w.dir.join("logs/t2/build.log"))
            .unwrap()
            .lines()
            .any(|l| l == SEQUENTIAL_ROOTS),
        "t2 did not merge dev and rt one after the other"
    );
    for kind in ["dev", "rt"] {
        assert_counters_in_order(&w.store, &format!("localhost/fixture-{kind}:t2"));
    }

    // A forced rebuild of t1: the raw image of the store was imported from this stage with
    // these settings, so it is taken as it is (the stage is not imported again), and the
    // rebuilt dev and rt are the very images of before.
    let out = build(&w, &stage.xz(), &["--force"]);
    let summary = ok(&out, "forced rebuild");
    assert!(
        summary.contains("raw image (stored)"),
        "the stage was imported again: {summary}"
    );
    assert_eq!(tags(&w.store), second, "a forced rebuild changed an image");

    new_snapshot_compiles_only_what_changed(&w, &stage.xz(), cold_merges);
    package_layers_change_with_their_packages(&w);

    // `check` on the good images: no problem, exit 0.
    let out = mkimg(&w)
        .args([
            "check",
            "localhost/fixture-rt:t1",
            "localhost/fixture-dev:t1",
        ])
        .output()
        .unwrap();
    let stdout = ok(&out, "check of the built images");
    assert_eq!(stdout, "", "problems in good images");

    build_publishes_to_an_archive_and_a_registry(&w, &stage.xz());
    usage_as_in_the_old_readme(&w);
    failing_package_keeps_packages_and_tags_nothing(&w, &stage.xz());
    missing_rdepend_fails_the_rt_check(&w, &stage.xz());
    docker_engine_as_an_ordinary_user_gives_the_same_images(&w, &stage.xz());
}

/// `--engine docker` run by an unprivileged user (uid 65534) who can reach the engine's
/// socket: the same package lists, file modes and owners as the sandbox build in `sandbox`,
/// and `packages/TAG` owned by that user.
fn docker_engine_as_an_ordinary_user_gives_the_same_images(sandbox: &Work, stage: &Path) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let engine = common::engine::engine();
    let socket = engine.host.trim_start_matches("unix://");
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let w = work();
    std::fs::copy(stage, w.dir.join("stage3.tar.xz")).unwrap();
    let status = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(&w.dir)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::set_permissions(&w.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = common::mkimg_as_nobody()
        .arg("--store")
        .arg(&w.store)
        .arg("--work-dir")
        .arg(&w.dir)
        .arg("--cache-dir")
        .arg(&w.cache)
        .arg("build")
        .arg(w.dir.join("stage3.tar.xz"))
        .arg(&w.snapshot)
        .args([
            "localhost",
            "fixture",
            "t1",
            "--engine",
            "docker",
            "--rt-packages",
        ])
        .arg(common::RT_PACKAGES.join(" "))
        .env("HOME", &w.dir)
        .env("DOCKER_HOST", &engine.host)
        .env_remove("SOURCE_DATE_EPOCH")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    ok(&out, "docker build as uid 65534");
    assert_roots_work(&w.store, "fixture", "t1", true);
    let stray = merges_into_the_stage(&w.dir, "t1");
    assert!(
        stray.is_empty(),
        "merged into / in the root phases: {stray:?}"
    );
    for kind in ["dev", "rt"] {
        let reference = format!("localhost/fixture-{kind}:t1");
        let normal = |l: BTreeMap<String, String>| -> BTreeMap<String, String> {
            // Which name of a hard-linked file carries the data depends on the walk order.
            l.into_iter()
                .map(|(k, v)| (k, v.replacen('h', "-", 1)))
                .collect()
        };
        let a = normal(listing(&sandbox.store, &reference));
        let b = normal(listing(&w.store, &reference));
        let only_a: Vec<_> = a.keys().filter(|k| !b.contains_key(*k)).take(10).collect();
        let only_b: Vec<_> = b.keys().filter(|k| !a.contains_key(*k)).take(10).collect();
        assert!(
            only_a.is_empty() && only_b.is_empty(),
            "{kind}: sandbox only {only_a:?}, docker only {only_b:?}"
        );
        let differ: Vec<_> = a.iter().filter(|(k, v)| b[*k] != **v).take(10).collect();
        assert!(
            differ.is_empty(),
            "{kind}: modes/owners differ (sandbox side): {differ:?}"
        );
    }
    let pkgdir = w.dir.join("packages/t1");
    for entry in std::fs::read_dir(&pkgdir).unwrap().flatten() {
        assert_eq!(
            entry.metadata().unwrap().uid(),
            65534,
            "{:?} not handed back",
            entry.path()
        );
    }
    let left = engine.docker_ok(&[
        "ps",
        "-a",
        "--filter",
        "label=org.gentoo-mkimg.session",
        "--format",
        "{{.Names}}",
    ]);
    assert_eq!(left.trim(), "", "containers left: {left}");
}

fn count_binpkgs(dir: &Path) -> usize {
    let out = Command::new("find")
        .arg(dir)
        .args(["-name", "*.gpkg.tar"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// `build --archive FILE --push --load` under a registry's name: the archive holds raw, dev
/// and rt with the store's layers, the registry serves dev and rt with the store's digests,
/// and the engine has dev and rt with the store's configs (the binary packages of the builds
/// before are reused, so this compiles nothing).
fn build_publishes_to_an_archive_and_a_registry(w: &Work, stage: &Path) {
    let engine = common::engine::engine();
    let reg = support::Registry::start(&w.dir.join("registry"), support::RegistryAuth::None);
    let host = reg.host();
    let repo = format!("{host}/mk");
    let archive = w.dir.join("images.tar");
    let out = mkimg(w)
        .arg("build")
        .arg(stage)
        .arg(&w.snapshot)
        .args([repo.as_str(), "fixture", "t1", "--rt-packages"])
        .arg(common::RT_PACKAGES.join(" "))
        .arg("--archive")
        .arg(&archive)
        .args(["--push", "--insecure-registry", host.as_str(), "--load"])
        .env("HOME", &w.dir)
        .env("DOCKER_HOST", &engine.host)
        .env_remove("DOCKER_CONFIG")
        .output()
        .unwrap();
    let stdout = ok(&out, "build --archive --push --load");
    assert_eq!(
        compiled(&w.dir),
        Vec::<String>::new(),
        "publishing build compiled packages"
    );
    let stored = tags(&w.store);
    // The push report: "REFERENCE DIGEST" lines (the summary's image rows have more fields).
    let pushed: BTreeMap<&str, &str> = stdout
        .lines()
        .filter_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            [r, d] if r.starts_with(&repo) && d.starts_with("sha256:") => Some((r, d)),
            _ => None,
        })
        .collect();
    for kind in ["dev", "rt"] {
        let reference = format!("{repo}/fixture-{kind}:t1");
        let digest = stored
            .get(&reference)
            .unwrap_or_else(|| panic!("{reference} not in the store: {stored:?}"));
        assert_eq!(
            pushed.get(reference.as_str()).copied(),
            Some(digest.as_str()),
            "push report: {stdout}"
        );
        assert_eq!(
            support::skopeo_digest(&reference, None, &w.dir).as_deref(),
            Some(digest.as_str()),
            "the registry's {reference}"
        );
        let config = json(&blob(&w.store, digest))["config"]["digest"].clone();
        let loaded = engine.docker_ok(&["image", "inspect", "--format", "{{.Id}}", &reference]);
        assert_eq!(
            Some(loaded.trim()),
            config.as_str(),
            "the engine's {reference}"
        );
        let _ = engine.docker(&["rmi", "-f", &reference]);
    }
    let raw = format!("{repo}/fixture-raw:t1");
    assert!(
        !pushed.contains_key(raw.as_str()),
        "the throw-away raw image was pushed: {stdout}"
    );
    assert_eq!(
        support::skopeo_digest(&raw, None, &w.dir),
        None,
        "the registry has the raw image"
    );
    for kind in ["raw", "dev", "rt"] {
        let reference = format!("{repo}/fixture-{kind}:t1");
        let manifest = json(&blob(&w.store, &stored[&reference]));
        let config = json(&blob(
            &w.store,
            manifest["config"]["digest"].as_str().unwrap(),
        ));
        let out = Command::new("skopeo")
            .arg("inspect")
            .arg(format!("docker-archive:{}:{reference}", archive.display()))
            .env("HOME", &w.dir)
            .output()
            .unwrap();
        let inspected: Value =
            serde_json::from_slice(&ok(&out, "skopeo inspect docker-archive").into_bytes())
                .unwrap();
        assert_eq!(
            inspected["Layers"], config["rootfs"]["diff_ids"],
            "{reference}: the archive's layers are not the store's"
        );
    }
}

/// The old README's container usage, in containers made from our images: a package built in
/// a dev container into a binary-package dir, installed with `emerge -K` in an rt container,
/// and `hello` running in rt.
fn usage_as_in_the_old_readme(w: &Work) {
    let engine = common::engine::engine();
    let (dev, rt) = ("localhost/fixture-dev:t1", "localhost/fixture-rt:t1");
    let out = mkimg(w)
        .args(["load", dev, rt])
        .env("DOCKER_HOST", &engine.host)
        .output()
        .unwrap();
    ok(&out, "load");
    let tree = w.dir.join("portage/t1");
    // The build's binary packages (hard-linked copies): rt needs those of the acct packages
    // cxxdemo depends on, which dev has installed and does not build again.
    let pkgs = w.dir.join("usage-pkgs");
    let status = Command::new("cp")
        .arg("-al")
        .arg(w.dir.join("packages/t1"))
        .arg(&pkgs)
        .status()
        .unwrap();
    assert!(status.success());
    let before = count_binpkgs(&pkgs);
    let tree_mount = format!("{}:/var/db/repos/gentoo:ro", tree.display());
    let pkg_mount = format!("{}:/var/cache/binpkgs", pkgs.display());
    let features = "FEATURES=-sandbox -usersandbox -network-sandbox -ipc-sandbox -pid-sandbox -binpkg-request-signature";
    let run = |image: &str, cmd: &str| {
        engine.docker(&[
            "run",
            "--rm",
            "-e",
            features,
            "-v",
            &tree_mount,
            "-v",
            &pkg_mount,
            image,
            "/bin/sh",
            "-c",
            cmd,
        ])
    };
    // dev compiles: a script package, and a C++ program that needs an acct user.
    let built = run(
        dev,
        "emerge --buildpkg --oneshot app-misc/extra app-misc/cxxdemo",
    );
    assert!(
        built.status.success(),
        "dev build of app-misc/extra and app-misc/cxxdemo: {}\n{}",
        String::from_utf8_lossy(&built.stdout),
        String::from_utf8_lossy(&built.stderr)
    );
    assert!(
        count_binpkgs(&pkgs) >= before + 2,
        "no binary packages from the dev container"
    );
    // rt installs them from binary packages: the acct user is created, the C++ program runs
    // (libstdc++ is there), its header is not installed (rt's make.conf keeps INSTALL_MASK);
    // /bin/sh runs awk.
    let installed = run(
        rt,
        "emerge -K --oneshot app-misc/extra app-misc/cxxdemo && ls /var/db/pkg/app-misc && \
         hello && cxxdemo && echo \"@@ demo $(grep -c '^demo:' /etc/passwd)\" && \
         { test -e /usr/include/cxxdemo.h && echo '@@ header kept' || echo '@@ header masked'; } && \
         /bin/sh -c 'awk \"BEGIN{print 1}\"' | sed 's/^/@@ awk /'",
    );
    let stdout = String::from_utf8_lossy(&installed.stdout);
    assert!(
        installed.status.success(),
        "rt install: {stdout}\n{}",
        String::from_utf8_lossy(&installed.stderr)
    );
    assert!(
        stdout.contains("extra-") && stdout.contains("cxxdemo-"),
        "extra and cxxdemo not installed in rt: {stdout}\n{}",
        String::from_utf8_lossy(&installed.stderr)
    );
    assert!(
        stdout.contains(common::HELLO_LINE),
        "hello did not run in rt: {stdout}"
    );
    assert!(
        stdout.contains(common::CXXDEMO_LINE),
        "cxxdemo did not run in rt: {stdout}"
    );
    for (line, what) in [
        ("@@ demo 1", "the acct user demo is not in rt's /etc/passwd"),
        ("@@ header masked", "the header was installed into rt"),
        ("@@ awk 1", "/bin/sh -c 'awk ...' did not print 1"),
    ] {
        assert!(stdout.lines().any(|l| l == line), "{what}: {stdout}");
    }
    let _ = engine.docker(&["rmi", "-f", dev, rt]);
}

/// A package that fails to build: non-zero exit, the package and its log named, binary
/// packages kept, no dev/rt tag changed, nothing left mounted.
fn failing_package_keeps_packages_and_tags_nothing(w: &Work, stage: &Path) {
    let before = tags(&w.store);
    let binpkgs = count_binpkgs(&w.dir.join("packages/t1"));
    let repo = w.dir.join("broken-repo");
    overlay(
        &repo,
        "broken",
        &[(
            "app-misc/broken/broken-1.ebuild",
            "EAPI=8\nDESCRIPTION=\"fails\"\nHOMEPAGE=\"https://example.invalid\"\nS=${WORKDIR}\n\
             LICENSE=\"GPL-2\"\nSLOT=\"0\"\nKEYWORDS=\"amd64\"\n\
             src_compile() { die \"this package is meant to fail\"; }\n",
        )],
    );
    let config = w.dir.join("broken.toml");
    std::fs::write(
        &config,
        format!(
            "dev_packages = [\"app-misc/broken\"]\n[[repos]]\nname = \"broken\"\npath = \"{}\"\n",
            repo.display()
        ),
    )
    .unwrap();
    let out = build(w, stage, &["--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a failing package must fail the build"
    );
    assert!(
        stderr.contains("app-misc/broken"),
        "the failing package is not named: {stderr}"
    );
    // The package's own log, as the host has it (not a path inside the ended session).
    let named = stderr
        .split("build log: ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_else(|| panic!("no build log path: {stderr}"));
    let text = std::fs::read_to_string(named.trim())
        .unwrap_or_else(|e| panic!("the build log named, {named}, cannot be read: {e}"));
    assert!(
        text.contains("this package is meant to fail"),
        "{named} is not the failing package's log"
    );
    // The driver's result file names the package, its phase and its log; the error says
    // what it says.
    let result = json(&w.dir.join("logs/t1/result.json"));
    let failed = &result["failed"];
    assert_eq!(failed["package"], "app-misc/broken-1", "{result}");
    assert_eq!(failed["phase"], "compile", "{result}");
    let log = w.dir.join("logs/t1").join(
        failed["log"]
            .as_str()
            .unwrap_or_else(|| panic!("no log: {result}")),
    );
    assert!(
        stderr.contains(&format!(
            ": app-misc/broken-1 failed (compile phase); build log: {}; full log: ",
            log.display()
        )),
        "the error is not the result file's: {stderr}"
    );
    assert_eq!(result["clamp"], Value::Null, "{result}");
    let phases: Vec<&str> = result["phases"]
        .as_array()
        .unwrap_or_else(|| panic!("no phases: {result}"))
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(phases, ["configure", "build"], "{result}");
    assert_eq!(tags(&w.store), before, "a failed build changed tags");
    assert!(
        count_binpkgs(&w.dir.join("packages/t1")) >= binpkgs,
        "binary packages lost"
    );
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains(w.cache.to_str().unwrap()),
        "mounts left"
    );
    let runs: Vec<_> = std::fs::read_dir(w.cache.join("runs"))
        .unwrap()
        .flatten()
        .collect();
    assert!(runs.is_empty(), "run dirs left: {runs:?}");
}

/// An overlay (masters = gentoo) with the given `CAT/PN/PN-VER.ebuild` files.
fn overlay(dir: &Path, name: &str, ebuilds: &[(&str, &str)]) {
    for sub in ["profiles", "metadata"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    std::fs::write(dir.join("profiles/repo_name"), format!("{name}\n")).unwrap();
    std::fs::write(
        dir.join("metadata/layout.conf"),
        "masters = gentoo\nthin-manifests = true\n",
    )
    .unwrap();
    for (path, text) in ebuilds {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
}

/// A program whose library is not in its RDEPEND: Portage installs it into rt without the
/// library, and the build fails at the rt check with a line naming the program, the
/// library and the package, tagging nothing.
fn missing_rdepend_fails_the_rt_check(w: &Work, stage: &Path) {
    let before = tags(&w.store);
    let repo = w.dir.join("audit-repo");
    let head = "EAPI=8\nHOMEPAGE=\"https://example.invalid\"\nS=${WORKDIR}\nLICENSE=\"MIT\"\n\
                SLOT=\"0\"\nKEYWORDS=\"amd64\"\n";
    let lib = format!(
        "{head}DESCRIPTION=\"a library\"\n\
         src_compile() {{\n\
         \techo 'int missing(void) {{ return 42; }}' > m.c || die\n\
         \t${{CHOST}}-gcc -fPIC -shared -Wl,-soname,libmissing.so.1 -o libmissing.so.1 m.c || die\n}}\n\
         src_install() {{\n\
         \texeinto /usr/lib\n\tdoexe libmissing.so.1\n\tdosym libmissing.so.1 /usr/lib/libmissing.so\n}}\n"
    );
    let program = format!(
        "{head}DESCRIPTION=\"a program that forgot its library in RDEPEND\"\n\
         DEPEND=\"dev-libs/libmissing\"\n\
         src_compile() {{\n\
         \techo 'int missing(void); int main(void) {{ return missing() != 42; }}' > p.c || die\n\
         \t${{CHOST}}-gcc -o needsmissing p.c -L\"${{ESYSROOT}}/usr/lib\" -lmissing || die\n}}\n\
         src_install() {{\n\tdobin needsmissing\n}}\n"
    );
    overlay(
        &repo,
        "audit",
        &[
            ("dev-libs/libmissing/libmissing-1.ebuild", &lib),
            ("app-misc/needsmissing/needsmissing-1.ebuild", &program),
        ],
    );
    let config = w.dir.join("audit.toml");
    std::fs::write(
        &config,
        format!(
            "dev_packages = [\"app-misc/needsmissing\"]\n[[repos]]\nname = \"audit\"\npath = \"{}\"\n",
            repo.display()
        ),
    )
    .unwrap();
    let rt_set = format!("{} app-misc/needsmissing", common::RT_PACKAGES.join(" "));
    let out = mkimg(w)
        .arg("build")
        .arg(stage)
        .arg(&w.snapshot)
        .args(["localhost", "fixture", "t1", "--rt-packages", &rt_set])
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a broken rt was accepted: {stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("/usr/bin/needsmissing"))
        .unwrap_or_else(|| panic!("no line names the program: {stderr}"));
    assert!(
        line.contains("libmissing.so.1") && line.contains("app-misc/needsmissing-1"),
        "the line does not name the library and the package: {line}"
    );
    assert!(stderr.contains("--no-check"), "{stderr}");
    assert_eq!(tags(&w.store), before, "a failed check changed tags");
}

/// A split-usr stage (real /bin, /sbin, /lib, /lib64 and /usr/sbin; make.profile -> the
/// split-usr profile, whose layout check refuses a merged-usr disk) builds working images:
/// dev and rt have real directories where merged-usr has links, root and every acct user,
/// the shell in /bin, baselayout with USE=split-usr; nothing merged into the stage's / in the
/// root phases; in a container of rt, /bin/sh runs awk and hello.
#[test]
fn split_usr_stage_builds_working_images_without_the_links() {
    let stage = common::split_usr_stage();
    let w = work();
    // Its own image names: the other test of this file loads localhost/fixture-* into the
    // same engine at the same time.
    let out = mkimg(&w)
        .arg("build")
        .arg(&stage)
        .arg(&w.snapshot)
        .args(["localhost", "split", "t1", "--rt-packages"])
        .arg(common::RT_PACKAGES.join(" "))
        .output()
        .unwrap();
    ok(&out, "build on the split-usr stage");
    assert_roots_work(&w.store, "split", "t1", false);
    let stray = merges_into_the_stage(&w.dir, "t1");
    assert!(
        stray.is_empty(),
        "merged into / in the root phases: {stray:?}"
    );
    for kind in ["dev", "rt"] {
        let reference = format!("localhost/split-{kind}:t1");
        let list = listing(&w.store, &reference);
        for (path, kind) in [("bin/bash", '-'), ("bin/sh", 'l'), ("usr/bin/hello", '-')] {
            let entry = list.get(path).map(String::as_str).unwrap_or("missing");
            assert!(entry.starts_with(kind), "{reference}: /{path} is {entry}");
        }
        let use_file = list
            .keys()
            .find(|k| k.starts_with("var/db/pkg/sys-apps/baselayout-") && k.ends_with("/USE"))
            .unwrap_or_else(|| panic!("{reference} has no baselayout in /var/db/pkg"));
        let flags = file_in(&w.store, &reference, use_file);
        assert!(
            flags.split_whitespace().any(|f| f == "split-usr"),
            "{reference}: baselayout was merged with USE={flags}"
        );
    }

    let engine = common::engine::engine();
    let rt = "localhost/split-rt:t1";
    let out = mkimg(&w)
        .args(["load", rt])
        .env("DOCKER_HOST", &engine.host)
        .output()
        .unwrap();
    ok(&out, "load");
    let ran = engine.docker(&[
        "run",
        "--rm",
        rt,
        "/bin/sh",
        "-c",
        "/bin/sh -c 'awk \"BEGIN{print 1}\"' | sed 's/^/@@ awk /' && hello",
    ]);
    let _ = engine.docker(&["rmi", "-f", rt]);
    let stdout = String::from_utf8_lossy(&ran.stdout);
    assert!(
        ran.status.success(),
        "rt: {stdout}\n{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    assert!(
        stdout.lines().any(|l| l == "@@ awk 1"),
        "/bin/sh -c 'awk ...' did not print 1 in rt: {stdout}"
    );
    assert!(
        stdout.contains(common::HELLO_LINE),
        "hello did not run in rt: {stdout}"
    );
}

/// Two commands on one TAG of a work dir: the second says whom it waits for and waits,
/// touching nothing of the TAG (the snapshot is not extracted into portage/TAG), and runs
/// once the first is done.
#[test]
fn a_second_build_of_a_tag_waits_for_the_first() {
    let w = work();
    let held = gentoo_mkimg::build::lock::lock_tag(&w.dir, "t1", "build").unwrap();
    // A stage without Portage: once the build runs, it fails right after the import.
    let tiny = w.dir.join("tiny.tar");
    let status = Command::new("tar")
        .arg("-cf")
        .arg(&tiny)
        .arg("-C")
        .arg("/")
        .args(["bin/true", "usr/bin/env"])
        .status()
        .unwrap();
    assert!(status.success());
    let mut second = mkimg(&w)
        .arg("build")
        .arg(&tiny)
        .arg(&w.snapshot)
        .args(["localhost", "fixture", "t1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert!(
        second.try_wait().unwrap().is_none(),
        "the second build did not wait"
    );
    assert!(
        !w.dir.join("portage/t1").exists(),
        "the waiting build extracted the snapshot"
    );
    drop(held);
    let out = second.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "waiting for build (pid {}) to finish with TAG t1",
            std::process::id()
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("no Portage"),
        "it did not run after the wait: {stderr}"
    );
}

#[test]
fn unusable_inputs_are_refused_before_any_build() {
    let stage = common::stage();
    let w = work();
    // A snapshot that is no Portage tree.
    let empty = w.dir.join("not-a-tree");
    std::fs::create_dir_all(&empty).unwrap();
    let out = mkimg(&w)
        .arg("build")
        .arg(stage.xz())
        .arg(&empty)
        .args(["localhost", "fixture", "bad"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("profiles/repo_name"), "{stderr}");
    assert!(
        tags(&w.store).is_empty(),
        "something was stored: {:?}",
        tags(&w.store)
    );

    // A stage without Portage.
    let tiny = w.dir.join("tiny.tar");
    let status = Command::new("tar")
        .arg("-cf")
        .arg(&tiny)
        .arg("-C")
        .arg("/")
        .args(["bin/true", "usr/bin/env"])
        .status()
        .unwrap();
    assert!(status.success());
    let out = mkimg(&w)
        .arg("build")
        .arg(&tiny)
        .arg(&w.snapshot)
        .args(["localhost", "fixture", "bad"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no Portage"), "{stderr}");
    assert!(!w.dir.join("packages/bad").exists(), "the build started");

    // An unknown config key.
    let config = w.dir.join("typo.toml");
    std::fs::write(
        &config,
        "stage3 = \"x.tar.xz\"\nsnapshot = \"y\"\nrt_pakages = []\n",
    )
    .unwrap();
    let out = mkimg(&w)
        .args(["build", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("rt_pakages") && stderr.contains("typo.toml:3"),
        "{stderr}"
    );
}
