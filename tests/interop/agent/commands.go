package main

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"time"

	"github.com/open-telemetry/opamp-go/client/types"
	"github.com/open-telemetry/opamp-go/protobufs"
	"google.golang.org/protobuf/proto"
)

// stopGrace is how long a send_custom still waits for the client after stop/EOF.
const stopGrace = 3 * time.Second

// inputCommand is one line of stdin.
type inputCommand struct {
	Cmd string `json:"cmd"`

	// send_custom
	Capability string `json:"capability"`
	Type       string `json:"type"`
	Data       string `json:"data"` // base64 (standard encoding)

	// set_health
	Healthy   bool   `json:"healthy"`
	Status    string `json:"status"`
	LastError string `json:"last_error"`

	// set_attr
	Key   string `json:"key"`
	Value string `json:"value"`
}

// readCommands reads stdin line by line and executes the commands in order on one
// goroutine. {"cmd":"stop"} and EOF end the input: the commands before them still run
// (in order), a send_custom still waiting for the client gives up, and then stopNow is
// called. ctx (cancelled by a signal) aborts everything. done is closed on return.
func (a *agent) readCommands(ctx context.Context, in io.Reader, stopNow context.CancelFunc, done chan<- struct{}) {
	defer close(done)
	queue := make(chan inputCommand, 1024)
	endOfInput := make(chan struct{})
	go func() {
		defer close(queue)
		defer close(endOfInput)
		sc := bufio.NewScanner(in)
		sc.Buffer(make([]byte, 64*1024), 16*1024*1024)
		for sc.Scan() {
			line := sc.Bytes()
			if len(trimSpace(line)) == 0 {
				continue
			}
			var c inputCommand
			if err := json.Unmarshal(line, &c); err != nil {
				a.out.emit("input_error", fields{"error": err.Error(), "line": string(line)})
				continue
			}
			if c.Cmd == "stop" {
				return
			}
			queue <- c
		}
		if err := sc.Err(); err != nil {
			a.out.emit("input_error", fields{"error": err.Error()})
		}
	}()

	for {
		select {
		case <-ctx.Done():
			return
		case c, ok := <-queue:
			if !ok {
				stopNow()
				return
			}
			if ctx.Err() != nil {
				return
			}
			a.runCommand(ctx, endOfInput, c)
		}
	}
}

func trimSpace(b []byte) []byte {
	for len(b) > 0 && (b[0] == ' ' || b[0] == '\t' || b[0] == '\r' || b[0] == '\n') {
		b = b[1:]
	}
	return b
}

func (a *agent) runCommand(ctx context.Context, endOfInput <-chan struct{}, c inputCommand) {
	switch c.Cmd {
	case "send_custom":
		a.sendCustom(ctx, endOfInput, c)
	case "set_health":
		if err := a.setHealth(c.Healthy, c.Status, c.LastError); err != nil {
			a.out.emit("input_error", fields{"cmd": c.Cmd, "error": err.Error()})
			return
		}
		a.out.emit("health_set", fields{"healthy": c.Healthy, "status": c.Status, "last_error": c.LastError})
	case "set_attr":
		if err := a.setNonIdentifyingAttr(c.Key, c.Value); err != nil {
			a.out.emit("input_error", fields{"cmd": c.Cmd, "error": err.Error()})
			return
		}
		a.out.emit("attr_set", fields{"key": c.Key, "value": c.Value})
	default:
		a.out.emit("input_error", fields{"cmd": c.Cmd, "error": "unknown cmd"})
	}
}

// sendCustom sends a custom message the way opamp-go intends: if another custom
// message is still pending in the client's next message, wait until that one is taken
// for sending (the returned channel closes) and try again.
func (a *agent) sendCustom(ctx context.Context, endOfInput <-chan struct{}, c inputCommand) {
	data, err := base64.StdEncoding.DecodeString(c.Data)
	if err != nil {
		a.out.emit("custom_send_error", fields{"capability": c.Capability, "type": c.Type, "error": "bad base64 data: " + err.Error()})
		return
	}
	msg := &protobufs.CustomMessage{Capability: c.Capability, Type: c.Type, Data: data}
	waits := 0 // how often ErrCustomMessagePending made us wait
	// After stop/EOF a waiting send still gets a short grace period (the pending message
	// is normally taken within milliseconds while connected), then gives up.
	var giveUp <-chan time.Time
	for {
		// The client keeps the message pointer in its pending message; give it its own copy.
		ch, err := a.client.SendCustomMessage(proto.Clone(msg).(*protobufs.CustomMessage))
		switch {
		case err == nil:
			a.out.emit("custom_sent", fields{"capability": c.Capability, "type": c.Type, "pending_waits": waits})
			return
		case errors.Is(err, types.ErrCustomMessagePending):
			if !a.waitPending(ctx, ch, &endOfInput, &giveUp) {
				a.out.emit("custom_send_error", fields{"capability": c.Capability, "type": c.Type, "error": "stopped while waiting for the pending custom message to be sent"})
				return
			}
			waits++
		default:
			a.out.emit("custom_send_error", fields{"capability": c.Capability, "type": c.Type, "error": err.Error()})
			return
		}
	}
}

// waitPending waits until the pending custom message is taken for sending (true), or
// gives up (false) on a signal or stopGrace after stop/EOF.
func (a *agent) waitPending(ctx context.Context, ch <-chan struct{}, endOfInput *<-chan struct{}, giveUp *<-chan time.Time) bool {
	for {
		select {
		case <-ch:
			return true
		case <-ctx.Done():
			return false
		case <-*endOfInput:
			*endOfInput = nil // a nil channel blocks: from now on only the grace timer counts
			*giveUp = time.After(stopGrace)
		case <-*giveUp:
			return false
		}
	}
}

func (a *agent) setNonIdentifyingAttr(key, value string) error {
	if key == "" {
		return errors.New("empty key")
	}
	descr := a.client.AgentDescription() // a clone
	kv := stringKV(key, value)
	replaced := false
	for i, attr := range descr.NonIdentifyingAttributes {
		if attr.GetKey() == key {
			descr.NonIdentifyingAttributes[i] = kv
			replaced = true
		}
	}
	if !replaced {
		descr.NonIdentifyingAttributes = append(descr.NonIdentifyingAttributes, kv)
	}
	return a.client.SetAgentDescription(descr)
}

func stringKV(key, value string) *protobufs.KeyValue {
	return &protobufs.KeyValue{
		Key:   key,
		Value: &protobufs.AnyValue{Value: &protobufs.AnyValue_StringValue{StringValue: value}},
	}
}
