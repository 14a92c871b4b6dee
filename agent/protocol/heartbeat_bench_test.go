package protocol_test

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"testing"

	"github.com/otherix/otherix-agent/agent/protocol"
	"github.com/otherix/otherix-agent/agent/protocol/cptest"
)

// BenchmarkHeartbeatBody reports the size of a 100-VM heartbeat body: the
// baseline (full API views, plain JSON), the wire VMStatus as JSON, and
// as gzip, which the client sends for bodies of 1 KiB and more.
func BenchmarkHeartbeatBody(b *testing.B) {
	vms := cptest.SampleVMs(100)
	statuses := make([]protocol.VMStatus, len(vms))
	for i, vm := range vms {
		statuses[i] = protocol.StatusOf(vm)
	}
	hb := protocol.HeartbeatRequest{ProtocolVersion: protocol.Version, Node: "hv-rack12-07", Seq: 42, State: protocol.NodeReady, VMs: statuses}
	full := struct {
		protocol.HeartbeatRequest
		VMs any `json:"vms"`
	}{hb, vms}

	encode := func(b *testing.B, v any, compress bool) {
		var n int
		for b.Loop() {
			data, err := json.Marshal(v)
			if err != nil {
				b.Fatal(err)
			}
			n = len(data)
			if compress {
				var buf bytes.Buffer
				zw := gzip.NewWriter(&buf)
				zw.Write(data)
				zw.Close()
				n = buf.Len()
			}
		}
		b.ReportMetric(float64(n), "bytes/heartbeat")
	}
	b.Run("baseline=full-views-json", func(b *testing.B) { encode(b, full, false) })
	b.Run("status-json", func(b *testing.B) { encode(b, hb, false) })
	b.Run("status-gzip", func(b *testing.B) { encode(b, hb, true) })
}
