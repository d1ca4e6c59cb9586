//! Where inpainting and outpainting work on the image: the crop region around a mask, the
//! crop pasted back, and the canvas extended for outpainting. Pure image work; the
//! pipelines decide when to use what.

use image::imageops::FilterType;
use image::{GrayImage, Luma, RgbImage};

use crate::error::{Error, Result};
use crate::image::fit::SIDE_MULTIPLE;
use crate::image::input::ImageLimits;
use crate::image::mask::{blur, check_same_size};

/// A rectangle of pixels: columns `x..x + width`, rows `y..y + height`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl Rect {
    /// One past the last column.
    pub fn right(&self) -> u32 {
        self.x + self.width
    }

    /// One past the last row.
    pub fn bottom(&self) -> u32 {
        self.y + self.height
    }
}

/// The region to inpaint at full resolution: exactly diffusers'
/// `VaeImageProcessor.get_crop_region(mask, width, height, pad)`. The bounding box of the
/// mask's non-zero pixels, grown by `padding` on each side (within the image), then widened
/// or heightened around its centre to the `width`:`height` aspect ratio, shifted back
/// inside the image where it overflows and clamped to it where it cannot fit.
///
/// An all-black mask (diffusers divides by zero there) gives the whole image.
pub fn crop_region(mask: &GrayImage, width: u32, height: u32, padding: u32) -> Rect {
    let whole = Rect {
        x: 0,
        y: 0,
        width: mask.width(),
        height: mask.height(),
    };
    let Some((left, top, right, bottom)) = bounding_box(mask) else {
        return whole;
    };
    let (w, h) = (i64::from(mask.width()), i64::from(mask.height()));
    let pad = i64::from(padding);
    let (mut x1, mut y1) = ((left - pad).max(0), (top - pad).max(0));
    let (mut x2, mut y2) = ((right + pad).min(w), (bottom + pad).min(h));

    // Python's float arithmetic, int() truncation and // floor division, step by step.
    let ratio_crop_region = (x2 - x1) as f64 / (y2 - y1) as f64;
    let ratio_processing = f64::from(width.max(1)) / f64::from(height.max(1));
    if ratio_crop_region > ratio_processing {
        let desired_height = (x2 - x1) as f64 / ratio_processing;
        let diff = (desired_height - (y2 - y1) as f64) as i64;
        y1 -= diff.div_euclid(2);
        y2 += diff - diff.div_euclid(2);
        if y2 >= h {
            let over = y2 - h;
            y2 -= over;
            y1 -= over;
        }
        if y1 < 0 {
            y2 -= y1;
            y1 = 0;
        }
        if y2 >= h {
            y2 = h;
        }
    } else {
        let desired_width = (y2 - y1) as f64 * ratio_processing;
        let diff = (desired_width - (x2 - x1) as f64) as i64;
        x1 -= diff.div_euclid(2);
        x2 += diff - diff.div_euclid(2);
        if x2 >= w {
            let over = x2 - w;
            x2 -= over;
            x1 -= over;
        }
        if x1 < 0 {
            x2 -= x1;
            x1 = 0;
        }
        if x2 >= w {
            x2 = w;
        }
    }
    // Every branch above ends with 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h.
    Rect {
        x: x1 as u32,
        y: y1 as u32,
        width: (x2 - x1) as u32,
        height: (y2 - y1) as u32,
    }
}

/// (first column, first row, last column + 1, last row + 1) of the non-zero pixels.
fn bounding_box(mask: &GrayImage) -> Option<(i64, i64, i64, i64)> {
    let mut bbox: Option<(u32, u32, u32, u32)> = None;
    for (x, y, p) in mask.enumerate_pixels() {
        if p[0] != 0 {
            bbox = Some(match bbox {
                None => (x, y, x, y),
                Some((l, t, r, b)) => (l.min(x), t.min(y), r.max(x), b.max(y)),
            });
        }
    }
    bbox.map(|(l, t, r, b)| {
        (
            i64::from(l),
            i64::from(t),
            i64::from(r) + 1,
            i64::from(b) + 1,
        )
    })
}

/// Puts an inpainted crop back into the full image. The crop (generated at the model's size)
/// is resized to `region`, and blended over `original` by the mask, blurred by `feather`
/// pixels (sigma): `out = original·(1 − m) + crop·m`. Where the blurred mask is 0 (and
/// everywhere outside `region`) the original's pixels are kept bit for bit.
///
/// The blur spreads the mask outward by about 3·feather pixels; keep `feather` below the
/// crop's padding so that the fade happens inside the region.
pub fn paste_back(
    original: &RgbImage,
    generated_crop: &RgbImage,
    region: Rect,
    mask: &GrayImage,
    feather: u32,
) -> Result<RgbImage> {
    check_same_size(original, mask)?;
    if region.width == 0
        || region.height == 0
        || region.right() > original.width()
        || region.bottom() > original.height()
    {
        return Err(Error::invalid(
            "region",
            format!(
                "{}×{} at ({}, {}) does not lie inside the {}×{} image",
                region.width,
                region.height,
                region.x,
                region.y,
                original.width(),
                original.height()
            ),
        ));
    }
    if generated_crop.width() == 0 || generated_crop.height() == 0 {
        return Err(Error::invalid("image", "the generated crop is empty"));
    }
    let crop = if generated_crop.dimensions() == (region.width, region.height) {
        generated_crop.clone()
    } else {
        image::imageops::resize(
            generated_crop,
            region.width,
            region.height,
            FilterType::Lanczos3,
        )
    };
    // Blur only the part of the mask that matters: the region plus the kernel's reach, so
    // the values inside the region equal those of blurring the whole mask.
    let reach = if feather == 0 {
        0
    } else {
        feather
            .saturating_mul(3)
            .min(original.width().max(original.height()))
    };
    let ax = region.x.saturating_sub(reach);
    let ay = region.y.saturating_sub(reach);
    let aw = (region.right() + reach).min(mask.width()) - ax;
    let ah = (region.bottom() + reach).min(mask.height()) - ay;
    let around = image::imageops::crop_imm(mask, ax, ay, aw, ah).to_image();
    let feathered = blur(&around, feather as f32);

    let mut out = original.clone();
    for y in 0..region.height {
        for x in 0..region.width {
            let (ox, oy) = (region.x + x, region.y + y);
            let m = u32::from(feathered.get_pixel(ox - ax, oy - ay)[0]);
            if m == 0 {
                continue;
            }
            let generated = crop.get_pixel(x, y);
            let pixel = out.get_pixel_mut(ox, oy);
            for c in 0..3 {
                let blended = u32::from(pixel[c]) * (255 - m) + u32::from(generated[c]) * m + 127;
                pixel[c] = (blended / 255) as u8;
            }
        }
    }
    Ok(out)
}

/// The canvas for outpainting: `image` with `left`, `right`, `top`, `bottom` pixels added,
/// the new area filled by repeating the nearest edge pixel (a better start for the model
/// than black), and a mask that is white exactly on the new area.
///
/// The canvas must be a multiple of 8 on each side for the VAE: when it is not, the right
/// and bottom margins grow to the next multiple (the original stays at (`left`, `top`)).
pub fn extend_canvas(
    image: &RgbImage,
    left: u32,
    right: u32,
    top: u32,
    bottom: u32,
) -> Result<(RgbImage, GrayImage)> {
    let (w, h) = image.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::invalid("image", format!("the image is {w}×{h}")));
    }
    let too_large = || {
        Error::invalid(
            "outpaint",
            format!(
                "the {w}×{h} image with margins left {left}, right {right}, top {top}, \
                 bottom {bottom} is more than {} pixels",
                ImageLimits::default().max_pixels
            ),
        )
    };
    let side = |a: u32, b: u32, c: u32| -> Option<u32> {
        let total = a.checked_add(b)?.checked_add(c)?;
        total.checked_next_multiple_of(SIDE_MULTIPLE)
    };
    let canvas_w = side(left, w, right).ok_or_else(too_large)?;
    let canvas_h = side(top, h, bottom).ok_or_else(too_large)?;
    if u64::from(canvas_w) * u64::from(canvas_h) > ImageLimits::default().max_pixels {
        return Err(too_large());
    }
    let canvas = RgbImage::from_fn(canvas_w, canvas_h, |x, y| {
        let sx = x.saturating_sub(left).min(w - 1);
        let sy = y.saturating_sub(top).min(h - 1);
        *image.get_pixel(sx, sy)
    });
    let mask = GrayImage::from_fn(canvas_w, canvas_h, |x, y| {
        let inside = (left..left + w).contains(&x) && (top..top + h).contains(&y);
        Luma([if inside { 0 } else { u8::MAX }])
    });
    Ok((canvas, mask))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::mask::tests::mask_with;
    use image::Rgb;

    #[test]
    fn crop_region_by_hand() {
        // A 128×32 box in a 512×512 image, processed at 512×512: widened to 128×128 around
        // its centre (diffusers' docstring example).
        let mask = mask_with(512, 512, &[(200, 300, 128, 32)]);
        assert_eq!(
            crop_region(&mask, 512, 512, 0),
            Rect {
                x: 200,
                y: 252,
                width: 128,
                height: 128
            }
        );
        // Padding 8: 144×48 → diff 96, 48 up and 48 down.
        assert_eq!(
            crop_region(&mask, 512, 512, 8),
            Rect {
                x: 192,
                y: 244,
                width: 144,
                height: 144
            }
        );
        // Near the bottom edge: the region is pushed back up inside the image.
        let low = mask_with(100, 100, &[(10, 90, 40, 10)]);
        assert_eq!(
            crop_region(&low, 64, 64, 0),
            Rect {
                x: 10,
                y: 60,
                width: 40,
                height: 40
            }
        );
        // Taller than the image allows: clamped to the full height.
        let wide = mask_with(100, 20, &[(0, 5, 100, 5)]);
        assert_eq!(
            crop_region(&wide, 64, 64, 0),
            Rect {
                x: 0,
                y: 0,
                width: 100,
                height: 20
            }
        );
        // No mask at all: the whole image.
        assert_eq!(
            crop_region(&GrayImage::new(30, 20), 64, 64, 4),
            Rect {
                x: 0,
                y: 0,
                width: 30,
                height: 20
            }
        );
    }

    #[test]
    fn paste_back_keeps_unmasked_pixels_and_places_the_crop() {
        let original = RgbImage::from_fn(64, 48, |x, y| Rgb([x as u8 * 3, y as u8 * 5, 7]));
        let region = Rect {
            x: 16,
            y: 8,
            width: 32,
            height: 24,
        };
        // Generated at twice the region's size, one colour.
        let generated = RgbImage::from_pixel(64, 48, Rgb([250, 10, 200]));
        let mask = mask_with(64, 48, &[(24, 12, 8, 8)]);

        let hard = paste_back(&original, &generated, region, &mask, 0).unwrap();
        for (x, y, p) in hard.enumerate_pixels() {
            if mask.get_pixel(x, y)[0] == 255 {
                assert_eq!(p.0, [250, 10, 200], "({x}, {y})");
            } else {
                assert_eq!(p, original.get_pixel(x, y), "({x}, {y})");
            }
        }

        // Feathered: blends near the mask's edge, still exact where the blurred mask is 0.
        let soft = paste_back(&original, &generated, region, &mask, 2).unwrap();
        let feathered = blur(&mask, 2.0);
        let mut blended = 0;
        for (x, y, p) in soft.enumerate_pixels() {
            let m = feathered.get_pixel(x, y)[0];
            if m == 0 {
                assert_eq!(p, original.get_pixel(x, y), "({x}, {y})");
            } else if m < 255 {
                blended += 1;
            }
        }
        assert!(blended > 0);
        // The mask's centre is mostly the crop (blue 200 against the original's 7).
        assert!(soft.get_pixel(27, 15)[2] > 150);

        // The crop's own content lands at the region's offset.
        let gradient = RgbImage::from_fn(32, 24, |x, y| Rgb([x as u8, y as u8, 99]));
        let full = GrayImage::from_pixel(64, 48, Luma([255]));
        let placed = paste_back(&original, &gradient, region, &full, 0).unwrap();
        assert_eq!(placed.get_pixel(16, 8).0, [0, 0, 99]);
        assert_eq!(placed.get_pixel(47, 31).0, [31, 23, 99]);
        assert_eq!(placed.get_pixel(15, 8), original.get_pixel(15, 8));
        assert_eq!(placed.get_pixel(48, 31), original.get_pixel(48, 31));
    }

    #[test]
    fn paste_back_refuses_bad_geometry() {
        let original = RgbImage::new(64, 48);
        let crop = RgbImage::new(8, 8);
        let mask = GrayImage::new(64, 48);
        let outside = Rect {
            x: 60,
            y: 0,
            width: 8,
            height: 8,
        };
        let err = paste_back(&original, &crop, outside, &mask, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not lie inside the 64×48 image"), "{err}");
        let inside = Rect {
            x: 0,
            y: 0,
            width: 8,
            height: 8,
        };
        assert!(paste_back(&original, &crop, inside, &GrayImage::new(8, 8), 0).is_err());
    }

    #[test]
    fn extend_canvas_geometry() {
        let image = RgbImage::from_fn(20, 12, |x, y| Rgb([x as u8 * 10, y as u8 * 20, 1]));
        let (canvas, mask) = extend_canvas(&image, 8, 4, 2, 0).unwrap();
        // 8 + 20 + 4 = 32 already a multiple of 8; 2 + 12 + 0 = 14 → 16 (bottom grows by 2).
        assert_eq!(canvas.dimensions(), (32, 16));
        assert_eq!(mask.dimensions(), (32, 16));
        for (x, y, p) in canvas.enumerate_pixels() {
            let inside = (8..28).contains(&x) && (2..14).contains(&y);
            assert_eq!(
                mask.get_pixel(x, y)[0],
                if inside { 0 } else { 255 },
                "({x}, {y})"
            );
            if inside {
                assert_eq!(p, image.get_pixel(x - 8, y - 2));
            }
        }
        // Edges repeated: left margin copies column 0, corners copy the corner pixel.
        assert_eq!(canvas.get_pixel(0, 5), image.get_pixel(0, 3));
        assert_eq!(canvas.get_pixel(31, 15), image.get_pixel(19, 11));
        assert_eq!(canvas.get_pixel(12, 0), image.get_pixel(4, 0));

        let (same, empty) = extend_canvas(&RgbImage::new(16, 8), 0, 0, 0, 0).unwrap();
        assert_eq!(same.dimensions(), (16, 8));
        assert!(empty.pixels().all(|p| p[0] == 0));

        let err = extend_canvas(&image, u32::MAX, 0, 0, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("outpaint"), "{err}");
        assert!(extend_canvas(&image, 100_000, 0, 100_000, 0).is_err());
    }
}
