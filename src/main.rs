//! `moeval`: evaluate and serve Mixture-of-Experts language models with exact expert opt-out.

mod commands;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "moeval", version, about, long_about = None)]
#[command(after_help = "Examples:
  moeval eval --model ./my-flexolmo --tasks calm_ll --output runs/ --opt-out-sweep leave-one-out
  moeval report --runs runs/ --out report/
  moeval experts list --model ./my-flexolmo
  moeval forward --model ./my-flexolmo --prompt 'Hello' --out logits.safetensors
  moeval generate --model ./my-flexolmo --prompt 'Once upon a time' --max-new-tokens 32
  moeval train data --seed 0 --out data/   (then `train public`, `train expert`, `merge`)
  moeval init-model --preset small --seed 0 --out ./small-random
  moeval bench --preset small --threads 2 --json
  moeval --device cuda bench --preset olmoe-1b-7b --decode-batches 1,16,64 --json")]
struct Cli {
    /// Worker threads for tensor math (default: all cores). Same as RAYON_NUM_THREADS.
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Where models run: `cpu` (f32, the default) or `cuda` / `cuda:N` (an NVIDIA GPU: bf16 weights and
    /// activations, f32 accumulation; needs the NVIDIA driver and cuBLAS, loaded at run time).
    #[arg(long, global = true, default_value = "cpu", value_name = "DEVICE")]
    device: String,
    /// How the CPU holds a model's projection weights: `checkpoint` (as stored: a bf16 checkpoint
    /// stays bf16, half the memory of f32, with exactly f32's numbers, since every product is
    /// computed in f32), `f32` (upcast at load) or `bf16` (round wider weights to bf16: less memory,
    /// different numbers, recorded in results as dtype `bf16-weights`).
    #[arg(
        long,
        global = true,
        default_value = "checkpoint",
        value_name = "DTYPE"
    )]
    dtype: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run evaluation tasks (lm-evaluation-harness YAML or built-in suites) and write Parquet results.
    Eval(commands::eval::Args),
    /// Leaderboard (Parquet, Markdown), self-contained HTML report and Hive dataset from runs; merges shards.
    Report(commands::report::Args),
    /// Paired comparison of two runs (or masks) on shared samples: bootstrap CI, McNemar p-value.
    Compare(commands::compare::Args),
    /// Fail when metrics dropped beyond their allowance against a committed baseline.
    Gate(commands::gate::Args),
    /// Experts: list them, record owners' opt-out / opt-in, routing statistics.
    Experts(commands::experts::Args),
    /// Assemble a FlexOlmo model from experts trained separately on the same public model.
    Merge(commands::merge::Args),
    /// Run one prompt through a model and save input ids, logits and router logits (parity and inspection).
    Forward(commands::forward::Args),
    /// Continue a prompt with greedy decoding or seeded sampling.
    Generate(commands::generate::Args),
    /// SILO-style datastores: build (BM25 blocks, kNN-LM keys), stats, query, opt-out, bench.
    Datastore(commands::datastore::Args),
    /// Serve the model over an OpenAI-compatible HTTP API with per-request expert opt-out.
    Serve(commands::serve::Args),
    /// Load-test the server over loopback: requests/s, tokens/s and latency at several concurrencies.
    ServeBench(commands::serve::BenchArgs),
    /// Train on the CPU with FlexOlmo's recipe: synthetic data, a public model, owners' experts.
    Train(commands::train::Args),
    /// Write a seeded random-weight checkpoint of a named shape (for benchmarks and examples).
    InitModel(commands::init_model::Args),
    /// Measure prefill and decode throughput and peak memory.
    Bench(commands::bench::Args),
    /// Download a Hugging Face Hub dataset into a local cache (only when asked).
    Download(commands::download::Args),
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        anyhow::ensure!(n > 0, "--threads must be at least 1");
        // The tensor library reads this variable for its matmul threads; rayon's pool is sized to match.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()?;
    }
    let device = commands::Placement {
        device: cli.device.parse()?,
        dtype: engine::WeightDtype::parse(&cli.dtype)?,
    };
    match cli.command {
        Command::Forward(a) => commands::forward::run(a, device),
        Command::Experts(a) => commands::experts::run(a, device),
        Command::Merge(a) => commands::merge::run(a),
        Command::Generate(a) => commands::generate::run(a, device),
        Command::InitModel(a) => commands::init_model::run(a),
        Command::Train(a) => commands::train::run(a),
        Command::Bench(a) => commands::bench::run(a, cli.threads, device),
        Command::Eval(a) => commands::eval::run(a, device),
        Command::Datastore(a) => commands::datastore::run(a, device),
        Command::Report(a) => commands::report::run(a),
        Command::Compare(a) => commands::compare::run(a),
        Command::Gate(a) => commands::gate::run(a),
        Command::Download(a) => commands::download::run(a),
        Command::Serve(a) => commands::serve::run(a, device),
        Command::ServeBench(a) => commands::serve::run_bench(a, device),
    }
}
