//! Mode switches racing admissions, and switches whose caller goes away (design review,
//! item 1).

use claudecluster_proto::v1::{ExecutionMode, TaskStatus};
use tonic::Code;

use super::fake::FakeProvider;
use super::*;
use crate::execution::ProviderHealth;

/// Confirms the worker's next registration, as the scheduler link would.
fn confirm_reregistration(runtime: &Arc<Runtime>) -> tokio::task::JoinHandle<()> {
    let runtime = runtime.clone();
    tokio::spawn(async move {
        runtime.reregistration_requested().await;
        runtime.registered();
    })
}

#[tokio::test]
async fn a_switch_between_an_admissions_checks_neither_panics_nor_leaks_a_slot() {
    let (provider, fake) = FakeProvider::gated(ExecutionMode::ContainerAgentic);
    let mut worker = Worker::with(provider, fake, |_| {});
    // The admission has found its provider and waits on the provider's health ...
    let admitting = tokio::spawn({
        let worker_service = worker.runtime.clone();
        async move {
            let execution = crate::runtime::Execution {
                task_id: "t1".into(),
                attempt: 1,
                spec: claudecluster_proto::v1::TaskSpec {
                    prompt: "say hello".into(),
                    ..Default::default()
                },
            };
            worker_service.admit(execution).await
        }
    });
    worker.fake.health_checked().await;
    // ... when the worker switches to a mode without that provider.
    let confirmed = confirm_reregistration(&worker.runtime);
    let (modes, _, _) = worker
        .runtime
        .switch_mode(ExecutionMode::ProcessPool)
        .await
        .unwrap();
    assert_eq!(modes, [ExecutionMode::ProcessPool]);
    confirmed.await.unwrap();
    worker.fake.open_health_gate();

    // The admission runs on the provider it checked.
    let admission = admitting.await.unwrap().unwrap();
    let events = admission.follow();
    let run = tokio::spawn(admission.run());
    let agent = worker.fake.next_agent().await;
    agent.succeed().await;
    run.await.expect("no panic");
    let events: Vec<_> = futures_util::StreamExt::collect::<Vec<_>>(events).await;
    let (_, last) = events.last().unwrap().as_ref().unwrap();
    assert_eq!(
        status(last.kind.as_ref().unwrap()).unwrap().0,
        TaskStatus::Completed
    );
    assert!(worker.running().is_empty());
    assert_eq!(worker.runtime.free_slots(), CAPACITY as usize);
    assert_eq!(worker.runtime.health().await, ProviderHealth::Ready);
}

#[tokio::test]
async fn an_admission_during_a_switch_is_refused_without_leaking_a_slot() {
    let mut worker = Worker::new(ExecutionMode::ContainerAgentic);
    let mut running = worker.execute("t0", 1).await.unwrap();
    let agent = worker.fake.next_agent().await;
    next(&mut running).await;

    // The switch begins, and waits for t0 to finish.
    let mut switching = Box::pin({
        let runtime = worker.runtime.clone();
        async move { runtime.switch_mode(ExecutionMode::ProcessPool).await }
    });
    tokio::select! {
        biased;
        _ = &mut switching => panic!("the switch cannot end while t0 runs"),
        () = std::future::ready(()) => {}
    }
    let switching = tokio::spawn(switching);
    let refused = worker.execute("t1", 1).await.err().unwrap();
    assert_eq!(refused.code(), Code::Unavailable);
    assert!(
        refused.message().ends_with("switching execution mode"),
        "{}",
        refused.message()
    );
    assert!(worker.fake.started_none());
    assert_eq!(worker.runtime.free_slots(), CAPACITY as usize - 1);

    let confirmed = confirm_reregistration(&worker.runtime);
    agent.succeed().await;
    rest(running).await;
    let (modes, _, _) = switching.await.unwrap().unwrap();
    assert_eq!(modes, [ExecutionMode::ProcessPool]);
    confirmed.await.unwrap();
    assert_eq!(worker.runtime.free_slots(), CAPACITY as usize);
    assert_eq!(worker.runtime.health().await, ProviderHealth::Ready);
}

#[tokio::test]
async fn a_switch_whose_caller_goes_away_still_finishes_and_clears_its_mark() {
    let mut worker = Worker::new(ExecutionMode::ContainerAgentic);
    let mut running = worker.execute("t0", 1).await.unwrap();
    let agent = worker.fake.next_agent().await;
    next(&mut running).await;

    let mut switch = Box::pin(worker.runtime.switch_mode(ExecutionMode::ProcessPool));
    tokio::select! {
        biased;
        _ = &mut switch => panic!("the switch cannot end while t0 runs"),
        () = std::future::ready(()) => {}
    }
    // The caller goes away mid-drain.
    drop(switch);
    assert_eq!(
        worker.runtime.health().await,
        ProviderHealth::Unavailable("switching execution mode".into())
    );

    let confirmed = confirm_reregistration(&worker.runtime);
    agent.succeed().await;
    rest(running).await;
    // The registration comes after the mark is cleared: the switch went through.
    confirmed.await.unwrap();
    assert_eq!(worker.runtime.modes(), [ExecutionMode::ProcessPool]);
    assert_eq!(worker.runtime.health().await, ProviderHealth::Ready);
}

#[tokio::test]
async fn the_providers_a_switch_replaces_are_shut_down() {
    let worker = Worker::new(ExecutionMode::ContainerAgentic);
    let confirmed = confirm_reregistration(&worker.runtime);
    worker
        .runtime
        .switch_mode(ExecutionMode::ProcessPool)
        .await
        .unwrap();
    confirmed.await.unwrap();
    // So that what they could not remove yet is tried again now, not at the next start.
    tokio::time::timeout(std::time::Duration::from_secs(10), worker.fake.shut_down())
        .await
        .expect("the replaced provider is shut down");
}
