//! Style presets: a named prompt template, words to steer away from, and an optional
//! correction applied to the decoded image.
//!
//! The presets ship inside the binary (`engine/styles/presets.json`). A deployment can add
//! its own or replace ours by id with a file in the same format:
//!
//! ```json
//! {"version": 1, "styles": [
//!   {"id": "noir", "name": "Noir", "prompt": "film noir still of {prompt}",
//!    "negative_prompt": "color", "postprocess": "grayscale"}
//! ]}
//! ```
//!
//! Ids are kebab-case (`[a-z0-9]` words joined by `-`) because they travel in URLs, CLI flags
//! and custom resources; `prompt` must contain `{prompt}`, where the user's prompt goes.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::image::input::luma_bt601;

/// The only file format version understood; a newer file is refused rather than misread.
pub const FORMAT_VERSION: u32 = 1;

/// Where the user's prompt goes in a template.
pub const PLACEHOLDER: &str = "{prompt}";

const BUILTIN_JSON: &str = include_str!("../styles/presets.json");
const BUILTIN_NAME: &str = "<built-in styles/presets.json>";

/// A correction applied to the decoded image, for looks the model alone renders unreliably
/// (SD 1.5 asked for "black and white" still leaves colour casts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Postprocess {
    /// True grayscale: R = G = B = the pixel's BT.601 luma.
    Grayscale,
}

impl Postprocess {
    pub const ALL: [Postprocess; 1] = [Postprocess::Grayscale];

    pub fn as_str(self) -> &'static str {
        match self {
            Postprocess::Grayscale => "grayscale",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == name)
    }
}

/// One style preset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Style {
    pub id: String,
    pub name: String,
    /// The prompt template, with [`PLACEHOLDER`] where the user's prompt goes.
    pub prompt: String,
    pub negative_prompt: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postprocess: Option<Postprocess>,
}

impl Style {
    /// The prompt and negative prompt to generate with: the user's prompt in the template, and
    /// the user's negative prompt followed by the style's (the user's words first, since CLIP
    /// weighs early tokens more and truncates at 77).
    pub fn apply(&self, prompt: &str, negative: Option<&str>) -> (String, Option<String>) {
        let styled = self.prompt.replace(PLACEHOLDER, prompt.trim());
        // An empty prompt would leave a dangling ", " where it was.
        let styled = styled
            .trim_matches(|c: char| c == ',' || c.is_whitespace())
            .to_string();
        let negatives: Vec<&str> = [negative.unwrap_or(""), self.negative_prompt.as_str()]
            .into_iter()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        let negative = (!negatives.is_empty()).then(|| negatives.join(", "));
        (styled, negative)
    }

    /// Applies the style's correction, if it has one, to a decoded image.
    pub fn postprocess(&self, image: &mut RgbImage) {
        match self.postprocess {
            Some(Postprocess::Grayscale) => {
                for pixel in image.pixels_mut() {
                    let l = luma_bt601(*pixel);
                    pixel.0 = [l, l, l];
                }
            }
            None => {}
        }
    }
}

/// The file format, before validation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StyleFile {
    version: u32,
    styles: Vec<StyleEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StyleEntry {
    id: String,
    name: String,
    prompt: String,
    #[serde(default)]
    negative_prompt: String,
    #[serde(default)]
    postprocess: Option<String>,
}

/// The styles a server offers: the built-in presets, plus a deployment's own file.
#[derive(Debug, Clone)]
pub struct StyleBook {
    // In listing order: the built-in presets as the file orders them, then added styles.
    styles: Vec<Style>,
}

impl StyleBook {
    /// The presets shipped in the binary.
    pub fn builtin() -> StyleBook {
        // The embedded file is checked by this module's tests, so it cannot fail at run time.
        let styles = parse(BUILTIN_JSON, Path::new(BUILTIN_NAME))
            .expect("the built-in presets are valid (checked by the tests)");
        StyleBook { styles }
    }

    /// The presets with a deployment's file over them when one is given (the `--styles-file`
    /// of every command), else the built-in ones.
    pub fn load(file: Option<&Path>) -> Result<StyleBook> {
        match file {
            Some(path) => StyleBook::with_file(path),
            None => Ok(StyleBook::builtin()),
        }
    }

    /// The built-in presets with a deployment's file over them: a style with a new id is
    /// added, one with a built-in id replaces that preset.
    pub fn with_file(path: &Path) -> Result<StyleBook> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut book = StyleBook::builtin();
        book.merge(parse(&text, path)?);
        Ok(book)
    }

    fn merge(&mut self, styles: Vec<Style>) {
        for style in styles {
            match self.styles.iter_mut().find(|s| s.id == style.id) {
                Some(existing) => *existing = style,
                None => self.styles.push(style),
            }
        }
    }

    /// The style with this id; an unknown id is an error listing the valid ones.
    pub fn get(&self, id: &str) -> Result<&Style> {
        self.styles.iter().find(|s| s.id == id).ok_or_else(|| {
            let ids: Vec<&str> = self.styles.iter().map(|s| s.id.as_str()).collect();
            Error::invalid(
                "style",
                format!("unknown style `{id}`; valid styles: {}", ids.join(", ")),
            )
        })
    }

    /// Every style, in listing order.
    pub fn list(&self) -> &[Style] {
        &self.styles
    }
}

fn is_kebab_case(id: &str) -> bool {
    !id.is_empty()
        && id.split('-').all(|word| {
            !word.is_empty() && word.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9'))
        })
}

/// Parses and validates a style file; `path` only names it in errors.
fn parse(text: &str, path: &Path) -> Result<Vec<Style>> {
    let file: StyleFile = serde_json::from_str(text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    let invalid = |message: String| Error::StyleFile {
        path: PathBuf::from(path),
        message,
    };
    if file.version != FORMAT_VERSION {
        return Err(invalid(format!(
            "version {} is not supported (expected {FORMAT_VERSION})",
            file.version
        )));
    }
    let mut seen = HashSet::new();
    let mut styles = Vec::with_capacity(file.styles.len());
    for entry in file.styles {
        let id = entry.id;
        if !is_kebab_case(&id) {
            return Err(invalid(format!(
                "style id `{id}` must be kebab-case (lowercase letters and digits joined by `-`)"
            )));
        }
        if !seen.insert(id.clone()) {
            return Err(invalid(format!("style `{id}` is defined twice")));
        }
        if entry.name.trim().is_empty() {
            return Err(invalid(format!("style `{id}` has an empty name")));
        }
        if !entry.prompt.contains(PLACEHOLDER) {
            return Err(invalid(format!(
                "style `{id}`: the prompt template must contain {PLACEHOLDER}"
            )));
        }
        let postprocess = match entry.postprocess.as_deref() {
            None => None,
            Some(name) => Some(Postprocess::parse(name).ok_or_else(|| {
                let known: Vec<&str> = Postprocess::ALL.iter().map(|p| p.as_str()).collect();
                invalid(format!(
                    "style `{id}`: unknown postprocess `{name}` (known: {})",
                    known.join(", ")
                ))
            })?),
        };
        styles.push(Style {
            id,
            name: entry.name,
            prompt: entry.prompt,
            negative_prompt: entry.negative_prompt,
            postprocess,
        });
    }
    Ok(styles)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    const REQUIRED: [&str; 16] = [
        "black-and-white",
        "portrait",
        "abstract",
        "photo",
        "cinematic",
        "anime",
        "watercolor",
        "oil-painting",
        "line-art",
        "comic",
        "pixel-art",
        "3d-render",
        "low-poly",
        "fantasy",
        "sticker",
        "neon",
    ];

    fn temp_file(name: &str, contents: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("imagegen-styles-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    fn error_of(name: &str, contents: &str) -> String {
        let path = temp_file(name, contents);
        StyleBook::with_file(&path).unwrap_err().to_string()
    }

    #[test]
    fn builtin_presets_are_valid_and_complete() {
        let book = StyleBook::builtin();
        assert!(book.list().len() >= 16, "{} styles", book.list().len());
        for style in book.list() {
            assert!(style.prompt.contains(PLACEHOLDER), "{}", style.id);
            assert!(!style.negative_prompt.is_empty(), "{}", style.id);
            assert!(is_kebab_case(&style.id), "{}", style.id);
        }
        for id in REQUIRED {
            book.get(id).unwrap();
        }
        assert_eq!(
            book.get("black-and-white").unwrap().postprocess,
            Some(Postprocess::Grayscale)
        );
    }

    #[test]
    fn apply_fills_the_template_and_joins_negatives_users_first() {
        let style = Style {
            id: "t".into(),
            name: "T".into(),
            prompt: "photo of {prompt}, sharp".into(),
            negative_prompt: "blurry, text".into(),
            postprocess: None,
        };
        let (prompt, negative) = style.apply(" a cat ", Some("dogs"));
        assert_eq!(prompt, "photo of a cat, sharp");
        assert_eq!(negative.as_deref(), Some("dogs, blurry, text"));
        assert_eq!(
            style.apply("a cat", None).1.as_deref(),
            Some("blurry, text")
        );
        assert_eq!(
            style.apply("a cat", Some("  ")).1.as_deref(),
            Some("blurry, text")
        );

        let bare = Style {
            prompt: "{prompt}, watercolor".into(),
            negative_prompt: String::new(),
            ..style
        };
        assert_eq!(bare.apply("", None), ("watercolor".to_string(), None));
        assert_eq!(bare.apply("x", Some("y")).1.as_deref(), Some("y"));
    }

    #[test]
    fn grayscale_gives_equal_channels_with_pils_luma() {
        let style = StyleBook::builtin().get("black-and-white").unwrap().clone();
        // Expected values from PIL: Image.new("RGB", (1, 1), rgb).convert("L").
        let cases = [
            ([255, 0, 0], 76),
            ([0, 255, 0], 150),
            ([0, 0, 255], 29),
            ([10, 200, 30], 124),
            ([128, 64, 32], 79),
            ([255, 255, 255], 255),
            ([3, 5, 200], 27),
            ([1, 1, 1], 1),
        ];
        let mut image = RgbImage::new(cases.len() as u32, 1);
        for (x, (rgb, _)) in cases.iter().enumerate() {
            image.put_pixel(x as u32, 0, Rgb(*rgb));
        }
        style.postprocess(&mut image);
        for (x, (rgb, luma)) in cases.iter().enumerate() {
            assert_eq!(image.get_pixel(x as u32, 0).0, [*luma; 3], "{rgb:?}");
        }

        // A style without a correction leaves the image alone.
        let mut untouched = RgbImage::from_pixel(2, 2, Rgb([9, 8, 7]));
        StyleBook::builtin()
            .get("photo")
            .unwrap()
            .postprocess(&mut untouched);
        assert_eq!(untouched.get_pixel(1, 1).0, [9, 8, 7]);
    }

    #[test]
    fn unknown_id_lists_the_valid_ones() {
        let err = StyleBook::builtin()
            .get("vaporwave")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown style `vaporwave`"), "{err}");
        assert!(
            err.contains("black-and-white") && err.contains("neon"),
            "{err}"
        );
    }

    #[test]
    fn a_deployment_file_overrides_and_adds() {
        let path = temp_file(
            "ours.json",
            r#"{"version": 1, "styles": [
                {"id": "photo", "name": "House photo", "prompt": "{prompt}, house look",
                 "negative_prompt": "x"},
                {"id": "noir", "name": "Noir", "prompt": "film noir still of {prompt}",
                 "postprocess": "grayscale"}
            ]}"#,
        );
        let book = StyleBook::with_file(&path).unwrap();
        let builtin = StyleBook::builtin();
        assert_eq!(book.list().len(), builtin.list().len() + 1);
        assert_eq!(book.get("photo").unwrap().name, "House photo");
        let noir = book.get("noir").unwrap();
        assert_eq!(noir.negative_prompt, "");
        assert_eq!(noir.postprocess, Some(Postprocess::Grayscale));
        assert_eq!(book.list().last().unwrap().id, "noir");
        // Overriding keeps the preset's place in the list.
        let position = |b: &StyleBook| b.list().iter().position(|s| s.id == "photo");
        assert_eq!(position(&book), position(&builtin));
    }

    #[test]
    fn invalid_files_are_rejected_naming_file_and_style() {
        let style = |id: &str, prompt: &str, extra: &str| {
            format!(
                r#"{{"version": 1, "styles": [{{"id": "{id}", "name": "N", "prompt": "{prompt}"{extra}}}]}}"#
            )
        };
        let err = error_of("noph.json", &style("plain", "a photo", ""));
        assert!(
            err.contains("noph.json") && err.contains("`plain`"),
            "{err}"
        );
        assert!(err.contains("{prompt}"), "{err}");

        for bad in ["Upper", "snake_case", "-lead", "trail-", "a--b", ""] {
            let err = error_of("id.json", &style(bad, "{prompt}", ""));
            assert!(
                err.contains("id.json") && err.contains("kebab-case"),
                "{bad}: {err}"
            );
        }

        let err = error_of(
            "pp.json",
            &style("sepia-tone", "{prompt}", r#", "postprocess": "sepia""#),
        );
        assert!(
            err.contains("pp.json") && err.contains("`sepia-tone`") && err.contains("`sepia`"),
            "{err}"
        );

        let twice = r#"{"version": 1, "styles": [
            {"id": "a", "name": "A", "prompt": "{prompt}"},
            {"id": "a", "name": "B", "prompt": "{prompt}"}]}"#;
        let err = error_of("twice.json", twice);
        assert!(
            err.contains("twice.json") && err.contains("`a` is defined twice"),
            "{err}"
        );

        let err = error_of("v2.json", r#"{"version": 2, "styles": []}"#);
        assert!(
            err.contains("v2.json") && err.contains("version 2"),
            "{err}"
        );

        let err = error_of("typo.json", &style("a", "{prompt}", r#", "negative": "x""#));
        assert!(
            err.contains("typo.json") && err.contains("negative"),
            "{err}"
        );

        let err = error_of("broken.json", "{");
        assert!(
            err.contains("broken.json") && err.contains("invalid JSON"),
            "{err}"
        );

        let missing = std::env::temp_dir().join("imagegen-no-such-styles.json");
        let err = StyleBook::with_file(&missing).unwrap_err().to_string();
        assert!(err.contains("imagegen-no-such-styles.json"), "{err}");
    }
}
