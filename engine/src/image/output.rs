//! PNG output with the generation parameters embedded as text chunks: `parameters` in the
//! widely read "A1111" layout, and `imagegen` as JSON for exact reproduction.

use std::io::BufWriter;
use std::path::Path;

use image::RgbImage;
use serde::Serialize;

use crate::error::{Error, Result};

/// IPTC's digital source type for media made by a trained model.
pub const DIGITAL_SOURCE_TYPE: &str =
    "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia";

/// The XMP packet that marks an image as AI-generated (IPTC `DigitalSourceType`), embedded
/// in every image we write: PNG iTXt `XML:com.adobe.xmp`, JPEG APP1, WebP `XMP `.
pub fn xmp_packet() -> String {
    format!(
        "<?xpacket begin=\"\u{feff}\" id=\"W5M0MpCehiHzreSzNTczkc9d\"?>\n\
         <x:xmpmeta xmlns:x=\"adobe:ns:meta/\">\n\
         <rdf:RDF xmlns:rdf=\"http://www.w3.org/1999/02/22-rdf-syntax-ns#\">\n\
         <rdf:Description rdf:about=\"\" \
         xmlns:Iptc4xmpExt=\"http://iptc.org/std/Iptc4xmpExt/2008-02-29/\">\n\
         <Iptc4xmpExt:DigitalSourceType>{DIGITAL_SOURCE_TYPE}</Iptc4xmpExt:DigitalSourceType>\n\
         </rdf:Description>\n</rdf:RDF>\n</x:xmpmeta>\n<?xpacket end=\"r\"?>"
    )
}

/// What produced an image: enough to generate it again.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ImageMetadata {
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub steps: usize,
    pub scheduler: String,
    pub guidance_scale: f64,
    pub width: u32,
    pub height: u32,
    pub model: String,
    pub clip_skip: usize,
    /// Image-to-image (sdedit): how much of the input was repainted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    /// Image-to-image (instruct): the image guidance scale.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_guidance_scale: Option<f64>,
}

impl ImageMetadata {
    fn a1111(&self) -> String {
        let mut text = format!(
            "{}\nNegative prompt: {}\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}, Clip skip: {}",
            self.prompt,
            self.negative_prompt,
            self.steps,
            self.scheduler,
            self.guidance_scale,
            self.seed,
            self.width,
            self.height,
            self.model,
            self.clip_skip + 1,
        );
        if let Some(strength) = self.strength {
            text.push_str(&format!(", Denoising strength: {strength}"));
        }
        if let Some(scale) = self.image_guidance_scale {
            text.push_str(&format!(", Image CFG scale: {scale}"));
        }
        text
    }
}

/// Encodes `image` as PNG bytes with `metadata` in iTXt chunks, and the AI-generated
/// marking ([`xmp_packet`]).
pub fn encode_png(image: &RgbImage, metadata: &ImageMetadata) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    {
        let mut encoder =
            png::Encoder::new(BufWriter::new(&mut bytes), image.width(), image.height());
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let json = serde_json::to_string(metadata).map_err(|e| Error::Output {
            path: "<png>".into(),
            message: e.to_string(),
        })?;
        let to_err = |e: png::EncodingError| Error::Output {
            path: "<png>".into(),
            message: e.to_string(),
        };
        // iTXt: prompts are UTF-8, which tEXt (Latin-1) cannot carry.
        encoder
            .add_itxt_chunk("parameters".into(), metadata.a1111())
            .map_err(to_err)?;
        encoder
            .add_itxt_chunk("imagegen".into(), json)
            .map_err(to_err)?;
        encoder
            .add_itxt_chunk("XML:com.adobe.xmp".into(), xmp_packet())
            .map_err(to_err)?;
        let mut writer = encoder.write_header().map_err(to_err)?;
        writer.write_image_data(image.as_raw()).map_err(to_err)?;
        writer.finish().map_err(to_err)?;
    }
    Ok(bytes)
}

/// Writes the PNG to `path` atomically (a temporary file renamed into place), so a reader
/// never sees half an image.
pub fn write_png(path: &Path, image: &RgbImage, metadata: &ImageMetadata) -> Result<()> {
    let bytes = encode_png(image, metadata)?;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("png.partial");
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Reads back the `imagegen` JSON chunk of a PNG written by [`write_png`].
pub fn read_metadata(png_bytes: &[u8]) -> Option<serde_json::Value> {
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let reader = decoder.read_info().ok()?;
    let info = reader.info();
    info.utf8_text
        .iter()
        .find(|chunk| chunk.keyword == "imagegen")
        .and_then(|chunk| chunk.get_text().ok())
        .and_then(|text| serde_json::from_str(&text).ok())
}
