package metrics

import (
	"encoding/json"
	"errors"
	"os"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/imagecache"
)

// dashboardPath is the Grafana dashboard shipped beside the unit.
const dashboardPath = "../../dist/otherix-agent.grafana.json"

// exportedFamilies returns the name of every metric family the agent
// exports: a registry with the runtime collectors and every source and
// observer used once, gathered.
func exportedFamilies(t *testing.T) map[string]bool {
	t.Helper()
	m := New(Options{})
	m.ObserveTask(api.TaskCreate, api.TaskSuccess, time.Second)
	m.ObserveImageLookup("default", true)
	m.ObserveImageIngest("default", 1, time.Second, nil)
	m.ObserveImageEviction("default", 1)
	m.ObserveQMP("query-status", time.Millisecond, "")
	m.ObserveQMP("query-status", time.Millisecond, "GenericError")
	m.ObserveControlPlane("/v1/agent/heartbeat", time.Millisecond, nil)
	m.ObserveControlPlane("/v1/agent/heartbeat", time.Millisecond, errors.New("x"))
	m.SetGuestAgent("web-1", true)
	m.SetVMs(func() []api.VM { return []api.VM{{Name: "web-1", Status: api.StatusRunning}} })
	m.SetPools(func() []imagecache.PoolStats { return []imagecache.PoolStats{{Name: "default"}} })
	m.SetControlPlane(func() bool { return true }, func() time.Time { return time.Now() })
	m.SetVMUsage(func() []api.VMStats {
		return []api.VMStats{{Name: "web-1", UUID: "9d4f7e2a-1b3c-4d5e-8f6a-7b8c9d0e1f2a", Status: api.StatusRunning,
			Usage: &api.Usage{SampledAt: time.Now(), GuestMemory: &api.GuestMemory{ActualBytes: 1}}}}
	})
	fams, err := m.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	for _, f := range fams {
		name := f.GetName()
		out[name] = true
		if f.GetType().String() == "HISTOGRAM" {
			for _, s := range []string{"_bucket", "_sum", "_count"} {
				out[name+s] = true
			}
		}
	}
	return out
}

// seriesName matches a metric name in PromQL: a name followed by a
// selector, a range or the end of an argument (functions are followed by
// "(", label names never start with these prefixes).
var seriesName = regexp.MustCompile(`\b((?:otherix_agent|process|go)_[a-zA-Z0-9_]+)\b`)

// TestDashboard checks that every query of the dashboard (panel targets
// and template variables) names at least one series, and only series the
// agent exports, and that every family of the agent's VM usage appears in
// it.
func TestDashboard(t *testing.T) {
	b, err := os.ReadFile(dashboardPath)
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Title  string `json:"title"`
		Panels []struct {
			Title   string `json:"title"`
			Type    string `json:"type"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
		Templating struct {
			List []struct {
				Name  string          `json:"name"`
				Type  string          `json:"type"`
				Query json.RawMessage `json:"query"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("%s: %v", dashboardPath, err)
	}
	exported := exportedFamilies(t)
	used := map[string]bool{}
	check := func(where, expr string) {
		t.Helper()
		names := seriesName.FindAllString(expr, -1)
		if len(names) == 0 {
			t.Errorf("%s: query %q names no series of the agent", where, expr)
		}
		for _, n := range names {
			used[strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(n, "_bucket"), "_sum"), "_count")] = true
			if !exported[n] {
				t.Errorf("%s: query %q names %s, which the agent does not export", where, expr, n)
			}
		}
	}
	queries := 0
	for _, p := range dash.Panels {
		if p.Type == "row" {
			continue
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			check("panel "+p.Title, tg.Expr)
			queries++
		}
	}
	for _, v := range dash.Templating.List {
		if v.Type != "query" {
			continue
		}
		var q struct {
			Query string `json:"query"`
		}
		if err := json.Unmarshal(v.Query, &q); err != nil {
			t.Fatalf("variable %s: %v", v.Name, err)
		}
		check("variable "+v.Name, q.Query)
		queries++
	}
	var missing []string
	for n := range exported {
		if strings.HasPrefix(n, "otherix_agent_vm_") && !used[n] {
			missing = append(missing, n)
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Errorf("VM usage series the dashboard does not show: %v", missing)
	}
	t.Logf("%d queries over %d series", queries, len(used))
}
