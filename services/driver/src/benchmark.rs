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
