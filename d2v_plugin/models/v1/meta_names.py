"""Meta's parameter names -> ours: the one renaming mechanism of the data2vec 1.0 models.

Each modality writes its mapping as one :class:`NameTable`: rows of (regular expression on
Meta's name, our name as a ``re.sub`` template, or None to drop the tensor). Several of
Meta's tensors that map to one of our names are concatenated along dim 0 in the order of
the rows (Meta's separate q, k, v projections -> our ``attn.qkv``).
"""

import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch


class NameTable:
    def __init__(self, rows: Sequence[Tuple[str, Optional[str]]], architecture: str, strict: bool = False):
        """``strict``: a name no row matches is an error (else it is kept as it is)."""
        self.rows = [(re.compile(pattern), ours) for pattern, ours in rows]
        self.architecture = architecture
        self.strict = strict

    def lookup(self, name: str) -> Tuple[Optional[str], int]:
        """(our name or None = dropped, row) for one of Meta's names; unmatched: (name, len(rows))."""
        for rank, (pattern, ours) in enumerate(self.rows):
            if pattern.match(name):
                return (pattern.sub(ours, name) if ours is not None else None), rank
        if self.strict:
            raise KeyError(f"{self.architecture} checkpoint: no rule for Meta's parameter {name!r}")
        return name, len(self.rows)

    def convert(self, state: Dict[str, Any], lookup: Optional[Callable[[str], Tuple[Optional[str], int]]] = None) -> Dict[str, Any]:
        """``state`` under our names (``lookup`` replaces :meth:`lookup`, e.g. for teacher names)."""
        lookup = lookup or self.lookup
        groups: Dict[str, List[Tuple[int, Any]]] = {}
        for name, value in state.items():
            ours, rank = lookup(name)
            if ours is not None:
                groups.setdefault(ours, []).append((rank, value))
        out = {}
        for ours, parts in groups.items():
            parts.sort(key=lambda p: p[0])
            out[ours] = parts[0][1] if len(parts) == 1 else torch.cat([v for _, v in parts], dim=0)
        return out
