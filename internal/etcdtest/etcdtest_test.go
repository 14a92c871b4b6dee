package etcdtest_test

import (
	"context"
	"os"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/otherix/otherix-agent/internal/etcdtest"
	"github.com/otherix/otherix-agent/internal/leakcheck"
)

func TestMain(m *testing.M) { os.Exit(leakcheck.Main(m)) }

// TestCluster: three members serve the v3 API to our client; one member
// down, writes go on; quorum lost, a write fails; back, the cluster serves
// what it had.
func TestCluster(t *testing.T) {
	c := etcdtest.Start(t, 3)
	cli, err := clientv3.New(clientv3.Config{Endpoints: c.Endpoints(), DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	put := func(k, v string, d time.Duration) error {
		ctx, cancel := context.WithTimeout(context.Background(), d)
		defer cancel()
		_, err := cli.Put(ctx, k, v)
		return err
	}
	if err := put("a", "1", 10*time.Second); err != nil {
		t.Fatal(err)
	}
	c.Members[0].Kill()
	// If the killed member led, the first write may time out while the
	// two left elect a leader ("request timed out, possibly due to
	// previous leader failure"): a client tries again, and so does this.
	if err := putRetrying(put, "b", "2", 20*time.Second); err != nil {
		t.Fatalf("one member down: %v", err)
	}
	c.Members[1].Kill()
	if err := put("c", "3", 3*time.Second); err == nil {
		t.Fatal("a write without quorum succeeded")
	}
	for _, m := range c.Members[:2] {
		if err := m.Restart(); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := c.WaitHealthy(ctx); err != nil {
		t.Fatal(err)
	}
	if err := put("d", "4", 20*time.Second); err != nil {
		t.Fatalf("after quorum is back: %v", err)
	}
	resp, err := cli.Get(ctx, "b")
	if err != nil || len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != "2" {
		t.Fatalf("get b: %+v %v", resp, err)
	}
}

// putRetrying calls put until it succeeds or within is spent.
func putRetrying(put func(k, v string, d time.Duration) error, k, v string, within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		err := put(k, v, time.Until(deadline))
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(200 * time.Millisecond)
	}
}
