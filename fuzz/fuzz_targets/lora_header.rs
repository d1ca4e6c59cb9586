//! LoRA (safetensors) headers: the tensor table, the adapter metadata and every key's
//! layout (diffusers/peft, kohya, kohya's SDXL block names). Any bytes give a header or
//! an error, never a panic; a key found to be a LoRA tensor names a module.
#![no_main]

use imagegen_engine::lora::read_lora_header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = read_lora_header(data, 2) {
        for (key, layout) in &header.keys {
            if let Some((_, module)) = layout {
                assert!(!module.is_empty(), "{key} names no module");
            }
        }
    }
});
