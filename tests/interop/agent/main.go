// Command opamp-interop-agent is a real OpAMP agent built on opamp-go's client package,
// driven through stdin (one JSON command per line) and reporting what happens on stdout
// (one JSON event per line, each with "event" and "ts"). Logs go to stderr. Flags: -h.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"log"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/google/uuid"
	"github.com/open-telemetry/opamp-go/client"
	"github.com/open-telemetry/opamp-go/client/types"
	"github.com/open-telemetry/opamp-go/protobufs"
)

// kvFlag is a repeatable key=value flag that keeps the given order.
type kvFlag struct{ keys, values []string }

func (k *kvFlag) String() string { return "" }

func (k *kvFlag) Set(s string) error {
	key, value, ok := strings.Cut(s, "=")
	if !ok || key == "" {
		return fmt.Errorf("want key=value, got %q", s)
	}
	k.keys = append(k.keys, key)
	k.values = append(k.values, value)
	return nil
}

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(s string) error { *l = append(*l, s); return nil }

type options struct {
	url                string
	uid                string
	heartbeat          time.Duration
	compression        bool
	token              string
	attrs, nattrs      kvFlag
	customCaps         listFlag
	failMarker         string
	noRemoteConfig     bool
	insecureSkipVerify bool
	caFile             string
	noStdin            bool
	debug              bool
	stopTimeout        time.Duration
}

func parseFlags() *options {
	o := &options{}
	fs := flag.CommandLine
	fs.StringVar(&o.url, "url", "ws://127.0.0.1:4320/v1/opamp", "OpAMP server URL: ws:// or wss:// selects the WebSocket client, http:// or https:// the plain-HTTP client")
	fs.StringVar(&o.uid, "uid", "", "instance uid as a UUID string (default: a new UUIDv7)")
	fs.DurationVar(&o.heartbeat, "heartbeat", 30*time.Second, "heartbeat interval (WebSocket; 0 disables) / polling interval (HTTP; must be > 0)")
	fs.BoolVar(&o.compression, "compression", false, "EnableCompression (WS: permessage-deflate; HTTP: gzip request bodies)")
	fs.StringVar(&o.token, "token", "", "bearer token, sent as 'Authorization: Bearer <token>' (no header if empty)")
	fs.Var(&o.attrs, "attr", "identifying attribute key=value (repeatable; default service.name=interop-agent)")
	fs.Var(&o.nattrs, "nattr", "non-identifying attribute key=value (repeatable; defaults os.type=linux, host.name=<hostname>)")
	fs.Var(&o.customCaps, "custom-capability", "custom capability to declare (repeatable)")
	fs.StringVar(&o.failMarker, "fail-marker", "FAIL_ME", "a remote config any of whose files contains this string is reported FAILED (empty: never)")
	fs.BoolVar(&o.noRemoteConfig, "no-remote-config", false, "do not declare the AcceptsRemoteConfig capability")
	fs.BoolVar(&o.insecureSkipVerify, "insecure-skip-verify", false, "wss/https: do not verify the server certificate")
	fs.StringVar(&o.caFile, "ca", "", "wss/https: PEM file with the CA certificate(s) to trust (instead of the system pool)")
	fs.BoolVar(&o.noStdin, "no-stdin", false, "do not read commands from stdin (run until SIGTERM/SIGINT)")
	fs.BoolVar(&o.debug, "debug", false, "also log opamp-go debug messages to stderr")
	fs.DurationVar(&o.stopTimeout, "stop-timeout", 10*time.Second, "how long client.Stop may take")
	flag.Parse()
	if flag.NArg() != 0 {
		fatalUsage("unexpected arguments: %q", flag.Args())
	}
	return o
}

func fatalUsage(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "opamp-interop-agent: "+format+"\n", args...)
	os.Exit(2)
}

func main() {
	log.SetOutput(os.Stderr)
	log.SetPrefix("interop-agent ")
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	o := parseFlags()
	out := &emitter{out: os.Stdout}

	u, err := url.Parse(o.url)
	if err != nil {
		fatalUsage("bad -url: %v", err)
	}
	var transport string
	var tlsWanted bool
	switch strings.ToLower(u.Scheme) {
	case "ws":
		transport = "websocket"
	case "wss":
		transport, tlsWanted = "websocket", true
	case "http":
		transport = "http"
	case "https":
		transport, tlsWanted = "http", true
	default:
		fatalUsage("-url scheme must be ws, wss, http or https, got %q", u.Scheme)
	}
	if transport == "http" && o.heartbeat <= 0 {
		fatalUsage("-heartbeat must be > 0 for the HTTP client (it is the polling interval)")
	}
	if o.heartbeat < 0 {
		fatalUsage("-heartbeat must not be negative")
	}

	var uid uuid.UUID
	if o.uid == "" {
		uid, err = uuid.NewV7()
		if err != nil {
			log.Fatalf("cannot generate a UUIDv7: %v", err)
		}
	} else if uid, err = uuid.Parse(o.uid); err != nil {
		fatalUsage("bad -uid: %v", err)
	}

	var tlsConfig *tls.Config
	if tlsWanted {
		tlsConfig = &tls.Config{InsecureSkipVerify: o.insecureSkipVerify, MinVersion: tls.VersionTLS12}
		if o.caFile != "" {
			pem, err := os.ReadFile(o.caFile)
			if err != nil {
				fatalUsage("cannot read -ca: %v", err)
			}
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				fatalUsage("-ca %s: no PEM certificate found", o.caFile)
			}
			tlsConfig.RootCAs = pool
		}
	} else if o.caFile != "" || o.insecureSkipVerify {
		log.Printf("note: -ca / -insecure-skip-verify ignored for %s://", u.Scheme)
	}

	logger := newStderrLogger(o.debug)
	var c client.OpAMPClient
	if transport == "websocket" {
		c = client.NewWebSocket(logger)
	} else {
		c = client.NewHTTP(logger)
	}
	a := newAgent(out, transport, o.failMarker)
	a.client = c

	// State that must exist before Start: description, health (ReportsHealth requires it
	// before SetCapabilities), custom capabilities, capabilities.
	if err := c.SetAgentDescription(buildDescription(o)); err != nil {
		log.Fatalf("SetAgentDescription: %v", err)
	}
	if err := a.setHealth(true, "ok", ""); err != nil {
		log.Fatalf("SetHealth: %v", err)
	}
	if len(o.customCaps) > 0 {
		if err := c.SetCustomCapabilities(&protobufs.CustomCapabilities{Capabilities: o.customCaps}); err != nil {
			log.Fatalf("SetCustomCapabilities: %v", err)
		}
	}
	caps := protobufs.AgentCapabilities_AgentCapabilities_ReportsStatus |
		protobufs.AgentCapabilities_AgentCapabilities_ReportsEffectiveConfig |
		protobufs.AgentCapabilities_AgentCapabilities_ReportsRemoteConfig |
		protobufs.AgentCapabilities_AgentCapabilities_ReportsHealth |
		protobufs.AgentCapabilities_AgentCapabilities_ReportsHeartbeat |
		protobufs.AgentCapabilities_AgentCapabilities_AcceptsRestartCommand
	if !o.noRemoteConfig {
		caps |= protobufs.AgentCapabilities_AgentCapabilities_AcceptsRemoteConfig
	}
	if err := c.SetCapabilities(&caps); err != nil {
		log.Fatalf("SetCapabilities: %v", err)
	}

	var header http.Header
	if o.token != "" {
		header = http.Header{}
		header.Set("Authorization", "Bearer "+o.token)
	}
	heartbeat := o.heartbeat
	settings := types.StartSettings{
		OpAMPServerURL:    o.url,
		Header:            header,
		TLSConfig:         tlsConfig,
		InstanceUid:       types.InstanceUid(uid),
		Callbacks:         a.callbacks(),
		EnableCompression: o.compression,
		HeartbeatInterval: &heartbeat,
	}

	// Everything that ends the run cancels stopCtx: a signal, {"cmd":"stop"}, stdin EOF.
	sigCtx, stopSignals := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stopSignals()
	stopCtx, stopNow := context.WithCancel(sigCtx)
	defer stopNow()

	if err := c.Start(context.Background(), settings); err != nil {
		out.emit("start_failed", fields{"error": err.Error()})
		log.Printf("Start: %v", err)
		os.Exit(1)
	}
	out.emit("started", fields{
		"uid":          uid.String(),
		"transport":    transport,
		"url":          o.url,
		"capabilities": uint64(caps),
		"compression":  o.compression,
	})

	commandsDone := make(chan struct{})
	if o.noStdin {
		close(commandsDone)
	} else {
		go a.readCommands(stopCtx, os.Stdin, stopNow, commandsDone)
	}

	<-stopCtx.Done()
	// Let the command loop print its last events (it returns promptly once stopCtx is done).
	select {
	case <-commandsDone:
	case <-time.After(stopGrace + 2*time.Second):
	}
	reason := "command"
	if sigCtx.Err() != nil {
		reason = "signal"
	}
	ctx, cancel := context.WithTimeout(context.Background(), o.stopTimeout)
	defer cancel()
	f := fields{"reason": reason}
	if err := c.Stop(ctx); err != nil && !errors.Is(err, context.Canceled) {
		f["error"] = err.Error()
	}
	out.emit("stopped", f)
	os.Exit(0)
}

func buildDescription(o *options) *protobufs.AgentDescription {
	host, err := os.Hostname()
	if err != nil {
		host = "unknown"
	}
	ident := mergeKVs([]string{"service.name"}, []string{"interop-agent"}, o.attrs)
	nonIdent := mergeKVs([]string{"os.type", "host.name"}, []string{"linux", host}, o.nattrs)
	return &protobufs.AgentDescription{IdentifyingAttributes: ident, NonIdentifyingAttributes: nonIdent}
}

// mergeKVs returns the defaults overridden in place by the flags, then the new flag keys
// in the order given (a key given twice keeps its last value).
func mergeKVs(defKeys, defValues []string, given kvFlag) []*protobufs.KeyValue {
	keys := append([]string(nil), defKeys...)
	values := map[string]string{}
	for i, k := range defKeys {
		values[k] = defValues[i]
	}
	for i, k := range given.keys {
		if _, ok := values[k]; !ok {
			keys = append(keys, k)
		}
		values[k] = given.values[i]
	}
	kvs := make([]*protobufs.KeyValue, 0, len(keys))
	for _, k := range keys {
		kvs = append(kvs, stringKV(k, values[k]))
	}
	return kvs
}
