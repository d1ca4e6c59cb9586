//! The subcommands other than `serve` (which is the service's own): each parses its flags
//! with clap and calls the engine.

pub mod bench;
pub mod generate;
pub mod mask;
pub mod styles;
pub mod train;

use tch::{Device, Kind};

pub fn parse_device(text: Option<&str>) -> Result<Device, String> {
    imagegen_engine::device::parse_device(text, "--device")
}

pub fn parse_dtype(text: Option<&str>, device: Device) -> Result<Kind, String> {
    imagegen_engine::device::parse_dtype(text, device, "--dtype")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_and_dtype_flags() {
        assert_eq!(parse_device(Some("cpu")), Ok(Device::Cpu));
        assert_eq!(parse_device(Some("cuda:1")), Ok(Device::Cuda(1)));
        assert!(parse_device(Some("tpu")).is_err());
        assert_eq!(parse_dtype(None, Device::Cpu), Ok(Kind::Float));
        assert_eq!(parse_dtype(None, Device::Cuda(0)), Ok(Kind::Half));
        assert!(parse_dtype(Some("f8"), Device::Cpu).is_err());
    }
}
