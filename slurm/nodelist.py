"""Slurm hostlist expressions: `node[1-3,7]`, `gpu-a[01-02],gpu-b5`, `rack[1-2]-n[1-2]`.

    expand("node[1-3,7]")             -> ["node1", "node2", "node3", "node7"]
    compress(["node1", "node2", "n7"]) -> "n7,node[1-2]"

Zero padding is kept (`[08-10]` -> 08, 09, 10). Several bracket groups in one name expand as a product,
leftmost group varying slowest, as Slurm does. compress() folds names that differ only in their last number.
"""

from __future__ import annotations

import re
from itertools import product

__all__ = ["expand", "compress"]

_NONE = {"", "(null)", "None assigned", "None"}


def expand(expr: str | None) -> list[str]:
    """Every host name an expression names, in order. "", None, "(null)" and "None assigned" give []."""
    if expr is None or expr.strip() in _NONE:
        return []
    hosts: list[str] = []
    for part in _split_top(expr.strip()):
        hosts.extend(_expand_one(part))
    return hosts


def _split_top(expr: str) -> list[str]:
    """Split at commas outside brackets."""
    parts, depth, cur = [], 0, []
    for ch in expr:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in hostlist {expr!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced '[' in hostlist {expr!r}")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _expand_one(name: str) -> list[str]:
    pieces = re.split(r"\[([^\]]*)\]", name)  # literal, ranges, literal, ranges, ..., literal
    choices: list[list[str]] = []
    for i, piece in enumerate(pieces):
        choices.append([piece] if i % 2 == 0 else _expand_ranges(piece, name))
    return ["".join(p) for p in product(*choices)]


def _expand_ranges(ranges: str, whole: str) -> list[str]:
    out = []
    for r in ranges.split(","):
        r = r.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", r)
        if not m:
            raise ValueError(f"bad range {r!r} in hostlist {whole!r}: expected N or N-M with digits")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"bad range {r!r} in hostlist {whole!r}: {hi} < {lo}")
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def compress(hosts: list[str] | tuple[str, ...]) -> str:
    """The shortest usual expression for `hosts` (sorted, duplicates dropped): names that differ only in a
    trailing number with the same zero-padded width share one bracket."""
    numbered: list[tuple[str, str]] = []
    plain: set[str] = set()
    for h in hosts:
        m = re.fullmatch(r"(.*?)(\d+)", h)
        if m:
            numbered.append((m.group(1), m.group(2)))
        else:
            plain.add(h)
    # widths that are visibly zero-padded somewhere (n08) also take unpadded numbers of that length (n10)
    padded = {(prefix, len(d)) for prefix, d in numbered if d.startswith("0") and len(d) > 1}
    groups: dict[tuple[str, int], set[int]] = {}
    for prefix, digits in numbered:
        width = len(digits) if (prefix, len(digits)) in padded else 0
        groups.setdefault((prefix, width), set()).add(int(digits))
    parts = [(h, h) for h in plain]
    for (prefix, width), numbers in groups.items():
        nums = sorted(numbers)
        runs, start = [], nums[0]
        for a, b in zip(nums, nums[1:] + [None]):
            if b is None or b != a + 1:
                runs.append((start, a))
                start = b
        fmt = lambda n: str(n).zfill(width)  # noqa: E731
        if len(nums) == 1:
            text = prefix + fmt(nums[0])
        else:
            text = prefix + "[" + ",".join(fmt(a) if a == b else f"{fmt(a)}-{fmt(b)}" for a, b in runs) + "]"
        parts.append(((prefix, nums[0]), text))
    parts.sort(key=lambda p: (p[0] if isinstance(p[0], tuple) else (p[0], -1)))
    return ",".join(text for _, text in parts)
