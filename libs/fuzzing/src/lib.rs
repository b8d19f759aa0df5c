//! What the project's fuzz targets share. `CLAUDECLUSTER_FUZZ_CASES` sets the cases of a run
//! (a few hundred by default, so that the test command stays fast); each target prints how
//! many cases it ran and how fast, so that a long run can be quoted.

use std::cell::Cell;
use std::time::Instant;

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestRunner};

/// Cases of a run: `CLAUDECLUSTER_FUZZ_CASES`, else `default`.
pub fn cases(default: u32) -> u32 {
    match std::env::var("CLAUDECLUSTER_FUZZ_CASES") {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("CLAUDECLUSTER_FUZZ_CASES={text:?} is not a number")),
        Err(_) => default,
    }
}

/// How proptest runs `cases` cases without writing files: a failing input is printed, and
/// persisting it would write into the repository.
pub fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// Runs `check` on `cases(256)` inputs from `strategy` and prints the rate. A failure panics
/// with the smallest input proptest shrank it to.
pub fn fuzz<S: Strategy>(target: &str, strategy: S, check: impl Fn(S::Value)) {
    let inputs_checked = Cell::new(0_u64);
    let started = Instant::now();
    let outcome = TestRunner::new(config(cases(256))).run(&strategy, |input| {
        inputs_checked.set(inputs_checked.get() + 1);
        check(input);
        Ok(())
    });
    let elapsed = started.elapsed();
    if let Err(failure) = outcome {
        panic!("{target}: {failure}");
    }
    eprintln!(
        "{target}: {} cases in {elapsed:.2?}, {:.0} cases/second",
        inputs_checked.get(),
        inputs_checked.get() as f64 / elapsed.as_secs_f64()
    );
}
