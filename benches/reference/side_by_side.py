#!/usr/bin/env python3
"""Side-by-side rounds: runs several benchmark commands interleaved, round after
round, and prints each one's median and the ratio of medians to a baseline.
The machines are shared and noisy, so only runs measured together count.

Each command must print JSON lines; `--field NAME` picks the number to compare
(the first line holding it, or the line whose `router` is `--router`).

    python3 benches/reference/side_by_side.py --rounds 5 --field ms \
        --run "ours=./target/release/ecdit bench forward --config ec-s-8e --batch 8 --threads 2 --json" \
        --run "torch=python3 benches/reference/forward_torch.py --config configs/small/ec-s-8e.json --batch 8 --threads 2" \
        --baseline torch
"""
import argparse
import json
import shlex
import statistics
import subprocess
import sys


def measure(cmd, field, router):
    out = subprocess.run(shlex.split(cmd), capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        line = line.strip()
        if not line.startswith(("{", "[")):
            continue
        rows = json.loads(line)
        for row in rows if isinstance(rows, list) else [rows]:
            if field in row and (router is None or row.get("router") == router):
                return float(row[field])
    sys.exit(f"no '{field}' in the output of: {cmd}\n{out}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", action="append", required=True, help="NAME=COMMAND")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--field", default="ms")
    ap.add_argument("--router", default=None)
    ap.add_argument("--baseline", default=None)
    args = ap.parse_args()
    runs = [r.split("=", 1) for r in args.run]
    times = {name: [] for name, _ in runs}
    for i in range(args.rounds):
        # Alternate the order so no command always runs first after a pause.
        order = runs if i % 2 == 0 else runs[::-1]
        for name, cmd in order:
            times[name].append(measure(cmd, args.field, args.router))
        print(f"round {i + 1}: " + ", ".join(f"{n} {times[n][-1]:.4g}" for n, _ in runs), flush=True)
    base = statistics.median(times[args.baseline]) if args.baseline else None
    for name, _ in runs:
        med = statistics.median(times[name])
        ratio = f"  {med / base:.3f}x {args.baseline}" if base else ""
        print(f"{name:>10}: median {med:.4g}  (min {min(times[name]):.4g}, max {max(times[name]):.4g}){ratio}")


if __name__ == "__main__":
    main()
