//! A standby driver: two driver processes on one PostgreSQL; `kill -9` of the leader while
//! tasks run and clients stream their events; the standby takes over, and the clients, given
//! both addresses, follow it with no event lost.

use std::time::{Duration, Instant};

use claudecluster_integration_tests::postgres::TestPostgres;
use claudecluster_integration_tests::*;
use claudecluster_proto::v1::*;

#[tokio::test]
async fn the_standby_takes_over_when_the_leader_is_killed_and_no_event_is_lost() {
    let postgres = TestPostgres::start();
    let mut cluster = cluster_on(
        &postgres,
        WorkerSpec {
            capacity: 3,
            ..WorkerSpec::in_mode(Mode::ProcessPool)
        },
    )
    .await;
    let standby = cluster.start_another_driver().await;
    // The standby is alive and says it does not serve the API.
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        claudecluster_grpc::channel(&standby.address).unwrap(),
    );
    let serving = |health: tonic_health::pb::HealthCheckResponse| health.status;
    let check = |service: &str| tonic_health::pb::HealthCheckRequest {
        service: service.to_owned(),
    };
    assert_eq!(
        serving(health.check(check("")).await.unwrap().into_inner()),
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    assert_eq!(
        serving(
            health
                .check(check("claudecluster.v1.DriverService"))
                .await
                .unwrap()
                .into_inner()
        ),
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );
    let refused = driver_at(&standby.address)
        .get_cluster_status(GetClusterStatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert!(
        refused.message().contains("standby"),
        "{}",
        refused.message()
    );

    // A client given both addresses, the standby first, reaches the leader.
    let both = driver_at(&format!("{},{}", standby.address, cluster.driver.address));
    let mut tasks = Vec::new();
    for index in 0..3 {
        let task = submit(&both, &format!("SLOW 40 100 {index}")).await;
        tasks.push(task.task_id);
    }
    let followers: Vec<_> = tasks
        .iter()
        .map(|task_id| tokio::spawn(follow_resuming(both.clone(), task_id.clone())))
        .collect();
    // And the CLI, given both addresses too, follows the first task's events.
    let cli = tokio::process::Command::new(claudecluster_bin())
        .args(["tasks", "events", &tasks[0], "--driver"])
        .arg(format!("{},{}", cluster.driver.address, standby.address))
        .stdin(std::process::Stdio::null())
        .output();
    let cli = tokio::spawn(cli);
    // Kill the leader while the agents stream.
    for task_id in &tasks {
        cluster.wait_for_agent(task_id).await;
    }
    cluster.driver.kill().await;
    let killed = Instant::now();
    let took_over = wait_for(Duration::from_secs(30), || {
        let mut standby = driver_at(&standby.address);
        async move {
            standby
                .get_cluster_status(GetClusterStatusRequest {})
                .await
                .ok()
                .map(|_| killed.elapsed())
        }
    })
    .await
    .expect("the standby took over");
    eprintln!(
        "failover: the standby served {} ms after the kill",
        took_over.as_millis()
    );

    for (task_id, follower) in tasks.iter().zip(followers) {
        let seen = follower.await.unwrap();
        let task = task_at(&standby.address, task_id).await;
        assert_eq!(
            task.status(),
            TaskStatus::Completed,
            "{}",
            task.status_reason
        );
        assert_eq!(task.attempt, 1, "the run went on on its worker, not again");
        assert!(task.result.unwrap().text.contains("chunk 40"));
        let expected: Vec<u64> = (1..=task.last_sequence).collect();
        assert_eq!(seen, expected, "every event once, in order, none lost");
    }
    let cli = cli.await.unwrap().expect("run the CLI");
    let printed = String::from_utf8_lossy(&cli.stdout);
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    assert!(
        printed.contains("chunk 1 ") && printed.contains("chunk 40"),
        "the CLI printed the agent's whole answer: {printed}"
    );
    // The new leader runs new work.
    let after = submit(&both, "after the failover").await;
    let seen = follow_resuming(both, after.task_id.clone()).await;
    assert!(!seen.is_empty());
    drop(standby);
}

/// A cluster whose driver keeps its store in `postgres`.
async fn cluster_on(postgres: &TestPostgres, worker: WorkerSpec) -> TestCluster {
    TestCluster::start_with_driver(
        &format!("store:\n  url: {}\n", postgres.url()),
        vec![worker],
    )
    .await
}

/// Submits `text` through `driver` (which may name several drivers).
async fn submit(driver: &Driver, text: &str) -> Task {
    driver
        .clone()
        .submit_task(SubmitTaskRequest {
            spec: Some(prompt(text)),
        })
        .await
        .expect("the leader takes the task")
        .into_inner()
        .task
        .unwrap()
}

/// The task as the driver at `address` has it.
async fn task_at(address: &str, task_id: &str) -> Task {
    driver_at(address)
        .get_task(GetTaskRequest {
            task_id: task_id.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap()
}

/// Ends the connection that holds the leader's lock, as a database restart or an
/// administrator would.
fn terminate_the_lock_connection(postgres: &TestPostgres) {
    let terminated = postgres.sql(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' AND granted",
    );
    assert_eq!(terminated, "1", "one connection held the leader's lock");
}

#[tokio::test]
async fn a_lone_leader_that_loses_its_lock_takes_it_back_and_goes_on() {
    let postgres = TestPostgres::start();
    let mut cluster = cluster_on(&postgres, WorkerSpec::in_mode(Mode::ProcessPool)).await;
    let task = cluster.submit(prompt("SLOW 30 100")).await;
    cluster.wait_for_agent(&task.task_id).await;
    let follower = tokio::spawn(follow_resuming(
        cluster.driver().await,
        task.task_id.clone(),
    ));
    terminate_the_lock_connection(&postgres);
    // No other driver led meanwhile: it takes the lock back and goes on.
    wait_until(Duration::from_secs(15), || {
        let log = cluster.driver.log();
        async move { log.contains("holds the leader's lock again") }
    })
    .await
    .expect("the leader took its lock back");
    let seen = follower.await.unwrap();
    let ended = cluster.task(&task.task_id).await;
    assert_eq!(
        ended.status(),
        TaskStatus::Completed,
        "{}",
        ended.status_reason
    );
    assert_eq!(seen, (1..=ended.last_sequence).collect::<Vec<_>>());
    assert_eq!(
        cluster.completed_text(prompt("after")).await,
        "MOCK_REPLY turn=1: after"
    );
    assert!(cluster.driver.is_alive());
}

#[tokio::test]
async fn a_leader_whose_lock_another_driver_took_stops() {
    let postgres = TestPostgres::start();
    let mut cluster = cluster_on(&postgres, WorkerSpec::in_mode(Mode::ProcessPool)).await;
    let standby = cluster.start_another_driver().await;
    let both = driver_at(&format!("{},{}", cluster.driver.address, standby.address));
    let task = submit(&both, "SLOW 30 100").await;
    cluster.wait_for_agent(&task.task_id).await;
    let follower = tokio::spawn(follow_resuming(both.clone(), task.task_id.clone()));

    // The leader is frozen while its lock goes; the standby takes it.
    cluster.driver.signal(libc::SIGSTOP);
    terminate_the_lock_connection(&postgres);
    wait_until(Duration::from_secs(15), || {
        let mut standby = driver_at(&standby.address);
        async move {
            standby
                .get_cluster_status(GetClusterStatusRequest {})
                .await
                .is_ok()
        }
    })
    .await
    .expect("the standby took over");
    // Thawed, the old leader finds the lock taken, and stops rather than write beside it.
    cluster.driver.signal(libc::SIGCONT);
    let exited = cluster
        .driver
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("the old leader stopped");
    assert!(!exited.success(), "{exited:?}");
    let log = cluster.driver.log();
    assert!(
        log.contains("another driver leads now"),
        "the old leader says why"
    );

    let seen = follower.await.unwrap();
    let ended = task_at(&standby.address, &task.task_id).await;
    assert_eq!(
        ended.status(),
        TaskStatus::Completed,
        "{}",
        ended.status_reason
    );
    assert_eq!(ended.attempt, 1);
    assert_eq!(seen, (1..=ended.last_sequence).collect::<Vec<_>>());
}
