#!/usr/bin/env python3
"""PyTorch-eager reference for `ecdit bench moe`: one MoE layer forward beside
the dense FFN of equal FLOPs.

Same setting as ecdit-model/src/bench_moe.rs: d = 384, 8 images x 256 tokens,
E = 8 GELU (tanh) experts of width 4d, routing groups per sample; expert
choice with f_c = 2 (C = 64 tokens per expert per image), token choice top-2,
expert race k = 2 (sigmoid scores, K = 2 * 256 winners per image), and the
dense FFN of width 2 x 4d. Router logits x @ W_r in f32, softmax over experts.
Expert choice runs the experts as one batched matmul (equal loads); token
choice and expert race loop over experts (unequal loads), the usual eager
implementation. Inference only (torch.no_grad). Prints one JSON line per
router: {router, ms, dense_ms, ratio, impl: "torch"}, medians over --reps
interleaved runs (MoE, dense, MoE, ...) after warm-up.

Usage: python3 benches/reference/moe_torch.py [--reps 20] [--threads 2]
"""
import argparse
import json
import math
import time

import torch
import torch.nn.functional as F


def xavier(*shape):
    fan_out, fan_in = shape[-2], shape[-1]
    a = math.sqrt(6.0 / (fan_in + fan_out))
    return torch.empty(*shape).uniform_(-a, a)


def expert_mlp_bmm(xg, w1, b1, w2, b2):
    # xg: [E, N, d]; w1: [E, h, d]; b1: [E, h]; w2: [E, d, h]; b2: [E, d]
    h = torch.baddbmm(b1.unsqueeze(1), xg, w1.transpose(1, 2))
    h = F.gelu(h, approximate="tanh")
    return torch.baddbmm(b2.unsqueeze(1), h, w2.transpose(1, 2))


def expert_mlp_one(xe, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(xe, w1, b1), approximate="tanh"), w2, b2)


class Moe:
    def __init__(self, d, experts, hidden, samples, tokens_per_sample):
        self.d, self.E, self.B, self.S = d, experts, samples, tokens_per_sample
        self.w_r = xavier(experts, d).t().contiguous()  # [d, E]
        self.w1 = xavier(experts, hidden, d)
        self.b1 = torch.zeros(experts, hidden)
        self.w2 = xavier(experts, d, hidden)
        self.b2 = torch.zeros(experts, d)

    def expert_choice(self, x, capacity_factor=2.0):
        # x: [T, d]
        B, S, E, d = self.B, self.S, self.E, self.d
        C = min(max(int(math.floor(capacity_factor * S / E + 0.5)), 1), S)
        probs = torch.softmax(x @ self.w_r, dim=-1)  # [T, E]
        gates, idx = probs.view(B, S, E).transpose(1, 2).topk(C, dim=-1)  # [B, E, C]
        tok = (idx + torch.arange(B).view(B, 1, 1) * S).transpose(0, 1).reshape(E, B * C)  # [E, B*C]
        xg = x.index_select(0, tok.reshape(-1)).view(E, B * C, d)
        y = expert_mlp_bmm(xg, self.w1, self.b1, self.w2, self.b2)  # [E, B*C, d]
        y = y * gates.transpose(0, 1).reshape(E, B * C, 1)
        out = torch.zeros_like(x)
        out.index_add_(0, tok.reshape(-1), y.reshape(-1, d))
        return out

    def _loop_experts(self, x, tok_flat, exp_flat, gate_flat):
        out = torch.zeros_like(x)
        order = torch.argsort(exp_flat, stable=True)
        tok_sorted, gate_sorted = tok_flat[order], gate_flat[order]
        counts = torch.bincount(exp_flat, minlength=self.E).tolist()
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            t = tok_sorted[start:start + n]
            y = expert_mlp_one(x.index_select(0, t), self.w1[e], self.b1[e], self.w2[e], self.b2[e])
            out.index_add_(0, t, y * gate_sorted[start:start + n, None])
            start += n
        return out

    def token_choice(self, x, k=2):
        probs = torch.softmax(x @ self.w_r, dim=-1)  # [T, E]
        gates, exp = probs.topk(k, dim=-1)  # [T, k]
        tok = torch.arange(x.shape[0]).repeat_interleave(k)
        return self._loop_experts(x, tok, exp.reshape(-1), gates.reshape(-1))

    def expert_race(self, x, k=2.0):
        B, S, E = self.B, self.S, self.E
        scores = torch.sigmoid(x @ self.w_r).view(B, S * E)  # one race per image
        K = int(math.floor(k * S + 0.5))
        gates, flat = scores.topk(K, dim=-1)  # [B, K]
        tok = (flat // E + torch.arange(B).view(B, 1) * S).reshape(-1)
        return self._loop_experts(x, tok, (flat % E).reshape(-1), gates.reshape(-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d, S, B, E, ratio = 384, 256, 8, 8, 4
    T = B * S
    x = torch.empty(T, d).uniform_(-1.7, 1.7)
    moe = Moe(d, E, ratio * d, B, S)
    # The dense FFN of equal FLOPs: two experts stacked (width 2 x 4d), drawn
    # like the experts (as ecdit's bench does).
    a = math.sqrt(6.0 / (d + ratio * d))
    dw1, db1 = torch.empty(2 * ratio * d, d).uniform_(-a, a), torch.zeros(2 * ratio * d)
    dw2, db2 = torch.empty(d, 2 * ratio * d).uniform_(-a, a), torch.zeros(d)

    def dense():
        return expert_mlp_one(x, dw1, db1, dw2, db2)

    routers = [
        ("expert-choice", lambda: moe.expert_choice(x)),
        ("token-choice", lambda: moe.token_choice(x)),
        ("expert-race", lambda: moe.expert_race(x)),
    ]
    with torch.no_grad():
        for name, run in routers:
            for _ in range(args.warmup):
                run()
                dense()
            moe_t, dense_t = [], []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                run()
                moe_t.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                dense()
                dense_t.append(time.perf_counter() - t0)
            ms = sorted(moe_t)[len(moe_t) // 2] * 1e3
            dms = sorted(dense_t)[len(dense_t) // 2] * 1e3
            print(json.dumps({"router": name, "ms": round(ms, 3), "dense_ms": round(dms, 3),
                              "ratio": round(ms / dms, 4), "impl": "torch", "threads": args.threads}))


if __name__ == "__main__":
    main()
