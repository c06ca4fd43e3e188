"""Offline byte-level text data: Python's own standard library source, or any text file.

Nothing is downloaded: the default corpus is the ``.py`` files of the running Python's
standard library (present on every machine with Python), read in sorted order up to a
byte budget, so the same Python version always yields the same corpus.  The last 10%
(by bytes) is the validation split.
"""
from __future__ import annotations

import math
import pathlib
import sysconfig
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

__all__ = ["Corpus", "load_corpus", "stdlib_text"]


def stdlib_text(max_bytes: int = 4_000_000) -> bytes:
    """Concatenated source of the standard library's top-level ``.py`` files (sorted), up to ``max_bytes``."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise RuntimeError(f"no Python source found under {root}; pass --data FILE")
    return b"\n".join(chunks)[:max_bytes]


@dataclass
class Corpus:
    """Byte tokens split into train and validation, with the unigram baseline."""

    name: str
    train: torch.Tensor  # uint8 tokens
    val: torch.Tensor

    @property
    def unigram_loss(self) -> float:
        """Cross-entropy (nats/byte) of the validation bytes under the training bytes' unigram frequencies
        (add-one smoothed): what a model that ignores context achieves."""
        counts = torch.bincount(self.train.long(), minlength=256).double() + 1.0
        logp = torch.log(counts / counts.sum())
        return float(-logp[self.val.long()].mean())

    def batch(self, split: str, batch_size: int, context: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        data = self.train if split == "train" else self.val
        starts = torch.randint(0, data.numel() - context - 1, (batch_size,), generator=generator)
        idx = starts[:, None] + torch.arange(context + 1)[None, :]
        seq = data[idx].long()
        return seq[:, :-1], seq[:, 1:]


def load_corpus(path: Optional[str] = None, max_bytes: int = 4_000_000, context: int = 128) -> Corpus:
    """The corpus of ``path`` (any text file) or of the standard library; 90/10 split by bytes."""
    if path is None:
        raw, name = stdlib_text(max_bytes), "Python standard library source"
    else:
        p = pathlib.Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"--data: no such file: {path}")
        raw, name = p.read_bytes()[:max_bytes], p.name
    need = 20 * (context + 1)
    if len(raw) < need:
        raise ValueError(f"--data: {name} has {len(raw)} bytes; at least {need} are needed for context {context}")
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    cut = int(math.floor(0.9 * len(tokens)))
    return Corpus(name=name, train=tokens[:cut].clone(), val=tokens[cut:].clone())
