//! A task's `suite` mapping, read with errors that name the file, the task and the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::config::TaskConfig;
use crate::dataset::Source;
use crate::error::{Error, Result};

/// The `suite` mapping of a task, with errors that name the file and the task.
pub(crate) struct Spec<'a> {
    pub cfg: &'a TaskConfig,
    map: &'a Map<String, Value>,
}

impl<'a> Spec<'a> {
    pub(crate) fn new(cfg: &'a TaskConfig) -> Option<Spec<'a>> {
        cfg.suite.as_ref().map(|map| Spec { cfg, map })
    }

    pub(crate) fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::Config {
            file: self.cfg.file.clone(),
            msg: format!("task `{}`: {msg}", self.cfg.name),
        }
    }

    pub(crate) fn kind(&self) -> Result<&str> {
        self.map.get("kind").and_then(Value::as_str).ok_or_else(|| {
            self.err("suite.kind is required (sni, pairwise, pointwise, classification or cobbler)")
        })
    }

    /// Unknown keys are errors, so typos in a suite do not pass silently.
    pub(crate) fn allow(&self, keys: &[&str]) -> Result<()> {
        match self
            .map
            .keys()
            .find(|k| k.as_str() != "kind" && !keys.contains(&k.as_str()))
        {
            Some(k) => Err(self.err(format!(
                "unknown key suite.{k} for kind `{}` (known: {})",
                self.kind()?,
                keys.join(", ")
            ))),
            None => Ok(()),
        }
    }

    /// Whether the key is given (and not null).
    pub(crate) fn has(&self, key: &str) -> bool {
        !matches!(self.map.get(key), None | Some(Value::Null))
    }

    pub(crate) fn str(&self, key: &str) -> Result<Option<String>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(self.err(format!("suite.{key} must be a string"))),
        }
    }

    pub(crate) fn str_or(&self, key: &str, default: &str) -> Result<String> {
        Ok(self.str(key)?.unwrap_or_else(|| default.to_string()))
    }

    pub(crate) fn required(&self, key: &str) -> Result<String> {
        self.str(key)?
            .ok_or_else(|| self.err(format!("suite.{key} is required")))
    }

    pub(crate) fn uint(&self, key: &str, default: u64) -> Result<u64> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_u64()
                .ok_or_else(|| self.err(format!("suite.{key} must be a non-negative integer"))),
        }
    }

    pub(crate) fn list(&self, key: &str) -> Result<Option<Vec<String>>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    Value::Number(n) => Ok(n.to_string()),
                    _ => Err(self.err(format!("suite.{key} must be a list of strings"))),
                })
                .collect::<Result<_>>()
                .map(Some),
            Some(_) => Err(self.err(format!("suite.{key} must be a list"))),
        }
    }

    pub(crate) fn string_map(&self, key: &str) -> Result<BTreeMap<String, String>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(BTreeMap::new()),
            Some(Value::Object(o)) => o
                .iter()
                .map(|(k, v)| match v.as_str() {
                    Some(s) => Ok((k.clone(), s.to_string())),
                    None => Err(self.err(format!("suite.{key}.{k} must be a string"))),
                })
                .collect(),
            Some(_) => Err(self.err(format!("suite.{key} must be a mapping"))),
        }
    }

    /// A path option: `{data_dir}` is filled, relative paths are tried against `bases`.
    pub(crate) fn path(&self, key: &str, bases: &[&Path], data_dir: &Path) -> Result<PathBuf> {
        let raw = self
            .required(key)?
            .replace("{data_dir}", &data_dir.to_string_lossy());
        Ok(Source::parse(&raw, bases).path)
    }
}
