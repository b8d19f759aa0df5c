//! Container agentic mode: each agent in a Docker container of its own, through bollard.
//!
//! The container gets the task's workspace at `/workspace`, runs as a non-root user with
//! every capability dropped and `no-new-privileges`, under memory, CPU and process limits, on
//! the configured network, and carries labels naming its task and worker. With `egress:
//! proxy-only` (the default) that network is none at all: the worker's credential proxy comes
//! in as a Unix socket on a read-only mount, and a forwarder on the container's loopback gives
//! it to the agent at the proxy's usual address. Such a container joins a network namespace
//! the worker keeps for reuse (see [`NetworkHolders`]), as Docker takes about a tenth of a
//! second to make a new one. The agent's
//! environment (API keys among it) goes in through the container's stdin, never into its
//! configuration, so `docker inspect` shows no secret. Containers are owned: a worker removes
//! what an earlier run of it left (by its id, and by its workspace root, whatever id that run
//! had), and whatever it could not remove while Docker was away.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::Instrument;

use async_trait::async_trait;
use bollard::container::LogOutput;
use bollard::errors::Error as DockerError;
use bollard::models::{ContainerCreateBody, HostConfig, NetworkCreateRequest};
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptions, KillContainerOptions, ListContainersOptions,
    ListNetworksOptions, RemoveContainerOptions,
};
use bollard::{ClientVersion, Docker};
use claudecluster_config::Egress;
use claudecluster_config::WorkerConfig;
use claudecluster_proto::v1::ExecutionMode;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};

use super::output::{LineSplitter, OutputLine, OutputStream, input_writer};
use super::{
    AgentControl, AgentExit, AgentHandle, AgentInput, AgentLaunch, ExecutionProvider, LaunchError,
    Limits, ProviderHealth,
};

/// The oldest Docker API this speaks (Docker 20.10); newer daemons accept it too.
const DOCKER_API: ClientVersion = ClientVersion {
    major_version: 1,
    minor_version: 41,
};
/// The name a container off the host's network reaches the host (and the worker's credential
/// proxy) by.
const PROXY_HOST: &str = "host.docker.internal";
const LABEL_MANAGED: &str = "claudecluster.managed";
const LABEL_WORKER: &str = "claudecluster.worker";
/// The workspace root of the worker that made the container: a worker that restarts on the
/// same root owns it, even under another id.
const LABEL_HOME: &str = "claudecluster.home";
const LABEL_TASK: &str = "claudecluster.task";
const LABEL_ATTEMPT: &str = "claudecluster.attempt";
/// Where an agent container finds the credential proxy's socket with `egress: proxy-only`.
const PROXY_SOCKET_DIR: &str = "/run/claudecluster";
/// Reads `NAME=value` lines from stdin until an empty line, exports them, makes the agent's
/// home (on the writable `/tmp`), clones the task's repository into the working directory when
/// the environment names one (`CLAUDECLUSTER_REPO_URL`: a pod's workspace is its own), then
/// becomes the agent (`$1` says whether the agent keeps stdin). git's own messages could show
/// the URL's credentials, so a failed clone says only the URL without them.
///
/// With `CLAUDECLUSTER_PROXY_PORT` (a container with no network), it first starts socat to
/// forward that port of the container's loopback to the proxy's socket, and waits until socat
/// listens (its socket in `/proc/net/tcp`, state 0A), so that the agent's first request finds
/// it.
pub(super) const ENTRYPOINT: &str = r#"mode=$1; shift
while IFS= read -r line && [ -n "$line" ]; do export "$line"; done
mkdir -p "$HOME"
if [ -n "${CLAUDECLUSTER_PROXY_PORT:-}" ]; then
  port=$CLAUDECLUSTER_PROXY_PORT; unset CLAUDECLUSTER_PROXY_PORT
  command -v socat >/dev/null 2>&1 \
    || { echo "the agent image has no socat, which egress: proxy-only needs to reach the worker's credential proxy" >&2; exit 96; }
  socat "TCP-LISTEN:$port,bind=127.0.0.1,reuseaddr,fork" "UNIX-CONNECT:/run/claudecluster/proxy.sock" </dev/null >/dev/null 2>&1 &
  listening=":$(printf %04X "$port") 00000000:0000 0A"
  until grep -q "$listening" /proc/net/tcp; do
    kill -0 $! 2>/dev/null || { echo "cannot forward 127.0.0.1:$port to the worker's credential proxy" >&2; exit 96; }
  done
fi
if [ -n "${CLAUDECLUSTER_REPO_URL:-}" ]; then
  GIT_TERMINAL_PROMPT=0 git -c protocol.ext.allow=never clone --quiet -- "$CLAUDECLUSTER_REPO_URL" . </dev/null >/dev/null 2>&1 \
    || { echo "cannot clone $CLAUDECLUSTER_REPO_SHOWN into the agent's workspace" >&2; exit 97; }
  unset CLAUDECLUSTER_REPO_URL CLAUDECLUSTER_REPO_SHOWN
fi
if [ "$mode" = stdin ]; then exec "$@"; fi
exec "$@" </dev/null"#;

/// What container mode needs from the worker's configuration.
#[derive(Debug, Clone)]
pub struct ContainerSettings {
    pub worker_id: String,
    /// The worker's workspace root.
    pub home: String,
    pub image: String,
    pub user: String,
    pub network: String,
    /// Path of the Docker socket.
    pub socket: String,
    /// Limits of a task that sets none.
    pub limits: Limits,
    /// A Docker runtime other than the default (`runsc`, …).
    pub runtime: Option<String>,
    pub egress: Egress,
    /// The directory of the credential proxy's socket, mounted into containers with `egress:
    /// proxy-only`.
    pub proxy_socket_dir: PathBuf,
    /// How long a kept network namespace may go unused before it is removed.
    pub namespace_idle_timeout: Duration,
}

/// The agent's home in its container: on the tmpfs at `/tmp`, the root filesystem being
/// read-only.
const AGENT_HOME: &str = "/tmp/home";

impl ContainerSettings {
    pub fn from_config(config: &WorkerConfig, worker_id: &str) -> Self {
        let container = &config.container;
        let root = crate::workspace::Workspaces::root_for(config);
        let socket = container
            .docker_host
            .clone()
            .or_else(|| std::env::var("DOCKER_HOST").ok())
            .unwrap_or_else(|| "/var/run/docker.sock".to_owned());
        ContainerSettings {
            worker_id: worker_id.to_owned(),
            home: root.display().to_string(),
            image: container.image.clone(),
            user: container.user.clone(),
            network: container.network.clone(),
            socket: socket.trim_start_matches("unix://").to_owned(),
            limits: Limits {
                memory_bytes: container.resource_limits.memory.0,
                cpus: container.resource_limits.cpu,
                pids: container.resource_limits.pids,
            },
            runtime: container.runtime.clone(),
            egress: container.egress,
            proxy_socket_dir: crate::proxy::socket_dir(&root),
            namespace_idle_timeout: container.namespace_idle_timeout.get(),
        }
    }
}

#[derive(Debug, Clone)]
enum Leftover {
    Container(String),
    Network(String),
}

pub struct ContainerProvider {
    docker: Docker,
    settings: ContainerSettings,
    /// What could not be removed while Docker was away; removed once it answers again.
    leftovers: Arc<Mutex<Vec<Leftover>>>,
    holders: Arc<NetworkHolders>,
}

impl ContainerProvider {
    /// A provider talking to the Docker socket of `settings`. It does not wait for Docker:
    /// while Docker is away the provider reports itself unavailable.
    pub fn new(settings: ContainerSettings) -> Result<Self, LaunchError> {
        let docker =
            Docker::connect_with_socket(&settings.socket, 120, &DOCKER_API).map_err(|err| {
                LaunchError(format!(
                    "cannot use the Docker socket {}: {err}",
                    settings.socket
                ))
            })?;
        let leftovers = Arc::default();
        let holders = Arc::new(NetworkHolders {
            docker: docker.clone(),
            settings: settings.clone(),
            leftovers: Arc::clone(&leftovers),
            state: Mutex::default(),
            making: tokio::sync::Mutex::default(),
        });
        Ok(ContainerProvider {
            docker,
            settings,
            leftovers,
            holders,
        })
    }

    /// Removes every container and network an earlier run of this worker left behind: those
    /// labelled with its id, and those labelled with its workspace root whatever id they carry
    /// (a worker without a fixed id that crashed).
    pub async fn remove_previous_runs(&self) -> Result<usize, String> {
        let mut containers = BTreeSet::new();
        let mut networks = BTreeSet::new();
        for filter in leftover_filters(&self.settings) {
            let listed = self
                .docker
                .list_containers(Some(ListContainersOptions {
                    all: true,
                    filters: Some(filter.clone()),
                    ..Default::default()
                }))
                .await
                .map_err(|err| self.unreachable(&err))?;
            containers.extend(listed.into_iter().filter_map(|c| c.id));
            let listed = self
                .docker
                .list_networks(Some(ListNetworksOptions {
                    filters: Some(filter),
                }))
                .await
                .map_err(|err| self.unreachable(&err))?;
            networks.extend(listed.into_iter().filter_map(|n| n.name));
        }
        let mut removed = 0;
        for id in containers {
            remove_container(&self.docker, &id)
                .await
                .map_err(|err| self.unreachable(&err))?;
            removed += 1;
        }
        for name in networks {
            let _ = self.docker.remove_network(&name).await;
        }
        if removed > 0 {
            tracing::info!(
                containers = removed,
                "removed containers an earlier run left"
            );
        }
        Ok(removed)
    }

    fn unreachable(&self, err: &DockerError) -> String {
        unreachable(&self.settings, err)
    }

    fn launch_error(&self, err: DockerError) -> LaunchError {
        match err {
            DockerError::DockerResponseServerError {
                status_code: 404,
                message,
            } if message.contains("image") => LaunchError(format!(
                "the agent image `{}` does not exist (`worker.container.image`); build it with deploy/agent-image/build-offline.sh",
                self.settings.image
            )),
            other => refused(&self.settings, "container", other),
        }
    }

    /// The network of the container named `name`; the network made for it alone, if any; and
    /// the host name or address it reaches the worker's credential proxy at (`None`: loopback,
    /// the proxy's own or, with no network, the forwarder's).
    async fn network_for(
        &self,
        name: &str,
    ) -> Result<(String, Option<String>, Option<String>), LaunchError> {
        if self.settings.egress != Egress::Open {
            return Ok(("none".to_owned(), None, None));
        }
        let proxy_host = (self.settings.network != "host").then(|| PROXY_HOST.to_owned());
        if self.settings.network != "per_task" {
            return Ok((self.settings.network.clone(), None, proxy_host));
        }
        let network = format!("{name}-net");
        let request = NetworkCreateRequest {
            name: network.clone(),
            driver: Some("bridge".to_owned()),
            labels: Some(owner_labels(&self.settings)),
            ..Default::default()
        };
        self.docker
            .create_network(request)
            .await
            .map_err(|err| self.launch_error(err))?;
        Ok((network.clone(), Some(network), proxy_host))
    }

    /// The host directory of the proxy's socket, to mount into a container with `egress:
    /// proxy-only`; an error when the worker has no such socket.
    fn proxy_socket_dir(&self) -> Result<String, LaunchError> {
        let dir = &self.settings.proxy_socket_dir;
        let socket = dir.join(crate::proxy::SOCKET_NAME);
        if !socket.exists() {
            return Err(LaunchError(format!(
                "the worker's credential proxy has no socket at {} for agent containers with `worker.container.egress: proxy-only` (the worker's log says why)",
                socket.display()
            )));
        }
        Ok(dir.display().to_string())
    }

    async fn discard(&self, container: Option<&str>, network: Option<&str>) {
        release(&self.docker, container, network, &self.leftovers).await;
    }

    /// Creates container `name` from `body`, attaches to it and starts it; on failure, the id
    /// of what was created, if anything, and Docker's error.
    async fn create_and_start(
        &self,
        name: &str,
        body: ContainerCreateBody,
    ) -> Result<(String, bollard::container::AttachContainerResults), (Option<String>, DockerError)>
    {
        let options = CreateContainerOptions {
            name: Some(name.to_owned()),
            ..Default::default()
        };
        let id = self
            .docker
            .create_container(Some(options), body)
            .instrument(tracing::info_span!(
                "container.create",
                otel.name = "create the container"
            ))
            .await
            .map_err(|err| (None, err))?
            .id;
        // Attached before it starts, so that no output is missed.
        let attach = AttachContainerOptions {
            stdin: true,
            stdout: true,
            stderr: true,
            stream: true,
            logs: false,
            detach_keys: None,
        };
        let attached = match self.docker.attach_container(&id, Some(attach)).await {
            Ok(attached) => attached,
            Err(err) => return Err((Some(id), err)),
        };
        if let Err(err) = self
            .docker
            .start_container(&id, None)
            .instrument(tracing::info_span!(
                "container.start",
                otel.name = "start the container"
            ))
            .await
        {
            return Err((Some(id), err));
        }
        Ok((id, attached))
    }

    /// Tries again to remove what Docker would not; each network up to `network_attempts`
    /// times, 100 ms apart.
    async fn remove_leftovers(&self, network_attempts: u32) {
        let pending: Vec<Leftover> = std::mem::take(&mut *self.leftovers.lock().unwrap());
        for leftover in pending {
            let removed = match &leftover {
                Leftover::Container(id) => remove_container(&self.docker, id).await.is_ok(),
                Leftover::Network(name) => {
                    remove_network(&self.docker, name, network_attempts).await
                }
            };
            if !removed {
                self.leftovers.lock().unwrap().push(leftover);
            }
        }
    }

    /// The container's user as numeric ids, for handing it the workspace.
    fn user_ids(&self) -> Option<(u32, u32)> {
        let (uid, gid) = self
            .settings
            .user
            .split_once(':')
            .unwrap_or((&self.settings.user, &self.settings.user));
        Some((uid.parse().ok()?, gid.parse().ok()?))
    }
}

fn unreachable(settings: &ContainerSettings, err: &DockerError) -> String {
    format!("Docker is not reachable at {}: {err}", settings.socket)
}

/// What Docker's refusal to make the agent's `what` (container, network) says, or that it
/// could not be asked.
fn refused(settings: &ContainerSettings, what: &str, err: DockerError) -> LaunchError {
    LaunchError(match err {
        DockerError::DockerResponseServerError { message, .. } => {
            format!("Docker refused the agent's {what}: {message}")
        }
        other => unreachable(settings, &other),
    })
}

/// The labels that say which worker owns a container or network.
fn owner_labels(settings: &ContainerSettings) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_MANAGED.to_owned(), "true".to_owned()),
        (LABEL_WORKER.to_owned(), settings.worker_id.clone()),
        (LABEL_HOME.to_owned(), settings.home.clone()),
    ])
}

/// Marks a container that only holds a network namespace for agent containers.
const LABEL_ROLE: &str = "claudecluster.role";
const NETWORK_HOLDER: &str = "network-holder";

/// Network namespaces for agent containers with no network (`egress: proxy-only`), each held
/// by a container of its own that only sleeps (with no network, and as sealed as an agent's):
/// Docker takes about a tenth of a second to make a new namespace, but lets a container join
/// an existing one at once. A namespace is used by one agent at a time and kept for the next
/// once that agent's container is removed: no process of the agent is left in it then, and
/// without capabilities the agent could change nothing of it (interfaces, routes, firewall).
/// A launch that finds none free runs with a namespace of its own, as before, and one is made
/// in the background for the next; so a worker keeps as many as it ran agents at once. One
/// unused for `namespace_idle_timeout` is removed (each holds a containerd shim), as is one
/// found stopped. They are removed at shutdown, and a later run of the worker removes those a
/// crash left, like its other containers.
struct NetworkHolders {
    docker: Docker,
    settings: ContainerSettings,
    leftovers: Arc<Mutex<Vec<Leftover>>>,
    state: Mutex<Holders>,
    /// Held while a holder is made: one at a time, so that each launch that found none free
    /// adds one; shutdown waits for it.
    making: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Holders {
    /// The holders no agent uses, the one freed last at the end: taken first, so that those
    /// not needed age.
    free: Vec<FreeHolder>,
    /// Whether a task looks for idle and stopped free holders; it ends when none is free.
    sweeping: bool,
    /// After shutdown none is made or kept.
    shut: bool,
}

struct FreeHolder {
    name: String,
    since: tokio::time::Instant,
}

impl NetworkHolders {
    /// A free holder's name, if any.
    fn take(&self) -> Option<String> {
        self.state.lock().unwrap().free.pop().map(|free| free.name)
    }

    /// Adds `name` to the free holders, unless the provider has shut down (then it is given
    /// back to the caller to remove).
    fn keep(self: &Arc<Self>, name: String) -> Option<String> {
        let mut state = self.state.lock().unwrap();
        if state.shut {
            return Some(name);
        }
        state.free.push(FreeHolder {
            name,
            since: tokio::time::Instant::now(),
        });
        if !std::mem::replace(&mut state.sweeping, true) {
            tokio::spawn(Self::sweep(Arc::downgrade(self)));
        }
        None
    }

    /// Removes free holders unused for the idle timeout, and those no longer running, every
    /// half of that timeout (at most 30 s), while any is free.
    async fn sweep(holders: std::sync::Weak<Self>) {
        let every = match holders.upgrade() {
            Some(holders) => (holders.settings.namespace_idle_timeout / 2)
                .clamp(Duration::from_millis(100), Duration::from_secs(30)),
            None => return,
        };
        loop {
            tokio::time::sleep(every).await;
            let Some(holders) = holders.upgrade() else {
                return;
            };
            let idle = holders.settings.namespace_idle_timeout;
            let (expired, kept) = {
                let mut state = holders.state.lock().unwrap();
                if state.shut || state.free.is_empty() {
                    state.sweeping = false;
                    return;
                }
                let (expired, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut state.free)
                    .into_iter()
                    .partition(|free| free.since.elapsed() >= idle);
                let names: Vec<String> = kept.iter().map(|free| free.name.clone()).collect();
                state.free = kept;
                (expired, names)
            };
            for free in expired {
                tracing::debug!(holder = %free.name, "removing a network holder no agent used");
                holders.discard(&free.name).await;
            }
            for name in kept {
                if !holders.stopped(&name).await {
                    continue;
                }
                // Unless a launch took it meanwhile: that launch finds it stopped itself.
                let taken = {
                    let mut state = holders.state.lock().unwrap();
                    let before = state.free.len();
                    state.free.retain(|free| free.name != name);
                    state.free.len() < before
                };
                if taken {
                    tracing::info!(holder = %name, "removing a network holder that had stopped");
                    holders.discard(&name).await;
                }
            }
        }
    }

    /// Makes a holder in the background, for the next launch. Docker may refuse for a while
    /// (busy, restarting): a few tries, further apart, before the next launch that finds none
    /// free asks again.
    fn make_later(self: &Arc<Self>) {
        let holders = Arc::clone(self);
        tokio::spawn(async move {
            for pause in [1, 2, 4, 0] {
                match holders.make().await {
                    Ok(()) => return,
                    Err(err) if pause == 0 => {
                        tracing::warn!(
                            error = %err,
                            "cannot make a network holder; agents start in namespaces of their own until one is made"
                        );
                    }
                    Err(err) => {
                        tracing::debug!(error = %err, retry_in_s = pause, "cannot make a network holder now");
                        tokio::time::sleep(Duration::from_secs(pause)).await;
                    }
                }
            }
        });
    }

    /// Keeps `name` for the next agent, once the agent that used it is gone.
    async fn give_back(self: &Arc<Self>, name: String) {
        if let Some(unwanted) = self.keep(name) {
            self.discard(&unwanted).await;
        }
    }

    /// Removes holder `name`; what Docker would not remove is a leftover, tried again later.
    async fn discard(&self, name: &str) {
        release(&self.docker, Some(name), None, &self.leftovers).await;
    }

    /// Whether Docker says holder `name` no longer runs, or is gone; not when Docker does not
    /// answer (it may be restarting), which the next look or launch will see.
    async fn stopped(&self, name: &str) -> bool {
        match self.docker.inspect_container(name, None).await {
            Ok(container) => container.state.and_then(|state| state.running) != Some(true),
            Err(DockerError::DockerResponseServerError {
                status_code: 404, ..
            }) => true,
            Err(_) => false,
        }
    }

    /// Whether holder `name` runs, so that a container can join its namespace.
    async fn runs(&self, name: &str) -> bool {
        container_state(&self.docker, name)
            .await
            .and_then(|state| state.running)
            .unwrap_or(false)
    }

    /// Makes one free holder, after the one being made, unless the provider has shut down.
    async fn make(self: &Arc<Self>) -> Result<(), DockerError> {
        let _making = self.making.lock().await;
        if self.state.lock().unwrap().shut {
            return Ok(());
        }
        let name = format!(
            "claudecluster-netns-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let mut labels = owner_labels(&self.settings);
        labels.insert(LABEL_ROLE.to_owned(), NETWORK_HOLDER.to_owned());
        let body = ContainerCreateBody {
            image: Some(self.settings.image.clone()),
            cmd: Some(vec!["sleep".to_owned(), "infinity".to_owned()]),
            user: Some(self.settings.user.clone()),
            labels: Some(labels),
            host_config: Some(HostConfig {
                network_mode: Some("none".to_owned()),
                memory: Some(16 << 20),
                pids_limit: Some(4),
                security_opt: Some(vec!["no-new-privileges".to_owned()]),
                cap_drop: Some(vec!["ALL".to_owned()]),
                readonly_rootfs: Some(true),
                runtime: self.settings.runtime.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptions {
            name: Some(name.clone()),
            ..Default::default()
        };
        self.docker.create_container(Some(options), body).await?;
        let started = self.docker.start_container(&name, None).await;
        let unwanted = match started {
            Ok(()) => self.keep(name),
            Err(_) => Some(name),
        };
        if let Some(name) = unwanted {
            self.discard(&name).await;
        }
        started
    }

    /// Removes every free holder and makes no more: at shutdown, once no agent runs.
    async fn shut_down(&self) {
        self.state.lock().unwrap().shut = true;
        // One being made is removed by its maker once done; bounded, as Docker may not answer.
        let _ = tokio::time::timeout(Duration::from_secs(10), self.making.lock()).await;
        let free = std::mem::take(&mut self.state.lock().unwrap().free);
        for free in free {
            self.discard(&free.name).await;
        }
    }
}

/// Docker filters for what an earlier run of this worker left: one query each, as the labels
/// of one filter must all match.
fn leftover_filters(settings: &ContainerSettings) -> [HashMap<String, Vec<String>>; 2] {
    let label = |name: &str, value: &str| {
        HashMap::from([(
            "label".to_owned(),
            vec![format!("{LABEL_MANAGED}=true"), format!("{name}={value}")],
        )])
    };
    [
        label(LABEL_WORKER, &settings.worker_id),
        label(LABEL_HOME, &settings.home),
    ]
}

async fn remove_container(docker: &Docker, id: &str) -> Result<(), DockerError> {
    let options = RemoveContainerOptions {
        force: true,
        v: true,
        ..Default::default()
    };
    match docker.remove_container(id, Some(options)).await {
        Ok(()) => Ok(()),
        // Already gone.
        Err(DockerError::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        Err(err) => Err(err),
    }
}

/// Removes `container` and `network`; what Docker would not remove is a leftover, tried again
/// later. True when the container (if any) is gone.
async fn release(
    docker: &Docker,
    container: Option<&str>,
    network: Option<&str>,
    leftovers: &Mutex<Vec<Leftover>>,
) -> bool {
    let mut removed = true;
    if let Some(id) = container
        && let Err(err) = remove_container(docker, id).await
    {
        tracing::warn!(container = id, error = %err, "cannot remove container; will retry");
        removal_failed("container");
        leftovers
            .lock()
            .unwrap()
            .push(Leftover::Container(id.to_owned()));
        removed = false;
    }
    if let Some(name) = network
        && !remove_network(docker, name, PATIENT_ATTEMPTS).await
    {
        tracing::warn!(network = name, "cannot remove network; will retry");
        removal_failed("network");
        leftovers
            .lock()
            .unwrap()
            .push(Leftover::Network(name.to_owned()));
    }
    removed
}

/// Tries to remove a network for a second: Docker may still be letting go of a removed
/// container's endpoint on it.
const PATIENT_ATTEMPTS: u32 = 10;

/// Removes network `name`, trying up to `attempts` times 100 ms apart; true when it is gone.
async fn remove_network(docker: &Docker, name: &str, attempts: u32) -> bool {
    for attempt in 1..=attempts {
        match docker.remove_network(name).await {
            Ok(())
            | Err(DockerError::DockerResponseServerError {
                status_code: 404, ..
            }) => return true,
            Err(_) if attempt < attempts => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(_) => {}
        }
    }
    false
}

fn removal_failed(kind: &str) {
    crate::metrics::metrics()
        .removal_failures
        .get_or_create(&vec![("kind", kind.to_owned())])
        .inc();
}

/// What Docker says of container `id`'s state, if it answers.
async fn container_state(docker: &Docker, id: &str) -> Option<bollard::models::ContainerState> {
    docker.inspect_container(id, None).await.ok()?.state
}

fn limit_or(task: f64, default: f64) -> f64 {
    if task > 0.0 { task } else { default }
}

#[async_trait]
impl ExecutionProvider for ContainerProvider {
    fn mode(&self) -> ExecutionMode {
        ExecutionMode::ContainerAgentic
    }

    async fn health(&self) -> ProviderHealth {
        match tokio::time::timeout(Duration::from_secs(3), self.docker.ping()).await {
            Ok(Ok(_)) => {
                // One try each: admissions wait on this check; the next check tries again.
                self.remove_leftovers(1).await;
                ProviderHealth::Ready
            }
            Ok(Err(err)) => ProviderHealth::Unavailable(self.unreachable(&err)),
            Err(_) => ProviderHealth::Unavailable(format!(
                "Docker at {} did not answer within 3 s",
                self.settings.socket
            )),
        }
    }

    async fn shut_down(&self) {
        self.holders.shut_down().await;
        if self.leftovers.lock().unwrap().is_empty() {
            return;
        }
        // Bounded: a Docker that does not answer must not hold the worker's exit.
        if tokio::time::timeout(
            Duration::from_secs(10),
            self.remove_leftovers(PATIENT_ATTEMPTS),
        )
        .await
        .is_err()
        {
            tracing::warn!(
                "Docker did not answer at shutdown; a restart of this worker removes what is left"
            );
        }
        let left = self.leftovers.lock().unwrap().len();
        if left > 0 {
            tracing::warn!(
                left,
                "containers or networks not removed at shutdown; a restart of this worker removes them"
            );
        }
    }

    async fn adopt_workspace(&self, workspace: &Path) -> Result<(), LaunchError> {
        let Some((uid, gid)) = self.user_ids() else {
            return Ok(());
        };
        let workspace = workspace.to_path_buf();
        tokio::task::spawn_blocking(move || chown_tree(&workspace, uid, gid))
            .await
            .expect("chown task panicked")
            .map_err(|err| {
                LaunchError(format!(
                    "cannot hand the workspace to the container's user {uid}:{gid}: {err}"
                ))
            })
    }

    async fn launch(&self, launch: AgentLaunch) -> Result<AgentHandle, LaunchError> {
        let name = format!("claudecluster-{}-{}", launch.task_id, launch.attempt);
        // The port of the worker's credential proxy, from the agent's base URL.
        let proxy_port = launch
            .env
            .iter()
            .find(|(key, _)| key == "ANTHROPIC_BASE_URL")
            .and_then(|(_, url)| url.strip_prefix("http://127.0.0.1:")?.parse::<u16>().ok());
        // With no network, the proxy comes in as a socket, and the agent reaches it at the
        // same port of its own loopback.
        let proxy_socket = match (self.settings.egress, proxy_port) {
            (Egress::ProxyOnly, Some(port)) => Some((self.proxy_socket_dir()?, port)),
            _ => None,
        };
        let (network_mode, own_network, proxy_host) = self.network_for(&name).await?;
        let mut holder = match proxy_socket {
            Some(_) => self.holders.take(),
            None => None,
        };

        let defaults = self.settings.limits;
        let memory = if launch.limits.memory_bytes > 0 {
            launch.limits.memory_bytes
        } else {
            defaults.memory_bytes
        };
        let cpus = limit_or(launch.limits.cpus, defaults.cpus);
        let pids = if launch.limits.pids > 0 {
            launch.limits.pids
        } else {
            defaults.pids
        };
        let cmd = agent_command(&launch);
        let body = ContainerCreateBody {
            image: Some(self.settings.image.clone()),
            cmd: Some(cmd),
            user: Some(self.settings.user.clone()),
            working_dir: Some("/workspace".to_owned()),
            labels: Some({
                let mut labels = owner_labels(&self.settings);
                labels.insert(LABEL_TASK.to_owned(), launch.task_id.clone());
                labels.insert(LABEL_ATTEMPT.to_owned(), launch.attempt.to_string());
                labels
            }),
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            open_stdin: Some(true),
            stdin_once: Some(true),
            tty: Some(false),
            host_config: Some(HostConfig {
                binds: Some(
                    std::iter::once((launch.workspace.clone(), "/workspace".to_owned()))
                        .chain(launch.mounts.iter().cloned())
                        .map(|(host, inside)| format!("{}:{inside}:rw", host.display()))
                        .chain(
                            proxy_socket
                                .iter()
                                .map(|(dir, _)| format!("{dir}:{PROXY_SOCKET_DIR}:ro")),
                        )
                        .collect(),
                ),
                memory: (memory > 0).then_some(memory as i64),
                memory_swap: (memory > 0).then_some(memory as i64),
                nano_cpus: (cpus > 0.0).then_some((cpus * 1e9) as i64),
                pids_limit: (pids > 0).then_some(i64::from(pids)),
                security_opt: Some(vec!["no-new-privileges".to_owned()]),
                cap_drop: Some(vec!["ALL".to_owned()]),
                // Sealed: the workspace (and a session's own mounts) are the only writable
                // places that outlive the container; the home and scratch space are tmpfs.
                readonly_rootfs: Some(true),
                tmpfs: Some(HashMap::from([(
                    "/tmp".to_owned(),
                    "rw,nosuid,nodev,mode=1777".to_owned(),
                )])),
                runtime: self.settings.runtime.clone(),
                // Off the host's network, the container reaches the worker's credential proxy
                // at the host's gateway.
                extra_hosts: (proxy_host.as_deref() == Some(PROXY_HOST))
                    .then(|| vec![format!("{PROXY_HOST}:host-gateway")]),
                network_mode: Some(network_mode.clone()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let joining = |holder: &Option<String>| {
            let mut body = body.clone();
            if let (Some(holder), Some(host)) = (holder, body.host_config.as_mut()) {
                host.network_mode = Some(format!("container:{holder}"));
            }
            body
        };
        let mut started = self.create_and_start(&name, joining(&holder)).await;
        if let (Err((created, _)), Some(taken)) = (&started, &holder) {
            // A holder that no longer runs (Docker restarted) is dropped, and the agent gets
            // a namespace of its own; a holder that runs was not the trouble.
            if let Some(id) = created {
                self.discard(Some(id), None).await;
            }
            let taken = taken.clone();
            holder = None;
            if self.holders.runs(&taken).await {
                self.holders.give_back(taken).await;
            } else {
                self.holders.discard(&taken).await;
                started = self.create_and_start(&name, joining(&holder)).await;
            }
        }
        let (id, attached) = match started {
            Ok(started) => started,
            Err((created, err)) => {
                self.discard(created.as_deref(), own_network.as_deref())
                    .await;
                return Err(self.launch_error(err));
            }
        };
        if proxy_socket.is_some() && holder.is_none() {
            // Now that this one's container has started, so as not to slow its start.
            self.holders.make_later();
        }
        let description = match &holder {
            Some(holder) => {
                format!("container {name} on network none, in the namespace of {holder}")
            }
            None => format!("container {name} on network {network_mode}"),
        };
        tracing::debug!(task = %launch.task_id, container = %id, "agent container started");

        let mut writer = attached.input;
        let mut env = launch.env.clone();
        if let Some((_, port)) = &proxy_socket {
            env.push(("CLAUDECLUSTER_PROXY_PORT".to_owned(), port.to_string()));
        }
        let preamble = env_preamble(&env, proxy_host.as_deref());
        if let Err(err) = writer.write_all(preamble.as_bytes()).await {
            self.discard(Some(&id), own_network.as_deref()).await;
            return Err(LaunchError(format!(
                "cannot pass the environment to the agent's container: {err}"
            )));
        }
        let input = match launch.input {
            AgentInput::None => {
                let _ = writer.shutdown().await;
                None
            }
            AgentInput::StreamJson => Some(input_writer(writer)),
        };

        let (lines, output) = mpsc::channel(256);
        let mut stream = attached.output;
        tokio::spawn(async move {
            let mut stdout = LineSplitter::default();
            let mut stderr = LineSplitter::default();
            while let Some(Ok(chunk)) = stream.next().await {
                let (splitter, kind, bytes) = match chunk {
                    LogOutput::StdOut { message } | LogOutput::Console { message } => {
                        (&mut stdout, OutputStream::Stdout, message)
                    }
                    LogOutput::StdErr { message } => (&mut stderr, OutputStream::Stderr, message),
                    LogOutput::StdIn { .. } => continue,
                };
                for text in splitter.push(&bytes) {
                    if lines.send(OutputLine { stream: kind, text }).await.is_err() {
                        return;
                    }
                }
            }
            for (splitter, kind) in [
                (&mut stdout, OutputStream::Stdout),
                (&mut stderr, OutputStream::Stderr),
            ] {
                if let Some(text) = splitter.finish() {
                    let _ = lines.send(OutputLine { stream: kind, text }).await;
                }
            }
        });

        let killed_by_worker = Arc::new(AtomicBool::new(false));
        let (exit_tx, exit) = oneshot::channel();
        {
            let docker = self.docker.clone();
            let id = id.clone();
            let killed_by_worker = killed_by_worker.clone();
            tokio::spawn(async move {
                let exit = wait_for_exit(&docker, &id, memory, &killed_by_worker).await;
                let _ = exit_tx.send(exit);
            });
        }
        Ok(AgentHandle {
            output,
            exit,
            control: Box::new(ContainerControl {
                docker: self.docker.clone(),
                id,
                network: own_network,
                killed_by_worker,
                leftovers: self.leftovers.clone(),
                holder: holder.map(|name| (Arc::clone(&self.holders), name)),
            }),
            input,
            description,
            grant: None,
        })
    }
}

/// What an agent container runs: [`ENTRYPOINT`], then `claude` with the launch's arguments.
pub(super) fn agent_command(launch: &AgentLaunch) -> Vec<String> {
    let stdin_mode = match launch.input {
        AgentInput::None => "none",
        AgentInput::StreamJson => "stdin",
    };
    let mut command = vec![
        "/bin/sh".to_owned(),
        "-c".to_owned(),
        ENTRYPOINT.to_owned(),
        "claudecluster-agent".to_owned(),
        stdin_mode.to_owned(),
        "claude".to_owned(),
    ];
    command.extend(launch.args.iter().cloned());
    command
}

/// The agent's environment as [`ENTRYPOINT`] reads it from stdin: `NAME=value` lines and an
/// empty one. Passed this way, not in the container's or pod's definition, so that whoever
/// may read those (`docker inspect`, the Kubernetes API) does not read the agent's token.
/// The worker's proxy, at 127.0.0.1 for the worker, is at `proxy_host` for the agent.
pub(super) fn env_preamble(env: &[(String, String)], proxy_host: Option<&str>) -> String {
    // First, so that nothing the launch sets can move it.
    let mut preamble = format!("HOME={AGENT_HOME}\n");
    for (key, value) in env {
        let value = match proxy_host {
            Some(host) if key == "ANTHROPIC_BASE_URL" => {
                value.replacen("://127.0.0.1:", &format!("://{host}:"), 1)
            }
            Some(host) if key == "HTTPS_PROXY" || key == "HTTP_PROXY" => {
                value.replacen("@127.0.0.1:", &format!("@{host}:"), 1)
            }
            _ => value.clone(),
        };
        if value.contains('\n') {
            tracing::warn!(variable = %key, "a variable with a newline cannot be passed to a container agent");
            continue;
        }
        preamble.push_str(&format!("{key}={value}\n"));
    }
    preamble.push('\n');
    preamble
}

/// Waits for the container to stop and says how it ended, naming the cause when Docker knows
/// it (out of memory, killed from outside, the daemon gone).
async fn wait_for_exit(
    docker: &Docker,
    id: &str,
    memory: u64,
    killed_by_worker: &AtomicBool,
) -> AgentExit {
    let mut waits = docker.wait_container(id, None);
    let code = match waits.next().await {
        Some(Ok(response)) => response.status_code,
        Some(Err(DockerError::DockerContainerWaitError { code, .. })) => code,
        Some(Err(err)) => {
            return AgentExit {
                detail: Some(format!("lost the Docker daemon: {err}")),
                ..AgentExit::default()
            };
        }
        None => {
            return AgentExit {
                detail: Some("lost the Docker daemon".to_owned()),
                ..AgentExit::default()
            };
        }
    };
    let oom_killed = || async {
        container_state(docker, id)
            .await
            .and_then(|state| state.oom_killed)
            .unwrap_or(false)
    };
    let mut oom = oom_killed().await;
    // Docker learns of an OOM kill from an event of its own, which may come after the exit:
    // a SIGKILL the worker did not send is looked at again for half a second before it is
    // called a kill from outside.
    if code == 137 && !oom && !killed_by_worker.load(Ordering::SeqCst) {
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            oom = oom_killed().await;
            if oom {
                break;
            }
        }
    }
    let oom_killed = oom;
    let detail = if oom_killed {
        Some(format!(
            "out of memory (the container's limit is {} MiB)",
            memory / (1 << 20)
        ))
    } else if code == 137 && !killed_by_worker.load(Ordering::SeqCst) {
        Some("the container was killed from outside the worker".to_owned())
    } else {
        None
    };
    AgentExit {
        code: Some(code as i32),
        signal: None,
        detail,
    }
}

struct ContainerControl {
    docker: Docker,
    id: String,
    network: Option<String>,
    killed_by_worker: Arc<AtomicBool>,
    leftovers: Arc<Mutex<Vec<Leftover>>>,
    /// The network holder whose namespace the container joined, given back once it is gone.
    holder: Option<(Arc<NetworkHolders>, String)>,
}

impl ContainerControl {
    async fn signal(&self, signal: &str) -> std::io::Result<()> {
        let options = KillContainerOptions {
            signal: signal.to_owned(),
        };
        match self.docker.kill_container(&self.id, Some(options)).await {
            Ok(()) => Ok(()),
            // 409: the container is no longer running.
            Err(DockerError::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(()),
            Err(err) => Err(std::io::Error::other(err)),
        }
    }
}

#[async_trait]
impl AgentControl for ContainerControl {
    async fn interrupt(&self) -> std::io::Result<()> {
        self.signal("SIGINT").await
    }

    async fn kill(&self) -> std::io::Result<()> {
        self.killed_by_worker.store(true, Ordering::SeqCst);
        self.signal("SIGKILL").await
    }

    async fn release(&self) {
        let removed = release(
            &self.docker,
            Some(&self.id),
            self.network.as_deref(),
            &self.leftovers,
        )
        .await;
        if let Some((holders, name)) = &self.holder {
            if removed {
                holders.give_back(name.clone()).await;
            } else {
                // The agent may still run in it: not for another agent.
                holders.discard(name).await;
            }
        }
    }
}

/// Gives `root` and everything below it to `uid:gid`.
fn chown_tree(root: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(root, Some(uid), Some(gid))?;
    if root.is_dir() && !root.is_symlink() {
        for entry in std::fs::read_dir(root)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ContainerSettings {
        let config = WorkerConfig {
            workspace_root: Some("/srv/claudecluster/workspaces".into()),
            ..WorkerConfig::default()
        };
        ContainerSettings::from_config(&config, "worker-a1b2c3d4")
    }

    #[test]
    fn the_entrypoint_forwards_to_the_socket_a_container_is_given() {
        let socket = format!(
            "UNIX-CONNECT:{PROXY_SOCKET_DIR}/{}",
            crate::proxy::SOCKET_NAME
        );
        assert!(ENTRYPOINT.contains(&socket), "{ENTRYPOINT}");
    }

    #[test]
    fn containers_carry_the_workers_id_and_workspace_root() {
        let labels = owner_labels(&settings());
        assert_eq!(labels[LABEL_WORKER], "worker-a1b2c3d4");
        assert_eq!(labels[LABEL_HOME], "/srv/claudecluster/workspaces");
        assert_eq!(labels[LABEL_MANAGED], "true");
    }

    /// Creates a stopped container with `labels`, through the docker CLI. Docker and the agent
    /// image are required: `scripts/setup.sh` installs them.
    fn docker_create(image: &str, labels: &[(&str, &str)]) -> String {
        let mut command = std::process::Command::new("docker");
        command.arg("create");
        for (name, value) in labels {
            command.arg("--label").arg(format!("{name}={value}"));
        }
        let created = command.args([image, "true"]).output();
        match created {
            Ok(output) if output.status.success() => {
                String::from_utf8(output.stdout).unwrap().trim().to_owned()
            }
            failed => panic!(
                "this test needs Docker and the agent image (run scripts/setup.sh): {failed:?}"
            ),
        }
    }

    fn container_exists(id: &str) -> bool {
        std::process::Command::new("docker")
            .args(["inspect", "--format", "{{.Id}}", id])
            .output()
            .map(|output| output.status.success())
            .unwrap_or(false)
    }

    #[tokio::test]
    async fn a_restarted_worker_removes_what_its_workspace_root_left_under_any_id() {
        let root = tempfile::tempdir().unwrap();
        let config = WorkerConfig {
            workspace_root: Some(root.path().to_path_buf()),
            ..WorkerConfig::default()
        };
        let settings = ContainerSettings::from_config(&config, "worker-after-restart");
        let home = settings.home.clone();
        let managed = (LABEL_MANAGED, "true");
        let earlier_id = docker_create(
            &settings.image,
            &[
                managed,
                (LABEL_WORKER, "worker-before-crash"),
                (LABEL_HOME, &home),
            ],
        );
        let same_id = docker_create(
            &settings.image,
            &[
                managed,
                (LABEL_WORKER, "worker-after-restart"),
                (LABEL_HOME, "/elsewhere"),
            ],
        );
        let other_home = format!("{home}-other");
        let someone_elses = docker_create(
            &settings.image,
            &[
                managed,
                (LABEL_WORKER, "worker-else"),
                (LABEL_HOME, &other_home),
            ],
        );

        let provider = ContainerProvider::new(settings).unwrap();
        let removed = provider.remove_previous_runs().await.unwrap();
        assert_eq!(removed, 2);
        assert!(!container_exists(&earlier_id), "left under another id");
        assert!(!container_exists(&same_id), "left under this id");
        assert!(container_exists(&someone_elses), "another worker's stays");
        remove_container(&provider.docker, &someone_elses)
            .await
            .unwrap();
    }

    #[test]
    fn leftovers_are_found_by_worker_id_and_by_workspace_root_apart() {
        let [by_id, by_home] = leftover_filters(&settings());
        assert_eq!(
            by_id["label"],
            [
                "claudecluster.managed=true",
                "claudecluster.worker=worker-a1b2c3d4"
            ]
        );
        assert_eq!(
            by_home["label"],
            [
                "claudecluster.managed=true",
                "claudecluster.home=/srv/claudecluster/workspaces"
            ]
        );
    }
}
