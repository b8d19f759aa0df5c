//! `claudecluster usage`: what the cluster's work cost, rolled up.

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use claudecluster_proto::v1::{GetUsageRequest, TokenUsage, Usage, UsageRollup};

use crate::client::{DriverArgs, connect, status_error};

#[derive(clap::Args)]
pub struct UsageArgs {
    #[command(flatten)]
    driver: DriverArgs,
    /// Only work that ended within this long before now: `30m`, `24h`, `7d` (default: all).
    #[arg(long, value_parser = parse_window)]
    since: Option<Duration>,
}

fn parse_window(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or("give a unit: s, m, h or d (`24h`)")?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` does not start with a number"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("`{unit}` is not one of s, m, h, d")),
    };
    Ok(Duration::from_secs(number.saturating_mul(seconds)))
}

pub async fn usage(args: UsageArgs) -> Result<ExitCode, String> {
    let mut client = connect(&args.driver)?;
    let start_time = args.since.map(|window| {
        SystemTime::now()
            .checked_sub(window)
            .unwrap_or(SystemTime::UNIX_EPOCH)
            .into()
    });
    let usage = client
        .get_usage(GetUsageRequest {
            start_time,
            end_time: None,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    println!("{}", header());
    print_row("cluster", "", usage.cluster.as_ref());
    for (group, rollups) in [
        ("tree", &usage.task_trees),
        ("session", &usage.sessions),
        ("key", &usage.api_keys),
        ("worker", &usage.workers),
        ("model", &usage.models),
    ] {
        for UsageRollup { key, usage } in rollups {
            let key = if key.is_empty() { "-" } else { key.as_str() };
            print_row(group, key, usage.as_ref());
        }
    }
    if !usage.budgets.is_empty() {
        println!();
        println!(
            "{:<24} {:<6} {:>12} {:>12}  STATE",
            "BUDGET", "PER", "LIMIT USD", "SPENT USD"
        );
        for budget in &usage.budgets {
            println!(
                "{:<24} {:<6} {:>12.4} {:>12.4}  {}",
                budget.budget,
                budget.period,
                budget.limit_usd,
                budget.spent_usd,
                if budget.spent { "spent" } else { "ok" }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn header() -> String {
    format!(
        "{:<8} {:<38} {:>6} {:>12} {:>12} {:>10} {:>10} {:>10} {:>10}",
        "GROUP", "KEY", "RUNS", "COST USD", "METERED USD", "INPUT", "OUTPUT", "CACHE W", "CACHE R"
    )
}

fn print_row(group: &str, key: &str, usage: Option<&Usage>) {
    let usage = usage.cloned().unwrap_or_default();
    let tokens: TokenUsage = usage.tokens.unwrap_or_default();
    println!(
        "{:<8} {:<38} {:>6} {:>12.6} {:>12.6} {:>10} {:>10} {:>10} {:>10}",
        group,
        key,
        usage.runs,
        usage.cost_usd,
        usage.metered_cost_usd,
        tokens.input_tokens,
        tokens.output_tokens,
        tokens.cache_creation_input_tokens,
        tokens.cache_read_input_tokens
    );
}

#[cfg(test)]
mod tests {
    use super::parse_window;
    use std::time::Duration;

    #[test]
    fn windows_take_a_unit() {
        assert_eq!(parse_window("90m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_window("7d"), Ok(Duration::from_secs(604_800)));
        assert!(parse_window("12").is_err());
        assert!(parse_window("3w").is_err());
    }
}
