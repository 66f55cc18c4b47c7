"""Hugging Face's GPT-2 itself (the `transformers` package, not a copy): graphopt against eager and Inductor.

    pip install transformers      # not one of graphopt's dependencies: this script is the only user
    python bench/hf_gpt2.py [--layers 12] [--tokens 128] [--rounds 8]

The GPT-2 small body (``GPT2Model``: 12 layers, 768 wide, 12 heads; random weights, its default config), one
sequence of ``--tokens`` tokens, 2 threads as torch has them. Engines, interleaved in one process (median ms;
compiler/workflow/timing.py): eager; torch.compile with Inductor and freezing; ``optimize()`` with graphopt's own
kernels (the libraries are not in play: LayerNorm and softmax have no range bound); and ``optimize()`` without
``recognize_activations`` / ``recognize_linears``, to show what they do on the model they were written for
(GPT-2 writes every linear as ``torch.addmm`` on an (in, out) weight and its GELU as tanh arithmetic). Each
engine's max abs difference from eager is recorded. Results: printed, and bench/results/hf-gpt2-<date>.json
with the machine's CPU model and ISA flags.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import cpu_features  # noqa: E402
from graphopt.compiler.workflow import timing  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RECOGNIZERS = ("recognize_activations", "recognize_linears")


class Body(torch.nn.Module):
    """GPT2Model's last hidden state, as one tensor."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False, return_dict=False)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    try:
        import transformers
    except ImportError:
        sys.exit("bench/hf_gpt2.py needs Hugging Face's transformers: pip install transformers")
    import torch._inductor.config as inductor_config

    from graphopt import optimize
    from graphopt.passes.pipeline import DEFAULT_PIPELINE

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=args.layers)
    model = Body(transformers.GPT2Model(config).eval()).eval()
    ids = torch.randint(0, config.vocab_size, (1, args.tokens))

    build_s, engines = {}, {"eager": model}
    without = [p for p in DEFAULT_PIPELINE if p.__name__ not in RECOGNIZERS]
    for name, passes in (("graphopt_without_recognizers", without), ("graphopt", None)):
        start = time.perf_counter()
        engines[name] = optimize(model, (ids,), engines="graphopt", passes=passes)
        build_s[name] = time.perf_counter() - start
    inductor_config.freezing = True
    engines["inductor"] = torch.compile(model)
    start = time.perf_counter()
    with torch.no_grad():
        engines["inductor"](ids)
        build_s["inductor"] = time.perf_counter() - start
        want = model(ids)
        diff = {name: float((fn(ids) - want).abs().max()) for name, fn in engines.items()}
    ms = timing.median_ms(engines, (ids,), rounds=args.rounds, per_round=3, settle_ms=100.0)
    rewrites = {r.name: r.rewrites for r in engines["graphopt"].report if r.name in RECOGNIZERS}
    result = {"machine": cpu_features(), "transformers": transformers.__version__, "layers": args.layers,
              "tokens": args.tokens, "rounds": args.rounds, "median_ms": ms, "build_s": build_s,
              "max_abs_diff_vs_eager": diff, "rewrites": rewrites,
              "graphopt_vs_inductor": ms["graphopt"] / ms["inductor"],
              "graphopt_without_recognizers_vs_inductor": ms["graphopt_without_recognizers"] / ms["inductor"],
              "graphopt_vs_eager": ms["graphopt"] / ms["eager"]}
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"hf-gpt2-{datetime.date.today()}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
