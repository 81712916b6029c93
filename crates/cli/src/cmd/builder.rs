//! `builder du` and `builder prune`: what the daemon's build cache holds, and freeing it
//! (named as Docker names them).

use super::Client;
use crate::output::table;
use anyhow::{bail, Result};
use isula_api::v1::{BuilderPruneRequest, BuilderUsageRequest, CacheRecord};
use isula_types::human_size;
use std::io::{BufRead, Write};

#[derive(Debug, clap::Subcommand)]
pub enum Builder {
    /// Show the build cache's disk usage
    Du(DuArgs),
    /// Remove build cache
    ///
    /// Without --all only dangling records go: those no image in the store was built
    /// from. Records a running build uses always stay.
    Prune(PruneArgs),
}

#[derive(Debug, clap::Args)]
pub struct DuArgs {
    /// Show every record's full key, parent and creation time
    #[arg(short = 'v', long = "verbose")]
    pub verbose: bool,
}

#[derive(Debug, clap::Args)]
pub struct PruneArgs {
    /// Remove all build cache, also what images in the store were built from
    #[arg(short = 'a', long = "all")]
    pub all: bool,
    /// Keep this much of the most recently used cache (for example 5GB or 512MiB)
    #[arg(long = "keep-storage", value_parser = parse_keep)]
    pub keep_storage: Option<u64>,
    /// Do not ask for confirmation
    #[arg(short = 'f', long = "force")]
    pub force: bool,
    /// Only what matches: `until=DURATION` takes what was last used longer ago than that
    /// (for example until=24h or until=90m)
    #[arg(long = "filter", value_name = "FILTER", value_parser = parse_filter)]
    pub filter: Vec<PruneFilter>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PruneFilter {
    /// Seconds since the last use, at least.
    Until(u64),
}

fn parse_filter(s: &str) -> Result<PruneFilter, String> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| format!("bad filter {s:?}: expected KEY=VALUE, such as until=24h"))?;
    match key.trim() {
        "until" => {
            let d = isula_types::parse_go_duration(value.trim()).map_err(|e| {
                format!("bad filter {s:?}: until takes a duration such as 24h: {e}")
            })?;
            Ok(PruneFilter::Until(d.as_secs()))
        }
        other => Err(format!(
            "bad filter {s:?}: unknown filter {other:?} (builder prune takes until=DURATION)"
        )),
    }
}

fn parse_keep(s: &str) -> Result<u64, String> {
    isula_types::parse_size(s)
}

/// "3 minutes ago", as Docker prints times.
fn ago(then: i64, now: i64) -> String {
    let d = (now - then).max(0);
    let (n, unit) = match d {
        0..=59 => return "Less than a minute ago".into(),
        60..=3599 => (d / 60, "minute"),
        3600..=86_399 => (d / 3600, "hour"),
        86_400..=604_799 => (d / 86_400, "day"),
        604_800..=2_591_999 => (d / 604_800, "week"),
        2_592_000..=31_535_999 => (d / 2_592_000, "month"),
        _ => (d / 31_536_000, "year"),
    };
    if n == 1 {
        format!("{} {unit} ago", if unit == "hour" { "An" } else { "1" })
    } else {
        format!("{n} {unit}s ago")
    }
}

fn secs(t: &Option<prost_types::Timestamp>) -> i64 {
    t.as_ref().map(|t| t.seconds).unwrap_or(0)
}

fn short(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    hex.get(..12).unwrap_or(hex)
}

fn one_line(s: &str, max: usize) -> String {
    let flat = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        return flat;
    }
    let mut out: String = flat.chars().take(max.saturating_sub(3)).collect();
    out.push_str("...");
    out
}

pub async fn run(client: &mut Client, cmd: Builder) -> Result<()> {
    match cmd {
        Builder::Du(a) => du(client, a).await,
        Builder::Prune(a) => prune(client, a).await,
    }
}

async fn du(client: &mut Client, args: DuArgs) -> Result<()> {
    let usage = client
        .builder_usage(BuilderUsageRequest {})
        .await?
        .into_inner();
    let mut records = usage.records;
    // Most recently used first.
    records.sort_by(|a, b| {
        secs(&b.last_used)
            .cmp(&secs(&a.last_used))
            .then(b.size.cmp(&a.size))
    });
    let now = chrono::Utc::now().timestamp();
    // Each block once, as the daemon counts them (versions of one step link files); a
    // daemon that does not count says 0.
    let listed: i64 = records.iter().map(|r| r.size).sum();
    let total = if usage.total > 0 { usage.total } else { listed };
    // What pruning every unused record would free: all but what the used ones hold.
    let in_use: i64 = records.iter().filter(|r| r.in_use).map(|r| r.size).sum();
    let reclaimable = (total - in_use).max(0);
    let shared: i64 = records.iter().map(|r| r.shared).sum();
    let mut out = String::new();
    if args.verbose {
        for r in &records {
            out.push_str(&format!(
                "ID:           {}\nParent:       {}\nDescription:  {}\nSize:         {}\nShared:       {}\nCreated:      {}\nLast used:    {}\nIn use:       {}\nImage built:  {}\n\n",
                r.id,
                r.parent,
                one_line(&r.description, 400),
                human_size(r.size.max(0) as u64),
                human_size(r.shared.max(0) as u64),
                ago(secs(&r.created), now),
                ago(secs(&r.last_used), now),
                r.in_use,
                r.kept,
            ));
        }
    } else {
        let rows: Vec<Vec<String>> = records
            .iter()
            .map(|r| {
                vec![
                    short(&r.id).to_string(),
                    (!r.in_use).to_string(),
                    human_size(r.size.max(0) as u64),
                    ago(secs(&r.last_used), now),
                    one_line(&r.description, 60),
                ]
            })
            .collect();
        out.push_str(&table(
            &["ID", "RECLAIMABLE", "SIZE", "LAST ACCESSED", "DESCRIPTION"],
            &[14, 13, 10, 24, 20],
            &rows,
        ));
    }
    out.push_str(&format!(
        "Records:      {}\nShared:       {}\nReclaimable:  {}\nTotal:        {}\n",
        records.len(),
        human_size(shared.max(0) as u64),
        human_size(reclaimable as u64),
        human_size(total.max(0) as u64)
    ));
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}

async fn prune(client: &mut Client, args: PruneArgs) -> Result<()> {
    if !args.force {
        let what = if args.all {
            "all build cache"
        } else {
            "all dangling build cache"
        };
        eprint!("WARNING! This will remove {what}. Are you sure you want to continue? [y/N] ");
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
            bail!("build cache prune cancelled");
        }
    }
    let keep_storage = i64::try_from(args.keep_storage.unwrap_or(0))
        .map_err(|_| anyhow::anyhow!("--keep-storage is too large"))?;
    let resp = client
        .builder_prune(BuilderPruneRequest {
            all: args.all,
            keep_storage,
            unused_for: args
                .filter
                .iter()
                .map(|PruneFilter::Until(secs)| i64::try_from(*secs).unwrap_or(i64::MAX))
                .max()
                .unwrap_or(0),
        })
        .await?
        .into_inner();
    print!("{}", prune_report(&resp.removed, resp.reclaimed));
    Ok(())
}

fn prune_report(removed: &[CacheRecord], reclaimed: i64) -> String {
    let mut out = String::new();
    if !removed.is_empty() {
        out.push_str("Deleted build cache objects:\n");
        for r in removed {
            out.push_str(short(&r.id));
            out.push('\n');
        }
        out.push('\n');
    }
    out.push_str(&format!(
        "Total reclaimed space: {}\n",
        human_size(reclaimed.max(0) as u64)
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_docker_prints_them() {
        assert_eq!(ago(100, 130), "Less than a minute ago");
        assert_eq!(ago(0, 60), "1 minute ago");
        assert_eq!(ago(0, 3 * 3600 + 5), "3 hours ago");
        assert_eq!(ago(0, 3600), "An hour ago");
        assert_eq!(ago(0, 2 * 86_400), "2 days ago");
        assert_eq!(ago(50, 10), "Less than a minute ago");
    }

    #[test]
    fn descriptions_fit_one_line() {
        assert_eq!(one_line("RUN a \\\n  && b", 60), "RUN a \\ && b");
        assert_eq!(one_line(&"x".repeat(70), 10), "xxxxxxx...");
    }

    #[test]
    fn prune_report_lists_short_ids_and_the_total() {
        let r = CacheRecord {
            id: format!("sha256:{}", "ab".repeat(32)),
            ..Default::default()
        };
        assert_eq!(
            prune_report(&[r], 2_000_000),
            "Deleted build cache objects:\nabababababab\n\nTotal reclaimed space: 2 MB\n"
        );
        assert_eq!(prune_report(&[], 0), "Total reclaimed space: 0 B\n");
    }
}
