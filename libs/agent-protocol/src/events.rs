use serde::Deserialize;
use serde_json::Value;

/// One event of the agent's output.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentEvent {
    /// `system/init`: once per turn.
    Init(InitEvent),
    /// A text (or thinking) block of an assistant message.
    Text {
        text: String,
        thinking: bool,
        /// The CLI made this message up after an API failure (`model: "<synthetic>"`).
        api_error: bool,
    },
    /// A `tool_use` block of an assistant message.
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
    /// A `tool_result` block of a user message.
    ToolResult {
        tool_use_id: String,
        content: String,
        is_error: bool,
    },
    /// `system/api_retry`: the CLI will try the API again.
    ApiRetry {
        attempt: u32,
        max_retries: u32,
        retry_delay_ms: u64,
        error_status: u32,
        error: String,
    },
    /// `system/permission_denied`: a tool call nobody was there to allow.
    PermissionDenied {
        tool_name: String,
        tool_use_id: String,
        message: String,
    },
    /// The turn's outcome.
    Result(ResultEvent),
    /// An event type or subtype this version does not model, or a content block it does not know.
    Other {
        event_type: String,
        subtype: Option<String>,
        json: String,
    },
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct InitEvent {
    #[serde(default)]
    pub session_id: String,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub cwd: String,
    #[serde(default)]
    pub tools: Vec<String>,
    #[serde(default, rename = "permissionMode")]
    pub permission_mode: String,
    #[serde(default)]
    pub claude_code_version: String,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct TokenUsage {
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub output_tokens: u64,
    #[serde(default)]
    pub cache_creation_input_tokens: u64,
    #[serde(default)]
    pub cache_read_input_tokens: u64,
}

/// The `result` event that ends every turn that was not killed.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct ResultEvent {
    /// `success`, `error_during_execution`, `error_max_turns`, ...
    #[serde(default)]
    pub subtype: String,
    #[serde(default)]
    pub is_error: bool,
    /// The final text; absent for some error subtypes.
    #[serde(default)]
    pub result: Option<String>,
    #[serde(default)]
    pub num_turns: u32,
    /// Cumulative for the agent's session, across `--resume`.
    #[serde(default)]
    pub total_cost_usd: f64,
    /// This turn's tokens.
    #[serde(default)]
    pub usage: TokenUsage,
    #[serde(default)]
    pub duration_ms: u64,
    #[serde(default)]
    pub duration_api_ms: u64,
    #[serde(default)]
    pub session_id: String,
    #[serde(default)]
    pub api_error_status: Option<u32>,
    #[serde(default)]
    pub errors: Option<Vec<String>>,
    #[serde(default)]
    pub permission_denials: Vec<Value>,
    #[serde(default)]
    pub terminal_reason: Option<String>,
}

impl ResultEvent {
    /// Why the turn failed, in words a user understands, or `None` if it succeeded.
    pub fn failure_reason(&self) -> Option<String> {
        if !self.is_error && self.subtype == "success" {
            return None;
        }
        let detail = self
            .errors
            .as_ref()
            .filter(|errors| !errors.is_empty())
            .map(|errors| errors.join("; "))
            .or_else(|| self.result.clone().filter(|text| !text.is_empty()));
        // An error result may still carry the subtype `success` (an API error does).
        let mut reason = match self.subtype.as_str() {
            "" | "success" => "agent reported an error".to_owned(),
            subtype => format!("agent reported {}", subtype.replace('_', " ")),
        };
        if let Some(status) = self.api_error_status {
            reason = format!("agent stopped on an api error (status {status})");
        }
        if let Some(detail) = detail {
            reason.push_str(": ");
            reason.push_str(&detail);
        }
        Some(reason)
    }
}

/// A stdout line that is not a JSON object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub message: String,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "not a stream-json event: {}", self.message)
    }
}

impl std::error::Error for ParseError {}

/// Parses one line of stream-json output into the events it carries.
///
/// An assistant or user message may carry several content blocks; each becomes an event.
/// A blank line carries none.
pub fn parse_line(line: &str) -> Result<Vec<AgentEvent>, ParseError> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(Vec::new());
    }
    let value: Value = serde_json::from_str(line).map_err(|err| ParseError {
        message: err.to_string(),
    })?;
    let Some(object) = value.as_object() else {
        return Err(ParseError {
            message: "a JSON value that is not an object".to_owned(),
        });
    };
    let event_type = object.get("type").and_then(Value::as_str).unwrap_or("");
    let subtype = object.get("subtype").and_then(Value::as_str);
    let typed = match (event_type, subtype) {
        ("system", Some("init")) => typed(&value, AgentEvent::Init).map(|e| vec![e]),
        ("system", Some("api_retry")) => api_retry(&value).map(|e| vec![e]),
        ("system", Some("permission_denied")) => permission_denied(&value).map(|e| vec![e]),
        ("assistant", _) => assistant_blocks(&value),
        ("user", _) => user_blocks(&value),
        ("result", _) => typed(&value, AgentEvent::Result).map(|e| vec![e]),
        _ => None,
    };
    Ok(typed.unwrap_or_else(|| vec![other(&value, line)]))
}

fn typed<T: for<'de> Deserialize<'de>>(
    value: &Value,
    wrap: impl FnOnce(T) -> AgentEvent,
) -> Option<AgentEvent> {
    T::deserialize(value).ok().map(wrap)
}

fn other(value: &Value, line: &str) -> AgentEvent {
    AgentEvent::Other {
        event_type: string_field(value, "type"),
        subtype: value
            .get("subtype")
            .and_then(Value::as_str)
            .map(str::to_owned),
        json: line.to_owned(),
    }
}

fn string_field(value: &Value, key: &str) -> String {
    value
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn u64_field(value: &Value, key: &str) -> u64 {
    value.get(key).and_then(Value::as_u64).unwrap_or_default()
}

fn u32_field(value: &Value, key: &str) -> u32 {
    u32::try_from(u64_field(value, key)).unwrap_or(u32::MAX)
}

fn api_retry(value: &Value) -> Option<AgentEvent> {
    Some(AgentEvent::ApiRetry {
        attempt: u32_field(value, "attempt"),
        max_retries: u32_field(value, "max_retries"),
        retry_delay_ms: u64_field(value, "retry_delay_ms"),
        error_status: u32_field(value, "error_status"),
        error: string_field(value, "error"),
    })
}

fn permission_denied(value: &Value) -> Option<AgentEvent> {
    Some(AgentEvent::PermissionDenied {
        tool_name: string_field(value, "tool_name"),
        tool_use_id: string_field(value, "tool_use_id"),
        message: string_field(value, "message"),
    })
}

fn content_blocks(value: &Value) -> Option<&Vec<Value>> {
    value.get("message")?.get("content")?.as_array()
}

fn assistant_blocks(value: &Value) -> Option<Vec<AgentEvent>> {
    let message = value.get("message")?;
    let api_error = value
        .get("is_api_error_message")
        .and_then(Value::as_bool)
        .unwrap_or(false)
        || message.get("model").and_then(Value::as_str) == Some("<synthetic>");
    let events = content_blocks(value)?
        .iter()
        .map(|block| match block.get("type").and_then(Value::as_str) {
            Some("text") => AgentEvent::Text {
                text: string_field(block, "text"),
                thinking: false,
                api_error,
            },
            Some("thinking") => AgentEvent::Text {
                text: string_field(block, "thinking"),
                thinking: true,
                api_error,
            },
            Some("tool_use") => AgentEvent::ToolUse {
                id: string_field(block, "id"),
                name: string_field(block, "name"),
                input: block.get("input").cloned().unwrap_or(Value::Null),
            },
            _ => other_block("assistant", block),
        })
        .collect();
    Some(events)
}

fn user_blocks(value: &Value) -> Option<Vec<AgentEvent>> {
    let events = content_blocks(value)?
        .iter()
        .map(|block| match block.get("type").and_then(Value::as_str) {
            Some("tool_result") => AgentEvent::ToolResult {
                tool_use_id: string_field(block, "tool_use_id"),
                content: flatten_content(block.get("content")),
                is_error: block
                    .get("is_error")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            },
            _ => other_block("user", block),
        })
        .collect();
    Some(events)
}

fn other_block(event_type: &str, block: &Value) -> AgentEvent {
    AgentEvent::Other {
        event_type: event_type.to_owned(),
        subtype: block.get("type").and_then(Value::as_str).map(str::to_owned),
        json: block.to_string(),
    }
}

/// A tool result's content is a string or a list of blocks; users want the text.
fn flatten_content(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(blocks)) => blocks
            .iter()
            .map(|block| match block.get("text").and_then(Value::as_str) {
                Some(text) => text.to_owned(),
                None => block.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Some(other) if !other.is_null() => other.to_string(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_event_types_are_kept_not_rejected() {
        let line = r#"{"type":"telemetry_v9","subtype":"ping","payload":[1,2]}"#;
        let events = parse_line(line).unwrap();
        assert_eq!(
            events,
            vec![AgentEvent::Other {
                event_type: "telemetry_v9".into(),
                subtype: Some("ping".into()),
                json: line.into()
            }]
        );
    }

    #[test]
    fn unknown_system_subtypes_are_kept() {
        let events = parse_line(r#"{"type":"system","subtype":"compact_boundary"}"#).unwrap();
        assert!(
            matches!(&events[0], AgentEvent::Other { subtype: Some(s), .. } if s == "compact_boundary")
        );
    }

    #[test]
    fn lines_that_are_not_json_objects_are_errors() {
        assert!(parse_line("Error: something broke").is_err());
        assert!(parse_line("[1,2]").is_err());
        assert_eq!(parse_line("   ").unwrap(), vec![]);
    }

    #[test]
    fn tool_result_content_in_blocks_is_flattened_to_text() {
        let line = r#"{"type":"user","message":{"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","is_error":true,"content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}}"#;
        assert_eq!(
            parse_line(line).unwrap(),
            vec![AgentEvent::ToolResult {
                tool_use_id: "t1".into(),
                content: "a\nb".into(),
                is_error: true
            }]
        );
    }

    #[test]
    fn a_success_result_has_no_failure_reason() {
        let result = ResultEvent {
            subtype: "success".into(),
            ..Default::default()
        };
        assert_eq!(result.failure_reason(), None);
    }

    #[test]
    fn an_error_with_subtype_success_reads_as_an_error() {
        let result = ResultEvent {
            subtype: "success".into(),
            is_error: true,
            result: Some("API Error: Connection refused".into()),
            ..Default::default()
        };
        assert_eq!(
            result.failure_reason().as_deref(),
            Some("agent reported an error: API Error: Connection refused")
        );
    }

    #[test]
    fn a_max_turns_result_explains_itself() {
        let result = ResultEvent {
            subtype: "error_max_turns".into(),
            is_error: true,
            ..Default::default()
        };
        assert_eq!(
            result.failure_reason().as_deref(),
            Some("agent reported error max turns")
        );
    }
}
