#!/usr/bin/env python3
"""Reference GEMM timings with numpy (OpenBLAS) on the DiT-S/2 shapes.

Times float32 `a @ b` (C-contiguous, no transposes) at each thread count with
the same protocol as `ecdit_backend_cpu::bench`: warm-up, repetitions of at
least 20 ms, median. Each thread count runs in its own subprocess, because
OpenBLAS reads OPENBLAS_NUM_THREADS when numpy is imported.

    python3 benches/reference/gemm_numpy.py [--threads 1,2] [--reps 7]
        prints one JSON line per (shape, threads): m, n, k, threads, gflops, median_ms, lib
    python3 benches/reference/gemm_numpy.py --compare ours1.jsonl,ours2.jsonl numpy1.jsonl,numpy2.jsonl
        prints a markdown table of ours vs numpy GFLOP/s and their ratios; with
        several files (rounds) per side it shows each side's median round and
        best round (the best is the fairer figure on a machine shared with
        other work, the median the more typical one)
"""
import argparse
import json
import os
import subprocess
import sys
import time

# DiT-S/2 forward at batch 8 plus a square reference; keep in sync with
# ecdit_backend_cpu::bench::dit_s2_gemm_shapes.
SHAPES = [
    (2048, 1152, 384),
    (2048, 384, 384),
    (2048, 1536, 384),
    (2048, 384, 1536),
    (8, 2304, 384),
    (256, 256, 64),
    (256, 64, 256),
    (1024, 1024, 1024),
]
MIN_REP_SECONDS = 0.02


def run_one_thread_count(threads, reps):
    """Runs in a process whose OPENBLAS_NUM_THREADS was set before numpy loaded."""
    import numpy as np

    rng = np.random.default_rng(0x9E37)
    for m, n, k in SHAPES:
        a = rng.uniform(-1, 1, (m, k)).astype(np.float32)
        b = rng.uniform(-1, 1, (k, n)).astype(np.float32)
        out = np.empty((m, n), dtype=np.float32)
        np.matmul(a, b, out=out)
        start = time.perf_counter()
        np.matmul(a, b, out=out)
        once = max(time.perf_counter() - start, 1e-7)
        inner = min(max(int(MIN_REP_SECONDS / once + 0.999), 1), 100_000)
        times = []
        for _ in range(max(reps, 1)):
            start = time.perf_counter()
            for _ in range(inner):
                np.matmul(a, b, out=out)
            times.append((time.perf_counter() - start) / inner)
        times.sort()
        median = times[len(times) // 2]
        print(json.dumps({
            "m": m, "n": n, "k": k, "threads": threads,
            "gflops": 2.0 * m * n * k / median / 1e9,
            "median_ms": median * 1e3,
            "lib": "numpy-" + np.__version__,
        }), flush=True)


def compare(ours_paths, numpy_paths):
    """Markdown table: per shape and thread count, each side's median over the
    rounds (files) and its best round, and the ratios ours / numpy."""

    def load(paths):
        rounds = {}
        for path in paths.split(","):
            with open(path) as f:
                for r in map(json.loads, filter(str.strip, f)):
                    rounds.setdefault((r["m"], r["n"], r["k"], r["threads"]), []).append(r["gflops"])
        return rounds

    def median(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])

    ours, ref = load(ours_paths), load(numpy_paths)
    rounds = max(len(v) for v in ours.values())
    print(f"GFLOP/s, median and best of {rounds} rounds")
    print()
    print("| m x n x k | threads | ours median | numpy median | ratio (median) | ours best | numpy best | ratio (best) |")
    print("|---|---|---|---|---|---|---|---|")
    for key in sorted(ours, key=lambda k: (k[3], -k[0] * k[1] * k[2])):
        if key in ref:
            (om, rm), (ob, rb) = (median(ours[key]), median(ref[key])), (max(ours[key]), max(ref[key]))
            m, n, k, t = key
            print(f"| {m}x{n}x{k} | {t} | {om:.1f} | {rm:.1f} | {om / rm:.2f} | {ob:.1f} | {rb:.1f} | {ob / rb:.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--compare", nargs=2, metavar=("OURS", "NUMPY"))
    args = parser.parse_args()
    if args.compare:
        compare(*args.compare)
        return
    if args.child is not None:
        run_one_thread_count(args.child, args.reps)
        return
    for t in [int(x) for x in args.threads.split(",")]:
        env = dict(os.environ)
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(t)
        subprocess.run([sys.executable, __file__, "--child", str(t), "--reps", str(args.reps)], env=env, check=True)


if __name__ == "__main__":
    main()
