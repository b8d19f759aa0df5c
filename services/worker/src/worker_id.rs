//! The worker's default id: made once per workspace root and kept there, so a worker that
//! restarts on the same host is the same worker (the scheduler and its own leftovers know it).

use std::io::Write;
use std::path::{Path, PathBuf};

const FILE: &str = ".worker-id";

/// Why the worker's id could not be read or kept.
#[derive(Debug, thiserror::Error)]
#[error("cannot keep the worker's id in {path} (set `worker.workerId`): {source}")]
pub struct WorkerIdError {
    path: PathBuf,
    source: std::io::Error,
}

/// The id kept in `root`, made and kept there first if there is none.
pub fn stable(root: &Path) -> Result<String, WorkerIdError> {
    let path = root.join(FILE);
    let failed = |source| WorkerIdError {
        path: path.clone(),
        source,
    };
    if let Some(id) = read(&path).map_err(failed)? {
        return Ok(id);
    }
    std::fs::create_dir_all(root).map_err(failed)?;
    let id = format!("worker-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path);
    match created {
        Ok(mut file) => {
            file.write_all(format!("{id}\n").as_bytes())
                .map_err(failed)?;
            tracing::info!(worker = %id, path = %path.display(), "made this worker's id");
            Ok(id)
        }
        // Another worker process on this root made one first: it is this worker's too.
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => match read(&path) {
            Ok(Some(id)) => Ok(id),
            Ok(None) => Err(failed(std::io::Error::other("the file is empty"))),
            Err(err) => Err(failed(err)),
        },
        Err(err) => Err(failed(err)),
    }
}

/// The id in `path`; None when there is no file. A file that holds no valid id is replaced.
fn read(path: &Path) -> std::io::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let id = text.trim();
            let valid = !id.is_empty()
                && id.len() <= 128
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
            if valid {
                Ok(Some(id.to_owned()))
            } else {
                tracing::warn!(path = %path.display(), "the kept worker id is not valid; making a new one");
                std::fs::remove_file(path)?;
                Ok(None)
            }
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_id_is_made_once_per_workspace_root() {
        let root = tempfile::tempdir().unwrap();
        let first = stable(&root.path().join("workspaces")).unwrap();
        assert!(first.starts_with("worker-"), "{first}");
        assert_eq!(stable(&root.path().join("workspaces")).unwrap(), first);
        let other = stable(&root.path().join("elsewhere")).unwrap();
        assert_ne!(other, first, "another root is another worker");
    }

    #[test]
    fn a_damaged_id_file_is_replaced() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join(FILE), "not an id!\n").unwrap();
        let id = stable(root.path()).unwrap();
        assert!(id.starts_with("worker-"), "{id}");
        assert_eq!(stable(root.path()).unwrap(), id);
    }
}
