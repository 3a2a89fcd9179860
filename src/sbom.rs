//! SPDX 2.3 SBOMs of images, from each image's own package database (`/var/db/pkg` in its
//! layers, read as [`crate::inspect`] reads it, without extracting anything).
//!
//! One SPDX package per installed package: name `CAT/PN`, version `PVR`, `licenseDeclared`
//! from `LICENSE` (see [`crate::portage::license`]; the names SPDX has no id for are defined
//! in `hasExtractedLicensingInfos`), the repository in `sourceInfo` and in an `OTHER`
//! external reference `gentoo-atom` (`=CAT/PF::REPO`), and the SHA-256 of the binary package
//! when the build's `packages/TAG` still has it. `DEPENDS_ON` relationships come from each
//! package's vdb `RDEPEND` (USE conditionals there are already resolved by Portage): every
//! atom names `CAT/PN`, matched against the installed packages of that name, of its slot
//! when the atom gives one and a package of that slot is installed; blockers are left out
//! and `|| ( … )` links every installed alternative. This is best effort: versions and USE
//! dependencies are not checked. The document `DESCRIBES` the image (a package of purpose
//! `CONTAINER`), which `CONTAINS` every package.
//!
//! Nothing depends on the time or the host: the SPDX ids come from the package names, the
//! namespace from the image manifest's digest, the creation time from the image config, so
//! an unchanged image gives the same document, byte for byte.
//!
//! The document is stored as an OCI artifact with the image as its subject
//! ([`Store::attach`]); `push` sends it along (see [`crate::publish::registry`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::image::StoredImage;
use crate::image::store::{Descriptor, DescriptorExt, Store, write_atomic};
use crate::portage::vdb::Installed;
use crate::portage::{atom, license};

/// Media type (and artifact type) of an SPDX JSON document.
pub const SPDX_MEDIA_TYPE: &str = "application/spdx+json";

/// The vdb files read for the SBOM.
const KEYS: [&str; 6] = [
    "SLOT",
    "USE",
    "LICENSE",
    "repository",
    "RDEPEND",
    "BUILD_ID",
];

/// The most of an SBOM read back from the store.
const SBOM_MAX: u64 = 256 << 20;

/// The installed packages of `image` (its own `/var/db/pkg`, layers read in order).
pub fn installed_packages(store: &Store, image: &StoredImage) -> Result<Vec<Installed>> {
    crate::inspect::installed_in_store(store, &image.reference, &image.layers, &KEYS)
}

/// SHA-256 sums of binary packages, each file hashed once.
#[derive(Debug, Default)]
pub struct BinpkgSums {
    dir: Option<PathBuf>,
    sums: BTreeMap<PathBuf, Option<String>>,
}

impl BinpkgSums {
    /// Sums of the binary packages under `dir` (a `packages/TAG`); `None`: none.
    pub fn new(dir: Option<&Path>) -> Self {
        BinpkgSums {
            dir: dir.map(Path::to_path_buf),
            sums: BTreeMap::new(),
        }
    }

    /// The binary package of `p` (its file name under the package dir, its SHA-256), when
    /// the dir has one: `CAT/PN/PF-BUILD_ID.gpkg.tar` (binpkg-multi-instance) or
    /// `CAT/PF.gpkg.tar`, `CAT/PF.tbz2`. A file that cannot be read is left out, with a
    /// warning.
    fn of(&mut self, p: &Installed) -> Option<(String, String)> {
        let dir = self.dir.clone()?;
        let (cat, pf) = p.package.split_once('/')?;
        let (pn, _) = atom::split_pf(pf)?;
        let mut names = Vec::new();
        if let Some(id) = p.text("BUILD_ID").filter(|s| !s.is_empty()) {
            names.push(format!("{cat}/{pn}/{pf}-{id}.gpkg.tar"));
            names.push(format!("{cat}/{pn}/{pf}-{id}.xpak"));
        }
        names.push(format!("{cat}/{pf}.gpkg.tar"));
        names.push(format!("{cat}/{pf}.tbz2"));
        for name in names {
            let path = dir.join(&name);
            if !path.is_file() {
                continue;
            }
            let sum = self
                .sums
                .entry(path.clone())
                .or_insert_with(|| match crate::archive::digest::sha256_file(&path) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        tracing::warn!("SBOM: no checksum for {}: {e:#}", p.package);
                        None
                    }
                })
                .clone();
            return sum.map(|s| (name, s));
        }
        None
    }
}

/// `s` with every character SPDX does not allow in an id (`[A-Za-z0-9.-]`) replaced.
fn id_part(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        match c {
            '+' => out.push_str("-plus"),
            c if c.is_ascii_alphanumeric() || c == '.' || c == '-' => out.push(c),
            _ => out.push('-'),
        }
    }
    out
}

/// What an image config says of when it was made.
#[derive(Deserialize)]
struct Created {
    #[serde(default)]
    created: Option<String>,
}

/// The SPDX form (`YYYY-MM-DDThh:mm:ssZ`) of an image config's `created`; the epoch when it
/// has none or another form.
fn spdx_time(created: Option<&str>) -> String {
    let epoch = "1970-01-01T00:00:00Z".to_string();
    let Some(c) = created else { return epoch };
    let head = c.get(..19).unwrap_or("");
    let shape = head.bytes().enumerate().all(|(i, b)| match i {
        4 | 7 => b == b'-',
        10 => b == b'T',
        13 | 16 => b == b':',
        _ => b.is_ascii_digit(),
    });
    let utc = c.ends_with('Z') || c.ends_with("+00:00");
    if head.len() == 19 && shape && utc {
        format!("{head}Z")
    } else {
        epoch
    }
}

/// The SPDX document of the image `reference` (manifest `manifest`, created at `created`
/// as its config says) holding `packages`.
pub fn document(
    reference: &str,
    manifest: &Descriptor,
    created: Option<&str>,
    packages: &[Installed],
    sums: &mut BinpkgSums,
) -> Value {
    let name = reference
        .rsplit_once(':')
        .filter(|(_, tag)| !tag.contains('/'))
        .map_or(reference, |(n, _)| n);
    let namespace = format!(
        "https://gentoo-mkimg.invalid/spdx/{name}/{}",
        manifest.digest().digest()
    );
    // Ids: one per CAT/PF, made unique in package order.
    let mut ids: Vec<String> = Vec::new();
    let mut taken = BTreeSet::new();
    for p in packages {
        let base = format!("SPDXRef-Package-{}", id_part(&p.package));
        let mut id = base.clone();
        let mut n = 2;
        while !taken.insert(id.clone()) {
            id = format!("{base}-{n}");
            n += 1;
        }
        ids.push(id);
    }
    // CAT/PN → (index, primary slot).
    let mut by_name: BTreeMap<String, Vec<(usize, String)>> = BTreeMap::new();
    for (i, p) in packages.iter().enumerate() {
        if let Some((cpn, _)) = atom::split_cpf(&p.package) {
            let slot = p.text("SLOT").unwrap_or_default();
            let primary = slot.split('/').next().unwrap_or("").to_string();
            by_name.entry(cpn).or_default().push((i, primary));
        }
    }

    let image_id = "SPDXRef-Image";
    let mut spdx_packages = vec![json!({
        "SPDXID": image_id,
        "name": reference,
        "versionInfo": manifest.digest().to_string(),
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": false,
        "primaryPackagePurpose": "CONTAINER",
        "checksums": [{"algorithm": "SHA256", "checksumValue": manifest.digest().digest()}],
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": "NOASSERTION",
        "copyrightText": "NOASSERTION",
    })];
    let mut relationships = vec![json!({
        "spdxElementId": "SPDXRef-DOCUMENT",
        "relationshipType": "DESCRIBES",
        "relatedSpdxElement": image_id,
    })];
    let mut unmapped = BTreeSet::new();
    let mut depends: BTreeSet<(usize, usize)> = BTreeSet::new();
    for (i, p) in packages.iter().enumerate() {
        let (pn, pvr) = match atom::split_cpf(&p.package) {
            Some((cpn, pvr)) => (cpn, pvr.to_string()),
            None => (p.package.clone(), "NOASSERTION".to_string()),
        };
        let repo = p.text("repository").filter(|r| !r.is_empty());
        let declared = match p.text("LICENSE") {
            Some(l) => {
                let m = license::to_spdx(&l, &p.text("USE").unwrap_or_default());
                unmapped.extend(m.unmapped);
                m.expression
            }
            None => "NOASSERTION".to_string(),
        };
        let mut pkg = json!({
            "SPDXID": ids[i],
            "name": pn,
            "versionInfo": pvr,
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": false,
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": declared,
            "copyrightText": "NOASSERTION",
            "sourceInfo": match &repo {
                Some(r) => format!("built by Portage from the ebuild of repository {r}"),
                None => "built by Portage (the vdb names no repository)".to_string(),
            },
            "externalRefs": [{
                "referenceCategory": "OTHER",
                "referenceType": "gentoo-atom",
                "referenceLocator": match &repo {
                    Some(r) => format!("={}::{r}", p.package),
                    None => format!("={}", p.package),
                },
            }],
        });
        if let Some((file, sum)) = sums.of(p) {
            pkg["packageFileName"] = json!(file);
            pkg["checksums"] = json!([{"algorithm": "SHA256", "checksumValue": sum}]);
        }
        spdx_packages.push(pkg);
        relationships.push(json!({
            "spdxElementId": image_id,
            "relationshipType": "CONTAINS",
            "relatedSpdxElement": ids[i],
        }));
        for dep in atom::deps(&p.text("RDEPEND").unwrap_or_default()) {
            let Some(candidates) = by_name.get(&dep.name) else {
                continue;
            };
            let wanted = dep.slot.as_deref().and_then(|s| s.split('/').next());
            let of_slot: Vec<usize> = candidates
                .iter()
                .filter(|(_, slot)| Some(slot.as_str()) == wanted)
                .map(|(j, _)| *j)
                .collect();
            let chosen: Vec<usize> = if of_slot.is_empty() {
                candidates.iter().map(|(j, _)| *j).collect()
            } else {
                of_slot
            };
            depends.extend(chosen.into_iter().filter(|&j| j != i).map(|j| (i, j)));
        }
    }
    relationships.extend(depends.into_iter().map(|(i, j)| {
        json!({
            "spdxElementId": ids[i],
            "relationshipType": "DEPENDS_ON",
            "relatedSpdxElement": ids[j],
        })
    }));
    let extracted: Vec<Value> = unmapped
        .iter()
        .map(|n| {
            json!({
                "licenseId": license::license_ref(n),
                "name": n,
                "extractedText": format!(
                    "The Gentoo licence {n}: see licenses/{n} in the Gentoo repository."
                ),
                "seeAlsos": [format!(
                    "https://gitweb.gentoo.org/repo/gentoo.git/plain/licenses/{n}"
                )],
            })
        })
        .collect();
    let mut doc = json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": reference,
        "documentNamespace": namespace,
        "creationInfo": {
            "created": spdx_time(created),
            "creators": [format!("Tool: gentoo-mkimg-{}", env!("CARGO_PKG_VERSION"))],
            "comment": "From the image's own /var/db/pkg; DEPENDS_ON from each package's \
                        RDEPEND, best effort.",
        },
        "packages": spdx_packages,
        "relationships": relationships,
    });
    if !extracted.is_empty() {
        doc["hasExtractedLicensingInfos"] = json!(extracted);
    }
    doc
}

/// The SBOM of `image` as JSON bytes, made from its layers.
pub fn make(store: &Store, image: &StoredImage, sums: &mut BinpkgSums) -> Result<Vec<u8>> {
    let packages = installed_packages(store, image)?;
    let config = store
        .read_descriptor(&image.config)
        .with_context(|| format!("image {}: its config", image.reference))?;
    let created: Created = serde_json::from_slice(&config)
        .with_context(|| format!("image {}: the config is not valid JSON", image.reference))?;
    let doc = document(
        &image.reference,
        &image.manifest,
        created.created.as_deref(),
        &packages,
        sums,
    );
    let mut bytes = serde_json::to_vec_pretty(&doc).context("cannot write the SBOM as JSON")?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Make the SBOM of `image` and store it as an artifact with the image as its subject.
/// Returns the artifact manifest's descriptor and the document.
pub fn attach(
    store: &Store,
    image: &StoredImage,
    sums: &mut BinpkgSums,
) -> Result<(Descriptor, Vec<u8>)> {
    let bytes =
        make(store, image, sums).with_context(|| format!("the SBOM of {}", image.reference))?;
    let desc = store
        .attach(&image.manifest, SPDX_MEDIA_TYPE, &bytes, &BTreeMap::new())
        .with_context(|| format!("cannot store the SBOM of {}", image.reference))?;
    Ok((desc, bytes))
}

/// The SBOM the store holds for `image`, if any (the last one attached).
pub fn stored(store: &Store, image: &StoredImage) -> Result<Option<Vec<u8>>> {
    let Some(desc) = store
        .referrers(&image.manifest.blob()?, Some(SPDX_MEDIA_TYPE))?
        .pop()
    else {
        return Ok(None);
    };
    let manifest = store.read_manifest(&desc)?;
    let Some(layer) = manifest
        .layers()
        .iter()
        .find(|l| l.kind() == SPDX_MEDIA_TYPE && l.size() <= SBOM_MAX)
    else {
        return Ok(None);
    };
    Ok(Some(store.read_descriptor(layer)?))
}

/// For a build: the SBOM of each of `images` (kind, image) in the store (made when the store
/// has none for the image yet), with the binary packages of `packages_dir` checksummed; with
/// `out_dir`, also written there as `KIND.spdx.json`.
pub fn for_build(
    store: &Store,
    images: &[(&str, &StoredImage)],
    packages_dir: &Path,
    out_dir: Option<&Path>,
) -> Result<()> {
    let mut sums = BinpkgSums::new(Some(packages_dir));
    for (kind, image) in images {
        let bytes = match stored(store, image)? {
            Some(bytes) => bytes,
            None => attach(store, image, &mut sums)?.1,
        };
        if let Some(dir) = out_dir {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("{}: cannot create", dir.display()))?;
            let path = dir.join(format!("{kind}.spdx.json"));
            write_atomic(&path, &bytes)
                .with_context(|| format!("the SBOM of {}", image.reference))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::store::Digest;

    fn pkg(cpf: &str, values: &[(&'static str, &str)]) -> Installed {
        Installed {
            package: cpf.to_string(),
            values: values
                .iter()
                .map(|(k, v)| (*k, v.as_bytes().to_vec()))
                .collect(),
        }
    }

    #[test]
    fn packages_licences_and_dependencies() {
        let packages = [
            pkg(
                "app-shells/bash-5.2_p37",
                &[
                    ("LICENSE", "GPL-3+ doc? ( FDL-1.3 )"),
                    ("USE", "nls"),
                    (
                        "RDEPEND",
                        ">=sys-libs/ncurses-6:0= !app-shells/old sys-libs/readline:0/8",
                    ),
                    ("repository", "gentoo"),
                    ("SLOT", "0"),
                ],
            ),
            pkg(
                "sys-libs/ncurses-6.4",
                &[("SLOT", "0/6"), ("LICENSE", "MIT")],
            ),
            pkg("sys-libs/ncurses-5.9", &[("SLOT", "5"), ("LICENSE", "MIT")]),
            pkg("virtual/libc-1-r1", &[("LICENSE", "metapackage")]),
        ];
        let manifest = crate::image::oci::descriptor("m", &Digest::of(b"x"), 1);
        let doc = document(
            "localhost/g-rt:1",
            &manifest,
            Some("2024-05-06T07:08:09Z"),
            &packages,
            &mut BinpkgSums::new(None),
        );
        assert_eq!(doc["creationInfo"]["created"], "2024-05-06T07:08:09Z");
        assert_eq!(
            doc["documentNamespace"],
            format!(
                "https://gentoo-mkimg.invalid/spdx/localhost/g-rt/{}",
                manifest.digest().digest()
            )
        );
        let bash = &doc["packages"][1];
        assert_eq!(bash["name"], "app-shells/bash");
        assert_eq!(bash["versionInfo"], "5.2_p37");
        assert_eq!(bash["licenseDeclared"], "GPL-3.0-or-later");
        assert_eq!(bash["SPDXID"], "SPDXRef-Package-app-shells-bash-5.2-p37");
        assert_eq!(
            bash["externalRefs"][0]["referenceLocator"],
            "=app-shells/bash-5.2_p37::gentoo"
        );
        let deps: Vec<(&str, &str)> = doc["relationships"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["relationshipType"] == "DEPENDS_ON")
            .map(|r| {
                (
                    r["spdxElementId"].as_str().unwrap(),
                    r["relatedSpdxElement"].as_str().unwrap(),
                )
            })
            .collect();
        // ncurses:0 is the 6.4 one; readline is not installed.
        assert_eq!(
            deps,
            [(
                "SPDXRef-Package-app-shells-bash-5.2-p37",
                "SPDXRef-Package-sys-libs-ncurses-6.4"
            )]
        );
        assert_eq!(
            doc["hasExtractedLicensingInfos"][0]["licenseId"],
            "LicenseRef-Gentoo-metapackage"
        );
    }

    #[test]
    fn times_are_spdx_utc_seconds() {
        assert_eq!(
            spdx_time(Some("2024-01-02T03:04:05Z")),
            "2024-01-02T03:04:05Z"
        );
        assert_eq!(
            spdx_time(Some("2024-01-02T03:04:05.123Z")),
            "2024-01-02T03:04:05Z"
        );
        assert_eq!(
            spdx_time(Some("2024-01-02T03:04:05+02:00")),
            "1970-01-01T00:00:00Z"
        );
        assert_eq!(spdx_time(None), "1970-01-01T00:00:00Z");
    }
}
