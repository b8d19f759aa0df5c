//! Sessions: one stream each way, outliving its call, attaching, the driver-loss timeout and
//! the scheduler's stop.

use std::time::Duration;

use claudecluster_proto::v1::run_session_request::Message;
use claudecluster_proto::v1::worker_link_response::Message as Reply;
use claudecluster_proto::v1::{
    ExecutionMode, RunSessionRequest, RunSessionResponse, RunningWork, SessionClose, SessionOpen,
    SessionSpec, SessionState, SessionTurn, StopRuns,
};
use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::{Code, Status};

use super::*;

type SessionEvents = Pin<Box<dyn Stream<Item = Result<RunSessionResponse, Status>> + Send>>;

/// A driver's end of a session call: what it sends the session, and the session's events.
struct SessionCall {
    input: mpsc::UnboundedSender<Result<RunSessionRequest, Status>>,
    events: SessionEvents,
}

impl SessionCall {
    /// Sends `message`; like a driver's, it goes nowhere once the worker has let go of the call.
    fn send(&self, message: Message) {
        let request = RunSessionRequest {
            message: Some(message),
        };
        let _ = self.input.send(Ok(request));
    }

    fn turn(&self, turn: u32, text: &str) {
        self.send(Message::Turn(SessionTurn {
            turn,
            text: text.into(),
        }));
    }

    fn close(&self) {
        self.send(Message::Close(SessionClose {}));
    }
}

impl Worker {
    async fn session_call(&self, open: SessionOpen) -> Result<SessionCall, Status> {
        let (input, requests) = mpsc::unbounded_channel();
        input
            .send(Ok(RunSessionRequest {
                message: Some(Message::Open(open)),
            }))
            .unwrap();
        let requests = tokio_stream::wrappers::UnboundedReceiverStream::new(requests);
        let events = self.service.hold_session(requests).await?;
        Ok(SessionCall { input, events })
    }

    async fn open_session(&self, session_id: &str) -> Result<SessionCall, Status> {
        self.session_call(SessionOpen {
            session_id: session_id.into(),
            spec: Some(SessionSpec::default()),
            ..SessionOpen::default()
        })
        .await
    }

    async fn attach_session(&self, session_id: &str, after: u64) -> Result<SessionCall, Status> {
        self.session_call(SessionOpen {
            session_id: session_id.into(),
            attach: true,
            after_run_sequence: after,
            ..SessionOpen::default()
        })
        .await
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
async fn a_session_outlives_its_call_and_an_attach_replays_what_was_missed() {
    let mut worker = Worker::new(ExecutionMode::ContainerAgentic);
    let mut call = worker.open_session("s1").await.unwrap();
    let mut agent = worker.fake.next_agent().await;
    let (sequence, ready) = next_session_event(&mut call.events).await;
    assert_eq!(sequence, 1);
    assert_eq!(state(&ready).unwrap().0, SessionState::Ready);
    // A message sent just before the call went away still reaches the session, and is answered
    // with nobody following.
    call.turn(1, "hello");
    drop(call);
    assert!(agent.next_input().await.contains("hello"));
    assert_eq!(worker.running(), [("s1".to_owned(), 0)]);
    agent.print(fake::SUCCESS).await;
    assert!(!agent.has_exited(), "the container was not stopped");

    let attached = worker.attach_session("s1", 1).await.unwrap();
    attached.close();
    let events = rest_of_session(attached.events).await;
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

#[tokio::test]
async fn a_session_call_that_does_not_begin_by_opening_is_refused() {
    let worker = Worker::new(ExecutionMode::ContainerAgentic);
    let (input, requests) = mpsc::unbounded_channel();
    let turn = Message::Turn(SessionTurn {
        turn: 1,
        text: "hello".into(),
    });
    input
        .send(Ok(RunSessionRequest {
            message: Some(turn),
        }))
        .unwrap();
    let requests = tokio_stream::wrappers::UnboundedReceiverStream::new(requests);
    let refused = worker.service.hold_session(requests).await.err().unwrap();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().starts_with("open: "),
        "{}",
        refused.message()
    );
    assert!(worker.running().is_empty());
}

#[tokio::test]
async fn a_turn_sent_twice_is_answered_once() {
    let mut worker = Worker::new(ExecutionMode::ContainerAgentic);
    let mut first = worker.open_session("s1").await.unwrap();
    let mut agent = worker.fake.next_agent().await;
    next_session_event(&mut first.events).await;
    first.turn(1, "hello");
    // Sent again on the same call, as a driver does that attached anew mid-turn.
    first.turn(1, "hello");
    assert!(agent.next_input().await.contains("hello"));
    agent.print(fake::SUCCESS).await;
    let mut answered = Vec::new();
    for _ in 0..3 {
        answered.push(next_session_event(&mut first.events).await);
    }
    assert_eq!(answered.last().unwrap().0, 4);
    assert_eq!(
        state(&answered.last().unwrap().1).unwrap().0,
        SessionState::Idle
    );

    // A driver that restarted before it saw the answer attaches and sends the turn once more,
    // then the next one, on its own call.
    drop(first);
    let second = worker.attach_session("s1", 4).await.unwrap();
    second.turn(1, "hello");
    second.turn(2, "and then?");
    let input = agent.next_input().await;
    assert!(
        input.contains("and then?"),
        "turn 1 was answered again: {input}"
    );
    agent.print(fake::SUCCESS).await;
    second.close();
    let events = rest_of_session(second.events).await;
    let sequences: Vec<u64> = events.iter().map(|(sequence, _)| *sequence).collect();
    assert_eq!(sequences, [5, 6, 7, 8], "{events:?}");
    let (busy, reason) = state(&events[0].1).unwrap();
    assert_eq!(busy, SessionState::Busy);
    assert!(reason.starts_with("answering message 2"), "{reason}");
    assert_eq!(state(&events[3].1).unwrap().0, SessionState::Closed);
    assert!(worker.fake.started_none(), "one container answered both");
}

#[tokio::test]
async fn a_close_on_the_stream_ends_the_session_with_closed_and_removes_its_volumes() {
    let mut worker = Worker::new(ExecutionMode::ContainerAgentic);
    let mut call = worker.open_session("s1").await.unwrap();
    let agent = worker.fake.next_agent().await;
    next_session_event(&mut call.events).await;
    let (config_dir, _) = agent.launch.mounts[0].clone();
    assert!(agent.launch.workspace.exists() && config_dir.exists());
    call.close();
    let events = rest_of_session(call.events).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].0, 2);
    let (closed, reason) = state(&events[0].1).unwrap();
    assert_eq!(closed, SessionState::Closed);
    assert_eq!(
        reason,
        "closed by a client; its container and volumes are removed"
    );
    assert!(agent.has_exited(), "its container was stopped");
    assert!(!agent.launch.workspace.exists(), "its workspace is removed");
    assert!(!config_dir.exists(), "its Claude state is removed");
    assert!(worker.running().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_session_nobody_attaches_to_is_stopped_after_the_driver_loss_timeout() {
    let mut worker = Worker::new(ExecutionMode::ContainerAgentic);
    let mut call = worker.open_session("s1").await.unwrap();
    let agent = worker.fake.next_agent().await;
    next_session_event(&mut call.events).await;
    let left = Instant::now();
    drop(call);
    let log = worker.runtime.runs().session_log("s1").unwrap();
    log.ended().await;
    let waited = left.elapsed();
    assert!(
        waited >= Duration::from_secs(300) && waited < Duration::from_secs(301),
        "{waited:?}"
    );
    let attached = worker.attach_session("s1", 1).await.unwrap();
    attached.turn(1, "anyone?");
    let events = rest_of_session(attached.events).await;
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
    assert!(
        worker.fake.started_none(),
        "a session that ended takes no more messages"
    );
}

#[tokio::test]
async fn the_schedulers_stop_ends_a_session_even_mid_message() {
    let mut worker = Worker::new(ExecutionMode::ContainerAgentic);
    let mut call = worker.open_session("s1").await.unwrap();
    let mut agent = worker.fake.next_agent().await;
    next_session_event(&mut call.events).await;
    call.turn(1, "a long question");
    agent.next_input().await;
    let (_, busy) = next_session_event(&mut call.events).await;
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
    let events = rest_of_session(call.events).await;
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
