//! Parsing `--device cpu|cuda:N`.

use candle_core::Device;

/// `cpu` or `cuda:N` (`cuda` alone means `cuda:0`). CUDA needs the `cuda` cargo feature.
pub fn parse_device(spec: &str) -> Result<Device, String> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => n.parse::<usize>().map_err(|_| {
                    format!("invalid device `{s}`: expected cuda:N with N a GPU index")
                })?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(format!(
                    "device `{s}` needs a build with the `cuda` feature (cargo build --features cuda)"
                ));
            }
            Device::new_cuda(ordinal).map_err(|e| format!("cannot open {s}: {e}"))
        }
        other => Err(format!(
            "invalid device `{other}`: expected `cpu` or `cuda:N`"
        )),
    }
}

/// Lets cuBLAS run this process's float32 matmuls on CUDA devices in tf32 (a 10-bit mantissa in each
/// product): faster on Ampere and later cards, at a cost in agreement with the CPU that `gpu_check`
/// reports. Refused without the `cuda` feature, where it would silently do nothing.
pub fn set_tf32(on: bool) -> Result<(), String> {
    if !candle_core::utils::cuda_is_available() {
        return Err(
            "--tf32 needs a build with the `cuda` feature (cargo build --features cuda)".into(),
        );
    }
    candle_core::cuda::set_gemm_reduced_precision_f32(on);
    Ok(())
}

/// The `--tf32` flag: refused without the `cuda` feature, or when none of `devices` is a CUDA device
/// (it would change nothing); otherwise switches tf32 on.
pub fn enable_tf32_for(devices: &[Device]) -> Result<(), String> {
    if candle_core::utils::cuda_is_available() && devices.iter().all(Device::is_cpu) {
        return Err("--tf32 changes CUDA matmuls only; choose a cuda:N device".into());
    }
    set_tf32(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rejects_garbage() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(
            parse_device("gpu")
                .unwrap_err()
                .contains("expected `cpu` or `cuda:N`")
        );
        assert!(parse_device("cuda:x").unwrap_err().contains("cuda:N"));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn tf32_is_refused_without_cuda() {
        assert!(set_tf32(true).unwrap_err().contains("cuda"));
        assert!(
            enable_tf32_for(&[Device::Cpu])
                .unwrap_err()
                .contains("cuda")
        );
    }
}
