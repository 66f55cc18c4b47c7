"""The pipelines, as plain lists of pass functions: the one module that imports the passes.

Adding a pass is its file plus its place in a list here (and the import that names it). Importing
this module registers every pass, so a pipeline given by name (``optimize(..., passes=["fold_conv_bn"])``)
resolves through the registry: ``find``.
"""

from __future__ import annotations

from graphopt.passes import REGISTRY, PassContext, PassFn, PassInfo, find
from graphopt.passes.decompose_attention import decompose_attention
from graphopt.passes.eliminate_common_subexpressions import eliminate_common_subexpressions
from graphopt.passes.eliminate_dead_code import eliminate_dead_code
from graphopt.passes.fold_constants import fold_constants
from graphopt.passes.fold_conv_bn import fold_conv_bn
from graphopt.passes.fold_linear_bn import fold_linear_bn
from graphopt.passes.fold_rank_checks import fold_rank_checks
from graphopt.passes.fuse_conv_act import fuse_conv_act
from graphopt.passes.fuse_linear_act import fuse_linear_act
from graphopt.passes.lower_int8_onednn import lower_int8_onednn
from graphopt.passes.lower_to_onednn import lower_to_onednn
from graphopt.passes.lower_to_reference import lower_to_reference
from graphopt.passes.lower_to_triton import lower_to_triton
from graphopt.passes.plan_layout import plan_layout
from graphopt.passes.quantize_int8 import quantize_int8
from graphopt.passes.recognize_activations import recognize_activations
from graphopt.passes.recognize_linears import recognize_linears
from graphopt.passes.remove_noops import remove_noops

DEFAULT_PIPELINE: list[PassFn] = [
    remove_noops,
    fold_rank_checks,  # (timm's rank checks read each conv's output a second time: before the folds that need one)
    eliminate_dead_code,
    decompose_attention,  # (its projections are linears for everything after it)
    fold_constants,
    recognize_activations,  # (before CSE, which would merge two formulas' shared steps into a value read twice)
    recognize_linears,
    eliminate_common_subexpressions,
    fold_conv_bn,
    fold_linear_bn,
    fuse_conv_act,
    fuse_linear_act,
]

# After the pipeline, the graph is lowered for the backend it will run on; the pipeline's own
# result (graphopt ops, plain weights) stays the portable form that is saved and exported.
LOWERING: dict[str, list[PassFn]] = {
    "cpu": [lower_int8_onednn, lower_to_onednn, plan_layout],
    "reference": [lower_to_reference],
    "triton": [lower_to_triton],
}

# Registered, and in no list above: the int8 driver (compiler/int8/) runs quantize_int8 between the
# pipeline and the lowering when optimize(quantize="int8") asks for it, with the calibrated ranges.
OPTIONAL: list[PassFn] = [quantize_int8]

__all__ = ["DEFAULT_PIPELINE", "LOWERING", "OPTIONAL", "REGISTRY", "PassContext", "PassFn", "PassInfo", "find"]
