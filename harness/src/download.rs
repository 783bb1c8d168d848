//! `moeval download`: fetches a Hugging Face Hub dataset repository (e.g. CALM, `vipulgupta/CALM`)
//! into a local cache, once. Nothing else in moeval touches the network; evaluation reads local
//! files only. Uses the `curl` program so the binary needs no TLS stack.
//!
//! Invariant: a repository folder with its `.listing.json` is complete (the listing is written
//! last, atomically), and every file reaches its final name whole (downloaded beside it, renamed).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

/// Which repository, where to, and from which Hub.
#[derive(Clone, Debug)]
pub struct DownloadSettings {
    /// `owner/name`.
    pub dataset: String,
    /// Branch, tag or commit.
    pub revision: String,
    /// Cache folder; [`default_cache`] when not given.
    pub cache_dir: Option<PathBuf>,
    /// Hub address (for mirrors).
    pub endpoint: String,
}

/// What a download did.
#[derive(Clone, Debug)]
pub struct Downloaded {
    /// The repository's local folder.
    pub dir: PathBuf,
    /// Files fetched now (0 when an earlier download was complete).
    pub fetched: usize,
    /// An earlier complete download was used without the network.
    pub already: bool,
}

/// `$MOEVAL_CACHE`, else `~/.cache/moeval`.
pub fn default_cache() -> Result<PathBuf> {
    if let Ok(d) = std::env::var("MOEVAL_CACHE") {
        return Ok(PathBuf::from(d));
    }
    let home = std::env::var("HOME").context("HOME is not set; pass --cache-dir")?;
    Ok(Path::new(&home).join(".cache/moeval"))
}

fn curl(url: &str, out: Option<&Path>) -> Result<Vec<u8>> {
    let mut c = Command::new("curl");
    c.args([
        "--fail",
        "--location",
        "--silent",
        "--show-error",
        "--retry",
        "3",
    ]);
    if let Ok(token) = std::env::var("HF_TOKEN") {
        c.arg("--header")
            .arg(format!("Authorization: Bearer {token}"));
    }
    if let Some(p) = out {
        c.arg("--output").arg(p);
    }
    let o = c
        .arg(url)
        .output()
        .context("cannot run curl (install it, or download the files by hand)")?;
    if !o.status.success() {
        bail!("{url}: {}", String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(o.stdout)
}

/// Checks a repository-relative path from the Hub listing before it becomes a local path.
fn safe_rel(p: &str) -> Option<PathBuf> {
    let path = Path::new(p);
    path.components()
        .all(|c| matches!(c, std::path::Component::Normal(_)))
        .then(|| path.to_path_buf())
}

/// Downloads the repository's files that are missing (or of the wrong size); `on_file` hears each
/// repository path before it is fetched.
pub fn download(s: &DownloadSettings, on_file: &mut dyn FnMut(&str)) -> Result<Downloaded> {
    let parts: Vec<&str> = s.dataset.split('/').collect();
    ensure!(
        parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && *p != ".."),
        "--dataset must be owner/name, got `{}`",
        s.dataset
    );
    let root = match &s.cache_dir {
        Some(d) => d.clone(),
        None => default_cache()?,
    };
    let dir = root
        .join("datasets")
        .join(format!("{}--{}", parts[0], parts[1]))
        .join(&s.revision);
    let listing = dir.join(".listing.json");
    // A complete earlier download is used as is, without the network.
    if listing.is_file() {
        return Ok(Downloaded {
            dir,
            fetched: 0,
            already: true,
        });
    }
    let url = format!(
        "{}/api/datasets/{}/tree/{}?recursive=true",
        s.endpoint, s.dataset, s.revision
    );
    let body = curl(&url, None)?;
    let files: Vec<Value> =
        serde_json::from_slice(&body).with_context(|| format!("{url}: not a JSON file listing"))?;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut fetched = 0;
    for f in files.iter().filter(|f| f["type"] == "file") {
        let Some(rel) = f["path"].as_str() else {
            continue;
        };
        let local = safe_rel(rel).with_context(|| format!("{url}: unsafe path `{rel}`"))?;
        let dest = dir.join(&local);
        let size = f["size"].as_u64();
        if dest.is_file()
            && size.is_some_and(|n| std::fs::metadata(&dest).is_ok_and(|m| m.len() == n))
        {
            continue;
        }
        if let Some(p) = dest.parent() {
            std::fs::create_dir_all(p).with_context(|| format!("cannot create {}", p.display()))?;
        }
        let part = dest.with_extension("part");
        let file_url = format!(
            "{}/datasets/{}/resolve/{}/{rel}",
            s.endpoint, s.dataset, s.revision
        );
        on_file(rel);
        curl(&file_url, Some(&part))?;
        std::fs::rename(&part, &dest)
            .with_context(|| format!("cannot move {} into place", part.display()))?;
        fetched += 1;
    }
    reports::fsutil::write_atomic(&listing, &body)?;
    Ok(Downloaded {
        dir,
        fetched,
        already: false,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn listing_paths_cannot_escape_the_cache() {
        assert!(super::safe_rel("gt/gt_qa_gender.csv").is_some());
        assert!(super::safe_rel("../etc/passwd").is_none());
        assert!(super::safe_rel("/etc/passwd").is_none());
    }
}
