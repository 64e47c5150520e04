//! The `nixery` binary: flags and logging. Each subcommand is a module of
//! `nixery::cli`.

use clap::{Parser, Subcommand};
use nixery::cli;
use nixery::config::{LogFormat, ServeArgs};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "nixery",
    version,
    about = "A container registry that builds images on demand with Nix",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// With no subcommand, `nixery` serves, as the original binary does:
    /// deployments start it so, configured by the environment.
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the registry (the default when no subcommand is given).
    Serve(ServeArgs),
    /// Validate the settings `serve` would get, without serving: exit 0 and
    /// a summary, or 2 and what is wrong.
    CheckConfig(cli::check_config::CheckArgs),
    /// Collect garbage now: evict the least recently pulled images beyond
    /// the limits and delete unreferenced blobs (the server must be stopped;
    /// a running server collects by itself).
    Gc(cli::gc::GcArgs),
    /// Build images into the storage as a pull would, without a server
    /// (refused while `serve` has the storage open).
    Build(cli::build::BuildArgs),
    /// Write images as an OCI image layout (a directory, or a .tar file),
    /// optionally with a Nix binary cache of their closures.
    Export(cli::export::ExportArgs),
    /// Check an OCI image layout whole, then store its images as pinned.
    Import(cli::import::ImportArgs),
    /// Re-hash every blob and check every cached manifest; exit 1 on any
    /// problem.
    Verify(cli::verify::VerifyArgs),
}

fn main() -> ExitCode {
    // clap's errors repeat the value given, which may be a URL with a
    // password in it.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = e.exit_code();
            let text = e.render().to_string();
            let text = nixery::redact::redact(&text);
            if e.use_stderr() {
                eprint!("{text}");
            } else {
                print!("{text}");
            }
            return ExitCode::from(u8::try_from(code).unwrap_or(2));
        }
    };
    match cli.command {
        Some(Command::Serve(args)) => serve(args),
        None => serve(cli.serve),
        Some(Command::CheckConfig(args)) => cli::check_config::run(args),
        Some(Command::Gc(args)) => {
            init_logging(LogFormat::Text, "info");
            cli::gc::run(args)
        }
        Some(Command::Build(args)) => {
            init_logging(args.serve.log_format, "warn");
            cli::build::run(args)
        }
        Some(Command::Export(args)) => {
            init_logging(args.serve.log_format, "warn");
            cli::export::run(args)
        }
        Some(Command::Import(args)) => {
            init_logging(args.serve.log_format, "warn");
            cli::import::run(args)
        }
        Some(Command::Verify(args)) => {
            init_logging(args.serve.log_format, "warn");
            cli::verify::run(args)
        }
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    init_logging(args.log_format, "info");
    cli::serve::run(args)
}

/// Logs to stderr, filtered by RUST_LOG (default `level`: `info` for the
/// server, `warn` for the commands that print their own progress).
/// Requests and builds each run in a span, so their fields are on every
/// line they log.
fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| nixery::redact::RedactingStderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
}
