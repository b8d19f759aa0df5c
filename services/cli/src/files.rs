//! `claudecluster tasks files | download | diff`: the work an agent left in its workspace,
//! fetched through the driver from wherever the workspace is.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use claudecluster_proto::v1::*;

use crate::client::{DriverArgs, connect, status_error};
use crate::render;

/// Whose workspace: a task's, or with `--session` a session's.
#[derive(Args)]
pub struct Whose {
    /// The task's id (or the session's, with --session).
    id: String,
    /// ID names a session.
    #[arg(long)]
    session: bool,
}

impl Whose {
    fn ids(&self) -> (String, String) {
        if self.session {
            (String::new(), self.id.clone())
        } else {
            (self.id.clone(), String::new())
        }
    }
}

#[derive(Args)]
pub struct FilesArgs {
    #[command(flatten)]
    whose: Whose,
    /// Only these files and directories.
    paths: Vec<String>,
    /// Also list the repository's `.git` directory.
    #[arg(long)]
    include_git: bool,
    #[command(flatten)]
    driver: DriverArgs,
}

#[derive(Args)]
pub struct DownloadArgs {
    #[command(flatten)]
    whose: Whose,
    /// Only these files and directories.
    paths: Vec<String>,
    /// Where to write the files (made if missing).
    #[arg(long, short)]
    output: PathBuf,
    /// Also download the repository's `.git` directory.
    #[arg(long)]
    include_git: bool,
    /// Refuse to download more than this many bytes of file content.
    #[arg(long)]
    max_bytes: Option<u64>,
    #[command(flatten)]
    driver: DriverArgs,
}

#[derive(Args)]
pub struct DiffArgs {
    #[command(flatten)]
    whose: Whose,
    /// Only these files and directories.
    paths: Vec<String>,
    /// Only the summary: files, insertions, deletions.
    #[arg(long)]
    stat: bool,
    #[command(flatten)]
    driver: DriverArgs,
}

pub async fn list(args: FilesArgs) -> Result<ExitCode, String> {
    let mut client = connect(&args.driver)?;
    let (task_id, session_id) = args.whose.ids();
    let mut page_token = String::new();
    let mut summary = None;
    loop {
        let answer = client
            .list_task_files(ListTaskFilesRequest {
                task_id: task_id.clone(),
                session_id: session_id.clone(),
                paths: args.paths.clone(),
                include_git: args.include_git,
                page_size: 0,
                page_token,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        for file in &answer.files {
            let link = if file.link_target.is_empty() {
                String::new()
            } else {
                format!(" -> {}", file.link_target)
            };
            println!(
                "{:<9}  {:06o}  {:>10}  {}{link}",
                file.change().label(),
                file.mode,
                file.size,
                file.path
            );
        }
        summary = answer.summary.or(summary);
        if answer.next_page_token.is_empty() {
            break;
        }
        page_token = answer.next_page_token;
    }
    if let Some(summary) = summary {
        println!("{}", render::change_summary(&summary));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn download(args: DownloadArgs) -> Result<ExitCode, String> {
    let mut client = connect(&args.driver)?;
    let (task_id, session_id) = args.whose.ids();
    let mut chunks = client
        .download_task_files(DownloadTaskFilesRequest {
            task_id,
            session_id,
            paths: args.paths.clone(),
            include_git: args.include_git,
            max_bytes: args.max_bytes.unwrap_or_default(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    std::fs::create_dir_all(&args.output)
        .map_err(|err| format!("cannot create {}: {err}", args.output.display()))?;
    // The archive is unpacked as it arrives, on a thread of its own: `tar` reads blocking.
    let (sender, receiver) = std::sync::mpsc::sync_channel::<Vec<u8>>(8);
    let output = args.output.clone();
    let unpacking = tokio::task::spawn_blocking(move || {
        let mut archive = tar::Archive::new(ChunkReader {
            chunks: receiver,
            current: std::io::Cursor::new(Vec::new()),
        });
        archive.set_preserve_permissions(true);
        // `unpack` refuses entries that would land outside `output`.
        archive.unpack(&output)
    });
    let (mut files, mut bytes) = (0, 0);
    let mut failure = None;
    loop {
        match chunks.message().await {
            Ok(None) => break,
            Ok(Some(chunk)) => {
                if chunk.files > 0 || chunk.content_bytes > 0 {
                    (files, bytes) = (chunk.files, chunk.content_bytes);
                }
                if sender.send(chunk.chunk).is_err() {
                    break;
                }
            }
            Err(status) => {
                failure = Some(status_error(status));
                break;
            }
        }
    }
    drop(sender);
    let unpacked = unpacking.await.map_err(|err| err.to_string())?;
    if let Some(failure) = failure {
        return Err(format!("the download broke off: {failure}"));
    }
    unpacked.map_err(|err| format!("cannot unpack into {}: {err}", args.output.display()))?;
    println!(
        "{files} files, {} into {}",
        claudecluster_proto::human_bytes(bytes),
        args.output.display()
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn diff(args: DiffArgs) -> Result<ExitCode, String> {
    let mut client = connect(&args.driver)?;
    let (task_id, session_id) = args.whose.ids();
    let answer = client
        .get_task_diff(GetTaskDiffRequest {
            task_id,
            session_id,
            paths: args.paths.clone(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if !args.stat {
        print!("{}", answer.diff);
        if answer.truncated {
            eprintln!(
                "claudecluster: the diff was cut at the worker's bound (`worker.results.maxDiffBytes`); name paths to see the rest, or download the files"
            );
        }
    }
    if let Some(summary) = &answer.summary {
        let line = render::change_summary(summary);
        if args.stat {
            println!("{line}");
        } else {
            eprintln!("{line}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The chunks of an archive as one stream of bytes.
struct ChunkReader {
    chunks: std::sync::mpsc::Receiver<Vec<u8>>,
    current: std::io::Cursor<Vec<u8>>,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let read = self.current.read(buf)?;
            if read > 0 || buf.is_empty() {
                return Ok(read);
            }
            match self.chunks.recv() {
                Ok(chunk) => self.current = std::io::Cursor::new(chunk),
                // The sender is gone: the archive ends here.
                Err(_) => return Ok(0),
            }
        }
    }
}
