//! Bounds on what a file or the environment may ask the loader to build.
//!
//! yaml-rust2's loader, config's conversion of its values and serde all recurse once per level
//! of nesting, and the loader copies an anchor's value at each of its aliases. Unchecked, a
//! few bytes could overflow the stack (`- - - - …` ten thousand deep) or expand to gigabytes
//! (ten aliases of ten aliases of ten aliases …), and both abort the process instead of
//! returning an error. So the file is first read as a stream of parser events, which is
//! neither recursive nor expanded, and refused when it is past these bounds.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, Parser};

/// Levels of nesting a configuration may have. The schema needs five
/// (`worker: container: resourceLimits: memory:` plus a list); the loader's recursion at this
/// depth fits in any thread's stack.
pub(crate) const MAX_NESTING: usize = 32;

/// Values a file may hold with its aliases expanded; a real configuration holds hundreds.
pub(crate) const MAX_VALUES: u64 = 100_000;

/// Checks that `yaml` is nested at most [`MAX_NESTING`] deep and holds at most [`MAX_VALUES`]
/// values once its aliases are expanded. A syntax error is reported as the parser words it.
pub(crate) fn check_yaml(yaml: &str) -> Result<(), String> {
    let mut parser = Parser::new_from_str(yaml);
    // For each collection still open, innermost last: its anchor (0 for none) and the values
    // in it so far, itself included.
    let mut open: Vec<(usize, u64)> = Vec::new();
    // Values each anchor stands for, for its aliases.
    let mut anchored: HashMap<usize, u64> = HashMap::new();
    let mut document_values: u64 = 0;
    loop {
        let (event, mark) = parser.next_token().map_err(|err| err.to_string())?;
        let values = match event {
            Event::StreamEnd => return Ok(()),
            Event::DocumentStart => {
                document_values = 0;
                continue;
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                if open.len() == MAX_NESTING {
                    return Err(format!(
                        "line {}: nested more than {MAX_NESTING} levels deep",
                        mark.line()
                    ));
                }
                open.push((anchor, 1));
                continue;
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let Some((anchor, values)) = open.pop() else {
                    continue;
                };
                if anchor != 0 {
                    anchored.insert(anchor, values);
                }
                values
            }
            Event::Scalar(_, _, anchor, _) => {
                if anchor != 0 {
                    anchored.insert(anchor, 1);
                }
                1
            }
            Event::Alias(anchor) => anchored.get(&anchor).copied().unwrap_or(1),
            _ => continue,
        };
        let total = match open.last_mut() {
            Some((_, enclosing)) => enclosing,
            None => &mut document_values,
        };
        // Saturating: aliases of aliases multiply, and past u64 it is just as much too many.
        *total = total.saturating_add(values);
        if *total > MAX_VALUES {
            return Err(format!(
                "line {}: more than {MAX_VALUES} values once its aliases are expanded",
                mark.line()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_real_configuration_passes() {
        let yaml = "worker:\n  container:\n    resourceLimits:\n      memory: 2GiB\n  agent:\n    allowedTools: [Write, Bash]\n";
        assert_eq!(check_yaml(yaml), Ok(()));
    }

    #[test]
    fn deep_block_nesting_is_refused_before_it_overflows_the_stack() {
        let yaml = format!("worker:\n  labels:\n    {}x\n", "- ".repeat(100_000));
        let err = check_yaml(&yaml).unwrap_err();
        assert!(err.contains("nested more than 32 levels deep"), "{err}");
        let just_deep_enough = format!("{}x\n", "- ".repeat(MAX_NESTING));
        assert_eq!(check_yaml(&just_deep_enough), Ok(()));
    }

    #[test]
    fn aliases_that_expand_past_the_limit_are_refused() {
        // Ten times more at every line: 10^8 values from 200 bytes.
        let names = ["a", "b", "c", "d", "e", "f", "g", "h"];
        let mut yaml = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for pair in names.windows(2) {
            let aliases = vec![format!("*{}", pair[0]); 10].join(", ");
            yaml.push_str(&format!("{}: &{} [{aliases}]\n", pair[1], pair[1]));
        }
        let err = check_yaml(&yaml).unwrap_err();
        assert!(err.contains("more than 100000 values"), "{err}");
        assert_eq!(check_yaml("a: &a [x, y]\nb: *a\nc: *a\n"), Ok(()));
    }

    #[test]
    fn a_syntax_error_is_reported_with_its_place() {
        let err = check_yaml("a: [unclosed\n").unwrap_err();
        assert!(err.contains("line"), "{err}");
    }
}
