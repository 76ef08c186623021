package client

import (
	"context"
	"errors"

	eventsv1 "orderstream/events/v1"
	ordersv1 "orderstream/orders/v1"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
)

// WriteOptions tune PublishEvents.
type WriteOptions struct {
	// RequestID is the idempotency key; a fresh one when empty.
	RequestID string
	// Attempts bounds the calls made (5 when 0).
	Attempts int
}

// PublishEvents publishes events (1..1000) in one PublishEvents call and
// returns their ids in order.
//
// The call always carries a request_id, and on UNAVAILABLE or ABORTED (the
// call may or may not have taken effect, or was refused before doing
// anything) it is sent again with that same key: the server answers a
// repeat with the first call's ids and writes nothing, so every event is
// stored exactly once. Other errors are returned as they are.
//
//	ids, err := client.PublishEvents(ctx, conn, []*eventsv1.Event{{Type: "com.example.paid", Source: "/billing"}}, client.WriteOptions{})
func PublishEvents(ctx context.Context, conn grpc.ClientConnInterface, events []*eventsv1.Event, o WriteOptions) ([]int64, error) {
	attempts := o.Attempts
	if attempts == 0 {
		attempts = 5
	}
	if attempts < 1 {
		return nil, errors.New("client: Attempts must be at least 1")
	}
	request := &eventsv1.PublishEventsRequest{RequestId: o.RequestID, Events: events}
	if request.RequestId == "" {
		request.RequestId = NewRequestID("publish")
	}
	stub := eventsv1.NewEventServiceClient(conn)
	for attempt := 1; ; attempt++ {
		response, err := stub.PublishEvents(ctx, request)
		if err == nil {
			return response.Ids, nil
		}
		if attempt == attempts || !codeIn(err, codes.Unavailable, codes.Aborted) {
			return nil, err
		}
		if err := sleep(ctx, attempt); err != nil {
			return nil, err
		}
	}
}

// CreateOrder is CreateOrder with a fresh request_id when request has none
// (the server requires one); the service config retries it. request itself
// is left unchanged.
func CreateOrder(ctx context.Context, conn grpc.ClientConnInterface, request *ordersv1.CreateOrderRequest, opts ...grpc.CallOption) (*ordersv1.Order, error) {
	if request.RequestId == "" {
		request = proto.Clone(request).(*ordersv1.CreateOrderRequest)
		request.RequestId = NewRequestID("order")
	}
	return ordersv1.NewOrderServiceClient(conn).CreateOrder(ctx, request, opts...)
}

// UpdateOrderStatus is UpdateOrderStatus with a request_id (a fresh one
// when requestID is empty), so that a retry after a lost response is
// answered with the order as it now stands, not FAILED_PRECONDITION.
func UpdateOrderStatus(ctx context.Context, conn grpc.ClientConnInterface, id int64, state ordersv1.OrderStatus, expectedVersion int64, requestID string, opts ...grpc.CallOption) (*ordersv1.Order, error) {
	if requestID == "" {
		requestID = NewRequestID("status")
	}
	request := &ordersv1.UpdateOrderStatusRequest{Id: id, Status: state, ExpectedVersion: expectedVersion, RequestId: requestID}
	return ordersv1.NewOrderServiceClient(conn).UpdateOrderStatus(ctx, request, opts...)
}
