//! Shared helpers: the fake AWS (moto server + shiftd's fake IMDS), a real systemd-journald, and the
//! real shiftd binary started against them.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

pub const BASE_ACCOUNT: &str = "123456789012";
pub const TARGET_ACCOUNT: &str = "111111111111";
pub const REGION: &str = "ap-northeast-1";
/// The instance ID the fake IMDS reports for the delegate.
pub const DELEGATE_INSTANCE_ID: &str = "i-0de1e6a7e0000cafe";

pub fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Python venv holding moto, created once by `scripts/fakes-venv`.
pub fn venv() -> &'static Path {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let out = Command::new(project_root().join("scripts/fakes-venv"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/fakes-venv");
        assert!(out.status.success(), "scripts/fakes-venv failed");
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `ok` every 100 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// One HTTP request to a fake's control API (through the venv's Python: no HTTP client crate just for
/// the tests); the response body.
fn http(method: &str, url: &str, body: &str) -> Vec<u8> {
    let out = Command::new(venv().join("bin/python"))
        .args([
            "-c",
            "import sys, urllib.request; data = sys.argv[3].encode() if sys.argv[1] != 'GET' else None; \
             sys.stdout.buffer.write(urllib.request.urlopen(urllib.request.Request(sys.argv[2], data=data, method=sys.argv[1])).read())",
            method,
            url,
            body,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{method} {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Kills the child when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// moto server and the fake IMDS, on loopback ports of their own, optionally with the fault-injecting
/// proxy (tests/fakes/fault_proxy.py) between shiftd and moto. Stopped when dropped.
pub struct FakeAws {
    /// moto itself: the tests seed and inspect through it.
    pub endpoint: String,
    pub imds: String,
    /// The fault proxy's address, when started with one: shiftd talks to it instead of moto.
    faults: Option<String>,
    _proxy: Option<Guard>,
    _moto: Guard,
    _imds: Guard,
    _dir: tempfile::TempDir,
}

impl FakeAws {
    pub fn start() -> Self {
        Self::start_with_imds_args(&[])
    }

    pub fn start_with_imds_args(imds_args: &[&str]) -> Self {
        let venv = venv();
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        // The request recorder writes to a file, by default in the working directory: each server
        // gets its own, or parallel tests would reset each other's recordings.
        let moto = Command::new(venv.join("bin/moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .current_dir(dir.path())
            .env("MOTO_RECORDER_FILEPATH", dir.path().join("moto_recording"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let port_file = dir.path().join("imds.port");
        let imds = Command::new(venv.join("bin/python"))
            .arg(project_root().join("tests/fakes/fake_imds.py"))
            .arg("--port-file")
            .arg(&port_file)
            .args(imds_args)
            .stdout(Stdio::null())
            .spawn()
            .expect("start fake IMDS");
        let (moto, imds) = (Guard(moto), Guard(imds));
        let endpoint = format!("http://127.0.0.1:{port}");
        wait_until("moto server", Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        wait_until("fake IMDS", Duration::from_secs(30), || port_file.exists());
        let imds_port = std::fs::read_to_string(&port_file).unwrap();
        let fake = FakeAws {
            endpoint,
            imds: format!("http://127.0.0.1:{}", imds_port.trim()),
            faults: None,
            _proxy: None,
            _moto: moto,
            _imds: imds,
            _dir: dir,
        };
        fake.reset_calls();
        fake
    }

    /// As `start`, with the fault-injecting proxy in front of moto: shiftd's calls go through it.
    pub fn start_with_faults() -> Self {
        let mut fake = Self::start();
        let port_file = fake._dir.path().join("proxy.port");
        let proxy = Command::new(venv().join("bin/python"))
            .arg(project_root().join("tests/fakes/fault_proxy.py"))
            .args(["--upstream", &fake.endpoint, "--port-file"])
            .arg(&port_file)
            .stdout(Stdio::null())
            .spawn()
            .expect("start the fault proxy");
        let proxy = Guard(proxy);
        wait_until("fault proxy", Duration::from_secs(30), || {
            port_file.exists()
        });
        let port = std::fs::read_to_string(&port_file).unwrap();
        fake.faults = Some(format!("http://127.0.0.1:{}", port.trim()));
        fake._proxy = Some(proxy);
        fake
    }

    /// Posts a fault to the proxy, e.g. `("/_fault/error", json!({...}))` (see fault_proxy.py).
    pub fn inject(&self, path: &str, spec: Value) {
        let proxy = self.faults.as_ref().expect("started with faults");
        http("POST", &format!("{proxy}{path}"), &spec.to_string());
    }

    /// The calls the fault proxy received: (action, instance IDs, injected fault).
    pub fn proxied_calls(&self) -> Vec<(String, Vec<String>, Option<String>)> {
        let proxy = self.faults.as_ref().expect("started with faults");
        let seen: Vec<Value> =
            serde_json::from_slice(&http("GET", &format!("{proxy}/_fault/seen"), "")).unwrap();
        seen.into_iter()
            .map(|c| {
                (
                    c["action"].as_str().unwrap().to_string(),
                    serde_json::from_value(c["instance_ids"].clone()).unwrap(),
                    c["fault"].as_str().map(String::from),
                )
            })
            .collect()
    }

    /// Forgets the API calls recorded so far (e.g. those that seeded instances).
    pub fn reset_calls(&self) {
        self.helper(&["record"]);
    }

    /// Runs tests/fakes/fakeaws.py with `args` and returns its JSON output.
    pub fn helper(&self, args: &[&str]) -> Value {
        let out = Command::new(venv().join("bin/python"))
            .arg(project_root().join("tests/fakes/fakeaws.py"))
            .args(args)
            .args(["--endpoint", &self.endpoint])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "fakeaws.py {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap()
        }
    }

    /// Creates `count` instances in `account`, optionally tagged and stopped. Returns their IDs.
    pub fn seed(
        &self,
        account: &str,
        count: usize,
        tags: &[(&str, &str)],
        stopped: bool,
    ) -> Vec<String> {
        let count = count.to_string();
        let mut args = vec![
            "seed",
            "--account",
            account,
            "--region",
            REGION,
            "--count",
            &count,
        ];
        let tags: Vec<String> = tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
        for t in &tags {
            args.extend(["--tag", t]);
        }
        if stopped {
            args.extend(["--state", "stopped"]);
        }
        serde_json::from_value(self.helper(&args)).unwrap()
    }

    /// Instance ID -> state, for every instance of `account` in the test region.
    pub fn states(&self, account: &str) -> BTreeMap<String, String> {
        serde_json::from_value(self.helper(&["states", "--account", account, "--region", REGION]))
            .unwrap()
    }

    /// API calls recorded by moto since the start: (action, RoleArn, RoleSessionName, instance IDs).
    pub fn calls(&self) -> Vec<Call> {
        let v = self.helper(&["calls"]);
        v.as_array()
            .unwrap()
            .iter()
            .map(|c| Call {
                action: c["action"].as_str().unwrap().to_string(),
                role_arn: c["role_arn"].as_str().map(String::from),
                session_name: c["session_name"].as_str().map(String::from),
                instance_ids: serde_json::from_value(c["instance_ids"].clone()).unwrap(),
            })
            .collect()
    }

    /// The environment that points shiftd at these fakes (the standard AWS variables, nothing else).
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "AWS_ENDPOINT_URL".into(),
                self.faults.clone().unwrap_or_else(|| self.endpoint.clone()),
            ),
            (
                "AWS_EC2_METADATA_SERVICE_ENDPOINT".into(),
                self.imds.clone(),
            ),
            ("AWS_CONFIG_FILE".into(), "/dev/null".into()),
            ("AWS_SHARED_CREDENTIALS_FILE".into(), "/dev/null".into()),
        ]
    }
}

#[derive(Debug, Clone)]
pub struct Call {
    pub action: String,
    pub role_arn: Option<String>,
    pub session_name: Option<String>,
    pub instance_ids: Vec<String>,
}

/// Makes sure a systemd-journald is listening (starting `/lib/systemd/systemd-journald` as a plain
/// process if none is), once per test run.
///
/// "Listening" means the native socket accepts a connection: a socket file left behind by a journald
/// that has exited (a previous run, a package install) is not enough, and `journalctl` succeeds
/// without any journald since it reads the journal files directly.
pub fn ensure_journald() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let socket = Path::new(JOURNAL_SOCKET);
        if journald_listens() {
            return;
        }
        // Left running on purpose: later tests (and journalctl) use it; it is a plain process.
        let child = Command::new("/lib/systemd/systemd-journald")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "start /lib/systemd/systemd-journald (the tests need root and systemd installed)",
            );
        std::mem::forget(child);
        wait_until("systemd-journald", Duration::from_secs(10), || {
            socket.exists() && journald_listens()
        });
    });
}

const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

fn journald_listens() -> bool {
    std::os::unix::net::UnixDatagram::unbound()
        .and_then(|s| s.connect(JOURNAL_SOCKET))
        .is_ok()
}

/// One journald entry: field name -> value.
pub type Entry = BTreeMap<String, String>;

/// A field of an entry, or "" when it has none.
pub fn field<'a>(e: &'a Entry, name: &str) -> &'a str {
    e.get(name).map_or("", String::as_str)
}

/// The action entries (with SHIFTD_RESULT) for one instance.
pub fn entries_for<'a>(entries: &'a [Entry], instance: &str) -> Vec<&'a Entry> {
    entries
        .iter()
        .filter(|e| field(e, "SHIFTD_INSTANCE_ID") == instance && e.contains_key("SHIFTD_RESULT"))
        .collect()
}

/// journald entries of one process started at `started` (or later), as field maps. The start time
/// matters: PIDs wrap (at 32768 here), and an earlier process with the same PID, whose entries the
/// journal keeps, must not be read as this one's.
pub fn journal_entries(pid: u32, started: SystemTime) -> Vec<BTreeMap<String, String>> {
    let since_us = started
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_micros();
    let out = Command::new("journalctl")
        .args(["-o", "json", "--no-pager", "--all", &format!("_PID={pid}")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<BTreeMap<String, Value>>(l).ok())
        .filter(|m| {
            m.get("__REALTIME_TIMESTAMP")
                .and_then(Value::as_str)
                .and_then(|t| t.parse::<u128>().ok())
                .is_some_and(|t| t >= since_us)
        })
        .map(|m| {
            m.into_iter()
                .map(|(k, v)| (k, v.as_str().map_or_else(|| v.to_string(), String::from)))
                .collect()
        })
        .collect()
}

/// A shiftd process started from the built binary, with its config in a temporary directory.
pub struct Shiftd {
    child: Child,
    _dir: tempfile::TempDir,
    pub config: PathBuf,
    log: PathBuf,
    /// Taken just before the spawn: the journal is read from here on.
    pub started: SystemTime,
}

impl Shiftd {
    /// `shiftd run --config <dir>/shiftd.toml --log journald` with the fakes' environment.
    pub fn spawn(fake: &FakeAws, config: &str, extra_args: &[&str]) -> Self {
        Self::spawn_with_env(fake, config, extra_args, &[])
    }

    /// As `spawn`, with environment variables added after the fakes' (so they can override them).
    pub fn spawn_with_env(
        fake: &FakeAws,
        config: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        ensure_journald();
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("shiftd.toml");
        write_config(&config_path, config);
        // The state starts where the config was written: an occurrence due after that is caught up even
        // when shiftd itself starts late on a loaded machine (one-shot rules are not racy).
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(
            state.join("state.json"),
            serde_json::json!({
                "version": 2,
                "checked_until": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            })
            .to_string(),
        )
        .unwrap();
        let log = dir.path().join("stderr.log");
        let started = SystemTime::now();
        let child = Command::new(env!("CARGO_BIN_EXE_shiftd"))
            .args(["run", "--log", "journald", "--config"])
            .arg(&config_path)
            .args(extra_args)
            .envs(fake.env())
            // Its own state; a test that restarts shiftd passes the same STATE_DIRECTORY twice.
            .env("STATE_DIRECTORY", dir.path().join("state"))
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start shiftd");
        Shiftd {
            child,
            _dir: dir,
            config: config_path,
            log,
            started,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn entries(&self) -> Vec<BTreeMap<String, String>> {
        journal_entries(self.pid(), self.started)
    }

    /// Action entries (those with SHIFTD_ACTION).
    pub fn actions(&self) -> Vec<BTreeMap<String, String>> {
        self.entries()
            .into_iter()
            .filter(|e| e.contains_key("SHIFTD_ACTION") && e.contains_key("SHIFTD_RESULT"))
            .collect()
    }

    /// Waits until an entry's MESSAGE contains `needle` `count` times; returns all entries.
    pub fn wait_for_messages(
        &self,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> Vec<BTreeMap<String, String>> {
        let mut entries = Vec::new();
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            entries = self.entries();
            let n = entries
                .iter()
                .filter(|e| e.get("MESSAGE").is_some_and(|m| m.contains(needle)))
                .count();
            if n >= count {
                return entries;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let messages: Vec<&String> = entries.iter().filter_map(|e| e.get("MESSAGE")).collect();
        panic!(
            "timed out waiting for {count} x {needle:?}; journal so far: {messages:#?}\nstderr: {}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name}");
    }

    pub fn rewrite_config(&self, text: &str) {
        write_config(&self.config, text);
    }

    /// SIGTERM, then the exit status (bounded wait).
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        let end = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < end, "shiftd did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Shiftd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a configuration file with the mode shiftd accepts (0600), whatever the umask.
pub fn write_config(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .unwrap();
}

/// Runs the shiftd binary with `args` to completion.
pub fn shiftd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shiftd"))
        .args(args)
        .output()
        .unwrap()
}

/// A six-field cron expression (UTC) that fires once, `seconds` from now. Not racy: `Shiftd::spawn`
/// starts shiftd's state at the moment the config is written, so a late start still catches it up.
pub fn once_in(seconds: i64) -> String {
    use chrono::Timelike;
    let at = chrono::Utc::now() + chrono::Duration::seconds(seconds);
    format!("{} {} {} * * *", at.second(), at.minute(), at.hour())
}

/// Runs shiftd on `config` until its first batch is done, stops it (exit 0 expected) and returns its
/// journal entries.
pub fn run_until_first_batch(fake: &FakeAws, config: &str, timeout: Duration) -> Vec<Entry> {
    let daemon = Shiftd::spawn(fake, config, &[]);
    daemon.wait_for_messages("batch done for account account1", 1, timeout);
    let entries = daemon.entries();
    assert!(daemon.stop().success(), "SIGTERM ends shiftd with exit 0");
    entries
}

/// A config with one account (the target) and one rule: `action` ("start" or "stop") on the listed
/// instances at `cron`.
pub fn one_rule_config(name: &str, action: &str, ids: &[String], cron: &str) -> String {
    config_with_rules(
        "",
        &format!(
            r#"
[[rules]]
name = "{name}"
account = "account1"
instances = {ids:?}
{action} = "{cron}"
"#
        ),
    )
}

/// A config with one account (the target) and the given rules appended.
pub fn config_with_rules(defaults: &str, rules: &str) -> String {
    format!(
        r#"[defaults]
{defaults}

[accounts.account1]
role_arn = "arn:aws:iam::{TARGET_ACCOUNT}:role/account1-role-ec2"
regions = ["{REGION}"]

{rules}
"#
    )
}
