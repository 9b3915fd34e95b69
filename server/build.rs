//! With the `cuda` feature, compiles the fused CI kernels (`src/cuda/ci_kernels.cu`) to PTX with nvcc;
//! without it, does nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/cuda/ci_kernels.cu");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in ["NVCC", "CUDA_ROOT", "CUDA_COMPUTE_CAP"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CUDA_ROOT").map(|r| PathBuf::from(r).join("bin/nvcc")))
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    // PTX for compute_XX is JIT-compiled by the driver for that and every later architecture.
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("ci_kernels.ptx");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", &format!("-arch=compute_{cap}"), "-o"])
        .arg(&out)
        .arg("src/cuda/ci_kernels.cu")
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} (the `cuda` feature needs nvcc: set NVCC or CUDA_ROOT, or source scripts/cuda-env.sh): {e}",
                nvcc.display()
            )
        });
    assert!(status.success(), "nvcc failed on src/cuda/ci_kernels.cu");
}
