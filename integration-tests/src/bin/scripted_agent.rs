//! A fake `claude` for benchmarks and failure tests: it prints stream-json as fast as it can,
//! without any API. The prompt (the first stream-json message on stdin with
//! `--input-format stream-json`, otherwise the last argument) says what to print:
//! `EVENTS <n>` prints an init event, n text events and a result; `NO_RESULT` prints an init
//! event and an error on stderr, then exits 3; anything else is one text event and a result.

use std::io::{BufRead, Write};

/// The prompt: the text of the first user message on stdin in stream-json input mode, the last
/// argument otherwise.
fn prompt() -> String {
    let args: Vec<String> = std::env::args().collect();
    let stream_json = args
        .windows(2)
        .any(|pair| pair[0] == "--input-format" && pair[1] == "stream-json");
    if !stream_json {
        return args.last().cloned().unwrap_or_default();
    }
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    let message: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
    match &message["message"]["content"] {
        serde_json::Value::String(text) => text.clone(),
        content => content[0]["text"].as_str().unwrap_or_default().to_owned(),
    }
}

fn main() {
    let prompt = prompt();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let session = "00000000-0000-4000-8000-000000000000";
    writeln!(out, r#"{{"type":"system","subtype":"init","cwd":"{}","session_id":"{session}","tools":[],"model":"scripted","permissionMode":"default","claude_code_version":"scripted"}}"#,
        std::env::current_dir().unwrap().display()).unwrap();
    let mut words = prompt.split_whitespace();
    match words.next() {
        Some("NO_RESULT") => {
            out.flush().unwrap();
            eprintln!("Error: the scripted agent stopped without a result");
            std::process::exit(3);
        }
        Some("EVENTS") => {
            let count: u64 = words.next().and_then(|n| n.parse().ok()).unwrap_or(1000);
            for i in 0..count {
                writeln!(out, r#"{{"type":"assistant","message":{{"role":"assistant","content":[{{"type":"text","text":"event {i}"}}]}},"session_id":"{session}"}}"#).unwrap();
            }
        }
        _ => {
            writeln!(out, r#"{{"type":"assistant","message":{{"role":"assistant","content":[{{"type":"text","text":"scripted reply"}}]}},"session_id":"{session}"}}"#).unwrap();
        }
    }
    writeln!(out, r#"{{"type":"result","subtype":"success","is_error":false,"result":"scripted done","num_turns":1,"total_cost_usd":0,"session_id":"{session}"}}"#).unwrap();
}
