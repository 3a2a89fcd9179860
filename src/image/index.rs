//! Images of several platforms under one name: an OCI image index in the store whose entries
//! are the images of each platform, each with its platform in its descriptor. A multi-platform
//! build or import writes one per name ([`write_index`]); whoever opens a name that is an
//! index takes the entry of one platform, the host's unless told otherwise ([`pick`]).

use anyhow::{Context, Result, bail};

use crate::image::config::{self, Platform};
use crate::image::oci::{
    self, Arch, Descriptor, DescriptorExt, ImageIndex, MediaType, Os, PlatformBuilder,
};
use crate::image::store::{INDEX_MEDIA_TYPE, Store};

/// Whether `desc` names an image index (OCI's, or Docker's manifest list) rather than an image.
pub fn is_index(desc: &Descriptor) -> bool {
    matches!(
        desc.kind(),
        INDEX_MEDIA_TYPE | "application/vnd.docker.distribution.manifest.list.v2+json"
    )
}

/// Our platform in oci-spec's terms (OS linux).
pub fn to_oci(platform: &Platform) -> Result<oci::Platform> {
    let mut p = PlatformBuilder::default()
        .os(Os::Linux)
        .architecture(Arch::from(platform.architecture.as_str()))
        .build()
        .with_context(|| format!("platform {platform}"))?;
    p.set_variant(platform.variant.clone());
    Ok(p)
}

/// Whether an index entry of platform `found` serves `want`: the same OS (linux) and
/// architecture, and the same variant when `want` names one.
fn serves(found: &oci::Platform, want: &Platform) -> bool {
    *found.os() == Os::Linux
        && found.architecture().to_string() == want.architecture
        && (want.variant.is_none() || found.variant().as_deref() == want.variant.as_deref())
}

/// The image index `desc` names, read checked.
pub fn read_index(store: &Store, desc: &Descriptor) -> Result<ImageIndex> {
    let bytes = store.read_descriptor(desc)?;
    serde_json::from_slice(&bytes)
        .with_context(|| format!("index {} is not a valid OCI image index", desc.digest()))
}

/// The platforms of the entries of the index `desc` (entries without one are skipped: they
/// are not images of a platform, e.g. attestations).
pub fn platforms(store: &Store, desc: &Descriptor) -> Result<Vec<oci::Platform>> {
    Ok(read_index(store, desc)?
        .manifests()
        .iter()
        .filter_map(|d| d.platform().clone())
        .collect())
}

/// The entry of the index `desc` (named `reference`) for `want`, or for the host's
/// architecture when `want` is `None`; an error naming the platforms it has otherwise.
pub fn pick(
    store: &Store,
    reference: &str,
    desc: &Descriptor,
    want: Option<&Platform>,
) -> Result<Descriptor> {
    let index = read_index(store, desc).with_context(|| reference.to_string())?;
    choose(index.manifests(), reference, want)
}

/// The entry of `entries` (an index's, of the image `reference`) for `want`, or for the
/// host's architecture when `want` is `None`; an error naming the platforms there are
/// otherwise. The store's indexes and a registry's alike.
pub fn choose(
    entries: &[Descriptor],
    reference: &str,
    want: Option<&Platform>,
) -> Result<Descriptor> {
    let host = Platform {
        architecture: config::host_architecture().to_string(),
        variant: None,
    };
    let want = want.unwrap_or(&host);
    if let Some(entry) = entries
        .iter()
        .find(|d| d.platform().as_ref().is_some_and(|p| serves(p, want)))
    {
        return Ok(entry.clone());
    }
    let has: Vec<String> = entries
        .iter()
        .filter_map(|d| d.platform().as_ref().map(oci::platform_text))
        .collect();
    bail!(
        "{reference} is an image index of {}: none is for {want}",
        if has.is_empty() {
            "no platform".to_string()
        } else {
            has.join(", ")
        }
    )
}

/// Store an image index of `entries` (each an image manifest and the platform its config
/// names, in this order), untagged. Two entries of one platform are an error.
pub fn write_index(store: &Store, entries: &[(Platform, Descriptor)]) -> Result<Descriptor> {
    let mut manifests = Vec::with_capacity(entries.len());
    for (i, (platform, manifest)) in entries.iter().enumerate() {
        if let Some((_, other)) = entries[..i].iter().find(|(p, _)| p == platform) {
            bail!(
                "two images of {platform} for one index: {} and {}",
                other.digest(),
                manifest.digest()
            );
        }
        let mut entry = manifest.plain();
        entry.set_platform(Some(to_oci(platform)?));
        manifests.push(entry);
    }
    let mut index = ImageIndex::default();
    index.set_media_type(Some(MediaType::ImageIndex));
    index.set_manifests(manifests);
    store.put_bytes(INDEX_MEDIA_TYPE, &oci::to_json(&index)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::store::MANIFEST_MEDIA_TYPE;

    fn platform(s: &str) -> Platform {
        s.parse().unwrap()
    }

    #[test]
    fn an_index_serves_each_platform_its_own_image_and_names_what_it_has() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let amd = store.put_bytes(MANIFEST_MEDIA_TYPE, b"{\"a\":1}").unwrap();
        let arm = store.put_bytes(MANIFEST_MEDIA_TYPE, b"{\"b\":2}").unwrap();
        let entries = [
            (platform("linux/amd64"), amd.clone()),
            (platform("linux/arm64/v8"), arm.clone()),
        ];
        let index = write_index(&store, &entries).unwrap();
        assert!(is_index(&index));
        // The same entries give the same bytes.
        assert_eq!(
            write_index(&store, &entries).unwrap().digest(),
            index.digest()
        );

        let got = |want: &str| pick(&store, "x:1", &index, Some(&platform(want)));
        assert_eq!(got("linux/amd64").unwrap().digest(), amd.digest());
        assert_eq!(got("linux/arm64").unwrap().digest(), arm.digest());
        assert_eq!(got("linux/arm64/v8").unwrap().digest(), arm.digest());
        let err = got("linux/riscv64").unwrap_err().to_string();
        assert!(
            err.contains("x:1 is an image index of linux/amd64, linux/arm64/v8")
                && err.contains("none is for linux/riscv64"),
            "{err}"
        );
        assert!(got("linux/arm64/v9").is_err());
        let found: Vec<String> = platforms(&store, &index)
            .unwrap()
            .iter()
            .map(oci::platform_text)
            .collect();
        assert_eq!(found, ["linux/amd64", "linux/arm64/v8"]);

        let twice = write_index(
            &store,
            &[
                (platform("linux/amd64"), amd.clone()),
                (platform("linux/amd64"), arm),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(twice.contains("two images of linux/amd64"), "{twice}");
    }
}
