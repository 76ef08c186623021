"""What the test modules share, by job (each module says what it holds):

requests       request builders: unique names, CreateOrder requests, orders
               to import, a client stream of requests
status         google.rpc.Status details of a failed call
polling        waiting for states nothing announces
apps           a second in-process service; its pool; an environment
               without the development switch
database       the cluster behind the service's back: TLS for admin
               connections, row counts, locks, pg_stat_activity, server log
calls          calls several modules make the same way (publish, read a
               stream, export)
processes      tests of a real `python -m service` process (the process
               itself is devcluster/process.py's `ServiceProcess`)
tokens         bearer tokens and tokens files
shell          running a shell command line
pgbouncer      a real PgBouncer in front of the cluster
tcp_proxy      a TCP proxy that can pause, blackhole and reset connections
client_identity  client certificates for mTLS
revocation     a CA whose key the test keeps, and the CRLs it signs
input_tally    the hostile-input tally (a pytest plugin)

Fixtures are in tests/fixtures/, registered by tests/conftest.py.
"""
