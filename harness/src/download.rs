//! Downloads from the Hugging Face Hub, only when asked or when a task's dataset is missing:
//!
//! - Datasets named by tasks ([`fetch_task_dataset`], [`finish_load`]; `moeval download --tasks`, and
//!   `moeval eval` when a task's Hub dataset has files missing from the cache): the files the task's
//!   splits resolve to (`tasks::hub`'s resolution over the repository's remote file list) are
//!   fetched with `hf-hub` into the Hugging Face cache (`HF_HUB_CACHE`, the layout huggingface_hub
//!   writes), then the task loads from the cache as it would offline. With `HF_HUB_OFFLINE=1`
//!   nothing here touches the network.
//! - A whole repository into moeval's own cache ([`download`]; `moeval download --dataset`, e.g.
//!   CALM, `vipulgupta/CALM`), with the `curl` program.
//!
//! Invariants: evaluation reads local files only (a download is a separate step before loading);
//! a repository folder with its `.listing.json` is complete (the listing is written last,
//! atomically), and every file reaches its final name whole (hf-hub and this module both write
//! beside the final name and rename).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use hf_hub::api::sync::{Api, ApiBuilder, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use serde_json::Value;
use tasks::hub::{self, DatasetRef, Listing};
use tasks::{LoadOptions, Task, TaskConfig};

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

/// Where Hub datasets come from and go to.
#[derive(Clone, Debug)]
pub struct HubSettings {
    /// Hub address (`HF_ENDPOINT`, else https://huggingface.co).
    pub endpoint: String,
    /// The Hugging Face cache folder ([`hub::cache_root`]).
    pub cache: PathBuf,
    /// `HF_TOKEN`, else the token file huggingface_hub keeps (`HF_TOKEN_PATH`, else `$HF_HOME/token`).
    pub token: Option<String>,
}

impl HubSettings {
    /// The settings huggingface_hub reads from the environment.
    pub fn from_env() -> HubSettings {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let token = var("HF_TOKEN").or_else(|| {
            let path = var("HF_TOKEN_PATH")
                .map(PathBuf::from)
                .unwrap_or_else(|| hub::hf_home().join("token"));
            std::fs::read_to_string(path)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        HubSettings {
            endpoint: var("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into()),
            cache: hub::cache_root(),
            token,
        }
    }

    fn api(&self) -> Result<Api> {
        ApiBuilder::from_cache(Cache::new(self.cache.clone()))
            .with_endpoint(self.endpoint.trim_end_matches('/').to_string())
            .with_token(self.token.clone())
            .with_progress(false)
            .with_retries(2)
            .build()
            .context("cannot set up the Hugging Face Hub client")
    }
}

/// What fetching a task's dataset did.
#[derive(Clone, Debug, Default)]
pub struct Fetched {
    /// `owner/name`.
    pub repo: String,
    /// Files downloaded now, as `revision:path`.
    pub downloaded: Vec<String>,
    /// Files the task needs that were already in the cache.
    pub cached: usize,
    /// Splits the repository cannot give, with the reason (the task fails on them when it reads them).
    pub problems: Vec<(String, String)>,
}

/// The Hub dataset a task reads; `None` for a file format (`json`, …) or a local folder.
pub fn hub_dataset(cfg: &TaskConfig) -> Option<DatasetRef> {
    let d = DatasetRef::of_task(cfg)?;
    let dir = cfg.file.parent().unwrap_or(Path::new("."));
    let local = tasks::dataset::Source::parse(&cfg.dataset_path, &[Path::new("."), dir]).path;
    (!local.is_dir()).then_some(d)
}

/// The remote file list of a revision and its commit.
fn remote_listing(repo: &ApiRepo, id: &str, revision: &str) -> Result<(String, Vec<String>)> {
    let info = repo.info().with_context(|| {
        format!("cannot list dataset `{id}` at revision `{revision}` on the Hugging Face Hub")
    })?;
    Ok((
        info.sha,
        info.siblings.into_iter().map(|s| s.rfilename).collect(),
    ))
}

/// One revision of a repository being fetched: the client for it and the commit it resolved to.
struct Remote<'a> {
    repo: ApiRepo,
    id: &'a str,
    revision: &'a str,
    sha: String,
}

impl Remote<'_> {
    /// Makes `file` of the commit present in the cache under `cache`, downloading it when its
    /// snapshot link is missing.
    fn ensure(
        &self,
        cache: &Path,
        file: &str,
        fetched: &mut Fetched,
        on_file: &mut dyn FnMut(&str, &str),
    ) -> Result<PathBuf> {
        let (id, revision, sha) = (self.id, self.revision, &self.sha);
        let rel =
            safe_rel(file).with_context(|| format!("dataset `{id}`: unsafe path `{file}`"))?;
        let want = hub::repo_folder(cache, id)
            .join("snapshots")
            .join(sha)
            .join(rel);
        if want.is_file() {
            fetched.cached += 1;
            return Ok(want);
        }
        on_file(id, &format!("{revision}:{file}"));
        let got = self.repo.download(file).with_context(|| {
            format!("cannot download `{file}` of dataset `{id}` (revision `{revision}`)")
        })?;
        // hf-hub files a download under the commit the Hub names in its answer.
        ensure!(
            got == want,
            "dataset `{id}`: revision `{revision}` moved to another commit while downloading (`{file}` is at {}, expected commit {sha}); run again",
            got.display()
        );
        fetched.downloaded.push(format!("{revision}:{file}"));
        Ok(want)
    }
}

/// Downloads the files a task's splits read (test, validation, training, few-shot) from its Hub
/// dataset into the Hugging Face cache: the revision's file list is resolved as `tasks::hub`
/// resolves the cache, so what is fetched is what loading reads; splits with no data at `main`
/// come from the Parquet export. `None` when the task reads no Hub dataset. Refuses under
/// `HF_HUB_OFFLINE`. `on_file(repo, revision:path)` hears each file before it is fetched.
pub fn fetch_task_dataset(
    cfg: &TaskConfig,
    s: &HubSettings,
    on_file: &mut dyn FnMut(&str, &str),
) -> Result<Option<Fetched>> {
    let Some(d) = hub_dataset(cfg) else {
        return Ok(None);
    };
    ensure!(
        !hub::offline(),
        "task `{}`: HF_HUB_OFFLINE is set, so dataset `{}` cannot be downloaded",
        cfg.name,
        d.repo
    );
    let api = s.api()?;
    let mut fetched = Fetched {
        repo: d.repo.clone(),
        ..Fetched::default()
    };
    let splits = hub::task_splits(cfg);
    let main_repo = api.repo(Repo::with_revision(
        d.repo.clone(),
        RepoType::Dataset,
        d.revision.clone(),
    ));
    let (sha, files) = remote_listing(&main_repo, &d.repo, &d.revision)?;
    let main = Remote {
        repo: main_repo,
        id: &d.repo,
        revision: &d.revision,
        sha,
    };
    // README.md decides the configurations, so it comes first.
    let readme = match files.iter().any(|f| f == "README.md") {
        true => {
            let p = main.ensure(&s.cache, "README.md", &mut fetched, on_file)?;
            Some(
                std::fs::read_to_string(&p)
                    .with_context(|| format!("cannot read {}", p.display()))?,
            )
        }
        false => None,
    };
    let plan = hub::plan(&Listing::new(files, readme), &d, &splits);
    for f in plan.files.iter().filter(|f| *f != "README.md") {
        main.ensure(&s.cache, f, &mut fetched, on_file)?;
    }
    fetched.problems = plan.problems;
    if !plan.export_splits.is_empty() {
        let export_repo = api.repo(Repo::with_revision(
            d.repo.clone(),
            RepoType::Dataset,
            hub::PARQUET_EXPORT.into(),
        ));
        match remote_listing(&export_repo, &d.repo, hub::PARQUET_EXPORT) {
            Ok((sha, efiles)) => {
                let export = Remote {
                    repo: export_repo,
                    id: &d.repo,
                    revision: hub::PARQUET_EXPORT,
                    sha,
                };
                let (files, problems) = hub::plan_export(
                    &Listing::new(efiles, None),
                    d.config.as_deref(),
                    &plan.export_splits,
                );
                for f in &files {
                    export.ensure(&s.cache, f, &mut fetched, on_file)?;
                }
                fetched.problems.extend(problems);
            }
            Err(e) => fetched.problems.extend(plan.export_splits.iter().map(|sp| {
                (
                    sp.clone(),
                    format!(
                        "no data file at `{}` and no Parquet export ({e:#})",
                        d.revision
                    ),
                )
            })),
        }
    }
    Ok(Some(fetched))
}

/// Completes `attempt`, a `Task::load` of `cfg`: when its Hub dataset had files missing from the
/// cache and `HF_HUB_OFFLINE` is not set, downloads what the task needs ([`fetch_task_dataset`])
/// and loads again. Offline, the missing-file error (`tasks::Error::HubMissing`) is returned as it
/// is.
pub fn finish_load(
    attempt: tasks::Result<Task>,
    cfg: &TaskConfig,
    opts: &LoadOptions,
    s: &HubSettings,
    on_file: &mut dyn FnMut(&str, &str),
) -> Result<Task> {
    match attempt {
        Err(tasks::Error::HubMissing(_)) if !hub::offline() => {
            fetch_task_dataset(cfg, s, on_file)?;
            Ok(Task::load(cfg.clone(), opts)?)
        }
        r => Ok(r?),
    }
}

#[cfg(test)]
mod tests {
    use tasks::hub::{self, DatasetRef, Listing};

    fn arc() -> DatasetRef {
        DatasetRef {
            repo: "allenai/ai2_arc".into(),
            config: Some("ARC-Easy".into()),
            revision: "main".into(),
            data_dir: None,
            data_files: None,
        }
    }

    const ARC_README: &str = "---\nconfigs:\n- config_name: ARC-Challenge\n  data_files:\n  - split: train\n    path: ARC-Challenge/train-*\n  - split: test\n    path: ARC-Challenge/test-*\n- config_name: ARC-Easy\n  data_files:\n  - split: train\n    path: ARC-Easy/train-*\n  - split: test\n    path: ARC-Easy/test-*\n  - split: validation\n    path: ARC-Easy/validation-*\n---\n";

    fn arc_listing() -> Listing {
        let files = [
            ".gitattributes",
            "README.md",
            "ARC-Challenge/test-00000-of-00001.parquet",
            "ARC-Challenge/train-00000-of-00001.parquet",
            "ARC-Easy/test-00000-of-00001.parquet",
            "ARC-Easy/train-00000-of-00002.parquet",
            "ARC-Easy/train-00001-of-00002.parquet",
            "ARC-Easy/validation-00000-of-00001.parquet",
        ];
        Listing::new(
            files.iter().map(|f| f.to_string()).collect(),
            Some(ARC_README.into()),
        )
    }

    #[test]
    fn the_plan_fetches_the_readme_and_the_configs_split_files_only() {
        let splits = vec!["test".to_string(), "train".to_string()];
        let p = hub::plan(&arc_listing(), &arc(), &splits);
        assert_eq!(
            p.files,
            [
                "README.md",
                "ARC-Easy/test-00000-of-00001.parquet",
                "ARC-Easy/train-00000-of-00002.parquet",
                "ARC-Easy/train-00001-of-00002.parquet",
            ]
        );
        assert!(p.export_splits.is_empty() && p.problems.is_empty());
        // A split the configuration lacks is a problem, not a download.
        let mut d = arc();
        d.config = Some("ARC-Challenge".into());
        let p = hub::plan(&arc_listing(), &d, &["validation".to_string()]);
        assert_eq!(p.files, ["README.md"]);
        assert_eq!(p.problems.len(), 1, "{p:?}");
    }

    #[test]
    fn a_repository_without_data_files_plans_the_parquet_export() {
        let l = Listing::new(
            vec!["README.md".into(), "scripted.py".into()],
            Some("# no front matter\n".into()),
        );
        let mut d = arc();
        d.repo = "o/scripted".into();
        d.config = Some("plain".into());
        let splits = vec!["test".to_string(), "train".to_string()];
        let p = hub::plan(&l, &d, &splits);
        assert_eq!(p.files, ["README.md"]);
        assert_eq!(p.export_splits, splits);
        let export = Listing::new(
            vec![
                "plain/test/0000.parquet".into(),
                "plain/test/0001.parquet".into(),
                "plain/partial-train/0000.parquet".into(),
                "other/test/0000.parquet".into(),
            ],
            None,
        );
        let (files, problems) = hub::plan_export(&export, Some("plain"), &splits);
        assert_eq!(
            files,
            [
                "plain/test/0000.parquet",
                "plain/test/0001.parquet",
                "plain/partial-train/0000.parquet",
            ]
        );
        assert!(problems.is_empty());
    }

    #[test]
    fn listing_paths_cannot_escape_the_cache() {
        assert!(super::safe_rel("gt/gt_qa_gender.csv").is_some());
        assert!(super::safe_rel("../etc/passwd").is_none());
        assert!(super::safe_rel("/etc/passwd").is_none());
    }
}
