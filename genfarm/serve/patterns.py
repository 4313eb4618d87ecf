"""Regular expressions for /openapi.json that JSON Schema (ECMA 262) and Python's re read alike: what a request's text
fields must look like for the service's own checks (str.strip(), languages.to_code) to take them. Tasks use them in
their `describe_request`; no FastAPI here, so importing a task stays light.
"""

from __future__ import annotations


def branches(prop: dict, kind: str) -> list[dict]:
    """The schemas of JSON type `kind` a property may take: its anyOf branches (an optional field's), or itself."""
    return [branch for branch in prop.get("anyOf", [prop]) if branch.get("type") == kind]


WHITESPACE = (  # what str.strip() strips: every character c with c.isspace()
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)


def char_class(chars: str, negate: bool = False) -> str:
    escaped = "".join(f"\\u{ord(c):04x}" for c in chars)
    return f"[{'^' if negate else ''}{escaped}]"


def any_case(word: str) -> str:
    return "".join(f"[{c}{c.upper()}]" if c.upper() != c else c.replace(" ", "\\u0020") for c in word)


NOT_BLANK = char_class(WHITESPACE, negate=True)  # a text field needs one character str.strip() keeps


def any_case_of(words) -> str:
    """A pattern for any one of `words`, in any case (longest first)."""
    return f"(?:{'|'.join(any_case(word) for word in sorted(words, key=len, reverse=True))})"


def stripped(*choices: str) -> str:
    """A pattern for a whole string that is one of `choices` (patterns), between characters str.strip() strips."""
    space = char_class(WHITESPACE)
    return f"^{space}*(?:{'|'.join(choices)}){space}*$"
