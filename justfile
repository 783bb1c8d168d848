# moeval tasks. Builds share a target directory outside the checkout so clean clones reuse it.
export CARGO_TARGET_DIR := env_var_or_default("CARGO_TARGET_DIR", env_var("HOME") / ".cache/moeval-target")
moeval := CARGO_TARGET_DIR / "release/moeval"

# List the recipes.
default:
    @just --list

# Run every test (unit, parity against the reference fixtures, end to end).
test:
    cargo test --workspace

# fmt + clippy, as CI runs them.
lint:
    cargo fmt --all --check
    cargo clippy --all-targets -- -D warnings

# Build the release binary.
build:
    cargo build --release

# The main job: evaluate the default model on the default suite.
eval: build
    {{moeval}} generate --model ../shared/fixtures/tiny-flexolmo --prompt "Alice is a doctor. Bob is a nurse. Who is the doctor? Answer:" --max-new-tokens 16

# Engine throughput against Hugging Face transformers on the same model and thread count.
bench threads="2": build
    python3 scripts/bench_compare.py --moeval {{moeval}} --threads {{threads}}
