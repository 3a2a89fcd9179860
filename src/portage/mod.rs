//! Portage's own data, read from a root filesystem.

pub mod atom;
pub mod contents;
pub mod license;
pub mod vdb;
