"""The configuration reference, docs/configuration.md, rendered from configs/schema.py.

The schema is the one place that states a key: its type and default (the dataclass field), its bounds (``num``) or
choices (``Literal``), and its meaning, the comment right above the field or at the end of its line; a section's
meaning is its class docstring. A key or section without one is refused, every such key named at once, so a new key
cannot land undocumented. The page ends with what each shipped config (configs/*.yaml) sets otherwise.

    python scripts/config_reference.py            # writes the page
    python scripts/config_reference.py --check    # exits 1 when the page is out of date
"""

from __future__ import annotations

import ast
import dataclasses
import io
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal

from configs import schema
from configs.schema import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "configuration.md"
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))
LONG = 60  # characters: a longer default is written out under its section's table

INTRO = """\
# Configuration reference

<!-- Generated from configs/schema.py by `python scripts/config_reference.py`: edit the schema, then run it. -->

`python main.py [--config PATH] [--set dotted.key=value ...]`. The default config is
`configs/vision_token_pruning.yaml` (LLaVA-1.5-7B, GPU); `configs/tiny.yaml` is the CPU default.
`--set` values are typed like YAML (`--set method_settings.pruning_layers=[5,15,25]`).

Loading checks the whole file and reports every problem at once, with dotted paths: unknown keys
(with the closest valid key), wrong types, values out of range, and contradictions between keys
(for example `temperature_min` above `temperature`, pruning layers not strictly increasing or
beyond the backbone's depth, `pruning_layers: []` with a non-empty `pruner_keep_ratios`,
`target_merge_tokens` disagreeing with `merge_ratio` × vision tokens, GPUs requested without CUDA).
A file that holds no settings, a key written twice in one mapping (with both line numbers) and a
`--set` value that is not valid YAML are refused before that. Numbers written as strings (`"2e-05"`,
or a bare `1e-4`, which YAML reads as a string) are read as numbers. Checks that need the backbone's
shape read its `config.json` before any weight loads. The resolved config is written into the run's
folder (`resolved_config.yaml`).

Each key's meaning below is its comment in `configs/schema.py`, each section's its docstring;
[What the shipped configs change](#what-the-shipped-configs-change) lists the values of
`configs/*.yaml` that differ from these defaults.
"""


def field_comments(source: str) -> dict[tuple[str, str], str]:
    """(class name, field name) -> the field's comment: the comment lines right above it, then the comment at the end
    of its line(s), joined into one paragraph."""
    lines = source.splitlines()
    above, trailing = {}, {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row, col = token.start
            text = token.string.lstrip("#").strip()
            (above if not lines[row - 1][:col].strip() else trailing)[row] = text
    comments = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for statement in node.body:
            if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
                continue
            block, row = [], statement.lineno - 1
            while row in above:
                block.insert(0, above[row])
                row -= 1
            block += [trailing[r] for r in range(statement.lineno, statement.end_lineno + 1) if r in trailing]
            if block:
                comments[node.name, statement.target.id] = " ".join(block)
    return comments


def _docstring(cls: type) -> str | None:
    doc = cls.__dict__.get("__doc__")
    generated = doc is not None and doc.startswith(f"{cls.__name__}(")  # dataclass' own signature, not a docstring
    return None if doc is None or generated else " ".join(doc.replace("``", "`").split())


def _value(value: Any) -> str:
    """A value as YAML writes it in flow style (a section entry without its unset fields: null or false)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
    if dataclasses.is_dataclass(value):
        return _value({f.name: getattr(value, f.name) for f in dataclasses.fields(value)
                       if getattr(value, f.name) not in (None, False)})
    return str(value)


def _entries(tp: Any) -> type | None:
    """The section class of a list or mapping of sections (objectives, the search space), else None."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (list, dict) else ()
    return next((a for a in args if dataclasses.is_dataclass(a)), None)


def _type(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in args if a is not type(None)]
        return f"{_type(inner)} or null"
    if origin is Literal:
        return "str"
    if origin is list:
        return f"list of {'entries' if dataclasses.is_dataclass(args[0]) else _type(args[0])}"
    if origin is dict:
        return "mapping: dotted key → entry"
    return "any" if tp is Any else tp.__name__


def _allowed(tp: Any, metadata: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is Literal:
        return ", ".join(f"`{choice}`" for choice in typing.get_args(tp))
    signs = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    return ", ".join(f"{signs[k]} {metadata[k]:g}" for k in signs if metadata.get(k) is not None)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


@dataclasses.dataclass
class _Section:
    path: str  # the dotted path of its keys, with <group>, [i] or <key> where one table serves several
    cls: type
    defaults: dict[str, Any]  # label ('' for a single section) -> the section's default instance
    described_by: tuple[type, ...]  # the classes whose docstrings describe it


def _sections(cls: type, path: str, defaults: dict[str, Any]) -> list[_Section]:
    """The section at ``path`` and every section inside it, depth first. Sibling sections of one class (the three
    optimizer groups) share one table, their defaults side by side."""
    hints, (parent,) = typing.get_type_hints(cls), defaults.values()
    children = [f for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])]
    if children and len(children) == len(dataclasses.fields(cls)) and len({hints[f.name] for f in children}) == 1:
        group = hints[children[0].name]
        return [_Section(f"{path}.<group>", group, {f.name: getattr(parent, f.name) for f in children}, (cls, group))]
    found = [_Section(path, cls, defaults, (cls,))]
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            found += _sections(tp, f"{path}.{f.name}", {"": getattr(parent, f.name)})
        elif _entries(tp):
            entry = _entries(tp)
            where = f"{path}.{f.name}[i]" if typing.get_origin(tp) is list else f"{path}.{f.name}.<key>"
            found += _sections(entry, where, {"": entry()})
    return found


def _table(section: _Section, comments: dict[tuple[str, str], str], missing: list[str]) -> list[str]:
    hints = typing.get_type_hints(section.cls)
    out = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    below = []
    for f in dataclasses.fields(section.cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            continue
        key = f"{section.path}.{f.name}"
        meaning = comments.get((section.cls.__name__, f.name))
        if meaning is None:
            missing.append(f"{key} (configs/schema.py, {section.cls.__name__}.{f.name})")
            continue
        values = {label: getattr(instance, f.name) for label, instance in section.defaults.items()}
        (value, *others), default = values.values(), _value(next(iter(values.values())))
        if any(_value(other) != default for other in others):  # the optimizer groups' own defaults
            shown = ", ".join(f"{label} `{_value(v)}`" for label, v in values.items())
        elif len(default) <= LONG:
            shown = f"`{default}`"
        else:
            shown = "below"
            entries = [f"{k}: {_value(v)}" for k, v in value.items()] if isinstance(value, dict) else [default]
            below += ["", f"Default of `{key}`:", "", "```yaml", *entries, "```"]
        out.append("| " + " | ".join(_cell(c) for c in (f"`{key}`", _type(tp), shown, _allowed(tp, f.metadata),
                                                          meaning)) + " |")
    return out + below


def _leaves(value: Any, path: str = "") -> dict[str, Any]:
    """Dotted key -> value of every key of a config (lists and mappings as single values)."""
    if not dataclasses.is_dataclass(value):
        return {path: value}
    found = {}
    for f in dataclasses.fields(value):
        found.update(_leaves(getattr(value, f.name), f"{path}.{f.name}" if path else f.name))
    return found


def _shipped_table(config_files: list[Path]) -> list[str]:
    default = _leaves(Config())
    shipped = {path.name: _leaves(load_config(path)) for path in config_files}
    out = ["## What the shipped configs change", "",
           "The keys a shipped config sets to another value than the default (an empty cell: the default).", "",
           "| key | default | " + " | ".join(f"`{name}`" for name in shipped) + " |",
           "|---|---|" + "---|" * len(shipped)]
    short = lambda text, instead: f"`{text}`" if len(text) <= LONG else instead
    for key, value in default.items():
        cells = [_value(leaves[key]) if leaves[key] != value else "" for leaves in shipped.values()]
        if any(cells):
            cells = [short(c, "its own (see the file)") if c else "" for c in cells]
            out.append("| " + " | ".join(_cell(c) for c in (f"`{key}`", short(_value(value), "above"), *cells)) + " |")
    return out


def render(schema_source: str | None = None, config_files: list[Path] | None = None) -> str:
    """The page's text. ``schema_source``: the text the comments are read from (configs/schema.py's by default);
    raises ValueError naming every key and section that has no meaning."""
    comments = field_comments(schema_source if schema_source is not None else Path(schema.__file__).read_text())
    missing, body = [], []
    for f in dataclasses.fields(Config):
        for section in _sections(typing.get_type_hints(Config)[f.name], f.name, {"": getattr(Config(), f.name)}):
            docs = [_docstring(cls) for cls in section.described_by]
            missing += [f"{section.path} (configs/schema.py, the docstring of class {cls.__name__})"
                        for cls, doc in zip(section.described_by, docs) if doc is None]
            level = "##" if "." not in section.path else "###"
            body += [f"{level} `{section.path}`", "", " ".join(d for d in docs if d), "",
                     *_table(section, comments, missing), ""]
    if missing:
        raise ValueError("every config key needs a meaning, the comment above its field or at the end of its line "
                         "(a section: its class docstring); missing for:\n" + "\n".join(f"  - {m}" for m in missing))
    shipped = _shipped_table(config_files if config_files is not None else SHIPPED)
    return "\n".join([INTRO, *body, *shipped]) + "\n"
