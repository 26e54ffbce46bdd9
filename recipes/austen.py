"""Jane Austen's six novels, from Debian's r-cran-janeaustenr (MIT; the texts are public domain), as a folder of
chapter text files: real English prose for training (`data.source=DIR`) and for `zoo eval lm --data DIR`.

The package keeps the novels as R data (character vectors of lines in a lazy-load database), so they are read
through R itself: `Rscript`, which the Debian package depends on. Each chapter becomes DIR/NOVEL/chapter-NNN.txt,
one paragraph per line (Project Gutenberg's hard wraps undone; its _italics_ in underscores kept), without the
"CHAPTER n" heading; the front matter before chapter 1 and Emma's "VOLUME n" headings are left out. Like any text
folder, DIR is split into train and val by file when loaded (recipes.data.split_files), so a held-out chapter is
never trained on. DIR/info.json records the source and the counts.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from .data import DataError

__all__ = ["NOVELS", "read_novels", "split_chapters", "write_austen"]

NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
CHAPTER_HEADING = re.compile(r"(CHAPTER|Chapter) ([0-9]+|[IVXLC]+)")
VOLUME_HEADING = re.compile(r"VOLUME [IVX]+")
INSTALL_HINT = "install Debian's r-cran-janeaustenr (apt-get install r-cran-janeaustenr), which brings R along"
# prints the package version, then each novel after a form-feed line naming it
R_SCRIPT = ('cat(format(packageVersion("janeaustenr")), "\\n"); for (name in commandArgs(trailingOnly = TRUE)) '
            'writeLines(c(paste0("\\f", name), getExportedValue("janeaustenr", name)))')


def read_novels() -> tuple[str, dict[str, list[str]]]:
    """(janeaustenr's version, {novel: its lines}), read through Rscript."""
    try:
        run = subprocess.run(["Rscript", "-e", R_SCRIPT, *NOVELS], capture_output=True, text=True,
                             encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"Rscript not found: {INSTALL_HINT}") from None
    if run.returncode != 0:
        raise DataError(f"R could not read janeaustenr ({run.stderr.strip()}): {INSTALL_HINT}")
    version, *lines = run.stdout.split("\n")
    novels: dict[str, list[str]] = {}
    for line in lines:
        if line.startswith("\f"):
            novels[line[1:]] = []
        elif novels:
            novels[next(reversed(novels))].append(line)
    return version.strip(), novels


def split_chapters(lines: list[str]) -> list[str]:
    """The text of each chapter of a novel's lines, one paragraph per line (a paragraph ends at a blank line);
    headings, the front matter and volume headings are left out."""
    chapters: list[list[list[str]]] = []   # chapters of paragraphs of lines
    for line in lines:
        line = line.strip()
        if CHAPTER_HEADING.fullmatch(line):
            chapters.append([[]])
        elif not chapters or VOLUME_HEADING.fullmatch(line):
            continue
        elif line:
            chapters[-1][-1].append(line)
        elif chapters[-1][-1]:
            chapters[-1].append([])
    return ["".join(" ".join(paragraph) + "\n" for paragraph in chapter if paragraph) for chapter in chapters]


def write_austen(out_dir: Path) -> dict:
    """Write every chapter as out_dir/NOVEL/chapter-NNN.txt and out_dir/info.json; returns the info."""
    version, novels = read_novels()
    info = {"source": f"Debian r-cran-janeaustenr (R package janeaustenr {version})", "novels": {}}
    for name in NOVELS:
        chapters = split_chapters(novels[name])
        if not chapters:
            raise DataError(f"janeaustenr's {name} has no 'CHAPTER n' heading: is this another edition of it?")
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        for number, text in enumerate(chapters, 1):
            (out_dir / name / f"chapter-{number:03d}.txt").write_text(text)
        info["novels"][name] = {"chapters": len(chapters), "words": sum(len(text.split()) for text in chapters)}
    info["chapters"] = sum(novel["chapters"] for novel in info["novels"].values())
    info["words"] = sum(novel["words"] for novel in info["novels"].values())
    (out_dir / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
