//! `imagegen generate`: images from a prompt (and an image, a mask or a ControlNet), written
//! as PNG files.

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::AtomicBool;

use imagegen_crds::{Mode, Outpaint, Strategy};
use imagegen_engine::image::input::{load_image_file, ImageLimits};
use imagegen_engine::image::mask::{check_same_size, mask_from_image};
use imagegen_engine::image::output::write_png;
use imagegen_engine::models::loading::load_controlnet;
use imagegen_engine::pipelines;
use imagegen_engine::pipelines::generate::MaskPrompt;
use imagegen_engine::pipelines::mask_prompt::{
    load_clipseg, MaskOptions, DEFAULT_MASK_MODEL, DEFAULT_THRESHOLD,
};
use imagegen_engine::source::resolve_component;
use imagegen_engine::styles::StyleBook;
use imagegen_engine::{GenerationParams, Inputs, LoadOptions, Lora, SafetyPolicy, StableDiffusion};
use imagegen_runtime::hub::HfHub;

use super::{parse_device, parse_dtype};

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// A local diffusers folder or a hub id (owner/name[@revision]).
    #[arg(long)]
    model: String,
    #[arg(long)]
    prompt: String,
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Pixels, a multiple of 8 [default: the model's native size, 512 for SD 1.5].
    #[arg(long)]
    width: Option<u32>,
    /// Pixels, a multiple of 8 [default: the model's native size, 512 for SD 1.5].
    #[arg(long)]
    height: Option<u32>,
    #[arg(long, default_value_t = 25)]
    steps: u32,
    /// Classifier-free guidance scale (1 or less: no guidance) [default: 7.5; SDXL: 5, as
    /// diffusers].
    #[arg(long)]
    guidance: Option<f64>,
    /// Seed of the first image; image i uses seed + i [default: random].
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// ddim, pndm, euler, euler-a, dpmpp-2m or dpmpp-2m-karras [default: the model's].
    #[arg(long)]
    scheduler: Option<String>,
    /// Skip this many final text-encoder layers.
    #[arg(long)]
    clip_skip: Option<u32>,
    /// A style preset (`imagegen styles` lists them).
    #[arg(long)]
    style: Option<String>,
    /// A deployment's own presets (same format as the built-in file), added to ours.
    #[arg(long, env = "IMAGEGEN_STYLES")]
    styles_file: Option<PathBuf>,
    /// text-to-image, image-to-image, inpaint, outpaint or remove-object [default: from the
    /// inputs: a mask means inpaint, an init image image-to-image].
    #[arg(long, value_enum)]
    mode: Option<ModeArg>,
    /// The input image (PNG, JPEG or WebP) for image-to-image, inpainting and outpainting.
    #[arg(long)]
    init_image: Option<PathBuf>,
    /// sdedit and inpainting: how much to repaint, 0 to 1 [default: 0.75 sdedit, 1 inpaint].
    #[arg(long)]
    strength: Option<f64>,
    /// How image-to-image uses the input.
    #[arg(long, value_enum)]
    strategy: Option<StrategyArg>,
    /// instruct: how closely to follow the input image [default: 1.5].
    #[arg(long)]
    image_guidance: Option<f64>,
    /// canny: a ControlNet folder or hub id.
    #[arg(long)]
    controlnet: Option<String>,
    /// SDXL text-to-image: a refiner folder or hub id that takes over from the model at
    /// --high-noise-fraction.
    #[arg(long)]
    refiner: Option<String>,
    /// With --refiner: the share of the noise schedule the model denoises before the
    /// refiner takes over [default: 0.8]; 1 leaves the refiner out.
    #[arg(long)]
    high_noise_fraction: Option<f64>,
    /// canny: the ControlNet's conditioning scale [default: 1].
    #[arg(long)]
    control_scale: Option<f64>,
    /// canny: the edge detector's low and high thresholds (0-255) [default: 100, 200].
    #[arg(long)]
    canny_low: Option<f32>,
    #[arg(long)]
    canny_high: Option<f32>,
    /// The inpainting mask, the input image's size: white = repaint, black = keep (or an
    /// image whose transparent pixels are the ones to repaint).
    #[arg(long, conflicts_with = "mask_prompts")]
    mask: Option<PathBuf>,
    /// Instead of --mask: find the mask from text (CLIPSeg); repeat for the union of
    /// several things. Needs --init-image.
    #[arg(long = "mask-prompt", requires = "init_image")]
    mask_prompts: Vec<String>,
    /// What to leave out of the found mask.
    #[arg(long, requires = "mask_prompts")]
    mask_negative_prompt: Option<String>,
    /// The CLIPSeg folder or hub id for --mask-prompt.
    #[arg(long, default_value = DEFAULT_MASK_MODEL)]
    mask_model: String,
    /// Probability above which --mask-prompt masks a pixel.
    #[arg(long, default_value_t = DEFAULT_THRESHOLD)]
    mask_threshold: f32,
    /// Blur of the mask's edge when pasting back, in pixels [default: 4].
    #[arg(long)]
    mask_blur: Option<u32>,
    /// Grow the mask by this many pixels first [default: 0].
    #[arg(long)]
    mask_grow: Option<u32>,
    /// Generate only a crop around the mask, at full resolution, and paste it back.
    #[arg(long)]
    only_masked: bool,
    /// Context kept around the mask with --only-masked, in pixels [default: 32].
    #[arg(long)]
    only_masked_padding: Option<u32>,
    /// Outpainting: pixels to add on the LEFT,RIGHT,TOP,BOTTOM sides.
    #[arg(long, value_parser = parse_outpaint)]
    outpaint: Option<Outpaint>,
    /// A LoRA to apply: a .safetensors file (diffusers/peft or kohya names) or a folder
    /// with pytorch_lora_weights.safetensors, with an optional weight [default: 1].
    /// Repeatable.
    #[arg(long = "lora", value_name = "FILE|DIR[:WEIGHT]", value_parser = parse_lora)]
    loras: Vec<(PathBuf, f64)>,
    /// Skip (with a warning) LoRA keys that match no module of the model instead of failing.
    #[arg(long)]
    lora_lenient: bool,
    /// cpu, cuda, cuda:N or auto [default: auto, cuda when available].
    #[arg(long)]
    device: Option<String>,
    /// f32, f16 or bf16 [default: f16 on cuda, f32 on cpu].
    #[arg(long)]
    dtype: Option<String>,
    /// What to do with images the safety checker flags: block (not written, reported on
    /// stderr), blur (written blurred beyond recognition) or off (no check). block and blur
    /// need a checker: the model's safety_checker/ folder or --safety-checker.
    #[arg(long, value_enum, default_value_t = SafetyArg::Block)]
    safety: SafetyArg,
    /// A safety checker folder or hub id (e.g. CompVis/stable-diffusion-safety-checker),
    /// for models that ship without one [default: the model's safety_checker/].
    #[arg(long, value_name = "DIR|HUB_ID")]
    safety_checker: Option<String>,
    /// Output PNG; with --count N > 1, PATH-0.png ... PATH-(N-1).png.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SafetyArg {
    Block,
    Blur,
    Off,
}

impl From<SafetyArg> for SafetyPolicy {
    fn from(policy: SafetyArg) -> Self {
        match policy {
            SafetyArg::Block => SafetyPolicy::Block,
            SafetyArg::Blur => SafetyPolicy::Blur,
            SafetyArg::Off => SafetyPolicy::Off,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ModeArg {
    TextToImage,
    ImageToImage,
    Inpaint,
    Outpaint,
    RemoveObject,
}

impl From<ModeArg> for Mode {
    fn from(mode: ModeArg) -> Self {
        match mode {
            ModeArg::TextToImage => Mode::TextToImage,
            ModeArg::ImageToImage => Mode::ImageToImage,
            ModeArg::Inpaint => Mode::Inpaint,
            ModeArg::Outpaint => Mode::Outpaint,
            ModeArg::RemoveObject => Mode::RemoveObject,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum StrategyArg {
    Sdedit,
    Instruct,
    Canny,
}

impl From<StrategyArg> for Strategy {
    fn from(strategy: StrategyArg) -> Self {
        match strategy {
            StrategyArg::Sdedit => Strategy::Sdedit,
            StrategyArg::Instruct => Strategy::Instruct,
            StrategyArg::Canny => Strategy::Canny,
        }
    }
}

/// `LEFT,RIGHT,TOP,BOTTOM` in pixels.
fn parse_outpaint(text: &str) -> Result<Outpaint, String> {
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    let [left, right, top, bottom] = parts[..] else {
        return Err(format!("`{text}` is not LEFT,RIGHT,TOP,BOTTOM"));
    };
    let px = |s: &str| {
        s.parse::<u32>()
            .map_err(|_| format!("`{s}` in `{text}` is not a number of pixels"))
    };
    Ok(Outpaint {
        left: px(left)?,
        right: px(right)?,
        top: px(top)?,
        bottom: px(bottom)?,
    })
}

/// `FILE|DIR[:WEIGHT]`; the file (or the folder's pytorch_lora_weights.safetensors) must
/// exist.
fn parse_lora(text: &str) -> Result<(PathBuf, f64), String> {
    let (path, weight) = match text.rsplit_once(':') {
        Some((path, weight)) if !Path::new(text).exists() => {
            let weight = weight.trim().parse::<f64>().map_err(|_| {
                format!("`{weight}` in `{text}` is not a weight (expected FILE|DIR[:WEIGHT])")
            })?;
            if !weight.is_finite() {
                return Err(format!("weight `{weight}` in `{text}` is not finite"));
            }
            (PathBuf::from(path), weight)
        }
        _ => (PathBuf::from(text), 1.0),
    };
    if path.as_os_str().is_empty() {
        return Err(format!("`{text}` names no LoRA file"));
    }
    let file = imagegen_engine::lora::lora_file(&path);
    if !file.is_file() {
        return Err(format!("LoRA file {} not found", file.display()));
    }
    Ok((path, weight))
}

/// `out.png` for one image; `out-0.png`, `out-1.png`, ... for several.
fn output_paths(out: &Path, count: usize) -> Vec<PathBuf> {
    if count == 1 {
        return vec![out.to_path_buf()];
    }
    let stem = out.with_extension("");
    (0..count)
        .map(|i| PathBuf::from(format!("{}-{i}.png", stem.display())))
        .collect()
}

pub fn generate(args: GenerateArgs) -> Result<(), String> {
    let device = parse_device(args.device.as_deref())?;
    imagegen_engine::device::check_device(device, "--device")?;
    let dtype = parse_dtype(args.dtype.as_deref(), device)?;
    let hub = HfHub::shared().map_err(|e| e.to_string())?;
    let mut options = LoadOptions::new(&args.model);
    options.hub = Some(hub.clone());
    options.device = device;
    options.dtype = dtype;
    options.safety = args.safety.into();
    options.safety_checker = args.safety_checker.clone();
    let params = GenerationParams {
        prompt: args.prompt,
        negative_prompt: args.negative_prompt,
        width: args.width,
        height: args.height,
        steps: Some(args.steps),
        guidance_scale: args.guidance,
        scheduler: args.scheduler,
        seed: args.seed,
        count: Some(args.count),
        clip_skip: args.clip_skip,
        style: args.style,
        mode: args.mode.map(Mode::from),
        strategy: args.strategy.map(Strategy::from),
        strength: args.strength,
        image_guidance_scale: args.image_guidance,
        control_scale: args.control_scale,
        canny_low: args.canny_low,
        canny_high: args.canny_high,
        mask_blur: args.mask_blur,
        mask_grow: args.mask_grow,
        only_masked: args.only_masked.then_some(true),
        only_masked_padding: args.only_masked_padding,
        outpaint: args.outpaint,
        high_noise_fraction: args.high_noise_fraction,
    };
    let styles = StyleBook::load(args.styles_file.as_deref()).map_err(|e| e.to_string())?;
    // Inputs are read and checked before the (slow) model load.
    let limits = ImageLimits::default();
    let read = |path: &Path| load_image_file(path, &limits).map_err(|e| e.to_string());
    let image = args.init_image.as_deref().map(read).transpose()?;
    let mask = args
        .mask
        .as_deref()
        .map(read)
        .transpose()?
        .map(|m| mask_from_image(&m));
    if let (Some(image), Some(mask)) = (&image, &mask) {
        check_same_size(image, mask).map_err(|e| e.to_string())?;
    }
    let started = std::time::Instant::now();
    let model = StableDiffusion::load(&options).map_err(|e| e.to_string())?;
    let refiner = match &args.refiner {
        Some(spec) => {
            Some(StableDiffusion::load(&options.for_refiner(spec)).map_err(|e| e.to_string())?)
        }
        None => None,
    };
    let controlnet = match &args.controlnet {
        Some(spec) => {
            let dir = resolve_component(spec, Some(hub.as_ref())).map_err(|e| e.to_string())?;
            Some(load_controlnet(&dir, device, dtype).map_err(|e| e.to_string())?)
        }
        None => None,
    };
    let loras = args
        .loras
        .iter()
        .map(|(path, weight)| {
            Lora::load(path, &model, args.lora_lenient)
                .map(|lora| (Rc::new(lora), *weight))
                .map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, String>>()?;
    let finder = if args.mask_prompts.is_empty() {
        None
    } else {
        Some(
            load_clipseg(&args.mask_model, Some(hub.as_ref()), device, dtype)
                .map_err(|e| e.to_string())?,
        )
    };
    let loaded = started.elapsed();
    let inputs = Inputs {
        image,
        mask,
        controlnet: controlnet.as_ref().map(|c| &c.model),
        refiner: refiner.as_ref(),
        loras,
        // The found mask is grown and blurred by --mask-grow/--mask-blur like a drawn one.
        mask_prompt: finder.as_ref().map(|finder| MaskPrompt {
            finder,
            prompts: args.mask_prompts.clone(),
            negative: args.mask_negative_prompt.clone(),
            options: MaskOptions {
                threshold: args.mask_threshold,
                grow: 0,
                blur: 0.0,
            },
        }),
    };
    let cancel = AtomicBool::new(false);
    let mut report =
        |p: imagegen_engine::Progress| tracing::info!(step = p.step, total = p.total, "denoising");
    let outcome = pipelines::generate(&model, &params, &inputs, &styles, &mut report, &cancel)
        .map_err(|e| e.to_string())?;
    tracing::info!(
        load_seconds = loaded.as_secs_f64(),
        generate_seconds = (started.elapsed() - loaded).as_secs_f64(),
        "done"
    );
    // Paths follow the request's numbering: a withheld image leaves a gap.
    let count = outcome.images.len() + outcome.withheld.len();
    let paths = output_paths(&args.out, count);
    for image in &outcome.images {
        let path = &paths[image.index];
        write_png(path, &image.image, &image.metadata).map_err(|e| e.to_string())?;
        if let Some(verdict) = &image.flagged {
            eprintln!(
                "image {} (seed {}) blurred: {}",
                image.index,
                image.metadata.seed,
                imagegen_engine::safety::reason(verdict)
            );
        }
        println!("{}", path.display());
    }
    for withheld in &outcome.withheld {
        eprintln!(
            "image {} (seed {}) withheld: {}",
            withheld.index, withheld.seed, withheld.reason
        );
    }
    if outcome.images.is_empty() && !outcome.withheld.is_empty() {
        return Err(format!(
            "all {count} image(s) were withheld by the safety checker; nothing was written"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_outputs_are_numbered() {
        assert_eq!(
            output_paths(Path::new("out/a.png"), 1),
            vec![PathBuf::from("out/a.png")]
        );
        assert_eq!(
            output_paths(Path::new("out/a.png"), 2),
            vec![PathBuf::from("out/a-0.png"), PathBuf::from("out/a-1.png")]
        );
    }

    #[test]
    fn outpaint_margins_parse() {
        assert_eq!(
            parse_outpaint("8, 16,0,24"),
            Ok(Outpaint {
                left: 8,
                right: 16,
                top: 0,
                bottom: 24
            })
        );
        assert!(parse_outpaint("8,16").is_err());
        assert!(parse_outpaint("8,16,x,0").is_err());
    }

    #[test]
    fn lora_flag_syntax() {
        let dir = std::env::temp_dir().join(format!("imagegen-lora-flag-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("style.safetensors");
        std::fs::write(&file, b"").unwrap();
        std::fs::write(dir.join("pytorch_lora_weights.safetensors"), b"").unwrap();
        let f = file.to_str().unwrap();
        assert_eq!(parse_lora(f), Ok((file.clone(), 1.0)));
        assert_eq!(parse_lora(&format!("{f}:0.6")), Ok((file.clone(), 0.6)));
        assert_eq!(
            parse_lora(&format!("{}:-1", dir.display())),
            Ok((dir.clone(), -1.0))
        );
        assert!(parse_lora(&format!("{f}:x"))
            .unwrap_err()
            .contains("not a weight"));
        assert!(parse_lora(&format!("{f}:inf")).is_err());
        assert!(parse_lora("/nonexistent/x.safetensors")
            .unwrap_err()
            .contains("not found"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
