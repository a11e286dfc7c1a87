"""Another code base's names for the keys of a model's state dict, so that weights move between ssat and it
(RobustBench's model definitions) in both directions without hand-written key lists."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import Tensor


def _pattern(template: str) -> re.Pattern:
    """``block{g}.{i}.`` -> a regex with a named group of digits per ``{name}``; a template ending in "." matches a
    key's beginning, any other the whole key."""
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(re.escape(p) if n % 2 == 0 else f"(?P<{p}>\\d+)" for n, p in enumerate(parts))
    return re.compile(regex if template.endswith(".") else regex + "$")


def _rename(key: str, rules: tuple[tuple[str, str], ...]) -> str:
    for source, target in rules:
        match = _pattern(source).match(key)
        if match:
            return target.format(**match.groupdict()) + key[match.end():]
    return key


@dataclass(frozen=True)
class KeyLayout:
    """``renames``: (ssat's key template, theirs) pairs, the first that matches a key renames it; keys that none
    matches are the same in both. ``definition``: the class there that these keys load into, as a format string
    over the model's ``definition_args()``; it takes ``channels`` x ``image_size`` x ``image_size`` inputs."""

    renames: tuple[tuple[str, str], ...]
    definition: str
    channels: int = 3
    image_size: int = 32

    def to_theirs(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return {_rename(k, self.renames): v for k, v in state.items()}

    def to_ours(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        inverse = tuple((theirs, ours) for ours, theirs in self.renames)
        return {_rename(k, inverse): v for k, v in state.items()}
