//! The driver: the public API. It owns the record of every task and its event log, hands
//! pending tasks to the scheduler, and runs each placed task on its worker.

mod admission;
mod auth;
mod batch;
pub mod benchmark;
mod db;
mod dispatch;
mod error;
mod http;
mod journal;
mod leader;
mod listing;
mod metrics;
mod notify;
mod results;
mod service;
mod sessions;
mod store;
#[cfg(test)]
mod test_support;
mod usage;

mod writer;

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
    /// Where the HTTP face (REST, WebSockets, console) listens, unless it is turned off.
    pub http_addr: Option<SocketAddr>,
    stop: CancellationToken,
    /// Cancelled when the driver stops on its own: it lost its lead on a shared store.
    lost: CancellationToken,
    /// Ends with the lock this driver leads by, when it leads.
    leading: JoinHandle<Option<leader::Leadership>>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    http: Option<JoinHandle<()>>,
    writer: JoinHandle<()>,
    auth: Arc<auth::Auth>,
    db: Arc<db::Db>,
}

impl Handle {
    /// Ends open streams with UNAVAILABLE (clients reconnect and resume), stops serving, and
    /// stores what is left to store. Running tasks go on on their workers; a driver that starts
    /// again attaches to them.
    pub async fn shutdown(self) -> Result<(), tonic::transport::Error> {
        self.stop.cancel();
        let served = self
            .server
            .await
            .expect("the driver's server task panicked");
        if let Some(http) = self.http {
            let _ = http.await;
        }
        let _ = self.writer.await;
        self.auth.flush_audit().await;
        // Gives up the lead once the last writes are stored: a standby takes over at once.
        if let Ok(Some(leadership)) = self.leading.await {
            leadership.release().await;
        }
        self.db.close().await;
        served
    }

    /// Resolves when the driver stopped serving on its own: it could not keep or take the lead
    /// on its store. The process should then end (and be started again).
    pub async fn lost(&self) {
        self.lost.cancelled().await
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
    #[error("{0} (`driver.store.url` / `driver.dataDir`)")]
    Store(#[from] db::DbError),
    #[error("cannot take up the stored tasks: {0}")]
    Recovery(#[from] DriverError),
    #[error("{0}")]
    Notifications(String),
    #[error(
        "refusing to serve {address} beyond loopback with no API keys and no TLS, where anyone who reaches it could do anything: add keys (`driver.auth.apiKeys`) or TLS (`driver.tls`), listen on 127.0.0.1, or set `driver.insecure: true`"
    )]
    Insecure { address: std::net::SocketAddr },
    #[error(
        "refusing to serve HTTP on {address} beyond loopback with no API keys, where anyone who reaches it could do anything: add keys (`driver.auth.apiKeys`), listen on 127.0.0.1 (`driver.http.listen`), turn HTTP off (`driver.http.listen: \"\"`), or set `driver.insecure: true`"
    )]
    InsecureHttp { address: std::net::SocketAddr },
}

/// The store's URL: `driver.store.url`, or SQLite in the data directory.
pub fn store_url(config: &DriverConfig) -> String {
    match &config.store.url {
        Some(url) => url.clone(),
        None => format!("sqlite://{}", config.data_dir().join("driver.db").display()),
    }
}

/// Starts a driver serving on `listener`: opens the store, takes up the tasks and sessions that
/// had not ended, and serves. It presents `identity` to the scheduler and the workers, and
/// serves its clients over TLS with its certificate when it has one.
pub async fn spawn(
    config: DriverConfig,
    listener: TcpListener,
    identity: claudecluster_grpc::ClusterIdentity,
) -> Result<Handle, StartError> {
    let local_addr = listener.local_addr()?;
    let opened = std::time::Instant::now();
    let db = Arc::new(db::Db::open(&store_url(&config), config.store.max_connections).await?);
    tracing::info!(store = %db.place, elapsed_ms = opened.elapsed().as_millis() as u64, "store open");
    let keys_exist = !config.auth.api_keys.is_empty() || db.has_active_keys().await?;
    if !keys_exist {
        if !local_addr.ip().is_loopback() && identity.tls.is_none() && !config.insecure {
            return Err(StartError::Insecure {
                address: local_addr,
            });
        }
        tracing::warn!(
            address = %local_addr,
            "no API keys: every caller of the driver may do anything; keep it on loopback or add keys (driver.auth.apiKeys)"
        );
    }
    // Bound before anything starts, so that a taken port fails the start.
    let http_listener = match config.http.listen() {
        Some(address) => Some(http::bind(address).await?),
        None => None,
    };
    // The HTTP face is plain HTTP: TLS on gRPC does not cover it.
    if let Some((_, address)) = &http_listener
        && !keys_exist
        && !address.ip().is_loopback()
        && !config.insecure
    {
        return Err(StartError::InsecureHttp { address: *address });
    }
    let live = Arc::new(store::Live::default());
    let stop = CancellationToken::new();
    let (writer, writer_task) = {
        let live = live.clone();
        writer::start(
            db.clone(),
            Box::new(move |id| live.settle(id)),
            stop.clone(),
        )
    };
    let store = Arc::new(store::TaskStore::new(
        db.clone(),
        writer.clone(),
        live.clone(),
    ));
    let sessions = Arc::new(sessions::SessionStore::new(db.clone(), writer, live));
    metrics::observe(Arc::downgrade(&store));
    let notifier =
        notify::Notifier::start(&config.notifications).map_err(StartError::Notifications)?;
    let usage = usage::Usage::load(db.clone(), config.budget.clone(), notifier.clone()).await?;
    let dispatcher = Arc::new(
        dispatch::Dispatcher::new(
            store.clone(),
            sessions.clone(),
            config.scheduler_address.clone(),
            config.max_attempts,
            identity.clone(),
            usage.clone(),
            notifier.clone(),
        )
        .map_err(|source| StartError::SchedulerAddress {
            address: config.scheduler_address.clone(),
            source,
        })?,
    );
    let (routes, health) =
        claudecluster_grpc::standard_routes("claudecluster.v1.DriverService").await;
    let limits = service::Limits {
        session_queue: config.session_queue_limit as usize,
        batch_size: config.max_batch_size as usize,
        prompt_bytes: config.max_prompt_bytes.0 as usize,
    };
    // A standby answers health checks (NOT_SERVING) and refuses the API until it leads.
    let leading = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let auth = auth::Auth::new(db.clone(), &config.auth, keys_exist);
    // One service behind both faces: gRPC, and HTTP calling its methods.
    let api = Arc::new(service::DriverService::new(
        store.clone(),
        sessions.clone(),
        dispatcher.clone(),
        auth.clone(),
        limits,
        usage.clone(),
        stop.clone(),
    ));
    let routes = routes.add_service(tonic::service::interceptor::InterceptedService::new(
        DriverServiceServer::from_arc(api.clone())
            .max_decoding_message_size(claudecluster_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(claudecluster_proto::MAX_MESSAGE_BYTES),
        LeaderGate(leading.clone()),
    ));
    let lost = CancellationToken::new();
    let (http_dispatcher, http_leading) = (dispatcher.clone(), leading.clone());
    let lead = Lead {
        db: db.clone(),
        store,
        sessions,
        dispatcher,
        usage,
        store_config: config.store.clone(),
        stop: stop.clone(),
        leading,
        health,
    };
    // Leading at once (SQLite, or the lock was free) takes up the stored work before the
    // driver says it listens; a standby takes it up when it takes over.
    let leading = match leader::try_lead(&db).await? {
        leader::Attempt::Leads(mut leadership) => {
            leadership.begin(&db).await?;
            lead.take_over().await?;
            tokio::spawn(leadership.keep(db.clone(), stop.clone(), lost.clone()))
        }
        leader::Attempt::Waits(standby) => {
            lead.health.set_service_serving(false).await;
            let (stop, lost) = (stop.clone(), lost.clone());
            tokio::spawn(async move {
                match standby.wait(&stop).await {
                    Ok(Some(mut leadership)) => match async {
                        leadership.begin(&lead.db).await?;
                        lead.take_over().await
                    }
                    .await
                    {
                        Ok(()) => leadership.keep(lead.db.clone(), stop, lost).await,
                        Err(err) => {
                            tracing::error!(error = %err, "cannot take up the stored work after taking the lead");
                            lost.cancel();
                            Some(leadership)
                        }
                    },
                    Ok(None) => None,
                    Err(err) => {
                        tracing::error!(error = %err, "lost the store while standing by");
                        lost.cancel();
                        None
                    }
                }
            })
        }
    };
    // A leader that lost its lock stops serving at once.
    {
        let (stop, lost) = (stop.clone(), lost.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = lost.cancelled() => stop.cancel(),
                _ = stop.cancelled() => {}
            }
        });
    }
    // API clients present keys, not certificates.
    let tls = identity.tls.as_ref().map(|tls| tls.server(true));
    let server = {
        let stop = stop.clone();
        tokio::spawn(async move {
            claudecluster_grpc::serve(listener, routes, tls, stop.cancelled_owned()).await
        })
    };
    let (http, http_addr) = match http_listener {
        Some((listener, address)) => {
            let face = Arc::new(http::HttpFace {
                loopback: address.ip().is_loopback(),
                api,
                dispatcher: http_dispatcher,
                leading: http_leading,
                stop: stop.clone(),
                started: opened,
                stats_interval: config.http.stats_interval.get(),
            });
            tracing::info!(address = %address, "driver serving HTTP (REST, WebSockets, console)");
            (Some(http::serve(listener, face)), Some(address))
        }
        None => (None, None),
    };
    tracing::info!(address = %local_addr, scheduler = %config.scheduler_address, "driver listening");
    Ok(Handle {
        local_addr,
        http_addr,
        http,
        stop,
        lost,
        leading,
        server,
        writer: writer_task,
        auth,
        db,
    })
}

/// Takes up what had not ended when the driver stopped: tasks on workers are attached to again,
/// tasks waiting for others wait again, pending ones are queued when the scheduler connects,
/// and sessions on workers are attached to again.
async fn recover(
    store: &Arc<store::TaskStore>,
    sessions: &Arc<sessions::SessionStore>,
    dispatcher: &Arc<dispatch::Dispatcher>,
) -> Result<(), DriverError> {
    use claudecluster_proto::v1::{SessionState, TaskStatus};
    let tasks = store.recover().await?;
    let (mut attached, mut blocked) = (0, 0);
    for entry in &tasks {
        match entry.status() {
            TaskStatus::Assigned | TaskStatus::Running => {
                attached += 1;
                tokio::spawn(dispatcher.clone().resume(entry.clone()));
            }
            TaskStatus::Pending if entry.is_blocked() => {
                blocked += 1;
                let mut dependencies = Vec::new();
                for id in entry.spec().depends_on {
                    if let Some(dependency) = store.get(&id).await? {
                        dependencies.push(dependency);
                    }
                }
                dispatcher.start(entry.clone(), dependencies).await;
            }
            _ => {}
        }
    }
    let open = sessions.recover().await?;
    for session in &open {
        if session.state() != SessionState::Creating || session.worker_address().is_some() {
            let Some(address) = session.worker_address() else {
                continue;
            };
            let (worker_id, _) = session.placement();
            let dispatcher = dispatcher.clone();
            let session = session.clone();
            tokio::spawn(async move {
                dispatcher
                    .run_session(session, &worker_id, &address, true)
                    .await
            });
        }
    }
    if !tasks.is_empty() || !open.is_empty() {
        tracing::info!(
            tasks = tasks.len(),
            on_workers = attached,
            waiting_for_dependencies = blocked,
            sessions = open.len(),
            "took up unfinished work from the store"
        );
    }
    Ok(())
}

/// What a driver needs to take the lead: the stored work to take up and the loops to start.
struct Lead {
    db: Arc<db::Db>,
    store: Arc<store::TaskStore>,
    sessions: Arc<sessions::SessionStore>,
    dispatcher: Arc<dispatch::Dispatcher>,
    usage: Arc<usage::Usage>,
    store_config: claudecluster_config::StoreConfig,
    stop: CancellationToken,
    leading: Arc<std::sync::atomic::AtomicBool>,
    health: claudecluster_grpc::Health,
}

impl Lead {
    async fn take_over(&self) -> Result<(), StartError> {
        let started = std::time::Instant::now();
        self.usage.reload().await?;
        recover(&self.store, &self.sessions, &self.dispatcher).await?;
        tokio::spawn(self.dispatcher.clone().follow_placements(self.stop.clone()));
        tokio::spawn(compact_logs(
            self.db.clone(),
            self.store_config.clone(),
            self.stop.clone(),
        ));
        tokio::spawn(self.dispatcher.clone().watch_workers(self.stop.clone()));
        self.leading
            .store(true, std::sync::atomic::Ordering::Release);
        self.health.set_service_serving(true).await;
        tracing::info!(store = %self.db.place, elapsed_ms = started.elapsed().as_millis() as u64, "leading: took up the stored work");
        Ok(())
    }
}

/// Refuses the API while this driver does not lead.
#[derive(Clone)]
struct LeaderGate(Arc<std::sync::atomic::AtomicBool>);

impl tonic::service::Interceptor for LeaderGate {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if self.0.load(std::sync::atomic::Ordering::Acquire) {
            Ok(request)
        } else {
            Err(tonic::Status::unavailable(
                "this driver is a standby: another driver leads on its store; call that one (clients given several driver addresses switch by themselves)",
            ))
        }
    }
}

/// Compacts finished tasks' logs past their retention, every minute until `stop`.
async fn compact_logs(
    db: Arc<db::Db>,
    config: claudecluster_config::StoreConfig,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(std::time::Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let cutoff = db::now_ms() - config.event_retention.get().as_millis() as i64;
        let compacted = db
            .compact(
                cutoff,
                config.event_retention_count,
                journal::kept_by_compaction,
            )
            .await;
        match compacted {
            Ok(0) => {}
            Ok(compacted) => tracing::info!(tasks = compacted, "compacted finished tasks' logs"),
            Err(err) => tracing::warn!(error = %err, "cannot compact logs"),
        }
    }
}
