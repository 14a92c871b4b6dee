package cpserver_test

import (
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/otherix/otherix-agent/agent/protocol/cpserver"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver/etcdstore"
	"github.com/otherix/otherix-agent/internal/etcdtest"
	"github.com/otherix/otherix-agent/internal/leakcheck"
)

// The etcd cluster the etcd stores of every test share (each under its
// own prefix), started by the first test that needs it.
var (
	etcdOnce sync.Once
	etcd     *etcdtest.Cluster
	etcdErr  error
	etcdDir  string
)

func TestMain(m *testing.M) {
	os.Exit(leakcheck.Run(func() int {
		dir, err := os.MkdirTemp("", "cpserver-etcd-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
		etcdDir = dir
		code := m.Run()
		if etcd != nil {
			etcd.Stop()
		}
		os.RemoveAll(dir)
		return code
	}))
}

// etcdStore returns a store under prefix on the shared three-member
// cluster, closed when t ends.
func etcdStore(t *testing.T, prefix string) cpserver.Store {
	t.Helper()
	etcdOnce.Do(func() { etcd, etcdErr = etcdtest.New(etcdDir, 3) })
	if etcdErr != nil {
		t.Fatal(etcdErr)
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: etcd.Endpoints(), DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	s := etcdstore.New(cli, etcdstore.Options{Prefix: prefix})
	t.Cleanup(func() {
		s.Close()
		cli.Close()
	})
	return s
}
