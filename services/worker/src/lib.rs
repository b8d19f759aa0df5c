//! The worker: registers with the scheduler, runs the tasks the driver sends it through its
//! [`execution::ExecutionProvider`]s, and streams every agent event back.

mod error;
mod events;
pub mod execution;
mod link;
mod metrics;
mod outbound;
pub mod proxy;
pub mod results;
mod run_log;
mod runs;
mod runtime;
mod service;
mod session;
mod switch;
#[cfg(test)]
mod tests;
mod trace;
mod worker_id;
mod workspace;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use claudecluster_config::WorkerConfig;
use claudecluster_proto::v1::worker_service_server::WorkerServiceServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use error::WorkerError;
pub use runtime::Runtime;
pub use workspace::Workspaces;

use execution::Providers;

/// A running worker.
pub struct Handle {
    pub local_addr: SocketAddr,
    pub worker_id: String,
    runtime: Arc<Runtime>,
    stop_link: CancellationToken,
    stop_server: CancellationToken,
    link: JoinHandle<()>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Handle {
    /// Takes no new work at once, lets running tasks and session turns finish for
    /// `worker.shutdownGrace`, then cancels what is left (it ends CANCELLED) and stops
    /// sessions' containers (their volumes stay); says going-away to the scheduler, then stops
    /// serving once the runs' streams have sent their last events.
    pub async fn shutdown(self) -> Result<(), tonic::transport::Error> {
        self.runtime.shut_down().await;
        self.runtime.stop_proxy();
        self.stop_link.cancel();
        let _ = self.link.await;
        self.stop_server.cancel();
        self.server
            .await
            .expect("the worker's server task panicked")
    }
}

/// Why a worker cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("container mode: {0}")]
    Container(String),
    #[error("{0}")]
    WorkerId(#[from] worker_id::WorkerIdError),
    #[error("the credential proxy (`worker.credentialProxy`): {0}")]
    Proxy(String),
}

/// Serves the worker on `listener` and registers it with the scheduler. Only callers presenting
/// `identity` (the driver, an operator's CLI) reach its API; it presents its own to the scheduler.
pub async fn spawn(
    config: WorkerConfig,
    listener: TcpListener,
    identity: claudecluster_grpc::ClusterIdentity,
) -> Result<Handle, StartError> {
    let local_addr = listener.local_addr()?;
    let advertised = config
        .advertise_address
        .clone()
        .unwrap_or_else(|| claudecluster_grpc::reachable_address(local_addr));
    let root = Workspaces::root_for(&config);
    let worker_id = match &config.worker_id {
        Some(id) => id.clone(),
        None => worker_id::stable(&root)?,
    };
    // What the agents of a worker that was killed on this root started is stopped now.
    execution::stop_leftover_agents(&root);
    let providers = Providers::for_config(&config, &worker_id)
        .await
        .map_err(StartError::Container)?;
    let scheduler_address = config.scheduler_address.clone();
    let proxy = match config.credential_proxy.enabled {
        true => Some(start_proxy(&config).await?),
        false => None,
    };
    let runtime = Arc::new(Runtime::new(worker_id.clone(), config, providers, proxy));
    runtime.results().mark_orphans_ended();
    metrics::observe(Arc::downgrade(&runtime));

    let (routes, health) =
        claudecluster_grpc::standard_routes("claudecluster.v1.WorkerService").await;
    let routes = routes.add_service(tonic::service::interceptor::InterceptedService::new(
        WorkerServiceServer::new(service::WorkerService::new(
            runtime.clone(),
            advertised.clone(),
        ))
        .max_decoding_message_size(claudecluster_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(claudecluster_proto::MAX_MESSAGE_BYTES),
        claudecluster_grpc::cluster::RequireSecret(
            identity.secret.clone(),
            &[
                claudecluster_grpc::tls::Role::Driver,
                claudecluster_grpc::tls::Role::Admin,
            ],
        ),
    ));
    let stop_server = CancellationToken::new();
    let server = {
        let stop = stop_server.clone();
        let tls = identity.server_tls();
        tokio::spawn(async move {
            claudecluster_grpc::serve(listener, routes, tls, stop.cancelled_owned()).await
        })
    };
    let stop_link = CancellationToken::new();
    tokio::spawn(keep_workspaces(runtime.clone(), stop_link.clone()));
    let link = tokio::spawn(link::run(
        runtime.clone(),
        health,
        scheduler_address,
        advertised.clone(),
        identity,
        stop_link.clone(),
    ));
    tracing::info!(
        worker = %worker_id,
        address = %local_addr,
        advertised = %advertised,
        modes = ?runtime.modes().iter().map(|mode| mode.label()).collect::<Vec<_>>(),
        capacity = runtime.capacity(),
        "worker listening"
    );
    Ok(Handle {
        local_addr,
        worker_id,
        runtime,
        stop_link,
        stop_server,
        link,
        server,
    })
}

/// Removes workspaces past their retention and counts what the rest hold, until `stop`.
async fn keep_workspaces(runtime: Arc<Runtime>, stop: CancellationToken) {
    let retention = runtime.config().workspace_retention.get();
    // Often enough that a workspace outlives its retention by a quarter of it at most, and
    // never less than a second or more than a minute apart.
    let period = (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if !retention.is_zero() {
            runtime.results().sweep(retention).await;
        }
        runtime.results().measure().await;
    }
}

/// Where the credential proxy listens unless `credentialProxy.listen` says: loopback, where
/// process agents reach it and proxy-only containers' forwarders hand over to its socket; every
/// address (its tokens guarding it) only when agents elsewhere need it: pods, or containers
/// with `egress: open` off the host's network, which reach it at the host's gateway.
fn default_proxy_listen(config: &WorkerConfig) -> &'static str {
    let container = &config.container;
    let agents_elsewhere = container.orchestrator == "kubernetes"
        || (container.egress == claudecluster_config::Egress::Open && container.network != "host");
    if agents_elsewhere {
        "0.0.0.0:0"
    } else {
        "127.0.0.1:0"
    }
}

/// Starts the worker's credential proxy with the credentials its configuration or environment
/// names.
async fn start_proxy(config: &WorkerConfig) -> Result<Arc<proxy::CredentialProxy>, StartError> {
    use proxy::Credential;
    let settings = &config.credential_proxy;
    let listen = settings
        .listen
        .clone()
        .unwrap_or_else(|| default_proxy_listen(config).to_owned());
    let listener = claudecluster_grpc::bind(&listen, "worker.credentialProxy.listen").await?;
    let env = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
    let upstream = settings
        .upstream
        .clone()
        .or_else(|| env("ANTHROPIC_BASE_URL"))
        .unwrap_or_else(|| "https://api.anthropic.com".to_owned());
    let mut credentials: Vec<Credential> = settings
        .api_keys
        .0
        .iter()
        .cloned()
        .map(Credential::ApiKey)
        .chain(
            settings
                .auth_tokens
                .0
                .iter()
                .cloned()
                .map(Credential::Bearer),
        )
        .collect();
    for path in &settings.credential_files {
        let text = std::fs::read_to_string(path).map_err(|err| {
            StartError::Proxy(format!(
                "cannot read {} (`credentialFiles`): {err}",
                path.display()
            ))
        })?;
        let text = text.trim();
        credentials.push(match text.strip_prefix("bearer:") {
            Some(token) => Credential::Bearer(token.trim().to_owned()),
            None => Credential::ApiKey(text.to_owned()),
        });
    }
    if credentials.is_empty() {
        credentials.extend(env("ANTHROPIC_API_KEY").map(Credential::ApiKey));
        credentials.extend(env("ANTHROPIC_AUTH_TOKEN").map(Credential::Bearer));
        credentials.extend(env("CLAUDE_CODE_OAUTH_TOKEN").map(Credential::Bearer));
    }
    if credentials.is_empty() {
        tracing::warn!(
            "the credential proxy has no credential: agents' requests will be refused upstream (set ANTHROPIC_API_KEY or worker.credentialProxy)"
        );
    }
    let proxy = proxy::CredentialProxy::start(
        listener,
        "127.0.0.1",
        &upstream,
        credentials,
        settings.cool_down.get(),
        settings.prices.clone(),
        config.container.egress_allow.0.clone(),
    )
    .map_err(StartError::Proxy)?;
    // Only agent containers without a network need the socket, and a worker may switch to
    // container mode later: a worker that cannot make it runs, and such containers cannot
    // start, saying why.
    let socket_dir = proxy::socket_dir(&Workspaces::root_for(config));
    if let Err(err) = proxy.listen_for_containers(&socket_dir) {
        tracing::warn!(error = %err, "agent containers with `egress: proxy-only` cannot reach the credential proxy");
    }
    Ok(proxy)
}
