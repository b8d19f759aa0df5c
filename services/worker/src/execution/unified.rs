//! One worker, one or two providers: tasks that ask for a mode get that mode's provider, the
//! others the worker's default.

use std::sync::Arc;

use claudecluster_config::{ExecutionModeSetting, WorkerConfig};
use claudecluster_proto::v1::ExecutionMode;

use super::{
    ContainerProvider, ContainerSettings, ExecutionProvider, KubernetesProvider,
    KubernetesSettings, ProcessPoolProvider, ProviderHealth,
};

pub struct Providers {
    /// The default first.
    providers: Vec<Arc<dyn ExecutionProvider>>,
}

/// Agents of another uid reach their workspaces only if every directory above the workspace
/// root lets others through (`o+x`); the root itself is made so.
fn check_traversable(root: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(root)
        .map_err(|err| format!("cannot make {}: {err}", root.display()))?;
    let _ = std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711));
    for dir in root.ancestors().skip(1) {
        let mode = std::fs::metadata(dir)
            .map_err(|err| format!("cannot read {}: {err}", dir.display()))?
            .permissions()
            .mode();
        if mode & 0o001 == 0 {
            return Err(format!(
                "agents of worker.processPool.runAs cannot reach the workspace root {}: {} does not let others through (chmod o+x, or move worker.workspaceRoot)",
                root.display(),
                dir.display()
            ));
        }
    }
    Ok(())
}

impl Providers {
    /// The providers of every mode `config` asks for, the default first.
    pub async fn for_config(config: &WorkerConfig, worker_id: &str) -> Result<Self, String> {
        let mut providers: Vec<Arc<dyn ExecutionProvider>> = Vec::new();
        for mode in config.modes() {
            match mode {
                ExecutionModeSetting::ProcessPool => {
                    let mut provider =
                        ProcessPoolProvider::new(config.process_pool.claude_code_path.clone());
                    if let Some(run_as) = &config.process_pool.run_as {
                        check_traversable(&crate::workspace::Workspaces::root_for(config))?;
                        provider = provider
                            .running_as(super::process::AgentUsers::new(run_as.uid, run_as.count));
                    }
                    providers.push(Arc::new(provider));
                }
                ExecutionModeSetting::ContainerAgentic
                    if config.container.orchestrator == "kubernetes" =>
                {
                    let settings = KubernetesSettings::from_config(config, worker_id);
                    let provider = KubernetesProvider::connect(settings)
                        .await
                        .map_err(|err| err.0)?;
                    providers.push(Arc::new(provider));
                }
                ExecutionModeSetting::ContainerAgentic => {
                    let settings = ContainerSettings::from_config(config, worker_id);
                    let provider = ContainerProvider::new(settings).map_err(|err| err.0)?;
                    // A worker owns its containers: what an earlier run left goes first.
                    // Without Docker the worker still starts, unhealthy until Docker answers.
                    if let Err(reason) = provider.remove_previous_runs().await {
                        tracing::warn!(%reason, "cannot clean up earlier containers now");
                    }
                    providers.push(Arc::new(provider));
                }
            }
        }
        Ok(Providers::new(providers))
    }

    /// `providers` with the default mode's first; at least one.
    pub fn new(providers: Vec<Arc<dyn ExecutionProvider>>) -> Self {
        assert!(!providers.is_empty(), "a worker needs a provider");
        Providers { providers }
    }

    pub fn default_mode(&self) -> ExecutionMode {
        self.providers[0].mode()
    }

    /// Every mode, the default first.
    pub fn modes(&self) -> Vec<ExecutionMode> {
        self.providers.iter().map(|p| p.mode()).collect()
    }

    /// The provider for `mode`; the default for `Unspecified`.
    pub fn get(&self, mode: ExecutionMode) -> Option<&Arc<dyn ExecutionProvider>> {
        if mode == ExecutionMode::Unspecified {
            return self.providers.first();
        }
        self.providers.iter().find(|p| p.mode() == mode)
    }

    /// Ready when every provider is: a worker half able to run its tasks says so.
    pub async fn health(&self) -> ProviderHealth {
        for provider in &self.providers {
            if let ProviderHealth::Unavailable(reason) = provider.health().await {
                return ProviderHealth::Unavailable(reason);
            }
        }
        ProviderHealth::Ready
    }

    pub async fn shut_down(&self) {
        for provider in &self.providers {
            provider.shut_down().await;
        }
    }
}
