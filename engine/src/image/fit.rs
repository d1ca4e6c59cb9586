//! Fitting an input image to the size a model runs at, as diffusers' `VaeImageProcessor` does:
//!
//! - When a request gives no width and height, the input's own size rounded *down* to a
//!   multiple of 8 ([`default_size`], as diffusers' `get_default_height_width`) with a plain
//!   resize: at most 7 pixels of squeeze on a side, never a crop.
//! - With an explicit size, [`FitRule`] says what happens when the aspect ratios differ:
//!   [`FitRule::Resize`] stretches (diffusers' default), [`FitRule::Crop`] scales to cover
//!   and crops the centre, [`FitRule::Fill`] scales to fit inside and fills the rest by
//!   repeating the edge pixels.
//!
//! Resampling is Lanczos, diffusers' default (`resample="lanczos"`).

use image::imageops::FilterType;
use image::{DynamicImage, GenericImage, GenericImageView};

use crate::error::{Error, Result};
use crate::image::input::ImageLimits;

/// Side lengths handed to the models are multiples of this (the VAE downsamples by 8).
pub const SIDE_MULTIPLE: u32 = 8;

/// `side` rounded down to a multiple of [`SIDE_MULTIPLE`] (diffusers' default output size of
/// an input image); 0 below it.
pub fn round_down_to_side_multiple(side: u32) -> u32 {
    side - side % SIDE_MULTIPLE
}

/// The size a request without width and height runs at: the image's own, each side rounded
/// down to a multiple of 8. An image under 8 pixels on a side is refused.
pub fn default_size(image: &DynamicImage) -> Result<(u32, u32)> {
    let (width, height) = image.dimensions();
    let round = round_down_to_side_multiple;
    if round(width) == 0 || round(height) == 0 {
        return Err(Error::invalid(
            "image",
            format!(
                "{width}×{height} is too small: at least {SIDE_MULTIPLE}×{SIDE_MULTIPLE} pixels"
            ),
        ));
    }
    Ok((round(width), round(height)))
}

/// What to do when the image's aspect ratio differs from the requested size's (diffusers'
/// `resize_mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FitRule {
    /// Resize to exactly the requested size, stretching if need be (diffusers' "default").
    #[default]
    Resize,
    /// Scale to cover the requested size and crop the centre (diffusers' "crop").
    Crop,
    /// Scale to fit inside and fill the margins by repeating the edge pixels (diffusers'
    /// "fill"), so that nothing of the image is lost.
    Fill,
}

/// The image at exactly `width`×`height`, which must be positive multiples of 8.
pub fn fit_to_multiple(
    image: &DynamicImage,
    width: u32,
    height: u32,
    rule: FitRule,
) -> Result<DynamicImage> {
    for (field, value) in [("width", width), ("height", height)] {
        if value == 0 || !value.is_multiple_of(SIDE_MULTIPLE) {
            return Err(Error::invalid(
                field,
                format!("{value} must be a positive multiple of {SIDE_MULTIPLE}"),
            ));
        }
    }
    // A guard against absurd sizes from a caller, not the model's limit (the pipelines
    // check theirs): nothing here allocates more than the largest accepted input.
    let max_pixels = ImageLimits::default().max_pixels;
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(Error::invalid(
            "width",
            format!("{width}×{height} is more than {max_pixels} pixels"),
        ));
    }
    let (iw, ih) = image.dimensions();
    if iw == 0 || ih == 0 {
        return Err(Error::invalid("image", format!("the image is {iw}×{ih}")));
    }
    let resize = |w: u32, h: u32| {
        if (w, h) == (iw, ih) {
            image.clone()
        } else {
            image.resize_exact(w, h, FilterType::Lanczos3)
        }
    };
    // The same arithmetic as diffusers' `_resize_and_crop` / `_resize_and_fill`, so that the
    // scaled size and the offset agree with it to the pixel.
    let ratio = f64::from(width) / f64::from(height);
    let src_ratio = f64::from(iw) / f64::from(ih);
    // In u64: a 1-pixel-high panorama scaled to cover 512 rows would overflow u32.
    let scaled_w = |h: u32| u64::from(iw) * u64::from(h) / u64::from(ih);
    let scaled_h = |w: u32| u64::from(ih) * u64::from(w) / u64::from(iw);
    match rule {
        FitRule::Resize => Ok(resize(width, height)),
        FitRule::Crop => {
            let src_w = if ratio > src_ratio {
                u64::from(width)
            } else {
                scaled_w(height)
            };
            let src_h = if ratio <= src_ratio {
                u64::from(height)
            } else {
                scaled_h(width)
            };
            // Covering an extreme aspect ratio would mean scaling to an enormous image.
            if src_w.saturating_mul(src_h) > 4 * max_pixels {
                return Err(Error::invalid(
                    "image",
                    format!("a {iw}×{ih} image is too elongated to crop to {width}×{height}"),
                ));
            }
            // Covering means src_w >= width and src_h >= height: the crop lies inside.
            let resized = resize((src_w as u32).max(width), (src_h as u32).max(height));
            let x = resized.width() / 2 - width / 2;
            let y = resized.height() / 2 - height / 2;
            Ok(resized.crop_imm(x, y, width, height))
        }
        FitRule::Fill => {
            let src_w = if ratio < src_ratio {
                u64::from(width)
            } else {
                scaled_w(height)
            };
            let src_h = if ratio >= src_ratio {
                u64::from(height)
            } else {
                scaled_h(width)
            };
            // Fitting inside keeps both sides within the target; an extreme aspect ratio can
            // round one to 0, so keep at least one row or column.
            let resized = resize(
                src_w.clamp(1, u64::from(width)) as u32,
                src_h.clamp(1, u64::from(height)) as u32,
            );
            let (rw, rh) = resized.dimensions();
            let x0 = width / 2 - rw / 2;
            let y0 = height / 2 - rh / 2;
            let mut canvas = DynamicImage::new(width, height, resized.color());
            for y in 0..height {
                let sy = y.saturating_sub(y0).min(rh - 1);
                for x in 0..width {
                    let sx = x.saturating_sub(x0).min(rw - 1);
                    canvas.put_pixel(x, y, resized.get_pixel(sx, sy));
                }
            }
            Ok(canvas)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::input::tests::test_image;
    use image::{Rgb, RgbImage, Rgba, RgbaImage};

    #[test]
    fn default_size_rounds_down_to_multiples_of_8() {
        let size = |w, h| default_size(&DynamicImage::new_rgb8(w, h));
        assert_eq!(size(512, 512).unwrap(), (512, 512));
        assert_eq!(size(1023, 769).unwrap(), (1016, 768));
        assert_eq!(size(8, 15).unwrap(), (8, 8));
        let err = size(7, 600).unwrap_err().to_string();
        assert!(err.contains("7×600") && err.contains("too small"), "{err}");
        assert!(size(600, 3).is_err());
    }

    #[test]
    fn fit_rules_give_the_requested_size() {
        let image = DynamicImage::ImageRgb8(test_image(100, 50));
        for rule in [FitRule::Resize, FitRule::Crop, FitRule::Fill] {
            for (w, h) in [(64, 64), (128, 32), (16, 64), (96, 48)] {
                let out = fit_to_multiple(&image, w, h, rule).unwrap();
                assert_eq!(out.dimensions(), (w, h), "{rule:?}");
            }
        }
        let err = fit_to_multiple(&image, 60, 64, FitRule::Resize)
            .unwrap_err()
            .to_string();
        assert!(err.contains("width") && err.contains("60"), "{err}");
        assert!(fit_to_multiple(&image, 64, 0, FitRule::Crop).is_err());
        assert!(fit_to_multiple(&image, 8192, 8192, FitRule::Resize).is_err());
        // A 4000×1 strip cropped to 512×512 would first be scaled to 2048000×512.
        let strip = DynamicImage::new_rgb8(4000, 1);
        let err = fit_to_multiple(&strip, 512, 512, FitRule::Crop)
            .unwrap_err()
            .to_string();
        assert!(err.contains("too elongated"), "{err}");
        let filled = fit_to_multiple(&strip, 512, 512, FitRule::Fill).unwrap();
        assert_eq!(filled.dimensions(), (512, 512));
        // The same size is returned untouched.
        let same = DynamicImage::ImageRgb8(test_image(64, 32));
        assert_eq!(
            fit_to_multiple(&same, 64, 32, FitRule::Resize).unwrap(),
            same
        );
    }

    #[test]
    fn crop_keeps_the_centre_and_fill_repeats_the_edges() {
        // Three vertical bands, 30 px each: red | green | blue, 90×30.
        let bands = RgbaImage::from_fn(90, 30, |x, _| match x / 30 {
            0 => Rgba([255, 0, 0, 255]),
            1 => Rgba([0, 255, 0, 255]),
            _ => Rgba([0, 0, 255, 255]),
        });
        let image = DynamicImage::ImageRgba8(bands);
        // Cropping to a square keeps the middle band only (its columns 8..24 are clear of the
        // resampling filter's reach into the neighbouring bands).
        let cropped = fit_to_multiple(&image, 32, 32, FitRule::Crop)
            .unwrap()
            .to_rgb8();
        assert!(cropped
            .enumerate_pixels()
            .filter(|(x, _, _)| (8..24).contains(x))
            .all(|(_, _, p)| p[1] > 200 && p[0] < 40 && p[2] < 40));

        // Filling a square: the whole image in the middle, its top/bottom rows repeated.
        let wide = DynamicImage::ImageRgb8(RgbImage::from_fn(64, 16, |_, y| {
            Rgb([if y < 8 { 250 } else { 10 }, 0, 0])
        }));
        let filled = fit_to_multiple(&wide, 64, 64, FitRule::Fill)
            .unwrap()
            .to_rgb8();
        // Scaled to 64×16 (no change), placed at y = 24..40.
        assert_eq!(filled.get_pixel(5, 0)[0], 250);
        assert_eq!(filled.get_pixel(5, 23)[0], 250);
        assert_eq!(filled.get_pixel(5, 40)[0], 10);
        assert_eq!(filled.get_pixel(5, 63)[0], 10);
    }
}
