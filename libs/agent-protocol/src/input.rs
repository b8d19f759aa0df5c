/// One line of `--input-format stream-json` input: a user turn with `text` as its content.
pub fn user_message_line(text: &str) -> String {
    let message = serde_json::json!({
        "type": "user",
        "message": { "role": "user", "content": text },
    });
    let mut line = message.to_string();
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_line_is_one_json_object_ending_in_a_newline() {
        let line = user_message_line("two\nlines \"quoted\"");
        assert_eq!(
            line.matches('\n').count(),
            1,
            "embedded newlines must be escaped"
        );
        let value: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(value["type"], "user");
        assert_eq!(value["message"]["content"], "two\nlines \"quoted\"");
    }
}
