// Command fileserve serves a directory over HTTP on loopback. The demo uses
// it to offer the test guest image by URL, as an image server would.
package main

import (
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
)

func main() {
	dir := flag.String("dir", ".", "directory to serve")
	addr := flag.String("addr", "127.0.0.1:0", "listen address")
	flag.Parse()
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("http://%s\n", ln.Addr())
	os.Stdout.Sync()
	srv := &http.Server{Handler: http.FileServer(http.Dir(*dir))}
	log.Fatal(srv.Serve(ln))
}
