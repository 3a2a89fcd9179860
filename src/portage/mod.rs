//! Portage's own data, read from a root filesystem.

pub mod vdb;
