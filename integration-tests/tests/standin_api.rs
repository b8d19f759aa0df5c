//! The stand-in Messages API speaks what the CLI expects: SSE when asked to stream, a plain
//! JSON message otherwise (the CLI's fallback), and Anthropic error bodies.

use claudecluster_integration_tests::StandinApi;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn post(api: &StandinApi, body: serde_json::Value) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(api.address()).await.unwrap();
    let body = body.to_string();
    let request = format!(
        "POST /v1/messages?beta=true HTTP/1.1\r\nhost: {}\r\nx-api-key: sk-test\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        api.address(),
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

fn request(prompt: &str, stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": "m", "max_tokens": 100, "stream": stream,
        "messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
    })
}

#[tokio::test]
async fn a_non_streaming_request_gets_a_json_message() {
    let api = StandinApi::start().await.unwrap();
    let (status, body) = post(&api, request("hello", false)).await;
    assert_eq!(status, 200);
    let message: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(message["type"], "message");
    assert_eq!(message["content"][0]["text"], "MOCK_REPLY turn=1: hello");
    assert_eq!(message["stop_reason"], "end_turn");
    assert_eq!(api.requests()[0].api_key.as_deref(), Some("sk-test"));
}

#[tokio::test]
async fn a_streaming_request_gets_the_event_sequence_of_the_messages_api() {
    let api = StandinApi::start().await.unwrap();
    let (status, body) = post(&api, request("hello", true)).await;
    assert_eq!(status, 200);
    let events: Vec<&str> = body
        .lines()
        .filter_map(|line| line.strip_prefix("event: "))
        .collect();
    assert_eq!(
        events,
        vec![
            "message_start",
            "ping",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    assert!(
        body.contains(r#""text":"MOCK_REPLY turn=1: hello""#),
        "{body}"
    );
}

#[tokio::test]
async fn an_error_prompt_gets_the_status_and_an_error_body() {
    let api = StandinApi::start().await.unwrap();
    let (status, body) = post(&api, request("ERROR 529", true)).await;
    assert_eq!(status, 529);
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "overloaded_error");
}
