"""Parameter-shape workloads of the benchmarks (shapes only; values are random)."""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

Shape = Tuple[int, ...]


def bert_shapes(layers: int = 12, hidden: int = 768, intermediate: int = 3072, vocab: int = 30522,
                positions: int = 512, types: int = 2) -> List[Shape]:
    """The parameter shapes of BERT (base: 199 tensors, 109.5M parameters)."""
    shapes: List[Shape] = [(vocab, hidden), (positions, hidden), (types, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        for _ in range(4):  # query, key, value, attention output
            shapes += [(hidden, hidden), (hidden,)]
        shapes += [(hidden,), (hidden,)]  # attention LayerNorm
        shapes += [(intermediate, hidden), (intermediate,), (hidden, intermediate), (hidden,)]
        shapes += [(hidden,), (hidden,)]  # output LayerNorm
    shapes += [(hidden, hidden), (hidden,)]  # pooler
    return shapes


WORKLOADS: Dict[str, Callable[[], List[Shape]]] = {
    "bert-base": bert_shapes,
    "bert-large": lambda: bert_shapes(layers=24, hidden=1024, intermediate=4096),
    "one-50m": lambda: [(50_000_000,)],
    "10k-small": lambda: [(1000,)] * 10_000,
}


def numel(shapes: List[Shape]) -> int:
    total = 0
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        total += n
    return total
