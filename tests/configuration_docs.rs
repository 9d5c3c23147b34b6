//! docs/configuration.md lists every key of both planes' config files: this fails when a
//! key is added to (or renamed in) `ControlPlaneConfig` or `DataPlaneConfig` without a
//! row in that page's table for its plane.

use tenantry_control_plane::ControlPlaneConfig;
use tenantry_data_plane::DataPlaneConfig;

/// The keys of a config as its file spells them (serde's names).
fn keys_of(config: impl serde::Serialize) -> Vec<String> {
    match serde_json::to_value(config) {
        Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
        other => panic!("a config serializes to an object, got {other:?}"),
    }
}

/// The part of the page under `heading`, up to the next heading of its level.
fn section<'a>(page: &'a str, heading: &str) -> &'a str {
    let start = page
        .find(heading)
        .unwrap_or_else(|| panic!("docs/configuration.md has no heading {heading:?}"));
    let rest = &page[start + heading.len()..];
    let end = rest.find("\n## ").unwrap_or(rest.len());
    &rest[..end]
}

fn missing(keys: &[String], section: &str) -> Vec<String> {
    keys.iter()
        .filter(|key| !section.contains(&format!("| `{key}` |")))
        .cloned()
        .collect()
}

#[test]
fn every_config_key_has_a_row_in_the_configuration_page() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md");
    let page = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let control_plane = keys_of(ControlPlaneConfig::default());
    let data_plane = keys_of(DataPlaneConfig::default());
    assert!(control_plane.len() > 5 && data_plane.len() > 5);
    let control_missing = missing(
        &control_plane,
        section(&page, "## Control plane (`ControlPlaneConfig`)"),
    );
    let data_missing = missing(
        &data_plane,
        section(&page, "## Data plane (`DataPlaneConfig`)"),
    );
    assert!(
        control_missing.is_empty() && data_missing.is_empty(),
        "add a row `| `key` | default | meaning |` to docs/configuration.md for: \
         control plane {control_missing:?}, data plane {data_missing:?}"
    );
    // The check itself can fail: a key that is not there is found missing.
    assert_eq!(
        missing(&["no_such_key".to_owned()], &page),
        vec!["no_such_key".to_owned()]
    );
}
