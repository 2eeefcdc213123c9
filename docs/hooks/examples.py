"""The docs' code blocks: how they are read and run, by the docs test and by the docs build.

Rules for code blocks in ``docs/*.md`` (also written down in docs/design.md):

- A ```` ```python ```` block runs, in page order, in one namespace per page, so a page can
  build its model in its first block and use it in the next ones. Each page runs in its own
  temporary directory (the working directory, also on ``sys.path``) with a fresh registry.
- A block with a ``title="path/to/file"`` (any language) is not run: it is written to that
  path in the page's directory, so a page can show the files of a package and then import it.
- A block fenced ```` ```python {.no-run} ```` is shown but not run (hub downloads, GPUs).

tests/test_docs.py runs every page with `run_page`. The mkdocs build (this module is its
hook, ``on_files``) runs the pages that show a picture their own code writes: a page that
links ``![...](name.png)`` to a file the docs folder does not have is run the same way, and
the files its code wrote under those names are published with the site. So a picture in the
docs is what the code above it produces, at every build.
"""

from __future__ import annotations

import io
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OPEN_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
TITLE = re.compile(r"""title=["']([^"']+)["']""")
PICTURE = re.compile(r"!\[[^\]]*\]\((?P<target>[^)\s]+)\)")
CODE = re.compile(r"^([ \t]*)(`{3,}|~{3,}).*?^\1\2[ \t]*$|`[^`\n]+`", re.M | re.S)


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    lang: str
    classes: frozenset[str]
    title: str | None
    code: str
    line: int  # line of the first code line, 1-based

    @property
    def runs(self) -> bool:
        return self.lang == "python" and self.title is None and "no-run" not in self.classes


def parse_info(info: str) -> tuple[str, frozenset[str], str | None]:
    """Language, classes and title of a fence's info string (superfences syntax)."""
    title_match = TITLE.search(info)
    title = title_match.group(1) if title_match else None
    words = re.sub(r"[{}]", " ", TITLE.sub("", info)).split()
    classes = [w[1:] for w in words if w.startswith(".")]
    plain = [w for w in words if not w.startswith(".") and "=" not in w]
    if plain:
        lang = plain[0]
    elif classes:
        lang = classes.pop(0)  # ```{.python .no-run}
    else:
        lang = ""
    return lang, frozenset(classes), title


def blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown page (also indented ones, e.g. in admonitions)."""
    lines = text.splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = OPEN_FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = opening.group("indent"), opening.group("fence")
        close = re.compile(rf"^{re.escape(indent)}{re.escape(fence)}\s*$")
        body_start = i + 1
        j = body_start
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        body = [
            line[len(indent) :] if line.startswith(indent) else line.lstrip()
            for line in lines[body_start:j]
        ]
        lang, classes, title = parse_info(opening.group("info"))
        found.append(Block(lang, classes, title, "\n".join(body) + "\n", body_start + 1))
        i = j + 1
    return found


def run_page(path: Path, workdir: Path) -> None:
    """Run the python blocks of the page at `path` in `workdir` (see the module docstring)."""
    from bridge_core.registry import reset_registry

    namespace: dict[str, object] = {"__name__": f"docs.{path.stem}"}
    with _inside(workdir):
        reset_registry()
        try:
            for block in blocks(path.read_text(encoding="utf-8")):
                if block.title is not None:
                    target = workdir / block.title
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(block.code, encoding="utf-8")
                elif block.runs:
                    # Pad so that tracebacks point at the line in the Markdown file.
                    code = compile("\n" * (block.line - 1) + block.code, str(path), "exec")
                    exec(code, namespace)
        finally:
            reset_registry()


@contextmanager
def _inside(workdir: Path) -> Iterator[None]:
    """`workdir` as the working directory and first on sys.path; its modules forgotten after."""
    import os

    before, path = Path.cwd(), list(sys.path)
    os.chdir(workdir)
    sys.path.insert(0, str(workdir))
    try:
        yield
    finally:
        os.chdir(before)
        sys.path[:] = path
        for name, module in list(sys.modules.items()):
            if str(getattr(module, "__file__", None) or "").startswith(str(workdir)):
                del sys.modules[name]


def pictures_made_by_code(page: Path, docs_dir: Path) -> list[str]:
    """Local pictures a page links to that the docs folder does not have (code not counted)."""
    text = CODE.sub("", page.read_text(encoding="utf-8"))
    targets = [m.group("target") for m in PICTURE.finditer(text)]
    return [
        t
        for t in targets
        if "://" not in t and not t.startswith("/") and not (page.parent / t).exists()
    ]


def on_files(files: Any, config: Any, **kwargs: Any) -> Any:
    """mkdocs hook: run the pages whose pictures their code makes, and publish the pictures."""
    from mkdocs.exceptions import PluginError
    from mkdocs.structure.files import File

    docs_dir = Path(config["docs_dir"])
    for page in sorted(docs_dir.glob("*.md")):
        wanted = pictures_made_by_code(page, docs_dir)
        if not wanted:
            continue
        with tempfile.TemporaryDirectory(prefix="docs-examples-") as tmp:
            try:
                with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
                    run_page(page, Path(tmp))  # what the page prints is not the build's
            except Exception as exc:
                raise PluginError(f"running the code of {page.name} failed: {exc!r}") from exc
            for name in wanted:
                made = Path(tmp) / name
                if not made.is_file():
                    raise PluginError(
                        f"{page.name} shows {name!r}, which neither the docs folder holds nor "
                        "the page's code writes"
                    )
                src_uri = (page.parent / name).relative_to(docs_dir).as_posix()
                files.append(File.generated(config, src_uri, content=made.read_bytes()))
    return files
