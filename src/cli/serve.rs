//! `nixery serve` (and a bare `nixery`, as the original binary): run the
//! registry until SIGTERM or Ctrl-C.

use crate::cli::notify::Notifier;
use crate::config::ServeArgs;
use std::process::ExitCode;

pub fn run(args: ServeArgs) -> ExitCode {
    let config = match args.validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln_redacted!("nixery: {e}");
            return ExitCode::from(2);
        }
    };
    if config.s3.is_none() {
        if let Some(warning) = args.gc.local_warning() {
            tracing::warn!("{warning}");
        }
    }
    // Before the runtime's threads exist: this edits the environment.
    let notifier = match Notifier::take_from_env() {
        Some(Ok(n)) => Some(std::sync::Arc::new(n)),
        Some(Err(e)) => {
            eprintln_redacted!("nixery: {e}");
            return ExitCode::FAILURE;
        }
        None => None,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln_redacted!("nixery: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = runtime.block_on(async {
        let server = crate::Server::start(&config).await?;
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
            format!(
                "admin page: {}://{host}:{}/",
                if server.is_tls() { "https" } else { "http" },
                addr.port()
            ),
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
            eprintln_redacted!("nixery: {e:#}");
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
fn notify(notifier: Option<&Notifier>, state: &str) {
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
