#!/usr/bin/env bash
# The whole GPU check in one command, on a machine with an NVIDIA GPU, its driver and PyTorch with
# CUDA wheels (no Rust, no network; see /work/shared/GPU.md). Build first on any machine with
# scripts/build-cuda.sh and bring .cuda/bin/gpu_check.gz along (17 MB; the binary itself, 62 MB, is
# too big to travel with the working tree: from a session with a lent GPU, the run tool with carry
# [".cuda/bin/gpu_check.gz"] and command scripts/gpu-check.sh). About 3-4 minutes on an H200.
#
#   scripts/gpu-check.sh [gpu_check flags, e.g. --batches 64,1024 --reps 2]
#
# 1. gpu_check: CPU vs CUDA on the fixtures and the bench model (CI, logits, active entries, sums,
#    output entries, the fixtures' graphs), `generate` on the GPU (fused kernels with one and two
#    workers, candle's ops) against the CPU's database, tf32 agreement, one prompt's graph at
#    32/128/512 tokens (tensor backend on the GPU vs host backend vs all-CPU), the fused CI pass
#    timed at batch sizes 64…16384 × 32 tokens, then `generate bench` on the GPU (1024 prompts);
# 2. scripts/gpu_check_torch.py: the same CI math in PyTorch, cross-checked and timed, and the
#    Rust/PyTorch table last.
# Exits non-zero if any check fails. With $OUT set, the JSON results are copied there.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bin="${GPU_CHECK_BIN:-$repo/.cuda/bin/gpu_check}"
work="${GPU_CHECK_WORK:-/tmp/spd-gpu-check}"
if [ ! -x "$bin" ] && [ -f "$bin.gz" ]; then
    mkdir -p "$work" && gunzip -c "$bin.gz" > "$work/gpu_check" && chmod +x "$work/gpu_check" && bin="$work/gpu_check"
fi
[ -x "$bin" ] || { echo "gpu-check: $bin(.gz) not found (run scripts/build-cuda.sh and carry .cuda/bin/gpu_check.gz)" >&2; exit 2; }
# The CUDA 13 libraries the binary links (cudart, cublas, nvrtc, curand) come with PyTorch's wheels.
libs="$(python3 -c 'import nvidia,glob,os;print(":".join(d for r in nvidia.__path__ for d in glob.glob(os.path.join(r,"*","lib"))))')"
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
mkdir -p "$work"
rm -f "$work"/rust_timings*.json
start=$SECONDS
timeout 330 "$bin" --work "$work" "$@"
rc=$?
echo "(gpu_check: exit $rc, $((SECONDS - start)) s)"
trc=0
if [ -f "$work/rust_timings.json" ]; then
    timeout 150 python3 scripts/gpu_check_torch.py --work "$work"
    trc=$?
    echo "(gpu_check_torch.py: exit $trc, $((SECONDS - start)) s in all)"
fi
if [ -n "${OUT:-}" ]; then
    cp -f "$work"/*.json "$OUT"/ 2>/dev/null || true
fi
[ "$rc" -eq 0 ] && [ "$trc" -eq 0 ]
