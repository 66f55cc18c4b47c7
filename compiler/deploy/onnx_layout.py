"""The exported graph as ONNX Runtime's session gets it: one rewrite that keeps its blocked layout unbroken.

ONNX Runtime's CPU provider runs float convolutions in a blocked channel layout (NCHWc, its
``NchwcTransformer``) and keeps a value in that layout through the ops that have a blocked form:
pooling, activations, and Add / Mul of two values of the same shape. A Mul by a per-channel vector,
``x [N, C, H, W] * s [N, C, 1, 1]`` (squeeze-excite's gate: EfficientNet, MobileNetV3), has no blocked
form, so ONNX Runtime converts ``x`` out of the layout, multiplies, and converts the product back in
(two passes over the full-size value, on every such block). Spread to ``x``'s size first, by a
nearest-neighbour Resize (which has a blocked form), the gate multiplies in the blocked layout and both
conversions go. The values are the same bit for bit: the Resize copies ``s``, the Mul is the same
float multiply.

It is not always faster: the spread gate is one more full-size value to write. EfficientNet-B0 (ONNX
Runtime 1.32, 2 threads): 16 conversion pairs gone, 0.94-0.96x the session's time, but 0.99x in one of this
shared machine's slow spells (where memory-bound ops ran 2.5-3x slower); a MobileNetV3-like stack of four
56x56x96 blocks: 1.00x, and 1.10x in a slow spell. So it is
measured: where a graph has gates, optimize() races ONNX Runtime's session over this graph as one more
candidate beside the one over the graph as exported (compiler/core/engines.py ``choose``), and the plan
says which won ("onnxruntime, gates spread"). Only ONNX Runtime gets it (OpenVINO multiplies the broadcast
in its own layout), and only a float graph (an int8 graph's convolutions are not blocked)"""

from __future__ import annotations

_QDQ = ("QuantizeLinear", "DequantizeLinear")


def _shapes(proto) -> dict[str, tuple]:
    """value name -> its shape (a dim is its size, or None where it is not a number) for the float values ONNX's
    shape inference can tell."""
    import onnx
    from onnx import shape_inference

    try:
        inferred = shape_inference.infer_shapes(proto)
    except Exception:  # (a graph ONNX's inference cannot read: no shapes, so nothing is rewritten)
        return {}
    shapes = {}
    for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        t = v.type.tensor_type
        if t.elem_type == onnx.TensorProto.FLOAT and t.HasField("shape"):
            shapes[v.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    return shapes


def _gated(full: tuple | None, gate: tuple | None) -> bool:
    """Is ``full * gate`` a per-channel gate on a 4-d value with a spatial extent (same batch and channels, the
    gate 1x1, every size known)? (With its batch free, ONNX Runtime cannot prove the spread gate's shape equal
    to the value's, and keeps the Mul out of the blocked layout anyway: EfficientNet-B0's free-batch graph
    came out with more conversions and its residual adds no longer fused, so such a graph is left as it is.)"""
    if full is None or gate is None or len(full) != 4 or len(gate) != 4:
        return False
    return (all(isinstance(d, int) and d > 0 for d in full) and full[:2] == gate[:2] and gate[2:] == (1, 1)
            and full[2] * full[3] > 1)


def spread_channel_gates(model: bytes) -> tuple[bytes, int]:
    """``model`` with every float ``x * s`` by a computed per-channel ``s`` (_gated) written ``x *
    Resize(s, nearest, to x's height and width)``, and how many; ``model`` itself where there are none, the
    graph has no convolution, is int8 (QDQ) or its opset is before Resize's optional roi input (13)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load_from_string(model)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13 or any(n.op_type in _QDQ for n in proto.graph.node):
        return model, 0
    constant = {t.name for t in proto.graph.initializer}
    constant |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    if not any(n.op_type == "Mul" and not constant.intersection(n.input) for n in proto.graph.node) or \
            not any(n.op_type == "Conv" for n in proto.graph.node):
        # (no Mul of two computed values, or no convolution: nothing to spread, and no shape inference: a
        # ResNet-18's, whose one Mul is its range check's times 0, took 0.28 s of its optimize())
        return model, 0
    shapes = _shapes(proto)
    taken = constant | {v.name for v in proto.graph.input}
    taken |= {name for n in proto.graph.node for name in (*n.input, *n.output, n.name)}

    def fresh(name: str) -> str:  # (a name no value, initializer or node of the graph has)
        while name in taken:
            name += "_"
        taken.add(name)
        return name
    nodes, done = [], 0
    for node in proto.graph.node:
        for full, gate in ((0, 1), (1, 0)) if node.op_type == "Mul" else ():
            x, s = node.input[full], node.input[gate]
            if s in constant or not _gated(shapes.get(x), shapes.get(s)):
                continue
            height, width = shapes[x][2:]
            scales = numpy_helper.from_array(np.array([1, 1, height, width], np.float32),
                                             fresh(f"{node.output[0]}__scales"))
            spread = helper.make_node("Resize", [s, "", scales.name], [fresh(f"{node.output[0]}__gate")],
                                      name=fresh(f"{node.name or node.output[0]}__spread"), mode="nearest",
                                      coordinate_transformation_mode="asymmetric", nearest_mode="floor")
            proto.graph.initializer.append(scales)
            nodes.append(spread)  # (just before its Mul: the nodes stay in topological order)
            node.input[gate] = spread.output[0]
            done += 1
            break
        nodes.append(node)
    if done:
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
    return (proto.SerializeToString(), done) if done else (model, 0)

