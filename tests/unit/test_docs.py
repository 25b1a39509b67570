"""The documentation is checked like code.

- The generated pages (docs/configuration.md, docs/replies.md) are what
  `python docs/generate.py` writes from the source now.
- Every fenced code block of the README and of docs/ is exercised, by what its info
  string says it is (nothing is skipped without a marker that says so):
  - ```yaml: a gateway configuration (`title="gateway.yaml"`), a policy file
    (`title="policy.yaml"`), Helm values (`title="my-values.yaml"`), or what
    `check="..."` names (`umbrella-chart`, `umbrella-values`); unmarked, the block's
    top-level keys must fit exactly one of the first three. Each is validated as the
    gateway (or Helm) would: the settings model, the policy loader with `extends:`
    resolved, the chart's values.schema.json over the chart's own defaults.
  - ```sh, ```console: every `smtp-gateway ...` command parses with the CLI's own
    argument parser; a `python X.py` script and a path into the repository exist.
    In a console block only `$ ` lines are commands; the rest is output.
  - ```text: output, logs, diagrams; it may not hide a `smtp-gateway` command.
  - any other language (another program's configuration): only with `skip="why"`.
- Links between the pages resolve, anchors included, and every alert rule has its
  runbook in docs/operations.md.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import json
import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from gateway import cli
from gateway.checks.registry import all_known_symbols
from gateway.config import ConfigError, Settings, format_validation_error
from gateway.pipeline import policy as policy_mod
from gateway.pipeline.policy import Policy

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CHART = ROOT / "helm" / "smtp-gateway"
REGENERATE = "run `python docs/generate.py` and commit the result"


@functools.cache
def _generator() -> ModuleType:
    """docs/generate.py, imported (it is a script, not a package module)."""
    path = ROOT / "docs" / "generate.py"
    spec = importlib.util.spec_from_file_location("docs_generate", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_generated_pages_are_current() -> None:
    gen = _generator()
    for path, text in gen.outputs().items():
        name = path.relative_to(ROOT)
        assert path.exists(), f"{name} is missing: {REGENERATE}"
        assert path.read_text() == text, f"{name} is out of date with the source: {REGENERATE}"


def test_generator_check_mode_agrees(capsys: pytest.CaptureFixture[str]) -> None:
    code = _generator().main(["--check"])
    assert code == 0, capsys.readouterr().err + REGENERATE


# -- code blocks ---------------------------------------------------------------------

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    attrs: dict[str, str] = field(default_factory=dict)
    text: str = ""

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    def __str__(self) -> str:
        return self.id


def _info(info: str) -> tuple[str, dict[str, str]]:
    words = shlex.split(info)
    if not words:
        return "", {}
    attrs: dict[str, str] = {}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        attrs[key] = value if sep else ""
    return words[0].lower(), attrs


def blocks_of(page: Path) -> Iterator[Block]:
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = len(m["indent"]), m["fence"]
        lang, attrs = _info(m["info"].strip())
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            stripped = lines[j].strip()
            if stripped.startswith(fence[0] * len(fence)) and not stripped.strip(fence[0]):
                break
            body.append(lines[j][indent:] if lines[j][:indent].isspace() else lines[j])
            j += 1
        else:
            pytest.fail(f"{page.relative_to(ROOT)}:{i + 1}: code block never closed")
        yield Block(page, i + 1, lang, attrs, "\n".join(body) + "\n")
        i = j + 1


BLOCKS = [b for page in PAGES for b in blocks_of(page)]
YAML = [b for b in BLOCKS if b.lang in ("yaml", "yml")]
SHELL = [b for b in BLOCKS if b.lang in ("sh", "console", "shell", "bash")]
OTHER = [b for b in BLOCKS if b not in YAML and b not in SHELL]


def test_every_page_has_blocks_and_they_were_found() -> None:
    assert len(BLOCKS) >= 20
    assert any(b.page.name == "README.md" for b in YAML)


# -- YAML ----------------------------------------------------------------------------


def _keys(model: type[Any]) -> set[str]:
    return set(model.model_fields)


def _schema() -> dict[str, Any]:
    return dict(json.loads((CHART / "values.schema.json").read_text()))


def yaml_kind(block: Block, data: dict[str, Any]) -> str:
    if "check" in block.attrs:
        return block.attrs["check"]
    name = PurePosixPath(block.attrs.get("title", "")).name
    if name == "gateway.yaml":
        return "gateway"
    if name == "policy.yaml" or name.endswith("-policy.yaml"):
        return "policy"
    if name.endswith("values.yaml"):
        return "helm-values"
    top = set(data)
    fits = [
        kind
        for kind, keys in (
            ("gateway", _keys(Settings)),
            ("policy", _keys(Policy) | {"extends"}),
            ("helm-values", set(_schema()["properties"])),
        )
        if top <= keys
    ]
    if len(fits) != 1:
        pytest.fail(
            f"{block}: cannot tell what this YAML is (top-level keys {sorted(top)}, "
            f'fits {fits or "nothing"}): mark it, e.g. ```yaml title="gateway.yaml"'
        )
    return fits[0]


def _merge(base: Any, over: Any) -> Any:
    """Helm's (and the policy's) merge: mappings key by key, anything else replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = _merge(base.get(key), value) if key in base else value
        return out
    return over


def _tables(data: Any, into: Path) -> None:
    """Create every table file a policy names (`file:`, `secrets_file:`), so that a
    documented policy loads as it would next to its files."""
    if isinstance(data, dict):
        for key, value in data.items():
            if key in ("file", "secrets_file") and isinstance(value, str):
                target = into / value
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists():
                    target.write_text("a-documentation-secret\n" if key == "secrets_file" else "")
            else:
                _tables(value, into)
    elif isinstance(data, list):
        for item in data:
            _tables(item, into)


def check_policy(text: str, where: Path, files: dict[str, str] | None = None) -> Policy:
    where.mkdir(parents=True, exist_ok=True)
    for name, content in (files or {}).items():
        (where / name).write_text(content)
    _tables(yaml.safe_load(text), where)
    path = where / "policy.yaml"
    path.write_text(text)
    return policy_mod.load(str(path), all_known_symbols())


def check_gateway(data: dict[str, Any]) -> None:
    settings = Settings.model_validate(data)
    if "/" not in settings.policy and not settings.policy.endswith((".yaml", ".yml")):
        policy_mod.load(settings.policy, all_known_symbols())  # a preset that exists


def check_helm_values(data: dict[str, Any], tmp: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema validates Helm values")
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    values = _merge(defaults, data)
    errors = sorted(
        jsonschema.Draft7Validator(_schema()).iter_errors(values), key=lambda e: list(e.path)
    )
    assert not errors, "; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    policy = values["policy"]
    if policy.get("content"):
        # As templates/configmap.yaml writes it: extends first, unless the content has its own.
        content = policy["content"]
        if policy.get("extends") and not re.search(r"(?m)^extends:", content):
            content = f"extends: {policy['extends']}\n{content}"
        check_policy(content, tmp / "policy", policy.get("files"))


def check_umbrella_chart(data: dict[str, Any]) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    deps = {d["name"]: d for d in data["dependencies"]}
    for dep in deps.values():
        assert {"name", "version", "repository"} <= set(dep), dep
    assert deps["smtp-gateway"]["version"] == chart["version"]


@pytest.mark.parametrize("block", YAML, ids=str)
def test_yaml_block_is_valid(block: Block, tmp_path: Path) -> None:
    if "skip" in block.attrs:
        assert block.attrs["skip"], f"{block}: skip= needs a reason"
        return
    data = yaml.safe_load(block.text)
    assert isinstance(data, dict), f"{block}: a YAML block must be a mapping"
    kind = yaml_kind(block, data)
    try:
        if kind == "gateway":
            check_gateway(data)
        elif kind == "policy":
            check_policy(block.text, tmp_path)
        elif kind == "helm-values":
            check_helm_values(data, tmp_path)
        elif kind == "umbrella-values":
            check_helm_values(data["smtp-gateway"], tmp_path)
        elif kind == "umbrella-chart":
            check_umbrella_chart(data)
        else:
            pytest.fail(f"{block}: unknown check={kind!r}")
    except ValidationError as e:
        pytest.fail(f"{block} ({kind}):\n{format_validation_error(e, block.id)}")
    except ConfigError as e:
        pytest.fail(f"{block} ({kind}):\n{e}")


# -- commands --------------------------------------------------------------------------

_OPERATORS = {"&&", "||", ";", "|", "&"}
_REPO_DIRS = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".venv")}


def command_lines(block: Block) -> list[str]:
    joined: list[str] = []
    pending = ""
    for line in block.text.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    if block.lang == "console":
        return [line[2:] for line in joined if line.startswith("$ ")]
    return [line for line in joined if line.strip() and not line.lstrip().startswith("#")]


def simple_commands(line: str) -> list[list[str]]:
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    out: list[list[str]] = [[]]
    for token in lex:
        if token in _OPERATORS:
            out.append([])
        else:
            out[-1].append(token)
    return [argv for argv in out if argv]


def check_command(argv: list[str], block: Block) -> None:
    while argv and (argv[0] == "sudo" or re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0])):
        argv = argv[1:]
    if not argv:
        return
    prog = PurePosixPath(argv[0]).name
    if prog == "smtp-gateway":
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                cli._parser().parse_args(argv[1:])
            except SystemExit as e:
                pytest.fail(
                    f"{block}: `{shlex.join(argv)}` does not parse ({e}):\n{err.getvalue()}"
                )
    if prog.startswith("python") and len(argv) > 1 and argv[1].endswith(".py"):
        assert (ROOT / argv[1]).is_file(), f"{block}: {argv[1]} does not exist"
    for arg in argv[1:]:
        first = PurePosixPath(arg.removeprefix("./")).parts[:1]
        if first and first[0] in _REPO_DIRS and "/" in arg and not arg.startswith("-"):
            assert (ROOT / arg).exists(), f"{block}: {arg} does not exist in the repository"


@pytest.mark.parametrize("block", SHELL, ids=str)
def test_commands_parse(block: Block) -> None:
    lines = command_lines(block)
    assert lines, f"{block}: a {block.lang} block without a command"
    for line in lines:
        for argv in simple_commands(line):
            check_command(argv, block)


def test_the_cli_check_rejects_a_bad_command() -> None:
    """The command check is not vacuous: a misspelt option fails it."""
    block = Block(ROOT / "README.md", 0, "sh", {}, "smtp-gateway run --confg x\n")
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        test_commands_parse(block)


# -- everything else --------------------------------------------------------------------


@pytest.mark.parametrize("block", OTHER, ids=str)
def test_other_blocks_are_marked(block: Block) -> None:
    if block.lang == "text":
        for line in block.text.splitlines():
            assert not re.match(r"^(\$ )?smtp-gateway\s", line), (
                f"{block}: a command in a text block is never checked: use ```sh or ```console"
            )
        return
    if block.lang == "json":
        json.loads(block.text)
        return
    assert block.lang, (
        f"{block}: a code block without a language: mark it (```yaml, ```sh, ```console, "
        '```text, or ```LANG skip="why" for another program\'s configuration)'
    )
    assert block.attrs.get("skip"), (
        f'{block}: ```{block.lang} is not checked: add skip="why" to its info string, '
        "or use yaml, sh, console or text"
    )


# -- the README's promises ----------------------------------------------------------------


def test_readme_runs_the_test_command_ci_runs() -> None:
    """.ci/run runs the README's test command verbatim; they must stay the same."""
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    marker = ci.index("# The README's test command, verbatim:")
    command = ci[marker + 1]
    readme_commands = [b.text.strip() for b in SHELL if b.page.name == "README.md"]
    assert command in readme_commands


def test_readme_starts_with_install_run_send_test() -> None:
    first = [b.text.strip() for b in SHELL if b.page.name == "README.md"][:3]
    assert first[0].endswith(".venv/bin/smtp-gateway run")
    assert first[1].startswith("swaks --server 127.0.0.1:2525")
    assert first[2].endswith(".venv/bin/python -m pytest")


def test_readme_stays_short() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 160, "the README is an introduction; details go to docs/"


# -- links and runbooks ---------------------------------------------------------------------

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")


def slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    out: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in page.read_text().splitlines():
        if _FENCE.match(line):
            in_code = not in_code
            continue
        if in_code:
            continue
        out.update(_ANCHOR.findall(line))
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*$", line)
        if m:
            base = slug(m[1])
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def prose_of(page: Path) -> str:
    """The page without its code blocks and code spans (links there are not links)."""
    text = re.sub(r"(?ms)^[ \t]*(`{3,}|~{3,}).*?^[ \t]*\1[ \t]*$", "", page.read_text())
    return re.sub(r"`[^`\n]*`", "", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page: Path) -> None:
    for target in _LINK.findall(prose_of(page)):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to {target}: no such file"
        if fragment and dest.suffix == ".md":
            assert fragment in anchors(dest), f"{page.name}: link to {target}: no such anchor"


def _alerts() -> list[dict[str, Any]]:
    rules = yaml.safe_load((ROOT / "grafana" / "alerts.yaml").read_text())
    return [r for g in rules["groups"] for r in g["rules"] if "alert" in r]


@pytest.mark.parametrize("rule", _alerts(), ids=lambda r: str(r["alert"]))
def test_every_alert_has_a_runbook_in_operations(rule: dict[str, Any]) -> None:
    page = ROOT / "docs" / "operations.md"
    assert rule["alert"] in anchors(page), f"docs/operations.md has no anchor {rule['alert']}"
    assert f"### {rule['alert']}" in page.read_text()


@pytest.mark.parametrize("rule", _alerts(), ids=lambda r: str(r["alert"]))
def test_every_alert_annotation_points_at_its_runbook(rule: dict[str, Any]) -> None:
    runbook = rule["annotations"]["runbook_url"]
    assert "runbook" not in rule["annotations"], "the annotation is runbook_url"
    assert runbook == f"docs/operations.md#{rule['alert']}", runbook
    path, _, fragment = runbook.partition("#")
    assert (ROOT / path).is_file(), runbook
    assert fragment in anchors(ROOT / path), runbook
