//! Container agentic mode against a real Docker engine: what a task's container is given,
//! mixed clusters, warm agents, and everything that can go wrong with Docker. Every test
//! checks that no container is left behind.

use std::time::Duration;

use claudecluster_integration_tests::docker::{
    DockerProxy, agent_image, assert_agent_containers_removed, assert_containers_removed,
    assert_networks_removed, containers_with_label, docker, inspect, network_holders,
};
use claudecluster_integration_tests::*;
use claudecluster_proto::v1::event::Kind;
use claudecluster_proto::v1::*;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

fn container_worker() -> WorkerSpec {
    WorkerSpec::in_mode(Mode::Container)
}

/// Waits until the worker has removed every agent container and network it made (it keeps
/// the holders of its agents' network namespaces while it runs).
async fn nothing_left(worker_id: &str) {
    let label = format!("claudecluster.worker={worker_id}");
    assert_agent_containers_removed(&label).await;
    assert_networks_removed(&label).await;
}

/// Stops the cluster's first worker and checks that it took everything with it. A test whose
/// worker reaches Docker through a [`DockerProxy`] calls it before the proxy goes away:
/// without Docker the worker could not clean up.
async fn stop_worker_leaving_nothing(cluster: &mut TestCluster) {
    let label = format!("claudecluster.worker={}", cluster.worker_ids[0]);
    cluster.workers[0].signal(libc::SIGTERM);
    cluster.workers[0]
        .wait_exit(Duration::from_secs(60))
        .await
        .expect("the worker exits after SIGTERM");
    assert_containers_removed(&label).await;
    assert_networks_removed(&label).await;
    let socket = cluster
        .workspaces(&cluster.worker_ids[0])
        .join(".agent-proxy/proxy.sock");
    assert!(!socket.exists(), "{} outlived the worker", socket.display());
}

async fn task_container(task_id: &str) -> String {
    let ids = containers_with_label(&format!("claudecluster.task={task_id}")).await;
    assert_eq!(ids.len(), 1, "one container per task: {ids:?}");
    ids[0].clone()
}

#[tokio::test]
async fn a_running_container_has_the_user_limits_capabilities_labels_and_network_it_was_given() {
    let cluster = TestCluster::start(vec![container_worker()]).await;
    let worker_id = cluster.worker_ids[0].clone();
    let spec = TaskSpec {
        limits: Some(ResourceLimits {
            memory_bytes: 768 << 20,
            cpus: 0.5,
            pids: 200,
            ..Default::default()
        }),
        ..prompt("HANG")
    };
    let task = cluster.submit(spec).await;
    cluster.wait_for_agent(&task.task_id).await;
    let id = task_container(&task.task_id).await;
    let container = inspect(&id).await;

    assert_eq!(container["Config"]["User"], "1000:1000");
    assert_eq!(container["Config"]["WorkingDir"], "/workspace");
    assert_eq!(container["Config"]["Image"], agent_image());
    let host = &container["HostConfig"];
    assert_eq!(host["Memory"], 768i64 << 20);
    assert_eq!(host["MemorySwap"], 768i64 << 20, "no swap beyond the limit");
    assert_eq!(host["NanoCpus"], 500_000_000i64);
    assert_eq!(host["PidsLimit"], 200);
    assert_eq!(host["CapDrop"], serde_json::json!(["ALL"]));
    assert_eq!(
        host["SecurityOpt"],
        serde_json::json!(["no-new-privileges"])
    );
    // egress: proxy-only (the default): no network at all; the proxy comes in as a socket,
    // read-only.
    let network = "none";
    assert_eq!(host["NetworkMode"], network);
    assert_eq!(host["ReadonlyRootfs"], true);
    assert!(host["Tmpfs"].get("/tmp").is_some(), "{}", host["Tmpfs"]);
    let workspace = cluster.workspaces(&worker_id).join(&task.task_id);
    let proxy_socket_dir = cluster.workspaces(&worker_id).join(".agent-proxy");
    assert_eq!(
        host["Binds"],
        serde_json::json!([
            format!("{}:/workspace:rw", workspace.display()),
            format!("{}:/run/claudecluster:ro", proxy_socket_dir.display()),
        ])
    );
    let labels = &container["Config"]["Labels"];
    assert_eq!(labels["claudecluster.task"], task.task_id.as_str());
    assert_eq!(labels["claudecluster.worker"], worker_id.as_str());
    assert_eq!(labels["claudecluster.attempt"], "1");
    // The agent got its API key, but nothing Docker shows about the container holds it.
    wait_until(Duration::from_secs(10), || async {
        cluster
            .api
            .requests()
            .iter()
            .any(|r| r.api_key.as_deref() == Some("sk-ant-standin-secret"))
    })
    .await
    .expect("the agent calls the API with the worker's key");
    assert!(
        !container.to_string().contains("sk-ant-standin-secret"),
        "the key is visible in docker inspect"
    );

    let running = cluster.task(&task.task_id).await;
    assert!(
        running.status_reason.contains(&format!(
            "container claudecluster-{}-1 on network {network}",
            task.task_id
        )),
        "{}",
        running.status_reason
    );
    cluster.cancel(&task.task_id).await;
    let (ended, events) = cluster.finish(&task.task_id).await;
    assert_eq!(ended.status(), TaskStatus::Cancelled);
    // Nothing the cluster recorded holds the key either.
    assert!(!format!("{events:?}").contains("sk-ant-standin-secret"));
    nothing_left(&worker_id).await;
}

/// With `egress: proxy-only` (the default), agent containers join network namespaces the
/// worker keeps: one is made after the first agent, sealed like an agent and with no network;
/// a holder that died is dropped and the agent gets a namespace of its own; one agent at a
/// time uses a namespace, so a second at once gets its own and another is kept; stopping the
/// worker removes them.
#[tokio::test]
async fn agents_reuse_kept_network_namespaces_one_at_a_time_and_they_go_with_the_worker() {
    let mut cluster = TestCluster::start(vec![container_worker()]).await;
    let worker_id = cluster.worker_ids[0].clone();
    let holders = || network_holders(&worker_id);
    // A holder is kept for agents once it runs (made and then started).
    let running_holders = || async {
        let mut running = Vec::new();
        for name in holders().await {
            if inspect(&name).await["State"]["Running"] == true {
                running.push(name);
            }
        }
        running
    };
    cluster.completed_text(prompt("hello")).await;
    wait_until(Duration::from_secs(30), || async {
        running_holders().await.len() == 1
    })
    .await
    .expect("a holder is made after the first agent");
    let dead = running_holders().await.remove(0);
    let holder = inspect(&dead).await;
    assert_eq!(holder["HostConfig"]["NetworkMode"], "none");
    assert_eq!(holder["HostConfig"]["ReadonlyRootfs"], true);
    assert_eq!(holder["HostConfig"]["CapDrop"], serde_json::json!(["ALL"]));
    assert_eq!(holder["Config"]["User"], "1000:1000");
    assert_eq!(holder["State"]["Running"], true);

    // Killed from outside: the next agent runs all the same, and the holder is dropped.
    docker(&["kill", &dead]).await;
    cluster.completed_text(prompt("hello")).await;
    wait_until(Duration::from_secs(30), || async {
        holders().await.len() == 1 && running_holders().await.iter().any(|name| *name != dead)
    })
    .await
    .expect("the dead holder is removed and a new one made");
    let kept = holders().await.remove(0);
    let kept_id = inspect(&kept).await["Id"].as_str().unwrap().to_owned();

    let joining = cluster.submit(prompt("HANG")).await;
    cluster.wait_for_agent(&joining.task_id).await;
    let container = inspect(&task_container(&joining.task_id).await).await;
    assert_eq!(
        container["HostConfig"]["NetworkMode"],
        format!("container:{kept_id}").as_str()
    );
    let running = cluster.task(&joining.task_id).await;
    assert!(
        running
            .status_reason
            .ends_with(&format!("in the namespace of {kept}")),
        "{}",
        running.status_reason
    );
    let beside = cluster.submit(prompt("HANG")).await;
    cluster.wait_for_agent(&beside.task_id).await;
    let container = inspect(&task_container(&beside.task_id).await).await;
    assert_eq!(
        container["HostConfig"]["NetworkMode"], "none",
        "one agent a namespace"
    );
    let made = wait_until(Duration::from_secs(30), || async {
        holders().await.len() == 2
    })
    .await;
    if made.is_err() {
        let containers = docker(&[
            "ps",
            "-a",
            "--filter",
            &format!("label=claudecluster.worker={worker_id}"),
            "--format",
            "{{.Names}} {{.Status}} {{.Labels}}",
        ])
        .await;
        panic!(
            "a second holder is made for two agents at once; the worker's containers:\n{containers}"
        );
    }
    for task in [&joining, &beside] {
        cluster.cancel(&task.task_id).await;
        cluster.finish(&task.task_id).await;
    }
    nothing_left(&worker_id).await;
    assert_eq!(holders().await.len(), 2, "both kept for the next agents");
    stop_worker_leaving_nothing(&mut cluster).await;
}

/// A kept namespace that stopped is removed at the next look, before its idle timeout; one no
/// agent used for `container.namespaceIdleTimeout` is removed; the worker makes them again
/// when agents come.
#[tokio::test]
async fn kept_namespaces_go_when_they_stop_or_stay_unused() {
    let worker = WorkerSpec {
        container_yaml: "  namespaceIdleTimeout: 8\n".into(),
        ..container_worker()
    };
    let mut cluster = TestCluster::start(vec![worker]).await;
    let worker_id = cluster.worker_ids[0].clone();
    let holders = || network_holders(&worker_id);
    cluster.completed_text(prompt("hello")).await;
    wait_until(Duration::from_secs(30), || async {
        holders().await.len() == 1
    })
    .await
    .expect("a holder is made after the first agent");
    let stopped = holders().await.remove(0);
    docker(&["kill", &stopped]).await;
    wait_until(Duration::from_secs(30), || async {
        holders().await.is_empty()
    })
    .await
    .expect("the stopped holder is removed");
    assert!(
        cluster.workers[0].log().contains(&format!(
            "removing a network holder that had stopped holder={stopped}"
        )),
        "{}",
        cluster.workers[0].log()
    );

    cluster.completed_text(prompt("hello")).await;
    wait_until(Duration::from_secs(30), || async {
        holders().await.len() == 1
    })
    .await
    .expect("a holder is made again");
    wait_until(Duration::from_secs(30), || async {
        holders().await.is_empty()
    })
    .await
    .expect("a holder no agent used for its idle timeout is removed");
    cluster.completed_text(prompt("hello")).await;
    stop_worker_leaving_nothing(&mut cluster).await;
}

#[tokio::test]
async fn a_per_task_network_is_made_for_the_task_and_removed_with_it() {
    let worker = WorkerSpec {
        network: "per_task".to_owned(),
        container_yaml: "  egress: open\n".into(),
        ..container_worker()
    };
    let cluster = TestCluster::start(vec![worker]).await;
    let worker_id = cluster.worker_ids[0].clone();
    let task = cluster.submit(prompt("hello")).await;
    let (ended, events) = cluster.finish(&task.task_id).await;
    // Alone on its own network, the agent still reaches the API: through the worker's proxy,
    // at the host's gateway.
    assert_eq!(
        ended.status(),
        TaskStatus::Completed,
        "{}",
        ended.status_reason
    );
    let running = events
        .iter()
        .find_map(|e| match &e.kind {
            Some(Kind::StatusChange(c)) if c.status() == TaskStatus::Running => {
                Some(c.reason.clone())
            }
            _ => None,
        })
        .expect("the agent started");
    let network = format!("claudecluster-{}-1-net", task.task_id);
    assert!(
        running.ends_with(&format!("on network {network}")),
        "{running}"
    );
    nothing_left(&worker_id).await;
    assert_networks_removed(&format!("claudecluster.worker={worker_id}")).await;
}

#[tokio::test]
async fn tasks_that_ask_for_a_mode_land_on_a_worker_of_that_mode() {
    let cluster = TestCluster::start(vec![WorkerSpec::default(), container_worker()]).await;
    let (process_worker, container_worker) =
        (cluster.worker_ids[0].clone(), cluster.worker_ids[1].clone());
    for (mode, worker, runs_in) in [
        (ExecutionMode::ProcessPool, &process_worker, "process"),
        (
            ExecutionMode::ContainerAgentic,
            &container_worker,
            "container",
        ),
        (
            ExecutionMode::ContainerAgentic,
            &container_worker,
            "container",
        ),
        (ExecutionMode::ProcessPool, &process_worker, "process"),
    ] {
        let spec = TaskSpec {
            execution_mode: mode as i32,
            ..prompt("which mode")
        };
        let task = cluster.submit(spec).await;
        let (ended, _) = cluster.finish(&task.task_id).await;
        assert_eq!(
            ended.status(),
            TaskStatus::Completed,
            "{}",
            ended.status_reason
        );
        assert_eq!(&ended.worker_id, worker, "{mode:?}");
        assert!(ended.status_reason.is_empty());
        let running = cluster.finish(&task.task_id).await.1;
        assert!(
            format!("{running:?}").contains(&format!(": {runs_in} ")),
            "{mode:?}"
        );
    }
    let status = cluster
        .driver()
        .await
        .get_cluster_status(GetClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let modes: Vec<Vec<i32>> = status
        .workers
        .iter()
        .map(|w| w.execution_modes.clone())
        .collect();
    assert!(modes.contains(&vec![ExecutionMode::ProcessPool as i32]));
    assert!(modes.contains(&vec![ExecutionMode::ContainerAgentic as i32]));
    nothing_left(&container_worker).await;
}

#[tokio::test]
async fn a_task_for_a_mode_no_worker_runs_waits_and_says_why() {
    let cluster = TestCluster::start(vec![WorkerSpec::default()]).await;
    let spec = TaskSpec {
        execution_mode: ExecutionMode::ContainerAgentic as i32,
        ..prompt("in a container")
    };
    let task = cluster.submit(spec).await;
    let waiting = cluster.task(&task.task_id).await;
    assert_eq!(waiting.status(), TaskStatus::Pending);
    assert_eq!(
        waiting.status_reason,
        "waiting for a container_agentic worker: none is registered"
    );
}

#[tokio::test]
async fn warm_agents_take_the_tasks_they_fit_in_both_modes() {
    for mode in [Mode::ProcessPool, Mode::Container] {
        let worker = WorkerSpec {
            warm_pool_size: 1,
            ..WorkerSpec::in_mode(mode)
        };
        let cluster = TestCluster::start(vec![worker]).await;
        let mut driver = cluster.driver().await;
        let warm_ready = |driver: Driver| async move {
            let mut driver = driver;
            driver
                .get_cluster_status(GetClusterStatusRequest {})
                .await
                .unwrap()
                .into_inner()
                .workers[0]
                .idle_warm_agents
                == 1
        };
        wait_until(Duration::from_secs(30), || warm_ready(driver.clone()))
            .await
            .expect("a warm agent is ready");
        let task = cluster
            .submit(with_tools("WRITE warm.txt from a warm agent", &[]))
            .await;
        let (ended, _) = cluster.finish(&task.task_id).await;
        assert_eq!(
            ended.status(),
            TaskStatus::Completed,
            "{mode:?}: {}",
            ended.status_reason
        );
        let events = cluster.finish(&task.task_id).await.1;
        let running = format!("{events:?}");
        assert!(
            running.contains("warm agent handed out in"),
            "{mode:?}: {running}"
        );
        // The warm agent had no permission to write: the denial shows it ran with the
        // worker's default options, which is what makes the task fit.
        assert!(
            events
                .iter()
                .any(|e| matches!(&e.kind, Some(Kind::PermissionDenied(_)))),
            "{mode:?}"
        );
        // The pool refills, and a task whose options differ starts an agent of its own.
        wait_until(Duration::from_secs(30), || warm_ready(driver.clone()))
            .await
            .expect("the pool refills");
        let cold = cluster
            .submit(with_tools("WRITE cold.txt from a new agent", &["Write"]))
            .await;
        let (ended, events) = cluster.finish(&cold.task_id).await;
        assert_eq!(
            ended.status(),
            TaskStatus::Completed,
            "{mode:?}: {}",
            ended.status_reason
        );
        assert!(
            format!("{events:?}").contains("agent started in"),
            "{mode:?}"
        );
        assert!(
            std::path::Path::new(&ended.workspace)
                .join("cold.txt")
                .exists(),
            "{mode:?}"
        );
        let _ = &mut driver;
        drop(cluster);
    }
}

#[tokio::test]
async fn an_image_that_does_not_exist_fails_the_task_and_names_the_setting() {
    let worker = WorkerSpec {
        image: Some("claudecluster/no-such-image:0".to_owned()),
        ..container_worker()
    };
    let cluster = TestCluster::start(vec![worker]).await;
    let task = cluster.submit(prompt("hello")).await;
    let (ended, _) = cluster.finish(&task.task_id).await;
    assert_eq!(ended.status(), TaskStatus::Failed);
    assert!(
        ended.status_reason.starts_with("the agent image `claudecluster/no-such-image:0` does not exist (`worker.container.image`)"),
        "{}",
        ended.status_reason
    );
    nothing_left(&cluster.worker_ids[0]).await;
}

/// An agent image of the user's own without socat: with `egress: proxy-only` its agents cannot
/// reach the proxy, and the task fails saying what the image lacks.
#[tokio::test]
async fn an_image_without_socat_fails_proxy_only_tasks_saying_so() {
    let image = format!("claudecluster/agent-without-socat:{}", uuid_like());
    let dockerfile = format!(
        "FROM {}\nUSER root\nRUN rm /usr/bin/socat\nUSER agent\n",
        agent_image()
    );
    let mut build = tokio::process::Command::new("docker")
        .args(["build", "-q", "-t", &image, "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("the docker CLI is installed (scripts/setup.sh)");
    use tokio::io::AsyncWriteExt;
    let mut stdin = build.stdin.take().unwrap();
    stdin.write_all(dockerfile.as_bytes()).await.unwrap();
    drop(stdin);
    assert!(
        build.wait().await.unwrap().success(),
        "docker build {image}"
    );

    let worker = WorkerSpec {
        image: Some(image.clone()),
        ..container_worker()
    };
    let mut cluster = TestCluster::start(vec![worker]).await;
    let task = cluster.submit(prompt("hello")).await;
    let (ended, _) = cluster.finish(&task.task_id).await;
    assert_eq!(ended.status(), TaskStatus::Failed);
    assert!(
        ended.status_reason.contains(
            "the agent image has no socat, which egress: proxy-only needs to reach the worker's credential proxy"
        ),
        "{}",
        ended.status_reason
    );
    nothing_left(&cluster.worker_ids[0]).await;
    // Its network holders run the image too.
    stop_worker_leaving_nothing(&mut cluster).await;
    docker(&["rmi", &image]).await;
}

/// A workspace root too long for a Unix socket's path (108 bytes): the worker runs, says why
/// its proxy has no socket, and a proxy-only task fails naming it.
#[tokio::test]
async fn a_worker_without_its_proxy_socket_fails_proxy_only_tasks_saying_why() {
    let mut cluster = TestCluster::start(vec![]).await;
    let worker_id = format!("w-{}", "long".repeat(25));
    cluster
        .add_worker_named(&worker_id, container_worker())
        .await;
    cluster.wait_for_healthy_workers(1).await;
    let task = cluster.submit(prompt("hello")).await;
    let (ended, _) = cluster.finish(&task.task_id).await;
    assert_eq!(ended.status(), TaskStatus::Failed);
    let socket = cluster
        .workspaces(&worker_id)
        .join(".agent-proxy/proxy.sock");
    assert!(
        ended.status_reason.contains(&format!(
            "the worker's credential proxy has no socket at {} for agent containers with `worker.container.egress: proxy-only`",
            socket.display()
        )),
        "{}",
        ended.status_reason
    );
    let log = cluster.workers[0].log();
    assert!(
        log.contains("cannot listen on") && log.contains("for agent containers"),
        "the worker's log says why: {log}"
    );
    nothing_left(&worker_id).await;
}

#[tokio::test]
async fn a_limit_docker_rejects_fails_the_task_with_dockers_reason() {
    // Within what the worker admits, past the cores of any host: Docker refuses it.
    let worker = WorkerSpec {
        extra_yaml: "maxTaskLimits:\n  cpu: 1024\n".into(),
        ..container_worker()
    };
    let cluster = TestCluster::start(vec![worker]).await;
    let spec = TaskSpec {
        limits: Some(ResourceLimits {
            cpus: 512.0,
            ..Default::default()
        }),
        ..prompt("hello")
    };
    let task = cluster.submit(spec).await;
    let (ended, _) = cluster.finish(&task.task_id).await;
    assert_eq!(ended.status(), TaskStatus::Failed);
    assert!(
        ended
            .status_reason
            .starts_with("Docker refused the agent's container: "),
        "{}",
        ended.status_reason
    );
    assert!(
        ended.status_reason.contains("CPU"),
        "{}",
        ended.status_reason
    );
    nothing_left(&cluster.worker_ids[0]).await;
}

#[tokio::test]
async fn an_agent_out_of_memory_fails_and_says_so() {
    let cluster = TestCluster::start(vec![container_worker()]).await;
    let spec = TaskSpec {
        limits: Some(ResourceLimits {
            memory_bytes: 24 << 20,
            ..Default::default()
        }),
        ..prompt("hello")
    };
    let task = cluster.submit(spec).await;
    let (ended, _) = cluster.finish(&task.task_id).await;
    assert_eq!(ended.status(), TaskStatus::Failed);
    assert!(
        ended.status_reason.contains("exited 137"),
        "{}",
        ended.status_reason
    );
    assert!(
        ended
            .status_reason
            .contains("out of memory (the container's limit is 24 MiB)"),
        "{}",
        ended.status_reason
    );
    nothing_left(&cluster.worker_ids[0]).await;
}

#[tokio::test]
async fn a_container_killed_from_outside_fails_the_task_and_says_so() {
    let cluster = TestCluster::start(vec![container_worker()]).await;
    let task = cluster.submit(prompt("HANG")).await;
    cluster.wait_for_agent(&task.task_id).await;
    docker(&["kill", &task_container(&task.task_id).await]).await;
    let (ended, _) = cluster.finish(&task.task_id).await;
    assert_eq!(ended.status(), TaskStatus::Failed);
    assert!(
        ended.status_reason.contains("exited 137"),
        "{}",
        ended.status_reason
    );
    assert!(
        ended
            .status_reason
            .contains("killed from outside the worker"),
        "{}",
        ended.status_reason
    );
    nothing_left(&cluster.worker_ids[0]).await;
}

async fn worker_health(address: &str) -> i32 {
    let mut client = HealthClient::new(claudecluster_grpc::channel(address).unwrap());
    let request = HealthCheckRequest {
        service: "claudecluster.v1.WorkerService".into(),
    };
    client.check(request).await.unwrap().into_inner().status
}

const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;

#[tokio::test]
async fn without_docker_a_container_worker_is_unhealthy_and_gets_no_work_until_docker_returns() {
    let scratch = tempfile::tempdir().unwrap();
    let proxy = DockerProxy::start(scratch.path());
    let worker = WorkerSpec {
        docker_socket: Some(proxy.path().to_path_buf()),
        ..container_worker()
    };
    let mut cluster = TestCluster::start(vec![worker]).await;
    let worker_address = cluster.workers[0].address.clone();
    assert_eq!(worker_health(&worker_address).await, SERVING);

    proxy.cut();
    let driver = cluster.driver().await;
    wait_until(Duration::from_secs(15), || {
        let mut driver = driver.clone();
        async move {
            let status = driver
                .get_cluster_status(GetClusterStatusRequest {})
                .await
                .unwrap()
                .into_inner();
            !status.workers[0].healthy
                && status.workers[0]
                    .health_reason
                    .starts_with("Docker is not reachable at")
        }
    })
    .await
    .expect("the worker reports Docker gone");
    assert_eq!(worker_health(&worker_address).await, NOT_SERVING);
    let task = cluster.submit(prompt("while Docker is away")).await;
    let waiting = cluster.task(&task.task_id).await;
    assert_eq!(waiting.status(), TaskStatus::Pending);
    assert_eq!(
        waiting.status_reason,
        "waiting for a worker: none is healthy"
    );

    proxy.restore();
    let (ended, _) = cluster.finish(&task.task_id).await;
    assert_eq!(
        ended.status(),
        TaskStatus::Completed,
        "{}",
        ended.status_reason
    );
    assert_eq!(worker_health(&worker_address).await, SERVING);
    nothing_left(&cluster.worker_ids[0]).await;
    stop_worker_leaving_nothing(&mut cluster).await;
}

/// A container worker reaching Docker through a proxy, whose task failed when the proxy was
/// cut mid-task: the task's container still runs in the real daemon. The directory holds the
/// proxy's socket; the proxy stays cut.
async fn docker_cut_mid_task() -> (tempfile::TempDir, DockerProxy, TestCluster, Task) {
    let scratch = tempfile::tempdir().unwrap();
    let proxy = DockerProxy::start(scratch.path());
    // A network of the task's own, which Docker cannot remove while the container is on it.
    let worker = WorkerSpec {
        docker_socket: Some(proxy.path().to_path_buf()),
        network: "per_task".into(),
        container_yaml: "  egress: open\n".into(),
        ..container_worker()
    };
    let cluster = TestCluster::start(vec![worker]).await;
    let task = cluster.submit(prompt("HANG")).await;
    cluster.wait_for_agent(&task.task_id).await;
    proxy.cut();
    let (ended, _) = cluster.finish(&task.task_id).await;
    assert_eq!(ended.status(), TaskStatus::Failed);
    (scratch, proxy, cluster, ended)
}

#[tokio::test]
async fn docker_going_away_mid_task_fails_it_and_the_container_is_removed_when_docker_returns() {
    let (_scratch, proxy, mut cluster, task) = docker_cut_mid_task().await;
    assert!(
        task.status_reason.contains("lost the Docker daemon"),
        "{}",
        task.status_reason
    );
    // The container still runs in the real daemon; once the worker can reach Docker again it
    // removes it.
    assert_eq!(
        containers_with_label(&format!("claudecluster.task={}", task.task_id))
            .await
            .len(),
        1
    );
    proxy.restore();
    let label = format!("claudecluster.task={}", task.task_id);
    wait_until(Duration::from_secs(15), || {
        let label = label.clone();
        async move { containers_with_label(&label).await.is_empty() }
    })
    .await
    .expect("the worker removes the container once Docker is back");
    // And the task's own network, which Docker could not remove while the container was on it.
    assert_networks_removed(&format!("claudecluster.worker={}", cluster.worker_ids[0])).await;
    stop_worker_leaving_nothing(&mut cluster).await;
}

#[tokio::test]
async fn a_worker_stopped_just_after_docker_returns_leaves_nothing_behind() {
    let (_scratch, proxy, mut cluster, task) = docker_cut_mid_task().await;
    let label = format!("claudecluster.worker={}", cluster.worker_ids[0]);
    let networks = || {
        let filter = format!("label={label}");
        async move {
            let listed = docker(&["network", "ls", "-q", "--filter", &filter]).await;
            listed.lines().count()
        }
    };
    assert_eq!(
        containers_with_label(&label).await.len(),
        1,
        "still running"
    );
    let own = format!("claudecluster-{}-1-net", task.task_id);
    let named = format!("name=^{own}$");
    assert_eq!(
        docker(&["network", "ls", "-q", "--filter", &named])
            .await
            .lines()
            .count(),
        1,
        "the task's network is still there"
    );
    // Stopped before its next health check could remove them: its shutdown does.
    proxy.restore();
    cluster.workers[0].signal(libc::SIGTERM);
    cluster.workers[0]
        .wait_exit(Duration::from_secs(60))
        .await
        .expect("the worker exits after SIGTERM");
    assert_eq!(containers_with_label(&label).await, Vec::<String>::new());
    assert_eq!(networks().await, 0, "the task's network is removed");
}

#[tokio::test]
async fn a_worker_removes_the_containers_its_previous_run_left() {
    let mut cluster = TestCluster::start(vec![]).await;
    let worker_id = format!("restarted-{}", &uuid_like());
    let left = docker(&[
        "create",
        "--label",
        "claudecluster.managed=true",
        "--label",
        &format!("claudecluster.worker={worker_id}"),
        &agent_image(),
        "true",
    ])
    .await;
    assert_eq!(
        containers_with_label(&format!("claudecluster.worker={worker_id}")).await,
        vec![left.trim()[..12].to_owned()]
    );
    cluster
        .add_worker_named(&worker_id, container_worker())
        .await;
    nothing_left(&worker_id).await;
}

fn uuid_like() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// Fills the cluster's one worker of capacity 3 with tasks that hang, and queues two more
/// behind them: the tasks that run, and the ones that wait for a slot.
async fn fill_and_queue(cluster: &TestCluster) -> (Vec<String>, Vec<String>) {
    let mut running = Vec::new();
    for _ in 0..3 {
        let task = cluster.submit(prompt("HANG")).await;
        cluster.wait_for_agent(&task.task_id).await;
        running.push(task.task_id);
    }
    let mut queued = Vec::new();
    for index in 0..2 {
        let task = cluster.submit(prompt(&format!("queued {index}"))).await;
        queued.push(task.task_id);
    }
    (running, queued)
}

#[tokio::test]
async fn docker_going_away_under_load_fails_or_reruns_every_task_and_leaves_no_container() {
    let scratch = tempfile::tempdir().unwrap();
    let proxy = DockerProxy::start(scratch.path());
    let worker = WorkerSpec {
        capacity: 3,
        docker_socket: Some(proxy.path().to_path_buf()),
        ..container_worker()
    };
    let mut cluster = TestCluster::start(vec![worker]).await;
    let (running, queued) = fill_and_queue(&cluster).await;

    proxy.cut();
    for task_id in &running {
        let (ended, _) = cluster.finish(task_id).await;
        let failed_with_reason = ended.status() == TaskStatus::Failed
            && ended.status_reason.contains("lost the Docker daemon");
        assert!(
            failed_with_reason || ended.status() == TaskStatus::Completed,
            "{task_id}: {:?} {}",
            ended.status(),
            ended.status_reason
        );
    }
    proxy.restore();
    for task_id in &queued {
        let (ended, _) = cluster.finish(task_id).await;
        assert_eq!(
            ended.status(),
            TaskStatus::Completed,
            "{}",
            ended.status_reason
        );
    }
    let label = format!("claudecluster.worker={}", cluster.worker_ids[0]);
    assert_agent_containers_removed(&label).await;
    assert_networks_removed(&label).await;
    stop_worker_leaving_nothing(&mut cluster).await;
}

#[tokio::test]
async fn dockerd_stopped_and_started_under_load_fails_or_reruns_every_task_and_leaves_no_container()
{
    let mut daemon = claudecluster_integration_tests::docker::TestDockerd::start().await;
    let worker = WorkerSpec {
        capacity: 3,
        docker_socket: Some(daemon.socket()),
        ..container_worker()
    };
    let mut cluster = TestCluster::start(vec![worker]).await;
    let (running, queued) = fill_and_queue(&cluster).await;

    daemon.stop();
    for task_id in &running {
        let (ended, _) = cluster.finish(task_id).await;
        assert_eq!(ended.status(), TaskStatus::Failed, "{task_id}");
        assert!(
            ended.status_reason.contains("Docker") || ended.status_reason.contains("exited"),
            "{task_id} failed with a reason: {}",
            ended.status_reason
        );
    }
    daemon.resume().await;
    for task_id in &queued {
        let (ended, _) = cluster.finish(task_id).await;
        assert_eq!(
            ended.status(),
            TaskStatus::Completed,
            "{}",
            ended.status_reason
        );
    }
    let label = format!("label=claudecluster.worker={}", cluster.worker_ids[0]);
    wait_until(Duration::from_secs(30), || {
        let daemon = &daemon;
        let label = label.clone();
        async move {
            daemon
                .docker(&[
                    "ps",
                    "-aq",
                    "--filter",
                    &label,
                    "--filter",
                    "label=claudecluster.task",
                ])
                .await
                .trim()
                .is_empty()
        }
    })
    .await
    .expect("no agent container is left once the daemon is back");
    // Stopped while its daemon runs, the worker leaves nothing on it: the holders of network
    // namespaces that the daemon's restart stopped included.
    cluster.workers[0].signal(libc::SIGTERM);
    cluster.workers[0]
        .wait_exit(Duration::from_secs(60))
        .await
        .expect("the worker exits after SIGTERM");
    let containers = daemon.docker(&["ps", "-aq", "--filter", &label]).await;
    assert_eq!(containers.trim(), "", "containers left on the daemon");
    let networks = daemon
        .docker(&["network", "ls", "-q", "--filter", &label])
        .await;
    assert_eq!(networks.trim(), "", "networks left on the daemon");
}

#[tokio::test]
async fn a_container_agent_writes_only_to_its_workspace_and_scratch_space() {
    let cluster = TestCluster::start(vec![container_worker()]).await;
    let task = cluster
        .submit(with_tools(
            "BASH touch /home/agent/planted 2>&1 | sed 's/.*: //'; touch /workspace/made /tmp/scratch && echo ok",
            &["Bash"],
        ))
        .await;
    let (ended, _) = cluster.finish(&task.task_id).await;
    assert_eq!(
        ended.status(),
        TaskStatus::Completed,
        "{}",
        ended.status_reason
    );
    assert_eq!(
        ended.result.unwrap().text,
        "MOCK_DONE Read-only file system"
    );
    let workspace = ended.workspace;
    assert!(
        std::path::Path::new(&workspace).join("made").exists(),
        "the workspace is writable: {workspace}"
    );
    nothing_left(&cluster.worker_ids[0]).await;
}
