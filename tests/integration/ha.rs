//! High availability end to end: `shiftd cluster init`/`status`, `doctor`, and three real daemons on
//! one configuration against moto's DynamoDB (conditional writes) and EC2.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::harness::*;

const CLUSTER: &str = r#"
[cluster]
table = "shiftd-claims"
region = "ap-northeast-1"
lease = "60s"
"#;

fn shiftd_with(fake: &FakeAws, args: &[&str], config: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shiftd.toml");
    write_config(&path, config);
    let mut full: Vec<&str> = args.to_vec();
    full.extend(["--config", path.to_str().unwrap()]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shiftd"))
        .args(&full)
        .envs(fake.env())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn three_daemons_on_one_config_stop_each_instance_once_and_the_table_says_who() {
    let fake = FakeAws::start();
    let ids = fake.seed(TARGET_ACCOUNT, 3, &[("Schedule", "office")], false);
    let config = config_with_rules(
        "",
        &format!(
            r#"{CLUSTER}
[[rules]]
name = "evening"
account = "account1"
tags = {{ Schedule = "office" }}
stop = "{}"
"#,
            once_in(12)
        ),
    );
    // No table yet: `cluster init` creates it, and a second run finds it.
    let (code, out) = shiftd_with(&fake, &["cluster", "init"], &config);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("created shiftd-claims in ap-northeast-1"),
        "{out}"
    );
    let (code, out) = shiftd_with(&fake, &["cluster", "init"], &config);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("exists with the right key"), "{out}");

    fake.reset_calls();
    let daemons: Vec<Shiftd> = (0..3).map(|_| Shiftd::spawn(&fake, &config, &[])).collect();
    wait_until("the instances stopped", Duration::from_secs(60), || {
        fake.states(TARGET_ACCOUNT)
            .iter()
            .filter(|(id, s)| ids.contains(id) && s.as_str() == "stopped")
            .count()
            == 3
    });
    // Let the other two finish looking at the claim.
    std::thread::sleep(Duration::from_secs(3));
    let mut per_instance: BTreeMap<String, usize> = BTreeMap::new();
    for c in fake.calls().iter().filter(|c| c.action == "StopInstances") {
        for id in &c.instance_ids {
            *per_instance.entry(id.clone()).or_default() += 1;
        }
    }
    for id in &ids {
        assert_eq!(per_instance.get(id), Some(&1), "{per_instance:?}");
    }
    let results: usize = daemons
        .iter()
        .map(|d| {
            d.actions()
                .iter()
                .filter(|e| field(e, "SHIFTD_RESULT") == "ok")
                .count()
        })
        .sum();
    assert_eq!(results, 3, "one ok result per instance, on the holder");
    for d in daemons {
        assert!(d.stop().success());
    }
    let (code, out) = shiftd_with(&fake, &["cluster", "status"], &config);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("1 claim(s) since"), "{out}");
    assert!(
        out.contains("stop") && out.contains("evening") && out.contains(" done "),
        "{out}"
    );
    for id in &ids {
        assert!(
            out.contains(&format!("    {id}: ok: stopped after")),
            "{out}"
        );
    }
}

#[test]
fn cluster_commands_need_a_cluster_table_and_doctor_checks_it() {
    let fake = FakeAws::start();
    let plain = config_with_rules(
        "",
        r#"
[[rules]]
name = "evening"
account = "account1"
tags = { Schedule = "office" }
stop = "0 20 * * *"
"#,
    );
    let (code, out) = shiftd_with(&fake, &["cluster", "init"], &plain);
    assert_eq!(code, Some(78), "{out}");
    assert!(out.contains("no [cluster] table"), "{out}");
    let config = format!("{plain}{CLUSTER}");
    let (_, out) = shiftd_with(&fake, &["doctor"], &config);
    assert!(
        out.contains("FAIL  cluster table shiftd-claims in ap-northeast-1: does not exist"),
        "{out}"
    );
    let (code, _) = shiftd_with(&fake, &["cluster", "init"], &config);
    assert_eq!(code, Some(0));
    let (_, out) = shiftd_with(&fake, &["doctor"], &config);
    assert!(
        out.contains(
            "ok    cluster table shiftd-claims in ap-northeast-1: exists with the right key and takes conditional writes"
        ),
        "{out}"
    );
}
