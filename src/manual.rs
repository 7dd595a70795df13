//! `shiftd apply`: one rule's action on its selection, now, by hand, with the daemon's own executor
//! (the same describe, decisions, override tags, chunked calls, verification and logging), each
//! outcome logged with `SHIFTD_REASON=manual`.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::aws::{Aws, ConnectAws};
use crate::clock::Clock;
use crate::config::{Account, Action, Config};
use crate::credentials::{self, AccountCredentials, SessionSpec};
use crate::executor::{self, AccountClients, BatchContext, ExecOptions};
use crate::outcome::{Outcome, OutcomeSink, ResultKind, Trigger};
use crate::planner::{AccountBatch, Request};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("no rule named {name:?} in {path}: expected one of [{known}]")]
    UnknownRule {
        name: String,
        path: String,
        known: String,
    },
    #[error(
        "rule {name:?} selects several accounts ({accounts}): `shiftd apply` acts in one account; \
         give the rule account = \"NAME\", or use a rule of its own"
    )]
    MultiAccount { name: String, accounts: String },
}

/// Whether `shiftd apply` succeeded: every outcome ok, skipped or (with `--dry-run`) dry-run. A
/// selection that matches nothing has no outcome, and succeeds (the command says so).
pub fn succeeded(outcomes: &[Outcome]) -> bool {
    outcomes.iter().all(|o| {
        matches!(
            o.result,
            ResultKind::Ok | ResultKind::Skipped | ResultKind::DryRun
        )
    })
}

/// Carries out `action` of rule `rule_name` now and returns every outcome (each handed to `sink`).
pub async fn apply(
    config: &Config,
    rule_name: &str,
    action: Action,
    dry_run: bool,
    connect: ConnectAws,
    clock: Arc<dyn Clock>,
    sink: Arc<dyn OutcomeSink>,
) -> Result<Vec<Outcome>, ApplyError> {
    let Some(rule) = config.rules.iter().find(|r| r.name == rule_name) else {
        return Err(ApplyError::UnknownRule {
            name: rule_name.to_string(),
            path: config.path.display().to_string(),
            known: config
                .rules
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    if rule.is_multi_account() {
        return Err(ApplyError::MultiAccount {
            name: rule.name.clone(),
            accounts: rule.accounts_text(),
        });
    }
    let account = config
        .account(&rule.account)
        .expect("a valid config's rule names one of its accounts");
    let aws = connect(&config.credentials, crate::daemon::first_region(config));
    let store = assume(config, account, aws.as_ref(), &clock).await;
    // When AssumeRole failed, the executor reports every selected instance failed with the reason (it
    // waits for no credentials: credentials_wait is 0).
    if let Some(e) = store.last_error() {
        tracing::error!(account = %account.name, "cannot assume the role: {e}");
    }
    let pacer = Arc::new(crate::pacing::Pacer::from_config(&config.pacing));
    let clients =
        Arc::new(AccountClients::connect_paced(aws.as_ref(), account, store, pacer).await);
    let (_cancel_tx, cancel) = tokio::sync::watch::channel(false);
    let ctx = BatchContext {
        clients,
        opts: ExecOptions {
            dry_run: dry_run || config.defaults.dry_run,
            trigger: Trigger::Manual,
            verify_timeout: config.defaults.verify_timeout,
            credentials_wait: std::time::Duration::ZERO,
        },
        cancel,
        stopping: None,
        clock: clock.clone(),
        sink,
        on_dispatch: Arc::new(|| {}),
        on_reported: Arc::new(|_| {}),
        already_reported: Arc::new(BTreeSet::new()),
        claims: crate::daemon::claimer(
            config,
            aws.as_ref(),
            &format!(
                "{}/apply-{:08x}",
                aws.delegate_name().await,
                rand::random::<u32>()
            ),
            &clock,
        )
        .await,
    };
    // Claimed (with `[cluster]`) per minute: two operators applying the same rule in the same minute
    // act once.
    let now = clock.now();
    let batch = AccountBatch {
        account: account.name.clone(),
        at: now
            - chrono::Duration::seconds(i64::from(chrono::Timelike::second(&now)))
            - chrono::Duration::nanoseconds(i64::from(chrono::Timelike::nanosecond(&now))),
        requests: vec![Request::new(rule, action)],
    };
    Ok(executor::run_batch(ctx, batch).await)
}

/// One AssumeRole into `account` (as the daemon would, with its session name): the credentials store,
/// filled, or holding the error.
pub async fn assume(
    config: &Config,
    account: &Account,
    aws: &dyn Aws,
    clock: &Arc<dyn Clock>,
) -> AccountCredentials {
    let session_name = credentials::session_name(&aws.delegate_name().await);
    let spec = SessionSpec::new(
        account,
        &session_name,
        config.defaults.session_duration,
        config.defaults.refresh_before_expiry,
    );
    let store = AccountCredentials::new(&account.name, clock.clone());
    let sts = aws.sts(&account.regions[0]).await;
    let _ = credentials::renew_once(sts.as_ref(), &spec, &store).await;
    store
}
