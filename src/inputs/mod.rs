//! Inputs: where a stage3 or a snapshot comes from (a path, a URL, `stage3:VARIANT`,
//! `snapshot:latest`), how it is fetched into the cache, and how it is verified
//! (OpenPGP signatures by pinned keys, digest files) before anything uses it.

pub mod digests;
pub mod fetch;
pub mod pgp;
