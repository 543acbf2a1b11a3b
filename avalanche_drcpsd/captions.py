"""Per-class caption lists: the prompts "<class prompt>, <caption>" that CPSD trains on and sampling draws from.

The original CPSD code (isaacNingLee/CPSD 769e79b) captions every training image with BLIP-2
(``manager/manager.py`` l. 46-48), trains each class's projection on the per-image prompts ``f"{caption},
{desc}"`` (``cpsd/train_cpsd.py`` l. 239-252, ``--use_blip``) and, when sampling, gives every image the prompt
``f"{class name}, {random.choice(unique_desc[class])}"`` (``manager/manager.py`` l. 265, ``--v2_desc``), where
``unique_desc`` is the set of distinct captions of the class. No captioning model is available offline, so here
the user gives those captions per class in a file:

* JSON: ``{"<class id or name>": ["caption", ...], ...}``;
* text: one caption per line, ``<class id or name><TAB><caption>``; blank lines and lines starting with ``#``
  are skipped.

A class given no caption keeps its one class prompt. With captions, CPSD pairs each training image with a caption
of its class drawn at random at every step (the file holds captions per class, not per image), and sampling draws
one caption per image (:meth:`~avalanche_drcpsd.cpsd.EmbeddingBuffer.draw`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

__all__ = ["CaptionError", "load_captions", "check_captions", "caption_prompts"]


class CaptionError(ValueError):
    """A captions file that cannot be read as captions of the benchmark's classes."""


def _class_id(key: str, class_names: Optional[Sequence[str]], where: str) -> int:
    key = key.strip()
    if class_names is not None and key in class_names:
        return list(class_names).index(key)
    try:
        cls = int(key)
    except ValueError:
        known = f"one of the class names {list(class_names)[:10]}" if class_names else "a class id"
        raise CaptionError(f"{where}: class {key!r} is not {known} or an integer id") from None
    if cls < 0 or (class_names is not None and cls >= len(class_names)):
        raise CaptionError(f"{where}: class id {cls} is out of range"
                           + (f" (the benchmark has {len(class_names)} classes)" if class_names else ""))
    return cls


def load_captions(path: str, class_names: Optional[Sequence[str]] = None) -> Dict[int, List[str]]:
    """The captions of ``path`` (JSON or tab-separated text, see the module) keyed by class id; class names are
    looked up in ``class_names``. Duplicates are dropped in order (the original samples from the distinct
    captions). Raises :class:`CaptionError` naming the file, the line or key and what was expected."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CaptionError(f"captions file {path!r} does not exist; expected a JSON object of caption lists or a "
                           "text file of '<class><TAB><caption>' lines")
    with open(path, "r", encoding="utf-8") as fh:
        text = fh.read()
    out: Dict[int, List[str]] = {}
    if path.endswith(".json") or text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CaptionError(f"captions file {path!r} is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise CaptionError(f"captions file {path!r} holds a {type(data).__name__}; expected an object "
                               '{"<class id or name>": ["caption", ...]}')
        for key, captions in data.items():
            where = f"{path!r}, class {key!r}"
            if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
                raise CaptionError(f"{where}: {captions!r}; expected a non-empty list of strings")
            out.setdefault(_class_id(str(key), class_names, where), []).extend(captions)
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            where = f"{path!r} line {number}"
            key, tab, caption = line.partition("\t")
            if not tab:
                raise CaptionError(f"{where}: {line[:60]!r} has no tab; expected '<class id or name><TAB><caption>'")
            out.setdefault(_class_id(key, class_names, where), []).append(caption)
    for cls, captions in out.items():
        captions = [c.strip() for c in captions]
        if not all(captions):
            raise CaptionError(f"captions file {path!r}: an empty caption for class {cls}")
        out[cls] = list(dict.fromkeys(captions))
    if not out:
        raise CaptionError(f"captions file {path!r} holds no caption")
    return dict(sorted(out.items()))


def check_captions(captions: Mapping[Any, Sequence[str]]) -> Dict[int, List[str]]:
    """Caption lists given directly (``CPSDGeneratorPlugin(captions=...)``) as ``{class id: [captions]}``, each a
    non-empty list of non-empty strings (else :class:`CaptionError` naming the class); :func:`load_captions`'s
    output passes it."""
    out: Dict[int, List[str]] = {}
    for cls, texts in captions.items():
        texts = list(texts)
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise CaptionError(f"captions of class {cls}: {texts!r}; expected a non-empty list of non-empty strings")
        out[int(cls)] = texts
    return out


def caption_prompts(class_prompt: str, captions: Sequence[str]) -> List[str]:
    """``"<class prompt>, <caption>"`` for each caption (the original's ``f"{name}, {desc}"``)."""
    return [f"{class_prompt}, {c}" for c in captions]
