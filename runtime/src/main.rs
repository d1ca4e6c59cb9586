//! The `imagegen` command line.

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cli::generate::GenerateArgs;
use cli::mask::MaskArgs;
use cli::styles::StylesArgs;
use cli::{bench, train};

#[derive(Parser)]
#[command(name = "imagegen", version, about = "Self-hosted Stable Diffusion")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from a prompt and write them as PNG files.
    Generate(Box<GenerateArgs>),
    /// List the style presets.
    Styles(StylesArgs),
    /// Find an inpainting mask from text (CLIPSeg) and write it as a PNG of the image's
    /// size: white = repaint.
    Mask(MaskArgs),
    /// Time a local model: time to ready, denoising throughput per batch size, peak memory
    /// and the LoRA switch; JSON on stdout, a table on stderr.
    Bench(Box<bench::BenchArgs>),
    /// Serve the HTTP API (generations, jobs, uploads, LoRAs, OpenAI-compatible images).
    Serve(Box<imagegen_runtime::server::ServeArgs>),
    /// Train a DreamBooth LoRA on a few photos of a subject; progress as JSON lines on
    /// stdout.
    Train(Box<train::TrainArgs>),
}

/// clap's message without its usage block, folded onto one line.
fn one_line_usage_error(rendered: &str) -> String {
    let message = rendered.split("Usage:").next().unwrap_or(rendered);
    let message = message.trim().trim_start_matches("error:").trim();
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("imagegen: error: {}", one_line_usage_error(&e.to_string()));
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Generate(args) => cli::generate::generate(*args),
        Command::Styles(args) => cli::styles::list_styles(args),
        Command::Mask(args) => cli::mask::find_mask(args),
        Command::Bench(args) => bench::run(*args),
        Command::Serve(args) => imagegen_runtime::server::run(*args),
        Command::Train(args) => train::run(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            // One line, whatever the error carried.
            eprintln!("imagegen: error: {}", message.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_errors_fold_to_one_line() {
        let rendered = "error: the following required arguments were not provided:\n  --prompt <PROMPT>\n\nUsage: imagegen generate --prompt <PROMPT>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            one_line_usage_error(rendered),
            "the following required arguments were not provided: --prompt <PROMPT>"
        );
    }
}
