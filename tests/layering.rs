//! The module layers of src/lib.rs hold: no file under src/ uses a module of its own layer
//! or a higher one (only lower layers, and its own module). The table is read from lib.rs's
//! documentation, so the documented layers and the checked ones are the same; every `crate::`
//! path in the code (comments aside) is checked, in `use` lines and in expressions, with
//! `crate::{a, b::c}` groups taken apart.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// The layer table of lib.rs: rows `//! | N | `a`, `b` | what |`, module name -> layer.
fn layers(lib: &str) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    for line in lib.lines() {
        let Some(row) = line.strip_prefix("//! |") else {
            continue;
        };
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let Some(Ok(layer)) = cells.first().map(|c| c.parse::<u32>()) else {
            continue;
        };
        for name in cells.get(1).copied().unwrap_or("").split(',') {
            let name = name.trim().trim_matches('`');
            if !name.is_empty() {
                out.insert(name.to_string(), layer);
            }
        }
    }
    out
}

/// The text without `//` comments (a `//` inside a string literal is kept).
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let bytes = line.as_bytes();
        let mut in_str = false;
        let mut cut = bytes.len();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'\\' if in_str => i += 1,
                b'"' => in_str = !in_str,
                b'/' if !in_str && bytes.get(i + 1) == Some(&b'/') => {
                    cut = i;
                    break;
                }
                _ => {}
            }
            i += 1;
        }
        out.push_str(&line[..cut]);
        out.push('\n');
    }
    out
}

/// The top-level modules that `crate::` paths in `code` name.
fn used_modules(code: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        let after = rest.trim_start();
        if let Some(group) = after.strip_prefix('{') {
            // The top-level names of the group: split at commas outside nested braces.
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.push(ident(item.trim()));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 || c != '{' {
                    item.push(c);
                }
            }
            out.push(ident(item.trim()));
        } else {
            out.push(ident(after));
        }
    }
    out.retain(|m| !m.is_empty() && m != "self");
    out
}

/// Every violation in the file `path` (relative to src/) of module `module`, with `text`.
fn violations(table: &BTreeMap<String, u32>, module: &str, path: &str, text: &str) -> Vec<String> {
    let Some(&own) = table.get(module) else {
        return vec![format!(
            "src/{path}: the module `{module}` has no layer in src/lib.rs's table"
        )];
    };
    let mut out = Vec::new();
    for used in used_modules(&strip_comments(text)) {
        if used == module {
            continue;
        }
        match table.get(&used) {
            None => out.push(format!(
                "src/{path}: uses crate::{used}, which has no layer in src/lib.rs's table"
            )),
            Some(&layer) if layer >= own => out.push(format!(
                "src/{path}: `{module}` (layer {own}) uses crate::{used} (layer {layer}): only \
                 lower layers may be used"
            )),
            Some(_) => {}
        }
    }
    out.sort();
    out.dedup();
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_module_uses_its_own_layer_or_a_higher_one() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = fs::read_to_string(src.join("lib.rs")).unwrap();
    let table = layers(&lib);
    // Every `pub mod` of lib.rs has a layer, and the table names no module lib.rs lacks.
    let declared: Vec<String> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';').to_string())
        .collect();
    assert!(declared.len() > 10, "lib.rs declares {declared:?}");
    for m in &declared {
        assert!(table.contains_key(m), "src/lib.rs: `{m}` is in no layer");
    }
    for m in table.keys() {
        assert!(
            declared.contains(m),
            "src/lib.rs: the table's `{m}` is no module"
        );
    }

    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut found = Vec::new();
    let mut checked = 0;
    for file in &files {
        let rel = file
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        // The binary uses the library from outside, as any user does; lib.rs declares.
        if rel == "main.rs" || rel == "lib.rs" {
            continue;
        }
        let module = rel
            .split('/')
            .next()
            .unwrap()
            .trim_end_matches(".rs")
            .to_string();
        let text = fs::read_to_string(file).unwrap();
        found.extend(violations(&table, &module, &rel, &text));
        checked += 1;
    }
    assert!(checked > 30, "only {checked} files under src/");
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn the_checker_sees_uses_in_every_form() {
    let table = layers(
        "//! | layer | modules | what |\n//! |---|---|---|\n//! | 0 | `low` | a |\n\
         //! | 1 | `mid`, `peer` | b |\n//! | 2 | `top` | c |\n",
    );
    assert_eq!(table.len(), 4);
    assert_eq!(table["peer"], 1);
    let v = |text: &str| violations(&table, "mid", "mid/x.rs", text);
    // Down, and its own module: fine.
    assert!(v("use crate::low::a;\nuse crate::mid::b;\nfn f() { crate::low::g() }").is_empty());
    // Up, sideways, in a group, in an expression, unknown: each one found.
    assert_eq!(v("use crate::top::a;").len(), 1);
    assert_eq!(v("use crate::peer::a;").len(), 1);
    assert_eq!(
        v("use crate::{\n    low::a,\n    top::{b, c},\n};").len(),
        1,
        "{:?}",
        v("use crate::{\n    low::a,\n    top::{b, c},\n};")
    );
    assert_eq!(v("let x = crate::top::f();").len(), 1);
    assert_eq!(v("use crate::nowhere::a;").len(), 1);
    // Comments and strings are not code.
    assert!(v("// see crate::top::f\n/// [`crate::top`]\nlet s = \"a // b\";").is_empty());
    assert_eq!(v("let s = \"a // b\"; crate::top::f();").len(), 1);
    // A module without a layer is reported.
    assert_eq!(violations(&table, "new", "new.rs", "").len(), 1);
}
