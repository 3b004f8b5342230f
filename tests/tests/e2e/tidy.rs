//! The tidy test: checks, on the source tree itself, the invariants ARCHITECTURE.md promises
//! and that no compiler lint sees (rust-analyzer's `xtask/src/tidy.rs` does the same):
//!
//! - every Rust source file starts with a module doc (`//!`) saying what it is for;
//! - only `store`, `client` (the producer's own buffer database), the shared `fixtures` and
//!   the test harness depend on sqlx: everything else reaches PostgreSQL through `store`;
//! - `event` (the model) depends on no runtime: no tokio;
//! - every dependency a crate declares is used by its code, and every workspace dependency by
//!   some crate.
//!
//! Each check lists every offender at once, by path, so one run says all that is wrong.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Packages that may depend on sqlx (ARCHITECTURE.md, "Where things live").
const SQLX_ALLOWED: &[&str] = &[
    "auditbridge-store",
    "auditbridge-client",
    "auditbridge-fixtures",
    "auditbridge-tests",
];

/// The dependency sections of a manifest that count as "depends on".
const SECTIONS: &[&str] = &["dependencies", "dev-dependencies", "build-dependencies"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_owned()
}

/// The workspace's member directories: `crates/*` and `tests`.
fn members() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root().join("crates"))
        .expect("crates/ is readable")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.join("Cargo.toml").is_file())
        .collect();
    dirs.push(root().join("tests"));
    dirs.sort();
    dirs
}

fn manifest(dir: &Path) -> toml::Table {
    let text = std::fs::read_to_string(dir.join("Cargo.toml")).expect("a readable Cargo.toml");
    text.parse().expect("Cargo.toml is TOML")
}

fn package_name(manifest: &toml::Table) -> String {
    manifest["package"]["name"]
        .as_str()
        .expect("package.name is a string")
        .to_owned()
}

/// Every dependency a manifest declares, in any section.
fn dependencies(manifest: &toml::Table) -> BTreeSet<String> {
    SECTIONS
        .iter()
        .filter_map(|s| manifest.get(*s).and_then(|t| t.as_table()))
        .flat_map(|t| t.keys().cloned())
        .collect()
}

/// Every `.rs` file under `dir`, skipping build output.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if path.is_dir() {
                if !matches!(name, "target" | "corpus" | "artifacts" | "node_modules") {
                    stack.push(path);
                }
            } else if name.ends_with(".rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn relative(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

#[test]
fn every_source_file_has_a_module_doc() {
    let mut dirs = members();
    dirs.push(root().join("fuzz"));
    let missing: Vec<String> = dirs
        .iter()
        .flat_map(|d| rust_files(d))
        .filter(|file| {
            let text = std::fs::read_to_string(file).expect("a readable source file");
            // Inner attributes (`#![no_main]`) may come first.
            let first = text
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty() && !l.starts_with("#!["));
            !first.is_some_and(|l| l.starts_with("//!"))
        })
        .map(|f| relative(&f))
        .collect();
    assert!(
        missing.is_empty(),
        "files without a module doc (`//!` saying what the module is for):\n  {}",
        missing.join("\n  ")
    );
}

#[test]
fn only_store_client_and_the_test_support_speak_sql() {
    let offenders: Vec<String> = members()
        .iter()
        .map(|d| manifest(d))
        .filter(|m| dependencies(m).contains("sqlx"))
        .map(|m| package_name(&m))
        .filter(|name| !SQLX_ALLOWED.contains(&name.as_str()))
        .collect();
    assert!(
        offenders.is_empty(),
        "these crates depend on sqlx, but only {SQLX_ALLOWED:?} may (go through auditbridge-store): {offenders:?}"
    );
}

#[test]
fn the_event_model_depends_on_no_runtime() {
    let event = manifest(&root().join("crates/event"));
    let deps = dependencies(&event);
    for runtime in ["tokio", "async-nats", "sqlx", "lapin", "reqwest"] {
        assert!(
            !deps.contains(runtime),
            "auditbridge-event (the model: no I/O) depends on {runtime}"
        );
    }
}

/// Whether `crate_name` (as written in Cargo.toml) is named in any of `files`.
fn used_in(crate_name: &str, files: &[String]) -> bool {
    let ident = crate_name.replace('-', "_");
    let path = format!("{ident}::");
    let import = format!("use {ident}");
    let external = format!("extern crate {ident}");
    files
        .iter()
        .any(|text| text.contains(&path) || text.contains(&import) || text.contains(&external))
}

#[test]
fn every_declared_dependency_is_used() {
    let workspace: toml::Table = std::fs::read_to_string(root().join("Cargo.toml"))
        .expect("the workspace manifest")
        .parse()
        .expect("TOML");
    let mut unused = Vec::new();
    let mut used_anywhere = BTreeSet::new();
    for dir in members() {
        let m = manifest(&dir);
        let texts: Vec<String> = rust_files(&dir)
            .iter()
            .map(|f| std::fs::read_to_string(f).expect("a readable source file"))
            .collect();
        for dep in dependencies(&m) {
            used_anywhere.insert(dep.clone());
            if !used_in(&dep, &texts) {
                unused.push(format!(
                    "{} declares {dep}",
                    relative(&dir.join("Cargo.toml"))
                ));
            }
        }
    }
    let declared = workspace["workspace"]["dependencies"]
        .as_table()
        .expect("[workspace.dependencies]");
    for dep in declared.keys() {
        if !used_anywhere.contains(dep) {
            unused.push(format!("[workspace.dependencies] declares {dep}"));
        }
    }
    assert!(
        unused.is_empty(),
        "dependencies nothing uses (remove them):\n  {}",
        unused.join("\n  ")
    );
}
