//! `nixery tls init`: a private CA and a server certificate for a LAN
//! without a PKI, and the steps that make clients trust it.

use crate::tls::init::{init, renew, Layout, Names};
use crate::tls::trust::client_steps;
use clap::{Args, Subcommand};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct TlsArgs {
    #[command(subcommand)]
    pub command: TlsCommand,
}

#[derive(Debug, Subcommand)]
pub enum TlsCommand {
    /// Write a private CA (its key apart, 0600) and a server certificate
    /// signed by it for the given names and addresses; print how to serve
    /// it and how clients trust it.
    Init(InitArgs),
    /// Write a new server key and certificate signed by the CA that `init`
    /// wrote, before the old one expires (for its names, unless --hostname
    /// or --ip is given) or for other names; clients keep trusting the
    /// same CA, and a running server rereads the pair.
    Renew(RenewArgs),
}

/// The names a server certificate is for.
#[derive(Debug, Args)]
pub struct NameArgs {
    /// DNS name clients use for the server (repeatable).
    #[arg(long = "hostname")]
    pub hostnames: Vec<String>,
    /// IP address clients use for the server (repeatable).
    #[arg(long = "ip")]
    pub ips: Vec<IpAddr>,
}

impl From<NameArgs> for Names {
    fn from(a: NameArgs) -> Names {
        Names {
            hostnames: a.hostnames,
            ips: a.ips,
        }
    }
}

#[derive(Debug, Args)]
pub struct RenewArgs {
    /// The directory `tls init` wrote (ca.crt, ca-private/ca.key).
    #[arg(long)]
    pub dir: PathBuf,
    #[command(flatten)]
    pub names: NameArgs,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Directory to write ca.crt, ca-private/ca.key, server.crt and
    /// server.key into.
    #[arg(long)]
    pub dir: PathBuf,
    #[command(flatten)]
    pub names: NameArgs,
    /// The port `serve` will listen on, for the printed steps.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Replace existing files (clients must then trust the new CA).
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: TlsArgs) -> ExitCode {
    match args.command {
        TlsCommand::Init(a) => run_init(a),
        TlsCommand::Renew(a) => run_renew(a),
    }
}

/// `dir` made absolute, so that the paths printed can be used anywhere;
/// Err is the exit code after saying why.
fn absolute_dir(dir: &std::path::Path) -> Result<std::path::PathBuf, ExitCode> {
    std::path::absolute(dir).map_err(|e| {
        eprintln_redacted!("nixery: {}: {e}", dir.display());
        ExitCode::from(2)
    })
}

fn run_renew(args: RenewArgs) -> ExitCode {
    let dir = match absolute_dir(&args.dir) {
        Ok(d) => d,
        Err(code) => return code,
    };
    let mut names = Names::from(args.names);
    if names.hostnames.is_empty() && names.ips.is_empty() {
        let layout = Layout::under(&dir);
        match crate::tls::load(&layout.server_cert, &layout.server_key) {
            Ok(current) => {
                for name in current.info.names {
                    match name.parse::<IpAddr>() {
                        Ok(ip) => names.ips.push(ip),
                        Err(_) => names.hostnames.push(name),
                    }
                }
            }
            Err(e) => {
                eprintln_redacted!(
                    "nixery: cannot read the current server certificate for its names ({e}); give --hostname or --ip"
                );
                return ExitCode::from(2);
            }
        }
    }
    match renew(&dir, &names) {
        Ok(layout) => {
            let loaded = crate::tls::load(&layout.server_cert, &layout.server_key);
            let until = match loaded {
                Ok(l) => crate::http::format::utc(l.info.not_after),
                Err(e) => format!("(unknown: reading it back failed: {e})"),
            };
            println!(
                "wrote {} and {} for {}, signed by {}, valid until {until}; a running server picks them up within seconds",
                layout.server_cert.display(),
                layout.server_key.display(),
                names
                    .hostnames
                    .iter()
                    .cloned()
                    .chain(names.ips.iter().map(IpAddr::to_string))
                    .collect::<Vec<_>>()
                    .join(", "),
                layout.ca_cert.display(),
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln_redacted!("nixery: {e}");
            ExitCode::from(2)
        }
    }
}

fn run_init(args: InitArgs) -> ExitCode {
    let dir = match absolute_dir(&args.dir) {
        Ok(d) => d,
        Err(code) => return code,
    };
    let names = Names::from(args.names);
    let layout = match init(&dir, &names, args.force) {
        Ok(l) => l,
        Err(e) => {
            eprintln_redacted!("nixery: {e}");
            return ExitCode::from(2);
        }
    };
    let hosts: Vec<String> = names
        .hostnames
        .iter()
        .cloned()
        .chain(names.ips.iter().map(|ip| match ip {
            IpAddr::V6(v6) => format!("[{v6}]"),
            IpAddr::V4(v4) => v4.to_string(),
        }))
        .map(|h| format!("{h}:{}", args.port))
        .collect();
    let mut out = format!(
        "wrote
  {}  the CA certificate: give it to every client
  {}  the CA's key (0600): only needed to sign a new server certificate; keep it off the server if you can
  {}  the server certificate (then the CA's)
  {}  the server's key (0600)

serve with
  nixery serve --port {} --tls-cert {} --tls-key {} ...
  (or NIXERY_TLS_CERT and NIXERY_TLS_KEY; the server rereads the files when they change)

on each client, in a directory holding a copy of ca.crt (or fetch it: curl -fsSk https://{}/ca.crt -o ca.crt, and compare it with {}):
",
        layout.ca_cert.display(),
        layout.ca_key.display(),
        layout.server_cert.display(),
        layout.server_key.display(),
        args.port,
        layout.server_cert.display(),
        layout.server_key.display(),
        hosts.first().map_or("HOST:PORT", String::as_str),
        layout.ca_cert.display(),
    );
    for host in &hosts {
        out.push_str(&format!(
            "\n## for {host}\n{}",
            client_steps(host, "ca.crt")
        ));
    }
    out.push_str(&format!(
        "\nthen: docker pull {}/shell/hello\n",
        hosts.first().map_or("HOST:PORT", String::as_str)
    ));
    print!("{out}");
    ExitCode::SUCCESS
}
