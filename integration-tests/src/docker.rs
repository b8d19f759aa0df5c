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
