//! One Prometheus registry per process, served as text on `/metrics`.
//!
//! Each service registers its families once ([`register`]); gauges that describe state (queue
//! depth, slots, pool sizes) are set just before each scrape by the service's
//! [`before_scrape`] hook rather than on every change.

use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};
use tokio::sync::oneshot;

type Hook = Box<dyn Fn() + Send + Sync>;

#[derive(Default)]
struct Shared {
    registry: Registry,
    hooks: Vec<Hook>,
}

fn shared() -> &'static Mutex<Shared> {
    static SHARED: OnceLock<Mutex<Shared>> = OnceLock::new();
    SHARED.get_or_init(Mutex::default)
}

/// Adds a family to the process's registry. Call once per name (a service keeps its families
/// in a `OnceLock`).
pub fn register(name: &str, help: &str, metric: impl Metric) {
    shared()
        .lock()
        .expect("metrics registry lock poisoned")
        .registry
        .register(name, help, metric);
}

/// Runs `hook` before every scrape, to set gauges from the service's state.
pub fn before_scrape(hook: impl Fn() + Send + Sync + 'static) {
    shared()
        .lock()
        .expect("metrics registry lock poisoned")
        .hooks
        .push(Box::new(hook));
}

/// The registry in the Prometheus text format (OpenMetrics 1.0, which Prometheus reads).
pub fn scrape() -> String {
    let shared = shared().lock().expect("metrics registry lock poisoned");
    for hook in &shared.hooks {
        hook();
    }
    let mut text = String::new();
    encode(&mut text, &shared.registry).expect("writing to a String cannot fail");
    text
}

/// Buckets for latencies from a millisecond to a couple of minutes, in seconds.
pub fn latency_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        120.0,
    ])
}

/// Serves `/metrics` until dropped or shut down.
pub struct MetricsServer {
    pub local_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Listens on `address` (`telemetry.metricsListen`) and serves the registry at `/metrics`.
pub async fn serve(address: &str) -> Result<MetricsServer, String> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|err| format!("cannot listen on {address} (`telemetry.metricsListen`): {err}"))?;
    let local_addr = listener
        .local_addr()
        .map_err(|err| format!("cannot read the address of {address}: {err}"))?;
    let routes = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            (
                [(
                    http::header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )],
                scrape(),
            )
        }),
    );
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        if let Err(err) = axum::serve(listener, routes)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!("the metrics endpoint stopped: {err}");
        }
    });
    Ok(MetricsServer {
        local_addr,
        stop: Some(stop),
    })
}
