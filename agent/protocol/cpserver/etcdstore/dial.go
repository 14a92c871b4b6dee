package etcdstore

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// DialConfig is how to reach etcd (config cluster.etcd).
type DialConfig struct {
	Endpoints []string
	// CAFile is the PEM CA of the members' certificates (system roots
	// when empty); CertFile and KeyFile a client certificate.
	CAFile, CertFile, KeyFile string
	Log                       *zap.Logger
}

// Dial returns an etcd client. It does not wait for etcd: an agent starts
// (and its VMs keep running) while etcd is away.
func Dial(c DialConfig) (*clientv3.Client, error) {
	if len(c.Endpoints) == 0 {
		return nil, errors.New("etcd: no endpoints")
	}
	var tc *tls.Config
	if c.CAFile != "" || c.CertFile != "" {
		tc = &tls.Config{MinVersion: tls.VersionTLS12}
		if c.CAFile != "" {
			pem, err := os.ReadFile(c.CAFile)
			if err != nil {
				return nil, fmt.Errorf("etcd ca_file: %w", err)
			}
			tc.RootCAs = x509.NewCertPool()
			if !tc.RootCAs.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("etcd ca_file %s: no PEM certificate", c.CAFile)
			}
		}
		if c.CertFile != "" {
			cert, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
			if err != nil {
				return nil, fmt.Errorf("etcd client certificate: %w", err)
			}
			tc.Certificates = []tls.Certificate{cert}
		}
	}
	log := c.Log
	if log == nil {
		log = zap.NewNop()
	}
	return clientv3.New(clientv3.Config{
		Endpoints:            c.Endpoints,
		TLS:                  tc,
		DialTimeout:          5 * time.Second,
		DialKeepAliveTime:    10 * time.Second,
		DialKeepAliveTimeout: 5 * time.Second,
		Logger:               log,
	})
}
