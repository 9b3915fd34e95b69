"""Kernel time tables for scripts/gpu-profile.sh.

  gpu_profile.py ncu NCU_CSV      sums an `ncu --csv --metrics gpu__time_duration.sum` log by kernel
  gpu_profile.py torch WORK BATCH PyTorch's CI pass (gpu_check_torch.Model) at BATCH prompts under
                                  torch.profiler, on the bench model `gpu_check --profile-batch` wrote
"""
import collections
import csv
import json
import os
import sys

UNIT_MS = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3}


def table(rows, title, top=30):
    total = sum(t for t, _, _ in rows)
    print(f"\n{title}: {total:.2f} ms in {sum(c for _, c, _ in rows)} launches\n")
    print("| ms | launches | kernel |\n|---:|---:|---|")
    for t, c, k in sorted(rows, reverse=True)[:top]:
        print(f"| {t:.2f} | {c} | `{k[:110]}` |")


def ncu(path):
    time, count = collections.defaultdict(float), collections.Counter()
    with open(path) as f:
        lines = [line for line in f if line.startswith('"')]
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        ms = float(row["Metric Value"].replace(",", "")) * UNIT_MS.get(row.get("Metric Unit"), 1e-6)
        time[row["Kernel Name"]] += ms
        count[row["Kernel Name"]] += 1
    table([(t, count[k], k) for k, t in time.items()], "Rust fused pass under ncu (base clocks)")


def torch_profile(work, batch):
    import torch
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import gpu_check_torch as g

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_grad_enabled(False)
    dev = torch.device("cuda")
    with open(os.path.join(work, "bench_model.json")) as f:
        meta = json.load(f)
    model = g.Model(meta, g.load_safetensors(os.path.join(meta["run_dir"], "model.safetensors"), dev))
    tokens = torch.randint(0, meta["vocab_size"], (batch, meta["seq"]), device=dev)
    best = min(model.ci_pass(tokens, meta["threshold"], 0.0)[3] for _ in range(3))
    print(f"\nPyTorch pass on the device, batch {batch} × {meta['seq']}: {best:.4f} s")
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        model.ci_pass(tokens, meta["threshold"], 0.0)
    rows = [(e.device_time_total / 1e3, e.count, e.key) for e in p.key_averages()]
    table([r for r in rows if r[0] > 0], "PyTorch pass under torch.profiler (incl. its copy to the host)")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "ncu":
        ncu(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "torch":
        torch_profile(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(__doc__)
