//! The `nixery` binary: flags, logging, signals. Everything else is the library.

use clap::{Parser, Subcommand};
use nixery::config::{LogFormat, ServeArgs};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "nixery",
    version,
    about = "A container registry that builds images on demand with Nix"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the registry.
    Serve(ServeArgs),
    /// Validate the settings `serve` would get, without serving: exit 0 and
    /// a summary, or 2 and what is wrong.
    CheckConfig(nixery::check::CheckArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            init_logging(args.log_format);
            serve(args)
        }
        Command::CheckConfig(args) => check_config(args),
    }
}

fn check_config(args: nixery::check::CheckArgs) -> ExitCode {
    match nixery::check::check(&args) {
        Ok(config) => {
            print!(
                "{}",
                nixery::check::summary(&config, !args.no_filesystem_checks)
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nixery: invalid configuration: {e}");
            ExitCode::from(2)
        }
    }
}

/// Logs to stderr, filtered by RUST_LOG (default `info`). Requests and
/// builds each run in a span, so their fields are on every line they log.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let config = match args.validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nixery: {e}");
            return ExitCode::from(2);
        }
    };
    // Before the runtime's threads exist: this edits the environment.
    let notifier = match nixery::notify::Notifier::take_from_env() {
        Some(Ok(n)) => Some(std::sync::Arc::new(n)),
        Some(Err(e)) => {
            eprintln!("nixery: {e}");
            return ExitCode::FAILURE;
        }
        None => None,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nixery: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = runtime.block_on(async {
        let server = nixery::Server::start(&config).await?;
        let shutdown = shutdown_signal()?;
        let addr = server.local_addr()?;
        let host = if addr.ip().is_unspecified() {
            "localhost".to_owned()
        } else {
            addr.ip().to_string()
        };
        announce(&[
            format!("nixery listening on {addr}"),
            format!(
                "try: docker run --rm {host}:{}/shell/hello hello",
                addr.port()
            ),
            format!("admin page: http://{host}:{}/", addr.port()),
        ]);
        notify(
            notifier.as_deref(),
            &format!("READY=1\nSTATUS=listening on {addr}"),
        );
        server
            .run(async move {
                shutdown.await;
                notify(notifier.as_deref(), "STOPPING=1");
            })
            .await?;
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nixery: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints start-up lines. Not println!: a closed stdout must not take the
/// server down.
fn announce(lines: &[String]) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for line in lines {
        let _ = writeln!(out, "{line}");
    }
    let _ = out.flush();
}

/// Tells systemd (`Type=notify`) about a state change; a failure only
/// costs the notification.
fn notify(notifier: Option<&nixery::notify::Notifier>, state: &str) {
    if let Some(n) = notifier {
        if let Err(e) = n.notify(state) {
            tracing::warn!(error = %e, "could not notify systemd");
        }
    }
}

/// Installs the SIGTERM and SIGINT handlers now and returns a future that
/// resolves on either. Installed before readiness is announced: a SIGTERM
/// that came before the first poll would otherwise kill the process
/// without a graceful shutdown.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! { _ = term.recv() => {}, _ = interrupt.recv() => {} }
        tracing::info!("shutting down");
    })
}
