//! Placement decisions, the scheduler's hot path: one round that places every queued task
//! there is room for, as the cluster grows. Only the round is timed, not the registrations
//! and the queue that set it up.
//!
//! `cargo bench -p claudecluster-scheduler`

use std::time::Duration;

use claudecluster_scheduler::benchmark::placement_round;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn placement(c: &mut Criterion) {
    let mut group = c.benchmark_group("placement round, 10,000 queued tasks");
    group.sample_size(10);
    for workers in [10, 100, 1_000, 10_000] {
        let capacity = (15_000 / workers) as u32;
        group.throughput(Throughput::Elements(10_000));
        group.bench_function(format!("{workers} workers"), |b| {
            b.iter_custom(|rounds| {
                (0..rounds)
                    .map(|_| placement_round(workers, capacity, 10_000).elapsed)
                    .sum::<Duration>()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, placement);
criterion_main!(benches);
