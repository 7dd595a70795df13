//! The service-manager protocol, as systemd sees it: the real binary with NOTIFY_SOCKET pointing at a
//! datagram socket of the test, and WATCHDOG_USEC set.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::*;

/// Notification messages received, with when they arrived.
#[derive(Clone, Default)]
struct Inbox(Arc<Mutex<Vec<(Instant, String)>>>);

impl Inbox {
    fn listen(socket: UnixDatagram) -> Self {
        let inbox = Inbox::default();
        let sink = inbox.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                sink.0.lock().unwrap().push((Instant::now(), msg));
            }
        });
        inbox
    }

    fn lines(&self) -> Vec<(Instant, String)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(t, m)| m.lines().map(|l| (*t, l.to_string())).collect::<Vec<_>>())
            .collect()
    }

    fn wait_for(&self, line: &str, count: usize, timeout: Duration) {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.lines().iter().filter(|(_, l)| l == line).count() >= count {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "no {count} x {line:?} within {timeout:?}: {:#?}",
            self.lines()
        );
    }

    fn statuses(&self) -> Vec<String> {
        self.lines()
            .into_iter()
            .filter_map(|(_, l)| l.strip_prefix("STATUS=").map(String::from))
            .collect()
    }
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn ready_status_watchdog_reload_and_stop_are_reported_to_systemd() {
    let fake = FakeAws::start();
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let inbox = Inbox::listen(UnixDatagram::bind(&socket_path).unwrap());
    let config_path = dir.path().join("shiftd.toml");
    let rule = |name: &str| {
        config_with_rules(
            "timezone = \"Asia/Tokyo\"",
            &format!(
                "[[rules]]\nname = \"{name}\"\naccount = \"account1\"\ninstances = [\"i-0123456789abcdef0\"]\nstop = \"0 20 1 1 *\"\n"
            ),
        )
    };
    write_config(&config_path, &rule("office-hours"));
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_shiftd"))
            .args([
                "run",
                "--log",
                "stderr",
                "--config",
                config_path.to_str().unwrap(),
            ])
            .envs(fake.env())
            .env("NOTIFY_SOCKET", &socket_path)
            .env("WATCHDOG_USEC", "1000000")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id().to_string();
    let kill = |signal: &str| {
        assert!(
            Command::new("kill")
                .args([signal, &pid])
                .status()
                .unwrap()
                .success()
        );
    };

    inbox.wait_for("READY=1", 1, Duration::from_secs(20));
    // READY comes before the first AssumeRole has answered: the status says so, then names the next
    // action once the credentials are there.
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let status = inbox.statuses().last().cloned().unwrap_or_default();
        if status.starts_with("next: ") {
            assert!(
                status.starts_with(
                    "next: stop office-hours (1 instance, account1/ap-northeast-1) at "
                ) && status.ends_with(" 20:00:00 JST"),
                "{status}"
            );
            break;
        }
        // READY=1 and the first STATUS= are two messages: none yet is no failure.
        assert!(
            status.is_empty() || status.starts_with("waiting for credentials: account1"),
            "{status}"
        );
        assert!(Instant::now() < end, "{:?}", inbox.statuses());
        std::thread::sleep(Duration::from_millis(50));
    }

    // Watchdog: with WATCHDOG_USEC = 1 s, a ping at least every half period, from the loop itself.
    std::thread::sleep(Duration::from_secs(3));
    let pings: Vec<Instant> = inbox
        .lines()
        .into_iter()
        .filter(|(_, l)| l == "WATCHDOG=1")
        .map(|(t, _)| t)
        .collect();
    assert!(pings.len() >= 5, "{} pings in ~3 s", pings.len());
    let worst_gap = pings.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(
        worst_gap < Duration::from_millis(900),
        "watchdog gap {worst_gap:?}"
    );

    // Reload with an invalid file: RELOADING=1 then READY=1, and the old schedule stays in force.
    write_config(&config_path, "[defaults]\ntimezone = \"Nowhere/Special\"\n");
    kill("-HUP");
    inbox.wait_for("RELOADING=1", 1, Duration::from_secs(10));
    inbox.wait_for("READY=1", 2, Duration::from_secs(10));
    let lines = inbox.lines();
    let reloading = lines.iter().position(|(_, l)| l == "RELOADING=1").unwrap();
    assert!(
        lines[reloading..]
            .iter()
            .any(|(_, l)| l.starts_with("MONOTONIC_USEC="))
    );
    assert!(
        lines[reloading..].iter().any(|(_, l)| l == "READY=1"),
        "READY after RELOADING"
    );
    assert!(
        inbox.statuses().last().unwrap().contains("office-hours"),
        "old schedule still shown"
    );

    // A valid reload changes what STATUS= names.
    write_config(&config_path, &rule("night-shift"));
    kill("-HUP");
    inbox.wait_for("READY=1", 3, Duration::from_secs(10));
    let end = Instant::now() + Duration::from_secs(5);
    while !inbox.statuses().last().unwrap().contains("night-shift") {
        assert!(Instant::now() < end, "{:?}", inbox.statuses());
        std::thread::sleep(Duration::from_millis(50));
    }

    kill("-TERM");
    let end = Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    inbox.wait_for("STOPPING=1", 1, Duration::from_secs(1));
}

#[test]
fn without_notify_socket_shiftd_runs_the_same() {
    // No NOTIFY_SOCKET: nothing to report to, and nothing breaks (the other daemon tests run this way).
    let fake = FakeAws::start();
    let config = config_with_rules(
        "",
        "[[rules]]\nname = \"r\"\naccount = \"account1\"\ninstances = [\"i-0123456789abcdef0\"]\nstop = \"0 20 1 1 *\"\n",
    );
    let daemon = Shiftd::spawn(&fake, &config, &[]);
    daemon.wait_for_messages("running 1 rule(s)", 1, Duration::from_secs(20));
    assert!(daemon.stop().success());
}
