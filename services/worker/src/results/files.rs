//! The files of a workspace: paths a client names, listing them, and archiving them.
//!
//! The worker reads workspaces as the user that owns them all, and an agent may still be
//! writing its own (links included) while a client reads it. So a path that leaves the
//! workspace, even through a link, is refused; links in the workspace are listed and archived
//! as links, never followed; and every file's content is opened with `openat2(2)` beneath the
//! workspace with no link allowed on the way, so that a directory swapped for a link between
//! the listing and the read cannot lead outside.

use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// One entry of a walk: a regular file or a link, relative to the workspace.
#[derive(Debug, Clone)]
pub struct Entry {
    pub path: String,
    pub size: u64,
    /// With the file type, as git writes it (0100644, 0100755, 0120000).
    pub mode: u32,
    pub link_target: Option<String>,
    pub mtime: i64,
}

/// Checks a path a client named: relative, inside the workspace, and `/`-separated. Returns it
/// normalised (no `.` components, no trailing `/`).
pub fn checked_path(path: &str) -> Result<String, String> {
    if path.is_empty() {
        return Err("is empty".into());
    }
    if path.contains('\0') {
        return Err(format!("`{}` holds a NUL byte", path.escape_debug()));
    }
    let mut parts = Vec::new();
    for component in Path::new(path).components() {
        match component {
            Component::Normal(part) => parts.push(part.to_string_lossy().into_owned()),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(format!("`{path}` leaves the workspace (`..`)"));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "`{path}` is absolute; paths are relative to the workspace"
                ));
            }
        }
    }
    if parts.is_empty() {
        // `.`: the whole workspace.
        return Ok(String::new());
    }
    Ok(parts.join("/"))
}

/// Refuses `path` (checked) when it, or a directory on the way to it, is a link that points
/// out of `workspace`. A path that does not exist passes: the caller says what it lacks.
pub fn refuse_escape(workspace: &Path, path: &str) -> Result<(), String> {
    let root = workspace
        .canonicalize()
        .map_err(|err| format!("the workspace cannot be read: {err}"))?;
    let mut walked = workspace.to_path_buf();
    for part in path.split('/').filter(|part| !part.is_empty()) {
        walked.push(part);
        let Ok(meta) = std::fs::symlink_metadata(&walked) else {
            return Ok(());
        };
        if meta.file_type().is_symlink() {
            let resolved = walked.canonicalize();
            if !matches!(&resolved, Ok(resolved) if resolved.starts_with(&root)) {
                return Err(format!(
                    "`{path}` leads out of the workspace through the link `{}`",
                    walked.strip_prefix(workspace).unwrap_or(&walked).display()
                ));
            }
        }
    }
    Ok(())
}

/// The files and links under `paths` (checked; the whole workspace when empty), by path.
/// `.git` directories are left out unless `include_git`. A named path that does not exist is
/// left out: the caller decides whether that is an error.
pub fn walk(workspace: &Path, paths: &[String], include_git: bool) -> io::Result<Vec<Entry>> {
    let mut entries = Vec::new();
    let starts: Vec<String> = if paths.is_empty() || paths.iter().any(String::is_empty) {
        vec![String::new()]
    } else {
        paths.to_vec()
    };
    for start in &starts {
        let full = workspace.join(start);
        let Ok(meta) = std::fs::symlink_metadata(&full) else {
            continue;
        };
        visit(workspace, start, &meta, include_git, &mut entries)?;
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    entries.dedup_by(|a, b| a.path == b.path);
    Ok(entries)
}

fn visit(
    workspace: &Path,
    relative: &str,
    meta: &std::fs::Metadata,
    include_git: bool,
    entries: &mut Vec<Entry>,
) -> io::Result<()> {
    let kind = meta.file_type();
    if kind.is_dir() {
        let dir = workspace.join(relative);
        let mut children: Vec<_> = std::fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
        children.sort_by_key(|child| child.file_name());
        for child in children {
            let name = child.file_name();
            if !include_git && name == ".git" {
                continue;
            }
            let name = name.to_string_lossy();
            let path = if relative.is_empty() {
                name.into_owned()
            } else {
                format!("{relative}/{name}")
            };
            // A file removed while the walk runs is simply not there.
            let Ok(meta) = child.metadata() else { continue };
            visit(workspace, &path, &meta, include_git, entries)?;
        }
    } else if kind.is_symlink() {
        let target = std::fs::read_link(workspace.join(relative))?;
        entries.push(Entry {
            path: relative.to_owned(),
            size: target.as_os_str().len() as u64,
            mode: 0o120000,
            link_target: Some(target.to_string_lossy().into_owned()),
            mtime: meta.mtime(),
        });
    } else if kind.is_file() {
        let executable = meta.permissions().mode() & 0o111 != 0;
        entries.push(Entry {
            path: relative.to_owned(),
            size: meta.len(),
            mode: if executable { 0o100755 } else { 0o100644 },
            link_target: None,
            mtime: meta.mtime(),
        });
    }
    // Sockets, fifos and devices hold no work to return.
    Ok(())
}

/// Writes a tar archive of `entries` (from [`walk`]) of `workspace` to `out`. A file that
/// changed size since the walk is cut or padded to the size the walk saw, so the archive stays
/// well formed; one that went away is left out.
pub fn archive(workspace: &Path, entries: &[Entry], out: impl io::Write) -> io::Result<()> {
    let root = super::sys::open_dir(workspace)?;
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        header.set_mtime(entry.mtime.max(0) as u64);
        header.set_mode(entry.mode & 0o7777);
        if let Some(target) = &entry.link_target {
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            builder.append_link(&mut header, &entry.path, target)?;
            continue;
        }
        let file = match super::sys::open_beneath(&root, &entry.path) {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => {
                return Err(io::Error::new(
                    err.kind(),
                    format!("cannot read `{}`: {err}", entry.path),
                ));
            }
        };
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(entry.size);
        builder.append_data(&mut header, &entry.path, Exactly::new(file, entry.size))?;
    }
    builder.into_inner()?.flush()
}

/// Reads exactly `remaining` bytes of `inner`: zeros after its end, nothing past the count.
struct Exactly<R> {
    inner: R,
    remaining: u64,
}

impl<R: Read> Exactly<R> {
    fn new(inner: R, remaining: u64) -> Self {
        Exactly { inner, remaining }
    }
}

impl<R: Read> Read for Exactly<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let read = self.inner.read(&mut buf[..want])?;
        let read = if read == 0 {
            buf[..want].fill(0);
            want
        } else {
            read
        };
        self.remaining -= read as u64;
        Ok(read)
    }
}

/// The bytes `path` and what is under it take on disk (links not followed).
pub fn disk_usage(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let mut total = meta.blocks() * 512;
    if meta.is_dir()
        && let Ok(children) = std::fs::read_dir(path)
    {
        for child in children.flatten() {
            total += disk_usage(&child.path());
        }
    }
    total
}

/// The nearest directory of `path` that exists (for free space before the root is made).
pub fn existing_ancestor(path: &Path) -> PathBuf {
    path.ancestors()
        .find(|dir| dir.is_dir())
        .unwrap_or_else(|| Path::new("/"))
        .to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_leave_the_workspace_are_refused() {
        assert_eq!(checked_path("a/./b/").unwrap(), "a/b");
        assert_eq!(checked_path(".").unwrap(), "");
        for bad in ["../x", "a/../../x", "a/..", "/etc/passwd", ""] {
            assert!(checked_path(bad).is_err(), "{bad}");
        }
        assert!(checked_path("a\0b").unwrap_err().contains("NUL"));
    }

    #[test]
    fn links_out_are_refused_and_links_within_pass() {
        let root = tempfile::tempdir().unwrap();
        let workspace = root.path().join("w");
        std::fs::create_dir_all(workspace.join("inside")).unwrap();
        std::os::unix::fs::symlink("/etc", workspace.join("out")).unwrap();
        std::os::unix::fs::symlink("inside", workspace.join("within")).unwrap();
        let err = refuse_escape(&workspace, "out/passwd").unwrap_err();
        assert!(err.contains("through the link `out`"), "{err}");
        assert!(refuse_escape(&workspace, "out").is_err());
        refuse_escape(&workspace, "within").unwrap();
        refuse_escape(&workspace, "missing/file").unwrap();
    }

    #[test]
    fn archives_keep_links_as_links_and_never_read_through_them() {
        let root = tempfile::tempdir().unwrap();
        let workspace = root.path().join("w");
        std::fs::create_dir_all(workspace.join("dir")).unwrap();
        std::fs::create_dir_all(workspace.join(".git")).unwrap();
        std::fs::write(workspace.join(".git/config"), "x").unwrap();
        std::fs::write(workspace.join("dir/a.txt"), "hello").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", workspace.join("secret")).unwrap();
        let entries = walk(&workspace, &[], false).unwrap();
        let paths: Vec<_> = entries.iter().map(|entry| entry.path.as_str()).collect();
        assert_eq!(paths, ["dir/a.txt", "secret"]);

        let mut tar = Vec::new();
        archive(&workspace, &entries, &mut tar).unwrap();
        let mut archive = tar::Archive::new(tar.as_slice());
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().display().to_string();
            let mut content = String::new();
            entry.read_to_string(&mut content).unwrap();
            let link = entry.link_name().unwrap().map(|l| l.display().to_string());
            seen.push((path, content, link));
        }
        assert_eq!(
            seen,
            [
                ("dir/a.txt".into(), "hello".into(), None),
                ("secret".into(), String::new(), Some("/etc/passwd".into())),
            ]
        );
    }

    #[test]
    fn a_directory_swapped_for_a_link_after_the_walk_is_not_read_through() {
        let root = tempfile::tempdir().unwrap();
        let workspace = root.path().join("w");
        std::fs::create_dir_all(workspace.join("dir")).unwrap();
        std::fs::write(workspace.join("dir/passwd"), "mine").unwrap();
        let entries = walk(&workspace, &[], false).unwrap();
        std::fs::remove_dir_all(workspace.join("dir")).unwrap();
        std::os::unix::fs::symlink("/etc", workspace.join("dir")).unwrap();
        let err = archive(&workspace, &entries, Vec::new()).unwrap_err();
        assert!(
            err.to_string().contains("cannot read `dir/passwd`"),
            "{err}"
        );
    }

    #[test]
    fn a_file_that_grew_or_shrank_since_the_walk_keeps_the_archive_well_formed() {
        let root = tempfile::tempdir().unwrap();
        let workspace = root.path().join("w");
        std::fs::create_dir_all(&workspace).unwrap();
        std::fs::write(workspace.join("grows"), "12").unwrap();
        std::fs::write(workspace.join("shrinks"), "123456").unwrap();
        let entries = walk(&workspace, &[], false).unwrap();
        std::fs::write(workspace.join("grows"), "1234567").unwrap();
        std::fs::write(workspace.join("shrinks"), "1").unwrap();
        let mut tar = Vec::new();
        archive(&workspace, &entries, &mut tar).unwrap();
        let mut archive = tar::Archive::new(tar.as_slice());
        let sizes: Vec<u64> = archive
            .entries()
            .unwrap()
            .map(|entry| entry.unwrap().size())
            .collect();
        assert_eq!(sizes, [2, 6]);
    }
}
