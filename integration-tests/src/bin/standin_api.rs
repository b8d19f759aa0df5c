//! Serves the stand-in Messages API on loopback, for trying the cluster by hand and for
//! benchmarks: `standin-api [PORT]`, then `ANTHROPIC_BASE_URL=http://127.0.0.1:PORT`.

use claudecluster_integration_tests::StandinApi;

#[tokio::main]
async fn main() {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let api = if port == 0 {
        StandinApi::start().await
    } else {
        StandinApi::start_fixed(port).await
    }
    .expect("cannot bind the stand-in API");
    println!("standin-api listening on {}", api.address());
    let _ = tokio::signal::ctrl_c().await;
}
