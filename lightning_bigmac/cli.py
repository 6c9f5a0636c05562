"""The ``bigmac`` command line.

``bigmac plan``: build (or load) a plan, prove it, simulate it and draw it::

    bigmac plan --schedule bigmac --pp 4 --vpp 2 --microbatches 64 --png runs/plan/bigmac.png
    bigmac plan --schedule bigmac --pp 4 --vpp 2 --microbatches 64 --encoder-warmup 3 --llm-warmup group
    bigmac plan --schedule bigmac --pp 4 --microbatches 16 --frozen encoder   # a frozen ViT: no EB ops
    bigmac plan --from-json plan.json --costs profile.json

``bigmac consolidate``: turn a checkpoint directory into the one-file checkpoint a one-process run
would have saved (weights, optimizer state, loops): ``MyModule.load_from_checkpoint`` reads it and
``Trainer(strategy="auto").fit(..., ckpt_path=...)`` resumes from it::

    bigmac consolidate runs/x/checkpoints/epoch=0-step=100.ckpt runs/x/full.ckpt

``bigmac fit``: per-rank memory (weights, gradients, optimizer states, activations, buffers) of a
model on a layout, and whether it fits a device (docs/scaling.md)::

    bigmac fit --preset paper --pp 8 --vpp 2 --dp 16 --microbatches 64 --shard optimizer --recompute llm

``bigmac export-hf``: write a checkpoint's transformers model as a ``save_pretrained`` directory
(needs ``transformers``; the config is read from the run's hyper-parameters unless ``--config``)::

    bigmac export-hf runs/x/checkpoints/last.ckpt runs/x/hf --config path/to/pretrained
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .schedule import SCHEDULES, OpCosts, Plan, PlanError, Simulation, build_plan, simulate
from .schedule.orders import megatron_warmup
from .schedule.plan import MODULES
from .sizing.command import add_fit_parser

__all__ = ["main"]


def _warmup(text: str) -> str | int | list[int]:
    if text in ("auto", "minimal", "group"):
        return text
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use auto, minimal, group, an int, or one int per rank like 3,3,2,1"
        ) from None
    return values[0] if len(values) == 1 else values


def _frozen(text: str) -> frozenset[str]:
    names = frozenset(n.strip() for n in text.split(",") if n.strip())
    unknown = sorted(names - set(MODULES))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"{text!r}: name modules among {', '.join(MODULES)}, like encoder,llm"
        )
    return names


def _plan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="build, validate, simulate and draw one step's schedule")
    p.add_argument("--schedule", choices=SCHEDULES, default="bigmac")
    p.add_argument("--pp", type=int, default=4, help="pipeline ranks P")
    p.add_argument("--vpp", type=int, default=1, help="virtual chunks per rank V")
    p.add_argument("--microbatches", type=int, default=None, help="microbatches M per step (default 4P)")
    p.add_argument("--no-encoder", action="store_true", help="a text-only step (no encoder work)")
    p.add_argument("--no-generator", action="store_true", help="a step without generator work")
    p.add_argument(
        "--frozen", type=_frozen, default=frozenset(), metavar="MODULE[,MODULE]",
        help="modules without trainable parameters (encoder, llm, generator): their backward ops are dropped",
    )  # fmt: skip
    p.add_argument(
        "--encoder-warmup", type=int, default=None, metavar="W", help="bigmac: warm encoder groups"
    )
    p.add_argument(
        "--llm-warmup", type=_warmup, default="auto", metavar="auto|minimal|group|N|N,N,..",
        help="bigmac/ideal: extra LLM warm-up forwards per rank",
    )  # fmt: skip
    p.add_argument(
        "--held-columns", type=int, default=None, metavar="K",
        help="bigmac_zb: encoder (and generator) microbatches a rank may hold at once",
    )  # fmt: skip
    p.add_argument(
        "--weight-deferral", type=int, default=None, metavar="D",
        help="bigmac_zb: LLM units a rank may hold beyond 1F1B's peak for deferred weight gradients",
    )  # fmt: skip
    p.add_argument("--costs", type=Path, help="cost file (OpCosts fields as JSON) or a runtime profile")
    p.add_argument(
        "--from-json", type=Path, help="load a plan in the JSON exchange format instead of building"
    )
    p.add_argument("--json", type=Path, help="write the plan and its simulation as JSON")
    p.add_argument("--png", type=Path, help="write the Gantt chart (the suffix picks PNG, SVG or PDF)")
    p.add_argument("--memory-png", type=Path, help="write live activations over time")
    p.add_argument("--print-plan", action="store_true", help="print every rank's op list")
    p.set_defaults(run=_run_plan)


def _reference(plan: Plan, schedule: str, costs: OpCosts) -> Simulation | None:
    """The same step under another schedule, for comparison; None if that schedule can't take it."""
    try:
        other = build_plan(
            schedule, pp=plan.pp, vpp=plan.vpp, microbatches=plan.microbatches,
            encoder=plan.encoder, generator=plan.generator, frozen=plan.frozen, costs=costs,
        )  # fmt: skip
    except ValueError:
        return None
    return simulate(other, costs, check=False)


def _report(sim: Simulation, ideal: Simulation | None, megatron: Simulation | None) -> str:
    plan = sim.plan
    lines = [
        f"{plan.schedule}: pp={plan.pp} vpp={plan.vpp} microbatches={plan.microbatches} "
        f"encoder={'yes' if plan.encoder else 'no'} generator={'yes' if plan.generator else 'no'}"
        + (f" frozen={','.join(m for m in MODULES if m in plan.frozen)}" if plan.frozen else "")
    ]
    if plan.knobs:
        lines.append("knobs: " + ", ".join(f"{k}={v}" for k, v in plan.knobs.items()))
    meg = [megatron_warmup(r, plan.pp, plan.vpp, plan.microbatches) + 1 for r in range(plan.pp)]
    lines.append(
        "warm-up forwards per rank: " + " ".join(map(str, plan.warmup_forwards()))
        + "   (Megatron: " + " ".join(str(min(m, plan.microbatches * plan.vpp)) for m in meg) + ")"
    )  # fmt: skip
    t = sim.step_time
    lines.append(f"step time     {t:10.4g}")
    if ideal is not None:
        lines.append(
            f"ideal         {ideal.step_time:10.4g}   efficiency vs ideal {ideal.step_time / t:7.1%}"
        )
    lines.append(f"lower bound   {sim.lower_bound:10.4g}   efficiency vs bound {sim.lower_bound / t:7.1%}")
    if megatron is not None and plan.schedule != "megatron":
        lines.append(
            f"megatron      {megatron.step_time:10.4g}   megatron / this     {megatron.step_time / t:7.3f}x"
        )
    header = "peak live (microbatches; llm: chunk-microbatches)"
    lines.append(header.ljust(52) + "".join(f"PP{r:<5}" for r in range(plan.pp)))
    for module, peaks in sim.peak_live.items():
        lines.append(f"  {module:<50}" + "".join(f"{v:<7}" for v in peaks))
    if sim.peak_bytes is not None:
        for module, peaks in sim.peak_bytes.items():
            lines.append(f"  {module + ' (MiB)':<50}" + "".join(f"{v / 2**20:<7.1f}" for v in peaks))
    lines.append("bubble fraction".ljust(52) + "".join(f"{b:<7.1%}" for b in sim.bubble_fraction))
    return "\n".join(line.rstrip() for line in lines)


def _run_plan(args: argparse.Namespace) -> int:
    costs = OpCosts.load(args.costs) if args.costs else OpCosts()
    if args.from_json:
        plan = Plan.load(args.from_json)
    else:
        m = args.microbatches if args.microbatches is not None else 4 * args.pp
        plan = build_plan(
            args.schedule, pp=args.pp, vpp=args.vpp, microbatches=m, encoder=not args.no_encoder,
            generator=not args.no_generator, encoder_warmup=args.encoder_warmup, llm_warmup=args.llm_warmup,
            held_columns=args.held_columns, weight_deferral=args.weight_deferral, frozen=args.frozen,
            costs=costs,
        )  # fmt: skip
    sim = simulate(plan, costs)  # validates plans loaded from JSON
    ideal = _reference(plan, "ideal", costs)
    megatron = _reference(plan, "megatron", costs)
    if args.print_plan:
        print(plan.table())
    print(_report(sim, ideal, megatron))
    for path in (args.json, args.png, args.memory_png):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
    if args.json:
        plan.save(args.json, simulation=sim.summary(ideal.step_time if ideal else None))
        print(f"wrote {args.json}")
    if args.png or args.memory_png:
        from .schedule.pictures import draw_gantt, draw_memory

        for path, draw in ((args.png, draw_gantt), (args.memory_png, draw_memory)):
            if path:
                print(f"wrote {draw(sim, path)}")
    return 0


def _run_consolidate(args: argparse.Namespace) -> int:
    from .checkpoint import consolidate

    full = consolidate(args.checkpoint, args.out)
    entries, optimizers = len(full["state_dict"]), len(full.get("optimizer_states", []))
    print(f"wrote {args.out}: {entries} entries and {optimizers} optimizer states from {args.checkpoint}")
    return 0


def _consolidate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("consolidate", help="turn a BigMac checkpoint directory into one ordinary checkpoint")
    p.add_argument("checkpoint", type=Path, help="checkpoint directory written by BigMacStrategy")
    p.add_argument(
        "out", type=Path, help="output file: MyModule.load_from_checkpoint, or resume in one process"
    )
    p.set_defaults(run=_run_consolidate)


def _run_export_hf(args: argparse.Namespace) -> int:
    from .hf.export import export_pretrained

    model = export_pretrained(
        args.checkpoint, args.out, config=args.config, prefix=args.prefix, max_shard_size=args.max_shard_size
    )
    print(f"wrote {args.out}: a {type(model).__name__} from {args.checkpoint}")
    return 0


def _export_hf_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-hf", help="write a checkpoint's transformers model with save_pretrained")
    p.add_argument("checkpoint", type=Path, help="checkpoint directory (or one-file checkpoint)")
    p.add_argument("out", type=Path, help="output directory: transformers' from_pretrained loads it")
    p.add_argument("--config", type=Path, help="config.json or its directory (default: from the run)")
    p.add_argument("--prefix", default="model.", help="the transformers model's name prefix in the module")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB")
    p.set_defaults(run=_run_export_hf)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bigmac", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _plan_parser(sub)
    _consolidate_parser(sub)
    _export_hf_parser(sub)
    add_fit_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (PlanError, ValueError, KeyError, OSError) as err:
        print(f"bigmac {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
