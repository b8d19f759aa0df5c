//! A batch of tasks that may depend on each other: each names the others by key.

use std::collections::HashMap;

use claudecluster_proto::v1::{BatchTask, TaskSpec};

use crate::error::DriverError;
use crate::store::new_task_id;
use crate::validate;

/// Validates a batch and gives each task its id, its dependencies rewritten from keys to ids.
/// A dependency that is neither a key of the batch nor an existing task (`exists`), and a cycle,
/// are refused, naming them.
pub fn plan(
    tasks: Vec<BatchTask>,
    exists: impl Fn(&str) -> bool,
) -> Result<Vec<(String, TaskSpec)>, DriverError> {
    if tasks.is_empty() {
        return Err(DriverError::invalid("tasks", "must not be empty"));
    }
    let mut keys: HashMap<String, usize> = HashMap::new();
    for (index, task) in tasks.iter().enumerate() {
        validate::task_spec(task.spec.as_ref()).map_err(|err| prefixed(index, err))?;
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
fn find_cycle(edges: &[Vec<usize>]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    fn visit(
        node: usize,
        edges: &[Vec<usize>],
        marks: &mut [Mark],
        path: &mut Vec<usize>,
    ) -> Option<Vec<usize>> {
        marks[node] = Mark::OnPath;
        path.push(node);
        for &next in &edges[node] {
            match marks[next] {
                Mark::OnPath => {
                    let start = path.iter().position(|n| *n == next).expect("on the path");
                    let mut cycle = path[start..].to_vec();
                    cycle.push(next);
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(cycle) = visit(next, edges, marks, path) {
                        return Some(cycle);
                    }
                }
                Mark::Done => {}
            }
        }
        path.pop();
        marks[node] = Mark::Done;
        None
    }
    let mut marks = vec![Mark::New; edges.len()];
    for node in 0..edges.len() {
        if marks[node] == Mark::New
            && let Some(cycle) = visit(node, edges, &mut marks, &mut Vec::new())
        {
            return Some(cycle);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

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
            |_| false,
        )
        .unwrap();
        let id = |i: usize| planned[i].0.clone();
        assert_eq!(planned[1].1.depends_on, vec![id(0)]);
        assert_eq!(planned[3].1.depends_on, vec![id(1), id(2)]);
    }

    #[test]
    fn existing_tasks_may_be_named_by_id() {
        let planned = plan(vec![task("b", &["existing-id"])], |id| id == "existing-id").unwrap();
        assert_eq!(planned[0].1.depends_on, vec!["existing-id"]);
    }

    #[test]
    fn cycles_unknown_names_and_repeated_keys_are_refused() {
        let cycle = plan(
            vec![task("a", &["c"]), task("b", &["a"]), task("c", &["b"])],
            |_| false,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            cycle,
            "tasks: the dependencies form a cycle: a -> c -> b -> a"
        );
        let unknown = plan(vec![task("a", &["nope"])], |_| false)
            .unwrap_err()
            .to_string();
        assert_eq!(
            unknown,
            "tasks[0].spec.depends_on: `nope` is neither a key of this batch nor an existing task"
        );
        let twice = plan(vec![task("a", &[]), task("a", &[])], |_| false)
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
            |_| false,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(invalid, "tasks[1].spec.prompt: must not be empty");
    }
}
