//! One worker, one or two providers: tasks that ask for a mode get that mode's provider, the
//! others the worker's default.

use std::sync::Arc;

use claudecluster_proto::v1::ExecutionMode;

use super::{ExecutionProvider, ProviderHealth};

pub struct Providers {
    /// The default first.
    providers: Vec<Arc<dyn ExecutionProvider>>,
}

impl Providers {
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
}
