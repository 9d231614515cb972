#!/usr/bin/env bash
# Dependency audit with cargo-deny (deny.toml): advisories, licenses, bans, sources — offline.
#
# The advisory database is a dated snapshot of RustSec's, kept beside the repository in
# ../shared/advisory-db (ADVISORY_DB overrides), because these machines cannot reach GitHub.
# cargo-deny reads a database only as a git checkout under its db-path, so the snapshot is copied
# there and committed with the snapshot's own date: deny.toml's maximum-db-staleness is measured
# from that date, and a snapshot left too old fails the check instead of passing silently.
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO_DENY_VERSION=0.20.2
snapshot="${ADVISORY_DB:-../shared/advisory-db}"

if ! cargo deny --version 2>/dev/null | grep -qF "$CARGO_DENY_VERSION"; then
  cargo install cargo-deny --locked --version "$CARGO_DENY_VERSION" >&2
fi

[ -f "$snapshot/SNAPSHOT.md" ] || { echo "no advisory database snapshot at $snapshot" >&2; exit 1; }
taken=$(grep -oE '[0-9]{4}-[0-9]{2}-[0-9]{2}' "$snapshot/SNAPSHOT.md" | head -n1)
[ -n "$taken" ] || { echo "$snapshot/SNAPSHOT.md does not say when it was taken" >&2; exit 1; }

# The directory cargo-deny derives from the default database URL (https://github.com/rustsec/advisory-db).
db=target/advisory-dbs/advisory-db-3157b0e258782691
rm -rf "$db"
mkdir -p "$(dirname "$db")"
cp -R "$snapshot" "$db"
chmod -R u+w "$db"
git -C "$db" init -q
git -C "$db" add -A
GIT_AUTHOR_DATE="${taken}T00:00:00Z" GIT_COMMITTER_DATE="${taken}T00:00:00Z" \
  git -C "$db" -c user.name=advisory-db -c user.email=advisory-db@localhost -c commit.gpgsign=false \
  commit -q -m "RustSec advisory database as of $taken"
echo "advisory database: snapshot of $taken" >&2

# --frozen keeps cargo-deny from fetching anything (the advisory database included), so the crates
# cargo metadata reads, for every platform, are fetched first.
cargo fetch --locked >&2
exec cargo deny --frozen check "$@"
