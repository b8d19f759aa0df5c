use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use config::{FileFormat, Map, Source, Value, ValueKind};

use crate::error::ConfigError;
use crate::limits::{MAX_NESTING, check_yaml};
use crate::schema::ClusterConfig;
use crate::substitute::substitute_env;

const ENV_PREFIX: &str = "CLAUDECLUSTER_";
const ENV_SEPARATOR: &str = "__";

/// What a configuration file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileLayout {
    /// `driver:`, `scheduler:` and `worker:` sections, as `claudecluster up` reads.
    Cluster,
    /// One service's keys at the top level, as in the seed's `config/worker.yaml`.
    Section(&'static str),
}

/// Loads defaults, then `file`, then `CLAUDECLUSTER_*` variables from `env`, and validates.
pub fn load(
    file: Option<&Path>,
    layout: FileLayout,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<ClusterConfig, ConfigError> {
    let env: BTreeMap<String, String> = env.into_iter().collect();
    let file_layer = match file {
        Some(path) => read_file(path, layout, &env)?,
        None => Map::new(),
    };
    let overrides = env_overrides(&env)?;
    let origins = Origins {
        file: file.map(Path::to_path_buf),
        layout,
        env_keys: overrides
            .iter()
            .map(|set| (set.key(), set.var.clone()))
            .collect(),
    };
    // The layers are merged here rather than by config's `ConfigBuilder`, which reads each
    // top-level key as a path expression: there `a[100000000]` makes a list of that many
    // values, gigabytes from a 16-byte file or one environment variable (and
    // `a[-9223372036854775808]` overflows). Keys are taken as written.
    let mut merged = Value::new(None, ValueKind::Table(file_layer));
    for set in overrides {
        let value = Value::new(Some(&set.var), ValueKind::String(set.value));
        set_path(&mut merged, &set.path, value);
    }
    let config: ClusterConfig = serde_path_to_error::deserialize(merged).map_err(|err| {
        let key = err.path().to_string();
        origins.invalid(&key, strip_key_suffix(&err.into_inner().to_string()))
    })?;
    if let Some(violation) = config.violations().into_iter().next() {
        return Err(origins.invalid(violation.key, violation.message));
    }
    Ok(config)
}

/// The section of the process rather than of one service.
const TELEMETRY_SECTION: &str = "telemetry";

fn read_file(
    path: &Path,
    layout: FileLayout,
    env: &BTreeMap<String, String>,
) -> Result<Map<String, Value>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let syntax = |message: String| ConfigError::Syntax {
        path: path.to_path_buf(),
        message,
    };
    let text = substitute_env(&text, |name| env.get(name).cloned()).map_err(syntax)?;
    check_yaml(&text).map_err(syntax)?;
    let values = config::File::from_str(&text, FileFormat::Yaml)
        .collect()
        .map_err(|err| syntax(err.to_string()))?;
    let values = without_nulls(values);
    Ok(match layout {
        FileLayout::Cluster => values,
        FileLayout::Section(section) => {
            let origin = path.display().to_string();
            // A service's own file may also hold the process's `telemetry` section.
            let mut values = values;
            let telemetry = values.remove(TELEMETRY_SECTION);
            let mut root = Map::from([(
                section.to_owned(),
                Value::new(Some(&origin), ValueKind::Table(values)),
            )]);
            if let Some(telemetry) = telemetry {
                root.insert(TELEMETRY_SECTION.to_owned(), telemetry);
            }
            root
        }
    })
}

/// A key written with nothing after it (`processPool:` followed only by a comment, as in the
/// seed's dual-mode example) means "the defaults", not "null".
fn without_nulls(values: Map<String, Value>) -> Map<String, Value> {
    values
        .into_iter()
        .filter_map(|(key, value)| {
            let origin = value.origin().map(str::to_owned);
            match value.kind {
                ValueKind::Nil => None,
                ValueKind::Table(table) => Some((
                    key,
                    Value::new(origin.as_ref(), ValueKind::Table(without_nulls(table))),
                )),
                kind => Some((key, Value::new(origin.as_ref(), kind))),
            }
        })
        .collect()
}

/// A `CLAUDECLUSTER_*` variable that sets a key.
struct EnvOverride {
    var: String,
    /// The key from the root, one name a level: `["worker", "processPool", "maxProcesses"]`.
    path: Vec<String>,
    value: String,
}

impl EnvOverride {
    fn key(&self) -> String {
        self.path.join(".")
    }
}

/// `CLAUDECLUSTER_WORKER__PROCESS_POOL__MAX_PROCESSES` sets `worker.processPool.maxProcesses`.
/// Variables without `__` (such as `CLAUDECLUSTER_CACHE_DIR`) are not configuration.
fn env_overrides(env: &BTreeMap<String, String>) -> Result<Vec<EnvOverride>, ConfigError> {
    env.iter()
        .filter_map(|(var, value)| {
            let rest = var.strip_prefix(ENV_PREFIX)?;
            if !rest.contains(ENV_SEPARATOR) {
                return None;
            }
            let set = EnvOverride {
                var: var.clone(),
                path: rest.split(ENV_SEPARATOR).map(camel_case).collect(),
                value: value.clone(),
            };
            // Loading recurses once a level; a name of thousands of `__` must not overflow
            // the stack.
            if set.path.len() > MAX_NESTING {
                return Some(Err(ConfigError::Invalid {
                    key: set.key(),
                    origin: format!("environment variable {var}"),
                    message: format!("nested more than {MAX_NESTING} levels deep"),
                }));
            }
            Some(Ok(set))
        })
        .collect()
}

/// Sets `value` at `path` under `root`, making the tables on the way (and replacing what on
/// the way is not a table), so that a variable replaces only the key it names.
fn set_path(root: &mut Value, path: &[String], value: Value) {
    let mut node = root;
    for key in path {
        if !matches!(node.kind, ValueKind::Table(_)) {
            *node = Value::new(None, ValueKind::Table(Map::new()));
        }
        let ValueKind::Table(table) = &mut node.kind else {
            unreachable!("made a table just above")
        };
        node = table
            .entry(key.clone())
            .or_insert_with(|| Value::new(None, ValueKind::Nil));
    }
    *node = value;
}

fn camel_case(snake: &str) -> String {
    let mut out = String::with_capacity(snake.len());
    for (index, word) in snake.split('_').filter(|w| !w.is_empty()).enumerate() {
        let word = word.to_ascii_lowercase();
        if index == 0 {
            out.push_str(&word);
        } else {
            let mut chars = word.chars();
            if let Some(first) = chars.next() {
                out.push(first.to_ascii_uppercase());
                out.extend(chars);
            }
        }
    }
    out
}

/// config's messages end with " for key `...`"; the key is reported separately.
fn strip_key_suffix(message: &str) -> String {
    match message.find(" for key `") {
        Some(index) => message[..index].to_owned(),
        None => message.to_owned(),
    }
}

struct Origins {
    file: Option<PathBuf>,
    layout: FileLayout,
    env_keys: BTreeMap<String, String>,
}

impl Origins {
    fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        let message = message.into();
        // The longest key set by the environment that the failing key lies in.
        let env_var = self
            .env_keys
            .iter()
            .filter(|(env_key, _)| {
                key == env_key.as_str()
                    || key.starts_with(&format!("{env_key}."))
                    || env_key.starts_with(&format!("{key}."))
            })
            .map(|(_, var)| var.clone())
            .next();
        if let Some(var) = env_var {
            return ConfigError::Invalid {
                key: key.to_owned(),
                origin: format!("environment variable {var}"),
                message,
            };
        }
        match (&self.file, self.layout) {
            (Some(path), FileLayout::Section(section)) => ConfigError::Invalid {
                key: key
                    .strip_prefix(section)
                    .and_then(|rest| rest.strip_prefix('.'))
                    .unwrap_or(key)
                    .to_owned(),
                origin: format!("file {}", path.display()),
                message,
            },
            (Some(path), FileLayout::Cluster) => ConfigError::Invalid {
                key: key.to_owned(),
                origin: format!("file {}", path.display()),
                message,
            },
            (None, _) => ConfigError::Invalid {
                key: key.to_owned(),
                origin: "built-in defaults".to_owned(),
                message,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_become_camel_case_keys() {
        let env = BTreeMap::from([
            (
                "CLAUDECLUSTER_WORKER__PROCESS_POOL__MAX_PROCESSES".to_owned(),
                "7".to_owned(),
            ),
            ("CLAUDECLUSTER_CACHE_DIR".to_owned(), "/x".to_owned()),
            ("HOME".to_owned(), "/root".to_owned()),
        ]);
        let keys: Vec<_> = env_overrides(&env)
            .unwrap()
            .iter()
            .map(EnvOverride::key)
            .collect();
        assert_eq!(keys, vec!["worker.processPool.maxProcesses"]);
    }
}
