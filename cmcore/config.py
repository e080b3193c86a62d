"""Configuration: load a YAML file, validate it against the JSON schema, fill defaults, and
check what a schema cannot say. Every problem is one line naming the key and the fix."""

import contextlib
import copy
import json
import os
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_PATH = ROOT / "workflow" / "schemas" / "config.schema.yaml"


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


def _schema_error(config, schema):
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is None:
        return None
    if error.validator in ("additionalProperties", "unevaluatedProperties"):
        return f"{_key(error.absolute_path)}: {error.message}; remove or rename the key"
    return f"{_key(error.absolute_path)}: {error.message}"


def _check_semantics(cfg):
    """Rules the schema cannot express."""
    ct, smp = cfg["ct"], cfg["sampling"]
    if ct["s1"] <= ct["s0"]:
        return f"ct.s1 = {ct['s1']} must be greater than ct.s0 = {ct['s0']}"
    if cfg["ablations"]["ict"] and "ict" not in cfg:
        return "ablations.ict: an iCT curve needs an ict section (see config/config.yaml)"
    s1 = cfg["ablations"]["ct"]["s1"]
    if s1 is not None and s1 <= ct["s0"]:
        return f"ablations.ct.s1 = {s1} must be greater than ct.s0 = {ct['s0']}"
    d = cfg["diffusion"]
    if d["sigma_max"] <= d["sigma_min"]:
        return "diffusion.sigma_max must be greater than diffusion.sigma_min"
    start = cfg["pd"]["start_steps"]
    if start & (start - 1):
        return f"pd.start_steps = {start} must be a power of two (PD halves it down to 1)"
    all_steps = sorted(set(smp["steps"]) | set(smp["curve_steps"]))
    for n in [] if smp["tau_search"]["enabled"] else all_steps:
        taus = smp["tau"].get(str(n), [] if n == 1 else None)
        if taus is None:
            return f"sampling.tau: no intermediate times for {n}-step sampling; add '{n}': [...]"
        if len(taus) != n - 1:
            return f"sampling.tau.{n}: needs {n - 1} times, got {len(taus)}"
        inside = not taus or d["sigma_min"] < taus[-1] <= taus[0] < d["sigma_max"]
        if any(a <= b for a, b in zip(taus, taus[1:], strict=False)) or not inside:
            return f"sampling.tau.{n}: times must decrease strictly within (sigma_min, sigma_max)"
    if max(all_steps) > start // 2 or any(n & (n - 1) for n in all_steps):
        return (f"sampling: PD students sample with powers of two up to pd.start_steps / 2 = "
                f"{start // 2}; raise pd.start_steps or drop the larger step counts")
    pretrained = cfg["teacher"]["pretrained"]
    if pretrained and not os.path.isfile(pretrained):
        return (f"teacher.pretrained: {pretrained!r} not found; write it with `cm convert` or "
                "remove the key to train the teacher")
    ds, ev = cfg["dataset"], cfg["evaluation"]
    if ds["name"] == "cifar10" and not (ds["path"] and os.path.isfile(ds["path"])):
        return (f"dataset.path: CIFAR-10 tarball not found at {ds['path']!r}; download "
                "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/ and set the path")
    exists = {"npz": os.path.isfile, "image_folder": os.path.isdir}.get(ds["name"])
    if exists and not (ds["path"] and exists(ds["path"])):
        what = "npz file" if ds["name"] == "npz" else "image folder"
        return (f"dataset.path: {what} not found at {ds['path']!r}; set dataset.path to the "
                "training images (layouts: cmcore/data.py, config/imagenet64.yaml)")
    if ds["name"] == "image_folder" and not ds.get("resolution"):
        return "dataset.resolution: an image_folder data set needs the image side (e.g. 64)"
    if ev["feature_extractor"] == "inception" and not (
        ev["inception_weights"] and os.path.isfile(ev["inception_weights"])
    ):
        return (f"evaluation.inception_weights: file not found ({ev['inception_weights']!r}); get "
                "weights-inception-2015-12-05-6726825d.pth from the torch-fidelity releases")
    if ev["feature_extractor"] == "classifier" and ds["name"] != "digits":
        return "evaluation.feature_extractor: 'classifier' is trained on digits only; use inception"
    return None


def validate(config):
    """Return a validated copy of ``config`` with defaults filled; raise ConfigError if bad."""
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    if not isinstance(config, dict):
        raise ConfigError("the config file must hold a YAML mapping of keys to values")
    message = _schema_error(config, schema)
    if message is not None:
        raise ConfigError(message)
    cfg = copy.deepcopy(config)
    _fill_defaults(cfg, schema, schema)
    message = _check_semantics(cfg)
    if message is not None:
        raise ConfigError(message)
    return cfg


def load(path):
    """Read and validate the YAML config at ``path``."""
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; pass --config PATH") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return validate(config)


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
    tmp = f"{path}.tmp"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(tmp, "w") as f:
        f.write(f"# resolved config, code version {code_version()}\n{body}")
    os.replace(tmp, path)


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
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
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
