//! The tidy test: checks, on the source tree itself, the invariants ARCHITECTURE.md promises
//! and that no compiler lint sees (rust-analyzer's `xtask/src/tidy.rs` does the same):
//!
//! - every Rust source file starts with a module doc (`//!`) saying what it is for;
//! - only `store`, `client` (the producer's own buffer database), the shared `fixtures` and
//!   the test harness depend on sqlx: everything else reaches PostgreSQL through `store`;
//! - `event` (the model) depends on no runtime: no tokio;
//! - every dependency a crate declares is used by its code, and every workspace dependency by
//!   some crate;
//! - crates depend on each other only along the map's boundaries (a service crate never on
//!   another service crate: what they share moves down into `runtime`).
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

/// Every dependency a manifest declares, in any section (also `[target.'…'.dependencies]`), as
/// (the name the code uses, the package it is).
fn dependencies(manifest: &toml::Table) -> BTreeSet<(String, String)> {
    let mut tables: Vec<&toml::Table> = SECTIONS
        .iter()
        .filter_map(|s| manifest.get(*s).and_then(|t| t.as_table()))
        .collect();
    if let Some(targets) = manifest.get("target").and_then(|t| t.as_table()) {
        for target in targets.values().filter_map(|t| t.as_table()) {
            tables.extend(
                SECTIONS
                    .iter()
                    .filter_map(|s| target.get(*s).and_then(|t| t.as_table())),
            );
        }
    }
    tables
        .into_iter()
        .flat_map(|t| t.iter())
        .map(|(key, spec)| {
            let package = spec.get("package").and_then(|p| p.as_str()).unwrap_or(key);
            (key.clone(), package.to_owned())
        })
        .collect()
}

/// The packages a manifest depends on.
fn packages(manifest: &toml::Table) -> BTreeSet<String> {
    dependencies(manifest).into_iter().map(|(_, p)| p).collect()
}

/// Our own crates a manifest's `[dependencies]` name (what its library links; tests and
/// benches may use more).
fn internal_dependencies(manifest: &toml::Table) -> BTreeSet<String> {
    manifest
        .get("dependencies")
        .and_then(|t| t.as_table())
        .into_iter()
        .flat_map(|t| t.keys())
        .filter(|k| k.starts_with("auditbridge"))
        .cloned()
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
        .filter(|m| packages(m).contains("sqlx"))
        .map(|m| package_name(&m))
        .filter(|name| !SQLX_ALLOWED.contains(&name.as_str()))
        .collect();
    assert!(
        offenders.is_empty(),
        "these crates depend on sqlx, but only {SQLX_ALLOWED:?} may (go through auditbridge-store): {offenders:?}"
    );
}

/// What the event model may never pull in, directly or through another crate.
const RUNTIMES: &[&str] = &[
    "tokio",
    "mio",
    "async-nats",
    "sqlx",
    "lapin",
    "reqwest",
    "hyper",
    "axum",
];

#[test]
fn the_event_model_depends_on_no_runtime() {
    // Walk the resolved graph in Cargo.lock from auditbridge-event.
    let lock: toml::Table = std::fs::read_to_string(root().join("Cargo.lock"))
        .expect("Cargo.lock")
        .parse()
        .expect("Cargo.lock is TOML");
    let packages = lock["package"].as_array().expect("[[package]] entries");
    let deps_of = |name: &str| -> Vec<String> {
        packages
            .iter()
            .filter(|p| p["name"].as_str() == Some(name))
            .flat_map(|p| {
                p.get("dependencies")
                    .and_then(|d| d.as_array())
                    .cloned()
                    .unwrap_or_default()
            })
            // "name" or "name version" when several versions are locked.
            .filter_map(|d| {
                d.as_str()
                    .and_then(|d| d.split(' ').next())
                    .map(str::to_owned)
            })
            .collect()
    };
    let mut seen = BTreeSet::new();
    let mut stack = vec!["auditbridge-event".to_owned()];
    while let Some(name) = stack.pop() {
        if seen.insert(name.clone()) {
            stack.extend(deps_of(&name));
        }
    }
    let found: Vec<&&str> = RUNTIMES.iter().filter(|r| seen.contains(**r)).collect();
    assert!(
        found.is_empty(),
        "auditbridge-event (the model: no I/O) pulls in {found:?}"
    );
}

/// Which of our crates each crate's library may depend on: the map's boundaries
/// (ARCHITECTURE.md, invariant 13). A new crate is added here and to the map.
const BOUNDARIES: &[(&str, &[&str])] = &[
    ("auditbridge-event", &[]),
    ("auditbridge-tlog", &[]),
    ("auditbridge-config", &["auditbridge-event"]),
    (
        "auditbridge-store",
        &["auditbridge-event", "auditbridge-tlog"],
    ),
    (
        "auditbridge-runtime",
        &["auditbridge-config", "auditbridge-store"],
    ),
    (
        "auditbridge-destinations",
        &[
            "auditbridge-config",
            "auditbridge-event",
            "auditbridge-store",
        ],
    ),
    (
        "auditbridge-sources",
        &[
            "auditbridge-config",
            "auditbridge-event",
            "auditbridge-runtime",
            // The api poller keeps its cursor, lease and rejects (never events) there.
            "auditbridge-store",
        ],
    ),
    (
        "auditbridge-worker",
        &[
            "auditbridge-config",
            "auditbridge-destinations",
            "auditbridge-event",
            "auditbridge-runtime",
            "auditbridge-store",
            "auditbridge-tlog",
        ],
    ),
    (
        "auditbridge-api",
        &[
            "auditbridge-config",
            "auditbridge-event",
            "auditbridge-runtime",
            "auditbridge-sources",
            "auditbridge-store",
            "auditbridge-tlog",
        ],
    ),
    (
        "auditbridge-client",
        &["auditbridge-config", "auditbridge-event"],
    ),
    // What the test harness and the benchmarks share: below every service crate.
    (
        "auditbridge-fixtures",
        &[
            "auditbridge-event",
            "auditbridge-runtime",
            "auditbridge-store",
        ],
    ),
    (
        "auditbridge-bench",
        &[
            "auditbridge-api",
            "auditbridge-config",
            "auditbridge-event",
            "auditbridge-fixtures",
            "auditbridge-runtime",
            "auditbridge-sources",
            "auditbridge-store",
            "auditbridge-tlog",
        ],
    ),
];

/// Crates on top of everything: the binary and the test harness.
const TOP: &[&str] = &["auditbridge", "auditbridge-tests"];

#[test]
fn crates_depend_on_each_other_only_along_the_map() {
    let mut wrong = Vec::new();
    for dir in members() {
        let m = manifest(&dir);
        let name = package_name(&m);
        if TOP.contains(&name.as_str()) {
            continue;
        }
        let Some((_, allowed)) = BOUNDARIES.iter().find(|(n, _)| *n == name) else {
            wrong.push(format!(
                "{name} is not in the map (tidy.rs BOUNDARIES, ARCHITECTURE.md)"
            ));
            continue;
        };
        for dep in internal_dependencies(&m) {
            if !allowed.contains(&dep.as_str()) {
                wrong.push(format!("{name} depends on {dep}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "crate dependencies outside the map:\n  {}",
        wrong.join("\n  ")
    );
}

/// Whether `crate_name` (as written in Cargo.toml) is named in any of `files`, as a path
/// (`name::`), an import (`use name`) or `extern crate name`, outside `//` comments, and not
/// as the end of a longer name (`tokio` in `tokio_util::`, `time` in `std::time::`).
fn used_in(crate_name: &str, files: &[String]) -> bool {
    let ident = crate_name.replace('-', "_");
    files.iter().any(|text| {
        text.lines()
            .map(str::trim_start)
            .filter(|l| !l.starts_with("//"))
            .any(|line| {
                line.match_indices(ident.as_str()).any(|(at, _)| {
                    let before = line[..at].chars().next_back();
                    let after = &line[at + ident.len()..];
                    let starts_name =
                        before.is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'));
                    // `serde(with = "humantime_serde")` names a crate as a module path.
                    let names_crate = after.starts_with("::")
                        || (line[..at].ends_with('"') && after.starts_with('"'))
                        || (line[..at].trim_end().ends_with("use")
                            || line[..at].trim_end().ends_with("extern crate"))
                            && after
                                .chars()
                                .next()
                                .is_none_or(|c| matches!(c, ';' | '{' | ' ' | ':'));
                    starts_name && names_crate
                })
            })
    })
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
        for (dep, _) in dependencies(&m) {
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
