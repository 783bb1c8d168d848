#!/usr/bin/env bash
# Builds what scripts/device-check.sh needs on a GPU machine without a package registry: the release
# binary, the engine's test binaries and the reference fixtures, into .device/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/moeval-target}"
bundle=.device
rm -rf "$bundle" && mkdir -p "$bundle"
cargo build --release
cp "$CARGO_TARGET_DIR/release/moeval" "$bundle/moeval"
cargo test --release -p engine --no-run --message-format=json 2>/dev/null | python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        name = {("engine", "lib"): "engine-lib-tests", ("cuda", "test"): "cuda-tests"}.get((m["target"]["name"], m["target"]["kind"][0]))
        if name:
            shutil.copy(m["executable"], sys.argv[1] + "/" + name)
' "$bundle"
cp -r "${MOEVAL_FIXTURES:-../shared/fixtures}" "$bundle/fixtures"
ls -la "$bundle"
du -sh "$bundle"
