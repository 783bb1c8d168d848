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

# Results of `just eval` (runs, request cache, report). Override: `just results=DIR eval`.
results := "results"

# The main job, offline: the default model (tiny random FlexOlmo, seed 0, shipped tokenizer), the
# default suite (CALM-format bias, perplexity) with a leave-one-out opt-out sweep, the real CALM
# log-likelihood tasks when ../shared/datasets/calm exists, then the report.
eval calm_limit="600": build
    #!/usr/bin/env bash
    set -euo pipefail
    out="{{results}}"
    model="$out/default-model"
    if [ ! -f "$model/model.safetensors" ]; then
        {{moeval}} init-model --preset tiny --seed 0 --out "$model"
    fi
    cp assets/tokenizer.json "$model/tokenizer.json"
    # Runs have fixed ids so the gate finds them; the request cache in $out/runs/cache is kept.
    rm -rf "$out/runs/default" "$out/runs/calm"
    {{moeval}} eval --model "$model" --tasks default --include-path assets/suite         --opt-out-sweep leave-one-out --output "$out/runs" --run-id default > "$out/default.txt"
    echo "default suite: $out/default.txt"
    if [ -d ../shared/datasets/calm ]; then
        {{moeval}} eval --model "$model" --tasks calm_ll --data-dir ../shared/datasets/calm             --limit {{calm_limit}} --output "$out/runs" --run-id calm > "$out/calm.txt"
        echo "CALM (log-likelihood tasks, first {{calm_limit}} documents each): $out/calm.txt"
    else
        echo "../shared/datasets/calm not found: skipping the real CALM tasks"
    fi
    {{moeval}} report --runs "$out/runs" --out "$out/report" --title "moeval: default suite" > /dev/null
    echo "HTML report: $(cd "$out/report" && pwd)/index.html"

# Report of any run folders: `just report results/runs other/runs`.
report +runs: build
    {{moeval}} report --runs {{runs}} --out {{results}}/report

# The regression gate on the default suite (after `just eval`); `just gate --update` rewrites the baseline.
gate *args: build
    {{moeval}} gate --baseline assets/eval-baseline.json --runs {{results}}/runs/default {{args}}

# Engine throughput against Hugging Face transformers on the same model and thread count.
bench threads="2": build
    python3 scripts/bench_compare.py --moeval {{moeval}} --threads {{threads}}
