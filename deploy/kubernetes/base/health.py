"""The Plait coordinator's Kubernetes probe: a grpc.health.v1 Check over the pod's own mTLS port.

Deploy layer (deploy/kubernetes): mounted from a ConfigMap and run by the kubelet as an exec
probe. The kubelet's built-in gRPC probe speaks plaintext only, and with ``--tls-client-ca``
every connection to the coordinator's port must present a certificate from the Plait CA, so
the check runs in the pod instead, dialling 127.0.0.1 with the coordinator's own certificate
(``plait certs`` and the cert-manager component give it the clientAuth usage).

``--mode=leader`` exits 0 only when the server-wide status (service ``""``) is SERVING: the
coordinator won the election and replayed the journal (``coordinator/server.py`` sets every
status SERVING then, NOT_SERVING while it is a standby and from the start of a shutdown).
``--mode=alive`` exits 0 on any answer, SERVING or NOT_SERVING, so a healthy standby passes;
it fails only when the gRPC server does not answer within ``--timeout``.

Needs grpcio and grpcio-health-checking, which the image's venv has (``python3`` on its PATH).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one check; returns the exit status (0: pass)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("leader", "alive"), required=True)
    p.add_argument("--address", default="127.0.0.1:7450", help="the coordinator's gRPC port")
    p.add_argument("--service", default="", help="health service name ('': the whole server)")
    p.add_argument("--ca", required=True, help="the CA of --tls-client-ca")
    p.add_argument("--cert", required=True, help="a certificate that CA signed (clientAuth)")
    p.add_argument("--key", required=True, help="the key of --cert")
    p.add_argument("--server-name", required=True, help="a DNS name the coordinator's cert lists")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    args = p.parse_args(argv)
    creds = grpc.ssl_channel_credentials(_read(args.ca), _read(args.key), _read(args.cert))
    options = [("grpc.ssl_target_name_override", args.server_name)]
    request = health_pb2.HealthCheckRequest(service=args.service)
    with grpc.secure_channel(args.address, creds, options) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=args.timeout)
        except grpc.RpcError as e:
            print(f"{args.address}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    if args.mode == "alive" or reply.status == health_pb2.HealthCheckResponse.SERVING:
        return 0
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {status}: a standby, or shutting down", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
