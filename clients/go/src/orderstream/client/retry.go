package client

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// backoff is the wait before retry number attempt (1-based): 0.1 s doubling
// up to 2 s, as in Python's helpers and the service config.
func backoff(attempt int) time.Duration {
	wait := 100 * time.Millisecond << (attempt - 1)
	if attempt > 5 || wait > 2*time.Second {
		return 2 * time.Second
	}
	return wait
}

// sleep waits before retry number attempt, or less if ctx ends first.
func sleep(ctx context.Context, attempt int) error {
	timer := time.NewTimer(backoff(attempt))
	defer timer.Stop()
	select {
	case <-timer.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func codeIn(err error, retried ...codes.Code) bool {
	code := status.Code(err)
	for _, c := range retried {
		if code == c {
			return true
		}
	}
	return false
}

// NewRequestID is a fresh idempotency key, e.g. "publish-3f2a...".
func NewRequestID(kind string) string {
	var random [16]byte
	if _, err := rand.Read(random[:]); err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return kind + "-" + hex.EncodeToString(random[:])
}
