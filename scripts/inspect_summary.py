#!/usr/bin/env python3
"""Summarises `ecdit inspect` outputs (docs/EVALUATION.md, "Where the experts go").

usage: scripts/inspect_summary.py DIR [DIR ...]   (each DIR written by `ecdit inspect -o DIR`)

Per MoE block and sampling phase (early: t > 2/3, middle, late: t < 1/3), averaged over the
prompts: the spread of compute (standard deviation of experts per patch), the most experts
on one patch (share of the layer's experts), and how much more compute object patches get
than an even spread (1 = none; from `object_concentration`)."""
import json
import statistics
import sys
from collections import defaultdict


def phase(t):
    return "early" if t > 2 / 3 else ("late" if t < 1 / 3 else "middle")


def main(dirs):
    rows = defaultdict(lambda: defaultdict(list))
    for d in dirs:
        with open(f"{d}/inspect.json") as f:
            j = json.load(f)
        for rec, conc in zip(j["records"], j["object_concentration"]):
            for layer, c in zip(rec["layers"], conc):
                key = (layer["block"], phase(rec["t"]))
                counts = layer["experts_per_patch"]
                rows[key]["std"].append(statistics.pstdev(counts))
                rows[key]["max"].append(layer["max_fraction"])
                if c is not None:
                    rows[key]["conc"].append(c)
    print(f"{len(dirs)} prompts")
    print("| block | phase | spread (std of experts per patch) | most experts on one patch | object patches' compute vs even |")
    print("|---|---|---|---|---|")
    order = {"early": 0, "middle": 1, "late": 2}
    for (block, ph) in sorted(rows, key=lambda k: (k[0], order[k[1]])):
        r = rows[(block, ph)]
        conc = f"{statistics.mean(r['conc']):.2f}x" if r["conc"] else "-"
        print(f"| {block} | {ph} | {statistics.mean(r['std']):.2f} | {100 * max(r['max']):.0f}% | {conc} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
