//! The image formats the service hands out (`GET /v1/images/{id}.png|.jpg|.webp`, the
//! OpenAI endpoints): a leaf that the encoders (`media.rs`) and the signer
//! (`credentials.rs`) both name.

/// An output format of `GET /v1/images/{id}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Png,
    Jpeg,
    Webp,
}

impl Format {
    pub fn from_extension(ext: &str) -> Option<Format> {
        match ext.to_ascii_lowercase().as_str() {
            "png" => Some(Format::Png),
            "jpg" | "jpeg" => Some(Format::Jpeg),
            "webp" => Some(Format::Webp),
            _ => None,
        }
    }

    /// The file extension of an image URL in this format.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Png => "png",
            Format::Jpeg => "jpg",
            Format::Webp => "webp",
        }
    }

    /// The first of PNG, JPEG or WebP an `Accept` header names (PNG for `*/*` or none).
    pub fn from_accept(accept: Option<&str>) -> Option<Format> {
        let Some(accept) = accept else {
            return Some(Format::Png);
        };
        for item in accept.split(',') {
            let media = item.split(';').next().unwrap_or("").trim();
            match media {
                "image/png" | "image/*" | "*/*" => return Some(Format::Png),
                "image/jpeg" | "image/jpg" => return Some(Format::Jpeg),
                "image/webp" => return Some(Format::Webp),
                _ => {}
            }
        }
        None
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Png => "image/png",
            Format::Jpeg => "image/jpeg",
            Format::Webp => "image/webp",
        }
    }
}
