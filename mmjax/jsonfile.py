"""Reading the JSON files of a checkpoint folder: every failure is a LoadError naming the file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmjax.errors import LoadError

__all__ = ["read_json"]


def read_json(path: str | Path, *, want_object: bool = True, what: str | None = None,
              error: type[Exception] = LoadError) -> Any:
    """Parse `path`; with want_object, anything but a JSON object is refused too. Every failure
    is an `error` naming the file (and `what` it is for a missing one). RecursionError included:
    a file nested past the parser's depth ("[[[[...") is malformed, not a crash."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: missing" + (f"; {what}" if what else "")) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if want_object and not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
