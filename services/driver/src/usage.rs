//! Cost and tokens: recorded once per ended task run and answered session message, rolled up
//! over time windows (GetUsage), and held against the budgets of the cluster and of each key.
//!
//! What counts against a budget is the larger of what the agent reported and what the
//! worker's credential proxy metered: an agent cannot spend more by reporting less.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use claudecluster_config::{BudgetConfig, WhenSpent};
use claudecluster_proto::v1::{
    AgentResult, BudgetState, GetUsageResponse, Session, Task, TokenUsage, Usage as UsageTotals,
    UsageRollup,
};
use serde_json::json;

use crate::auth::Quotas;
use crate::db::{Db, DbError, UsageRow};
use crate::notify::{self, Notifier};

/// The label the MCP server puts on the tasks an agent spawns: the agent's session id.
pub const PARENT_SESSION_LABEL: &str = "claudecluster.parent_session";

pub struct Usage {
    db: Arc<Db>,
    cluster_budget: BudgetConfig,
    notifier: Arc<Notifier>,
    spend: Mutex<Spend>,
    /// An agent's session id to the root of its task's tree, for the tasks it spawns.
    roots: Mutex<HashMap<String, String>>,
    /// The quotas each key was last seen with, for budgets checked without a caller at hand.
    quotas: Mutex<HashMap<String, Quotas>>,
}

/// The spending of the current UTC day and month, by `""` (the cluster) and by key.
#[derive(Default)]
struct Spend {
    day: i64,
    month: i64,
    by_day: HashMap<String, f64>,
    by_month: HashMap<String, f64>,
    /// Budgets already reported spent in their period.
    reported: HashSet<String>,
}

/// A budget and its state now.
struct Budget {
    name: String,
    period: &'static str,
    limit: f64,
    spent: f64,
}

const DAY_MS: i64 = 86_400_000;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}

/// The UTC day number and month number (year × 12 + month) of `ms`.
fn periods(ms: i64) -> (i64, i64) {
    let day = ms.div_euclid(DAY_MS);
    let (year, month) = year_month(day);
    (day, year * 12 + month)
}

fn year_month(day: i64) -> (i64, i64) {
    let (year, month, _) = claudecluster_telemetry::civil_from_days(day);
    (year, i64::from(month))
}

/// The first millisecond of the UTC month that holds `ms`.
fn month_start_ms(ms: i64) -> i64 {
    let (mut day, month) = periods(ms);
    while periods((day - 1) * DAY_MS).1 == month {
        day -= 1;
    }
    day * DAY_MS
}

fn charged(row: &UsageRow) -> f64 {
    row.cost_usd.max(row.metered_cost_usd)
}

fn add_tokens(sum: &mut TokenUsage, more: &TokenUsage) {
    sum.input_tokens += more.input_tokens;
    sum.output_tokens += more.output_tokens;
    sum.cache_creation_input_tokens += more.cache_creation_input_tokens;
    sum.cache_read_input_tokens += more.cache_read_input_tokens;
}

fn add(totals: &mut UsageTotals, row: &UsageRow) {
    totals.runs += 1;
    totals.cost_usd += row.cost_usd;
    totals.metered_cost_usd += row.metered_cost_usd;
    add_tokens(
        totals.tokens.get_or_insert_with(Default::default),
        &row.tokens,
    );
    add_tokens(
        totals.metered_tokens.get_or_insert_with(Default::default),
        &row.metered_tokens,
    );
}

impl Usage {
    /// Reads this month's spending back from the store.
    pub async fn load(
        db: Arc<Db>,
        cluster_budget: BudgetConfig,
        notifier: Arc<Notifier>,
    ) -> Result<Arc<Usage>, DbError> {
        let usage = Usage {
            db,
            cluster_budget,
            notifier,
            spend: Mutex::default(),
            roots: Mutex::default(),
            quotas: Mutex::default(),
        };
        usage.reload().await?;
        Ok(Arc::new(usage))
    }

    /// Reads this month's spending again (a standby that takes over).
    pub async fn reload(&self) -> Result<(), DbError> {
        let rows = self
            .db
            .usage_between(month_start_ms(now_ms()), i64::MAX)
            .await?;
        let mut spend = self.spend.lock().expect("spend lock poisoned");
        *spend = Spend::default();
        for row in &rows {
            spend.add(row);
        }
        Ok(())
    }

    /// The root of `task`'s tree: the root of the task whose agent spawned it, or itself.
    fn tree_of(&self, task: &Task) -> String {
        let parent = task
            .spec
            .as_ref()
            .and_then(|spec| spec.labels.get(PARENT_SESSION_LABEL));
        parent
            .and_then(|agent| {
                self.roots
                    .lock()
                    .expect("roots lock poisoned")
                    .get(agent)
                    .cloned()
            })
            .unwrap_or_else(|| task.task_id.clone())
    }

    /// Notes that `task`'s agent runs as `agent_session_id`: the tasks it spawns join its tree.
    pub fn agent_started(&self, task: &Task, agent_session_id: &str) {
        if agent_session_id.is_empty() {
            return;
        }
        let root = self.tree_of(task);
        self.roots
            .lock()
            .expect("roots lock poisoned")
            .insert(agent_session_id.to_owned(), root);
    }

    /// Records what an ended task cost, once.
    pub async fn task_ended(&self, task: &Task) {
        let result = task.result.clone().unwrap_or_default();
        let row = UsageRow {
            subject: task.task_id.clone(),
            turn: 0,
            session: false,
            time_ms: now_ms(),
            tree: self.tree_of(task),
            owner: task.owner.clone(),
            worker: task.worker_id.clone(),
            model: task.model.clone(),
            cost_usd: result.total_cost_usd,
            metered_cost_usd: task.metered_cost_usd,
            tokens: result.usage.unwrap_or_default(),
            metered_tokens: task.metered_usage.unwrap_or_default(),
        };
        if let Some(result) = &task.result
            && !result.agent_session_id.is_empty()
        {
            self.agent_started(task, &result.agent_session_id);
        }
        self.record(row).await;
    }

    /// Records what a session's answer to message `turn` cost: the agent reports its cost
    /// over the whole conversation, so the turn's is the growth since `cost_before`.
    pub async fn session_replied(
        &self,
        session: &Session,
        turn: u32,
        result: &AgentResult,
        cost_before: f64,
    ) {
        let row = UsageRow {
            subject: session.session_id.clone(),
            turn: turn.max(1),
            session: true,
            time_ms: now_ms(),
            tree: String::new(),
            owner: session.owner.clone(),
            worker: session.worker_id.clone(),
            model: session.model.clone(),
            cost_usd: (result.total_cost_usd - cost_before).max(0.0),
            metered_cost_usd: 0.0,
            tokens: result.usage.unwrap_or_default(),
            metered_tokens: TokenUsage::default(),
        };
        self.record(row).await;
    }

    async fn record(&self, row: UsageRow) {
        crate::metrics::metrics().observe_usage(&row);
        if let Err(err) = self.db.insert_usage(&row).await {
            tracing::warn!(subject = %row.subject, error = %err, "cannot record usage; it counts against budgets until the driver restarts");
        }
        let reached = {
            let mut spend = self.spend.lock().expect("spend lock poisoned");
            spend.add(&row);
            let mut reached = Vec::new();
            for budget in self.budgets_of(&spend, &row.owner, None) {
                if budget.spent >= budget.limit && spend.reported.insert(budget.key()) {
                    reached.push(budget);
                }
            }
            reached
        };
        for budget in reached {
            tracing::warn!(budget = %budget.name, period = budget.period, limit_usd = budget.limit, spent_usd = budget.spent, "budget spent");
            self.notifier.notify(
                notify::BUDGET_REACHED,
                json!({
                    "budget": budget.name,
                    "period": budget.period,
                    "limitUsd": budget.limit,
                    "spentUsd": budget.spent,
                    "whenSpent": self.when_spent_label(),
                }),
            );
        }
    }

    fn when_spent_label(&self) -> &'static str {
        match self.cluster_budget.when_spent {
            WhenSpent::Finish => "finish",
            WhenSpent::Stop => "stop",
        }
    }

    /// Whether running work stops once a budget is spent.
    pub fn stops_when_spent(&self) -> bool {
        self.cluster_budget.when_spent == WhenSpent::Stop
    }

    /// The budgets that apply to work of `owner` (the cluster's, and the key's from `quotas`
    /// when given, else as last seen).
    fn budgets_of(&self, spend: &Spend, owner: &str, quotas: Option<&Quotas>) -> Vec<Budget> {
        let mut budgets = Vec::new();
        let cluster = &self.cluster_budget;
        for (period, limit, map) in [
            ("day", cluster.usd_per_day, &spend.by_day),
            ("month", cluster.usd_per_month, &spend.by_month),
        ] {
            if limit > 0.0 {
                budgets.push(Budget {
                    name: "cluster".to_owned(),
                    period,
                    limit,
                    spent: map.get("").copied().unwrap_or(0.0),
                });
            }
        }
        if !owner.is_empty() {
            let quotas = quotas.copied().or_else(|| {
                self.quotas
                    .lock()
                    .expect("quota lock poisoned")
                    .get(owner)
                    .copied()
            });
            if let Some(quotas) = quotas {
                for (period, limit, map) in [
                    ("day", quotas.budget_usd_per_day, &spend.by_day),
                    ("month", quotas.budget_usd_per_month, &spend.by_month),
                ] {
                    if limit > 0.0 {
                        budgets.push(Budget {
                            name: format!("key:{owner}"),
                            period,
                            limit,
                            spent: map.get(owner).copied().unwrap_or(0.0),
                        });
                    }
                }
            }
        }
        budgets
    }

    /// Refuses new work of `owner` when a budget that applies to it is spent, naming it.
    pub fn check(&self, owner: &str, quotas: Option<&Quotas>) -> Result<(), String> {
        if let Some(quotas) = quotas
            && !owner.is_empty()
        {
            self.quotas
                .lock()
                .expect("quota lock poisoned")
                .insert(owner.to_owned(), *quotas);
        }
        let mut spend = self.spend.lock().expect("spend lock poisoned");
        spend.roll(now_ms());
        for budget in self.budgets_of(&spend, owner, quotas) {
            if budget.spent >= budget.limit {
                return Err(format!(
                    "the budget `{}` of {:.2} USD per {} is spent ({:.4} USD this {}); {}",
                    budget.name,
                    budget.limit,
                    budget.period,
                    budget.spent,
                    budget.period,
                    match budget.name.as_str() {
                        "cluster" => "raise driver.budget or wait for the next period",
                        _ => "raise the key's budget quota or wait for the next period",
                    }
                ));
            }
        }
        Ok(())
    }

    /// Whether work of `owner` is past a budget now (for stopping running work).
    pub fn is_spent(&self, owner: &str) -> bool {
        self.check(owner, None).is_err()
    }

    /// The roll-ups over `[from_ms, to_ms)`, of `owner`'s work only when given.
    pub async fn report(
        &self,
        from_ms: i64,
        to_ms: i64,
        owner: Option<&str>,
    ) -> Result<GetUsageResponse, DbError> {
        let rows = self.db.usage_between(from_ms, to_ms).await?;
        let mut cluster = UsageTotals::default();
        let mut groups: [BTreeMap<String, UsageTotals>; 5] = Default::default();
        for row in rows
            .iter()
            .filter(|row| owner.is_none_or(|owner| row.owner == owner))
        {
            add(&mut cluster, row);
            let [trees, sessions, keys, workers, models] = &mut groups;
            if row.session {
                add(sessions.entry(row.subject.clone()).or_default(), row);
            } else {
                add(trees.entry(row.tree.clone()).or_default(), row);
            }
            add(keys.entry(row.owner.clone()).or_default(), row);
            add(workers.entry(row.worker.clone()).or_default(), row);
            add(models.entry(row.model.clone()).or_default(), row);
        }
        let rollups = |group: BTreeMap<String, UsageTotals>| {
            group
                .into_iter()
                .map(|(key, usage)| UsageRollup {
                    key,
                    usage: Some(usage),
                })
                .collect::<Vec<_>>()
        };
        let [trees, sessions, keys, workers, models] = groups;
        let budgets = {
            let mut spend = self.spend.lock().expect("spend lock poisoned");
            spend.roll(now_ms());
            let mut budgets = self.budgets_of(&spend, owner.unwrap_or(""), None);
            if owner.is_none() {
                let owners: Vec<String> = self
                    .quotas
                    .lock()
                    .expect("quota lock poisoned")
                    .keys()
                    .cloned()
                    .collect();
                for key in owners {
                    budgets.extend(
                        self.budgets_of(&spend, &key, None)
                            .into_iter()
                            .filter(|budget| budget.name != "cluster"),
                    );
                }
            }
            budgets
        };
        Ok(GetUsageResponse {
            cluster: Some(cluster),
            task_trees: rollups(trees),
            sessions: rollups(sessions),
            api_keys: rollups(keys),
            workers: rollups(workers),
            models: rollups(models),
            budgets: budgets
                .into_iter()
                .map(|budget| BudgetState {
                    spent: budget.spent >= budget.limit,
                    budget: budget.name,
                    period: budget.period.to_owned(),
                    limit_usd: budget.limit,
                    spent_usd: budget.spent,
                })
                .collect(),
        })
    }
}

impl Budget {
    fn key(&self) -> String {
        format!("{} {}", self.name, self.period)
    }
}

impl Spend {
    /// Starts new periods when the day or month changed.
    fn roll(&mut self, now: i64) {
        let (day, month) = periods(now);
        if day != self.day {
            self.day = day;
            self.by_day.clear();
            self.reported.retain(|key| !key.ends_with(" day"));
        }
        if month != self.month {
            self.month = month;
            self.by_month.clear();
            self.reported.retain(|key| !key.ends_with(" month"));
        }
    }

    fn add(&mut self, row: &UsageRow) {
        self.roll(now_ms());
        let (day, month) = periods(row.time_ms);
        let cost = charged(row);
        // The cluster's spending is kept under "", each key's under its id.
        let owners: &[&str] = if row.owner.is_empty() {
            &[""]
        } else {
            &["", row.owner.as_str()]
        };
        for owner in owners {
            if day == self.day {
                *self.by_day.entry((*owner).to_owned()).or_default() += cost;
            }
            if month == self.month {
                *self.by_month.entry((*owner).to_owned()).or_default() += cost;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_utc_days_and_months() {
        // 2026-12-01T00:00:00Z and the millisecond before it.
        let december = 20_788 * DAY_MS;
        assert_eq!(periods(december).1, 2026 * 12 + 12);
        assert_eq!(periods(december - 1).1, 2026 * 12 + 11);
        assert_eq!(month_start_ms(december + 5 * DAY_MS + 77), december);
        assert_eq!(month_start_ms(december - 1), december - 30 * DAY_MS);
    }
}
