//! Fuzzing of `load` at the byte level: whatever a configuration file or the environment
//! holds, loading answers with a configuration or an error that names the key or the file, and
//! never panics or overflows the stack.
//!
//! `CLAUDECLUSTER_FUZZ_CASES` sets the cases per target (256 by default, so the normal test run
//! stays fast); a longer run is
//! `CLAUDECLUSTER_FUZZ_CASES=100000 cargo nextest run -p claudecluster-config fuzz --no-capture`.
//! Each target prints how many cases it ran and how fast.

use std::collections::BTreeMap;
use std::path::Path;

use claudecluster_config::{ConfigError, FileLayout, load};
use proptest::prelude::*;

use claudecluster_fuzzing::fuzz;

/// One file rewritten for every case: a new temporary file each time would measure the file
/// system rather than the loader.
struct ScratchFile(tempfile::NamedTempFile);

impl ScratchFile {
    fn new() -> Self {
        ScratchFile(
            tempfile::Builder::new()
                .prefix("fuzz-")
                .suffix(".yaml")
                .tempfile()
                .unwrap(),
        )
    }

    fn holding(&self, bytes: &[u8]) -> &Path {
        std::fs::write(self.0.path(), bytes).unwrap();
        self.0.path()
    }
}

/// The property every target checks: a configuration, or an error that says what is wrong and
/// points at the file, a key or an environment variable.
fn loads_or_explains(file: Option<&Path>, layout: FileLayout, env: Vec<(String, String)>) {
    let Err(err) = load(file, layout, env) else {
        return;
    };
    let text = err.to_string();
    let names_the_file = file.is_some_and(|path| text.contains(&path.display().to_string()));
    let (names_a_key, names_a_variable, says_what) = match &err {
        ConfigError::Invalid {
            key,
            origin,
            message,
        } => (
            !key.is_empty(),
            origin.starts_with("environment variable CLAUDECLUSTER_"),
            !message.trim().is_empty(),
        ),
        ConfigError::Syntax { message, .. } => (false, false, !message.trim().is_empty()),
        ConfigError::Read { source, .. } => (false, false, !source.to_string().is_empty()),
    };
    assert!(
        says_what && (names_the_file || names_a_key || names_a_variable),
        "an error that does not say what or where: {text}"
    );
}

const LAYOUTS: [FileLayout; 2] = [FileLayout::Cluster, FileLayout::Section("worker")];

/// The schema's keys, read from its source so that a new key is fuzzed too: the fields of its
/// structs (`pub max_processes: u32,`), in camelCase as files write them.
struct Schema {
    /// Every key's name.
    keys: Vec<String>,
    /// Every key's path from the root, `["worker", "processPool", "maxProcesses"]`.
    paths: Vec<Vec<String>>,
}

impl Schema {
    fn read() -> Self {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/schema.rs");
        let source = std::fs::read_to_string(&path)
            .unwrap_or_else(|err| panic!("reading {}: {err}", path.display()));
        // Each struct's fields, as (name, type).
        let mut structs: BTreeMap<&str, Vec<(&str, &str)>> = BTreeMap::new();
        let mut inside_struct = None;
        for line in source.lines() {
            if let Some(name) = line
                .strip_prefix("pub struct ")
                .and_then(|rest| rest.strip_suffix(" {"))
            {
                inside_struct = Some(name);
            } else if line == "}" {
                inside_struct = None;
            } else if let Some(struct_name) = inside_struct
                && let Some(field) = line.trim().strip_prefix("pub ")
                && let Some((name, type_name)) =
                    field.strip_suffix(',').and_then(|f| f.split_once(": "))
            {
                structs
                    .entry(struct_name)
                    .or_default()
                    .push((name, type_name));
            }
        }
        let mut paths = Vec::new();
        let mut to_visit = vec![(Vec::new(), "ClusterConfig")];
        while let Some((prefix, struct_name)) = to_visit.pop() {
            for (name, type_name) in structs.get(struct_name).into_iter().flatten() {
                let mut path: Vec<String> = prefix.clone();
                path.push(camel_case(name));
                if structs.contains_key(type_name) {
                    to_visit.push((path.clone(), type_name));
                }
                paths.push(path);
            }
        }
        let mut keys: Vec<String> = paths
            .iter()
            .filter_map(|path| path.last().cloned())
            .collect();
        keys.sort();
        keys.dedup();
        assert!(
            paths.contains(&vec![
                "worker".into(),
                "processPool".into(),
                "maxProcesses".into()
            ]),
            "found too few keys in {}: {paths:?}",
            path.display()
        );
        Schema { keys, paths }
    }
}

fn camel_case(snake: &str) -> String {
    let mut words = snake.split('_');
    let mut camel = words.next().unwrap_or_default().to_owned();
    for word in words {
        let mut chars = word.chars();
        if let Some(first) = chars.next() {
            camel.push(first.to_ascii_uppercase());
            camel.extend(chars);
        }
    }
    camel
}

/// `maxProcesses` as an environment variable writes it: `MAX_PROCESSES`.
fn screaming_snake_case(camel: &str) -> String {
    let mut snake = String::with_capacity(camel.len() + 4);
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            snake.push('_');
        }
        snake.push(c.to_ascii_uppercase());
    }
    snake
}

/// Variables that `${...}` in the generated files refer to; some are set, some not.
const VARIABLE_NAMES: [&str; 4] = ["MODE", "EMPTY", "UNSET", "LISTEN"];

fn digits(count: std::ops::Range<usize>) -> impl Strategy<Value = String> {
    prop::collection::vec(0..10_u8, count)
        .prop_map(|digits| digits.iter().map(|d| char::from(b'0' + d)).collect())
}

/// Scalar text no key of the schema expects, or expects only at its edge: numbers past every
/// integer type and NaN, durations and sizes that overflow, `${...}` good, unset and
/// unterminated, control characters, unicode and very long strings.
fn hostile_scalar() -> impl Strategy<Value = String> {
    let fixed = prop::sample::select(vec![
        "0",
        "-1",
        "-0",
        "1.5",
        "-1.5",
        "4294967295",
        "4294967296",
        "18446744073709551615",
        "18446744073709551616",
        "-9223372036854775808",
        "-9223372036854775809",
        "1e400",
        "-1e400",
        "1e-400",
        "1e300",
        ".nan",
        "NaN",
        ".inf",
        "-.inf",
        "0x1F",
        "0o17",
        "true",
        "false",
        "null",
        "~",
        "''",
        "\"\"",
        "process_pool",
        "container_agentic",
        "127.0.0.1:50051",
        "host:99999",
        ":",
        "root",
        "0:0",
        "postgres://x",
        "docker",
        "4GB",
        "2GiB",
        "99999999999999999999TiB",
        "1e3GB",
        ".",
        "..5s",
        "30s",
        "500ms",
        "5m",
        "99999999999999999999999h",
        "1000000000000000000000000000000000000000",
        "${MODE}",
        "${MODE:-process_pool}",
        "${UNSET}",
        "${UNSET:-}",
        "${UNSET:-${MODE}}",
        "${",
        "${MODE",
        "${:-x}",
        "${ MODE }",
        "$${MODE}",
        "$",
        "$$",
        "${EMPTY:-30s}",
        "\"\\u0000\\u0007\\e\"",
        "\"\\uD800\"",
        "'\u{202e}\u{feff}\u{10ffff}'",
        "[]",
        "{}",
        "[a, 1, null]",
        "{a: b}",
        "&anchor x",
        "*anchor",
        "!!binary aGVsbG8=",
        "!!float 1e400",
        "|\n  block",
        "? complex",
    ])
    .prop_map(str::to_owned);
    let units = prop::sample::select(vec![
        "", "ms", "s", "m", "h", "b", "kb", "KiB", "GB", "TiB", "x", " s", "e5",
    ]);
    prop_oneof![
        6 => fixed,
        1 => (digits(1..400), units.clone()).prop_map(|(number, unit)| format!("{number}{unit}")),
        1 => (digits(1..30), digits(0..30), units)
            .prop_map(|(whole, fraction, unit)| format!("{whole}.{fraction}{unit}")),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<f64>().prop_map(|n| n.to_string()),
        2 => any::<String>().prop_map(|text| double_quoted(&text)),
        1 => any::<String>(),
        1 => (any::<char>(), 0..20_000_usize).prop_map(|(c, len)| double_quoted(&c.to_string().repeat(len))),
        1 => (prop::sample::select(VARIABLE_NAMES.to_vec()), any::<String>(), any::<bool>())
            .prop_map(|(name, default, closed)| {
                format!("${{{name}:-{default}{}", if closed { "}" } else { "" })
            }),
    ]
}

/// `text` as a YAML double-quoted scalar, escaped so that any character survives.
fn double_quoted(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for c in text.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            c if c.is_control() || c == '\u{feff}' => {
                quoted.push_str(&format!("\\U{:08x}", u32::from(c)))
            }
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

/// A YAML document of the schema's keys, nested at random.
#[derive(Debug, Clone)]
enum Node {
    Scalar(String),
    Map(Vec<(String, Node)>),
    List(Vec<Node>),
    /// Sequences in sequences (`- - - - x`), `depth` of them: the cheapest deep YAML.
    DeepBlock(usize),
    /// `[[[[x]]]]` or `{a: {a: x}}`, `depth` of them.
    DeepFlow {
        depth: usize,
        lists: bool,
    },
    /// A list of ten aliases of a list of ten aliases …, `levels` of them: 10^levels values.
    Aliases(usize),
}

fn key(keys: Vec<String>) -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(keys),
        1 => prop::sample::select(vec![
            "driver", "scheduler", "worker", "mcp", "<<", "a.b", "a b", "\"\"", "?",
            "worker.listen", "labels[0]", "labels[100000000]", "a[-9223372036854775808]",
        ])
        .prop_map(str::to_owned),
        1 => any::<String>().prop_map(|text| double_quoted(&text)),
    ]
}

fn node(keys: Vec<String>) -> impl Strategy<Value = Node> {
    let leaf = prop_oneof![
        20 => hostile_scalar().prop_map(Node::Scalar),
        1 => (0..20_000_usize).prop_map(Node::DeepBlock),
        1 => (0..1000_usize, any::<bool>()).prop_map(|(depth, lists)| Node::DeepFlow { depth, lists }),
        1 => (1..12_usize).prop_map(Node::Aliases),
    ];
    leaf.prop_recursive(6, 64, 8, move |inner| {
        prop_oneof![
            3 => prop::collection::vec((key(keys.clone()), inner.clone()), 0..8).prop_map(Node::Map),
            1 => prop::collection::vec(inner, 0..6).prop_map(Node::List),
        ]
    })
}

fn render(node: &Node) -> String {
    let mut text = String::new();
    render_into(node, 0, &mut text);
    text
}

/// Writes `node` in block style at `indent` columns; a scalar or flow value goes on the line of
/// its key, anything else on the lines after it.
fn render_into(node: &Node, indent: usize, text: &mut String) {
    let pad = " ".repeat(indent);
    match node {
        Node::Scalar(scalar) => {
            text.push_str(&pad);
            text.push_str(scalar);
            text.push('\n');
        }
        Node::DeepFlow { depth, lists } => {
            text.push_str(&pad);
            text.push_str(&deep_flow(*depth, *lists));
            text.push('\n');
        }
        Node::DeepBlock(depth) => {
            text.push_str(&pad);
            text.push_str(&"- ".repeat(*depth));
            text.push_str("x\n");
        }
        Node::Aliases(levels) => {
            text.push_str(&format!("{pad}- &l0 [x, x, x, x, x, x, x, x, x, x]\n"));
            for level in 1..*levels {
                let aliases = vec![format!("*l{}", level - 1); 10].join(", ");
                text.push_str(&format!("{pad}- &l{level} [{aliases}]\n"));
            }
        }
        Node::Map(entries) if entries.is_empty() => text.push_str(&format!("{pad}{{}}\n")),
        Node::List(items) if items.is_empty() => text.push_str(&format!("{pad}[]\n")),
        Node::Map(entries) => {
            for (key, value) in entries {
                match value {
                    Node::Scalar(scalar) => text.push_str(&format!("{pad}{key}: {scalar}\n")),
                    Node::DeepFlow { depth, lists } => {
                        text.push_str(&format!("{pad}{key}: {}\n", deep_flow(*depth, *lists)))
                    }
                    nested => {
                        text.push_str(&format!("{pad}{key}:\n"));
                        render_into(nested, indent + 2, text);
                    }
                }
            }
        }
        Node::List(items) => {
            for item in items {
                text.push_str(&format!("{pad}-\n"));
                render_into(item, indent + 2, text);
            }
        }
    }
}

fn deep_flow(depth: usize, lists: bool) -> String {
    let (open, close) = if lists { ("[", "]") } else { ("{a: ", "}") };
    format!("{}x{}", open.repeat(depth), close.repeat(depth))
}

/// Values for the variables that `${...}` refers to, some of them YAML of their own.
fn substitution_env() -> impl Strategy<Value = Vec<(String, String)>> {
    let value = prop_oneof![
        4 => hostile_scalar(),
        1 => Just(String::new()),
        1 => Just("x\nworker:\n  listen: ${MODE}\n".to_owned()),
    ];
    prop::collection::vec((prop::sample::select(VARIABLE_NAMES.to_vec()), value), 0..4).prop_map(
        |pairs| {
            pairs
                .into_iter()
                // UNSET stays unset, so that `${UNSET}` is always the error it should be.
                .filter(|(name, _)| *name != "UNSET")
                .map(|(name, value)| (name.to_owned(), value))
                .collect()
        },
    )
}

/// A key of the schema as the words of a variable's name: `["WORKER", "PROCESS_POOL"]`.
fn real_path_of(schema: &Schema) -> impl Strategy<Value = Vec<String>> {
    prop::sample::select(schema.paths.clone())
        .prop_map(|path| path.iter().map(|key| screaming_snake_case(key)).collect())
}

/// `CLAUDECLUSTER_<KEY>__<KEY>...` variables: the schema's keys in the environment's spelling,
/// mostly along its real paths, and words of its own that no key has.
fn cluster_env(schema: &Schema) -> impl Strategy<Value = Vec<(String, String)>> {
    let known_words: Vec<String> = schema
        .keys
        .iter()
        .map(|key| screaming_snake_case(key))
        .collect();
    let word = prop_oneof![
        8 => prop::sample::select(known_words),
        1 => prop::sample::select(vec![
            "", "_", "A__", "ZONE", "a.b", "x-y", "\u{e9}t\u{e9}", "1", "LABELS[0]",
            "LABELS[100000000]", "A[-9223372036854775808]",
        ])
        .prop_map(str::to_owned),
        1 => any::<String>().prop_filter("a variable name has no `=` or NUL", |name| {
            !name.contains(['=', '\0'])
        }),
    ];
    let words = prop_oneof![
        6 => real_path_of(schema),
        // A real path with a word too many, or one changed.
        2 => (real_path_of(schema), word.clone(), any::<prop::sample::Index>()).prop_map(
            |(mut path, word, at)| {
                let at = at.index(path.len() + 1);
                if at == path.len() { path.push(word) } else { path[at] = word }
                path
            },
        ),
        2 => prop::collection::vec(word.clone(), 1..6),
        1 => prop::collection::vec(word, 20..200),
    ];
    let name = words.prop_map(|words| format!("CLAUDECLUSTER_{}", words.join("__")));
    let value = prop_oneof![
        6 => hostile_scalar(),
        1 => any::<String>(),
    ];
    prop::collection::vec((name, value), 0..4)
}

#[test]
fn fuzz_load_with_arbitrary_bytes() {
    let scratch = ScratchFile::new();
    fuzz(
        "load, arbitrary bytes as a file",
        prop::collection::vec(any::<u8>(), 0..2048),
        |bytes| {
            for layout in LAYOUTS {
                loads_or_explains(Some(scratch.holding(&bytes)), layout, Vec::new());
            }
        },
    );
}

#[test]
fn fuzz_load_with_schema_shaped_yaml() {
    let scratch = ScratchFile::new();
    let schema = Schema::read();
    fuzz(
        "load, YAML of the schema's keys with hostile values",
        (
            node(schema.keys.clone()),
            substitution_env(),
            cluster_env(&schema),
        ),
        |(document, substitution_vars, overrides)| {
            let text = render(&document);
            let env: Vec<_> = substitution_vars.into_iter().chain(overrides).collect();
            for layout in LAYOUTS {
                loads_or_explains(Some(scratch.holding(text.as_bytes())), layout, env.clone());
            }
        },
    );
}

#[test]
fn fuzz_load_with_environment_overrides() {
    fuzz(
        "load, CLAUDECLUSTER_* variables",
        cluster_env(&Schema::read()),
        |env| loads_or_explains(None, FileLayout::Cluster, env),
    );
}

// Inputs that once panicked, overflowed the stack or exhausted memory, kept as plain tests.

fn variables(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

fn invalid(err: ConfigError) -> (String, String, String) {
    match err {
        ConfigError::Invalid {
            key,
            origin,
            message,
        } => (key, origin, message),
        other => panic!("expected an invalid key, got {other}"),
    }
}

#[test]
fn a_deeply_nested_file_is_an_error_not_a_stack_overflow() {
    let scratch = ScratchFile::new();
    let deep_files = [
        format!("labels:\n  {}x\n", "- ".repeat(100_000)),
        format!("labels: {}x{}\n", "[".repeat(10_000), "]".repeat(10_000)),
        format!("{}x\n", "- ".repeat(33)),
    ];
    for text in deep_files {
        for layout in LAYOUTS {
            let file = scratch.holding(text.as_bytes());
            let err = load(Some(file), layout, Vec::new()).unwrap_err();
            assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
            assert!(
                err.to_string().contains(&file.display().to_string()),
                "{err}"
            );
        }
    }
}

#[test]
fn aliases_that_expand_to_millions_of_values_are_an_error() {
    let scratch = ScratchFile::new();
    let text = render(&Node::Aliases(9));
    let err = load(
        Some(scratch.holding(format!("labels:\n{text}").as_bytes())),
        FileLayout::Section("worker"),
        Vec::new(),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("more than 100000 values once its aliases are expanded"),
        "{err}"
    );
}

#[test]
fn a_list_index_in_a_key_is_part_of_the_key() {
    let scratch = ScratchFile::new();
    for (text, layout) in [
        ("a[-9223372036854775808]: 1\n", FileLayout::Cluster),
        ("worker[100000000]: 1\n", FileLayout::Cluster),
        ("labels[100000000]: x\n", FileLayout::Section("worker")),
    ] {
        let err = load(Some(scratch.holding(text.as_bytes())), layout, Vec::new()).unwrap_err();
        let (_, _, message) = invalid(err);
        assert!(message.contains("unknown field"), "{text}: {message}");
    }
    let (key, origin, _) = invalid(
        load(
            None,
            FileLayout::Cluster,
            variables(&[("CLAUDECLUSTER_A[-9223372036854775808]__DRIVER", "0")]),
        )
        .unwrap_err(),
    );
    assert_eq!(key, "a[-9223372036854775808]");
    assert_eq!(
        origin,
        "environment variable CLAUDECLUSTER_A[-9223372036854775808]__DRIVER"
    );
    let config = load(
        None,
        FileLayout::Cluster,
        variables(&[("CLAUDECLUSTER_WORKER__LABELS__ZONE[100000000]", "eu")]),
    )
    .unwrap();
    assert_eq!(
        config
            .worker
            .labels
            .get("zone[100000000]")
            .map(String::as_str),
        Some("eu")
    );
}

#[test]
fn durations_past_the_largest_are_errors_that_name_the_key() {
    let (key, origin, message) = invalid(
        load(
            None,
            FileLayout::Cluster,
            variables(&[(
                "CLAUDECLUSTER_WORKER__DRIVER_LOSS_TIMEOUT",
                "99999999999999999999999",
            )]),
        )
        .unwrap_err(),
    );
    assert_eq!(key, "worker.driverLossTimeout");
    assert_eq!(
        origin,
        "environment variable CLAUDECLUSTER_WORKER__DRIVER_LOSS_TIMEOUT"
    );
    assert!(message.contains("longer than any duration"), "{message}");
    let scratch = ScratchFile::new();
    // (config reads YAML's `.inf` and `.nan` as syntax errors, so they do not get this far.)
    for value in ["310000000000000000m", "1e300", "-1.5"] {
        let text = format!("cloneTimeout: {value}\n");
        let (key, _, message) = invalid(
            load(
                Some(scratch.holding(text.as_bytes())),
                FileLayout::Section("worker"),
                Vec::new(),
            )
            .unwrap_err(),
        );
        assert_eq!(key, "cloneTimeout", "{value}");
        assert!(message.contains("duration"), "{value}: {message}");
    }
}

#[test]
fn a_variable_nested_past_the_limit_is_an_error_that_names_it() {
    let name = format!("CLAUDECLUSTER_WORKER{}", "__LABELS".repeat(10_000));
    let (_, origin, message) =
        invalid(load(None, FileLayout::Cluster, variables(&[(&name, "x")])).unwrap_err());
    assert_eq!(origin, format!("environment variable {name}"));
    assert!(message.contains("nested more than"), "{message}");
}

#[test]
fn very_long_values_load() {
    let long = "x".repeat(4 << 20);
    let scratch = ScratchFile::new();
    let config = load(
        Some(scratch.holding(format!("agent:\n  model: \"{long}\"\n").as_bytes())),
        FileLayout::Section("worker"),
        variables(&[("CLAUDECLUSTER_WORKER__AGENT__APPEND_SYSTEM_PROMPT", &long)]),
    )
    .unwrap();
    assert_eq!(config.worker.agent.model.as_deref(), Some(long.as_str()));
    assert_eq!(
        config.worker.agent.append_system_prompt.as_deref(),
        Some(long.as_str())
    );
}
