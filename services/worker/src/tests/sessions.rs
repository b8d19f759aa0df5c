//! Sessions: outliving their RunSession call, attaching, the driver-loss timeout and the
//! scheduler's stop.

use std::time::Duration;

use claudecluster_proto::v1::worker_link_response::Message as Reply;
use claudecluster_proto::v1::worker_service_server::WorkerService as _;
use claudecluster_proto::v1::{
    CloseWorkerSessionRequest, ExecutionMode, RunSessionRequest, RunSessionResponse, RunningWork,
    SessionSpec, SessionState, SessionTurnRequest, StopRuns,
};
use futures_util::{Stream, StreamExt};
use tokio::time::Instant;
use tonic::{Code, Request, Status};

use super::*;

type SessionEvents = Pin<Box<dyn Stream<Item = Result<RunSessionResponse, Status>> + Send>>;

impl Worker {
    async fn open_session(&self, session_id: &str) -> Result<SessionEvents, Status> {
        let request = RunSessionRequest {
            session_id: session_id.into(),
            spec: Some(SessionSpec::default()),
            ..RunSessionRequest::default()
        };
        Ok(self
            .service
            .run_session(Request::new(request))
            .await?
            .into_inner())
    }

    async fn attach_session(&self, session_id: &str, after: u64) -> Result<SessionEvents, Status> {
        let request = RunSessionRequest {
            session_id: session_id.into(),
            attach: true,
            after_run_sequence: after,
            ..RunSessionRequest::default()
        };
        Ok(self
            .service
            .run_session(Request::new(request))
            .await?
            .into_inner())
    }

    async fn send(&self, session_id: &str, turn: u32, text: &str) -> Result<(), Status> {
        let request = SessionTurnRequest {
            session_id: session_id.into(),
            turn,
            text: text.into(),
        };
        self.service.session_turn(Request::new(request)).await?;
        Ok(())
    }
}

async fn next_session_event(events: &mut SessionEvents) -> (u64, Kind) {
    let response = events
        .next()
        .await
        .expect("the stream ended early")
        .expect("no stream error");
    (response.run_sequence, response.event.unwrap().kind.unwrap())
}

async fn rest_of_session(events: SessionEvents) -> Vec<(u64, Kind)> {
    events
        .map(|response| {
            let response = response.expect("no stream error");
            (response.run_sequence, response.event.unwrap().kind.unwrap())
        })
        .collect()
        .await
}

fn state(kind: &Kind) -> Option<(SessionState, &str)> {
    match kind {
        Kind::SessionState(change) => Some((change.state(), change.reason.as_str())),
        _ => None,
    }
}

#[tokio::test]
async fn a_session_outlives_its_caller_and_an_attach_replays_what_was_missed() {
    let mut worker = Worker::new(ExecutionMode::ContainerAgentic);
    let mut events = worker.open_session("s1").await.unwrap();
    let mut agent = worker.fake.next_agent().await;
    let (sequence, ready) = next_session_event(&mut events).await;
    assert_eq!(sequence, 1);
    assert_eq!(state(&ready).unwrap().0, SessionState::Ready);
    drop(events);

    // Messages still reach a session nobody follows.
    worker.send("s1", 1, "hello").await.unwrap();
    assert!(agent.next_input().await.contains("hello"));
    assert_eq!(worker.running(), [("s1".to_owned(), 0)]);
    agent.print(fake::SUCCESS).await;
    assert!(!agent.has_exited(), "the container was not stopped");

    let attached = worker.attach_session("s1", 1).await.unwrap();
    let closed = CloseWorkerSessionRequest {
        session_id: "s1".into(),
    };
    let found = worker
        .service
        .close_worker_session(Request::new(closed))
        .await
        .unwrap()
        .into_inner()
        .found;
    assert!(found);
    let events = rest_of_session(attached).await;
    let sequences: Vec<u64> = events.iter().map(|(sequence, _)| *sequence).collect();
    assert_eq!(sequences, [2, 3, 4, 5], "no gap, no duplicate");
    assert_eq!(state(&events[0].1).unwrap().0, SessionState::Busy);
    assert!(matches!(events[1].1, Kind::Result(_)));
    assert_eq!(state(&events[2].1).unwrap().0, SessionState::Idle);
    assert_eq!(state(&events[3].1).unwrap().0, SessionState::Closed);
    assert!(worker.running().is_empty());
}

#[tokio::test]
async fn attaching_to_a_session_not_held_here_is_not_found() {
    let worker = Worker::new(ExecutionMode::ContainerAgentic);
    let missing = worker.attach_session("s1", 0).await.err().unwrap();
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test(start_paused = true)]
async fn a_session_nobody_attaches_to_is_stopped_after_the_driver_loss_timeout() {
    let mut worker = Worker::new(ExecutionMode::ContainerAgentic);
    let mut events = worker.open_session("s1").await.unwrap();
    let agent = worker.fake.next_agent().await;
    next_session_event(&mut events).await;
    let left = Instant::now();
    drop(events);
    let log = worker.runtime.runs().session_log("s1").unwrap();
    log.ended().await;
    let waited = left.elapsed();
    assert!(
        waited >= Duration::from_secs(300) && waited < Duration::from_secs(301),
        "{waited:?}"
    );
    let events = rest_of_session(worker.attach_session("s1", 1).await.unwrap()).await;
    assert_eq!(events.len(), 1);
    let (stopped, reason) = state(&events[0].1).unwrap();
    assert_eq!(stopped, SessionState::Stopped);
    assert_eq!(
        reason,
        "no driver attached for 300 s: its container is stopped; the workspace is kept"
    );
    assert!(agent.has_exited(), "its container was stopped");
    assert!(
        agent.launch.workspace.exists(),
        "the session's volumes are kept"
    );
    assert!(worker.running().is_empty());
    let gone = worker.send("s1", 1, "anyone?").await.err().unwrap();
    assert_eq!(gone.code(), Code::NotFound);
}

#[tokio::test]
async fn the_schedulers_stop_ends_a_session_even_mid_message() {
    let mut worker = Worker::new(ExecutionMode::ContainerAgentic);
    let mut events = worker.open_session("s1").await.unwrap();
    let mut agent = worker.fake.next_agent().await;
    next_session_event(&mut events).await;
    worker.send("s1", 1, "a long question").await.unwrap();
    agent.next_input().await;
    let (_, busy) = next_session_event(&mut events).await;
    assert_eq!(state(&busy).unwrap().0, SessionState::Busy);

    crate::link::handle(
        &worker.runtime,
        Reply::StopRuns(StopRuns {
            runs: vec![RunningWork {
                id: "s1".into(),
                attempt: 0,
            }],
            reason: "the session was given to worker-b".into(),
        }),
    );
    let events = rest_of_session(events).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let (stopped, reason) = state(&events[0].1).unwrap();
    assert_eq!(stopped, SessionState::Stopped);
    assert!(
        reason.starts_with("the session was given to worker-b: message 1 was cut short"),
        "{reason}"
    );
    assert!(agent.has_exited());
    assert!(agent.launch.workspace.exists());
    assert!(worker.running().is_empty());
}
