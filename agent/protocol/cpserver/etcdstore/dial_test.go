package etcdstore_test

import (
	"context"
	"testing"
	"time"

	"github.com/otherix/otherix-agent/agent/api"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver"
	"github.com/otherix/otherix-agent/agent/protocol/cpserver/etcdstore"
	"github.com/otherix/otherix-agent/internal/etcdtest"
)

// TestDialTLS: with config cluster.etcd's CA and client certificate the
// store works on members that require a client certificate; without the
// certificate it gets nothing.
func TestDialTLS(t *testing.T) {
	c := etcdtest.StartTLS(t, 3)
	f := c.TLS
	cli, err := etcdstore.Dial(etcdstore.DialConfig{Endpoints: c.Endpoints(), CAFile: f.CA, CertFile: f.ClientCert, KeyFile: f.ClientKey})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	s := etcdstore.New(cli, etcdstore.Options{})
	defer s.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := s.PutVM(ctx, cpserver.VM{UUID: "u", Name: "a", Phase: api.PhaseRunning, Node: "n1"}); err != nil {
		t.Fatal(err)
	}
	if vms, known, err := s.VMs(ctx); err != nil || !known || len(vms) != 1 || vms[0].Node != "n1" {
		t.Fatalf("vms %+v %v %v", vms, known, err)
	}

	anon, err := etcdstore.Dial(etcdstore.DialConfig{Endpoints: c.Endpoints(), CAFile: f.CA})
	if err != nil {
		t.Fatal(err)
	}
	defer anon.Close()
	s2 := etcdstore.New(anon, etcdstore.Options{OpTimeout: 2 * time.Second})
	defer s2.Close()
	if _, _, err := s2.VMs(ctx); err == nil {
		t.Fatal("read without a client certificate")
	}
	if _, err := etcdstore.Dial(etcdstore.DialConfig{Endpoints: c.Endpoints(), CAFile: f.ClientKey}); err == nil {
		t.Error("a CA file without a certificate accepted")
	}
}
