//! SPDX SBOMs: made from an image's own /var/db/pkg, stored as an OCI artifact whose subject
//! is the image (kept and collected with it), valid against the official SPDX 2.3 schema
//! (tests/fixtures/spdx-2.3-schema.json, see the .md beside it), and pushed with the image
//! to the real distribution registry (Debian's `docker-registry`) on 127.0.0.1.
//!
//! The images are small: one tar layer written here and put into the store with a config
//! and a manifest, no import and no build. What the SBOM must list is worked out from the
//! packages the test wrote, never written down twice.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use gentoo_mkimg::image::StoredImage;
use gentoo_mkimg::image::oci::DescriptorExt;
use gentoo_mkimg::image::store::{
    Descriptor, Digest, EMPTY_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, Store,
};
use gentoo_mkimg::progress::Verbosity;
use gentoo_mkimg::publish::registry::{PushOptions, push};
use gentoo_mkimg::sbom::{self, SPDX_MEDIA_TYPE};
use serde_json::{Value, json};

use support::{Registry, RegistryAuth};

/// One vdb entry: CAT/PF and its files.
struct Pkg {
    cpf: &'static str,
    files: &'static [(&'static str, &'static str)],
}

const PACKAGES: &[Pkg] = &[
    Pkg {
        cpf: "app-shells/bash-5.2_p37",
        files: &[
            ("SLOT", "0"),
            ("USE", "amd64 nls readline"),
            ("LICENSE", "GPL-3+ doc? ( FDL-1.3+ )"),
            ("repository", "gentoo"),
            (
                "RDEPEND",
                ">=sys-libs/ncurses-5.2-r2:0= readline? ( sys-libs/readline:0/8= ) \
                 !app-shells/bash-old virtual/libc",
            ),
        ],
    },
    Pkg {
        cpf: "sys-libs/ncurses-6.4_p20240414",
        files: &[
            ("SLOT", "0/6"),
            ("USE", "cxx"),
            ("LICENSE", "MIT"),
            ("repository", "gentoo"),
            ("BUILD_ID", "1"),
        ],
    },
    Pkg {
        cpf: "sys-libs/zlib-1.3.1-r1",
        files: &[
            ("SLOT", "0/1"),
            ("LICENSE", "ZLIB"),
            ("repository", "gentoo"),
            ("RDEPEND", ""),
        ],
    },
    Pkg {
        cpf: "dev-lang/perl-5.40.0",
        files: &[
            ("SLOT", "0/5.40"),
            ("USE", "berkdb"),
            ("LICENSE", "|| ( Artistic GPL-1+ ) gdbm? ( GPL-2 )"),
            ("repository", "gentoo"),
            ("RDEPEND", "sys-libs/zlib:= berkdb? ( sys-libs/db:* )"),
        ],
    },
    Pkg {
        cpf: "virtual/libc-1-r1",
        files: &[("SLOT", "0"), ("LICENSE", ""), ("repository", "gentoo")],
    },
    Pkg {
        cpf: "app-misc/hello-2.12.1",
        files: &[
            ("SLOT", "0"),
            ("LICENSE", "GPL-3+ ( public-domain"),
            ("repository", "local-overlay"),
        ],
    },
];

fn tar_header(kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(if kind == tar::EntryType::Directory {
        0o755
    } else {
        0o644
    });
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(size);
    h
}

/// A root layer holding `packages` in var/db/pkg (and things that are not packages).
fn layer(packages: &[Pkg], seed: u64) -> Vec<u8> {
    let mut t = tar::Builder::new(Vec::new());
    let dir = |t: &mut tar::Builder<Vec<u8>>, name: &str| {
        let mut h = tar_header(tar::EntryType::Directory, 0);
        t.append_data(&mut h, name, std::io::empty()).unwrap();
    };
    let file = |t: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]| {
        let mut h = tar_header(tar::EntryType::Regular, data.len() as u64);
        t.append_data(&mut h, name, data).unwrap();
    };
    for d in ["var/", "var/db/", "var/db/pkg/", "etc/"] {
        dir(&mut t, d);
    }
    file(&mut t, "etc/seed", seed.to_string().as_bytes());
    for p in packages {
        let base = format!("var/db/pkg/{}", p.cpf);
        dir(&mut t, &format!("{base}/"));
        for (k, v) in p.files {
            file(&mut t, &format!("{base}/{k}"), format!("{v}\n").as_bytes());
        }
        file(&mut t, &format!("{base}/EAPI"), b"8\n");
    }
    dir(&mut t, "var/db/pkg/sys-apps/-MERGING-sed-4.9/");
    file(&mut t, "var/db/pkg/sys-apps/-MERGING-sed-4.9/SLOT", b"0\n");
    t.into_inner().unwrap()
}

/// Put an image of one `layer` into `store`, tagged `reference`.
fn put_image(store: &Store, reference: &str, layer: &[u8]) -> StoredImage {
    let layer = store
        .put_bytes("application/vnd.oci.image.layer.v1.tar", layer)
        .unwrap();
    let config = json!({
        "created": "2024-05-06T07:08:09Z",
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer.digest()]},
        "config": {},
    });
    let config = store
        .put_bytes(
            "application/vnd.oci.image.config.v1+json",
            &serde_json::to_vec(&config).unwrap(),
        )
        .unwrap();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": config,
        "layers": [layer],
    });
    let manifest = store
        .put_bytes(MANIFEST_MEDIA_TYPE, &serde_json::to_vec(&manifest).unwrap())
        .unwrap();
    store.tag(reference, manifest.clone()).unwrap();
    StoredImage {
        reference: reference.to_string(),
        manifest,
        config,
        layers: vec![layer],
    }
}

fn schema_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spdx-2.3-schema.json")
}

/// Validate `doc` against the SPDX 2.3 schema with Python's jsonschema.
fn assert_valid_spdx(doc: &Path) {
    let script = "import json, sys, jsonschema\n\
                  schema = json.load(open(sys.argv[1]))\n\
                  doc = json.load(open(sys.argv[2]))\n\
                  v = jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker())\n\
                  errors = sorted(v.iter_errors(doc), key=lambda e: list(e.path))\n\
                  for e in errors: print(list(e.path), e.message)\n\
                  sys.exit(1 if errors else 0)\n";
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(schema_path())
        .arg(doc)
        .output()
        .expect("python3 runs (tests/sbom.rs needs its jsonschema module: python3-jsonschema)");
    assert!(
        out.status.success(),
        "{} is not valid SPDX 2.3:\n{}{}",
        doc.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sha256_hex(bytes: &[u8]) -> String {
    Digest::of(bytes).hex().to_string()
}

/// The artifact manifest `desc` in `store`, as JSON.
fn read_json(store: &Store, desc: &Descriptor) -> Value {
    serde_json::from_slice(&store.read_descriptor(desc).unwrap()).unwrap()
}

/// Checks every SBOM artifact must pass: what the manifest says and that its subject is
/// `image`. Returns the document.
fn check_artifact(store: &Store, artifact: &Descriptor, image: &StoredImage) -> Value {
    assert_eq!(artifact.kind(), MANIFEST_MEDIA_TYPE);
    assert_eq!(
        artifact
            .artifact_type()
            .as_ref()
            .map(|t| t.to_string())
            .as_deref(),
        Some(SPDX_MEDIA_TYPE)
    );
    let m = read_json(store, artifact);
    assert_eq!(m["artifactType"], SPDX_MEDIA_TYPE);
    assert_eq!(m["config"]["mediaType"], EMPTY_MEDIA_TYPE);
    assert_eq!(m["config"]["digest"], Digest::of(b"{}").as_str());
    assert_eq!(m["config"]["size"], 2);
    assert_eq!(m["subject"]["digest"], image.manifest.digest().to_string());
    assert_eq!(m["subject"]["size"], image.manifest.size());
    assert_eq!(m["subject"]["mediaType"], MANIFEST_MEDIA_TYPE);
    assert!(m["subject"].get("annotations").is_none(), "{m}");
    let layers = m["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    assert_eq!(layers[0]["mediaType"], SPDX_MEDIA_TYPE);
    let layer: Descriptor = serde_json::from_value(layers[0].clone()).unwrap();
    serde_json::from_slice(&store.read_descriptor(&layer).unwrap()).unwrap()
}

/// The (name, version) of every package of a document but the image itself.
fn listed(doc: &Value) -> BTreeSet<(String, String)> {
    doc["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["SPDXID"] != "SPDXRef-Image")
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["versionInfo"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn by_name<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("{name} is not in the SBOM"))
}

fn spdx_id(doc: &Value, name: &str) -> String {
    by_name(doc, name)["SPDXID"].as_str().unwrap().to_string()
}

#[test]
fn the_sbom_lists_the_vdb_packages_is_valid_spdx_and_is_attached_to_the_image() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::new(tmp.path().join("images"));
    let image = put_image(&store, "localhost/test/sbom-dev:1", &layer(PACKAGES, 1));
    let rt = put_image(
        &store,
        "localhost/test/sbom-rt:1",
        &layer(&PACKAGES[1..3], 2),
    );
    // packages/TAG with the binary package of ncurses (binpkg-multi-instance layout).
    let binpkgs = tmp.path().join("packages");
    let gpkg = binpkgs.join("sys-libs/ncurses/ncurses-6.4_p20240414-1.gpkg.tar");
    std::fs::create_dir_all(gpkg.parent().unwrap()).unwrap();
    std::fs::write(&gpkg, b"not really a gpkg, but bytes to hash").unwrap();
    let out = tmp.path().join("sbom");

    sbom::for_build(
        &store,
        &[("dev", &image), ("rt", &rt)],
        &binpkgs,
        Some(&out),
    )
    .unwrap();

    for (kind, img, pkgs) in [("dev", &image, PACKAGES), ("rt", &rt, &PACKAGES[1..3])] {
        let referrers = store
            .referrers(&img.manifest.blob().unwrap(), Some(SPDX_MEDIA_TYPE))
            .unwrap();
        assert_eq!(referrers.len(), 1, "{kind}");
        let doc = check_artifact(&store, &referrers[0], img);
        // The file written beside is the stored document, byte for byte.
        let file = out.join(format!("{kind}.spdx.json"));
        let written: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(written, doc);
        assert_valid_spdx(&file);
        // Exactly the vdb's packages (not the half-merged one).
        let want: BTreeSet<(String, String)> = pkgs
            .iter()
            .map(|p| {
                let (cat, pf) = p.cpf.split_once('/').unwrap();
                let (pn, pvr) = gentoo_mkimg::portage::atom::split_pf(pf).unwrap();
                (format!("{cat}/{pn}"), pvr.to_string())
            })
            .collect();
        assert_eq!(listed(&doc), want, "{kind}");
        assert_eq!(doc["name"], img.reference);
        assert_eq!(doc["creationInfo"]["created"], "2024-05-06T07:08:09Z");
        assert!(
            doc["documentNamespace"]
                .as_str()
                .unwrap()
                .ends_with(img.manifest.digest().digest())
        );
        let ncurses = by_name(&doc, "sys-libs/ncurses");
        assert_eq!(ncurses["licenseDeclared"], "MIT");
        assert_eq!(
            ncurses["checksums"],
            json!([{"algorithm": "SHA256", "checksumValue": sha256_hex(&std::fs::read(&gpkg).unwrap())}])
        );
        assert!(by_name(&doc, "sys-libs/zlib").get("checksums").is_none());
        // The document describes the image, which contains every package.
        let rels = doc["relationships"].as_array().unwrap();
        let has = |a: &str, kind: &str, b: &str| {
            rels.iter().any(|r| {
                r["spdxElementId"] == a
                    && r["relationshipType"] == kind
                    && r["relatedSpdxElement"] == b
            })
        };
        assert!(has("SPDXRef-DOCUMENT", "DESCRIBES", "SPDXRef-Image"));
        for p in doc["packages"].as_array().unwrap() {
            let id = p["SPDXID"].as_str().unwrap();
            assert!(
                id == "SPDXRef-Image" || has("SPDXRef-Image", "CONTAINS", id),
                "{id}"
            );
        }
    }

    // Licences and dependencies of dev.
    let dev: Value =
        serde_json::from_slice(&std::fs::read(out.join("dev.spdx.json")).unwrap()).unwrap();
    let licence = |name: &str| by_name(&dev, name)["licenseDeclared"].clone();
    assert_eq!(licence("app-shells/bash"), "GPL-3.0-or-later");
    assert_eq!(
        licence("dev-lang/perl"),
        "Artistic-1.0-Perl OR GPL-1.0-or-later"
    );
    assert_eq!(licence("sys-libs/zlib"), "Zlib");
    assert_eq!(licence("virtual/libc"), "NOASSERTION");
    assert_eq!(licence("app-misc/hello"), "NOASSERTION");
    assert_eq!(
        by_name(&dev, "app-misc/hello")["externalRefs"][0]["referenceLocator"],
        "=app-misc/hello-2.12.1::local-overlay"
    );
    let depends: BTreeSet<(String, String)> = dev["relationships"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["relationshipType"] == "DEPENDS_ON")
        .map(|r| {
            (
                r["spdxElementId"].as_str().unwrap().to_string(),
                r["relatedSpdxElement"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: BTreeSet<(String, String)> = [
        ("app-shells/bash", "sys-libs/ncurses"),
        ("app-shells/bash", "virtual/libc"),
        ("dev-lang/perl", "sys-libs/zlib"),
    ]
    .into_iter()
    .map(|(a, b)| (spdx_id(&dev, a), spdx_id(&dev, b)))
    .collect();
    assert_eq!(depends, want);

    // The same image again: the same document, and still one artifact.
    let first = std::fs::read(out.join("dev.spdx.json")).unwrap();
    let mut sums = sbom::BinpkgSums::new(Some(&binpkgs));
    let (again, bytes) = sbom::attach(&store, &image, &mut sums).unwrap();
    assert_eq!(bytes, first);
    let referrers = store
        .referrers(&image.manifest.blob().unwrap(), None)
        .unwrap();
    assert_eq!(referrers.len(), 1);
    assert_eq!(referrers[0].digest(), again.digest());
}

#[test]
fn gc_keeps_the_sbom_of_a_kept_image_and_drops_it_with_the_image() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::new(tmp.path().join("images"));
    let reference = "localhost/test/sbom-gc:1";
    let old = put_image(&store, reference, &layer(PACKAGES, 10));
    let (artifact, _) = sbom::attach(&store, &old, &mut sbom::BinpkgSums::new(None)).unwrap();
    let artifact_blobs: Vec<Digest> = {
        let m = store.read_manifest(&artifact).unwrap();
        [artifact.blob().unwrap(), m.config().blob().unwrap()]
            .into_iter()
            .chain(m.layers().iter().map(|l| l.blob().unwrap()))
            .collect()
    };

    // Kept image: gc takes nothing of it or of its SBOM.
    let gone = store.collect_garbage(false).unwrap();
    assert!(gone.iter().all(|g| g.temporary), "{gone:?}");
    for d in &artifact_blobs {
        assert!(store.has_blob(d), "{d}");
    }
    assert_eq!(
        store
            .referrers(&old.manifest.blob().unwrap(), None)
            .unwrap()
            .len(),
        1
    );

    // The tag moves to a new image: the old one goes, and its SBOM with it; the new image's
    // SBOM stays.
    let new = put_image(&store, reference, &layer(&PACKAGES[..2], 11));
    let (new_artifact, _) = sbom::attach(&store, &new, &mut sbom::BinpkgSums::new(None)).unwrap();
    let dry = store.collect_garbage(true).unwrap();
    assert!(!dry.is_empty());
    assert!(
        store.has_blob(&artifact.blob().unwrap()),
        "a dry run removes nothing"
    );
    store.collect_garbage(false).unwrap();
    assert!(!store.has_blob(&old.manifest.blob().unwrap()));
    assert!(!store.has_blob(&artifact.blob().unwrap()));
    // The SBOM layer of the old image (its config, the empty blob, is shared).
    let old_layer = &artifact_blobs[2];
    assert!(!store.has_blob(old_layer));
    assert!(store.has_blob(&new_artifact.blob().unwrap()));
    assert!(store.has_blob(&Digest::of(b"{}")));
    let index = store.read_index().unwrap();
    let untagged: Vec<&Descriptor> = index
        .manifests()
        .iter()
        .filter(|d| d.ref_name().is_none())
        .collect();
    assert_eq!(untagged.len(), 1);
    assert_eq!(untagged[0].digest(), new_artifact.digest());
    assert_eq!(
        store
            .referrers(&new.manifest.blob().unwrap(), None)
            .unwrap()
            .len(),
        1
    );
    // And the store still reads as a whole.
    assert!(
        store
            .reachable()
            .unwrap()
            .contains(&new_artifact.blob().unwrap())
    );
}

/// GET `path` on the registry with `accept`: (status, body as JSON if any).
fn get_json(reg: &Registry, path: &str, accept: &str) -> (u16, Option<Value>) {
    let (status, _, body) =
        support::http(reg.addr, "GET", path, &[("Accept", accept)]).expect("the registry answers");
    (status, serde_json::from_slice(&body).ok())
}

const INDEX: &str = "application/vnd.oci.image.index.v1+json";

#[test]
fn push_sends_the_sbom_and_links_it_to_the_image_on_the_registry() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("registry"), RegistryAuth::None);
    let store = Store::new(tmp.path().join("images"));
    let repo = "test/sbom-push";
    let reference = format!("{}/{repo}:1", reg.host());
    let image = put_image(&store, &reference, &layer(PACKAGES, 20));
    let (artifact, bytes) = sbom::attach(&store, &image, &mut sbom::BinpkgSums::new(None)).unwrap();
    let opts = PushOptions {
        verbosity: Verbosity::Quiet,
        ..Default::default()
    };

    let report = push(&store, &reference, &opts).unwrap();
    assert_eq!(report.digest, image.manifest.blob().unwrap());
    assert_eq!(report.referrers.len(), 1);
    assert_eq!(report.referrers[0].digest, artifact.blob().unwrap());

    // The artifact is on the registry, by digest, with the image as its subject.
    let (status, manifest) = get_json(
        &reg,
        &format!("/v2/{repo}/manifests/{}", artifact.digest()),
        MANIFEST_MEDIA_TYPE,
    );
    assert_eq!(status, 200);
    let manifest = manifest.unwrap();
    assert_eq!(
        manifest["subject"]["digest"],
        image.manifest.digest().to_string()
    );
    assert_eq!(manifest["artifactType"], SPDX_MEDIA_TYPE);
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, _, body) =
        support::http(reg.addr, "GET", &format!("/v2/{repo}/blobs/{layer}"), &[]).unwrap();
    assert_eq!((status, body), (200, bytes));

    // How the registry lists it: the referrers API if it has one, else the tag scheme.
    let referrers_path = format!("/v2/{repo}/referrers/{}", image.manifest.digest());
    let tag_path = format!(
        "/v2/{repo}/manifests/sha256-{}",
        image.manifest.digest().digest()
    );
    let listed = |reg: &Registry| -> Vec<Value> {
        let (status, index) = get_json(reg, &referrers_path, INDEX);
        let index = if status == 200 {
            index.unwrap()
        } else {
            let (status, index) = get_json(reg, &tag_path, INDEX);
            assert_eq!(
                status, 200,
                "neither the referrers API nor the tag scheme lists it"
            );
            index.unwrap()
        };
        index["manifests"].as_array().unwrap().clone()
    };
    let api = get_json(&reg, &referrers_path, INDEX).0 == 200;
    assert_eq!(report.referrers[0].by_api, api);
    let found = listed(&reg);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["digest"], artifact.digest().to_string());
    assert_eq!(found[0]["artifactType"], SPDX_MEDIA_TYPE);
    assert_eq!(found[0]["mediaType"], MANIFEST_MEDIA_TYPE);
    if !api {
        // The tag scheme's index names its own media type.
        let (_, index) = get_json(&reg, &tag_path, INDEX);
        assert_eq!(index.unwrap()["mediaType"], INDEX);
    }

    // Pushed again: nothing doubles. Another artifact for the image joins the list (the
    // index is updated, not replaced).
    push(&store, &reference, &opts).unwrap();
    assert_eq!(listed(&reg).len(), 1);
    let other = store
        .attach(
            &image.manifest,
            "application/vnd.example.test+json",
            b"{\"note\": 1}",
            &BTreeMap::new(),
        )
        .unwrap();
    let report = push(&store, &reference, &opts).unwrap();
    assert_eq!(report.referrers.len(), 2);
    let digests: BTreeSet<String> = listed(&reg)
        .iter()
        .map(|d| d["digest"].as_str().unwrap().to_string())
        .collect();
    let want: BTreeSet<String> = [artifact.digest().to_string(), other.digest().to_string()]
        .into_iter()
        .collect();
    assert_eq!(digests, want);
    // The image's tag still names the image.
    let (status, manifest) = get_json(
        &reg,
        &format!("/v2/{repo}/manifests/1"),
        MANIFEST_MEDIA_TYPE,
    );
    assert_eq!(status, 200);
    assert!(manifest.unwrap().get("subject").is_none());
}
