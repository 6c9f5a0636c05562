"""``bigmac fit``: will a model train on a layout, and with which options? Bytes per rank, no device.

::

    bigmac fit --preset paper --pp 8 --vpp 2 --dp 16 --microbatches 64 --shard parameters \
        --recompute llm,encoder
    bigmac fit --preset paper --pp 8 --vpp 2 --dp 16 --microbatches 32,64,128 --schedule all --json
    bigmac fit --hf-config path/to/Qwen2-VL-2B-Instruct --sequence 4096 --image-tokens 1024 --pp 2
    bigmac fit --llm params=7B,hidden=4096,layers=32,vocab=32000,gated=1,ffn=11008 --sequence 4096 --pp 4

A part is ``none`` or ``key=value`` fields of :class:`~lightning_bigmac.sizing.spec.PartSpec` (the
LLM's also take ``vocab``, ``tied``, ``embedding_params``, ``head_params``); counts take K, M, B, T.
``--preset`` or ``--hf-config`` gives a base model that ``--encoder``, ``--llm`` and ``--generator``
replace part by part.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from lightning_bigmac.schedule import SCHEDULES, OpCosts

from .estimate import GIB, PRECISION_BYTES, FitEstimate, MemoryOptions, estimate_fit
from .report import fit_json, fit_table, rank_table
from .spec import PAPER_MODEL, PAPER_WORKLOAD, LLMSpec, ModelSpec, PartSpec, Workload

__all__ = ["add_fit_parser"]

_PRESETS = {"paper": (PAPER_MODEL, PAPER_WORKLOAD)}


def _part_fields(text: str) -> dict[str, str] | str:
    if text.strip().lower() == "none":
        return "none"
    pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
    if any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(
            f"{text!r}: write key=value pairs like params=1.3B,hidden=1536,layers=45"
        )
    return {k.strip(): v.strip() for k, v in pairs}


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give an int or several like 32,64,128") from None


def _shard(text: str) -> str | dict[str, str]:
    if "=" not in text:
        return text
    return dict(p.split("=", 1) for p in text.split(",") if p.strip())


def add_fit_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``fit`` subcommand to the ``bigmac`` command line."""
    p = sub.add_parser("fit", help="per-rank memory of a model on a pipeline layout, before any GPU is used")
    m = p.add_argument_group("model (a base, then parts replaced one by one)")
    m.add_argument(
        "--preset", choices=sorted(_PRESETS), help="paper: Qwen3-30B-A3B + 1.3B ViT + 20B MMDiT, 8K"
    )
    m.add_argument("--hf-config", type=Path, help="a transformers config.json or save_pretrained directory")
    for part in ("encoder", "llm", "generator"):
        m.add_argument(
            f"--{part}", type=_part_fields, metavar="none|KEY=VALUE,...", help=f"the {part}'s sizes"
        )
    w = p.add_argument_group("microbatch (every microbatch of the step alike)")
    w.add_argument("--sequence", type=int, help="LLM positions per microbatch")
    w.add_argument("--image-tokens", type=int, help="of those, positions filled by the encoder's outputs")
    w.add_argument(
        "--encoder-tokens", type=int, help="tokens through the encoder (default: image tokens x merge)"
    )
    w.add_argument("--generator-tokens", type=int, help="tokens through the generator")
    w.add_argument("--activation-bytes", type=int, help="bytes per activation element (default 2)")
    w.add_argument(
        "--logits-bytes", type=int, help="bytes per logit the loss keeps (default 4; 0: fused loss)"
    )
    lay = p.add_argument_group("layout")
    lay.add_argument("--schedule", choices=(*SCHEDULES, "all"), default="bigmac", help="all: one row each")
    lay.add_argument("--pp", type=int, default=4, help="pipeline ranks P")
    lay.add_argument("--vpp", type=int, default=1, help="virtual chunks per rank V")
    lay.add_argument("--dp", type=int, default=1, help="data-parallel pipelines D (P x D ranks)")
    lay.add_argument(
        "--microbatches", type=_ints, help="microbatches M per step, or several: 32,64 (default 4P)"
    )
    lay.add_argument("--frozen", default="", metavar="PART[,PART]", help="parts without trainable parameters")
    lay.add_argument(
        "--costs", type=Path, help="cost file or runtime profile for step times (default: unit costs)"
    )
    mem = p.add_argument_group("memory")
    mem.add_argument("--precision", choices=sorted(PRECISION_BYTES), default="bf16")
    mem.add_argument(
        "--shard", type=_shard, default="none", metavar="LEVEL|PART=LEVEL,...",
        help="none, optimizer, gradients or parameters (ZeRO-1/2/3 arithmetic), for all parts or per part",
    )  # fmt: skip
    mem.add_argument("--recompute", default="", metavar="PART[,PART]", help="parts whose layers recompute")
    mem.add_argument("--device-memory", type=float, default=80.0, metavar="GIB", help="GiB per device")
    mem.add_argument(
        "--reserve", type=float, default=4.0, metavar="GIB", help="GiB set aside (context, NCCL)"
    )
    p.add_argument("--json", action="store_true", help="print JSON (bytes) instead of tables")
    p.set_defaults(run=run_fit)


def _model(args: argparse.Namespace) -> tuple[ModelSpec, Workload | None]:
    if args.preset and args.hf_config:
        raise ValueError("give --preset or --hf-config, not both")
    model, wl = _PRESETS[args.preset] if args.preset else (None, None)
    if args.hf_config:
        from .hf_sizes import spec_from_hf  # needs transformers

        model = spec_from_hf(args.hf_config)
    if model is None and args.llm is None:
        raise ValueError("no model: give --preset paper, --hf-config PATH or --llm params=...,hidden=...,...")
    changes = {}
    for part, cls in (("encoder", PartSpec), ("llm", LLMSpec), ("generator", PartSpec)):
        given = getattr(args, part)
        if given == "none" and part == "llm":
            raise ValueError("--llm none: every model has an LLM; give its sizes or a base model")
        if given is not None:
            changes[part] = None if given == "none" else cls.from_fields(part, given)
    if model is None:
        model = ModelSpec(**changes)
    else:
        model = replace(model, **changes, name=model.name + (" (parts replaced)" if changes else ""))
    return model, wl


def _workload(args: argparse.Namespace, base: Workload | None, model: ModelSpec) -> Workload:
    given = {
        "sequence": args.sequence, "image_tokens": args.image_tokens, "encoder_tokens": args.encoder_tokens,
        "generator_tokens": args.generator_tokens, "activation_bytes": args.activation_bytes,
        "logits_bytes": args.logits_bytes,
    }  # fmt: skip
    given = {k: v for k, v in given.items() if v is not None}
    if base is not None:
        return replace(base, **given).resolved(model)
    if "sequence" not in given:
        raise ValueError("give --sequence (LLM positions per microbatch), and --image-tokens with an encoder")
    return Workload(**given).resolved(model)


def run_fit(args: argparse.Namespace) -> int:
    """Estimate every requested layout and print the tables (or JSON)."""
    model, base = _model(args)
    wl = _workload(args, base, model)
    costs = OpCosts.load(args.costs) if args.costs else None
    costs_name = str(args.costs) if args.costs else "unit costs (OpCosts defaults)"
    options = MemoryOptions(
        precision=args.precision, shard=args.shard, recompute=args.recompute,
        device_memory=args.device_memory * GIB, reserved=args.reserve * GIB,
    )  # fmt: skip
    schedules = SCHEDULES if args.schedule == "all" else (args.schedule,)
    estimates: list[FitEstimate] = []
    skipped: dict[str, str] = {}
    for m in args.microbatches or [4 * args.pp]:
        for schedule in schedules:
            try:
                estimate = estimate_fit(
                    model, wl, schedule=schedule, pp=args.pp, vpp=args.vpp, dp=args.dp, microbatches=m,
                    frozen=args.frozen, options=options, costs=costs,
                )  # fmt: skip
            except ValueError as err:
                if len(schedules) == 1:
                    raise
                skipped[f"{schedule} M={m}"] = str(err)
                continue
            estimates.append(estimate)
    if args.json:
        print(json.dumps(fit_json(model, wl, estimates, skipped, costs_name), indent=1))
    elif len(estimates) == 1:
        print(rank_table(model, wl, estimates[0], costs_name))
    else:
        print(fit_table(model, wl, estimates, skipped, costs_name))
    return 0
