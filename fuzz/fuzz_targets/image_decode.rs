//! Uploaded images (PNG, JPEG, WebP; EXIF orientation; byte and pixel limits checked before
//! decompressing): any bytes give an image within the limits or an error, never a panic.
#![no_main]

use imagegen_engine::image::input::{decode_image, ImageLimits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = ImageLimits::default();
    if let Ok(image) = decode_image(data, &limits) {
        let pixels = u64::from(image.width()) * u64::from(image.height());
        assert!(
            pixels <= limits.max_pixels,
            "{pixels} pixels passed the limit"
        );
    }
});
