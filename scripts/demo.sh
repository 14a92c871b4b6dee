#!/usr/bin/env bash
# The agent's main job on an embedded default: standalone mode, a local
# pool, a real VM. Builds everything, then walks one VM through its life
# with the otherix CLI. Takes about a minute or two under TCG.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "installing missing Debian packages (qemu-system-x86, qemu-utils, guest build tools)"
./scripts/deps.sh

say "building otherix-agent and otherix into ./bin"
mkdir -p bin
go build -buildvcs=auto -o bin/ ./cmd/otherix-agent ./cmd/otherix ./scripts/fileserve

say "building the test guest from Debian packages (cached)"
img=$(testdata/guest/build.sh | tail -1)
echo "$img"

work=$(mktemp -d /tmp/otherix-demo.XXXXXX)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

say "serving the image on loopback"
bin/fileserve -dir "$img" >"$work/url" 2>"$work/fileserve.log" &
pids+=($!)
until [ -s "$work/url" ]; do sleep 0.1; done
url="$(cat "$work/url")/guest.qcow2"
echo "$url"

say "starting otherix-agent --standalone (log: $work/agent.log)"
cat >"$work/agent.yaml" <<YAML
data_dir: $work/data
run_dir: $work/run
listen:
  api: 127.0.0.1:0
  socket: ""
  metrics: ""
YAML
bin/otherix-agent --standalone --config "$work/agent.yaml" 2>"$work/agent.log" &
agent=$!
pids+=($agent)
until [ -s "$work/data/standalone.addr" ]; do
	kill -0 "$agent" 2>/dev/null || { cat "$work/agent.log"; exit 1; }
	sleep 0.1
done
export OTHERIX_URL="http://$(cat "$work/data/standalone.addr")"
# The API asks for the token the agent keeps in its data dir (on loopback
# too); with the default data_dir, root's otherix finds it by itself.
OTHERIX_TOKEN="$(cat "$work/data/api.token")"
export OTHERIX_TOKEN
echo "API at $OTHERIX_URL"

cat >"$work/user-data.yaml" <<'YAML'
#cloud-config
hostname: demo
#otherix-run: echo "hello from the demo guest: $(hostname)"
YAML

say "otherix vm create demo --image-url $url --arch amd64 --vcpus 1 --memory-mb 256 --user-data user-data.yaml --wait"
bin/otherix vm create demo --image-url "$url" --arch amd64 --vcpus 1 --memory-mb 256 \
	--user-data "$work/user-data.yaml" --wait
bin/otherix vm list

say "the guest's console: it booted and read its seed"
for _ in $(seq 1 300); do
	bin/otherix vm console demo | grep -q "OTHERIX-GUEST run-exit" && break
	sleep 0.2
done
bin/otherix vm console demo | grep -E "OTHERIX-GUEST|hello from" | grep -v tick

say "pause and resume"
bin/otherix vm pause demo
bin/otherix vm resume demo

say "graceful stop (ACPI power button)"
bin/otherix vm stop demo --wait
bin/otherix vm console demo | grep "powering off"
bin/otherix vm get demo

say "delete"
bin/otherix vm delete demo --force --wait
bin/otherix vm list

kill -TERM "$agent"
wait "$agent" || true
say "done: a real VM's whole life, in standalone mode"
