use std::sync::{Arc, Mutex};
use std::time::Instant;

use claudecluster_config::SchedulerConfig;
use claudecluster_grpc::tls::{Role, require_role};
use claudecluster_proto::v1::scheduler_service_server::SchedulerService as SchedulerApi;
use claudecluster_proto::v1::worker_link_request::Message as LinkMessage;
use claudecluster_proto::v1::worker_link_response::Message as LinkReply;
use claudecluster_proto::v1::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::error::SchedulerError;
use crate::state::{State, requirements};

/// The SchedulerService: thin RPC methods over the shared [`State`].
#[derive(Clone)]
pub struct SchedulerService {
    state: Arc<Mutex<State>>,
    config: Arc<SchedulerConfig>,
}

impl SchedulerService {
    pub fn new(config: SchedulerConfig) -> Self {
        let state = Arc::new(Mutex::new(State::new(config.heartbeat_timeout.get())));
        crate::metrics::observe(Arc::downgrade(&state));
        SchedulerService {
            state,
            config: Arc::new(config),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("scheduler state lock poisoned")
    }

    /// Marks workers that stop sending heartbeats as unhealthy, and ages the queue, until `stop`.
    pub fn start_health_checks(&self, stop: CancellationToken) {
        let this = self.clone();
        let period = self.config.heartbeat_interval.get() / 2;
        let aging = self.config.aging_interval.get();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(period);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = ticker.tick() => {
                        let now = Instant::now();
                        let mut state = this.state();
                        state.expire(now);
                        state.age_queue(now, aging);
                    }
                }
            }
        });
    }
}

/// Bounds of a registration: what one worker may make the scheduler hold and list.
const MAX_WORKER_ID_BYTES: usize = 128;
const MAX_CAPACITY: u32 = 100_000;

fn validate_registration(registration: &RegisterWorker) -> Result<(), SchedulerError> {
    let invalid = |field, message: &str| {
        Err(SchedulerError::InvalidArgument {
            field,
            message: message.to_owned(),
        })
    };
    let worker_id = &registration.worker_id;
    if worker_id.is_empty()
        || worker_id.len() > MAX_WORKER_ID_BYTES
        || !worker_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return invalid(
            "register.worker_id",
            "must be 1 to 128 letters, digits, '-', '_' or '.'",
        );
    }
    if registration.address.trim().is_empty()
        || registration.address.len() > 256
        || registration.address.chars().any(char::is_control)
    {
        return invalid(
            "register.address",
            "must be a host:port of at most 256 characters",
        );
    }
    if registration.capacity == 0 || registration.capacity > MAX_CAPACITY {
        return invalid("register.capacity", "must be from 1 to 100000");
    }
    if registration.version.len() > 64 {
        return invalid("register.version", "must have at most 64 characters");
    }
    if registration.execution_modes.len() > 4 {
        return invalid("register.execution_modes", "lists at most 4 modes");
    }
    claudecluster_proto::validate::labels("register.labels", &registration.labels).map_err(
        |invalid| SchedulerError::InvalidArgument {
            field: invalid.field,
            message: invalid.message,
        },
    )?;
    if registration.running.len() > MAX_CAPACITY as usize
        || registration
            .running
            .iter()
            .any(|run| run.id.len() > claudecluster_proto::validate::MAX_ID_BYTES)
    {
        return invalid(
            "register.running",
            "lists at most 100000 runs with ids of at most 128 characters",
        );
    }
    if registration.execution_mode() == ExecutionMode::Unspecified {
        return invalid("register.execution_mode", "must be set");
    }
    if registration.running.iter().any(|run| run.id.is_empty()) {
        return invalid("register.running.id", "must not be empty");
    }
    Ok(())
}

#[tonic::async_trait]
impl SchedulerApi for SchedulerService {
    type WorkerLinkStream = ReceiverStream<Result<WorkerLinkResponse, Status>>;

    async fn worker_link(
        &self,
        request: Request<Streaming<WorkerLinkRequest>>,
    ) -> Result<Response<Self::WorkerLinkStream>, Status> {
        require_role(&request, &[Role::Worker])?;
        let mut inbound = request.into_inner();
        let Some(LinkMessage::Register(registration)) =
            inbound.message().await?.and_then(|first| first.message)
        else {
            return Err(SchedulerError::NotRegistered.into());
        };
        validate_registration(&registration)?;
        let worker_id = registration.worker_id.clone();
        tracing::info!(
            worker = %worker_id,
            address = %registration.address,
            mode = registration.execution_mode().label(),
            capacity = registration.capacity,
            "worker registered"
        );
        let (replies, replies_rx) = mpsc::channel(4);
        let link = self
            .state()
            .register(registration, replies.clone(), Instant::now());
        let registered = WorkerLinkResponse {
            message: Some(LinkReply::Registered(WorkerRegistered {
                heartbeat_interval_ms: self.config.heartbeat_interval.get().as_millis() as u64,
            })),
        };
        replies
            .send(Ok(registered))
            .await
            .map_err(|_| Status::cancelled("worker went away while registering"))?;
        let state = self.state.clone();
        tokio::spawn(async move {
            // `replies` lives as long as the link, so the worker sees its end if we stop.
            let _replies = replies;
            let reason = loop {
                match inbound.message().await {
                    Ok(Some(WorkerLinkRequest {
                        message: Some(LinkMessage::Heartbeat(beat)),
                    })) => {
                        let current = state
                            .lock()
                            .expect("scheduler state lock poisoned")
                            .heartbeat(&worker_id, link, beat, Instant::now());
                        if !current {
                            break "replaced by a newer registration".to_owned();
                        }
                    }
                    Ok(Some(WorkerLinkRequest {
                        message: Some(LinkMessage::GoingAway(going)),
                    })) => break format!("going away: {}", going.reason),
                    Ok(Some(_)) => {}
                    Ok(None) => break "link closed".to_owned(),
                    Err(status) => break format!("link failed: {}", status.message()),
                }
            };
            state
                .lock()
                .expect("scheduler state lock poisoned")
                .link_closed(&worker_id, link, &reason);
        });
        Ok(Response::new(ReceiverStream::new(replies_rx)))
    }

    async fn enqueue_task(
        &self,
        request: Request<EnqueueTaskRequest>,
    ) -> Result<Response<EnqueueTaskResponse>, Status> {
        require_role(&request, &[Role::Driver])?;
        let request = request.into_inner();
        let invalid = |invalid: claudecluster_proto::validate::Invalid| {
            Status::from(SchedulerError::InvalidArgument {
                field: invalid.field,
                message: invalid.message,
            })
        };
        claudecluster_proto::validate::id("task_id", &request.task_id).map_err(invalid)?;
        claudecluster_proto::validate::labels("worker_selector", &request.worker_selector)
            .map_err(invalid)?;
        let priority = request.priority();
        let requirements = requirements(
            request.execution_mode(),
            request.worker_selector,
            request.needs.unwrap_or_default(),
        );
        let enqueued =
            self.state()
                .enqueue(request.task_id, request.attempt, priority, requirements);
        Ok(Response::new(EnqueueTaskResponse {
            queue_position: enqueued.queue_position,
            waiting_reason: enqueued.waiting_reason,
        }))
    }

    async fn dequeue_task(
        &self,
        request: Request<DequeueTaskRequest>,
    ) -> Result<Response<DequeueTaskResponse>, Status> {
        require_role(&request, &[Role::Driver])?;
        let removed = self.state().dequeue(&request.into_inner().task_id);
        Ok(Response::new(DequeueTaskResponse { removed }))
    }

    async fn release_task(
        &self,
        request: Request<ReleaseTaskRequest>,
    ) -> Result<Response<ReleaseTaskResponse>, Status> {
        require_role(&request, &[Role::Driver])?;
        let request = request.into_inner();
        self.state().release(&request.task_id, request.attempt);
        Ok(Response::new(ReleaseTaskResponse {}))
    }

    type StreamPlacementsStream = UnboundedReceiverStream<Result<StreamPlacementsResponse, Status>>;

    async fn stream_placements(
        &self,
        request: Request<StreamPlacementsRequest>,
    ) -> Result<Response<Self::StreamPlacementsStream>, Status> {
        require_role(&request, &[Role::Driver])?;
        let (sender, receiver) = mpsc::unbounded_channel();
        self.state().set_placement_stream(sender);
        tracing::info!("driver connected for placements");
        Ok(Response::new(UnboundedReceiverStream::new(receiver)))
    }

    async fn drain_worker(
        &self,
        request: Request<DrainWorkerRequest>,
    ) -> Result<Response<DrainWorkerResponse>, Status> {
        require_role(&request, &[Role::Driver, Role::Admin])?;
        let worker_id = request.into_inner().worker_id;
        let worker = self
            .state()
            .drain(&worker_id)
            .ok_or(SchedulerError::WorkerNotFound(worker_id))?;
        Ok(Response::new(DrainWorkerResponse {
            worker: Some(worker),
        }))
    }

    async fn list_workers(
        &self,
        request: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        require_role(&request, &[Role::Driver, Role::Admin])?;
        Ok(Response::new(ListWorkersResponse {
            workers: self.state().workers(),
        }))
    }

    async fn get_queue_stats(
        &self,
        request: Request<GetQueueStatsRequest>,
    ) -> Result<Response<GetQueueStatsResponse>, Status> {
        require_role(&request, &[Role::Driver, Role::Admin])?;
        let state = self.state();
        Ok(Response::new(GetQueueStatsResponse {
            queued_tasks: state.queued_tasks() as u64,
            placed_tasks: state.placed_tasks() as u64,
            placements: state.placements,
            placement_nanos_total: state.placement_nanos,
            queued_by_priority: state.queued_by_priority(),
        }))
    }
}
