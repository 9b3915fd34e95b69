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
}
