"""Serving throughput: the engine (batches across deltas) vs a naive server, and 5 vs 500 deltas.

    python benchmarks/serving.py                          # MiniLM classification, both parts
    python benchmarks/serving.py --model smollm2 --parts A --requests 256 --max-tokens 8

Part A: 32 closed-loop clients send requests spread over 50 deltas of mixed methods to
  (1) ``unipeft.serving.Engine``: requests arriving together are batched (up to 32 rows, 5 ms
      wait) and each row is routed to its own delta with ``up.route``;
  (2) a naive server: one worker that, per request, switches the active delta
      (``up.activate``) and runs a batch of one.
  Both hold every delta in memory before timing (no loading), use the same model, requests and
  clients, and are driven in-process. With ``--http`` a third arm sends the engine's requests
  through the real server (``unipeft.serving.app`` under uvicorn on loopback, one HTTP client
  per client thread), and the report also gives that arm over the in-process naive server: a
  conservative ratio, as the naive server is spared the HTTP cost. Goal: engine >= 5x naive.
Part B: the engine's throughput with the requests spread over 5 deltas vs over 500 (the same
  method mix: LoRA, (IA)3, Pfeiffer adapter, BitFit, prompt tuning; every delta loaded before
  timing, so this measures routing over many deltas, not disk). Goal: within 10%.

Ratios are from one run of this script (the two arms of a part run back to back, in
alternating rounds, and the medians of the rounds are compared).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import unipeft as up
from unipeft.serving import Engine
from unipeft.serving.demo import nudge

TEXTS = ["the film was a delight from start to finish", "a dull and overlong plot with wooden acting",
         "the service was quick and the food was great", "I would not recommend this hotel to anyone",
         "an honest, moving story told with care", "the battery died after two days of light use"]
PROMPTS = ["The capital of France is", "Write a short poem about the sea:", "def fibonacci(n):",
           "The three primary colours are", "Once upon a time, in a small village,", "To make a cup of tea, first"]


def methods(generate: bool):
    # one of each routable family; prefix tuning is left out of the LM mix only because its per-row
    # prefixes make every batch pay for the longest prefix (measured separately in routing.py)
    return {"lora": lambda: up.LoRA(r=8, alpha=16, targets=["q", "v"]),
            "ia3": lambda: up.IA3(), "pfeiffer": lambda: up.Adapter(style="pfeiffer", bottleneck=16),
            "bitfit": lambda: up.BitFit(), "prompt": lambda: up.PromptTuning(length=8, init="random")}


def load(model_name: str):
    from unipeft import zoo

    if model_name == "smollm2":
        return zoo.smollm2()
    model, tok = zoo.minilm(num_labels=2)
    return model, tok


def write_deltas(model, tok, directory: Path, count: int, generate: bool) -> list[str]:
    """``count`` deltas cycling through the methods: one template per method (attached, moved off
    its initial values, saved), then copies whose tensors get their own seeded noise."""
    from safetensors.torch import load_file, save_file

    kinds = methods(generate)
    templates = {}
    for i, (kind, make) in enumerate(kinds.items()):
        torch.manual_seed(i)
        up.attach(model, make(), name=f"t-{kind}", tokenizer=tok)
        nudge(model, f"t-{kind}", seed=100 + i, scale=0.02)
        templates[kind] = up.save(model, directory / f".template-{kind}", name=f"t-{kind}")
        up.detach(model, f"t-{kind}")
    names = []
    for j in range(count):
        kind = list(kinds)[j % len(kinds)]
        name = f"{kind}-{j:04d}"
        out = directory / name
        out.mkdir(parents=True)
        shutil.copy(templates[kind] / "delta.json", out / "delta.json")
        g = torch.Generator().manual_seed(10_000 + j)
        tensors = {k: (v + torch.randn(v.shape, generator=g) * 0.01).contiguous()
                   for k, v in load_file(str(templates[kind] / "delta.safetensors")).items()}
        save_file(tensors, str(out / "delta.safetensors"), metadata={"format": "unipeft-delta"})
        names.append(name)
    return names


class Naive:
    """The baseline: one worker, one request at a time, the active delta switched per request."""

    def __init__(self, model, tok, deltas_dir: Path, names: list[str], generate: bool, max_tokens: int):
        self.model, self.tok, self.generate, self.max_tokens = model, tok, generate, max_tokens
        self.names = list(names)
        for n in names:
            up.load(model, deltas_dir / n, name=n, activate=False)
        self.queue: list = []
        self.cv = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def submit(self, delta: str, x: str) -> concurrent.futures.Future:
        f = concurrent.futures.Future()
        with self.cv:
            self.queue.append((delta, x, f))
            self.cv.notify()
        return f

    def loop(self):
        while True:
            with self.cv:
                while not self.queue and not self.stopped:
                    self.cv.wait()
                if self.stopped:
                    return
                delta, x, f = self.queue.pop(0)
            up.activate(self.model, [delta])
            enc = self.tok(x, return_tensors="pt")
            with torch.no_grad():
                if self.generate:
                    out = self.model.generate(**enc, max_new_tokens=self.max_tokens, do_sample=False,
                                              pad_token_id=self.tok.eos_token_id)
                    f.set_result(self.tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
                else:
                    f.set_result(self.model(**enc).logits.softmax(-1)[0].tolist())

    def stop(self):
        with self.cv:
            self.stopped = True
            self.cv.notify_all()
        self.thread.join()
        up.activate(self.model, [])
        for n in self.names:   # its own deltas only: the engine's stay attached
            up.detach(self.model, n)


def drive(submit, work: list[tuple[str, str]], clients: int) -> float:
    """Requests per second for ``work`` sent by ``clients`` closed-loop client threads."""
    errors = []

    def client(part):
        for delta, x in part:
            try:
                submit(delta, x).result(600)
            except Exception as e:  # counted: a benchmark with failures reports them
                errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(work[i::clients],)) for i in range(clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    dt = time.perf_counter() - t
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return len(work) / dt


def engine_submit(engine: Engine, generate: bool, max_tokens: int):
    if generate:
        return lambda d, x: engine.submit_generate(d, [x], max_tokens=max_tokens)
    return lambda d, x: engine.submit_classify(d, [x])


def http_submit(url: str, generate: bool, max_tokens: int):
    """Requests through the HTTP server: one keep-alive client per thread; a future per request
    (resolved at once: the client threads are the concurrency)."""
    import httpx

    local = threading.local()

    def submit(delta: str, x: str) -> concurrent.futures.Future:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(base_url=url, timeout=600)
        if generate:
            r = client.post("/v1/completions", json={"model": delta, "prompt": x, "max_tokens": max_tokens,
                                                     "temperature": 0})
        else:
            r = client.post("/v1/classify", json={"model": delta, "input": [x]})
        f = concurrent.futures.Future()
        if r.status_code == 200:
            f.set_result(r.json())
        else:
            f.set_exception(RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}"))
        return f

    return submit


def work_for(names: list[str], n: int, generate: bool, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    xs = PROMPTS if generate else TEXTS
    return [(rng.choice(names), rng.choice(xs)) for _ in range(n)]


def warm(engine: Engine, names: list[str], generate: bool) -> None:
    """Load every delta (the timing then measures serving, not loading)."""
    for i in range(0, len(names), engine.max_batch):
        futs = [engine_submit(engine, generate, 1)(n, "warm up") for n in names[i:i + engine.max_batch]]
        for f in futs:
            f.result(600)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm", choices=("minilm", "smollm2"))
    p.add_argument("--parts", default="A,B")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--deltas", type=int, default=50, help="part A: deltas in use")
    p.add_argument("--few", type=int, default=5)
    p.add_argument("--many", type=int, default=500)
    p.add_argument("--requests", type=int, default=640, help="requests per measured round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=8, help="smollm2: tokens generated per request")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="the engine's batching wait")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    p.add_argument("--http", action="store_true", help="part A: also the engine through the HTTP server")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    generate = args.model == "smollm2"
    model, tok = load(args.model)
    model.eval()
    tmp = Path(tempfile.mkdtemp(prefix="unipeft-serving-bench-"))
    results: dict = {"model": args.model, "clients": args.clients, "requests_per_round": args.requests,
                     "rounds": args.rounds, "torch_threads": args.threads, "max_wait_ms": args.max_wait_ms,
                     "max_tokens": args.max_tokens if generate else None}
    try:
        count = max(args.deltas if "A" in parts else 0, args.many if "B" in parts else 0)
        t = time.perf_counter()
        names = write_deltas(model, tok, tmp, count, generate)
        print(f"wrote {count} deltas in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        engine = Engine((model, tok), tmp, cache_mb=4096, name=args.model, max_batch=32, max_wait_ms=args.max_wait_ms,
                        max_new_tokens=max(64, args.max_tokens))
        submit = engine_submit(engine, generate, args.max_tokens)
        server = None
        if "A" in parts:
            use = names[:args.deltas]
            warm(engine, use, generate)
            naive_rates, engine_rates, http_rates = [], [], []
            if args.http:
                from unipeft.serving.app import create_app
                from unipeft.serving.cli import Background

                server = Background(create_app(engine, tmp))   # no admin key: loopback, no keys
                via_http = http_submit(server.url, generate, args.max_tokens)
            for r in range(args.rounds):
                work = work_for(use, args.requests, generate, seed=r)
                b0, r0 = engine.batches, engine.batch_rows
                engine_rates.append(drive(submit, work, args.clients))
                fill = (engine.batch_rows - r0) / max(1, engine.batches - b0)
                if server is not None:
                    http_rates.append(drive(via_http, work, args.clients))
                # the naive server gets the model to itself: the engine's deltas stay attached but off
                with engine._model_lock:
                    naive = Naive(model, tok, tmp, use, generate, args.max_tokens)
                    try:
                        n_work = work[: max(args.clients, len(work) // 4)]   # it is slow: a quarter of the requests
                        naive_rates.append(drive(naive.submit, [(f"{d}", x) for d, x in n_work], args.clients))
                    finally:
                        naive.stop()
                print(f"A round {r}: engine {engine_rates[-1]:.1f} req/s ({fill:.1f} rows per batch), naive "
                      f"{naive_rates[-1]:.1f} req/s" + (f", engine over HTTP {http_rates[-1]:.1f} req/s"
                                                        if http_rates else ""), file=sys.stderr)
            e, n = statistics.median(engine_rates), statistics.median(naive_rates)
            results["A"] = {"deltas": args.deltas, "engine_rps": engine_rates, "naive_rps": naive_rates,
                            "engine_median": e, "naive_median": n, "ratio": e / n}
            if http_rates:
                h = statistics.median(http_rates)
                results["A"].update(http_rps=http_rates, http_median=h, http_ratio_over_naive=h / n)
        if "B" in parts:
            few, many = names[:args.few], names[:args.many]
            t = time.perf_counter()
            warm(engine, many, generate)
            print(f"loaded {len(many)} deltas in {time.perf_counter() - t:.1f} s "
                  f"({engine.used_bytes / 2 ** 20:.1f} MiB)", file=sys.stderr)
            few_rates, many_rates = [], []

            def measured(names_, seed):
                """req/s, plus what the arm did: rows per batch, waves cut, tokens generated per request."""
                before = (engine.batches, engine.batch_rows, engine.waves_cut, tokens_so_far())
                rate = drive(submit, work_for(names_, args.requests, generate, seed=seed), args.clients)
                b, rows, cut, tok = (x - y for x, y in zip((engine.batches, engine.batch_rows, engine.waves_cut,
                                                            tokens_so_far()), before))
                return rate, f"{rows / max(b, 1):.1f} rows/batch, {cut} waves cut, {tok / args.requests:.2f} tok/req"

            def tokens_so_far():
                return sum(v.get("completion_tokens_total", 0) for v in engine.metrics.snapshot().values())

            for r in range(args.rounds):
                rate, how_few = measured(few, 100 + r)
                few_rates.append(rate)
                rate, how_many = measured(many, 200 + r)
                many_rates.append(rate)
                print(f"B round {r}: {args.few} deltas {few_rates[-1]:.1f} req/s ({how_few}), {args.many} deltas "
                      f"{many_rates[-1]:.1f} req/s ({how_many})", file=sys.stderr)
            f, m = statistics.median(few_rates), statistics.median(many_rates)
            results["B"] = {"few": args.few, "many": args.many, "few_rps": few_rates, "many_rps": many_rates,
                            "few_median": f, "many_median": m, "ratio_many_over_few": m / f,
                            "cache_mib": engine.used_bytes / 2 ** 20}
        if server is not None:
            server.stop()   # its shutdown stops the engine too
        engine.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(results, indent=2))
    if "A" in results:
        a = results["A"]
        print(f"\n| {args.model}, {args.clients} clients, {a['deltas']} deltas | requests/s |\n|---|---:|\n"
              f"| engine (batched, routed) | {a['engine_median']:.1f} |\n| naive (switch + batch of one) | "
              f"{a['naive_median']:.1f} |\n| ratio | {a['ratio']:.2f}x |")
        if "http_median" in a:
            print(f"| engine through HTTP | {a['http_median']:.1f} |\n| HTTP engine / in-process naive | "
                  f"{a['http_ratio_over_naive']:.2f}x |")
    if "B" in results:
        b = results["B"]
        print(f"\n| deltas in use | requests/s |\n|---|---:|\n| {b['few']} | {b['few_median']:.1f} |\n"
              f"| {b['many']} | {b['many_median']:.1f} |\n| ratio | {b['ratio_many_over_few']:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
