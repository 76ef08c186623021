// The helpers against a real orderstream, which tests/test_client_go.py
// starts and names in ORDERSTREAM_* variables before running `go test`.
package client_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"reflect"
	"strconv"
	"syscall"
	"testing"
	"time"

	"orderstream/client"
	eventsv1 "orderstream/events/v1"
	ordersv1 "orderstream/orders/v1"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func env(t *testing.T, name string) string {
	value := os.Getenv(name)
	if value == "" {
		t.Fatalf("%s is not set: run this suite through tests/test_client_go.py", name)
	}
	return value
}

func dial(t *testing.T, target string, o client.Options) *grpc.ClientConn {
	conn, err := client.Dial(context.Background(), target, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func plain(t *testing.T) *grpc.ClientConn {
	return dial(t, env(t, "ORDERSTREAM_TARGET"), client.Options{Insecure: true})
}

func timeout(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func unique(prefix string) string { return client.NewRequestID(prefix) }

func newOrder(customer string, n int) *ordersv1.CreateOrderRequest {
	return &ordersv1.CreateOrderRequest{
		CustomerId: customer,
		Currency:   "EUR",
		Items:      []*ordersv1.LineItem{{Sku: fmt.Sprintf("SKU-%d", n), Quantity: int32(n), UnitPriceCents: 100}},
	}
}

func newEvents(subject string, from, count int) []*eventsv1.Event {
	events := make([]*eventsv1.Event, count)
	for n := range events {
		events[n] = &eventsv1.Event{
			Type: "test.go", Source: subject, Subject: subject,
			Payload: &eventsv1.Event_JsonPayload{JsonPayload: fmt.Sprintf(`{"n": %d}`, from+n)},
		}
	}
	return events
}

// collect gathers the ids StreamEvents hands over until it has want ids.
func collect(ctx context.Context, conn *grpc.ClientConn, o client.StreamOptions, want int, each func(ids []int64)) ([]int64, error) {
	var ids []int64
	errEnough := fmt.Errorf("enough")
	err := client.StreamEvents(ctx, conn, o, func(event *eventsv1.Event) error {
		ids = append(ids, event.Id)
		if each != nil {
			each(ids)
		}
		if len(ids) == want {
			return errEnough
		}
		return nil
	})
	if err == errEnough {
		err = nil
	}
	return ids, err
}

func TestServiceConfigIsPythons(t *testing.T) {
	var ours, pythons interface{}
	if err := json.Unmarshal([]byte(client.ServiceConfig), &ours); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal([]byte(env(t, "ORDERSTREAM_PYTHON_SERVICE_CONFIG")), &pythons); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(ours, pythons) {
		t.Fatalf("ServiceConfig differs from Python's DEFAULT_SERVICE_CONFIG:\n%s", client.ServiceConfig)
	}
}

func TestOptionsThatCannotGoTogether(t *testing.T) {
	for _, o := range []client.Options{
		{Insecure: true, CAFile: "ca.crt"},
		{Insecure: true, Token: "t"},
		{ClientCertFile: "client.crt"},
	} {
		if _, err := client.DialOptions(o); err == nil {
			t.Errorf("%+v was accepted", o)
		}
	}
}

func TestCreateAndGetAnOrder(t *testing.T) {
	conn, ctx := plain(t), timeout(t)
	request := newOrder(unique("go"), 3)
	created, err := client.CreateOrder(ctx, conn, request)
	if err != nil {
		t.Fatal(err)
	}
	if request.RequestId != "" {
		t.Fatal("CreateOrder changed the caller's request")
	}
	if created.Id <= 0 || created.TotalCents != 300 || created.Status != ordersv1.OrderStatus_ORDER_STATUS_PENDING {
		t.Fatalf("created %v", created)
	}
	request.RequestId = unique("order")
	first, err := client.CreateOrder(ctx, conn, request)
	if err != nil {
		t.Fatal(err)
	}
	again, err := client.CreateOrder(ctx, conn, request)
	if err != nil || again.Id != first.Id {
		t.Fatalf("a repeat with the same request id made %v (%v), not order %d", again, err, first.Id)
	}
	fetched, err := ordersv1.NewOrderServiceClient(conn).GetOrder(ctx, &ordersv1.GetOrderRequest{Id: created.Id})
	if err != nil || fetched.Id != created.Id || len(fetched.Items) != 1 {
		t.Fatalf("got %v, %v", fetched, err)
	}
	_, err = ordersv1.NewOrderServiceClient(conn).GetOrder(ctx, &ordersv1.GetOrderRequest{Id: 1 << 62})
	if status.Code(err) != codes.NotFound {
		t.Fatalf("a missing order: %v", err)
	}
}

func TestPageThroughAList(t *testing.T) {
	conn, ctx := plain(t), timeout(t)
	customer := unique("go")
	var want []int64
	for n := 1; n <= 5; n++ {
		order, err := client.CreateOrder(ctx, conn, newOrder(customer, n))
		if err != nil {
			t.Fatal(err)
		}
		want = append(want, order.Id)
	}
	var seen []int64
	pages, token := 0, ""
	for {
		page, err := ordersv1.NewOrderServiceClient(conn).ListOrders(ctx, &ordersv1.ListOrdersRequest{CustomerId: customer, PageSize: 2, PageToken: token})
		if err != nil {
			t.Fatal(err)
		}
		for _, order := range page.Orders {
			seen = append(seen, order.Id)
		}
		pages++
		if token = page.NextPageToken; token == "" {
			break
		}
	}
	if !reflect.DeepEqual(seen, want) || pages != 3 {
		t.Fatalf("%d pages of %v, want 3 of %v", pages, seen, want)
	}
}

func TestUploadRequestsStayUnderTheBudget(t *testing.T) {
	events := newEvents("budget", 0, 300)
	requests := client.UploadRequests(events, "budget-1", 1024)
	var packed []*eventsv1.Event
	for i, request := range requests {
		if (i == 0) != (request.UploadId == "budget-1") {
			t.Fatalf("request %d has upload id %q", i, request.UploadId)
		}
		packed = append(packed, request.Events...)
	}
	if len(requests) < 10 || !reflect.DeepEqual(packed, events) {
		t.Fatalf("%d requests, %d events", len(requests), len(packed))
	}
	if empty := client.UploadRequests(nil, "empty-1", 1024); len(empty) != 1 || empty[0].UploadId != "empty-1" {
		t.Fatalf("an upload of nothing: %v", empty)
	}
}

func TestUploadAndReadBack(t *testing.T) {
	conn, ctx := plain(t), timeout(t)
	subject := unique("/go/upload")
	events := newEvents(subject, 0, 200)
	o := client.UploadOptions{UploadID: subject, MaxBytes: 2048}
	uploaded, err := client.UploadEvents(ctx, conn, events, o)
	if err != nil {
		t.Fatal(err)
	}
	again, err := client.UploadEvents(ctx, conn, events, o)
	if err != nil || again.FirstEventId != uploaded.FirstEventId || again.EventCount != 200 {
		t.Fatalf("the same upload id again: %v, %v; first %v", again, err, uploaded)
	}
	var payloads []string
	err = client.StreamEvents(ctx, conn, client.StreamOptions{Subject: subject}, func(event *eventsv1.Event) error {
		payloads = append(payloads, event.GetJsonPayload())
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for n, payload := range payloads {
		var decoded struct{ N int }
		if json.Unmarshal([]byte(payload), &decoded) != nil || decoded.N != n {
			t.Fatalf("event %d has payload %s", n, payload)
		}
	}
	if len(payloads) != 200 {
		t.Fatalf("read back %d events of 200 (stored once, in order)", len(payloads))
	}
}

func TestWritesCarryRequestIDs(t *testing.T) {
	conn, ctx := plain(t), timeout(t)
	subject := unique("/go/publish")
	key := unique("publish")
	first, err := client.PublishEvents(ctx, conn, newEvents(subject, 0, 3), client.WriteOptions{RequestID: key})
	if err != nil {
		t.Fatal(err)
	}
	again, err := client.PublishEvents(ctx, conn, newEvents(subject, 0, 3), client.WriteOptions{RequestID: key})
	if err != nil || !reflect.DeepEqual(again, first) {
		t.Fatalf("a repeat of request %s: %v, %v; first %v", key, again, err, first)
	}
	order, err := client.CreateOrder(ctx, conn, newOrder(unique("go"), 1))
	if err != nil {
		t.Fatal(err)
	}
	statusKey := unique("status")
	for attempt := 0; attempt < 2; attempt++ {
		// Without the key, the repeat would be FAILED_PRECONDITION (PAID is entered once).
		paid, err := client.UpdateOrderStatus(ctx, conn, order.Id, ordersv1.OrderStatus_ORDER_STATUS_PAID, 0, statusKey)
		if err != nil || paid.Status != ordersv1.OrderStatus_ORDER_STATUS_PAID {
			t.Fatalf("attempt %d: %v, %v", attempt, paid, err)
		}
	}
}

func TestMutualTLSAndTokens(t *testing.T) {
	target, ctx := env(t, "ORDERSTREAM_TLS_TARGET"), timeout(t)
	ca := env(t, "ORDERSTREAM_CA_FILE")
	known := dial(t, target, client.Options{CAFile: ca, ClientCertFile: env(t, "ORDERSTREAM_CLIENT_CERT"), ClientKeyFile: env(t, "ORDERSTREAM_CLIENT_KEY")})
	if _, err := client.CreateOrder(ctx, known, newOrder(unique("go-mtls"), 1)); err != nil {
		t.Fatalf("a known client certificate: %v", err)
	}
	stranger := client.Options{CAFile: ca, ClientCertFile: env(t, "ORDERSTREAM_STRANGER_CERT"), ClientKeyFile: env(t, "ORDERSTREAM_STRANGER_KEY")}
	if _, err := client.CreateOrder(ctx, dial(t, target, stranger), newOrder(unique("go-mtls"), 1)); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("an unknown client certificate without a token: %v", err)
	}
	stranger.Token = env(t, "ORDERSTREAM_TOKEN")
	if _, err := client.CreateOrder(ctx, dial(t, target, stranger), newOrder(unique("go-mtls"), 1)); err != nil {
		t.Fatalf("an unknown client certificate with a token: %v", err)
	}
}

// publishUntilTaken publishes under one request id until a process takes
// the events: PublishEvents retries UNAVAILABLE, and a call that the
// draining process ends CANCELLED may or may not have been written, so it
// is repeated too (the server answers a repeat with the first call's ids).
func publishUntilTaken(ctx context.Context, conn *grpc.ClientConn, events []*eventsv1.Event) ([]int64, error) {
	o := client.WriteOptions{RequestID: unique("publish"), Attempts: 30}
	for {
		ids, err := client.PublishEvents(ctx, conn, events, o)
		if status.Code(err) != codes.Canceled || ctx.Err() != nil {
			return ids, err
		}
	}
}

// The follow stream outlives its server: after 10 events the service
// process is sent SIGTERM (it ends the stream UNAVAILABLE), 15 more are
// published meanwhile, and the test server starts a new process on the
// same port. StreamEvents must hand over all 35, once each, in order.
func TestFollowSurvivesASigtermOfItsServer(t *testing.T) {
	target, ctx := env(t, "ORDERSTREAM_RESTART_TARGET"), timeout(t)
	pid, err := strconv.Atoi(env(t, "ORDERSTREAM_RESTART_PID"))
	if err != nil {
		t.Fatal(err)
	}
	conn := dial(t, target, client.Options{Insecure: true})
	subject := unique("/go/follow")
	published, err := client.PublishEvents(ctx, conn, newEvents(subject, 0, 20), client.WriteOptions{})
	if err != nil {
		t.Fatal(err)
	}
	type publishing struct {
		ids []int64
		err error
	}
	later := make(chan publishing, 1)
	// Reconnects: each failed attempt waits up to 2 s, and a new service
	// process takes a few seconds to serve on this shared machine.
	o := client.StreamOptions{Subject: subject, Follow: true, Reconnects: 30}
	received, err := collect(ctx, conn, o, 35, func(ids []int64) {
		if len(ids) != 10 {
			return
		}
		if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
			t.Error(err)
		}
		go func() {
			ids, err := publishUntilTaken(ctx, conn, newEvents(subject, 20, 15))
			later <- publishing{ids, err}
		}()
	})
	if err != nil {
		t.Fatal(err)
	}
	more := <-later
	if more.err != nil {
		t.Fatal(more.err)
	}
	published = append(published, more.ids...)
	if !reflect.DeepEqual(received, published) {
		t.Fatalf("received %v\npublished %v", received, published)
	}
}

// Every AckEvery events the last one handled is acknowledged: a consumer
// that stops at the 7th of 12 events (5 acknowledged) has the next one
// start at the 6th, with no gap, and one that reaches the live end is
// acknowledged that far.
func TestConsumeEventsResumesAfterWhatItAcknowledged(t *testing.T) {
	conn, ctx := plain(t), timeout(t)
	consumer, subject := unique("go-consumer"), unique("/go/consume")
	ids, err := client.PublishEvents(ctx, conn, newEvents(subject, 0, 12), client.WriteOptions{})
	if err != nil {
		t.Fatal(err)
	}
	stub := eventsv1.NewEventServiceClient(conn)
	position := func() int64 {
		found, err := stub.GetConsumer(ctx, &eventsv1.GetConsumerRequest{Name: consumer})
		if err != nil {
			t.Fatal(err)
		}
		return found.Position
	}
	o := client.ConsumeOptions{Consumer: consumer, Subject: subject, AckEvery: 5}
	var received []int64
	errStop := fmt.Errorf("stop")
	err = client.ConsumeEvents(ctx, conn, o, func(event *eventsv1.Event) error {
		received = append(received, event.Id)
		if len(received) == 7 {
			return errStop
		}
		return nil
	})
	if err != errStop {
		t.Fatalf("ConsumeEvents returned %v, not handle's error", err)
	}
	if !reflect.DeepEqual(received, ids[:7]) {
		t.Fatalf("received %v, want %v", received, ids[:7])
	}
	if acked := position(); acked != ids[4] {
		t.Fatalf("acknowledged %d, want %d (the 5th event)", acked, ids[4])
	}

	following, stop := context.WithCancel(ctx)
	defer stop()
	done := make(chan error, 1)
	var resumed []int64
	go func() {
		done <- client.ConsumeEvents(following, conn, o, func(event *eventsv1.Event) error {
			resumed = append(resumed, event.Id)
			return nil
		})
	}()
	for deadline := time.Now().Add(30 * time.Second); position() != ids[11]; {
		if time.Now().After(deadline) {
			t.Fatalf("the live end (%d) was not acknowledged: %d", ids[11], position())
		}
		time.Sleep(50 * time.Millisecond)
	}
	stop()
	if err := <-done; status.Code(err) != codes.Canceled && err != context.Canceled {
		t.Fatalf("a cancelled ConsumeEvents returned %v", err)
	}
	if !reflect.DeepEqual(resumed, ids[5:]) {
		t.Fatalf("the next consumer received %v, want %v", resumed, ids[5:])
	}
}
