"""`python -m model`: describe a preset, train (or load) its models, export a bundle.

This entry point is the one module of `model` allowed to import `proto` (for `export`);
the library itself imports nothing else of ours.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from .config import GATES, PRESETS, ConfigError, get_preset
from .fractal_moe import build_model, expert_of, is_norm_param


def describe(preset_name: str) -> dict:
    """Architecture, parameter counts and adapter size of a preset (no training needed)."""
    preset = get_preset(preset_name)
    cfg = preset.model
    model = build_model(cfg, 0)
    sd = model.state_dict()
    total = sum(v.numel() for v in sd.values())
    expert = sum(v.numel() for k, v in sd.items() if expert_of(k))
    adapter = sum(v.numel() for k, v in sd.items() if is_norm_param(k))
    out = {
        "preset": preset.name,
        "params": total,
        "params_per_expert": expert // (cfg.n_layers * cfg.n_experts),
        "params_in_experts": expert,
        "expert_share": round(expert / total, 4),
        "layers": cfg.n_layers,
        "experts_per_layer": cfg.n_experts,
        "d_model": cfg.d_model,
        "d_ff": cfg.d_ff,
        "n_heads": cfg.n_heads,
        "top_k": cfg.top_k,
        "vocab_size": cfg.vocab_size,
        "context": cfg.context,
        "adapter_params": adapter,
        "adapter_bytes": adapter * 2,  # fp16 on the wire
    }
    try:
        from .codecs import codec_sizes
    except ImportError:  # codecs arrive with the compression work; describe stays usable without them
        return out
    out["codecs"] = codec_sizes(sd)
    return out


def _print_describe(d: dict) -> None:
    print(f"FractalMoE preset {d['preset']}: {d['layers']} blocks x {d['experts_per_layer']} experts, "
          f"top-{d['top_k']} router, d_model {d['d_model']}, d_ff {d['d_ff']}, vocab {d['vocab_size']}")
    print(f"  parameters      {d['params']:>12,}")
    print(f"  per expert      {d['params_per_expert']:>12,}")
    print(f"  in experts      {d['params_in_experts']:>12,}  ({100 * d['expert_share']:.1f}%)")
    print(f"  adapter         {d['adapter_params']:>12,} params = {d['adapter_bytes']:,} bytes (fp16)")
    if "codecs" in d:
        print("  codec            payload bytes  bits/expert weight")
        for name, c in d["codecs"].items():
            print(f"  {name:<16} {c['bytes']:>12,}   {c['bits_per_expert_weight']:.3f}")


def cmd_train(args: argparse.Namespace) -> int:
    """Train or load every model of a preset and write DIR/metrics.json."""
    from .pipeline import Suite

    preset = get_preset(args.preset)
    if args.gate is not None:  # the same preset with another expert gate: to compare regimes
        preset = dataclasses.replace(preset, model=dataclasses.replace(preset.model, gate=args.gate))
    preset = preset.with_base_steps(args.base_steps)
    suite = Suite(preset, args.seed, use_cache=not args.no_cache, corpus_dir=args.corpus,
                  corpus_chars=args.corpus_chars, pretrain_corpus=args.corpus_pretrain, device=args.device)
    t0 = time.perf_counter()
    suite.build_all()
    reliance = suite.reliance()
    metrics = {"preset": suite.preset.name, "seed": args.seed, "device": suite.device.type,
               "gate": suite.preset.model.gate, "base_steps": suite.preset.base.steps,
               "pretrained_on": list(suite.pretrain), "models": suite.evaluate_all(),
               "expert_reliance": reliance["texts"], "expert_usage_divergence": reliance["usage_divergence"],
               "timings": suite.timings, "wall_seconds": round(time.perf_counter() - t0, 2)}
    if args.codecs:
        from .quality import codec_quality

        metrics["codecs"] = codec_quality(suite, progress=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    base = metrics["models"]["base"]
    print(f"wrote {out / 'metrics.json'}")
    for name, m in base.items():
        floor = "" if m["bpc_floor"] is None else f"  floor {m['bpc_floor']:.3f}"
        zlib = "" if "zlib_bpc" not in m else f"  zlib {m['zlib_bpc']:.3f}"
        print(f"  base on {name:<16} ppl {m['ppl']:>9.3f}  bpc {m['bpc']:.3f}{floor}{zlib}")
    print("  expert reliance (ppl ratio): text, all experts zeroed, each block's experts averaged, "
          "drop one (median/max)")
    for name, r in reliance["texts"].items():
        print(f"    {name:<14} x{r['zeroed_ratio']:<8.2f} x{r['averaged_ratio']:<8.2f} "
              f"x{r['drop_one']['median_ratio']:.3f}/x{r['drop_one']['max_ratio']:.3f}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a bundle of a trained model (base or a specialist) with the chosen expert codec, and
    optionally the tokenizer a coordinator serving it needs."""
    from proto.bundle import write_bundle

    from .codecs import CODECS, bundle_meta, encode_state_dict
    from .pipeline import Suite

    for c in (args.codec, args.other_codec):
        if c not in CODECS:  # refuse before training anything
            raise ValueError(f"unknown codec {c!r}; choose one of {', '.join(CODECS)}")
    suite = Suite(args.preset, args.seed, use_cache=not args.no_cache)
    if args.model != "base" and args.model not in suite.personas:  # refuse before training anything
        raise ValueError(f"unknown model {args.model!r}; choose base or a specialist: {', '.join(suite.personas)}")
    state = suite.base_state() if args.model == "base" else suite.specialist_state(args.model)
    entries = encode_state_dict(state, expert_codec=args.codec, other_codec=args.other_codec)
    meta = bundle_meta(suite.preset.model, model=args.model, expert_codec=args.codec, other_codec=args.other_codec,
                       preset=suite.preset.name, seed=args.seed)
    n = write_bundle(args.out, entries, meta)
    print(f"wrote {args.out}: {n:,} bytes, {len(entries)} tensors, model {args.model}, experts in {args.codec}")
    if args.tokenizer_out:
        Path(args.tokenizer_out).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(suite.tokenizer_path, args.tokenizer_out)
        print(f"wrote {args.tokenizer_out}: the tokenizer a coordinator serving this bundle needs (--tokenizer)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m model`."""
    ap = argparse.ArgumentParser(prog="python -m model", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("describe", help="architecture, parameter counts, adapter bytes, codec sizes")
    d.add_argument("--preset", default="small", choices=list(PRESETS))
    d.add_argument("--json", action="store_true", help="print JSON instead of a table")
    t = sub.add_parser("train", help="train or load base, specialists and adapters; write DIR/metrics.json")
    t.add_argument("--preset", default="small", choices=list(PRESETS))
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default="runs/model", help="output folder (default runs/model)")
    t.add_argument("--corpus", default=None, metavar="DIR", help="your own users' text: one sub-folder per user")
    t.add_argument("--corpus-pretrain", action="store_true",
                   help="also pretrain the tokenizer and the base on the --corpus users' training text")
    t.add_argument("--corpus-chars", type=int, default=0, metavar="N",
                   help="characters of each --corpus user's text its adapter (and, with --corpus-pretrain, "
                        "the base) trains on, spread over the user's text (default 0: the preset's, 75,000 at "
                        "small)")
    t.add_argument("--base-steps", type=int, default=0, metavar="N",
                   help="pretrain the base for N steps (default 0: the preset's, 600 at small)")
    t.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"],
                   help="where training and evaluation run (default cpu; auto takes CUDA when present)")
    t.add_argument("--no-cache", action="store_true", help="retrain even when the cache has the weights")
    t.add_argument("--gate", choices=list(GATES), default=None,
                   help="how a chosen expert's output is scaled: unit (the presets' default: experts carry "
                        "what the model knows) or prob (the Switch Transformer's router probability)")
    t.add_argument("--codecs", action="store_true", help="also measure the perplexity under every codec")
    e = sub.add_parser("export", help="write a bundle of a trained model (the base, or a specialist)")
    e.add_argument("--preset", default="small", choices=list(PRESETS))
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--codec", required=True, help="codec of the expert matrices (see `describe`)")
    e.add_argument("--other-codec", default="fp16", help="codec of the non-expert tensors (default fp16)")
    e.add_argument("--out", required=True, help="bundle file to write")
    e.add_argument("--model", default="base",
                   help="base (default) or a specialist persona (programmer, novelist, ...): whose weights")
    e.add_argument("--tokenizer-out", metavar="FILE",
                   help="also copy the models' tokenizer.json here (python -m coordinator --tokenizer FILE)")
    e.add_argument("--no-cache", action="store_true", help="retrain even when the cache has the weights")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "describe":
            info = describe(args.preset)
            print(json.dumps(info, indent=2)) if args.json else _print_describe(info)
            return 0
        if args.cmd == "train":
            return cmd_train(args)
        return cmd_export(args)
    except (ConfigError, KeyError, ValueError, OSError) as exc:
        name = type(exc).__name__
        print(f"error: {name}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
