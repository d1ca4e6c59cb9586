//! Canny edges, the control image of a canny ControlNet: white one-pixel edges on black,
//! in three channels.

use image::{GrayImage, RgbImage};

use crate::error::{Error, Result};

/// The thresholds diffusers' and ControlNet's canny examples use.
pub const DEFAULT_LOW: f32 = 100.0;
pub const DEFAULT_HIGH: f32 = 200.0;

/// Checks hysteresis thresholds: `0 <= low <= high <= 255`.
pub fn check_thresholds(low: f32, high: f32) -> Result<()> {
    if !low.is_finite() || !(0.0..=255.0).contains(&low) {
        return Err(Error::invalid(
            "canny_low",
            format!("{low} must be between 0 and 255"),
        ));
    }
    if !high.is_finite() || !(0.0..=255.0).contains(&high) {
        return Err(Error::invalid(
            "canny_high",
            format!("{high} must be between 0 and 255"),
        ));
    }
    if low > high {
        return Err(Error::invalid(
            "canny_low",
            format!("{low} must not be above canny_high ({high})"),
        ));
    }
    Ok(())
}

/// The edges of `image` (converted to grayscale first) with imageproc's Canny detector
/// (Gaussian blur σ = 1.4, Sobel gradients, non-maximum suppression, hysteresis between
/// `low` and `high`), as white-on-black RGB.
pub fn canny_edges(image: &RgbImage, low: f32, high: f32) -> Result<RgbImage> {
    check_thresholds(low, high)?;
    if image.width() == 0 || image.height() == 0 {
        return Err(Error::invalid("init_image", "the image is empty"));
    }
    if image.width() < 3 || image.height() < 3 {
        // Edges are found on interior pixels only: there are none.
        return Ok(RgbImage::new(image.width(), image.height()));
    }
    let gray: GrayImage = image::imageops::grayscale(image);
    // A pixel is an edge candidate when its gradient reaches the threshold; at 0 that would
    // take in flat areas (OpenCV compares strictly, so they never are) and walk imageproc's
    // hysteresis off the image's border. The smallest positive threshold keeps every
    // pixel with a gradient.
    let edges = imageproc::edges::canny(
        &gray,
        low.max(f32::MIN_POSITIVE),
        high.max(f32::MIN_POSITIVE),
    );
    let rgb = edges.pixels().flat_map(|p| [p.0[0]; 3]).collect();
    Ok(RgbImage::from_raw(image.width(), image.height(), rgb)
        .expect("three bytes per pixel of the input's size"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dark on the left of column 16, bright from it on.
    fn vertical_boundary() -> RgbImage {
        RgbImage::from_fn(32, 24, |x, _| {
            if x < 16 {
                image::Rgb([20, 30, 40])
            } else {
                image::Rgb([220, 210, 200])
            }
        })
    }

    #[test]
    fn a_vertical_boundary_gives_edges_on_its_column_only() {
        let edges = canny_edges(&vertical_boundary(), DEFAULT_LOW, DEFAULT_HIGH).unwrap();
        assert_eq!(edges.dimensions(), (32, 24));
        let mut on_boundary = 0;
        for (x, y, p) in edges.enumerate_pixels() {
            assert!(
                p.0 == [0, 0, 0] || p.0 == [255, 255, 255],
                "({x}, {y}) is {:?}",
                p.0
            );
            if p.0[0] == 255 {
                assert!(
                    (15..=16).contains(&x),
                    "edge at ({x}, {y}), far from column 16"
                );
                on_boundary += 1;
            }
        }
        // Every row away from the top and bottom borders has its edge pixel.
        assert!(on_boundary >= 20, "only {on_boundary} edge pixels");
    }

    #[test]
    fn a_flat_image_has_no_edges() {
        let flat = RgbImage::from_pixel(16, 16, image::Rgb([90, 90, 90]));
        let edges = canny_edges(&flat, DEFAULT_LOW, DEFAULT_HIGH).unwrap();
        assert!(edges.pixels().all(|p| p.0 == [0, 0, 0]));
    }

    #[test]
    fn tiny_images_have_no_edges() {
        for (w, h) in [(1, 1), (2, 7), (7, 2), (3, 3)] {
            let image = RgbImage::from_fn(w, h, |x, _| image::Rgb([(x * 120) as u8; 3]));
            let edges = canny_edges(&image, 0.0, 10.0).unwrap();
            assert_eq!(edges.dimensions(), (w, h));
        }
        assert!(canny_edges(&RgbImage::new(0, 4), DEFAULT_LOW, DEFAULT_HIGH).is_err());
    }

    #[test]
    fn thresholds_are_checked() {
        let image = vertical_boundary();
        for (low, high, field) in [
            (-1.0, 200.0, "canny_low"),
            (f32::NAN, 200.0, "canny_low"),
            (100.0, 256.0, "canny_high"),
            (100.0, f32::INFINITY, "canny_high"),
            (150.0, 100.0, "canny_low"),
        ] {
            match canny_edges(&image, low, high) {
                Err(Error::InvalidRequest { field: f, .. }) => {
                    assert_eq!(f, field, "({low}, {high})")
                }
                other => panic!("({low}, {high}): {:?}", other.map(|_| ())),
            }
        }
        let all = canny_edges(&image, 0.0, 0.0).unwrap();
        assert!(all.get_pixel(16, 12).0 == [255, 255, 255]);
        assert!(
            all.get_pixel(4, 12).0 == [0, 0, 0],
            "flat areas are not edges"
        );
        assert!(canny_edges(&image, 255.0, 255.0).is_ok());
        assert!(canny_edges(&image, 120.0, 120.0).is_ok());
    }
}
