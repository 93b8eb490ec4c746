"""`python -m proto.bundle inspect|verify FILE`: show a bundle's manifest, or check it end to end."""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from .errors import BundleError
from .format import DEFAULT_CHUNK_SIZE, HEADER_SIZE, Manifest
from .reader import read_bundle_verified, read_manifest
from .writer import iter_chunks


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def describe_manifest(m: Manifest, file_size: int) -> dict:
    """JSON-able summary: header, meta, every tensor with its bits per weight, totals per codec."""
    per_codec: dict[str, dict] = defaultdict(lambda: {"tensors": 0, "weights": 0, "bytes": 0})
    tensors = []
    for e in m.entries:
        tensors.append({"name": e.name, "codec": e.codec, "shape": list(e.shape), "dtype": e.dtype, "meta": e.meta,
                        "offset": e.offset, "length": e.length, m.digest_name: e.digest,
                        "bits_per_weight": round(e.bits_per_weight, 4)})
        c = per_codec[e.codec]
        c["tensors"] += 1
        c["weights"] += e.numel
        c["bytes"] += e.length
    for c in per_codec.values():
        c["bits_per_weight"] = round(8 * c["bytes"] / max(c["weights"], 1), 4)
    weights = sum(e.numel for e in m.entries)
    return {"version": m.version, "total_bytes": m.total_size, "file_bytes": file_size, "header_bytes": HEADER_SIZE,
            "manifest_bytes": m.manifest_length, "payload_bytes": m.payload_length, "meta": m.meta,
            "tensors": tensors, "codecs": dict(per_codec),
            "all_in_bits_per_weight": round(8 * m.total_size / max(weights, 1), 4)}


def _print_inspect(path: str, d: dict) -> None:
    print(f"{path}: bundle version {d['version']}, {d['total_bytes']:,} bytes (header {d['header_bytes']}, "
          f"manifest {d['manifest_bytes']:,}, payload {d['payload_bytes']:,}), {len(d['tensors'])} tensors")
    if d["file_bytes"] != d["total_bytes"]:
        print(f"note: the file holds {d['file_bytes']:,} bytes; run `verify` to check it")
    print(f"meta: {json.dumps(d['meta'], sort_keys=True)}")
    width = max([len(t["name"]) for t in d["tensors"]] + [4])
    print(f"  {'name':<{width}}  {'codec':<18}  {'shape':>11}  {'bytes':>11}  bits/weight")
    for t in d["tensors"]:
        print(f"  {t['name']:<{width}}  {t['codec']:<18}  {_shape(tuple(t['shape'])):>11}  {t['length']:>11,}  "
              f"{t['bits_per_weight']:.4f}")
    print("by codec:")
    for name, c in sorted(d["codecs"].items()):
        print(f"  {name:<18}  {c['tensors']:>5} tensors  {c['weights']:>12,} weights  {c['bytes']:>12,} bytes  "
              f"{c['bits_per_weight']:.4f} bits/weight")
    print(f"all-in: {d['all_in_bits_per_weight']:.4f} bits per weight (whole bundle / all weights)")


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print the manifest with sizes and bits per weight per tensor."""
    data = Path(args.file).read_bytes()
    d = describe_manifest(read_manifest(data), len(data))
    print(json.dumps(d, indent=2)) if args.json else _print_inspect(args.file, d)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Read the file chunk by chunk as a node would, checking every checksum; 0 when intact."""
    data = Path(args.file).read_bytes()
    bundle = read_bundle_verified(iter_chunks(data, args.chunk_size), allowed_codecs=args.codec or None)
    print(f"ok: {args.file}: {len(bundle)} tensors, {len(data):,} bytes, every checksum verified")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m proto.bundle`."""
    ap = argparse.ArgumentParser(prog="python -m proto.bundle", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("inspect", help="print the manifest: tensors, codecs, sizes, bits per weight")
    i.add_argument("file", help="bundle file")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    v = sub.add_parser("verify", help="check the whole bundle; exit 0 when intact, else 1 with one line saying why")
    v.add_argument("file", help="bundle file")
    v.add_argument("--codec", action="append", metavar="NAME",
                   help="accept only these codecs (repeatable; default: any codec name)")
    v.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                   help=f"read in chunks of this many bytes (default {DEFAULT_CHUNK_SIZE})")
    args = ap.parse_args(argv)
    try:
        return cmd_inspect(args) if args.cmd == "inspect" else cmd_verify(args)
    except BundleError as exc:
        print(f"{args.file}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{args.file}: cannot read: {exc.strerror or exc}", file=sys.stderr)
        return 2
