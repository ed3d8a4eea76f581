package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"os"
	"sort"
	"sync"
	"time"
)

// emitter writes one JSON object per line. Every line starts with "event" and "ts"
// (RFC3339Nano, UTC); the remaining fields follow in sorted key order. Each line is
// written with a single Write call, so it is flushed (stdout is unbuffered) and lines
// from concurrent goroutines never interleave.
type emitter struct {
	mu  sync.Mutex
	out io.Writer
}

type fields map[string]any

func (e *emitter) emit(event string, f fields) {
	var buf bytes.Buffer
	buf.WriteString(`{"event":`)
	writeJSON(&buf, event)
	buf.WriteString(`,"ts":`)
	writeJSON(&buf, time.Now().UTC().Format(time.RFC3339Nano))
	keys := make([]string, 0, len(f))
	for k := range f {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		buf.WriteByte(',')
		writeJSON(&buf, k)
		buf.WriteByte(':')
		writeJSON(&buf, f[k])
	}
	buf.WriteString("}\n")

	e.mu.Lock()
	defer e.mu.Unlock()
	if _, err := e.out.Write(buf.Bytes()); err != nil {
		log.Printf("cannot write event %q: %v", event, err)
	}
}

func writeJSON(buf *bytes.Buffer, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		b, _ = json.Marshal(fmt.Sprintf("<unencodable: %v>", err))
	}
	buf.Write(b)
}

// stderrLogger implements opamp-go's types.Logger; everything goes to stderr.
type stderrLogger struct {
	debug bool
	l     *log.Logger
}

func newStderrLogger(debug bool) *stderrLogger {
	return &stderrLogger{debug: debug, l: log.New(os.Stderr, "opamp-client ", log.LstdFlags|log.Lmicroseconds)}
}

func (s *stderrLogger) Debugf(_ context.Context, format string, v ...interface{}) {
	if s.debug {
		s.l.Printf("DEBUG "+format, v...)
	}
}

func (s *stderrLogger) Errorf(_ context.Context, format string, v ...interface{}) {
	s.l.Printf("ERROR "+format, v...)
}
