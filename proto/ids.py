"""The syntax of ids and bundle names on the wire: one rule for coordinator, nodes and clients.

User, node and model ids are 1-64 characters, bundle names 1-128, from ``[A-Za-z0-9._-]`` and
starting with a letter or digit, so neither can be a path. Both are checked with ``fullmatch``:
``re.match`` with a ``$`` anchor also accepts a trailing newline ("alice\\n"), which is how the
node's and the coordinator's copies of this rule once disagreed.

Dependency rule: this module imports nothing else of ours.
"""

from __future__ import annotations

import re
from typing import TypeGuard

ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
BUNDLE_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
# codec names compose with '+' ("prune50+ternary-ec"); otherwise the id rule
CODEC_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}"

_ID = re.compile(ID_PATTERN)
_BUNDLE_NAME = re.compile(BUNDLE_NAME_PATTERN)
_CODEC = re.compile(CODEC_PATTERN)


def is_valid_id(value: object) -> TypeGuard[str]:
    """True when ``value`` is a string that is wholly a user/node/model id."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def is_valid_bundle_name(value: object) -> TypeGuard[str]:
    """True when ``value`` is a string that is wholly a bundle name (never a path)."""
    return isinstance(value, str) and _BUNDLE_NAME.fullmatch(value) is not None


def is_valid_codec(value: object) -> TypeGuard[str]:
    """True when ``value`` is a string that is wholly a codec name (an id that may compose with '+')."""
    return isinstance(value, str) and _CODEC.fullmatch(value) is not None
