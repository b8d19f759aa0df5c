//! Bounds on what a tool returns.
//!
//! Claude Code refuses an MCP tool result past 25,000 tokens by default
//! (`MAX_MCP_OUTPUT_TOKENS`), and a result it refuses is lost to the caller. So every result is
//! made to fit [`MAX_RESULT_BYTES`]: long texts are cut on a character boundary and end with a
//! marker that gives their whole size, lists end early and say how many entries were left out,
//! and the result says `"shortened": true` with, under `"whole"`, where to get all of it.
//!
//! Sizes are counted as the JSON text a client receives, escapes included, so that a text full
//! of quotes or control characters cannot slip past a bound that counted its raw bytes.

use std::borrow::Cow;

use serde_json::{Map, Value};

/// The most a tool result takes as JSON text. At about four bytes a token, as English, code and
/// JSON run, this is some 16,000 tokens; even text at three bytes a token (CJK is three bytes a
/// character) stays under Claude Code's default 25,000.
pub const MAX_RESULT_BYTES: usize = 64 * 1024;

/// The most one text of a list entry takes (a task's result or reason, a worker's label), so that
/// a page shows many entries rather than one long one. The tool for one entry shows it whole.
pub const MAX_LISTED_TEXT_BYTES: usize = 1024;

/// The most the list of files a task changed takes within its result, so that the agent's own
/// answer keeps most of the room.
pub const MAX_FILES_CHANGED_BYTES: usize = 16 * 1024;

/// The most a task's diff takes within its result; `claudecluster tasks diff` shows it whole.
pub const MAX_DIFF_BYTES: usize = 24 * 1024;

/// The most an error message takes: a driver error or an argument the call got wrong can carry
/// pages of text, and what the caller needs is its start.
pub const MAX_ERROR_BYTES: usize = 8 * 1024;

/// What ends a text that was cut, with the size of the whole text.
fn marker(whole_bytes: usize) -> String {
    format!(" …[shortened from {whole_bytes} bytes]")
}

/// How many bytes `c` takes inside a JSON string, as serde_json writes it.
fn escaped_char_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// How many bytes `text` takes inside a JSON string, without its quotes.
pub fn escaped_len(text: &str) -> usize {
    text.chars().map(escaped_char_len).sum()
}

/// How many bytes `value` takes as compact JSON text.
pub fn json_len(value: &Value) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Writing a Value into a counter cannot fail: its keys are strings and the writer never errs.
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

/// `text` cut to at most `max` bytes of JSON, on a character boundary, ending with the marker;
/// unchanged when it fits. A `max` smaller than the marker gives the marker alone.
pub fn shorten(text: &str, max: usize) -> Cow<'_, str> {
    if escaped_len(text) <= max {
        return Cow::Borrowed(text);
    }
    let marker = marker(text.len());
    let keep = max.saturating_sub(marker.len());
    let mut kept = 0;
    let mut end = 0;
    for (index, c) in text.char_indices() {
        kept += escaped_char_len(c);
        if kept > keep {
            break;
        }
        end = index + c.len_utf8();
    }
    Cow::Owned(format!("{}{marker}", &text[..end]))
}

/// What `shorten(text, max)` would take, without building it, from the text's length in bytes
/// and as JSON.
fn shortened_len(raw: usize, escaped: usize, max: usize) -> usize {
    let marker = marker(raw).len();
    if escaped <= max.max(marker) {
        escaped
    } else {
        max.max(marker)
    }
}

/// Calls `visit` on every string in `value`, object keys aside.
fn each_string(value: &mut Value, visit: &mut impl FnMut(&mut String)) {
    match value {
        Value::String(text) => visit(text),
        Value::Array(items) => items.iter_mut().for_each(|item| each_string(item, visit)),
        Value::Object(fields) => fields
            .values_mut()
            .for_each(|field| each_string(field, visit)),
        _ => {}
    }
}

/// Cuts every string of `value` (object keys included) to at most `max` bytes of JSON, for an
/// entry of a list; whether any was cut.
pub fn shorten_every_text(value: &mut Value, max: usize) -> bool {
    let mut cut = false;
    match value {
        Value::String(text) => {
            if let Cow::Owned(short) = shorten(text, max) {
                *text = short;
                cut = true;
            }
        }
        Value::Array(items) => {
            for item in items {
                cut |= shorten_every_text(item, max);
            }
        }
        Value::Object(fields) => {
            let mut shortened = Map::new();
            for (key, mut field) in std::mem::take(fields) {
                cut |= shorten_every_text(&mut field, max);
                let key = match shorten(&key, max) {
                    Cow::Borrowed(_) => key,
                    Cow::Owned(short) => {
                        cut = true;
                        short
                    }
                };
                shortened.insert(key, field);
            }
            *fields = shortened;
        }
        _ => {}
    }
    cut
}

/// Cuts the longest strings of `value` to one common length, the longest that brings the whole
/// to `budget` bytes of JSON, so that short fields (ids, states, numbers) stay whole and the
/// long ones share what is left. Whether it fits afterwards.
fn shorten_longest(value: &mut Value, budget: usize) -> bool {
    let total = json_len(value);
    if total <= budget {
        return true;
    }
    let mut texts: Vec<(usize, usize)> = Vec::new();
    each_string(value, &mut |text| {
        texts.push((text.len(), escaped_len(text)));
    });
    let rest = total - texts.iter().map(|(_, escaped)| escaped).sum::<usize>();
    let cost = |max: usize| -> usize {
        rest + texts
            .iter()
            .map(|&(raw, escaped)| shortened_len(raw, escaped, max))
            .sum::<usize>()
    };
    if cost(0) > budget {
        return false;
    }
    // The longest common length that fits: cost grows with it.
    let (mut fits, mut too_long) = (0, texts.iter().map(|t| t.1).max().unwrap_or(0));
    while too_long - fits > 1 {
        let middle = fits + (too_long - fits) / 2;
        if cost(middle) <= budget {
            fits = middle;
        } else {
            too_long = middle;
        }
    }
    each_string(value, &mut |text| {
        let escaped = escaped_len(text);
        if shortened_len(text.len(), escaped, fits) < escaped {
            *text = shorten(text, fits).into_owned();
        }
    });
    json_len(value) <= budget
}

/// Makes `value`, a tool result, fit in [`MAX_RESULT_BYTES`]. A result that is too large has its
/// longest texts cut; one that is (or was already) shortened says `"shortened": true` and, under
/// `"whole"`, what `whole` says about getting all of it.
pub fn fit(value: Value, whole: &str) -> Value {
    fit_within(value, whole, MAX_RESULT_BYTES)
}

fn fit_within(value: Value, whole: &str, limit: usize) -> Value {
    let mut fields = match value {
        Value::Object(fields) => fields,
        // Every tool result is an object; anything else is wrapped to be one.
        other => Map::from_iter([("value".to_owned(), other)]),
    };
    let shortened_already = fields.get("shortened") == Some(&Value::Bool(true));
    let mut value = Value::Object(fields.clone());
    if !shortened_already && json_len(&value) <= limit {
        return value;
    }
    fields.remove("shortened");
    fields.remove("whole");
    let note = Map::from_iter([
        ("shortened".to_owned(), Value::Bool(true)),
        ("whole".to_owned(), Value::String(whole.to_owned())),
    ]);
    // The note joins the object's fields: its size without braces, and a comma.
    let room = limit.saturating_sub(json_len(&Value::Object(note.clone())) - 1);
    value = Value::Object(fields);
    if !shorten_longest(&mut value, room) {
        // Only a result made of huge keys or countless entries gets here: the tools bound their
        // lists before this, so this is the last guard of the bound, never the usual path.
        value = Value::Object(Map::from_iter([(
            "error".to_owned(),
            Value::String("the result is too large to show".to_owned()),
        )]));
    }
    if let Value::Object(fields) = &mut value {
        fields.extend(note);
    }
    value
}

/// The first of `entries` that fit in a JSON array of at most `budget` bytes, and how many were
/// left out. The first entry is always kept, so that a list never ends before it starts; callers
/// bound each entry first.
pub fn take_fitting(entries: Vec<Value>, budget: usize) -> (Vec<Value>, usize) {
    let total = entries.len();
    let mut used = 2; // the brackets
    let mut kept = Vec::new();
    for entry in entries {
        let size = json_len(&entry) + usize::from(!kept.is_empty());
        if !kept.is_empty() && used + size > budget {
            break;
        }
        used += size;
        kept.push(entry);
    }
    let left_out = total - kept.len();
    (kept, left_out)
}

/// `text` with the credentials of every URL in it hidden: `https://user:token@host/repo`
/// becomes `https://***@host/repo`. For texts the cluster wrote (errors, reasons), which may
/// quote a repository URL as a client gave it, such as git's own clone errors.
pub fn without_credentials_in(text: &str) -> Cow<'_, str> {
    if !text.contains("://") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("://") {
        let (before, after) = rest.split_at(start + 3);
        out.push_str(before);
        // The authority runs to the path, query or fragment, or to whatever ends a URL in prose.
        let authority_end = after
            .find(|c: char| {
                matches!(c, '/' | '?' | '#' | '"' | '`' | '<' | '>') || c.is_whitespace()
            })
            .unwrap_or(after.len());
        let authority = &after[..authority_end];
        match authority.rfind('@') {
            Some(at) => {
                out.push_str("***");
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &after[authority_end..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// An error message as a caller may be shown it: without credentials, and bounded.
pub fn error_message(message: &str) -> String {
    shorten(&without_credentials_in(message), MAX_ERROR_BYTES).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const HINT: &str = "`claudecluster tasks get t-1` shows the whole task";

    fn text_of_size(result: &Value) -> usize {
        result.to_string().len()
    }

    #[test]
    fn escaped_lengths_match_what_serde_json_writes() {
        let nasty = "quote \" backslash \\ newline \n tab \t bell \u{7} nul \0 é 漢 😀 \u{7f}";
        assert_eq!(
            escaped_len(nasty) + 2,
            serde_json::to_string(nasty).unwrap().len()
        );
    }

    #[test]
    fn a_text_that_fits_is_unchanged_and_one_byte_more_is_cut_with_a_marker() {
        let text = "x".repeat(100);
        assert_eq!(shorten(&text, 100), text);
        let longer = "x".repeat(101);
        let cut = shorten(&longer, 100);
        assert!(cut.len() <= 100, "{cut}");
        assert!(cut.ends_with(" …[shortened from 101 bytes]"), "{cut}");
        assert!(cut.starts_with("xxxxx"));
    }

    #[test]
    fn a_cut_never_splits_a_character() {
        let marker_len = marker(3 * 50).len();
        // Every cut point across a run of three-byte characters, and four-byte ones.
        for text in ["漢".repeat(50), "😀".repeat(50), "aé漢😀".repeat(20)] {
            for max in marker_len..marker_len + 12 {
                let cut = shorten(&text, max);
                assert!(escaped_len(&cut) <= max, "{max}: {cut}");
                let kept = cut.split(" …[shortened").next().unwrap();
                assert!(text.starts_with(kept), "{max}: {cut}");
            }
        }
    }

    #[test]
    fn escapes_count_against_the_bound() {
        let quotes = "\"".repeat(1000);
        let cut = shorten(&quotes, 200);
        assert!(serde_json::to_string(&cut).unwrap().len() <= 202);
        let controls = "\u{1}".repeat(1000);
        let cut = shorten(&controls, 200);
        assert!(escaped_len(&cut) <= 200);
    }

    #[test]
    fn a_bound_smaller_than_the_marker_leaves_only_the_marker() {
        assert_eq!(
            shorten(&"x".repeat(1000), 3),
            " …[shortened from 1000 bytes]"
        );
    }

    #[test]
    fn a_result_within_the_bound_is_returned_as_it_is() {
        let value = json!({ "taskId": "t-1", "result": { "text": "done" } });
        assert_eq!(fit(value.clone(), HINT), value);
    }

    #[test]
    fn a_result_exactly_at_the_bound_is_whole_and_one_byte_past_it_is_shortened() {
        let empty = json!({ "taskId": "t-1", "text": "" });
        let room = MAX_RESULT_BYTES - text_of_size(&empty);
        let at_bound = json!({ "taskId": "t-1", "text": "y".repeat(room) });
        assert_eq!(text_of_size(&at_bound), MAX_RESULT_BYTES);
        assert_eq!(fit(at_bound.clone(), HINT), at_bound);

        let past = json!({ "taskId": "t-1", "text": "y".repeat(room + 1) });
        let fitted = fit(past, HINT);
        assert!(text_of_size(&fitted) <= MAX_RESULT_BYTES);
        assert_eq!(fitted["shortened"], true);
        assert_eq!(fitted["whole"], HINT);
        assert_eq!(fitted["taskId"], "t-1");
        let text = fitted["text"].as_str().unwrap();
        assert!(
            text.ends_with(&format!(" …[shortened from {} bytes]", room + 1)),
            "{}",
            &text[text.len() - 60..]
        );
        // The cut leaves the text as much room as there is.
        assert!(text.len() > MAX_RESULT_BYTES - 200, "{}", text.len());
    }

    #[test]
    fn the_longest_texts_are_cut_and_the_short_ones_kept() {
        let reason = "r".repeat(3000);
        let value = json!({
            "taskId": "t-1",
            "reason": reason,
            "result": { "text": "z".repeat(1 << 20), "costUsd": 0.5 },
            "filesChanged": ["/workspace/a.rs", "/workspace/b.rs"],
        });
        let fitted = fit(value, HINT);
        assert!(text_of_size(&fitted) <= MAX_RESULT_BYTES);
        assert_eq!(fitted["reason"], reason);
        assert_eq!(fitted["result"]["costUsd"], 0.5);
        assert_eq!(fitted["filesChanged"][1], "/workspace/b.rs");
        assert!(
            fitted["result"]["text"]
                .as_str()
                .unwrap()
                .ends_with(" …[shortened from 1048576 bytes]")
        );
    }

    #[test]
    fn many_long_texts_share_the_room_and_multibyte_text_is_cut_on_a_boundary() {
        let value = json!({
            "a": "漢".repeat(40_000),
            "b": "é".repeat(40_000),
            "c": "\"quoted\"\n".repeat(10_000),
        });
        let fitted = fit(value, HINT);
        assert!(text_of_size(&fitted) <= MAX_RESULT_BYTES);
        for key in ["a", "b", "c"] {
            let text = fitted[key].as_str().unwrap();
            assert!(text.contains("…[shortened from"), "{key}");
        }
        // Still valid JSON, as a client parses it.
        let reparsed: Value = serde_json::from_str(&fitted.to_string()).unwrap();
        assert_eq!(reparsed, fitted);
    }

    #[test]
    fn a_result_marked_shortened_by_its_tool_gets_the_hint_even_when_small() {
        let value = json!({ "tasks": [], "shortened": true, "omitted": 3 });
        let fitted = fit(value, HINT);
        assert_eq!(fitted["shortened"], true);
        assert_eq!(fitted["whole"], HINT);
        assert_eq!(fitted["omitted"], 3);
    }

    #[test]
    fn a_result_that_cannot_be_shortened_enough_still_fits() {
        let entries: Vec<Value> = (0..20_000).map(|i| json!(i)).collect();
        let fitted = fit(json!({ "numbers": entries }), HINT);
        assert!(text_of_size(&fitted) <= MAX_RESULT_BYTES);
        assert_eq!(fitted["shortened"], true);
        assert_eq!(fitted["error"], "the result is too large to show");
    }

    #[test]
    fn a_list_that_does_not_fit_ends_early_and_counts_what_it_left_out() {
        let entries: Vec<Value> = (0..100).map(|i| json!({ "n": i })).collect();
        let one = json_len(&entries[0]);
        let (kept, left_out) = take_fitting(entries.clone(), 2 + 10 * one + 9);
        assert_eq!(kept.len(), 10);
        assert_eq!(left_out, 90);
        assert_eq!(kept[9], json!({ "n": 9 }));
        assert!(json_len(&Value::Array(kept)) <= 2 + 10 * one + 9);

        let (all, none_left) = take_fitting(entries.clone(), usize::MAX);
        assert_eq!((all.len(), none_left), (100, 0));
        let (first, rest) = take_fitting(entries, 1);
        assert_eq!(
            (first.len(), rest),
            (1, 99),
            "a list never ends before it starts"
        );
    }

    #[test]
    fn every_text_of_a_list_entry_is_cut_keys_included() {
        let mut entry = json!({
            "workerId": "w-1",
            "healthReason": "h".repeat(5000),
            "labels": { "k".repeat(5000): "v".repeat(5000), "zone": "a" },
        });
        assert!(shorten_every_text(&mut entry, MAX_LISTED_TEXT_BYTES));
        assert!(json_len(&entry) < 4 * MAX_LISTED_TEXT_BYTES);
        assert_eq!(entry["workerId"], "w-1");
        assert_eq!(entry["labels"]["zone"], "a");
        let mut small = json!({ "workerId": "w-1" });
        assert!(!shorten_every_text(&mut small, MAX_LISTED_TEXT_BYTES));
    }

    #[test]
    fn credentials_in_urls_anywhere_in_a_text_are_hidden() {
        assert_eq!(
            without_credentials_in(
                "fatal: unable to access 'https://user:ghp_s3cret@git.example/org/app.git/': 403"
            ),
            "fatal: unable to access 'https://***@git.example/org/app.git/': 403"
        );
        assert_eq!(
            without_credentials_in("clone of `http://tok@h:8080` failed; ssh://git@h/r too"),
            "clone of `http://***@h:8080` failed; ssh://***@h/r too"
        );
        assert_eq!(
            without_credentials_in("https://git.example/a@b.git and no scheme at all"),
            "https://git.example/a@b.git and no scheme at all"
        );
        assert_eq!(without_credentials_in("plain text"), "plain text");
        assert_eq!(without_credentials_in("ends with ://"), "ends with ://");
    }

    #[test]
    fn error_messages_are_bounded_and_without_credentials() {
        let message = format!("repo https://me:pw@host/r failed: {}", "e".repeat(100_000));
        let shown = error_message(&message);
        assert!(shown.len() <= MAX_ERROR_BYTES);
        assert!(shown.starts_with("repo https://***@host/r failed: eee"));
        assert!(!shown.contains("pw"));
    }
}
