//! The driver's store under faults, with real processes: a PostgreSQL that goes away and
//! comes back, stores that cannot be opened, and a driver restarted on PostgreSQL.

use std::time::Duration;

use claudecluster_integration_tests::postgres::TestPostgres;
use claudecluster_integration_tests::*;
use claudecluster_proto::v1::event::Kind;
use claudecluster_proto::v1::*;

/// A task whose agent waits in a Bash tool call until `gate` exists.
fn waiting_task(gate: &std::path::Path) -> TaskSpec {
    with_tools(
        &format!(
            "BASH while [ ! -e {} ]; do sleep 0.05; done; echo released",
            gate.display()
        ),
        &["Bash"],
    )
}

async fn wait_for_tool_call(cluster: &TestCluster, task_id: &str) {
    let mut stream = cluster
        .driver()
        .await
        .stream_task_events(StreamTaskEventsRequest {
            task_id: task_id.to_owned(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(response) = stream.message().await.unwrap() {
        if matches!(response.event.and_then(|e| e.kind), Some(Kind::ToolUse(_))) {
            return;
        }
    }
    panic!("task {task_id} ended before its tool call");
}

/// A cluster whose driver keeps its store in `postgres`, running one task whose agent waits in
/// its tool call for the returned gate file.
async fn cluster_with_a_waiting_task(
    postgres: &TestPostgres,
) -> (TestCluster, std::path::PathBuf, String) {
    let cluster = TestCluster::start_with_driver(
        &format!("store:\n  url: {}\n", postgres.url()),
        vec![WorkerSpec::default()],
    )
    .await;
    let gate = cluster.dir.path().join("gate");
    let task_id = cluster.submit(waiting_task(&gate)).await.task_id;
    wait_for_tool_call(&cluster, &task_id).await;
    (cluster, gate, task_id)
}

#[tokio::test]
async fn a_database_that_goes_away_makes_writes_unavailable_and_loses_nothing_acknowledged() {
    let postgres = TestPostgres::start();
    let (mut cluster, gate, running) = cluster_with_a_waiting_task(&postgres).await;

    postgres.stop();
    let mut driver = cluster.driver().await;
    let refused = tokio::time::timeout(
        Duration::from_secs(30),
        driver.submit_task(SubmitTaskRequest {
            spec: Some(prompt("submitted while the database is away")),
        }),
    )
    .await
    .expect("the submit was answered")
    .expect_err("the submit cannot be stored");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("store"),
        "the error says what failed: {}",
        refused.message()
    );
    assert!(
        !refused.message().contains(&postgres.url()),
        "no URL in errors"
    );
    // What is live is still served from memory.
    assert_eq!(cluster.task(&running).await.status(), TaskStatus::Running);

    postgres.resume();
    std::fs::write(&gate, "").unwrap();
    let (task, events) = cluster.finish(&running).await;
    assert_eq!(
        task.status(),
        TaskStatus::Completed,
        "{}",
        task.status_reason
    );
    let after = cluster.submit(prompt("after the database came back")).await;
    let (after, _) = cluster.finish(&after.task_id).await;
    assert_eq!(
        after.status(),
        TaskStatus::Completed,
        "{}",
        after.status_reason
    );

    // Everything acknowledged is in the database: a new driver on it has it all, and nothing
    // of the refused submit.
    cluster.driver.kill().await;
    cluster.driver.restart().await;
    let mut driver = cluster.driver().await;
    let stored = collect_events(&mut driver, &running, 0).await;
    assert_eq!(stored.len(), events.len());
    assert_eq!(
        stored.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        (1..=events.len() as u64).collect::<Vec<_>>()
    );
    let all = driver
        .list_tasks(ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tasks;
    let prompts: Vec<String> = all
        .iter()
        .map(|t| t.spec.as_ref().unwrap().prompt.clone())
        .collect();
    assert_eq!(all.len(), 2, "{prompts:?}");
    assert!(
        !prompts
            .iter()
            .any(|p| p.contains("while the database is away"))
    );
}

/// Runs `claudecluster driver` on `config` until it exits; its exit code and stderr.
async fn driver_that_cannot_start(config: &std::path::Path) -> (Option<i32>, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(claudecluster_bin())
            .arg("driver")
            .arg("--config")
            .arg(config)
            .env("CLAUDECLUSTER_DRIVER__HTTP__LISTEN", "127.0.0.1:0")
            .output(),
    )
    .await
    .expect("the driver gave up within 60 s")
    .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_store_that_cannot_be_opened_stops_the_driver_naming_it_without_its_password() {
    let dir = tempfile::tempdir().unwrap();
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("postgres.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:0\nstore:\n  url: postgres://app:s3cret-password@127.0.0.1:{closed_port}/cluster\n"
        ),
    )
    .unwrap();
    let (code, stderr) = driver_that_cannot_start(&config).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot open the store at postgres://app:***@127.0.0.1:{closed_port}/cluster"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("driver.store.url"), "{stderr}");
    assert!(!stderr.contains("s3cret-password"), "{stderr}");

    // A data directory that is a file.
    let blocked = dir.path().join("not-a-directory");
    std::fs::write(&blocked, "").unwrap();
    let config = dir.path().join("sqlite.yaml");
    std::fs::write(
        &config,
        format!("listen: 127.0.0.1:0\ndataDir: {}\n", blocked.display()),
    )
    .unwrap();
    let (code, stderr) = driver_that_cannot_start(&config).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot open the store at {}/driver.db",
            blocked.display()
        )),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_driver_on_postgresql_restarted_mid_task_attaches_again() {
    let postgres = TestPostgres::start();
    let (mut cluster, gate, task_id) = cluster_with_a_waiting_task(&postgres).await;
    cluster.driver.kill().await;
    cluster.driver.restart().await;
    std::fs::write(&gate, "").unwrap();
    let (task, events) = cluster.finish(&task_id).await;
    assert_eq!(
        task.status(),
        TaskStatus::Completed,
        "{}",
        task.status_reason
    );
    assert_eq!(task.attempt, 1);
    assert_eq!(
        events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        (1..=events.len() as u64).collect::<Vec<_>>()
    );
}

/// A request presenting `key`.
fn with_key<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    request
}

#[tokio::test]
async fn a_key_revoked_on_the_leader_stays_revoked_on_the_driver_that_takes_over() {
    let postgres = TestPostgres::start();
    let admin = "cck_admin_of_both_drivers_0123456789";
    let hash = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(admin.as_bytes()))
    };
    let shared = format!(
        "store:\n  url: {}\nauth:\n  apiKeys:\n    - {{id: admin, sha256: {hash}, scopes: [admin]}}\n",
        postgres.url()
    );
    let mut cluster = TestCluster::start_with_env(
        &shared,
        &[("CLAUDECLUSTER_API_KEY", admin)],
        vec![WorkerSpec::default()],
    )
    .await;
    // A second driver on the same database (placing no work: its scheduler is elsewhere).
    let config = cluster.dir.path().join("second-driver.yaml");
    std::fs::write(
        &config,
        format!("listen: 127.0.0.1:0\nschedulerAddress: 127.0.0.1:1\n{shared}"),
    )
    .unwrap();
    let second = ServiceProcess::start("driver", &config, &[]).await;
    let mut first = driver_at(&cluster.driver.address);
    let other = driver_at(&second.address);

    let created = first
        .create_api_key(with_key(
            CreateApiKeyRequest {
                key_id: "ci".into(),
                scopes: vec!["tasks:read".into()],
                quotas: None,
            },
            admin,
        ))
        .await
        .unwrap()
        .into_inner();
    let ci = created.secret;
    let status = |key: &str| {
        let mut other = other.clone();
        let key = key.to_owned();
        async move {
            other
                .get_cluster_status(with_key(GetClusterStatusRequest {}, &key))
                .await
        }
    };
    // The second driver stands by: it answers no key until it leads.
    let waiting = status(&ci).await.unwrap_err();
    assert_eq!(waiting.code(), tonic::Code::Unavailable, "{waiting:?}");
    first
        .revoke_api_key(with_key(
            RevokeApiKeyRequest {
                key_id: "ci".into(),
            },
            admin,
        ))
        .await
        .unwrap();
    // The first driver goes; the second leads, and refuses the key revoked on the first.
    cluster.driver.kill().await;
    let refused = wait_for(Duration::from_secs(15), || {
        let status = status(&ci);
        async move {
            match status.await {
                Err(refused) if refused.code() == tonic::Code::Unauthenticated => Some(refused),
                _ => None,
            }
        }
    })
    .await
    .expect("the driver that took over refuses the revoked key");
    assert!(
        refused.message().contains("revoked"),
        "{}",
        refused.message()
    );
    // The admin's key works on it, and it shows the key as revoked.
    let keys = other
        .clone()
        .list_api_keys(with_key(ListApiKeysRequest {}, admin))
        .await
        .expect("the admin's key works on it")
        .into_inner()
        .keys;
    let ci = keys
        .iter()
        .find(|key| key.key_id == "ci")
        .expect("the key made on the first");
    assert!(ci.revoke_time.is_some());
    drop(second);
}
