//! Where a model comes from: a local diffusers folder, or a hub id (`owner/name`, optionally
//! `owner/name@revision`) fetched through a [`Hub`] into its cache. The engine picks the files
//! (configs, tokenizer files and safetensors weights only); the hub moves them.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A model hub: the transport the engine itself does not have. The binary gives one that
/// downloads (hf-hub's); without one, only local folders load.
pub trait Hub: Send + Sync {
    /// The repository's files, as paths relative to its root.
    fn files(&self, id: &str, revision: Option<&str>) -> Result<Vec<String>>;
    /// Fetches one file into the local cache and returns where it lies.
    fn fetch(&self, id: &str, revision: Option<&str>, file: &str) -> Result<PathBuf>;
}

/// The components a text-to-image pipeline reads, by folder.
pub const COMPONENTS: [&str; 3] = ["text_encoder", "unet", "vae"];
/// The folder of the safety checker, fetched when the safety policy runs one.
pub const SAFETY_CHECKER: &str = "safety_checker";

/// A hub id as the hub writes them: two names of letters, digits, `-`, `_`, `.`.
fn parse_hub_id(spec: &str) -> Option<(&str, Option<&str>)> {
    let (id, revision) = match spec.split_once('@') {
        Some((id, rev)) if !rev.is_empty() => (id, Some(rev)),
        Some(_) => return None,
        None => (spec, None),
    };
    let valid_part = |s: &str| {
        !s.is_empty()
            && !s.starts_with(['.', '-'])
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let (owner, name) = id.split_once('/')?;
    (valid_part(owner) && valid_part(name)).then_some((id, revision))
}

/// Where a spec points.
enum Located<'s, 'h> {
    Folder(PathBuf),
    Hub {
        id: &'s str,
        revision: Option<&'s str>,
        hub: &'h dyn Hub,
    },
}

/// A local folder as it is, or the hub id `spec` names and the hub to fetch it from; any
/// other spec is a model not found.
fn locate<'s, 'h>(spec: &'s str, hub: Option<&'h dyn Hub>) -> Result<Located<'s, 'h>> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(Located::Folder(path.to_path_buf()));
    }
    let looks_local = spec.starts_with(['.', '/', '~']) || path.exists();
    match (parse_hub_id(spec), hub) {
        (Some((id, revision)), Some(hub)) if !looks_local => Ok(Located::Hub { id, revision, hub }),
        _ => Err(Error::ModelNotFound(spec.to_string())),
    }
}

/// Resolves `spec` to a local folder in diffusers' layout, downloading it through `hub` if it
/// is a hub id. `prefer_variant` (e.g. "fp16") downloads those weight files where the repo has
/// them; `safety_checker` also downloads the `safety_checker/` folder where the repo has one.
pub fn resolve(
    spec: &str,
    hub: Option<&dyn Hub>,
    prefer_variant: Option<&str>,
    safety_checker: bool,
) -> Result<PathBuf> {
    match locate(spec, hub)? {
        Located::Folder(dir) => Ok(dir),
        Located::Hub { id, revision, hub } => {
            download(hub, id, revision, prefer_variant, safety_checker)
        }
    }
}

fn wanted(file: &str, prefer_variant: Option<&str>, all: &[String], safety_checker: bool) -> bool {
    let Some((folder, name)) = file.split_once('/') else {
        return file == "model_index.json";
    };
    if name.contains('/') {
        return false;
    }
    match folder {
        "scheduler" => name == "scheduler_config.json",
        "tokenizer" => matches!(
            name,
            "tokenizer.json"
                | "vocab.json"
                | "merges.txt"
                | "tokenizer_config.json"
                | "special_tokens_map.json"
        ),
        f if COMPONENTS.contains(&f) || (safety_checker && f == SAFETY_CHECKER) => {
            if name == "config.json" {
                return true;
            }
            if !(name.ends_with(".safetensors")
                || name.ends_with(".safetensors.index.json")
                || name.contains(".safetensors.index."))
            {
                return false;
            }
            let is_variant =
                |v: &str| name.contains(&format!(".{v}.")) || name.ends_with(&format!(".{v}.json"));
            match prefer_variant {
                // Take the variant's files where the folder has any, the plain ones otherwise.
                Some(v) => {
                    let folder_has_variant = all.iter().any(|f| {
                        f.starts_with(&format!("{folder}/"))
                            && f.contains(&format!(".{v}."))
                            && f.contains(".safetensors")
                    });
                    if folder_has_variant {
                        is_variant(v)
                    } else {
                        !name.contains(".fp16.") && !name.contains(".bf16.")
                    }
                }
                None => !name.contains(".fp16.") && !name.contains(".bf16."),
            }
        }
        _ => false,
    }
}

/// Resolves a single-model folder (a ControlNet: `config.json` and safetensors weights at
/// its root), downloading it if `spec` is a hub id.
pub fn resolve_component(spec: &str, hub: Option<&dyn Hub>) -> Result<PathBuf> {
    resolve_component_with(spec, hub, &[])
}

/// [`resolve_component`], also downloading those of `extra_files` (root-level names, e.g.
/// tokenizer files) that the repository has.
pub fn resolve_component_with(
    spec: &str,
    hub: Option<&dyn Hub>,
    extra_files: &[&str],
) -> Result<PathBuf> {
    let (id, revision, hub) = match locate(spec, hub)? {
        Located::Folder(dir) => return Ok(dir),
        Located::Hub { id, revision, hub } => (id, revision, hub),
    };
    let all = hub.files(id, revision)?;
    let get = |file: &str| hub.fetch(id, revision, file);
    let err = |message: String| Error::Download {
        repo: id.to_string(),
        message,
    };
    let weights: Vec<&String> = all
        .iter()
        .filter(|f| !f.contains('/') && f.ends_with(".safetensors") && !f.contains(".fp16."))
        .collect();
    let weights = if weights.is_empty() {
        all.iter()
            .filter(|f| !f.contains('/') && f.ends_with(".fp16.safetensors"))
            .collect()
    } else {
        weights
    };
    if weights.is_empty() {
        return Err(err("no safetensors weights at the repository's root".into()));
    }
    let config = get("config.json")?;
    for file in weights {
        get(file)?;
    }
    for file in extra_files.iter().filter(|f| all.iter().any(|a| a == *f)) {
        get(file)?;
    }
    Ok(config.parent().map(Path::to_path_buf).unwrap_or_default())
}

fn download(
    hub: &dyn Hub,
    id: &str,
    revision: Option<&str>,
    prefer_variant: Option<&str>,
    safety_checker: bool,
) -> Result<PathBuf> {
    let err = |message: String| Error::Download {
        repo: id.to_string(),
        message,
    };
    let all = hub.files(id, revision)?;
    if !all.iter().any(|f| f == "model_index.json") {
        return Err(err(
            "the repository has no model_index.json: not a diffusers pipeline".into(),
        ));
    }
    let mut root = None;
    for file in all
        .iter()
        .filter(|f| wanted(f, prefer_variant, &all, safety_checker))
    {
        let local = hub.fetch(id, revision, file)?;
        if file == "model_index.json" {
            root = local.parent().map(Path::to_path_buf);
        }
    }
    root.ok_or_else(|| err("model_index.json could not be fetched".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_recognised() {
        assert_eq!(
            parse_hub_id("runwayml/stable-diffusion-v1-5"),
            Some(("runwayml/stable-diffusion-v1-5", None))
        );
        assert_eq!(parse_hub_id("a/b@main"), Some(("a/b", Some("main"))));
        assert_eq!(parse_hub_id("a/b/c"), None);
        assert_eq!(parse_hub_id("noslash"), None);
        assert_eq!(parse_hub_id("a/b@"), None);
        assert_eq!(parse_hub_id("../x"), None);
    }

    #[test]
    fn missing_local_path_is_not_sent_to_the_hub() {
        let err = resolve("./no/such/model", None, None, true).unwrap_err();
        assert!(matches!(err, Error::ModelNotFound(_)), "{err}");
        let err = resolve_component("/no/such/controlnet", None).unwrap_err();
        assert!(matches!(err, Error::ModelNotFound(_)), "{err}");
    }

    #[test]
    fn download_selection_prefers_the_variant_per_folder() {
        let all: Vec<String> = [
            "model_index.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.bin",
            "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors",
            "tokenizer/vocab.json",
            "safety_checker/config.json",
            "safety_checker/model.safetensors",
            "safety_checker/model.fp16.safetensors",
            "safety_checker/pytorch_model.bin",
            "feature_extractor/preprocessor_config.json",
            "v1-5-pruned.ckpt",
        ]
        .map(String::from)
        .to_vec();
        let fp16: Vec<&String> = all
            .iter()
            .filter(|f| wanted(f, Some("fp16"), &all, false))
            .collect();
        assert!(fp16.contains(&&"unet/diffusion_pytorch_model.fp16.safetensors".to_string()));
        assert!(!fp16.contains(&&"unet/diffusion_pytorch_model.safetensors".to_string()));
        assert!(fp16.contains(&&"vae/diffusion_pytorch_model.safetensors".to_string()));
        let f32: Vec<&String> = all
            .iter()
            .filter(|f| wanted(f, None, &all, false))
            .collect();
        assert!(f32.contains(&&"unet/diffusion_pytorch_model.safetensors".to_string()));
        assert!(!f32
            .iter()
            .any(|f| f.ends_with(".bin") || f.ends_with(".ckpt") || f.starts_with("safety")));
    }

    #[test]
    fn download_selection_takes_the_safety_checker_when_asked() {
        let all: Vec<String> = [
            "model_index.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "safety_checker/config.json",
            "safety_checker/model.safetensors",
            "safety_checker/model.fp16.safetensors",
            "safety_checker/pytorch_model.bin",
            "feature_extractor/preprocessor_config.json",
        ]
        .map(String::from)
        .to_vec();
        let pick = |variant, safety| -> Vec<&str> {
            all.iter()
                .filter(|f| f.starts_with("safety") && wanted(f, variant, &all, safety))
                .map(String::as_str)
                .collect()
        };
        assert_eq!(
            pick(None, true),
            [
                "safety_checker/config.json",
                "safety_checker/model.safetensors"
            ]
        );
        assert_eq!(
            pick(Some("fp16"), true),
            [
                "safety_checker/config.json",
                "safety_checker/model.fp16.safetensors"
            ]
        );
        assert!(pick(None, false).is_empty());
    }
}
