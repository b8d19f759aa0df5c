//! Refuses, at submission, what no registered worker would take: a repository scheme none
//! clones, or limits past every worker's `worker.maxTaskLimits`. The scheduler then places the
//! task only where it is admitted, and the worker checks again.

use std::time::{Duration, Instant};

use claudecluster_grpc::ClusterChannel as Channel;
use claudecluster_proto::v1::scheduler_service_client::SchedulerServiceClient;
use claudecluster_proto::v1::{ListWorkersRequest, TaskNeeds, WorkerInfo};
use tokio::sync::Mutex;

/// How old a view of the workers may be: submissions come much faster than workers change.
const FRESHNESS: Duration = Duration::from_secs(1);

/// Why no worker admits a task: the field, and the first worker's reason.
#[derive(Debug, Clone, PartialEq)]
pub struct NotAdmitted {
    pub field: &'static str,
    pub message: String,
}

pub struct Admission {
    scheduler: SchedulerServiceClient<Channel>,
    workers: Mutex<Option<(Instant, Vec<WorkerInfo>)>>,
}

impl Admission {
    pub fn new(scheduler: SchedulerServiceClient<Channel>) -> Self {
        Admission {
            scheduler,
            workers: Mutex::new(None),
        }
    }

    /// `Err` when workers are registered and none admits `needs`. With none registered, or the
    /// scheduler out of reach, the task is taken: it waits for a worker, which checks again.
    pub async fn check(&self, needs: &TaskNeeds) -> Result<(), NotAdmitted> {
        if needs.is_default() {
            return Ok(());
        }
        let workers = self.workers().await;
        admitted_by_any(&workers, needs)
    }

    async fn workers(&self) -> Vec<WorkerInfo> {
        let mut cached = self.workers.lock().await;
        if let Some((at, workers)) = cached.as_ref()
            && at.elapsed() < FRESHNESS
        {
            return workers.clone();
        }
        match self
            .scheduler
            .clone()
            .list_workers(ListWorkersRequest {})
            .await
        {
            Ok(response) => {
                let workers = response.into_inner().workers;
                *cached = Some((Instant::now(), workers.clone()));
                workers
            }
            Err(status) => {
                tracing::debug!(error = %status.message(), "cannot list workers to check a task against");
                Vec::new()
            }
        }
    }
}

fn admitted_by_any(workers: &[WorkerInfo], needs: &TaskNeeds) -> Result<(), NotAdmitted> {
    let mut first_refusal = None;
    for worker in workers {
        let refusal = match &worker.admits {
            Some(admits) => admits.refusal(needs),
            // A worker that reports nothing admits only the defaults.
            None => Some(claudecluster_proto::admission::Refusal {
                field: "spec",
                message: "the worker reports no limits it admits".into(),
            }),
        };
        match refusal {
            None => return Ok(()),
            Some(refusal) => {
                first_refusal.get_or_insert((worker.worker_id.clone(), refusal));
            }
        }
    }
    match first_refusal {
        None => Ok(()),
        Some((worker_id, refusal)) => Err(NotAdmitted {
            field: refusal.field,
            message: format!(
                "{} on worker {worker_id}, and no registered worker ({}) admits it",
                refusal.message,
                workers.len()
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use claudecluster_proto::v1::WorkerAdmits;

    fn worker(id: &str, schemes: &[&str], memory: u64) -> WorkerInfo {
        WorkerInfo {
            worker_id: id.into(),
            admits: Some(WorkerAdmits {
                repo_schemes: schemes.iter().map(|s| s.to_string()).collect(),
                max_memory_bytes: memory,
                max_cpus: 4.0,
                max_pids: 1024,
                max_timeout_seconds: 3600,
                max_budget_usd: 10.0,
                max_turns: 100,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn one_admitting_worker_is_enough_and_none_registered_admits_all() {
        let needs = TaskNeeds {
            repo_scheme: "http".into(),
            ..Default::default()
        };
        let workers = [
            worker("a", &["https"], 1 << 30),
            worker("b", &["http"], 1 << 30),
        ];
        assert_eq!(admitted_by_any(&workers, &needs), Ok(()));
        assert_eq!(admitted_by_any(&[], &needs), Ok(()));
    }

    #[test]
    fn refusals_name_the_field_the_setting_and_the_worker() {
        let needs = TaskNeeds {
            memory_bytes: 2 << 30,
            ..Default::default()
        };
        let refused = admitted_by_any(&[worker("a", &["https"], 1 << 30)], &needs).unwrap_err();
        assert_eq!(refused.field, "spec.limits.memory_bytes");
        assert_eq!(
            refused.message,
            "2147483648 is more than the 1073741824 of worker.maxTaskLimits.memory on worker a, and no registered worker (1) admits it"
        );
    }
}
