#!/usr/bin/env bash
# Builds the .deb and .rpm from the release profile (the one profile the tests use too) and writes
# SHA256SUMS beside them, in target/packaging/.
# Installs cargo-deb and cargo-generate-rpm (pinned) when they are missing.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
out=target/packaging
need() { # crate version
  if ! cargo "${1#cargo-}" --version 2>/dev/null | grep -q "$2"; then
    cargo install --locked --quiet "$1" --version "$2"
  fi
}
need cargo-deb 3.8.0
need cargo-generate-rpm 0.21.1
# The binary the integration tests ran (`cargo test --release` builds it with the tests' dependency
# features): packaging it costs no second build of the dependencies, and ships what was tested.
cargo test --release --locked --all-targets --no-run --quiet
mkdir -p "$out/bin"
metadata=$(cargo metadata --no-deps --format-version 1)
# The packaged binary: the release build (in cargo's target directory, which CARGO_TARGET_DIR may move),
# without debug information.
target_dir=$(sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p' <<<"$metadata")
install -m 755 "$target_dir/release/shiftd" "$out/bin/shiftd"
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$out/bin/shiftd"
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
# The man pages and shell completions, from the tested binary's own command line definition
# (`shiftd generate-docs`, not offered by --help); shiftd.toml(5) is written by hand.
rm -rf "$out/docs" "$out/man"
mkdir -p "$out/man"
"$out/bin/shiftd" generate-docs --out "$out/docs" --date "$(date -u -d "@$epoch" +%F)" >/dev/null
for page in "$out"/docs/*.8; do
  gzip -9n <"$page" >"$out/man/${page##*/}.gz"
done
gzip -9n <packaging/man/shiftd.toml.5 >"$out/man/shiftd.toml.5.gz"
gzip -9n <CHANGELOG.md >"$out/changelog.gz"
# Debian wants its own changelog beside the upstream one; it points at CHANGELOG.md.
version=$(sed -n 's/.*"name":"shiftd","version":"\([^"]*\)".*/\1/p' <<<"$metadata")
date=$(date -u -R -d "@$epoch")
cat <<CHANGELOG | gzip -9n >"$out/changelog.Debian.gz"
shiftd ($version-1) unstable; urgency=medium

  * Upstream release $version; changes in /usr/share/doc/shiftd/changelog.gz.

 -- shiftd developers <shiftd@example.invalid>  $date
CHANGELOG
rm -f "$out"/*.deb "$out"/*.rpm "$out"/SHA256SUMS
cargo deb --no-build --locked --output "$out/"
cargo generate-rpm --output "$out/"
(cd "$out" && sha256sum -- *.deb *.rpm >SHA256SUMS && cat SHA256SUMS)
