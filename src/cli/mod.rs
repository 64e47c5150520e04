//! The subcommands of the `nixery` binary, one file each, plus what they
//! share with systemd (`notify`) and with each other (below).

/// `eprintln!` for a command's messages, redacted: an error may repeat a
/// setting's URL with the credentials in it, and stderr is a log too.
macro_rules! eprintln_redacted {
    ($($arg:tt)*) => {
        eprintln!("{}", $crate::redact::redact(&format!($($arg)*)))
    };
}

pub mod build;
pub mod check_config;
pub mod export;
pub mod gc;
pub mod import;
pub mod nix_cache;
pub mod notify;
pub mod sbom;
pub mod serve;
pub mod tls;
pub mod verify;

use crate::build::builder::Builder;
use crate::config::{Config, ServeArgs};
use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;

/// Runs a command that works on the storage without a server: validates
/// the settings (exit 2 if wrong; `need_source` refuses a mirror), opens the
/// storage (refused while `serve` or another command has it open), and
/// runs `work`, whose error is printed (exit 1).
pub(crate) fn offline<F, Fut>(args: &ServeArgs, need_source: bool, work: F) -> ExitCode
where
    F: FnOnce(Config, Arc<Builder>) -> Fut,
    Fut: Future<Output = anyhow::Result<ExitCode>>,
{
    let config = match args.validate().and_then(|c| {
        if need_source {
            c.require_source()
        } else {
            Ok(c)
        }
    }) {
        Ok(c) => c,
        Err(e) => {
            eprintln_redacted!("nixery: {e}");
            return ExitCode::from(2);
        }
    };
    with_runtime(async {
        let builder = crate::open_builder(&config).await?;
        let db = builder.db().clone();
        let result = work(config, Arc::clone(&builder)).await;
        builder.finish_background().await;
        drop(builder);
        db.flush().await?;
        result
    })
}

/// Runs a command's async work on a runtime of its own; its error is
/// printed (exit 1).
pub(crate) fn with_runtime<Fut>(work: Fut) -> ExitCode
where
    Fut: Future<Output = anyhow::Result<ExitCode>>,
{
    let result = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(work),
        Err(e) => Err(anyhow::anyhow!("cannot start the async runtime: {e}")),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln_redacted!("nixery: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether stderr is a terminal, for progress bars instead of lines.
pub(crate) fn on_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}
