//! Publishing images out of the store.

pub mod auth;
pub mod daemon;
pub mod docker_archive;
pub mod index;
pub mod pull;
pub mod registry;
