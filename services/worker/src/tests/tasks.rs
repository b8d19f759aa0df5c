//! Task runs: outliving their caller, attaching, the driver-loss timeout, fencing by attempt,
//! the scheduler's stop, slots given back however a run ends, and shutdown.

use std::time::Duration;

use claudecluster_proto::v1::worker_link_response::Message as Reply;
use claudecluster_proto::v1::{ExecutionMode, RunningWork, StopRuns, TaskStatus};
use tokio::time::Instant;
use tonic::Code;

use super::fake::FakeProvider;
use super::*;
use crate::runtime::Execution;

#[tokio::test]
async fn a_run_outlives_its_caller_and_an_attach_replays_exactly_what_was_missed() {
    let mut worker = Worker::new(ExecutionMode::ProcessPool);
    let mut first = worker.execute("t1", 1).await.unwrap();
    let agent = worker.fake.next_agent().await;
    let (sequence, running) = next(&mut first).await;
    assert_eq!(sequence, 1);
    assert_eq!(status(&running).unwrap().0, TaskStatus::Running);
    agent.print("one").await;
    assert_eq!(next(&mut first).await.0, 2);
    // The driver goes away; the agent goes on.
    drop(first);
    agent.print("two").await;
    agent.print("three").await;
    assert_eq!(worker.running(), [("t1".to_owned(), 1)]);

    // Two drivers attach in turn: one reads an event and leaves, the other reads to the end.
    let mut brief = worker.attach("t1", 1, 2).await.unwrap();
    let (sequence, kind) = next(&mut brief).await;
    assert_eq!((sequence, output(&kind)), (3, Some("two")));
    drop(brief);
    let second = worker.attach("t1", 1, 2).await.unwrap();
    agent.succeed().await;
    let events = rest(second).await;
    let sequences: Vec<u64> = events.iter().map(|(sequence, _)| *sequence).collect();
    assert_eq!(sequences, [3, 4, 5, 6], "no gap, no duplicate");
    assert_eq!(output(&events[0].1), Some("two"));
    assert_eq!(output(&events[1].1), Some("three"));
    assert!(matches!(events[2].1, Kind::Result(_)));
    assert_eq!(
        status(&events[3].1),
        Some((TaskStatus::Completed, "")),
        "the run was not cancelled when its caller left"
    );
    assert!(agent.signals().is_empty());
    assert!(worker.running().is_empty());

    // An ended run is kept for the retention: a driver that restarted collects its end.
    let replay = rest(worker.attach("t1", 1, 5).await.unwrap()).await;
    assert_eq!(replay.len(), 1);
    assert_eq!(replay[0].0, 6);
}

#[tokio::test]
async fn attaching_to_a_run_not_held_here_is_not_found() {
    let mut worker = Worker::new(ExecutionMode::ProcessPool);
    let missing = worker.attach("t1", 1, 0).await.err().unwrap();
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(
        missing.message(),
        "this worker holds no run of task t1 attempt 1"
    );
    let mut events = worker.execute("t1", 1).await.unwrap();
    let agent = worker.fake.next_agent().await;
    next(&mut events).await;
    let other_attempt = worker.attach("t1", 2, 0).await.err().unwrap();
    assert_eq!(other_attempt.code(), Code::NotFound);
    let beyond = worker.attach("t1", 1, 7).await.err().unwrap();
    assert_eq!(beyond.code(), Code::InvalidArgument);
    assert!(
        beyond.message().starts_with("after_run_sequence:"),
        "{}",
        beyond.message()
    );
    agent.succeed().await;
    rest(events).await;
}

#[tokio::test(start_paused = true)]
async fn a_run_nobody_attaches_to_is_cancelled_after_the_driver_loss_timeout() {
    let mut worker = Worker::new(ExecutionMode::ProcessPool);
    let mut events = worker.execute("t1", 1).await.unwrap();
    let agent = worker.fake.next_agent().await;
    next(&mut events).await;
    let left = Instant::now();
    drop(events);
    // The agent prints nothing; nobody attaches.
    let ended = worker.runtime.runs().task_run("t1", 1).unwrap();
    ended.log.ended().await;
    let waited = left.elapsed();
    assert!(
        waited >= Duration::from_secs(300) && waited < Duration::from_secs(301),
        "{waited:?}"
    );
    let events = rest(worker.attach("t1", 1, 1).await.unwrap()).await;
    assert_eq!(
        status(&events.last().unwrap().1),
        Some((TaskStatus::Cancelled, "no driver attached for 300 s"))
    );
    assert_eq!(agent.signals(), ["interrupt"]);
    assert!(worker.running().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_followed_run_is_not_cancelled_for_driver_loss() {
    let mut worker = Worker::new(ExecutionMode::ProcessPool);
    let mut events = worker.execute("t1", 1).await.unwrap();
    let agent = worker.fake.next_agent().await;
    next(&mut events).await;
    // Attached throughout: only the agent's own idle watchdog (600 s) stops a silent agent.
    let events = rest(events).await;
    let (status, reason) = status(&events.last().unwrap().1).unwrap();
    assert_eq!(status, TaskStatus::Failed);
    assert!(reason.contains("printed nothing for 10 min"), "{reason}");
    assert_eq!(agent.signals(), ["interrupt"]);
}

#[tokio::test]
async fn a_lower_attempt_is_refused_and_a_higher_one_supersedes() {
    let mut worker = Worker::new(ExecutionMode::ProcessPool);
    let mut second = worker.execute("t1", 2).await.unwrap();
    let older = worker.fake.next_agent().await;
    next(&mut second).await;

    let refused = worker.execute("t1", 1).await.err().unwrap();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(
        refused.message(),
        "attempt 1 of task t1 is older than attempt 2, which this worker has seen"
    );
    assert!(worker.fake.started_none(), "a refused attempt never starts");

    let mut third = worker.execute("t1", 3).await.unwrap();
    let second = rest(second).await;
    assert_eq!(
        status(&second.last().unwrap().1),
        Some((TaskStatus::Cancelled, "superseded by attempt 3"))
    );
    assert_eq!(older.signals(), ["interrupt"]);
    let newer = worker.fake.next_agent().await;
    assert_eq!(newer.launch.attempt, 3);
    assert_eq!(worker.running(), [("t1".to_owned(), 3)]);
    assert_eq!(next(&mut third).await.0, 1, "a run's sequence is its own");
    newer.succeed().await;
    let third = rest(third).await;
    assert_eq!(
        status(&third.last().unwrap().1).unwrap().0,
        TaskStatus::Completed
    );
}

#[tokio::test]
async fn the_schedulers_stop_cancels_the_named_runs_and_fences_them() {
    let mut worker = Worker::new(ExecutionMode::ProcessPool);
    let mut stopped = worker.execute("t1", 1).await.unwrap();
    let stopped_agent = worker.fake.next_agent().await;
    next(&mut stopped).await;
    let mut other = worker.execute("t2", 1).await.unwrap();
    let other_agent = worker.fake.next_agent().await;
    next(&mut other).await;

    crate::link::handle(
        &worker.runtime,
        Reply::StopRuns(StopRuns {
            runs: vec![
                RunningWork {
                    id: "t1".into(),
                    attempt: 1,
                },
                // Not here: nothing happens.
                RunningWork {
                    id: "t9".into(),
                    attempt: 4,
                },
            ],
            reason: "the task was given to worker-b".into(),
        }),
    );
    let stopped = rest(stopped).await;
    assert_eq!(
        status(&stopped.last().unwrap().1),
        Some((TaskStatus::Cancelled, "the task was given to worker-b"))
    );
    assert_eq!(stopped_agent.signals(), ["interrupt"]);
    assert!(other_agent.signals().is_empty(), "other runs go on");
    assert_eq!(worker.running(), [("t2".to_owned(), 1)]);

    let again = worker.execute("t1", 1).await.err().unwrap();
    assert_eq!(again.code(), Code::FailedPrecondition);
    assert_eq!(
        again.message(),
        "attempt 1 of task t1 was stopped on this worker: the task was given to worker-b"
    );
    let late = worker.execute("t9", 3).await.err().unwrap();
    assert_eq!(
        late.code(),
        Code::FailedPrecondition,
        "an attempt below a stopped one is stale"
    );
    other_agent.succeed().await;
    rest(other).await;
}

#[tokio::test]
async fn dropping_a_run_gives_its_slot_back_and_ends_its_log() {
    let mut worker = Worker::new(ExecutionMode::ProcessPool);
    let execution = Execution {
        task_id: "t1".into(),
        attempt: 1,
        spec: claudecluster_proto::v1::TaskSpec {
            prompt: "say hello".into(),
            ..Default::default()
        },
    };
    let admission = worker.runtime.admit(execution).await.unwrap();
    let events = admission.follow();
    let run = tokio::spawn(admission.run());
    let _agent = worker.fake.next_agent().await;
    assert_eq!(worker.running(), [("t1".to_owned(), 1)]);
    assert_eq!(worker.runtime.free_slots(), CAPACITY as usize - 1);

    run.abort();
    assert!(run.await.unwrap_err().is_cancelled());
    assert!(worker.running().is_empty());
    assert_eq!(worker.runtime.free_slots(), CAPACITY as usize);
    let events: Vec<_> = futures_util::StreamExt::collect::<Vec<_>>(events).await;
    let (_, last) = events.last().unwrap().as_ref().unwrap();
    assert_eq!(
        status(last.kind.as_ref().unwrap()),
        Some((
            TaskStatus::Failed,
            "the run stopped on the worker without an outcome"
        ))
    );
}

#[tokio::test]
async fn a_provider_that_panics_leaks_no_slot() {
    let (provider, fake) = FakeProvider::panicking(ExecutionMode::ProcessPool);
    let worker = Worker::with(provider, fake, |_| {});
    let events = worker.execute("t1", 1).await.unwrap();
    let events = rest(events).await;
    assert_eq!(
        status(&events.last().unwrap().1).unwrap().0,
        TaskStatus::Failed
    );
    assert!(worker.running().is_empty());
    assert_eq!(worker.runtime.free_slots(), CAPACITY as usize);
    // Nothing of the attempt is left running: the next one is taken.
    let next_attempt = rest(worker.execute("t1", 2).await.unwrap()).await;
    assert_eq!(
        status(&next_attempt.last().unwrap().1).unwrap().0,
        TaskStatus::Failed
    );
    assert_eq!(worker.runtime.free_slots(), CAPACITY as usize);
}

#[tokio::test(start_paused = true)]
async fn shutdown_lets_work_finish_within_the_grace_then_cancels_the_rest() {
    let mut worker = Worker::new(ExecutionMode::ProcessPool);
    let mut silent = worker.execute("t1", 1).await.unwrap();
    let _silent_agent = worker.fake.next_agent().await;
    next(&mut silent).await;
    let mut finishing = worker.execute("t2", 1).await.unwrap();
    let finishing_agent = worker.fake.next_agent().await;
    next(&mut finishing).await;

    let started = Instant::now();
    let shutdown = tokio::spawn({
        let runtime = worker.runtime.clone();
        async move { runtime.shut_down().await }
    });
    worker.runtime.shutting_down().await;
    let refused = worker.execute("t3", 1).await.err().unwrap();
    assert_eq!(refused.code(), Code::Unavailable);
    finishing_agent.succeed().await;
    let finishing = rest(finishing).await;
    assert_eq!(
        status(&finishing.last().unwrap().1).unwrap().0,
        TaskStatus::Completed,
        "work that ends within the grace ends on its own"
    );
    shutdown.await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(30));
    let silent = rest(silent).await;
    assert_eq!(
        status(&silent.last().unwrap().1),
        Some((
            TaskStatus::Pending,
            "the worker is shutting down; it gives the task back"
        )),
        "the stream ends with the task given back, for the driver to queue again"
    );
    assert!(worker.running().is_empty());
}

#[tokio::test]
async fn a_tasks_end_does_not_wait_for_its_agents_release_but_shutdown_does() {
    let mut worker = Worker::new(ExecutionMode::ContainerAgentic);
    let events = worker.execute("t1", 1).await.unwrap();
    let mut agent = worker.fake.next_agent().await;
    agent.next_input().await;
    agent.hold_release();
    // The result alone ends the task: the agent has not even exited yet.
    agent.print(super::fake::SUCCESS).await;
    let events = rest(events).await;
    assert_eq!(
        status(&events.last().unwrap().1).unwrap().0,
        TaskStatus::Completed
    );
    assert!(
        !agent.was_released(),
        "the end did not wait for the release"
    );
    assert!(
        worker.running().is_empty(),
        "the slot is free for the next task"
    );

    let shutdown = tokio::spawn({
        let runtime = worker.runtime.clone();
        async move { runtime.shut_down().await }
    });
    // Shutdown waits for the release, however long it takes.
    tokio::task::yield_now().await;
    assert!(!shutdown.is_finished());
    agent.let_release();
    shutdown.await.unwrap();
    assert!(agent.was_released());
    assert!(agent.has_exited(), "closing stdin ended the agent");
}

#[tokio::test]
async fn ids_that_would_name_another_place_are_refused_naming_the_field() {
    let worker = Worker::new(ExecutionMode::ProcessPool);
    let long = "t".repeat(129);
    for (id, message) in [
        ("..", "task_id: must be letters, digits, '-' or '_'"),
        ("a/b", "task_id: must be letters, digits, '-' or '_'"),
        (
            "sessions",
            "task_id: `sessions` is a name the worker keeps for itself",
        ),
        (long.as_str(), "task_id: must have 1 to 128 characters"),
        ("", "task_id: must have 1 to 128 characters"),
    ] {
        let refused = worker.execute(id, 1).await.err().unwrap();
        assert_eq!(refused.code(), Code::InvalidArgument, "{id}");
        assert_eq!(refused.message(), message, "{id}");
    }
    assert!(worker.running().is_empty(), "nothing was admitted");
}
