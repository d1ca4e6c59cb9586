//! Mask geometry against diffusers: `crop_region` equals
//! `VaeImageProcessor.get_crop_region` on the cases recorded by tests/fixtures/extra_mask.py.

mod common;

use common::fixtures_dir;
use image::{GrayImage, Luma};
use imagegen_engine::image::canvas::{crop_region, Rect};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    mask: [u32; 2],
    /// x, y, width, height, value
    rects: Vec<[u32; 5]>,
    width: u32,
    height: u32,
    pad: u32,
    /// diffusers' (x1, y1, x2, y2)
    region: [u32; 4],
}

fn mask_of(case: &Case) -> GrayImage {
    let mut mask = GrayImage::new(case.mask[0], case.mask[1]);
    for &[x, y, w, h, value] in &case.rects {
        for yy in y..y + h {
            for xx in x..x + w {
                mask.put_pixel(xx, yy, Luma([value as u8]));
            }
        }
    }
    mask
}

#[test]
fn crop_region_equals_diffusers() {
    let root = fixtures_dir();
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("index.json")).unwrap()).unwrap();
    let file = index["mask"]["crop_regions"].as_str().unwrap_or_else(|| {
        panic!(
            "{} has no mask references: regenerate the fixtures (scripts/test.sh does)",
            root.display()
        )
    });
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(root.join(file)).unwrap()).unwrap();
    assert!(cases.len() >= 10, "{} cases", cases.len());
    for (i, case) in cases.iter().enumerate() {
        let [x1, y1, x2, y2] = case.region;
        let expected = Rect {
            x: x1,
            y: y1,
            width: x2 - x1,
            height: y2 - y1,
        };
        let ours = crop_region(&mask_of(case), case.width, case.height, case.pad);
        assert_eq!(
            ours, expected,
            "case {i}: mask {:?}, rects {:?}, {}×{} pad {}",
            case.mask, case.rects, case.width, case.height, case.pad
        );
    }
}
