package usage

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/otherix/otherix-agent/agent/api"
)

// netStats fills u's NICs from their host links' counters. A link that
// is gone (QEMU exiting) is left out.
func (c *Collector) netStats(nics []NIC, u *api.Usage) {
	for _, n := range nics {
		dir := filepath.Join(c.o.SysRoot, "class", "net", n.Link, "statistics")
		var v [4]int64 // rx_bytes, tx_bytes, rx_packets, tx_packets of the link
		ok := true
		for i, name := range []string{"rx_bytes", "tx_bytes", "rx_packets", "tx_packets"} {
			b, err := os.ReadFile(filepath.Join(dir, name))
			if err != nil {
				ok = false
				break
			}
			v[i], err = strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
			if err != nil {
				ok = false
				break
			}
		}
		if !ok {
			continue
		}
		nu := api.NICUsage{Index: n.Index, Link: n.Link}
		if n.Macvtap { // what the macvtap receives goes to the guest
			nu.RxBytes, nu.TxBytes, nu.RxPackets, nu.TxPackets = v[0], v[1], v[2], v[3]
		} else { // what the tap transmits goes to the guest
			nu.RxBytes, nu.TxBytes, nu.RxPackets, nu.TxPackets = v[1], v[0], v[3], v[2]
		}
		u.NICs = append(u.NICs, nu)
		u.NetRxBytes += nu.RxBytes
		u.NetTxBytes += nu.TxBytes
		u.NetRxPackets += nu.RxPackets
		u.NetTxPackets += nu.TxPackets
	}
}
