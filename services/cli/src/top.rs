//! `claudecluster top`: a live view of the cluster in the terminal, redrawn from the driver's
//! API until `q` or Ctrl-C.

use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;
use claudecluster_grpc::ClientChannel as Channel;
use claudecluster_proto::Timestamp;
use claudecluster_proto::v1::driver_service_client::DriverServiceClient;
use claudecluster_proto::v1::*;
use crossterm::event::{self, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use crossterm::style::{Attribute, Color, Print, SetAttribute, SetForegroundColor};
use crossterm::terminal::{self, ClearType};
use crossterm::{cursor, queue};
use tokio::sync::mpsc;

use crate::client::{self, DriverArgs};

#[derive(Args)]
pub struct TopArgs {
    /// Milliseconds between refreshes.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..))]
    interval: u64,
    /// Print one snapshot and exit, as when stdout is not a terminal.
    #[arg(long)]
    once: bool,
    #[command(flatten)]
    driver: DriverArgs,
}

pub async fn top(args: TopArgs) -> Result<ExitCode, String> {
    let client = client::connect(&args.driver)?;
    let address = args.driver.address().to_owned();
    if args.once || !io::stdout().is_terminal() {
        return snapshot(&client, address).await;
    }
    live(client, address, Duration::from_millis(args.interval)).await
}

/// One frame as plain text: the whole of every table, cut to the terminal's width only when
/// there is one.
async fn snapshot(
    client: &DriverServiceClient<Channel>,
    address: String,
) -> Result<ExitCode, String> {
    let view = View {
        address,
        now: SystemTime::now(),
        latest: Some(fetch(client).await?),
        trouble: None,
        live: false,
    };
    let width = if io::stdout().is_terminal() {
        terminal::size().map_or(usize::MAX, |(columns, _)| usize::from(columns))
    } else {
        usize::MAX
    };
    let mut out = io::stdout().lock();
    for line in frame(&view, width, usize::MAX) {
        writeln!(out, "{}", line.text).map_err(|err| format!("cannot write: {err}"))?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn live(
    client: DriverServiceClient<Channel>,
    address: String,
    interval: Duration,
) -> Result<ExitCode, String> {
    use tokio::signal::unix::{SignalKind, signal};
    let signal = |kind| signal(kind).map_err(|err| format!("cannot watch for signals: {err}"));
    // Raw mode turns Ctrl-C into a key, but a signal can still come from elsewhere (`kill`, a
    // closed terminal): each ends the view the same way, through the screen's restoration.
    let mut interrupted = signal(SignalKind::interrupt())?;
    let mut terminated = signal(SignalKind::terminate())?;
    let mut hung_up = signal(SignalKind::hangup())?;
    let mut screen =
        Screen::enter().map_err(|err| format!("cannot take over the terminal: {err}"))?;
    let mut inputs = inputs();
    let mut snapshots = refreshes(client, interval);
    let mut view = View {
        address,
        now: SystemTime::now(),
        latest: None,
        trouble: None,
        live: true,
    };
    loop {
        screen.draw(&view)?;
        tokio::select! {
            input = inputs.recv() => match input {
                Some(Input::Redraw) => {}
                Some(Input::Quit) | None => break,
            },
            Some(outcome) = snapshots.recv() => match outcome {
                Ok(snapshot) => {
                    view.latest = Some(snapshot);
                    view.trouble = None;
                }
                Err(message) => view.trouble = Some(message),
            },
            _ = interrupted.recv() => break,
            _ = terminated.recv() => break,
            _ = hung_up.recv() => break,
        }
        view.now = SystemTime::now();
    }
    Ok(ExitCode::SUCCESS)
}

/// What the driver said at one refresh.
struct Snapshot {
    status: GetClusterStatusResponse,
    /// Assigned and running tasks, the longest-running first.
    running: Vec<Task>,
    /// Sessions not closed; none when the caller may not see sessions.
    sessions: Vec<Session>,
}

/// How long a refresh may take before the view says the driver does not answer: a driver that
/// is down refuses at once, but one that hangs would otherwise freeze the view on old data.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

async fn fetch(client: &DriverServiceClient<Channel>) -> Result<Snapshot, String> {
    let answer = async {
        let (status, running, sessions) = tokio::join!(
            cluster_status(client.clone()),
            running_tasks(client.clone()),
            open_sessions(client.clone())
        );
        Ok(Snapshot {
            status: status?,
            running: running?,
            sessions: sessions?,
        })
    };
    tokio::time::timeout(ANSWER_WITHIN, answer)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "the driver did not answer within {} s",
                ANSWER_WITHIN.as_secs()
            ))
        })
}

async fn cluster_status(
    mut client: DriverServiceClient<Channel>,
) -> Result<GetClusterStatusResponse, String> {
    client
        .get_cluster_status(GetClusterStatusRequest {})
        .await
        .map(tonic::Response::into_inner)
        .map_err(client::status_error)
}

async fn running_tasks(mut client: DriverServiceClient<Channel>) -> Result<Vec<Task>, String> {
    let mut tasks = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = ListTasksRequest {
            statuses: vec![TaskStatus::Assigned as i32, TaskStatus::Running as i32],
            page_size: 1000,
            page_token,
            label_selector: Default::default(),
        };
        let page = client
            .list_tasks(request)
            .await
            .map_err(client::status_error)?
            .into_inner();
        tasks.extend(page.tasks);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    tasks.sort_by_key(|task| {
        since(task)
            .map(|time| (time.seconds, time.nanos))
            .unwrap_or((i64::MAX, 0))
    });
    Ok(tasks)
}

async fn open_sessions(mut client: DriverServiceClient<Channel>) -> Result<Vec<Session>, String> {
    let open = [
        SessionState::Creating,
        SessionState::Ready,
        SessionState::Busy,
        SessionState::Idle,
        SessionState::Stopped,
    ];
    let mut sessions = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = ListSessionsRequest {
            states: open.iter().map(|state| *state as i32).collect(),
            page_size: 1000,
            page_token,
        };
        let page = match client.list_sessions(request).await {
            Ok(response) => response.into_inner(),
            // A key without the `sessions` scope still gets the rest of the view.
            Err(status) if status.code() == tonic::Code::PermissionDenied => {
                return Ok(Vec::new());
            }
            Err(status) => return Err(client::status_error(status)),
        };
        sessions.extend(page.sessions);
        if page.next_page_token.is_empty() {
            return Ok(sessions);
        }
        page_token = page.next_page_token;
    }
}

/// Fetches a snapshot every `interval` for as long as the view takes them.
fn refreshes(
    client: DriverServiceClient<Channel>,
    interval: Duration,
) -> mpsc::Receiver<Result<Snapshot, String>> {
    let (sender, receiver) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        // A slow answer pushes the next refresh back rather than bunching several up.
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if sender.send(fetch(&client).await).await.is_err() {
                return;
            }
        }
    });
    receiver
}

enum Input {
    Quit,
    Redraw,
}

/// Keys and resizes, read on a thread of their own: crossterm reads the terminal blocking.
/// The thread is not joined; it ends with the process, or at the first input nobody takes.
fn inputs() -> mpsc::UnboundedReceiver<Input> {
    let (sender, receiver) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        loop {
            let input = match event::read() {
                Ok(event::Event::Key(key)) if quits(&key) => Input::Quit,
                Ok(event::Event::Resize(..)) => Input::Redraw,
                Ok(_) => continue,
                // A terminal that cannot be read any more is gone: nobody is watching.
                Err(_) => Input::Quit,
            };
            let quit = matches!(input, Input::Quit);
            if sender.send(input).is_err() || quit {
                return;
            }
        }
    });
    receiver
}

fn quits(key: &KeyEvent) -> bool {
    key.kind == KeyEventKind::Press
        && match key.code {
            KeyCode::Char('q' | 'Q') | KeyCode::Esc => true,
            KeyCode::Char('c') => key.modifiers.contains(KeyModifiers::CONTROL),
            _ => false,
        }
}

/// The terminal in raw mode on the alternate screen. Dropping it gives the terminal back as
/// it was, on every way out: `q`, Ctrl-C, a signal, an error, a panic.
struct Screen {
    out: io::Stdout,
}

impl Screen {
    fn enter() -> io::Result<Screen> {
        // Made before anything changes, so that a failure halfway is undone by its drop.
        let mut screen = Screen { out: io::stdout() };
        // A panic's message would otherwise be printed on the alternate screen and vanish with
        // it. Only the main thread's: it draws the view and ends with such a panic, while one in
        // a refresh is caught by its task and the view goes on.
        let report_panic = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() == Some("main") {
                restore_terminal();
            }
            report_panic(info);
        }));
        terminal::enable_raw_mode()?;
        queue!(screen.out, terminal::EnterAlternateScreen, cursor::Hide)?;
        screen.out.flush()?;
        Ok(screen)
    }

    fn draw(&mut self, view: &View) -> Result<(), String> {
        let (columns, rows) =
            terminal::size().map_err(|err| format!("cannot read the terminal's size: {err}"))?;
        let lines = frame(view, usize::from(columns), usize::from(rows));
        self.paint(&lines, usize::from(rows))
            .map_err(|err| format!("cannot draw on the terminal: {err}"))
    }

    fn paint(&mut self, lines: &[Line], rows: usize) -> io::Result<()> {
        let out = &mut self.out;
        queue!(out, terminal::BeginSynchronizedUpdate)?;
        for (row, line) in (0u16..).zip(lines) {
            queue!(out, cursor::MoveTo(0, row))?;
            match line.tone {
                Tone::Plain => {}
                Tone::Title => queue!(out, SetAttribute(Attribute::Bold))?,
                Tone::Heads => queue!(out, SetAttribute(Attribute::Reverse))?,
                Tone::Alert => queue!(out, SetForegroundColor(Color::Red))?,
            }
            queue!(
                out,
                Print(&line.text),
                SetAttribute(Attribute::Reset),
                terminal::Clear(ClearType::UntilNewLine)
            )?;
        }
        // Past the last row the cursor would stay on it, and clearing down would wipe it.
        if lines.len() < rows {
            let below = u16::try_from(lines.len()).unwrap_or(u16::MAX);
            queue!(
                out,
                cursor::MoveTo(0, below),
                terminal::Clear(ClearType::FromCursorDown)
            )?;
        }
        queue!(out, terminal::EndSynchronizedUpdate)?;
        out.flush()
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Leaves the alternate screen and raw mode; harmless when done twice (a panic, then the drop).
fn restore_terminal() {
    let mut out = io::stdout();
    let _ = queue!(
        out,
        SetAttribute(Attribute::Reset),
        cursor::Show,
        terminal::LeaveAlternateScreen
    );
    let _ = out.flush();
    let _ = terminal::disable_raw_mode();
}

/// Everything one frame shows.
struct View {
    address: String,
    now: SystemTime,
    latest: Option<Snapshot>,
    /// Why the last refresh failed: the view keeps showing what it had before.
    trouble: Option<String>,
    /// Redrawn until `q`, rather than printed once.
    live: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tone {
    Plain,
    Title,
    Heads,
    Alert,
}

#[derive(Debug)]
struct Line {
    text: String,
    tone: Tone,
}

impl Line {
    fn new(text: impl Into<String>, tone: Tone) -> Line {
        Line {
            text: text.into(),
            tone,
        }
    }
}

/// A titled block of the frame: its fixed lines, and the rows that share what height is left.
struct Section {
    lines: Vec<Line>,
    rows: Vec<Line>,
}

/// The frame for a terminal of `width` columns and `height` rows: every line cut to the width,
/// and tables that do not fit in the height end with "… N more".
fn frame(view: &View, width: usize, height: usize) -> Vec<Line> {
    let mut sections = vec![Section {
        lines: header(view),
        rows: Vec::new(),
    }];
    if let Some(snapshot) = &view.latest {
        sections.push(workers(&snapshot.status, width));
        sections.push(Section {
            lines: vec![Line::new("", Tone::Plain), queue_line(&snapshot.status)],
            rows: Vec::new(),
        });
        sections.push(running(&snapshot.running, view.now, width));
        if !snapshot.sessions.is_empty() {
            sections.push(sessions(&snapshot.sessions, width));
        }
    }
    let fixed: usize = sections.iter().map(|section| section.lines.len()).sum();
    let wanted: Vec<usize> = sections.iter().map(|section| section.rows.len()).collect();
    let given = share_rows(&wanted, height.saturating_sub(fixed));
    let mut lines = Vec::new();
    for (section, given) in sections.into_iter().zip(given) {
        lines.extend(section.lines);
        let total = section.rows.len();
        if given >= total {
            lines.extend(section.rows);
        } else if given > 0 {
            lines.extend(section.rows.into_iter().take(given - 1));
            lines.push(Line::new(
                format!("… {} more", total - (given - 1)),
                Tone::Plain,
            ));
        }
    }
    lines.truncate(height);
    for line in &mut lines {
        line.text = cut(&line.text, width);
    }
    lines
}

fn header(view: &View) -> Vec<Line> {
    let mut title = format!("claudecluster top  {}  {}", view.address, clock(view.now));
    if let Some(snapshot) = &view.latest
        && !snapshot.status.version.is_empty()
    {
        title.push_str(&format!("  driver {}", snapshot.status.version));
    }
    if view.live {
        title.push_str("  (q quits)");
    }
    let mut lines = vec![Line::new(title, Tone::Title)];
    match &view.latest {
        Some(snapshot) => lines.push(Line::new(totals(snapshot), Tone::Plain)),
        None if view.trouble.is_none() => {
            lines.push(Line::new("waiting for the driver…", Tone::Plain));
        }
        None => {}
    }
    if let Some(trouble) = &view.trouble {
        let stale = if view.latest.is_some() {
            "; showing the last answer"
        } else {
            ""
        };
        lines.push(Line::new(
            format!("cannot refresh: {trouble}{stale}; retrying"),
            Tone::Alert,
        ));
    }
    lines
}

fn totals(snapshot: &Snapshot) -> String {
    let workers = &snapshot.status.workers;
    let healthy = workers.iter().filter(|worker| worker.healthy).count();
    let load: u32 = workers.iter().map(|worker| worker.load).sum();
    let capacity: u32 = workers.iter().map(|worker| worker.capacity).sum();
    let lifecycle = [
        TaskStatus::Pending,
        TaskStatus::Assigned,
        TaskStatus::Running,
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
    ];
    let counts: Vec<String> = lifecycle
        .iter()
        .filter_map(|status| {
            let count = snapshot.status.tasks_by_status.get(status.label())?;
            (*count > 0).then(|| format!("{} {count}", status.label()))
        })
        .collect();
    let tasks = if counts.is_empty() {
        "none".to_owned()
    } else {
        counts.join(", ")
    };
    let mut totals = format!(
        "workers {} ({healthy} healthy)  load {load}/{capacity}  tasks: {tasks}",
        workers.len()
    );
    if !snapshot.sessions.is_empty() {
        totals.push_str(&format!("  open sessions {}", snapshot.sessions.len()));
    }
    totals
}

fn workers(status: &GetClusterStatusResponse, width: usize) -> Section {
    let rows: Vec<(Vec<String>, Tone)> = status
        .workers
        .iter()
        .map(|worker| {
            let mut modes: Vec<&str> = worker.execution_modes().map(ExecutionMode::label).collect();
            if modes.is_empty() {
                modes.push(worker.execution_mode().label());
            }
            let health = if worker.healthy {
                "ok".to_owned()
            } else if worker.health_reason.is_empty() {
                "unhealthy".to_owned()
            } else {
                format!("unhealthy: {}", worker.health_reason)
            };
            let draining = if worker.drained {
                "drained"
            } else if worker.draining {
                "yes"
            } else {
                "no"
            };
            let cells = vec![
                worker.worker_id.clone(),
                modes.join(","),
                format!("{}/{}", worker.load, worker.capacity),
                draining.to_owned(),
                worker.idle_warm_agents.to_string(),
                health,
            ];
            let tone = if worker.healthy {
                Tone::Plain
            } else {
                Tone::Alert
            };
            (cells, tone)
        })
        .collect();
    titled_table(
        &format!("WORKERS ({})", status.workers.len()),
        &["ID", "MODE", "LOAD", "DRAINING", "WARM", "HEALTH"],
        rows,
        width,
    )
}

fn queue_line(status: &GetClusterStatusResponse) -> Line {
    let mut line = format!("QUEUE {}", status.queued_tasks);
    for priority in ["critical", "high", "normal", "low"] {
        let count = status
            .queued_by_priority
            .get(priority)
            .copied()
            .unwrap_or(0);
        line.push_str(&format!("   {priority} {count}"));
    }
    Line::new(line, Tone::Title)
}

fn running(tasks: &[Task], now: SystemTime, width: usize) -> Section {
    let rows = tasks
        .iter()
        .map(|task| {
            let elapsed = since(task)
                .and_then(|start| now.duration_since(system_time(start)).ok())
                .map_or_else(|| "-".to_owned(), |elapsed| duration(elapsed.as_secs()));
            let prompt = task.spec.as_ref().map_or("", |spec| spec.prompt.as_str());
            let cells = vec![
                task.task_id.clone(),
                task.status().label().to_owned(),
                task.worker_id.clone(),
                elapsed,
                or_dash(&task.last_tool),
                cost(task),
                prompt.split_whitespace().collect::<Vec<_>>().join(" "),
            ];
            (cells, Tone::Plain)
        })
        .collect();
    titled_table(
        &format!("RUNNING TASKS ({})", tasks.len()),
        &[
            "ID",
            "STATUS",
            "WORKER",
            "ELAPSED",
            "LAST TOOL",
            "COST",
            "PROMPT",
        ],
        rows,
        width,
    )
}

fn sessions(sessions: &[Session], width: usize) -> Section {
    let rows = sessions
        .iter()
        .map(|session| {
            let cells = vec![
                session.session_id.clone(),
                session.state().label().to_owned(),
                or_dash(&session.worker_id),
                session.turns.to_string(),
                dollars(session.total_cost_usd),
                or_dash(&session.model),
            ];
            (cells, Tone::Plain)
        })
        .collect();
    titled_table(
        &format!("SESSIONS ({})", sessions.len()),
        &["ID", "STATE", "WORKER", "TURNS", "COST", "MODEL"],
        rows,
        width,
    )
}

fn titled_table(
    title: &str,
    heads: &[&str],
    rows: Vec<(Vec<String>, Tone)>,
    width: usize,
) -> Section {
    let mut lines = vec![Line::new("", Tone::Plain), Line::new(title, Tone::Title)];
    if rows.is_empty() {
        lines.push(Line::new("none", Tone::Plain));
        return Section {
            lines,
            rows: Vec::new(),
        };
    }
    let mut table = layout(
        heads,
        &rows
            .iter()
            .map(|(cells, _)| cells.clone())
            .collect::<Vec<_>>(),
        width,
    );
    lines.push(Line::new(table.remove(0), Tone::Heads));
    let rows = table
        .into_iter()
        .zip(rows)
        .map(|(text, (_, tone))| Line::new(text, tone))
        .collect();
    Section { lines, rows }
}

/// Space between two columns.
const GAP: usize = 2;

/// The heads and the rows as aligned lines no wider than `width`. The last column gives way
/// first, then the widest, a character at a time.
fn layout(heads: &[&str], rows: &[Vec<String>], width: usize) -> Vec<String> {
    let mut widths: Vec<usize> = heads
        .iter()
        .enumerate()
        .map(|(column, head)| {
            rows.iter()
                .filter_map(|row| row.get(column))
                .map(|cell| cell.chars().count())
                .chain([head.chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    // Narrower than four characters (or its head, when that is shorter), a column says nothing.
    let least: Vec<usize> = heads
        .iter()
        .map(|head| head.chars().count().min(4))
        .collect();
    let total =
        |widths: &[usize]| widths.iter().sum::<usize>() + GAP * widths.len().saturating_sub(1);
    // The last column holds free text (a prompt, a reason): it gives way before any other.
    if let (Some(last), Some(&floor)) = (widths.len().checked_sub(1), least.last()) {
        let over = total(&widths).saturating_sub(width);
        widths[last] = widths[last]
            .saturating_sub(over)
            .max(floor.min(widths[last]));
    }
    while total(&widths) > width {
        let Some(widest) = (0..widths.len())
            .filter(|&column| widths[column] > least[column])
            .max_by_key(|&column| (widths[column], column))
        else {
            break;
        };
        widths[widest] -= 1;
    }
    let line = |cells: &[&str]| {
        let mut line = String::new();
        for (column, width) in widths.iter().enumerate() {
            if column > 0 {
                line.push_str(&" ".repeat(GAP));
            }
            let cell = cut(cells.get(column).copied().unwrap_or(""), *width);
            let padding = width - cell.chars().count();
            line.push_str(&cell);
            line.push_str(&" ".repeat(padding));
        }
        line.trim_end().to_owned()
    };
    let mut lines = vec![line(heads)];
    for row in rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        lines.push(line(&cells));
    }
    lines
}

/// Rows for each table out of `free`, handed round one at a time so that a long table does
/// not crowd out the others.
fn share_rows(wanted: &[usize], mut free: usize) -> Vec<usize> {
    let mut given = vec![0; wanted.len()];
    let mut handed = true;
    while handed && free > 0 {
        handed = false;
        for (rows, wants) in given.iter_mut().zip(wanted) {
            if free > 0 && *rows < *wants {
                *rows += 1;
                free -= 1;
                handed = true;
            }
        }
    }
    given
}

/// `text` in at most `width` characters, with `…` where it was cut.
fn cut(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_owned();
    }
    if width == 0 {
        return String::new();
    }
    let mut short: String = text.chars().take(width - 1).collect();
    short.push('…');
    short
}

/// When the task's clock started: when it began running, or else when it was submitted.
fn since(task: &Task) -> Option<Timestamp> {
    task.start_time.or(task.create_time)
}

fn system_time(timestamp: Timestamp) -> SystemTime {
    let seconds = u64::try_from(timestamp.seconds).unwrap_or(0);
    let nanos = u32::try_from(timestamp.nanos).unwrap_or(0);
    UNIX_EPOCH + Duration::new(seconds, nanos)
}

/// What the task has cost so far: the agent's own figure once it reported its result, else
/// what the worker's credential proxy metered.
fn cost(task: &Task) -> String {
    match &task.result {
        Some(result) => dollars(result.total_cost_usd),
        None if task.metered_usage.is_some() || task.metered_cost_usd > 0.0 => {
            dollars(task.metered_cost_usd)
        }
        None => "-".to_owned(),
    }
}

fn dollars(amount: f64) -> String {
    format!("${amount:.4}")
}

fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_owned()
    } else {
        text.to_owned()
    }
}

/// `42s`, `3m05s`, `2h03m`, `1d04h`.
fn duration(seconds: u64) -> String {
    let (minutes, hours, days) = (seconds / 60, seconds / 3600, seconds / 86_400);
    if days > 0 {
        format!("{days}d{:02}h", hours % 24)
    } else if hours > 0 {
        format!("{hours}h{:02}m", minutes % 60)
    } else if minutes > 0 {
        format!("{minutes}m{:02}s", seconds % 60)
    } else {
        format!("{seconds}s")
    }
}

/// The time of day as `HH:MM:SS UTC`.
fn clock(at: SystemTime) -> String {
    let seconds = at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
        % 86_400;
    format!(
        "{:02}:{:02}:{:02} UTC",
        seconds / 3600,
        (seconds / 60) % 60,
        seconds % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Option<Timestamp> {
        Some(Timestamp { seconds, nanos: 0 })
    }

    fn worker(id: &str, healthy: bool) -> WorkerInfo {
        WorkerInfo {
            worker_id: id.to_owned(),
            execution_modes: vec![ExecutionMode::ProcessPool as i32],
            capacity: 4,
            load: 1,
            healthy,
            health_reason: if healthy { "" } else { "no heartbeat" }.to_owned(),
            idle_warm_agents: 2,
            ..Default::default()
        }
    }

    fn task(number: usize) -> Task {
        Task {
            task_id: format!("{number:08}-aaaa-bbbb-cccc-dddddddddddd"),
            status: TaskStatus::Running as i32,
            worker_id: "worker-with-a-long-name".to_owned(),
            start_time: at(1_000_000 - 65),
            last_tool: "Bash".to_owned(),
            spec: Some(TaskSpec {
                prompt: "refactor\nthe whole codebase ".repeat(20),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn view(tasks: usize) -> View {
        View {
            address: "127.0.0.1:50051".to_owned(),
            now: system_time(at(1_000_000).unwrap()),
            latest: Some(Snapshot {
                status: GetClusterStatusResponse {
                    workers: vec![worker("worker-a", true), worker("worker-b", false)],
                    tasks_by_status: [("running".to_owned(), tasks as u64)].into(),
                    queued_tasks: 3,
                    queued_by_priority: [("high".to_owned(), 1), ("low".to_owned(), 2)].into(),
                    version: "0.1.0".to_owned(),
                },
                running: (0..tasks).map(task).collect(),
                sessions: Vec::new(),
            }),
            trouble: None,
            live: true,
        }
    }

    fn texts(lines: &[Line]) -> Vec<&str> {
        lines.iter().map(|line| line.text.as_str()).collect()
    }

    #[test]
    fn cells_are_cut_with_a_mark_where_text_was_lost() {
        assert_eq!(cut("abcdef", 4), "abc…");
        assert_eq!(cut("abcd", 4), "abcd");
        assert_eq!(cut("äöüß", 3), "äö…");
        assert_eq!(cut("abc", 0), "");
    }

    #[test]
    fn free_text_gives_way_before_ids_then_the_widest_column() {
        let rows = vec![vec![
            "8c1f4a52-0000-4000-8000-000000000001".to_owned(),
            "a prompt much longer than the terminal is wide, going on and on".to_owned(),
        ]];
        let lines = layout(&["ID", "PROMPT"], &rows, 60);
        assert!(
            lines.iter().all(|line| line.chars().count() <= 60),
            "{lines:?}"
        );
        assert!(lines[1].starts_with("8c1f4a52-0000-4000-8000-000000000001  a prompt"));
        assert!(lines[1].ends_with('…'), "{}", lines[1]);
        assert!(
            lines[0].starts_with("ID   "),
            "heads align with cells: {}",
            lines[0]
        );
        // Once the free text is down to a few characters, the id gives way too.
        let narrow = layout(&["ID", "PROMPT"], &rows, 30);
        assert_eq!(narrow[1], "8c1f4a52-0000-4000-8000…  a p…");
        assert!(narrow.iter().all(|line| line.chars().count() <= 30));
    }

    #[test]
    fn a_frame_fits_the_terminal_and_says_how_many_rows_it_left_out() {
        let lines = frame(&view(30), 70, 20);
        assert_eq!(lines.len(), 20);
        assert!(
            lines.iter().all(|line| line.text.chars().count() <= 70),
            "{:#?}",
            texts(&lines)
        );
        let shown = lines
            .iter()
            .filter(|line| line.text.starts_with("00000"))
            .count();
        let more = lines
            .iter()
            .find_map(|line| line.text.strip_prefix("… "))
            .and_then(|rest| rest.strip_suffix(" more"))
            .and_then(|count| count.parse::<usize>().ok())
            .expect("a `… N more` line");
        assert!(shown > 0);
        assert_eq!(shown + more, 30, "{:#?}", texts(&lines));
        // Both workers still show: a long table does not crowd out a short one.
        assert!(
            texts(&lines)
                .iter()
                .any(|line| line.starts_with("worker-a"))
        );
        let sick = lines
            .iter()
            .find(|line| line.text.starts_with("worker-b"))
            .expect("the unhealthy worker's row");
        assert_eq!(sick.tone, Tone::Alert);
        assert!(
            sick.text.contains("unhealthy: no heartbeat"),
            "{}",
            sick.text
        );
    }

    #[test]
    fn a_running_task_shows_its_worker_elapsed_time_last_tool_and_cost() {
        let mut snapshot = view(1);
        snapshot.latest.as_mut().unwrap().running[0].metered_cost_usd = 0.0123;
        let lines = frame(&snapshot, 200, 50);
        let row = lines
            .iter()
            .find(|line| line.text.starts_with("00000000-aaaa"))
            .expect("the task's row");
        let cells: Vec<&str> = row
            .text
            .split("  ")
            .map(str::trim)
            .filter(|cell| !cell.is_empty())
            .collect();
        assert_eq!(
            &cells[..6],
            &[
                "00000000-aaaa-bbbb-cccc-dddddddddddd",
                "running",
                "worker-with-a-long-name",
                "1m05s",
                "Bash",
                "$0.0123"
            ],
            "{}",
            row.text
        );
        let texts = texts(&lines);
        assert!(texts[0].contains("127.0.0.1:50051") && texts[0].contains("13:46:40 UTC"));
        assert!(
            texts.contains(&"QUEUE 3   critical 0   high 1   normal 0   low 2"),
            "{texts:#?}"
        );
    }

    #[test]
    fn a_failed_refresh_is_shown_over_the_last_answer() {
        let mut stale = view(1);
        stale.trouble = Some("Unavailable: connection refused".to_owned());
        let lines = frame(&stale, 120, 40);
        let alert = lines
            .iter()
            .find(|line| line.tone == Tone::Alert && line.text.starts_with("cannot refresh"))
            .expect("the error");
        assert!(alert.text.contains("connection refused"), "{}", alert.text);
        assert!(
            texts(&lines)
                .iter()
                .any(|line| line.starts_with("00000000-aaaa"))
        );

        let never = View {
            latest: None,
            ..stale
        };
        let lines = frame(&never, 120, 40);
        assert_eq!(lines.len(), 2, "{:#?}", texts(&lines));
        assert_eq!(lines[1].tone, Tone::Alert);
    }

    #[test]
    fn a_snapshot_for_a_script_is_not_cut() {
        let printed = View {
            live: false,
            ..view(40)
        };
        let lines = frame(&printed, usize::MAX, usize::MAX);
        assert!(!texts(&lines).iter().any(|line| line.contains('…')));
        assert_eq!(
            lines
                .iter()
                .filter(|line| line.text.starts_with("000000"))
                .count(),
            40
        );
        assert!(!lines[0].text.contains("q quits"), "{}", lines[0].text);
    }

    #[test]
    fn cost_is_the_agents_figure_then_the_metered_one_then_unknown() {
        let mut task = task(0);
        assert_eq!(cost(&task), "-");
        task.metered_usage = Some(TokenUsage::default());
        assert_eq!(cost(&task), "$0.0000");
        task.metered_cost_usd = 0.5;
        assert_eq!(cost(&task), "$0.5000");
        task.result = Some(AgentResult {
            total_cost_usd: 0.25,
            ..Default::default()
        });
        assert_eq!(cost(&task), "$0.2500");
    }

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(duration(42), "42s");
        assert_eq!(duration(185), "3m05s");
        assert_eq!(duration(7_380), "2h03m");
        assert_eq!(duration(100_800), "1d04h");
    }

    #[test]
    fn rows_are_shared_round_the_tables() {
        assert_eq!(share_rows(&[2, 30, 0], 10), vec![2, 8, 0]);
        assert_eq!(share_rows(&[5, 5], 3), vec![2, 1]);
        assert_eq!(share_rows(&[1, 1], 10), vec![1, 1]);
    }
}
