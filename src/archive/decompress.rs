//! Opening a compressed input: the format is sniffed from the magic bytes, never from the
//! file name, so a `.tar.bz2` that is really xz still works.
//!
//! This module only turns bytes into a decompressed byte stream; it knows nothing of tar.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use anyhow::{Context, Result, bail};
use sha2::{Digest as _, Sha256};

/// The compressions a stage3 or snapshot tarball may come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Xz,
    Bzip2,
    Gzip,
    Zstd,
    None,
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::Xz => "xz",
            Compression::Bzip2 => "bzip2",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::None => "uncompressed",
        })
    }
}

/// Guess the compression from the first bytes of a file.
///
/// Returns `None` when the bytes are neither a known compression nor a tar header, so that
/// the caller can say "not a tarball" instead of failing later with a parser error.
pub fn sniff(head: &[u8]) -> Option<Compression> {
    if head.starts_with(&[0xFD, b'7', b'z', b'X', b'Z', 0x00]) {
        Some(Compression::Xz)
    } else if head.starts_with(b"BZh") {
        Some(Compression::Bzip2)
    } else if head.starts_with(&[0x1F, 0x8B]) {
        Some(Compression::Gzip)
    } else if head.starts_with(&[0x28, 0xB5, 0x2F, 0xFD]) {
        Some(Compression::Zstd)
    } else if looks_like_tar(head) {
        Some(Compression::None)
    } else {
        None
    }
}

/// A tar header block has "ustar" at offset 257 (POSIX and GNU), or at least a valid
/// checksum (v7 tar).
fn looks_like_tar(head: &[u8]) -> bool {
    if head.len() < 512 {
        return false;
    }
    if &head[257..262] == b"ustar" {
        return true;
    }
    let field = &head[148..156];
    let text: String = field
        .iter()
        .take_while(|&&b| b != 0 && b != b' ')
        .map(|&b| b as char)
        .collect();
    let Ok(stored) = u32::from_str_radix(text.trim(), 8) else {
        return false;
    };
    let sum: u32 = head[..512]
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                b as u32
            }
        })
        .sum();
    stored == sum && head[..100].iter().any(|&b| b != 0)
}

/// A reader that counts the compressed bytes consumed, for progress display, and hashes
/// them when asked to (see [`open_hashed`]).
pub struct Counting<R> {
    inner: R,
    counter: std::sync::Arc<std::sync::atomic::AtomicU64>,
    hasher: Option<SharedHasher>,
}

type SharedHasher = std::sync::Arc<std::sync::Mutex<Sha256>>;

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        if let Some(hasher) = &self.hasher {
            hasher
                .lock()
                .map_err(|_| io::Error::other("the file's hasher was poisoned"))?
                .update(&buf[..n]);
        }
        Ok(n)
    }
}

/// The SHA-256 of a file opened with [`open_hashed`], taken from the bytes the decoder read.
pub struct FileHash {
    hasher: SharedHasher,
    /// The same open file (a duplicate descriptor, sharing its offset): what the decoder
    /// left unread (padding after the end of the compressed stream) is read from here.
    rest: File,
    path: std::path::PathBuf,
}

impl FileHash {
    /// Hash what the decoder did not read, and return the whole file's SHA-256 (hex).
    /// Call it after the decoder is done with the file.
    pub fn finish(mut self) -> Result<String> {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = self
                .rest
                .read(&mut buf)
                .with_context(|| format!("{}: cannot read", self.path.display()))?;
            if n == 0 {
                break;
            }
            self.hasher
                .lock()
                .map_err(|_| anyhow::anyhow!("{}: the hasher was poisoned", self.path.display()))?
                .update(&buf[..n]);
        }
        let hasher =
            std::mem::take(&mut *self.hasher.lock().map_err(|_| {
                anyhow::anyhow!("{}: the hasher was poisoned", self.path.display())
            })?);
        Ok(hex::encode(hasher.finalize()))
    }
}

/// An opened input: the decompressed stream plus what was learned while opening it.
pub struct Opened {
    pub reader: Box<dyn Read + Send>,
    pub compression: Compression,
    /// Size of the file on disk (compressed), for progress and ETA.
    pub size: u64,
    /// Compressed bytes consumed so far.
    pub consumed: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// Open `path`, detect its compression and return a decompressing reader.
///
/// Errors name the file: missing, unreadable, empty, or not a (compressed) tarball.
pub fn open(path: &Path) -> Result<Opened> {
    Ok(open_with(path, None)?.0)
}

/// [`open`], also hashing the file (SHA-256) as it is read: one pass over the file for both.
pub fn open_hashed(path: &Path) -> Result<(Opened, FileHash)> {
    let hasher = SharedHasher::default();
    let (opened, rest) = open_with(path, Some(hasher.clone()))?;
    Ok((
        opened,
        FileHash {
            hasher,
            rest,
            path: path.to_path_buf(),
        },
    ))
}

/// [`open`], with the file's own handle too (the reader holds another; they share the
/// offset) and the bytes read hashed into `hasher` when given.
fn open_with(path: &Path, hasher: Option<SharedHasher>) -> Result<(Opened, File)> {
    let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let size = file
        .metadata()
        .with_context(|| format!("{}: cannot stat", path.display()))?
        .len();
    if size == 0 {
        bail!("{}: file is empty, expected a tarball", path.display());
    }
    let handle = file
        .try_clone()
        .with_context(|| format!("{}: cannot duplicate the descriptor", path.display()))?;
    let consumed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counting = Counting {
        inner: file,
        counter: consumed.clone(),
        hasher,
    };
    let mut buffered = BufReader::with_capacity(1 << 20, counting);
    let head = buffered
        .fill_buf()
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let Some(compression) = sniff(head) else {
        bail!(
            "{}: not a tarball (neither xz, bzip2, gzip, zstd nor tar data)",
            path.display()
        );
    };
    let reader = decoder(compression, buffered)
        .with_context(|| format!("{}: cannot start the {compression} decoder", path.display()))?;
    Ok((
        Opened {
            reader,
            compression,
            size,
            consumed,
        },
        handle,
    ))
}

/// Wrap `input` in the decoder for `compression`. xz and zstd decode on several threads
/// where the data allows it (multi-block xz, as written by `xz -T0`).
pub fn decoder<R: BufRead + Send + 'static>(
    compression: Compression,
    input: R,
) -> io::Result<Box<dyn Read + Send>> {
    Ok(match compression {
        Compression::Xz => {
            let threads = std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1);
            let stream = liblzma::stream::MtStreamBuilder::new()
                .threads(threads)
                .memlimit_threading(1 << 30)
                .memlimit_stop(u64::MAX)
                .decoder()
                .map_err(io::Error::other)?;
            Box::new(liblzma::bufread::XzDecoder::new_stream(input, stream))
        }
        Compression::Bzip2 => Box::new(bzip2::bufread::MultiBzDecoder::new(input)),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(input)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(input)?),
        Compression::None => Box::new(input),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tar_bytes() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "hello.txt", &b"hello"[..]).unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn sniffs_every_supported_format_and_rejects_text() {
        let tar = tar_bytes();
        assert_eq!(sniff(&tar), Some(Compression::None));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        assert_eq!(sniff(&gz.finish().unwrap()), Some(Compression::Gzip));
        let zst = zstd::encode_all(&tar[..], 1).unwrap();
        assert_eq!(sniff(&zst), Some(Compression::Zstd));
        let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 1);
        xz.write_all(&tar).unwrap();
        assert_eq!(sniff(&xz.finish().unwrap()), Some(Compression::Xz));
        let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
        bz.write_all(&tar).unwrap();
        assert_eq!(sniff(&bz.finish().unwrap()), Some(Compression::Bzip2));
        let text = b"this is just a text file\n".repeat(40);
        assert_eq!(sniff(&text), None);
    }

    #[test]
    fn decodes_back_to_the_same_bytes() {
        let tar = tar_bytes();
        let zst = zstd::encode_all(&tar[..], 1).unwrap();
        let mut out = Vec::new();
        decoder(Compression::Zstd, std::io::Cursor::new(zst))
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, tar);
    }
}
