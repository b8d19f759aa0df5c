//! The worker's link to the scheduler: register, then heartbeats, then going-away; reconnects
//! with backoff whenever the link breaks.

use std::sync::Arc;
use std::time::Duration;

use claudecluster_proto::v1::scheduler_service_client::SchedulerServiceClient;
use claudecluster_proto::v1::worker_link_request::Message;
use claudecluster_proto::v1::worker_link_response::Message as Reply;
use claudecluster_proto::v1::{
    RegisterWorker, WorkerGoingAway, WorkerHeartbeat, WorkerLinkRequest,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::execution::ProviderHealth;
use crate::runtime::Runtime;

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub async fn run(
    runtime: Arc<Runtime>,
    health: claudecluster_grpc::Health,
    scheduler_address: String,
    advertised: String,
    identity: claudecluster_grpc::ClusterIdentity,
    stop: CancellationToken,
) {
    let channel = match claudecluster_grpc::cluster::cluster_channel(&scheduler_address, &identity)
    {
        Ok(channel) => channel,
        Err(err) => {
            tracing::error!(address = %scheduler_address, error = %err, "bad scheduler address (`worker.schedulerAddress`)");
            return;
        }
    };
    let mut client = SchedulerServiceClient::new(channel)
        .max_decoding_message_size(claudecluster_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(claudecluster_proto::MAX_MESSAGE_BYTES);
    let mut backoff = FIRST_BACKOFF;
    let mut failures = 0u32;
    loop {
        let mut registered = false;
        match session(
            &runtime,
            &health,
            &mut client,
            &advertised,
            &stop,
            &mut registered,
        )
        .await
        {
            Ok(LinkEnd::Stopped) => return,
            Ok(LinkEnd::Reregister) => {
                failures = 0;
                backoff = FIRST_BACKOFF;
                continue;
            }
            Err(reason) => {
                if registered {
                    // A link that worked breaks: reconnect quickly.
                    failures = 0;
                    backoff = FIRST_BACKOFF;
                }
                failures += 1;
                // The first failure and every tenth are worth a line; the rest is noise.
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!(scheduler = %scheduler_address, %reason, "scheduler link down; retrying");
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// How a link ended without failing.
enum LinkEnd {
    /// The worker is stopping.
    Stopped,
    /// The worker changed (its modes): it registers again at once.
    Reregister,
}

/// One link, from registration to its end.
async fn session(
    runtime: &Runtime,
    health: &claudecluster_grpc::Health,
    client: &mut SchedulerServiceClient<claudecluster_grpc::ClusterChannel>,
    advertised: &str,
    stop: &CancellationToken,
    registered: &mut bool,
) -> Result<LinkEnd, String> {
    let (outbound, outbound_rx) = mpsc::channel(4);
    let register = RegisterWorker {
        worker_id: runtime.worker_id.clone(),
        address: advertised.to_owned(),
        execution_mode: runtime.mode() as i32,
        execution_modes: runtime
            .modes()
            .into_iter()
            .map(|mode| mode as i32)
            .collect(),
        capacity: runtime.capacity(),
        labels: runtime.config().labels.clone().into_iter().collect(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        // What survived a restart of the scheduler (or a broken link) is counted at once.
        running: runtime.running_work(),
        admits: Some(runtime.admits()),
    };
    outbound
        .send(WorkerLinkRequest {
            message: Some(Message::Register(register)),
        })
        .await
        .map_err(|_| "link closed".to_owned())?;
    let mut inbound = client
        .worker_link(ReceiverStream::new(outbound_rx))
        .await
        .map_err(|status| status.message().to_owned())?
        .into_inner();
    let interval = match inbound.message().await {
        Ok(Some(reply)) => match reply.message {
            Some(Reply::Registered(registered)) => {
                Duration::from_millis(registered.heartbeat_interval_ms.max(10))
            }
            _ => return Err("the scheduler did not confirm the registration".into()),
        },
        Ok(None) => return Err("the scheduler closed the link".into()),
        Err(status) => return Err(status.message().to_owned()),
    };
    tracing::info!(worker = %runtime.worker_id, "registered with the scheduler");
    *registered = true;
    runtime.registered();
    let mut ticker = tokio::time::interval(interval);
    let mut was_healthy = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                let _ = outbound.send(WorkerLinkRequest {
                    message: Some(Message::GoingAway(WorkerGoingAway { reason: "shutting down".into() })),
                }).await;
                return Ok(LinkEnd::Stopped);
            }
            _ = runtime.reregistration_requested() => return Ok(LinkEnd::Reregister),
            _ = ticker.tick() => {
                let (healthy, health_reason) = match runtime.health().await {
                    ProviderHealth::Ready => (true, String::new()),
                    ProviderHealth::Unavailable(reason) => (false, reason),
                };
                if healthy != was_healthy {
                    // The worker's own health service says what the scheduler hears.
                    health.set_serving(healthy).await;
                    if healthy {
                        tracing::info!("the worker can run tasks again");
                    } else {
                        tracing::warn!(reason = %health_reason, "the worker cannot run tasks");
                    }
                    was_healthy = healthy;
                }
                let running = runtime.running_work();
                let beat = WorkerHeartbeat {
                    // Task runs only, as ever; `running` has sessions too.
                    running_tasks: running.iter().filter(|work| work.attempt > 0).count() as u32,
                    healthy,
                    health_reason,
                    idle_warm_agents: runtime.idle_warm_agents(),
                    drained: runtime.is_drained(),
                    running,
                    workspace_bytes: runtime.results().workspace_bytes(),
                    disk_free_bytes: runtime.results().disk_free_bytes(),
                };
                if outbound.send(WorkerLinkRequest { message: Some(Message::Heartbeat(beat)) }).await.is_err() {
                    return Err("link closed".into());
                }
            }
            reply = inbound.message() => match reply {
                Ok(Some(reply)) => {
                    if let Some(message) = reply.message {
                        handle(runtime, message);
                    }
                }
                Ok(None) => return Err("the scheduler closed the link".into()),
                Err(status) => return Err(status.message().to_owned()),
            },
        }
    }
}

/// Acts on what the scheduler says once the worker is registered.
pub(crate) fn handle(runtime: &Runtime, message: Reply) {
    match message {
        Reply::Drain(_) => runtime.start_draining(),
        // The scheduler gave these runs to other workers (or to newer attempts): this worker
        // must not go on with them.
        Reply::StopRuns(stop) => runtime.stop_runs(&stop.runs, &stop.reason),
        Reply::Registered(_) => {
            tracing::debug!("a registration confirmed twice is ignored");
        }
    }
}
