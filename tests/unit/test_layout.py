"""tests/unit mirrors gateway/ file for file: gateway/<part>/<module>.py is tested in
tests/unit/<part>/test_<module>.py (a top-level module in tests/unit/test_<module>.py),
which imports the module it is named after. A reader looking for a module's tests
finds them in one place, and a module without tests shows here.

Exceptions are named, each with its reason: a module whose behaviour lives in another
process (tested in the integration file named), and test files of no one module."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest

import tests.conftest as tiers

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "tests" / "unit"

# Integration by nature: nothing of the module can run without the server it talks
# to. The list stays minimal: app.py, workers.py and __main__.py have mirrors for
# their parts that need no socket or fork.
INTEGRATION = {
    # Every decision of RedisStore is a Lua script run inside redis-server (GCRA,
    # leases, their renewal and expiry on Redis's clock): without one there is
    # nothing to run. The file starts a real redis-server on loopback.
    "gateway/store/redis.py": "tests/integration/test_ratelimit_redis.py",
    # The DMARC report store in Redis: its counting and bound are a Lua script, its
    # lease a SET NX, all inside redis-server; the file starts one.
    "gateway/dmarcreports/redisstore.py": "tests/integration/test_dmarc_reports.py",
    # The same for the greylist's Redis store: its decision is one Lua script on
    # Redis's clock (its equal in Python, store/greylist.py, has its mirror).
    "gateway/store/greylist_redis.py": "tests/integration/test_greylist_redis.py",
}

# Test files of no one module, by what they hold to account.
CROSS_CUTTING = {
    "tests/unit/test_layout.py": "this file: the tier's layout",
    "tests/unit/test_layers.py": "which part of gateway/ may import which",
    "tests/unit/test_docs.py": "README and docs/: generated pages current, examples valid",
    "tests/unit/test_presets.py": "policies/*.yaml: what each preset promises of the others",
    "tests/unit/test_check_contract.py": "the contract every check keeps with the runner",
}


def modules() -> list[str]:
    return sorted(
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "gateway").rglob("*.py")
        if p.name != "__init__.py"
    )


def mirror(module: str) -> str:
    """tests/unit/<part>/test_<module>.py for gateway/<part>/<module>.py."""
    path = Path(module).relative_to("gateway")
    return (Path("tests/unit") / path.parent / f"test_{path.stem}.py").as_posix()


MIRRORED = [m for m in modules() if m not in INTEGRATION]


def test_every_module_has_its_mirror() -> None:
    missing = [mirror(m) for m in MIRRORED if not (ROOT / mirror(m)).is_file()]
    assert missing == []


def imported(tree: ast.Module) -> set[str]:
    """Every module name an import in `tree` names, anywhere in the file (`from a.b
    import c` names a.b and a.b.c: c may be a module); and for a module run rather
    than imported, the name given to runpy.run_module."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "run_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            out.add(f"{node.args[0].value}.__main__")  # `python -m` runs <package>.__main__
    return out


@pytest.mark.parametrize("module", MIRRORED)
def test_each_mirror_imports_its_module(module: str) -> None:
    path = ROOT / mirror(module)
    if not path.is_file():
        pytest.fail(f"{mirror(module)} is missing")
    dotted = module.removesuffix(".py").replace("/", ".")
    assert dotted in imported(ast.parse(path.read_text())), f"{mirror(module)} never names it"


@pytest.mark.parametrize(("module", "tests"), sorted(INTEGRATION.items()))
def test_a_module_left_to_integration_names_a_test_file_that_exists(
    module: str, tests: str
) -> None:
    assert (ROOT / module).is_file(), f"{module} is gone: take it off the list"
    assert (ROOT / tests).is_file()
    assert not (ROOT / mirror(module)).is_file(), "it has a mirror now: take it off the list"


def test_every_test_file_of_the_tier_is_a_mirror_or_named() -> None:
    """The other direction: a test file named after no module (one that was renamed
    or removed, or a test put beside the wrong file) shows here."""
    owners = {mirror(m): m for m in modules()}
    stray = []
    for path in sorted(UNIT.rglob("test_*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in owners or rel in CROSS_CUTTING:
            continue
        stray.append(rel)
    assert stray == []


def test_every_folder_of_the_tier_is_a_package() -> None:
    """Without __init__.py two folders' test_memory.py would be one module to pytest."""
    folders = [p for p in UNIT.rglob("*") if p.is_dir() and p.name != "__pycache__"]
    assert folders
    assert [f for f in folders if not (f / "__init__.py").is_file()] == []


@pytest.mark.parametrize(
    ("where", "markers"),
    [
        ("tests/unit/test_wire.py", ["unit"]),
        ("tests/unit/smtp/test_session.py", ["unit"]),
        ("tests/unit/checks/test_dkim.py", ["unit"]),
        ("tests/integration/test_tls.py", ["integration"]),
        ("tests/interop/test_postfix.py", ["integration", "slow"]),
    ],
)
def test_the_tier_follows_from_the_folder_at_any_depth(where: str, markers: list[str]) -> None:
    """tests/conftest.py marks by path: `pytest -m unit` must find the subfolders too."""
    added: list[str] = []
    item = SimpleNamespace(path=ROOT / where, add_marker=lambda m: added.append(m.name))
    tiers.pytest_collection_modifyitems([item])  # type: ignore[list-item]
    assert added == markers
