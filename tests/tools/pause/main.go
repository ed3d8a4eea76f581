// The pod sandbox ("pause") program of `tests/tools/local-cluster up --node`, whose containerd
// cannot pull registry.k8s.io/pause: it sleeps until SIGTERM or SIGINT and, as PID 1 of a pod
// that shares its PID namespace, reaps the children it inherits. Built statically and packed into
// an image FROM scratch by tests/tools/build-pause-image.sh.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 16)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range signals {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
