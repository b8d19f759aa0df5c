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

/// Makes the process `command` starts get SIGKILL when the thread that started it ends, which
/// includes the worker's process dying however it dies (`kill -9` too): no agent outlives its
/// worker. Start such processes from a thread that lives as long as the process (see
/// `spawner`).
#[cfg(target_os = "linux")]
pub fn kill_with_parent(command: &mut tokio::process::Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: prctl(2) and getppid(2) are, and the closure neither
    // allocates (an `io::Error` made from an errno does not) nor takes a lock.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The worker died before the line above took effect: nothing would kill the
            // agent, so it does not start.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
pub fn kill_with_parent(_command: &mut tokio::process::Command) {}

pub const SIGINT: i32 = libc::SIGINT;
pub const SIGKILL: i32 = libc::SIGKILL;
