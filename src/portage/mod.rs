//! Portage's own data, read from a root filesystem.

pub mod contents;
pub mod vdb;
