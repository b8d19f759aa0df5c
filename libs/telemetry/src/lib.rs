//! Logging for every ClaudeCluster process: human-readable lines on stderr, filtered by
//! `CLAUDECLUSTER_LOG` (or `RUST_LOG`), `info` by default.

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = std::env::var("CLAUDECLUSTER_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info,h2=warn,tower=warn,hyper=warn".to_owned());
    // A second call (tests that start several services in one process) keeps the first.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
