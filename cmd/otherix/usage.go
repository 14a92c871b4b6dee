package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/cmd/otherix/internal/client"
)

// vmStats is "otherix vm stats NAME [-o text|json]": the VM's last usage
// sample, with each disk and NIC.
func (c *cli) vmStats(ctx context.Context, fs *flag.FlagSet, args []string) error {
	out, check := outputFlag(fs, "text", "json")
	name, cl, err := c.open(fs, args, "VM name", check)
	if err != nil {
		return err
	}
	var st api.VMStats
	raw, err := cl.GetJSON(ctx, "/v1/vms/"+url.PathEscape(name)+"/stats", &st)
	if err != nil {
		return err
	}
	if *out == "json" {
		return c.writeRaw(raw)
	}
	w := c.stdout
	fmt.Fprintf(w, "name: %s\nuuid: %s\nstatus: %s\n", st.Name, st.UUID, st.Status)
	u := st.Usage
	if u == nil {
		fmt.Fprintln(w, "usage: - (QEMU does not run, or it was not sampled yet)")
		return nil
	}
	lines := [][2]string{
		{"sampled_at", u.SampledAt.Format(time.RFC3339)},
		{"qemu_pid", strconv.Itoa(u.QEMUPID)},
		{"cpu_seconds", strconv.FormatFloat(u.CPUSeconds, 'f', 2, 64)},
		{"cpu_percent", strconv.FormatFloat(u.CPUPercent, 'f', 1, 64)},
		{"memory_rss", bytesText(u.MemoryRSSBytes)},
	}
	if u.GuestMemory != nil {
		lines = append(lines, [2]string{"guest_memory", bytesText(u.GuestMemory.ActualBytes)})
	}
	lines = append(lines,
		[2]string{"disk_read", fmt.Sprintf("%s in %d ops", bytesText(u.DiskReadBytes), u.DiskReadOps)},
		[2]string{"disk_write", fmt.Sprintf("%s in %d ops", bytesText(u.DiskWriteBytes), u.DiskWriteOps)},
		[2]string{"net_rx", fmt.Sprintf("%s in %d packets", bytesText(u.NetRxBytes), u.NetRxPackets)},
		[2]string{"net_tx", fmt.Sprintf("%s in %d packets", bytesText(u.NetTxBytes), u.NetTxPackets)},
	)
	for _, d := range u.Disks {
		lines = append(lines, [2]string{"disk " + d.Node, fmt.Sprintf("read %s in %d ops, write %s in %d ops",
			bytesText(d.ReadBytes), d.ReadOps, bytesText(d.WriteBytes), d.WriteOps)})
	}
	for _, n := range u.NICs {
		lines = append(lines, [2]string{fmt.Sprintf("nic %d (%s)", n.Index, n.Link), fmt.Sprintf("rx %s in %d packets, tx %s in %d packets",
			bytesText(n.RxBytes), n.RxPackets, bytesText(n.TxBytes), n.TxPackets)})
	}
	for _, l := range lines {
		fmt.Fprintf(w, "%s: %s\n", l[0], l[1])
	}
	return nil
}

// topRow is one VM of `vm top -o json`.
type topRow struct {
	Name   string            `json:"name"`
	UUID   string            `json:"uuid"`
	Status string            `json:"status"`
	Usage  *api.UsageSummary `json:"usage,omitempty"`
}

// vmTop is "otherix vm top [--interval D] [-o table|json]": the host's
// VMs sorted by CPU, refreshed in place on a terminal until interrupted,
// or one snapshot when the output is not a terminal (or with -o json).
func (c *cli) vmTop(ctx context.Context, fs *flag.FlagSet, args []string) error {
	out, check := outputFlag(fs, "table", "json")
	interval := fs.Duration("interval", 2*time.Second, "refresh `interval` on a terminal")
	_, cl, err := c.open(fs, args, "", check, func() error {
		if *interval < 100*time.Millisecond {
			return &usageError{msg: "--interval must be at least 100ms", synopsis: "otherix vm top [--interval D] [-o table|json]"}
		}
		return nil
	})
	if err != nil {
		return err
	}
	live := *out == "table" && c.stdoutIsTerminal()
	for {
		rows, err := topRows(ctx, cl)
		if err != nil {
			if live && ctx.Err() != nil {
				return nil // interrupted while fetching
			}
			return err
		}
		if *out == "json" {
			b, err := json.Marshal(rows)
			if err != nil {
				return err
			}
			return c.writeRaw(append(b, '\n'))
		}
		if live {
			// Home and clear: the table is redrawn in place.
			fmt.Fprint(c.stdout, "\x1b[H\x1b[2J")
			fmt.Fprintf(c.stdout, "otherix vm top — %s, every %s (Ctrl-C quits)\n\n", time.Now().Format("15:04:05"), *interval)
		}
		writeTop(c.stdout, rows)
		if !live {
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(*interval):
		}
	}
}

// topRows lists every VM (all pages), busiest CPU first, then by name.
func topRows(ctx context.Context, cl *client.Client) ([]topRow, error) {
	var rows []topRow
	q := client.ListQuery{Limit: 1000}
	for {
		page, _, err := cl.ListVMs(ctx, q)
		if err != nil {
			return nil, err
		}
		for _, v := range page.VMs {
			rows = append(rows, topRow{Name: v.Name, UUID: v.UUID, Status: v.Status, Usage: v.Usage})
		}
		if page.NextCursor == "" {
			break
		}
		q.Cursor = page.NextCursor
	}
	cpu := func(r topRow) float64 {
		if r.Usage == nil {
			return -1
		}
		return r.Usage.CPUPercent
	}
	sort.SliceStable(rows, func(i, j int) bool {
		if a, b := cpu(rows[i]), cpu(rows[j]); a != b {
			return a > b
		}
		return rows[i].Name < rows[j].Name
	})
	if rows == nil {
		rows = []topRow{}
	}
	return rows, nil
}

// writeTop prints the table: names and statuses left-aligned, figures
// right-aligned, two spaces between columns.
func writeTop(w io.Writer, rows []topRow) {
	table := [][]string{{"NAME", "STATUS", "CPU%", "CPU-TIME", "RSS", "DISK-READ", "DISK-WRITE", "NET-RX", "NET-TX"}}
	for _, r := range rows {
		cells := []string{r.Name, r.Status, "-", "-", "-", "-", "-", "-", "-"}
		if u := r.Usage; u != nil {
			cells[2] = strconv.FormatFloat(u.CPUPercent, 'f', 1, 64)
			cells[3] = strconv.FormatFloat(u.CPUSeconds, 'f', 2, 64) + "s"
			cells[4] = bytesText(u.MemoryRSSBytes)
			cells[5] = bytesText(u.DiskReadBytes)
			cells[6] = bytesText(u.DiskWriteBytes)
			cells[7] = bytesText(u.NetRxBytes)
			cells[8] = bytesText(u.NetTxBytes)
		}
		table = append(table, cells)
	}
	width := make([]int, len(table[0]))
	for _, row := range table {
		for i, c := range row {
			width[i] = max(width[i], utf8.RuneCountInString(c))
		}
	}
	for _, row := range table {
		var b strings.Builder
		for i, c := range row {
			pad := strings.Repeat(" ", width[i]-utf8.RuneCountInString(c))
			switch {
			case i < 2 && i == len(row)-1:
				b.WriteString(c)
			case i < 2:
				b.WriteString(c + pad + "  ")
			case i == len(row)-1:
				b.WriteString(pad + c)
			default:
				b.WriteString(pad + c + "  ")
			}
		}
		fmt.Fprintln(w, b.String())
	}
}

// bytesText prints a byte count in binary units with one decimal.
func bytesText(n int64) string {
	const unit = 1024
	if n < unit {
		return strconv.FormatInt(n, 10) + "B"
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 4; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f%ciB", float64(n)/float64(div), "KMGTP"[exp])
}

// stdoutIsTerminal reports whether the CLI writes to a terminal.
func (c *cli) stdoutIsTerminal() bool {
	if c.outTerminal != nil {
		return c.outTerminal(c.stdout)
	}
	f, ok := c.stdout.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}
