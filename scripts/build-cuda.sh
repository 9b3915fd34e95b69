#!/usr/bin/env bash
# Builds the server crate with the `cuda` feature (no GPU needed) into target-cuda/, then copies the
# binaries the GPU check needs into .cuda/bin/. Pass extra cargo arguments after the script name.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
# shellcheck source=cuda-env.sh
. scripts/cuda-env.sh
[ -n "${CUDA_ROOT:-}" ] || exit 1
cargo build --release -p server --features cuda --bins "$@"
mkdir -p .cuda/bin
for b in gpu_check; do
    if [ -f "$CARGO_TARGET_DIR/release/$b" ]; then
        cp -f "$CARGO_TARGET_DIR/release/$b" .cuda/bin/
        strip .cuda/bin/$b 2>/dev/null || true
        # What travels to a lent GPU is limited to 64 MiB with the working tree: carry the .gz.
        gzip -6 -c .cuda/bin/$b > .cuda/bin/$b.gz
    fi
done
ls -la .cuda/bin
