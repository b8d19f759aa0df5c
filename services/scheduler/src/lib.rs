//! The scheduler: knows every worker (execution mode, capacity, labels, health), queues the
//! tasks the driver hands it and places each on a matching worker with room.
//!
//! Its state is soft: the driver owns the record of every task and enqueues its pending tasks
//! again whenever its placement stream reconnects, and every worker reports what runs on it
//! when it registers and in each heartbeat (the truth for its slots), so a restarted scheduler
//! loses nothing.

pub mod benchmark;
mod error;
mod metrics;
mod placement;
mod service;
mod state;

use std::net::SocketAddr;

use claudecluster_config::SchedulerConfig;
use claudecluster_proto::v1::scheduler_service_server::SchedulerServiceServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use error::SchedulerError;
pub use placement::{Candidate, TaskRequirements, choose_worker};
pub use service::SchedulerService;

/// A running scheduler.
pub struct Handle {
    pub local_addr: SocketAddr,
    shutdown: CancellationToken,
    join: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Handle {
    pub async fn shutdown(self) -> Result<(), tonic::transport::Error> {
        self.shutdown.cancel();
        self.join
            .await
            .expect("the scheduler's server task panicked")
    }
}

/// Starts a scheduler serving on `listener`.
/// Serves the scheduler on `listener`; only callers presenting `identity` (the driver and the
/// workers) reach its API.
pub async fn spawn(
    config: SchedulerConfig,
    listener: TcpListener,
    identity: claudecluster_grpc::ClusterIdentity,
) -> std::io::Result<Handle> {
    let local_addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let service = SchedulerService::new(config);
    service.start_health_checks(shutdown.clone());
    let (routes, _health) =
        claudecluster_grpc::standard_routes("claudecluster.v1.SchedulerService").await;
    let routes = routes.add_service(tonic::service::interceptor::InterceptedService::new(
        SchedulerServiceServer::new(service)
            .max_decoding_message_size(claudecluster_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(claudecluster_proto::MAX_MESSAGE_BYTES),
        // Which role may call what is checked per method (see the service).
        claudecluster_grpc::cluster::RequireSecret(identity.secret.clone(), &[]),
    ));
    let stop = shutdown.clone();
    let tls = identity.server_tls();
    let join = tokio::spawn(async move {
        claudecluster_grpc::serve(listener, routes, tls, stop.cancelled_owned()).await
    });
    tracing::info!(address = %local_addr, "scheduler listening");
    Ok(Handle {
        local_addr,
        shutdown,
        join,
    })
}
