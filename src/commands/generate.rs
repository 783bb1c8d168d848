use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use engine::generate::{generate, GenParams};

/// `moeval generate`: continue a prompt and print the continuation.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory (config.json, tokenizer.json, safetensors weights).
    #[arg(long)]
    model: PathBuf,
    /// Text to continue.
    #[arg(long)]
    prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 decodes greedily.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling threshold in (0, 1) (only with --temperature > 0).
    #[arg(long)]
    top_p: Option<f64>,
    /// Sampler seed; the same seed gives the same text.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop at this string (repeatable); the output is cut before it.
    #[arg(long)]
    stop: Vec<String>,
    /// Keep going past the model's end-of-text token.
    #[arg(long)]
    ignore_eos: bool,
    #[command(flatten)]
    experts: super::ExpertArgs,
}

pub fn run(a: Args, at: super::Placement) -> Result<()> {
    anyhow::ensure!(a.temperature >= 0.0, "--temperature must be >= 0");
    if let Some(p) = a.top_p {
        anyhow::ensure!(p > 0.0 && p <= 1.0, "--top-p must be in (0, 1]");
    }
    let model = super::load_model_with(&a.model, &a.experts, at)?;
    let tokens = model.require_tokenizer()?.encode(&a.prompt)?;
    anyhow::ensure!(!tokens.is_empty(), "the prompt encodes to no tokens");
    let params = GenParams {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        stop: a.stop,
        stop_at_eos: !a.ignore_eos,
        ..GenParams::default()
    };
    let out = generate(&model, &[(tokens, params)], None)?.remove(0);
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{}", out.text)?;
    eprintln!("[{} tokens, finished: {:?}]", out.tokens.len(), out.finish);
    Ok(())
}
