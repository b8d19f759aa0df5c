use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
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

/// Splits chunks of output (as Docker's attach stream delivers them) into lines.
#[derive(Debug, Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// The complete lines in `pending` plus `chunk`; a partial last line waits for more.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(chunk);
        let mut lines = Vec::new();
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            lines.push(decode(&line));
        }
        lines
    }

    /// What is left once the output has ended.
    pub fn finish(&mut self) -> Option<String> {
        (!self.pending.is_empty()).then(|| decode(&std::mem::take(&mut self.pending)))
    }
}

/// A line without its ending, decoded leniently: a tool may print anything.
fn decode(line: &[u8]) -> String {
    let mut end = line.len();
    while end > 0 && matches!(line[end - 1], b'\n' | b'\r') {
        end -= 1;
    }
    String::from_utf8_lossy(&line[..end]).into_owned()
}

/// A channel whose lines are written to `writer` (an agent's stdin) in order; when every
/// sender is gone, `writer` is shut down, which closes the agent's input.
pub fn input_writer(mut writer: impl AsyncWrite + Unpin + Send + 'static) -> mpsc::Sender<String> {
    let (input, mut lines) = mpsc::channel::<String>(8);
    tokio::spawn(async move {
        while let Some(line) = lines.recv().await {
            if writer.write_all(line.as_bytes()).await.is_err() {
                return;
            }
        }
        let _ = writer.shutdown().await;
    });
    input
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
                let text = decode(&buffer);
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

    #[test]
    fn chunks_split_anywhere_become_whole_lines() {
        let mut splitter = LineSplitter::default();
        assert_eq!(splitter.push(b"{\"a\":"), Vec::<String>::new());
        assert_eq!(splitter.push(b"1}\r\n{\"b\""), vec!["{\"a\":1}"]);
        assert_eq!(splitter.push(b":2}\nrest"), vec!["{\"b\":2}"]);
        assert_eq!(splitter.finish().as_deref(), Some("rest"));
        assert_eq!(splitter.finish(), None);
    }
}
