//! Log output: native journald entries under systemd, readable lines on stderr otherwise.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogTarget {
    /// journald when stderr is connected to the journal (as under systemd), else stderr.
    Auto,
    /// Native journald entries with SHIFTD_* fields.
    Journald,
    /// Human-readable lines on stderr.
    Stderr,
}

/// The default filter: shiftd at info, the AWS SDK only when it warns. `SHIFTD_LOG` overrides it
/// (same syntax as `RUST_LOG`, e.g. `SHIFTD_LOG=debug`).
fn filter() -> EnvFilter {
    EnvFilter::try_from_env("SHIFTD_LOG").unwrap_or_else(|_| {
        EnvFilter::new(
            "info,aws_config=warn,aws_smithy_runtime=warn,aws_sdk_sts=warn,aws_sdk_ec2=warn",
        )
    })
}

/// Installs the global subscriber. Returns a note to log once logging is up (e.g. a fallback taken).
pub fn init(target: LogTarget) -> Option<String> {
    let want_journald = match target {
        LogTarget::Journald => true,
        LogTarget::Stderr => false,
        // systemd sets JOURNAL_STREAM when stdout/stderr go to the journal.
        LogTarget::Auto => std::env::var_os("JOURNAL_STREAM").is_some(),
    };
    if want_journald {
        match tracing_journald::layer() {
            Ok(layer) => {
                // Syslog's meaning of levels: info is 6 and debug 7, so `journalctl -p info` shows shiftd's
                // normal messages and `-p err` its failures.
                let priorities = tracing_journald::PriorityMappings {
                    info: tracing_journald::Priority::Informational,
                    debug: tracing_journald::Priority::Debug,
                    ..tracing_journald::PriorityMappings::new()
                };
                let layer = layer
                    .with_priority_mappings(priorities)
                    .with_field_prefix(Some("SHIFTD".into()))
                    .with_syslog_identifier("shiftd".into());
                tracing_subscriber::registry()
                    .with(filter())
                    .with(layer)
                    .init();
                return None;
            }
            Err(e) if target == LogTarget::Journald => {
                stderr_init();
                return Some(format!(
                    "journald is not reachable ({e}); logging to stderr"
                ));
            }
            Err(_) => {}
        }
    }
    stderr_init();
    None
}

/// Stderr lines carry the message only: every message already says what its structured fields say
/// (the fields are for journald queries).
/// shiftd's journald entries: SHIFTD_* fields, identifier `shiftd`.
fn journald_layer() -> std::io::Result<tracing_journald::Layer> {
    let priorities = tracing_journald::PriorityMappings {
        info: tracing_journald::Priority::Informational,
        debug: tracing_journald::Priority::Debug,
        ..tracing_journald::PriorityMappings::new()
    };
    Ok(tracing_journald::layer()?
        .with_priority_mappings(priorities)
        .with_field_prefix(Some("SHIFTD".into()))
        .with_syslog_identifier("shiftd".into()))
}

/// For a command an operator runs by hand that acts (`shiftd apply`): lines on stderr for the
/// operator, and the same entries in the journal (when it is reachable) for the record.
pub fn init_interactive() {
    let journal = journald_layer().ok();
    tracing_subscriber::registry()
        .with(filter())
        .with(stderr_layer())
        .with(journal)
        .init();
}

fn stderr_init() {
    tracing_subscriber::registry()
        .with(filter())
        .with(stderr_layer())
        .init();
}

fn stderr_layer<S>() -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use std::io::IsTerminal;
    let message_only = tracing_subscriber::fmt::format::debug_fn(|writer, field, value| {
        if field.name() == "message" {
            write!(writer, "{value:?}")
        } else {
            Ok(())
        }
    });
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .fmt_fields(message_only)
}
