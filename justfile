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
    cargo clippy --workspace --all-targets -- -D warnings

# Build the release binary.
build:
    cargo build --release

# Results of `just eval` (runs, request cache, report). Override: `just results=DIR eval`.
results := "results"

# The shipped trained model (assets/default-model) on the trained suite (capabilities, planted bias,
# per-domain perplexity) with a leave-one-out opt-out sweep, a kNN-LM datastore of held-out news
# documents with the news expert opted out (then the news owner opted out of the datastore), the real
# CALM log-likelihood tasks when ../shared/datasets/calm exists, the ground-truth table
# (results/trained/table.md, pasted in the README) and the HTML report.
# The main job, offline: trained model, suite, opt-out sweep, retrieval, CALM, ground-truth table, report.
eval calm_limit="600": build
    #!/usr/bin/env bash
    set -euo pipefail
    out="{{results}}"
    model=assets/default-model
    # The trained runs start from an empty request cache so that routing statistics are measured afresh
    # (answers taken from the cache route nothing); the CALM runs keep theirs in $out/runs/cache.
    rm -rf "$out/trained" "$out/stores" "$out/runs/calm"
    mkdir -p "$out/trained"
    {{moeval}} eval --model "$model" --tasks trained --include-path assets/suite \
        --opt-out-sweep leave-one-out --output "$out/trained" --run-id default > "$out/default.txt"
    echo "trained suite: $out/default.txt"
    # Each domain with the public expert and its owner's alone (public text: the public expert alone),
    # what the merge is measured against.
    for owner in public math code news reviews; do
        experts=public
        if [ "$owner" != public ]; then experts="public,$owner"; fi
        {{moeval}} eval --model "$model" --experts "$experts" --tasks "trained_ppl_$owner" \
            --include-path assets/suite --output "$out/trained" --run-id "own-$owner" > /dev/null
    done
    store="$out/stores/news"
    {{moeval}} datastore build --input assets/suite/data/trained/datastore.jsonl --tokenizer "$model" \
        --out "$store" --block 128 --stride 64 --knn --model "$model" > /dev/null
    {{moeval}} eval --model "$model" --opt-out news --tasks trained_ppl_news --include-path assets/suite \
        --retrieval knn --datastore "$store" --output "$out/trained" --run-id knn-news > /dev/null
    cp -r "$store" "$store-optout"
    {{moeval}} datastore opt-out "$store-optout" --owner news --reason "news owner left the datastore" > /dev/null
    {{moeval}} eval --model "$model" --opt-out news --tasks trained_ppl_news --include-path assets/suite \
        --retrieval knn --datastore "$store-optout" --output "$out/trained" --run-id knn-news-optout > /dev/null
    {{moeval}} train report --runs "$out/trained" --out "$out/trained/table.md"
    if [ -d ../shared/datasets/calm ]; then
        {{moeval}} eval --model "$model" --tasks calm_ll --data-dir ../shared/datasets/calm \
            --limit {{calm_limit}} --output "$out/runs" --run-id calm > "$out/calm.txt"
        echo "CALM (log-likelihood tasks, first {{calm_limit}} documents each): $out/calm.txt"
    else
        echo "../shared/datasets/calm not found: skipping the real CALM tasks"
    fi
    runs=("$out/trained")
    if [ -d "$out/runs/calm" ]; then runs+=("$out/runs"); fi
    {{moeval}} report --runs "${runs[@]}" --out "$out/report" --title "moeval: trained default model" > /dev/null
    echo "ground-truth table: $out/trained/table.md"
    echo "HTML report: $(cd "$out/report" && pwd)/index.html"

# Generates the domains, the tokenizer and the suite's data; trains the public model; trains each
# owner's expert on its own data only; merges them; tunes the routers on the samples the owners
# released for their router embeddings. Writes assets/default-model and
# assets/suite/data/trained.
# Reproduce the shipped default model from scratch on 2 threads (deterministic for the seed).
train-default seed="0": build
    #!/usr/bin/env bash
    set -euo pipefail
    work="{{results}}/train-default"
    rm -rf "$work"
    m="{{moeval}} --threads 2"
    data="$work/data"
    $m train data --seed {{seed}} --out "$data" --tasks-out assets/suite/data/trained
    $m train public --data "$data/public/train.jsonl" --valid "$data/public/valid.jsonl" \
        --tokenizer "$data/tokenizer.json" --steps 1200 --seed {{seed}} --out "$work/public"
    experts=()
    for owner in math code news reviews; do
        $m train expert --public "$work/public" --data "$data/$owner/train.jsonl" \
            --valid "$data/$owner/valid.jsonl" --router-samples "$data/$owner/valid.jsonl" \
            --public-samples "$data/public/valid.jsonl" --public-data "$data/public/train.jsonl" \
            --steps 1000 --seed {{seed}} --out "$work/$owner"
        experts+=(--expert "$owner=$work/$owner")
    done
    $m merge --public "$work/public" "${experts[@]}" --router from-experts --out "$work/merged"
    proxies=(--proxy "$data/public/valid.jsonl")
    for owner in math code news reviews; do proxies+=(--proxy "$data/$owner/valid.jsonl"); done
    $m train router --model "$work/merged" "${proxies[@]}" --steps 1000 --batch 40 --lr 1e-2 \
        --seed {{seed}} --out "$work/tuned"
    rm -rf assets/default-model
    cp -r "$work/tuned" assets/default-model
    echo "trained in $SECONDS s"
    sha256sum assets/default-model/*.safetensors

# Report of any run folders: `just report results/runs other/runs`.
report +runs: build
    {{moeval}} report --runs {{runs}} --out {{results}}/report

# The regression gate on the trained suite (after `just eval`); `just gate --update` rewrites the baseline.
gate *args: build
    {{moeval}} gate --baseline assets/eval-baseline.json --runs {{results}}/trained/default {{args}}

# Engine throughput against Hugging Face transformers on the same model and thread count.
bench threads="2": build
    python3 scripts/bench_compare.py --moeval {{moeval}} --threads {{threads}}
    python3 scripts/bench_compare.py --moeval {{moeval}} --threads {{threads}} --bf16
