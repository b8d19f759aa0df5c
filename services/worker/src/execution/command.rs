//! The `claude` command line and environment of one agent, the same for every provider.

use claudecluster_config::AgentConfig;
use claudecluster_proto::v1;

/// Agent options after the task's own are laid over the worker's defaults.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AgentOptions {
    pub model: Option<String>,
    pub allowed_tools: Vec<String>,
    pub disallowed_tools: Vec<String>,
    pub permission_mode: Option<String>,
    pub max_turns: Option<u32>,
    pub max_budget_usd: Option<f64>,
    pub append_system_prompt: Option<String>,
}

fn non_empty(text: &str) -> Option<String> {
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

impl AgentOptions {
    pub fn resolve(task: Option<&v1::AgentOptions>, defaults: &AgentConfig) -> Self {
        let task = task.cloned().unwrap_or_default();
        let list = |task: Vec<String>, default: &[String]| {
            if task.is_empty() {
                default.to_vec()
            } else {
                task
            }
        };
        AgentOptions {
            model: non_empty(&task.model).or_else(|| defaults.model.clone()),
            allowed_tools: list(task.allowed_tools, &defaults.allowed_tools.0),
            disallowed_tools: list(task.disallowed_tools, &defaults.disallowed_tools.0),
            permission_mode: non_empty(&task.permission_mode)
                .or_else(|| defaults.permission_mode.clone()),
            max_turns: (task.max_turns > 0).then_some(task.max_turns),
            max_budget_usd: (task.max_budget_usd > 0.0).then_some(task.max_budget_usd),
            append_system_prompt: non_empty(&task.append_system_prompt)
                .or_else(|| defaults.append_system_prompt.clone()),
        }
    }
}

/// The arguments of a one-shot `claude -p` run.
///
/// The prompt comes last, after `--`, so that a prompt starting with `-` is not an option.
pub fn agent_args(prompt: &str, options: &AgentOptions) -> Vec<String> {
    let mut args: Vec<String> = ["-p", "--output-format", "stream-json", "--verbose"]
        .map(String::from)
        .to_vec();
    let mut flag = |name: &str, value: String| {
        args.push(name.to_owned());
        args.push(value);
    };
    if let Some(model) = &options.model {
        flag("--model", model.clone());
    }
    if !options.allowed_tools.is_empty() {
        flag("--allowedTools", options.allowed_tools.join(","));
    }
    if !options.disallowed_tools.is_empty() {
        flag("--disallowedTools", options.disallowed_tools.join(","));
    }
    if let Some(mode) = &options.permission_mode {
        flag("--permission-mode", mode.clone());
    }
    if let Some(turns) = options.max_turns {
        flag("--max-turns", turns.to_string());
    }
    if let Some(budget) = options.max_budget_usd {
        flag("--max-budget-usd", budget.to_string());
    }
    if let Some(extra) = &options.append_system_prompt {
        flag("--append-system-prompt", extra.clone());
    }
    args.push("--".to_owned());
    args.push(prompt.to_owned());
    args
}

/// The arguments of an agent started ahead of its task: it waits for stream-json messages on
/// stdin, the first of which is the task's prompt.
pub fn warm_agent_args(options: &AgentOptions) -> Vec<String> {
    let mut args = agent_args("", options);
    // Drop `-- PROMPT`: the prompt comes on stdin.
    args.truncate(args.len() - 2);
    args.splice(
        1..1,
        ["--input-format".to_owned(), "stream-json".to_owned()],
    );
    args
}

/// Variables every agent gets, whatever the worker's own environment says.
const FIXED_ENV: &[(&str, &str)] = &[
    // The only setting that stops all traffic besides the API itself.
    ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
    ("DISABLE_AUTOUPDATER", "1"),
];

/// The agent's environment: the worker's variables whose names start with one of
/// `agent.passEnv`, then `agent.env`, then the task's own (`task_env`), then the fixed ones.
pub fn agent_env(
    config: &AgentConfig,
    worker_env: impl IntoIterator<Item = (String, String)>,
    task_env: impl IntoIterator<Item = (String, String)>,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = worker_env
        .into_iter()
        .filter(|(name, _)| {
            config
                .pass_env
                .0
                .iter()
                .any(|prefix| name.starts_with(prefix))
        })
        .collect();
    env.extend(config.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend(task_env);
    env.extend(
        FIXED_ENV
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    // Later entries win; keep one of each name.
    let mut seen = std::collections::HashSet::new();
    let mut unique: Vec<_> = env
        .into_iter()
        .rev()
        .filter(|(name, _)| seen.insert(name.clone()))
        .collect();
    unique.reverse();
    unique
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_options_override_worker_defaults() {
        let defaults = AgentConfig {
            model: Some("default-model".into()),
            permission_mode: Some("acceptEdits".into()),
            allowed_tools: claudecluster_config::StringList(vec!["Read".into()]),
            ..AgentConfig::default()
        };
        let task = v1::AgentOptions {
            model: "task-model".into(),
            allowed_tools: vec!["Write".into(), "Bash".into()],
            max_turns: 3,
            ..Default::default()
        };
        let options = AgentOptions::resolve(Some(&task), &defaults);
        assert_eq!(options.model.as_deref(), Some("task-model"));
        assert_eq!(options.permission_mode.as_deref(), Some("acceptEdits"));
        let args = agent_args("-starts with a dash", &options);
        let joined = args.join(" ");
        assert!(
            joined.starts_with("-p --output-format stream-json --verbose"),
            "{joined}"
        );
        assert!(joined.contains("--model task-model"), "{joined}");
        assert!(joined.contains("--allowedTools Write,Bash"), "{joined}");
        assert!(joined.contains("--max-turns 3"), "{joined}");
        assert!(joined.contains("--permission-mode acceptEdits"), "{joined}");
        assert_eq!(&args[args.len() - 2..], ["--", "-starts with a dash"]);
        let warm = warm_agent_args(&options).join(" ");
        assert!(
            warm.starts_with("-p --input-format stream-json --output-format stream-json --verbose"),
            "{warm}"
        );
        assert!(warm.ends_with("--max-turns 3"), "{warm}");
        assert!(!warm.contains(" -- "), "the prompt comes on stdin: {warm}");
    }

    #[test]
    fn env_passes_prefixed_variables_and_always_disables_nonessential_traffic() {
        let mut config = AgentConfig::default();
        config.env.insert("API_TIMEOUT_MS".into(), "5000".into());
        let worker_env = vec![
            ("ANTHROPIC_API_KEY".to_owned(), "sk-secret".to_owned()),
            ("CLAUDE_CODE_MAX_RETRIES".to_owned(), "0".to_owned()),
            (
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC".to_owned(),
                "0".to_owned(),
            ),
            (
                "AWS_SECRET_ACCESS_KEY".to_owned(),
                "not for agents".to_owned(),
            ),
        ];
        let task_env = vec![("PROJECT".to_owned(), "demo".to_owned())];
        let env = agent_env(&config, worker_env, task_env);
        let get = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        assert_eq!(get("ANTHROPIC_API_KEY"), Some("sk-secret"));
        assert_eq!(get("CLAUDE_CODE_MAX_RETRIES"), Some("0"));
        assert_eq!(get("API_TIMEOUT_MS"), Some("5000"));
        assert_eq!(get("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"), Some("1"));
        assert_eq!(get("AWS_SECRET_ACCESS_KEY"), None);
        assert_eq!(get("PROJECT"), Some("demo"));
        let names: Vec<_> = env.iter().map(|(k, _)| k).collect();
        let unique: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(names.len(), unique.len(), "one entry per name");
    }
}
