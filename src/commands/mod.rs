//! One module per subcommand.

pub mod bench;
pub mod forward;
pub mod generate;
pub mod init_model;

use std::path::Path;

use anyhow::{Context, Result};
use engine::{LoadOptions, Model};

/// Parses `--opt-out 2,3` (expert indices, or names of the form `expert-N`).
pub fn parse_opt_out(list: &[String]) -> Result<Vec<usize>> {
    list.iter()
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.strip_prefix("expert-")
                .unwrap_or(s)
                .parse::<usize>()
                .with_context(|| {
                    format!("--opt-out `{s}`: expected an expert index such as 2 or expert-2")
                })
        })
        .collect()
}

/// Loads a model directory, with a message that says which directory failed.
pub fn load_model(dir: &Path, opt_out: &[String]) -> Result<Model> {
    let opts = LoadOptions {
        opt_out: parse_opt_out(opt_out)?,
    };
    Model::load(dir, &opts).with_context(|| format!("cannot load the model in {}", dir.display()))
}

/// Writes `bytes` to `path` through a temporary file and a rename, so readers never see a partial file.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    write(&tmp)?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} into place", tmp.display()))
}
