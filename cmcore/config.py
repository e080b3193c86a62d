"""Configuration: read a YAML file strictly, validate it against the JSON schema, fill
defaults, and check what a schema cannot say (cmcore.config_rules). Every problem is one line
naming the key (or the file, line and column) and the fix."""

import contextlib
import copy
import json
import os
import re
import subprocess
from pathlib import Path

import yaml

from cmcore.config_rules import non_finite, semantic_error, unused_key
from cmcore.files import atomic

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_PATH = ROOT / "workflow" / "schemas" / "config.schema.yaml"
_FastLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # PyYAML's safe loader, in C


class ConfigError(Exception):
    """A configuration value is wrong; str(error) is one line naming the key and the fix."""


def _key(path):
    return ".".join(str(p) for p in path) or "<top level>"


def _resolve(schema, root):
    while "$ref" in schema and len(schema) == 1:
        schema = root["$defs"][schema["$ref"].split("/")[-1]]
    return schema


def _properties(schema, root):
    """Properties of a schema node, including those of a referenced base definition."""
    props = {}
    if "$ref" in schema:
        props.update(_properties(root["$defs"][schema["$ref"].split("/")[-1]], root))
    for name, sub in schema.get("properties", {}).items():
        props[name] = {**props.get(name, {}), **sub}
    return props


def _fill_defaults(node, schema, root):
    for name, sub in _properties(schema, root).items():
        sub = {**_resolve({k: v for k, v in sub.items() if k == "$ref"}, root), **sub}
        if name not in node and "default" in sub:
            node[name] = copy.deepcopy(sub["default"])
        if isinstance(node.get(name), dict):
            _fill_defaults(node[name], sub, root)


def _is_integer(checker, value):
    """JSON Schema's integer, but only an int: 20.0 is refused where a count is meant."""
    return isinstance(value, int) and not isinstance(value, bool)


def _schema_error(config, schema):
    import jsonschema

    base = jsonschema.Draft202012Validator
    strict = jsonschema.validators.extend(
        base, type_checker=base.TYPE_CHECKER.redefine("integer", _is_integer))
    validator = strict(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is None:
        return None
    if error.validator in ("additionalProperties", "unevaluatedProperties"):
        names = re.findall(r"'([^']+)'", error.message.split("(", 1)[-1])
        key = _key([*error.absolute_path, names[0]]) if names else _key(error.absolute_path)
        return f"{key}: unknown key; remove or rename it (config/README.md lists every key)"
    return f"{_key(error.absolute_path)}: {error.message}"


def validate(config):
    """Return a validated copy of ``config`` with defaults filled; raise ConfigError if bad."""
    schema = yaml.load(SCHEMA_PATH.read_text(), Loader=_FastLoader)  # noqa: S506
    if not isinstance(config, dict):
        raise ConfigError("the config file must hold a YAML mapping of keys to values")
    bad = non_finite(config)
    if bad:
        raise ConfigError(f"{bad}: not a finite number (NaN or infinity); write a number")
    defaults = {section: {k: v["default"] for k, v in
                          _properties(schema["properties"][section], schema).items()
                          if "default" in v} for section in ("dataset", "network")}
    message = _schema_error(config, schema) or unused_key(config, defaults)
    if message is not None:
        raise ConfigError(message)
    cfg = copy.deepcopy(config)
    _fill_defaults(cfg, schema, schema)
    message = semantic_error(cfg)
    if message is not None:
        raise ConfigError(message)
    return cfg


class _StrictLoader(_FastLoader):
    """PyYAML's safe loader that refuses a key written twice in one mapping (PyYAML keeps the
    last without a word: a second `cd:` section would silently replace the first)."""


def _mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(f"{loader.path}:{line}: key {key!r} written twice in one mapping "
                              f"(first at line {seen[key]}); keep one")
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def read_yaml(path):
    """The YAML file at ``path`` as Python data; ConfigError naming file, line and column for
    syntax errors, duplicate keys and bytes that are not UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            loader = _StrictLoader(f)
            loader.path = path  # named in the duplicate-key message
            try:
                return loader.get_single_data()
            finally:
                loader.dispose()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; pass --config PATH") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: byte {e.start} is not UTF-8 text; save the file as "
                          "UTF-8") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None


def load(path):
    """Read (read_yaml) and validate the YAML config at ``path``."""
    return validate(read_yaml(path))


def code_version():
    """`git describe --always --dirty` of the repository, or the package version outside git."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    from cmcore import __version__

    return __version__


def write_resolved(cfg, path):
    """Write the validated config (defaults filled) with the code version, atomically, unless
    ``path`` already holds the same config (a rewrite alone must not look like a change)."""
    body = yaml.safe_dump(cfg, sort_keys=False)
    with contextlib.suppress(OSError), open(path) as f:
        if f.read().split("\n", 1)[-1] == body:
            return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic(path) as tmp, open(tmp, "w") as f:
        f.write(f"# resolved config, code version {code_version()}\n{body}")


def _type_of(node, root):
    """A short type of a schema node: enum values, type names and bounds."""
    node = {**_resolve({k: v for k, v in node.items() if k == "$ref"}, root), **node}
    if "enum" in node:
        return " \\| ".join(json.dumps(v) for v in node["enum"])
    kind = node.get("type", "object" if "properties" in node else "")
    kind = " or ".join(kind) if isinstance(kind, list) else kind
    if kind == "array" and isinstance(node.get("items"), dict):
        kind = f"list of {_type_of(node['items'], root) or 'items'}"
    bounds = [f"{op} {node[key]}" for key, op in (("minimum", ">="), ("exclusiveMinimum", ">"),
                                                  ("maximum", "<="), ("exclusiveMaximum", "<"))
              if key in node]
    return ", ".join([kind, *bounds]) if kind else ", ".join(bounds)


def _text(node):
    return " ".join(str(node.get("description", "")).split())


def _rows(schema, root, prefix):
    """(dotted key, type, default, description) of every property under ``schema``."""
    merged = {**_resolve({k: v for k, v in schema.items() if k == "$ref"}, root), **schema}
    for name, sub in _properties(schema, root).items():
        sub = {**_resolve({k: v for k, v in sub.items() if k == "$ref"}, root), **sub}
        key = f"{prefix}{name}"
        default = json.dumps(sub["default"]) if "default" in sub else ""
        yield key, _type_of(sub, root), default, _text(sub)
        if _properties(sub, root):
            yield from _rows(sub, root, f"{key}.")
        items = sub.get("items")
        if isinstance(items, dict) and _properties(items, root):
            yield from _rows(items, root, f"{key}[].")
    for pattern, sub in merged.get("patternProperties", {}).items():
        yield f"{prefix}<{pattern}>", _type_of(sub, root), "", _text(sub)


def _table(rows):
    return ["| key | type | default | description |", "| --- | --- | --- | --- |"] + [
        f"| `{k}` | {t} | {f'`{d}`' if d else ''} | {text} |" for k, t, d, text in rows] + [""]


def schema_markdown():
    """config/README.md: every config key with its type, default and description, generated
    from workflow/schemas/config.schema.yaml (`python -m cmcore.config` rewrites it)."""
    schema = yaml.load(SCHEMA_PATH.read_text(), Loader=_FastLoader)  # noqa: S506
    required = ", ".join(f"`{k}`" for k in schema["required"])
    lines = ["# Config keys", "",
             "Generated from `workflow/schemas/config.schema.yaml` by `python -m cmcore.config`",
             "(a test checks that this file is up to date); do not edit it by hand.",
             _text(schema), "",
             "`config.yaml` is the embedded default; `cifar10.yaml`, `imagenet64.yaml` and",
             "`lsun_*256.yaml` hold the paper's settings; `.test/config/config.yaml` is the tiny",
             f"config of the tests. Required sections: {required}.", ""]
    rows = list(_rows(schema, schema, ""))
    sections = [r for r in rows if "." not in r[0] and any(
        s[0].startswith(f"{r[0]}.") for s in rows)]
    lines += ["## Top level", ""] + _table([r for r in rows if "." not in r[0]
                                            and r not in sections])
    for key, _, _, text in sections:
        lines += [f"## `{key}`", "", text, ""] if text else [f"## `{key}`", ""]
        lines += _table([r for r in rows if r[0].startswith(f"{key}.")])
    return "\n".join(lines)


if __name__ == "__main__":
    (ROOT / "config" / "README.md").write_text(schema_markdown())
