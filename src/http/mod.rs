//! HTTP: the registry API under `/v2/`, the admin page, status JSON and
//! metrics, and the middleware that measures every request.

pub mod accept;
pub mod admin;
pub mod auth;
pub mod conn;
pub mod file_body;
pub mod format;
pub mod image_report;
pub mod nix_cache;
pub mod observe;
pub mod plot;
pub mod range;
pub mod registry;
pub mod report;
pub mod sendfile;
pub mod trends;
