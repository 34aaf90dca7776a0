#!/usr/bin/env python3
"""PyTorch eager reference on a CUDA GPU, for scripts/gpu-check.sh.

Times the EC-DiT forward of forward_torch.py (the same architecture as
ecdit-model) with weights and activations in bf16 on the GPU, the EC MoE layer
against a dense FFN of equal FLOPs (8 experts of width 4d at capacity factor 2
against one MLP of width 8d), and PyTorch's bf16 matmul peak. Prints
`BENCH <name> <value> <unit>` lines (the gpu-check table reads them) and one
JSON line.

    python3 benches/reference/forward_torch_cuda.py \
        --config configs/paper/ec-dit-xl-8e.json --batch 32 --reps 10

forward_torch.py is used as is, with two adjustments for pure bf16 (it was
written for f32 on the CPU): the timestep features and the routing gates are
cast to the activations' dtype, as autocast would.
"""
import argparse
import importlib.util
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

_spec = importlib.util.spec_from_file_location(
    "forward_torch", os.path.join(os.path.dirname(os.path.abspath(__file__)), "forward_torch.py"))
ft = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ft)

_timestep_embedding = ft.timestep_embedding


def timestep_embedding(t, dim=256, max_period=10000):
    return _timestep_embedding(t, dim, max_period).to(t.dtype)


class ExpertChoiceMoe(ft.ExpertChoiceMoe):
    """forward_torch's expert choice with the gates in the activations' dtype."""

    def forward(self, x):
        b, s, d = x.shape
        c = max(1, min(s, int(math.floor(self.f_c * s / self.e + 0.5))))
        probs = torch.softmax(self.router(x).float(), dim=-1)  # [B, S, E], f32 router math
        gates, idx = torch.topk(probs.transpose(1, 2), c, dim=-1)  # [B, E, C]
        flat = x.reshape(b * s, d)
        rows = (idx + torch.arange(b, device=x.device)[:, None, None] * s).transpose(0, 1).reshape(self.e, b * c)
        xin = flat[rows]  # [E, B*C, d]
        h = F.gelu(torch.baddbmm(self.b1, xin, self.w1), approximate="tanh")
        y = torch.baddbmm(self.b2, h, self.w2)  # [E, B*C, d]
        y = y * gates.transpose(0, 1).reshape(self.e, b * c, 1).to(y.dtype)
        out = torch.zeros_like(flat)
        out.index_add_(0, rows.reshape(-1), y.reshape(-1, d))
        return out.view(b, s, d)


ft.timestep_embedding = timestep_embedding
ft.ExpertChoiceMoe = ExpertChoiceMoe


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, reps, warmup=2):
    for _ in range(warmup):
        fn()
    synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--text-len", type=int, default=16)
    ap.add_argument("--matmul-size", type=int, default=8192)
    ap.add_argument("--device", default="cuda", help="cuda (cpu only to try the script on a small config)")
    args = ap.parse_args()
    dev, dt = torch.device(args.device), torch.bfloat16
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = json.load(open(args.config))
    b = args.batch
    print(f"BENCH torch_version {torch.__version__} -")
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"BENCH torch_device {name.replace(' ', '_')} -")

    with torch.inference_mode():
        # bf16 matmul peak, as the Rust side measures its own.
        n = args.matmul_size
        x, y = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
        sec = timed(lambda: x @ y.t(), 20)
        peak = 2 * n ** 3 / sec / 1e12
        print(f"BENCH torch_bf16_matmul_peak {peak:.1f} TFLOP/s")
        del x, y

        t0 = time.perf_counter()
        model = ft.Model(cfg).to(dev, dt).eval()
        print(f"BENCH torch_xl_model_build {time.perf_counter() - t0:.1f} s")
        img = torch.randn(b, cfg["in_channels"], cfg["input_size"], cfg["input_size"], device=dev, dtype=dt)
        t = (torch.rand(b, device=dev) * 1000).to(dt)
        text_dim = cfg["conditioning"].get("text", {}).get("text_dim", cfg["hidden"])
        text = torch.randn(b, args.text_len, text_dim, device=dev, dtype=dt)
        mask = torch.ones(b, args.text_len, dtype=torch.uint8, device=dev)
        pooled = torch.randn(b, text_dim, device=dev, dtype=dt)
        sec = timed(lambda: model(img, t, text, mask, pooled), args.reps)
        print(f"BENCH torch_xl_forward_ms {sec * 1e3:.2f} ms")
        print(f"BENCH torch_xl_forward_images_per_s {b / sec:.1f} images/s")
        fwd = {"ms": round(sec * 1e3, 3), "images_per_s": round(b / sec, 3)}
        del model

        # One EC layer against a dense FFN of equal FLOPs, on B x 256 tokens.
        d, tokens = cfg["hidden"], (cfg["input_size"] // cfg["patch_size"]) ** 2
        moe = ExpertChoiceMoe(d, 4 * d, 8, 2.0).to(dev, dt)
        dense = ft.Mlp(d, 8 * d).to(dev, dt)
        xs = torch.randn(b, tokens, d, device=dev, dtype=dt)
        ms_moe = timed(lambda: moe(xs), args.reps * 2) * 1e3
        ms_dense = timed(lambda: dense(xs), args.reps * 2) * 1e3
        print(f"BENCH torch_ec_layer_ms {ms_moe:.3f} ms")
        print(f"BENCH torch_dense_ffn_equal_flops_ms {ms_dense:.3f} ms")
        print(f"BENCH torch_ec_over_dense {ms_moe / ms_dense:.2f} x")

    print(json.dumps({"impl": "torch-cuda", "torch": torch.__version__, "config": cfg["name"], "batch": b,
                      "dtype": "bf16", "forward": fwd, "matmul_peak_tflops": round(peak, 1),
                      "ec_layer_ms": round(ms_moe, 3), "dense_ffn_ms": round(ms_dense, 3)}))


if __name__ == "__main__":
    main()
