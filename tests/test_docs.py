"""The documentation is part of the contract: docs/configuration.md against the config
schema, docs/protocol.md against the error and reason codes in the source, and the
README's Python examples run as written."""

from __future__ import annotations

import ast
import builtins
import dataclasses
import re
import symtable
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import AgentConfig, config_from_mapping
from agent.meaning import Meaning

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DOC = ROOT / "docs" / "configuration.md"
PROTOCOL_DOC = ROOT / "docs" / "protocol.md"
README = ROOT / "README.md"
REQUIRED = "required"  # the default column's word for a key without a default


# ---------------------------------------------------------------- markdown helpers


def table_cells(line: str) -> list[str]:
    """Cells of one markdown table row; ``\\|`` is a pipe inside a cell."""
    inner = line.strip().removeprefix("|").removesuffix("|")
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def markdown_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """(header cells, body rows) of every table in ``text``."""
    lines, tables, i = text.splitlines(), [], 0
    while i < len(lines) - 1:
        if lines[i].startswith("|") and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[i + 1].strip()):
            header, rows, i = table_cells(lines[i]), [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(table_cells(lines[i]))
                i += 1
            tables.append((header, rows))
        else:
            i += 1
    return tables


def rows_of(text: str, header_start: list[str]) -> list[list[str]]:
    """Body rows of every table whose header begins with ``header_start``."""
    found = [(h, rows) for h, rows in markdown_tables(text) if h[: len(header_start)] == header_start]
    assert found, f"no table with header {header_start} in the document"
    out = []
    for header, rows in found:
        for row in rows:
            assert len(row) == len(header), f"row has {len(row)} cells, header {len(header)}: {row}"
            out.append(row)
    return out


def code_span(cell: str) -> str:
    m = re.fullmatch(r"`([^`]+)`", cell)
    assert m, f"expected one `code` span, got {cell!r}"
    return m.group(1)


def fenced_blocks(text: str, lang: str) -> list[tuple[int, str]]:
    """(line number, code) of every fenced block tagged ``lang``."""
    return [
        (text.count("\n", 0, m.start()) + 2, m.group(1))
        for m in re.finditer(rf"^```{lang}\n(.*?)^```$", text, re.S | re.M)
    ]


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors: lowercase, punctuation dropped, spaces to hyphens."""
    out = set()
    for m in re.finditer(r"^#+ (.+)$", text, re.M):
        out.add(re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-"))
    return out


# ---------------------------------------------------------------- the config schema


@dataclass(frozen=True)
class KeyDoc:
    type: str
    default: Any  # a YAML value, or REQUIRED


def doc_type(hint: Any, name: str) -> str:
    """The type column's words for a field's type hint (durations as the loader treats them)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return f"{doc_type(inner[0], name)} or null"
    if origin is tuple:
        item = "mapping" if dataclasses.is_dataclass(args[0]) else doc_type(args[0], name)
        return f"list of {item}s"
    if hint is float:
        # the loader reads a duration string into any float key ending in _s; limits.rate.per_s
        # (requests per second) is documented as the number it is meant to be
        return "duration" if name.endswith("_s") and name != "per_s" else "number"
    words = {str: "string", int: "integer", bool: "boolean", Meaning: "meaning"}
    assert hint in words, f"config field {name}: no documented type for {hint!r}; extend doc_type"
    return words[hint]


def field_default(f: dataclasses.Field[Any], instance: object | None) -> Any:
    if instance is not None:
        return getattr(instance, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return REQUIRED


def yaml_value(value: Any) -> Any:
    return [yaml_value(v) for v in value] if isinstance(value, tuple) else value


def optional_section(hint: Any) -> type[Any] | None:
    """The dataclass of a ``Section | None`` hint, else None."""
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return None
    inner = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(inner) != 1 or inner[0] is Meaning:  # a meaning has its own forms (docs/answers.md)
        return None
    return inner[0] if dataclasses.is_dataclass(inner[0]) else None


def schema_keys(cls: type[Any], prefix: str = "", instance: object | None = None) -> dict[str, KeyDoc]:
    """Every key path of the config dataclasses with its type words and default."""
    hints = typing.get_type_hints(cls)
    out: dict[str, KeyDoc] = {}
    for f in dataclasses.fields(cls):
        path, hint, default = f"{prefix}{f.name}", hints[f.name], field_default(f, instance)
        section = optional_section(hint)
        if dataclasses.is_dataclass(hint) or section is not None:
            # an optional section (``escalation``: null by default) documents its keys' defaults
            out.update(schema_keys(typing.cast(type[Any], section or hint), f"{path}.", default))
            continue
        out[path] = KeyDoc(doc_type(hint, f.name), yaml_value(default))
        if typing.get_origin(hint) is tuple and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            out.update(schema_keys(typing.get_args(hint)[0], f"{path}[].", None))
    return out


def documented_keys() -> dict[str, KeyDoc]:
    out: dict[str, KeyDoc] = {}
    for key_cell, type_cell, default_cell, _meaning in rows_of(
        CONFIG_DOC.read_text(encoding="utf-8"), ["key", "type", "default", "meaning"]
    ):
        key = code_span(key_cell)
        assert key not in out, f"{key} is documented twice"
        default = REQUIRED if default_cell == REQUIRED else yaml.safe_load(code_span(default_cell))
        out[key] = KeyDoc(type_cell, default)
    return out


def same_default(documented: Any, actual: Any) -> bool:
    if REQUIRED in (documented, actual):
        return bool(documented == actual)
    if isinstance(actual, float) and type(documented) is int:
        documented = float(documented)
    return type(documented) is type(actual) and bool(documented == actual)


def test_every_config_key_is_documented() -> None:
    missing = sorted(set(schema_keys(AgentConfig)) - set(documented_keys()))
    assert not missing, f"config keys missing from docs/configuration.md: {missing}"


def test_every_documented_config_key_exists() -> None:
    unknown = sorted(set(documented_keys()) - set(schema_keys(AgentConfig)))
    assert not unknown, f"docs/configuration.md documents keys agent/config.py does not have: {unknown}"


def test_documented_types_and_defaults_match_the_schema() -> None:
    documented, actual = documented_keys(), schema_keys(AgentConfig)
    wrong = [
        f"{key}: documented {documented[key]}, the code says {actual[key]}"
        for key in sorted(set(documented) & set(actual))
        if documented[key].type != actual[key].type
        or not same_default(documented[key].default, actual[key].default)
    ]
    assert not wrong, "docs/configuration.md disagrees with agent/config.py:\n" + "\n".join(wrong)


def example_key_paths(node: Any, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= example_key_paths(value, f"{path}.")
            continue
        out.add(path)
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for entry in value:
                out |= example_key_paths(entry, f"{path}[].")
    return out


# keys whose file or directory must exist on the machine that loads the config
EXISTING_PATH_KEYS = (
    ("mqtt", "ca_file"),
    ("mqtt", "cert_file"),
    ("mqtt", "key_file"),
    ("pack", "path"),
    ("updates", "trusted_root"),
    ("security", "operator_keys"),
)


def test_full_example_sets_every_key_and_loads() -> None:
    text = CONFIG_DOC.read_text(encoding="utf-8")
    blocks = fenced_blocks(text.split("## Full example", 1)[1], "yaml")
    assert blocks, "docs/configuration.md has no yaml block under 'Full example'"
    example = yaml.safe_load(blocks[0][1])
    paths = example_key_paths(example)
    assert paths == set(documented_keys()), (
        f"not in the example: {sorted(set(documented_keys()) - paths)}; "
        f"not documented: {sorted(paths - set(documented_keys()))}"
    )
    for section, key in EXISTING_PATH_KEYS:
        del example[section][key]
    cfg = config_from_mapping(example, env={})
    assert cfg.device_id == example["device_id"]


def test_environment_overrides_are_documented_and_work(tmp_path: Path) -> None:
    source = (ROOT / "agent" / "config.py").read_text(encoding="utf-8")
    in_code = {
        n.value
        for n in ast.walk(ast.parse(source))
        if isinstance(n, ast.Constant)
        and isinstance(n.value, str)
        and re.fullmatch(r"EDGE_AGENT_\w+", n.value)
    }
    rows = rows_of(CONFIG_DOC.read_text(encoding="utf-8"), ["variable", "overrides"])
    documented = {code_span(var): code_span(key) for var, key in rows}
    assert set(documented) == in_code, (
        f"documented {sorted(documented)}, agent/config.py reads {sorted(in_code)}"
    )
    samples = {"mqtt.url": "mqtt://env-broker:1884", "pack.path": str(tmp_path), "log_level": "debug"}
    for var, key in documented.items():
        value = samples.get(key, "env-value")
        node: Any = config_from_mapping({"device_id": "from-file"}, env={var: value})
        for part in key.split("."):
            node = getattr(node, part)
        assert node == value, f"{var} did not set {key}"


# ---------------------------------------------------------------- the protocol


def agent_sources(sub: str = "") -> list[tuple[Path, ast.Module]]:
    base = ROOT / "agent" / sub
    return [(p, ast.parse(p.read_text(encoding="utf-8"))) for p in sorted(base.rglob("*.py"))]


def error_codes_in_source() -> set[str]:
    """``code = "..."`` in the body of an error class anywhere in agent/."""
    codes = set()
    for _path, tree in agent_sources():
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            for stmt in cls.body:
                if (
                    isinstance(stmt, ast.Assign)
                    and [t.id for t in stmt.targets if isinstance(t, ast.Name)] == ["code"]
                    and isinstance(stmt.value, ast.Constant)
                ):
                    codes.add(str(stmt.value.value))
    return codes


def strings_in(node: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def call_name(call: ast.Call) -> str:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def reason_codes_in_source() -> set[str]:
    """First argument of ``UpdateRejected(...)`` (a literal, or the literals assigned to the
    variable passed) and every literal ``reason_code=`` keyword, in agent/packs/."""
    codes: set[str] = set()
    for _path, tree in agent_sources("packs"):
        for func in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)):
            assigned: dict[str, set[str]] = {}
            for a in (n for n in ast.walk(func) if isinstance(n, ast.Assign)):
                for t in (t for t in a.targets if isinstance(t, ast.Name)):
                    assigned.setdefault(t.id, set()).update(strings_in(a.value))
            for call in (n for n in ast.walk(func) if isinstance(n, ast.Call)):
                if call_name(call) == "UpdateRejected" and call.args:
                    first = call.args[0]
                    codes |= (
                        assigned.get(first.id, set()) if isinstance(first, ast.Name) else strings_in(first)
                    )
                for kw in call.keywords:
                    if kw.arg == "reason_code" and isinstance(kw.value, ast.Constant):
                        codes.add(str(kw.value.value))
    return codes


def update_states_in_source() -> set[str]:
    return {
        str(call.args[0].value)
        for _path, tree in agent_sources("packs")
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call))
        if call_name(call) == "UpdateEvent" and call.args and isinstance(call.args[0], ast.Constant)
    }


def test_every_error_code_is_documented() -> None:
    in_code = error_codes_in_source()
    documented = {
        code_span(row[0]) for row in rows_of(PROTOCOL_DOC.read_text(encoding="utf-8"), ["code", "when"])
    }
    assert {"bad_request", "internal"} <= in_code, "the error-code scan found nothing: is agent/ moved?"
    assert in_code == documented, (
        f"error codes not in docs/protocol.md: {sorted(in_code - documented)}; "
        f"documented but not in agent/: {sorted(documented - in_code)}"
    )


def test_every_update_reason_code_is_documented() -> None:
    in_code = reason_codes_in_source()
    rows = rows_of(PROTOCOL_DOC.read_text(encoding="utf-8"), ["reason code", "state", "when"])
    documented = {code_span(row[0]) for row in rows}
    assert {"busy", "hash_mismatch"} <= in_code, "the reason-code scan found nothing: is agent/packs moved?"
    assert in_code == documented, (
        f"reason codes not in docs/protocol.md: {sorted(in_code - documented)}; "
        f"documented but never raised in agent/packs: {sorted(documented - in_code)}"
    )


def test_every_update_state_is_documented() -> None:
    text = PROTOCOL_DOC.read_text(encoding="utf-8")
    section = text.split("### Update events", 1)[1].split("\n## ", 1)[0]
    states = update_states_in_source()
    assert "activated" in states, "the update-state scan found nothing: is agent/packs moved?"
    missing = sorted(s for s in states if f"`{s}`" not in section)
    assert not missing, f"update/status states not in docs/protocol.md 'Update events': {missing}"


# ---------------------------------------------------------------- README and links


def test_readme_points_at_the_docs_and_never_at_design() -> None:
    text = README.read_text(encoding="utf-8")
    assert "docs/protocol.md" in text and "docs/configuration.md" in text
    assert "DESIGN" not in text, "README refers to DESIGN, which is not in the repository"


def test_relative_links_in_the_docs_resolve() -> None:
    broken = []
    for doc in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue
            name, _, anchor = target.partition("#")
            path = (doc.parent / name) if name else doc
            if not path.exists():
                broken.append(f"{doc.name}: {target} (no such file)")
            elif anchor and anchor not in heading_anchors(path.read_text(encoding="utf-8")):
                broken.append(f"{doc.name}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def block_id(value: object) -> str | None:
    return f"line{value}" if isinstance(value, int) else None


def readme_python() -> list[tuple[int, str]]:
    blocks = fenced_blocks(README.read_text(encoding="utf-8"), "python")
    assert blocks, "README.md has no ```python block"
    return blocks


def undefined_names(code: str) -> set[str]:
    """Names a module reads (also inside lambdas and functions) that it never binds."""
    top = symtable.symtable(code, "README.md", "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    known = bound | set(dir(builtins))
    missing: set[str] = set()

    def visit(table: symtable.SymbolTable, is_top: bool) -> None:
        for s in table.get_symbols():
            if s.is_referenced() and (is_top or s.is_global()) and s.get_name() not in known:
                missing.add(s.get_name())
        for child in table.get_children():
            visit(child, False)

    visit(top, True)
    return missing


@pytest.mark.parametrize("line, code", readme_python(), ids=block_id)
def test_readme_python_binds_every_name_it_uses(line: int, code: str) -> None:
    assert not undefined_names(code), f"README.md line {line}: undefined {sorted(undefined_names(code))}"


@pytest.mark.realpack
@pytest.mark.parametrize("line, code", readme_python(), ids=block_id)
def test_readme_python_runs_as_written(line: int, code: str, real_pack_path: Path) -> None:
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})


def test_readme_lists_every_doc() -> None:
    text = README.read_text(encoding="utf-8")
    unlisted = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if f"](docs/{p.name})" not in text]
    assert not unlisted, f"docs the README does not link: {unlisted}"


# ---------------------------------------------------------------- operators' guides

TROUBLESHOOTING_DOC = ROOT / "docs" / "troubleshooting.md"
PROVISIONING_DOC = ROOT / "docs" / "provisioning.md"


def test_every_update_reason_code_says_what_to_do() -> None:
    in_code = reason_codes_in_source()
    text = TROUBLESHOOTING_DOC.read_text(encoding="utf-8")
    rows = rows_of(text, ["reason code", "what it means", "what to do"])
    documented = {code_span(row[0]) for row in rows}
    assert {"busy", "no_trust"} <= in_code, "the reason-code scan found nothing: is agent/packs moved?"
    assert in_code == documented, (
        f"reason codes without advice in docs/troubleshooting.md: {sorted(in_code - documented)}; "
        f"there but never raised in agent/packs: {sorted(documented - in_code)}"
    )
    assert all(row[2].strip() for row in rows), "a reason code with no advice"


def test_troubleshooting_covers_the_first_hour() -> None:
    text = TROUBLESHOOTING_DOC.read_text(encoding="utf-8")
    headings = ("Where the logs are", "No pack", "Broker unreachable", "Device offline", "Update rejected")
    missing = [h for h in headings if f"\n## {h}\n" not in text]
    assert not missing, f"docs/troubleshooting.md has no section for {missing}"
    assert "journalctl -u edge-agent" in text
    unit = (ROOT / "systemd" / "edge-agent.service").read_text(encoding="utf-8")
    assert "TimeoutStartSec=180" in unit and "(180 s)" in text, "the start timeout the doc quotes changed"


def test_a_device_without_trust_names_the_key_the_provisioning_doc_explains(tmp_path: Path) -> None:
    from agent.packs.fetch import UrlFetcher
    from agent.packs.metadata import refresh_target
    from agent.packs.verify import UpdateRejected

    with pytest.raises(UpdateRejected) as exc:
        refresh_target(tmp_path / "tuf", "http://127.0.0.1:9", "packs/x/1.0.0.tar", UrlFetcher(), False)
    assert exc.value.reason_code == "no_trust"
    keys = set(schema_keys(AgentConfig))
    named = {k for k in re.findall(r"[a-z_]+(?:\.[a-z_]+)+", str(exc.value)) if k in keys}
    assert named == {"updates.trusted_root"}, f"the no_trust error names no config key: {exc.value}"
    doc = PROVISIONING_DOC.read_text(encoding="utf-8")
    for key in named:
        assert f"`{key}`" in doc, f"docs/provisioning.md does not explain {key}"
    assert "`no_trust`" in doc


# ---------------------------------------------------------------- the license


SPDX_TEXTS = {
    # SPDX id -> (title lines, sha256 of the standard text as the Apache Software Foundation
    # publishes it: https://www.apache.org/licenses/LICENSE-2.0.txt)
    "Apache-2.0": (
        ("Apache License", "Version 2.0, January 2004"),
        "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30",
    ),
}


def test_the_license_file_is_the_license_pyproject_states() -> None:
    import hashlib
    import tomllib

    stated = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["license"]
    assert stated in SPDX_TEXTS, f"pyproject states {stated!r}: add its standard text's check here"
    titles, digest = SPDX_TEXTS[stated]
    text = (ROOT / "LICENSE").read_bytes()
    head = [line.strip() for line in text.decode("utf-8").splitlines()[:4]]
    assert all(t in head for t in titles), head
    assert hashlib.sha256(text).hexdigest() == digest, "LICENSE is not the standard text"
