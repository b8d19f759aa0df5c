//! Where agent processes are started: one thread that lives as long as the worker's process.
//!
//! An agent gets SIGKILL when the thread that forked it ends ([`signal::kill_with_parent`]),
//! which is meant to happen only when the worker dies. Tokio's blocking-pool threads end when
//! idle, and a runtime thread that once ran `block_in_place` becomes one, so agents are forked
//! here instead, whatever thread asks.

use std::sync::OnceLock;
use std::sync::mpsc;

use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use super::signal;

type Job = Box<dyn FnOnce() + Send>;

fn spawner() -> &'static mpsc::Sender<Job> {
    static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("agent-spawner".into())
            .spawn(move || {
                for job in queue {
                    // A panic here would end the thread, and with it every agent it started.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })
            .expect("cannot start the agent spawner thread");
        jobs
    })
}

/// Starts `command` on the spawner thread, to die with the worker.
pub async fn spawn(mut command: Command) -> std::io::Result<Child> {
    signal::kill_with_parent(&mut command);
    // The child is registered with the caller's runtime, which reaps it.
    let runtime = tokio::runtime::Handle::current();
    let (started, child) = oneshot::channel();
    let job: Job = Box::new(move || {
        let _entered = runtime.enter();
        let _ = started.send(command.spawn());
    });
    let gone = || std::io::Error::other("the agent spawner thread is gone");
    spawner().send(job).map_err(|_| gone())?;
    child.await.map_err(|_| gone())?
}
