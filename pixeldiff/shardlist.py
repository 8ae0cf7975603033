"""Shard lists: which tar files a manifest's `data.shards` names, as the webdataset library would read them.

A spec is a brace pattern with braceexpand's semantics (zero padding, steps, letter ranges, nesting), several
specs joined by `::`, a list of them, or the URL of a list file (.txt, .list, .lst: one shard per line, `#`
comments); local paths and s3:// alike, .tar, .tar.gz and .tgz. `pipe:` URLs are refused. Torch-free.
"""

from __future__ import annotations

import re

class DataError(RuntimeError):
    """The data cannot feed the run (too many bad samples, no shards); the message says what to check."""


# ------------------------------------------------------------------ shard lists

SHARD_EXTS = (".tar", ".tar.gz", ".tgz")
LIST_EXTS = (".txt", ".list", ".lst")
_INT_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)(?:\.\.-?(\d+))?")
_CHAR_RANGE = re.compile(r"([A-Za-z])\.\.([A-Za-z])(?:\.\.-?(\d+))?")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion with the `braceexpand` package's semantics (the webdataset library uses it):
    `{000..002}` (zero padding when an end has a leading zero), `{1..9..2}` steps, `{5..1}` descending, `{a..e}`,
    `{a,b}` lists, nested groups, several groups multiply, `\\{` a literal brace; `{x}` (no comma, no range) stays
    literal. Unbalanced braces are a DataError."""
    return [re.sub(r"\\(.)", r"\1", s) for s in _expand(pattern, pattern)]


def _split_top(text: str, sep: str) -> list[str]:
    """`text` split at `sep` characters outside braces (backslash escapes respected)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        depth += ch == "{"
        depth -= ch == "}"
        if ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    return parts + [text[start:]]


def _expand(text: str, whole: str) -> list[str]:
    """Expansions of `text` (escapes kept, removed by the caller)."""
    pieces: list[list[str]] = []  # a product of alternatives
    depth, start, i = 0, 0, 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            if depth == 0:
                pieces.append([text[start:i]])
                start = i
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                break
            if depth == 0:
                pieces.append(_group(text[start + 1:i], whole))
                start = i + 1
        i += 1
    if depth != 0:
        raise DataError(f"shard pattern {whole!r}: unbalanced braces; every '{{' needs its '}}' (write \\{{ for a "
                        f"literal brace)")
    pieces.append([text[start:]])
    out = [""]
    for alts in pieces:
        out = [a + b for a in out for b in alts]
    return out


def _group(body: str, whole: str) -> list[str]:
    """The alternatives of one top-level `{body}`."""
    m = _INT_RANGE.fullmatch(body)
    if m:
        a, b, step = m.group(1), m.group(2), int(m.group(3) or 1) or 1
        pad = any(s.lstrip("-").startswith("0") for s in (a, b) if s not in ("0", "-0"))
        width = max(len(a), len(b)) if pad else 0
        lo, hi = int(a), int(b)
        values = range(lo, hi + 1, step) if lo < hi else range(lo, hi - 1, -step)
        return [f"{v:0{width}d}" for v in values]
    m = _CHAR_RANGE.fullmatch(body)
    if m:
        lo, hi, step = _LETTERS.index(m.group(1)), _LETTERS.index(m.group(2)), int(m.group(3) or 1) or 1
        values = range(lo, hi + 1, step) if lo < hi else range(lo, hi - 1, -step)
        return [_LETTERS[v] for v in values]
    alts = _split_top(body, ",")
    if len(alts) == 1:  # no comma, no range: the braces are literal, what is inside still expands
        return ["{" + s + "}" for s in _expand(body, whole)]
    return [s for alt in alts for s in _expand(alt, whole)]


def _check_spec(item: str, where: str) -> None:
    if item.startswith("pipe:"):
        raise DataError(f"{where}: {item!r}: pipe: URLs (a shell command per shard) are not supported, as the reader "
                        f"must reopen a shard at a sample to resume and retry; name the shard itself "
                        f"(s3://bucket/train-{{000..099}}.tar, or a local path)")


def is_shard_url(url: str) -> bool:
    return url.lower().endswith(SHARD_EXTS)


def shard_list(spec, storage_options: dict | None = None) -> list[str]:
    """Shard URLs from `data.shards`: a spec, or a list of specs. A spec is a shard URL with brace patterns
    (`train-{000..099}.tar`, also `.tar.gz`/`.tgz`), several such joined by `::`, or a list file (`.txt`, `.list`,
    `.lst`; local or s3://) naming one spec per line (`#` comments)."""
    items = spec if isinstance(spec, list) else [spec]
    out: list[str] = []
    for item in items:
        for part in item.split("::"):
            part = part.strip()
            _check_spec(part, "data.shards")
            if not part:
                raise DataError(f"data.shards: {item!r} has an empty part between '::' separators")
            if part.lower().endswith(LIST_EXTS) and "{" not in part:
                out += _read_list_file(part, storage_options)
                continue
            urls = expand_braces(part)
            bad = [u for u in urls if not is_shard_url(u)]
            if bad:
                raise DataError(f"data.shards: {bad[0]!r} (from {part!r}) is neither a shard ({', '.join(SHARD_EXTS)}) "
                                f"nor a list file ({', '.join(LIST_EXTS)}); name the tar files, e.g. "
                                f"s3://bucket/train-{{000..099}}.tar")
            out += urls
    if not out:
        raise DataError(f"data.shards {spec!r} names no shards")
    return out


def _read_list_file(url: str, storage_options: dict | None) -> list[str]:
    import fsspec

    check_protocols([url])
    try:
        with fsspec.open(url, "rt", **_options_for(url, storage_options)) as f:
            lines = [ln.strip() for ln in f]
    except FileNotFoundError:
        raise DataError(f"data.shards: the list file {url} does not exist") from None
    out: list[str] = []
    for n, line in enumerate(lines, 1):
        if not line or line.startswith("#"):
            continue
        for part in line.split("::"):
            _check_spec(part, f"data.shards list file {url}, line {n}")
            urls = expand_braces(part.strip())
            bad = [u for u in urls if not is_shard_url(u)]
            if bad:
                raise DataError(f"data.shards list file {url}, line {n}: {bad[0]!r} is not a shard "
                                f"({', '.join(SHARD_EXTS)}); a list file names shards, not other list files")
            out += urls
    return out


def check_protocols(urls) -> None:
    """Every storage protocol the shards use has its package installed, or a DataError naming the package."""
    import importlib

    from fsspec.registry import known_implementations

    for proto in sorted({u.split("://", 1)[0] for u in urls if "://" in u} - {"file"}):
        impl = known_implementations.get(proto)
        if impl is None:
            raise DataError(f"data.shards: no filesystem for {proto}:// URLs; use s3:// or local paths")
        module = impl["class"].rsplit(".", 1)[0]
        try:
            importlib.import_module(module)
        except ImportError as e:
            package = module.split(".", 1)[0]
            raise DataError(f"data.shards: reading {proto}:// needs the Python package {package!r}, which is not "
                            f"installed ({e}); pip install {package} (s3fs is part of pixeldiff's install: "
                            f"reinstall with pip install -e .)") from None


def _options_for(url: str, storage_options: dict | None) -> dict:
    return dict(storage_options or {}) if url.startswith("s3://") else {}
