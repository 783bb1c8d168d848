//! Names and owners of a checkpoint's experts, from an `experts.toml` sidecar.
//!
//! FlexOlmo checkpoints do not name their experts, so moeval reads a sidecar beside the checkpoint:
//!
//! ```toml
//! [[expert]]
//! index = 0
//! name = "public"
//! owner = "Example Lab"
//! domain = "web"
//! description = "FFN of the public dense model"
//!
//! [[expert]]
//! index = 1
//! name = "math"
//! owner = "Math Owner"
//! router_bias = -0.5   # optional; FlexOlmo's negative bias, applied as min(bias, 0) before the softmax
//! ```
//! Without a sidecar, experts are named `expert-0`, `expert-1`, ... and index 0 is the public expert.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::RouterError;

/// File name of the sidecar beside a checkpoint.
pub const EXPERTS_FILE: &str = "experts.toml";

/// One expert of a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExpertInfo {
    pub index: usize,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Added to this expert's router logit as `min(router_bias, 0)` before the softmax.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_bias: Option<f32>,
}

#[derive(Serialize, Deserialize)]
struct ExpertsFile {
    expert: Vec<ExpertInfo>,
}

/// The experts of one checkpoint, by index.
#[derive(Clone, Debug, PartialEq)]
pub struct Registry {
    experts: Vec<ExpertInfo>,
    source: Option<PathBuf>,
}

impl Registry {
    /// Default names `expert-0` .. `expert-{n-1}`; expert 0 is described as the public expert.
    pub fn unnamed(num_experts: usize) -> Self {
        let experts = (0..num_experts)
            .map(|index| ExpertInfo {
                index,
                name: format!("expert-{index}"),
                owner: None,
                domain: None,
                description: (index == 0).then(|| "public expert".to_string()),
                router_bias: None,
            })
            .collect();
        Self {
            experts,
            source: None,
        }
    }

    /// Reads `experts.toml` from `model_dir` when present, else [`Registry::unnamed`]. The sidecar must
    /// name every expert index `0..num_experts` exactly once, with unique names.
    pub fn load(model_dir: &Path, num_experts: usize) -> Result<Self, RouterError> {
        let path = model_dir.join(EXPERTS_FILE);
        if !path.exists() {
            return Ok(Self::unnamed(num_experts));
        }
        let err = |message: String| RouterError::File {
            path: path.clone(),
            message,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| err(format!("cannot read: {e}")))?;
        let file: ExpertsFile =
            toml::from_str(&text).map_err(|e| err(format!("invalid experts file: {e}")))?;
        let mut experts = file.expert;
        experts.sort_by_key(|e| e.index);
        if experts.len() != num_experts || experts.iter().enumerate().any(|(i, e)| e.index != i) {
            let found: Vec<usize> = experts.iter().map(|e| e.index).collect();
            return Err(err(format!(
                "must describe each expert index 0..{num_experts} exactly once (the model has {num_experts} \
                 experts); found indices {found:?}"
            )));
        }
        for (i, e) in experts.iter().enumerate() {
            if e.name.trim().is_empty() || e.name.contains(',') || e.name.parse::<usize>().is_ok() {
                return Err(err(format!(
                    "expert {i}: name `{}` must be non-empty, without commas, and not a number",
                    e.name
                )));
            }
            if let Some(dup) = experts[..i].iter().find(|o| o.name == e.name) {
                return Err(err(format!(
                    "experts {} and {i} are both named `{}`",
                    dup.index, e.name
                )));
            }
        }
        Ok(Self {
            experts,
            source: Some(path),
        })
    }

    /// Builds a registry from explicit entries (indices must be 0..n in order).
    pub fn from_experts(experts: Vec<ExpertInfo>) -> Result<Self, RouterError> {
        if experts.iter().enumerate().any(|(i, e)| e.index != i) {
            return Err(RouterError::Invalid(
                "expert indices must be 0..n in order".into(),
            ));
        }
        Ok(Self {
            experts,
            source: None,
        })
    }

    /// Writes the registry as an `experts.toml` file.
    pub fn write(&self, path: &Path) -> Result<(), RouterError> {
        let text = toml::to_string_pretty(&ExpertsFile {
            expert: self.experts.clone(),
        })
        .map_err(|e| RouterError::Invalid(format!("cannot serialise experts: {e}")))?;
        std::fs::write(path, text).map_err(|e| RouterError::File {
            path: path.to_path_buf(),
            message: format!("cannot write: {e}"),
        })
    }

    pub fn experts(&self) -> &[ExpertInfo] {
        &self.experts
    }

    pub fn len(&self) -> usize {
        self.experts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.experts.is_empty()
    }

    /// The sidecar this registry was read from, if any.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// Resolves `NAME`, `INDEX` or `expert-INDEX` to an index.
    pub fn resolve(&self, spec: &str) -> Result<usize, RouterError> {
        let spec = spec.trim();
        if let Some(e) = self.experts.iter().find(|e| e.name == spec) {
            return Ok(e.index);
        }
        let index = spec
            .parse::<usize>()
            .ok()
            .or_else(|| spec.strip_prefix("expert-").and_then(|s| s.parse().ok()));
        match index {
            Some(i) if i < self.experts.len() => Ok(i),
            _ => Err(RouterError::UnknownExpert {
                spec: spec.to_string(),
                known: self
                    .experts
                    .iter()
                    .map(|e| format!("{} ({})", e.name, e.index))
                    .collect(),
            }),
        }
    }

    /// Resolves a comma-separated list (or several) of expert names or indices.
    pub fn resolve_list<S: AsRef<str>>(&self, specs: &[S]) -> Result<Vec<usize>, RouterError> {
        let mut out = Vec::new();
        for s in specs {
            for part in s
                .as_ref()
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
            {
                let i = self.resolve(part)?;
                if !out.contains(&i) {
                    out.push(i);
                }
            }
        }
        Ok(out)
    }

    /// Name of expert `index`.
    pub fn name(&self, index: usize) -> &str {
        self.experts.get(index).map_or("?", |e| e.name.as_str())
    }

    /// Router biases per expert as FlexOlmo applies them (`min(bias, 0)`; 0 where none is set).
    pub fn router_biases(&self) -> Vec<f32> {
        self.experts
            .iter()
            .map(|e| e.router_bias.unwrap_or(0.0).min(0.0))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_names_and_indices() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(EXPERTS_FILE),
            "[[expert]]\nindex = 1\nname = \"math\"\nowner = \"M\"\nrouter_bias = -0.5\n\n[[expert]]\nindex = 0\nname = \"public\"\n",
        )
        .unwrap();
        let r = Registry::load(dir.path(), 2).unwrap();
        assert_eq!(r.resolve("math").unwrap(), 1);
        assert_eq!(r.resolve("0").unwrap(), 0);
        assert_eq!(r.resolve("expert-1").unwrap(), 1);
        assert_eq!(
            r.resolve_list(&["math,public", "math"]).unwrap(),
            vec![1, 0]
        );
        assert_eq!(r.router_biases(), vec![0.0, -0.5]);
        let e = r.resolve("news").unwrap_err().to_string();
        assert!(
            e.contains("unknown expert `news`") && e.contains("math (1)"),
            "{e}"
        );
        // Round trip.
        r.write(&dir.path().join("copy.toml")).unwrap();
        std::fs::rename(dir.path().join("copy.toml"), dir.path().join(EXPERTS_FILE)).unwrap();
        assert_eq!(
            Registry::load(dir.path(), 2).unwrap().experts(),
            r.experts()
        );
    }

    #[test]
    fn rejects_incomplete_or_duplicate_sidecars() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(EXPERTS_FILE);
        std::fs::write(&path, "[[expert]]\nindex = 0\nname = \"a\"\n").unwrap();
        let e = Registry::load(dir.path(), 2).unwrap_err().to_string();
        assert!(
            e.contains("experts.toml") && e.contains("exactly once"),
            "{e}"
        );
        std::fs::write(
            &path,
            "[[expert]]\nindex = 0\nname = \"a\"\n[[expert]]\nindex = 1\nname = \"a\"\n",
        )
        .unwrap();
        let e = Registry::load(dir.path(), 2).unwrap_err().to_string();
        assert!(e.contains("both named `a`"), "{e}");
        assert_eq!(
            Registry::load(tempfile::tempdir().unwrap().path(), 3)
                .unwrap()
                .name(2),
            "expert-2"
        );
    }
}
