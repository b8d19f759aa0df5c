//! Switching the worker's default execution mode without restarting it.
//!
//! The switch runs as a task of its own, so a caller that goes away does not leave the worker
//! half switched, and its "switching" mark is a guard that clears itself however the switch
//! ends (done, failed, or panicked).

use std::sync::Arc;
use std::time::{Duration, Instant};

use claudecluster_config::ExecutionModeSetting;
use claudecluster_proto::v1::ExecutionMode;

use crate::error::WorkerError;
use crate::execution::Providers;
use crate::runtime::{Runtime, mode_setting};

/// How long the switch waits for the scheduler to confirm the new registration.
const CONFIRMATION_TIMEOUT: Duration = Duration::from_secs(10);

/// A mode switch under way: the worker admits nothing new until it is dropped.
struct Switching(Arc<Runtime>);

impl Switching {
    fn begin(runtime: &Arc<Runtime>) -> Result<Self, WorkerError> {
        let mut runs = runtime.runs();
        if runs.switching {
            return Err(WorkerError::Switching(runtime.worker_id.clone()));
        }
        runs.switching = true;
        Ok(Switching(runtime.clone()))
    }
}

impl Drop for Switching {
    fn drop(&mut self) {
        self.0.runs().switching = false;
    }
}

impl Runtime {
    /// Makes `mode` the worker's default mode without restarting it: it reports itself
    /// unavailable (nothing new is placed), waits for what runs to finish, starts the new
    /// mode's providers and warm pools, and registers again. Returns the new modes, the drain
    /// time and the switch time after the drain.
    pub async fn switch_mode(
        self: &Arc<Self>,
        mode: ExecutionMode,
    ) -> Result<(Vec<ExecutionMode>, Duration, Duration), WorkerError> {
        if mode == ExecutionMode::Unspecified {
            return Err(WorkerError::InvalidArgument {
                field: "execution_mode",
                message: "must be process_pool or container_agentic".into(),
            });
        }
        if mode == self.mode() {
            return Ok((self.modes(), Duration::ZERO, Duration::ZERO));
        }
        let switching = Switching::begin(self)?;
        let runtime = self.clone();
        let switched = tokio::spawn(async move { runtime.switch_to(mode, switching).await });
        switched.await.unwrap_or_else(|_| {
            Err(WorkerError::Unavailable {
                worker_id: self.worker_id.clone(),
                reason: "the mode switch failed unexpectedly; the mode is unchanged".into(),
            })
        })
    }

    /// How long a switch waits for running work to finish: the longest a task runs by
    /// default, and its grace to stop.
    fn drain_bound(&self) -> Duration {
        let config = self.config();
        config
            .default_task_timeout(ExecutionModeSetting::ProcessPool)
            .max(config.default_task_timeout(ExecutionModeSetting::ContainerAgentic))
            + config.agent.cancel_grace_period.get()
    }

    async fn switch_to(
        self: Arc<Self>,
        mode: ExecutionMode,
        switching: Switching,
    ) -> Result<(Vec<ExecutionMode>, Duration, Duration), WorkerError> {
        tracing::info!(to = mode.label(), "switching execution mode");
        let draining = Instant::now();
        let bound = self.drain_bound();
        if !self.wait_until_idle(bound).await {
            return Err(WorkerError::Unavailable {
                worker_id: self.worker_id.clone(),
                reason: format!(
                    "work still ran after {} s; the mode was not switched",
                    bound.as_secs()
                ),
            });
        }
        let drain = draining.elapsed();
        let started = Instant::now();
        let mut config = self.config().clone();
        config.execution_mode = mode_setting(mode);
        config.feature_flags.default_execution_mode = None;
        let providers = Providers::for_config(&config, &self.worker_id)
            .await
            .map_err(|reason| WorkerError::Unavailable {
                worker_id: self.worker_id.clone(),
                reason,
            })?;
        self.stop_warm_pools().await;
        let replaced = self.set_providers(providers);
        // What the replaced providers could not remove yet (a container or network Docker
        // refused) would otherwise wait for the worker's next start. In the background: a
        // Docker that does not answer must not hold the switch.
        tokio::spawn(async move { replaced.shut_down().await });
        self.resize(config.capacity()).await;
        self.start_warm_pools();
        let mut confirmations = self.registrations();
        confirmations.mark_unchanged();
        // Healthy again before registering, so the registration says so.
        drop(switching);
        self.request_reregistration();
        let confirmed = tokio::time::timeout(CONFIRMATION_TIMEOUT, confirmations.changed()).await;
        if !matches!(confirmed, Ok(Ok(()))) {
            tracing::warn!(
                "the scheduler did not confirm the new registration within {} s",
                CONFIRMATION_TIMEOUT.as_secs()
            );
        }
        let switched = started.elapsed();
        tracing::info!(modes = ?self.modes().iter().map(|m| m.label()).collect::<Vec<_>>(), ?drain, ?switched, "execution mode switched");
        Ok((self.modes(), drain, switched))
    }
}
