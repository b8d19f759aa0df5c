//! Container mode on Kubernetes (`worker.container.orchestrator: kubernetes`): one pod per
//! agent, made through the API with kube-rs, its output taken over the pod's attach stream
//! into the same supervisor as the other modes.
//!
//! The pod runs the agent image under the same hardening as a Docker agent container, written
//! as a pod security context: not root, a read-only root filesystem (the workspace and `/tmp`
//! on `emptyDir` volumes), every capability dropped, no privilege escalation, the runtime's
//! seccomp profile, no service-account token. Its environment (the agent's token at the
//! worker's credential proxy) goes in over stdin, as for Docker, never into the pod's
//! definition, which anyone who may read pods can read.
//!
//! A task's repository is cloned in the pod (its workspace is the pod's own); a session's
//! workspace and conversation live on a volume claim of its own, which outlives its pods and
//! goes when the session closes.

use std::collections::BTreeMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use claudecluster_config::WorkerConfig;
use claudecluster_proto::v1::ExecutionMode;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec,
    ResourceRequirements, SeccompProfile, SecurityContext, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{AttachParams, DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use super::container::{agent_command, env_preamble};
use super::output::input_writer;
use super::{
    AgentControl, AgentExit, AgentHandle, AgentInput, AgentLaunch, ExecutionProvider, LaunchError,
    Limits, OutputStream, ProviderHealth, forward_lines,
};

/// The agent's container in its pod.
const CONTAINER: &str = "agent";
/// The agent image's user (`agent`, uid 1000), never root.
const AGENT_UID: i64 = 1000;
const LABEL_MANAGED: &str = "claudecluster.managed";
const LABEL_WORKER: &str = "claudecluster.worker";
const LABEL_TASK: &str = "claudecluster.task";
const LABEL_ATTEMPT: &str = "claudecluster.attempt";
/// How often a starting or ending pod is looked at.
const POLL: Duration = Duration::from_millis(250);
/// How long a pod whose agent closed its output may take to report how it ended.
const EXIT_REPORT_WITHIN: Duration = Duration::from_secs(30);
/// Why a container waits that it will not get over by itself.
const STUCK: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
];

/// What the Kubernetes orchestrator needs from the worker's configuration.
#[derive(Debug, Clone)]
pub struct KubernetesSettings {
    pub worker_id: String,
    pub image: String,
    /// The namespace of the agents' pods; `None`: the client's default.
    pub namespace: Option<String>,
    /// Where agent pods reach the worker's credential proxy.
    pub proxy_host: Option<String>,
    /// Limits of a task that sets none.
    pub limits: Limits,
    pub start_timeout: Duration,
    pub image_pull_policy: String,
    /// The size of each session's volume claim, and its storage class (`None`: the default).
    pub session_storage: String,
    pub storage_class: Option<String>,
}

impl KubernetesSettings {
    pub fn from_config(config: &WorkerConfig, worker_id: &str) -> Self {
        let container = &config.container;
        let kubernetes = &config.kubernetes;
        KubernetesSettings {
            worker_id: worker_id.to_owned(),
            image: container.image.clone(),
            namespace: kubernetes.namespace.clone(),
            proxy_host: kubernetes
                .proxy_host
                .clone()
                .or_else(|| std::env::var("POD_IP").ok()),
            limits: Limits {
                memory_bytes: container.resource_limits.memory.0,
                cpus: container.resource_limits.cpu,
                pids: container.resource_limits.pids,
            },
            start_timeout: kubernetes.start_timeout.get(),
            image_pull_policy: kubernetes.image_pull_policy.clone(),
            session_storage: kubernetes.session_storage.0.to_string(),
            storage_class: kubernetes.storage_class.clone(),
        }
    }
}

/// A name for the agent's pod: a DNS label of at most 63 characters, unique per launch.
fn pod_name(task_id: &str, attempt: u32) -> String {
    let task: String = task_id
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(32)
        .collect();
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    format!(
        "claudecluster-{}-{attempt}-{suffix}",
        task.trim_matches('-')
    )
}

/// A label value: at most 63 of `[A-Za-z0-9._-]`, starting and ending alphanumeric.
fn label_value(text: &str) -> String {
    let value: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(63)
        .collect();
    value
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

fn empty_dir(name: &str) -> Volume {
    Volume {
        name: name.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    }
}

/// Where the agent's workspace (and whatever `launch.mounts` names) lives: the pod's own
/// `emptyDir`, or, for a session, its volume claim, which outlives each of its pods.
fn storage(launch: &AgentLaunch, claim: Option<&str>) -> (Vec<Volume>, Vec<VolumeMount>) {
    let mount = |volume: &str, path: &str, sub_path: Option<String>| VolumeMount {
        name: volume.to_owned(),
        mount_path: path.to_owned(),
        sub_path,
        ..VolumeMount::default()
    };
    let tmp = mount("tmp", "/tmp", None);
    match claim {
        None => (
            vec![empty_dir("workspace"), empty_dir("tmp")],
            vec![mount("workspace", "/workspace", None), tmp],
        ),
        Some(claim) => {
            let mut mounts = vec![mount("state", "/workspace", Some("workspace".to_owned()))];
            for (index, (_, path)) in launch.mounts.iter().enumerate() {
                mounts.push(mount("state", path, Some(format!("mount-{index}"))));
            }
            mounts.push(tmp);
            let state = Volume {
                name: "state".to_owned(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.to_owned(),
                    read_only: Some(false),
                }),
                ..Volume::default()
            };
            (vec![state, empty_dir("tmp")], mounts)
        }
    }
}

/// The pod that runs the agent of `launch`, its state on `claim` when given.
pub fn agent_pod(
    settings: &KubernetesSettings,
    launch: &AgentLaunch,
    name: &str,
    claim: Option<&str>,
) -> Pod {
    let (volumes, volume_mounts) = storage(launch, claim);
    let limit_or = |asked: f64, default: f64| if asked > 0.0 { asked } else { default };
    let memory = if launch.limits.memory_bytes > 0 {
        launch.limits.memory_bytes
    } else {
        settings.limits.memory_bytes
    };
    let cpus = limit_or(launch.limits.cpus, settings.limits.cpus);
    let mut resources = BTreeMap::new();
    if memory > 0 {
        resources.insert("memory".to_owned(), Quantity(memory.to_string()));
    }
    if cpus > 0.0 {
        resources.insert(
            "cpu".to_owned(),
            Quantity(format!("{}m", (cpus * 1000.0).round() as u64)),
        );
    }
    let command = agent_command(launch);
    let labels = BTreeMap::from([
        (LABEL_MANAGED.to_owned(), "true".to_owned()),
        (LABEL_WORKER.to_owned(), label_value(&settings.worker_id)),
        (LABEL_TASK.to_owned(), label_value(&launch.task_id)),
        (LABEL_ATTEMPT.to_owned(), launch.attempt.to_string()),
        ("app.kubernetes.io/component".to_owned(), "agent".to_owned()),
    ]);
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".to_owned()),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(AGENT_UID),
                run_as_group: Some(AGENT_UID),
                fs_group: Some(AGENT_UID),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".to_owned(),
                    ..SeccompProfile::default()
                }),
                ..PodSecurityContext::default()
            }),
            containers: vec![Container {
                name: CONTAINER.to_owned(),
                image: Some(settings.image.clone()),
                image_pull_policy: Some(settings.image_pull_policy.clone()),
                command: Some(command),
                working_dir: Some("/workspace".to_owned()),
                stdin: Some(true),
                stdin_once: Some(true),
                tty: Some(false),
                resources: Some(ResourceRequirements {
                    limits: Some(resources.clone()),
                    requests: Some(resources),
                    ..ResourceRequirements::default()
                }),
                security_context: Some(SecurityContext {
                    allow_privilege_escalation: Some(false),
                    read_only_root_filesystem: Some(true),
                    privileged: Some(false),
                    capabilities: Some(Capabilities {
                        drop: Some(vec!["ALL".to_owned()]),
                        ..Capabilities::default()
                    }),
                    ..SecurityContext::default()
                }),
                volume_mounts: Some(volume_mounts),
                ..Container::default()
            }],
            volumes: Some(volumes),
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

/// The agent's standard streams, as the pod's attach stream carries them.
pub struct PodIo {
    pub stdin: Pin<Box<dyn AsyncWrite + Send>>,
    pub stdout: Pin<Box<dyn AsyncRead + Send>>,
    pub stderr: Pin<Box<dyn AsyncRead + Send>>,
}

/// Attaching to a pod's agent: over the API's websocket, or, in tests, in memory.
#[async_trait]
pub trait PodAttach: Send + Sync {
    async fn attach(&self, pods: &Api<Pod>, name: &str) -> Result<PodIo, String>;
}

/// Attaches through the Kubernetes API (`pods/attach`).
pub struct ApiAttach;

#[async_trait]
impl PodAttach for ApiAttach {
    async fn attach(&self, pods: &Api<Pod>, name: &str) -> Result<PodIo, String> {
        let params = AttachParams::default()
            .container(CONTAINER)
            .stdin(true)
            .stdout(true)
            .stderr(true);
        let mut attached = pods
            .attach(name, &params)
            .await
            .map_err(|err| format!("cannot attach to the agent's pod {name}: {err}"))?;
        let (stdin, stdout, stderr) = match (attached.stdin(), attached.stdout(), attached.stderr())
        {
            (Some(stdin), Some(stdout), Some(stderr)) => (stdin, stdout, stderr),
            _ => return Err(format!("the attach stream of pod {name} lacks a stream")),
        };
        // The attach stream lives as long as its process handle: kept until it ends.
        tokio::spawn(async move {
            let _ = attached.join().await;
        });
        Ok(PodIo {
            stdin: Box::pin(stdin),
            stdout: Box::pin(stdout),
            stderr: Box::pin(stderr),
        })
    }
}

pub struct KubernetesProvider {
    pods: Api<Pod>,
    claims: Api<PersistentVolumeClaim>,
    attach: Arc<dyn PodAttach>,
    settings: KubernetesSettings,
}

/// The volume claim of the session whose agents run as `owner` (`session-<id>`).
fn claim_name(owner: &str) -> String {
    let owner: String = owner
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(48)
        .collect();
    format!("claudecluster-{}", owner.trim_matches('-'))
}

impl KubernetesProvider {
    /// A provider reaching the API as `kubectl` would (in-cluster, or `KUBECONFIG`).
    pub async fn connect(settings: KubernetesSettings) -> Result<Self, LaunchError> {
        let client = Client::try_default().await.map_err(|err| {
            LaunchError(format!(
                "cannot reach the Kubernetes API (worker.container.orchestrator: kubernetes): {err}"
            ))
        })?;
        Ok(Self::with_client(client, Arc::new(ApiAttach), settings))
    }

    pub fn with_client(
        client: Client,
        attach: Arc<dyn PodAttach>,
        settings: KubernetesSettings,
    ) -> Self {
        let (pods, claims) = match &settings.namespace {
            Some(namespace) => (
                Api::namespaced(client.clone(), namespace),
                Api::namespaced(client, namespace),
            ),
            None => (
                Api::default_namespaced(client.clone()),
                Api::default_namespaced(client),
            ),
        };
        KubernetesProvider {
            pods,
            claims,
            attach,
            settings,
        }
    }

    /// Makes the session's volume claim unless it exists.
    async fn ensure_claim(&self, name: &str, owner: &str) -> Result<(), String> {
        match self.claims.get_opt(name).await {
            Ok(Some(_)) => return Ok(()),
            Ok(None) => {}
            Err(err) => {
                return Err(format!(
                    "cannot read the session's volume claim {name}: {err}"
                ));
            }
        }
        let claim = PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                labels: Some(BTreeMap::from([
                    (LABEL_MANAGED.to_owned(), "true".to_owned()),
                    (
                        LABEL_WORKER.to_owned(),
                        label_value(&self.settings.worker_id),
                    ),
                    (LABEL_TASK.to_owned(), label_value(owner)),
                ])),
                ..ObjectMeta::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
                storage_class_name: self.settings.storage_class.clone(),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".to_owned(),
                        Quantity(self.settings.session_storage.clone()),
                    )])),
                    ..VolumeResourceRequirements::default()
                }),
                ..PersistentVolumeClaimSpec::default()
            }),
            ..PersistentVolumeClaim::default()
        };
        match self.claims.create(&PostParams::default(), &claim).await {
            Ok(_) => Ok(()),
            // Made meanwhile by another launch of the same session.
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
            Err(err) => Err(format!(
                "the Kubernetes API refused the session's volume claim: {err}"
            )),
        }
    }

    /// Waits until the pod's agent runs; says why when it will not.
    async fn wait_running(&self, name: &str) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + self.settings.start_timeout;
        loop {
            let pod = self
                .pods
                .get(name)
                .await
                .map_err(|err| format!("cannot read the agent's pod {name}: {err}"))?;
            let status = pod.status.unwrap_or_default();
            let container = status
                .container_statuses
                .unwrap_or_default()
                .into_iter()
                .find(|container| container.name == CONTAINER);
            let state = container.and_then(|container| container.state);
            if let Some(state) = &state {
                if state.running.is_some() {
                    return Ok(());
                }
                if let Some(waiting) = &state.waiting
                    && let Some(reason) = &waiting.reason
                    && STUCK.contains(&reason.as_str())
                {
                    return Err(format!(
                        "the agent's pod cannot start: {reason}: {} (image `{}`, worker.container.image)",
                        waiting.message.clone().unwrap_or_default(),
                        self.settings.image
                    ));
                }
                if let Some(terminated) = &state.terminated {
                    return Err(format!(
                        "the agent's pod ended before it was attached to: exit code {}",
                        terminated.exit_code
                    ));
                }
            }
            if matches!(status.phase.as_deref(), Some("Failed" | "Succeeded")) {
                return Err(format!(
                    "the agent's pod ended before it started: {}",
                    status.message.unwrap_or_default()
                ));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "the agent's pod did not start within {} s (worker.kubernetes.startTimeout)",
                    self.settings.start_timeout.as_secs()
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// How the pod's agent ended, once its output closed.
async fn wait_for_exit(pods: Api<Pod>, name: String) -> AgentExit {
    let deadline = tokio::time::Instant::now() + EXIT_REPORT_WITHIN;
    loop {
        match pods.get(&name).await {
            Ok(pod) => {
                let terminated = pod
                    .status
                    .and_then(|status| status.container_statuses)
                    .unwrap_or_default()
                    .into_iter()
                    .find(|container| container.name == CONTAINER)
                    .and_then(|container| container.state)
                    .and_then(|state| state.terminated);
                if let Some(terminated) = terminated {
                    let detail = match terminated.reason.as_deref() {
                        Some("OOMKilled") => Some("out of memory".to_owned()),
                        Some("Completed" | "Error") | None => None,
                        Some(other) => Some(other.to_owned()),
                    };
                    return AgentExit {
                        code: Some(terminated.exit_code),
                        signal: None,
                        detail,
                    };
                }
            }
            Err(kube::Error::Api(status)) if status.code == 404 => {
                return AgentExit {
                    detail: Some("the agent's pod was deleted".to_owned()),
                    ..AgentExit::default()
                };
            }
            Err(err) => {
                if tokio::time::Instant::now() >= deadline {
                    return AgentExit {
                        detail: Some(format!("lost the Kubernetes API: {err}")),
                        ..AgentExit::default()
                    };
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return AgentExit {
                detail: Some("the agent's pod did not say how it ended".to_owned()),
                ..AgentExit::default()
            };
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Deletes the pod, waiting `grace` for its agent; a pod already gone is fine.
async fn delete_pod(pods: &Api<Pod>, name: &str, grace: u32) -> Result<(), kube::Error> {
    match pods
        .delete(name, &DeleteParams::default().grace_period(grace))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(err) => Err(err),
    }
}

#[async_trait]
impl ExecutionProvider for KubernetesProvider {
    fn mode(&self) -> ExecutionMode {
        ExecutionMode::ContainerAgentic
    }

    async fn launch(&self, launch: AgentLaunch) -> Result<AgentHandle, LaunchError> {
        // A session keeps its workspace and conversation between its containers: in a pod, on
        // a volume claim of its own, made with its first pod.
        let claim = if launch.mounts.is_empty() {
            None
        } else {
            let claim = claim_name(&launch.task_id);
            self.ensure_claim(&claim, &launch.task_id)
                .await
                .map_err(LaunchError)?;
            Some(claim)
        };
        let name = pod_name(&launch.task_id, launch.attempt);
        let pod = agent_pod(&self.settings, &launch, &name, claim.as_deref());
        self.pods
            .create(&PostParams::default(), &pod)
            .await
            .map_err(|err| {
                LaunchError(format!("the Kubernetes API refused the agent's pod: {err}"))
            })?;
        let started = async {
            self.wait_running(&name).await?;
            let mut io = self.attach.attach(&self.pods, &name).await?;
            let mut env = launch.env.clone();
            if let Some(repo_url) = &launch.repo_url {
                env.push(("CLAUDECLUSTER_REPO_URL".to_owned(), repo_url.clone()));
                env.push((
                    "CLAUDECLUSTER_REPO_SHOWN".to_owned(),
                    claudecluster_proto::without_credentials(repo_url),
                ));
            }
            let preamble = env_preamble(&env, self.settings.proxy_host.as_deref());
            io.stdin
                .write_all(preamble.as_bytes())
                .await
                .map_err(|err| format!("cannot pass the environment to the agent's pod: {err}"))?;
            Ok::<_, String>(io)
        };
        let io = match started.await {
            Ok(io) => io,
            Err(reason) => {
                // Nothing may be left behind: the pod goes with the failed launch.
                if let Err(err) = delete_pod(&self.pods, &name, 0).await {
                    tracing::warn!(pod = %name, error = %err, "cannot delete the pod of a failed launch");
                }
                return Err(LaunchError(reason));
            }
        };
        let PodIo {
            mut stdin,
            stdout,
            stderr,
        } = io;
        let input = match launch.input {
            AgentInput::None => {
                let _ = stdin.shutdown().await;
                None
            }
            AgentInput::StreamJson => Some(input_writer(stdin)),
        };
        let (lines, output) = mpsc::channel(256);
        let (exit_tx, exit) = oneshot::channel();
        {
            let pods = self.pods.clone();
            let name = name.clone();
            tokio::spawn(async move {
                tokio::join!(
                    forward_lines(stdout, OutputStream::Stdout, lines.clone()),
                    forward_lines(stderr, OutputStream::Stderr, lines),
                );
                let _ = exit_tx.send(wait_for_exit(pods, name).await);
            });
        }
        tracing::debug!(task = %launch.task_id, pod = %name, "agent pod attached");
        Ok(AgentHandle {
            output,
            exit,
            control: Box::new(PodControl {
                pods: self.pods.clone(),
                name: name.clone(),
            }),
            input,
            description: format!("pod {name}"),
            grant: None,
        })
    }

    async fn health(&self) -> ProviderHealth {
        match self.pods.list(&ListParams::default().limit(1)).await {
            Ok(_) => ProviderHealth::Ready,
            Err(err) => {
                ProviderHealth::Unavailable(format!("the Kubernetes API does not answer: {err}"))
            }
        }
    }

    async fn adopt_workspace(&self, workspace: &Path) -> Result<(), LaunchError> {
        // The pod's workspace is its own: nothing the worker put in its directory reaches it.
        let holds_files = std::fs::read_dir(workspace)
            .map(|mut entries| entries.next().is_some())
            .unwrap_or(false);
        if holds_files {
            return Err(LaunchError(
                "the agent's pod cannot see the worker's workspace; its repository is cloned in the pod".to_owned(),
            ));
        }
        Ok(())
    }

    fn clones_in_agent(&self) -> bool {
        true
    }

    async fn discard_session(&self, owner: &str) {
        let name = claim_name(owner);
        match self.claims.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(err) => {
                tracing::warn!(claim = %name, error = %err, "cannot delete a closed session's volume claim");
            }
        }
    }
}

/// Stopping a pod's agent. The API has no signals: an interrupt deletes the pod with a grace
/// period (the agent gets SIGTERM), a kill deletes it at once.
struct PodControl {
    pods: Api<Pod>,
    name: String,
}

#[async_trait]
impl AgentControl for PodControl {
    async fn interrupt(&self) -> std::io::Result<()> {
        delete_pod(&self.pods, &self.name, 10)
            .await
            .map_err(std::io::Error::other)
    }

    async fn kill(&self) -> std::io::Result<()> {
        delete_pod(&self.pods, &self.name, 0)
            .await
            .map_err(std::io::Error::other)
    }

    async fn release(&self) {
        if let Err(err) = delete_pod(&self.pods, &self.name, 0).await {
            tracing::warn!(pod = %self.name, error = %err, "cannot delete the agent's pod");
        }
    }
}

#[cfg(test)]
mod tests {
    //! The provider against a fake of the Kubernetes API (a tower service that answers as the
    //! API server does and records every request) and an attach stream in memory.

    use std::collections::HashMap;
    use std::sync::Mutex;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use serde_json::{Value, json};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, DuplexStream};

    use super::*;
    use crate::execution::supervisor::{self, Cancellation, Supervision};

    const NAMESPACE: &str = "agents";

    /// What the fake API server was asked, and how it answers.
    #[derive(Default)]
    struct Cluster {
        requests: Vec<(String, String, Value)>,
        pods: HashMap<String, Value>,
        claims: HashMap<String, Value>,
        /// The agent's exit code, once the test lets it end.
        exited: Option<i32>,
        /// A container that waits with this reason instead of running.
        stuck: Option<String>,
        refuse_create: bool,
    }

    type Shared = Arc<Mutex<Cluster>>;

    fn respond(status: u16, body: Value) -> http::Response<Full<Bytes>> {
        http::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    }

    fn with_status(pod: &Value, cluster: &Cluster) -> Value {
        let state = match (&cluster.stuck, cluster.exited) {
            (Some(reason), _) => {
                json!({"waiting": {"reason": reason, "message": "pull access denied"}})
            }
            (None, Some(code)) => json!({"terminated": {"exitCode": code, "reason": "Completed"}}),
            (None, None) => json!({"running": {"startedAt": "2026-12-01T00:00:00Z"}}),
        };
        let mut pod = pod.clone();
        pod["status"] = json!({
            "phase": if cluster.exited.is_some() { "Succeeded" } else { "Running" },
            "containerStatuses": [{
                "name": "agent", "image": "agent", "imageID": "", "ready": true,
                "restartCount": 0, "state": state
            }]
        });
        pod
    }

    async fn answer(
        shared: Shared,
        request: http::Request<kube::client::Body>,
    ) -> http::Response<Full<Bytes>> {
        let method = request.method().to_string();
        let path = request.uri().path().to_owned();
        let body = request.into_body().collect().await.unwrap().to_bytes();
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let mut cluster = shared.lock().unwrap();
        cluster
            .requests
            .push((method.clone(), path.clone(), body.clone()));
        let pods = format!("/api/v1/namespaces/{NAMESPACE}/pods");
        let claims = format!("/api/v1/namespaces/{NAMESPACE}/persistentvolumeclaims");
        let not_found = || {
            respond(
                404,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
            )
        };
        if let Some(rest) = path.strip_prefix(&claims) {
            let name = rest.trim_start_matches('/').to_owned();
            return match method.as_str() {
                "POST" => {
                    let name = body["metadata"]["name"].as_str().unwrap().to_owned();
                    cluster.claims.insert(name, body.clone());
                    respond(201, body)
                }
                "GET" => match cluster.claims.get(&name) {
                    Some(claim) => respond(200, claim.clone()),
                    None => not_found(),
                },
                "DELETE" => match cluster.claims.remove(&name) {
                    Some(claim) => respond(200, claim),
                    None => not_found(),
                },
                _ => not_found(),
            };
        }
        match (method.as_str(), path.strip_prefix(&pods)) {
            ("POST", Some("")) if cluster.refuse_create => respond(
                403,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403, "message": "pods is forbidden: the service account may not create pods"}),
            ),
            ("POST", Some("")) => {
                let name = body["metadata"]["name"].as_str().unwrap().to_owned();
                cluster.pods.insert(name, body.clone());
                respond(201, body)
            }
            ("GET", Some("")) => respond(
                200,
                json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": []}),
            ),
            ("GET", Some(name)) => match cluster.pods.get(name.trim_start_matches('/')) {
                Some(pod) => respond(200, with_status(pod, &cluster)),
                None => not_found(),
            },
            ("DELETE", Some(name)) => match cluster.pods.remove(name.trim_start_matches('/')) {
                Some(pod) => respond(200, pod),
                None => not_found(),
            },
            _ => not_found(),
        }
    }

    /// The agent's streams, in memory: the test holds the other ends.
    #[derive(Default)]
    struct MemoryAttach {
        ends: Mutex<Option<(DuplexStream, DuplexStream)>>,
    }

    #[async_trait]
    impl PodAttach for MemoryAttach {
        async fn attach(&self, _pods: &Api<Pod>, _name: &str) -> Result<PodIo, String> {
            let (stdin, agent_stdin) = tokio::io::duplex(1 << 16);
            let (agent_stdout, stdout) = tokio::io::duplex(1 << 16);
            let (_, stderr) = tokio::io::duplex(64);
            *self.ends.lock().unwrap() = Some((agent_stdin, agent_stdout));
            Ok(PodIo {
                stdin: Box::pin(stdin),
                stdout: Box::pin(stdout),
                stderr: Box::pin(stderr),
            })
        }
    }

    fn provider(shared: &Shared, attach: Arc<MemoryAttach>) -> KubernetesProvider {
        let state = shared.clone();
        let service = tower::service_fn(move |request| {
            let state = state.clone();
            async move { Ok::<_, std::convert::Infallible>(answer(state, request).await) }
        });
        let settings = KubernetesSettings {
            worker_id: "w1".into(),
            image: "claudecluster/agent:2.1.328".into(),
            namespace: Some(NAMESPACE.into()),
            proxy_host: Some("10.1.2.3".into()),
            limits: Limits {
                memory_bytes: 2 << 30,
                cpus: 1.5,
                pids: 512,
            },
            start_timeout: Duration::from_secs(5),
            image_pull_policy: "IfNotPresent".into(),
            session_storage: "1073741824".into(),
            storage_class: None,
        };
        KubernetesProvider::with_client(Client::new(service, NAMESPACE), attach, settings)
    }

    fn launch() -> AgentLaunch {
        AgentLaunch {
            task_id: "Task_42".into(),
            attempt: 2,
            args: vec!["-p".into(), "--output-format".into(), "stream-json".into()],
            env: vec![
                (
                    "ANTHROPIC_BASE_URL".into(),
                    "http://127.0.0.1:4100/agents".into(),
                ),
                ("ANTHROPIC_AUTH_TOKEN".into(), "cct_secret_token".into()),
            ],
            workspace: std::env::temp_dir(),
            input: AgentInput::StreamJson,
            limits: Limits::default(),
            mounts: Vec::new(),
            repo_url: None,
        }
    }

    fn requests(shared: &Shared, method: &str) -> Vec<(String, Value)> {
        shared
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|(m, _, _)| m == method)
            .map(|(_, path, body)| (path.clone(), body.clone()))
            .collect()
    }

    #[tokio::test]
    async fn an_agent_runs_in_a_hardened_pod_streams_to_the_supervisor_and_its_pod_goes() {
        let shared = Shared::default();
        let attach = Arc::new(MemoryAttach::default());
        let provider = provider(&shared, attach.clone());
        let handle = provider.launch(launch()).await.unwrap();

        // The pod as created: hardened, limited, labelled, and without the agent's token.
        let created = requests(&shared, "POST");
        assert_eq!(created.len(), 1);
        let (path, pod) = &created[0];
        assert_eq!(path, "/api/v1/namespaces/agents/pods");
        let name = pod["metadata"]["name"].as_str().unwrap().to_owned();
        assert!(
            name.starts_with("claudecluster-task_42-2-")
                || name.starts_with("claudecluster-task-42-2-"),
            "{name}"
        );
        assert!(name.len() <= 63);
        let labels = &pod["metadata"]["labels"];
        assert_eq!(labels["claudecluster.task"], "Task_42");
        assert_eq!(labels["claudecluster.worker"], "w1");
        assert_eq!(labels["app.kubernetes.io/component"], "agent");
        let spec = &pod["spec"];
        assert_eq!(spec["restartPolicy"], "Never");
        assert_eq!(spec["automountServiceAccountToken"], false);
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
        assert_eq!(spec["securityContext"]["runAsUser"], 1000);
        assert_eq!(
            spec["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        let container = &spec["containers"][0];
        assert_eq!(container["image"], "claudecluster/agent:2.1.328");
        assert_eq!(container["stdin"], true);
        assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(
            container["securityContext"]["allowPrivilegeEscalation"],
            false
        );
        assert_eq!(
            container["securityContext"]["capabilities"]["drop"],
            json!(["ALL"])
        );
        assert_eq!(container["resources"]["limits"]["memory"], "2147483648");
        assert_eq!(container["resources"]["limits"]["cpu"], "1500m");
        assert_eq!(
            container["volumeMounts"],
            json!([{"name": "workspace", "mountPath": "/workspace"}, {"name": "tmp", "mountPath": "/tmp"}])
        );
        assert!(container.get("env").is_none());
        assert!(
            !pod.to_string().contains("cct_secret_token"),
            "the token is not in the pod"
        );

        // The environment goes in over stdin, with the proxy where the pod reaches it.
        let (agent_stdin, mut agent_stdout) = attach.ends.lock().unwrap().take().unwrap();
        let mut stdin = BufReader::new(agent_stdin);
        let mut preamble = Vec::new();
        loop {
            let mut line = String::new();
            stdin.read_line(&mut line).await.unwrap();
            if line == "\n" {
                break;
            }
            preamble.push(line.trim_end().to_owned());
        }
        assert_eq!(
            preamble,
            [
                "HOME=/tmp/home",
                "ANTHROPIC_BASE_URL=http://10.1.2.3:4100/agents",
                "ANTHROPIC_AUTH_TOKEN=cct_secret_token"
            ]
        );

        // The agent's output, as the real CLI printed it, reaches the supervisor.
        let fixture = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../libs/agent-protocol/tests/fixtures/claude-code-2.1.328/tool_write.jsonl"
        ))
        .unwrap();
        let agent = {
            let shared = shared.clone();
            async move {
                agent_stdout.write_all(&fixture).await.unwrap();
                shared.lock().unwrap().exited = Some(0);
                drop(agent_stdout);
                // The prompt the worker writes reaches the agent too.
                let mut rest = String::new();
                stdin.read_to_string(&mut rest).await.unwrap();
                rest
            }
        };
        let supervision = Supervision {
            timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            grace_period: Duration::from_secs(1),
            max_line_bytes: 1 << 20,
        };
        let input = handle.input.clone().unwrap();
        input.send("{\"prompt\":true}\n".to_owned()).await.unwrap();
        drop(input);
        let mut kinds = Vec::new();
        let cancel = Cancellation::default();
        let supervised = supervisor::supervise(handle, supervision, &cancel, |kind| {
            kinds.push(kind);
            std::future::ready(())
        });
        let (outcome, rest) = tokio::join!(supervised, agent);
        assert_eq!(
            outcome.status,
            claudecluster_proto::v1::TaskStatus::Completed,
            "{}",
            outcome.reason
        );
        assert_eq!(
            outcome.result.unwrap().result.as_deref(),
            Some("MOCK_DONE wrote out.txt")
        );
        assert!(rest.contains("{\"prompt\":true}"), "{rest}");
        assert!(kinds
            .iter()
            .any(|kind| matches!(kind, claudecluster_proto::v1::event::Kind::ToolUse(tool) if tool.name == "Write")));
        // Nothing is left behind.
        let deleted = requests(&shared, "DELETE");
        assert_eq!(deleted.len(), 1, "{deleted:?}");
        assert_eq!(
            deleted[0].0,
            format!("/api/v1/namespaces/agents/pods/{name}")
        );
        assert!(shared.lock().unwrap().pods.is_empty());
    }

    #[tokio::test]
    async fn a_pod_that_cannot_start_is_deleted_and_the_reason_named() {
        let shared = Shared::default();
        shared.lock().unwrap().stuck = Some("ErrImagePull".into());
        let provider = provider(&shared, Arc::new(MemoryAttach::default()));
        let err = provider.launch(launch()).await.err().unwrap();
        assert!(err.0.contains("ErrImagePull"), "{}", err.0);
        assert!(err.0.contains("worker.container.image"), "{}", err.0);
        assert_eq!(requests(&shared, "DELETE").len(), 1);
        assert!(
            shared.lock().unwrap().pods.is_empty(),
            "no pod is left behind"
        );
    }

    #[tokio::test]
    async fn a_refused_pod_is_reported_with_the_apis_reason() {
        let shared = Shared::default();
        shared.lock().unwrap().refuse_create = true;
        let provider = provider(&shared, Arc::new(MemoryAttach::default()));
        let err = provider.launch(launch()).await.err().unwrap();
        assert!(err.0.contains("refused the agent's pod"), "{}", err.0);
        assert!(err.0.contains("may not create pods"), "{}", err.0);
        assert!(shared.lock().unwrap().pods.is_empty());
        assert_eq!(provider.health().await, ProviderHealth::Ready);
    }

    #[tokio::test]
    async fn a_session_keeps_its_state_on_a_claim_of_its_own_until_it_closes() {
        let shared = Shared::default();
        let provider = provider(&shared, Arc::new(MemoryAttach::default()));
        let session = || AgentLaunch {
            task_id: "session-S1".into(),
            mounts: vec![(std::env::temp_dir(), "/claude-config".into())],
            ..launch()
        };
        let first = provider.launch(session()).await.unwrap();
        drop(first);
        let second = provider.launch(session()).await.unwrap();
        drop(second);
        // One claim, made with the first pod, labelled, of the configured size.
        let claims: Vec<(String, Value)> = requests(&shared, "POST")
            .into_iter()
            .filter(|(path, _)| path.ends_with("/persistentvolumeclaims"))
            .collect();
        assert_eq!(claims.len(), 1, "{claims:?}");
        let claim = &claims[0].1;
        assert_eq!(claim["metadata"]["name"], "claudecluster-session-s1");
        assert_eq!(
            claim["metadata"]["labels"]["claudecluster.task"],
            "session-S1"
        );
        assert_eq!(claim["spec"]["accessModes"], json!(["ReadWriteOnce"]));
        assert_eq!(
            claim["spec"]["resources"]["requests"]["storage"],
            "1073741824"
        );
        // Each pod mounts the workspace and the conversation from it.
        let pods: Vec<(String, Value)> = requests(&shared, "POST")
            .into_iter()
            .filter(|(path, _)| path.ends_with("/pods"))
            .collect();
        assert_eq!(pods.len(), 2);
        for (_, pod) in &pods {
            let spec = &pod["spec"];
            assert_eq!(
                spec["volumes"][0],
                json!({"name": "state", "persistentVolumeClaim": {"claimName": "claudecluster-session-s1", "readOnly": false}})
            );
            assert_eq!(
                spec["containers"][0]["volumeMounts"],
                json!([
                    {"name": "state", "mountPath": "/workspace", "subPath": "workspace"},
                    {"name": "state", "mountPath": "/claude-config", "subPath": "mount-0"},
                    {"name": "tmp", "mountPath": "/tmp"}
                ])
            );
        }
        // The session closes: its claim goes.
        provider.discard_session("session-S1").await;
        assert!(shared.lock().unwrap().claims.is_empty());
        let deleted = requests(&shared, "DELETE");
        assert!(
            deleted
                .iter()
                .any(|(path, _)| path.ends_with("/persistentvolumeclaims/claudecluster-session-s1")),
            "{deleted:?}"
        );
        // Closing again (after a restart) is fine.
        provider.discard_session("session-S1").await;
    }

    #[tokio::test]
    async fn a_repository_is_cloned_in_the_pod_and_its_url_stays_out_of_the_pod() {
        let shared = Shared::default();
        let attach = Arc::new(MemoryAttach::default());
        let provider = provider(&shared, attach.clone());
        assert!(provider.clones_in_agent());
        let url = "https://user:sekret@git.example.com/team/repo.git";
        let _handle = provider
            .launch(AgentLaunch {
                repo_url: Some(url.to_owned()),
                ..launch()
            })
            .await
            .unwrap();
        let created = requests(&shared, "POST");
        assert!(!created[0].1.to_string().contains("git.example.com"));
        let (agent_stdin, _stdout) = attach.ends.lock().unwrap().take().unwrap();
        let mut stdin = BufReader::new(agent_stdin);
        let mut preamble = String::new();
        while !preamble.ends_with("\n\n") {
            stdin.read_line(&mut preamble).await.unwrap();
        }
        assert!(preamble.contains(&format!("CLAUDECLUSTER_REPO_URL={url}\n")));
        assert!(
            preamble
                .contains("CLAUDECLUSTER_REPO_SHOWN=https://***@git.example.com/team/repo.git\n"),
            "{preamble}"
        );
    }

    /// Runs the agent containers' entrypoint with `/bin/sh` in `dir`, `preamble` on stdin.
    fn entrypoint(dir: &Path, preamble: &str, command: &[&str]) -> std::process::Output {
        use std::io::Write;
        let mut child = std::process::Command::new("/bin/sh")
            .args([
                "-c",
                super::super::container::ENTRYPOINT,
                "claudecluster-agent",
                "none",
            ])
            .args(command)
            .current_dir(dir)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(preamble.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    #[test]
    fn the_entrypoint_clones_the_repository_and_a_failed_clone_hides_its_credentials() {
        let scratch = tempfile::tempdir().unwrap();
        let source = scratch.path().join("source");
        let git = |args: &[&str]| {
            let status = std::process::Command::new("git")
                .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
                .args(args)
                .current_dir(&source)
                .status()
                .unwrap();
            assert!(status.success(), "git {args:?}");
        };
        std::fs::create_dir(&source).unwrap();
        std::fs::write(source.join("NOTES.md"), "cloned in the pod\n").unwrap();
        git(&["init", "-q"]);
        git(&["add", "NOTES.md"]);
        git(&["commit", "-q", "-m", "first"]);
        let workspace = scratch.path().join("workspace");
        std::fs::create_dir(&workspace).unwrap();
        let home = scratch.path().join("home");
        let cloned = entrypoint(
            &workspace,
            &format!(
                "HOME={}\nCLAUDECLUSTER_REPO_URL=file://{}\nCLAUDECLUSTER_REPO_SHOWN=file://{}\n\n",
                home.display(),
                source.display(),
                source.display()
            ),
            &["cat", "NOTES.md"],
        );
        assert!(cloned.status.success(), "{cloned:?}");
        assert_eq!(
            String::from_utf8_lossy(&cloned.stdout),
            "cloned in the pod\n"
        );

        let elsewhere = scratch.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let failed = entrypoint(
            &elsewhere,
            &format!(
                "HOME={}\nCLAUDECLUSTER_REPO_URL=https://user:sekret@127.0.0.1:1/repo.git\nCLAUDECLUSTER_REPO_SHOWN=https://***@127.0.0.1:1/repo.git\n\n",
                home.display()
            ),
            &["echo", "the agent must not start"],
        );
        assert_eq!(failed.status.code(), Some(97));
        let said = String::from_utf8_lossy(&failed.stderr);
        assert!(
            said.contains("cannot clone https://***@127.0.0.1:1/repo.git"),
            "{said}"
        );
        assert!(
            !said.contains("sekret") && failed.stdout.is_empty(),
            "{failed:?}"
        );
    }

    #[tokio::test]
    async fn a_workspace_the_worker_filled_is_refused() {
        let shared = Shared::default();
        let provider = provider(&shared, Arc::new(MemoryAttach::default()));
        let workspace = tempfile::tempdir().unwrap();
        provider.adopt_workspace(workspace.path()).await.unwrap();
        std::fs::write(workspace.path().join("README.md"), "cloned").unwrap();
        let err = provider
            .adopt_workspace(workspace.path())
            .await
            .err()
            .unwrap();
        assert!(
            err.0.contains("cannot see the worker's workspace"),
            "{}",
            err.0
        );
    }

    #[test]
    fn pod_names_and_labels_are_what_kubernetes_takes() {
        let name = pod_name(&"A_very_long-Task.Id".repeat(5), 3);
        assert!(name.len() <= 63, "{name}");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        );
        assert_eq!(label_value("-weird id!-"), "weird_id");
        assert_eq!(label_value(&"x".repeat(100)).len(), 63);
    }
}
