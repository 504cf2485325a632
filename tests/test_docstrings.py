"""Every object of the public API has a docstring the API reference can show: what it does, its arguments and
what it raises (Google style, the style mkdocs.yml tells mkdocstrings to parse).

The public API is what each package exports (its ``__all__``, lazily loaded: see ``pluribus.lazy``) and the
public functions and classes of ``pluribus.deploy``'s modules and of ``pluribus.fusion.privacy.odometer``. The source is read statically with griffe (the
library mkdocstrings itself uses), so nothing heavy is imported. For each public function, method (of a public
class, defined there) and class:

- a docstring;
- an ``Args:`` section naming every parameter when it takes any (a class: in its own or its ``__init__``'s
  docstring, or an ``Attributes:`` section naming its fields; fields a base class declares may be described
  there);
- a ``Raises:`` section when its body raises an exception itself (``raise X(...)``, not a bare re-raise).
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import griffe

ROOT = Path(__file__).resolve().parents[1]

PACKAGES = ["", "data", "demo", "encoder", "eval", "federated", "fusion", "tokenizer"]
# modules whose public functions and classes are API without a package export: deploy's (each module one job)
# and a PrivFusion party's privacy odometer
MODULES = [*(f"deploy.{m}" for m in ("certs", "address", "host", "join", "submit", "processes")),
           "fusion.privacy.odometer"]


@cache
def package() -> Any:
    return griffe.load("pluribus", search_paths=[str(ROOT / "src")], docstring_parser="google",
                       resolve_aliases=True, resolve_external=False)


def public_objects() -> Iterator[Any]:
    """The exported objects of each package and the public functions and classes of ``MODULES``."""
    root = package()
    for name in PACKAGES:
        module = root[name] if name else root
        for export in sorted(module.exports or ()):
            if isinstance(export, str) and not export.startswith("__"):
                member = module[export]
                yield member.final_target if member.is_alias else member
    for name in MODULES:
        module = root[name]
        for key, member in module.members.items():
            if not key.startswith("_") and not member.is_alias and (member.is_function or member.is_class):
                yield member


def sections(obj: Any) -> set[str]:
    return {s.kind.value for s in obj.docstring.parsed} if obj.docstring else set()


ARG_SECTIONS = {"parameters", "other parameters", "attributes"}


def documented_names(obj: Any) -> set[str]:
    """The names an object's ``Args:`` / ``Attributes:`` sections describe."""
    if obj is None or obj.is_alias or not obj.docstring:
        return set()
    return {item.name.lstrip("*") for section in obj.docstring.parsed if section.kind.value in ARG_SECTIONS
            for item in section.value}


def own_raises(fn: Any) -> bool:
    """Whether the function's body (not a nested def or class) raises an exception it names."""
    source = fn.source
    if not source:
        return False
    tree = ast.parse(textwrap.dedent(source))
    body = tree.body[0]

    def visit(node: ast.AST) -> bool:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
                continue
            if isinstance(child, ast.Raise) and child.exc is not None:
                return True
            if visit(child):
                return True
        return False

    return visit(body)


def parameters(fn: Any) -> list[str]:
    return [p.name for p in fn.parameters if p.name not in ("self", "cls")]


def function_problems(fn: Any) -> list[str]:
    if not fn.docstring or not fn.docstring.value.strip():
        return ["no docstring"]
    out = []
    found = sections(fn)
    if parameters(fn) and "parameters" not in found and "other parameters" not in found:
        out.append(f"no Args section (takes {', '.join(parameters(fn))})")
    elif missing := [p for p in parameters(fn) if p.lstrip("*") not in documented_names(fn)]:
        out.append(f"Args section lacks {', '.join(missing)}")
    if own_raises(fn) and "raises" not in found:
        out.append("raises but has no Raises section")
    return out


def class_problems(cls: Any) -> dict[str, list[str]]:
    problems: dict[str, list[str]] = {}
    if not cls.docstring or not cls.docstring.value.strip():
        problems[cls.path] = ["no docstring"]
    init = cls.members.get("__init__")
    takes = [p.name for p in cls.parameters if p.name not in ("self", "cls")] if cls.docstring else []
    documented = sections(cls) | (sections(init) if init is not None and not init.is_alias else set())
    if takes:
        # fields a dataclass inherits may be described by the base class that declares them (a subclass adding no
        # field need not repeat its base's Attributes section)
        named = documented_names(cls) | documented_names(init)
        for base in cls.mro():
            named |= documented_names(base)
        missing = [p for p in takes if p.lstrip("*") not in named]
        if missing and not documented & ARG_SECTIONS:
            problems.setdefault(cls.path, []).append(f"no Args or Attributes section (takes {', '.join(takes)})")
        elif missing:
            problems.setdefault(cls.path, []).append(f"Args/Attributes lack {', '.join(missing)}")
    if init is not None and not init.is_alias and init.is_function and own_raises(init) and "raises" not in documented:
        problems.setdefault(cls.path, []).append("__init__ raises but no Raises section")
    for name, member in cls.members.items():
        if name.startswith("_") or member.is_alias:
            continue
        if member.is_function:
            if "property" in member.labels:
                if not member.docstring:
                    problems[member.path] = ["no docstring"]
                continue
            found = function_problems(member)
            if found:
                problems[member.path] = found
    return problems


def all_problems() -> dict[str, list[str]]:
    problems: dict[str, list[str]] = {}
    for obj in public_objects():
        if obj.is_class:
            problems.update(class_problems(obj))
        elif obj.is_function:
            found = function_problems(obj)
            if found:
                problems[obj.path] = found
        elif obj.is_attribute:
            continue  # constants (STEP_NAMES, EMPTY_CODE): their meaning is in the package docstring or a comment
    return problems


def report(problems: dict[str, list[str]]) -> str:
    return "\n".join(f"{path}: {'; '.join(found)}" for path, found in sorted(problems.items()))


def test_the_walk_finds_the_public_api() -> None:
    paths = {obj.path for obj in public_objects()}
    assert len(paths) > 150
    for expected in ("pluribus.errors.ConfigError", "pluribus.encoder.model.UserEncoder",
                     "pluribus.federated.studies.simulate.run_fedbone", "pluribus.fusion.core.fuse.privfusion",
                     "pluribus.deploy.certs.make_test_certificates", "pluribus.data.schema.UserDataset",
                     "pluribus.tokenizer.estimator.UserTokenizer", "pluribus.tokenizer.vocab.TokenVocabulary"):
        assert expected in paths, expected


def test_the_checks_catch_what_they_check(tmp_path: Path) -> None:
    """A function missing each section is reported; a complete one is not."""
    code = textwrap.dedent('''
        def bare(x):
            raise ValueError(x)

        def summary_only(x):
            """Does a thing."""
            raise ValueError(x)

        def complete(x):
            """Does a thing.

            Args:
                x: the thing.

            Raises:
                ValueError: always.
            """
            raise ValueError(x)

        def reraises():
            """No arguments, re-raises only."""
            try:
                pass
            except OSError:
                raise

        def partial(x, *args):
            """Does a thing.

            Args:
                x: the thing.
            """

        from dataclasses import dataclass

        @dataclass
        class Base:
            """A base.

            Attributes:
                a: a field.
            """

            a: int = 0

        @dataclass
        class Child(Base):
            """A child.

            Attributes:
                b: another field.
            """

            b: int = 0
            c: int = 0

        @dataclass
        class Same(Base):
            """Adds no field: the base's section describes ``a``."""

        @dataclass
        class Bare(Base):
            """Adds a field and describes nothing."""

            d: int = 0
    ''')
    (tmp_path / "probe.py").write_text(code, encoding="utf-8")
    module = griffe.load("probe", search_paths=[str(tmp_path)], docstring_parser="google")
    assert function_problems(module["bare"]) == ["no docstring"]
    assert function_problems(module["summary_only"]) == ["no Args section (takes x)",
                                                         "raises but has no Raises section"]
    assert function_problems(module["complete"]) == []
    assert function_problems(module["reraises"]) == []
    assert function_problems(module["partial"]) == ["Args section lacks args"]
    assert class_problems(module["Base"]) == {}
    assert class_problems(module["Child"]) == {"probe.Child": ["Args/Attributes lack c"]}
    assert class_problems(module["Same"]) == {}
    assert class_problems(module["Bare"]) == {"probe.Bare": ["no Args or Attributes section (takes a, d)"]}


def test_public_api_docstrings() -> None:
    problems = all_problems()
    assert not problems, f"{len(problems)} public objects need docstring work:\n{report(problems)}"

