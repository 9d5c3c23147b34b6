//! Config loading: a TOML file (unknown keys rejected) with `TENANTRY_*` environment
//! overrides on top. The environment is passed in as a map so tests need no process env.
//!
//! An override's name is the prefix plus the key in upper case: `listen_addr` is
//! `TENANTRY_LISTEN_ADDR`. Its value is read as the type of the key's default: numbers
//! and booleans are parsed, everything else is taken as a string.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Prefix of every environment override.
pub const ENV_PREFIX: &str = "TENANTRY_";

/// A plane's config: its keys, for environment overrides, come from its `Default`.
pub trait PlaneConfig: Serialize + DeserializeOwned + Default {
    /// Keys that have no default value (optional settings), as written in the file.
    const OPTIONAL_KEYS: &'static [&'static str] = &[];
}

/// Loads `T` from an optional TOML file, then applies `TENANTRY_<KEY>` overrides from
/// `env`. Environment variables that name no key of `T` are ignored (other commands
/// read them), but every key in the file must be known.
pub fn load<T: PlaneConfig>(
    file: Option<&Path>,
    env: &HashMap<String, String>,
) -> anyhow::Result<T> {
    let mut table = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?;
            text.parse::<toml::Table>()
                .with_context(|| format!("config file {} is not valid TOML", path.display()))?
        }
        None => toml::Table::new(),
    };
    let defaults = toml::Table::try_from(T::default()).context("serializing config defaults")?;
    let known_keys = defaults
        .iter()
        .map(|(key, value)| (key.clone(), Some(value.clone())))
        .chain(T::OPTIONAL_KEYS.iter().map(|key| ((*key).to_owned(), None)));
    for (key, default_value) in known_keys {
        let env_name = format!("{ENV_PREFIX}{}", key.to_ascii_uppercase());
        let Some(raw) = env.get(&env_name) else {
            continue;
        };
        let value = match default_value {
            Some(toml::Value::Integer(_)) => toml::Value::Integer(
                raw.trim()
                    .parse()
                    .with_context(|| format!("{env_name}={raw:?} is not an integer"))?,
            ),
            Some(toml::Value::Float(_)) => toml::Value::Float(
                raw.trim()
                    .parse()
                    .with_context(|| format!("{env_name}={raw:?} is not a number"))?,
            ),
            Some(toml::Value::Boolean(_)) => match raw.trim() {
                "true" | "1" => toml::Value::Boolean(true),
                "false" | "0" => toml::Value::Boolean(false),
                _ => bail!("{env_name}={raw:?} is not a boolean (true or false)"),
            },
            _ => toml::Value::String(raw.clone()),
        };
        table.insert(key, value);
    }
    let source = file.map_or_else(
        || "environment".to_owned(),
        |path| path.display().to_string(),
    );
    toml::Value::Table(table).try_into::<T>().map_err(|error| {
        anyhow::anyhow!("invalid config ({source} and TENANTRY_* variables): {error}")
    })
}

/// The process environment as a map.
pub fn process_env() -> HashMap<String, String> {
    std::env::vars().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Example {
        listen_addr: String,
        interval_ms: u64,
        enabled: bool,
        migrations_dir: Option<String>,
    }

    impl Default for Example {
        fn default() -> Self {
            Self {
                listen_addr: "127.0.0.1:1".into(),
                interval_ms: 5,
                enabled: false,
                migrations_dir: None,
            }
        }
    }

    impl PlaneConfig for Example {
        const OPTIONAL_KEYS: &'static [&'static str] = &["migrations_dir"];
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn env_overrides_defaults_and_file() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("tenantry-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("c.toml");
        std::fs::write(&file, "listen_addr = \"0.0.0.0:9\"\ninterval_ms = 7\n")?;
        let loaded: Example = load(
            Some(&file),
            &env(&[
                ("TENANTRY_INTERVAL_MS", "11"),
                ("TENANTRY_ENABLED", "true"),
                ("TENANTRY_MIGRATIONS_DIR", "/m"),
                ("TENANTRY_SOMETHING_ELSE", "x"),
            ]),
        )?;
        assert_eq!(
            loaded,
            Example {
                listen_addr: "0.0.0.0:9".into(),
                interval_ms: 11,
                enabled: true,
                migrations_dir: Some("/m".into()),
            }
        );
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn unknown_file_keys_and_bad_values_are_rejected() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("tenantry-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("c.toml");
        std::fs::write(&file, "listen_adr = \"0.0.0.0:9\"\n")?;
        let error = load::<Example>(Some(&file), &HashMap::new())
            .err()
            .map(|e| e.to_string());
        assert!(
            error.as_deref().is_some_and(|e| e.contains("listen_adr")),
            "{error:?}"
        );
        let error = load::<Example>(None, &env(&[("TENANTRY_INTERVAL_MS", "soon")]))
            .err()
            .map(|e| e.to_string());
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.contains("TENANTRY_INTERVAL_MS")),
            "{error:?}"
        );
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
