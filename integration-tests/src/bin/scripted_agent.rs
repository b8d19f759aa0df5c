//! A fake `claude` for benchmarks and failure tests: it prints stream-json as fast as it can,
//! without any API. The prompt (the last argument) says what to print:
//! `EVENTS <n>` prints an init event, n text events and a result; `NO_RESULT` prints an init
//! event and an error on stderr, then exits 3; anything else is one text event and a result.

use std::io::Write;

fn main() {
    let prompt = std::env::args().next_back().unwrap_or_default();
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
