//! The subcommands of the `nixery` binary, one file each, plus what they
//! share with systemd (`notify`).

pub mod check_config;
pub mod gc;
pub mod notify;
pub mod serve;
