//! Image resizing exactly as Pillow's `Image.resize(size, Image.LANCZOS)` does it for 8-bit
//! RGB (diffusers' `VaeImageProcessor` resizes input images that way): separable Lanczos-3
//! with the kernel widened by the downscaling factor, coefficients normalised in double
//! precision and then rounded to 22-bit fixed point, a horizontal pass then a vertical pass,
//! each rounding to 8 bits.

use image::RgbImage;

/// Fixed-point fraction bits of the coefficients (Pillow's `PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;
const LANCZOS_SUPPORT: f64 = 3.0;

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

fn lanczos(x: f64) -> f64 {
    if (-LANCZOS_SUPPORT..LANCZOS_SUPPORT).contains(&x) {
        sinc(x) * sinc(x / LANCZOS_SUPPORT)
    } else {
        0.0
    }
}

/// For each output position: the first input index and the fixed-point weights.
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = LANCZOS_SUPPORT * filter_scale;
    let inv_scale = 1.0 / filter_scale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // Pillow rounds the bounds by adding 0.5 and truncating toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let weights: Vec<f64> = (xmin..xmax)
                .map(|x| lanczos((x as f64 - center + 0.5) * inv_scale))
                .collect();
            let total: f64 = weights.iter().fold(0.0, |acc, w| acc + w);
            let one = f64::from(1u32 << PRECISION_BITS);
            let fixed = weights
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    if w < 0.0 {
                        (-0.5 + w * one) as i32
                    } else {
                        (0.5 + w * one) as i32
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Resamples along one axis: `lines` lines of `in_len` pixels, where pixel `i` of line `l`
/// sits at `at(l, i)` in `src` (3 channels each); writes `lines` × `out_len` pixels, line by
/// line, in the same orientation.
fn resample_axis(
    src: &[u8],
    lines: usize,
    in_len: usize,
    out_len: usize,
    at: impl Fn(usize, usize) -> usize,
    out_at: impl Fn(usize, usize) -> usize,
    dst: &mut [u8],
) {
    let coeffs = coefficients(in_len, out_len);
    for line in 0..lines {
        for (o, (first, weights)) in coeffs.iter().enumerate() {
            let mut sums = [1i32 << (PRECISION_BITS - 1); 3];
            for (k, &w) in weights.iter().enumerate() {
                let p = at(line, first + k);
                for (c, sum) in sums.iter_mut().enumerate() {
                    *sum = sum.wrapping_add(i32::from(src[p + c]).wrapping_mul(w));
                }
            }
            let q = out_at(line, o);
            for (c, sum) in sums.iter().enumerate() {
                dst[q + c] = clip8(*sum);
            }
        }
    }
}

/// `image` resized to `width` × `height` as Pillow's Lanczos filter resizes it; the same
/// size returns a copy (Pillow does not resample then either).
pub fn resize_lanczos(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w0, h0) = (image.width() as usize, image.height() as usize);
    let (w1, h1) = (width as usize, height as usize);
    let mut pixels = image.as_raw().clone();
    let mut w = w0;
    if w1 != w0 {
        let mut out = vec![0u8; w1 * h0 * 3];
        resample_axis(
            &pixels,
            h0,
            w0,
            w1,
            |row, x| (row * w0 + x) * 3,
            |row, x| (row * w1 + x) * 3,
            &mut out,
        );
        pixels = out;
        w = w1;
    }
    if h1 != h0 {
        let mut out = vec![0u8; w * h1 * 3];
        resample_axis(
            &pixels,
            w,
            h0,
            h1,
            |col, y| (y * w + col) * 3,
            |col, y| (y * w + col) * 3,
            &mut out,
        );
        pixels = out;
    }
    RgbImage::from_raw(width, height, pixels).expect("buffer sized for the output")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_a_copy() {
        let image = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8, y as u8, 7]));
        assert_eq!(resize_lanczos(&image, 5, 3), image);
    }

    #[test]
    fn a_flat_image_stays_flat() {
        let image = RgbImage::from_pixel(37, 23, image::Rgb([200, 10, 99]));
        for (w, h) in [(64, 56), (16, 8), (37, 40)] {
            let out = resize_lanczos(&image, w, h);
            assert_eq!((out.width(), out.height()), (w, h));
            assert!(out.pixels().all(|p| p.0 == [200, 10, 99]), "{w}x{h}");
        }
    }
}
