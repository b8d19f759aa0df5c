//! Sessions on container workers, with the real CLI in the containers: message after message,
//! memory of the conversation and of the files, idle stops, queueing, isolation, failures.

use std::time::Duration;

use claudecluster_integration_tests::docker::{
    assert_containers_removed, assert_networks_removed, containers_with_label, docker,
};
use claudecluster_integration_tests::*;
use claudecluster_proto::v1::event::Kind;
use claudecluster_proto::v1::*;
use tonic::Code;

fn container_worker() -> WorkerSpec {
    WorkerSpec::in_mode(Mode::Container)
}

fn session_spec(idle_timeout_seconds: u32) -> SessionSpec {
    SessionSpec {
        idle_timeout_seconds,
        agent: Some(AgentOptions {
            allowed_tools: vec!["Write".into(), "Bash".into()],
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn create(cluster: &TestCluster, spec: SessionSpec) -> Session {
    cluster
        .driver()
        .await
        .create_session(CreateSessionRequest { spec: Some(spec) })
        .await
        .expect("create session")
        .into_inner()
        .session
        .unwrap()
}

/// Sends a message and collects the events of its reply.
async fn send(cluster: &TestCluster, session_id: &str, text: &str) -> Vec<Event> {
    cluster.send_message(session_id, text).await
}

fn reply(events: &[Event]) -> String {
    events
        .iter()
        .find_map(|e| match &e.kind {
            Some(Kind::Result(result)) => Some(result.text.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no result in {events:?}"))
}

fn last_state(events: &[Event]) -> SessionState {
    events
        .iter()
        .rev()
        .find_map(|e| match &e.kind {
            Some(Kind::SessionState(change)) => Some(change.state()),
            _ => None,
        })
        .unwrap()
}

async fn session(cluster: &TestCluster, session_id: &str) -> Session {
    cluster.session(session_id).await
}

async fn wait_for_state(cluster: &TestCluster, session_id: &str, state: SessionState) -> Session {
    wait_until(Duration::from_secs(30), || async {
        session(cluster, session_id).await.state() == state
    })
    .await
    .unwrap_or_else(|_| panic!("session {session_id} never became {state:?}"));
    session(cluster, session_id).await
}

async fn close(cluster: &TestCluster, session_id: &str) -> Session {
    cluster
        .driver()
        .await
        .close_session(CloseSessionRequest {
            session_id: session_id.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap()
}

async fn session_containers(session_id: &str) -> Vec<String> {
    containers_with_label(&format!("claudecluster.task=session-{session_id}")).await
}

#[tokio::test]
async fn three_messages_share_the_conversation_and_the_files() {
    let cluster = TestCluster::start(vec![container_worker()]).await;
    let created = create(&cluster, session_spec(0)).await;
    let id = created.session_id.clone();
    assert_eq!(created.state(), SessionState::Creating);

    let first = send(&cluster, &id, "WRITE notes.txt alpha").await;
    assert_eq!(reply(&first), "MOCK_DONE wrote notes.txt");
    assert!(first.iter().all(|e| e.turn == 1 && e.session_id == id));
    assert_eq!(last_state(&first), SessionState::Idle);
    assert_eq!(
        reply(&send(&cluster, &id, "second message").await),
        "MOCK_REPLY turn=2: second message"
    );
    // The third message reads the file the first one wrote.
    assert_eq!(
        reply(&send(&cluster, &id, "BASH cat notes.txt").await),
        "MOCK_DONE alpha"
    );
    // The API saw the whole conversation with it.
    let third = cluster
        .api
        .requests()
        .into_iter()
        .find(|r| r.prompt().as_deref() == Some("BASH cat notes.txt"))
        .expect("the third message reached the API");
    let history = third.body.to_string();
    assert!(
        history.contains("WRITE notes.txt alpha") && history.contains("second message"),
        "{history}"
    );
    assert_eq!(
        reply(&send(&cluster, &id, "RECALL").await),
        "MOCK_RECALL n=3: WRITE notes.txt alpha | second message | BASH cat notes.txt"
    );

    let record = session(&cluster, &id).await;
    assert_eq!(record.turns, 4);
    assert!(record.total_cost_usd > 0.0);
    assert!(record.usage.unwrap().output_tokens > 0);
    assert!(!record.agent_session_id.is_empty());
    let workspace = std::path::PathBuf::from(&record.workspace);
    assert_eq!(
        std::fs::read_to_string(workspace.join("notes.txt")).unwrap(),
        "alpha\n"
    );
    // The session's work, through the API, from the container's workspace.
    let mut driver = cluster.driver().await;
    let listed = driver
        .list_task_files(ListTaskFilesRequest {
            session_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let notes = listed.files.iter().find(|f| f.path == "notes.txt").unwrap();
    assert_eq!((notes.change(), notes.size), (FileChange::Added, 6));
    let diff = driver
        .get_task_diff(GetTaskDiffRequest {
            session_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        diff.diff
            .contains("+++ b/notes.txt\n@@ -0,0 +1 @@\n+alpha\n"),
        "{}",
        diff.diff
    );
    assert_eq!(diff.summary.unwrap().files_added, 1);

    let closed = close(&cluster, &id).await;
    assert_eq!(closed.state(), SessionState::Closed);
    assert!(!workspace.exists(), "closing removes the volumes");
    let gone = driver
        .list_task_files(ListTaskFilesRequest {
            session_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    assert!(session_containers(&id).await.is_empty());
}

#[tokio::test]
async fn after_an_idle_stop_the_conversation_and_files_survive_a_new_container() {
    let cluster = TestCluster::start(vec![container_worker()]).await;
    let id = create(&cluster, session_spec(2)).await.session_id;
    assert_eq!(
        reply(&send(&cluster, &id, "WRITE notes.txt alpha").await),
        "MOCK_DONE wrote notes.txt"
    );
    let stopped = wait_for_state(&cluster, &id, SessionState::Stopped).await;
    assert!(
        stopped.state_reason.starts_with("no message for 2 s"),
        "{}",
        stopped.state_reason
    );
    assert!(
        session_containers(&id).await.is_empty(),
        "the container is gone while stopped"
    );
    assert!(
        std::path::Path::new(&stopped.workspace)
            .join("notes.txt")
            .exists(),
        "the workspace is kept"
    );

    let again = send(&cluster, &id, "BASH cat notes.txt").await;
    assert_eq!(reply(&again), "MOCK_DONE alpha");
    let busy = again
        .iter()
        .find_map(|e| match &e.kind {
            Some(Kind::SessionState(c)) if c.state() == SessionState::Busy => {
                Some(c.reason.clone())
            }
            _ => None,
        })
        .unwrap();
    assert!(
        busy.ends_with(&format!("claudecluster-session-{id}-2")),
        "a new container: {busy}"
    );
    assert_eq!(
        reply(&send(&cluster, &id, "RECALL").await),
        "MOCK_RECALL n=2: WRITE notes.txt alpha | BASH cat notes.txt"
    );
    close(&cluster, &id).await;
    assert!(session_containers(&id).await.is_empty());
}

#[tokio::test]
async fn two_messages_sent_at_once_are_two_turns_in_order() {
    let cluster = TestCluster::start(vec![container_worker()]).await;
    let id = create(&cluster, session_spec(0)).await.session_id;
    let (slow, quick) = tokio::join!(
        send(&cluster, &id, "SLOW 5 100"),
        send(&cluster, &id, "quick one")
    );
    // Whichever reached the driver first is turn 1; each reply answers its own message.
    let mut turns = [slow[0].turn, quick[0].turn];
    turns.sort();
    assert_eq!(turns, [1, 2]);
    assert!(
        slow.iter().all(|e| e.turn == slow[0].turn)
            && quick.iter().all(|e| e.turn == quick[0].turn)
    );
    assert_eq!(reply(&slow), "chunk 1 chunk 2 chunk 3 chunk 4 chunk 5 ");
    assert_eq!(
        reply(&quick),
        format!("MOCK_REPLY turn={}: quick one", quick[0].turn)
    );
    // In the session's log every event of the first turn comes before any of the second.
    close(&cluster, &id).await;
    let mut stream = cluster
        .driver()
        .await
        .stream_session_events(StreamSessionEventsRequest {
            session_id: id.clone(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut turns = Vec::new();
    while let Some(response) = stream.message().await.unwrap() {
        let event = response.event.unwrap();
        if event.turn > 0 {
            turns.push(event.turn);
        }
    }
    let first_of_two = turns.iter().position(|t| *t == 2).unwrap();
    assert!(
        turns[..first_of_two].iter().all(|t| *t == 1)
            && turns[first_of_two..].iter().all(|t| *t == 2),
        "{turns:?}"
    );
}

#[tokio::test]
async fn two_sessions_on_two_workers_stay_apart() {
    let one = WorkerSpec {
        capacity: 1,
        ..container_worker()
    };
    let cluster = TestCluster::start(vec![one.clone(), one]).await;
    let a = create(&cluster, session_spec(0)).await.session_id;
    let b = create(&cluster, session_spec(0)).await.session_id;
    assert_eq!(
        reply(&send(&cluster, &a, "WRITE a.txt for a").await),
        "MOCK_DONE wrote a.txt"
    );
    assert_eq!(
        reply(&send(&cluster, &b, "hello from b").await),
        "MOCK_REPLY turn=1: hello from b"
    );
    assert_eq!(
        reply(&send(&cluster, &b, "RECALL").await),
        "MOCK_RECALL n=1: hello from b"
    );
    assert_eq!(
        reply(&send(&cluster, &a, "RECALL").await),
        "MOCK_RECALL n=1: WRITE a.txt for a"
    );
    let (sa, sb) = (session(&cluster, &a).await, session(&cluster, &b).await);
    assert_ne!(sa.worker_id, sb.worker_id, "each worker holds one session");
    assert_ne!(sa.workspace, sb.workspace);
    assert!(std::path::Path::new(&sa.workspace).join("a.txt").exists());
    assert!(!std::path::Path::new(&sb.workspace).join("a.txt").exists());
    let (ca, cb) = (session_containers(&a).await, session_containers(&b).await);
    assert_eq!((ca.len(), cb.len()), (1, 1));
    assert_ne!(ca, cb);
    // A session counts against its worker's capacity: a task waits while both are held.
    let task = cluster.submit(prompt("no room")).await;
    assert_eq!(
        cluster.task(&task.task_id).await.status(),
        TaskStatus::Pending
    );
    close(&cluster, &a).await;
    assert_eq!(
        cluster.finish(&task.task_id).await.0.status(),
        TaskStatus::Completed
    );
    close(&cluster, &b).await;
}

#[tokio::test]
async fn bad_session_requests_get_the_right_status() {
    let process_only = TestCluster::start(vec![WorkerSpec::default()]).await;
    let refused = process_only
        .driver()
        .await
        .create_session(CreateSessionRequest {
            spec: Some(session_spec(0)),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused
            .message()
            .contains("need a container_agentic worker"),
        "{}",
        refused.message()
    );
    drop(process_only);

    let cluster = TestCluster::start(vec![container_worker()]).await;
    let mut driver = cluster.driver().await;
    let unknown = driver
        .send_session_message(SendSessionMessageRequest {
            session_id: "nope".into(),
            text: "hi".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    assert_eq!(unknown.message(), "session nope not found");
    let id = create(&cluster, session_spec(0)).await.session_id;
    let empty = driver
        .send_session_message(SendSessionMessageRequest {
            session_id: id.clone(),
            text: "  ".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert_eq!(empty.message(), "text: must not be empty");
    close(&cluster, &id).await;
    let closed = driver
        .send_session_message(SendSessionMessageRequest {
            session_id: id.clone(),
            text: "hi".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(closed.code(), Code::FailedPrecondition);
    assert!(
        closed
            .message()
            .starts_with(&format!("session {id} is closed")),
        "{}",
        closed.message()
    );
}

#[tokio::test]
async fn messages_beyond_the_queue_bound_are_refused() {
    let cluster =
        TestCluster::start_with_driver("sessionQueueLimit: 1\n", vec![container_worker()]).await;
    let id = create(&cluster, session_spec(0)).await.session_id;
    wait_for_state(&cluster, &id, SessionState::Ready).await;
    let slow = tokio::spawn(reply_events(
        cluster.driver().await,
        id.clone(),
        "SLOW 20 100".to_owned(),
    ));
    wait_for_state(&cluster, &id, SessionState::Busy).await;
    let mut driver = cluster.driver().await;
    let queued = driver
        .send_session_message(SendSessionMessageRequest {
            session_id: id.clone(),
            text: "queued".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let refused = driver
        .send_session_message(SendSessionMessageRequest {
            session_id: id.clone(),
            text: "one too many".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("sessionQueueLimit"),
        "{}",
        refused.message()
    );
    slow.await.unwrap();
    let mut queued = queued;
    let mut texts = Vec::new();
    while let Some(response) = queued.message().await.unwrap() {
        if let Some(Kind::Result(result)) = response.event.unwrap().kind {
            texts.push(result.text);
        }
    }
    assert_eq!(texts, vec!["MOCK_REPLY turn=2: queued"]);
    close(&cluster, &id).await;
}

#[tokio::test]
async fn a_session_whose_container_dies_fails_and_keeps_its_volumes_until_closed() {
    let cluster = TestCluster::start(vec![container_worker()]).await;
    let id = create(&cluster, session_spec(0)).await.session_id;
    assert_eq!(
        reply(&send(&cluster, &id, "WRITE keep.txt evidence").await),
        "MOCK_DONE wrote keep.txt"
    );
    let container = session_containers(&id).await.pop().unwrap();
    docker(&["kill", &container]).await;
    let failed = wait_for_state(&cluster, &id, SessionState::Failed).await;
    assert!(
        failed.state_reason.contains("exited 137"),
        "{}",
        failed.state_reason
    );
    assert!(
        failed
            .state_reason
            .contains("killed from outside the worker"),
        "{}",
        failed.state_reason
    );
    let kept = std::path::PathBuf::from(&failed.workspace).join("keep.txt");
    assert!(kept.exists(), "volumes are kept for inspection");
    let refused = cluster
        .driver()
        .await
        .send_session_message(SendSessionMessageRequest {
            session_id: id.clone(),
            text: "hi".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(close(&cluster, &id).await.state(), SessionState::Closed);
    assert!(!kept.exists(), "closing removes them");
    assert!(session_containers(&id).await.is_empty());
}

#[tokio::test]
async fn sessions_of_a_worker_that_disappears_are_lost_and_nothing_hangs() {
    let mut cluster = TestCluster::start(vec![container_worker()]).await;
    let worker_id = cluster.worker_ids[0].clone();
    let id = create(&cluster, session_spec(0)).await.session_id;
    wait_for_state(&cluster, &id, SessionState::Ready).await;
    let waiting = tokio::spawn(reply_events(
        cluster.driver().await,
        id.clone(),
        "HANG".to_owned(),
    ));
    wait_for_state(&cluster, &id, SessionState::Busy).await;
    cluster.workers[0].kill().await;
    let events = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the message's stream ends when the worker is gone")
        .unwrap();
    assert_eq!(last_state(&events), SessionState::Lost);
    let lost = session(&cluster, &id).await;
    assert_eq!(lost.state(), SessionState::Lost);
    assert!(
        lost.state_reason
            .starts_with(&format!("lost worker {worker_id}")),
        "{}",
        lost.state_reason
    );
    // The killed worker could not remove its container (nor the holder of a network namespace
    // it made for its next agent); its next run does.
    let label = format!("claudecluster.worker={worker_id}");
    assert!(!containers_with_label(&label).await.is_empty());
    cluster.workers[0].restart().await;
    assert_containers_removed(&label).await;
    assert_networks_removed(&label).await;
}

#[tokio::test]
async fn the_session_commands_of_the_cli() {
    let cluster = TestCluster::start(vec![container_worker()]).await;
    let driver = cluster.driver.address.clone();
    let (ok, id, err) = cli(
        &driver,
        &["session", "new", "--allowed-tools", "Write,Bash"],
    )
    .await;
    assert!(ok, "{err}");
    let id = id.trim().to_owned();
    let (ok, out, err) = cli(
        &driver,
        &["session", "send", &id, "WRITE cli.txt from the cli"],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("MOCK_DONE wrote cli.txt"), "{out}");
    assert!(
        err.contains("→ Write") && err.contains("[idle] message 1 answered"),
        "{err}"
    );
    let (ok, out, _) = cli(&driver, &["session", "send", &id, "BASH cat cli.txt"]).await;
    assert!(ok);
    assert!(out.contains("MOCK_DONE from the cli"), "{out}");
    let (_, listed, _) = cli(&driver, &["session", "list"]).await;
    assert!(
        listed
            .lines()
            .any(|line| line.starts_with(&id) && line.contains("idle")),
        "{listed}"
    );
    let (_, detail, _) = cli(&driver, &["session", "get", &id]).await;
    assert!(detail.contains("turns:     2"), "{detail}");
    let (ok, closed, _) = cli(&driver, &["session", "close", &id]).await;
    assert!(ok && closed.contains("state:     closed"), "{closed}");
    // Attaching to a closed session replays everything and ends.
    let (ok, _, attached) = cli(&driver, &["session", "attach", &id]).await;
    assert!(ok);
    assert!(
        attached.contains("[busy] answering message 2") && attached.contains("[closed]"),
        "{attached}"
    );
    let (ok, _, err) = cli(&driver, &["session", "send", &id, "too late"]).await;
    assert!(!ok);
    assert!(
        err.contains("FailedPrecondition: session") && err.contains("is closed"),
        "{err}"
    );
}
