//! A batch of tasks that may depend on each other: each names the others by key.

use std::collections::HashMap;

use claudecluster_proto::v1::{BatchTask, TaskSpec};

use claudecluster_proto::validate;

use crate::error::DriverError;
use crate::service::Limits;
use crate::store::new_task_id;

/// Validates a batch and gives each task its id, its dependencies rewritten from keys to ids.
/// A dependency that is neither a key of the batch nor an existing task (`exists`), and a cycle,
/// are refused, naming them.
pub fn plan(
    tasks: Vec<BatchTask>,
    limits: Limits,
    exists: impl Fn(&str) -> bool,
) -> Result<Vec<(String, TaskSpec)>, DriverError> {
    if tasks.is_empty() {
        return Err(DriverError::invalid("tasks", "must not be empty"));
    }
    let max_tasks = limits.batch_size;
    if tasks.len() > max_tasks {
        return Err(DriverError::invalid(
            "tasks",
            format!(
                "{} tasks are more than a batch may hold ({max_tasks}, `driver.maxBatchSize`)",
                tasks.len()
            ),
        ));
    }
    let mut keys: HashMap<String, usize> = HashMap::new();
    for (index, task) in tasks.iter().enumerate() {
        let spec = task
            .spec
            .as_ref()
            .ok_or_else(|| DriverError::invalid(format!("tasks[{index}].spec"), "is required"))?;
        validate::task_spec(spec, limits.prompt_bytes)
            .map_err(|err| prefixed(index, err.into()))?;
        if task.key.len() > validate::MAX_ID_BYTES || task.key.chars().any(char::is_control) {
            return Err(DriverError::invalid(
                format!("tasks[{index}].key"),
                format!(
                    "must have at most {} characters, none of them control characters",
                    validate::MAX_ID_BYTES
                ),
            ));
        }
        if !task.key.is_empty() && keys.insert(task.key.clone(), index).is_some() {
            return Err(DriverError::invalid(
                format!("tasks[{index}].key"),
                format!("`{}` names two tasks", task.key),
            ));
        }
    }
    // Edges to the batch tasks each one waits for.
    let mut waits_for: Vec<Vec<usize>> = vec![Vec::new(); tasks.len()];
    for (index, task) in tasks.iter().enumerate() {
        for dependency in &task.spec.as_ref().expect("validated").depends_on {
            match keys.get(dependency.as_str()) {
                Some(other) => waits_for[index].push(*other),
                None if exists(dependency) => {}
                None => {
                    return Err(DriverError::invalid(
                        format!("tasks[{index}].spec.depends_on"),
                        format!(
                            "`{dependency}` is neither a key of this batch nor an existing task"
                        ),
                    ));
                }
            }
        }
    }
    if let Some(cycle) = find_cycle(&waits_for) {
        let names: Vec<String> = cycle
            .iter()
            .map(|index| match tasks[*index].key.as_str() {
                "" => format!("tasks[{index}]"),
                key => key.to_owned(),
            })
            .collect();
        return Err(DriverError::invalid(
            "tasks",
            format!("the dependencies form a cycle: {}", names.join(" -> ")),
        ));
    }
    let ids: Vec<String> = tasks.iter().map(|_| new_task_id()).collect();
    Ok(tasks
        .into_iter()
        .zip(&ids)
        .map(|(task, id)| {
            let mut spec = task.spec.expect("validated");
            for dependency in &mut spec.depends_on {
                if let Some(other) = keys.get(dependency.as_str()) {
                    *dependency = ids[*other].clone();
                }
            }
            (id.clone(), spec)
        })
        .collect())
}

fn prefixed(index: usize, err: DriverError) -> DriverError {
    match err {
        DriverError::InvalidArgument { field, message } => DriverError::InvalidArgument {
            field: format!("tasks[{index}].{field}"),
            message,
        },
        other => other,
    }
}

/// A cycle in the graph, as the nodes along it back to the first, if there is one.
///
/// Depth-first with a stack of its own: a client decides how deep the graph is (a chain of
/// 100,000 tasks), and recursion that deep would overflow the thread's stack.
fn find_cycle(edges: &[Vec<usize>]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    let mut marks = vec![Mark::New; edges.len()];
    for start in 0..edges.len() {
        if marks[start] != Mark::New {
            continue;
        }
        // The path from `start`, each node with the index of its next edge to follow.
        let mut path: Vec<(usize, usize)> = vec![(start, 0)];
        marks[start] = Mark::OnPath;
        while let Some((node, next_edge)) = path.last_mut() {
            let node = *node;
            let Some(&next) = edges[node].get(*next_edge) else {
                marks[node] = Mark::Done;
                path.pop();
                continue;
            };
            *next_edge += 1;
            match marks[next] {
                Mark::OnPath => {
                    let at = path
                        .iter()
                        .position(|(n, _)| *n == next)
                        .expect("on the path");
                    let mut cycle: Vec<usize> = path[at..].iter().map(|(n, _)| *n).collect();
                    cycle.push(next);
                    return Some(cycle);
                }
                Mark::New => {
                    marks[next] = Mark::OnPath;
                    path.push((next, 0));
                }
                Mark::Done => {}
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(batch_size: usize) -> Limits {
        Limits {
            session_queue: 16,
            batch_size,
            prompt_bytes: validate::DEFAULT_MAX_PROMPT_BYTES,
        }
    }

    fn task(key: &str, depends_on: &[&str]) -> BatchTask {
        BatchTask {
            key: key.to_owned(),
            spec: Some(TaskSpec {
                prompt: format!("do {key}"),
                depends_on: depends_on.iter().map(|d| d.to_string()).collect(),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_diamond_gets_ids_in_place_of_keys() {
        let planned = plan(
            vec![
                task("a", &[]),
                task("b", &["a"]),
                task("c", &["a"]),
                task("d", &["b", "c"]),
            ],
            limits(1000),
            |_| false,
        )
        .unwrap();
        let id = |i: usize| planned[i].0.clone();
        assert_eq!(planned[1].1.depends_on, vec![id(0)]);
        assert_eq!(planned[3].1.depends_on, vec![id(1), id(2)]);
    }

    #[test]
    fn existing_tasks_may_be_named_by_id() {
        let planned = plan(vec![task("b", &["existing-id"])], limits(1000), |id| {
            id == "existing-id"
        })
        .unwrap();
        assert_eq!(planned[0].1.depends_on, vec!["existing-id"]);
    }

    #[test]
    fn cycles_unknown_names_and_repeated_keys_are_refused() {
        let cycle = plan(
            vec![task("a", &["c"]), task("b", &["a"]), task("c", &["b"])],
            limits(1000),
            |_| false,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            cycle,
            "tasks: the dependencies form a cycle: a -> c -> b -> a"
        );
        let unknown = plan(vec![task("a", &["nope"])], limits(1000), |_| false)
            .unwrap_err()
            .to_string();
        assert_eq!(
            unknown,
            "tasks[0].spec.depends_on: `nope` is neither a key of this batch nor an existing task"
        );
        let twice = plan(vec![task("a", &[]), task("a", &[])], limits(1000), |_| {
            false
        })
        .unwrap_err()
        .to_string();
        assert_eq!(twice, "tasks[1].key: `a` names two tasks");
        let invalid = plan(
            vec![
                task("a", &[]),
                BatchTask {
                    key: "b".into(),
                    spec: Some(TaskSpec::default()),
                },
            ],
            limits(1000),
            |_| false,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(invalid, "tasks[1].spec.prompt: must not be empty");
    }

    #[test]
    fn a_chain_a_hundred_thousand_deep_is_checked_without_recursion() {
        // Run on a thread with a small stack: recursion this deep would overflow it.
        let checked = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(|| {
                let count = 100_000;
                let keys: Vec<String> = (0..count).map(|i| format!("t{i}")).collect();
                let chain: Vec<BatchTask> = (0..count)
                    .map(|i| {
                        let next = keys.get(i + 1).map(String::as_str);
                        task(&keys[i], next.as_slice())
                    })
                    .collect();
                let planned = plan(chain, limits(count), |_| false).map(|planned| planned.len());
                let looped: Vec<BatchTask> = (0..count)
                    .map(|i| task(&keys[i], &[keys[(i + 1) % count].as_str()]))
                    .collect();
                let cycle = plan(looped, limits(count), |_| false)
                    .unwrap_err()
                    .to_string();
                (planned.unwrap(), cycle)
            })
            .unwrap()
            .join()
            .expect("no stack overflow");
        assert_eq!(checked.0, 100_000);
        assert!(
            checked
                .1
                .starts_with("tasks: the dependencies form a cycle: t0 -> t1 -> t2"),
            "{}",
            &checked.1[..80]
        );
    }

    #[test]
    fn a_batch_past_its_limit_is_refused_naming_the_limit() {
        let batch = vec![task("a", &[]), task("b", &[]), task("c", &[])];
        let refused = plan(batch, limits(2), |_| false).unwrap_err().to_string();
        assert_eq!(
            refused,
            "tasks: 3 tasks are more than a batch may hold (2, `driver.maxBatchSize`)"
        );
    }
}
