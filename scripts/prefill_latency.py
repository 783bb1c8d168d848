#!/usr/bin/env python3
"""Latency of short requests while one long prompt is in flight on `moeval serve`.

Starts the server with the given extra flags, sends one long request (token ids, `max_tokens` 1) and,
while it runs, short requests (4 prompt tokens, 4 generated) one after another from --clients threads.
Prints the short requests' p50/p99 latency and the long request's latency as JSON.

  python3 scripts/prefill_latency.py --moeval target/release/moeval --model assets/default-model \
      --long-tokens 4000 -- --prefill-chunk 512
"""
import argparse
import json
import subprocess
import threading
import time
import urllib.request


def post(base, body):
    t0 = time.perf_counter()
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        r.read()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moeval", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--long-tokens", type=int, default=4000)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("serve_args", nargs="*")
    a = ap.parse_args()
    server = subprocess.Popen([a.moeval, "--threads", str(a.threads), "serve", "--model", a.model, "--port", "0"]
                              + a.serve_args, stdout=subprocess.PIPE)
    try:
        base = server.stdout.readline().decode().strip().removeprefix("listening on ")
        short = {"prompt": [5, 6, 7, 8], "max_tokens": 4, "temperature": 0, "moeval": {"ignore_eos": True}}
        for _ in range(3):
            post(base, short)  # warm-up
        long = {"prompt": [5 + i % 150 for i in range(a.long_tokens)], "max_tokens": 1, "temperature": 0}
        done = threading.Event()
        lat, long_s = [], []

        def long_request():
            long_s.append(post(base, long))
            done.set()

        def client():
            while not done.is_set():
                lat.append(post(base, short))

        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(0.05)
        cs = [threading.Thread(target=client) for _ in range(a.clients)]
        for c in cs:
            c.start()
        t.join()
        for c in cs:
            c.join()
        lat.sort()
        pct = lambda p: round(1000 * lat[min(len(lat) - 1, int(p * len(lat)))], 1)
        print(json.dumps({"serve_args": a.serve_args, "long_tokens": a.long_tokens, "short_requests": len(lat),
                          "short_p50_ms": pct(0.5), "short_p99_ms": pct(0.99),
                          "short_max_ms": round(1000 * lat[-1], 1), "long_s": round(long_s[0], 2)}))
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
