//! `gentoo-mkimg inspect`: the packages of an image's own /var/db/pkg, its platform and
//! layers, as a table and as JSON, for an image in the store and the same image pushed to
//! the real distribution registry (Debian's `docker-registry`) on 127.0.0.1.
//!
//! The images are imported from small root tarballs written here; what `inspect` must list
//! is worked out from the tree the test wrote, never written down twice.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use gentoo_mkimg::image::oci::DescriptorExt;
use gentoo_mkimg::image::store::{Descriptor, Digest, MANIFEST_MEDIA_TYPE, Store};

use support::token::TokenServer;
use support::{Registry, RegistryAuth};

/// One package as the test puts it into var/db/pkg (None: no such file).
#[derive(Debug, Clone, PartialEq)]
struct Pkg {
    name: String,
    slot: Option<String>,
    use_flags: Option<String>,
    license: Option<String>,
    size: Option<u64>,
    repository: Option<String>,
}

fn pkg(name: &str, slot: &str, use_flags: Option<&str>, license: &str, size: u64) -> Pkg {
    Pkg {
        name: name.to_string(),
        slot: Some(slot.to_string()),
        use_flags: use_flags.map(str::to_string),
        license: Some(license.to_string()),
        size: Some(size),
        repository: Some("gentoo".to_string()),
    }
}

/// Packages of a small root; a seed varies the sizes, so a run cannot pass on stale data.
fn packages(seed: u64) -> Vec<Pkg> {
    let mut list = vec![
        pkg(
            "sys-libs/musl-1.2.5-r3",
            "0",
            Some("amd64 elibc_musl kernel_linux"),
            "MIT LGPL-2.1+ GPL-2",
            1_048_576 + seed,
        ),
        pkg(
            "app-shells/bash-5.2_p37",
            "0",
            Some("amd64 net nls readline"),
            "GPL-3+",
            9_000_000 + seed * 7,
        ),
        pkg(
            "sys-devel/gcc-14.2.1_p20250301",
            "14",
            Some("amd64 cxx fortran openmp"),
            "GPL-3+ LGPL-3+ || ( GPL-3+ libgcc libstdc++ gcc-runtime-library-exception-3.1 )",
            150_000_000 + seed,
        ),
        pkg("virtual/libc-1-r1", "0", None, "metapackage", 0),
    ];
    // One from an overlay, without a SIZE file.
    let mut overlay = pkg("app-misc/hello-2.12.1", "0/2", Some(""), "GPL-3+", 0);
    overlay.size = None;
    overlay.repository = Some("local-overlay".to_string());
    list.push(overlay);
    list.sort_by(|a, b| a.name.cmp(&b.name));
    list
}

struct TarWriter {
    tar: tar::Builder<std::fs::File>,
}

impl TarWriter {
    fn new(path: &Path) -> TarWriter {
        TarWriter {
            tar: tar::Builder::new(std::fs::File::create(path).unwrap()),
        }
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(size);
        h
    }

    fn dir(&mut self, name: &str) {
        let mut h = Self::header(tar::EntryType::Directory, 0o755, 0);
        self.tar
            .append_data(&mut h, name, std::io::empty())
            .unwrap();
    }

    fn file(&mut self, name: &str, data: &[u8]) {
        let mut h = Self::header(tar::EntryType::Regular, 0o644, data.len() as u64);
        self.tar.append_data(&mut h, name, data).unwrap();
    }

    /// A vdb entry with the files `p` has, plus the others Portage writes.
    fn package(&mut self, p: &Pkg) {
        let dir = format!("var/db/pkg/{}", p.name);
        self.dir(&format!("{dir}/"));
        let mut put = |key: &str, v: &Option<String>| {
            if let Some(v) = v {
                self.file(&format!("{dir}/{key}"), format!("{v}\n").as_bytes());
            }
        };
        put("SLOT", &p.slot);
        put("USE", &p.use_flags);
        put("LICENSE", &p.license);
        put("SIZE", &p.size.map(|s| s.to_string()));
        put("repository", &p.repository);
        self.file(&format!("{dir}/EAPI"), b"8\n");
        self.file(
            &format!("{dir}/CONTENTS"),
            b"obj /usr/bin/true d41d8cd98f00b204e9800998ecf8427e 1700000000\n",
        );
    }

    fn finish(self) {
        self.tar.into_inner().unwrap().sync_all().unwrap();
    }
}

/// A root with `pkgs` in var/db/pkg, a binary (for the platform), and things that are not
/// packages: a half-merged entry, a file beside the categories, vdb-like paths elsewhere.
fn make_root(path: &Path, pkgs: &[Pkg]) {
    let mut t = TarWriter::new(path);
    for d in ["./", "usr/", "usr/bin/", "var/", "var/db/", "var/db/pkg/"] {
        t.dir(d);
    }
    t.file("usr/bin/true", &std::fs::read("/bin/true").unwrap());
    let mut categories: Vec<&str> = pkgs
        .iter()
        .map(|p| p.name.split('/').next().unwrap())
        .collect();
    categories.dedup();
    for c in categories {
        t.dir(&format!("var/db/pkg/{c}/"));
    }
    for p in pkgs {
        t.package(p);
    }
    t.dir("var/db/pkg/sys-apps/");
    t.dir("var/db/pkg/sys-apps/-MERGING-sed-4.9/");
    t.file("var/db/pkg/sys-apps/-MERGING-sed-4.9/SLOT", b"0\n");
    t.file("var/db/pkg/.keep_sys-apps_portage-0", b"");
    t.dir("usr/share/");
    t.dir("usr/share/var/db/pkg/app-misc/not-a-package-1/");
    t.file("usr/share/var/db/pkg/app-misc/not-a-package-1/SLOT", b"0\n");
    t.finish();
}

struct Work {
    tmp: tempfile::TempDir,
}

impl Work {
    fn new() -> Work {
        Work {
            tmp: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        let p = self.tmp.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    fn store(&self) -> Store {
        Store::new(self.tmp.path().join("images"))
    }

    /// The tool with an empty home (no credentials unless a test writes some).
    fn tool(&self, home: &Path) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gentoo-mkimg"));
        cmd.arg("--store")
            .arg(self.tmp.path().join("images"))
            .env("HOME", home)
            .env("DOCKER_CONFIG", home.join(".docker"))
            .env("XDG_RUNTIME_DIR", home.join("run"))
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .env_remove("REGISTRY_AUTH_FILE")
            .env_remove("GENTOO_MKIMG_LOG")
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR");
        for v in [
            "http_proxy",
            "https_proxy",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "all_proxy",
        ] {
            cmd.env_remove(v);
        }
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_as(&self.path("home"), args)
    }

    fn run_as(&self, home: &Path, args: &[&str]) -> Output {
        self.tool(home)
            .args(args)
            .output()
            .expect("run gentoo-mkimg")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    fn import(&self, pkgs: &[Pkg], reference: &str) {
        let root = self.tmp.path().join("root.tar");
        make_root(&root, pkgs);
        self.ok(&["-q", "import", root.to_str().unwrap(), reference]);
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// The packages of `--json` output, in the test's terms.
fn json_packages(report: &serde_json::Value) -> Vec<Pkg> {
    let s = |v: &serde_json::Value| v.as_str().map(str::to_string);
    report["packages"]
        .as_array()
        .expect("a packages array")
        .iter()
        .map(|p| Pkg {
            name: p["package"].as_str().expect("package").to_string(),
            slot: s(&p["slot"]),
            use_flags: s(&p["use"]),
            license: s(&p["license"]),
            size: p["size"].as_u64(),
            repository: s(&p["repository"]),
        })
        .collect()
}

/// The package rows of the table: the lines after the `PACKAGE` header.
fn table_rows(table: &str) -> Vec<&str> {
    table
        .lines()
        .skip_while(|l| !l.starts_with("PACKAGE "))
        .skip(1)
        .collect()
}

/// Check the table lists exactly `want`, each row with its slot, repository, licence and
/// USE flags.
fn check_table(table: &str, want: &[Pkg]) {
    let rows = table_rows(table);
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r.split_whitespace().next().unwrap_or(""))
        .collect();
    let want_names: Vec<&str> = want.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, want_names, "{table}");
    for (row, p) in rows.iter().zip(want) {
        let cells: Vec<&str> = row.split_whitespace().collect();
        let dash = |v: &Option<String>| match v.as_deref() {
            None | Some("") => "-".to_string(),
            Some(s) => s.to_string(),
        };
        assert_eq!(cells[1], dash(&p.slot), "{row}");
        assert_eq!(cells[2], dash(&p.repository), "{row}");
        assert!(row.contains(&dash(&p.license)), "{row}");
        assert!(row.ends_with(&dash(&p.use_flags)), "{row}");
    }
    assert!(
        table.contains(&format!("Packages:  {}", want.len())),
        "{table}"
    );
}

/// The manifest the store holds for `reference`: (digest, layers).
fn stored(store: &Store, reference: &str) -> (Digest, Vec<Descriptor>) {
    let desc = store.resolve(reference).unwrap();
    let manifest = store.read_manifest(&desc).unwrap();
    (desc.blob().unwrap(), manifest.layers().clone())
}

fn check_json(report: &serde_json::Value, store: &Store, reference: &str, want: &[Pkg]) {
    assert_eq!(json_packages(report), want, "{report:#}");
    let (digest, layers) = stored(store, reference);
    assert_eq!(report["reference"], reference);
    assert_eq!(report["digest"], digest.as_str());
    assert_eq!(report["platform"]["os"], "linux");
    assert_eq!(report["platform"]["architecture"], host_arch());
    let got: Vec<(String, String, u64)> = report["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().unwrap().to_string(),
                l["mediaType"].as_str().unwrap().to_string(),
                l["size"].as_u64().unwrap(),
            )
        })
        .collect();
    let want_layers: Vec<(String, String, u64)> = layers
        .iter()
        .map(|l| (l.digest().to_string(), l.kind().to_string(), l.size()))
        .collect();
    assert_eq!(got, want_layers);
}

fn inspect_json(work: &Work, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["inspect", "--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&work.ok(&all)).expect("inspect --json prints JSON")
}

#[test]
fn a_store_image_and_the_same_image_in_a_registry_list_exactly_their_vdb() {
    let work = Work::new();
    let reg = Registry::start(&work.path("registry"), RegistryAuth::None);
    let reference = format!("{}/test/inspect-rt:1", reg.host());
    let want = packages(std::process::id() as u64 % 1000);
    work.import(&want, &reference);
    let store = work.store();

    // The store.
    let table = work.ok(&["inspect", &reference]);
    check_table(&table, &want);
    assert!(
        table.contains(&format!("Platform:  linux/{}", host_arch())),
        "{table}"
    );
    let (_, layers) = stored(&store, &reference);
    assert!(table.contains(&layers[0].digest().to_string()), "{table}");
    let local = inspect_json(&work, &[&reference]);
    check_json(&local, &store, &reference, &want);
    assert_eq!(local["source"], "store");

    // The registry.
    work.ok(&["-q", "push", &reference]);
    let table = work.ok(&["inspect", "--remote", &reference]);
    check_table(&table, &want);
    let remote = inspect_json(&work, &["--remote", &reference]);
    check_json(&remote, &store, &reference, &want);
    assert_eq!(remote["source"], "registry");
    let mut same = remote.clone();
    same["source"] = local["source"].clone();
    assert_eq!(same, local);

    // A name neither has.
    let missing = format!("{}/test/nothing:1", reg.host());
    let out = work.run(&["inspect", "--remote", &missing]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("test/nothing"), "{err}");
    let out = work.run(&["inspect", &missing]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no image named"),
        "{}",
        text(&out)
    );
}

/// A plain tar layer in the store.
fn put_layer(
    store: &Store,
    dir: &Path,
    name: &str,
    build: impl FnOnce(&mut TarWriter),
) -> Descriptor {
    let path = dir.join(name);
    let mut t = TarWriter::new(&path);
    build(&mut t);
    t.finish();
    let bytes = std::fs::read(&path).unwrap();
    store
        .put_bytes("application/vnd.oci.image.layer.v1.tar", &bytes)
        .unwrap()
}

#[test]
fn later_layers_override_earlier_ones_and_whiteouts_remove_packages() {
    let work = Work::new();
    let base_ref = "localhost/test/inspect-base:1";
    let base = packages(3);
    work.import(&base, base_ref);
    let store = work.store();
    let dir = work.path("layers");

    // Layer 2: gcc goes (whiteout), bash gets a new SLOT and loses USE, a new package comes.
    let gone = &base
        .iter()
        .find(|p| p.name.starts_with("sys-devel/gcc"))
        .unwrap()
        .name;
    let bash = base
        .iter()
        .find(|p| p.name.starts_with("app-shells/bash"))
        .unwrap();
    let added = pkg(
        "dev-lang/perl-5.40.0",
        "0/5.40",
        Some("amd64 berkdb"),
        "|| ( Artistic GPL-1+ )",
        60_000_000,
    );
    let (gone_cat, gone_pf) = gone.split_once('/').unwrap();
    let top = put_layer(&store, &dir, "top.tar", |t| {
        t.dir("var/db/pkg/");
        t.dir(&format!("var/db/pkg/{gone_cat}/"));
        t.file(&format!("var/db/pkg/{gone_cat}/.wh.{gone_pf}"), b"");
        t.dir(&format!("var/db/pkg/{}/", bash.name));
        t.file(&format!("var/db/pkg/{}/SLOT", bash.name), b"5.2\n");
        t.file(&format!("var/db/pkg/{}/.wh.USE", bash.name), b"");
        t.dir("var/db/pkg/dev-lang/");
        t.package(&added);
    });
    // Layer 3: an opaque virtual/ (libc-1-r1 hidden, a new one in its place).
    let new_virtual = pkg("virtual/libc-1-r2", "0", None, "metapackage", 0);
    let opaque = put_layer(&store, &dir, "opaque.tar", |t| {
        t.dir("var/db/pkg/virtual/");
        t.file("var/db/pkg/virtual/.wh..wh..opq", b"");
        t.package(&new_virtual);
    });
    let base_desc = store.resolve(base_ref).unwrap();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&store.read_descriptor(&base_desc).unwrap()).unwrap();
    for layer in [&top, &opaque] {
        manifest["layers"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::to_value(layer).unwrap());
    }
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let desc = store.put_bytes(MANIFEST_MEDIA_TYPE, &bytes).unwrap();
    let reference = "localhost/test/inspect-layers:1";
    store.tag(reference, desc).unwrap();

    let mut want: BTreeMap<String, Pkg> =
        base.iter().map(|p| (p.name.clone(), p.clone())).collect();
    want.remove(gone);
    want.remove("virtual/libc-1-r1");
    let b = want.get_mut(&bash.name).unwrap();
    b.slot = Some("5.2".into());
    b.use_flags = None;
    want.insert(added.name.clone(), added);
    want.insert(new_virtual.name.clone(), new_virtual);
    let want: Vec<Pkg> = want.into_values().collect();

    check_table(&work.ok(&["inspect", reference]), &want);
    let report = inspect_json(&work, &[reference]);
    check_json(&report, &store, reference, &want);
    assert_eq!(report["layers"].as_array().unwrap().len(), 3);
}

#[test]
fn a_registry_behind_a_token_service_is_read_with_a_pull_token() {
    let work = Work::new();
    let user = "reader";
    let password = "Inspect-pass-never-printed";
    let tokens = TokenServer::start(&work.path("token"), &[(user, password)]);
    let realm = tokens.realm();
    let reg = Registry::start(
        &work.path("registry"),
        RegistryAuth::Token {
            realm: &realm,
            cert: &tokens.cert_pem,
        },
    );
    let host = reg.host();
    let reference = format!("{host}/test/inspect-tok:1");
    let want = packages(5);
    work.import(&want, &reference);
    let home = work.path("with-creds");
    let auth = base64_encode(&format!("{user}:{password}"));
    let config = home.join(".docker/config.json");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::write(
        &config,
        serde_json::json!({"auths": {host.clone(): {"auth": auth}}}).to_string(),
    )
    .unwrap();
    let out = work.run_as(&home, &["-q", "push", &reference]);
    assert!(out.status.success(), "{}", text(&out));
    tokens.clear();

    let out = work.run_as(&home, &["inspect", "--json", "--remote", &reference]);
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    check_json(&report, &work.store(), &reference, &want);
    let asked: Vec<Vec<String>> = tokens.requests().into_iter().map(|r| r.scopes).collect();
    assert!(!asked.is_empty());
    for scopes in &asked {
        assert_eq!(scopes, &["repository:test/inspect-tok:pull".to_string()]);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains(password) && !stderr.contains(&auth),
        "{stderr}"
    );

    // Without credentials: refused, and the message says so.
    let out = work.run_as(&work.path("nobody"), &["inspect", "--remote", &reference]);
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("authentication failed for {host}")),
        "{stderr}"
    );
}

fn base64_encode(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}
