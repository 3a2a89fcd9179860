//! A package's `CONTENTS` file in the vdb (`/var/db/pkg/CAT/PF/CONTENTS`): what it installed.
//!
//! One line per entry, paths as installed (absolute, possibly with spaces):
//!
//! ```text
//! dir /usr/share/doc/hello-1.0
//! obj /usr/bin/hello 0123456789abcdef0123456789abcdef 1700000000
//! sym /usr/lib/libx.so -> libx.so.1 1700000000
//! fif /run/some fifo
//! dev /dev/null
//! ```
//!
//! `obj` lines end with the MD5 and the mtime, `sym` lines with the mtime; a `sym` path ends at
//! the first ` -> ` (as Portage reads it). Lines are bytes: a path need not be UTF-8.

/// What a `CONTENTS` line records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Dir,
    Obj,
    Sym,
    Fif,
    Dev,
}

/// One parsed line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    pub kind: Kind,
    /// The path as installed, e.g. `/usr/bin/hello`.
    pub path: &'a [u8],
    /// For `sym`: the link target as recorded.
    pub target: Option<&'a [u8]>,
    /// For `obj` and `sym`: the mtime recorded at the merge.
    pub mtime: Option<u64>,
}

/// Parse one line (without or with its newline). `None` for a line that is empty or not one
/// of the five forms.
pub fn parse_line(line: &[u8]) -> Option<Entry<'_>> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let space = line.iter().position(|&b| b == b' ')?;
    let (word, rest) = (&line[..space], &line[space + 1..]);
    let (kind, path, target, mtime) = match word {
        b"dir" => (Kind::Dir, rest, None, None),
        b"fif" => (Kind::Fif, rest, None, None),
        b"dev" => (Kind::Dev, rest, None, None),
        b"obj" => {
            let (rest, mtime) = rsplit_space(rest)?;
            let (path, md5) = rsplit_space(rest)?;
            if !is_number(mtime) || md5.is_empty() {
                return None;
            }
            (Kind::Obj, path, None, number(mtime))
        }
        b"sym" => {
            let (rest, mtime) = rsplit_space(rest)?;
            if !is_number(mtime) {
                return None;
            }
            let arrow = find(rest, b" -> ")?;
            (
                Kind::Sym,
                &rest[..arrow],
                Some(&rest[arrow + 4..]),
                number(mtime),
            )
        }
        _ => return None,
    };
    (!path.is_empty()).then_some(Entry {
        kind,
        path,
        target,
        mtime,
    })
}

/// Every entry of a `CONTENTS` text, in file order; lines that do not parse are skipped.
pub fn entries(text: &[u8]) -> impl Iterator<Item = Entry<'_>> {
    text.split(|&b| b == b'\n').filter_map(parse_line)
}

fn rsplit_space(s: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = s.iter().rposition(|&b| b == b' ')?;
    Some((&s[..i], &s[i + 1..]))
}

fn number(s: &[u8]) -> Option<u64> {
    std::str::from_utf8(s).ok()?.parse().ok()
}

fn is_number(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(u8::is_ascii_digit)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    type Parsed<'a> = (Kind, &'a [u8], Option<&'a [u8]>);

    #[test]
    fn parses_every_kind_with_spaces_in_paths() {
        let text = b"dir /usr\n\
            dir /usr/share/My Docs\n\
            obj /usr/bin/hello d41d8cd98f00b204e9800998ecf8427e 1700000000\n\
            obj /usr/share/a b c.txt 0123456789abcdef0123456789abcdef 1\n\
            sym /usr/lib/libx.so -> libx.so.1 1700000000\n\
            sym /opt/with space -> ../a -> b 12\n\
            fif /run/my fifo\n\
            dev /dev/null\n\
            \n\
            garbage line\n\
            obj /no/mtime d41d8cd98f00b204e9800998ecf8427e\n\
            sym /no/arrow 12\n";
        let got: Vec<Parsed> = entries(text).map(|e| (e.kind, e.path, e.target)).collect();
        let want: Vec<Parsed> = vec![
            (Kind::Dir, b"/usr", None),
            (Kind::Dir, b"/usr/share/My Docs", None),
            (Kind::Obj, b"/usr/bin/hello", None),
            (Kind::Obj, b"/usr/share/a b c.txt", None),
            (Kind::Sym, b"/usr/lib/libx.so", Some(b"libx.so.1")),
            (Kind::Sym, b"/opt/with space", Some(b"../a -> b")),
            (Kind::Fif, b"/run/my fifo", None),
            (Kind::Dev, b"/dev/null", None),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn lines_with_carriage_returns_and_non_utf8_paths() {
        let e = parse_line(b"obj /usr/bin/\xff\xfe 0123 5\r\n").unwrap();
        assert_eq!(e.kind, Kind::Obj);
        assert_eq!(e.path, b"/usr/bin/\xff\xfe");
        assert_eq!(e.mtime, Some(5));
        assert_eq!(parse_line(b"dir "), None);
        assert_eq!(parse_line(b""), None);
        assert_eq!(parse_line(b"obj /x abc notanumber"), None);
    }
}
