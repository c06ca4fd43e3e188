"""The optax peer, run as a script in a process of its own (by :mod:`.isolated`; it imports neither
torch nor mplamb).

Reads ``{"shapes": [...], "repeats": n, "lr": .., "wd": .., "max_bytes": ..}`` as JSON on stdin (``max_bytes``:
the address-space limit this process sets on itself first) and prints
``{"times": [...], "warmup_s": .., "versions": {...}}``: seconds per ``optax.lamb`` step on
float32 parameters of those shapes, the update and its application compiled as one
``jax.jit`` function with the parameters and optimizer state donated (updated in place, as
the in-process optimizers are).  The warm-up step includes XLA's compilation.  JAX is never
imported by the benchmark process itself, so it cannot disturb torch's threads or memory.
"""
from __future__ import annotations

import json
import sys
import time


def main() -> None:
    spec = json.load(sys.stdin)
    if spec.get("max_bytes"):
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (spec["max_bytes"], spec["max_bytes"]))
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    rng = np.random.default_rng(0)
    shapes = [tuple(s) for s in spec["shapes"]]
    params = [jnp.asarray(rng.standard_normal(s, dtype=np.float32) * 0.02) for s in shapes]
    grads = [jnp.asarray(rng.standard_normal(s, dtype=np.float32) * 1e-3) for s in shapes]
    opt = optax.lamb(spec["lr"], weight_decay=spec["wd"])
    state = opt.init(params)

    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step, donate_argnums=(0, 1))
    t0 = time.perf_counter()
    params, state = jax.block_until_ready(step(params, state, grads))
    warmup = time.perf_counter() - t0
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        params, state = jax.block_until_ready(step(params, state, grads))
        times.append(time.perf_counter() - t0)
    json.dump({"times": times, "warmup_s": warmup,
               "versions": {"jax": jax.__version__, "optax": optax.__version__}}, sys.stdout)


if __name__ == "__main__":
    main()
