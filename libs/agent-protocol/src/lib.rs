//! Claude Code's `--output-format stream-json` output as typed events.
//!
//! Every line of the CLI's stdout is one JSON object. [`parse_line`] turns a line into the
//! events it carries. Event types and subtypes this version does not know are kept as
//! [`AgentEvent::Other`] with their JSON, so a newer CLI never breaks the parser.
//!
//! Success is decided from the [`ResultEvent`], never from the exit code: an API error ends
//! with `is_error: true` and exit 1, SIGINT with `error_during_execution` and exit 0, and
//! SIGTERM with exit 143 and no result at all.

mod events;
mod input;

pub use events::{AgentEvent, InitEvent, ParseError, ResultEvent, TokenUsage, parse_line};
pub use input::user_message_line;
