//! Devices and dtypes as the command line and the service name them.

use tch::{Device, Kind};

/// A device by name: `cpu`, `cuda`, `cuda:N` or `auto` (also what none means: CUDA when this
/// machine has it, else the CPU). `setting` names where the text came from in the error
/// (`--device` on the command line).
pub fn parse_device(text: Option<&str>, setting: &str) -> std::result::Result<Device, String> {
    match text {
        None | Some("auto") => Ok(Device::cuda_if_available()),
        Some("cpu") => Ok(Device::Cpu),
        Some("cuda") => Ok(Device::Cuda(0)),
        Some(other) => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(index)) => Ok(Device::Cuda(index)),
            _ => Err(format!(
                "invalid {setting} `{other}` (expected cpu, cuda, cuda:N or auto)"
            )),
        },
    }
}

/// A dtype by name (`f32`, `f16`, `bf16`); none means f16 on CUDA and f32 on the CPU.
pub fn parse_dtype(
    text: Option<&str>,
    device: Device,
    setting: &str,
) -> std::result::Result<Kind, String> {
    match text {
        None if device.is_cuda() => Ok(Kind::Half),
        None => Ok(Kind::Float),
        Some("f32" | "fp32" | "float32") => Ok(Kind::Float),
        Some("f16" | "fp16" | "float16") => Ok(Kind::Half),
        Some("bf16" | "bfloat16") => Ok(Kind::BFloat16),
        Some(other) => Err(format!(
            "invalid {setting} `{other}` (expected f32, f16 or bf16)"
        )),
    }
}

/// An error unless the device is the CPU or a CUDA device this machine has (checked before
/// a slow model load that would fail late).
pub fn check_device(device: Device, setting: &str) -> std::result::Result<(), String> {
    if let Device::Cuda(index) = device {
        if !tch::Cuda::is_available() || index >= tch::Cuda::device_count() as usize {
            return Err(format!(
                "{setting} cuda:{index} is not available on this machine"
            ));
        }
    }
    Ok(())
}
