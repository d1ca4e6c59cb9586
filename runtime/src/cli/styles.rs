//! `imagegen styles`: the style presets.

use std::path::PathBuf;

use imagegen_engine::styles::StyleBook;

#[derive(clap::Args)]
pub struct StylesArgs {
    /// A deployment's own presets (same format as the built-in file), added to ours.
    #[arg(long, env = "IMAGEGEN_STYLES")]
    styles_file: Option<PathBuf>,
    /// Print the presets as JSON.
    #[arg(long)]
    json: bool,
}

pub fn list_styles(args: StylesArgs) -> Result<(), String> {
    let book = StyleBook::load(args.styles_file.as_deref()).map_err(|e| e.to_string())?;
    if args.json {
        let json = serde_json::to_string_pretty(book.list()).map_err(|e| e.to_string())?;
        println!("{json}");
        return Ok(());
    }
    let width = book.list().iter().map(|s| s.id.len()).max().unwrap_or(0);
    for style in book.list() {
        let post = style
            .postprocess
            .map(|p| format!(" [{}]", p.as_str()))
            .unwrap_or_default();
        println!(
            "{:width$}  {}{post}: {}",
            style.id, style.name, style.prompt
        );
    }
    Ok(())
}
