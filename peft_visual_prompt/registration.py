"""The method's identity for PEFT: the `PeftType` member, its name and its parameter prefix.

PEFT keeps its methods in a closed enum, `peft.utils.PeftType`, and `register_peft_method` refuses any name that is
not already a member. A third-party method therefore adds its member to the enum itself, once, at import. This module
imports nothing from the package, so every other module can import it; the package's `__init__` then calls
`register_peft_method`, as PEFT's own method folders do.
"""

from __future__ import annotations

from peft.utils import PeftType

NAME = "visual_prompt"
PREFIX = "visual_prompt_"


def _add_peft_type_member(name: str) -> PeftType:
    """Adds `name` to `PeftType` (idempotent) and returns the member.

    This relies on Enum internals, which is why it lives alone here. The member's name must equal its value: the
    mappings in `peft.mapping` are keyed by members, a `str`-mixin member hashes like its name, and
    `adapter_config.json` stores the value as a plain string that must find the same dict entry.
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(PeftType._member_names_)
    member.__objclass__ = PeftType
    member.__init__(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ would refuse
    return member


VISUAL_PROMPT_PEFT_TYPE = _add_peft_type_member(NAME.upper())
