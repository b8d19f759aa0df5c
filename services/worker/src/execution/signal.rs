//! Signals to local processes, the one place this crate needs `unsafe`.
#![allow(unsafe_code)]

/// Sends `signal` to process `pid`, or to its whole process group when `group` is set.
pub fn send(pid: u32, signal: i32, group: bool) -> std::io::Result<()> {
    let pid = i32::try_from(pid).map_err(std::io::Error::other)?;
    let target = if group { -pid } else { pid };
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let result = unsafe { libc::kill(target, signal) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub const SIGINT: i32 = libc::SIGINT;
pub const SIGKILL: i32 = libc::SIGKILL;
