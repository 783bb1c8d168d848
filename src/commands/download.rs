//! `moeval download`: fetches a Hugging Face Hub dataset repository into a local cache, once
//! (`harness::download`).

use std::path::PathBuf;

use anyhow::Result;

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

pub fn run(a: Args) -> Result<()> {
    let got = harness::download::download(
        &harness::download::DownloadSettings {
            dataset: a.dataset,
            revision: a.revision,
            cache_dir: a.cache_dir,
            endpoint: a.endpoint,
        },
        &mut |rel| eprintln!("downloading {rel}"),
    )?;
    if got.already {
        eprintln!(
            "already downloaded (remove {} to fetch again)",
            got.dir.display()
        );
    } else {
        eprintln!(
            "{} file(s) downloaded into {}",
            got.fetched,
            got.dir.display()
        );
    }
    println!("{}", got.dir.display());
    Ok(())
}
