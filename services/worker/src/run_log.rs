//! A run's log: every event a task's attempt or a session emits, numbered from 1 without gaps,
//! kept whether or not anyone is listening.
//!
//! The run appends; callers follow. A follower replays the log after the run sequence it asks
//! for, then waits for more, and ends once the log is finished and it has read everything.
//! Appending never waits for a follower, so a slow or absent driver never stalls an agent.
//! Memory stays bounded: when the events held get too many or too large, the oldest are
//! written to a file of the run's own and read back from there by followers that need them.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use claudecluster_proto::v1::Event;
use futures_util::Stream;
use prost::Message;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};

use crate::error::WorkerError;

/// Events read in one go by a follower, from memory or from the spill file.
const BATCH: usize = 256;

/// How much of its log a run holds in memory before spilling the oldest part to its file.
#[derive(Debug, Clone, Copy)]
pub struct LogBounds {
    pub max_held_events: usize,
    pub max_held_bytes: usize,
}

impl Default for LogBounds {
    fn default() -> Self {
        LogBounds {
            max_held_events: 10_000,
            max_held_bytes: 32 << 20,
        }
    }
}

/// Whether anyone follows the log, and since when nobody has.
#[derive(Debug, Clone, Copy)]
struct Attachment {
    followers: usize,
    detached_since: Instant,
}

struct LogState {
    /// The newest events; older ones are in the spill file.
    held: VecDeque<Event>,
    held_bytes: usize,
    /// The run sequence of `held[0]` (or of the next event, when nothing is held).
    first_held: u64,
    /// Open for appending once something was spilled.
    spill: Option<File>,
    /// Spilling failed once: everything stays in memory from then on (and the failure was
    /// logged once).
    spill_failed: bool,
    ended_at: Option<Instant>,
}

impl LogState {
    fn last_sequence(&self) -> u64 {
        self.first_held + self.held.len() as u64 - 1
    }
}

pub struct RunLog {
    /// What the log belongs to, for messages: `task t1 attempt 2`, `session s1`.
    name: String,
    state: Mutex<LogState>,
    /// The last run sequence appended; bumped on finish too. Followers wait on it.
    appended: watch::Sender<u64>,
    attachment: watch::Sender<Attachment>,
    spill_path: PathBuf,
    bounds: LogBounds,
}

/// What a follower finds after its position.
enum Found {
    /// Events held in memory.
    Held(Vec<(u64, Event)>),
    /// The next events are in the spill file, up to and including this run sequence.
    Spilled {
        through: u64,
    },
    Nothing,
    End,
}

impl RunLog {
    /// An empty log that spills to `spill_path` (created only when needed, removed with the
    /// log).
    pub fn new(name: impl Into<String>, spill_path: PathBuf, bounds: LogBounds) -> Arc<Self> {
        Arc::new(RunLog {
            name: name.into(),
            state: Mutex::new(LogState {
                held: VecDeque::new(),
                held_bytes: 0,
                first_held: 1,
                spill: None,
                spill_failed: false,
                ended_at: None,
            }),
            appended: watch::Sender::new(0),
            attachment: watch::Sender::new(Attachment {
                followers: 0,
                detached_since: Instant::now(),
            }),
            spill_path,
            bounds,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.state.lock().expect("run log lock poisoned")
    }

    /// Appends `event` and returns its run sequence. A finished log takes nothing more.
    pub fn append(&self, event: Event) -> Option<u64> {
        let sequence = {
            let mut state = self.state();
            if state.ended_at.is_some() {
                tracing::warn!(log = %self.name, "an event after the end of a run was dropped");
                return None;
            }
            state.held_bytes += event.encoded_len();
            state.held.push_back(event);
            if state.held.len() > self.bounds.max_held_events
                || state.held_bytes > self.bounds.max_held_bytes
            {
                self.spill(&mut state);
            }
            state.last_sequence()
        };
        self.appended.send_replace(sequence);
        Some(sequence)
    }

    /// Appends `event` as the last one: followers end after it.
    pub fn finish_with(&self, event: Event) {
        self.append(event);
        self.finish();
    }

    /// Marks the log as complete: followers end once they have read everything.
    pub fn finish(&self) {
        let last = {
            let mut state = self.state();
            if state.ended_at.is_none() {
                state.ended_at = Some(Instant::now());
            }
            state.last_sequence()
        };
        self.appended.send_replace(last);
    }

    pub fn is_finished(&self) -> bool {
        self.state().ended_at.is_some()
    }

    /// Completes once the log is finished.
    pub async fn ended(&self) {
        let mut appended = self.appended.subscribe();
        while !self.is_finished() {
            if appended.changed().await.is_err() {
                return;
            }
        }
    }

    pub fn ended_at(&self) -> Option<Instant> {
        self.state().ended_at
    }

    /// The run sequence of the last event, 0 before the first.
    pub fn last_sequence(&self) -> u64 {
        self.state().last_sequence()
    }

    /// Writes the older half of what is held to the spill file.
    fn spill(&self, state: &mut LogState) {
        if state.spill_failed {
            return;
        }
        let count = state.held.len().div_ceil(2);
        let mut bytes = Vec::new();
        for event in state.held.iter().take(count) {
            let encoded = event.encode_to_vec();
            bytes.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&encoded);
        }
        let written = (|| -> std::io::Result<()> {
            if state.spill.is_none() {
                if let Some(dir) = self.spill_path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                state.spill = Some(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .truncate(true)
                        .write(true)
                        .open(&self.spill_path)?,
                );
            }
            state
                .spill
                .as_mut()
                .expect("opened above")
                .write_all(&bytes)
        })();
        match written {
            Ok(()) => {
                for event in state.held.drain(..count) {
                    state.held_bytes -= event.encoded_len();
                }
                state.first_held += count as u64;
            }
            Err(err) => {
                state.spill_failed = true;
                tracing::warn!(log = %self.name, path = %self.spill_path.display(), error = %err, "cannot spill a run's events to disk; keeping them in memory");
            }
        }
    }

    fn find_after(&self, after: u64) -> Found {
        let state = self.state();
        let next = after + 1;
        if next > state.last_sequence() {
            return if state.ended_at.is_some() {
                Found::End
            } else {
                Found::Nothing
            };
        }
        if next < state.first_held {
            return Found::Spilled {
                through: state.first_held - 1,
            };
        }
        let start = (next - state.first_held) as usize;
        let events = state
            .held
            .iter()
            .skip(start)
            .take(BATCH)
            .cloned()
            .zip(next..)
            .map(|(event, sequence)| (sequence, event))
            .collect();
        Found::Held(events)
    }

    /// The events after run sequence `after`, then every new one until the log is finished.
    /// The caller counts as attached while the stream lives.
    pub fn follow(
        self: &Arc<Self>,
        after: u64,
    ) -> impl Stream<Item = Result<(u64, Event), WorkerError>> + Send + 'static {
        let follower = Follower {
            appended: self.appended.subscribe(),
            _attached: Attached::new(self.clone()),
            log: self.clone(),
            after,
            ready: VecDeque::new(),
            spill: None,
            failed: false,
        };
        futures_util::stream::unfold(follower, |mut follower| async move {
            let item = follower.next().await?;
            Some((item, follower))
        })
    }

    /// Completes once nobody has followed the log for `timeout` in a row.
    pub async fn abandoned(&self, timeout: Duration) {
        let mut attachment = self.attachment.subscribe();
        loop {
            let now = *attachment.borrow_and_update();
            if now.followers == 0 {
                tokio::select! {
                    _ = sleep_until(now.detached_since + timeout) => return,
                    _ = attachment.changed() => {}
                }
            } else if attachment.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    #[cfg(test)]
    pub fn followers(&self) -> usize {
        self.attachment.borrow().followers
    }
}

impl Drop for RunLog {
    fn drop(&mut self) {
        let spilled = self
            .state
            .get_mut()
            .map(|state| state.spill.is_some())
            .unwrap_or(true);
        if spilled {
            let _ = std::fs::remove_file(&self.spill_path);
        }
    }
}

/// Counts a follower as attached while it lives.
struct Attached(Arc<RunLog>);

impl Attached {
    fn new(log: Arc<RunLog>) -> Self {
        log.attachment
            .send_modify(|attachment| attachment.followers += 1);
        Attached(log)
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.0.attachment.send_modify(|attachment| {
            attachment.followers -= 1;
            if attachment.followers == 0 {
                attachment.detached_since = Instant::now();
            }
        });
    }
}

/// A reader of the spill file, positioned before run sequence `next`.
struct SpillReader {
    file: BufReader<File>,
    next: u64,
}

impl SpillReader {
    /// Opens `path` and skips to run sequence `next`.
    fn open(path: &std::path::Path, next: u64) -> std::io::Result<Self> {
        let mut reader = SpillReader {
            file: BufReader::new(File::open(path)?),
            next: 1,
        };
        while reader.next < next {
            let length = reader.read_length()?;
            reader.file.seek_relative(i64::from(length))?;
            reader.next += 1;
        }
        Ok(reader)
    }

    fn read_length(&mut self) -> std::io::Result<u32> {
        let mut length = [0u8; 4];
        self.file.read_exact(&mut length)?;
        Ok(u32::from_le_bytes(length))
    }

    fn read_one(&mut self) -> std::io::Result<(u64, Event)> {
        let length = self.read_length()?;
        let mut bytes = vec![0; length as usize];
        self.file.read_exact(&mut bytes)?;
        let event = Event::decode(bytes.as_slice()).map_err(std::io::Error::other)?;
        let sequence = self.next;
        self.next += 1;
        Ok((sequence, event))
    }
}

struct Follower {
    log: Arc<RunLog>,
    appended: watch::Receiver<u64>,
    /// The last run sequence handed out.
    after: u64,
    ready: VecDeque<(u64, Event)>,
    spill: Option<SpillReader>,
    failed: bool,
    _attached: Attached,
}

impl Follower {
    async fn next(&mut self) -> Option<Result<(u64, Event), WorkerError>> {
        loop {
            if let Some((sequence, event)) = self.ready.pop_front() {
                self.after = sequence;
                return Some(Ok((sequence, event)));
            }
            if self.failed {
                return None;
            }
            // Marked seen before looking, so an append after the look wakes the wait below.
            self.appended.borrow_and_update();
            match self.log.find_after(self.after) {
                Found::Held(events) => self.ready.extend(events),
                Found::Spilled { through } => match self.read_spilled(through).await {
                    Ok(events) => self.ready.extend(events),
                    Err(err) => {
                        self.failed = true;
                        return Some(Err(WorkerError::RunLogLost {
                            run: self.log.name.clone(),
                            reason: format!("cannot read {}: {err}", self.log.spill_path.display()),
                        }));
                    }
                },
                Found::End => return None,
                Found::Nothing => {
                    if self.appended.changed().await.is_err() {
                        return None;
                    }
                }
            }
        }
    }

    /// Reads the spilled events after `self.after`, up to `through`, off the runtime's threads.
    async fn read_spilled(&mut self, through: u64) -> std::io::Result<Vec<(u64, Event)>> {
        let next = self.after + 1;
        let reader = self.spill.take().filter(|reader| reader.next == next);
        let path = self.log.spill_path.clone();
        let (reader, events) = tokio::task::spawn_blocking(move || {
            let mut reader = match reader {
                Some(reader) => reader,
                None => SpillReader::open(&path, next)?,
            };
            let mut events = Vec::new();
            while reader.next <= through && events.len() < BATCH {
                events.push(reader.read_one()?);
            }
            Ok::<_, std::io::Error>((reader, events))
        })
        .await
        .map_err(std::io::Error::other)??;
        self.spill = Some(reader);
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use claudecluster_proto::v1::event::Kind;
    use claudecluster_proto::v1::{AgentText, OutputLine};
    use futures_util::StreamExt;

    use super::*;

    fn text(n: u64) -> Event {
        Event {
            task_id: "t1".into(),
            attempt: 1,
            kind: Some(Kind::Text(AgentText {
                text: format!("event {n}"),
                ..Default::default()
            })),
            ..Event::default()
        }
    }

    fn text_of(event: &Event) -> &str {
        match &event.kind {
            Some(Kind::Text(text)) => &text.text,
            other => panic!("not a text event: {other:?}"),
        }
    }

    async fn collect(
        stream: impl Stream<Item = Result<(u64, Event), WorkerError>>,
    ) -> Vec<(u64, String)> {
        stream
            .map(|item| {
                let (sequence, event) = item.expect("readable");
                (sequence, text_of(&event).to_owned())
            })
            .collect()
            .await
    }

    fn expected(range: std::ops::RangeInclusive<u64>) -> Vec<(u64, String)> {
        range.map(|n| (n, format!("event {n}"))).collect()
    }

    #[tokio::test]
    async fn a_follower_replays_after_its_position_then_follows_until_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let log = RunLog::new("t1", dir.path().join("t1.events"), LogBounds::default());
        for n in 1..=3 {
            assert_eq!(log.append(text(n)), Some(n));
        }
        let follower = log.follow(1);
        let appender = {
            let log = log.clone();
            tokio::spawn(async move {
                for n in 4..=6 {
                    log.append(text(n));
                    tokio::task::yield_now().await;
                }
                log.finish();
            })
        };
        assert_eq!(collect(follower).await, expected(2..=6));
        appender.await.unwrap();
        assert_eq!(
            log.append(text(7)),
            None,
            "a finished log takes nothing more"
        );
    }

    #[tokio::test]
    async fn a_long_log_spills_to_disk_and_replays_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs").join("t1.events");
        let bounds = LogBounds {
            max_held_events: 10,
            max_held_bytes: usize::MAX,
        };
        let log = RunLog::new("t1", path.clone(), bounds);
        for n in 1..=95 {
            log.append(text(n));
        }
        log.finish();
        assert!(path.exists(), "the oldest events went to disk");
        assert!(
            log.state().held.len() <= 10,
            "at most the bound is held in memory"
        );
        assert_eq!(collect(log.follow(0)).await, expected(1..=95));
        assert_eq!(collect(log.follow(42)).await, expected(43..=95));
        assert_eq!(collect(log.follow(95)).await, Vec::new());
        drop(log);
        assert!(!path.exists(), "the spill file goes with its log");
    }

    #[tokio::test]
    async fn large_events_spill_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t1.events");
        let bounds = LogBounds {
            max_held_events: usize::MAX,
            max_held_bytes: 4096,
        };
        let log = RunLog::new("t1", path.clone(), bounds);
        let line = |n: u64| Event {
            kind: Some(Kind::Output(OutputLine {
                stream: 1,
                line: format!("{n}:{}", "x".repeat(1000)),
                cut_bytes: 0,
            })),
            ..Event::default()
        };
        for n in 1..=20 {
            log.append(line(n));
        }
        log.finish();
        assert!(log.state().held_bytes <= 4096 + 1100);
        let lines: Vec<String> = log
            .follow(0)
            .map(|item| match item.unwrap().1.kind {
                Some(Kind::Output(output)) => output.line,
                other => panic!("{other:?}"),
            })
            .collect()
            .await;
        assert_eq!(lines.len(), 20);
        assert!(
            lines
                .iter()
                .zip(1..)
                .all(|(line, n)| line.starts_with(&format!("{n}:")))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn abandonment_counts_from_the_last_follower_leaving() {
        let dir = tempfile::tempdir().unwrap();
        let log = RunLog::new("t1", dir.path().join("t1.events"), LogBounds::default());
        let follower = log.follow(0);
        assert_eq!(log.followers(), 1);
        let timeout = Duration::from_secs(300);
        // Attached for twice the timeout: not abandoned.
        let attached_for = tokio::time::timeout(timeout * 2, log.abandoned(timeout)).await;
        assert!(attached_for.is_err(), "abandoned while followed");
        let left = Instant::now();
        drop(follower);
        assert_eq!(log.followers(), 0);
        log.abandoned(timeout).await;
        assert_eq!(left.elapsed(), timeout);
    }
}
