//! Stream-json parsing, the worker's per-line hot path: the reference transcripts of the real
//! CLI, and a long synthetic stream of the kinds of line a busy agent prints.
//!
//! `cargo bench -p claudecluster-agent-protocol`

use std::path::Path;

use claudecluster_agent_protocol::parse_line;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn transcripts() -> Vec<(String, Vec<String>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/claude-code-2.1.328");
    let mut transcripts: Vec<(String, Vec<String>)> = std::fs::read_dir(&dir)
        .expect("the reference transcripts")
        .flatten()
        .filter(|entry| entry.path().extension().is_some_and(|ext| ext == "jsonl"))
        .map(|entry| {
            let name = entry
                .path()
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let text = std::fs::read_to_string(entry.path()).unwrap();
            (name, text.lines().map(str::to_owned).collect())
        })
        .collect();
    transcripts.sort();
    transcripts
}

/// A stream of `count` lines: mostly text, with tool calls and results among them, as an
/// agent working through a task prints them.
fn synthetic_stream(count: usize) -> Vec<String> {
    (0..count)
        .map(|index| match index % 10 {
            0 => format!(
                r#"{{"type":"assistant","message":{{"id":"m{index}","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{{"type":"tool_use","id":"toolu_{index}","name":"Bash","input":{{"command":"cargo test --workspace -- case_{index}"}}}}],"usage":{{"input_tokens":12,"output_tokens":40}}}},"session_id":"s1"}}"#
            ),
            1 => format!(
                r#"{{"type":"user","message":{{"role":"user","content":[{{"tool_use_id":"toolu_{}","type":"tool_result","content":"test result: ok. 42 passed; 0 failed","is_error":false}}]}},"session_id":"s1"}}"#,
                index - 1
            ),
            _ => format!(
                r#"{{"type":"assistant","message":{{"id":"m{index}","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{{"type":"text","text":"Step {index}: reading the failing case and the code it exercises, then changing the parser so that the edge case is handled."}}],"usage":{{"input_tokens":12,"output_tokens":30}}}},"session_id":"s1"}}"#
            ),
        })
        .collect()
}

fn parse_all(lines: &[String]) -> usize {
    lines
        .iter()
        .map(|line| parse_line(line).map_or(0, |events| events.len()))
        .sum()
}

fn reference_transcripts(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse reference transcript");
    for (name, lines) in transcripts() {
        let bytes: usize = lines.iter().map(|line| line.len() + 1).sum();
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function(&name, |b| {
            b.iter(|| parse_all(std::hint::black_box(&lines)))
        });
    }
    group.finish();
}

fn long_stream(c: &mut Criterion) {
    let lines = synthetic_stream(10_000);
    assert!(parse_all(&lines) >= 10_000, "every line is an event");
    let mut group = c.benchmark_group("parse synthetic stream");
    group.throughput(Throughput::Elements(lines.len() as u64));
    group.bench_function("10,000 lines", |b| {
        b.iter(|| parse_all(std::hint::black_box(&lines)))
    });
    group.finish();
}

criterion_group!(benches, reference_transcripts, long_stream);
criterion_main!(benches);
