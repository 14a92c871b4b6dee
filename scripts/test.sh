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
# The packages with concurrency run under the race detector instead of
# plainly (the same tests, so the budget grows only by the detector's cost
# on Go code; QEMU's time dominates): the QMP client, the runner, the
# journal, the image cache, the protocol (client, server side, fake), the
# standalone API and the VM engine.
race=(./qmp/... ./agent/runner/... ./agent/journal/... ./imagecache/... ./agent/protocol/... ./agent/standalone/... ./agent/vm/...)
mapfile -t racepkgs < <(go list "${race[@]}")
mapfile -t want < <(go list "${pkgs[@]}")
plain=() raced=()
for p in "${want[@]}"; do
  if printf '%s\n' "${racepkgs[@]}" | grep -qxF "$p"; then raced+=("$p"); else plain+=("$p"); fi
done
if [ ${#plain[@]} -gt 0 ]; then
  go test -p 2 -timeout 35m "${plain[@]}" 2>&1 | tee -a "$out" || status=1
fi
if [ ${#raced[@]} -gt 0 ]; then
  echo "== go test -race"
  go test -race -p 2 -timeout 35m "${raced[@]}" 2>&1 | tee -a "$out" || status=1
fi

fuzz=0
if [ $# -eq 0 ] && [ $status -eq 0 ]; then
  echo "== fuzzers, briefly (scripts/fuzz.sh runs them for minutes)"
  ./scripts/fuzz.sh --brief || fuzz=1
fi
passed=$(grep -c '^ok ' "$out" || true)
failed=$(grep -c '^FAIL	' "$out" || true)
echo "packages: $passed passed, $failed failed"
[ $status -eq 0 ] && [ $fuzz -eq 0 ]
