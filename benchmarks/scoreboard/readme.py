"""The "Benchmark results" section of README.md: one block per results
stem, between `<!-- bench:part NAME -->` and `<!-- bench:part-end NAME -->`,
all inside `<!-- bench:start -->` ... `<!-- bench:end -->`."""
from __future__ import annotations

import re

from . import README

MARK_START, MARK_END = "<!-- bench:start -->", "<!-- bench:end -->"

PART_RE = re.compile(r"<!-- bench:part ([\w.-]+) -->\n(.*?)<!-- bench:part-end \1 -->\n?", re.S)


def update_readme(section: str, part: str = "compare") -> None:
    """Puts `section` into the README's results section as the block named
    `part` (one per results stem: the full run's, one per stack), keeping
    the other blocks; text there without block markers is the full run's."""
    text = README.read_text()
    parts: dict[str, str] = {}
    if MARK_START in text and MARK_END in text:
        pre, rest = text.split(MARK_START, 1)
        inner, post = rest.split(MARK_END, 1)
        loose = PART_RE.sub("", inner).strip()
        if loose:
            parts["compare"] = loose
        parts.update({k: v.strip() for k, v in PART_RE.findall(inner)})
    else:
        pre, post = text.rstrip("\n") + "\n\n## Benchmark results\n\n", "\n"
    parts[part] = section.strip()
    order = sorted(parts, key=lambda k: (k != "compare", k))
    blocks = "\n\n".join(f"<!-- bench:part {k} -->\n{parts[k]}\n<!-- bench:part-end {k} -->"
                           for k in order)
    README.write_text(pre + f"{MARK_START}\n{blocks}\n{MARK_END}" + post)
