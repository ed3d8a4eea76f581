package echoextension

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/open-telemetry/opamp-go/client/types"
	"github.com/open-telemetry/opentelemetry-collector-contrib/extension/opampcustommessages"
	"go.opentelemetry.io/collector/component"
	"go.opentelemetry.io/collector/extension/extensioncapabilities"
	"go.uber.org/zap"
)

const (
	echoMessageType = "echo"
	startedData     = "started"
	minBackoff      = 100 * time.Millisecond
	maxBackoff      = 5 * time.Second
)

type echoExtension struct {
	cfg     *Config
	logger  *zap.Logger
	handler opampcustommessages.CustomCapabilityHandler
	cancel  context.CancelFunc
	wg      sync.WaitGroup
}

var _ extensioncapabilities.Dependent = (*echoExtension)(nil)

func newEchoExtension(cfg *Config, logger *zap.Logger) *echoExtension {
	return &echoExtension{cfg: cfg, logger: logger}
}

// Dependencies makes the collector start the opamp extension first (and shut it down last).
func (e *echoExtension) Dependencies() []component.ID {
	return []component.ID{e.cfg.OpAMP}
}

func (e *echoExtension) Start(_ context.Context, host component.Host) error {
	ext, ok := host.GetExtensions()[e.cfg.OpAMP]
	if !ok {
		return fmt.Errorf("extension %q does not exist", e.cfg.OpAMP)
	}
	registry, ok := ext.(opampcustommessages.CustomCapabilityRegistry)
	if !ok {
		return fmt.Errorf("extension %q is not a custom capability registry", e.cfg.OpAMP)
	}
	handler, err := registry.Register(e.cfg.Capability)
	if err != nil {
		return fmt.Errorf("register custom capability %q: %w", e.cfg.Capability, err)
	}
	e.handler = handler

	ctx, cancel := context.WithCancel(context.Background())
	e.cancel = cancel
	e.wg.Add(1)
	go e.run(ctx)
	return nil
}

func (e *echoExtension) Shutdown(context.Context) error {
	if e.cancel != nil {
		e.cancel()
	}
	e.wg.Wait()
	if e.handler != nil {
		e.handler.Unregister()
		e.handler = nil
	}
	return nil
}

// run sends the start message, then echoes every message received for the capability.
func (e *echoExtension) run(ctx context.Context) {
	defer e.wg.Done()
	e.send(ctx, e.cfg.MessageType, []byte(startedData))
	for {
		select {
		case <-ctx.Done():
			return
		case msg := <-e.handler.Message():
			e.logger.Info("Received custom message",
				zap.String("capability", msg.GetCapability()),
				zap.String("type", msg.GetType()),
				zap.String("data", string(msg.GetData())))
			e.send(ctx, echoMessageType, msg.GetData())
		}
	}
}

// send retries until the message is sent to the OpAMP server or ctx is done: while another custom
// message is pending it waits for that one, on other errors (e.g. the opamp client is not ready)
// it backs off. A queued message is sent once the opamp extension is connected.
func (e *echoExtension) send(ctx context.Context, msgType string, data []byte) {
	backoff := minBackoff
	for {
		sent, err := e.handler.SendMessage(msgType, data)
		switch {
		case err == nil:
			select {
			case <-sent:
				e.logger.Debug("Sent custom message",
					zap.String("capability", e.cfg.Capability), zap.String("type", msgType))
			case <-ctx.Done():
			}
			return
		case errors.Is(err, types.ErrCustomMessagePending):
			select {
			case <-sent:
				continue
			case <-ctx.Done():
				return
			}
		default:
			e.logger.Debug("Cannot send custom message yet, retrying",
				zap.String("type", msgType), zap.Duration("backoff", backoff), zap.Error(err))
			select {
			case <-time.After(backoff):
				backoff = min(2*backoff, maxBackoff)
			case <-ctx.Done():
				return
			}
		}
	}
}
