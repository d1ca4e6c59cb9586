//! Input images: decoding untrusted bytes, and grayscale as PIL computes it.
//!
//! Decoding accepts PNG, JPEG and WebP, recognised by their contents (a file name or a
//! content type from a client proves nothing). The EXIF orientation is applied, so a phone
//! photo comes out the way it was shot. The encoded size is checked before anything is
//! parsed, and the pixel count right after the header is read, before a single row is
//! decompressed: a small file that claims to be 100000×100000 (a decompression bomb) is
//! refused without allocating its pixels.

use std::io::{Cursor, Read};
use std::path::Path;

use image::{DynamicImage, GrayImage, ImageDecoder, ImageFormat, ImageReader, Limits, Luma, Rgb};

use crate::error::{Error, Result};

/// How much an input image may weigh, encoded and decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Encoded size in bytes.
    pub max_bytes: u64,
    /// Decoded width × height.
    pub max_pixels: u64,
}

impl Default for ImageLimits {
    /// 20 MiB encoded (a high-quality phone photo is under 10) and 16 megapixels decoded
    /// (4096×4096): far beyond what SD 1.x/2.x runs at, small enough to keep a server's
    /// memory bounded (16 Mpx RGBA is 64 MiB).
    fn default() -> Self {
        ImageLimits {
            max_bytes: 20 * 1024 * 1024,
            max_pixels: 16 * 1024 * 1024,
        }
    }
}

/// Decodes a PNG, JPEG or WebP image from untrusted bytes, with its EXIF orientation applied.
/// Errors are `invalid image: …`; nothing here panics on malformed data.
pub fn decode_image(bytes: &[u8], limits: &ImageLimits) -> Result<DynamicImage> {
    decode(bytes, limits).map_err(|message| Error::invalid("image", message))
}

/// Reads and decodes an image file; errors name the file.
pub fn load_image_file(path: &Path, limits: &ImageLimits) -> Result<DynamicImage> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    // Read at most one byte past the limit: enough to know it is exceeded, without reading
    // a huge file into memory first.
    let mut bytes = Vec::new();
    file.take(limits.max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io)?;
    decode(&bytes, limits)
        .map_err(|message| Error::invalid("image", format!("{}: {message}", path.display())))
}

fn decode(bytes: &[u8], limits: &ImageLimits) -> std::result::Result<DynamicImage, String> {
    if bytes.len() as u64 > limits.max_bytes {
        return Err(format!(
            "more than {} bytes (the limit for an input image)",
            limits.max_bytes
        ));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    match reader.format() {
        Some(ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP) => {}
        Some(other) => {
            return Err(format!(
                "{other:?} images are not accepted (PNG, JPEG or WebP)"
            ))
        }
        None => return Err("not a PNG, JPEG or WebP image".to_string()),
    }
    let side = u32::try_from(limits.max_pixels).unwrap_or(u32::MAX);
    let mut decoder_limits = Limits::default();
    decoder_limits.max_image_width = Some(side);
    decoder_limits.max_image_height = Some(side);
    // The decoder's own allocation cap must leave room for the largest allowed image
    // (16-bit RGBA is 8 bytes a pixel) plus its working buffers.
    let default_alloc = decoder_limits.max_alloc.unwrap_or(u64::MAX);
    decoder_limits.max_alloc = Some(default_alloc.max(limits.max_pixels.saturating_mul(16)));
    reader.limits(decoder_limits);

    // Only the header has been read once the decoder exists.
    let mut decoder = reader.into_decoder().map_err(describe)?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(format!("the image is {width}×{height} pixels"));
    }
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(format!(
            "{width}×{height} pixels is more than the limit of {} pixels",
            limits.max_pixels
        ));
    }
    let orientation = decoder.orientation().map_err(describe)?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(describe)?;
    image.apply_orientation(orientation);
    Ok(image)
}

fn describe(error: image::ImageError) -> String {
    match error {
        image::ImageError::Limits(_) => {
            "the image is larger than the decoder's limits allow".to_string()
        }
        other => format!("cannot decode: {other}"),
    }
}

/// A pixel's luma as PIL's `convert("L")` computes it: ITU-R BT.601,
/// L = R·299/1000 + G·587/1000 + B·114/1000, rounded to the nearest integer (PIL evaluates
/// it in 16-bit fixed point; truncating each term instead would turn white into 254).
pub fn luma_bt601(pixel: Rgb<u8>) -> u8 {
    let [r, g, b] = pixel.0.map(u32::from);
    ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8
}

/// The image in grayscale with [`luma_bt601`], as diffusers sees a mask after
/// `convert("L")` (the `image` crate's own `to_luma8` uses BT.709 weights instead).
pub fn to_luma_bt601(image: &DynamicImage) -> GrayImage {
    let rgb = image.to_rgb8();
    GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| {
        Luma([luma_bt601(*rgb.get_pixel(x, y))])
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use image::{GenericImageView, ImageEncoder, RgbImage};

    pub(crate) fn test_image(width: u32, height: u32) -> RgbImage {
        RgbImage::from_fn(width, height, |x, y| {
            Rgb([
                (x * 7 % 256) as u8,
                (y * 13 % 256) as u8,
                ((x + y) * 3 % 256) as u8,
            ])
        })
    }

    fn encode(image: &RgbImage, format: ImageFormat) -> Vec<u8> {
        let mut bytes = Vec::new();
        image
            .write_to(&mut Cursor::new(&mut bytes), format)
            .unwrap();
        bytes
    }

    fn max_channel_diff(a: &RgbImage, b: &RgbImage) -> u8 {
        a.as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap()
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &byte in data {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut chunk = (data.len() as u32).to_be_bytes().to_vec();
        chunk.extend_from_slice(kind);
        chunk.extend_from_slice(data);
        let mut crc_input = kind.to_vec();
        crc_input.extend_from_slice(data);
        chunk.extend_from_slice(&crc32(&crc_input).to_be_bytes());
        chunk
    }

    #[test]
    fn png_decodes_exactly() {
        let original = test_image(24, 16);
        let decoded = decode_image(
            &encode(&original, ImageFormat::Png),
            &ImageLimits::default(),
        )
        .unwrap();
        assert_eq!(decoded.to_rgb8(), original);
    }

    #[test]
    fn jpeg_decodes_close() {
        let original = RgbImage::from_pixel(32, 24, Rgb([200, 100, 50]));
        let decoded = decode_image(
            &encode(&original, ImageFormat::Jpeg),
            &ImageLimits::default(),
        )
        .unwrap()
        .to_rgb8();
        assert_eq!(decoded.dimensions(), (32, 24));
        assert!(max_channel_diff(&decoded, &original) <= 4);
    }

    #[test]
    fn lossless_webp_decodes_exactly() {
        let original = test_image(20, 12);
        let mut bytes = Vec::new();
        image::codecs::webp::WebPEncoder::new_lossless(&mut bytes)
            .write_image(original.as_raw(), 20, 12, image::ExtendedColorType::Rgb8)
            .unwrap();
        let decoded = decode_image(&bytes, &ImageLimits::default()).unwrap();
        assert_eq!(decoded.to_rgb8(), original);
    }

    #[test]
    fn the_format_comes_from_the_bytes() {
        // PNG bytes read through a path named .jpg still decode as PNG.
        let original = test_image(8, 8);
        let path = std::env::temp_dir().join(format!("imagegen-input-{}.jpg", std::process::id()));
        std::fs::write(&path, encode(&original, ImageFormat::Png)).unwrap();
        let decoded = load_image_file(&path, &ImageLimits::default()).unwrap();
        assert_eq!(decoded.to_rgb8(), original);
        std::fs::remove_file(&path).unwrap();
    }

    /// A JPEG with an APP1 EXIF segment saying Orientation = `orientation`.
    fn jpeg_with_orientation(image: &RgbImage, orientation: u16) -> Vec<u8> {
        let jpeg = encode(image, ImageFormat::Jpeg);
        assert_eq!(&jpeg[..2], &[0xff, 0xd8]);
        // TIFF, big-endian: header, then one IFD with a single SHORT entry.
        let mut tiff = b"MM\0\x2a".to_vec();
        tiff.extend_from_slice(&8u32.to_be_bytes()); // offset of the first IFD
        tiff.extend_from_slice(&1u16.to_be_bytes()); // one entry
        tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
        tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT
        tiff.extend_from_slice(&1u32.to_be_bytes()); // one value
        tiff.extend_from_slice(&orientation.to_be_bytes());
        tiff.extend_from_slice(&[0, 0]); // value padded to 4 bytes
        tiff.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
        let mut payload = b"Exif\0\0".to_vec();
        payload.extend_from_slice(&tiff);
        let mut out = jpeg[..2].to_vec();
        out.extend_from_slice(&[0xff, 0xe1]);
        out.extend_from_slice(&(payload.len() as u16 + 2).to_be_bytes());
        out.extend_from_slice(&payload);
        out.extend_from_slice(&jpeg[2..]);
        out
    }

    #[test]
    fn exif_orientation_is_applied() {
        // 32 wide, 16 tall: left half red, right half blue.
        let image = RgbImage::from_fn(32, 16, |x, _| {
            if x < 16 {
                Rgb([255, 0, 0])
            } else {
                Rgb([0, 0, 255])
            }
        });
        let bytes = jpeg_with_orientation(&image, 6);
        let decoded = decode_image(&bytes, &ImageLimits::default())
            .unwrap()
            .to_rgb8();
        // Orientation 6: displayed rotated 90° clockwise, so the left half ends up on top.
        assert_eq!(decoded.dimensions(), (16, 32));
        let top = decoded.get_pixel(8, 4);
        let bottom = decoded.get_pixel(8, 28);
        assert!(top[0] > 200 && top[2] < 60, "top {top:?}");
        assert!(bottom[2] > 200 && bottom[0] < 60, "bottom {bottom:?}");

        // Orientation 1 leaves it as stored.
        let upright =
            decode_image(&jpeg_with_orientation(&image, 1), &ImageLimits::default()).unwrap();
        assert_eq!(upright.dimensions(), (32, 16));
    }

    #[test]
    fn too_many_bytes_is_refused_before_parsing() {
        let bytes = encode(&test_image(16, 16), ImageFormat::Png);
        let limits = ImageLimits {
            max_bytes: bytes.len() as u64 - 1,
            ..ImageLimits::default()
        };
        let err = decode_image(&bytes, &limits).unwrap_err().to_string();
        assert!(err.contains("more than") && err.contains("bytes"), "{err}");
        // Garbage over the limit gets the same answer: the bytes are not even looked at.
        let err = decode_image(
            &[0u8; 100],
            &ImageLimits {
                max_bytes: 10,
                max_pixels: 10,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("more than 10 bytes"), "{err}");
    }

    #[test]
    fn a_decompression_bomb_is_refused_from_its_header() {
        // A valid PNG header claiming 100000×100000 RGB (30 GB decoded) and one tiny IDAT.
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&100_000u32.to_be_bytes());
        ihdr.extend_from_slice(&100_000u32.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB, deflate, no filter, no interlace
        let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
        bytes.extend(png_chunk(b"IHDR", &ihdr));
        bytes.extend(png_chunk(
            b"IDAT",
            &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
        ));
        bytes.extend(png_chunk(b"IEND", &[]));
        let err = decode_image(&bytes, &ImageLimits::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("100000×100000"), "{err}");

        // And a small image over a small pixel limit.
        let png = encode(&test_image(10, 10), ImageFormat::Png);
        let limits = ImageLimits {
            max_pixels: 99,
            ..ImageLimits::default()
        };
        let err = decode_image(&png, &limits).unwrap_err().to_string();
        assert!(
            err.contains("10×10 pixels is more than the limit of 99"),
            "{err}"
        );
    }

    #[test]
    fn corrupt_data_is_an_error_not_a_panic() {
        let limits = ImageLimits::default();
        let png = encode(&test_image(32, 32), ImageFormat::Png);
        let jpeg = encode(&test_image(32, 32), ImageFormat::Jpeg);
        let err = decode_image(b"hello, world", &limits)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a PNG, JPEG or WebP"), "{err}");
        assert!(decode_image(&[], &limits).is_err());
        // Cuts inside the header and inside the pixel data (the last 12 bytes are IEND).
        for cut in [8, 30, png.len() / 2, png.len() - 20] {
            assert!(
                decode_image(&png[..cut], &limits).is_err(),
                "PNG cut at {cut}"
            );
        }
        for cut in [8, 30] {
            assert!(
                decode_image(&jpeg[..cut], &limits).is_err(),
                "JPEG cut at {cut}"
            );
        }
        // A JPEG cut inside its scan decodes with the rest filled in, as browsers show it.
        let _ = decode_image(&jpeg[..jpeg.len() / 2], &limits);
        for bytes in [&png, &jpeg] {
            let mut flipped = bytes.clone();
            for i in (20..flipped.len()).step_by(7) {
                flipped[i] ^= 0x5a;
            }
            // Whatever a corrupted body decodes to, it must not panic.
            let _ = decode_image(&flipped, &limits);
        }
        // A recognised but unaccepted format.
        let gif_header = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;";
        let err = decode_image(gif_header, &limits).unwrap_err().to_string();
        assert!(err.contains("not accepted"), "{err}");
    }

    #[test]
    fn a_missing_file_is_named() {
        let path = Path::new("/nonexistent/imagegen/input.png");
        let err = load_image_file(path, &ImageLimits::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/imagegen/input.png"), "{err}");
    }

    #[test]
    fn luma_matches_pil() {
        let image = DynamicImage::ImageRgb8(RgbImage::from_fn(2, 1, |x, _| {
            if x == 0 {
                Rgb([255, 255, 255])
            } else {
                Rgb([10, 200, 30])
            }
        }));
        assert_eq!(to_luma_bt601(&image).as_raw(), &vec![255, 124]);
    }
}
