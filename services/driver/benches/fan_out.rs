//! Event fan-out: one task's events streamed through the driver's event log (embedded store)
//! to 1 and to 50 subscribers at once.
//!
//! `cargo bench -p claudecluster-driver`

use std::time::Duration;

use claudecluster_driver::benchmark::fan_out;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const EVENTS: usize = 5_000;

fn fan_out_to_subscribers(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("events to subscribers");
    group.sample_size(10);
    for subscribers in [1, 50] {
        // Events delivered in all: each reaches every subscriber.
        group.throughput(Throughput::Elements((EVENTS * subscribers) as u64));
        group.bench_function(format!("{subscribers} subscribers, {EVENTS} events"), |b| {
            b.iter_custom(|rounds| {
                (0..rounds)
                    .map(|_| {
                        let dir = tempfile::tempdir().unwrap();
                        runtime
                            .block_on(fan_out(dir.path(), subscribers, EVENTS))
                            .expect("every subscriber gets every event")
                    })
                    .sum::<Duration>()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, fan_out_to_subscribers);
criterion_main!(benches);
