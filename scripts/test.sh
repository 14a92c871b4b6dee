#!/usr/bin/env bash
# The whole test suite: real QEMU under TCG (or KVM), real qemu-img, the
# real test guest built from Debian packages, real HTTP servers on loopback.
#   ./scripts/test.sh            everything
#   ./scripts/test.sh ./qmp/...  only some packages (go test patterns)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
./scripts/deps.sh --test

echo "== gofmt, go vet"
bad=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [ -n "$bad" ]; then echo "gofmt would change: $bad"; exit 1; fi
go vet ./...

echo "== test guest"
testdata/guest/build.sh >/dev/null

pkgs=("$@")
[ ${#pkgs[@]} -gt 0 ] || pkgs=(./...)
echo "== go test"
# Packages run two at a time (the machine's cores); VM tests inside a
# package run in parallel too. Fuzzers run their seed corpora here;
# `make fuzz` runs them for minutes.
go test -p 2 -timeout 35m "${pkgs[@]}"
