#!/usr/bin/env bash
# Device time of every kernel of one fused CI pass on the bench-shaped model (Nsight Compute), beside
# PyTorch's kernels for the same pass (torch.profiler), on a machine with an NVIDIA GPU, ncu and
# PyTorch (see /work/shared/GPU.md). Build first with scripts/build-cuda.sh and bring
# .cuda/bin/gpu_check.gz along, as for scripts/gpu-check.sh. About a minute.
#
#   scripts/gpu-profile.sh [batch, default 1024]   (prompts of 32 tokens)
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
work="${GPU_CHECK_WORK:-/tmp/spd-gpu-profile}"
mkdir -p "$work"
bin="${GPU_CHECK_BIN:-$repo/.cuda/bin/gpu_check}"
if [ ! -x "$bin" ] && [ -f "$bin.gz" ]; then
    gunzip -c "$bin.gz" > "$work/gpu_check" && chmod +x "$work/gpu_check" && bin="$work/gpu_check"
fi
[ -x "$bin" ] || { echo "gpu-profile: $bin(.gz) not found (run scripts/build-cuda.sh)" >&2; exit 2; }
libs="$(python3 -c 'import nvidia,glob,os;print(":".join(d for r in nvidia.__path__ for d in glob.glob(os.path.join(r,"*","lib"))))')"
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
batch="${1:-1024}"
# Timed without the profiler first (ncu locks clocks to base and flushes caches between kernels,
# so its times are longer than a plain run's; compare kernels with each other, not with wall time).
timeout 60 "$bin" --work "$work" --profile-batch "$batch" --reps 3 | tail -3
timeout 180 ncu --profile-from-start off --metrics gpu__time_duration.sum --csv \
    --log-file "$work/ncu.csv" "$bin" --work "$work" --profile-batch "$batch" --reps 1 > /dev/null
echo "(ncu: exit $?)"
python3 scripts/gpu_profile.py ncu "$work/ncu.csv"
timeout 90 python3 scripts/gpu_profile.py torch "$work" "$batch"
