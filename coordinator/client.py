"""`python -m coordinator.client`: a command-line client for every Federation RPC.

The token comes from --token or $FRACTAL_TOKEN, the address from --address or $FRACTAL_ADDRESS.
Errors are one line on stderr, `error: <STATUS>: <message>`, and exit status 1.

Mixture components (--mix, repeatable) are written MODEL[@NODE][+USER]: MODEL is a specialist
name or "base", NODE pins a node, USER applies that user's adapter.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import grpc
from google.protobuf import json_format

from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as rpc
from proto.auth_metadata import bearer_metadata

_MODES = {"uniform": pb.MIXTURE_MODE_UNIFORM, "posterior": pb.MIXTURE_MODE_POSTERIOR}
_STATES = {"healthy": pb.NODE_STATE_HEALTHY, "draining": pb.NODE_STATE_DRAINING, "down": pb.NODE_STATE_DOWN,
           "registered": pb.NODE_STATE_REGISTERED}
_UPLOAD_CHUNK = 64 * 1024  # well under any sane message limit


class UsageError(ValueError):
    """A command line the client cannot turn into a request."""


def parse_component(spec: str) -> pb.MixtureComponent:
    """MODEL[@NODE][+USER] -> MixtureComponent."""
    rest, _, user = spec.partition("+")
    model, _, node = rest.partition("@")
    if not model:
        raise UsageError(f"mixture component {spec!r} has no model (write base or a specialist name)")
    return pb.MixtureComponent(specialist="" if model == "base" else model, node_id=node, adapter_user_id=user)


def mixture_from_args(args: argparse.Namespace) -> pb.MixtureSpec | None:
    """The MixtureSpec of --mix/--mode/--prior, or None without --mix."""
    if not args.mix:
        if args.prior:
            raise UsageError("--prior needs --mix")
        return None
    return pb.MixtureSpec(components=[parse_component(s) for s in args.mix], mode=_MODES[args.mode],
                          prior=args.prior or [])


def _show(message, as_json: bool = True) -> None:
    print(json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2))


def _text_arg(args: argparse.Namespace) -> str:
    if args.file:
        return Path(args.file).read_text(encoding="utf-8")
    if args.text is None:
        raise UsageError("give the text as an argument or with --file")
    return args.text


def cmd_score(stub: rpc.FederationStub, args, call) -> None:
    """Score a text."""
    request = pb.ScoreRequest(user_id=args.user or "", text=_text_arg(args), use_base=args.base,
                              omit_token_strings=args.omit_tokens)
    mixture = mixture_from_args(args)
    if mixture is not None:
        request.mixture.CopyFrom(mixture)
    reply = call(stub.Score, request)
    if args.json:
        _show(reply)
        return
    print(f"model {reply.model}  node {reply.node_id or '-'}  tokens {len(reply.token_ids)}  "
          f"perplexity {reply.perplexity:.4f}  bits/char {reply.bits_per_char:.4f}"
          + ("  (failed over)" if reply.failed_over else ""))
    for c in reply.components:
        spec = (c.component.specialist or "base") + (f"+{c.component.adapter_user_id}" if c.component.adapter_user_id
                                                     else "")
        print(f"  component {spec} on {c.node_id}: perplexity {c.perplexity:.4f}  final weight {c.final_weight:.4f}")
    if args.tokens:
        for i, (tid, lp) in enumerate(zip(reply.token_ids, reply.logprobs)):
            piece = reply.tokens[i] if i < len(reply.tokens) else ""
            shares = " ".join(f"{c.attribution[i]:.3f}" for c in reply.components)
            print(f"  {i:5d} {tid:6d} {lp:9.4f} {piece!r} {shares}")


def cmd_generate(stub, args, call) -> None:
    """Generate text, printed as it arrives."""
    request = pb.GenerateRequest(user_id=args.user or "", prompt=_text_arg(args), max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_k=args.top_k, seed=args.seed, use_base=args.base,
                                 wire_top_k=args.wire_top_k)
    mixture = mixture_from_args(args)
    if mixture is not None:
        request.mixture.CopyFrom(mixture)
    for chunk in call(stub.Generate, request):
        if args.json:
            print(json_format.MessageToJson(chunk, preserving_proto_field_name=True, indent=None))
        else:
            print(chunk.text, end="", flush=True)
    if not args.json:
        print()


def cmd_put_user(stub, args, call) -> None:
    """Create or update a user; prints the new token when one is issued."""
    request = pb.PutUserRequest(user_id=args.user_id, persona=args.persona or "", rotate_token=args.rotate_token)
    if args.adapter:
        data = Path(args.adapter).read_bytes()
        request.adapter.CopyFrom(pb.Adapter(user_id=args.user_id, format="safetensors", data=data,
                                            sha256=hashlib.sha256(data).digest()))
    _show(call(stub.PutUser, request))


def cmd_put_bundle(stub, args, call) -> None:
    """Upload a bundle file."""
    path = Path(args.path)
    data = path.read_bytes()
    sha = hashlib.sha256(data).digest()

    def chunks():
        for offset in range(0, max(len(data), 1), _UPLOAD_CHUNK):
            first = offset == 0
            yield pb.BundleChunk(name=args.name if first else "", offset=offset,
                                 data=data[offset:offset + _UPLOAD_CHUNK], total_size=len(data) if first else 0,
                                 sha256=sha if first else b"", model=(args.model or "") if first else "",
                                 codec=(args.codec or "") if first else "")
    _show(call(stub.PutBundle, chunks()))


def cmd_adapter(stub, args, call) -> None:
    """Download a user's adapter."""
    reply = call(stub.GetAdapter, pb.GetAdapterRequest(user_id=args.user))
    if args.out:
        Path(args.out).write_bytes(reply.data)
        print(f"{len(reply.data)} bytes written to {args.out} (sha256 {reply.sha256.hex()})")
    else:
        print(json.dumps({"user_id": reply.user_id, "format": reply.format, "bytes": len(reply.data),
                          "sha256": reply.sha256.hex()}))


def _simple(method: str, build):
    def run(stub, args, call) -> None:
        _show(call(getattr(stub, method), build(args)))
    run.__doc__ = f"Call {method}."
    return run


COMMANDS = {
    "score": cmd_score,
    "generate": cmd_generate,
    "nodes": _simple("ListNodes", lambda a: pb.ListNodesRequest(
        state=_STATES[a.state] if a.state else pb.NODE_STATE_UNSPECIFIED)),
    "users": _simple("ListUsers", lambda a: pb.ListUsersRequest(persona=a.persona or "")),
    "stats": _simple("GetStats", lambda a: pb.GetStatsRequest(user_id=a.user or "")),
    "adapter": cmd_adapter,
    "put-user": cmd_put_user,
    "delete-user": _simple("DeleteUser", lambda a: pb.DeleteUserRequest(user_id=a.user_id)),
    "put-bundle": cmd_put_bundle,
    "bundles": _simple("ListBundles", lambda a: pb.ListBundlesRequest()),
    "assign": _simple("AssignUser", lambda a: pb.AssignUserRequest(user_id=a.user_id, node_id=a.node or "")),
    "set-node-state": _simple("SetNodeState",
                              lambda a: pb.SetNodeStateRequest(node_id=a.node_id, state=_STATES[a.state])),
    "routing": _simple("GetRoutingStats", lambda a: pb.GetRoutingStatsRequest(node_id=a.node or "")),
    "reset-stats": _simple("ResetStats", lambda a: pb.ResetStatsRequest()),
    "soup": _simple("InstantiateSoup", lambda a: pb.SoupRequest(
        node_id=a.node_id, domain_weights=a.weights or [],
        sample_text=Path(a.sample_file).read_text(encoding="utf-8") if a.sample_file else "")),
}


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m coordinator.client", description=__doc__.split("\n\n")[0])
    p.add_argument("--address", default=os.environ.get("FRACTAL_ADDRESS", "localhost:50051"),
                   help="coordinator host:port (default $FRACTAL_ADDRESS or localhost:50051)")
    p.add_argument("--token", default=os.environ.get("FRACTAL_TOKEN"), help="bearer token (default $FRACTAL_TOKEN)")
    p.add_argument("--tls-ca", help="PEM CA certificate: connect with TLS")
    p.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds (default 60)")
    p.add_argument("--json", action="store_true", help="print replies as JSON")
    sub = p.add_subparsers(dest="command", required=True)

    def text_cmd(name: str, help_: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help_)
        s.add_argument("text", nargs="?", help="the text (or --file)")
        s.add_argument("--file", help="read the text from this file")
        s.add_argument("--user", help="user id (empty: the base model)")
        s.add_argument("--base", action="store_true", help="use the base model even if the user has an adapter")
        s.add_argument("--mix", action="append", help="mixture component MODEL[@NODE][+USER] (repeat)")
        s.add_argument("--mode", choices=sorted(_MODES), default="uniform", help="mixture weighting")
        s.add_argument("--prior", type=float, nargs="+", help="posterior prior, one per component")
        return s

    s = text_cmd("score", "per-token log-probs, perplexity, bits per char")
    s.add_argument("--tokens", action="store_true", help="print every token's log-prob (and attribution)")
    s.add_argument("--omit-tokens", action="store_true", help="ask the server not to send token strings")
    s = text_cmd("generate", "generate text (streamed)")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--wire-top-k", type=int, default=0, help="mixtures: ship top-k distributions (0 = full)")
    s = sub.add_parser("nodes", help="list nodes")
    s.add_argument("--state", choices=sorted(_STATES))
    s = sub.add_parser("users", help="list users")
    s.add_argument("--persona")
    s = sub.add_parser("stats", help="bytes by kind and by node")
    s.add_argument("--user", help="admin: restrict to one user's requests")
    s = sub.add_parser("adapter", help="download a user's adapter")
    s.add_argument("--user", required=True)
    s.add_argument("--out", help="write the blob here")
    s = sub.add_parser("put-user", help="admin: create/update a user")
    s.add_argument("user_id")
    s.add_argument("--persona")
    s.add_argument("--adapter", help="safetensors adapter file to upload")
    s.add_argument("--rotate-token", action="store_true")
    s = sub.add_parser("delete-user", help="admin: delete a user")
    s.add_argument("user_id")
    s = sub.add_parser("put-bundle", help="admin: upload a bundle")
    s.add_argument("name")
    s.add_argument("path")
    s.add_argument("--model", help='"base" or a specialist name')
    s.add_argument("--codec")
    sub.add_parser("bundles", help="admin: list bundles")
    s = sub.add_parser("assign", help="admin: place a user's adapter on a node")
    s.add_argument("user_id")
    s.add_argument("--node", help="target node (default: routing chooses)")
    s = sub.add_parser("set-node-state", help="admin: drain, mark down or healthy")
    s.add_argument("node_id")
    s.add_argument("state", choices=["healthy", "draining", "down"])
    s = sub.add_parser("routing", help="admin: routing histograms")
    s.add_argument("--node")
    sub.add_parser("reset-stats", help="admin: zero the byte counters")
    s = sub.add_parser("soup", help="admin: a Soup-of-Experts node instantiates the specialist for "
                                    "domain weights (given, or estimated from a sample of text)")
    s.add_argument("node_id")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--weights", type=float, nargs="+", metavar="H", help="domain weights, one per bank domain")
    g.add_argument("--sample-file", help="a text sample of the target users: the node estimates h from it")
    return p


def open_channel(address: str, tls_ca: str | None) -> grpc.Channel:
    """A blocking channel, TLS when a CA certificate is given."""
    if tls_ca:
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()))
    return grpc.insecure_channel(address)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    metadata = bearer_metadata(args.token) if args.token else ()

    def call(method, request):
        return method(request, metadata=metadata, timeout=args.timeout)

    try:
        with open_channel(args.address, args.tls_ca) as channel:
            COMMANDS[args.command](rpc.FederationStub(channel), args, call)
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    except (UsageError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
