//! Synthetic stores for `cluster-bench`: many tasks with long logs, written straight through the
//! store's own code, so that recovery time and memory can be measured at scale.

use claudecluster_proto::v1::event::Kind;
use claudecluster_proto::v1::{AgentText, Event, StatusChange, Task, TaskSpec, TaskStatus};
use prost::Message;

use crate::db::{Db, Row, StoredEvent, SubjectKind, Write};
use crate::store::Bookkeeping;

/// Writes `tasks` tasks of `events_per_task` events each into the store at `url`: every
/// `live_every`-th task still RUNNING on a worker at `worker_address` (0: none), the others
/// COMPLETED. Returns the number of events written.
pub async fn fill_store(
    url: &str,
    tasks: usize,
    events_per_task: usize,
    live_every: usize,
    worker_address: &str,
) -> Result<u64, String> {
    let db = Db::open(url, 2).await.map_err(|err| err.to_string())?;
    let mut batch = Vec::new();
    let mut written = 0;
    for index in 0..tasks {
        let live = live_every > 0 && index % live_every == 0;
        let id = format!("bench-{index:08}");
        let status = if live {
            TaskStatus::Running
        } else {
            TaskStatus::Completed
        };
        let mut events = Vec::with_capacity(events_per_task);
        for sequence in 1..=events_per_task as u64 {
            let kind = if sequence == 1 {
                Kind::StatusChange(StatusChange {
                    status: TaskStatus::Running as i32,
                    worker_id: "bench-worker".into(),
                    ..StatusChange::default()
                })
            } else if sequence == events_per_task as u64 && !live {
                Kind::StatusChange(StatusChange {
                    status: status as i32,
                    ..StatusChange::default()
                })
            } else {
                Kind::Text(AgentText {
                    text: format!("event {sequence} of a synthetic task"),
                    ..AgentText::default()
                })
            };
            let event = Event {
                sequence,
                task_id: id.clone(),
                attempt: 1,
                kind: Some(kind),
                ..Event::default()
            };
            events.push(StoredEvent {
                sequence,
                bytes: event.encode_to_vec(),
            });
        }
        let task = Task {
            task_id: id.clone(),
            spec: Some(TaskSpec {
                prompt: "a synthetic task".into(),
                ..TaskSpec::default()
            }),
            status: status as i32,
            attempt: 1,
            worker_id: "bench-worker".into(),
            last_sequence: events_per_task as u64,
            ..Task::default()
        };
        let book = Bookkeeping {
            worker_address: worker_address.to_owned(),
            run_sequence: events_per_task as u64,
            ..Bookkeeping::default()
        };
        written += events.len() as u64;
        batch.push(Write {
            id,
            row: Row {
                kind: SubjectKind::Task,
                status: status as i32,
                ended: !live,
                idempotency_key: None,
                record: task.encode_to_vec(),
                bookkeeping: book.encode_to_vec(),
                last_sequence: events_per_task as u64,
                end_time_ms: (!live).then(crate::db::now_ms),
            },
            events,
        });
        if batch.len() * events_per_task.max(1) >= 20_000 {
            db.commit(&batch).await.map_err(|err| err.to_string())?;
            batch.clear();
        }
    }
    db.commit(&batch).await.map_err(|err| err.to_string())?;
    db.close().await;
    Ok(written)
}

/// Streams `events` text events of one running task, and its end, to `subscribers` followers
/// at once through the driver's event log, with the embedded store in `dir`. Returns the time
/// from the first event appended until every follower has had every event.
pub async fn fan_out(
    dir: &std::path::Path,
    subscribers: usize,
    events: usize,
) -> Result<std::time::Duration, String> {
    use std::sync::Arc;

    use crate::journal::Reader;
    use crate::store::{Live, TaskStore};
    use tokio_util::sync::CancellationToken;

    let url = format!("sqlite://{}", dir.join("fan-out.db").display());
    let db = Arc::new(Db::open(&url, 4).await.map_err(|err| err.to_string())?);
    let live = Arc::new(Live::default());
    let stop = CancellationToken::new();
    let settle = live.clone();
    let (writer, _writing) = crate::writer::start(
        db.clone(),
        Box::new(move |id| settle.settle(id)),
        stop.clone(),
    );
    let store = TaskStore::new(db.clone(), writer, live);
    let spec = TaskSpec {
        prompt: "fan out".into(),
        ..TaskSpec::default()
    };
    let (entry, _) = store
        .insert(spec, "")
        .await
        .map_err(|err| err.to_string())?;
    entry.assign(1, "bench-worker", "127.0.0.1:1");
    let mut followers = Vec::with_capacity(subscribers);
    for _ in 0..subscribers {
        let (sender, mut received) = tokio::sync::mpsc::channel(1024);
        let reader = Reader {
            db: db.clone(),
            stop: CancellationToken::new(),
        };
        tokio::spawn(entry.clone().follow(reader, 0, sender));
        // The stream ends after the terminal status: counting to its end counts every event.
        followers.push(tokio::spawn(async move {
            let mut count = 0;
            while let Some(Ok(_)) = received.recv().await {
                count += 1;
            }
            count
        }));
    }
    let started = std::time::Instant::now();
    for index in 0..events {
        let text = Kind::Text(AgentText {
            text: format!("event {index} of a streaming agent"),
            ..AgentText::default()
        });
        entry.append(1, text);
        // A writer that appends as fast as memory allows would only measure the channel's
        // back-pressure; an agent's events arrive over a network, a few at a time.
        if index % 64 == 63 {
            tokio::task::yield_now().await;
        }
    }
    entry.append(
        1,
        Kind::StatusChange(StatusChange {
            status: TaskStatus::Completed as i32,
            ..StatusChange::default()
        }),
    );
    let expected = entry.snapshot().last_sequence as usize;
    for follower in followers {
        let seen = follower.await.map_err(|err| err.to_string())?;
        if seen != expected {
            return Err(format!("a follower saw {seen} of {expected} events"));
        }
    }
    let elapsed = started.elapsed();
    stop.cancel();
    Ok(elapsed)
}
