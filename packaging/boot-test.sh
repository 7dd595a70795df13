#!/usr/bin/env bash
# Boot test: the .deb installed in a minimal Debian bookworm that systemd-nspawn boots with systemd as
# PID 1, driven as an operator would (dpkg, /etc/default/shiftd, a drop-in, systemctl, journalctl),
# against moto and the fake IMDS on this machine's loopback (the container shares the host's network).
#
# Usage: packaging/boot-test.sh DEB   (as root; packaging/test.sh runs it with CI=true or
# SHIFTD_TEST_INSTALL=1). Installs debootstrap and systemd-container when missing.
#
# The root file system (debootstrap --variant=minbase, about a minute) is cached in
# target/boot-test/rootfs (SHIFTD_BOOT_CACHE=DIR elsewhere), reused while complete and younger than
# 30 days, and never changed: each run boots a copy of it, removed afterwards (kept after a failure,
# with the console log and the container's journal; SHIFTD_BOOT_KEEP=1 keeps it always). The mirror is
# the one this machine's apt uses (SHIFTD_BOOT_MIRROR=URL another).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
deb=$(realpath "${1:?usage: packaging/boot-test.sh DEB}")
suite=bookworm
# systemd as PID 1, plus the package's own dependencies (as `apt install ./shiftd.deb` would pull them
# in; the test installs with dpkg -i): ca-certificates.
include=systemd,systemd-sysv,dbus,ca-certificates
cache=${SHIFTD_BOOT_CACHE:-$top/target/boot-test}
t0=$SECONDS
failures=0
pass() { echo "ok    boot: $*"; }
fail() { echo "FAIL  boot: $*"; failures=$((failures + 1)); }
expect() { # description command...
  local what=$1; shift
  if "$@" >/dev/null 2>&1; then pass "$what"; else fail "$what"; fi
}
# Polls a command every half second until it succeeds; fails after TIMEOUT seconds.
poll() { # timeout command...
  local end=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$end" ] || return 1
    sleep 0.5
  done
}

if ! command -v debootstrap >/dev/null || ! command -v systemd-nspawn >/dev/null; then
  echo "installing debootstrap and systemd-container ..." >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap systemd-container >/dev/null
fi

# --- The cached root file system.
# The Debian mirror this machine's apt uses for $suite (one-line or deb822 sources); empty: debootstrap's own.
debian_mirror() {
  {
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
      awk -v s="$suite" '$1 == "deb" { i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ } if ($(i + 1) == s) print $i }'
    for f in /etc/apt/sources.list.d/*.sources; do
      [ -f "$f" ] || continue
      awk -v RS= -v s="$suite" '
        $0 ~ ("(^|\n)Suites:[^\n]*[ \t]" s "([ \t\n]|$)") && $0 ~ /(^|\n)Types:[^\n]*[ \t]deb([ \t\n]|$)/ {
          if (match($0, /(^|\n)URIs:[ \t]*[^ \t\n]+/)) { u = substr($0, RSTART, RLENGTH); sub(/.*URIs:[ \t]*/, "", u); print u }
        }' "$f"
    done
  } | awk 'NR == 1'
}
mkdir -p "$cache"
rootfs=$cache/rootfs
stamp=$cache/rootfs.complete
want="$suite minbase $include"
exec 9>"$cache/lock"
flock 9 # one debootstrap at a time, and none while another run copies the cache
step=$SECONDS
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$rootfs/usr/lib/systemd/systemd" ] &&
   [ -x "$rootfs/usr/bin/dpkg" ] && [ -z "$(find "$stamp" -mtime +30)" ]; then
  pass "root file system: cached $suite minbase ($((SECONDS - step)) s)"
else
  rm -rf "$rootfs" "$rootfs.new" "$stamp"
  mirror=${SHIFTD_BOOT_MIRROR:-$(debian_mirror || true)}
  echo "debootstrap --variant=minbase --include=$include $suite (cached in $rootfs) ..." >&2
  if debootstrap --variant=minbase --include="$include" "$suite" "$rootfs.new" ${mirror:+"$mirror"} >"$cache/debootstrap.log" 2>&1; then
    mv "$rootfs.new" "$rootfs"
    echo "$want" >"$stamp"
    pass "root file system: debootstrap $suite minbase ($((SECONDS - step)) s)"
  else
    tail -n 20 "$cache/debootstrap.log" >&2
    fail "root file system: debootstrap $suite minbase ($((SECONDS - step)) s; log: $cache/debootstrap.log)"
    echo "boot test: $failures failed"
    exit 1
  fi
fi

# --- This run: a copy of the root file system, the fake AWS, the container.
work=$cache/run-$$
root=$work/root
rm -rf "$work"
mkdir -p "$work"
nspawn_pid= leader=
cleanup() {
  local rc=$?
  if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
    kill -TERM "$nspawn_pid" 2>/dev/null || true # nspawn shuts the container down in order
    poll 60 gone "$nspawn_pid" || kill -KILL "$nspawn_pid" 2>/dev/null || true
  fi
  if [ -n "$leader" ] && kill -0 "$leader" 2>/dev/null; then kill -KILL "$leader" 2>/dev/null || true; fi
  wait 2>/dev/null || true
  for p in "$work"/fake/*.pid; do [ -f "$p" ] && kill "$(cat "$p")" 2>/dev/null || true; done
  if [ "$rc" -eq 0 ] && [ "${SHIFTD_BOOT_KEEP:-}" != 1 ] && ! grep -qF " $work/" /proc/self/mountinfo; then
    rm -rf "$work"
  else
    echo "boot test: kept $work (console.log; the container's journal: journalctl -D $root/var/log/journal)" >&2
  fi
}
gone() { ! kill -0 "$1" 2>/dev/null; }
trap cleanup EXIT
trap 'exit 130' INT TERM
trap 'echo "FAIL  boot: unexpected error (line $LINENO: $BASH_COMMAND)" >&2' ERR
cp -a --reflink=auto "$rootfs" "$root"
flock -u 9
install -m 644 "$deb" "$root/root/shiftd.deb"
# The upgrade: the same package with a higher version.
dpkg-deb -R "$deb" "$work/upgrade"
sed -i 's/^Version: .*/Version: 99.0.0-1/' "$work/upgrade/DEBIAN/control"
dpkg-deb --root-owner-group -b "$work/upgrade" "$root/root/shiftd-upgrade.deb" >/dev/null

eval "$(scripts/fake-aws "$work/fake")"
venv=$(scripts/fakes-venv)
fake() { "$venv/bin/python" tests/fakes/fakeaws.py "$@" --endpoint "$AWS_ENDPOINT_URL"; }

step=$SECONDS
systemd-nspawn --register=no --keep-unit --link-journal=no --console=read-only -M shiftd-boot-test \
  -D "$root" -b </dev/null >"$work/console.log" 2>&1 &
nspawn_pid=$!
# The container's PID 1: nspawn's child that is PID 1 in its own PID namespace.
find_leader() {
  local c
  for c in $(ps -o pid= --ppid "$nspawn_pid"); do
    if awk '/^NSpid:/ { exit !(NF > 2 && $NF == 1) }' "/proc/$c/status" 2>/dev/null; then leader=$c; return 0; fi
  done
  return 1
}
# A command inside the container: its namespaces and root, a clean environment.
inside() {
  nsenter --target "$leader" --all --root --wd -- \
    /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"
}
booted() { case $(inside systemctl is-system-running) in running | degraded) return 0 ;; *) return 1 ;; esac; }
until find_leader; do
  if gone "$nspawn_pid" || [ $((SECONDS - step)) -gt 30 ]; then break; fi
  sleep 0.2
done
if [ -n "$leader" ] && poll 120 booted; then
  pass "booted with systemd as PID 1 ($(inside systemctl is-system-running), $((SECONDS - step)) s)"
else
  tail -n 30 "$work/console.log" >&2
  fail "boot (systemd-nspawn -b; console: $work/console.log)"
  echo "boot test: $failures failed"
  exit 1
fi

# Helpers on the unit, the journal and the configuration inside the container.
# A command that fails inside the container (the container itself answering: no vacuous pass).
fails_inside() { inside true && ! inside "$@"; }
show() { inside systemctl show -p "$1" --value shiftd.service; }
state() { echo "$(show ActiveState)/$(show SubState)"; }
is_state() { [ "$(state)" = "$1" ]; }
journal() { inside journalctl -u shiftd.service --no-pager "$@"; }
messages() { journal -o cat | grep -cF "$1" || true; }  # how many messages contain $1
entries() { journal -o json "$@" | grep -c . || true; } # how many entries match the field matches
more_messages() { [ "$(messages "$1")" -gt "$2" ]; }
more_entries() { local n=$1; shift; [ "$(entries "$@")" -gt "$n" ]; }
status_has() { [[ $(show StatusText) == *"$1"* ]]; }
equals() { [ "$("${@:2}")" = "$1" ]; } # expected command...
conf=$root/etc/shiftd/shiftd.toml
dropins=$root/etc/systemd/system/shiftd.service.d
config() { # rule name, stop expression; written through, so root:shiftd 0640 stays
  cat >"$conf" <<TOML
# Edited by the boot test (an operator's change: an upgrade must keep it).
[defaults]
timezone = "UTC"

[credentials]
source = "imds"

[accounts.account1]
role_arn = "arn:aws:iam::111111111111:role/account1-role-ec2"
regions = ["ap-northeast-1"]

[[rules]]
name = "$1"
account = "account1"
tags = { Schedule = "boot-test" }
stop = "$2"
TOML
}

# --- Install, enable, start.
expect "minimal system: no kill(1) (procps not installed)" fails_inside test -e /bin/kill
expect "dpkg -i installs" inside dpkg -i /root/shiftd.deb
expect "installed: unit not enabled" equals disabled inside systemctl is-enabled shiftd.service
expect "installed: /etc/default/shiftd, root 0600, all commented" \
  inside sh -c '[ "$(stat -c %U:%G:%a /etc/default/shiftd)" = root:root:600 ] && ! grep -q "^[^#]" /etc/default/shiftd'
# The endpoints go in the shipped environment file, as an operator's proxy settings would (the unit's
# EnvironmentFile=); the shipped unit and the shipped example configuration otherwise.
cat >>"$root/etc/default/shiftd" <<ENV
AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL
AWS_EC2_METADATA_SERVICE_ENDPOINT=$AWS_EC2_METADATA_SERVICE_ENDPOINT
ENV
environment=$(cat "$root/etc/default/shiftd")
mkdir -p "$dropins"
expect "systemctl enable --now shiftd" inside systemctl enable --now shiftd.service
if is_state active/running; then pass "READY: active/running"; else fail "READY: $(state)"; fi
if status_has "next: "; then pass "STATUS: $(show StatusText)"; else fail "STATUS: '$(show StatusText)'"; fi
main_pid=$(show MainPID)

# --- Reload to a rule every 10 s; one scheduled action against moto.
mapfile -t ids < <(fake seed --account 111111111111 --region ap-northeast-1 --count 3 --tag Schedule=boot-test | tr -d '[]" ' | tr , '\n')
config boot-test-stop "*/10 * * * * *"
n=$(messages "configuration reloaded")
expect "systemctl reload, valid changed configuration: succeeds" inside systemctl reload shiftd.service
if poll 30 more_messages "configuration reloaded" "$n" && poll 15 status_has "stop boot-test-stop"; then
  pass "reload applied: \"configuration reloaded\", STATUS: $(show StatusText)"
else
  fail "reload applied (STATUS: $(show StatusText))"
fi
each_ok() { # an ok stop entry of the rule for each seeded instance
  local out id
  out=$(journal -o json SHIFTD_RESULT=ok)
  for id in "${ids[@]}"; do
    grep -F "\"SHIFTD_INSTANCE_ID\":\"$id\"" <<<"$out" | grep -F '"SHIFTD_ACTION":"stop"' | grep -qF '"SHIFTD_RULE":"boot-test-stop"' || return 1
  done
}
if [ "${#ids[@]}" -eq 3 ] && poll 90 each_ok; then
  pass "scheduled stop: journalctl -u shiftd SHIFTD_RESULT=ok: one entry for each of ${ids[*]}"
else
  fail "scheduled stop of ${ids[*]:-(nothing seeded)}: journalctl -u shiftd SHIFTD_RESULT=ok"
fi
stopped() { fake states --account 111111111111 --region ap-northeast-1 | grep -o '"stopped"' | wc -l; }
expect "moto: the 3 instances are stopped" equals 3 stopped
expect "state.json kept in /var/lib/private/shiftd (DynamicUser)" test -s "$root/var/lib/private/shiftd/state.json"

# --- An invalid configuration on reload: the reload fails, the old schedule keeps running.
config boot-test-broken "0 61 * * *"
n=$(entries SHIFTD_RULE=boot-test-stop)
failed=$(messages "Reload failed")
expect "systemctl reload, invalid configuration: reports failure" fails_inside systemctl reload shiftd.service
expect "systemd logged \"Reload failed\"" more_messages "Reload failed" "$failed"
if is_state active/running && [ "$(show MainPID)" = "$main_pid" ] && status_has "stop boot-test-stop" &&
   poll 30 more_entries "$n" SHIFTD_RULE=boot-test-stop; then
  pass "after the failed reload: same process, still acting on the old schedule"
else
  fail "after the failed reload: $(state), MainPID $(show MainPID) (was $main_pid), STATUS: $(show StatusText)"
fi
config boot-test-stop "*/10 * * * * *"

# --- A short watchdog, held.
printf '[Service]\nWatchdogSec=5s\n' >"$dropins/watchdog.conf"
inside systemctl daemon-reload
inside systemctl restart shiftd.service
pid=$(show MainPID)
ping=$(show WatchdogTimestampMonotonic)
held() { # 20 s: the same process, running
  local end=$((SECONDS + 20))
  while [ "$SECONDS" -lt "$end" ]; do
    is_state active/running && [ "$(show MainPID)" = "$pid" ] || return 1
    sleep 1
  done
}
if [ "$(show WatchdogUSec)" = 5s ] && held && [ "$(show NRestarts)" = 0 ] && [ "$(show WatchdogTimestampMonotonic)" != "$ping" ]; then
  pass "WatchdogSec=5s held for 20 s (same PID, NRestarts=0, pings arriving)"
else
  fail "WatchdogSec=5s: $(state), WatchdogUSec=$(show WatchdogUSec), NRestarts=$(show NRestarts)"
fi
rm "$dropins/watchdog.conf"
inside systemctl daemon-reload

# --- A configuration error at start: failed with 78, no restart scheduled.
config boot-test-broken "0 61 * * *"
inside systemctl restart shiftd.service >/dev/null 2>&1 || true
poll 30 is_state failed/failed || true
if is_state failed/failed && [ "$(show ExecMainStatus)" = 78 ] && [ "$(show NRestarts)" = 0 ]; then
  pass "config error at start: failed, status 78, NRestarts=0 (no restart scheduled)"
else
  fail "config error at start: $(state), ExecMainStatus=$(show ExecMainStatus), NRestarts=$(show NRestarts)"
fi
config boot-test-stop "*/10 * * * * *"
edited=$(cat "$conf")
inside systemctl reset-failed shiftd.service || true
expect "starts again once the configuration is fixed" inside systemctl start shiftd.service

# --- An upgrade while running.
pid=$(show MainPID)
expect "dpkg -i upgrades to 99.0.0-1 while running" inside env DEBIAN_FRONTEND=noninteractive dpkg -i /root/shiftd-upgrade.deb
expect "upgraded: version 99.0.0-1" equals 99.0.0-1 inside dpkg-query -W -f '${Version}' shiftd
if is_state active/running && [ "$(show MainPID)" != "$pid" ]; then
  pass "upgrade: the running service was restarted (new PID)"
elif is_state active/running; then
  pass "upgrade: the running service kept running (same PID, not restarted)"
else
  fail "upgrade: the service is $(state) afterwards"
fi
expect "upgrade kept the edited configuration" equals "$edited" cat "$conf"
expect "upgrade kept root:shiftd 0640" equals root:shiftd:640 inside stat -c %U:%G:%a /etc/shiftd/shiftd.toml
expect "upgrade kept the edited /etc/default/shiftd" equals "$environment" cat "$root/etc/default/shiftd"

# --- Stop within TimeoutStopSec.
limit=$(show TimeoutStopUSec)
step=$SECONDS
inside systemctl stop shiftd.service || true
took=$((SECONDS - step))
if is_state inactive/dead && [ "$(show Result)" = success ] && [ "$(show ExecMainStatus)" = 0 ] && [ "$took" -lt "${limit%s}" ]; then
  pass "systemctl stop: clean (ExecMainStatus=0) in $took s (TimeoutStopSec=$limit)"
else
  fail "systemctl stop: $(state), Result=$(show Result), ExecMainStatus=$(show ExecMainStatus), $took s (TimeoutStopSec=$limit)"
fi

# --- Purge, while running.
inside systemctl start shiftd.service
shiftd_running() { inside sh -c 'grep -qsx shiftd /proc/[0-9]*/comm'; }
expect "running before the purge" shiftd_running
expect "apt-get purge removes it" inside env DEBIAN_FRONTEND=noninteractive apt-get purge -y -q shiftd
expect "purged: not installed" fails_inside dpkg -s shiftd
expect "purged: no shiftd process left" inside sh -c '! grep -qsx shiftd /proc/[0-9]*/comm'
absent() { inside sh -c "for f in $*; do [ ! -e \"\$f\" ] || exit 1; done"; } # paths or patterns
expect "purged: binary and unit gone" absent /usr/bin/shiftd /lib/systemd/system/shiftd.service /usr/lib/systemd/system/shiftd.service
expect "purged: /etc/shiftd, the state, the enablement gone" \
  absent /etc/shiftd /etc/default/shiftd /var/lib/private/shiftd /var/lib/shiftd '/etc/systemd/system/*.wants/shiftd.service'

echo "boot test: $failures failed ($((SECONDS - t0)) s)"
if [ "$failures" -ne 0 ]; then exit 1; fi
