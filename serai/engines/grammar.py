"""JSON Schema to llama.cpp GBNF: the grammars that make the embedded model's JSON valid.

Every text a grammar from here accepts is JSON that validates against the schema it came from
(the exceptions are the keywords listed under "loosened" below). Real-world schemas carry
keywords a grammar cannot express; those are loosened, never refused, so a client's tool list
always works. Only a schema that is not a schema at all (a string, a `type` nobody knows, an
unresolvable `$ref`) is refused, with SchemaError.

A tiny greedy model can loop inside an unbounded string or array until max_tokens and leave
truncated JSON behind. So the grammars are bounded: a string without maxLength holds at most
MAX_STRING_CHARS characters, an array without maxItems at most MAX_ARRAY_ITEMS items, free-form
JSON (`{}`, json_object) nests at most FREE_DEPTH levels and has at most MAX_FREE_MEMBERS members
per object. Bounds the schema asks for win when they are tighter; a minLength or minItems above a
cap raises the cap to it. A maxLength or maxItems above MAX_COUNTED is lowered to it (what the
grammar accepts stays valid); a minLength or minItems above it is refused.

Loosened (the grammar ignores them, so an answer may break them): pattern, multipleOf,
uniqueItems, minProperties/maxProperties, not, if/then/else, dependencies, patternProperties,
contains, the exclusivity of oneOf, and string formats other than date, time, date-time and uuid
(unchecked by JSON Schema validators by default). Integer and number ranges are kept, but a wide
range offers only part of its values (the WINDOW nearest its lower bound, and those of other digit
counts that surely fit); no integer has more than MAX_DIGITS digits, so a range that holds only
longer ones is refused. A recursive `$ref` is expanded MAX_REF_DEPTH times, then becomes free JSON.

The schema is the client's, so the work of converting it is bounded whatever it holds: one
request's grammar (its response format and all its tools together) spends at most a Budget of
rules, bytes, `$ref` expansions and steps, and nests at most MAX_NESTING levels. Past any limit
the schema is refused with SchemaTooLarge; no other exception leaves the converter. Every `$ref`
followed is counted, so definitions that each use the next twice (a document of 2**n parts) are
refused after MAX_REF_EXPANSIONS of them, not expanded for ever.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from typing import Any, Literal

MAX_STRING_CHARS = 256
MAX_ARRAY_ITEMS = 16
MAX_FREE_MEMBERS = 16
FREE_DEPTH = 3
MAX_REF_DEPTH = 3
WINDOW = 128  # integers spelled out (as a digit trie) for a range the digit rules cannot express
MAX_DIGITS = 16
# A counting chain costs a rule per character or item: 2048 is about 80 KB of grammar.
MAX_COUNTED = 2048

# One grammar's budget. All of Claude Code's tools at once take about 35 KB, 640 rules and
# 1,400 steps; these leave room for more than ten times that, and the worst schema within them
# still converts in about a quarter of a second on one core (a step is a few microseconds).
MAX_GRAMMAR_BYTES = 512 * 1024
MAX_RULES = 8192
MAX_REF_EXPANSIONS = 1024
MAX_STEPS = 100_000
# Each level is a few Python frames; 64 is far deeper than any real schema and far from the
# interpreter's recursion limit.
MAX_NESTING = 64
_HINT_CHARS = 120  # of a rule-name hint, more than a name (60 characters) can show

_TYPES = {"object", "array", "string", "integer", "number", "boolean", "null"}

_BASE_RULES = {
    "ws": '" "?',
    "char": r'[^"\\\x00-\x1F\x7F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})',
    "null": '"null"',
    "boolean": '"true" | "false"',
    "integer": '"-"? nonneg',
    "date": '[0-9]{4} "-" ("0" [1-9] | "1" [0-2]) "-" ("0" [1-9] | [1-2] [0-9] | "3" [0-1])',
    "time": '([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{3})? '
            '("Z" | [+-] ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9])',
    "uuid": '[0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" '
            '[0-9a-fA-F]{12}',
}
QUOTE = '"\\""'
_FORMATS = {"date": "date", "time": "time", "date-time": 'date "T" time', "uuid": "uuid"}

class _Short(reprlib.Repr):
    """Values quoted in messages: short, and safe on deep nesting and on huge integers (whose
    repr raises past 4300 digits)."""

    def repr_int(self, x: int, level: int) -> str:
        return f"<an integer of {x.bit_length()} bits>" if x.bit_length() > 256 else repr(x)


_shown = _Short()
_shown.maxstring = _shown.maxother = 60


class SchemaError(ValueError):
    """The schema is not a JSON Schema this module can read; `path` says where."""

    def __init__(self, message: str, path: str = "") -> None:
        where = path if len(path) <= 200 else "…" + path[-200:]
        super().__init__(f"{message} (at {where or 'the schema root'})")
        self.path = path


class SchemaTooLarge(SchemaError):
    """Converting the schema would spend more than a grammar's Budget allows."""


Spending = Literal["rules", "grammar_bytes", "ref_expansions", "steps"]

_SPENT_ON = {
    "rules": ("grammar rules", "fewer properties, enums or alternatives, lower bounds"),
    "grammar_bytes": ("bytes of grammar", "fewer or shorter names, enums and constants"),
    "ref_expansions": ("$ref expansions", "fewer uses of definitions that use each other"),
    "steps": ("steps", "fewer keywords, values and definitions"),
}


class Budget:
    """What building one grammar may spend. Each rule, byte, `$ref` followed and step (a schema
    read, a rule composed, an enum value, a key copied by a merge) is charged when it happens,
    so the limits bound the work itself, not only the grammar that comes out."""

    def __init__(self, *, rules: int = MAX_RULES, grammar_bytes: int = MAX_GRAMMAR_BYTES,
                 ref_expansions: int = MAX_REF_EXPANSIONS, steps: int = MAX_STEPS) -> None:
        self.limits: dict[Spending, int] = {"rules": rules, "grammar_bytes": grammar_bytes,
                                            "ref_expansions": ref_expansions, "steps": steps}
        self.spent: dict[Spending, int] = {what: 0 for what in self.limits}

    def afford(self, what: Spending, amount: int, path: str = "") -> None:
        """Refuse, without spending, if `amount` more of `what` is over the limit."""
        if self.spent[what] + amount > self.limits[what]:
            words, advice = _SPENT_ON[what]
            raise SchemaTooLarge(f"converting the schema would take more than {self.limits[what]} "
                                 f"{words}, the most one request's grammar may use; send a "
                                 f"simpler schema ({advice})", path)

    def charge(self, what: Spending, amount: int = 1, path: str = "") -> None:
        self.afford(what, amount, path)
        self.spent[what] += amount


# Escaped as hex: control characters, and a lone surrogate (JSON allows "\ud800"), which cannot
# be encoded to UTF-8 for llama.cpp; as an escape it parses, and matches nothing a model writes.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
_HEX_ESCAPES = {c: f"\\x{c:02X}" for c in [*range(0x20), 0x7F]}
_HEX_ESCAPES.update({c: f"\\u{c:04X}" for c in range(0xD800, 0xE000)})


def literal(text: str) -> str:
    """A GBNF string literal matching `text` exactly."""
    # replace() runs at memory speed; translate() leaves its fast path at the first escape that
    # is longer than a character, so it only runs on the rare text that needs it.
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    if _UNPRINTABLE.search(text):
        text = text.translate(_HEX_ESCAPES)
    return f'"{text}"'


def json_text(value: Any) -> str:
    """The compact JSON spelling of `value`, a lone surrogate written as its JSON escape."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def json_literal(value: Any) -> str:
    """A GBNF literal matching the compact JSON spelling of `value`."""
    return literal(json_text(value))


class Grammar:
    """A GBNF grammar under construction: named rules, identical bodies shared, and the Budget
    every rule added to it is charged to."""

    def __init__(self, budget: Budget | None = None) -> None:
        self.budget = budget or Budget()
        self._rules: dict[str, str] = {}
        self._by_body: dict[str, str] = {}
        self._used_base: set[str] = set()
        self._next_number: dict[str, int] = {}  # per name stem, so a new name is found at once
        self._chains: dict[tuple[str, int, int, str, str], str] = {}  # repeat's, by arguments
        self.ranges: dict[tuple[int | None, int | None], str] = {}  # _int_range's, by bounds
        self.free_rules: dict[int, str] = {}  # SchemaConverter.free, built once per depth

    def _add(self, name: str, body: str) -> None:
        self.budget.charge("rules")
        self.budget.charge("grammar_bytes", len(name) + len(body.encode()) + len(" ::= \n"))
        self._rules[name] = body

    def base(self, name: str) -> str:
        """One of the shared primitive rules (string, integer, ...), with what it needs."""
        if name not in self._used_base:
            self._used_base.add(name)
            needs = {"string": ["char"], "integer": ["nonneg"], "number": ["nonneg"]}
            for dep in needs.get(name, []):
                self.base(dep)
            if name == "string":
                body = f'"\\"" {self.repeat("char", 0, MAX_STRING_CHARS, close=QUOTE, hint="str")}'
            elif name == "nonneg":
                body = f'"0" | [1-9] {self.digits(0, MAX_DIGITS - 1)}'
            elif name == "number":
                body = (f'"-"? nonneg ("." {self.digits(1, 15)})? '
                        f'([eE] [-+]? {self.digits(1, 3)})?')
            else:
                body = _BASE_RULES[name]
            self._add(name, body)
        return name

    def repeat(self, item: str, low: int, high: int, *, sep: str = "", close: str = "",
               hint: str = "rep") -> str:
        """`item` low to high times (separated by `sep`, then `close`), as a counting chain.

        llama.cpp expands `x{m,n}` so that every further item multiplies the work of checking
        the whole vocabulary against the grammar (a 256-character string took a second per
        token); rule k of a chain says "k items written" and continues in tail position, so
        the grammar holds one short stack whatever the count.
        """
        assert high >= max(low, 1) or close
        # Many members share one bound (every maxLength 2000 string): the chain is built once.
        chain = (item, low, high, sep, close)
        if chain in self._chains:
            return self._chains[chain]
        after = ""
        for k in range(high, -1, -1):
            lead = f"{sep} " if sep and k > 0 else ""
            more = f"{lead}{item} {after}".strip()
            if k == high:
                if not close:
                    after = ""
                    continue
                body = close
            elif k >= low:
                body = f"{close} | {more}" if close else f"({more})?"
            else:
                body = more
            after = self.rule(body, f"{hint}-{k}")
        self._chains[chain] = after
        return after

    def digits(self, low: int, high: int) -> str:
        """Between low and high decimal digits."""
        return self.repeat("[0-9]", low, high, hint="digits")

    def rule(self, body: str, hint: str = "r") -> str:
        """A rule with this body; the name of an existing one when the body is the same."""
        # Charged by size even when it exists: composing a body cost its length (a property
        # name of 400 KB, written again for each use of its definition).
        self.budget.charge("steps", 1 + len(body) // 256)
        if body in self._by_body:
            return self._by_body[body]
        stem = "".join(c if c.isascii() and c.isalnum() else "-" for c in hint[:_HINT_CHARS])
        stem = "-".join(part for part in stem.lower().split("-") if part)[:60] or "r"
        name, n = stem, self._next_number.get(stem, 1)
        while name in self._rules or name in _BASE_RULES or name == "root":
            n += 1
            name = f"{stem}-{n}"
        self._next_number[stem] = n
        self._add(name, body)
        self._by_body[body] = name
        return name

    def render(self, root: str) -> str:
        self.base("ws")
        self.budget.charge("grammar_bytes", len(root.encode()) + len("root ::= \n"))
        lines = [f"root ::= {root}"]
        lines += [f"{name} ::= {body}" for name, body in self._rules.items()]
        return "\n".join(lines) + "\n"


def _hint(hint: str, part: object) -> str:
    return f"{hint}-{str(part)[:_HINT_CHARS]}"[:_HINT_CHARS]


class SchemaConverter:
    """Turns one JSON Schema (with its $defs) into rules of a Grammar, within its Budget."""

    def __init__(self, grammar: Grammar, schema: Any) -> None:
        self.g = grammar
        self._root = schema
        self._ref_depth: dict[str, int] = {}  # expansions of each $ref on the current path
        self._refs: dict[str, tuple[Any, str]] = {}  # $ref -> (its target, its rule hint)
        self._nesting = 0

    def convert(self, schema: Any, path: str = "", hint: str = "value") -> str:
        """The name of a rule matching JSON valid against `schema` (bounded, see the module)."""
        # A schema's keys are read (copied, merged) as it is converted: charged by their number.
        self.g.budget.charge("steps", max(len(schema), 1) if isinstance(schema, dict) else 1, path)
        if self._nesting >= MAX_NESTING:
            raise SchemaTooLarge(f"the schema nests deeper than {MAX_NESTING} levels", path)
        self._nesting += 1
        try:
            return self._convert(schema, path, hint)
        finally:
            self._nesting -= 1

    def _convert(self, schema: Any, path: str, hint: str) -> str:
        g = self.g
        if schema is True or schema == {}:
            return self.free(FREE_DEPTH)
        if schema is False:
            raise SchemaError("a false schema accepts nothing", path)
        if not isinstance(schema, dict):
            raise SchemaError("a schema must be an object", path)
        if "$ref" in schema:
            return self._ref(schema, path, hint)
        if "const" in schema:
            return g.rule(self._literals([schema["const"]], path), hint)
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise SchemaError("enum must be a non-empty array", path)
            return g.rule(self._literals(values, path), hint)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                options = schema[key]
                if not isinstance(options, list) or not options:
                    raise SchemaError(f"{key} must be a non-empty array", path)
                rest = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf")}
                names = [self.convert(self._merge(rest, o, path) if _constrains(rest) else o,
                                      f"{path}/{key}/{i}", hint)
                         for i, o in enumerate(options)]
                return g.rule(" | ".join(dict.fromkeys(names)), hint)
        if "allOf" in schema:
            parts = schema["allOf"]
            if not isinstance(parts, list):
                raise SchemaError("allOf must be an array", path)
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for i, part in enumerate(parts):
                where = f"{path}/allOf/{i}"
                g.budget.charge("steps", 1, where)
                merged = self._merge(merged, self._deref(part, where), where)
            return self.convert(merged, path, hint)
        kinds = schema.get("type")
        if kinds is None:
            kinds = _implied_type(schema)
        if isinstance(kinds, str):
            kinds = [kinds]
        if not isinstance(kinds, list) or not kinds:
            raise SchemaError("type must be a type name or a list of them", path)
        for kind in kinds:
            if not isinstance(kind, str) or kind not in _TYPES:
                raise SchemaError(f"unknown type {_shown.repr(kind)}", path)
        if schema.get("nullable") is True and "null" not in kinds:
            kinds = [*kinds, "null"]
        names = [self._typed(kind, schema, path, hint) for kind in dict.fromkeys(kinds)]
        return names[0] if len(names) == 1 else g.rule(" | ".join(names), hint)

    def _literals(self, values: list[Any], path: str) -> str:
        """Alternatives matching the JSON spelling of each value (a const, an enum)."""
        budget = self.g.budget
        budget.charge("steps", len(values), path)
        spelled: dict[str, None] = {}
        size = 0
        for value in values:
            try:
                text = json_text(value)
            except RecursionError:
                raise SchemaTooLarge(f"a const or enum value nests deeper than this server "
                                     f"reads ({_shown.repr(value)})", path) from None
            except (TypeError, ValueError):  # NaN, Infinity, an integer too long to print
                raise SchemaError(f"a const or enum value is not JSON this server can write "
                                  f"({_shown.repr(value)})", path) from None
            size += len(text) + len(" | ")
            budget.afford("grammar_bytes", size, path)  # before spelling it out
            spelled[literal(text)] = None
        return " | ".join(spelled)

    def _typed(self, kind: str, schema: dict[str, Any], path: str, hint: str) -> str:
        g = self.g
        if kind == "object":
            return self._object(schema, path, hint)
        if kind == "array":
            return self._array(schema, path, hint)
        if kind == "string":
            return self._string(schema, path, hint)
        if kind == "integer":
            return self._integer(schema, path, hint, integer_only=True)
        if kind == "number":
            return self._integer(schema, path, hint, integer_only=False)
        return g.base(kind)  # boolean, null

    def _string(self, schema: dict[str, Any], path: str, hint: str) -> str:
        g = self.g
        fmt = schema.get("format")
        if isinstance(fmt, str) and fmt in _FORMATS and "maxLength" not in schema:
            for dep in ("date", "time", "uuid"):
                if dep in _FORMATS[fmt].split():
                    g.base(dep)
            return g.rule(f'"\\"" {_FORMATS[fmt]} "\\""', f"{fmt}-string")
        low, high = _counts(schema, "minLength", "maxLength", MAX_STRING_CHARS, path)
        if low == 0 and high == MAX_STRING_CHARS:
            return g.base("string")
        g.base("char")
        return g.rule(f'"\\"" {g.repeat("char", low, high, close=QUOTE, hint="chars")}',
                      f"{hint}-string")

    def _integer(self, schema: dict[str, Any], path: str, hint: str, *,
                 integer_only: bool) -> str:
        g = self.g
        low, high = _bounds(schema)
        if low is None and high is None:
            return g.base("integer" if integer_only else "number")
        lo = None if low is None else math.ceil(low)
        hi = None if high is None else math.floor(high)
        if lo is not None and hi is not None and lo > hi:
            raise SchemaError("minimum is above maximum", path)
        longest = 10 ** MAX_DIGITS
        if (lo is not None and lo >= longest) or (hi is not None and hi <= -longest):
            raise SchemaError(f"the range holds only integers longer than the {MAX_DIGITS} "
                              "digits a grammar here writes", path)
        # Beyond MAX_DIGITS digits a bound excludes nothing the grammar can write.
        lo = None if lo is not None and lo <= -longest else lo
        hi = None if hi is not None and hi >= longest else hi
        if (lo, hi) not in g.ranges:  # every field of an object often has the same range
            g.ranges[lo, hi] = _int_range(g, lo, hi)
        return g.rule(g.ranges[lo, hi], f"{hint}-int")

    def _array(self, schema: dict[str, Any], path: str, hint: str) -> str:
        g = self.g
        prefix = schema.get("prefixItems")
        items = schema.get("items", True)
        if isinstance(items, list):  # draft 4-7 tuple form
            prefix, items = items, schema.get("additionalItems", True)
        prefix = prefix if isinstance(prefix, list) else []
        low, high = _counts(schema, "minItems", "maxItems", MAX_ARRAY_ITEMS, path)
        parts = [self.convert(s, f"{path}/prefixItems/{i}", _hint(hint, i))
                 for i, s in enumerate(prefix[:high])]
        item = None if items is False else self.convert(items, f"{path}/items",
                                                        _hint(hint, "item"))
        most = high if item is not None else min(high, len(parts))
        least = min(low, most)
        sep = '"," ws'
        if not parts and item is not None:
            items_rule = g.repeat(item, least, most, sep=sep, close='"]"',
                                  hint=_hint(hint, "items"))
            return g.rule(f'"[" ws {items_rule}', _hint(hint, "array"))
        if most == 0:
            return g.rule('"[" ws "]"', "empty-array")

        def element(i: int) -> str:
            return parts[i] if i < len(parts) else str(item)

        fixed = " ".join(element(i) if i == 0 else f"{sep} {element(i)}" for i in range(least))
        # After the fixed elements: the rest of the tuple, each optional in turn, then up to
        # `repeat` more uniform items. Each optional element is a rule naming the next, so a
        # long tuple costs its length (nesting them in one body cost its square).
        start = max(least, len(parts))
        repeat = most - start if item is not None else 0
        tail = g.repeat(f"{sep} {item}", 0, repeat, hint=_hint(hint, "more")) if repeat > 0 else ""
        for i in reversed(range(least, min(len(parts), most))):
            lead = f"{sep} " if i > 0 else ""
            tail = g.rule(f"({lead}{element(i)} {tail})?".replace(" )", ")"), _hint(hint, "rest"))
        body = " ".join(x for x in ('"[" ws', fixed, tail, '"]"') if x)
        return g.rule(body, _hint(hint, "array"))

    def _object(self, schema: dict[str, Any], path: str, hint: str) -> str:
        g = self.g
        props = schema.get("properties", {})
        if not isinstance(props, dict):
            raise SchemaError("properties must be an object", path)
        required = schema.get("required", [])
        if not isinstance(required, list):
            raise SchemaError("required must be an array of names", path)
        g.budget.charge("steps", len(required), path)
        if not all(isinstance(r, str) for r in required):
            raise SchemaError("required must be an array of names", path)
        extra = schema.get("additionalProperties", True)
        if not props:
            if extra is False:
                return g.rule('"{" ws "}"', "empty-object")
            if required:  # required names without properties: any values
                props = {name: True for name in required}
            else:
                value = self.free(FREE_DEPTH - 1) if extra is True or extra == {} else \
                    self.convert(extra, f"{path}/additionalProperties", _hint(hint, "value"))
                return self._free_object(value, hint)
        # Required members may appear in any order in a schema; the grammar writes them in
        # the declared order, which every validator accepts.
        names = list(dict.fromkeys([*props, *required]))
        required_names = set(required)
        kvs = {}
        for name in names:
            value = self.convert(props.get(name, True), f"{path}/properties/{name}",
                                 _hint(hint, name))
            key = literal(json_text(name))
            kvs[name] = g.rule(f'{key} ws ":" ws {value}', _hint(_hint(hint, name), "kv"))
        # rest[i][first]: members i.. given whether none has been written yet.
        after, first = "", ""
        for name in reversed(names):
            kv = kvs[name]
            if name in required_names:
                new_after = f'"," ws {kv} {after}'.strip()
                new_first = f"{kv} {after}".strip()
            else:
                new_after = f'("," ws {kv})? {after}'.strip()
                alt = f"{kv} {after}".strip()
                new_first = f"({alt} | {first})" if first else f"({alt})?"
            after = g.rule(new_after, _hint(hint, "after")) if new_after else ""
            first = g.rule(new_first, _hint(hint, "members")) if new_first else ""
        return g.rule(f'"{{" ws {first} "}}"', _hint(hint, "object"))

    def _free_object(self, value: str, hint: str) -> str:
        g = self.g
        kv = g.rule(f'{g.base("string")} ws ":" ws {value}', _hint(hint, "entry"))
        entries = g.repeat(kv, 0, MAX_FREE_MEMBERS, sep='"," ws', close='"}"',
                           hint=_hint(hint, "entries"))
        body = f'"{{" ws {entries}'
        return g.rule(body, _hint(hint, "map"))

    def free(self, depth: int) -> str:
        """Any JSON value nested at most `depth` levels (objects and arrays bounded too)."""
        g = self.g
        if depth in g.free_rules:
            return g.free_rules[depth]
        scalars = [g.base(k) for k in ("string", "number", "boolean", "null")]
        if depth <= 0:
            name = g.rule(" | ".join(scalars), "scalar")
        else:
            inner = self.free(depth - 1)
            obj = self._free_object(inner, f"json{depth}")
            items = g.repeat(inner, 0, MAX_ARRAY_ITEMS, sep='"," ws', close='"]"',
                             hint=f"json{depth}-items")
            arr = g.rule(f'"[" ws {items}', f"json{depth}-array")
            name = g.rule(" | ".join([obj, arr, *scalars]), f"json{depth}")
        g.free_rules[depth] = name
        return name

    def _deref(self, schema: Any, path: str) -> Any:
        """`schema` with its `$ref`s followed (for allOf, which merges what they point to)."""
        seen: set[str] = set()
        while isinstance(schema, dict) and "$ref" in schema:
            ref = schema["$ref"]
            target, _ = self._resolve(ref, path)
            if ref in seen:
                raise SchemaError(f"$ref {_shown.repr(ref)} leads back to itself", path)
            seen.add(ref)
            self.g.budget.charge("ref_expansions", 1, path)
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            self.g.budget.charge("steps", len(schema) + (len(target) if isinstance(target, dict)
                                                         else 0), path)
            schema = {**target, **rest} if isinstance(target, dict) else (rest or target)
        return schema

    def _ref(self, schema: dict[str, Any], path: str, hint: str) -> str:
        ref = schema["$ref"]
        target, name = self._resolve(ref, path)
        depth = self._ref_depth.get(ref, 0)
        if depth >= MAX_REF_DEPTH:
            return self.free(1)
        # Every $ref followed counts, the same definition's too: definitions that each use the
        # next twice are a document of 2**n parts, refused once the count passes the budget.
        self.g.budget.charge("ref_expansions", 1, path)
        rest = {k: v for k, v in schema.items() if k != "$ref"}
        self._ref_depth[ref] = depth + 1
        try:
            return self.convert(self._merge(target, rest, path) if _constrains(rest) else target,
                                path, name or hint)
        finally:
            self._ref_depth[ref] = depth

    def _resolve(self, ref: Any, path: str) -> tuple[Any, str]:
        """What a local `$ref` points to, and the rule hint its last segment gives."""
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaError(f"only local $ref (#/...) is supported, not {_shown.repr(ref)}",
                              path)
        if ref in self._refs:
            return self._refs[ref]
        target = self._root
        for raw in ref[1:].split("/")[1:] if ref != "#" else []:
            self.g.budget.charge("steps", 1, path)
            key = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and key in target:
                target = target[key]
            elif (isinstance(target, list) and key.isascii() and key.isdigit() and len(key) < 10
                  and int(key) < len(target)):
                target = target[int(key)]
            else:
                raise SchemaError(f"$ref {_shown.repr(ref)} points nowhere", path)
        self._refs[ref] = target, ref.rsplit("/", 1)[-1][:_HINT_CHARS]
        return self._refs[ref]

    def _merge(self, a: Any, b: Any, path: str, depth: int = 0) -> Any:
        """Both schemas at once, as far as the grammar needs (allOf, $ref siblings)."""
        if not isinstance(a, dict) or not isinstance(b, dict):
            return b if isinstance(b, dict) else a
        if depth >= MAX_NESTING:
            raise SchemaTooLarge(f"the schema nests deeper than {MAX_NESTING} levels", path)
        self.g.budget.charge("steps", len(a) + len(b), path)
        merged = {**a, **b}
        props_a, props_b = a.get("properties"), b.get("properties")
        if isinstance(props_a, dict) and isinstance(props_b, dict):
            self.g.budget.charge("steps", len(props_a) + len(props_b), path)
            props = dict(props_a)
            for k, v in props_b.items():
                props[k] = self._merge(props[k], v, path, depth + 1) if k in props else v
            merged["properties"] = props
        required_a, required_b = a.get("required"), b.get("required")
        if isinstance(required_a, list) and isinstance(required_b, list):
            both_required = [*required_a, *required_b]
            if all(isinstance(r, str) for r in both_required):
                merged["required"] = list(dict.fromkeys(both_required))
        if "type" in a and "type" in b:
            ta = a["type"] if isinstance(a["type"], list) else [a["type"]]
            tb = b["type"] if isinstance(b["type"], list) else [b["type"]]
            both = [t for t in ta if t in tb] or (["integer"] if "integer" in ta + tb else tb)
            merged["type"] = both[0] if len(both) == 1 else both
        return merged


_ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment",
                "deprecated", "readOnly", "writeOnly", "$defs", "definitions", "strict"}


def _constrains(schema: dict[str, Any]) -> bool:
    return any(k not in _ANNOTATIONS for k in schema)


def _implied_type(schema: dict[str, Any]) -> list[str]:
    if "properties" in schema or "additionalProperties" in schema or "required" in schema:
        return ["object"]
    if "items" in schema or "prefixItems" in schema:
        return ["array"]
    if any(k in schema for k in ("minLength", "maxLength", "pattern", "format")):
        return ["string"]
    if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
        return ["number"]
    return ["object", "array", "string", "number", "boolean", "null"]


def _counts(schema: dict[str, Any], least: str, most: str, cap: int, path: str
            ) -> tuple[int, int]:
    """(low, high) of a minLength/maxLength or minItems/maxItems pair, as the grammar counts
    them out: `cap` when there is no maximum, never more than MAX_COUNTED."""
    low, high = _count(schema.get(least), least, path), _count(schema.get(most), most, path)
    low = low or 0
    if low > MAX_COUNTED:
        raise SchemaTooLarge(f"{least} asks for more than the {MAX_COUNTED} a grammar here "
                             "counts out", path)
    if high is None:
        return low, max(low, cap)
    return low, min(max(high, low), MAX_COUNTED)


def _count(value: Any, keyword: str, path: str) -> int | None:
    """A length or item count as a whole number (None: not given, or not a number at all)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        return None
    lower = keyword.startswith("min")
    if value == math.inf:
        if lower:
            raise SchemaError(f"{keyword} is infinite: nothing satisfies it", path)
        return None
    if value < 0:
        return 0
    return math.ceil(value) if lower else math.floor(value)


def _number(value: Any) -> int | float | None:
    """A finite bound, or None; an integer stays one (a float would lose or overflow it)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def _bounds(schema: dict[str, Any]) -> tuple[int | float | None, int | float | None]:
    low, high = _number(schema.get("minimum")), _number(schema.get("maximum"))
    ex_low, ex_high = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if ex_low is True and low is not None:  # draft 4: a flag on minimum
        low = math.floor(low) + 1
    elif (x := _number(ex_low)) is not None:
        low = math.floor(x) + 1 if low is None else max(low, math.floor(x) + 1)
    if ex_high is True and high is not None:
        high = math.ceil(high) - 1
    elif (x := _number(ex_high)) is not None:
        high = math.ceil(x) - 1 if high is None else min(high, math.ceil(x) - 1)
    return low, high


def _int_range(g: Grammar, lo: int | None, hi: int | None) -> str:
    """A rule body for integers in [lo, hi] (None: unbounded); all it accepts are in range.
    Both bounds are below 10**MAX_DIGITS in size, so no spelled number is longer than that."""
    if lo is None and hi is None:
        return g.base("integer")
    if lo is not None and hi is not None and hi - lo <= WINDOW:
        return _spelled(g, range(lo, hi + 1))
    if lo is not None and hi is not None:
        options = [_spelled(g, range(lo, lo + WINDOW + 1))]
        # Beyond the window: whole digit-count classes that lie inside (lo, hi].
        if lo >= 0:
            for digits in range(len(str(lo + WINDOW)) + 1, len(str(hi))):
                options.append(f"[1-9] [0-9]{{{digits - 1}}}")
        return " | ".join(options)
    if lo is not None:  # lo only
        if lo >= 0:
            return _at_least(g, lo)
        if -lo <= WINDOW:
            return f'{_spelled(g, range(lo, 0))} | {g.base("nonneg")}'
        return f'"-" {_digits_below(g, len(str(-lo)))} | {g.base("nonneg")}'
    assert hi is not None  # hi only
    if hi < 0:
        return f'"-" ({_at_least(g, -hi)})'
    negatives = f'"-" [1-9] {g.digits(0, MAX_DIGITS - 1)}'
    if hi <= WINDOW:
        return f"{negatives} | {_spelled(g, range(0, hi + 1))}"
    return f"{negatives} | {_digits_below(g, len(str(hi)))}"


def _at_least(g: Grammar, lo: int) -> str:
    """Non-negative integers >= lo >= 0."""
    if lo == 0:
        return g.base("nonneg")
    if lo <= 9:
        return f"[{lo}-9] | [1-9] {g.digits(1, MAX_DIGITS - 1)}"
    digits = len(str(lo))
    window = _spelled(g, range(lo, lo + WINDOW + 1))
    if digits >= MAX_DIGITS:
        return window
    return f"{window} | [1-9] {g.digits(digits, MAX_DIGITS - 1)}"


def _spelled(g: Grammar, numbers: range) -> str:
    """The numbers as a trie of their digits: a flat list of alternatives would make llama.cpp
    check the vocabulary against each of them at every step."""
    g.budget.charge("steps", len(numbers))  # building the trie costs about a step a number
    return _trie([str(n) for n in numbers])


def _trie(words: list[str]) -> str:
    groups: dict[str, list[str]] = {}
    ends = False
    for word in words:
        if word:
            groups.setdefault(word[0], []).append(word[1:])
        else:
            ends = True
    alternatives = []
    for first, rests in groups.items():
        rest = _trie(rests)
        alternatives.append(f"{literal(first)} {rest}" if rest else literal(first))
    if not alternatives:
        return ""
    body = " | ".join(alternatives)
    if ends:
        return f"({body})?"
    return body if len(alternatives) == 1 else f"({body})"


def _digits_below(g: Grammar, digits: int) -> str:
    """Non-negative integers with fewer than `digits` digits (all below 10**(digits-1))."""
    if digits <= 1:
        return '"0"'
    if digits == 2:
        return "[0-9]"
    return f"[0-9] | [1-9] {g.digits(1, digits - 2)}"


def schema_rule(grammar: Grammar, schema: Any, hint: str = "value") -> str:
    """Add the rules for `schema` to `grammar` (spending its budget); returns the name of its
    top rule. Raises SchemaError, or SchemaTooLarge past the budget, and nothing else."""
    return SchemaConverter(grammar, schema).convert(schema, "", hint)


def schema_grammar(schema: Any, budget: Budget | None = None) -> str:
    """GBNF accepting exactly (up to the caps) the JSON texts valid against `schema`."""
    g = Grammar(budget)
    return g.render(schema_rule(g, schema))


def json_object_grammar() -> str:
    """GBNF for any JSON object (bounded: see the module)."""
    g = Grammar()
    converter = SchemaConverter(g, {})
    return g.render(converter._free_object(converter.free(FREE_DEPTH - 1), "json"))
