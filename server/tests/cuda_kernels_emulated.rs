//! The fused CUDA kernels (`src/cuda/ci_kernels.cu`), compiled unchanged as C++ against a small CPU
//! emulation of the CUDA built-ins (`tests/cuda_emu/emu.h`: one OS thread per CUDA thread, a
//! barrier per block, warp shuffles through a block buffer) and checked against plain loops by
//! `tests/cuda_emu/check_kernels.cpp`. This runs the kernels' indexing, scans, reductions, atomics
//! and compaction on every machine, with or without a GPU or the CUDA toolkit; what it cannot
//! check (the PTX build, launch arguments, float behaviour of the real hardware) `gpu_check` does
//! on a GPU. Needs a C++20 compiler (`c++`; `make setup-test` installs g++).

use std::path::Path;
use std::process::Command;

#[test]
fn fused_kernels_match_plain_loops_under_cpu_emulation() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cuda_emu/check_kernels.cpp");
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("check_kernels");
    let build = Command::new("c++")
        .args(["-std=c++20", "-O1", "-pthread", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .expect("a C++ compiler (`c++`) emulates the CUDA kernels: run `make setup-test`");
    assert!(
        build.status.success(),
        "compiling the kernel emulation failed:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let run = Command::new(&exe).output().expect("run the kernel checks");
    let out = String::from_utf8_lossy(&run.stdout);
    println!("{out}");
    assert!(
        run.status.success() && out.contains("all kernel checks passed"),
        "kernel checks failed ({}):\n{out}{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
}
