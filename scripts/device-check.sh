#!/usr/bin/env bash
# One-shot verification of the CUDA backend on a GPU machine: the kernel tests (each kernel against a
# CPU reference), the model tests (every fixture's logits within bf16 tolerance of the CPU engine and of
# Hugging Face, greedy generation, opt-out = physical removal, per-sequence masks, scoring, routing), the
# copy bandwidth, and `moeval --device cuda bench` side by side with transformers on the same shapes.
# Writes everything, and a summary report.json, to $OUT (or target/device-check). SKIP_BASELINE=1 leaves
# out transformers; the profile run (MOEVAL_CUDA_PROFILE=1) shows where the GPU time goes.
#
# The GPU machine has no package registry, so build on a CPU machine first:
#   scripts/device-bundle.sh          # release binary + test binaries + fixtures into .device/
# then run this from the repository root on the GPU machine:
#   scripts/device-check.sh .device
set -uo pipefail
bundle="${1:-.device}"
out="${OUT:-target/device-check}"
mkdir -p "$out"
# cuBLAS and NVRTC: from the CUDA toolkit, or from the nvidia-* wheels torch ships with.
libs=$(python3 -c "import glob,site,os; print(':'.join(sorted({os.path.dirname(p) for d in site.getsitepackages() for p in glob.glob(d+'/nvidia/**/lib*.so*', recursive=True)})))" 2>/dev/null)
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${libs}:${LD_LIBRARY_PATH:-}"
export MOEVAL_FIXTURES="$bundle/fixtures"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1
echo "GPU: $(cat "$out/gpu.txt")"

"$bundle/engine-lib-tests" cuda:: --include-ignored --test-threads 1 --nocapture > "$out/kernel-tests.log" 2>&1
echo "kernel tests rc=$?: $(grep -E '^test result' "$out/kernel-tests.log")"
"$bundle/cuda-tests" --include-ignored --test-threads 1 --nocapture > "$out/model-tests.log" 2>&1
echo "model tests rc=$?: $(grep -E '^test result' "$out/model-tests.log")"
grep -E "panicked|FAILED|failed" "$out/kernel-tests.log" "$out/model-tests.log" | head -20

python3 - > "$out/bandwidth.json" <<'PY'
import json, time, torch
x = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(20): y.copy_(x)
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 20
print(json.dumps({"copy_bytes_read_plus_written_per_s": 2 * x.numel() * 2 / dt}))
PY
echo "bandwidth: $(cat "$out/bandwidth.json")"

for preset in small olmoe-1b-7b; do
  args=(--batch 8 --prefill-len 512 --prompt-len 128 --decode-steps 16 --decode-batches 1,16,64 --repeats 3)
  timeout 200 "$bundle/moeval" --device cuda bench --preset "$preset" "${args[@]}" --json > "$out/moeval-$preset.json" 2> "$out/moeval-$preset.err"
  echo "moeval $preset rc=$?: $(tail -c 600 "$out/moeval-$preset.json") $(tail -3 "$out/moeval-$preset.err")"
  [ -n "${SKIP_BASELINE:-}" ] && continue
  timeout 200 python3 scripts/hf_bench_gpu.py --preset "$preset" --batch 8 --prefill-len 512 --prompt-len 128 --decode-steps 16 --decode-batches 1,16,64 --repeats 3 > "$out/hf-$preset.json" 2> "$out/hf-$preset.err"
  echo "transformers $preset rc=$?: $(tail -c 600 "$out/hf-$preset.json") $(tail -3 "$out/hf-$preset.err")"
done
# Where the GPU time goes (each operation timed between synchronisations: slower, so a separate run).
MOEVAL_CUDA_PROFILE=1 timeout 150 "$bundle/moeval" --device cuda bench --preset olmoe-1b-7b --batch 8 \
  --prefill-len 512 --prompt-len 128 --decode-steps 8 --decode-batches 1,16,64 --repeats 1 --json \
  > /dev/null 2> "$out/profile-olmoe.txt"
cat "$out/profile-olmoe.txt"
python3 scripts/device_report.py "$out" > "$out/report.json"
cat "$out/report.json"
