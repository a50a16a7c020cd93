"""Reading an official annotation file: one JSON list, every failure one line naming the file."""
from __future__ import annotations

import json
from pathlib import Path


def read_json_list(path, what: str = "annotation", entries: str | None = None) -> list:
    """The JSON list in `path`; FileNotFoundError ("<what> file not found"), or ValueError when it is not
    JSON or not a non-empty list (of `entries`, named in the message)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not a JSON file: {e}") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of {entries or what + ' entries'}")
    return data
