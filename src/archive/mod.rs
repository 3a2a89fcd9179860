//! Reading inputs: decompression sniffed from magic bytes, and tar entries checked for
//! safety before anything else sees them.

pub mod decompress;
pub mod digest;
pub mod entries;
pub mod extract;
pub mod ids;
pub mod pinned;
pub mod squashfs;
