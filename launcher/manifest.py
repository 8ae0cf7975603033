"""Load a manifest file strictly, apply `--set` overrides, validate once.

Every problem a user can make raises `ConfigError` with a message that names the
file/line or key path and the fix; the CLI prints it and exits 2.

A manifest never carries a credential: the resolved manifest is written to the run directory and
`cluster.env` into the job script, so a password in a URL, a presigned URL or a secret-named
`cluster.env` variable is refused (credentials come from the environment or an AWS profile).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from pixeldiff.config import ConfigError, Manifest, from_dict, validate


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""


def _construct_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        except TypeError:
            continue  # unhashable key: SafeLoader's own check reports it
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such manifest file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the manifest ({e})") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = "; ".join(x for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        if "constructor" in problem or "tag" in problem:
            problem += " (YAML tags that construct objects are not allowed in a manifest; write plain values)"
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a manifest is a YAML mapping (name:, stages:, ...), got {type(data).__name__}")
    return data


_INDEX = re.compile(r"^(\w+)\[(\d+)\]$")


def _split_key(key: str) -> list[str | int]:
    parts: list[str | int] = []
    for piece in key.split("."):
        mi = _INDEX.match(piece)
        if mi:
            parts += [mi.group(1), int(mi.group(2))]
        elif piece.isdigit():
            parts.append(int(piece))
        elif piece:
            parts.append(piece)
        else:
            raise ConfigError(f"--set {key}: empty part in the key path")
    return parts


def apply_override(data: dict, assignment: str) -> None:
    """`dotted.key=value` (value parsed as YAML: 3, 0.5, true, [a, b], text) into the raw manifest."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected dotted.key=value, e.g. --set budget.usd=100")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    parts = _split_key(key.strip())
    node = data
    for i, part in enumerate(parts[:-1]):
        here = ".".join(str(p) for p in parts[: i + 1])
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise ConfigError(f"--set {key}: {here} is not an existing list item")
            node = node[part]
        else:
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {here} is not a section")
            node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise ConfigError(f"--set {key}: index {last} is not an existing list item")
    elif not isinstance(node, dict):
        raise ConfigError(f"--set {key}: the parent of '{last}' is not a section")
    node[last] = value


# scheme://user:password@host  and the query parameters of presigned URLs (S3 SigV4/V2, GCS, Azure SAS)
_URL_PASSWORD = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/@:\s]*):(?P<password>[^/@\s]+)@")
_URL_SIGNED = re.compile(r"[?&](X-Amz-Credential|X-Amz-Signature|X-Amz-Security-Token|AWSAccessKeyId|Signature|"
                         r"X-Goog-Signature|sig)=", re.IGNORECASE)
_SECRET_NAME = re.compile(r"(^|_)(SECRET|TOKEN|PASSWORD|PASSWD|API_?KEY|ACCESS_KEY|ACCESS_KEY_ID|CREDENTIALS?|"
                          r"PRIVATE_KEY|AUTH)(_|$)", re.IGNORECASE)
_NOT_SECRET_SUFFIX = ("_FILE", "_PATH", "_DIR")  # AWS_SHARED_CREDENTIALS_FILE names a file, not a secret


def _key_path(parts: list) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _strings(node, parts=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, (*parts, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _strings(v, (*parts, i))
    elif isinstance(node, str):
        yield list(parts), node


def refuse_credentials(data: dict) -> None:
    """ConfigError when the raw manifest (after --set) would carry a secret into the run directory or the job
    script. Checked before anything else reads the values, so that no other message repeats the secret."""
    fix = ("credentials never go in the manifest (it is copied into the run directory): export them in the shell "
           "that runs pixeldiff-launch (sbatch passes the environment to the job) or name an AWS profile in "
           "data.s3.profile")
    env = data.get("cluster", {}).get("env", {}) if isinstance(data.get("cluster"), dict) else {}
    for name in env if isinstance(env, dict) else ():
        if isinstance(name, str) and _SECRET_NAME.search(name) and not name.upper().endswith(_NOT_SECRET_SUFFIX):
            raise ConfigError(f"cluster.env.{name}: looks like a credential, and cluster.env is written to the "
                              f"run directory and the job script; remove it: {fix}")
    for parts, value in _strings(data):
        where = _key_path(parts)
        if parts[:2] == ["cluster", "env"]:
            continue
        hit = _URL_PASSWORD.match(value.strip())
        if hit:
            shown = f"{hit['scheme']}{hit['user']}:***@{value.strip()[hit.end():]}"
            raise ConfigError(f"{where}: the URL {shown} carries a password; give the URL without "
                              f"'user:password@': {fix}")
        if "://" in value and _URL_SIGNED.search(value):
            raise ConfigError(f"{where}: a presigned URL (its query string is a credential, and it expires); give "
                              f"the plain s3:// URL: {fix}")


def load_manifest(path: Path, overrides: list[str] = ()) -> Manifest:
    data = read_yaml(path)
    for o in overrides:
        apply_override(data, o)
    refuse_credentials(data)
    m = from_dict(Manifest, data)
    validate(m)
    return m
