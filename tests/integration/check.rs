//! `shiftd check`: valid configurations pass, every malformed fixture fails with exit 78 and its
//! expected message at its expected line and column.

use std::path::PathBuf;

use crate::harness::{project_root, shiftd, write_config};

/// A copy of a shipped configuration with a mode shiftd accepts (a checkout's modes follow the umask).
fn shipped_copy(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    let path = dir.path().join(name.replace('/', "-"));
    write_config(
        &path,
        &std::fs::read_to_string(project_root().join(name)).unwrap(),
    );
    path
}

#[test]
fn shipped_configurations_are_valid() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["config/shiftd.toml", "config/demo.toml"] {
        let path = shipped_copy(&dir, name);
        let out = shiftd(&["check", "--config", path.to_str().unwrap()]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(": valid"), "{stdout}");
        assert!(
            stdout.contains("next: "),
            "{name} should say when rules fire next: {stdout}"
        );
    }
}

#[test]
fn a_config_others_could_change_is_refused_with_exit_78() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = shipped_copy(&dir, "config/shiftd.toml");
    for (mode, why) in [
        (0o664, "writable by its group (mode 0664)"),
        (0o646, "writable by others (mode 0646)"),
    ] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let config = path.to_str().unwrap();
        let commands: [&[&str]; 2] = [
            &["check", "--config", config],
            &["run", "--log", "stderr", "--config", config],
        ];
        for args in commands {
            let command = args[0];
            let out = shiftd(args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(78), "{command} {mode:o}: {stderr}");
            assert!(stderr.contains(why), "{command}: {stderr}");
            assert!(stderr.contains("refusing a configuration file"), "{stderr}");
        }
    }
}

#[test]
fn check_summarises_rules_with_their_next_firing() {
    let dir = tempfile::tempdir().unwrap();
    let path = shipped_copy(&dir, "config/shiftd.toml");
    let out = shiftd(&["check", "--config", path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .contains("office-hours  account account1, ap-northeast-1  ids [i-0123456789abcdef0]"),
        "{stdout}"
    );
    assert!(stdout.contains("start 0 8 * * Mon-Fri"), "{stdout}");
    assert!(
        stdout.contains("JST"),
        "times shown in the rule's zone: {stdout}"
    );
}

#[test]
fn check_shows_the_pacing_that_is_not_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let shipped = shipped_copy(&dir, "config/shiftd.toml");
    let out = shiftd(&["check", "--config", shipped.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("pacing"),
        "the defaults are not listed: {stdout}"
    );

    let text = std::fs::read_to_string(&shipped).unwrap()
        + "\n[pacing]\nmax_in_flight = 16\n\
           [pacing.accounts.account1]\nstart_instances = { burst = 5000, refill_per_second = 10 }\n";
    let path = dir.path().join("paced.toml");
    write_config(&path, &text);
    let out = shiftd(&["check", "--config", path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(
            "pacing (not the defaults):\n  max_in_flight 16 (default 64)\n  \
             account account1 (111111111111): ec2.start_instances: burst 5000, refill 10/s\n"
        ),
        "{stdout}"
    );
}

/// The example's commented `[pacing]` tables, uncommented, are valid and are the defaults but for the
/// account they raise.
#[test]
fn the_examples_pacing_tables_are_valid_when_uncommented() {
    let dir = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(project_root().join("config/shiftd.toml")).unwrap();
    let (head, tables) = example
        .split_once("# [pacing]\n")
        .expect("a [pacing] example");
    let uncommented: String = std::iter::once("[pacing]")
        .chain(
            tables
                .lines()
                .map(|l| l.trim_start_matches('#').trim_start()),
        )
        .map(|l| format!("{l}\n"))
        .collect();
    let path = dir.path().join("paced.toml");
    write_config(&path, &format!("{head}{uncommented}"));
    let out = shiftd(&["check", "--config", path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{uncommented}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(
            "pacing (not the defaults):\n  \
             account account1 (111111111111): ec2.start_instances: burst 5000, refill 10/s\nrules"
        ),
        "{stdout}"
    );
}

#[test]
fn every_invalid_fixture_fails_with_its_message_and_location() {
    let dir = project_root().join("tests/fixtures/invalid");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let expected: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .collect();
        assert!(
            !expected.is_empty(),
            "{} has no '# expect:' line",
            path.display()
        );
        let out = shiftd(&["check", "--config", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{}: {stderr}", path.display());
        // `# expect: LINE:COLUMN: text`: some line of stderr is "<path>:LINE:COLUMN: ..." containing text.
        for want in expected {
            let (line, rest) = want.split_once(':').unwrap();
            let (column, text) = rest.split_once(": ").unwrap();
            let prefix = format!("{}:{line}:{column}: ", path.display());
            assert!(
                stderr
                    .lines()
                    .any(|l| l.starts_with(&prefix) && l.contains(text)),
                "expected {prefix}...{text}...\n got {stderr}"
            );
        }
        assert!(
            out.stdout.is_empty(),
            "nothing on stdout for an invalid file"
        );
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} fixtures found");
}

#[test]
fn a_missing_file_is_a_configuration_error() {
    let out = shiftd(&["check", "--config", "/nonexistent/shiftd.toml"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("cannot read configuration file /nonexistent/shiftd.toml")
    );
}

#[test]
fn run_refuses_an_invalid_configuration_with_exit_78() {
    let path = project_root().join("tests/fixtures/invalid/unknown-timezone.toml");
    let out = shiftd(&["run", "--log", "stderr", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not an IANA time zone"));
}

/// Files that are not a configuration at all: each refused with 78 and its path, by `check` and by
/// `run`, and none blocks (a FIFO used to block forever) or reads without end (`/dev/zero`).
#[test]
fn files_that_are_not_a_readable_utf8_config_exit_78_naming_the_path() {
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let latin1 = dir.path().join("latin1.toml");
    std::fs::write(&latin1, b"# caf\xe9\n[defaults]\n").unwrap();
    std::fs::set_permissions(&latin1, std::fs::Permissions::from_mode(0o600)).unwrap();
    let utf16 = dir.path().join("utf16.toml");
    std::fs::write(&utf16, b"\xff\xfe[\x00d\x00").unwrap();
    std::fs::set_permissions(&utf16, std::fs::Permissions::from_mode(0o600)).unwrap();
    let fifo = dir.path().join("fifo.toml");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let looped = dir.path().join("loop.toml");
    std::os::unix::fs::symlink(&looped, &looped).unwrap();
    let cases: Vec<(PathBuf, &str)> = vec![
        (latin1.clone(), "not UTF-8"),
        (utf16.clone(), "UTF-16"),
        (dir.path().to_path_buf(), "not a regular file"),
        (fifo.clone(), "not a regular file"),
        (PathBuf::from("/dev/zero"), "not a regular file"),
        (looped.clone(), "loop.toml"),
    ];
    for (path, want) in &cases {
        for command in ["check", "run"] {
            let mut child = Command::new(env!("CARGO_BIN_EXE_shiftd"))
                .args([command, "--config"])
                .arg(path)
                .args(if command == "run" {
                    &["--log", "stderr", "--state-dir"][..]
                } else {
                    &[][..]
                })
                .args(if command == "run" {
                    vec![dir.path().join("state")]
                } else {
                    vec![]
                })
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let end = Instant::now() + Duration::from_secs(20);
            while child.try_wait().unwrap().is_none() {
                assert!(Instant::now() < end, "{command} {path:?} blocked");
                std::thread::sleep(Duration::from_millis(50));
            }
            let out = child.wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(78), "{command} {path:?}: {stderr}");
            assert!(stderr.contains(*want), "{command} {path:?}: {stderr}");
            assert!(
                stderr.contains(path.file_name().unwrap().to_str().unwrap()),
                "{command} {path:?} names the file: {stderr}"
            );
        }
    }
}

/// The README's `shiftd check` example is the real output for the example file with its two typos.
#[test]
fn the_readmes_check_example_is_what_check_prints_for_the_example_with_two_typos() {
    let readme = std::fs::read_to_string(project_root().join("README.md")).unwrap();
    let shown: Vec<&str> = readme
        .lines()
        .skip_while(|l| !l.starts_with("$ shiftd check --config shiftd.toml"))
        .skip(1)
        .take_while(|l| l.starts_with("shiftd.toml:"))
        .collect();
    assert_eq!(shown.len(), 2, "the example's error lines");
    let example = std::fs::read_to_string(project_root().join("config/shiftd.toml")).unwrap();
    let with_typos = example
        .replacen("timezone = \"UTC\"", "timezone = \"Asia/Tokio\"", 1)
        .replacen("account = \"account1\"", "account = \"acount1\"", 1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shiftd.toml");
    write_config(&path, &with_typos);
    let out = shiftd(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78));
    let stderr =
        String::from_utf8_lossy(&out.stderr).replace(&format!("{}/", dir.path().display()), "");
    for line in shown {
        assert!(
            stderr.contains(line),
            "README shows {line}\ncheck prints:\n{stderr}"
        );
    }
}
