//! Keeps the rooms of the data plane and of the control plane pointing one way (see each
//! crate's `lib.rs` and CONTRIBUTING.md): every `crate::<room>` a file names must be a
//! room below its own, so no module loop can come back, and `tonic::Status` is named in
//! each crate's `error.rs` alone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The data plane's rooms, and the rooms each may name besides itself. A DAG: no room is
/// reachable from itself.
const DATA_PLANE: &[(&str, &[&str])] = &[
    ("error", &[]),
    ("routing", &["error"]),
    ("pool", &["error", "routing"]),
    ("backend", &["error", "routing", "pool"]),
    ("layers", &["error", "routing"]),
    (
        "service",
        &["error", "routing", "pool", "backend", "layers"],
    ),
];

/// The control plane's: the registry near the bottom, the gRPC services at the top.
const CONTROL_PLANE: &[(&str, &[&str])] = &[
    ("error", &[]),
    ("location", &[]),
    ("registry", &["error"]),
    ("convert", &["location", "registry"]),
    ("metrics", &["registry"]),
    ("provisioner", &["error", "location", "registry"]),
    ("routes", &["convert", "error", "location", "registry"]),
    ("reconciler", &["provisioner", "registry"]),
    (
        "domain",
        &["convert", "error", "metrics", "provisioner", "registry"],
    ),
    ("service", &["convert", "domain", "error", "routes"]),
];

fn source_files(dir: &Path, files: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
        if path.is_dir() {
            source_files(&path, files);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            files.push(path);
        }
    }
}

/// The room a source file belongs to (`src/pool/queue.rs` -> `pool`), None for `lib.rs`.
fn room_of(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?;
    match first {
        "lib.rs" => None,
        other => Some(other.trim_end_matches(".rs").to_owned()),
    }
}

/// Every room `text` names as `crate::<room>`, also inside `use crate::{a, b::c}`.
fn named_rooms(text: &str) -> Vec<String> {
    let mut rooms = Vec::new();
    let code: String = text
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    rooms.push(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            rooms.push(name);
        }
    }
    rooms
}

/// Violations in `files`: (file, room it names that it may not).
fn violations(rooms: &[(&str, &[&str])], src: &Path, files: &[(PathBuf, String)]) -> Vec<String> {
    let allowed: BTreeMap<&str, &[&str]> = rooms.iter().copied().collect();
    let mut found = Vec::new();
    for (file, text) in files {
        let Some(room) = room_of(src, file) else {
            continue;
        };
        let Some(may_name) = allowed.get(room.as_str()) else {
            found.push(format!(
                "{}: room `{room}` is not in this test's table; add it with the rooms it may name",
                file.display()
            ));
            continue;
        };
        for named in named_rooms(text) {
            if named != room
                && allowed.contains_key(named.as_str())
                && !may_name.contains(&named.as_str())
            {
                found.push(format!(
                    "{}: `{room}` names `crate::{named}`, a room it may not name",
                    file.display()
                ));
            }
        }
        let other_backend = match file.to_str() {
            Some(path) if path.contains("/backend/postgres/") => Some("sqlite"),
            Some(path) if path.contains("/backend/sqlite/") => Some("postgres"),
            _ => None,
        };
        if let Some(other) = other_backend
            && (text.contains(&format!("backend::{other}"))
                || text.contains(&format!("super::{other}")))
        {
            found.push(format!(
                "{}: one backend names the other ({other})",
                file.display()
            ));
        }
    }
    found
}

fn sources(crate_dir: &str) -> (PathBuf, Vec<(PathBuf, String)>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(crate_dir)
        .join("src");
    let mut files = Vec::new();
    source_files(&src, &mut files);
    let files = files
        .into_iter()
        .map(|file| {
            let text = std::fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            (file, text)
        })
        .collect();
    (src, files)
}

#[test]
fn rooms_name_only_the_rooms_below_them() {
    for (crate_dir, rooms) in [("data-plane", DATA_PLANE), ("control-plane", CONTROL_PLANE)] {
        let (src, files) = sources(crate_dir);
        assert!(
            files.len() > 15,
            "{crate_dir}: only {} source files",
            files.len()
        );
        let found = violations(rooms, &src, &files);
        assert!(
            found.is_empty(),
            "module rules broken:\n{}",
            found.join("\n")
        );
    }
}

#[test]
fn the_check_catches_a_room_that_names_one_above_it() {
    let src = PathBuf::from("/x/src");
    let files = vec![
        (
            src.join("routing/stream.rs"),
            "use crate::error::DataPlaneError;\nuse crate::{pool::PoolManager, routing};"
                .to_owned(),
        ),
        (
            src.join("backend/postgres/execute.rs"),
            "use crate::backend::sqlite::SqliteTenantPool;".to_owned(),
        ),
        (
            src.join("error.rs"),
            "use crate::service::SqlApi;".to_owned(),
        ),
        (
            src.join("pool/manager.rs"),
            "// crate::backend in a comment\nuse crate::routing::Route;".to_owned(),
        ),
    ];
    let found = violations(DATA_PLANE, &src, &files);
    assert_eq!(found.len(), 3, "{found:#?}");
    assert!(
        found[0].contains("`routing` names `crate::pool`"),
        "{found:#?}"
    );
    assert!(
        found[1].contains("one backend names the other"),
        "{found:#?}"
    );
    assert!(
        found[2].contains("`error` names `crate::service`"),
        "{found:#?}"
    );
}

#[test]
fn only_the_error_model_builds_a_status() {
    for crate_dir in ["data-plane", "control-plane"] {
        let (src, files) = sources(crate_dir);
        let builders: Vec<String> = files
            .iter()
            .filter(|(file, _)| file != &src.join("error.rs"))
            .filter(|(_, text)| text.contains("Status::"))
            .map(|(file, _)| file.display().to_string())
            .collect();
        assert!(
            builders.is_empty(),
            "these files name `Status::` (return the crate's error type; its error.rs \
             converts): {builders:?}"
        );
    }
}
