//! Tool parameters. Their JSON schemas are generated from these types; unknown fields are a
//! malformed call. Each tool checks its parameters before it calls the driver, and an error
//! names the parameter, so that the model can correct the call.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;

use claudecluster_config::ByteSize;
use claudecluster_proto::v1::{AgentOptions, ExecutionMode, ResourceLimits, SessionSpec, TaskSpec};
use claudecluster_proto::validate::{
    self, MAX_LABEL_VALUE_BYTES, MAX_NAME_BYTES, MAX_REPO_URL_BYTES, PROMPT_BYTES_CEILING,
};
use rmcp::ErrorData;
use rmcp::handler::server::common::FromContextPart;
use rmcp::handler::server::tool::ToolCallContext;
use rmcp::model::JsonObject;
use rmcp::schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::bounds;

/// The longest task or message passed on to the driver: the most `driver.maxPromptBytes` may
/// be. The driver refuses what is past its own setting (512 KiB unless configured otherwise),
/// and its refusal reaches the caller naming the tool's parameter.
pub const MAX_PROMPT_BYTES: usize = PROMPT_BYTES_CEILING;
/// The longest short text accepted: a cancel reason, a memory size, a status, a page token.
pub const MAX_SHORT_TEXT_BYTES: usize = 1024;
/// The longest a tool call waits, in seconds: under Claude Code's 60 s limit for a tool call. A
/// longer `timeoutSeconds` waits this long; the caller calls again if it must wait more.
pub const MAX_WAIT_SECONDS: u32 = 50;
/// How long a tool call waits when the caller does not say.
pub const DEFAULT_WAIT_SECONDS: u32 = 30;
/// The most tasks `list_tasks` asks the driver for: the driver's largest page. A larger `limit`
/// asks for this many.
pub const MAX_LIST_LIMIT: u32 = 1000;
/// How many tasks `list_tasks` asks for when the caller does not say.
pub const DEFAULT_LIST_LIMIT: u32 = 50;

/// What the rmcp router turns into a tool error the model can read, rather than a protocol
/// error: its prefix for arguments that do not deserialize.
const DESERIALIZE_ERROR_PREFIX: &str = "failed to deserialize parameters:";

/// A tool's parameters: rmcp's `Parameters`, with errors that name the parameter. Serde names a
/// field only when it is missing or unknown; "invalid type: string, expected u32" alone leaves
/// the model guessing which argument it got wrong.
pub struct Parameters<P>(pub P);

impl<P: JsonSchema> JsonSchema for Parameters<P> {
    fn schema_name() -> Cow<'static, str> {
        P::schema_name()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        P::json_schema(generator)
    }
}

impl<S, P: DeserializeOwned> FromContextPart<ToolCallContext<'_, S>> for Parameters<P> {
    fn from_context_part(context: &mut ToolCallContext<'_, S>) -> Result<Self, ErrorData> {
        let arguments = context.arguments.take().unwrap_or_default();
        parse(arguments).map(Parameters).map_err(|message| {
            let message = bounds::error_message(&message);
            ErrorData::invalid_params(format!("{DESERIALIZE_ERROR_PREFIX} {message}"), None)
        })
    }
}

/// Deserializes a tool's arguments, naming the argument at fault.
pub fn parse<P: DeserializeOwned>(arguments: JsonObject) -> Result<P, String> {
    let error = match serde_json::from_value::<P>(Value::Object(arguments.clone())) {
        Ok(params) => return Ok(params),
        Err(error) => error.to_string(),
    };
    // Serde stops at the first argument at fault, so that argument is the one without which
    // the error changes. Arguments are few and this runs only for a call that failed.
    let at_fault = arguments.keys().find(|key| {
        let mut without = arguments.clone();
        without.remove(key.as_str());
        match serde_json::from_value::<P>(Value::Object(without)) {
            Ok(_) => true,
            Err(other) => other.to_string() != error,
        }
    });
    match at_fault {
        Some(key) if !error.contains(&format!("`{key}`")) => Err(format!("{key}: {error}")),
        _ => Err(error),
    }
}

/// A parameter the caller got wrong, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidParameter {
    pub parameter: &'static str,
    pub problem: String,
}

impl fmt::Display for InvalidParameter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.parameter, self.problem)
    }
}

fn invalid(parameter: &'static str, problem: impl Into<String>) -> InvalidParameter {
    InvalidParameter {
        parameter,
        problem: problem.into(),
    }
}

/// The checks a tool's parameters pass before the tool calls the driver.
pub trait Check {
    fn check(&self) -> Result<(), InvalidParameter>;
}

/// The id of a task or a session, by the rules the driver gives them.
fn id(parameter: &'static str, value: &str) -> Result<(), InvalidParameter> {
    if value.trim().is_empty() {
        return Err(invalid(parameter, "must not be empty"));
    }
    validate::id(parameter, value).map_err(|refused| invalid(parameter, refused.message))
}

/// A word the caller passes through (a page token, a session of Claude Code's): not blank, at
/// most `max` bytes, one line of printable characters.
fn token(parameter: &'static str, value: &str, max: usize) -> Result<(), InvalidParameter> {
    if value.trim().is_empty() {
        return Err(invalid(parameter, "must not be empty"));
    }
    short_text(parameter, Some(value), max)?;
    if value.chars().any(char::is_control) {
        return Err(invalid(parameter, "must not contain control characters"));
    }
    Ok(())
}

/// What an agent is asked: not blank, within what any driver accepts, no NUL (which no process
/// argument takes).
fn prompt(parameter: &'static str, value: &str) -> Result<(), InvalidParameter> {
    if value.trim().is_empty() {
        return Err(invalid(parameter, "must not be empty"));
    }
    short_text(parameter, Some(value), MAX_PROMPT_BYTES)?;
    if value.contains('\0') {
        return Err(invalid(parameter, "must not contain NUL characters"));
    }
    Ok(())
}

fn short_text(
    parameter: &'static str,
    value: Option<&str>,
    max: usize,
) -> Result<(), InvalidParameter> {
    match value {
        Some(value) if value.len() > max => Err(invalid(
            parameter,
            format!("is {} bytes; at most {max} are accepted", value.len()),
        )),
        _ => Ok(()),
    }
}

/// A repository URL's size, so that no error ever echoes a huge one; the driver checks its
/// form, and shows it without credentials.
fn repo_url(value: Option<&str>) -> Result<(), InvalidParameter> {
    short_text("repoUrl", value, MAX_REPO_URL_BYTES)
}

/// A number of seconds that must be at least one when given: to the cluster zero asks for its
/// default, which is not what a caller who wrote 0 seconds meant.
fn seconds(parameter: &'static str, value: Option<u32>) -> Result<(), InvalidParameter> {
    match value {
        Some(0) => Err(invalid(parameter, "must be at least 1 second")),
        _ => Ok(()),
    }
}

fn allowed_tools(value: Option<&Vec<String>>) -> Result<(), InvalidParameter> {
    for tool in value.into_iter().flatten() {
        if tool.trim().is_empty() {
            return Err(invalid("allowedTools", "names must not be empty"));
        }
        short_text("allowedTools", Some(tool), MAX_NAME_BYTES)?;
    }
    Ok(())
}

/// The fields of a spec as the driver names them in a refusal, and the tool parameters that set
/// them.
const SPEC_FIELDS: &[(&str, &str)] = &[
    ("spec.prompt", "task"),
    ("spec.repo_url", "repoUrl"),
    ("spec.limits.timeout_seconds", "sessionTimeout"),
    ("spec.limits.memory_bytes", "memory"),
    ("spec.limits.cpus", "cpus"),
    ("spec.environment", "environment"),
    ("spec.agent.allowed_tools", "allowedTools"),
    ("spec.agent.model", "model"),
    ("spec.idle_timeout_seconds", "idleTimeoutSeconds"),
];

/// The driver's refusal of a spec (`spec.prompt: is … bytes`) as a refusal of the tool
/// parameter the caller set (`task: is … bytes`), for the model to know what to correct.
pub fn naming_the_parameter(message: &str) -> Cow<'_, str> {
    for (field, parameter) in SPEC_FIELDS {
        if let Some(rest) = message.strip_prefix(field)
            && rest.starts_with(':')
        {
            return Cow::Owned(format!("{parameter}{rest}"));
        }
    }
    Cow::Borrowed(message)
}

/// How long a tool waits for `timeout_seconds`: the default when not given, and at most
/// [`MAX_WAIT_SECONDS`].
pub fn wait_seconds(timeout_seconds: Option<u32>) -> u32 {
    timeout_seconds
        .unwrap_or(DEFAULT_WAIT_SECONDS)
        .min(MAX_WAIT_SECONDS)
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpawnParams {
    /// What the agent should do (at most 512 KiB, unless the cluster allows more).
    pub task: String,
    /// A git repository to clone into the agent's workspace.
    pub repo_url: Option<String>,
    /// How long the agent may run, in seconds.
    pub session_timeout: Option<u32>,
    /// Memory limit of its container, such as "2GB".
    pub memory: Option<String>,
    /// CPU limit of its container, in cores.
    pub cpus: Option<f64>,
    /// Environment variables for the agent.
    pub environment: Option<BTreeMap<String, String>>,
    /// Tools the agent may use without asking, such as ["Write", "Bash"].
    pub allowed_tools: Option<Vec<String>>,
    /// The model the agent uses.
    pub model: Option<String>,
}

impl Check for SpawnParams {
    fn check(&self) -> Result<(), InvalidParameter> {
        prompt("task", &self.task)?;
        repo_url(self.repo_url.as_deref())?;
        seconds("sessionTimeout", self.session_timeout)?;
        memory_bytes(self.memory.as_deref())?;
        if let Some(cpus) = self.cpus
            && !(cpus > 0.0 && cpus.is_finite())
        {
            return Err(invalid("cpus", "must be a number of cores above 0"));
        }
        // The driver checks the environment, and its refusal names it.
        allowed_tools(self.allowed_tools.as_ref())?;
        short_text("model", self.model.as_deref(), MAX_NAME_BYTES)
    }
}

/// The memory limit in bytes; 0 when not given.
fn memory_bytes(memory: Option<&str>) -> Result<u64, InvalidParameter> {
    let Some(memory) = memory else {
        return Ok(0);
    };
    short_text("memory", Some(memory), MAX_SHORT_TEXT_BYTES)?;
    ByteSize::parse(memory)
        .map(|size| size.0)
        .map_err(|problem| invalid("memory", problem))
}

impl SpawnParams {
    pub fn into_spec(self, labels: HashMap<String, String>) -> Result<TaskSpec, InvalidParameter> {
        self.check()?;
        let memory_bytes = memory_bytes(self.memory.as_deref())?;
        Ok(TaskSpec {
            prompt: self.task,
            repo_url: self.repo_url.unwrap_or_default(),
            execution_mode: ExecutionMode::ContainerAgentic as i32,
            limits: Some(ResourceLimits {
                memory_bytes,
                cpus: self.cpus.unwrap_or_default(),
                timeout_seconds: self.session_timeout.unwrap_or_default(),
                pids: 0,
            }),
            agent: Some(AgentOptions {
                allowed_tools: self.allowed_tools.unwrap_or_default(),
                model: self.model.unwrap_or_default(),
                ..Default::default()
            }),
            labels,
            environment: self.environment.unwrap_or_default().into_iter().collect(),
            ..Default::default()
        })
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TaskParams {
    pub task_id: String,
}

impl Check for TaskParams {
    fn check(&self) -> Result<(), InvalidParameter> {
        id("taskId", &self.task_id)
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WaitParams {
    pub task_id: String,
    /// Default 30, at most 50: a longer wait waits 50 seconds.
    pub timeout_seconds: Option<u32>,
}

impl Check for WaitParams {
    fn check(&self) -> Result<(), InvalidParameter> {
        id("taskId", &self.task_id)
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CancelParams {
    pub task_id: String,
    pub reason: Option<String>,
}

impl Check for CancelParams {
    fn check(&self) -> Result<(), InvalidParameter> {
        id("taskId", &self.task_id)?;
        short_text("reason", self.reason.as_deref(), MAX_SHORT_TEXT_BYTES)
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListParams {
    /// pending, assigned, running, completed, failed or cancelled.
    pub status: Option<String>,
    /// Only the tasks this primary Claude Code session spawned.
    pub mine: Option<bool>,
    /// Only the tasks spawned by this Claude Code session.
    pub parent_session_id: Option<String>,
    /// At most this many (default 50; more than 1000 asks for 1000).
    pub limit: Option<u32>,
    /// The nextPageToken of an earlier call, for the tasks after it.
    pub page_token: Option<String>,
}

impl Check for ListParams {
    fn check(&self) -> Result<(), InvalidParameter> {
        short_text("status", self.status.as_deref(), MAX_SHORT_TEXT_BYTES)?;
        if let Some(parent) = &self.parent_session_id {
            // It is matched as the value of a label.
            token("parentSessionId", parent, MAX_LABEL_VALUE_BYTES)?;
        }
        if self.limit == Some(0) {
            return Err(invalid("limit", "must be at least 1"));
        }
        match &self.page_token {
            Some(page) if !page.is_empty() => token("pageToken", page, MAX_SHORT_TEXT_BYTES),
            _ => Ok(()),
        }
    }
}

impl ListParams {
    /// How many tasks to ask the driver for.
    pub fn page_size(&self) -> u32 {
        self.limit
            .unwrap_or(DEFAULT_LIST_LIMIT)
            .clamp(1, MAX_LIST_LIMIT)
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateSessionParams {
    pub repo_url: Option<String>,
    /// Stop the container after this many seconds without a message.
    pub idle_timeout_seconds: Option<u32>,
    pub allowed_tools: Option<Vec<String>>,
    pub model: Option<String>,
}

impl Check for CreateSessionParams {
    fn check(&self) -> Result<(), InvalidParameter> {
        repo_url(self.repo_url.as_deref())?;
        seconds("idleTimeoutSeconds", self.idle_timeout_seconds)?;
        allowed_tools(self.allowed_tools.as_ref())?;
        short_text("model", self.model.as_deref(), MAX_NAME_BYTES)
    }
}

impl CreateSessionParams {
    pub fn into_spec(self) -> SessionSpec {
        SessionSpec {
            repo_url: self.repo_url.unwrap_or_default(),
            idle_timeout_seconds: self.idle_timeout_seconds.unwrap_or_default(),
            agent: Some(AgentOptions {
                allowed_tools: self.allowed_tools.unwrap_or_default(),
                model: self.model.unwrap_or_default(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SendParams {
    pub session_id: String,
    /// The message (at most 512 KiB, unless the cluster allows more).
    pub text: String,
    /// Default 30, at most 50: a longer wait waits 50 seconds.
    pub timeout_seconds: Option<u32>,
}

impl Check for SendParams {
    fn check(&self) -> Result<(), InvalidParameter> {
        id("sessionId", &self.session_id)?;
        prompt("text", &self.text)
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReplyParams {
    pub session_id: String,
    /// The message's turn, as send_message returned it.
    pub turn: u32,
    /// Default 30, at most 50: a longer wait waits 50 seconds.
    pub timeout_seconds: Option<u32>,
}

impl Check for ReplyParams {
    fn check(&self) -> Result<(), InvalidParameter> {
        id("sessionId", &self.session_id)?;
        if self.turn == 0 {
            return Err(invalid(
                "turn",
                "must be at least 1: the turn send_message returned",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SessionParams {
    pub session_id: String,
}

impl Check for SessionParams {
    fn check(&self) -> Result<(), InvalidParameter> {
        id("sessionId", &self.session_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn arguments(value: Value) -> JsonObject {
        match value {
            Value::Object(fields) => fields,
            _ => unreachable!("arguments are an object"),
        }
    }

    fn spawn(value: Value) -> SpawnParams {
        parse(arguments(value)).unwrap()
    }

    fn problem(result: Result<(), InvalidParameter>) -> String {
        result.unwrap_err().to_string()
    }

    #[test]
    fn a_wrong_type_names_the_argument() {
        let err = parse::<WaitParams>(arguments(json!({
            "taskId": "t-1",
            "timeoutSeconds": "soon",
        })))
        .unwrap_err();
        assert!(
            err.starts_with("timeoutSeconds: invalid type: string"),
            "{err}"
        );

        let err = parse::<WaitParams>(arguments(json!({
            "taskId": "t-1",
            "timeoutSeconds": -5,
        })))
        .unwrap_err();
        assert!(
            err.starts_with("timeoutSeconds: invalid value: integer `-5`"),
            "{err}"
        );

        let err = parse::<SpawnParams>(arguments(json!({
            "task": "hi",
            "environment": { "A": 1 },
        })))
        .unwrap_err();
        assert!(err.starts_with("environment: "), "{err}");

        let err = parse::<ReplyParams>(arguments(json!({
            "sessionId": "s-1",
            "turn": 1e100,
        })))
        .unwrap_err();
        assert!(err.starts_with("turn: "), "{err}");
    }

    #[test]
    fn missing_and_unknown_arguments_keep_serdes_own_words() {
        let err = parse::<TaskParams>(arguments(json!({}))).unwrap_err();
        assert_eq!(err, "missing field `taskId`");
        let err = parse::<TaskParams>(arguments(json!({ "taskId": "t", "bogus": 1 }))).unwrap_err();
        assert!(err.starts_with("unknown field `bogus`"), "{err}");
    }

    #[test]
    fn ids_must_be_present_and_shaped_as_the_driver_makes_them() {
        let check = |task_id: &str| {
            TaskParams {
                task_id: task_id.to_owned(),
            }
            .check()
        };
        assert_eq!(check("3f0c2b9e-0c1d-4e5f-8a9b-1c2d3e4f5a6b"), Ok(()));
        assert_eq!(problem(check("")), "taskId: must not be empty");
        assert_eq!(problem(check("  ")), "taskId: must not be empty");
        let long = problem(check(&"x".repeat(100_000)));
        assert!(long.starts_with("taskId: must have 1 to "), "{long}");
        assert!(long.len() < 100, "an error never echoes a huge id: {long}");
        assert_eq!(
            problem(check("t\n1")),
            "taskId: must be letters, digits, '-' or '_'"
        );
        let session = SessionParams {
            session_id: String::new(),
        };
        assert_eq!(problem(session.check()), "sessionId: must not be empty");
    }

    #[test]
    fn a_task_past_what_any_driver_takes_is_refused_by_name() {
        let at_limit = spawn(json!({ "task": "x".repeat(MAX_PROMPT_BYTES) }));
        assert_eq!(at_limit.check(), Ok(()));
        let past = spawn(json!({ "task": "x".repeat(MAX_PROMPT_BYTES + 1) }));
        assert_eq!(
            problem(past.check()),
            "task: is 1048577 bytes; at most 1048576 are accepted"
        );
        assert_eq!(
            problem(spawn(json!({ "task": " \n" })).check()),
            "task: must not be empty"
        );
        assert_eq!(
            problem(spawn(json!({ "task": "a\0b" })).check()),
            "task: must not contain NUL characters"
        );
        let message = SendParams {
            session_id: "s-1".into(),
            text: "y".repeat(MAX_PROMPT_BYTES + 1),
            timeout_seconds: None,
        };
        assert!(problem(message.check()).starts_with("text: is 1048577 bytes"));
    }

    #[test]
    fn the_drivers_refusals_name_the_tools_parameters() {
        assert_eq!(
            naming_the_parameter(
                "spec.prompt: is 524289 bytes; at most 524288 are accepted (driver.maxPromptBytes)"
            ),
            "task: is 524289 bytes; at most 524288 are accepted (driver.maxPromptBytes)"
        );
        assert_eq!(
            naming_the_parameter("spec.limits.cpus: must be at least 0.01"),
            "cpus: must be at least 0.01"
        );
        assert_eq!(
            naming_the_parameter("spec.environment: `ANTHROPIC_API_KEY` is set by the worker"),
            "environment: `ANTHROPIC_API_KEY` is set by the worker"
        );
        for untouched in [
            "task t-1 not found",
            "spec.prompts: not a field",
            "spec.labels: too many",
        ] {
            assert_eq!(naming_the_parameter(untouched), untouched);
        }
    }

    #[test]
    fn spawn_limits_are_checked_by_name() {
        for (arguments, expected) in [
            (
                json!({ "task": "t", "cpus": 0.0 }),
                "cpus: must be a number of cores above 0",
            ),
            (
                json!({ "task": "t", "cpus": -2 }),
                "cpus: must be a number of cores above 0",
            ),
            (
                json!({ "task": "t", "sessionTimeout": 0 }),
                "sessionTimeout: must be at least 1 second",
            ),
            (
                json!({ "task": "t", "memory": "lots" }),
                "memory: `lots` is not a size such as 512MB or 4GB",
            ),
            (
                json!({ "task": "t", "allowedTools": ["Write", " "] }),
                "allowedTools: names must not be empty",
            ),
        ] {
            assert_eq!(
                problem(spawn(arguments.clone()).check()),
                expected,
                "{arguments}"
            );
        }
        let huge_memory = spawn(json!({ "task": "t", "memory": "9".repeat(5000) }));
        assert_eq!(
            problem(huge_memory.check()),
            "memory: is 5000 bytes; at most 1024 are accepted"
        );
        let url = format!("https://user:secret@git.example/{}", "r".repeat(5000));
        let long_url = spawn(json!({ "task": "t", "repoUrl": &url }));
        let err = problem(long_url.check());
        assert_eq!(
            err,
            format!("repoUrl: is {} bytes; at most 4096 are accepted", url.len())
        );
        assert!(!err.contains("secret"), "an error never echoes the URL");

        let spec = spawn(json!({ "task": "t", "memory": "2GB", "cpus": 1.5 }))
            .into_spec(HashMap::new())
            .unwrap();
        let limits = spec.limits.unwrap();
        assert_eq!((limits.memory_bytes, limits.cpus), (2_000_000_000, 1.5));
    }

    #[test]
    fn waits_past_the_maximum_are_clamped_and_other_numbers_checked() {
        assert_eq!(wait_seconds(None), DEFAULT_WAIT_SECONDS);
        assert_eq!(wait_seconds(Some(0)), 0);
        assert_eq!(wait_seconds(Some(50)), 50);
        assert_eq!(wait_seconds(Some(u32::MAX)), MAX_WAIT_SECONDS);

        let list = |value: Value| parse::<ListParams>(arguments(value)).unwrap();
        assert_eq!(list(json!({})).page_size(), DEFAULT_LIST_LIMIT);
        assert_eq!(
            list(json!({ "limit": 4_000_000 })).page_size(),
            MAX_LIST_LIMIT
        );
        assert_eq!(
            problem(list(json!({ "limit": 0 })).check()),
            "limit: must be at least 1"
        );
        assert_eq!(
            problem(list(json!({ "parentSessionId": "" })).check()),
            "parentSessionId: must not be empty"
        );
        assert_eq!(list(json!({ "pageToken": "" })).check(), Ok(()));

        let reply = ReplyParams {
            session_id: "s-1".into(),
            turn: 0,
            timeout_seconds: Some(9999),
        };
        assert!(problem(reply.check()).starts_with("turn: must be at least 1"));
        let session = CreateSessionParams {
            repo_url: None,
            idle_timeout_seconds: Some(0),
            allowed_tools: None,
            model: None,
        };
        assert_eq!(
            problem(session.check()),
            "idleTimeoutSeconds: must be at least 1 second"
        );
    }

    #[test]
    fn no_argument_of_any_shape_panics() {
        let shapes = [
            json!(null),
            json!(true),
            json!(-1),
            json!(1.5e300),
            json!(u64::MAX),
            json!(""),
            json!("\0\u{202e}漢"),
            json!([1, "two", null]),
            json!({ "nested": { "deeper": [] } }),
        ];
        let names = [
            "task",
            "taskId",
            "sessionId",
            "timeoutSeconds",
            "turn",
            "limit",
            "cpus",
            "memory",
            "environment",
            "allowedTools",
            "repoUrl",
            "status",
            "pageToken",
            "reason",
            "text",
        ];
        for name in names {
            for shape in &shapes {
                let call = arguments(json!({ name: shape }));
                let _ = parse::<SpawnParams>(call.clone()).map(|p| p.check());
                let _ = parse::<WaitParams>(call.clone()).map(|p| p.check());
                let _ = parse::<ListParams>(call.clone()).map(|p| p.check());
                let _ = parse::<ReplyParams>(call.clone()).map(|p| p.check());
                let _ = parse::<SendParams>(call.clone()).map(|p| p.check());
                let _ = parse::<CancelParams>(call.clone()).map(|p| p.check());
                let _ = parse::<CreateSessionParams>(call).map(|p| p.check());
            }
        }
    }
}
