//! The Hugging Face hub, through `hf-hub`: the engine's [`Hub`] for hub ids. Files land in
//! hf-hub's cache (`HF_HOME`, `HF_ENDPOINT` and `HF_TOKEN` apply as they do to hf-hub).

use std::path::PathBuf;
use std::sync::Arc;

use hf_hub::api::sync::{Api, ApiBuilder, ApiRepo};
use hf_hub::{Repo, RepoType};
use imagegen_engine::source::Hub;
use imagegen_engine::{Error, Result};

/// The hub as hf-hub reaches it, with a progress bar when stderr is a terminal.
pub struct HfHub {
    api: Api,
}

impl HfHub {
    pub fn new() -> Result<Self> {
        let api = ApiBuilder::from_env()
            .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .build()
            .map_err(|e| download_error("(hub)", e.to_string()))?;
        Ok(HfHub { api })
    }

    /// The hub, shared, as `LoadOptions::hub` takes it.
    pub fn shared() -> Result<Arc<dyn Hub>> {
        Ok(Arc::new(Self::new()?))
    }

    fn repo(&self, id: &str, revision: Option<&str>) -> ApiRepo {
        self.api.repo(match revision {
            Some(rev) => Repo::with_revision(id.to_string(), RepoType::Model, rev.to_string()),
            None => Repo::new(id.to_string(), RepoType::Model),
        })
    }
}

fn download_error(id: &str, message: String) -> Error {
    Error::Download {
        repo: id.to_string(),
        message,
    }
}

impl Hub for HfHub {
    fn files(&self, id: &str, revision: Option<&str>) -> Result<Vec<String>> {
        let info = self
            .repo(id, revision)
            .info()
            .map_err(|e| download_error(id, e.to_string()))?;
        Ok(info.siblings.into_iter().map(|s| s.rfilename).collect())
    }

    fn fetch(&self, id: &str, revision: Option<&str>, file: &str) -> Result<PathBuf> {
        tracing::info!(repo = id, file, "fetching");
        self.repo(id, revision)
            .get(file)
            .map_err(|e| download_error(id, format!("{file}: {e}")))
    }
}
