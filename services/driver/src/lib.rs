//! The driver: the public API. It owns the record of every task and its event log, hands
//! pending tasks to the scheduler, and runs each placed task on its worker.

mod batch;
mod catalog;
mod dispatch;
mod error;
mod journal;
mod service;
mod sessions;
mod store;
mod validate;

use std::net::SocketAddr;
use std::sync::Arc;

use claudecluster_config::DriverConfig;
use claudecluster_proto::v1::driver_service_server::DriverServiceServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use error::DriverError;

/// A running driver.
pub struct Handle {
    pub local_addr: SocketAddr,
    stop: CancellationToken,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Handle {
    pub async fn shutdown(self) -> Result<(), tonic::transport::Error> {
        self.stop.cancel();
        self.server
            .await
            .expect("the driver's server task panicked")
    }
}

/// Why a driver cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("bad scheduler address `{address}` (`driver.schedulerAddress`): {source}")]
    SchedulerAddress {
        address: String,
        source: tonic::transport::Error,
    },
}

/// Starts a driver serving on `listener`.
pub async fn spawn(config: DriverConfig, listener: TcpListener) -> Result<Handle, StartError> {
    let local_addr = listener.local_addr()?;
    let store = Arc::new(store::TaskStore::default());
    let sessions = Arc::new(sessions::SessionStore::default());
    let dispatcher = Arc::new(
        dispatch::Dispatcher::new(
            store.clone(),
            sessions.clone(),
            config.scheduler_address.clone(),
            config.max_attempts,
        )
        .map_err(|source| StartError::SchedulerAddress {
            address: config.scheduler_address.clone(),
            source,
        })?,
    );
    let stop = CancellationToken::new();
    tokio::spawn(dispatcher.clone().follow_placements(stop.clone()));
    let (routes, _health) =
        claudecluster_grpc::standard_routes("claudecluster.v1.DriverService").await;
    let routes = routes.add_service(DriverServiceServer::new(service::DriverService::new(
        store,
        sessions,
        dispatcher,
        config.session_queue_limit as usize,
    )));
    let server = {
        let stop = stop.clone();
        tokio::spawn(async move {
            claudecluster_grpc::serve(listener, routes, stop.cancelled_owned()).await
        })
    };
    tracing::info!(address = %local_addr, scheduler = %config.scheduler_address, "driver listening");
    Ok(Handle {
        local_addr,
        stop,
        server,
    })
}
