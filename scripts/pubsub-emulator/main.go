// Command pubsub-emulator serves Google's in-memory Pub/Sub fake (pstest, the one the Go
// client's own tests use) over gRPC, for livepipe's gcppubsub:// tests. Clients reach it with
// PUBSUB_EMULATOR_HOST=127.0.0.1:8085. All state is in memory: a restart starts empty.
package main

import (
	"flag"
	"log"
	"os"
	"os/signal"
	"syscall"

	"cloud.google.com/go/pubsub/v2/pstest"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8085", "host:port to listen on")
	flag.Parse()

	srv := pstest.NewServerWithAddress(*addr)
	log.Printf("pstest Pub/Sub emulator listening on %s", srv.Addr)

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	sig := <-stop
	log.Printf("%v: stopping", sig)
	if err := srv.Close(); err != nil {
		log.Printf("close: %v", err)
	}
}
