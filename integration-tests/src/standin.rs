//! A stand-in for the Anthropic Messages API, for tests and benchmarks (not a product
//! feature). It serves `POST /v1/messages` the way the Claude Code CLI uses it (Server-Sent
//! Events, and the plain JSON fallback for `"stream": false`) and is scripted by the prompt:
//!
//! | prompt starts with         | reply                                                        |
//! |----------------------------|--------------------------------------------------------------|
//! | (anything else)            | text `MOCK_REPLY turn=N: <prompt>`                            |
//! | `WRITE <path> <content>`   | a `Write` tool call, then `MOCK_DONE wrote <path>`           |
//! | `BASH <command>`           | a `Bash` tool call, then `MOCK_DONE <first line of output>`  |
//! | `ERROR <status>`           | that HTTP status with an Anthropic error body                |
//! | `HANG`                     | response headers, then nothing until the client leaves       |
//! | `SLOW <chunks> <ms>`       | `chunk 1 chunk 2 …`, one chunk every `ms` milliseconds       |
//! | `RECALL`                   | `MOCK_RECALL n=K: <earlier prompts joined by " \| ">`          |
//! | `LARGE <bytes>`            | text `MOCK_LARGE xxx…`, `bytes` of `x`                        |
//! | `TOOL <name> <json input>` | a call of any tool, then `MOCK_DONE <first line of result>`  |
//! | `PHASE0 <child task>`      | the primary's loop: `spawn_claude_container` of the child task through the `claudecluster` MCP server, `wait_for_task` on it, then `PRIMARY DONE: <child's result>` |
//!
//! Every request is recorded for assertions.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const MODEL: &str = "claude-standin-1";

/// A request as the stand-in received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub api_key: Option<String>,
    pub body: Value,
}

impl RecordedRequest {
    /// The prompt this request answers: the last user text that is not a system reminder.
    pub fn prompt(&self) -> Option<String> {
        user_texts(&self.body).pop()
    }
}

#[derive(Default)]
struct Shared {
    requests: Mutex<Vec<RecordedRequest>>,
    /// API keys answered 429, as a rate-limited account would be.
    rate_limited: Mutex<Vec<String>>,
}

/// A running stand-in API on a loopback port.
pub struct StandinApi {
    address: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl StandinApi {
    /// Starts on a free port of `ip` (use 127.0.0.1 unless a container must reach it).
    pub async fn start_on(ip: &str) -> std::io::Result<Self> {
        Self::serve(TcpListener::bind((ip, 0)).await?)
    }

    fn serve(listener: TcpListener) -> std::io::Result<Self> {
        let address = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let app = Router::new()
            .route("/v1/messages", post(messages))
            .with_state(shared.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(StandinApi {
            address,
            shared,
            server,
        })
    }

    pub async fn start() -> std::io::Result<Self> {
        Self::start_on("127.0.0.1").await
    }

    /// Starts on a given loopback port.
    pub async fn start_fixed(port: u16) -> std::io::Result<Self> {
        Self::serve(TcpListener::bind(("127.0.0.1", port)).await?)
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The value for `ANTHROPIC_BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Answers every request presenting `api_key` with 429 from now on.
    pub fn rate_limit(&self, api_key: &str) {
        self.shared
            .rate_limited
            .lock()
            .unwrap()
            .push(api_key.to_owned());
    }
}

impl Drop for StandinApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn messages(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "body is not JSON",
        );
    };
    let api_key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let limited = api_key
        .as_ref()
        .is_some_and(|key| shared.rate_limited.lock().unwrap().contains(key));
    shared.requests.lock().unwrap().push(RecordedRequest {
        api_key,
        body: body.clone(),
    });
    if limited {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "stand-in rate limit for this key",
        );
    }
    let streaming = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    match script(&body) {
        Script::Error(status) => {
            let kind = match status {
                529 => "overloaded_error",
                429 => "rate_limit_error",
                401 => "authentication_error",
                400 => "invalid_request_error",
                _ => "api_error",
            };
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            error(
                status,
                kind,
                &format!("stand-in {kind} ({}) requested by prompt", status.as_u16()),
            )
        }
        Script::Hang => {
            let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(1);
            tokio::spawn(async move { tx.closed().await });
            sse_response(Body::from_stream(ReceiverStream::new(rx)))
        }
        Script::Reply(blocks, delay) => {
            if streaming {
                sse_response(stream_blocks(blocks, delay))
            } else {
                let content: Vec<Value> = blocks.iter().map(Block::to_json).collect();
                let stop = stop_reason(&blocks);
                axum::Json(json!({
                    "id": message_id(), "type": "message", "role": "assistant", "model": MODEL,
                    "content": content, "stop_reason": stop, "stop_sequence": null,
                    "usage": {"input_tokens": 100, "output_tokens": 20}
                }))
                .into_response()
            }
        }
    }
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"type": "error", "error": {"type": kind, "message": message}})),
    )
        .into_response()
}

fn sse_response(body: Body) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap()
}

#[derive(Debug, Clone)]
enum Block {
    /// Text, sent in chunks.
    Text(Vec<String>),
    ToolUse {
        name: String,
        input: Value,
    },
}

impl Block {
    fn to_json(&self) -> Value {
        match self {
            Block::Text(chunks) => json!({"type": "text", "text": chunks.concat()}),
            Block::ToolUse { name, input } => {
                json!({"type": "tool_use", "id": tool_id(), "name": name, "input": input})
            }
        }
    }
}

enum Script {
    Reply(Vec<Block>, Duration),
    Error(u16),
    Hang,
}

fn message_id() -> String {
    format!("msg_standin_{}", uuid::Uuid::new_v4().simple())
}

fn tool_id() -> String {
    format!("toolu_standin_{}", uuid::Uuid::new_v4().simple())
}

fn stop_reason(blocks: &[Block]) -> &'static str {
    if blocks.iter().any(|b| matches!(b, Block::ToolUse { .. })) {
        "tool_use"
    } else {
        "end_turn"
    }
}

fn text(reply: impl Into<String>) -> Script {
    Script::Reply(vec![Block::Text(vec![reply.into()])], Duration::ZERO)
}

/// Every user text of the conversation, in order, without system reminders.
fn user_texts(body: &Value) -> Vec<String> {
    let mut texts = Vec::new();
    for message in body["messages"].as_array().into_iter().flatten() {
        if message["role"] != "user" {
            continue;
        }
        match &message["content"] {
            Value::String(text) => texts.push(text.clone()),
            Value::Array(blocks) => {
                for block in blocks {
                    if block["type"] == "text" {
                        let text = block["text"].as_str().unwrap_or("");
                        if !text.trim_start().starts_with("<system-reminder>") {
                            texts.push(text.to_owned());
                        }
                    }
                }
            }
            _ => {}
        }
    }
    texts
}

/// The tool result the last user message carries, if it answers a tool call.
fn last_tool_result(body: &Value) -> Option<String> {
    let last = body["messages"].as_array()?.last()?;
    if last["role"] != "user" {
        return None;
    }
    let blocks = last["content"].as_array()?;
    blocks
        .iter()
        .find(|b| b["type"] == "tool_result")
        .map(|block| match &block["content"] {
            Value::String(text) => text.clone(),
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join("\n"),
            _ => String::new(),
        })
}

/// The name of the last tool the assistant called in the conversation.
fn last_tool_use(body: &Value) -> Option<String> {
    body["messages"]
        .as_array()?
        .iter()
        .rev()
        .filter(|message| message["role"] == "assistant")
        .find_map(|message| {
            message["content"]
                .as_array()?
                .iter()
                .rev()
                .find(|block| block["type"] == "tool_use")
                .and_then(|block| block["name"].as_str())
                .map(str::to_owned)
        })
}

/// The JSON object a tool result carries (MCP tools answer with one).
fn tool_result_json(result: &str) -> Value {
    let start = result.find('{').unwrap_or(0);
    let end = result.rfind('}').map(|i| i + 1).unwrap_or(result.len());
    serde_json::from_str(&result[start..end]).unwrap_or(Value::Null)
}

/// The primary of the seed's Phase 0: spawn a containerized agent, wait for it, report.
fn phase_zero(body: &Value, child_task: &str, tool_result: Option<String>) -> Script {
    const SPAWN: &str = "mcp__claudecluster__spawn_claude_container";
    const WAIT: &str = "mcp__claudecluster__wait_for_task";
    let Some(result) = tool_result else {
        return tool_call(
            "I'll hand this to a containerized agent.",
            SPAWN,
            json!({"task": child_task}),
        );
    };
    let answer = tool_result_json(&result);
    match last_tool_use(body).as_deref() {
        Some(SPAWN) => {
            let task_id = answer["taskId"].as_str().unwrap_or_default();
            tool_call(
                "Waiting for it.",
                WAIT,
                json!({"taskId": task_id, "timeoutSeconds": 45}),
            )
        }
        Some(WAIT) if answer["status"] != "completed" => {
            let task_id = answer["taskId"].as_str().unwrap_or_default();
            tool_call(
                "Still waiting.",
                WAIT,
                json!({"taskId": task_id, "timeoutSeconds": 45}),
            )
        }
        _ => {
            let child = answer["result"]["text"].as_str().unwrap_or("(no result)");
            text(format!("PRIMARY DONE: {child}"))
        }
    }
}

/// The agent's working directory, from the environment description the CLI sends.
fn working_directory(value: &Value) -> Option<String> {
    const MARKER: &str = "Primary working directory: ";
    match value {
        Value::String(text) => text.find(MARKER).map(|start| {
            text[start + MARKER.len()..]
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        }),
        Value::Array(items) => items.iter().find_map(working_directory),
        Value::Object(map) => map.values().find_map(working_directory),
        _ => None,
    }
}

fn script(body: &Value) -> Script {
    let texts = user_texts(body);
    let Some(prompt) = texts.last().cloned() else {
        return text("MOCK_REPLY turn=0: (no prompt)");
    };
    let prompt = prompt.trim().to_owned();
    let (command, rest) = prompt
        .split_once(char::is_whitespace)
        .unwrap_or((&prompt, ""));
    let rest = rest.trim();
    let tool_result = last_tool_result(body);
    match command {
        "ERROR" => Script::Error(rest.parse().unwrap_or(500)),
        "HANG" => Script::Hang,
        "PHASE0" => phase_zero(body, rest, tool_result),
        "SLOW" => {
            let mut numbers = rest
                .split_whitespace()
                .map(|n| n.parse::<u64>().unwrap_or(1));
            let chunks = numbers.next().unwrap_or(5);
            let delay = numbers.next().unwrap_or(100);
            let pieces = (1..=chunks).map(|i| format!("chunk {i} ")).collect();
            Script::Reply(vec![Block::Text(pieces)], Duration::from_millis(delay))
        }
        "LARGE" => {
            let bytes = rest.parse::<usize>().unwrap_or(1 << 20);
            text(format!("MOCK_LARGE {}", "x".repeat(bytes)))
        }
        "RECALL" => {
            let earlier = &texts[..texts.len() - 1];
            text(format!(
                "MOCK_RECALL n={}: {}",
                earlier.len(),
                earlier.join(" | ")
            ))
        }
        "WRITE" | "BASH" | "TOOL" if tool_result.is_some() => {
            let result = tool_result.unwrap_or_default();
            match command {
                "WRITE" => {
                    let path = rest.split_whitespace().next().unwrap_or("");
                    text(format!("MOCK_DONE wrote {path}"))
                }
                _ => text(format!("MOCK_DONE {}", result.lines().next().unwrap_or(""))),
            }
        }
        "WRITE" => {
            let (path, content) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            let path = if path.starts_with('/') {
                path.to_owned()
            } else {
                let cwd = working_directory(body).unwrap_or_else(|| "/workspace".into());
                format!("{}/{path}", cwd.trim_end_matches('/'))
            };
            tool_call(
                "I'll write the file.",
                "Write",
                json!({"file_path": path, "content": format!("{content}\n")}),
            )
        }
        "BASH" => tool_call(
            "I'll run it.",
            "Bash",
            json!({"command": rest, "description": "run the requested command"}),
        ),
        "TOOL" => {
            let (name, input) = rest.split_once(char::is_whitespace).unwrap_or((rest, "{}"));
            let input = serde_json::from_str(input).unwrap_or_else(|_| json!({}));
            tool_call("Calling the tool.", name, input)
        }
        _ => {
            let turn = texts.len();
            text(format!("MOCK_REPLY turn={turn}: {prompt}"))
        }
    }
}

fn tool_call(preface: &str, name: &str, input: Value) -> Script {
    Script::Reply(
        vec![
            Block::Text(vec![preface.to_owned()]),
            Block::ToolUse {
                name: name.to_owned(),
                input,
            },
        ],
        Duration::ZERO,
    )
}

fn sse(event: &str, data: Value) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

/// The Messages API's event sequence for `blocks`, with `delay` before each text chunk.
fn stream_blocks(blocks: Vec<Block>, delay: Duration) -> Body {
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(16);
    tokio::spawn(async move {
        let send = |bytes: Bytes| {
            let tx = tx.clone();
            async move { tx.send(Ok(bytes)).await.is_ok() }
        };
        let stop = stop_reason(&blocks);
        let start = json!({"type": "message_start", "message": {
            "id": message_id(), "type": "message", "role": "assistant", "model": MODEL,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 100, "output_tokens": 1}}});
        if !send(sse("message_start", start)).await {
            return;
        }
        let _ = send(sse("ping", json!({"type": "ping"}))).await;
        let mut output_tokens = 1;
        for (index, block) in blocks.into_iter().enumerate() {
            match block {
                Block::Text(chunks) => {
                    let start = json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}});
                    let _ = send(sse("content_block_start", start)).await;
                    for chunk in chunks {
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        output_tokens += chunk.split_whitespace().count().max(1);
                        let delta = json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": chunk}});
                        if !send(sse("content_block_delta", delta)).await {
                            return;
                        }
                    }
                }
                Block::ToolUse { name, input } => {
                    let start = json!({"type": "content_block_start", "index": index, "content_block": {"type": "tool_use", "id": tool_id(), "name": name, "input": {}}});
                    let _ = send(sse("content_block_start", start)).await;
                    let delta = json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": input.to_string()}});
                    let _ = send(sse("content_block_delta", delta)).await;
                    output_tokens += 10;
                }
            }
            let _ = send(sse(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index}),
            ))
            .await;
        }
        let delta = json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null}, "usage": {"output_tokens": output_tokens}});
        let _ = send(sse("message_delta", delta)).await;
        let _ = send(sse("message_stop", json!({"type": "message_stop"}))).await;
    });
    Body::from_stream(ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(messages: Value) -> Value {
        json!({"model": "m", "stream": true, "messages": messages})
    }

    #[test]
    fn the_prompt_is_the_last_user_text_that_is_not_a_reminder() {
        let body = body(json!([
            {"role": "user", "content": [
                {"type": "text", "text": "<system-reminder>context</system-reminder>"},
                {"type": "text", "text": "hello there"}]},
        ]));
        assert_eq!(user_texts(&body), vec!["hello there"]);
        assert!(
            matches!(script(&body), Script::Reply(blocks, _) if matches!(&blocks[0], Block::Text(t) if t.concat() == "MOCK_REPLY turn=1: hello there"))
        );
    }

    #[test]
    fn write_calls_the_tool_then_confirms() {
        let first = body(json!([
            {"role": "user", "content": [{"type": "text", "text": "WRITE out.txt hello world"}]},
            {"role": "system", "content": "Primary working directory: /work/t1\nPlatform: linux"},
        ]));
        let Script::Reply(blocks, _) = script(&first) else {
            panic!()
        };
        let Block::ToolUse { name, input } = &blocks[1] else {
            panic!()
        };
        assert_eq!(name, "Write");
        assert_eq!(input["file_path"], "/work/t1/out.txt");
        assert_eq!(input["content"], "hello world\n");
        let second = body(json!([
            {"role": "user", "content": [{"type": "text", "text": "WRITE out.txt hello world"}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "Write", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "File created"}]},
        ]));
        assert!(
            matches!(script(&second), Script::Reply(blocks, _) if matches!(&blocks[0], Block::Text(t) if t.concat() == "MOCK_DONE wrote out.txt"))
        );
    }
}
