//! Masks for inpainting: white (255) = repaint, black (0) = keep, grays in between blend.
//! Reading a drawn mask, growing, feathering and thresholding it. Pure image work; the
//! pipelines decide when to use what.

use image::{DynamicImage, GenericImageView, GrayImage, Luma};

use crate::error::{Error, Result};
use crate::image::input::to_luma_bt601;

/// The mask an uploaded image stands for. An image with transparency is read the way
/// OpenAI's image edits API defines it: transparent pixels are the ones to repaint, so the
/// mask is 255 − alpha. Otherwise its luma is the mask (as diffusers' `convert("L")`).
pub fn mask_from_image(image: &DynamicImage) -> GrayImage {
    if image.color().has_alpha() {
        let rgba = image.to_rgba8();
        // An alpha channel that is opaque everywhere carries no mask: PNG editors often save
        // one by default.
        if rgba.pixels().any(|p| p[3] < u8::MAX) {
            return GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
                Luma([u8::MAX - rgba.get_pixel(x, y)[3]])
            });
        }
    }
    to_luma_bt601(image)
}

/// Refuses a mask whose size differs from its image's.
pub fn check_same_size(image: &impl GenericImageView, mask: &impl GenericImageView) -> Result<()> {
    let (iw, ih) = image.dimensions();
    let (mw, mh) = mask.dimensions();
    if (iw, ih) != (mw, mh) {
        return Err(Error::invalid(
            "mask",
            format!("the mask is {mw}×{mh} but the image is {iw}×{ih}"),
        ));
    }
    Ok(())
}

/// Dilates the mask with a disk of radius `pixels`: each pixel becomes the largest value
/// within that Euclidean distance, so the repainted area grows evenly in every direction.
pub fn grow(mask: &GrayImage, pixels: u32) -> GrayImage {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    if pixels == 0 || w == 0 || h == 0 {
        return mask.clone();
    }
    let r = u64::from(pixels);
    let src = mask.as_raw();
    let mut out = vec![0u8; w * h];
    let mut rows = vec![0u8; w * h];
    // The disk is the union of horizontal spans: at vertical offset ±dy, a half-width of
    // floor(sqrt(r² − dy²)). Each span size costs one sliding maximum over the image (O(1)
    // per pixel), so the whole dilation is O(w·h·r) whatever the radius.
    let max_dy = r.min(h as u64 - 1) as usize;
    for dy in 0..=max_dy {
        let half_width = isqrt(r * r - (dy as u64) * (dy as u64)).min(w as u64) as usize;
        for (src_row, dst_row) in src.chunks_exact(w).zip(rows.chunks_exact_mut(w)) {
            sliding_max(src_row, half_width, dst_row);
        }
        for y in 0..h {
            let out_row = &mut out[y * w..(y + 1) * w];
            for source_y in [y.checked_sub(dy), Some(y + dy).filter(|&v| v < h)]
                .into_iter()
                .flatten()
            {
                let row = &rows[source_y * w..(source_y + 1) * w];
                for (o, &v) in out_row.iter_mut().zip(row) {
                    *o = (*o).max(v);
                }
            }
        }
    }
    GrayImage::from_raw(mask.width(), mask.height(), out)
        .expect("the buffer has width × height bytes")
}

fn isqrt(n: u64) -> u64 {
    let mut root = (n as f64).sqrt() as u64;
    while root * root > n {
        root -= 1;
    }
    while (root + 1) * (root + 1) <= n {
        root += 1;
    }
    root
}

/// `out[x]` = the maximum of `row[x - half_width ..= x + half_width]` (clipped to the row),
/// by van Herk/Gil-Werman: block-wise prefix and suffix maxima over the zero-padded row.
fn sliding_max(row: &[u8], half_width: usize, out: &mut [u8]) {
    let window = 2 * half_width + 1;
    let n = row.len();
    let padded_len = n + 2 * half_width;
    let value = |i: usize| {
        if i < half_width || i >= half_width + n {
            0
        } else {
            row[i - half_width]
        }
    };
    let mut prefix = vec![0u8; padded_len];
    let mut suffix = vec![0u8; padded_len];
    for i in 0..padded_len {
        prefix[i] = if i % window == 0 {
            value(i)
        } else {
            prefix[i - 1].max(value(i))
        };
    }
    for i in (0..padded_len).rev() {
        suffix[i] = if i % window == window - 1 || i == padded_len - 1 {
            value(i)
        } else {
            suffix[i + 1].max(value(i))
        };
    }
    for (x, o) in out.iter_mut().enumerate() {
        *o = suffix[x].max(prefix[x + window - 1]);
    }
}

/// Gaussian blur with standard deviation `sigma` pixels, edges extended, so that a feathered
/// mask fades its borders. Pure black stays 0 and pure white stays 255 (the result is
/// rounded, not truncated), which keeps "keep" pixels exactly kept. A non-positive sigma
/// leaves the mask as it is.
pub fn blur(mask: &GrayImage, sigma: f32) -> GrayImage {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    if !(sigma.is_finite() && sigma > 0.0) || w == 0 || h == 0 {
        return mask.clone();
    }
    let kernel = gaussian_kernel(sigma);
    let radius = (kernel.len() / 2) as isize;
    let clamp = |i: isize, n: usize| i.clamp(0, n as isize - 1) as usize;
    let src: Vec<f32> = mask.as_raw().iter().map(|&v| f32::from(v)).collect();
    let mut horizontal = vec![0f32; w * h];
    for y in 0..h {
        for x in 0..w {
            horizontal[y * w + x] = kernel
                .iter()
                .enumerate()
                .map(|(k, weight)| weight * src[y * w + clamp(x as isize + k as isize - radius, w)])
                .sum();
        }
    }
    let mut out = vec![0u8; w * h];
    for y in 0..h {
        for x in 0..w {
            let v: f32 = kernel
                .iter()
                .enumerate()
                .map(|(k, weight)| {
                    weight * horizontal[clamp(y as isize + k as isize - radius, h) * w + x]
                })
                .sum();
            out[y * w + x] = v.round().clamp(0.0, 255.0) as u8;
        }
    }
    GrayImage::from_raw(mask.width(), mask.height(), out)
        .expect("the buffer has width × height bytes")
}

/// A normalised Gaussian over ±3 sigma (99.7% of its weight).
fn gaussian_kernel(sigma: f32) -> Vec<f32> {
    // Cap the radius: a blur wider than any image is a flat average anyway.
    let radius = ((3.0 * sigma).ceil() as usize).clamp(1, 4096);
    let weights: Vec<f32> = (0..=2 * radius)
        .map(|i| {
            let d = i as f32 - radius as f32;
            (-(d * d) / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let sum: f32 = weights.iter().sum();
    weights.into_iter().map(|w| w / sum).collect()
}

/// 255 where the mask is above `threshold`, 0 elsewhere.
pub fn binarize(mask: &GrayImage, threshold: u8) -> GrayImage {
    let mut out = mask.clone();
    for p in out.pixels_mut() {
        p.0[0] = if p.0[0] > threshold { u8::MAX } else { 0 };
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use image::{Rgb, RgbImage, Rgba, RgbaImage};

    pub(crate) fn mask_with(width: u32, height: u32, rects: &[(u32, u32, u32, u32)]) -> GrayImage {
        GrayImage::from_fn(width, height, |x, y| {
            let inside = rects
                .iter()
                .any(|&(rx, ry, rw, rh)| (rx..rx + rw).contains(&x) && (ry..ry + rh).contains(&y));
            Luma([if inside { 255 } else { 0 }])
        })
    }

    #[test]
    fn mask_from_alpha_when_transparent_else_luma() {
        let mut rgba = RgbaImage::from_pixel(4, 2, Rgba([255, 255, 255, 255]));
        rgba.put_pixel(1, 0, Rgba([255, 255, 255, 0]));
        rgba.put_pixel(2, 0, Rgba([0, 0, 0, 128]));
        let mask = mask_from_image(&DynamicImage::ImageRgba8(rgba));
        assert_eq!(mask.get_pixel(0, 0)[0], 0);
        assert_eq!(mask.get_pixel(1, 0)[0], 255);
        assert_eq!(mask.get_pixel(2, 0)[0], 127);

        // Opaque alpha everywhere: the colours are the mask.
        let mut opaque = RgbaImage::from_pixel(2, 1, Rgba([0, 0, 0, 255]));
        opaque.put_pixel(1, 0, Rgba([255, 255, 255, 255]));
        let mask = mask_from_image(&DynamicImage::ImageRgba8(opaque));
        assert_eq!(mask.as_raw(), &vec![0, 255]);

        let rgb = RgbImage::from_fn(2, 1, |x, _| Rgb(if x == 0 { [255, 0, 0] } else { [0; 3] }));
        assert_eq!(
            mask_from_image(&DynamicImage::ImageRgb8(rgb)).as_raw(),
            &vec![76, 0]
        );
    }

    #[test]
    fn sizes_must_match() {
        check_same_size(&RgbImage::new(64, 64), &GrayImage::new(64, 64)).unwrap();
        let err = check_same_size(&RgbImage::new(64, 64), &GrayImage::new(64, 48))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "invalid mask: the mask is 64×48 but the image is 64×64"
        );
    }

    /// Dilation by brute force over the disk, to check the fast one against.
    fn grow_slowly(mask: &GrayImage, r: u32) -> GrayImage {
        let (w, h) = (mask.width() as i64, mask.height() as i64);
        let r = i64::from(r);
        GrayImage::from_fn(mask.width(), mask.height(), |x, y| {
            let mut best = 0;
            for dy in -r..=r {
                for dx in -r..=r {
                    let (sx, sy) = (i64::from(x) + dx, i64::from(y) + dy);
                    if dx * dx + dy * dy <= r * r && (0..w).contains(&sx) && (0..h).contains(&sy) {
                        best = best.max(mask.get_pixel(sx as u32, sy as u32)[0]);
                    }
                }
            }
            Luma([best])
        })
    }

    #[test]
    fn grow_is_a_disk_dilation() {
        let mut mask = GrayImage::new(23, 17);
        mask.put_pixel(11, 8, Luma([255]));
        let grown = grow(&mask, 3);
        // A disk of radius 3 around the point: (3, 0) is in, (3, 1) is out (3² + 1² > 9),
        // (2, 2) is in.
        assert_eq!(grown.get_pixel(14, 8)[0], 255);
        assert_eq!(grown.get_pixel(14, 9)[0], 0);
        assert_eq!(grown.get_pixel(13, 10)[0], 255);
        assert_eq!(grown.pixels().filter(|p| p[0] == 255).count(), 29);

        // Gray levels, borders and several radii against brute force.
        let varied = GrayImage::from_fn(31, 19, |x, y| Luma([((x * 37 + y * 91) % 256) as u8 / 3]));
        let mut sparse = mask_with(31, 19, &[(0, 0, 2, 1), (28, 15, 3, 4)]);
        sparse.put_pixel(15, 9, Luma([100]));
        for r in [1, 2, 5, 9, 40] {
            assert_eq!(grow(&varied, r), grow_slowly(&varied, r), "r = {r}");
            assert_eq!(grow(&sparse, r), grow_slowly(&sparse, r), "r = {r}");
        }
        assert_eq!(grow(&sparse, 0), sparse);
    }

    #[test]
    fn blur_feathers_edges_and_keeps_flat_areas_exact() {
        let mask = mask_with(40, 20, &[(20, 0, 20, 20)]);
        let blurred = blur(&mask, 2.0);
        // Far from the edge: exactly 0 and exactly 255.
        assert_eq!(blurred.get_pixel(5, 10)[0], 0);
        assert_eq!(blurred.get_pixel(35, 10)[0], 255);
        // At the edge: a ramp, symmetric around 127.5.
        let (a, b) = (blurred.get_pixel(19, 10)[0], blurred.get_pixel(20, 10)[0]);
        assert!(a > 60 && a < 128 && b > 128 && b < 196, "{a} {b}");
        assert_eq!(u32::from(a) + u32::from(b), 255);
        let row: Vec<u8> = (0..40).map(|x| blurred.get_pixel(x, 10)[0]).collect();
        assert!(row.windows(2).all(|p| p[0] <= p[1]), "{row:?}");
        assert_eq!(
            blur(&GrayImage::from_pixel(5, 5, Luma([255])), 3.0).get_pixel(0, 0)[0],
            255
        );
        assert_eq!(blur(&mask, 0.0), mask);
    }

    #[test]
    fn binarize_splits_at_the_threshold() {
        let mask = GrayImage::from_raw(4, 1, vec![0, 127, 128, 255]).unwrap();
        assert_eq!(binarize(&mask, 127).as_raw(), &vec![0, 0, 255, 255]);
    }
}
