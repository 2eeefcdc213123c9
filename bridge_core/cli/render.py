"""Terminal output of the CLI: rich tables and trees, or plain text without rich.

rich is in the ``cli`` extra, so it is imported lazily; with ``--plain`` or without rich
the same calls print aligned plain text.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

Cell = str | int | float


@dataclass
class Node:
    """A node of a tree to print: a label and its children, by key, in insertion order."""

    label: str
    children: dict[str, Node] = field(default_factory=dict)
    note: str = ""

    def child(self, key: str, label: str | None = None) -> Node:
        """The child under `key`, created (labelled `label` or `key`) if missing."""
        if key not in self.children:
            self.children[key] = Node(label if label is not None else key)
        return self.children[key]


class Output:
    """Where the CLI prints: a rich console, or plain text if asked or rich is missing."""

    def __init__(self, plain: bool = False) -> None:
        self._console: Any = None if plain else _rich_console()

    @property
    def is_rich(self) -> bool:
        """Whether output goes through rich."""
        return self._console is not None

    def line(self, text: str = "", style: str | None = None) -> None:
        """Print one line of text (`style` is a rich style, ignored in plain text)."""
        if self._console is None:
            print(text)
            return
        from rich.text import Text

        self._console.print(Text(text, style=style or ""), soft_wrap=True)

    def heading(self, text: str) -> None:
        """Print a section heading."""
        if self._console is None:
            print(f"\n{text}\n{'=' * len(text)}")
            return
        self._console.rule(_text(text, "bold"), align="left")

    def fields(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Print ``label  value`` lines with the labels aligned."""
        rows = list(pairs)
        width = max((len(label) for label, _ in rows), default=0)
        for label, value in rows:
            if self._console is None:
                print(f"{label.ljust(width)}  {value}")
            else:
                from rich.text import Text

                line = Text(label.ljust(width) + "  ", style="bold")
                line.append(value)
                self._console.print(line, soft_wrap=True)

    def table(
        self,
        title: str,
        columns: Sequence[str],
        rows: Iterable[Sequence[Cell]],
        right: Collection[str] = (),
    ) -> None:
        """Print a table; columns named in `right` are right-aligned."""
        body = [[str(cell) for cell in row] for row in rows]
        if self._console is None:
            _plain_table(title, columns, body, right)
            return
        from rich.table import Table

        table = Table(title=title, title_justify="left", title_style="bold", header_style="bold")
        self._console.print()
        for name in columns:
            table.add_column(name, justify="right" if name in right else "left", overflow="fold")
        for row in body:
            table.add_row(*(_text(cell) for cell in row))
        self._console.print(table)

    def tree(self, root: Node) -> None:
        """Print a tree (rich's tree guides, or two-space indentation)."""
        if self._console is None:
            _plain_tree(root, 0)
            return
        from rich.tree import Tree

        tree = Tree(_text(root.label, "bold"))
        _rich_tree(tree, root)
        self._console.print(tree)


def _rich_console() -> Any:
    try:
        from rich.console import Console
    except ImportError:
        return None
    # Not a terminal (a pipe, a file, a test): rich would assume 80 columns and fold names.
    return Console(width=None if sys.stdout.isatty() else 120, highlight=False)


def _text(value: str, style: str = "") -> Any:
    """A rich Text (never parsed as markup: shapes like ``[1, 5, 64]`` stay literal)."""
    from rich.text import Text

    return Text(value, style=style)


def _rich_tree(tree: Any, node: Node) -> None:
    for child in node.children.values():
        label = _text(child.label, "cyan" if child.children else "")
        if child.note:
            label.append("  " + child.note, style="green")
        _rich_tree(tree.add(label), child)


def _plain_tree(node: Node, depth: int) -> None:
    note = f"  {node.note}" if node.note else ""
    print("  " * depth + node.label + note)
    for child in node.children.values():
        _plain_tree(child, depth + 1)


def _plain_table(
    title: str, columns: Sequence[str], rows: list[list[str]], right: Collection[str]
) -> None:
    widths = [max([len(c), *(len(row[i]) for row in rows)]) for i, c in enumerate(columns)]

    def fmt(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(w) if name in right else cell.ljust(w)
            for cell, w, name in zip(cells, widths, columns, strict=True)
        ]
        return "  ".join(parts).rstrip()

    print(f"\n{title}")
    print(fmt(columns))
    print(fmt(["-" * w for w in widths]))
    for row in rows:
        print(fmt(row))
