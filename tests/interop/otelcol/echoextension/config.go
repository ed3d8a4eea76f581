package echoextension

import (
	"errors"

	"go.opentelemetry.io/collector/component"
)

// Config of the opampecho extension.
type Config struct {
	// OpAMP is the component ID of the opamp extension whose custom capability registry is used.
	OpAMP component.ID `mapstructure:"opamp"`
	// Capability is the custom capability registered with the OpAMP server.
	Capability string `mapstructure:"capability"`
	// MessageType is the type of the message sent once on start (data "started").
	MessageType string `mapstructure:"message_type"`
}

var _ component.Config = (*Config)(nil)

// Validate checks the configuration.
func (c *Config) Validate() error {
	var errs []error
	if c.OpAMP == (component.ID{}) {
		errs = append(errs, errors.New("opamp must be the ID of an opamp extension"))
	}
	if c.Capability == "" {
		errs = append(errs, errors.New("capability must not be empty"))
	}
	if c.MessageType == "" {
		errs = append(errs, errors.New("message_type must not be empty"))
	}
	return errors.Join(errs...)
}
