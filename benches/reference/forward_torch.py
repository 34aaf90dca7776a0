#!/usr/bin/env python3
"""PyTorch eager reference of the EC-DiT forward, for `ecdit bench forward`.

Builds the same architecture as ecdit-model from one of our JSON configs
(adaLN-Zero blocks, grouped-query self-attention with a fused qkv projection when
kv_heads == heads, caption projection of the text tokens and cross-attention to
them with a padding mask, optional pooled-text term of c, dense GELU FFN or an expert-choice MoE layer with
per-sample routing groups in every other block, final adaLN layer and
unpatchify) and times a forward pass.
Weights are random (timing only). Prints one JSON line per measurement.

    python3 benches/reference/forward_torch.py --config configs/small/ec-s-8e.json \
        --batch 8 --threads 2 --reps 5
"""
import argparse
import contextlib
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F


def timestep_embedding(t, dim=256, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(torch.nn.Module):
    """Grouped-query attention as ecdit-model's: self-attention uses one fused qkv
    projection when kv_heads == heads (attn.qkv) and q + kv otherwise; cross-attention
    (ctx given) reads the caption-projected text tokens (width d) with q_linear + kv_linear."""

    def __init__(self, d, heads, kv_heads, cross=False):
        super().__init__()
        self.h, self.kv, self.hd = heads, kv_heads, d // heads
        self.fused = not cross and kv_heads == heads
        if self.fused:
            self.qkv = torch.nn.Linear(d, 3 * d)
        else:
            self.q = torch.nn.Linear(d, d)
            self.kv_proj = torch.nn.Linear(d, 2 * kv_heads * self.hd)
        self.proj = torch.nn.Linear(d, d)

    def forward(self, x, ctx=None, mask=None):
        b, n, d = x.shape
        if self.fused:
            qkv = self.qkv(x).view(b, n, 3, self.h, self.hd)
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        else:
            ctx = x if ctx is None else ctx
            m = ctx.shape[1]
            q = self.q(x).view(b, n, self.h, self.hd).transpose(1, 2)
            kv = self.kv_proj(ctx).view(b, m, 2, self.kv, self.hd)
            k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        if self.kv != self.h:
            rep = self.h // self.kv
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        attn_mask = None if mask is None else mask[:, None, None, :].bool()
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(o.transpose(1, 2).reshape(b, n, d))


class Mlp(torch.nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1 = torch.nn.Linear(d, hidden)
        self.fc2 = torch.nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class ExpertChoiceMoe(torch.nn.Module):
    """Expert choice per routing group (per sample): each expert takes its top-C tokens."""

    def __init__(self, d, hidden, experts, capacity_factor):
        super().__init__()
        self.e, self.f_c = experts, capacity_factor
        self.router = torch.nn.Linear(d, experts, bias=False)
        self.w1 = torch.nn.Parameter(torch.randn(experts, d, hidden) * d ** -0.5)
        self.b1 = torch.nn.Parameter(torch.zeros(experts, 1, hidden))
        self.w2 = torch.nn.Parameter(torch.randn(experts, hidden, d) * hidden ** -0.5)
        self.b2 = torch.nn.Parameter(torch.zeros(experts, 1, d))

    def forward(self, x):
        b, s, d = x.shape
        c = max(1, min(s, int(math.floor(self.f_c * s / self.e + 0.5))))
        probs = torch.softmax(self.router(x).float(), dim=-1)  # [B, S, E]
        gates, idx = torch.topk(probs.transpose(1, 2), c, dim=-1)  # [B, E, C]
        flat = x.reshape(b * s, d)
        rows = (idx + torch.arange(b)[:, None, None] * s).transpose(0, 1).reshape(self.e, b * c)
        xin = flat[rows]  # [E, B*C, d]
        h = F.gelu(torch.baddbmm(self.b1, xin, self.w1), approximate="tanh")
        y = torch.baddbmm(self.b2, h, self.w2)  # [E, B*C, d]
        y = y * gates.transpose(0, 1).reshape(self.e, b * c, 1)
        out = torch.zeros_like(flat)
        out.index_add_(0, rows.reshape(-1), y.reshape(-1, d))
        return out.view(b, s, d)


class Block(torch.nn.Module):
    def __init__(self, cfg, moe):
        super().__init__()
        d = cfg["hidden"]
        hidden = int(d * cfg.get("mlp_ratio", 4.0))
        cond = cfg["conditioning"]
        self.text = "text" in cond
        self.attn = Attention(d, cfg["heads"], cfg["kv_heads"])
        if self.text:
            self.cross = Attention(d, cfg["heads"], cfg["kv_heads"], cross=True)
        if moe is not None:
            self.ffn = ExpertChoiceMoe(d, hidden, moe["experts"], moe["router"].get("capacity_factor", 2.0))
        else:
            self.ffn = Mlp(d, hidden)
        self.ada = torch.nn.Linear(d, 6 * d)

    def forward(self, x, c, text, mask):
        s1, sc1, g1, s2, sc2, g2 = self.ada(F.silu(c)).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), s1, sc1))
        if self.text:
            x = x + self.cross(x, text, mask)
        return x + g2.unsqueeze(1) * self.ffn(modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), s2, sc2))


class Model(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, p, c = cfg["hidden"], cfg["patch_size"], cfg["in_channels"]
        self.p, self.c = p, c
        self.out_c = 2 * c if cfg.get("learn_sigma") else c
        self.patch = torch.nn.Linear(c * p * p, d)
        self.t1, self.t2 = torch.nn.Linear(256, d), torch.nn.Linear(d, d)
        text = cfg["conditioning"].get("text")
        self.pooled = None
        if text is not None:
            # y_embedder.y_proj: Linear -> GELU(tanh) -> Linear, once per forward.
            self.y1, self.y2 = torch.nn.Linear(text["text_dim"], d), torch.nn.Linear(d, d)
            if text.get("pooled"):
                self.pooled = torch.nn.Sequential(
                    torch.nn.Linear(text["text_dim"], d), torch.nn.SiLU(), torch.nn.Linear(d, d))
        moe = cfg.get("moe")
        blocks = []
        for i in range(cfg["depth"]):
            is_moe = moe is not None and i >= moe.get("first", 1) and (i - moe.get("first", 1)) % moe.get("every", 2) == 0
            blocks.append(Block(cfg, moe if is_moe else None))
        self.blocks = torch.nn.ModuleList(blocks)
        self.final_ada = torch.nn.Linear(d, 2 * d)
        self.final = torch.nn.Linear(d, p * p * self.out_c)
        self.register_buffer("pos", torch.randn(1, (cfg["input_size"] // p) ** 2, d))

    def forward(self, x, t, text, mask, pooled):
        b, c, hgt, wid = x.shape
        p, hp, wp = self.p, hgt // self.p, wid // self.p
        x = x.view(b, c, hp, p, wp, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        x = self.patch(x) + self.pos
        cvec = self.t2(F.silu(self.t1(timestep_embedding(t))))
        if self.pooled is not None:
            cvec = cvec + self.pooled(pooled)
        if hasattr(self, "y1"):
            text = self.y2(F.gelu(self.y1(text), approximate="tanh"))
        for blk in self.blocks:
            x = blk(x, cvec, text, mask)
        shift, scale = self.final_ada(F.silu(cvec)).chunk(2, dim=1)
        out = self.final(modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift, scale))
        # unpatchify: [B, T, p*p*C_out] (index (pi*p + qi)*C_out + ch) -> [B, C_out, H, W]
        out = out.view(b, hp, wp, p, p, self.out_c).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, self.out_c, hgt, wid)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--text-len", type=int, default=16)
    ap.add_argument("--autocast", choices=["none", "bf16"], default="none",
                    help="CPU bf16 autocast around the forward (PyTorch's fastest CPU mode where the CPU has bf16)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = json.load(open(args.config))
    model = Model(cfg).eval()
    b = args.batch
    x = torch.randn(b, cfg["in_channels"], cfg["input_size"], cfg["input_size"])
    t = torch.rand(b) * 1000
    text_dim = cfg["conditioning"].get("text", {}).get("text_dim", cfg["hidden"])
    text = torch.randn(b, args.text_len, text_dim)
    mask = torch.ones(b, args.text_len, dtype=torch.uint8)
    pooled = torch.randn(b, text_dim)
    times = []
    amp = args.autocast == "bf16"
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        model(x, t, text, mask, pooled)  # warm-up
        for _ in range(args.reps):
            t0 = time.perf_counter()
            model(x, t, text, mask, pooled)
            times.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(times)
    print(json.dumps({"impl": "torch-autocast-bf16" if amp else "torch", "torch": torch.__version__, "config": cfg["name"], "batch": b,
                      "threads": args.threads, "ms": round(ms, 3), "images_per_s": round(b / ms * 1e3, 3)}))


if __name__ == "__main__":
    main()
