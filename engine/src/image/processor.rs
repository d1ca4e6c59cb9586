//! Input images as diffusers' `VaeImageProcessor` prepares them from PIL images: resized
//! with PIL's Lanczos filter (its 8-bit fixed-point arithmetic, reproduced exactly), scaled
//! to [0, 1] as float32, then normalized to [-1, 1] (images) or binarized at 0.5 (masks).

use std::f64::consts::PI;

use image::{GrayImage, RgbImage};
use tch::{Kind, Tensor};

/// PIL keeps 8-bit filter coefficients as fixed-point integers with this many fraction bits.
const PRECISION_BITS: u32 = 32 - 8 - 2;
const LANCZOS_SUPPORT: f64 = 3.0;

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * PI;
        x.sin() / x
    }
}

fn lanczos(x: f64) -> f64 {
    if (-LANCZOS_SUPPORT..LANCZOS_SUPPORT).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// One output pixel's filter along an axis: the first input index and the fixed-point
/// weights of the inputs from there.
struct Tap {
    first: usize,
    weights: Vec<i64>,
}

/// PIL's per-axis Lanczos coefficients for resizing `in_size` to `out_size`.
fn taps(in_size: usize, out_size: usize) -> Vec<Tap> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = LANCZOS_SUPPORT * filter_scale;
    let inv = 1.0 / filter_scale;
    (0..out_size)
        .map(|out| {
            let center = (out as f64 + 0.5) * scale;
            // C's (int) conversion truncates toward zero, as `as` does.
            let first = ((center - support + 0.5) as i64).max(0);
            let end = ((center + support + 0.5) as i64).min(in_size as i64);
            let raw: Vec<f64> = (first..end)
                .map(|x| lanczos((x as f64 - center + 0.5) * inv))
                .collect();
            let total: f64 = raw.iter().sum();
            let one = f64::from(1u32 << PRECISION_BITS);
            let weights = raw
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    if w < 0.0 {
                        (-0.5 + w * one) as i32 as i64
                    } else {
                        (0.5 + w * one) as i32 as i64
                    }
                })
                .collect();
            Tap {
                first: first as usize,
                weights,
            }
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One pass of PIL's resize over an interleaved 8-bit image of `channels` bands, along
/// the rows (`horizontal`) or the columns.
fn resample_axis(
    src: &[u8],
    channels: usize,
    (in_w, in_h): (usize, usize),
    (out_w, out_h): (usize, usize),
    horizontal: bool,
) -> Vec<u8> {
    let taps = if horizontal {
        taps(in_w, out_w)
    } else {
        taps(in_h, out_h)
    };
    let mut out = vec![0u8; out_w * out_h * channels];
    let round = 1i64 << (PRECISION_BITS - 1);
    for y in 0..out_h {
        for x in 0..out_w {
            let tap = if horizontal { &taps[x] } else { &taps[y] };
            for c in 0..channels {
                let mut acc = round;
                for (j, &w) in tap.weights.iter().enumerate() {
                    let (sx, sy) = if horizontal {
                        (tap.first + j, y)
                    } else {
                        (x, tap.first + j)
                    };
                    acc += i64::from(src[(sy * in_w + sx) * channels + c]) * w;
                }
                out[(y * out_w + x) * channels + c] = clip8(acc);
            }
        }
    }
    out
}

/// PIL's `Image.resize((width, height), Image.LANCZOS)` on interleaved 8-bit samples:
/// a horizontal pass, then a vertical one, each only when that side changes.
fn resize_raw(src: &[u8], channels: usize, from: (u32, u32), to: (u32, u32)) -> Vec<u8> {
    let (in_w, in_h) = (from.0 as usize, from.1 as usize);
    let (out_w, out_h) = (to.0 as usize, to.1 as usize);
    let mut pixels = src.to_vec();
    let mut w = in_w;
    if out_w != in_w {
        pixels = resample_axis(&pixels, channels, (in_w, in_h), (out_w, in_h), true);
        w = out_w;
    }
    if out_h != in_h {
        pixels = resample_axis(&pixels, channels, (w, in_h), (w, out_h), false);
    }
    pixels
}

/// `image` resized to `width`×`height` as PIL's Lanczos resize does (a copy when the size
/// is already right).
pub fn resize_rgb(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    let raw = resize_raw(image.as_raw(), 3, image.dimensions(), (width, height));
    RgbImage::from_raw(width, height, raw).expect("resized buffer has the output size")
}

/// The single-channel ("L") counterpart of [`resize_rgb`].
pub fn resize_gray(image: &GrayImage, width: u32, height: u32) -> GrayImage {
    let raw = resize_raw(image.as_raw(), 1, image.dimensions(), (width, height));
    GrayImage::from_raw(width, height, raw).expect("resized buffer has the output size")
}

/// 8-bit samples `[h, w, c]` to float32 `[1, c, h, w]` in [0, 1] (`pil_to_numpy`: a
/// float32 division by 255, then `numpy_to_pt`).
fn unit_tensor(raw: &[u8], width: u32, height: u32, channels: i64) -> Tensor {
    let unit: Vec<f32> = raw.iter().map(|&v| f32::from(v) / 255.0).collect();
    Tensor::from_slice(&unit)
        .view([1, i64::from(height), i64::from(width), channels])
        .permute([0, 3, 1, 2])
        .contiguous()
}

/// An RGB image as the VAE takes it: float32 `[1, 3, h, w]` in [-1, 1].
pub fn image_tensor(image: &RgbImage) -> Tensor {
    let unit = unit_tensor(image.as_raw(), image.width(), image.height(), 3);
    unit * 2.0 - 1.0
}

/// A mask as diffusers' mask processor leaves it: float32 `[1, 1, h, w]`, 1 where the
/// 8-bit value scaled to [0, 1] is at least 0.5 (repaint), 0 elsewhere (keep).
pub fn mask_tensor(mask: &GrayImage) -> Tensor {
    let unit = unit_tensor(mask.as_raw(), mask.width(), mask.height(), 1);
    unit.ge(0.5).to_kind(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_a_copy() {
        let image = RgbImage::from_fn(9, 5, |x, y| image::Rgb([x as u8 * 20, y as u8 * 40, 7]));
        assert_eq!(resize_rgb(&image, 9, 5), image);
    }

    #[test]
    fn constant_images_stay_constant() {
        let image = GrayImage::from_pixel(37, 21, image::Luma([200]));
        let resized = resize_gray(&image, 16, 40);
        assert!(resized.pixels().all(|p| p.0[0] == 200));
    }

    #[test]
    fn masks_binarize_at_half() {
        let mask = GrayImage::from_raw(4, 1, vec![0, 127, 128, 255]).unwrap();
        let t = mask_tensor(&mask);
        assert_eq!(t.size(), vec![1, 1, 1, 4]);
        assert_eq!(
            Vec::<f32>::try_from(t.flatten(0, -1)).unwrap(),
            vec![0.0, 0.0, 1.0, 1.0]
        );
    }
}
