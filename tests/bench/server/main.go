// The opamp-go baseline of the side-by-side benchmark (`make bench`, tests/bench/run): an OpAMP
// server on opamp-go's `server` package doing the same job as `opamp-operator serve
// --admin-addr`: keep every agent's last reported state, answer every message, offer one
// remote config to every agent and count who applied it.
//
//	opamp-bench-server -addr 127.0.0.1:4320 -admin-addr 127.0.0.1:4399 [-capture FILE]
//
// Like a real server it wants each agent's AvailableComponents: an agent that reports only their
// hash (opamp-go's first message) is asked for them with the ReportAvailableComponents flag.
//
// -capture FILE writes what the first agent that connected reported, merged over its messages
// (capabilities, AgentDescription, EffectiveConfig, Health, AvailableComponents with its
// components), as one binary AgentToServer protobuf once all of those arrived, and a protojson
// rendering of it to FILE.json (tests/bench/capture-collector uses it).
//
// Agents connect to ws://ADDR/v1/opamp (WebSocket) or POST to http://ADDR/v1/opamp (plain HTTP),
// exactly as opamp-go's server serves them; with -tls-cert FILE -tls-key FILE, to wss:// and
// https:// instead (opamp-go's StartSettings.TLSConfig). The admin endpoint:
//
//	POST /admin/config   body = the config text: it becomes the single file bench.yaml of every
//	                     agent's remote config (hash = sha256 of the body); connected WebSocket
//	                     agents get it pushed at once, HTTP agents on their next poll.
//	GET  /admin/stats    {"connected": N, "applied": N, "messages": N}: agents connected now,
//	                     agents whose last RemoteConfigStatus is APPLIED for the current hash,
//	                     AgentToServer messages received since start.
//
// The bookkeeping mirrors opamp-operator's session (src/protocol/session.rs) so both servers do the
// same work per message: sequence-number check (ReportFullState on a gap), latest of each
// sub-message kept, a config offered once per connection unless the agent already reports it.
package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"flag"
	"io"
	"log"
	"net/http"
	"os"
	"os/signal"
	"reflect"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/open-telemetry/opamp-go/protobufs"
	"github.com/open-telemetry/opamp-go/server"
	"github.com/open-telemetry/opamp-go/server/types"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

const serverCapabilities = uint64(protobufs.ServerCapabilities_ServerCapabilities_AcceptsStatus |
	protobufs.ServerCapabilities_ServerCapabilities_OffersRemoteConfig |
	protobufs.ServerCapabilities_ServerCapabilities_AcceptsEffectiveConfig)

// agent is what the server remembers of one agent (by instance uid).
type agent struct {
	mu           sync.Mutex
	conn         types.Connection // the WebSocket it is on, nil for HTTP or offline
	online       bool
	lastSeen     time.Time
	lastSeq      uint64
	seenSeq      bool
	awaitingFull bool
	offeredHash  []byte
	capabilities uint64
	description  *protobufs.AgentDescription
	health       *protobufs.ComponentHealth
	effective    *protobufs.EffectiveConfig
	rcStatus     *protobufs.RemoteConfigStatus
	packages     *protobufs.PackageStatuses
	customCaps   *protobufs.CustomCapabilities
	components   *protobufs.AvailableComponents
}

type fleet struct {
	mu       sync.RWMutex
	agents   map[string]*agent
	byConn   sync.Map // types.Connection -> *agent (WebSocket connections)
	config   atomic.Pointer[protobufs.AgentRemoteConfig]
	messages atomic.Uint64
	// HTTP agents count as connected while they polled within this long.
	httpTimeout time.Duration
	capture     *capture // nil without -capture
}

// capture records the first agent's reported state (see -capture).
type capture struct {
	path string
	mu   sync.Mutex
	uid  []byte // the first agent's
	done bool
}

// observe notes what agent a (by uid) holds now and writes the file once everything is there
// (caller holds a.mu).
func (c *capture) observe(uid []byte, a *agent) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.done {
		return
	}
	if c.uid == nil {
		c.uid = append([]byte(nil), uid...)
	}
	// Health once the collector runs (the first report is an empty one, before it started).
	if !bytes.Equal(c.uid, uid) || a.description == nil || a.effective == nil ||
		a.health == nil || (!a.health.Healthy && a.health.LastError == "") ||
		a.capabilities == 0 || a.components == nil || len(a.components.Components) == 0 {
		return
	}
	msg := &protobufs.AgentToServer{
		InstanceUid:         c.uid,
		Capabilities:        a.capabilities,
		AgentDescription:    a.description,
		EffectiveConfig:     a.effective,
		Health:              a.health,
		AvailableComponents: a.components,
		CustomCapabilities:  a.customCaps,
	}
	bin, err := proto.MarshalOptions{Deterministic: true}.Marshal(msg)
	if err != nil {
		log.Fatalf("capture: %v", err)
	}
	text, err := protojson.MarshalOptions{Multiline: true, Indent: "  "}.Marshal(msg)
	if err != nil {
		log.Fatalf("capture: %v", err)
	}
	if err := os.WriteFile(c.path+".json", append(text, '\n'), 0o644); err != nil {
		log.Fatalf("capture: %v", err)
	}
	// The binary file last: its appearance says both are complete.
	tmp := c.path + ".tmp"
	if err := os.WriteFile(tmp, bin, 0o644); err != nil {
		log.Fatalf("capture: %v", err)
	}
	if err := os.Rename(tmp, c.path); err != nil {
		log.Fatalf("capture: %v", err)
	}
	c.done = true
	log.Printf("captured the first agent's state: %s (%d bytes), %s.json", c.path, len(bin), c.path)
}

func newFleet(httpTimeout time.Duration) *fleet {
	return &fleet{agents: make(map[string]*agent), httpTimeout: httpTimeout}
}

func (f *fleet) get(uid []byte) *agent {
	f.mu.RLock()
	a := f.agents[string(uid)]
	f.mu.RUnlock()
	if a != nil {
		return a
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if a = f.agents[string(uid)]; a == nil {
		a = &agent{}
		f.agents[string(uid)] = a
	}
	return a
}

// offer adds the current config to msg if the agent should get it now (caller holds a.mu).
func (a *agent) offer(msg *protobufs.ServerToAgent, cfg *protobufs.AgentRemoteConfig) bool {
	if cfg == nil || a.awaitingFull ||
		a.capabilities&uint64(protobufs.AgentCapabilities_AgentCapabilities_AcceptsRemoteConfig) == 0 {
		return false
	}
	if a.rcStatus != nil && bytes.Equal(a.rcStatus.LastRemoteConfigHash, cfg.ConfigHash) {
		return false
	}
	if bytes.Equal(a.offeredHash, cfg.ConfigHash) {
		return false
	}
	a.offeredHash = cfg.ConfigHash
	msg.RemoteConfig = cfg
	return true
}

func (f *fleet) onMessage(_ context.Context, conn types.Connection, m *protobufs.AgentToServer) *protobufs.ServerToAgent {
	f.messages.Add(1)
	a := f.get(m.InstanceUid)
	isWS := isWebSocket(conn)
	reply := &protobufs.ServerToAgent{InstanceUid: m.InstanceUid, Capabilities: serverCapabilities}

	a.mu.Lock()
	defer a.mu.Unlock()
	if isWS {
		if a.conn != conn {
			a.conn = conn
			a.offeredHash = nil // a new connection: offer again
			f.byConn.Store(conn, a)
		}
	} else if !a.online {
		a.offeredHash = nil
	}
	a.online = true
	a.lastSeen = time.Now()

	inSeq := m.SequenceNum == 0 || (a.seenSeq && m.SequenceNum == a.lastSeq+1)
	a.lastSeq, a.seenSeq = m.SequenceNum, true
	if !inSeq {
		a.awaitingFull = true
		a.offeredHash = nil
		reply.Flags |= uint64(protobufs.ServerToAgentFlags_ServerToAgentFlags_ReportFullState)
	} else if m.AgentDescription != nil {
		a.awaitingFull = false
	}
	a.capabilities = m.Capabilities
	if m.AgentDescription != nil {
		a.description = m.AgentDescription
	}
	if m.Health != nil {
		a.health = m.Health
	}
	if m.EffectiveConfig != nil {
		a.effective = m.EffectiveConfig
	}
	if m.RemoteConfigStatus != nil {
		a.rcStatus = m.RemoteConfigStatus
	}
	if m.PackageStatuses != nil {
		a.packages = m.PackageStatuses
	}
	if m.CustomCapabilities != nil {
		a.customCaps = m.CustomCapabilities
	}
	if ac := m.AvailableComponents; ac != nil {
		switch {
		case len(ac.Components) > 0:
			a.components = ac
		case a.components == nil || len(a.components.Components) == 0 || !bytes.Equal(a.components.Hash, ac.Hash):
			// Only the hash (opamp-go's first message), of components we do not have: ask for them.
			a.components = ac
			if a.capabilities&uint64(protobufs.AgentCapabilities_AgentCapabilities_ReportsAvailableComponents) != 0 {
				reply.Flags |= uint64(protobufs.ServerToAgentFlags_ServerToAgentFlags_ReportAvailableComponents)
			}
		}
	}
	if f.capture != nil {
		f.capture.observe(m.InstanceUid, a)
	}
	if m.AgentDisconnect != nil {
		a.online = false
		a.conn = nil
		return reply
	}
	a.offer(reply, f.config.Load())
	return reply
}

// isWebSocket: opamp-go's WebSocket connections are pointers (*wsConnection), its plain-HTTP
// ones values (httpConnection, one per request).
func isWebSocket(conn types.Connection) bool {
	return reflect.TypeOf(conn).Kind() == reflect.Pointer
}

func (f *fleet) onClose(conn types.Connection) {
	v, ok := f.byConn.LoadAndDelete(conn)
	if !ok {
		return
	}
	a := v.(*agent)
	a.mu.Lock()
	if a.conn == conn {
		a.conn = nil
		a.online = false
	}
	a.mu.Unlock()
}

// setConfig makes body the config of every agent and pushes it to connected WebSocket agents.
func (f *fleet) setConfig(body []byte) (hash []byte, pushed int) {
	sum := sha256.Sum256(body)
	cfg := &protobufs.AgentRemoteConfig{
		Config: &protobufs.AgentConfigMap{ConfigMap: map[string]*protobufs.AgentConfigFile{
			"bench.yaml": {Body: body, ContentType: "text/yaml"},
		}},
		ConfigHash: sum[:],
	}
	f.config.Store(cfg)
	f.mu.RLock()
	all := make([]*agent, 0, len(f.agents))
	for _, a := range f.agents {
		all = append(all, a)
	}
	f.mu.RUnlock()
	for _, a := range all {
		a.mu.Lock()
		conn := a.conn
		var msg *protobufs.ServerToAgent
		if conn != nil {
			msg = &protobufs.ServerToAgent{Capabilities: serverCapabilities}
			if !a.offer(msg, cfg) {
				msg = nil
			}
		}
		a.mu.Unlock()
		if msg != nil {
			pushed++
			// Send blocks until written; one goroutine per agent, as opamp-go's examples do.
			go func() {
				if err := conn.Send(context.Background(), msg); err != nil {
					conn.Disconnect()
				}
			}()
		}
	}
	return sum[:], pushed
}

type stats struct {
	Connected int    `json:"connected"`
	Applied   int    `json:"applied"`
	Messages  uint64 `json:"messages"`
}

func (f *fleet) stats() stats {
	s := stats{Messages: f.messages.Load()}
	cfg := f.config.Load()
	cutoff := time.Now().Add(-f.httpTimeout)
	f.mu.RLock()
	defer f.mu.RUnlock()
	for _, a := range f.agents {
		a.mu.Lock()
		if a.online && (a.conn != nil || a.lastSeen.After(cutoff)) {
			s.Connected++
		}
		if cfg != nil && a.rcStatus != nil &&
			a.rcStatus.Status == protobufs.RemoteConfigStatuses_RemoteConfigStatuses_APPLIED &&
			bytes.Equal(a.rcStatus.LastRemoteConfigHash, cfg.ConfigHash) {
			s.Applied++
		}
		a.mu.Unlock()
	}
	return s
}

func (f *fleet) adminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /admin/config", func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		hash, pushed := f.setConfig(body)
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]any{"hash": hex.EncodeToString(hash), "pushed": pushed})
	})
	mux.HandleFunc("GET /admin/stats", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(f.stats())
	})
	return mux
}

func main() {
	addr := flag.String("addr", "127.0.0.1:4320", "OpAMP listen address (path /v1/opamp)")
	adminAddr := flag.String("admin-addr", "127.0.0.1:4399", "admin listen address (/admin/config, /admin/stats)")
	heartbeat := flag.Duration("heartbeat", 30*time.Second, "HTTP agents silent for 3 of these count as disconnected")
	capturePath := flag.String("capture", "", "write the first agent's merged report to this file (and FILE.json)")
	tlsCert := flag.String("tls-cert", "", "PEM certificate (chain): serve wss:// and https:// (with -tls-key)")
	tlsKey := flag.String("tls-key", "", "PEM private key of -tls-cert")
	flag.Parse()

	// opamp-go serves TLS when StartSettings.TLSConfig is set.
	var tlsConfig *tls.Config
	if *tlsCert != "" || *tlsKey != "" {
		cert, err := tls.LoadX509KeyPair(*tlsCert, *tlsKey)
		if err != nil {
			log.Fatalf("-tls-cert/-tls-key: %v", err)
		}
		tlsConfig = &tls.Config{Certificates: []tls.Certificate{cert}}
	}

	f := newFleet(3 * *heartbeat)
	if *capturePath != "" {
		f.capture = &capture{path: *capturePath}
	}
	srv := server.New(nil)
	callbacks := types.ConnectionCallbacks{OnMessage: f.onMessage, OnConnectionClose: f.onClose}
	err := srv.Start(server.StartSettings{
		ListenEndpoint: *addr,
		TLSConfig:      tlsConfig,
		Settings: server.Settings{Callbacks: types.Callbacks{
			OnConnecting: func(*http.Request) types.ConnectionResponse {
				return types.ConnectionResponse{Accept: true, ConnectionCallbacks: callbacks}
			},
		}},
	})
	if err != nil {
		log.Fatalf("cannot start the OpAMP server on %s: %v", *addr, err)
	}
	admin := &http.Server{Addr: *adminAddr, Handler: f.adminHandler()}
	go func() {
		if err := admin.ListenAndServe(); err != nil && err != http.ErrServerClosed {
			log.Fatalf("admin endpoint on %s: %v", *adminAddr, err)
		}
	}()
	log.Printf("serving OpAMP on %s/v1/opamp, admin on %s", srv.Addr(), *adminAddr)

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	<-sig
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	admin.Shutdown(ctx)
	srv.Stop(ctx)
}
