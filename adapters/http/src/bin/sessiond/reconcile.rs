//! `sessiond usage reconcile`: recomputes usage from the session records and reports every
//! difference against the recorded usage.

use std::process::ExitCode;

use session_lifecycle::Timestamp;
use session_lifecycle_runtime::usage::reconcile_session;

/// Sessions read at once.
const PAGE: u32 = 1000;

/// Checks every session whose life overlaps `[from, to)` in the store `database` names;
/// prints each difference (one line each) and a summary. Exit status 0 when there is none,
/// 1 when there is any, 2 when it could not check.
pub(crate) async fn run(database: &str, from: &str, to: &str) -> ExitCode {
    match check(database, from, to).await {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(message) => {
            eprintln!("sessiond usage reconcile: {message}");
            ExitCode::from(2)
        }
    }
}

async fn check(database: &str, from: &str, to: &str) -> Result<u64, String> {
    let parse = |name: &str, text: &str| {
        Timestamp::parse_rfc3339(text).map_err(|_| format!("--{name} must be an RFC 3339 time"))
    };
    let (from_at, to_at) = (parse("from", from)?, parse("to", to)?);
    if to_at < from_at {
        return Err("--to must not be before --from".to_owned());
    }
    let store = crate::open_store(database).await?;
    let (mut checked, mut differences) = (0u64, 0u64);
    let mut after = None;
    loop {
        let states = store
            .usage_states(from_at, to_at, after, PAGE)
            .await
            .map_err(|e| format!("reading sessions: {e}"))?;
        for usage in &states {
            checked += 1;
            // A corrupt state or record is a difference to report, not a reason to stop.
            let (state, records) = match (&usage.state, &usage.records) {
                (Ok(state), Ok(records)) => (state, records),
                (Err(e), _) => {
                    differences += 1;
                    println!(
                        "{} tenant={}: session usage state unreadable: {e}",
                        usage.session, usage.tenant
                    );
                    continue;
                }
                (_, Err(e)) => {
                    differences += 1;
                    println!(
                        "{} tenant={}: usage records unreadable: {e}",
                        usage.session, usage.tenant
                    );
                    continue;
                }
            };
            if let Some(d) = reconcile_session(state, records, from_at, to_at) {
                differences += 1;
                println!(
                    "{} tenant={} expected_ms={} recorded_ms={}: {}",
                    d.session, d.tenant, d.expected_ms, d.recorded_ms, d.problem
                );
            }
        }
        match states.last() {
            Some(last) if states.len() == PAGE as usize => after = Some(last.session),
            _ => break,
        }
    }
    println!("checked {checked} sessions from {from} to {to}: {differences} differences");
    Ok(differences)
}
