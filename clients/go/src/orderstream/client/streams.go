package client

import (
	"context"
	"errors"
	"io"

	eventsv1 "orderstream/events/v1"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
)

// StreamOptions say which events StreamEvents delivers.
type StreamOptions struct {
	AfterID int64
	Types   []string
	Subject string
	Follow  bool
	// Reconnects is how many calls in a row may fail with UNAVAILABLE
	// before anything is received (5 when 0).
	Reconnects int
}

// StreamEvents hands the events after AfterID to handle in feed order, one
// by one, until the stream ends (never, with Follow), ctx ends, or handle
// returns an error, which StreamEvents returns.
//
// When the stream fails with UNAVAILABLE (connection lost, replica shutting
// down), a new StreamEvents call resumes after the id of the last event
// handed to handle: the feed is ordered by id, so that is neither a gap nor
// a duplicate. Each event received resets the count of reconnects. Other
// errors are returned as they are.
func StreamEvents(ctx context.Context, conn grpc.ClientConnInterface, o StreamOptions, handle func(*eventsv1.Event) error) error {
	reconnects := o.Reconnects
	if reconnects == 0 {
		reconnects = 5
	}
	stub := eventsv1.NewEventServiceClient(conn)
	lastID := o.AfterID
	for failures := 0; ; {
		fromHandle, err := follow(ctx, stub, o, lastID, func(event *eventsv1.Event) error {
			lastID, failures = event.Id, 0
			return handle(event)
		})
		if err == nil || fromHandle || !codeIn(err, codes.Unavailable) || failures >= reconnects {
			return err
		}
		failures++
		if err := sleep(ctx, failures); err != nil {
			return err
		}
	}
}

// follow is one StreamEvents call after afterID. fromHandle tells whether
// the error came from handle, which must not be retried.
func follow(ctx context.Context, stub eventsv1.EventServiceClient, o StreamOptions, afterID int64, handle func(*eventsv1.Event) error) (fromHandle bool, err error) {
	// Cancelled on the way out: ends the call when handle stops early.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	call, err := stub.StreamEvents(ctx, &eventsv1.StreamEventsRequest{
		AfterId: afterID, Types: o.Types, Subject: o.Subject, Follow: o.Follow,
	})
	if err != nil {
		return false, err
	}
	for {
		response, err := call.Recv()
		if errors.Is(err, io.EOF) {
			return false, nil
		}
		if err != nil {
			return false, err
		}
		for _, event := range response.Events {
			if err := handle(event); err != nil {
				return true, err
			}
		}
	}
}
