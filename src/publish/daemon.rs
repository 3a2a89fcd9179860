//! `gentoo-mkimg load` and `build --load`: images from the store into Docker or Podman,
//! through the Docker Engine API (the engine module's connection and streamed
//! `POST /images/load`), named as in the store.

use anyhow::Result;

use crate::image::open_image;
use crate::image::store::Store;

/// Load the store's images `references` into the engine.
pub fn load(store: &Store, references: &[String]) -> Result<()> {
    let images = references
        .iter()
        .map(|r| open_image(store, r))
        .collect::<Result<Vec<_>>>()?;
    crate::engine::docker::load_images(store, &images)
}
