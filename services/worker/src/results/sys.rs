//! The system calls the results need that the standard library does not offer.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Opens `relative` (plain names separated by `/`) under `workspace` for reading, one name
/// at a time with `O_NOFOLLOW`: a link anywhere on the way, or at the end, is refused, so
/// the file opened is beneath the workspace whatever changes in it meanwhile. (Not
/// `openat2(RESOLVE_BENEATH)`: container runtimes' seccomp profiles may refuse it.)
pub fn open_beneath(workspace: &OwnedFd, relative: &str) -> io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let names: Vec<&str> = relative.split('/').collect();
    let mut dir: Option<OwnedFd> = None;
    for (position, name) in names.iter().enumerate() {
        if name.is_empty() || *name == "." || *name == ".." {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("`{relative}` is not a plain relative path"),
            ));
        }
        let last = position + 1 == names.len();
        let flags = libc::O_RDONLY
            | libc::O_CLOEXEC
            | libc::O_NOFOLLOW
            // A fifo swapped in for the file must not block the read.
            | if last { libc::O_NONBLOCK } else { libc::O_DIRECTORY };
        let name = CString::new(*name).map_err(io::Error::other)?;
        let parent = dir.as_ref().unwrap_or(workspace).as_raw_fd();
        // SAFETY: `parent` is an open directory and `name` a NUL-terminated string; the
        // returned descriptor, when not negative, is owned by nothing else.
        let fd = unsafe { libc::openat(parent, name.as_ptr(), flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor, owned here from now on.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        if last {
            let file = std::fs::File::from(fd);
            if !file.metadata()?.is_file() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("`{relative}` is no longer a regular file"),
                ));
            }
            return Ok(file);
        }
        dir = Some(fd);
    }
    Err(io::Error::new(io::ErrorKind::InvalidInput, "an empty path"))
}

pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: a NUL-terminated path; the descriptor is owned by the returned value.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor, owned here from now on.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Bytes free for an unprivileged user on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a NUL-terminated path and a buffer of the right type for the call to fill.
    if unsafe { libc::statvfs(path.as_ptr(), stats.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: filled by the successful call above.
    let stats = unsafe { stats.assume_init() };
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
}
