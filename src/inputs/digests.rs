//! Digest files (DIGESTS, .sha256, .md5sum, sha512sum.txt), latest-*.txt and release file names.
