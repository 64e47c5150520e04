//! What build/ and http/ both write into: live status and build
//! bookkeeping (`status`), Prometheus metrics (`metrics`) and the
//! history rings behind the admin page's plots (`history`).

pub mod history;
pub mod metrics;
pub mod status;
