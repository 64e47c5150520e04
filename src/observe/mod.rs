//! What build/ and http/ both write into: live status and build
//! bookkeeping (`status`), and Prometheus metrics (`metrics`).

pub mod metrics;
pub mod status;
