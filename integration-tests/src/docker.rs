//! The real Docker engine, as tests see it: the `docker` CLI for inspecting what workers did,
//! and a proxy in front of the Docker socket that a test can cut, to take Docker away from one
//! worker without stopping the daemon that other tests use.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

pub const DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// The agent image the setup script builds.
pub fn agent_image() -> String {
    std::env::var("CLAUDECLUSTER_AGENT_IMAGE")
        .unwrap_or_else(|_| format!("claudecluster/agent:{}", crate::CLAUDE_CODE_VERSION))
}

/// Runs the docker CLI and returns its stdout; panics when it fails.
pub async fn docker(args: &[&str]) -> String {
    let output = tokio::process::Command::new("docker")
        .args(args)
        .output()
        .await
        .expect("the docker CLI is installed (scripts/setup.sh)");
    assert!(
        output.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Ids of the containers (running or not) carrying `label` (`key=value`).
pub async fn containers_with_label(label: &str) -> Vec<String> {
    docker(&["ps", "-aq", "--filter", &format!("label={label}")])
        .await
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Waits until no container carries `label`, and fails naming those left after 30 s. A task's
/// end does not wait for its container's removal; the worker removes it just after.
pub async fn assert_containers_removed(label: &str) {
    assert_none_left("container", &[label]).await
}

/// Waits until no agent container (one of a task or session) carries `label`, as
/// [`assert_containers_removed`] does. A running container worker keeps the holders of the
/// network namespaces its agents used, for its next ones: those are not left behind.
pub async fn assert_agent_containers_removed(label: &str) {
    assert_none_left("container", &[label, "claudecluster.task"]).await
}

/// Names of the network holders of worker `worker_id` (see
/// [`assert_agent_containers_removed`]).
pub async fn network_holders(worker_id: &str) -> Vec<String> {
    docker(&[
        "ps",
        "-a",
        "--filter",
        &format!("label=claudecluster.worker={worker_id}"),
        "--filter",
        "label=claudecluster.role=network-holder",
        "--format",
        "{{.Names}}",
    ])
    .await
    .lines()
    .map(str::to_owned)
    .collect()
}

/// Waits until no network carries `label`, as [`assert_containers_removed`] does.
pub async fn assert_networks_removed(label: &str) {
    assert_none_left("network", &[label]).await
}

/// Waits until no `kind` carries all of `labels`.
async fn assert_none_left(kind: &str, labels: &[&str]) {
    let filters: Vec<String> = labels
        .iter()
        .map(|label| format!("label={label}"))
        .collect();
    let label = labels.join(", ");
    let list = || async {
        let mut args = vec![kind, "ls", "-q"];
        for filter in &filters {
            args.extend(["--filter", filter.as_str()]);
        }
        if kind == "container" {
            args.push("-a");
        }
        docker(&args)
            .await
            .lines()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let gone = crate::wait_until(std::time::Duration::from_secs(30), || async {
        list().await.is_empty()
    })
    .await;
    if gone.is_err() {
        panic!("{kind}s left behind with {label}: {:?}", list().await);
    }
}

/// `docker inspect` of one object, as JSON.
pub async fn inspect(id: &str) -> serde_json::Value {
    let text = docker(&["inspect", id]).await;
    let mut list: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    list.remove(0)
}

/// A Unix socket that forwards to the Docker socket until cut.
pub struct DockerProxy {
    path: PathBuf,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl DockerProxy {
    pub fn start(dir: &Path) -> Self {
        let proxy = DockerProxy {
            path: dir.join("docker-proxy.sock"),
            tasks: Arc::default(),
        };
        proxy.restore();
        proxy
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Docker goes away: the socket closes and every open connection breaks.
    pub fn cut(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
        let _ = std::fs::remove_file(&self.path);
    }

    /// Docker comes back.
    pub fn restore(&self) {
        let _ = std::fs::remove_file(&self.path);
        let listener = UnixListener::bind(&self.path).expect("bind the proxy socket");
        let tasks = self.tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let connection = tokio::spawn(async move {
                    if let Ok(mut daemon) = UnixStream::connect(DOCKER_SOCKET).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut daemon).await;
                    }
                });
                tasks.lock().unwrap().push(connection);
            }
        });
        self.tasks.lock().unwrap().push(accept);
    }
}

impl Drop for DockerProxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// A Docker daemon of a test's own (its data and run directories, its socket, its own default
/// bridge and no iptables rules), with the agent image loaded from the host's daemon, so that
/// the test may stop and start it without touching the daemon other tests use.
pub struct TestDockerd {
    dir: tempfile::TempDir,
    /// The daemon's default bridge, made for it: started with `--bridge=none` instead, dockerd
    /// deletes the host's `docker0`, which the host's daemon makes again only when it restarts.
    bridge: String,
    child: Option<std::process::Child>,
}

impl TestDockerd {
    pub async fn start() -> Self {
        // Under /var/tmp: short enough for the socket paths dockerd makes under it.
        let dir = tempfile::Builder::new()
            .prefix("cc-dockerd-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let bridge = own_bridge();
        let mut daemon = TestDockerd {
            dir,
            bridge,
            child: None,
        };
        daemon.resume().await;
        let image = agent_image();
        let load = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "docker save {image} | docker -H {} load",
                daemon.host()
            ))
            .output()
            .await
            .unwrap();
        assert!(
            load.status.success(),
            "cannot load {image} into the test's daemon: {}",
            String::from_utf8_lossy(&load.stderr)
        );
        daemon
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("docker.sock")
    }

    pub fn host(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// Starts the daemon (again) and waits until it answers.
    pub async fn resume(&mut self) {
        let root = self.dir.path();
        let log = std::fs::File::create(root.join("dockerd.log")).unwrap();
        let child = std::process::Command::new("dockerd")
            .arg("--data-root")
            .arg(root.join("data"))
            .arg("--exec-root")
            .arg(root.join("exec"))
            .arg("--pidfile")
            .arg(root.join("dockerd.pid"))
            .arg("-H")
            .arg(self.host())
            .arg("--bridge")
            .arg(&self.bridge)
            .args([
                "--iptables=false",
                "--ip-masq=false",
                "--ip-forward=false",
                "--shutdown-timeout=2",
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("dockerd is installed (scripts/setup.sh)");
        self.child = Some(child);
        let host = self.host();
        crate::wait_until(std::time::Duration::from_secs(30), || {
            let host = host.clone();
            async move {
                tokio::process::Command::new("docker")
                    .args(["-H", &host, "info"])
                    .output()
                    .await
                    .is_ok_and(|output| output.status.success())
            }
        })
        .await
        .expect("the test's dockerd answers");
    }

    /// Stops the daemon as an operator would (SIGTERM); it stops its containers and exits.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            crate::send_signal(child.id(), libc::SIGTERM);
            let _ = child.wait();
        }
    }

    /// Runs the docker CLI against this daemon; its stdout.
    pub async fn docker(&self, args: &[&str]) -> String {
        let mut all = vec!["-H".to_owned(), self.host()];
        all.extend(args.iter().map(|arg| arg.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        docker(&all).await
    }
}

impl Drop for TestDockerd {
    fn drop(&mut self) {
        let host = self.host();
        // Containers first, so that the daemon leaves nothing mounted behind; then networks:
        // their bridges live in the host's namespace and would outlive the daemon.
        let _ = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "docker -H {host} ps -aq | xargs -r docker -H {host} rm -f; \
                 docker -H {host} network prune -f"
            ))
            .output();
        self.stop();
        // What the daemon mounted and left (its network namespace) would keep the directory
        // from being removed.
        let root = self.dir.path().display().to_string();
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut left: Vec<&str> = mounts
            .lines()
            .filter_map(|line| line.split_whitespace().nth(1))
            .filter(|point| point.starts_with(&root))
            .collect();
        left.sort_by_key(|point| std::cmp::Reverse(point.len()));
        for point in left {
            let _ = std::process::Command::new("umount")
                .args(["-l", point])
                .output();
        }
        let _ = ip(&["link", "delete", &self.bridge]);
    }
}

/// Makes a bridge for one test daemon: a name and a /24 of 10.213.0.0/16 of its own, from the
/// test process and a count within it, so that daemons of tests running at once do not meet.
fn own_bridge() -> String {
    static MADE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let made = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let pid = std::process::id();
    let name = format!("ccd{pid}x{made}");
    let subnet = (pid.wrapping_mul(7).wrapping_add(made)) % 250 + 1;
    let _ = ip(&["link", "delete", &name]);
    for args in [
        vec!["link", "add", "name", &name, "type", "bridge"],
        vec![
            "addr",
            "add",
            &format!("10.213.{subnet}.1/24"),
            "dev",
            &name,
        ],
        vec!["link", "set", &name, "up"],
    ] {
        let output = ip(&args).expect("iproute2 is installed (scripts/setup.sh)");
        assert!(
            output.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    name
}

fn ip(args: &[&str]) -> std::io::Result<std::process::Output> {
    std::process::Command::new("ip").args(args).output()
}
