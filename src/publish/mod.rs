//! Publishing images out of the store.

pub mod docker_archive;
