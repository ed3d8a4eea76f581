package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/open-telemetry/opamp-go/client"
	"github.com/open-telemetry/opamp-go/client/types"
	"github.com/open-telemetry/opamp-go/protobufs"
)

// agent holds the simulated agent state and implements the opamp-go callbacks.
type agent struct {
	out        *emitter
	client     client.OpAMPClient
	transport  string // "websocket" or "http"
	failMarker string
	startTime  time.Time

	mu sync.Mutex
	// The current effective config: file name -> file.
	effective map[string]*protobufs.AgentConfigFile
	// Hash of the last remote config that reached a terminal status (APPLIED or FAILED),
	// nil until the first one. A remote config carrying this hash again is a duplicate.
	lastHash []byte

	// HTTP clients call OnConnect after every successful poll; "connected" is printed
	// only on a transition (first success, or first success after a failure).
	connected atomic.Bool

	// Last custom capabilities list the server announced ("" before any): HTTP servers
	// repeat it in every response, so it is printed only when it changes.
	serverCustomCaps string
}

func newAgent(out *emitter, transport, failMarker string) *agent {
	return &agent{
		out:        out,
		transport:  transport,
		failMarker: failMarker,
		startTime:  time.Now(),
		effective: map[string]*protobufs.AgentConfigFile{
			"agent.yaml": {Body: []byte("initial: true"), ContentType: "text/yaml"},
		},
	}
}

func (a *agent) callbacks() types.Callbacks {
	return types.Callbacks{
		OnConnect:          a.onConnect,
		OnConnectFailed:    a.onConnectFailed,
		OnError:            a.onError,
		OnMessage:          a.onMessage,
		GetEffectiveConfig: a.getEffectiveConfig,
		OnCommand:          a.onCommand,
	}
}

func (a *agent) onConnect(_ context.Context) {
	if a.transport == "http" && a.connected.Swap(true) {
		return // just another successful poll
	}
	a.connected.Store(true)
	a.out.emit("connected", fields{"transport": a.transport})
}

func (a *agent) onConnectFailed(_ context.Context, err error) {
	a.connected.Store(false)
	a.out.emit("connect_failed", fields{"error": errString(err)})
}

func (a *agent) onError(_ context.Context, e *protobufs.ServerErrorResponse) {
	f := fields{"type": serverErrorType(e.GetType()), "message": e.GetErrorMessage()}
	if ri := e.GetRetryInfo(); ri != nil {
		f["retry_after_ns"] = ri.GetRetryAfterNanoseconds()
	}
	a.out.emit("server_error", f)
}

func (a *agent) onCommand(_ context.Context, cmd *protobufs.ServerToAgentCommand) error {
	a.out.emit("command", fields{"type": commandType(cmd.GetType())})
	return nil
}

func (a *agent) getEffectiveConfig(_ context.Context) (*protobufs.EffectiveConfig, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.effectiveConfigLocked(), nil
}

// effectiveConfigLocked returns a deep copy of the current effective config.
func (a *agent) effectiveConfigLocked() *protobufs.EffectiveConfig {
	m := make(map[string]*protobufs.AgentConfigFile, len(a.effective))
	for name, f := range a.effective {
		m[name] = &protobufs.AgentConfigFile{Body: bytes.Clone(f.Body), ContentType: f.ContentType}
	}
	return &protobufs.EffectiveConfig{ConfigMap: &protobufs.AgentConfigMap{ConfigMap: m}}
}

func (a *agent) onMessage(ctx context.Context, msg *types.MessageData) {
	if id := msg.AgentIdentification; id != nil {
		f := fields{}
		if u, err := uuid.FromBytes(id.GetNewInstanceUid()); err == nil {
			f["new_uid"] = u.String()
		} else {
			f["new_uid_hex"] = hex.EncodeToString(id.GetNewInstanceUid())
			f["error"] = err.Error()
		}
		a.out.emit("identification", f)
	}
	if cc := msg.CustomCapabilities; cc != nil {
		caps := cc.GetCapabilities()
		if caps == nil {
			caps = []string{}
		}
		key := "[" + strings.Join(caps, "\x00") + "]"
		a.mu.Lock()
		changed := a.serverCustomCaps != key
		a.serverCustomCaps = key
		a.mu.Unlock()
		if changed {
			a.out.emit("server_custom_capabilities", fields{"capabilities": caps})
		}
	}
	if rc := msg.RemoteConfig; rc != nil {
		a.handleRemoteConfig(ctx, rc)
	}
	if cm := msg.CustomMessage; cm != nil {
		a.out.emit("custom_message", fields{
			"capability": cm.GetCapability(),
			"type":       cm.GetType(),
			"data":       base64.StdEncoding.EncodeToString(cm.GetData()),
		})
	}
}

func (a *agent) handleRemoteConfig(ctx context.Context, rc *protobufs.AgentRemoteConfig) {
	hash := rc.GetConfigHash()
	if hash == nil {
		// SetRemoteConfigStatus rejects a nil LastRemoteConfigHash.
		hash = []byte{}
	}
	hashHex := hex.EncodeToString(hash)
	received := rc.GetConfig().GetConfigMap()

	files := make(map[string]string, len(received))
	for name, f := range received {
		files[name] = string(f.GetBody())
	}
	a.out.emit("remote_config", fields{"hash": hashHex, "files": files})

	a.mu.Lock()
	duplicate := a.lastHash != nil && bytes.Equal(a.lastHash, hash)
	a.mu.Unlock()
	if duplicate {
		a.out.emit("remote_config_duplicate", fields{"hash": hashHex})
		return
	}

	a.setRemoteConfigStatus(protobufs.RemoteConfigStatuses_RemoteConfigStatuses_APPLYING, hash, "")

	errMsg := ""
	if a.failMarker != "" {
		for _, f := range received {
			if bytes.Contains(f.GetBody(), []byte(a.failMarker)) {
				errMsg = "config rejected: contains " + a.failMarker
				break
			}
		}
	}

	a.mu.Lock()
	if errMsg == "" {
		// "Apply": the effective config becomes exactly the received config map.
		eff := make(map[string]*protobufs.AgentConfigFile, len(received))
		for name, f := range received {
			eff[name] = &protobufs.AgentConfigFile{Body: bytes.Clone(f.GetBody()), ContentType: f.GetContentType()}
		}
		a.effective = eff
	}
	a.lastHash = bytes.Clone(hash)
	if a.lastHash == nil {
		a.lastHash = []byte{}
	}
	a.mu.Unlock()

	if errMsg == "" {
		a.setRemoteConfigStatus(protobufs.RemoteConfigStatuses_RemoteConfigStatuses_APPLIED, hash, "")
	} else {
		a.setRemoteConfigStatus(protobufs.RemoteConfigStatuses_RemoteConfigStatuses_FAILED, hash, errMsg)
	}
	a.reportEffectiveConfig(ctx)
}

func (a *agent) setRemoteConfigStatus(st protobufs.RemoteConfigStatuses, hash []byte, errMsg string) {
	status := &protobufs.RemoteConfigStatus{LastRemoteConfigHash: hash, Status: st, ErrorMessage: errMsg}
	f := fields{"status": remoteConfigStatusName(st), "hash": hex.EncodeToString(hash), "error": errMsg}
	if err := a.client.SetRemoteConfigStatus(status); err != nil {
		f["set_error"] = err.Error()
	}
	a.out.emit("remote_config_status", f)
}

func (a *agent) reportEffectiveConfig(ctx context.Context) {
	a.mu.Lock()
	files := make(map[string]string, len(a.effective))
	for name, f := range a.effective {
		files[name] = string(f.Body)
	}
	a.mu.Unlock()
	f := fields{"files": files}
	if err := a.client.UpdateEffectiveConfig(ctx); err != nil {
		f["error"] = err.Error()
	}
	a.out.emit("effective_config_reported", f)
}

func (a *agent) setHealth(healthy bool, status, lastError string) error {
	return a.client.SetHealth(&protobufs.ComponentHealth{
		Healthy:            healthy,
		Status:             status,
		LastError:          lastError,
		StartTimeUnixNano:  uint64(a.startTime.UnixNano()),
		StatusTimeUnixNano: uint64(time.Now().UnixNano()),
	})
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func serverErrorType(t protobufs.ServerErrorResponseType) string {
	switch t {
	case protobufs.ServerErrorResponseType_ServerErrorResponseType_Unknown:
		return "UNKNOWN"
	case protobufs.ServerErrorResponseType_ServerErrorResponseType_BadRequest:
		return "BAD_REQUEST"
	case protobufs.ServerErrorResponseType_ServerErrorResponseType_Unavailable:
		return "UNAVAILABLE"
	}
	return fmt.Sprintf("TYPE_%d", int32(t))
}

func commandType(t protobufs.CommandType) string {
	if t == protobufs.CommandType_CommandType_Restart {
		return "RESTART"
	}
	return fmt.Sprintf("TYPE_%d", int32(t))
}

func remoteConfigStatusName(s protobufs.RemoteConfigStatuses) string {
	return strings.TrimPrefix(s.String(), "RemoteConfigStatuses_")
}
