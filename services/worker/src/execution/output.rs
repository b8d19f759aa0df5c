use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// One line an agent printed, without its line ending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLine {
    pub stream: OutputStream,
    pub text: String,
}

/// Sends every line of `reader` to `lines` until the reader ends or nobody listens.
///
/// Lines are split on `\n` and decoded leniently: a tool may print anything.
pub async fn forward_lines(
    reader: impl AsyncRead + Unpin,
    stream: OutputStream,
    lines: mpsc::Sender<OutputLine>,
) {
    let mut reader = BufReader::new(reader);
    let mut buffer = Vec::new();
    loop {
        buffer.clear();
        match reader.read_until(b'\n', &mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                while matches!(buffer.last(), Some(b'\n' | b'\r')) {
                    buffer.pop();
                }
                let text = String::from_utf8_lossy(&buffer).into_owned();
                if lines.send(OutputLine { stream, text }).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_split_and_decoded_leniently() {
        let input: &[u8] = b"one\r\ntwo \xff\nlast without newline";
        let (tx, mut rx) = mpsc::channel(8);
        forward_lines(input, OutputStream::Stdout, tx).await;
        let mut got = Vec::new();
        while let Some(line) = rx.recv().await {
            got.push(line.text);
        }
        assert_eq!(got, vec!["one", "two \u{fffd}", "last without newline"]);
    }
}
