#!/usr/bin/env python3
"""GPU baseline: Hugging Face transformers (bf16, CUDA) on the shapes `moeval --device cuda bench` runs.

Measured as moeval measures: random token ids; prefill = one forward of batch x prefill-len tokens with
only the last position's logits; decode = after an untimed prompt, greedy steps of one token per
sequence through the KV cache (argmax on the GPU), at each decode batch size. Median of --repeats after
one warm-up, with torch.cuda.synchronize() around every timed region. One JSON line on stdout.

  python3 scripts/hf_bench_gpu.py --preset olmoe-1b-7b --decode-batches 1,16,64
"""
import argparse
import inspect
import json
import statistics
import sys
import time


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def config(preset):
    import transformers as tf
    if preset == "olmoe-1b-7b":
        return tf.OlmoeForCausalLM, tf.OlmoeConfig(
            vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
            num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
            norm_topk_prob=False, rms_norm_eps=1e-5, max_position_embeddings=4096,
            tie_word_embeddings=False, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    if preset == "small":
        return tf.FlexOlmoForCausalLM, tf.FlexOlmoConfig(
            vocab_size=50304, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
            num_attention_heads=8, num_key_value_heads=8, num_experts=4, num_experts_per_tok=2,
            norm_topk_prob=False, rms_norm_eps=1e-6, max_position_embeddings=4096,
            tie_word_embeddings=False, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    sys.exit(f"unknown preset {preset}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="olmoe-1b-7b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--decode-batches", default="1,16,64")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    import torch
    import transformers
    cls, cfg = config(a.preset)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = cls(cfg).to(torch.bfloat16)
    model.eval()
    load_s = time.perf_counter() - t0
    sig = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in sig else "past_key_values"
    log(f"{a.preset}: {sum(p.numel() for p in model.parameters())} params, "
        f"experts={getattr(model.config, '_experts_implementation', None)} "
        f"attn={getattr(model.config, '_attn_implementation', None)}")

    def out_cache(out):
        c = getattr(out, "cache", None)
        return c if c is not None else out.past_key_values

    def timed(fn):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t

    g = torch.Generator().manual_seed(0)
    v = cfg.vocab_size
    prefill_ids = torch.randint(0, v, (a.batch, a.prefill_len), generator=g).cuda()
    res = {"impl": "transformers", "torch": torch.__version__, "transformers": transformers.__version__,
           "device": torch.cuda.get_device_name(), "preset": a.preset, "load_s": load_s,
           "experts_impl": getattr(model.config, "_experts_implementation", None),
           "batch": a.batch, "prefill_len": a.prefill_len, "decode": []}
    with torch.inference_mode():
        ts = [timed(lambda: model(input_ids=prefill_ids, use_cache=True, logits_to_keep=1))
              for _ in range(a.repeats + 1)][1:]
        res["prefill_tok_s"] = a.batch * a.prefill_len / statistics.median(ts)
        for b in [int(x) for x in a.decode_batches.split(",")]:
            prompt = torch.randint(0, v, (b, a.prompt_len), generator=g).cuda()
            times = []
            for _ in range(a.repeats + 1):
                out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
                cache = out_cache(out)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)

                def steps():
                    nonlocal cache, nxt
                    for _ in range(a.decode_steps):
                        o = model(input_ids=nxt, use_cache=True, logits_to_keep=1, **{cache_kw: cache})
                        cache = out_cache(o)
                        nxt = o.logits[:, -1].argmax(-1, keepdim=True)
                times.append(timed(steps))
            tok_s = b * a.decode_steps / statistics.median(times[1:])
            res["decode"].append({"batch": b, "tok_s": tok_s, "ms_per_step": 1e3 * b / tok_s})
            log(f"decode batch {b}: {tok_s:.0f} tok/s")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
