"""ingestor.errors is the tree the runtime raises: every class in it is raised, and no other root exists."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from ingestor import errors

PACKAGE = Path(errors.__file__).parent
#: Exceptions that live elsewhere on purpose (see the errors module docstring).
ELSEWHERE = {
    ("settings.py", "SettingsError"),
    ("offset_reset.py", "OffsetResetRefusedError"),
    ("worker_cli.py", "_Interrupted"),
    # the stream transport's connection failures: OSErrors, as the Transport seam promises (StripeUnreachable above it)
    ("stream_transport.py", "ServerDisconnectedError"),
    (
        "stream_transport.py",
        "BadHttpAnswerError",
    ),  # a BaseException carrying a signal out of the event loop, not an error
}
TREE = {
    name: cls
    for name, cls in vars(errors).items()
    if inspect.isclass(cls) and issubclass(cls, BaseException) and cls.__module__ == errors.__name__
}


def sources() -> dict[str, str]:
    return {path.name: path.read_text() for path in PACKAGE.glob("*.py") if path.name != "errors.py"}


def test_the_tree_is_rooted_in_ingestor_error() -> None:
    assert all(issubclass(cls, errors.IngestorError) for cls in TREE.values())


@pytest.mark.parametrize("name", sorted(TREE))
def test_every_class_is_drawn_and_has_a_docstring(name: str) -> None:
    assert re.search(rf"(?m)(?:^|─ ){name}\s", errors.__doc__ or ""), f"{name} is not in the tree drawn in errors.py"
    assert TREE[name].__doc__


@pytest.mark.parametrize("name", sorted(set(TREE) - {"IngestorError"}))
def test_every_class_is_raised_by_the_runtime(name: str) -> None:
    """A class nothing raises (nor a subclass of it) draws a tree that is not the real one."""
    family = [other for other, cls in TREE.items() if issubclass(cls, TREE[name])]
    raised = re.compile(rf"\b(?:{'|'.join(family)})\(")
    assert any(raised.search(text) for text in sources().values()), f"nothing raises {name}"


def test_no_other_exception_root_in_the_runtime() -> None:
    found = set()
    for filename, text in sources().items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and any(_exceptional(base) for base in node.bases):
                found.add((filename, node.name))
    assert found == ELSEWHERE


def _exceptional(base: ast.expr) -> bool:
    name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else ""
    return name.endswith(("Error", "Exception")) or name in TREE
