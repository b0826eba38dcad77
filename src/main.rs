use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use renderq::cli::{Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The thumbnail sandbox's child decodes alone: no runtime, no threads,
    // no logs, inside the address space its parent allowed.
    if let Command::Thumbnail { max_pixels } = cli.command {
        return renderq::worker::thumbs::sandbox::child_main(max_pixels);
    }
    // The reaper is forked before any thread exists (see `workspace`).
    if cli.command.runs_commands()
        && let Err(error) = renderq::workspace::start_reaper()
    {
        eprintln!("renderq: cannot start the reaper, a crash may leave processes behind: {error}");
    }
    // Benchmarks print their figures; their logs only when asked.
    let quiet = matches!(cli.command, renderq::cli::Command::Bench(_));
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(if quiet { "warn" } else { "info" }));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    // reqwest uses the same crypto provider as the AWS SDK.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("renderq: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(renderq::cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("renderq: {error:#}");
            ExitCode::FAILURE
        }
    }
}
