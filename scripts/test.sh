#!/usr/bin/env bash
# The whole test suite: real QEMU under TCG (or KVM), real qemu-img, the
# real test guest built from Debian packages, real HTTP servers on loopback.
#   ./scripts/test.sh            everything
#   ./scripts/test.sh ./qmp/...  only some packages (go test patterns)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
./scripts/deps.sh --test

echo "== gofmt, go vet, staticcheck"
bad=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [ -n "$bad" ]; then echo "gofmt would change: $bad"; exit 1; fi
go vet ./...
go run honnef.co/go/tools/cmd/staticcheck@v0.8.2 ./...

echo "== test guest"
testdata/guest/build.sh >/dev/null
# The Debian image only for the package whose test boots it (a cold build
# is minutes of debootstrap; then it is cached).
if [ $# -eq 0 ] || printf '%s\n' "$@" | grep -qE '^\./\.\.\.$|cmd/otherix-agent'; then
  echo "== Debian test image"
  testdata/debian/build.sh >/dev/null
fi

pkgs=("$@")
[ ${#pkgs[@]} -gt 0 ] || pkgs=(./...)
echo "== go test"
# Packages run two at a time (the machine's cores); VM tests inside a
# package run in parallel too. Fuzzers run their seed corpora here;
# `make fuzz` runs them for minutes.
out=$(mktemp)
trap 'rm -f "$out"' EXIT
status=0
go test -p 2 -timeout 35m "${pkgs[@]}" 2>&1 | tee "$out" || status=1

fuzz=0
if [ $# -eq 0 ] && [ $status -eq 0 ]; then
  echo "== fuzzers, briefly (scripts/fuzz.sh runs them for minutes)"
  ./scripts/fuzz.sh --brief || fuzz=1
fi
passed=$(grep -c '^ok ' "$out" || true)
failed=$(grep -c '^FAIL	' "$out" || true)
echo "packages: $passed passed, $failed failed"
[ $status -eq 0 ] && [ $fuzz -eq 0 ]
