"""Random valid programs for the fuzzer, from a small grammar, with hazards on purpose.

Shapes are tracked while generating, so every program is valid by construction: odd sizes,
grouped and depthwise convs (k 1/3/5, stride 1/2), BatchNorm 1d/2d, every activation in every
spelling, residual and in-place adds, broadcasting adds, cat, pooling, flatten/view/permute,
dropout, identity, linear. Hazards: fan-out, a conv module called at two sites, a shared
BatchNorm, an intermediate that is also an output, an in-place write to a value read later,
BatchNorm statistics warmed in training mode (done by the runner).
"""

from __future__ import annotations

import random

from tests.fuzz.spec_model import ACT_CALLS, ACT_MODULES


def generate(seed: int, max_ops: int = 12) -> dict:
    rng = random.Random(seed)
    n = rng.choice([1, 2, 3])
    shape = [n, rng.choice([1, 3, 4, 6]), rng.randint(5, 13), rng.randint(5, 13)]
    values = [{"shape": shape, "contiguous": True}]
    ops: list[dict] = []
    modules: dict[str, dict] = {}

    def emit(op: dict, out_shape: list, contiguous: bool = True) -> None:
        ops.append(op)
        values.append({"shape": out_shape, "contiguous": contiguous})

    def pick(rank: int, exclude: int | None = None) -> int | None:
        options = [i for i, v in enumerate(values) if len(v["shape"]) == rank and i != exclude]
        # prefer recent values, but sometimes reach back (fan-out)
        return rng.choice(options[-3:] if rng.random() < 0.7 else options) if options else None

    def same_shape(i: int) -> int | None:
        options = [j for j, v in enumerate(values) if j != i and v["shape"] == values[i]["shape"]]
        return rng.choice(options) if options else None

    def new_name(kind: str) -> str:
        return f"{kind}{len(modules)}"

    for _ in range(rng.randint(2, max_ops)):
        four, two = pick(4), pick(2)
        choices = (["conv"] * 4 + ["bn2d"] * 2 + ["act"] * 3 + ["add", "add_", "bias_add", "mul", "cat", "pool",
                                                                 "dropout", "identity", "permute", "to_2d"]
                   if four is not None else [])
        choices += ["linear"] * 3 + ["bn1d", "act", "add", "mul", "dropout"] if two is not None else []
        kind = rng.choice(choices)
        x = four if kind in ("conv", "bn2d", "bias_add", "cat", "pool", "permute", "to_2d") else (
            two if kind in ("linear", "bn1d") else rng.choice([i for i in (four, two) if i is not None]))
        s = list(values[x]["shape"])
        if kind == "conv":
            reuse = [m for m in modules.values() if m["kind"] == "conv" and m["cin"] == s[1]
                     and s[2] + 2 * m["padding"] >= m["k"] and s[3] + 2 * m["padding"] >= m["k"]
                     and ("padding_mode" not in m or m["padding"] < min(s[2], s[3]))]
            if reuse and rng.random() < 0.25:
                op = dict(reuse[0], x=x)                              # one conv module, two call sites
            else:
                k = rng.choice([1, 3, 3, 5])
                padding = rng.choice([k // 2, 0]) if min(s[2], s[3]) >= k else k // 2
                groups = rng.choice([1, 1, s[1]] + ([2] if s[1] % 2 == 0 else []))
                cout = rng.choice([4, 5, 8]) * groups if groups > 1 else rng.choice([3, 4, 7, 8])
                op = {"kind": "conv", "x": x, "module": new_name("conv"), "cin": s[1], "cout": cout, "k": k,
                      "stride": rng.choice([1, 1, 2]), "padding": padding, "groups": groups,
                      "bias": rng.random() < 0.5}
                if 0 < padding < min(s[2], s[3]) and rng.random() < 0.15:
                    op["padding_mode"] = rng.choice(["reflect", "replicate", "circular"])
                modules[op["module"]] = op
            h = (s[2] + 2 * op["padding"] - op["k"]) // op["stride"] + 1
            w = (s[3] + 2 * op["padding"] - op["k"]) // op["stride"] + 1
            emit(op, [s[0], op["cout"], h, w], values[x]["contiguous"])  # eager keeps a channels-last input so
        elif kind in ("bn2d", "bn1d"):
            shared = [m for m in modules.values() if m["kind"] == kind and m["c"] == s[1]]
            op = dict(shared[0], x=x) if shared and rng.random() < 0.3 else {
                "kind": kind, "x": x, "module": new_name(kind), "c": s[1]}
            modules.setdefault(op["module"], op)
            emit(op, s, values[x]["contiguous"])
        elif kind == "act":
            if rng.random() < 0.5:
                op = {"kind": "act_module", "x": x, "module": new_name("act"), "act": rng.choice(sorted(ACT_MODULES))}
                modules[op["module"]] = op
            else:
                op = {"kind": "act_call", "x": x, "act": rng.choice(sorted(ACT_CALLS))}
            emit(op, s, values[x]["contiguous"])
        elif kind in ("add", "add_"):
            y = same_shape(x)
            if y is None:
                continue
            emit({"kind": kind, "x": x, "y": y}, s, values[x]["contiguous"] and values[y]["contiguous"])
        elif kind == "bias_add":
            op = {"kind": "bias_add", "x": x, "module": new_name("bias"), "c": s[1]}
            modules[op["module"]] = op
            emit(op, s, values[x]["contiguous"])
        elif kind == "mul":
            emit({"kind": "mul", "x": x, "c": rng.choice([0.5, -1.5, 2.0])}, s, values[x]["contiguous"])
        elif kind == "cat":
            others = [j for j, v in enumerate(values) if len(v["shape"]) == 4 and v["shape"][2:] == s[2:]]
            y = rng.choice(others)
            emit({"kind": "cat", "x": x, "y": y}, [s[0], s[1] + values[y]["shape"][1], s[2], s[3]],
                 values[x]["contiguous"] and values[y]["contiguous"])
        elif kind == "pool":
            if min(s[2], s[3]) < 2:
                continue
            pool = rng.choice(["max", "avg"])
            if rng.random() < 0.5:
                op = {"kind": "pool_module", "x": x, "module": new_name("pool"), "pool": pool}
                modules[op["module"]] = op
            else:
                op = {"kind": "pool_call", "x": x, "pool": pool}
            emit(op, [s[0], s[1], s[2] // 2, s[3] // 2], values[x]["contiguous"])
        elif kind in ("dropout", "identity"):
            if rng.random() < 0.5 or kind == "identity":
                op = {"kind": kind, "x": x, "module": new_name(kind)}
                modules[op["module"]] = op
            else:
                op = {"kind": "dropout_call", "x": x}
            emit(op, s, values[x]["contiguous"])
        elif kind == "permute":
            emit({"kind": "permute_roundtrip", "x": x}, s, contiguous=False)
        elif kind == "to_2d":
            how = rng.choice(["flatten", "mean_hw"] + (["view_flat"] if values[x]["contiguous"] else []))
            flat = [s[0], s[1]] if how == "mean_hw" else [s[0], s[1] * s[2] * s[3]]
            emit({"kind": how, "x": x}, flat)
        elif kind == "linear":
            fout = rng.choice([3, 8, 10, 17])
            op = {"kind": "linear", "x": x, "module": new_name("linear"), "fin": s[1], "fout": fout,
                  "bias": rng.random() < 0.7}
            modules[op["module"]] = op
            emit(op, [s[0], fout])
    if not ops:
        ops.append({"kind": "mul", "x": 0, "c": 2.0})
        values.append(values[0])
    outputs = [len(values) - 1]
    if len(values) > 2 and rng.random() < 0.3:
        outputs.append(rng.randrange(1, len(values) - 1))             # an intermediate that is also an output
    return {"input": shape, "ops": ops, "outputs": outputs}
