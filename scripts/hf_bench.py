#!/usr/bin/env python3
"""Baseline CPU benchmark of Hugging Face transformers' FlexOlmoForCausalLM.

Gives reference numbers to compare the Rust engine against, measured the same
way: f32 on CPU with a fixed thread count, random token ids, one JSON line on
stdout (progress goes to stderr).

  prefill_tok_s              batch 8 x 256 tokens, one forward with a KV cache and
                             only the last position's logits (what generation does)
  prefill_full_logits_tok_s  a plain forward (no cache) with logits for every position
  decode_tok_s               batch 8, 128-token prompt (untimed), then 32 greedy
                             steps one token at a time through the KV cache
  peak_rss_mb                peak resident memory of the process (ru_maxrss)

Each figure is the median of --repeats runs after one warm-up run.

Setup (from the repository root):
  python3 -m venv .venv && .venv/bin/pip install torch transformers safetensors
  .venv/bin/python scripts/hf_bench.py [--model DIR] [--threads 2]
"""
import argparse
import inspect
import json
import resource
import statistics
import sys
import time


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def parse_args():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", metavar="DIR",
                   help="checkpoint directory (config.json + *.safetensors, Hugging Face "
                        "layout, e.g. from `moeval init-model --preset small --seed 0 --out DIR`); "
                        "without it a random 'small' preset model is built in memory")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the median is reported (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights and token ids (default 0)")
    p.add_argument("--dtype", choices=["f32", "bf16"], default="f32",
                   help="compute dtype: f32 (the engine's numbers) or bf16 (transformers' own "
                        "low-memory path; different numbers)")
    p.add_argument("--batch", type=int, default=8, help="sequences per prefill and decode batch (default 8)")
    p.add_argument("--prefill-len", type=int, default=256, help="prefill tokens per sequence (default 256)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt before decoding (default 128)")
    p.add_argument("--decode-steps", type=int, default=32, help="timed decode steps (default 32)")
    p.add_argument("--skip-full-logits", action="store_true",
                   help="skip the all-positions prefill (for large models: its logits alone are big)")
    p.add_argument("--experts-impl", default=None, metavar="NAME",
                   help="transformers' MoE expert kernel: eager or grouped_mm (default: the "
                        "library's choice, grouped_mm in transformers 5.x); batched_mm copies "
                        "expert weights per token and runs out of memory on the 8x256 prefill")
    return p.parse_args()


def small_preset_config(FlexOlmoConfig):
    # Mirrors moeval's "small" preset. pad/eos are unset: the library defaults
    # (100277/100257) lie outside this vocabulary and would break nn.Embedding.
    return FlexOlmoConfig(
        vocab_size=50304, hidden_size=512, intermediate_size=1024,
        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        max_position_embeddings=4096, tie_word_embeddings=False,
        pad_token_id=None, bos_token_id=None, eos_token_id=None,
    )


def median_time(fn, repeats):
    fn()  # warm-up: first calls pay for allocator growth and kernel selection
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    args = parse_args()
    try:
        import torch
        import transformers
        from transformers import FlexOlmoConfig, FlexOlmoForCausalLM
    except ImportError as e:
        sys.exit(f"hf_bench: {e}\nInstall the dependencies first (from the repository root):\n"
                 "  python3 -m venv .venv && .venv/bin/pip install torch transformers safetensors\n"
                 "then run it with .venv/bin/python scripts/hf_bench.py\n"
                 "(transformers >= 4.57 is needed for FlexOlmoForCausalLM)")

    # Interop threads can only be set before any parallel work starts.
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(args.threads)
    torch.manual_seed(args.seed)

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.model:
        log(f"loading {args.model}")
        model = FlexOlmoForCausalLM.from_pretrained(args.model, dtype=dtype)
    else:
        log("building random 'small' preset model")
        model = FlexOlmoForCausalLM(small_preset_config(FlexOlmoConfig)).to(dtype)
    if args.experts_impl:
        model.set_experts_implementation(args.experts_impl)
    model.eval()
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    log(f"params={params} experts_implementation={getattr(cfg, '_experts_implementation', None)} "
        f"attn_implementation={getattr(cfg, '_attn_implementation', None)}")

    # The kwarg names changed across versions: the cache is `cache` in newer
    # releases (`past_key_values` before), and `logits_to_keep` was once
    # `num_logits_to_keep`. Pick whichever the installed forward() takes.
    sig = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in sig else "past_key_values"
    keep_kw = "logits_to_keep" if "logits_to_keep" in sig else "num_logits_to_keep"

    def out_cache(out):
        # Explicit None check: a Cache object defines __len__, so `or` would misfire.
        cache = getattr(out, "cache", None)
        return cache if cache is not None else out.past_key_values

    gen = torch.Generator().manual_seed(args.seed)
    prefill_ids = torch.randint(0, cfg.vocab_size, (args.batch, args.prefill_len), generator=gen)
    prompt_ids = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt_len), generator=gen)

    def prefill_last():
        model(input_ids=prefill_ids, use_cache=True, **{keep_kw: 1})

    def prefill_full():
        model(input_ids=prefill_ids, use_cache=False)

    decode_times = []

    def decode():
        # Prompt prefill is setup, not timed; only the token-by-token loop is.
        out = model(input_ids=prompt_ids, use_cache=True, **{keep_kw: 1})
        cache = out_cache(out)
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(args.decode_steps):
            out = model(input_ids=next_ids, use_cache=True, **{cache_kw: cache, keep_kw: 1})
            cache = out_cache(out)
            next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        decode_times.append(time.perf_counter() - t0)

    with torch.inference_mode():
        log("prefill (last-position logits)")
        t_prefill = median_time(prefill_last, args.repeats)
        log("decode")
        for _ in range(args.repeats + 1):
            decode()
        t_decode = statistics.median(decode_times[1:])  # drop the warm-up run
        # Read peak RSS before the full-logits pass: its 8x256xvocab logits
        # tensor is not part of what the engine does.
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t_prefill_full = None
        if not args.skip_full_logits:
            log("prefill (all logits)")
            t_prefill_full = median_time(prefill_full, args.repeats)

    print(json.dumps({
        "impl": "transformers",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": args.threads,
        "experts_impl": getattr(cfg, "_experts_implementation", None),
        "model": args.model or "random:small",
        "prefill_tok_s": round(args.batch * args.prefill_len / t_prefill, 1),
        "prefill_full_logits_tok_s": t_prefill_full and round(args.batch * args.prefill_len / t_prefill_full, 1),
        "dtype": args.dtype,
        "batch": args.batch, "prefill_len": args.prefill_len, "prompt_len": args.prompt_len,
        "decode_steps": args.decode_steps,
        "decode_tok_s": round(args.batch * args.decode_steps / t_decode, 1),
        "peak_rss_mb": round(peak_rss_mb, 1),
        "params": params,
        "weights_mb_f32": round(params * 4 / 2**20, 1),
    }))


if __name__ == "__main__":
    main()
