//! `imagegen mask`: an inpainting mask found from text with CLIPSeg.

use std::path::PathBuf;

use imagegen_engine::image::input::{load_image_file, ImageLimits};
use imagegen_engine::pipelines::mask_prompt::{
    load_clipseg, MaskOptions, DEFAULT_GROW, DEFAULT_MASK_MODEL, DEFAULT_THRESHOLD,
};
use imagegen_runtime::hub::HfHub;

use super::{parse_device, parse_dtype};

#[derive(clap::Args)]
pub struct MaskArgs {
    /// A CLIPSeg folder (transformers layout) or hub id.
    #[arg(long, default_value = DEFAULT_MASK_MODEL)]
    model: String,
    #[arg(long)]
    image: PathBuf,
    /// What to mask; repeat for the union of several things.
    #[arg(long = "prompt", required = true)]
    prompts: Vec<String>,
    /// What to leave out of the mask.
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Probability above which a pixel is masked.
    #[arg(long, default_value_t = DEFAULT_THRESHOLD)]
    threshold: f32,
    /// Grow the mask by this many pixels.
    #[arg(long, default_value_t = DEFAULT_GROW)]
    grow: u32,
    /// Gaussian blur of the mask's edge (sigma, pixels).
    #[arg(long, default_value_t = 0.0)]
    blur: f32,
    /// cpu, cuda, cuda:N or auto [default: auto, cuda when available].
    #[arg(long)]
    device: Option<String>,
    /// f32, f16 or bf16 [default: f16 on cuda, f32 on cpu].
    #[arg(long)]
    dtype: Option<String>,
    #[arg(long)]
    out: PathBuf,
}

pub fn find_mask(args: MaskArgs) -> Result<(), String> {
    let device = parse_device(args.device.as_deref())?;
    let dtype = parse_dtype(args.dtype.as_deref(), device)?;
    let image = load_image_file(&args.image, &ImageLimits::default())
        .map_err(|e| e.to_string())?
        .to_rgb8();
    let hub = HfHub::new().map_err(|e| e.to_string())?;
    let finder = load_clipseg(&args.model, Some(&hub), device, dtype).map_err(|e| e.to_string())?;
    let options = MaskOptions {
        threshold: args.threshold,
        grow: args.grow,
        blur: args.blur,
    };
    let mask = finder
        .find(
            &image,
            &args.prompts,
            args.negative_prompt.as_deref(),
            &options,
        )
        .map_err(|e| e.to_string())?;
    mask.save_with_format(&args.out, image::ImageFormat::Png)
        .map_err(|e| format!("writing {}: {e}", args.out.display()))?;
    println!("{}", args.out.display());
    Ok(())
}
