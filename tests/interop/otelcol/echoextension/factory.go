// Package echoextension is a collector extension for the opamp-operator e2e tests. It registers a
// custom capability with the opamp extension, sends one message when it starts and echoes back
// every custom message the OpAMP server sends for that capability.
package echoextension

import (
	"context"

	"go.opentelemetry.io/collector/component"
	"go.opentelemetry.io/collector/extension"
)

var componentType = component.MustNewType("opampecho")

const (
	defaultCapability  = "io.opamp-operator.test.echo"
	defaultMessageType = "hello"
)

// NewFactory returns the factory of the opampecho extension.
func NewFactory() extension.Factory {
	return extension.NewFactory(componentType, createDefaultConfig, create, component.StabilityLevelDevelopment)
}

func createDefaultConfig() component.Config {
	return &Config{
		OpAMP:       component.MustNewID("opamp"),
		Capability:  defaultCapability,
		MessageType: defaultMessageType,
	}
}

func create(_ context.Context, set extension.Settings, cfg component.Config) (extension.Extension, error) {
	return newEchoExtension(cfg.(*Config), set.Logger), nil
}
