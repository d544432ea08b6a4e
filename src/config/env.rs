//! The environment layer: `ELPIS_<SECTION>_<KEY>` and
//! `ELPIS_<SECTION>__<KEY>` variables (names in any case) over the file's
//! table, each value read as its key's type.

use std::collections::BTreeMap;

use super::legacy::TRANSFORMERS_KEYS;
use super::{Config, ConfigError};

/// `ELPIS_*` variables that are not config keys (never warned about).
const NON_CONFIG_VARS: &[&str] =
    &["ELPIS_QUIET", "ELPIS_RECORD", "ELPIS_CACHE_DIR", "ELPIS_TEST_THREADS", "ELPIS_FUZZ_CASES", "ELPIS_FUZZ_SEED"];

/// The config sections, as in the file.
const SECTIONS: [&str; 4] = ["model", "emotion", "logging", "server"];

/// The type a config key's value has, to read a variable's text as.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ValueKind {
    Text,
    Integer,
    Number,
    Boolean,
    /// A list of texts, comma-separated in a variable.
    List,
}

impl ValueKind {
    /// The variable's text as a value of this kind; the error says what was expected.
    fn read(self, raw: &str) -> Result<toml::Value, &'static str> {
        let number = || -> Option<f64> {
            let t = raw.trim().replace('_', "");
            let t = t.strip_prefix('+').unwrap_or(&t);
            t.parse::<f64>().ok().filter(|f| f.is_finite())
        };
        match self {
            ValueKind::Text => Ok(toml::Value::String(raw.to_string())),
            ValueKind::Integer => {
                let t = raw.trim().replace('_', "");
                if let Ok(i) = t.strip_prefix('+').unwrap_or(&t).parse::<i64>() {
                    return Ok(toml::Value::Integer(i));
                }
                match number() {
                    Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(toml::Value::Integer(f as i64)),
                    _ => Err("expected a whole number"),
                }
            }
            ValueKind::Number => number().map(toml::Value::Float).ok_or("expected a number"),
            ValueKind::List => Ok(toml::Value::Array(
                raw.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| toml::Value::String(s.to_string())).collect(),
            )),
            ValueKind::Boolean => match raw.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(toml::Value::Boolean(true)),
                "false" | "0" | "no" | "off" => Ok(toml::Value::Boolean(false)),
                _ => Err("expected true or false"),
            },
        }
    }
}

/// Every key a variable may set, with the type of its value, read off the
/// defaults (so a new setting is settable from the environment at once).
fn settable_keys() -> BTreeMap<(String, String), ValueKind> {
    let mut keys = BTreeMap::new();
    if let Ok(toml::Value::Table(sections)) = toml::Value::try_from(Config::default()) {
        for (section, table) in sections {
            let toml::Value::Table(table) = table else { continue };
            for (key, value) in table {
                let kind = match value {
                    toml::Value::Integer(_) => ValueKind::Integer,
                    toml::Value::Float(_) => ValueKind::Number,
                    toml::Value::Boolean(_) => ValueKind::Boolean,
                    toml::Value::Array(_) => ValueKind::List,
                    _ => ValueKind::Text,
                };
                keys.insert((section.clone(), key), kind);
            }
        }
    }
    // Optional keys, absent from the defaults.
    keys.insert(("model".into(), "seed".into()), ValueKind::Integer);
    keys
}

/// Overlay `ELPIS_<SECTION>_<KEY>` and `ELPIS_<SECTION>__<KEY>` variables
/// (names in any case) on the table. Each value is read as its key's type:
/// a text key takes any text, a number key any number spelling. A variable
/// that names no key is a warning; a value that does not fit its key is an
/// error naming the variable.
pub(super) fn apply_env(table: &mut toml::Table, env: &[(String, String)]) -> Result<Vec<String>, ConfigError> {
    let keys = settable_keys();
    let mut warnings = Vec::new();
    for (name, raw) in env {
        let upper = name.to_ascii_uppercase();
        let Some(rest) = upper.strip_prefix("ELPIS_") else { continue };
        if NON_CONFIG_VARS.contains(&upper.as_str()) {
            continue;
        }
        let target = SECTIONS.iter().find_map(|section| {
            let key = rest.strip_prefix(&section.to_ascii_uppercase())?.strip_prefix('_')?;
            let key = key.strip_prefix('_').unwrap_or(key).to_ascii_lowercase();
            (!key.is_empty()).then(|| (section.to_string(), key))
        });
        let kind = target.as_ref().and_then(|t| keys.get(t).copied());
        let (section, key, kind) = match (target, kind) {
            (Some((section, key)), Some(kind)) => (section, key, kind),
            // Old transformers keys are ignored with their own warning, as in the file.
            (Some((section, key)), None) if section == "model" && TRANSFORMERS_KEYS.contains(&key.as_str()) => {
                (section, key, ValueKind::Text)
            }
            _ => {
                warnings.push(format!(
                    "environment variable {name} names no setting and is ignored \
                     (settings are ELPIS_<SECTION>_<KEY>, for example ELPIS_MODEL_PATH)"
                ));
                continue;
            }
        };
        let value = kind.read(raw).map_err(|expected| {
            ConfigError::Invalid(format!("environment variable {name} = {raw:?} does not fit {section}.{key}: {expected}"))
        })?;
        let entry = table.entry(section).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(section_table) = entry {
            section_table.insert(key, value);
        }
    }
    Ok(warnings)
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn env_values_take_their_key_type_and_names_any_case() {
        let e = env(&[
            ("ELPIS_MODEL_PATH", "12345"),
            ("elpis_model_n_threads", " 3 "),
            ("Elpis_Model__Temperature", "1"),
            ("ELPIS_MODEL_CONTEXT_LENGTH", "8e3"),
            ("ELPIS_MODEL_SWA_FULL", "no"),
            ("ELPIS_MODEL_SEED", "1_000"),
            ("ELPIS_LOGGING_LEVEL", "true"),
        ]);
        let (c, warnings) = Config::load_with_env(None, &e).unwrap();
        assert_eq!(c.model.path, "12345");
        assert_eq!(c.model.n_threads, 3);
        assert_eq!(c.model.temperature, 1.0);
        assert_eq!(c.model.context_length, 8000);
        assert!(!c.model.swa_full);
        assert_eq!(c.model.seed, Some(1000));
        assert_eq!(c.logging.level, "true");
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn env_errors_name_the_variable_and_unknown_names_warn() {
        let err = Config::load_with_env(None, &env(&[("ELPIS_MODEL_CONTEXT_LENGTH", "big")])).unwrap_err().to_string();
        assert!(err.contains("ELPIS_MODEL_CONTEXT_LENGTH") && err.contains("whole number"), "{err}");
        assert!(!err.contains("configs/elpis.toml"), "no file was read: {err}");
        let err = Config::load_with_env(None, &env(&[("ELPIS_MODEL_N_THREADS", "2.5")])).unwrap_err().to_string();
        assert!(err.contains("ELPIS_MODEL_N_THREADS"), "{err}");
        let e = env(&[("ELPIS_QUIET", "1"), ("ELPIS_RECORD", "/tmp/x"), ("ELPIS_CACHE_DIR", "/tmp"), ("ELPIS_MODEL_FROBNICATE", "1"), ("ELPIS_NOPE", "x")]);
        let (_, warnings) = Config::load_with_env(None, &e).unwrap();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings.iter().any(|w| w.contains("ELPIS_MODEL_FROBNICATE") && w.contains("names no setting")));
        assert!(warnings.iter().any(|w| w.contains("ELPIS_NOPE")));
        let (_, warnings) = Config::load_with_env(None, &env(&[("ELPIS_MODEL_TORCH_DTYPE", "float16")])).unwrap();
        assert!(warnings[0].contains("model.torch_dtype") && warnings[0].contains("transformers"), "{warnings:?}");
    }
}
