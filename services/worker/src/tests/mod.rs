//! In-process tests of the runtime, through the WorkerService and the link's handling of the
//! scheduler's messages, with a fake execution provider.

mod fake;
mod sessions;
mod switching;
mod tasks;

use std::pin::Pin;
use std::sync::Arc;

use claudecluster_config::WorkerConfig;
use claudecluster_proto::v1::event::Kind;
use claudecluster_proto::v1::worker_service_server::WorkerService as _;
use claudecluster_proto::v1::{
    ExecuteTaskRequest, ExecuteTaskResponse, ExecutionMode, RunningWork, TaskSpec, TaskStatus,
};
use futures_util::{Stream, StreamExt};
use tonic::{Request, Status};

use crate::execution::{ExecutionProvider, Providers};
use crate::runtime::Runtime;
use crate::service::WorkerService;
use fake::{FakeProvider, FakeProviderHandle};

pub type TaskEvents = Pin<Box<dyn Stream<Item = Result<ExecuteTaskResponse, Status>> + Send>>;

/// A worker around fake providers, in a workspace root of its own.
pub struct Worker {
    pub runtime: Arc<Runtime>,
    pub service: WorkerService,
    pub fake: FakeProviderHandle,
    _root: tempfile::TempDir,
}

pub const CAPACITY: u32 = 2;

impl Worker {
    /// A worker whose only mode is `mode`, run by a fake.
    pub fn new(mode: ExecutionMode) -> Self {
        let (provider, fake) = FakeProvider::new(mode);
        Self::with(provider, fake, |_| {})
    }

    pub fn with(
        provider: Arc<dyn ExecutionProvider>,
        fake: FakeProviderHandle,
        configure: impl FnOnce(&mut WorkerConfig),
    ) -> Self {
        let root = tempfile::tempdir().unwrap();
        let mut config = WorkerConfig {
            workspace_root: Some(root.path().to_path_buf()),
            max_concurrent_tasks: Some(CAPACITY),
            ..WorkerConfig::default()
        };
        configure(&mut config);
        let runtime = Arc::new(Runtime::new(
            "worker-test".into(),
            config,
            Providers::new(vec![provider]),
            None,
        ));
        let service = WorkerService::new(runtime.clone(), "127.0.0.1:1".into());
        Worker {
            runtime,
            service,
            fake,
            _root: root,
        }
    }

    pub async fn execute(&self, task_id: &str, attempt: u32) -> Result<TaskEvents, Status> {
        let request = ExecuteTaskRequest {
            task_id: task_id.into(),
            attempt,
            spec: Some(TaskSpec {
                prompt: "say hello".into(),
                ..TaskSpec::default()
            }),
            ..ExecuteTaskRequest::default()
        };
        Ok(self
            .service
            .execute_task(Request::new(request))
            .await?
            .into_inner())
    }

    pub async fn attach(
        &self,
        task_id: &str,
        attempt: u32,
        after_run_sequence: u64,
    ) -> Result<TaskEvents, Status> {
        let request = ExecuteTaskRequest {
            task_id: task_id.into(),
            attempt,
            attach: true,
            after_run_sequence,
            ..ExecuteTaskRequest::default()
        };
        Ok(self
            .service
            .execute_task(Request::new(request))
            .await?
            .into_inner())
    }

    pub fn running(&self) -> Vec<(String, u32)> {
        self.runtime
            .running_work()
            .into_iter()
            .map(|RunningWork { id, attempt }| (id, attempt))
            .collect()
    }
}

/// The next event of a task's stream, with its run sequence.
pub async fn next(events: &mut TaskEvents) -> (u64, Kind) {
    let response = events
        .next()
        .await
        .expect("the stream ended early")
        .expect("no stream error");
    (response.run_sequence, response.event.unwrap().kind.unwrap())
}

/// Every event left in a task's stream, up to its end.
pub async fn rest(events: TaskEvents) -> Vec<(u64, Kind)> {
    events
        .map(|response| {
            let response = response.expect("no stream error");
            (response.run_sequence, response.event.unwrap().kind.unwrap())
        })
        .collect()
        .await
}

/// The status and reason of a status change.
pub fn status(kind: &Kind) -> Option<(TaskStatus, &str)> {
    match kind {
        Kind::StatusChange(change) => Some((change.status(), change.reason.as_str())),
        _ => None,
    }
}

/// The text of an output line.
pub fn output(kind: &Kind) -> Option<&str> {
    match kind {
        Kind::Output(line) => Some(line.line.as_str()),
        _ => None,
    }
}

#[test]
fn the_credential_proxy_leaves_loopback_only_for_agents_elsewhere() {
    use claudecluster_config::Egress;
    let with = |orchestrator: &str, egress: Egress, network: &str| {
        let mut config = WorkerConfig::default();
        config.container.orchestrator = orchestrator.to_owned();
        config.container.egress = egress;
        config.container.network = network.to_owned();
        crate::default_proxy_listen(&config)
    };
    assert_eq!(with("docker", Egress::ProxyOnly, "bridge"), "127.0.0.1:0");
    assert_eq!(with("docker", Egress::None, "bridge"), "127.0.0.1:0");
    assert_eq!(with("docker", Egress::Open, "host"), "127.0.0.1:0");
    assert_eq!(with("docker", Egress::Open, "bridge"), "0.0.0.0:0");
    assert_eq!(with("docker", Egress::Open, "per_task"), "0.0.0.0:0");
    assert_eq!(with("kubernetes", Egress::ProxyOnly, "bridge"), "0.0.0.0:0");
}
