"""The MXNet peer, run as a script by an interpreter that has MXNet 1.9 (``scripts/setup_mxnet.sh``).

Standalone on purpose (it imports neither torch nor mplamb).  Reads ``{"shapes": [...],
"repeats": n, "lr": .., "wd": .., "mp": bool, "max_bytes": ..}`` as JSON on stdin (``max_bytes``: the
address-space limit this process sets on itself first) and prints ``{"times": [...],
"warmup_s": .., "versions": {...}}``: seconds per step of ``mx.optimizer.LAMB`` applied the way
MXNet's ``Trainer`` applies it (one ``Updater`` call with every parameter, so its fused
``multi_lamb_update`` route runs), on float32 parameters, or with ``mp`` float16 parameters with
float32 master weights (``multi_precision=True``; MXNet has no bfloat16 LAMB).
"""
import json
import sys
import time


def main():
    spec = json.load(sys.stdin)
    if spec.get("max_bytes"):
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (spec["max_bytes"], spec["max_bytes"]))
    import mxnet as mx
    import numpy as np

    rng = np.random.default_rng(0)
    dtype = "float16" if spec["mp"] else "float32"
    shapes = [tuple(s) for s in spec["shapes"]]
    weights = [mx.nd.array(rng.standard_normal(s).astype(np.float32) * 0.02, dtype=dtype) for s in shapes]
    grads = [mx.nd.array(rng.standard_normal(s).astype(np.float32) * 1e-3, dtype=dtype) for s in shapes]
    opt = mx.optimizer.LAMB(learning_rate=spec["lr"], wd=spec["wd"], multi_precision=spec["mp"])
    updater = mx.optimizer.get_updater(opt)
    indices = list(range(len(shapes)))

    def step():
        updater(indices, grads, weights)
        mx.nd.waitall()

    t0 = time.perf_counter()
    step()
    warmup = time.perf_counter() - t0
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    json.dump({"times": times, "warmup_s": warmup, "versions": {"mxnet": mx.__version__}}, sys.stdout)


if __name__ == "__main__":
    main()
