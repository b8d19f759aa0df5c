//! Lists that always fit in one response: long fields are cut (and the record says so), and a
//! page ends early, with a next-page token, before it outgrows [`PAGE_BYTES`].

use claudecluster_proto::MAX_MESSAGE_BYTES;
use claudecluster_proto::v1::{Session, Task};
use prost::Message;

/// What one page of a list may hold, leaving room under the message limit for the response's
/// own fields.
pub const PAGE_BYTES: usize = MAX_MESSAGE_BYTES - (256 << 10);
/// How much of a long text field a list shows.
pub const LISTED_FIELD_BYTES: usize = 1024;

/// Cuts `text` to at most `max` bytes on a character boundary, with a marker; true when cut.
pub fn cut(text: &mut String, max: usize) -> bool {
    const MARKER: &str = "…";
    if text.len() <= max {
        return false;
    }
    let mut end = max.saturating_sub(MARKER.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(MARKER);
    true
}

/// A task as a list shows it: its long fields cut.
pub fn listed_task(mut task: Task) -> Task {
    let mut shortened = cut(&mut task.status_reason, LISTED_FIELD_BYTES);
    if let Some(spec) = task.spec.as_mut() {
        shortened |= cut(&mut spec.prompt, LISTED_FIELD_BYTES);
        if let Some(agent) = spec.agent.as_mut() {
            shortened |= cut(&mut agent.append_system_prompt, LISTED_FIELD_BYTES);
        }
    }
    if let Some(result) = task.result.as_mut() {
        shortened |= cut(&mut result.text, LISTED_FIELD_BYTES);
        for error in &mut result.errors {
            shortened |= cut(error, LISTED_FIELD_BYTES);
        }
    }
    task.shortened |= shortened;
    task
}

/// A session as a list shows it.
pub fn listed_session(mut session: Session) -> Session {
    let mut shortened = cut(&mut session.state_reason, LISTED_FIELD_BYTES);
    if let Some(agent) = session.spec.as_mut().and_then(|spec| spec.agent.as_mut()) {
        shortened |= cut(&mut agent.append_system_prompt, LISTED_FIELD_BYTES);
    }
    session.shortened |= shortened;
    session
}

/// Counts what a page holds, to end it before it outgrows [`PAGE_BYTES`].
#[derive(Default)]
pub struct PageBudget {
    used: usize,
}

impl PageBudget {
    /// Whether `item` still fits; the first item of a page always does (one record is within
    /// the message limit by the bounds on what a task may hold).
    pub fn admit(&mut self, item: &impl Message) -> bool {
        // The field tag and length prefix of a repeated entry.
        let size = item.encoded_len() + 8;
        if self.used > 0 && self.used + size > PAGE_BYTES {
            return false;
        }
        self.used += size;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use claudecluster_proto::v1::{AgentResult, TaskSpec};

    #[test]
    fn cutting_keeps_whole_characters_and_marks_the_cut() {
        let mut text = "é".repeat(1000);
        assert!(cut(&mut text, 101));
        assert!(text.len() <= 101, "{}", text.len());
        assert!(text.ends_with('…'));
        let mut short = "abc".to_owned();
        assert!(!cut(&mut short, 3));
        assert_eq!(short, "abc");
    }

    #[test]
    fn a_listed_task_says_it_was_shortened_only_when_it_was() {
        let long = Task {
            spec: Some(TaskSpec {
                prompt: "p".repeat(500_000),
                ..Default::default()
            }),
            result: Some(AgentResult {
                text: "r".repeat(2_000_000),
                ..Default::default()
            }),
            ..Default::default()
        };
        let listed = listed_task(long);
        assert!(listed.shortened);
        assert!(listed.encoded_len() < 4 * LISTED_FIELD_BYTES);
        let short = Task {
            spec: Some(TaskSpec {
                prompt: "hi".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(!listed_task(short).shortened);
    }

    #[test]
    fn a_page_ends_before_it_outgrows_the_message_limit() {
        let big = Task {
            status_reason: "x".repeat(1 << 20),
            ..Default::default()
        };
        let mut budget = PageBudget::default();
        let admitted = (0..10).take_while(|_| budget.admit(&big)).count();
        assert_eq!(admitted, 3);
        let mut budget = PageBudget::default();
        let huge = Task {
            status_reason: "x".repeat(PAGE_BYTES),
            ..Default::default()
        };
        assert!(budget.admit(&huge), "the first entry always goes in");
    }
}
