//! `moeval download`: fetches a Hugging Face Hub dataset repository (e.g. CALM, `vipulgupta/CALM`)
//! into a local cache, once. Nothing else in moeval touches the network; evaluation reads local
//! files only. Uses the `curl` program so the binary needs no TLS stack.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

#[derive(clap::Args)]
pub struct Args {
    /// Dataset repository on the Hub, `owner/name`.
    #[arg(long, default_value = "vipulgupta/CALM")]
    dataset: String,
    /// Branch, tag or commit.
    #[arg(long, default_value = "main")]
    revision: String,
    /// Cache folder (default: $MOEVAL_CACHE, else ~/.cache/moeval).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Hub address (for mirrors).
    #[arg(long, default_value = "https://huggingface.co")]
    endpoint: String,
}

fn cache_root(a: &Args) -> Result<PathBuf> {
    if let Some(d) = &a.cache_dir {
        return Ok(d.clone());
    }
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

pub fn run(a: Args) -> Result<()> {
    let parts: Vec<&str> = a.dataset.split('/').collect();
    anyhow::ensure!(
        parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && *p != ".."),
        "--dataset must be owner/name, got `{}`",
        a.dataset
    );
    let dir = cache_root(&a)?
        .join("datasets")
        .join(format!("{}--{}", parts[0], parts[1]))
        .join(&a.revision);
    let listing = dir.join(".listing.json");
    // A complete earlier download is used as is, without the network.
    if listing.is_file() {
        println!("{}", dir.display());
        eprintln!(
            "already downloaded (remove {} to fetch again)",
            dir.display()
        );
        return Ok(());
    }
    let url = format!(
        "{}/api/datasets/{}/tree/{}?recursive=true",
        a.endpoint, a.dataset, a.revision
    );
    let body = curl(&url, None)?;
    let files: Vec<Value> =
        serde_json::from_slice(&body).with_context(|| format!("{url}: not a JSON file listing"))?;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut n = 0;
    for f in files.iter().filter(|f| f["type"] == "file") {
        let Some(rel) = f["path"].as_str() else {
            continue;
        };
        let local = safe_rel(rel).with_context(|| format!("{url}: unsafe path `{rel}`"))?;
        let dest = dir.join(&local);
        let size = f["size"].as_u64();
        if dest.is_file()
            && size.is_some_and(|s| {
                std::fs::metadata(&dest)
                    .map(|m| m.len() == s)
                    .unwrap_or(false)
            })
        {
            continue;
        }
        if let Some(p) = dest.parent() {
            std::fs::create_dir_all(p).with_context(|| format!("cannot create {}", p.display()))?;
        }
        let part = dest.with_extension("part");
        let file_url = format!(
            "{}/datasets/{}/resolve/{}/{rel}",
            a.endpoint, a.dataset, a.revision
        );
        eprintln!("downloading {rel}");
        curl(&file_url, Some(&part))?;
        std::fs::rename(&part, &dest)
            .with_context(|| format!("cannot move {} into place", part.display()))?;
        n += 1;
    }
    reports::fsutil::write_atomic(&listing, &body)?;
    eprintln!("{n} file(s) downloaded into {}", dir.display());
    println!("{}", dir.display());
    Ok(())
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
