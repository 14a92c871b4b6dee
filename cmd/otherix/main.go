// Command otherix is the CLI of seed 004 (the otherix VM guide): it creates
// VMs from an image URL and drives their lifecycle over the /v1/vms API.
//
//	otherix vm create NAME --image-url URL --arch amd64|arm64 [flags] [--wait]
//	otherix vm list [--show-ids] [-o table|json|yaml] [--limit N] [--cursor C]
//	otherix vm get NAME [-o text|json|yaml]
//	otherix vm start|stop|poweroff|reboot|delete NAME [--wait] [--wait-timeout 5m]
//	otherix vm reset|pause|resume NAME [-o text|json]
//	otherix vm console NAME [--tail N]
//	otherix vm stats NAME [-o text|json]
//	otherix vm top [--interval 2s] [-o table|json]
//	otherix vm events NAME [-o table|json]
//	otherix create -f manifest.yaml [--wait]
//	otherix vm set NAME [--vcpus N] [--memory-mb M] [--cpu-limit C] [--autostart=BOOL] [--restart-policy P] [--vnc-enabled=BOOL] [--vnc-port P|auto] [--vnc-password-file FILE|-]
//	otherix firmware list [--arch A] [-o table|json]
//	otherix image list [--pool P] [-o table|json]
//	otherix image pull URL --pool P [--sha256 H] [--no-wait] [--wait-timeout 30m]
//	otherix task list [--vm NAME] [--limit N] [-o table|json]
//	otherix task get|cancel ID [-o text|json]
//	otherix version
//
// Flags may come before or after the VM name. The server is --server URL,
// else $OTHERIX_URL, else http://127.0.0.1:7480; a bearer token comes from
// --token-file PATH, else $OTHERIX_TOKEN. $OTHERIX_POLL_INTERVAL (a Go
// duration, default 1s) sets how often --wait polls the task.
//
// Exit status: 0 on success; 1 on any error (bad usage, an API error, a
// failed or cancelled task, a declined delete); 2 when --wait timed out
// (the task goes on on the server).
package main

import "os"

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr, os.Getenv))
}
