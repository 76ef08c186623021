package client

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
)

// ServiceConfig is the service config every connection from Dial starts
// with: the very table of Python's DEFAULT_SERVICE_CONFIG (the suite checks
// that they are equal), whose comments there say why each method is or is
// not retried. In short: round_robin over a headless Service's pods; reads,
// CreateOrder and the durable consumer's calls (AckEvents never moves a
// position back, ResetConsumer sets one) retried on UNAVAILABLE and ABORTED; UpdateOrderStatus on
// UNAVAILABLE only; PublishEvents never (PublishEvents here sets a
// request_id and retries on its own); streams without a timeout, retried on
// UNAVAILABLE before their first response; retryThrottling.
//
// grpc-go before 1.40 (Debian 12 ships 1.33) applies retryPolicy only when
// the environment has GRPC_GO_RETRY=on; the helpers below retry on their own
// either way.
const ServiceConfig = `{
  "loadBalancingConfig": [{"round_robin": {}}],
  "methodConfig": [
    {
      "name": [
        {"service": "orderstream.orders.v1.OrderService", "method": "GetOrder"},
        {"service": "orderstream.orders.v1.OrderService", "method": "ListOrders"},
        {"service": "orderstream.orders.v1.OrderService", "method": "CreateOrder"},
        {"service": "orderstream.events.v1.EventService", "method": "GetEvent"},
        {"service": "orderstream.events.v1.EventService", "method": "AckEvents"},
        {"service": "orderstream.events.v1.EventService", "method": "ListConsumers"},
        {"service": "orderstream.events.v1.EventService", "method": "GetConsumer"},
        {"service": "orderstream.events.v1.EventService", "method": "ResetConsumer"}
      ],
      "timeout": "10s",
      "retryPolicy": {
        "maxAttempts": 4, "initialBackoff": "0.1s", "maxBackoff": "2s", "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE", "ABORTED"]
      }
    },
    {
      "name": [{"service": "orderstream.orders.v1.OrderService", "method": "UpdateOrderStatus"}],
      "timeout": "10s",
      "retryPolicy": {
        "maxAttempts": 4, "initialBackoff": "0.1s", "maxBackoff": "2s", "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"]
      }
    },
    {
      "name": [{"service": "orderstream.events.v1.EventService", "method": "PublishEvents"}],
      "timeout": "10s"
    },
    {
      "name": [
        {"service": "orderstream.orders.v1.OrderService", "method": "ExportOrders"},
        {"service": "orderstream.orders.v1.OrderService", "method": "ImportOrders"},
        {"service": "orderstream.events.v1.EventService", "method": "UploadEvents"},
        {"service": "orderstream.events.v1.EventService", "method": "StreamEvents"}
      ],
      "retryPolicy": {
        "maxAttempts": 4, "initialBackoff": "0.1s", "maxBackoff": "2s", "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"]
      }
    }
  ],
  "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1}
}`

// Options say how Dial reaches orderstream.
type Options struct {
	// CAFile verifies the server (the system roots when empty).
	CAFile string
	// ClientCertFile and ClientKeyFile together add a client certificate (mTLS).
	ClientCertFile, ClientKeyFile string
	// Insecure speaks plain text, for `make run` and tests only.
	Insecure bool
	// Token is sent with every call as "authorization: Bearer <token>", over
	// TLS only.
	Token string
	// ServiceConfig replaces the package's ServiceConfig when not empty.
	ServiceConfig string
}

// KeepaliveParams detect a silently dropped connection (behind Kubernetes a
// connection can vanish without a FIN): a ping every 5 minutes while calls
// are open, given 20 s to be answered. Pinging more often makes a server not
// configured for it close the connection with "too_many_pings".
var KeepaliveParams = keepalive.ClientParameters{Time: 5 * time.Minute, Timeout: 20 * time.Second}

// DialOptions are the grpc.DialOptions that Dial uses, for callers that
// dial themselves.
func DialOptions(o Options) ([]grpc.DialOption, error) {
	if (o.ClientCertFile == "") != (o.ClientKeyFile == "") {
		return nil, errors.New("client: ClientCertFile and ClientKeyFile go together")
	}
	if o.Insecure && (o.CAFile != "" || o.ClientCertFile != "") {
		return nil, errors.New("client: Insecure takes no certificates")
	}
	if o.Insecure && o.Token != "" {
		return nil, errors.New("client: a token is sent over TLS only, not with Insecure")
	}
	config := o.ServiceConfig
	if config == "" {
		config = ServiceConfig
	}
	options := []grpc.DialOption{
		grpc.WithDefaultServiceConfig(config),
		grpc.WithKeepaliveParams(KeepaliveParams),
	}
	if o.Insecure {
		return append(options, grpc.WithInsecure()), nil
	}
	tlsConfig, err := o.tlsConfig()
	if err != nil {
		return nil, err
	}
	options = append(options, grpc.WithTransportCredentials(credentials.NewTLS(tlsConfig)))
	if o.Token != "" {
		options = append(options, grpc.WithPerRPCCredentials(bearer(o.Token)))
	}
	return options, nil
}

// Dial connects to orderstream with DialOptions(o), then extra.
//
//	conn, err := client.Dial(ctx, "orderstream:50051", client.Options{CAFile: "/etc/ca.crt", Token: token})
func Dial(ctx context.Context, target string, o Options, extra ...grpc.DialOption) (*grpc.ClientConn, error) {
	options, err := DialOptions(o)
	if err != nil {
		return nil, err
	}
	return grpc.DialContext(ctx, target, append(options, extra...)...)
}

func (o Options) tlsConfig() (*tls.Config, error) {
	config := &tls.Config{MinVersion: tls.VersionTLS12}
	if o.CAFile != "" {
		pem, err := os.ReadFile(o.CAFile)
		if err != nil {
			return nil, err
		}
		config.RootCAs = x509.NewCertPool()
		if !config.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("client: no certificate in %s", o.CAFile)
		}
	}
	if o.ClientCertFile != "" {
		pair, err := tls.LoadX509KeyPair(o.ClientCertFile, o.ClientKeyFile)
		if err != nil {
			return nil, err
		}
		config.Certificates = []tls.Certificate{pair}
	}
	return config, nil
}

// bearer sends a token with every call; RequireTransportSecurity keeps it
// off plain-text connections.
type bearer string

func (t bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(t)}, nil
}

func (bearer) RequireTransportSecurity() bool { return true }
