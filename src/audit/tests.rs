//! Audits of small images made of real ELF files, compiled here with the host's gcc.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use super::*;
use crate::image::config::{ImageSpec, Platform};
use crate::image::layer::{EntryKind, EntryMeta, LayerCompression, LayerWriter};

/// The programs and library every test uses, compiled once.
struct Bins {
    /// `libdemo.so.1` (its soname), no DT_NEEDED.
    lib: Vec<u8>,
    /// Needs libdemo.so.1; PT_INTERP `/lib/ld-musl-test.so.1`.
    hello: Vec<u8>,
    /// The same with PT_INTERP `/lib64/ld-linux-test.so.2` (a glibc-style loader).
    hello_glibc: Vec<u8>,
    /// musl interpreter, DT_RUNPATH `$ORIGIN/../lib/demo`.
    hello_runpath: Vec<u8>,
    /// musl interpreter, DT_RPATH `/opt/rp`.
    hello_rpath: Vec<u8>,
    /// `libdemo2.so`, needs libdemo.so.1, no path of its own.
    lib2: Vec<u8>,
    /// musl interpreter, needs libdemo2.so and libdemo.so.1, DT_RUNPATH `/opt/app/lib`.
    both: Vec<u8>,
}

fn gcc(dir: &Path, args: &[&str]) {
    let out = Command::new("gcc")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("these tests compile small programs: gcc is needed and could not run: {e}")
        });
    assert!(
        out.status.success(),
        "gcc {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn bins() -> &'static Bins {
    static BINS: OnceLock<Bins> = OnceLock::new();
    BINS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("demo.c"), "int demo(void) { return 42; }\n").unwrap();
        std::fs::write(
            d.join("main.c"),
            "extern int demo(void);\nvoid _start(void) { demo(); for (;;) {} }\n",
        )
        .unwrap();
        gcc(
            d,
            &[
                "-shared",
                "-fPIC",
                "-nostdlib",
                "-Wl,-soname,libdemo.so.1",
                "-o",
                "libdemo.so.1",
                "demo.c",
            ],
        );
        std::fs::write(
            d.join("demo2.c"),
            "extern int demo(void);\nint demo2(void) { return demo(); }\n",
        )
        .unwrap();
        std::fs::write(
            d.join("main2.c"),
            "extern int demo2(void);\nvoid _start(void) { demo2(); for (;;) {} }\n",
        )
        .unwrap();
        gcc(
            d,
            &[
                "-shared",
                "-fPIC",
                "-nostdlib",
                "-Wl,-soname,libdemo2.so",
                "-o",
                "libdemo2.so",
                "demo2.c",
                "libdemo.so.1",
            ],
        );
        gcc(
            d,
            &[
                "-nostdlib",
                "-fPIE",
                "-pie",
                "-o",
                "both",
                "main2.c",
                "-Wl,--no-as-needed",
                "libdemo2.so",
                "libdemo.so.1",
                "-Wl,--dynamic-linker=/lib/ld-musl-test.so.1",
                "-Wl,--enable-new-dtags,-rpath,/opt/app/lib",
            ],
        );
        let program = |out: &str, extra: &[&str]| {
            let mut args = vec!["-nostdlib", "-fPIE", "-pie", "-o", out, "main.c"];
            args.push("libdemo.so.1");
            args.extend_from_slice(extra);
            gcc(d, &args);
            std::fs::read(d.join(out)).unwrap()
        };
        Bins {
            lib: std::fs::read(d.join("libdemo.so.1")).unwrap(),
            hello: program("hello", &["-Wl,--dynamic-linker=/lib/ld-musl-test.so.1"]),
            hello_glibc: program(
                "hello-glibc",
                &["-Wl,--dynamic-linker=/lib64/ld-linux-test.so.2"],
            ),
            hello_runpath: program(
                "hello-runpath",
                &[
                    "-Wl,--dynamic-linker=/lib/ld-musl-test.so.1",
                    "-Wl,--enable-new-dtags,-rpath,$ORIGIN/../lib/demo",
                ],
            ),
            hello_rpath: program(
                "hello-rpath",
                &[
                    "-Wl,--dynamic-linker=/lib/ld-musl-test.so.1",
                    "-Wl,--disable-new-dtags,-rpath,/opt/rp",
                ],
            ),
            lib2: std::fs::read(d.join("libdemo2.so")).unwrap(),
            both: std::fs::read(d.join("both")).unwrap(),
        }
    })
}

/// One entry of a test layer.
enum E {
    Dir(&'static str),
    File(&'static str, u32, Vec<u8>),
    Link(&'static str, &'static str),
    Hard(&'static str, &'static str),
}

fn file(path: &'static str, data: &[u8]) -> E {
    E::File(path, 0o755, data.to_vec())
}

fn contents(pkg: &'static str, lines: &str) -> E {
    let path: &'static str = format!("var/db/pkg/{pkg}/CONTENTS").leak();
    E::File(path, 0o644, lines.as_bytes().to_vec())
}

fn layer(store: &Store, compression: LayerCompression, entries: &[E]) -> Descriptor {
    let mut w = LayerWriter::new(store, compression).unwrap();
    for e in entries {
        let (path, kind, mode, data): (&str, EntryKind, u32, &[u8]) = match e {
            E::Dir(p) => (p, EntryKind::Directory, 0o755, b""),
            E::File(p, mode, data) => (
                p,
                EntryKind::Regular {
                    size: data.len() as u64,
                },
                *mode,
                data,
            ),
            E::Link(p, t) => (
                p,
                EntryKind::Symlink {
                    target: t.as_bytes().to_vec(),
                },
                0o777,
                b"",
            ),
            E::Hard(p, t) => (
                p,
                EntryKind::HardLink {
                    target: t.as_bytes().to_vec(),
                },
                0o755,
                b"",
            ),
        };
        let meta = EntryMeta {
            path: path.as_bytes().to_vec(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            uname: b"root".to_vec(),
            gname: b"root".to_vec(),
            mtime: 1_700_000_000,
            xattrs: Vec::new(),
        };
        w.append(&meta, &mut &data[..]).unwrap();
    }
    w.finish(store).unwrap().descriptor()
}

fn audit(layers: &[&[E]]) -> Report {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path());
    let descs: Vec<Descriptor> = layers
        .iter()
        .map(|l| layer(&store, LayerCompression::None, l))
        .collect();
    audit_layers(&store, &descs).unwrap()
}

fn lines(report: &Report) -> Vec<String> {
    report.problems.iter().map(ToString::to_string).collect()
}

/// A small complete musl-style image: loader, /bin/sh, hello and its library, with owners.
fn base() -> Vec<E> {
    let b = bins();
    vec![
        E::Dir("bin"),
        E::Dir("lib"),
        E::Dir("usr/bin"),
        E::Dir("usr/lib"),
        file("lib/ld-musl-test.so.1", &b.lib),
        file("bin/sh", b"#!/lib/ld-musl-test.so.1\n"),
        file("usr/bin/hello", &b.hello),
        file("usr/lib/libdemo.so.1", &b.lib),
        contents(
            "app-misc/hello-1.0",
            "dir /usr/bin\nobj /usr/bin/hello 0123456789abcdef0123456789abcdef 1700000000\n",
        ),
        contents(
            "dev-libs/libdemo-1",
            "obj /usr/lib/libdemo.so.1 0123456789abcdef0123456789abcdef 1700000000\n",
        ),
    ]
}

fn without(mut entries: Vec<E>, path: &str) -> Vec<E> {
    entries.retain(|e| match e {
        E::Dir(p) | E::File(p, ..) | E::Link(p, _) | E::Hard(p, _) => *p != path,
    });
    entries
}

#[test]
fn a_complete_image_has_no_problem() {
    let report = audit(&[&base()]);
    assert_eq!(lines(&report), Vec::<String>::new());
    assert_eq!(report.elf_files, 3, "loader, hello, libdemo");
    assert_eq!(report.scripts, 1, "/bin/sh");
    assert_eq!(report.files, 6);
}

#[test]
fn a_missing_library_is_one_problem_with_its_owner() {
    let report = audit(&[&without(base(), "usr/lib/libdemo.so.1")]);
    assert_eq!(
        lines(&report),
        ["/usr/bin/hello: needs libdemo.so.1, not found in the image (app-misc/hello-1.0)"]
    );
    assert_eq!(
        report.problems[0],
        Problem {
            file: "/usr/bin/hello".into(),
            missing: Missing::Library("libdemo.so.1".into()),
            owner: Some("app-misc/hello-1.0".into()),
        }
    );
}

#[test]
fn a_missing_interpreter() {
    let mut entries = without(base(), "lib/ld-musl-test.so.1");
    entries.push(file("bin/sh", &bins().lib)); // no longer a script needing the loader
    let report = audit(&[&entries]);
    assert_eq!(
        lines(&report),
        ["/usr/bin/hello: interpreter /lib/ld-musl-test.so.1 not found (app-misc/hello-1.0)"]
    );
}

#[test]
fn merged_usr_symlinks_are_followed_for_libraries_and_owners() {
    let b = bins();
    let merged = |with_lib: bool| {
        let mut e = vec![
            E::Link("bin", "usr/bin"),
            E::Link("lib", "usr/lib"),
            E::Link("usr/sbin", "bin"),
            file("usr/lib/ld-musl-test.so.1", &b.lib),
            file("usr/bin/sh", b"#!/bin/sh\n"),
            file("usr/bin/hello", &b.hello),
            // Only /lib is searched: the library is reached through lib -> usr/lib.
            E::File("etc/ld-musl-test.path", 0o644, b"/lib\n".to_vec()),
            contents(
                "app-misc/hello-1.0",
                "obj /bin/hello 0123456789abcdef0123456789abcdef 1700000000\n",
            ),
        ];
        if with_lib {
            e.push(file("usr/lib/libdemo.so.1", &b.lib));
        } else {
            // In a directory musl is not told about.
            e.push(file("usr/local/lib/libdemo.so.1", &b.lib));
        }
        e
    };
    assert_eq!(lines(&audit(&[&merged(true)])), Vec::<String>::new());
    assert_eq!(
        lines(&audit(&[&merged(false)])),
        ["/usr/bin/hello: needs libdemo.so.1, not found in the image (app-misc/hello-1.0)"]
    );
}

#[test]
fn runpath_with_origin_and_rpath() {
    let b = bins();
    let mut ok = without(base(), "usr/lib/libdemo.so.1");
    ok.push(file("opt/app/bin/hello-runpath", &b.hello_runpath));
    ok.push(file("opt/app/lib/demo/libdemo.so.1", &b.lib));
    ok.push(file("opt/rp/libdemo.so.1", &b.lib));
    ok.push(file("usr/bin/hello-rpath", &b.hello_rpath));
    let report = audit(&[&ok]);
    assert_eq!(
        lines(&report),
        ["/usr/bin/hello: needs libdemo.so.1, not found in the image (app-misc/hello-1.0)"],
        "only the program without a path of its own misses the library"
    );

    let moved = without(
        without(ok, "opt/app/lib/demo/libdemo.so.1"),
        "opt/rp/libdemo.so.1",
    );
    let mut moved = moved;
    moved.push(file("opt/app/bin/lib/demo/libdemo.so.1", &b.lib));
    let report = audit(&[&moved]);
    assert_eq!(
        lines(&report),
        [
            "/opt/app/bin/hello-runpath: needs libdemo.so.1, not found in the image (no package owns it)",
            "/usr/bin/hello: needs libdemo.so.1, not found in the image (app-misc/hello-1.0)",
            "/usr/bin/hello-rpath: needs libdemo.so.1, not found in the image (no package owns it)",
        ]
    );
}

#[test]
fn a_library_finds_what_the_program_loading_it_finds() {
    let b = bins();
    let mut entries = without(without(base(), "usr/lib/libdemo.so.1"), "usr/bin/hello");
    entries.extend([
        file("usr/bin/both", &b.both),
        file("opt/app/lib/libdemo2.so", &b.lib2),
        file("opt/app/lib/libdemo.so.1", &b.lib),
    ]);
    assert_eq!(lines(&audit(&[&entries])), Vec::<String>::new());
    // A copy nobody loads has only its own search, which misses /opt/app/lib.
    entries.push(file("opt/app/plugins/libplug.so", &b.lib2));
    assert_eq!(
        lines(&audit(&[&entries])),
        [
            "/opt/app/plugins/libplug.so: needs libdemo.so.1, not found in the image (no package owns it)"
        ]
    );
    // Without libdemo.so.1 both the program and the library it loads miss it.
    let entries = without(entries, "opt/app/lib/libdemo.so.1");
    assert_eq!(
        lines(&audit(&[&entries])),
        [
            "/opt/app/lib/libdemo2.so: needs libdemo.so.1, not found in the image (no package owns it)",
            "/opt/app/plugins/libplug.so: needs libdemo.so.1, not found in the image (no package owns it)",
            "/usr/bin/both: needs libdemo.so.1, not found in the image (no package owns it)",
        ]
    );
}

#[test]
fn glibc_search_reads_ld_so_conf_with_includes() {
    let b = bins();
    let image = |conf: &'static [u8]| {
        vec![
            file("lib64/ld-linux-test.so.2", &b.lib),
            file("bin/sh", &b.lib),
            file("usr/bin/hello", &b.hello_glibc),
            file("opt/demo/lib/libdemo.so.1", &b.lib),
            E::File(
                "etc/ld.so.conf",
                0o644,
                b"# comment\ninclude ld.so.conf.d/*.conf  # more\n/nonexistent\n".to_vec(),
            ),
            E::File("etc/ld.so.conf.d/10-demo.conf", 0o644, conf.to_vec()),
            E::File("etc/ld.so.conf.d/.hidden.conf", 0o644, b"/x\n".to_vec()),
        ]
    };
    assert_eq!(
        lines(&audit(&[&image(b"/opt/demo/lib\n")])),
        Vec::<String>::new()
    );
    assert_eq!(
        lines(&audit(&[&image(b"#/opt/demo/lib\n")])),
        ["/usr/bin/hello: needs libdemo.so.1, not found in the image (no package owns it)"]
    );
    // The glibc default directories: /usr/lib64 for a 64-bit program.
    let mut default = image(b"");
    default.push(file("usr/lib64/libdemo.so.1", &b.lib));
    let want: Vec<String> = if bins_are_64bit() {
        vec![]
    } else {
        vec![
            "/usr/bin/hello: needs libdemo.so.1, not found in the image (no package owns it)"
                .into(),
        ]
    };
    assert_eq!(lines(&audit(&[&default])), want);
}

fn bins_are_64bit() -> bool {
    bins().lib[4] == 2
}

#[test]
fn a_library_of_another_machine_does_not_count() {
    let b = bins();
    let mut foreign = b.lib.clone();
    foreign[18] ^= 0x40; // e_machine
    let mut entries = without(base(), "usr/lib/libdemo.so.1");
    entries.push(file("lib/libdemo.so.1", &foreign));
    assert_eq!(
        lines(&audit(&[&entries])),
        ["/usr/bin/hello: needs libdemo.so.1, not found in the image (app-misc/hello-1.0)"]
    );
    // The search goes on past the foreign file in /lib, to /usr/lib.
    entries.push(file("usr/lib/libdemo.so.1", &b.lib));
    assert_eq!(lines(&audit(&[&entries])), Vec::<String>::new());
}

#[test]
fn whiteouts_in_a_later_layer() {
    let b = bins();
    let base = base();
    let deleted = [E::File("usr/lib/.wh.libdemo.so.1", 0o644, Vec::new())];
    assert_eq!(
        lines(&audit(&[&base, &deleted])),
        ["/usr/bin/hello: needs libdemo.so.1, not found in the image (app-misc/hello-1.0)"]
    );
    // An opaque directory keeps only what its own layer puts there.
    let opaque = [
        E::File("usr/lib/.wh..wh..opq", 0o644, Vec::new()),
        file("usr/lib/libother.so", &b.lib),
    ];
    assert_eq!(lines(&audit(&[&base, &opaque])).len(), 1);
    let opaque_and_back = [
        file("usr/lib/libdemo.so.1", &b.lib),
        E::File("usr/lib/.wh..wh..opq", 0o644, Vec::new()),
    ];
    assert_eq!(
        lines(&audit(&[&base, &opaque_and_back])),
        Vec::<String>::new()
    );
    // A whiteout of the package's vdb entry takes the owner away.
    let both = [
        E::File("usr/lib/.wh.libdemo.so.1", 0o644, Vec::new()),
        E::File("var/db/pkg/app-misc/.wh.hello-1.0", 0o644, Vec::new()),
    ];
    assert_eq!(
        lines(&audit(&[&base, &both])),
        ["/usr/bin/hello: needs libdemo.so.1, not found in the image (no package owns it)"]
    );
}

#[test]
fn scripts_need_their_interpreters() {
    let mut entries = base();
    entries.extend([
        file("usr/bin/tool", b"#!/usr/bin/python3 -u\nprint()\n"),
        file("usr/bin/envtool", b"#!/usr/bin/env python3\nprint()\n"),
        file("usr/bin/envsh", b"#!/usr/bin/env sh\n"),
        file("usr/bin/env", &bins().hello),
        // Not executable: not a program, not checked.
        E::File("usr/share/x.py", 0o644, b"#!/usr/bin/nothing\n".to_vec()),
        contents(
            "dev-util/tool-2",
            "obj /usr/bin/tool 0123456789abcdef0123456789abcdef 1700000000\n",
        ),
    ]);
    let report = audit(&[&entries]);
    assert_eq!(
        lines(&report),
        [
            "/usr/bin/envtool: #! interpreter python3 (through env) not found in PATH (no package owns it)",
            "/usr/bin/tool: #! interpreter /usr/bin/python3 not found (dev-util/tool-2)",
        ]
    );
    assert_eq!(report.scripts, 4);
    entries.push(file("usr/local/bin/python3", b"#!/bin/sh\n"));
    let report = audit(&[&entries]);
    assert_eq!(
        lines(&report),
        ["/usr/bin/tool: #! interpreter /usr/bin/python3 not found (dev-util/tool-2)"]
    );
}

#[test]
fn bin_sh_must_exist() {
    let report = audit(&[&without(base(), "bin/sh")]);
    assert_eq!(
        lines(&report),
        ["/bin/sh: not found (no package provides it; app-alternatives/sh does on Gentoo)"]
    );
    // A dangling link owned by a package names that package.
    let mut entries = without(base(), "bin/sh");
    entries.push(E::Link("bin/sh", "bash"));
    entries.push(contents(
        "app-alternatives/sh-0",
        "sym /bin/sh -> bash 1700000000\n",
    ));
    assert_eq!(
        lines(&audit(&[&entries])),
        ["/bin/sh: not found (app-alternatives/sh-0)"]
    );
}

#[test]
fn hard_links_carry_what_their_target_is() {
    let mut entries = without(base(), "usr/lib/libdemo.so.1");
    entries.push(E::Hard("usr/bin/hello-again", "usr/bin/hello"));
    let report = audit(&[&entries]);
    assert_eq!(
        lines(&report),
        [
            "/usr/bin/hello: needs libdemo.so.1, not found in the image (app-misc/hello-1.0)",
            "/usr/bin/hello-again: needs libdemo.so.1, not found in the image (no package owns it)",
        ]
    );
}

#[test]
fn images_by_reference_in_every_compression_and_errors_name_the_blob() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path());
    for compression in [
        LayerCompression::Gzip,
        LayerCompression::Zstd,
        LayerCompression::None,
    ] {
        let bottom = layer(&store, compression, &base());
        let top = layer(
            &store,
            compression,
            &[E::File("usr/lib/.wh.libdemo.so.1", 0o644, Vec::new())],
        );
        let infos: Vec<crate::image::layer::LayerInfo> = [&bottom, &top]
            .iter()
            .map(|d| crate::image::layer::LayerInfo {
                digest: d.blob().unwrap(),
                diff_id: d.blob().unwrap(),
                size: d.size(),
                tar_size: d.size(),
                media_type: compression.media_type(),
            })
            .collect();
        let reference = format!("localhost/audit-{compression}:1");
        let spec = ImageSpec::gentoo("linux/amd64".parse::<Platform>().unwrap(), 0);
        crate::image::commit_image(&store, &reference, &spec, &infos).unwrap();
        let report = audit_image(&store, &reference).unwrap();
        assert_eq!(
            lines(&report),
            ["/usr/bin/hello: needs libdemo.so.1, not found in the image (app-misc/hello-1.0)"],
            "{compression}"
        );

        // A cut blob: the error names the image, the layer and its digest.
        let path = store.blob_path(&bottom.blob().unwrap());
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let err = format!("{:#}", audit_image(&store, &reference).unwrap_err());
        assert!(err.contains(&format!("image {reference}")), "{err}");
        assert!(
            err.contains(&format!("layer 1 of 2 ({})", bottom.digest())),
            "{err}"
        );
        std::fs::remove_file(&path).unwrap();
        let err = format!("{:#}", audit_image(&store, &reference).unwrap_err());
        assert!(err.contains("cannot open"), "{err}");
    }
    let err = audit_image(&store, "localhost/none:1").unwrap_err();
    assert!(err.to_string().contains("no image named"), "{err}");
}

#[test]
fn problems_are_sorted_and_the_summary_counts() {
    let mut entries = without(without(base(), "usr/lib/libdemo.so.1"), "bin/sh");
    entries.push(file("usr/bin/a-tool", b"#!/usr/bin/missing\n"));
    let report = audit(&[&entries]);
    let files: Vec<&str> = report.problems.iter().map(|p| p.file.as_str()).collect();
    assert_eq!(files, ["/bin/sh", "/usr/bin/a-tool", "/usr/bin/hello"]);
    assert!(
        report
            .to_string()
            .ends_with("5 files, 2 ELF files, 1 scripts checked: 3 problems")
    );
}

#[test]
fn globs() {
    assert!(fnmatch(b"*.conf", b"10-x.conf"));
    assert!(!fnmatch(b"*.conf", b"10-x.conf~"));
    assert!(fnmatch(b"[0-9]?-*", b"10-x"));
    assert!(!fnmatch(b"[!0-9]*", b"10-x"));
    assert!(fnmatch(b"[]x]", b"]"));
    assert!(fnmatch(b"a[", b"a["));
}
