//! The worker: registers with the scheduler, runs the tasks the driver sends it through its
//! [`execution::ExecutionProvider`]s, and streams every agent event back.

mod error;
mod events;
pub mod execution;
mod link;
mod run_log;
mod runs;
mod runtime;
mod service;
mod session;
mod switch;
#[cfg(test)]
mod tests;
mod worker_id;
mod workspace;

use std::net::SocketAddr;
use std::sync::Arc;

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
}

/// Starts a worker serving on `listener` and registering with its scheduler.
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
    let runtime = Arc::new(Runtime::new(worker_id.clone(), config, providers));

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
