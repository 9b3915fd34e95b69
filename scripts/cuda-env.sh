# Source me: sets up the CUDA 13.0 toolkit (from PyPI, see /work/shared/GPU.md) for building the
# `cuda` feature on a machine without a GPU or a system CUDA install.
#
#   . scripts/cuda-env.sh        # installs into .cuda/ on first use, then only exports
#
# Exports CUDA_ROOT, CUDA_HOME, NVCC, PATH, CUDA_COMPUTE_CAP, CUDARC_CUDA_VERSION, RUSTFLAGS and
# CARGO_TARGET_DIR (target-cuda/, so the default target/ keeps its own RUSTFLAGS and cache).

_cuda_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_cuda_dir="$_cuda_repo/.cuda"
_cuda_tk="$_cuda_dir/toolkit"
_cuda_link="$_cuda_dir/link"

_cuda_setup() {
    # The meta-package pins crt/nvvm to 13.0: alone, pip picks 13.5, whose PTX the 580 driver rejects.
    if [ ! -x "$_cuda_tk/nvidia/cu13/bin/nvcc" ]; then
        echo "cuda-env: installing cuda-toolkit 13.0.2 into $_cuda_tk" >&2
        python3 -m pip install --quiet --disable-pip-version-check --target "$_cuda_tk" \
            'cuda-toolkit[cublas,cudart,curand,nvrtc,nvcc,cccl,crt,nvvm]==13.0.2' || return 1
    fi
    local root="$_cuda_tk/nvidia/cu13"
    mkdir -p "$_cuda_link" || return 1
    # candle hard-enables cudarc's dynamic-linking: the linker wants unversioned names.
    local l
    for l in cublas cublasLt cudart nvrtc; do
        ln -sfn "$root/lib/lib$l.so.13" "$_cuda_link/lib$l.so"
    done
    local curand
    curand="$(ls "$root"/lib/libcurand.so.10* 2>/dev/null | head -n1)"
    [ -n "$curand" ] || curand="$(find "$_cuda_tk/nvidia" -name 'libcurand.so.10*' | head -n1)"
    [ -n "$curand" ] || { echo "cuda-env: libcurand.so.10 not found under $_cuda_tk" >&2; return 1; }
    ln -sfn "$curand" "$_cuda_link/libcurand.so"
    # A stub driver library to link against; the GPU machine's driver provides the real libcuda.so.1.
    if [ ! -f "$_cuda_link/libcuda.so" ]; then
        local sys
        sys="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs 2>/dev/null | sort | tail -n1)"
        [ -n "$sys" ] || { echo "cuda-env: cudarc sources not found (run cargo fetch first)" >&2; return 1; }
        grep -o 'pub unsafe fn cu[A-Za-z0-9_]*' "$sys" | sed 's/pub unsafe fn //' | sort -u \
            | sed 's/.*/int &(void){return 999;}/' >"$_cuda_link/libcuda_stub.c"
        gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$_cuda_link/libcuda.so" "$_cuda_link/libcuda_stub.c" \
            || return 1
    fi
}

if _cuda_setup; then
    export CUDA_ROOT="$_cuda_tk/nvidia/cu13"
    export CUDA_HOME="$CUDA_ROOT"
    export NVCC="$CUDA_ROOT/bin/nvcc"
    case ":$PATH:" in *":$CUDA_ROOT/bin:"*) ;; *) export PATH="$CUDA_ROOT/bin:$PATH" ;; esac
    # No GPU here to ask: build for H100/H200 (sm_90).
    export CUDA_COMPUTE_CAP=90
    export CUDARC_CUDA_VERSION=13000
    export RUSTFLAGS="--cfg erase_components -L native=$_cuda_link"
    export CARGO_TARGET_DIR="$_cuda_repo/target-cuda"
    grep -qx '/target-cuda' "$_cuda_repo/.git/info/exclude" 2>/dev/null \
        || echo '/target-cuda' >>"$_cuda_repo/.git/info/exclude"
else
    echo "cuda-env: setup failed" >&2
fi
unset -f _cuda_setup
unset _cuda_repo _cuda_dir _cuda_tk _cuda_link
