"""Files drzero writes and later reads back, checked against their shape before anything trusts them.

    recorded = read_record(path, STATE)       # the value; None when there is no file; DamagedRecord when damaged
    set_aside(path, str(damage), "prepare-data runs again", warn)   # moved aside, said in one sentence

state.json, the manifests of committed sets, gen-data's shard journal, download records and a corpus
store's index-check record are written by drzero and read back by a later run, often after a kill, a
full disk or a hand edit. A file that does not parse, or parses to the wrong shape, is not trusted at
all: ``set_aside`` renames it to ``NAME.damaged-<UTC time>`` beside it (kept for a post-mortem) and
says in one sentence what was wrong and what will be redone; the caller then does the work again as
if the file had never been written. Never a traceback, never a silent skip.

A shape names only what the readers use, so a file written by an older or newer drzero with more keys
still reads; a missing or mistyped key is damage:

    str, int, float, bool, dict, list   a value of that type (float takes an integer; int never takes true)
    (str, None)                         any of these shapes (None: null)
    {"key": shape}                      an object with these keys (more are allowed)
    {"key": Optional(shape)}            ... where this key may be missing or null
    Each(shape)                         an object whose every value has the shape (keys are names)
    [shape]                             a list whose every item has the shape
    [shape, shape]                      a list of exactly these items (a [start, end] pair)
    OneOf("running", "done")            one of these values
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


class DamagedRecord(ValueError):
    """A file drzero wrote cannot be trusted; the message says what is wrong with it, in a few words."""


@dataclass(frozen=True)
class Optional:
    shape: object


@dataclass(frozen=True)
class Each:
    shape: object


class OneOf:
    def __init__(self, *values):
        self.values = values


_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
          bool: "true or false", type(None): "null"}


def _what(shape) -> str:
    if isinstance(shape, tuple):
        return " or ".join(_what(s) for s in shape)
    if shape is None:
        return "null"
    if isinstance(shape, dict) or isinstance(shape, Each):
        return "an object"
    if isinstance(shape, list):
        return "a list" if len(shape) == 1 else f"a list of {len(shape)} items"
    if isinstance(shape, OneOf):
        return " or ".join(json.dumps(v) for v in shape.values)
    return _NAMES.get(shape, getattr(shape, "__name__", str(shape)))


def _shown(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _described(value) -> str:
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return f"{_NAMES.get(type(value), type(value).__name__)} ({_shown(value)})"


def _fits_type(value, kind) -> bool:
    if kind is float:  # JSON has one number type: 3 is a fine float
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _child(where: str, key) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}[{json.dumps(key)}]" if where else key


def problem(value, shape, where: str = "") -> str | None:
    """What about ``value`` does not have ``shape`` (the first thing found, named by its path in the file:
    ``stages["iter1/challenger"]``), or None."""
    subject = where or "it"
    if isinstance(shape, tuple):
        if any(problem(value, option, where) is None for option in shape):
            return None
        return f"{subject} is {_described(value)}, not {_what(shape)}"
    if shape is None or isinstance(shape, OneOf):
        allowed = (None,) if shape is None else shape.values
        return None if value in allowed else f"{subject} is {_shown(value)}, not {_what(shape)}"
    if isinstance(shape, type):
        fits = _fits_type(value, shape)
        return None if fits else f"{subject} is {_described(value)}, not {_what(shape)}"
    kind = dict if isinstance(shape, (dict, Each)) else list
    if not isinstance(value, kind):
        return f"{subject} is {_described(value)}, not {_what(shape)}"
    if isinstance(shape, Each):
        return next((p for key, item in value.items() if (p := problem(item, shape.shape, _child(where, key)))),
                    None)
    if isinstance(shape, dict):
        for key, expected in shape.items():
            optional = isinstance(expected, Optional)
            if key not in value or (optional and value[key] is None):
                if optional:
                    continue
                return f"{subject} has no {json.dumps(key)}"
            found = problem(value[key], expected.shape if optional else expected, _child(where, key))
            if found:
                return found
        return None
    if len(shape) > 1 and len(value) != len(shape):
        return f"{subject} has {len(value)} items, not {len(shape)}"
    items = shape if len(shape) > 1 else shape * len(value)
    return next((p for i, (item, expected) in enumerate(zip(value, items))
                 if (p := problem(item, expected, _child(where, i)))), None)


def parse_record(text: str, shape) -> object:
    """``text`` as JSON of ``shape``; DamagedRecord (what is wrong) otherwise."""
    if not text.strip():
        raise DamagedRecord("it is empty")
    try:
        value = json.loads(text)
    except ValueError as error:
        raise DamagedRecord(f"it is not JSON ({error})") from None
    found = problem(value, shape)
    if found:
        raise DamagedRecord(found)
    return value


def read_record(path: Path, shape) -> object | None:
    """The JSON in ``path`` when it has ``shape``; None when there is no file; DamagedRecord otherwise."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise DamagedRecord(f"it cannot be read ({error})") from None
    return parse_record(text, shape)


def set_aside(path: Path, damage: str, redo: str, warn: Callable[[str], None] = log.warning, *,
              move: bool = True) -> Path | None:
    """Rename the damaged ``path`` to ``NAME.damaged-<time>`` and say so in one sentence, with what ``redo`` will be
    done instead; with ``move=False`` (a dry run) only say what a real run does. Returns where it went."""
    path = Path(path)
    if not move:
        warn(f"{path} is damaged: {damage}; a real run moves it aside and {redo}")
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    number = 1
    while aside.exists():
        aside, number = path.with_name(f"{path.name}.damaged-{stamp}-{number}"), number + 1
    try:
        # no directory fsync: should a power loss undo the rename, the next run finds the file damaged again
        os.replace(path, aside)
    except OSError as error:
        warn(f"{path} is damaged: {damage}; it could not be moved aside ({error.strerror or error}), so it is "
             f"ignored and {redo}")
        return None
    warn(f"{path} is damaged: {damage}; moved it to {aside.name} and {redo}")
    return aside
