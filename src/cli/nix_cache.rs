//! `nixery nix-cache key`: makes the Nix binary cache's key pair and says
//! how clients trust it.

use crate::nixcache::key::SigningKey;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct NixCacheArgs {
    #[command(subcommand)]
    command: NixCacheCommand,
}

#[derive(clap::Subcommand, Debug)]
enum NixCacheCommand {
    /// Write a new signing key pair, `NAME.secret` (for --nix-cache-key)
    /// and `NAME.public`, and print the client configuration.
    Key {
        /// The key's name, e.g. the server's host name and `-1`.
        #[arg(long)]
        name: String,
        /// Where to write the two files (never over existing ones).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

pub fn run(args: NixCacheArgs) -> ExitCode {
    let NixCacheCommand::Key { name, dir } = args.command;
    match write_pair(&name, &dir) {
        Ok((secret, public)) => {
            print!("{}", client_lines(&secret, &public));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln_redacted!("nixery: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Writes `name.secret` (owner-only) and `name.public` into `dir`; their
/// paths and the public key.
fn write_pair(name: &str, dir: &Path) -> anyhow::Result<(PathBuf, String)> {
    use anyhow::Context as _;
    let (secret_text, key) = SigningKey::generate(name)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let secret = dir.join(format!("{name}.secret"));
    let public = key.public();
    write_new(&secret, &secret_text, 0o600)?;
    write_new(&dir.join(format!("{name}.public")), &public, 0o644)?;
    Ok((secret, public))
}

fn write_new(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| {
            format!(
                "creating {} (an existing key is never overwritten)",
                path.display()
            )
        })?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

fn client_lines(secret: &Path, public: &str) -> String {
    format!(
        "secret key: {secret} (serve with --nix-cache-key {secret}; keep it private)
public key: {public}

Clients, in /etc/nix/nix.conf:
  extra-substituters = http://HOST:PORT/nix-cache
  extra-trusted-public-keys = {public}

or on NixOS:
  nix.settings.substituters = [ \"http://HOST:PORT/nix-cache\" ];
  nix.settings.trusted-public-keys = [ \"{public}\" ];
",
        secret = secret.display()
    )
}
