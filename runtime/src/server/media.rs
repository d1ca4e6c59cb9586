//! Bytes in and out: bounded request bodies, multipart forms, base64 images, and the
//! output formats (PNG as generated; JPEG and WebP converted on request, each with the
//! AI-generated XMP marking).

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use image::{DynamicImage, RgbImage};
use warp::Buf;

use super::credentials::ContentCredentials;
use super::error::ApiError;
pub use super::format::Format;
use imagegen_engine::image::output::xmp_packet;

/// Most parts of one multipart form.
pub const MAX_PARTS: usize = 16;

/// Reads a request body, stopping with 413 as soon as it passes `limit` bytes.
pub async fn read_body<S, B>(
    content_length: Option<u64>,
    mut body: S,
    limit: u64,
) -> Result<Bytes, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    if content_length.is_some_and(|n| n > limit) {
        return Err(ApiError::too_large(limit));
    }
    let mut out = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let mut chunk =
            chunk.map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
        if out.len() as u64 + chunk.remaining() as u64 > limit {
            return Err(ApiError::too_large(limit));
        }
        while chunk.has_remaining() {
            let piece = chunk.chunk();
            out.extend_from_slice(piece);
            let n = piece.len();
            chunk.advance(n);
        }
    }
    Ok(out.freeze())
}

/// One part of a multipart form.
#[derive(Debug, Clone)]
pub struct Part {
    pub name: String,
    pub filename: Option<String>,
    pub data: Bytes,
}

/// Parses a `multipart/form-data` body (already bounded in size) into at most
/// [`MAX_PARTS`] parts.
pub async fn parse_multipart(content_type: &str, body: Bytes) -> Result<Vec<Part>, ApiError> {
    let boundary = multer::parse_boundary(content_type)
        .map_err(|e| ApiError::bad_request(format!("multipart: {e}")))?;
    let limit = body.len() as u64;
    let constraints = multer::Constraints::new().size_limit(
        multer::SizeLimit::new()
            .whole_stream(limit)
            .per_field(limit),
    );
    let stream = futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(body) });
    let mut form = multer::Multipart::with_constraints(stream, boundary, constraints);
    let mut parts = Vec::new();
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| ApiError::bad_request(format!("multipart: {e}")))?
    {
        if parts.len() == MAX_PARTS {
            return Err(ApiError::bad_request(format!(
                "multipart: more than {MAX_PARTS} parts"
            )));
        }
        let name = field.name().unwrap_or_default().to_string();
        let filename = field.file_name().map(str::to_string);
        let data = field
            .bytes()
            .await
            .map_err(|e| ApiError::bad_request(format!("multipart part `{name}`: {e}")))?;
        parts.push(Part {
            name,
            filename,
            data,
        });
    }
    Ok(parts)
}

/// Standard base64, with or without a `data:image/...;base64,` prefix.
pub fn decode_base64(text: &str, field: &str, limit: u64) -> Result<Vec<u8>, ApiError> {
    let payload = match text.split_once(";base64,") {
        Some((prefix, rest)) if prefix.starts_with("data:") => rest,
        _ => text,
    };
    // 4 characters carry 3 bytes: refuse before decoding anything too large.
    if (payload.len() as u64 / 4) * 3 > limit {
        return Err(ApiError::too_large(limit));
    }
    base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| ApiError::invalid(field, format!("not base64: {e}")))
}

pub fn base64_encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Converts a stored PNG to `format`, with the XMP marking, and signs the new image when
/// `credentials` are given. A stored PNG is returned as it is: it was signed when written.
pub fn convert(
    png: &[u8],
    format: Format,
    credentials: Option<&ContentCredentials>,
) -> Result<Vec<u8>, String> {
    if format == Format::Png {
        return Ok(png.to_vec());
    }
    let image = image::load_from_memory_with_format(png, image::ImageFormat::Png)
        .map_err(|e| e.to_string())?
        .to_rgb8();
    let encoded = match format {
        Format::Png => unreachable!("handled above"),
        Format::Jpeg => encode_jpeg(&image)?,
        Format::Webp => encode_webp(&image)?,
    };
    match credentials {
        Some(credentials) => credentials.sign(&encoded, format),
        None => Ok(encoded),
    }
}

/// JPEG (quality 92) with the XMP packet in an APP1 segment after the JFIF header.
pub fn encode_jpeg(image: &RgbImage) -> Result<Vec<u8>, String> {
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 92)
        .encode_image(&DynamicImage::ImageRgb8(image.clone()))
        .map_err(|e| e.to_string())?;
    if jpeg.len() < 4 || jpeg[0..2] != [0xFF, 0xD8] {
        return Err("the JPEG encoder wrote no SOI marker".into());
    }
    // After SOI, and after an APP0 (JFIF) segment when there is one.
    let mut at = 2;
    if jpeg.len() >= 6 && jpeg[2..4] == [0xFF, 0xE0] {
        at = 4 + u16::from_be_bytes([jpeg[4], jpeg[5]]) as usize;
    }
    let mut payload = b"http://ns.adobe.com/xap/1.0/\0".to_vec();
    payload.extend_from_slice(xmp_packet().as_bytes());
    let length = u16::try_from(payload.len() + 2).map_err(|_| "XMP packet too large")?;
    let mut segment = vec![0xFF, 0xE1];
    segment.extend_from_slice(&length.to_be_bytes());
    segment.extend_from_slice(&payload);
    jpeg.splice(at..at, segment);
    Ok(jpeg)
}

/// Lossless WebP in the extended format (VP8X) with an `XMP ` chunk.
pub fn encode_webp(image: &RgbImage) -> Result<Vec<u8>, String> {
    let mut simple = Vec::new();
    image::codecs::webp::WebPEncoder::new_lossless(&mut simple)
        .encode(
            image.as_raw(),
            image.width(),
            image.height(),
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| e.to_string())?;
    if simple.len() < 12 || &simple[0..4] != b"RIFF" || &simple[8..12] != b"WEBP" {
        return Err("the WebP encoder wrote no RIFF/WEBP header".into());
    }
    let chunks = &simple[12..];
    if chunks.get(0..4) == Some(b"VP8X") {
        return Ok(simple); // already extended: keep as is rather than guess its layout
    }
    let mut vp8x = Vec::with_capacity(18);
    vp8x.extend_from_slice(b"VP8X");
    vp8x.extend_from_slice(&10u32.to_le_bytes());
    vp8x.push(0x04); // flags: XMP metadata present
    vp8x.extend_from_slice(&[0, 0, 0]);
    vp8x.extend_from_slice(&(image.width() - 1).to_le_bytes()[..3]);
    vp8x.extend_from_slice(&(image.height() - 1).to_le_bytes()[..3]);
    let xmp = xmp_packet().into_bytes();
    let mut xmp_chunk = b"XMP ".to_vec();
    xmp_chunk.extend_from_slice(&(xmp.len() as u32).to_le_bytes());
    xmp_chunk.extend_from_slice(&xmp);
    if xmp.len() % 2 == 1 {
        xmp_chunk.push(0);
    }
    let body_len = 4 + vp8x.len() + chunks.len() + xmp_chunk.len();
    let mut out = Vec::with_capacity(8 + body_len);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(b"WEBP");
    out.extend_from_slice(&vp8x);
    out.extend_from_slice(chunks);
    out.extend_from_slice(&xmp_chunk);
    Ok(out)
}

/// The image's content type from its bytes (never from what a client claims).
pub fn sniff(bytes: &[u8]) -> Option<&'static str> {
    match image::guess_format(bytes).ok()? {
        image::ImageFormat::Png => Some("image/png"),
        image::ImageFormat::Jpeg => Some("image/jpeg"),
        image::ImageFormat::WebP => Some("image/webp"),
        _ => None,
    }
}

/// Decodes an image, checking it is PNG, JPEG or WebP within the pixel limit.
pub fn decode(
    bytes: &[u8],
    field: &str,
    limits: &imagegen_engine::image::input::ImageLimits,
) -> Result<DynamicImage, ApiError> {
    if sniff(bytes).is_none() {
        return Err(
            ApiError::unsupported_media("the image is not PNG, JPEG or WebP").with_field(field),
        );
    }
    imagegen_engine::image::input::decode_image(bytes, limits)
        .map_err(|e| ApiError::invalid(field, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Cursor;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    fn small() -> RgbImage {
        RgbImage::from_fn(16, 8, |x, y| image::Rgb([x as u8 * 10, y as u8 * 20, 7]))
    }

    #[test]
    fn jpeg_and_webp_decode_and_carry_the_marking() {
        let marker = b"trainedAlgorithmicMedia";
        for bytes in [
            encode_jpeg(&small()).unwrap(),
            encode_webp(&small()).unwrap(),
        ] {
            let decoded = image::load_from_memory(&bytes).unwrap();
            assert_eq!((decoded.width(), decoded.height()), (16, 8));
            assert!(bytes.windows(marker.len()).any(|w| w == marker));
        }
        let webp = encode_webp(&small()).unwrap();
        assert_eq!(&webp[12..16], b"VP8X");
        let lossless = image::load_from_memory(&webp).unwrap().to_rgb8();
        assert_eq!(lossless, small());
    }

    #[test]
    fn accept_and_extensions_pick_formats() {
        assert_eq!(Format::from_accept(None), Some(Format::Png));
        assert_eq!(
            Format::from_accept(Some("image/webp,*/*;q=0.8")),
            Some(Format::Webp)
        );
        assert_eq!(Format::from_accept(Some("text/html")), None);
        assert_eq!(Format::from_extension("JPG"), Some(Format::Jpeg));
        assert_eq!(Format::from_extension("gif"), None);
    }

    #[test]
    fn multipart_parts_are_read() {
        let body = "--XX\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\na cat\r\n--XX\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\nPNGDATA\r\n--XX--\r\n";
        let parts = rt()
            .block_on(parse_multipart(
                "multipart/form-data; boundary=XX",
                Bytes::from(body),
            ))
            .unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].name, "prompt");
        assert_eq!(parts[0].data.as_ref(), b"a cat");
        assert_eq!(parts[1].filename.as_deref(), Some("a.png"));
        assert_eq!(parts[1].data.as_ref(), b"PNGDATA");
    }

    #[test]
    fn base64_is_bounded_and_accepts_data_urls() {
        assert_eq!(
            decode_base64("data:image/png;base64,aGk=", "image", 100).unwrap(),
            b"hi"
        );
        assert!(decode_base64("!!!", "image", 100).is_err());
        let big = "A".repeat(1000);
        assert_eq!(
            decode_base64(&big, "image", 100).unwrap_err().status,
            warp::http::StatusCode::PAYLOAD_TOO_LARGE
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn multipart_never_panics(body in proptest::collection::vec(any::<u8>(), 0..2048),
                                  boundary in "[A-Za-z0-9]{1,20}") {
            let ct = format!("multipart/form-data; boundary={boundary}");
            let mut framed = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n").into_bytes();
            framed.extend_from_slice(&body);
            let _ = rt().block_on(parse_multipart(&ct, Bytes::from(body)));
            let _ = rt().block_on(parse_multipart(&ct, Bytes::from(framed)));
        }

        #[test]
        fn image_decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let limits = imagegen_engine::image::input::ImageLimits { max_bytes: 1 << 20, max_pixels: 1 << 16 };
            let _ = decode(&bytes, "image", &limits);
        }

        #[test]
        fn corrupted_pngs_never_panic(flips in proptest::collection::vec((0usize..400, any::<u8>()), 1..8)) {
            let mut png = Vec::new();
            DynamicImage::ImageRgb8(small())
                .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
                .unwrap();
            for (at, value) in flips {
                let i = at % png.len();
                png[i] = value;
            }
            let limits = imagegen_engine::image::input::ImageLimits { max_bytes: 1 << 20, max_pixels: 1 << 16 };
            let _ = decode(&png, "image", &limits);
        }
    }
}
