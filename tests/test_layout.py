"""The layout of register.py, kept by a test: the table of contents is the list of section
banners; a name is used only below the section that defines it; the pure sections use no module
that does I/O; classes and functions stay within the sizes chosen (docs/architecture.md, "The
one file"); every setting is defined once, and the settings table of docs/reference.md says
what those definitions say.
"""
from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

import register

SOURCE = Path(register.__file__).read_text()
TREE = ast.parse(SOURCE)
BANNER_RE = re.compile(r"^# -{20,}\n# (\d+)\. ([^:\n]+):?.*\n(?:# .*\n)*# -{20,}$", re.M)
PURE = {"Records", "Plan"}
IO_MODULES = {"docker", "requests", "urllib3", "urllib", "socket", "http", "os", "ssl", "select",
              "signal", "subprocess", "threading", "time", "etcd", "etcd3gw", "backoff", "sys"}
# Sizes chosen from what reads as one thing (docs/architecture.md, "The one file"): a class that
# orchestrates or keeps state stays under 400 lines (the reconciler, the largest, is 372); an
# adapter is one external protocol whole behind the seam (its reads, guarded writes, lease or TTL,
# owner record, auth and error translation only make sense together), so it may reach 600; a
# function fits on two screens.
MAX_CLASS_LINES = 400
MAX_ADAPTER_LINES = 600
MAX_FUNCTION_LINES = 75


def sections() -> list[tuple[int, str, int, int]]:
    """(number, name, first line, last line) of each section, 1-based lines."""
    found = [(int(m.group(1)), m.group(2).strip(), SOURCE.count("\n", 0, m.start()) + 1)
             for m in BANNER_RE.finditer(SOURCE)]
    last = SOURCE.count("\n") + 1
    return [(n, name, start, found[i + 1][2] - 1 if i + 1 < len(found) else last)
            for i, (n, name, start) in enumerate(found)]


def section_of(line: int) -> int:
    for number, _, start, end in sections():
        if start <= line <= end:
            return number
    return 0  # above the first banner: imports and module constants


def test_the_table_of_contents_is_the_list_of_section_banners():
    docstring = ast.get_docstring(TREE)
    contents = [(int(n), name.strip()) for n, name in re.findall(r"^ +(\d+)\. (.+?)(?: {2,}|$)", docstring,
                                                                    re.M)]
    banners = [(number, name) for number, name, _, _ in sections()]
    assert contents == banners
    assert [n for n, _ in banners] == list(range(1, len(banners) + 1))


def _loaded_names(node: ast.AST) -> set[str]:
    """Names a piece of code reads at run time (annotations are strings here, and left out), less
    the names it binds itself (arguments, local variables, loop and comprehension targets)."""
    names = set()
    local = set()
    skip = set()
    for child in ast.walk(node):
        for annotation in (getattr(child, "returns", None), getattr(child, "annotation", None)):
            if annotation is not None:
                skip.update(id(n) for n in ast.walk(annotation))
    for child in ast.walk(node):
        if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Load) and id(child) not in skip:
            names.add(child.id)
        elif isinstance(child, ast.Name):
            local.add(child.id)
        elif isinstance(child, ast.arg):
            local.add(child.arg)
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        return names  # a module-level assignment binds a global, not a local
    return names - local


def _top_level_definitions() -> dict[str, int]:
    """Top-level name -> the section that defines it."""
    defined = {}
    for node in TREE.body:
        targets = []
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            targets = [node.name]
        elif isinstance(node, ast.Assign):
            targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            targets = [node.target.id]
        for name in targets:
            defined.setdefault(name, section_of(node.lineno))
    return defined


def test_a_name_is_used_only_below_the_section_that_defines_it():
    defined = _top_level_definitions()
    late = []
    for node in TREE.body:
        here = section_of(node.lineno)
        for name in _loaded_names(node):
            if defined.get(name, 0) > here:
                late.append(f"line {node.lineno} (section {here}) uses {name} (section {defined[name]})")
    assert late == []


def test_the_pure_sections_use_no_module_that_does_io():
    by_number = {name: number for number, name, _, _ in sections()}
    assert set(by_number) >= PURE
    used = {}
    for node in TREE.body:
        section = {v: k for k, v in by_number.items()}.get(section_of(node.lineno))
        if section in PURE:
            for name in _loaded_names(node) & IO_MODULES:
                used.setdefault(section, set()).add(name)
    assert used == {}


def _sizes(kind) -> dict[str, int]:
    sizes = {}
    for node in ast.walk(TREE):
        if isinstance(node, kind):
            sizes[f"{node.name} (line {node.lineno})"] = node.end_lineno - node.lineno + 1
    return sizes


def _adapters() -> set[str]:
    return {f"{node.name} (line {node.lineno})" for node in TREE.body
            if isinstance(node, ast.ClassDef) and any(getattr(b, "id", "") == "Registry"
                                                      for b in node.bases)}


def test_classes_and_functions_stay_within_their_sizes():
    adapters = _adapters()
    assert len(adapters) == 2
    classes = {name: n for name, n in _sizes(ast.ClassDef).items()
               if n > (MAX_ADAPTER_LINES if name in adapters else MAX_CLASS_LINES)}
    functions = {name: n for name, n in _sizes((ast.FunctionDef, ast.AsyncFunctionDef)).items()
                 if n > MAX_FUNCTION_LINES}
    assert (classes, functions) == ({}, {})


# -- settings: defined once ---------------------------------------------------------------

def test_every_setting_fills_one_config_field_and_every_field_has_its_setting():
    fields = [f.name for f in dataclasses.fields(register.Config)]
    assert sorted(s.attr for s in register.SETTINGS) == sorted(fields)
    defaults = {f.name: f.default for f in dataclasses.fields(register.Config)
                if f.default is not dataclasses.MISSING}
    for setting in register.SETTINGS:
        if setting.attr in defaults:
            assert defaults[setting.attr] == setting.typed_default(), setting.name


def test_every_flag_of_the_parser_comes_from_a_setting():
    parser = register.build_arg_parser()
    flags = {option for action in parser._actions for option in action.option_strings}
    assert flags - {"-h", "--help", "--version"} == {s.flag for s in register.SETTINGS if s.flag}


def _docs_table() -> list[list[str]]:
    text = (Path(__file__).parent.parent / "docs" / "reference.md").read_text()
    start = text.index("| variable | flag | default | meaning |")
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows


def _shown_default(setting) -> str:
    if setting.switch:
        return "off"
    if setting.default is None:
        return "required"
    if setting.default == "":
        return f"`{setting.unset}`" if setting.unset is not None else "unset"
    return f"`{setting.default}`"


def test_the_settings_table_of_the_docs_names_every_setting_with_its_flag_and_default():
    documented = {}
    for variables, flags, default, _meaning in _docs_table():
        names = re.findall(r"`([A-Z_]+)`", variables) or [""]
        options = re.findall(r"`(--[a-z-]+)`", flags) or [""]
        for i, name in enumerate(names):
            flag = options[i] if i < len(options) else ""
            documented[name or flag] = (flag, default)
    expected = {}
    for setting in register.SETTINGS:
        expected[setting.name] = (setting.flag, _shown_default(setting))
    assert documented.keys() == expected.keys()
    for name, (flag, default) in expected.items():
        shown_flag, shown_default = documented[name]
        assert shown_flag == flag, name
        assert shown_default == default or shown_default.startswith(default + " "), name


@pytest.mark.parametrize("setting", register.SETTINGS, ids=lambda s: s.name)
def test_each_setting_documents_what_a_good_value_looks_like(setting):
    if not setting.switch:
        assert setting.expected and setting.example and setting.help
        assert setting.default in (None, "") or setting.parse(setting.default) is not None
