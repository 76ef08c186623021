package client

import (
	"context"
	"errors"

	eventsv1 "orderstream/events/v1"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
)

// DefaultBatchBytes is the serialized size one UploadEventsRequest aims to
// stay under: far below gRPC's default 4 MiB message limit, large enough to
// amortise per-message costs over hundreds of events.
const DefaultBatchBytes = 1 << 20

// A repeated message field costs one tag byte and a length varint of at
// most five bytes on top of the element itself.
const fieldOverhead = 6

// UploadRequests packs events into requests of at most maxBytes serialized
// bytes (an event larger than that travels alone); only the first request
// carries uploadID, and there always is a first one.
func UploadRequests(events []*eventsv1.Event, uploadID string, maxBytes int) []*eventsv1.UploadEventsRequest {
	var requests []*eventsv1.UploadEventsRequest
	first := &eventsv1.UploadEventsRequest{UploadId: uploadID}
	batch, size := first, proto.Size(first)
	for _, event := range events {
		cost := proto.Size(event) + fieldOverhead
		if len(batch.Events) > 0 && size+cost > maxBytes {
			requests = append(requests, batch)
			batch, size = &eventsv1.UploadEventsRequest{}, 0
		}
		batch.Events = append(batch.Events, event)
		size += cost
	}
	return append(requests, batch)
}

// UploadOptions tune UploadEvents.
type UploadOptions struct {
	// UploadID is the idempotency key; a fresh one when empty.
	UploadID string
	// MaxBytes is the budget of one message (DefaultBatchBytes when 0).
	MaxBytes int
	// Attempts bounds the uploads made (5 when 0).
	Attempts int
}

// UploadEvents uploads events all or nothing as one UploadEvents call.
//
// On UNAVAILABLE the whole upload is sent again with the same upload id, up
// to Attempts times: the server commits an upload id at most once and
// answers a repeat with the first result, so a retry after a lost response
// cannot write twice. Other errors are returned as they are.
//
//	response, err := client.UploadEvents(ctx, conn, events, client.UploadOptions{})
func UploadEvents(ctx context.Context, conn grpc.ClientConnInterface, events []*eventsv1.Event, o UploadOptions) (*eventsv1.UploadEventsResponse, error) {
	attempts, maxBytes, key := o.Attempts, o.MaxBytes, o.UploadID
	if attempts == 0 {
		attempts = 5
	}
	if attempts < 1 {
		return nil, errors.New("client: Attempts must be at least 1")
	}
	if maxBytes == 0 {
		maxBytes = DefaultBatchBytes
	}
	if key == "" {
		key = NewRequestID("upload")
	}
	requests := UploadRequests(events, key, maxBytes)
	stub := eventsv1.NewEventServiceClient(conn)
	for attempt := 1; ; attempt++ {
		response, err := upload(ctx, stub, requests)
		if err == nil {
			return response, nil
		}
		if attempt == attempts || !codeIn(err, codes.Unavailable) {
			return nil, err
		}
		if err := sleep(ctx, attempt); err != nil {
			return nil, err
		}
	}
}

// upload is one attempt. Its context is cancelled on the way out, so that
// a failed attempt ends the call and the server rolls the upload back
// instead of waiting for more messages.
func upload(ctx context.Context, stub eventsv1.EventServiceClient, requests []*eventsv1.UploadEventsRequest) (*eventsv1.UploadEventsResponse, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	call, err := stub.UploadEvents(ctx)
	if err != nil {
		return nil, err
	}
	for _, request := range requests {
		// A failed Send returns io.EOF; CloseAndRecv then has the status.
		if call.Send(request) != nil {
			break
		}
	}
	return call.CloseAndRecv()
}
