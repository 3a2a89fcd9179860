//! Writing one image layer: tar entries in, a compressed blob in the store out.
//!
//! Entries go through a tar writer, a SHA-256 of the uncompressed stream (the diff_id), a
//! parallel compressor and a second SHA-256 of the compressed bytes (the blob digest), into
//! a temporary file of the store, all in one pass. Nothing is held in memory beyond the
//! compressor's buffers.
//!
//! The tar written here is normalised, so that the same entries always give the same bytes:
//! GNU headers, numeric ids plus the names given, `././@LongLink` records for names and link
//! targets over 100 bytes (raw bytes, so names that are not UTF-8 survive), and a PAX record
//! carrying extended attributes as `SCHILY.xattr.NAME` (what GNU tar, Docker and umoci read).
//! It does not decide which entries are acceptable: callers check paths before appending.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};

use anyhow::{Context, Result, bail};

use crate::archive::decompress::{self, Compression};
use sha2::{Digest as _, Sha256};

use crate::image::store::{Digest, PendingBlob, Store};

/// The entry types are the archive module's: layers are written from what archives read.
pub use crate::archive::entries::{EntryKind, EntryMeta};

/// How layer blobs are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerCompression {
    /// Understood by every engine and registry (default).
    #[default]
    Gzip,
    /// Smaller and much faster; needs Docker 23+ or Podman to run.
    Zstd,
    /// Uncompressed tar.
    None,
}

/// How a built root is cut into layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerSplit {
    /// A layer per package (the largest), one for the rest of the packages, one last layer
    /// for the package database and what no package owns (default): an update changes only
    /// the layers of what changed.
    #[default]
    Packages,
    /// The whole root in one layer.
    Single,
}

/// The most layers a package-split image gets unless told otherwise: well under the 128
/// that overlay storage drivers take.
pub const DEFAULT_MAX_LAYERS: usize = 32;
/// The fewest `--max-layers` may ask for: one shared by the packages, and the last.
pub const MIN_LAYERS: usize = 2;

impl LayerCompression {
    pub fn media_type(self) -> &'static str {
        match self {
            LayerCompression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            LayerCompression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            LayerCompression::None => "application/vnd.oci.image.layer.v1.tar",
        }
    }
}

impl fmt::Display for LayerCompression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LayerCompression::Gzip => "gzip",
            LayerCompression::Zstd => "zstd",
            LayerCompression::None => "none",
        })
    }
}

/// The finished layer: what a manifest and a config need to know about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    pub digest: Digest,
    pub diff_id: Digest,
    /// Compressed size in bytes.
    pub size: u64,
    /// Uncompressed (tar) size in bytes.
    pub tar_size: u64,
    pub media_type: &'static str,
}

impl LayerInfo {
    pub fn descriptor(&self) -> crate::image::store::Descriptor {
        crate::image::oci::descriptor(self.media_type, &self.digest, self.size)
    }
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W> Hashing<W> {
    fn new(inner: W) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    fn finish(self) -> (W, Digest, u64) {
        let digest = Digest::from_sha256(self.hasher.finalize().as_slice());
        (self.inner, digest, self.count)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

type BlobOut = Hashing<BufWriter<File>>;

enum Compressor {
    Gzip(gzp::par::compress::ParCompress<'static, gzp::deflate::Gzip, BlobOut>),
    Zstd(zstd::stream::write::Encoder<'static, BlobOut>),
    Plain(BlobOut),
}

impl Compressor {
    fn new(kind: LayerCompression, out: BlobOut) -> io::Result<Self> {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        Ok(match kind {
            LayerCompression::Gzip => {
                let builder = gzp::par::compress::ParCompressBuilder::<gzp::deflate::Gzip>::new()
                    .num_threads(threads)
                    .map_err(io::Error::other)?
                    .compression_level(gzp::Compression::new(GZIP_LEVEL));
                Compressor::Gzip(builder.from_writer(out))
            }
            LayerCompression::Zstd => {
                let mut enc = zstd::stream::write::Encoder::new(out, ZSTD_LEVEL)?;
                // zstd's output does not depend on the number of workers (>= 1), so the
                // digest stays the same across machines.
                enc.multithread(threads as u32)?;
                enc.include_checksum(true)?;
                Compressor::Zstd(enc)
            }
            LayerCompression::None => Compressor::Plain(out),
        })
    }

    fn finish(self) -> io::Result<BlobOut> {
        match self {
            Compressor::Gzip(mut w) => {
                use gzp::ZWriter;
                w.finish().map_err(io::Error::other)
            }
            Compressor::Zstd(w) => w.finish(),
            Compressor::Plain(w) => Ok(w),
        }
    }
}

/// gzip level: 6 is gzip's own default; on two cores it is the slowest step of an import, so
/// a lower level trades a few percent of size for speed.
const GZIP_LEVEL: u32 = 3;
const ZSTD_LEVEL: i32 = 3;

impl Write for Compressor {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Compressor::Gzip(w) => w.write(buf),
            Compressor::Zstd(w) => w.write(buf),
            Compressor::Plain(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Compressor::Gzip(w) => w.flush(),
            Compressor::Zstd(w) => w.flush(),
            Compressor::Plain(w) => w.flush(),
        }
    }
}

/// Where a sequence of layer entries goes: a layer, or something that sorts them into
/// layers.
pub trait EntrySink {
    /// Append one entry. For regular files `data` must yield exactly `size` bytes; a short
    /// read is an error (a truncated input must not become a corrupt layer).
    fn append(&mut self, meta: &EntryMeta, data: &mut dyn Read) -> io::Result<()>;
}

/// Entries as normalised tar (see the module's comment) into any writer. The bytes of one
/// entry are written to `W` by the time [`TarOut::append`] returns, nothing is held back.
pub struct TarOut<W: Write> {
    tar: tar::Builder<W>,
}

impl<W: Write> TarOut<W> {
    pub fn new(out: W) -> Self {
        let mut tar = tar::Builder::new(out);
        tar.mode(tar::HeaderMode::Complete);
        TarOut { tar }
    }

    /// The writer, e.g. to read how much went into it.
    pub fn get_ref(&self) -> &W {
        self.tar.get_ref()
    }

    /// The writer, e.g. to add the bytes of entries written by another `TarOut`.
    pub fn get_mut(&mut self) -> &mut W {
        self.tar.get_mut()
    }

    /// End the archive (tar's end-of-archive marker) and give the writer back.
    pub fn finish(self) -> io::Result<W> {
        self.tar.into_inner()
    }
}

impl<W: Write> EntrySink for TarOut<W> {
    fn append(&mut self, meta: &EntryMeta, data: &mut dyn Read) -> io::Result<()> {
        if !meta.xattrs.is_empty() {
            let keys: Vec<String> = meta
                .xattrs
                .iter()
                .map(|(name, _)| format!("SCHILY.xattr.{name}"))
                .collect();
            self.tar.append_pax_extensions(
                keys.iter()
                    .map(String::as_str)
                    .zip(meta.xattrs.iter().map(|(_, v)| v.as_slice())),
            )?;
        }

        let mut name = meta.path.clone();
        if name.is_empty() {
            name.extend_from_slice(b"./");
        } else if meta.kind == EntryKind::Directory && !name.ends_with(b"/") {
            name.push(b'/');
        }

        let mut header = tar::Header::new_gnu();
        let (entry_type, size, link) = match &meta.kind {
            EntryKind::Regular { size } => (tar::EntryType::Regular, *size, None),
            EntryKind::Directory => (tar::EntryType::Directory, 0, None),
            EntryKind::Symlink { target } => (tar::EntryType::Symlink, 0, Some(target)),
            EntryKind::HardLink { target } => (tar::EntryType::Link, 0, Some(target)),
            EntryKind::Char { .. } => (tar::EntryType::Char, 0, None),
            EntryKind::Block { .. } => (tar::EntryType::Block, 0, None),
            EntryKind::Fifo => (tar::EntryType::Fifo, 0, None),
        };
        header.set_entry_type(entry_type);
        header.set_size(size);
        header.set_mode(meta.mode & 0o7777);
        header.set_uid(meta.uid);
        header.set_gid(meta.gid);
        header.set_mtime(meta.mtime);
        if let EntryKind::Char { major, minor } | EntryKind::Block { major, minor } = meta.kind {
            header.set_device_major(major)?;
            header.set_device_minor(minor)?;
        }
        {
            let gnu = header
                .as_gnu_mut()
                .ok_or_else(|| io::Error::other("not a GNU header"))?;
            copy_field(&mut gnu.uname, &meta.uname);
            copy_field(&mut gnu.gname, &meta.gname);
            if name.len() > gnu.name.len() {
                self.append_long(b'L', &name)?;
            }
            copy_field(&mut gnu.name, &name);
            if let Some(target) = link {
                if target.len() > gnu.linkname.len() {
                    self.append_long(b'K', target)?;
                }
                copy_field(&mut gnu.linkname, target);
            }
        }
        header.set_cksum();
        let mut exact = Exact {
            inner: data,
            remaining: size,
        };
        self.tar.append(&header, &mut exact)?;
        if exact.remaining != 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file data ended early",
            ));
        }
        Ok(())
    }
}

impl<W: Write> TarOut<W> {
    /// A GNU `././@LongLink` record (`L` for names, `K` for link targets).
    fn append_long(&mut self, kind: u8, value: &[u8]) -> io::Result<()> {
        let mut header = tar::Header::new_gnu();
        let mut data = value.to_vec();
        data.push(0);
        header.set_entry_type(tar::EntryType::new(kind));
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        if let Some(gnu) = header.as_gnu_mut() {
            copy_field(&mut gnu.name, b"././@LongLink");
        }
        header.set_cksum();
        self.tar.append(&header, data.as_slice())
    }
}

/// Builds one layer blob in the store from a sequence of entries.
///
/// Dropping it without [`LayerWriter::finish`] removes the temporary blob.
pub struct LayerWriter {
    tar: TarOut<Hashing<Compressor>>,
    pending: PendingBlob,
    media_type: &'static str,
}

impl EntrySink for LayerWriter {
    fn append(&mut self, meta: &EntryMeta, data: &mut dyn Read) -> io::Result<()> {
        self.tar.append(meta, data)
    }
}

impl LayerWriter {
    pub fn new(store: &Store, compression: LayerCompression) -> Result<Self> {
        let (pending, file) = store.begin_blob()?;
        let out = Hashing::new(BufWriter::with_capacity(1 << 20, file));
        let compressor = Compressor::new(compression, out)
            .with_context(|| format!("cannot start the {compression} compressor"))?;
        Ok(LayerWriter {
            tar: TarOut::new(Hashing::new(compressor)),
            pending,
            media_type: compression.media_type(),
        })
    }

    /// Append one entry (see [`EntrySink::append`]).
    pub fn append(&mut self, meta: &EntryMeta, data: &mut dyn Read) -> io::Result<()> {
        self.tar.append(meta, data)
    }

    /// Append entries already written as tar by a [`TarOut`]: exactly the bytes of whole
    /// entries, without an end-of-archive marker.
    pub fn append_written(&mut self, entries: &mut dyn Read) -> io::Result<u64> {
        io::copy(entries, self.tar.get_mut())
    }

    /// End the tar stream, flush the compressor and move the blob into the store.
    pub fn finish(self, store: &Store) -> Result<LayerInfo> {
        let hashed = self
            .tar
            .finish()
            .context("cannot finish the layer's tar stream")?;
        let (compressor, diff_id, tar_size) = hashed.finish();
        let out = compressor
            .finish()
            .context("cannot finish the layer compression")?;
        let (buffered, digest, size) = out.finish();
        let file = buffered
            .into_inner()
            .map_err(|e| e.into_error())
            .context("cannot write the layer blob")?;
        drop(file);
        store.commit_blob(self.pending, &digest)?;
        Ok(LayerInfo {
            digest,
            diff_id,
            size,
            tar_size,
            media_type: self.media_type,
        })
    }
}

fn copy_field(field: &mut [u8], value: &[u8]) {
    let n = value.len().min(field.len());
    field[..n].copy_from_slice(&value[..n]);
    field[n..].fill(0);
}

/// Reads at most `remaining` bytes and counts down, so a short source is detected.
struct Exact<'a> {
    inner: &'a mut dyn Read,
    remaining: u64,
}

impl Read for Exact<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let max = buf
            .len()
            .min(self.remaining.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..max])?;
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// The decompressed tar stream of a layer blob: the compression from the media type, or
/// sniffed from the data when the media type does not say.
pub fn open_stream(
    media_type: &str,
    blob: impl Read + Send + 'static,
) -> Result<Box<dyn Read + Send>> {
    let mut input = BufReader::with_capacity(1 << 20, blob);
    let compression = if media_type.ends_with("gzip") {
        Compression::Gzip
    } else if media_type.ends_with("zstd") {
        Compression::Zstd
    } else if media_type.ends_with(".tar") {
        Compression::None
    } else {
        let head = input.fill_buf().context("cannot read the layer")?;
        match decompress::sniff(head) {
            Some(c) => c,
            None => bail!("media type {media_type} and content are not a known layer format"),
        }
    };
    decompress::decoder(compression, input)
        .with_context(|| format!("cannot start the {compression} decoder"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(path: &[u8], kind: EntryKind) -> EntryMeta {
        EntryMeta {
            path: path.to_vec(),
            kind,
            mode: 0o4755,
            uid: 1234,
            gid: 5678,
            uname: b"someone".to_vec(),
            gname: b"grp".to_vec(),
            mtime: 1_700_000_000,
            xattrs: vec![("security.capability".into(), vec![1, 0, 0, 2, 0x20])],
        }
    }

    fn layer_bytes(store: &Store, info: &LayerInfo) -> Vec<u8> {
        std::fs::read(store.blob_path(&info.digest)).unwrap()
    }

    #[test]
    fn entries_round_trip_through_the_tar_crate() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let mut w = LayerWriter::new(&store, LayerCompression::None).unwrap();
        let long: Vec<u8> = [&b"d/"[..], &[b'x'; 140][..], &b"\xff\xfe"[..]].concat();
        w.append(&meta(b"", EntryKind::Directory), &mut io::empty())
            .unwrap();
        w.append(
            &meta(&long, EntryKind::Regular { size: 3 }),
            &mut &b"abc"[..],
        )
        .unwrap();
        w.append(
            &meta(
                b"hl",
                EntryKind::HardLink {
                    target: long.clone(),
                },
            ),
            &mut io::empty(),
        )
        .unwrap();
        w.append(
            &meta(b"dev", EntryKind::Char { major: 1, minor: 3 }),
            &mut io::empty(),
        )
        .unwrap();
        let info = w.finish(&store).unwrap();
        let bytes = layer_bytes(&store, &info);
        assert_eq!(info.diff_id, info.digest, "uncompressed: same hash");
        assert_eq!(bytes.len() as u64, info.size);

        let mut ar = tar::Archive::new(&bytes[..]);
        let mut entries = ar.entries().unwrap();
        let mut root = entries.next().unwrap().unwrap();
        assert_eq!(&*root.path_bytes(), b"./");
        let x = root
            .pax_extensions()
            .unwrap()
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(x.key().unwrap(), "SCHILY.xattr.security.capability");
        assert_eq!(x.value_bytes(), &[1, 0, 0, 2, 0x20]);
        let mut file = entries.next().unwrap().unwrap();
        assert_eq!(&*file.path_bytes(), &long[..]);
        assert_eq!(file.header().mode().unwrap(), 0o4755);
        assert_eq!(file.header().uid().unwrap(), 1234);
        let mut s = String::new();
        file.read_to_string(&mut s).unwrap();
        assert_eq!(s, "abc");
        let link = entries.next().unwrap().unwrap();
        assert_eq!(link.header().entry_type(), tar::EntryType::Link);
        assert_eq!(&*link.link_name_bytes().unwrap(), &long[..]);
        let dev = entries.next().unwrap().unwrap();
        assert_eq!(dev.header().device_major().unwrap(), Some(1));
        assert_eq!(dev.header().device_minor().unwrap(), Some(3));
    }

    #[test]
    fn short_data_is_an_error_and_leaves_no_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let mut w = LayerWriter::new(&store, LayerCompression::Gzip).unwrap();
        let err = w
            .append(
                &meta(b"f", EntryKind::Regular { size: 10 }),
                &mut &b"abc"[..],
            )
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        drop(w);
        let left: Vec<_> = std::fs::read_dir(dir.path().join("blobs/sha256"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "temp blob left behind: {left:?}");
    }

    #[test]
    fn same_entries_same_digest_for_every_compression() {
        for compression in [
            LayerCompression::Gzip,
            LayerCompression::Zstd,
            LayerCompression::None,
        ] {
            let mut digests = Vec::new();
            for _ in 0..2 {
                let dir = tempfile::tempdir().unwrap();
                let store = Store::new(dir.path());
                let mut w = LayerWriter::new(&store, compression).unwrap();
                let data = vec![7u8; 3 << 20];
                w.append(
                    &meta(
                        b"big",
                        EntryKind::Regular {
                            size: data.len() as u64,
                        },
                    ),
                    &mut &data[..],
                )
                .unwrap();
                let info = w.finish(&store).unwrap();
                assert_eq!(info.media_type, compression.media_type());
                digests.push((info.digest, info.diff_id));
            }
            assert_eq!(digests[0], digests[1], "{compression}");
        }
    }
}
