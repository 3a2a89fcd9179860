//! Checks the stand-in stage3 fixture itself (tests/fixtures/stage/build-stage.sh):
//! every hand-made fidelity entry is in stage.tar with the right type, mode, owner
//! and xattrs, Portage is wired up, and the four compressed copies are sound.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const FIDELITY_PREFIX: &[u8] = b"./opt/fidelity/";

/// One entry of `tar -tvv --quoting-style=literal` output (GNU tar).
#[derive(Debug)]
struct Entry {
    /// e.g. "-rwsr-xr-x" (the xattr/ACL marker after it is dropped)
    mode: String,
    /// "uid/gid" (listed with --numeric-owner)
    owner: String,
    /// size, or "major,minor" for devices
    size: String,
    name: Vec<u8>,
    /// symlink target ("->") or hard-link target ("link to")
    link: Option<Vec<u8>>,
    /// (name, size) from the "  x: SIZE NAME" lines
    xattrs: Vec<(String, usize)>,
}

impl Entry {
    fn kind(&self) -> char {
        self.mode.chars().next().unwrap()
    }
    fn has_xattr(&self, name: &str) -> Option<usize> {
        self.xattrs.iter().find(|(n, _)| n == name).map(|(_, s)| *s)
    }
}

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Splits off `n` whitespace-separated fields; returns them and the rest of the
/// line after the single space that follows the last field.
fn fields(line: &[u8], n: usize) -> Option<(Vec<String>, &[u8])> {
    let mut out = Vec::new();
    let mut i = 0;
    for _ in 0..n {
        while i < line.len() && line[i] == b' ' {
            i += 1;
        }
        let start = i;
        while i < line.len() && line[i] != b' ' {
            i += 1;
        }
        if start == i {
            return None;
        }
        out.push(String::from_utf8(line[start..i].to_vec()).ok()?);
    }
    Some((out, line.get(i + 1..).unwrap_or(&[])))
}

fn parse_listing(listing: &[u8]) -> Vec<Entry> {
    let mut entries: Vec<Entry> = Vec::new();
    for line in listing.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        if let Some(x) = line.strip_prefix(b"  x: ") {
            let (f, rest) = fields(x, 1).expect("xattr line");
            let e = entries.last_mut().expect("xattr line before any entry");
            e.xattrs.push((
                String::from_utf8(rest.to_vec()).expect("xattr name"),
                f[0].parse().expect("xattr size"),
            ));
            continue;
        }
        let (f, rest) = fields(line, 5)
            .unwrap_or_else(|| panic!("unparsable line {:?}", String::from_utf8_lossy(line)));
        let mode: String = f[0].chars().take(10).collect();
        let (name, link) = match mode.chars().next() {
            Some('l') => {
                let at = find(rest, b" -> ").expect("symlink without ->");
                (rest[..at].to_vec(), Some(rest[at + 4..].to_vec()))
            }
            Some('h') => {
                let at = find(rest, b" link to ").expect("hard link without 'link to'");
                (rest[..at].to_vec(), Some(rest[at + 9..].to_vec()))
            }
            _ => (rest.to_vec(), None),
        };
        entries.push(Entry {
            mode,
            owner: f[1].clone(),
            size: f[2].clone(),
            name,
            link,
            xattrs: Vec::new(),
        });
    }
    entries
}

fn show(b: &[u8]) -> String {
    b.escape_ascii().to_string()
}

/// Extracts `members` (archive paths like "./etc/passwd") in one pass and returns
/// their contents, in order.
fn extract(tar: &Path, members: &[String]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(tar)
        .arg("-C")
        .arg(dir.path())
        .args(members));
    members
        .iter()
        .map(|m| {
            std::fs::read_to_string(dir.path().join(m))
                .unwrap_or_else(|e| panic!("{m} from stage.tar: {e}"))
        })
        .collect()
}

#[test]
fn stage_fixture_is_complete_and_faithful() {
    let stage = common::stage();

    // All five archives exist and are intact.
    for p in stage.archives() {
        let len = std::fs::metadata(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .len();
        assert!(len > 1 << 20, "{} is only {len} bytes", p.display());
    }
    // Integrity checks run side by side (bzip2 alone takes several seconds).
    let checks: Vec<(Command, std::process::Child)> = [
        ("xz", stage.xz()),
        ("bzip2", stage.bz2()),
        ("gzip", stage.gz()),
        ("zstd", stage.zst()),
    ]
    .into_iter()
    .map(|(tool, file)| {
        let mut cmd = Command::new(tool);
        cmd.args(["-q", "-t"]).arg(file);
        let child = cmd
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        (cmd, child)
    })
    .collect();
    for (cmd, child) in checks {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let xz_list = String::from_utf8(run(Command::new("xz")
        .args(["--robot", "--list"])
        .arg(stage.xz())))
    .unwrap();
    let blocks: u64 = xz_list
        .lines()
        .find_map(|l| l.strip_prefix("totals\t"))
        .and_then(|l| l.split('\t').nth(1))
        .and_then(|b| b.parse().ok())
        .unwrap_or_else(|| panic!("no block count in xz --list output:\n{xz_list}"));
    assert!(
        blocks >= 2,
        "stage.tar.xz has {blocks} block(s), want a multi-block file"
    );

    // The listing, with xattrs, names as raw bytes, numeric owners.
    let listing = run(Command::new("tar")
        .env("LC_ALL", "C")
        .args(["--xattrs", "--xattrs-include=*", "--numeric-owner"])
        .args(["--quoting-style=literal", "-tvvf"])
        .arg(stage.tar()));
    let entries = parse_listing(&listing);
    assert!(
        entries.len() > 1000,
        "only {} entries in stage.tar",
        entries.len()
    );
    let entry = |name: &[u8]| -> &Entry {
        let mut it = entries.iter().filter(|e| e.name == name);
        let e = it
            .next()
            .unwrap_or_else(|| panic!("{} is not in stage.tar", show(name)));
        assert!(it.next().is_none(), "{} is in stage.tar twice", show(name));
        e
    };

    let paths = stage.fidelity_paths();
    let mut seen = BTreeSet::new();
    let mut hardlinks = Vec::new();
    for path in &paths {
        let rel = path
            .strip_prefix(FIDELITY_PREFIX)
            .unwrap_or_else(|| panic!("{} is not under ./opt/fidelity/", show(path)));
        let e = entry(path);
        let base = rel.strip_suffix(b"/").unwrap_or(rel);
        let ctx = format!("{}: {e:?}", show(path));
        if base != b"owned-1234" {
            assert_eq!(e.owner, "0/0", "{ctx}");
        }
        let kind = match base {
            b"capbin" => {
                assert_eq!(e.mode, "-rwxr-xr-x", "{ctx}");
                let size = e.has_xattr("security.capability");
                assert!(matches!(size, Some(20 | 24)), "no capability xattr: {ctx}");
                "capbin"
            }
            b"user-xattr" => {
                assert_eq!(e.kind(), '-', "{ctx}");
                assert_eq!(e.has_xattr("user.gentoo-mkimg"), Some(8), "{ctx}");
                "user-xattr"
            }
            b"hardlink-a" | b"hardlink-b" => {
                hardlinks.push(e);
                if base == b"hardlink-a" {
                    "hardlink-a"
                } else {
                    "hardlink-b"
                }
            }
            b"setuid" => {
                assert_eq!(e.mode, "-rwsr-xr-x", "{ctx}");
                "setuid"
            }
            b"setgid" => {
                assert_eq!(e.mode, "-rwxr-sr-x", "{ctx}");
                "setgid"
            }
            b"sticky-dir" => {
                assert_eq!(e.mode, "drwxrwxrwt", "{ctx}");
                "sticky-dir"
            }
            b"char-null" => {
                assert_eq!((e.kind(), e.size.as_str()), ('c', "1,3"), "{ctx}");
                "char-null"
            }
            b"block-loop" => {
                assert_eq!((e.kind(), e.size.as_str()), ('b', "7,0"), "{ctx}");
                "block-loop"
            }
            b"fifo" => {
                assert_eq!(e.kind(), 'p', "{ctx}");
                "fifo"
            }
            b"owned-1234" => {
                assert_eq!(e.mode, "-rw-r-----", "{ctx}");
                assert_eq!(e.owner, "1234/5678", "{ctx}");
                "owned-1234"
            }
            b"symlink-long" => {
                assert_eq!(e.kind(), 'l', "{ctx}");
                let target = e.link.as_deref().unwrap();
                assert!(target.len() > 100, "symlink target too short: {ctx}");
                let resolved = [FIDELITY_PREFIX, target].concat();
                assert_eq!(entry(&resolved).kind(), '-', "symlink target: {ctx}");
                "symlink-long"
            }
            _ if path.len() >= 150 => {
                assert_eq!(e.kind(), '-', "{ctx}");
                assert!(base.contains(&b'/'), "long path has no directory: {ctx}");
                "long-path"
            }
            _ if std::str::from_utf8(path).is_err() => {
                assert_eq!(e.kind(), '-', "{ctx}");
                "non-utf8-name"
            }
            _ => panic!("unexpected fidelity entry {ctx}"),
        };
        assert!(seen.insert(kind), "{kind} listed twice");
    }
    let want: BTreeSet<&str> = [
        "capbin",
        "user-xattr",
        "hardlink-a",
        "hardlink-b",
        "setuid",
        "setgid",
        "sticky-dir",
        "char-null",
        "block-loop",
        "fifo",
        "owned-1234",
        "symlink-long",
        "long-path",
        "non-utf8-name",
    ]
    .into();
    assert_eq!(
        seen, want,
        "fidelity.list does not cover every kind of entry"
    );

    // The pair is stored as one file plus a hard link to it (order is readdir's).
    let (file, link) = match (hardlinks[0].kind(), hardlinks[1].kind()) {
        ('-', 'h') => (hardlinks[0], hardlinks[1]),
        ('h', '-') => (hardlinks[1], hardlinks[0]),
        k => panic!("hard-link pair stored as {k:?}: {hardlinks:?}"),
    };
    assert_eq!(link.link.as_deref(), Some(file.name.as_slice()), "{link:?}");

    // Portage is wired up as the brief says.
    let share = entry(b"./share");
    assert_eq!(
        (share.kind(), share.link.as_deref()),
        ('l', Some(&b"usr/share"[..]))
    );
    assert_eq!(
        entry(b"./usr/share/portage/config/make.globals").kind(),
        '-'
    );
    let tools = ["emerge", "ebuild", "portageq", "emaint", "egencache"];
    let mut members: Vec<String> = tools.iter().map(|t| format!("./usr/bin/{t}")).collect();
    members.extend(["./etc/passwd", "./etc/group", "./etc/portage/make.conf"].map(String::from));
    let files = extract(&stage.tar(), &members);
    for ((tool, wrapper), text) in tools.iter().zip(&members).zip(&files) {
        assert_eq!(entry(wrapper.as_bytes()).mode, "-rwxr-xr-x", "{wrapper}");
        assert!(
            text.contains("PORTAGE_OVERRIDE_EPREFIX=/"),
            "{wrapper}:\n{text}"
        );
        assert!(
            text.contains(&format!("/bin/{tool} \"$@\"")),
            "{wrapper}:\n{text}"
        );
    }
    let [passwd, group, make_conf] = &files[tools.len()..] else {
        unreachable!()
    };
    assert!(
        passwd.lines().any(|l| l.starts_with("portage:x:250:250:")),
        "{passwd}"
    );
    assert!(
        group.lines().any(|l| l.starts_with("portage:x:250:")),
        "{group}"
    );
    for line in [r#"BINPKG_COMPRESS="zstd""#, r#"ACCEPT_LICENSE="*""#] {
        assert!(
            make_conf.lines().any(|l| l == line),
            "{line} missing:\n{make_conf}"
        );
    }
    // Portage's sandboxes stay on, as in a real stage3.
    assert!(
        !make_conf
            .lines()
            .any(|l| l.trim_start().starts_with("FEATURES=")),
        "{make_conf}"
    );

    // Gentoo's merged /usr (profile 23.0), not Debian's: sbin -> usr/bin, usr/sbin -> bin,
    // Debian's sbin tools in /usr/bin.
    for (link, target) in [
        ("./bin", "usr/bin"),
        ("./sbin", "usr/bin"),
        ("./lib", "usr/lib"),
        ("./lib64", "usr/lib64"),
        ("./usr/sbin", "bin"),
    ] {
        let e = entry(link.as_bytes());
        assert_eq!(
            (e.kind(), e.link.as_deref()),
            ('l', Some(target.as_bytes())),
            "{link}: {e:?}"
        );
    }
    for tool in [
        "./usr/bin/useradd",
        "./usr/bin/groupadd",
        "./usr/bin/ldconfig",
    ] {
        assert_eq!(entry(tool.as_bytes()).kind(), '-', "{tool}");
    }
    // Gentoo's names for the toolchain: C and C++.
    for tool in ["gcc", "cc", "cpp", "g++", "c++", "ld", "as", "ar"] {
        let name = format!("./usr/bin/x86_64-pc-linux-gnu-{tool}");
        assert_eq!(entry(name.as_bytes()).kind(), 'l', "{name}");
    }
}
