//! Watching one agent from start to end: the part of execution every provider shares.

use std::collections::VecDeque;
use std::time::Duration;

use claudecluster_agent_protocol::{AgentEvent, ResultEvent, parse_line};
use claudecluster_proto::v1::TaskStatus;
use claudecluster_proto::v1::event::Kind;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::{AgentControl, AgentExit, AgentHandle, OutputLine, OutputStream};
use crate::events;

/// Limits an agent runs under.
#[derive(Debug, Clone, Copy)]
pub struct Supervision {
    /// Wall-clock limit of the whole run.
    pub timeout: Duration,
    /// The agent is stopped when it prints nothing for this long.
    pub idle_timeout: Duration,
    /// Time between SIGINT and kill.
    pub grace_period: Duration,
    /// Output lines longer than this are cut (`worker.agent.maxLineBytes`).
    pub max_line_bytes: usize,
}

/// Why the supervisor stopped an agent.
#[derive(Debug, Clone, PartialEq)]
pub enum StopCause {
    Cancelled(String),
    TimedOut(Duration),
    Idle(Duration),
}

/// A cancel request with the reason the task will record.
#[derive(Debug, Clone, Default)]
pub struct Cancellation {
    token: CancellationToken,
    reason: std::sync::Arc<std::sync::OnceLock<String>>,
}

impl Cancellation {
    /// Cancels; the first reason given is kept.
    pub fn cancel(&self, reason: impl Into<String>) {
        let _ = self.reason.set(reason.into());
        self.token.cancel();
    }

    pub async fn cancelled(&self) -> String {
        self.token.cancelled().await;
        self.reason()
    }

    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    pub fn reason(&self) -> String {
        self.reason
            .get()
            .cloned()
            .unwrap_or_else(|| "cancelled".to_owned())
    }
}

/// How a run ended, for the task's terminal status.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub status: TaskStatus,
    pub reason: String,
    pub result: Option<ResultEvent>,
}

impl Outcome {
    pub fn failed(reason: impl Into<String>) -> Self {
        Outcome {
            status: TaskStatus::Failed,
            reason: reason.into(),
            result: None,
        }
    }
}

/// How long output may still arrive after the agent exited (buffered lines, tools' leftovers).
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);
/// Stderr lines kept to explain a failure.
pub(crate) const STDERR_TAIL: usize = 5;

/// Streams the agent's events to `emit` until it ends, enforcing `supervision` and `cancel`,
/// then releases the agent and decides the outcome.
pub async fn supervise<F, Fut>(
    agent: AgentHandle,
    supervision: Supervision,
    cancel: &Cancellation,
    emit: F,
) -> Outcome
where
    F: FnMut(Kind) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (outcome, ending) = supervise_turn(agent, supervision, cancel, emit).await;
    ending.finish().await;
    outcome
}

/// What is left of an agent once its outcome is known: its exit, and what it held.
#[must_use = "an agent must be ended: call `finish`"]
pub struct Ending {
    output: mpsc::Receiver<OutputLine>,
    exit_rx: oneshot::Receiver<AgentExit>,
    exited: bool,
    control: Box<dyn AgentControl>,
    grace_period: Duration,
}

impl Ending {
    /// Lets the agent exit, killing it after the grace period, then releases what it held (its
    /// container, its network). Output still printed is
    /// read, so that the agent never blocks on a full pipe, and only logged: its task's log
    /// has ended.
    pub async fn finish(mut self) {
        if !self.exited {
            self.exit().await;
        }
        self.control.release().await;
    }

    /// Waits for the agent to exit, killing it after the grace period.
    async fn exit(&mut self) -> AgentExit {
        let output = &mut self.output;
        let draining = async {
            while let Some(line) = output.recv().await {
                tracing::debug!(stream = ?line.stream, line = %line.text, "agent output after its result");
            }
            std::future::pending::<std::convert::Infallible>().await
        };
        let exit = tokio::select! {
            exit = wait_for_exit(&mut self.exit_rx, &*self.control, self.grace_period) => exit,
            never = draining => match never {},
        };
        self.exited = true;
        exit
    }
}

/// Streams the agent's events to `emit` until its turn has ended, enforcing `supervision` and
/// `cancel`, and decides the outcome. An agent that gave its result is done: its outcome does
/// not wait for it to exit, nor for what it held to be released; the returned [`Ending`] does
/// that.
pub async fn supervise_turn<F, Fut>(
    agent: AgentHandle,
    supervision: Supervision,
    cancel: &Cancellation,
    mut emit: F,
) -> (Outcome, Ending)
where
    F: FnMut(Kind) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let AgentHandle {
        mut output,
        exit: mut exit_rx,
        control,
        mut input,
        description: _,
        grant,
    } = agent;
    let started = Instant::now();
    let deadline = started + supervision.timeout;
    let mut idle_deadline = started + supervision.idle_timeout;
    let mut stop: Option<StopCause> = None;
    let mut kill_at: Option<Instant> = None;
    let mut exit: Option<AgentExit> = None;
    let mut drain_until: Option<Instant> = None;
    let mut result: Option<ResultEvent> = None;
    let mut stderr_tail: VecDeque<String> = VecDeque::with_capacity(STDERR_TAIL);

    loop {
        let mut stopping = None;
        tokio::select! {
            line = output.recv() => match line {
                Some(line) => {
                    idle_deadline = Instant::now() + supervision.idle_timeout;
                    handle_line(line, supervision.max_line_bytes, &mut result, &mut stderr_tail, &mut emit).await;
                    if result.is_some() {
                        // One turn per task: closing its stdin ends an agent that reads
                        // messages there.
                        input.take();
                        // The result is the last event of a turn: the outcome is known, unless a
                        // cancel came first (it wins, and stops the agent as it would anyway).
                        if stop.is_none() && exit.is_none() && !cancel.is_cancelled() {
                            break;
                        }
                    }
                }
                None => break,
            },
            status = &mut exit_rx, if exit.is_none() => {
                exit = Some(status.unwrap_or_default());
                drain_until = Some(Instant::now() + DRAIN_AFTER_EXIT);
            }
            _ = sleep_until(drain_until.unwrap_or(deadline)), if drain_until.is_some() => break,
            _ = sleep_until(idle_deadline), if stop.is_none() && exit.is_none() => {
                stopping = Some(StopCause::Idle(supervision.idle_timeout));
            }
            _ = sleep_until(deadline), if stop.is_none() && exit.is_none() => {
                stopping = Some(StopCause::TimedOut(supervision.timeout));
            }
            reason = cancel.cancelled(), if stop.is_none() && exit.is_none() => {
                stopping = Some(StopCause::Cancelled(reason));
            }
            _ = sleep_until(kill_at.unwrap_or(deadline)), if kill_at.is_some() => {
                kill_at = None;
                if let Err(err) = control.kill().await {
                    tracing::warn!(error = %err, "cannot kill agent");
                }
            }
        }
        if let Some(cause) = stopping {
            tracing::info!(?cause, "stopping agent");
            if let Err(err) = control.interrupt().await {
                tracing::warn!(error = %err, "cannot interrupt agent; killing it");
                let _ = control.kill().await;
            }
            kill_at = Some(Instant::now() + supervision.grace_period);
            stop = Some(cause);
        }
    }
    let mut ending = Ending {
        output,
        exit_rx,
        exited: exit.is_some(),
        control,
        grace_period: supervision.grace_period,
    };
    // The turn is over: the agent's token at the credential proxy is revoked now, whether or
    // not the agent has exited yet.
    drop(grant);
    if let (None, Some(result)) = (&stop, &result)
        && !cancel.is_cancelled()
    {
        let outcome = decide(
            None,
            Some(result.clone()),
            &AgentExit::default(),
            &stderr_tail,
        );
        return (outcome, ending);
    }
    // Without a result, how the agent exited is part of the outcome.
    let exit = match exit {
        Some(exit) => exit,
        None => ending.exit().await,
    };
    // A cancel asked for before the agent's end was seen wins, even if the agent ended on its
    // own before the loop looked at the cancel: which of the two the loop saw first is chance.
    let stop = stop.or_else(|| {
        cancel
            .is_cancelled()
            .then(|| StopCause::Cancelled(cancel.reason()))
    });
    (decide(stop, result, &exit, &stderr_tail), ending)
}

/// Turns one output line into events: parsed stream-json events, or the line itself. Keeps the
/// result and the last stderr lines. A line longer than `max_line_bytes` is cut, with a marker,
/// and kept as a line: what it said is not whole, so it is not parsed.
pub(crate) async fn handle_line<F, Fut>(
    mut line: OutputLine,
    max_line_bytes: usize,
    result: &mut Option<ResultEvent>,
    stderr_tail: &mut VecDeque<String>,
    emit: &mut F,
) where
    F: FnMut(Kind) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    if line.text.len() > max_line_bytes {
        // Keys come in any order: look for the type before the cut may take it away. Inside a
        // JSON string the quotes would be escaped, so this is the event's own type.
        let was_result =
            line.stream == OutputStream::Stdout && line.text.contains(r#""type":"result""#);
        let mut keep = max_line_bytes;
        while !line.text.is_char_boundary(keep) {
            keep -= 1;
        }
        let cut = (line.text.len() - keep) as u64;
        line.text.truncate(keep);
        line.text.push_str(&format!(
            " [cut: {cut} more bytes, past worker.agent.maxLineBytes]"
        ));
        tracing::warn!(bytes_cut = cut, "an output line was too long; it was cut");
        // The agent's answer itself was too long: it ends the turn all the same (an agent that
        // reads its messages on stdin waits for the next one), as a failure that says why.
        if was_result {
            *result = Some(ResultEvent {
                subtype: "error_during_execution".to_owned(),
                is_error: true,
                errors: Some(vec![format!(
                    "its result was {} bytes, longer than worker.agent.maxLineBytes ({max_line_bytes})",
                    max_line_bytes as u64 + cut
                )]),
                ..ResultEvent::default()
            });
        }
        emit(events::output_line_cut(line, cut)).await;
        return;
    }
    if line.stream == OutputStream::Stdout {
        if let Ok(parsed) = parse_line(&line.text) {
            for event in parsed {
                if let AgentEvent::Result(r) = &event {
                    *result = Some(r.clone());
                }
                emit(events::agent_event(event)).await;
            }
            return;
        }
    } else if !line.text.trim().is_empty() {
        if stderr_tail.len() == STDERR_TAIL {
            stderr_tail.pop_front();
        }
        stderr_tail.push_back(line.text.clone());
    }
    emit(events::output_line(line)).await;
}

/// The output closed: the agent is ending. Give it the grace period, then kill it.
async fn wait_for_exit(
    exit_rx: &mut tokio::sync::oneshot::Receiver<AgentExit>,
    control: &dyn super::AgentControl,
    grace_period: Duration,
) -> AgentExit {
    match tokio::time::timeout(grace_period, &mut *exit_rx).await {
        Ok(exit) => exit.unwrap_or_default(),
        Err(_) => {
            tracing::warn!("agent closed its output but did not exit; killing it");
            let _ = control.kill().await;
            exit_rx.await.unwrap_or_default()
        }
    }
}

/// The outcome: a stop the supervisor caused wins; otherwise the result event decides, and a
/// run without one has failed.
fn decide(
    stop: Option<StopCause>,
    result: Option<ResultEvent>,
    exit: &AgentExit,
    stderr_tail: &VecDeque<String>,
) -> Outcome {
    let (status, reason) = match (&stop, &result) {
        (Some(StopCause::Cancelled(reason)), _) => (TaskStatus::Cancelled, reason.clone()),
        (Some(StopCause::TimedOut(limit)), _) => (
            TaskStatus::Failed,
            format!("timed out after {}", human(*limit)),
        ),
        (Some(StopCause::Idle(limit)), _) => (
            TaskStatus::Failed,
            format!(
                "the agent printed nothing for {} and was stopped by the idle watchdog",
                human(*limit)
            ),
        ),
        (None, Some(result)) => match result.failure_reason() {
            Some(reason) => (TaskStatus::Failed, reason),
            None => (TaskStatus::Completed, String::new()),
        },
        (None, None) => {
            let mut reason = format!("the agent {exit} without a result");
            if let Some(last) = stderr_tail.back() {
                reason.push_str(": ");
                reason.push_str(last.trim());
            }
            (TaskStatus::Failed, reason)
        }
    };
    Outcome {
        status,
        reason,
        result,
    }
}

fn human(duration: Duration) -> String {
    let millis = duration.as_millis();
    if !millis.is_multiple_of(1000) {
        format!("{millis} ms")
    } else {
        let seconds = duration.as_secs();
        if seconds.is_multiple_of(60) && seconds >= 60 {
            format!("{} min", seconds / 60)
        } else {
            format!("{seconds} s")
        }
    }
}

#[cfg(test)]
mod tests {
    //! The supervisor against a fake agent: output lines and an exit fed by the test.
    use std::sync::{Arc, Mutex};

    use async_trait::async_trait;
    use tokio::sync::{mpsc, oneshot};

    use super::*;
    use crate::execution::AgentControl;

    #[derive(Default, Clone)]
    struct FakeControl {
        calls: Arc<Mutex<Vec<&'static str>>>,
        /// Fired on interrupt or kill, so the fake agent can "exit".
        on_signal: Arc<Mutex<Option<oneshot::Sender<AgentExit>>>>,
        exit_on: &'static str,
    }

    #[async_trait]
    impl AgentControl for FakeControl {
        async fn interrupt(&self) -> std::io::Result<()> {
            self.calls.lock().unwrap().push("interrupt");
            if self.exit_on == "interrupt" {
                self.exit(AgentExit {
                    code: Some(0),
                    ..Default::default()
                });
            }
            Ok(())
        }
        async fn kill(&self) -> std::io::Result<()> {
            self.calls.lock().unwrap().push("kill");
            self.exit(AgentExit {
                signal: Some(9),
                ..Default::default()
            });
            Ok(())
        }
        async fn release(&self) {
            self.calls.lock().unwrap().push("release");
        }
    }

    impl FakeControl {
        fn exit(&self, exit: AgentExit) {
            if let Some(tx) = self.on_signal.lock().unwrap().take() {
                let _ = tx.send(exit);
            }
        }
    }

    struct FakeAgent {
        lines: mpsc::Sender<OutputLine>,
        control: FakeControl,
    }

    fn fake_agent(exit_on: &'static str) -> (FakeAgent, AgentHandle) {
        let (lines, output) = mpsc::channel(16);
        let (exit_tx, exit) = oneshot::channel();
        let control = FakeControl {
            exit_on,
            on_signal: Arc::new(Mutex::new(Some(exit_tx))),
            ..Default::default()
        };
        let handle = AgentHandle {
            output,
            exit,
            control: Box::new(control.clone()),
            input: None,
            description: "a fake agent".into(),
            grant: None,
        };
        (FakeAgent { lines, control }, handle)
    }

    fn limits() -> Supervision {
        Supervision {
            timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(30),
            grace_period: Duration::from_secs(5),
            max_line_bytes: 1 << 20,
        }
    }

    async fn collect(
        handle: AgentHandle,
        supervision: Supervision,
        cancel: &Cancellation,
    ) -> (Outcome, Vec<Kind>) {
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let outcome = supervise(handle, supervision, cancel, move |kind| {
            sink.lock().unwrap().push(kind);
            async {}
        })
        .await;
        let events = events.lock().unwrap().clone();
        (outcome, events)
    }

    fn stdout(text: &str) -> OutputLine {
        OutputLine {
            stream: OutputStream::Stdout,
            text: text.to_owned(),
        }
    }

    const SUCCESS: &str = r#"{"type":"result","subtype":"success","is_error":false,"result":"done","num_turns":1,"total_cost_usd":0.01}"#;

    #[tokio::test]
    async fn a_success_result_completes_even_with_a_nonzero_exit() {
        let (agent, handle) = fake_agent("never");
        agent.lines.send(stdout(SUCCESS)).await.unwrap();
        agent.control.exit(AgentExit {
            code: Some(1),
            ..Default::default()
        });
        drop(agent.lines);
        let (outcome, events) = collect(handle, limits(), &Cancellation::default()).await;
        assert_eq!(outcome.status, TaskStatus::Completed);
        assert!(matches!(events.last(), Some(Kind::Result(r)) if r.text == "done"));
        assert_eq!(*agent.control.calls.lock().unwrap(), vec!["release"]);
    }

    #[tokio::test]
    async fn the_outcome_does_not_wait_for_the_agent_to_exit_nor_for_its_release() {
        let (agent, handle) = fake_agent("never");
        agent.lines.send(stdout(SUCCESS)).await.unwrap();
        let (outcome, ending) =
            supervise_turn(handle, limits(), &Cancellation::default(), |_| async {}).await;
        assert_eq!(outcome.status, TaskStatus::Completed);
        assert!(
            agent.control.calls.lock().unwrap().is_empty(),
            "nothing released while the agent still runs"
        );
        let finishing = tokio::spawn(ending.finish());
        // Output after the result is read, so that the agent never blocks on its pipe.
        for _ in 0..64 {
            agent.lines.send(stdout("late line")).await.unwrap();
        }
        agent.control.exit(AgentExit {
            code: Some(0),
            ..Default::default()
        });
        finishing.await.unwrap();
        assert_eq!(*agent.control.calls.lock().unwrap(), vec!["release"]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_agent_that_does_not_exit_after_its_result_is_killed_then_released() {
        let (agent, handle) = fake_agent("never");
        agent.lines.send(stdout(SUCCESS)).await.unwrap();
        let (outcome, ending) =
            supervise_turn(handle, limits(), &Cancellation::default(), |_| async {}).await;
        assert_eq!(outcome.status, TaskStatus::Completed);
        ending.finish().await;
        assert_eq!(
            *agent.control.calls.lock().unwrap(),
            vec!["kill", "release"],
            "killed after the grace period"
        );
    }

    #[tokio::test]
    async fn an_exit_without_result_fails_with_the_last_stderr_line() {
        let (agent, handle) = fake_agent("never");
        agent
            .lines
            .send(OutputLine {
                stream: OutputStream::Stderr,
                text: "Error: something specific broke".into(),
            })
            .await
            .unwrap();
        agent.lines.send(stdout("not json at all")).await.unwrap();
        agent.control.exit(AgentExit {
            code: Some(3),
            ..Default::default()
        });
        drop(agent.lines);
        let (outcome, events) = collect(handle, limits(), &Cancellation::default()).await;
        assert_eq!(outcome.status, TaskStatus::Failed);
        assert_eq!(
            outcome.reason,
            "the agent exited 3 without a result: Error: something specific broke"
        );
        assert_eq!(events.len(), 2, "both lines are kept as output events");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_agent_is_stopped_by_the_idle_watchdog() {
        let (agent, handle) = fake_agent("never");
        let supervision = Supervision {
            idle_timeout: Duration::from_secs(2),
            ..limits()
        };
        let lines = agent.lines.clone();
        let (outcome, _) = collect(handle, supervision, &Cancellation::default()).await;
        drop(lines);
        assert_eq!(outcome.status, TaskStatus::Failed);
        assert!(
            outcome.reason.contains("printed nothing for 2 s"),
            "{}",
            outcome.reason
        );
        assert_eq!(
            *agent.control.calls.lock().unwrap(),
            vec!["interrupt", "kill", "release"],
            "the agent ignored SIGINT, so it was killed after the grace period"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_wall_clock_limit_applies_even_to_a_chatty_agent() {
        let (agent, handle) = fake_agent("interrupt");
        let supervision = Supervision {
            timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(3),
            ..limits()
        };
        let lines = agent.lines.clone();
        tokio::spawn(async move {
            loop {
                if lines
                    .send(stdout("{\"type\":\"keepalive\"}"))
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        drop(agent.lines);
        let (outcome, _) = collect(handle, supervision, &Cancellation::default()).await;
        assert_eq!(outcome.status, TaskStatus::Failed);
        assert_eq!(outcome.reason, "timed out after 10 s");
        assert_eq!(agent.control.calls.lock().unwrap()[0], "interrupt");
    }

    #[tokio::test]
    async fn cancel_interrupts_and_reports_cancelled_despite_a_result() {
        let (agent, handle) = fake_agent("interrupt");
        let cancel = Cancellation::default();
        cancel.cancel("cancelled by the client");
        let interrupted_result =
            r#"{"type":"result","subtype":"error_during_execution","is_error":true}"#;
        agent.lines.send(stdout(interrupted_result)).await.unwrap();
        drop(agent.lines);
        let (outcome, _) = collect(handle, limits(), &cancel).await;
        assert_eq!(outcome.status, TaskStatus::Cancelled);
        assert_eq!(outcome.reason, "cancelled by the client");
    }

    #[tokio::test]
    async fn an_error_result_fails_with_its_reason() {
        let (agent, handle) = fake_agent("never");
        let error = r#"{"type":"result","subtype":"success","is_error":true,"api_error_status":529,"result":"API Error: 529 overloaded"}"#;
        agent.lines.send(stdout(error)).await.unwrap();
        agent.control.exit(AgentExit {
            code: Some(1),
            ..Default::default()
        });
        drop(agent.lines);
        let (outcome, _) = collect(handle, limits(), &Cancellation::default()).await;
        assert_eq!(outcome.status, TaskStatus::Failed);
        assert_eq!(
            outcome.reason,
            "agent stopped on an api error (status 529): API Error: 529 overloaded"
        );
    }

    #[tokio::test]
    async fn a_line_past_the_limit_is_cut_with_a_marker_and_not_parsed() {
        let (agent, handle) = fake_agent("never");
        let long_result = format!(
            r#"{{"type":"result","subtype":"success","is_error":false,"result":"{}"}}"#,
            "x".repeat(5000)
        );
        agent.lines.send(stdout(&long_result)).await.unwrap();
        agent.control.exit(AgentExit {
            code: Some(0),
            ..Default::default()
        });
        drop(agent.lines);
        let supervision = Supervision {
            max_line_bytes: 1024,
            ..limits()
        };
        let (outcome, events) = collect(handle, supervision, &Cancellation::default()).await;
        let Some(Kind::Output(line)) = events.first() else {
            panic!("{events:?}");
        };
        let cut = long_result.len() as u64 - 1024;
        assert_eq!(line.cut_bytes, cut);
        assert!(line.line.starts_with(&long_result[..1024]));
        assert!(line.line.ends_with(&format!(
            " [cut: {cut} more bytes, past worker.agent.maxLineBytes]"
        )));
        assert_eq!(outcome.status, TaskStatus::Failed);
        assert_eq!(
            outcome.reason,
            format!(
                "agent reported error during execution: its result was {} bytes, longer than worker.agent.maxLineBytes (1024)",
                long_result.len()
            )
        );
    }
}
