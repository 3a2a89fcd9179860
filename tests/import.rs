//! `gentoo-mkimg import` on the stand-in stage3: faithful layers, stable digests, checked
//! by independent tools (GNU tar, skopeo, umoci, Podman through the docker CLI), and bad
//! input refused without touching the store.

mod common;
mod support;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use sha2::{Digest as _, Sha256};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gentoo-mkimg"))
}

fn import(store: &Path, stage: &Path, reference: &str, extra: &[&str]) -> Output {
    bin()
        .arg("--store")
        .arg(store)
        .arg("import")
        .arg(stage)
        .arg(reference)
        .args(extra)
        .env_remove("SOURCE_DATE_EPOCH")
        .output()
        .expect("run gentoo-mkimg")
}

fn import_ok(store: &Path, stage: &Path, reference: &str, extra: &[&str]) {
    let out = import(store, stage, reference, extra);
    assert!(
        out.status.success(),
        "import of {} failed: {}",
        stage.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn blob(store: &Path, digest: &str) -> PathBuf {
    store
        .join("blobs/sha256")
        .join(digest.strip_prefix("sha256:").unwrap())
}

/// (manifest digest, manifest) of `reference` in the store's index.json.
fn manifest(store: &Path, reference: &str) -> (String, Value) {
    let index = json(&store.join("index.json"));
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == reference)
        .unwrap_or_else(|| panic!("{reference} not in index.json: {index}"));
    let digest = entry["digest"].as_str().unwrap().to_string();
    let m = json(&blob(store, &digest));
    (digest, m)
}

fn layer_digest(store: &Path, reference: &str) -> String {
    let (_, m) = manifest(store, reference);
    let layers = m["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    layers[0]["digest"].as_str().unwrap().to_string()
}

#[test]
fn every_compression_gives_the_same_layer_and_a_stable_digest() {
    let stage = common::stage();
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("images");
    let names = ["tar", "xz", "bz2", "gz", "zst"];
    let mut layers = Vec::new();
    for (name, file) in names.iter().zip(stage.archives()) {
        // A misleading extension must not matter: the format comes from the content.
        let renamed = tmp.path().join(format!("stage-{name}.tar.bz2"));
        std::os::unix::fs::symlink(&file, &renamed).unwrap();
        let reference = format!("localhost/fixture-raw:{name}");
        import_ok(&store, &renamed, &reference, &[]);
        layers.push(layer_digest(&store, &reference));
    }
    assert!(
        layers.iter().all(|l| l == &layers[0]),
        "layers differ between compressions: {names:?} -> {layers:?}"
    );

    let (first, m) = manifest(&store, "localhost/fixture-raw:xz");
    import_ok(&store, &stage.xz(), "localhost/fixture-raw:xz", &[]);
    let (second, _) = manifest(&store, "localhost/fixture-raw:xz");
    assert_eq!(
        first, second,
        "importing the same stage twice changed the digest"
    );

    let config = json(&blob(&store, m["config"]["digest"].as_str().unwrap()));
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["os"], "linux");
    assert_eq!(config["config"]["Cmd"], serde_json::json!(["/bin/bash"]));
    assert!(config["config"]["Volumes"]["/var/db/repos/gentoo"].is_object());
    assert!(
        config["config"]["Env"][0]
            .as_str()
            .unwrap()
            .starts_with("PATH=")
    );
    assert_eq!(
        config["config"]["Labels"]["org.opencontainers.image.version"],
        "xz"
    );
    let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
    assert_eq!(diff_ids.len(), 1);

    // index.json holds one entry per reference; no temp files remain.
    let index = json(&store.join("index.json"));
    assert_eq!(index["manifests"].as_array().unwrap().len(), names.len());
    let leftovers: Vec<_> = std::fs::read_dir(store.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // SOURCE_DATE_EPOCH sets `created`.
    let out = bin()
        .arg("--store")
        .arg(&store)
        .args(["import"])
        .arg(stage.zst())
        .arg("localhost/fixture-raw:sde")
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .output()
        .unwrap();
    assert!(out.status.success());
    let (_, m) = manifest(&store, "localhost/fixture-raw:sde");
    let config = json(&blob(&store, m["config"]["digest"].as_str().unwrap()));
    assert_eq!(config["created"], "2023-11-14T22:13:20Z");
}

/// GNU tar's verbose listing of an archive, keyed by entry name (leading `./` removed),
/// each value the rest of the entry line plus its xattr lines.
fn tar_listing(archive: &Path) -> BTreeMap<String, String> {
    let out = Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-tvvf"])
        .arg(archive)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tar -tvvf {}: {}",
        archive.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut map = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(x) = line.strip_prefix("  x: ") {
            let key = current.clone().expect("xattr line before any entry");
            map.entry(key)
                .and_modify(|v: &mut String| v.push_str(&format!(" [x: {x}]")));
            continue;
        }
        // perms owner size|dev date time name...
        let mut rest = line;
        let mut fields = Vec::new();
        for _ in 0..5 {
            rest = rest.trim_start();
            let end = rest.find(' ').unwrap_or(rest.len());
            fields.push(&rest[..end]);
            rest = &rest[end..];
        }
        let rest = rest.trim_start();
        let (name, tail) = match rest.find(" link to ").or_else(|| rest.find(" -> ")) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let tail = tail.replacen(" link to ./", " link to ", 1);
        let name = name.strip_prefix("./").unwrap_or(name).to_string();
        // mtimes are shown to the minute in both listings; keep them.
        map.insert(name.clone(), format!("{} {tail}", fields.join(" ")));
        current = Some(name);
    }
    map
}

/// How GNU tar shows a raw name in a listing (its default "escape" quoting).
fn tar_escape(raw: &[u8]) -> String {
    let mut s = String::new();
    for &b in raw {
        match b {
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(b as char),
            _ => s.push_str(&format!("\\{b:03o}")),
        }
    }
    s
}

fn strip_dot(raw: &[u8]) -> &[u8] {
    raw.strip_prefix(b"./").unwrap_or(raw)
}

#[test]
fn independent_tools_see_every_fidelity_entry() {
    let stage = common::stage();
    let fidelity = stage.fidelity_paths();
    assert!(
        fidelity.len() >= 10,
        "fixture lists too few entries: {}",
        fidelity.len()
    );
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("images");
    let reference = "localhost/fidelity-raw:1";
    import_ok(&store, &stage.xz(), reference, &[]);

    // skopeo reads the store as an OCI layout.
    let out = Command::new("skopeo")
        .arg("inspect")
        .arg(format!("oci:{}:{reference}", store.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo inspect: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inspected: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(inspected["Architecture"], "amd64");
    let (digest, _) = manifest(&store, reference);
    assert_eq!(inspected["Digest"], digest.as_str());

    // GNU tar on the layer blob lists each fidelity entry exactly as in the source.
    let source = tar_listing(&stage.tar());
    let layer = tar_listing(&blob(&store, &layer_digest(&store, reference)));
    for raw in &fidelity {
        let name = tar_escape(strip_dot(raw));
        let want = source
            .get(&name)
            .unwrap_or_else(|| panic!("{name} not in the source listing"));
        let got = layer
            .get(&name)
            .unwrap_or_else(|| panic!("{name} missing from the layer"));
        assert_eq!(got, want, "entry {name} differs");
    }
    assert_eq!(source.len(), layer.len(), "entry counts differ");
    let capbin = source
        .iter()
        .find(|(k, _)| k.ends_with("fidelity/capbin"))
        .expect("capbin in the source");
    assert!(
        capbin.1.contains("security.capability"),
        "source listing lacks the capability: {capbin:?}"
    );

    // umoci unpacks it into a root filesystem with the right metadata.
    let bundle = tmp.path().join("bundle");
    let out = Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:{reference}", store.display()))
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "umoci unpack: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rootfs = bundle.join("rootfs");
    let at = |raw: &[u8]| rootfs.join(OsStr::from_bytes(strip_dot(raw)));
    let find = |suffix: &str| -> PathBuf {
        let raw = fidelity
            .iter()
            .find(|p| p.ends_with(suffix.as_bytes()))
            .unwrap_or_else(|| panic!("fixture has no entry ending in {suffix}"));
        at(raw)
    };
    for raw in &fidelity {
        std::fs::symlink_metadata(at(raw)).unwrap_or_else(|e| panic!("{}: {e}", tar_escape(raw)));
    }
    let meta = |p: &Path| std::fs::symlink_metadata(p).unwrap();
    assert_eq!(meta(&find("/setuid")).mode() & 0o7777, 0o4755);
    assert_eq!(meta(&find("/setgid")).mode() & 0o7777, 0o2755);
    assert_eq!(meta(&find("/sticky-dir/")).mode() & 0o7777, 0o1777);
    let owned = meta(&find("/owned-1234"));
    assert_eq!(
        (owned.uid(), owned.gid(), owned.mode() & 0o7777),
        (1234, 5678, 0o640)
    );
    let dev = meta(&find("/char-null"));
    assert!(dev.file_type().is_char_device());
    assert_eq!(dev.rdev(), libc_makedev(1, 3));
    let blk = meta(&find("/block-loop"));
    assert!(blk.file_type().is_block_device());
    assert_eq!(blk.rdev(), libc_makedev(7, 0));
    assert!(meta(&find("/fifo")).file_type().is_fifo());
    assert_eq!(
        meta(&find("/hardlink-a")).ino(),
        meta(&find("/hardlink-b")).ino()
    );
    let long_link = std::fs::read_link(find("/symlink-long")).unwrap();
    assert!(long_link.as_os_str().len() > 100);
    let long = fidelity.iter().max_by_key(|p| p.len()).unwrap();
    assert!(long.len() >= 150 && at(long).exists());
    assert!(
        fidelity
            .iter()
            .any(|p| std::str::from_utf8(p).is_err() && at(p).exists())
    );
    let getcap = Command::new("getcap")
        .arg(find("/capbin"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&getcap.stdout).contains("cap_net_raw=ep"),
        "capability lost: {}",
        String::from_utf8_lossy(&getcap.stdout)
    );
    let getfattr = Command::new("getfattr")
        .args(["--only-values", "-n", "user.gentoo-mkimg"])
        .arg(find("/user-xattr"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&getfattr.stdout), "fidelity");
}

/// Linux's dev_t encoding (glibc's gnu_dev_makedev).
fn libc_makedev(major: u64, minor: u64) -> u64 {
    ((major & 0xfffff000) << 32)
        | ((major & 0xfff) << 8)
        | ((minor & 0xffffff00) << 12)
        | (minor & 0xff)
}

#[test]
fn docker_loads_the_archive_and_runs_it() {
    let stage = common::stage();
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("images");
    let archive = tmp.path().join("raw.tar");
    let reference = format!("localhost/gentoo-mkimg-test-raw:{}", std::process::id());
    import_ok(
        &store,
        &stage.gz(),
        &reference,
        &["--archive", archive.to_str().unwrap()],
    );
    let engine = common::engine::engine();
    let loaded = engine.docker_ok(&["load", "-i", archive.to_str().unwrap()]);
    assert!(loaded.contains(&reference), "docker load said: {loaded}");
    let out = engine.docker(&["run", "--rm", &reference, "/bin/sh", "-c", "echo ok"]);
    let _ = engine.docker(&["rmi", "-f", &reference]);
    assert!(
        out.status.success(),
        "docker run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
}

/// Every file under `dir` with a hash of its content (or its link target).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut map = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(p.clone());
                map.insert(p, "dir".into());
            } else {
                let bytes = std::fs::read(&p).unwrap_or_default();
                map.insert(p, hex::encode(Sha256::digest(&bytes)));
            }
        }
    }
    map
}

/// A tiny but real stage: the host's /bin/true as /usr/bin/true.
fn tiny_tar(extra: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let t = std::fs::read("/bin/true").unwrap();
    let header = || {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(0);
        h
    };
    let mut dir = header();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    for d in ["./", "./usr/", "./usr/bin/"] {
        b.append_data(&mut dir.clone(), d, std::io::empty())
            .unwrap();
    }
    let mut h = header();
    h.set_size(t.len() as u64);
    h.set_mode(0o755);
    b.append_data(&mut h, "./usr/bin/true", &t[..]).unwrap();
    for (name, data) in extra {
        // Raw names: the tar crate refuses to write `..` and absolute paths itself.
        let mut h = header();
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn xz(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[test]
fn bad_input_is_refused_with_one_line_and_the_store_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("images");
    let good = tmp.path().join("good.tar");
    std::fs::write(&good, tiny_tar(&[])).unwrap();
    import_ok(&store, &good, "localhost/tiny-raw:1", &[]);
    let before = snapshot(&store);
    assert!(before.len() >= 5, "{before:?}");

    let tiny = tiny_tar(&[]);
    let compressed = xz(&tiny);
    let unterminated = &tiny[..tiny.len() - 1024];
    assert!(
        unterminated[unterminated.len() - 512..]
            .iter()
            .any(|&b| b != 0)
    );
    let cases: Vec<(&str, Option<Vec<u8>>, &str)> = vec![
        ("missing.tar.xz", None, "No such file"),
        ("empty.tar.xz", Some(Vec::new()), "empty"),
        (
            "truncated.tar.xz",
            Some(compressed[..compressed.len() / 2].to_vec()),
            "truncated",
        ),
        ("unterminated.tar", Some(unterminated.to_vec()), "truncated"),
        (
            "notes.txt",
            Some(b"just some notes, not a tarball\n".repeat(50)),
            "not a tarball",
        ),
        (
            "dotdot.tar",
            Some(tiny_tar(&[(b"./usr/../../etc/evil", b"x")])),
            "leaves the tree",
        ),
        (
            "absolute.tar.xz",
            Some(xz(&tiny_tar(&[(b"/etc/evil", b"x")]))),
            "absolute path",
        ),
    ];
    for (name, content, expect) in cases {
        let path = tmp.path().join(name);
        if let Some(bytes) = &content {
            std::fs::write(&path, bytes).unwrap();
        }
        let out = import(&store, &path, "localhost/tiny-raw:1", &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        // One error line (a local file without companions also gets its one-line WARNING).
        assert_eq!(
            stderr
                .trim_end()
                .lines()
                .filter(|l| !l.starts_with("WARNING: "))
                .count(),
            1,
            "{name}: not one line: {stderr}"
        );
        assert!(
            stderr.contains(path.to_str().unwrap()),
            "{name}: file not named: {stderr}"
        );
        assert!(
            stderr.contains(expect),
            "{name}: expected {expect:?} in: {stderr}"
        );
        assert_eq!(snapshot(&store), before, "{name}: the store changed");
    }
}

#[test]
fn load_puts_the_image_into_the_engine_under_its_name() {
    let stage = common::stage();
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("images");
    let reference = format!("localhost/gentoo-mkimg-test-load:{}", std::process::id());
    import_ok(&store, &stage.zst(), &reference, &[]);
    let engine = common::engine::engine();
    let _ = engine.docker(&["rmi", "-f", &reference]);
    let out = bin()
        .arg("--store")
        .arg(&store)
        .args(["load", &reference])
        .env("DOCKER_HOST", &engine.host)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "load: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = engine.docker(&["run", "--rm", &reference, "/bin/sh", "-c", "echo ok"]);
    let _ = engine.docker(&["rmi", "-f", &reference]);
    assert_eq!(
        String::from_utf8_lossy(&run.stdout),
        "ok\n",
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

/// `load` of a name that is an image index (#14) takes the entry of this host's platform:
/// the engine gets the amd64 stand-in stage under the name, which runs, and not the arm64
/// entry (a tiny tarball without a shell).
#[test]
fn load_of_an_index_takes_the_hosts_platform() {
    let stage = common::stage();
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("images");
    let arm = tmp.path().join("arm64.tar");
    support::tiny_arm64_stage(&arm);
    let reference = format!("localhost/gentoo-mkimg-test-multi:{}", std::process::id());
    let out = bin()
        .arg("--store")
        .arg(&store)
        .args(["import", "--platform", "linux/amd64,linux/arm64"])
        .arg(stage.zst())
        .arg(&arm)
        .arg(&reference)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, amd) = manifest(&store, &format!("{reference}-amd64"));
    let engine = common::engine::engine();
    let _ = engine.docker(&["rmi", "-f", &reference]);
    let out = bin()
        .arg("--store")
        .arg(&store)
        .args(["load", &reference])
        .env("DOCKER_HOST", &engine.host)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "load: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = engine.docker_ok(&[
        "image",
        "inspect",
        "--format",
        "{{.Id}} {{.Architecture}}",
        &reference,
    ]);
    let run = engine.docker(&["run", "--rm", &reference, "/bin/sh", "-c", "echo ok"]);
    let _ = engine.docker(&["rmi", "-f", &reference]);
    let config = amd["config"]["digest"].as_str().unwrap();
    assert_eq!(
        id.trim(),
        format!("{config} amd64"),
        "the amd64 entry's config is the engine's image"
    );
    assert_eq!(
        String::from_utf8_lossy(&run.stdout),
        "ok\n",
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

/// The library's import as the build calls it. The first import hashes the stage while it
/// reads it (the digest it returns is the file's own); a second one with the raw image
/// stored does not read the stage at all: here the stage file is gone by then, and the
/// image, its digest and the facts kept in its label are those of the first. Other settings
/// do not take the stored image (they would read the missing stage, and fail).
#[test]
fn a_stored_import_of_the_same_stage_does_not_read_it_again() {
    use gentoo_mkimg::image::layer::LayerCompression;
    use gentoo_mkimg::image::store::Store;
    use gentoo_mkimg::import::{ImportOptions, import_stage};

    let stage = common::stage();
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::new(tmp.path().join("images"));
    let copy = tmp.path().join("stage.tar.xz");
    std::fs::copy(stage.xz(), &copy).unwrap();
    let digest = hex::encode(Sha256::digest(std::fs::read(&copy).unwrap()));
    let opts = ImportOptions {
        stage: copy.clone(),
        reference: "localhost/fixture-raw:once".parse().unwrap(),
        compression: LayerCompression::Gzip,
        platform: None,
        source_date_epoch: None,
        verbosity: gentoo_mkimg::progress::Verbosity::Quiet,
        stage_digest: None,
    };
    let first = import_stage(&store, &opts).unwrap();
    assert!(!first.reused, "an empty store cannot hold the image");
    assert_eq!(
        first.stage_digest, digest,
        "hashed on the way: not the file's digest"
    );
    assert!(first.facts.has_portage, "{:?}", first.facts);
    assert_eq!(first.facts.platform.as_deref(), Some("linux/amd64"));
    assert!(first.facts.profile.is_some(), "{:?}", first.facts);
    assert!(first.facts.entries > 100, "{:?}", first.facts);

    std::fs::remove_file(&copy).unwrap();
    let known = ImportOptions {
        stage_digest: Some(digest.clone()),
        ..opts.clone()
    };
    let second = import_stage(&store, &known).expect("the stored raw image was not taken");
    assert!(second.reused);
    assert_eq!(
        second.image.manifest.digest(),
        first.image.manifest.digest()
    );
    assert_eq!(second.facts, first.facts);
    assert_eq!(second.stage_digest, digest);

    // Something not a tarball where the stage was: still not read.
    std::fs::write(&copy, b"not a tarball").unwrap();
    let third = import_stage(&store, &known).unwrap();
    assert_eq!(third.image.manifest.digest(), first.image.manifest.digest());
    std::fs::remove_file(&copy).unwrap();

    // Another compression, creation time or digest would make another image: the stage is
    // read (and found missing).
    for other in [
        ImportOptions {
            compression: LayerCompression::Zstd,
            ..known.clone()
        },
        ImportOptions {
            source_date_epoch: Some(1_700_000_000),
            ..known.clone()
        },
        ImportOptions {
            stage_digest: Some("0".repeat(64)),
            ..known.clone()
        },
    ] {
        let err = import_stage(&store, &other).expect_err("the stored image was taken");
        assert!(
            format!("{err:#}").contains("cannot open"),
            "not the missing stage: {err:#}"
        );
    }
}
