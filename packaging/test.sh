#!/usr/bin/env bash
# Package tests: the unit's hardening and validity, the .deb and .rpm contents and scripts, lintian,
# and (as root, with CI=true or SHIFTD_TEST_INSTALL=1) the installed life cycle on this machine:
# install, check, upgrade keeping an edited config, remove, purge; then the boot test
# (packaging/boot-test.sh: the package under systemd as PID 1 in a minimal Debian container;
# SHIFTD_BOOT_TEST=0 skips it).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
out=target/packaging
failures=0
pass() { echo "ok    $*"; }
fail() { echo "FAIL  $*"; failures=$((failures + 1)); }
expect() { # description command...
  local what=$1; shift
  if "$@" >/dev/null 2>&1; then pass "$what"; else fail "$what"; fi
}

for tool in lintian rpm; do
  command -v "$tool" >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq lintian rpm >/dev/null; }
done

# --- The unit: exposure at most 1.5.
exposure=$(systemd-analyze security --offline=yes systemd/shiftd.service 2>/dev/null | sed -n 's/.*Overall exposure level for shiftd.service: \([0-9.]*\).*/\1/p')
if [ -n "$exposure" ] && awk -v e="$exposure" 'BEGIN { exit !(e <= 1.5) }'; then
  pass "systemd-analyze security: exposure $exposure <= 1.5"
else
  fail "systemd-analyze security: exposure '${exposure}' > 1.5"
fi

packaging/build.sh
deb=$(ls "$out"/*.deb)
rpm=$(ls "$out"/*.rpm)
expect "SHA256SUMS verifies" bash -c "cd $out && sha256sum -c SHA256SUMS"

# --- .deb contents.
listing=$(dpkg-deb -c "$deb")
has() { grep -qE "$1" <<<"$listing"; }
expect "deb: /usr/bin/shiftd 0755" has '^-rwxr-xr-x 0/0 .* \./usr/bin/shiftd$'
expect "deb: /etc/shiftd/shiftd.toml 0640" has '^-rw-r----- 0/0 .* \./etc/shiftd/shiftd.toml$'
expect "deb: unit shiftd.service" has '\./(usr/)?lib/systemd/system/shiftd.service$'
expect "deb: sysusers shiftd.conf" has '\./(usr/)?lib/sysusers.d/shiftd.conf$'
expect "deb: pristine example in docs" has '\./usr/share/doc/shiftd/examples/shiftd.toml$'
expect "deb: man page shiftd(8)" has '\./usr/share/man/man8/shiftd.8.gz$'
expect "deb: man page shiftd.toml(5)" has '\./usr/share/man/man5/shiftd.toml.5.gz$'
# Every page `shiftd generate-docs` made (shiftd(8) and one per command) is shipped.
for page in "$out"/docs/*.8; do
  expect "deb: man page ${page##*/}" has "\./usr/share/man/man8/${page##*/}.gz$"
done
expect "deb: bash completion" has '^-rw-r--r-- 0/0 .* \./usr/share/bash-completion/completions/shiftd$'
expect "deb: zsh completion" has '^-rw-r--r-- 0/0 .* \./usr/share/zsh/vendor-completions/_shiftd$'
expect "deb: fish completion" has '^-rw-r--r-- 0/0 .* \./usr/share/fish/vendor_completions.d/shiftd.fish$'
expect "deb: /etc/default/shiftd 0600" has '^-rw------- 0/0 .* \./etc/default/shiftd$'
expect "deb: conffile /etc/shiftd/shiftd.toml" bash -c "dpkg-deb --ctrl-tarfile '$deb' | tar -xOf - ./conffiles | grep -qx /etc/shiftd/shiftd.toml"
expect "deb: conffile /etc/default/shiftd" bash -c "dpkg-deb --ctrl-tarfile '$deb' | tar -xOf - ./conffiles | grep -qx /etc/default/shiftd"
expect "deb: the unit reads /etc/default/shiftd (optional)" bash -c "dpkg-deb --fsys-tarfile '$deb' | tar -xOf - --wildcards '*/systemd/system/shiftd.service' | grep -qx 'EnvironmentFile=-/etc/default/shiftd'"
expect "deb: postinst never starts the service" bash -c "! dpkg-deb --ctrl-tarfile '$deb' | tar -xOf - ./postinst | grep -Eq 'invoke (start|[$]_dh_action)'"
expect "deb: prerm stops the service on removal" bash -c "dpkg-deb --ctrl-tarfile '$deb' | tar -xOf - ./prerm | grep -q 'deb-systemd-invoke stop shiftd.service'"
if lintian --fail-on error,warning --suppress-tags-from-file /dev/null "$deb"; then
  pass "lintian clean (overrides: packaging/debian/lintian-overrides)"
else
  fail "lintian"
fi

# --- The generated man pages render without warnings; the completions load; the environment file.
for page in "$out"/docs/*.8 packaging/man/shiftd.toml.5; do
  warnings=$(LC_ALL=C.UTF-8 MANWIDTH=80 man --warnings -E UTF-8 -l "$page" 2>&1 >/dev/null)
  if [ -z "$warnings" ]; then pass "man -l ${page##*/}: no warnings"; else fail "man -l ${page##*/}: $warnings"; fi
done
expect "shiftd(8) documents plan --limit" bash -c "LC_ALL=C.UTF-8 MANWIDTH=200 man -l '$out/docs/shiftd.8' 2>/dev/null | grep -q -- '--limit'"
expect "bash completion loads and completes shiftd" bash -c "source '$out/docs/completions/shiftd.bash' && complete -p shiftd"
if command -v zsh >/dev/null; then expect "zsh completion parses" zsh -n "$out/docs/completions/_shiftd"; fi
if command -v fish >/dev/null; then expect "fish completion parses" fish --no-execute "$out/docs/completions/shiftd.fish"; fi
expect "environment file: NO_PROXY keeps IMDS direct" grep -Eq '^#?NO_PROXY=(.*,)?169\.254\.169\.254(,|$)' packaging/shiftd.env
expect "environment file: only comments and VARIABLE=value lines" bash -c "! grep -Ev '^(#.*|[A-Z_]+=.*|)$' packaging/shiftd.env"

# --- .rpm contents and scriptlets.
rpm_files=$(rpm -qlp "$rpm" 2>/dev/null)
for f in /usr/bin/shiftd /etc/shiftd/shiftd.toml /usr/lib/systemd/system/shiftd.service \
         /usr/lib/sysusers.d/shiftd.conf /usr/share/man/man5/shiftd.toml.5.gz /usr/share/doc/shiftd/examples/shiftd.toml \
         /usr/share/bash-completion/completions/shiftd /usr/share/zsh/site-functions/_shiftd \
         /usr/share/fish/vendor_completions.d/shiftd.fish /etc/sysconfig/shiftd; do
  expect "rpm: $f" grep -qx "$f" <<<"$rpm_files"
done
for page in "$out"/docs/*.8; do
  expect "rpm: /usr/share/man/man8/${page##*/}.gz" grep -qx "/usr/share/man/man8/${page##*/}.gz" <<<"$rpm_files"
done
rpm_flags=$(rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILENAMES}\n]' "$rpm" 2>/dev/null)
expect "rpm: config is %config(noreplace), 0640 root:shiftd" grep -qx 'cn -rw-r----- root:shiftd /etc/shiftd/shiftd.toml' <<<"$rpm_flags"
expect "rpm: /etc/sysconfig/shiftd is %config(noreplace), 0600 root:root" grep -qx 'cn -rw------- root:root /etc/sysconfig/shiftd' <<<"$rpm_flags"
scripts=$(rpm -qp --scripts "$rpm" 2>/dev/null)
expect "rpm: preinstall creates the shiftd user" grep -q 'systemd-sysusers\|useradd' <<<"$scripts"
expect "rpm: preuninstall stops the service on erase" grep -q 'disable --now shiftd.service' <<<"$scripts"
expect "rpm: nothing enables or starts on install" bash -c "! grep -Eq 'systemctl (--no-reload )?(enable|start) ' <<<\"\$0\"" "$scripts"

# --- Installed life cycle (changes this machine: CI only unless asked).
if [ "${CI:-}" = "true" ] || [ "${SHIFTD_TEST_INSTALL:-}" = "1" ]; then
  if dpkg -s shiftd >/dev/null 2>&1; then dpkg -P shiftd >/dev/null; fi
  expect "dpkg -i installs" dpkg -i "$deb"
  expect "installed: /usr/bin/shiftd runs" /usr/bin/shiftd --version
  expect "installed: user shiftd exists" getent passwd shiftd
  expect "installed: config root:shiftd 0640" bash -c '[ "$(stat -c %U:%G:%a /etc/shiftd/shiftd.toml)" = root:shiftd:640 ]'
  expect "installed: shiftd check accepts the installed example" /usr/bin/shiftd check --config /etc/shiftd/shiftd.toml
  unit=$(ls /lib/systemd/system/shiftd.service /usr/lib/systemd/system/shiftd.service 2>/dev/null | head -n1)
  expect "installed: systemd-analyze verify $unit" systemd-analyze verify "$unit"
  expect "installed: man shiftd.toml resolves" man -w shiftd.toml
  expect "installed: man shiftd and shiftd-plan resolve" man -w shiftd shiftd-plan
  expect "installed: /etc/default/shiftd root 0600" bash -c '[ "$(stat -c %U:%G:%a /etc/default/shiftd)" = root:root:600 ]'
  expect "installed: unit not enabled" bash -c '! ls /etc/systemd/system/*.wants/shiftd.service 2>/dev/null | grep -q .'
  # Upgrade to a newer version of the package keeps an edited config.
  sed -i 's/^timezone = "UTC"/timezone = "Asia\/Tokyo"/' /etc/shiftd/shiftd.toml
  cargo deb --no-build --locked --deb-version 99.0.0 --output "$out/upgrade.deb" >/dev/null
  expect "dpkg -i upgrades" dpkg -i --force-confold "$out/upgrade.deb"
  expect "upgrade kept the edited config" grep -qx 'timezone = "Asia/Tokyo"' /etc/shiftd/shiftd.toml
  expect "upgrade kept root:shiftd 0640" bash -c '[ "$(stat -c %U:%G:%a /etc/shiftd/shiftd.toml)" = root:shiftd:640 ]'
  rm -f "$out/upgrade.deb"
  expect "dpkg -r removes" dpkg -r shiftd
  expect "removed: binary gone" test ! -e /usr/bin/shiftd
  expect "removed: config kept" test -f /etc/shiftd/shiftd.toml
  expect "dpkg -P purges" dpkg -P shiftd
  expect "purged: /etc/shiftd gone" test ! -e /etc/shiftd
  expect "purged: /etc/default/shiftd gone" test ! -e /etc/default/shiftd
  # The same package under a real systemd: a minimal Debian booted in a container (packaging/boot-test.sh).
  if [ "${SHIFTD_BOOT_TEST:-1}" = 0 ]; then
    echo "skip  boot test (SHIFTD_BOOT_TEST=0)"
  elif packaging/boot-test.sh "$deb"; then
    pass "boot test: the package under systemd in a minimal Debian"
  else
    fail "boot test: the package under systemd in a minimal Debian (lines above)"
  fi
else
  echo "skip  installed life cycle and boot test (set CI=true or SHIFTD_TEST_INSTALL=1; they install and purge the package)"
fi

echo "packages: $((failures)) failed"
[ "$failures" -eq 0 ]
