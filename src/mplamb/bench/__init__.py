"""Benchmarks of an optimizer step: mplamb's backends against the peers and the bandwidth roof."""
from .report import chart, table
from .runner import SETUPS, parse_lean, run
from .workloads import WORKLOADS, bert_shapes

__all__ = ["run", "table", "chart", "WORKLOADS", "SETUPS", "bert_shapes", "parse_lean"]
