//! Key material in an AssumeRole answer shiftd cannot use never reaches an output.
//!
//! Through the fault proxy, STS answers with a body holding a secret access key and a session token
//! that shiftd cannot read (a bad expiration, a truncated document) or with an error status. Every
//! output is then searched for them: `shiftd run`'s journal entries (every field) and stderr, and the
//! stdout and stderr of `shiftd doctor`, `shiftd plan` and `shiftd check` on the same configuration.
//! The failure must still say what failed: the operation and the error code.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::harness::*;

const SECRET_ACCESS_KEY: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRETKEY";
const SESSION_TOKEN: &str = "FwoGZXIvYXdzSESSIONTOKENSECRET";
const ACCESS_KEY_ID: &str = "ASIAQEXAMPLELEAKTEST";

/// What no output may contain: each secret, its first and last 20 characters (a cut or wrapped
/// rendering), and the element names that show a raw body was printed.
fn forbidden() -> Vec<&'static str> {
    let mut out = Vec::new();
    for secret in [SECRET_ACCESS_KEY, SESSION_TOKEN] {
        out.extend([secret, &secret[..20], &secret[secret.len() - 20..]]);
    }
    out.extend(["<SecretAccessKey>", "<SessionToken>"]);
    out
}

fn assert_no_secrets(what: &str, text: &str) {
    for needle in forbidden() {
        assert!(
            !text.contains(needle),
            "{what} contains {needle:?}:\n{text}"
        );
    }
}

/// STS's answer to AssumeRole, with `expiration` as given.
fn assume_role_response(expiration: &str) -> String {
    format!(
        r#"<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleResult>
    <Credentials>
      <AccessKeyId>{ACCESS_KEY_ID}</AccessKeyId>
      <SecretAccessKey>{SECRET_ACCESS_KEY}</SecretAccessKey>
      <SessionToken>{SESSION_TOKEN}</SessionToken>
      <Expiration>{expiration}</Expiration>
    </Credentials>
    <AssumedRoleUser>
      <AssumedRoleId>AROAEXAMPLE:shiftd-test</AssumedRoleId>
      <Arn>arn:aws:sts::{TARGET_ACCOUNT}:assumed-role/account1-role-ec2/shiftd-test</Arn>
    </AssumedRoleUser>
  </AssumeRoleResult>
  <ResponseMetadata>
    <RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId>
  </ResponseMetadata>
</AssumeRoleResponse>
"#
    )
}

/// The same answer cut `after` characters past the end of the session token element, before any
/// closing tag.
fn truncated_response(after: usize) -> String {
    let full = assume_role_response("2030-01-01T00:00:00Z");
    let end = full.find("</SessionToken>").unwrap() + "</SessionToken>".len() + after;
    full[..end].to_string()
}

/// shiftd's outputs while STS answers every AssumeRole with `status` and `body`: none holds a
/// secret; with `code`, every AssumeRole fails and the failure names `sts:AssumeRole` and the code.
fn assert_no_leak(status: u16, body: &str, code: Option<&str>) {
    assert!(body.contains(SECRET_ACCESS_KEY) && body.contains(SESSION_TOKEN));
    let fake = FakeAws::start_with_faults();
    fake.inject(
        "/_fault/body",
        json!({"action": "AssumeRole", "status": status, "body": body, "times": -1}),
    );
    // The rule does not fire during the test: only the credential renewal (at start) calls AWS.
    let config = config_with_rules(
        "",
        r#"
[[rules]]
name = "office"
account = "account1"
instances = ["i-0123456789abcdef0"]
start = "0 0 3 1 1 *"
"#,
    );

    // shiftd run: the renewal fails and retries with backoff (from 1 s).
    let daemon = Shiftd::spawn(&fake, &config, &[]);
    let (pid, started) = (daemon.pid(), daemon.started);
    // The harness writes the daemon's stderr next to its configuration, in a directory removed with
    // it: second links keep both (and what shiftd writes until it exits) for after the stop.
    let keep = tempfile::tempdir().unwrap();
    let stderr_path = keep.path().join("stderr.log");
    std::fs::hard_link(daemon.config.with_file_name("stderr.log"), &stderr_path).unwrap();
    let config_path = keep.path().join("shiftd.toml");
    std::fs::hard_link(&daemon.config, &config_path).unwrap();
    // A renewal failing the same way is logged once (retries at debug level): one failure.
    let failures = 1;
    let timeout = Duration::from_secs(60);
    match code {
        Some(_) => {
            daemon.wait_for_messages("AssumeRole for account account1 failed", failures, timeout)
        }
        None => daemon.wait_for_messages("for account account1", 1, timeout),
    };
    assert!(daemon.stop().success(), "SIGTERM ends shiftd with exit 0");
    assert_no_secrets(
        "shiftd run's stderr",
        &std::fs::read_to_string(&stderr_path).unwrap(),
    );
    let entries = journal_entries(pid, started);
    for e in &entries {
        for (name, value) in e {
            assert_no_secrets(&format!("journal field {name}"), value);
        }
    }
    // The canned answer is what shiftd read: moto was never asked.
    let answered: Vec<_> = fake
        .proxied_calls()
        .into_iter()
        .filter(|(action, _, _)| action == "AssumeRole")
        .map(|(_, _, fault)| fault)
        .collect();
    assert!(
        !answered.is_empty() && answered.iter().all(|f| f.as_deref() == Some("body")),
        "{answered:?}"
    );
    if let Some(code) = code {
        let failed: Vec<_> = entries
            .iter()
            .filter(|e| field(e, "MESSAGE").contains("AssumeRole for account account1 failed"))
            .collect();
        assert!(failed.len() >= failures, "{entries:#?}");
        for e in &failed {
            for name in ["MESSAGE", "SHIFTD_ERROR"] {
                let text = field(e, name);
                assert!(
                    text.contains("sts:AssumeRole") && text.contains(code),
                    "{name} should name sts:AssumeRole and {code}: {text:?}"
                );
            }
        }
    }

    doctor_plan_check(&fake, &config_path, code);
}

/// `shiftd doctor`, `plan` and `check` on `config`: no secret in their output; with `code`, doctor
/// reports the failed AssumeRole with the operation and the code.
fn doctor_plan_check(fake: &FakeAws, config: &Path, code: Option<&str>) {
    let config = config.to_str().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_shiftd"))
            .args(args)
            .envs(fake.env())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_no_secrets(&format!("stdout of {args:?}"), &stdout);
        assert_no_secrets(&format!("stderr of {args:?}"), &stderr);
        (out.status.code(), stdout)
    };

    let (status, stdout) = run(&["doctor", "--config", config]);
    if let Some(code) = code {
        assert_eq!(status, Some(1), "{stdout}");
        let fail = format!(
            "FAIL  account1: AssumeRole arn:aws:iam::{TARGET_ACCOUNT}:role/account1-role-ec2 failed: {code}"
        );
        assert!(stdout.contains(&fail), "missing {fail:?} in:\n{stdout}");
        assert!(stdout.contains("sts:AssumeRole"), "{stdout}");
    }
    // plan and check read only the configuration; their output is searched all the same.
    for command in ["plan", "check"] {
        let (status, stdout) = run(&[command, "--config", config]);
        assert_eq!(status, Some(0), "{command}: {stdout}");
    }
}

#[test]
fn an_assume_role_answer_with_a_bad_expiration_leaks_no_key_material() {
    assert_no_leak(
        200,
        &assume_role_response("not-a-date"),
        Some("UnreadableResponse"),
    );
}

#[test]
fn a_truncated_assume_role_answer_leaks_no_key_material() {
    // Cut inside the expiration, which follows the session token.
    let body = truncated_response("\n      <Expiration>2030-01-01T0".len());
    assert_no_leak(200, &body, Some("UnreadableResponse"));
}

#[test]
fn an_assume_role_answer_cut_right_after_the_session_token_leaks_no_key_material() {
    // The SDK reads this document without an expiration (as the Unix epoch): refused as unreadable,
    // not taken as credentials that expired in 1970.
    assert_no_leak(200, &truncated_response(0), Some("UnreadableResponse"));
}

#[test]
fn an_error_status_whose_body_holds_credentials_leaks_no_key_material() {
    // A gateway's 500 passing the credentials through, not in STS's error format.
    assert_no_leak(
        500,
        &assume_role_response("2030-01-01T00:00:00Z"),
        Some("UnreadableResponse"),
    );
}

#[test]
fn an_sts_error_that_echoes_credentials_leaks_only_its_code_and_message() {
    // STS's error format, with the credentials beside the code and message.
    let body = format!(
        r#"<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <Error>
    <Type>Receiver</Type>
    <Code>InternalFailure</Code>
    <Message>the request failed for an unknown reason</Message>
    <Credentials>
      <AccessKeyId>{ACCESS_KEY_ID}</AccessKeyId>
      <SecretAccessKey>{SECRET_ACCESS_KEY}</SecretAccessKey>
      <SessionToken>{SESSION_TOKEN}</SessionToken>
    </Credentials>
  </Error>
  <RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c8</RequestId>
</ErrorResponse>
"#
    );
    assert_no_leak(500, &body, Some("InternalFailure"));
}
