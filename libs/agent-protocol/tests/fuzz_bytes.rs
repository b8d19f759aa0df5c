//! Fuzzing of `parse_line` at the byte level: whatever an agent process prints, the parser
//! answers with events or an error, and never panics or overflows the stack.
//!
//! `CLAUDECLUSTER_FUZZ_CASES` sets the cases per target (256 by default, so the normal test run
//! stays fast); a longer run is
//! `CLAUDECLUSTER_FUZZ_CASES=100000 cargo nextest run -p claudecluster-agent-protocol fuzz --no-capture`.
//! Each target prints how many cases it ran and how fast.

use std::path::Path;

use claudecluster_agent_protocol::parse_line;
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::Value;

use claudecluster_fuzzing::fuzz;

/// The property every target checks: an answer, and an error that says something.
fn parses_or_explains(line: &str) {
    if let Err(err) = parse_line(line) {
        assert!(!err.message.is_empty(), "empty error message for {line:?}");
    }
}

/// Every non-blank line of the real transcripts, in a fixed order.
fn fixture_lines() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/claude-code-2.1.328");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("reading {}: {err}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "jsonl"))
        .collect();
    files.sort();
    let lines: Vec<String> = files
        .iter()
        .flat_map(|path| {
            std::fs::read_to_string(path)
                .unwrap_or_else(|err| panic!("reading {}: {err}", path.display()))
                .lines()
                .filter(|line| !line.trim().is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(!lines.is_empty(), "no fixture lines in {}", dir.display());
    lines
}

/// A byte-level edit of a line, as a torn write, a bad pipe or a confused process would make.
#[derive(Debug, Clone)]
enum ByteEdit {
    TruncateAt(Index),
    Flip(Index, u8),
    Insert(Index, Vec<u8>),
    Remove(Index, usize),
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    prop_oneof![
        any::<Index>().prop_map(ByteEdit::TruncateAt),
        (any::<Index>(), 1..=u8::MAX).prop_map(|(at, mask)| ByteEdit::Flip(at, mask)),
        (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| ByteEdit::Insert(at, bytes)),
        (any::<Index>(), 1..64_usize).prop_map(|(at, len)| ByteEdit::Remove(at, len)),
    ]
}

fn apply_byte_edit(bytes: &mut Vec<u8>, edit: &ByteEdit) {
    // Every edit needs a position; an empty line only grows.
    let len = bytes.len();
    let position = |at: &Index| at.index(len.max(1)).min(len);
    match edit {
        ByteEdit::TruncateAt(at) => bytes.truncate(position(at)),
        ByteEdit::Flip(at, mask) => {
            if let Some(byte) = bytes.get_mut(position(at)) {
                *byte ^= mask;
            }
        }
        ByteEdit::Insert(at, inserted) => {
            let at = position(at);
            bytes.splice(at..at, inserted.iter().copied());
        }
        ByteEdit::Remove(at, len) => {
            let at = position(at);
            let end = (at + len).min(bytes.len());
            bytes.drain(at..end);
        }
    }
}

/// JSON text (or almost JSON) that no field of any event expects: wrong types, numbers out of
/// every integer type's range, strings with control characters and lone surrogates, long
/// strings and deep nesting.
fn hostile_json() -> impl Strategy<Value = String> {
    let fixed = prop::sample::select(vec![
        "null",
        "true",
        "false",
        "0",
        "-1",
        "-0",
        "1.5",
        "-1.5",
        "4294967296",
        "18446744073709551615",
        "18446744073709551616",
        "-9223372036854775809",
        "1e400",
        "-1e400",
        "1e-400",
        "NaN",
        "Infinity",
        "[]",
        "{}",
        "[null, 1, \"x\", {}]",
        "{\"type\": {}, \"subtype\": []}",
        "\"\"",
        "\"\\ud800\"",
        "\"\\udc00\\ud800\"",
        "\"\\u0000\"",
        "\"\u{0}\u{7}\u{1b}[31m\"",
        "\"\u{202e}\u{feff}\u{10ffff}\"",
    ])
    .prop_map(str::to_owned);
    prop_oneof![
        4 => fixed,
        1 => prop::collection::vec(0..10_u8, 1..4000).prop_map(|digits| {
            let digits: String = digits.iter().map(|d| char::from(b'0' + d)).collect();
            format!("-{digits}")
        }),
        1 => prop::collection::vec(0..10_u8, 1..4000)
            .prop_map(|digits| digits.iter().map(|d| char::from(b'0' + d)).collect()),
        2 => any::<String>().prop_map(|text| serde_json::to_string(&text).unwrap()),
        1 => any::<String>().prop_map(|text| format!("\"{text}\"")),
        1 => (any::<char>(), 0..200_000_usize)
            .prop_map(|(c, len)| serde_json::to_string(&c.to_string().repeat(len)).unwrap()),
        1 => (0..20_000_usize, any::<bool>()).prop_map(|(depth, arrays)| nested(depth, arrays)),
    ]
}

/// `depth` arrays or objects inside each other, around a `1`.
fn nested(depth: usize, arrays: bool) -> String {
    let (open, close) = if arrays { ("[", "]") } else { ("{\"a\":", "}") };
    format!("{}1{}", open.repeat(depth), close.repeat(depth))
}

/// JSON pointers to every value inside `value` (the root excluded), taking only the first
/// `items_per_array` items of each array.
fn pointers(value: &Value, prefix: &str, items_per_array: usize, into: &mut Vec<String>) {
    let children: Vec<(String, &Value)> = match value {
        Value::Object(object) => object
            .iter()
            .map(|(key, child)| (key.replace('~', "~0").replace('/', "~1"), child))
            .collect(),
        Value::Array(items) => items
            .iter()
            .take(items_per_array)
            .enumerate()
            .map(|(index, child)| (index.to_string(), child))
            .collect(),
        _ => return,
    };
    for (step, child) in children {
        let pointer = format!("{prefix}/{step}");
        pointers(child, &pointer, items_per_array, into);
        into.push(pointer);
    }
}

/// `line` with the value at `pointer` replaced by `replacement`, which need not be valid JSON.
fn replace_value(line: &str, pointer: &str, replacement: &str) -> String {
    // The value is swapped for a string that no fixture holds, and that string's JSON text
    // for the replacement, so that the replacement can be text serde_json would never write.
    const PLACEHOLDER: &str = "\u{1}fuzz-placeholder\u{1}";
    let mut value: Value = serde_json::from_str(line).unwrap();
    *value.pointer_mut(pointer).unwrap() = Value::String(PLACEHOLDER.to_owned());
    let placeholder_json = serde_json::to_string(PLACEHOLDER).unwrap();
    value
        .to_string()
        .replacen(&placeholder_json, replacement, 1)
}

#[test]
fn fuzz_parse_line_with_arbitrary_bytes() {
    fuzz(
        "parse_line, arbitrary bytes",
        prop::collection::vec(any::<u8>(), 0..4096),
        |bytes| parses_or_explains(&String::from_utf8_lossy(&bytes)),
    );
}

#[test]
fn fuzz_parse_line_with_torn_fixture_lines() {
    let lines = fixture_lines();
    fuzz(
        "parse_line, fixture lines with byte edits",
        (
            prop::sample::select(lines),
            prop::collection::vec(byte_edit(), 1..6),
        ),
        |(line, edits)| {
            let mut bytes = line.into_bytes();
            for edit in &edits {
                apply_byte_edit(&mut bytes, edit);
            }
            parses_or_explains(&String::from_utf8_lossy(&bytes));
        },
    );
}

#[test]
fn fuzz_parse_line_with_hostile_field_values() {
    let lines = fixture_lines();
    fuzz(
        "parse_line, fixture lines with hostile values",
        (prop::sample::select(lines), any::<Index>(), hostile_json()),
        |(line, which, replacement)| {
            let mut found = Vec::new();
            pointers(
                &serde_json::from_str(&line).unwrap(),
                "",
                usize::MAX,
                &mut found,
            );
            match found.len() {
                0 => parses_or_explains(&line),
                count => parses_or_explains(&replace_value(
                    &line,
                    &found[which.index(count)],
                    &replacement,
                )),
            }
        },
    );
}

/// Not random: every field of every real line, with each wrong type once. The items of a list
/// are alike (the CLI's `tools`, say), so two of each list stand for all of them.
#[test]
fn every_field_of_every_fixture_line_takes_every_wrong_type() {
    let wrong_types = [
        "null",
        "true",
        "-1",
        "1.5",
        "18446744073709551616",
        "1e400",
        "\"text\"",
        "[]",
        "{}",
    ];
    for line in fixture_lines() {
        let mut found = Vec::new();
        pointers(&serde_json::from_str(&line).unwrap(), "", 2, &mut found);
        for pointer in &found {
            for wrong in wrong_types {
                parses_or_explains(&replace_value(&line, pointer, wrong));
            }
        }
    }
}

/// serde_json stops at 128 levels; deeper input must be an error, not a stack overflow, also
/// where the parser walks the value (inside a message's content).
#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    for depth in [129, 10_000, 1_000_000] {
        for arrays in [true, false] {
            let deep = nested(depth, arrays);
            let lines = [
                deep.clone(),
                format!(r#"{{"type":"assistant","message":{{"content":{deep}}}}}"#),
                format!(
                    r#"{{"type":"user","message":{{"content":[{{"type":"tool_result","content":{deep}}}]}}}}"#
                ),
            ];
            for line in lines {
                let err = parse_line(&line).expect_err("past serde_json's recursion limit");
                assert!(
                    err.message.contains("recursion limit"),
                    "depth {depth}: {err}"
                );
            }
        }
    }
}

/// Just under the limit the value is walked (flattened, printed back as JSON) in full.
#[test]
fn nesting_just_under_the_limit_is_parsed() {
    let deep = nested(120, true);
    let line = format!(
        r#"{{"type":"user","message":{{"content":[{{"type":"tool_result","tool_use_id":"t","content":[{deep}]}}]}}}}"#
    );
    assert_eq!(parse_line(&line).unwrap().len(), 1);
}
