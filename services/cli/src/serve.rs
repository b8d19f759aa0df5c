//! Running services: one, or all three composed (`up`).

use std::path::PathBuf;
use std::process::ExitCode;

use claudecluster_config::{ClusterConfig, FileLayout};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Services {
    All,
    Driver,
    Scheduler,
    Worker,
}

/// Prints where a service listens, on stdout, for people and for scripts that start it.
fn announce(service: &str, address: std::net::SocketAddr) {
    println!("claudecluster: {service} listening on {address}");
}

pub async fn run(services: Services, config_file: Option<PathBuf>) -> ExitCode {
    let layout = match services {
        Services::All => FileLayout::Cluster,
        Services::Driver => FileLayout::Section("driver"),
        Services::Scheduler => FileLayout::Section("scheduler"),
        Services::Worker => FileLayout::Section("worker"),
    };
    let config = match claudecluster_config::load(config_file.as_deref(), layout, std::env::vars())
    {
        Ok(config) => config,
        Err(err) => {
            eprintln!("claudecluster: {err}");
            return ExitCode::from(2);
        }
    };
    let service = match services {
        Services::All => "claudecluster",
        Services::Driver => "claudecluster-driver",
        Services::Scheduler => "claudecluster-scheduler",
        Services::Worker => "claudecluster-worker",
    };
    let telemetry = match claudecluster_telemetry::init_with(service, &config.telemetry) {
        Ok(telemetry) => telemetry,
        Err(err) => {
            eprintln!("claudecluster: {err}");
            return ExitCode::from(2);
        }
    };
    let metrics = match &config.telemetry.metrics_listen {
        Some(address) => match claudecluster_telemetry::metrics::serve(address).await {
            Ok(server) => {
                announce("metrics", server.local_addr);
                Some(server)
            }
            Err(err) => {
                eprintln!("claudecluster: {err}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    match start(services, config).await {
        Ok(running) => {
            let code = tokio::select! {
                _ = wait_for_signal() => ExitCode::SUCCESS,
                _ = running.driver_lost() => {
                    eprintln!("claudecluster: the driver lost its lead on the store; stopping");
                    ExitCode::FAILURE
                }
            };
            tracing::info!("shutting down");
            running.shutdown().await;
            drop(metrics);
            telemetry.shutdown();
            code
        }
        Err(err) => {
            eprintln!("claudecluster: {err}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Default)]
struct Running {
    scheduler: Option<claudecluster_scheduler::Handle>,
    driver: Option<claudecluster_driver::Handle>,
    worker: Option<claudecluster_worker::Handle>,
}

impl Running {
    /// Resolves when the driver run here stops on its own; never without one.
    async fn driver_lost(&self) {
        match &self.driver {
            Some(driver) => driver.lost().await,
            None => std::future::pending().await,
        }
    }

    /// Stops the worker first (its tasks end and are recorded), then the driver, then the
    /// scheduler.
    async fn shutdown(self) {
        if let Some(worker) = self.worker {
            let _ = worker.shutdown().await;
        }
        if let Some(driver) = self.driver {
            let _ = driver.shutdown().await;
        }
        if let Some(scheduler) = self.scheduler {
            let _ = scheduler.shutdown().await;
        }
    }
}

async fn start(
    services: Services,
    mut config: ClusterConfig,
) -> Result<Running, Box<dyn std::error::Error>> {
    let mut running = Running::default();
    let all = services == Services::All;
    let secret = cluster_secret(&config)?;
    // Each service presents its own certificate, when it has one.
    let identity = |tls: &claudecluster_config::TlsConfig, section: &str| {
        Ok::<_, String>(claudecluster_grpc::ClusterIdentity {
            secret: secret.clone(),
            tls: claudecluster_grpc::tls::Tls::load(tls, section)?,
        })
    };
    if all || services == Services::Scheduler {
        let listener =
            claudecluster_grpc::bind(&config.scheduler.listen, "scheduler.listen").await?;
        let scheduler = claudecluster_scheduler::spawn(
            config.scheduler.clone(),
            listener,
            identity(&config.scheduler.tls, "scheduler")?,
        )
        .await?;
        announce("scheduler", scheduler.local_addr);
        if all {
            // Composed in one process, the others use the address actually bound.
            let address = claudecluster_grpc::reachable_address(scheduler.local_addr);
            config.driver.scheduler_address = address.clone();
            config.worker.scheduler_address = address;
        }
        running.scheduler = Some(scheduler);
    }
    if all || services == Services::Driver {
        let listener = claudecluster_grpc::bind(&config.driver.listen, "driver.listen").await?;
        let driver = claudecluster_driver::spawn(
            config.driver.clone(),
            listener,
            identity(&config.driver.tls, "driver")?,
        )
        .await?;
        // Before the driver's line, which scripts (and the tests) take as "started".
        if let Some(http) = driver.http_addr {
            announce("http", http);
        }
        announce("driver", driver.local_addr);
        running.driver = Some(driver);
    }
    if all || services == Services::Worker {
        let listener = claudecluster_grpc::bind(&config.worker.listen, "worker.listen").await?;
        let worker = claudecluster_worker::spawn(
            config.worker.clone(),
            listener,
            identity(&config.worker.tls, "worker")?,
        )
        .await?;
        announce("worker", worker.local_addr);
        running.worker = Some(worker);
    }
    Ok(running)
}

/// The secret the services present to each other: `CLAUDECLUSTER_CLUSTER_SECRET`, the file
/// `cluster.secretFile`, or the one the services of this host share under the data directory.
pub fn cluster_secret(config: &ClusterConfig) -> Result<claudecluster_grpc::ClusterSecret, String> {
    claudecluster_grpc::ClusterSecret::resolve(
        std::env::var(claudecluster_grpc::cluster::SECRET_VARIABLE).ok(),
        config.cluster.secret_file.as_deref(),
        &claudecluster_config::default_data_dir(),
    )
}

async fn wait_for_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("cannot listen for SIGTERM");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

/// Runs the MCP server until its client leaves (stdio) or a signal (HTTP).
pub async fn mcp(
    config_file: Option<PathBuf>,
    http: bool,
    listen: Option<String>,
    driver: Option<String>,
    api_key: Option<String>,
    ca: Option<PathBuf>,
) -> ExitCode {
    claudecluster_telemetry::init();
    let config = match claudecluster_config::load(
        config_file.as_deref(),
        FileLayout::Section("mcp"),
        std::env::vars(),
    ) {
        Ok(config) => config.mcp,
        Err(err) => {
            eprintln!("claudecluster: {err}");
            return ExitCode::from(2);
        }
    };
    let driver = driver.unwrap_or(config.driver_address);
    // Claude Code tells a stdio MCP server which of its sessions started it.
    let parent = std::env::var("CLAUDE_CODE_SESSION_ID").ok();
    let bearer = match claudecluster_grpc::Bearer::new(
        api_key.as_deref(),
        "--api-key / CLAUDECLUSTER_API_KEY",
    ) {
        Ok(bearer) => bearer,
        Err(message) => {
            eprintln!("claudecluster: {message}");
            return ExitCode::from(2);
        }
    };
    let tls = match ca
        .map(|ca| claudecluster_grpc::tls::Tls::from_files(&ca, None, None))
        .transpose()
    {
        Ok(tls) => tls,
        Err(message) => {
            eprintln!("claudecluster: {message}");
            return ExitCode::from(2);
        }
    };
    let tools = match claudecluster_mcp::ClusterTools::new(&driver, parent, bearer, tls.as_ref()) {
        Ok(tools) => tools,
        Err(message) => {
            eprintln!("claudecluster: {message}");
            return ExitCode::from(2);
        }
    };
    if !http {
        return match claudecluster_mcp::serve_stdio(tools).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("claudecluster: {message}");
                ExitCode::FAILURE
            }
        };
    }
    let address = listen.unwrap_or(config.listen);
    let insecure = config.insecure;
    let tls = match (&config.tls.cert, &config.tls.key) {
        (Some(cert), Some(key)) => {
            let read = |path: &PathBuf, key: &str| {
                std::fs::read(path).map_err(|err| {
                    format!("cannot read {} (`mcp.tls.{key}`): {err}", path.display())
                })
            };
            match (read(cert, "cert"), read(key, "key")) {
                (Ok(cert_pem), Ok(key_pem)) => {
                    Some(claudecluster_mcp::HttpTls { cert_pem, key_pem })
                }
                (Err(message), _) | (_, Err(message)) => {
                    eprintln!("claudecluster: {message}");
                    return ExitCode::from(2);
                }
            }
        }
        (None, None) => None,
        _ => {
            eprintln!("claudecluster: `mcp.tls` needs both cert and key");
            return ExitCode::from(2);
        }
    };
    let has_tls = tls.is_some();
    let started = async {
        let listener = claudecluster_grpc::bind(&address, "mcp.listen").await?;
        let bound = listener.local_addr()?;
        if api_key.is_none() && !has_tls && !bound.ip().is_loopback() && !insecure {
            return Err(std::io::Error::other(format!(
                "refusing to serve the MCP tools on {bound} beyond loopback with no API key and no TLS: pass --api-key (CLAUDECLUSTER_API_KEY), set `mcp.tls`, listen on 127.0.0.1, or set `mcp.insecure: true`"
            )));
        }
        claudecluster_mcp::serve_http(tools, listener, api_key.clone(), tls)
    };
    match started.await {
        Ok(server) => {
            announce("mcp", server.local_addr);
            wait_for_signal().await;
            let _ = server.shutdown().await;
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("claudecluster: {err}");
            ExitCode::FAILURE
        }
    }
}
