//! A fake execution provider for tests of the runtime: every agent it "launches" is handed to
//! the test, which says what the agent prints and when it exits. An interrupted or killed fake
//! agent exits at once, as does one whose stdin closes.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use claudecluster_proto::v1::ExecutionMode;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::execution::{
    AgentControl, AgentExit, AgentHandle, AgentInput, AgentLaunch, ExecutionProvider, LaunchError,
    OutputLine, OutputStream, ProviderHealth,
};

pub const SUCCESS: &str = r#"{"type":"result","subtype":"success","is_error":false,"result":"done","num_turns":1,"total_cost_usd":0.01,"session_id":"agent-session-1"}"#;

/// What the test holds of the provider.
pub struct FakeProviderHandle {
    launched: mpsc::UnboundedReceiver<FakeAgent>,
    health_checked: mpsc::UnboundedReceiver<()>,
    health_gate: Arc<Semaphore>,
    shut_down: Arc<tokio::sync::Notify>,
}

impl FakeProviderHandle {
    /// Completes once the worker has told the provider it is done with it.
    pub async fn shut_down(&self) {
        self.shut_down.notified().await;
    }

    /// The next agent the provider started.
    pub async fn next_agent(&mut self) -> FakeAgent {
        self.launched.recv().await.expect("the provider is gone")
    }

    /// True when no agent was started since the last one taken.
    pub fn started_none(&mut self) -> bool {
        self.launched.try_recv().is_err()
    }

    /// Completes once someone awaits the provider's health (and holds there while the gate is
    /// shut).
    pub async fn health_checked(&mut self) {
        self.health_checked
            .recv()
            .await
            .expect("the provider is gone");
    }

    /// Lets every health check through from now on.
    pub fn open_health_gate(&self) {
        self.health_gate.add_permits(Semaphore::MAX_PERMITS / 2);
    }
}

pub struct FakeProvider {
    mode: ExecutionMode,
    launched: mpsc::UnboundedSender<FakeAgent>,
    health_checked: mpsc::UnboundedSender<()>,
    health_gate: Arc<Semaphore>,
    panic_on_launch: bool,
    shut_down: Arc<tokio::sync::Notify>,
}

impl FakeProvider {
    /// A provider of `mode` whose health checks pass at once.
    pub fn new(mode: ExecutionMode) -> (Arc<Self>, FakeProviderHandle) {
        let (provider, handle) = Self::gated(mode);
        handle.open_health_gate();
        (provider, handle)
    }

    /// A provider of `mode` whose health checks wait until the test opens the gate.
    pub fn gated(mode: ExecutionMode) -> (Arc<Self>, FakeProviderHandle) {
        Self::build(mode, false)
    }

    /// A provider of `mode` that panics when asked to start an agent.
    pub fn panicking(mode: ExecutionMode) -> (Arc<Self>, FakeProviderHandle) {
        let (provider, handle) = Self::build(mode, true);
        handle.open_health_gate();
        (provider, handle)
    }

    fn build(mode: ExecutionMode, panic_on_launch: bool) -> (Arc<Self>, FakeProviderHandle) {
        let (launched, launched_rx) = mpsc::unbounded_channel();
        let (health_checked, health_checked_rx) = mpsc::unbounded_channel();
        let health_gate = Arc::new(Semaphore::new(0));
        let shut_down = Arc::new(tokio::sync::Notify::new());
        let provider = Arc::new(FakeProvider {
            mode,
            launched,
            health_checked,
            health_gate: health_gate.clone(),
            panic_on_launch,
            shut_down: shut_down.clone(),
        });
        let handle = FakeProviderHandle {
            launched: launched_rx,
            health_checked: health_checked_rx,
            health_gate,
            shut_down,
        };
        (provider, handle)
    }
}

#[async_trait]
impl ExecutionProvider for FakeProvider {
    fn mode(&self) -> ExecutionMode {
        self.mode
    }

    async fn shut_down(&self) {
        // A permit is kept when no one waits yet.
        self.shut_down.notify_one();
    }

    async fn health(&self) -> ProviderHealth {
        let _ = self.health_checked.send(());
        let _pass = self.health_gate.acquire().await;
        ProviderHealth::Ready
    }

    async fn launch(&self, launch: AgentLaunch) -> Result<AgentHandle, LaunchError> {
        assert!(!self.panic_on_launch, "the fake provider panics as asked");
        let (lines, output) = mpsc::channel(64);
        let (exit_tx, exit) = oneshot::channel();
        let agent = Arc::new(AgentState {
            lines: Mutex::new(Some(lines)),
            exit: Mutex::new(Some(exit_tx)),
            signals: Mutex::new(Vec::new()),
            release_gate: Semaphore::new(Semaphore::MAX_PERMITS),
            released: std::sync::atomic::AtomicBool::new(false),
        });
        let (input, inputs) = match launch.input {
            AgentInput::StreamJson => {
                let (input, mut lines) = mpsc::channel::<String>(8);
                let (forward, inputs) = mpsc::unbounded_channel();
                let state = agent.clone();
                tokio::spawn(async move {
                    while let Some(line) = lines.recv().await {
                        let _ = forward.send(line);
                    }
                    // Stdin closed: a stream-json agent exits.
                    state.exit(0);
                });
                (Some(input), Some(inputs))
            }
            AgentInput::None => (None, None),
        };
        let _ = self.launched.send(FakeAgent {
            launch,
            state: agent.clone(),
            inputs,
        });
        Ok(AgentHandle {
            output,
            exit,
            control: Box::new(FakeControl(agent)),
            input,
            description: "a fake agent".into(),
            grant: None,
        })
    }
}

struct AgentState {
    lines: Mutex<Option<mpsc::Sender<OutputLine>>>,
    exit: Mutex<Option<oneshot::Sender<AgentExit>>>,
    signals: Mutex<Vec<&'static str>>,
    /// Open unless the test holds the release back.
    release_gate: Semaphore,
    released: std::sync::atomic::AtomicBool,
}

impl AgentState {
    /// Closes the output and exits with `code`.
    fn exit(&self, code: i32) {
        self.lines.lock().unwrap().take();
        if let Some(exit) = self.exit.lock().unwrap().take() {
            let _ = exit.send(AgentExit {
                code: Some(code),
                ..AgentExit::default()
            });
        }
    }
}

struct FakeControl(Arc<AgentState>);

#[async_trait]
impl AgentControl for FakeControl {
    async fn interrupt(&self) -> std::io::Result<()> {
        self.0.signals.lock().unwrap().push("interrupt");
        self.0.exit(0);
        Ok(())
    }

    async fn kill(&self) -> std::io::Result<()> {
        self.0.signals.lock().unwrap().push("kill");
        self.0.exit(137);
        Ok(())
    }

    async fn release(&self) {
        let _pass = self.0.release_gate.acquire().await;
        self.0
            .released
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A started fake agent, as the test drives it.
pub struct FakeAgent {
    pub launch: AgentLaunch,
    state: Arc<AgentState>,
    inputs: Option<mpsc::UnboundedReceiver<String>>,
}

impl FakeAgent {
    /// Prints `text` on stdout.
    pub async fn print(&self, text: &str) {
        let lines = self.state.lines.lock().unwrap().clone();
        if let Some(lines) = lines {
            let line = OutputLine {
                stream: OutputStream::Stdout,
                text: text.to_owned(),
            };
            let _ = lines.send(line).await;
        }
    }

    /// Prints a successful result and exits 0.
    pub async fn succeed(&self) {
        self.print(SUCCESS).await;
        self.state.exit(0);
    }

    /// The next message written to the agent's stdin.
    pub async fn next_input(&mut self) -> String {
        self.inputs
            .as_mut()
            .expect("the agent reads stdin")
            .recv()
            .await
            .expect("stdin closed")
    }

    /// How the worker signalled the agent so far.
    pub fn signals(&self) -> Vec<&'static str> {
        self.state.signals.lock().unwrap().clone()
    }

    /// Makes releasing what the agent held (its container, say) wait until
    /// [`FakeAgent::let_release`].
    pub fn hold_release(&self) {
        self.state
            .release_gate
            .forget_permits(Semaphore::MAX_PERMITS);
    }

    pub fn let_release(&self) {
        self.state.release_gate.add_permits(1);
    }

    /// Whether the worker released what the agent held.
    pub fn was_released(&self) -> bool {
        self.state
            .released
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether the agent has exited (by itself, or because the worker stopped it).
    pub fn has_exited(&self) -> bool {
        self.state.exit.lock().unwrap().is_none()
    }
}
