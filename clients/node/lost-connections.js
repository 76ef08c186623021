// A lost connection is UNAVAILABLE, as gRPC's own libraries (grpc-core,
// grpc-go, grpc-js) report it. Connect's Node transport reports it in one
// of two other ways, by how Node learns of it: a socket that fails under
// a call (a reset read or write: ECONNRESET, EPIPE) as ABORTED, which on
// its servers means the client hung up; a socket that closes as CANCELED,
// since Node closes every stream on it with RST_STREAM CANCEL. Either way
// the service config's retries on UNAVAILABLE and the helpers' reconnects
// would never see a dropped connection.
//
// So a call that ends CANCELED although its caller did not cancel it is
// taken for a lost connection too. Connect reports a server's own
// RST_STREAM CANCEL alike; gRPC servers send one to cancel the calls still
// open when their shutdown grace ends, a server going away, which is what
// UNAVAILABLE says.

import { Code, ConnectError } from "@connectrpc/connect";

const SOCKET_FAILURES = new Set(["ECONNRESET", "EPIPE"]);

// Connect keeps Node's error as the cause of its own.
function socketFailed(error) {
  const seen = new Set();
  for (let cause = error; cause instanceof Error && !seen.has(cause); cause = cause.cause) {
    if (SOCKET_FAILURES.has(cause.code)) return true;
    seen.add(cause);
  }
  return false;
}

function asUnavailable(error, signal) {
  const connectError = ConnectError.from(error);
  const cancelledElsewhere = connectError.code === Code.Canceled && !signal.aborted;
  if (!cancelledElsewhere && !socketFailed(error)) return error;
  return new ConnectError(connectError.rawMessage, Code.Unavailable, connectError.metadata, undefined, error);
}

async function* messagesAsUnavailable(messages, signal) {
  try {
    yield* messages;
  } catch (error) {
    throw asUnavailable(error, signal);
  }
}

/**
 * A Connect interceptor that turns a call's lost connection into
 * UNAVAILABLE, whether it fails the call at once or a stream later on.
 * createOrderstreamClients installs it; a transport made by hand for
 * withServiceConfig wants it too.
 */
export const lostConnectionsAsUnavailable = (next) => async (request) => {
  try {
    const response = await next(request);
    if (!response.stream) return response;
    return { ...response, message: messagesAsUnavailable(response.message, request.signal) };
  } catch (error) {
    throw asUnavailable(error, request.signal);
  }
};
