#!/usr/bin/env python3
"""The CI pass of the bench-shaped model in PyTorch, timed like `gpu_check`'s fused pass.

Reads what `gpu_check` wrote into --work (the model as a run, its shape, a check batch with the
Rust results, the Rust timings), then:
1. runs the check batch and compares per-component CI sums, firing counts and the number of active
   entries with the Rust CUDA results;
2. times the same math (GPT2Simple forward; per decomposed module the shared_mlp CI network with exact
   GELU, lower-leaky-hard CI = clamp(z, 0, 1) in float32; active entries (prompt, position, column, CI)
   with CI >= threshold copied to the host; per-component CI sums and firing counts) at the same batch
   sizes;
3. prints the Rust/PyTorch table last.

Needs only PyTorch (no safetensors, numpy or yaml packages).
"""

import argparse
import json
import math
import os
import struct
import sys
import time

import torch
import torch.nn.functional as F


def load_safetensors(path, device):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out = {}
    for key, v in header.items():
        if key == "__metadata__":
            continue
        if v["dtype"] != "F32":
            raise SystemExit(f"{path}: {key} is {v['dtype']}, expected F32")
        s, e = v["data_offsets"]
        t = torch.frombuffer(bytearray(data[base + s : base + e]), dtype=torch.float32)
        out[key] = t.reshape(v["shape"]).to(device)
    return out


class Model:
    def __init__(self, meta, tensors):
        self.meta = meta
        self.w = {k[len("target_model.") :]: v for k, v in tensors.items() if k.startswith("target_model.")}
        if "lm_head.weight" not in self.w:
            self.w["lm_head.weight"] = self.w["wte.weight"]
        self.c = meta["c"]
        self.ci = {}
        self.col0 = {}
        for i, name in enumerate(meta["modules"]):
            dash = name.replace(".", "-")
            layers = []
            for l in range(len(meta["ci_hidden"]) + 1):
                key = f"_ci_fns.{dash}.layers.{2 * l}"
                layers.append((tensors[f"{key}.W"], tensors[f"{key}.b"]))
            self.ci[name] = layers
            self.col0[name] = i * self.c

    def ci_pass(self, tokens, thr, fire, logits_out=None):
        """Returns (entries [K, 4] int32 on the host, sums, firing counts, device seconds); appends
        the logits (on the host) to `logits_out` if given."""
        dev = tokens.device
        t0 = time.perf_counter()
        B, T = tokens.shape
        W = self.w
        entries, sums, fires = [], [], []

        def module_ci(name, x):
            h = x.reshape(B * T, -1)
            layers = self.ci[name]
            for i, (w, b) in enumerate(layers):
                h = torch.addmm(b, h, w)
                if i + 1 < len(layers):
                    h = F.gelu(h)  # exact (erf)
            ci = h.clamp_(0.0, 1.0)
            sums.append(ci.sum(0))
            fires.append((ci > fire).sum(0, dtype=torch.int32))
            idx = (ci >= thr).nonzero()
            vals = ci[idx[:, 0], idx[:, 1]]
            row = idx[:, 0].to(torch.int32)
            col = idx[:, 1].to(torch.int32) + self.col0[name]
            entries.append(torch.stack([row // T, row % T, col, vals.view(torch.int32)], 1))

        def lin(name, x):
            if name in self.ci:
                module_ci(name, x)
            return F.linear(x, W[name + ".weight"], W[name + ".bias"])

        def ln(x, name):
            return F.layer_norm(x, (x.shape[-1],), W[name + ".weight"], W[name + ".bias"], eps=1e-5)

        m = self.meta
        d, nh = m["n_embd"], m["n_head"]
        hd = d // nh
        mask = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        x = W["wte.weight"][tokens] + W["wpe.weight"][:T]
        for i in range(m["n_layer"]):
            p = f"h.{i}"
            h = ln(x, f"{p}.ln_1")
            q, k, v = (
                lin(f"{p}.attn.{n}_proj", h).view(B, T, nh, hd).transpose(1, 2) for n in "qkv"
            )
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
            att = att.masked_fill(~mask, float("-inf")).softmax(-1)
            y = (att @ v).transpose(1, 2).reshape(B, T, d)
            x = x + lin(f"{p}.attn.o_proj", y)
            h = ln(x, f"{p}.ln_2")
            h = F.gelu(lin(f"{p}.mlp.c_fc", h), approximate="tanh")
            x = x + lin(f"{p}.mlp.down_proj", h)
        logits = F.linear(ln(x, "ln_f"), W["lm_head.weight"])
        ent = torch.cat(entries)
        s = torch.cat(sums)
        f = torch.cat(fires)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t_dev = time.perf_counter() - t0
        if logits_out is not None:
            logits_out.append(logits.cpu())
        del logits
        return ent.cpu(), s.cpu(), f.cpu(), t_dev


def matmul_rate(dev, n=8192, reps=5):
    """The card's measured float32 matmul rate (FLOP/s, tf32 off): best of `reps` n×n products."""
    if dev.type != "cuda":
        return None
    a = torch.randn(n, n, device=dev)
    b = torch.randn(n, n, device=dev)
    torch.mm(a, b)
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    del a, b
    return 2 * n**3 / best


def flops_per_token(meta):
    """Matmul FLOPs of one token's CI pass: the target forward's projections and unembedding, and
    every module's CI network (shared_mlp: d_in → hidden… → C). Element-wise work is not counted, so
    the floor it gives is optimistic."""
    d, c = meta["n_embd"], meta["c"]
    d_in = lambda name: 4 * d if name.endswith("down_proj") else d
    target = meta["n_layer"] * 2 * (4 * d * d + 2 * d * 4 * d) + 2 * d * meta["vocab_size"]
    ci = 0
    for name in meta["modules"]:
        dims = [d_in(name)] + list(meta["ci_hidden"]) + [c]
        ci += sum(2 * a * b for a, b in zip(dims, dims[1:]))
    return target + ci


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/spd-gpu-check")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default=None, help="comma-separated; default: gpu_check's")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    torch.set_grad_enabled(False)
    dev = torch.device(args.device)

    def read(name):
        with open(os.path.join(args.work, name)) as f:
            return json.load(f)

    meta = read("bench_model.json")
    model = Model(meta, load_safetensors(os.path.join(meta["run_dir"], "model.safetensors"), dev))
    thr, fire, seq, reps = meta["threshold"], meta["firing"], meta["seq"], meta["reps"]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"## PyTorch {torch.__version__} on {name}\n")

    ok = True
    check = read("bench_check.json")
    tokens = torch.tensor(check["tokens"], dtype=torch.long, device=dev)
    logits = []
    ent, sums, fires, _ = model.ci_pass(tokens, thr, fire, logits)
    want = torch.tensor(check["sum_ci"])
    # The logits against the Rust CPU path's, on the same scale as gpu_check's table
    # (|Δ| / max(1, |x|)): how far float32 on this card lands from the CPU, whoever computes it.
    with open(os.path.join(args.work, check["logits_file"]), "rb") as f:
        cpu_logits = torch.frombuffer(bytearray(f.read()), dtype=torch.float32)  # little-endian
    cpu_logits = cpu_logits.view(logits[0].shape)
    logit_rel = ((logits[0] - cpu_logits).abs() / cpu_logits.abs().clamp(min=1.0)).max().item()
    sum_rel = ((sums - want).abs() / want.abs().clamp(min=1.0)).max().item()
    fire_diff = (fires - torch.tensor(check["n_firing"], dtype=torch.int32)).abs().max().item()
    n_rust = check["n_active"]
    print("| check (8×32, bench model) | PyTorch | Rust CUDA |")
    print("|---|---|---|")
    print(f"| active entries | {ent.shape[0]} | {n_rust} |")
    print(f"| max rel. Δ CI sum | {sum_rel:.1e} | |")
    print(f"| max Δ firing count | {fire_diff} | |")
    print(f"| logits vs the Rust CPU path, max \\|Δ\\|/max(1, \\|x\\|) | {logit_rel:.1e} | {check['fused_logits']:.1e} |\n")
    # Different summation orders: a few entries within rounding of the threshold may differ.
    if sum_rel > 1e-4 or abs(ent.shape[0] - n_rust) > max(2, n_rust // 10000):
        print("**PyTorch and Rust CUDA disagree on the check batch**\n")
        ok = False

    rate = matmul_rate(dev)
    fpt = flops_per_token(meta)
    floor = rate / fpt if rate else None
    if rate:
        print(
            f"float32 matmul rate measured on this card: {rate / 1e12:.1f} TFLOP/s; the CI pass is "
            f"{fpt / 1e6:.1f} MFLOP per token of matmuls, so its float32 floor is {floor:.3e} tokens/s\n"
        )

    rust = {r["batch"]: r for r in read("rust_timings.json")}
    batches = [int(b) for b in args.batches.split(",")] if args.batches else meta["batches"]
    gen = torch.Generator(device="cpu").manual_seed(11)
    torch_rows = {}
    for b in batches:
        tokens = torch.randint(0, meta["vocab_size"], (b, seq), generator=gen).to(dev)
        try:
            best_dev, best_tot, n = math.inf, math.inf, 0
            for r in range(reps + 1):
                t0 = time.perf_counter()
                ent, _, _, t_dev = model.ci_pass(tokens, thr, fire)
                t_tot = time.perf_counter() - t0
                n = ent.shape[0]
                del ent
                if r > 0:  # the first is a warm-up
                    best_dev, best_tot = min(best_dev, t_dev), min(best_tot, t_tot)
            torch_rows[b] = (best_dev, best_tot, n)
        except torch.OutOfMemoryError:
            torch_rows[b] = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    def tps(b, s):
        return b * seq / s if s else float("nan")

    def fmt(x):
        return "—" if x is None or x != x else f"{x:.3e}"

    print(f"## CI pass, tokens/s ({seq} tokens per prompt, best of {reps}; ratio = Rust fused / PyTorch)\n")
    print("| batch | tokens | Rust fused | PyTorch | ratio | of fp32 floor | Rust fused + copy | PyTorch + copy | ratio | candle unfused | entries Rust / PyTorch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for b in batches:
        r, t = rust.get(b), torch_rows.get(b)
        rd = tps(b, r["device_s"]) if r else None
        rt = tps(b, r["total_s"]) if r else None
        ru = tps(b, r["unfused_s"]) if r and r.get("unfused_s") else None
        td = tps(b, t[0]) if t else None
        tt = tps(b, t[1]) if t else None
        ratio = lambda a, c: f"{a / c:.2f}" if a and c else "—"
        of_floor = f"{100 * rd / floor:.0f} %" if rd and floor else "—"
        print(
            f"| {b} | {b * seq} | {fmt(rd)} | {fmt(td)} | {ratio(rd, td)} | {of_floor} | {fmt(rt)} | {fmt(tt)} "
            f"| {ratio(rt, tt)} | {fmt(ru)} | {r['entries'] if r else '—'} / {t[2] if t else '—'} |"
        )
    tf32_path = os.path.join(args.work, "rust_timings_tf32.json")
    if os.path.exists(tf32_path):
        print("\n## Rust fused CI pass with tf32 matmuls (opt-in), tokens/s\n")
        print("| batch | float32 | tf32 | speed-up |")
        print("|---|---|---|---|")
        for r in read("rust_timings_tf32.json"):
            f32 = rust.get(r["batch"])
            a = tps(r["batch"], f32["device_s"]) if f32 else None
            t32 = tps(r["batch"], r["device_s"])
            print(f"| {r['batch']} | {fmt(a)} | {fmt(t32)} | {t32 / a:.2f} |" if a else f"| {r['batch']} | — | {fmt(t32)} | — |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
