#!/usr/bin/env python3
"""PyTorch eager reference of one EC-DiT TRAINING STEP, for `ecdit bench train`.

Builds the model of one of our JSON configs with the classes of forward_torch.py
(same architecture as ecdit-model) plus, for text-conditioned configs, the
project's small text encoder (ecdit-model/src/text/encoder.rs: token embedding +
learned positions, `layers` pre-norm blocks with masked self-attention and a
GELU-tanh MLP, final LayerNorm eps 1e-5, pooled = masked mean), trained jointly.
Each timed step, on a fixed batch x0 [B, C, H, W] (random normal) and fixed
token ids [B, L] (L = 12; prompts b % 4 = 1, 2, 3 end in 1, 2, 3 padding tokens):

  1. draws the noise and the times of the config's scheduler:
     rectified-flow: t = sigmoid(logit_mean + logit_std u), u ~ N(0, 1);
       x_t = (1 - t) x0 + t noise; target v = noise - x0; the model sees t * time_scale (1000);
     ddpm: t uniform integer in 0..train_steps (1000), linear betas 1e-4..0.02;
       x_t = sqrt(abar) x0 + sqrt(1 - abar) noise; target noise; the model sees t;
  2. optimizer.zero_grad(set_to_none=True);
  3. forward (text encoder + DiT; inside CPU bf16 autocast with --autocast bf16);
     loss = MSE over the first C output channels (learn_sigma channels are not
     trained by MSE) + the token-choice balance losses, if any;
  4. loss.backward(); clip_grad_norm_(all params, 1.0); AdamW step
     (lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight_decay 0);
  5. EMA of every trained weight (decay 0.9999).

MoE layers: expert choice (forward_torch.ExpertChoiceMoe: per-sample groups,
C = round(f_c S / E), gates = softmax probabilities of the picked tokens, so the
gradient reaches the router through the gates, not through the top-k), or token
choice (TokenChoiceMoe below: top-k per token, optional renormalisation and
capacity, GShard balance loss coef * mean_g sum_e P_e E f_e, f_e a constant,
summed over the MoE layers). Experts are `gelu-mlp` with the expert spec's
mlp_ratio. Not supported (the script stops with a message): other routers
(expert-race, dense), other experts (swiglu), routing groups other than
per_sample. Class-conditioned configs get a label table of num_classes + 1 rows
added to c. Prompt/label dropout is not applied (it does not change the cost).
Weights are random (timing only). Prints one JSON line per measurement, then a
summary line `{"summary": ...}` (no top-level `ms`, so side_by_side.py skips it).

    # one measurement, f32 eager (the line side_by_side.py reads):
    python3 benches/reference/train_torch.py --config configs/small/ec-s-8e.json \
        --batch 32 --threads 2 --reps 3
    # CPU bf16 autocast (AMX / AVX512-BF16 machines, at real sizes; slower on tiny configs);
    # --autocast both prints both lines:
    python3 benches/reference/train_torch.py --config configs/small/ec-s-8e.json \
        --batch 32 --threads 2 --reps 3 --autocast bf16
    # sanity: loss on one fixed batch (fixed t and noise too) over 30 steps at lr 1e-3:
    python3 benches/reference/train_torch.py --config configs/tiny-ec.json --batch 4 \
        --overfit-steps 30
    # side by side with our step (field `ms`, ratio to torch):
    python3 benches/reference/side_by_side.py --rounds 5 --field ms \
        --run "ours=./target/release/ecdit bench train --config ec-s-8e --batch 32 --threads 2 --json" \
        --run "torch=python3 benches/reference/train_torch.py --config configs/small/ec-s-8e.json --batch 32 --threads 2 --reps 3" \
        --baseline torch
    # ... and against bf16 autocast: add
    #   --run "torch-bf16=python3 benches/reference/train_torch.py --config configs/small/ec-s-8e.json --batch 32 --threads 2 --reps 3 --autocast bf16"
"""
import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import forward_torch as ft  # noqa: E402  (the model classes; nothing is copied)

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
VOCAB = os.path.join(ROOT, "ecdit-model", "assets", "vocab.txt")
PAD_ID = 0  # <pad> is the first line of the vocabulary
FIRST_WORD_ID = 4  # after <pad> <unk> <bos> <eos>
LN_EPS_TEXT = 1e-5
T_MARGIN = 1.0 / (1 << 24)  # rectified flow keeps t this far inside (0, 1)


# ---------------------------------------------------------------- text encoder


class TextBlock(torch.nn.Module):
    """Pre-norm block: x += proj(Attn(LN1(x))) with the padding mask on the keys,
    x += fc2(GELU-tanh(fc1(LN2(x))))."""

    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.h, self.hd = heads, dim // heads
        self.norm1 = torch.nn.LayerNorm(dim, eps=LN_EPS_TEXT)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.norm2 = torch.nn.LayerNorm(dim, eps=LN_EPS_TEXT)
        self.mlp = ft.Mlp(dim, hidden)

    def forward(self, x, key_mask):
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.h, self.hd)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        x = x + self.proj(o.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class TextEncoder(torch.nn.Module):
    """ecdit-model's TransformerTextEncoder: returns tokens [B, L, dim] and the
    masked mean over real tokens [B, dim]."""

    def __init__(self, vocab, dim, max_tokens, layers=2, heads=None, mlp_ratio=4.0):
        super().__init__()
        heads = heads or max(1, dim // 64)
        self.tok = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Parameter(torch.randn(max_tokens, dim) * 0.02)
        torch.nn.init.normal_(self.tok.weight, std=0.02)
        self.layers = torch.nn.ModuleList(TextBlock(dim, heads, int(dim * mlp_ratio)) for _ in range(layers))
        self.final_norm = torch.nn.LayerNorm(dim, eps=LN_EPS_TEXT)

    def forward(self, ids, mask):
        b, n = ids.shape
        x = self.tok(ids) + self.pos[:n]
        key_mask = mask[:, None, None, :]  # [B, 1, 1, L] bool, True = real token
        for layer in self.layers:
            x = layer(x, key_mask)
        x = self.final_norm(x)
        w = mask.to(x.dtype)
        pooled = (x * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)
        return x, pooled


def vocab_size(path):
    with open(path) as f:
        return sum(1 for line in f if line.strip())


# ---------------------------------------------------------------- token choice


class TokenChoiceMoe(ft.ExpertChoiceMoe):
    """Token choice top-k (plugins/routers token_choice.rs), per-sample groups:
    softmax over experts in f32; each token takes its k most probable experts;
    gates = picked probabilities (divided by their sum with `renormalize`);
    with a capacity factor each expert keeps at most C = round(f_c k S / E) picks
    per sample (first choices in token order, then second choices, ...);
    balance loss aux = coef * mean_g sum_e P_e E f_e, f_e (picks before dropping)
    a constant. Same parameters as ExpertChoiceMoe; experts run one by one on
    their gathered tokens."""

    def __init__(self, d, hidden, experts, k, renormalize, capacity_factor, aux_loss_coef):
        super().__init__(d, hidden, experts, 1.0)
        self.k, self.renorm, self.cap_f, self.coef = k, renormalize, capacity_factor, aux_loss_coef
        self.aux = None

    def forward(self, x):
        b, s, d = x.shape
        e_count, k = self.e, self.k
        probs = torch.softmax(self.router(x).float(), dim=-1)  # [B, S, E]
        top_p, top_e = torch.topk(probs, k, dim=-1)  # [B, S, k]
        gates = top_p / top_p.sum(-1, keepdim=True) if self.renorm else top_p
        with torch.no_grad():
            picks = F.one_hot(top_e, e_count).to(probs.dtype)  # [B, S, k, E]
            frac = picks.sum((1, 2)) / (s * k)  # f_e [B, E]
            keep = None
            if self.cap_f is not None:
                cap = max(1, min(s, int(math.floor(self.cap_f * k * s / e_count + 0.5))))
                order = picks.transpose(1, 2).reshape(b, k * s, e_count)  # (rank, token) order
                seat = (order.cumsum(1) * order).sum(-1)  # 1-based place in its expert's queue
                keep = (seat <= cap).view(b, k, s).transpose(1, 2).reshape(-1)
        self.aux = self.coef * (e_count * (probs.mean(1) * frac).sum(-1)).mean()
        flat = x.reshape(b * s, d)
        slot_e = top_e.reshape(-1)
        slot_tok = torch.arange(b * s).repeat_interleave(k)
        slot_g = gates.reshape(-1)
        if keep is not None:
            slot_e, slot_tok, slot_g = slot_e[keep], slot_tok[keep], slot_g[keep]
        order = torch.argsort(slot_e, stable=True)
        slot_tok, slot_g = slot_tok[order], slot_g[order]
        counts = torch.bincount(slot_e, minlength=e_count).tolist()
        xin = flat[slot_tok]
        ys = []
        # unbind, not w1[e]: one gradient stack per weight instead of E full-size zero fills.
        experts = zip(self.w1.unbind(0), self.b1.unbind(0), self.w2.unbind(0), self.b2.unbind(0))
        for xe, (w1, b1, w2, b2) in zip(torch.split(xin, counts), experts):
            if xe.shape[0]:
                h = F.gelu(torch.addmm(b1[0], xe, w1), approximate="tanh")
                ys.append(torch.addmm(b2[0], h, w2))
        y = torch.cat(ys) * slot_g[:, None]
        out = torch.zeros(flat.shape, dtype=y.dtype)
        out.index_add_(0, slot_tok, y)
        return out.view(b, s, d)


# ---------------------------------------------------------------- model set-up


def build(cfg):
    """The DiT of forward_torch.Model with its MoE layers matched to the router
    and expert specs, the text encoder (or label table), and the loss pieces."""
    model = ft.Model(cfg)
    d = cfg["hidden"]
    moe = cfg.get("moe")
    if moe is not None:
        router, expert = moe["router"], moe.get("expert", {"kind": "gelu-mlp"})
        kind = router.get("kind")
        if expert.get("kind", "gelu-mlp") != "gelu-mlp":
            sys.exit(f"train_torch.py: expert kind '{expert.get('kind')}' is not supported (gelu-mlp only)")
        if router.get("groups", "per_sample") != "per_sample":
            sys.exit(f"train_torch.py: routing groups {router.get('groups')!r} are not supported (per_sample only)")
        hidden = int(d * float(expert.get("mlp_ratio", cfg.get("mlp_ratio", 4.0))))
        for blk in model.blocks:
            if not isinstance(blk.ffn, ft.ExpertChoiceMoe):
                continue
            if kind == "expert-choice":
                blk.ffn = ft.ExpertChoiceMoe(d, hidden, moe["experts"], router.get("capacity_factor", 2.0))
            elif kind == "token-choice":
                blk.ffn = TokenChoiceMoe(d, hidden, moe["experts"], int(router.get("k", 2)),
                                         bool(router.get("renormalize", False)), router.get("capacity_factor"),
                                         float(router.get("aux_loss_coef", 0.01)))
            else:
                sys.exit(f"train_torch.py: router kind '{kind}' is not supported (expert-choice, token-choice)")
    cond = cfg["conditioning"]
    encoder = None
    if "text" in cond:
        text = cond["text"]
        te = cfg.get("text_encoder") or {}
        vocab_path = te.get("vocab") or VOCAB
        encoder = TextEncoder(vocab_size(vocab_path), text["text_dim"], text["max_tokens"],
                              layers=te.get("layers", 2), heads=te.get("heads"), mlp_ratio=te.get("mlp_ratio", 4.0))
        encoder.vocab = vocab_size(vocab_path)
    elif "class" in cond:
        # forward_torch.Model adds `self.pooled(pooled)` to c: the label table goes there.
        model.pooled = torch.nn.Embedding(cond["class"]["num_classes"] + 1, d)
    return model, encoder


class Objective:
    """Times, noisy input, model time and target of the config's scheduler."""

    def __init__(self, spec):
        self.kind = spec.get("kind")
        if self.kind == "rectified-flow":
            self.m, self.s = spec.get("logit_mean", 0.0), spec.get("logit_std", 1.0)
            self.scale = spec.get("time_scale", 1000.0)
        elif self.kind == "ddpm":
            self.steps = int(spec.get("train_steps", 1000))
            betas = torch.linspace(spec.get("beta_start", 1e-4), spec.get("beta_end", 0.02), self.steps,
                                   dtype=torch.float64)
            self.abar = torch.cumprod(1.0 - betas, 0)
        else:
            sys.exit(f"train_torch.py: scheduler kind '{self.kind}' is not supported (rectified-flow, ddpm)")

    def draw(self, x0):
        """(x_t, model time [B], target) for the batch x0."""
        b = x0.shape[0]
        noise = torch.randn_like(x0)
        if self.kind == "rectified-flow":
            t = torch.sigmoid(self.m + self.s * torch.randn(b)).clamp(T_MARGIN, 1 - T_MARGIN)
            tb = t.view(b, 1, 1, 1)
            return (1 - tb) * x0 + tb * noise, t * self.scale, noise - x0
        t = torch.randint(0, self.steps, (b,))
        ab = self.abar[t].view(b, 1, 1, 1)
        x_t = (ab.sqrt() * x0 + (1 - ab).sqrt() * noise).float()
        return x_t, t.float(), noise


def make_optimizer(params, lr, weight_decay, impl):
    kw = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    if impl == "fused":
        return torch.optim.AdamW(params, fused=True, **kw)
    return torch.optim.AdamW(params, foreach=(impl == "foreach"), **kw)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before each measurement")
    ap.add_argument("--autocast", choices=["none", "bf16", "both"], default="none",
                    help="CPU bf16 autocast around forward + loss; both = one line each")
    ap.add_argument("--text-len", type=int, default=12, help="tokens per prompt L (at most max_tokens)")
    ap.add_argument("--lr", type=float, default=None, help="AdamW lr (1e-4; 1e-3 with --overfit-steps)")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--ema-decay", type=float, default=0.9999)
    ap.add_argument("--clip", type=float, default=1.0, help="max gradient norm")
    ap.add_argument("--optimizer-impl", choices=["fused", "foreach", "for-loop"], default="fused",
                    help="torch AdamW implementation (fused: one CPU kernel per parameter)")
    ap.add_argument("--overfit-steps", type=int, default=0,
                    help="sanity mode: N steps on one fixed batch, t and noise; prints the losses")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = json.load(open(args.config))
    model, encoder = build(cfg)
    model.train()
    modules = [model] + ([encoder] if encoder is not None else [])
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    lr = args.lr if args.lr is not None else (1e-3 if args.overfit_steps else 1e-4)
    opt = make_optimizer(params, lr, args.weight_decay, args.optimizer_impl)
    ema = [p.detach().clone() for p in params]
    moe_layers = [blk.ffn for blk in model.blocks if isinstance(blk.ffn, TokenChoiceMoe)]
    objective = Objective(cfg["scheduler"])

    # Fixed inputs: the data pipeline is not part of the step.
    b, c = args.batch, cfg["in_channels"]
    x0 = torch.randn(b, c, cfg["input_size"], cfg["input_size"])
    cond = cfg["conditioning"]
    ids = mask = labels = None
    if encoder is not None:
        n = min(args.text_len, cond["text"]["max_tokens"])
        lengths = n - (torch.arange(b) % 4).clamp(max=n - 1)  # 0..3 padding tokens, at least one real
        mask = torch.arange(n)[None, :] < lengths[:, None]  # [B, L] bool, True = real token
        ids = torch.randint(FIRST_WORD_ID, encoder.vocab, (b, n)).masked_fill(~mask, PAD_ID)
    else:
        labels = torch.randint(0, cond["class"]["num_classes"], (b,))

    def forward_loss(x_t, t_model, target, amp):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with ctx:
            if encoder is not None:
                tokens, pooled = encoder(ids, mask)
                out = model(x_t, t_model, tokens, mask, pooled)
            else:
                out = model(x_t, t_model, None, None, labels)
            loss = F.mse_loss(out[:, :c].float(), target)
            for layer in moe_layers:
                loss = loss + layer.aux
        return loss

    def step(amp, fixed=None):
        x_t, t_model, target = fixed if fixed is not None else objective.draw(x0)
        opt.zero_grad(set_to_none=True)
        loss = forward_loss(x_t, t_model, target, amp)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.clip, foreach=True)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - args.ema_decay)
        return loss.item()

    n_model = sum(p.numel() for p in model.parameters())
    n_text = sum(p.numel() for p in encoder.parameters()) if encoder is not None else 0
    impls = {"none": [False], "bf16": [True], "both": [False, True]}[args.autocast]

    if args.overfit_steps:
        fixed = objective.draw(x0)
        start = [p.detach().clone() for p in params]
        for amp in impls:
            # Each mode starts from the same weights and a fresh optimizer.
            with torch.no_grad():
                torch._foreach_copy_(params, start)
                torch._foreach_copy_(ema, start)
            opt = make_optimizer(params, lr, args.weight_decay, args.optimizer_impl)
            losses = [step(amp, fixed) for _ in range(args.overfit_steps)]
            print(json.dumps({"overfit": args.overfit_steps, "impl": "torch-autocast-bf16" if amp else "torch-eager",
                              "config": cfg["name"], "batch": b, "lr": lr,
                              "first_loss": round(losses[0], 6), "last_loss": round(losses[-1], 6),
                              "decreased": losses[-1] < losses[0],
                              "losses": [round(v, 6) for v in losses]}), flush=True)
        return

    results = []
    for amp in impls:
        for _ in range(args.warmup):
            step(amp)
        times, loss = [], float("nan")
        for _ in range(args.reps):
            t0 = time.perf_counter()
            loss = step(amp)
            times.append((time.perf_counter() - t0) * 1e3)
        ms = statistics.median(times)
        row = {"impl": "torch-autocast-bf16" if amp else "torch-eager", "torch": torch.__version__,
               "config": cfg["name"], "batch": b, "threads": args.threads, "ms": round(ms, 3),
               "images_per_sec": round(b / ms * 1e3, 3), "loss": round(loss, 6),
               "reps": args.reps, "min_ms": round(min(times), 3), "max_ms": round(max(times), 3)}
        results.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"summary": {
        "config": cfg["name"], "batch": b, "threads": args.threads, "scheduler": objective.kind,
        "router": (cfg.get("moe") or {}).get("router", {}).get("kind", "dense"),
        "params_dit": n_model, "params_text_encoder": n_text,
        "text_len": None if ids is None else ids.shape[1], "optimizer": f"AdamW ({args.optimizer_impl})",
        "lr": lr, "clip": args.clip, "ema_decay": args.ema_decay, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "step_ms": {r["impl"]: r["ms"] for r in results},
        "images_per_sec": {r["impl"]: r["images_per_sec"] for r in results}}}), flush=True)


if __name__ == "__main__":
    main()
