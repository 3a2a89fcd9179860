//! The OCI documents the tool writes and reads (image manifests, indexes, image configs and
//! the descriptors in them) are oci-spec's types; this module adds what the store needs
//! around them: the store's own [`Digest`] for a descriptor, the reference-name annotation,
//! and canonical bytes.
//!
//! oci-spec keeps annotations and labels in `HashMap`s, whose order changes from run to run.
//! [`to_json`] writes every document with its object keys sorted (through
//! `serde_json::Value`, whose objects are sorted maps), so the same content always gives the
//! same bytes and the same digest.

use anyhow::{Context, Result, anyhow};
use serde::Serialize;

pub use oci_spec::image::{
    Arch, Config, ConfigBuilder, Descriptor, History, HistoryBuilder, ImageConfiguration,
    ImageConfigurationBuilder, ImageIndex, ImageManifest, ImageManifestBuilder, MediaType, Os,
    Platform, PlatformBuilder, RootFsBuilder,
};

use crate::image::store::{Digest, REF_NAME};

/// The canonical JSON bytes of an OCI document: compact, object keys sorted.
pub fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let value = serde_json::to_value(value).context("cannot encode JSON")?;
    serde_json::to_vec(&value).context("cannot encode JSON")
}

/// A descriptor of `size` bytes of `media_type` content stored under `digest`.
pub fn descriptor(media_type: &str, digest: &Digest, size: u64) -> Descriptor {
    Descriptor::new(MediaType::from(media_type), size, digest.to_oci())
}

/// What the store needs from a descriptor beyond oci-spec's getters.
pub trait DescriptorExt {
    /// The digest in the store's terms; an error for any algorithm but sha256.
    fn blob(&self) -> Result<Digest>;
    /// The media type, as text.
    fn kind(&self) -> &str;
    /// The annotation `key`, if set.
    fn annotation(&self, key: &str) -> Option<&str>;
    /// Set the annotation `key` to `value`.
    fn set_annotation(&mut self, key: &str, value: &str);
    /// The `org.opencontainers.image.ref.name` annotation: the reference an index entry tags.
    fn ref_name(&self) -> Option<&str> {
        self.annotation(REF_NAME)
    }
    /// Only media type, digest and size: the descriptor another manifest names as its
    /// `subject`.
    fn plain(&self) -> Descriptor;
}

impl DescriptorExt for Descriptor {
    fn blob(&self) -> Result<Digest> {
        Digest::from_oci(self.digest())
    }

    fn kind(&self) -> &str {
        self.media_type().as_ref()
    }

    fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations()
            .as_ref()
            .and_then(|a| a.get(key))
            .map(String::as_str)
    }

    fn set_annotation(&mut self, key: &str, value: &str) {
        let mut annotations = self.annotations().clone().unwrap_or_default();
        annotations.insert(key.to_string(), value.to_string());
        self.set_annotations(Some(annotations));
    }

    fn plain(&self) -> Descriptor {
        Descriptor::new(
            self.media_type().clone(),
            self.size(),
            self.digest().clone(),
        )
    }
}

impl Digest {
    /// The same digest as oci-spec's type.
    pub fn to_oci(&self) -> oci_spec::image::Digest {
        // A `Digest` is always `sha256:` and 64 lowercase hex digits, which oci-spec accepts.
        oci_spec::image::Digest::try_from(self.as_str())
            .unwrap_or_else(|e| unreachable!("{self} is a valid sha256 digest: {e}"))
    }

    /// The store's digest for oci-spec's; only sha256 digests are stored.
    pub fn from_oci(digest: &oci_spec::image::Digest) -> Result<Digest> {
        Digest::try_from(digest.to_string()).map_err(|e| anyhow!(e))
    }
}

/// The platform an image config names (any image's: OS `linux` when it names none). An
/// error when it is not JSON or names no architecture.
pub fn config_platform(config: &[u8]) -> Result<Platform> {
    #[derive(serde::Deserialize)]
    struct Named {
        #[serde(default)]
        os: String,
        #[serde(default)]
        architecture: String,
        #[serde(default)]
        variant: Option<String>,
    }
    let named: Named =
        serde_json::from_slice(config).context("the image config is not valid JSON")?;
    if named.architecture.is_empty() {
        anyhow::bail!("the image config names no architecture");
    }
    let os = if named.os.is_empty() {
        "linux"
    } else {
        &named.os
    };
    let mut platform = PlatformBuilder::default()
        .os(Os::from(os))
        .architecture(Arch::from(named.architecture.as_str()))
        .build()
        .context("the image config names no platform")?;
    platform.set_variant(named.variant.filter(|v| !v.is_empty()));
    Ok(platform)
}

/// The descriptor's platform as `OS/ARCH[/VARIANT]`.
pub fn platform_text(platform: &Platform) -> String {
    let mut text = format!("{}/{}", platform.os(), platform.architecture());
    if let Some(v) = platform.variant() {
        text.push('/');
        text.push_str(v);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_written_with_sorted_keys_whatever_the_map_order() {
        let digest = Digest::of(b"x");
        let mut a = descriptor("application/octet-stream", &digest, 1);
        let mut b = a.clone();
        for key in ["z", "a", "m", "b", "y", "c"] {
            a.set_annotation(key, key);
        }
        for key in ["c", "y", "b", "m", "a", "z"] {
            b.set_annotation(key, key);
        }
        let text = String::from_utf8(to_json(&a).unwrap()).unwrap();
        assert_eq!(to_json(&a).unwrap(), to_json(&b).unwrap());
        assert!(
            text.starts_with(r#"{"annotations":{"a":"a","b":"b","c":"c","m":"m","y":"y","z":"z"},"digest":"sha256:"#),
            "{text}"
        );
    }

    #[test]
    fn the_platform_is_read_from_the_config() {
        let p = config_platform(br#"{"os":"linux","architecture":"arm","variant":"v7"}"#);
        assert_eq!(platform_text(&p.unwrap()), "linux/arm/v7");
        let p = config_platform(br#"{"architecture":"amd64","variant":""}"#).unwrap();
        assert_eq!(platform_text(&p), "linux/amd64");
        let p = config_platform(br#"{"os":"freebsd","architecture":"riscv64"}"#).unwrap();
        assert_eq!(platform_text(&p), "freebsd/riscv64");
        assert!(config_platform(br#"{"os":"linux"}"#).is_err());
        assert!(config_platform(b"{").is_err());
    }

    #[test]
    fn only_sha256_digests_are_blobs_of_the_store() {
        let d = descriptor("application/octet-stream", &Digest::of(b"x"), 1);
        assert_eq!(d.blob().unwrap(), Digest::of(b"x"));
        let sha512 = format!("sha512:{}", "a".repeat(128));
        let other = Descriptor::new(
            MediaType::ImageLayer,
            1,
            oci_spec::image::Digest::try_from(sha512.as_str()).unwrap(),
        );
        let err = other.blob().unwrap_err().to_string();
        assert!(err.contains("sha512"), "{err}");
    }
}
