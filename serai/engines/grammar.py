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
cap raises the cap to it.

Loosened (the grammar ignores them, so an answer may break them): pattern, multipleOf,
uniqueItems, minProperties/maxProperties, not, if/then/else, dependencies, patternProperties,
contains, the exclusivity of oneOf, and string formats other than date, time, date-time and uuid
(unchecked by JSON Schema validators by default). Integer and number ranges are kept, but a wide
range offers only part of its values (the WINDOW nearest its lower bound, and those of other digit
counts that surely fit). A recursive `$ref` is expanded MAX_REF_DEPTH times, then becomes free JSON.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_STRING_CHARS = 256
MAX_ARRAY_ITEMS = 16
MAX_FREE_MEMBERS = 16
FREE_DEPTH = 3
MAX_REF_DEPTH = 3
WINDOW = 128  # integers spelled out (as a digit trie) for a range the digit rules cannot express
MAX_DIGITS = 16

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


class SchemaError(ValueError):
    """The schema is not a JSON Schema this module can read; `path` says where."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(f"{message} (at {path or 'the schema root'})")
        self.path = path


def literal(text: str) -> str:
    """A GBNF string literal matching `text` exactly."""
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\x{ord(c):02X}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def json_literal(value: Any) -> str:
    """A GBNF literal matching the compact JSON spelling of `value`."""
    return literal(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


class Grammar:
    """A GBNF grammar under construction: named rules, identical bodies shared."""

    def __init__(self) -> None:
        self._rules: dict[str, str] = {}
        self._by_body: dict[str, str] = {}
        self._used_base: set[str] = set()

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
            self._rules[name] = body
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
        return after

    def digits(self, low: int, high: int) -> str:
        """Between low and high decimal digits."""
        return self.repeat("[0-9]", low, high, hint="digits")

    def rule(self, body: str, hint: str = "r") -> str:
        """A rule with this body; the name of an existing one when the body is the same."""
        if body in self._by_body:
            return self._by_body[body]
        stem = "".join(c if c.isascii() and c.isalnum() else "-" for c in hint).lower()
        stem = "-".join(part for part in stem.split("-") if part)[:60] or "r"
        name, n = stem, 1
        while name in self._rules or name in _BASE_RULES or name == "root":
            n += 1
            name = f"{stem}-{n}"
        self._rules[name] = body
        self._by_body[body] = name
        return name

    def render(self, root: str) -> str:
        self.base("ws")
        lines = [f"root ::= {root}"]
        lines += [f"{name} ::= {body}" for name, body in self._rules.items()]
        return "\n".join(lines) + "\n"


class SchemaConverter:
    """Turns one JSON Schema (with its $defs) into rules of a Grammar."""

    def __init__(self, grammar: Grammar, schema: Any) -> None:
        self.g = grammar
        self._root = schema
        self._ref_depth: dict[str, int] = {}

    def convert(self, schema: Any, path: str = "", hint: str = "value") -> str:
        """The name of a rule matching JSON valid against `schema` (bounded, see the module)."""
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
            return g.rule(json_literal(schema["const"]), hint)
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise SchemaError("enum must be a non-empty array", path)
            return g.rule(" | ".join(json_literal(v) for v in values), hint)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                options = schema[key]
                if not isinstance(options, list) or not options:
                    raise SchemaError(f"{key} must be a non-empty array", path)
                rest = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf")}
                names = [self.convert(_merge(rest, o) if _constrains(rest) else o,
                                      f"{path}/{key}/{i}", hint)
                         for i, o in enumerate(options)]
                return g.rule(" | ".join(dict.fromkeys(names)), hint)
        if "allOf" in schema:
            parts = schema["allOf"]
            if not isinstance(parts, list):
                raise SchemaError("allOf must be an array", path)
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for i, part in enumerate(parts):
                merged = _merge(merged, self._deref(part, f"{path}/allOf/{i}"))
            return self.convert(merged, path, hint)
        kinds = schema.get("type")
        if kinds is None:
            kinds = _implied_type(schema)
        if isinstance(kinds, str):
            kinds = [kinds]
        if not isinstance(kinds, list) or not kinds:
            raise SchemaError("type must be a type name or a list of them", path)
        for kind in kinds:
            if kind not in _TYPES:
                raise SchemaError(f"unknown type {kind!r}", path)
        if schema.get("nullable") is True and "null" not in kinds:
            kinds = [*kinds, "null"]
        names = [self._typed(kind, schema, path, hint) for kind in dict.fromkeys(kinds)]
        return names[0] if len(names) == 1 else g.rule(" | ".join(names), hint)

    def _typed(self, kind: str, schema: dict[str, Any], path: str, hint: str) -> str:
        g = self.g
        if kind == "object":
            return self._object(schema, path, hint)
        if kind == "array":
            return self._array(schema, path, hint)
        if kind == "string":
            return self._string(schema, hint)
        if kind == "integer":
            return self._integer(schema, hint, integer_only=True)
        if kind == "number":
            return self._integer(schema, hint, integer_only=False)
        return g.base(kind)  # boolean, null

    def _string(self, schema: dict[str, Any], hint: str) -> str:
        g = self.g
        fmt = schema.get("format")
        if isinstance(fmt, str) and fmt in _FORMATS and "maxLength" not in schema:
            for dep in ("date", "time", "uuid"):
                if dep in _FORMATS[fmt].split():
                    g.base(dep)
            return g.rule(f'"\\"" {_FORMATS[fmt]} "\\""', f"{fmt}-string")
        low = _int(schema.get("minLength"), 0)
        high = _int(schema.get("maxLength"), None)
        low = max(low, 0)
        high = max(low, MAX_STRING_CHARS) if high is None else max(high, low)
        if low == 0 and high == MAX_STRING_CHARS:
            return g.base("string")
        g.base("char")
        return g.rule(f'"\\"" {g.repeat("char", low, high, close=QUOTE, hint="chars")}',
                      f"{hint}-string")

    def _integer(self, schema: dict[str, Any], hint: str, *, integer_only: bool) -> str:
        g = self.g
        low, high = _bounds(schema)
        if low is None and high is None:
            return g.base("integer" if integer_only else "number")
        lo = None if low is None else math.ceil(low)
        hi = None if high is None else math.floor(high)
        if lo is not None and hi is not None and lo > hi:
            raise SchemaError("minimum is above maximum", hint)
        return g.rule(_int_range(g, lo, hi), f"{hint}-int")

    def _array(self, schema: dict[str, Any], path: str, hint: str) -> str:
        g = self.g
        prefix = schema.get("prefixItems")
        items = schema.get("items", True)
        if isinstance(items, list):  # draft 4-7 tuple form
            prefix, items = items, schema.get("additionalItems", True)
        prefix = prefix if isinstance(prefix, list) else []
        low = max(_int(schema.get("minItems"), 0), 0)
        high = _int(schema.get("maxItems"), None)
        high = max(low, MAX_ARRAY_ITEMS) if high is None else max(high, low)
        parts = [self.convert(s, f"{path}/prefixItems/{i}", f"{hint}-{i}")
                 for i, s in enumerate(prefix[:high])]
        item = None if items is False else self.convert(items, f"{path}/items", f"{hint}-item")
        most = high if item is not None else min(high, len(parts))
        least = min(low, most)
        sep = '"," ws'
        if not parts and item is not None:
            items_rule = g.repeat(item, least, most, sep=sep, close='"]"', hint=f"{hint}-items")
            return g.rule(f'"[" ws {items_rule}', f"{hint}-array")
        if most == 0:
            return g.rule('"[" ws "]"', "empty-array")

        def element(i: int) -> str:
            return parts[i] if i < len(parts) else str(item)

        fixed = " ".join(element(i) if i == 0 else f"{sep} {element(i)}" for i in range(least))
        # After the fixed elements: the rest of the tuple, each optional in turn, then up to
        # `repeat` more uniform items.
        start = max(least, len(parts))
        repeat = most - start if item is not None else 0
        tail = g.repeat(f"{sep} {item}", 0, repeat, hint=f"{hint}-more") if repeat > 0 else ""
        for i in reversed(range(least, min(len(parts), most))):
            lead = f"{sep} " if i > 0 else ""
            tail = f"({lead}{element(i)} {tail})?".replace(" )", ")")
        body = " ".join(x for x in ('"[" ws', fixed, tail, '"]"') if x)
        return g.rule(body, f"{hint}-array")

    def _object(self, schema: dict[str, Any], path: str, hint: str) -> str:
        g = self.g
        props = schema.get("properties", {})
        if not isinstance(props, dict):
            raise SchemaError("properties must be an object", path)
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise SchemaError("required must be an array of names", path)
        extra = schema.get("additionalProperties", True)
        if not props:
            if extra is False:
                return g.rule('"{" ws "}"', "empty-object")
            if required:  # required names without properties: any values
                props = {name: True for name in required}
            else:
                value = self.free(FREE_DEPTH - 1) if extra is True or extra == {} else \
                    self.convert(extra, f"{path}/additionalProperties", f"{hint}-value")
                return self._free_object(value, hint)
        names = list(props)
        # Required members may appear in any order in a schema; the grammar writes them in
        # the declared order, which every validator accepts.
        for name in required:
            if name not in props:
                names.append(name)
        kvs = {}
        for name in names:
            value = self.convert(props.get(name, True), f"{path}/properties/{name}",
                                 f"{hint}-{name}")
            kvs[name] = g.rule(f'{literal(json.dumps(name, ensure_ascii=False))} ws ":" ws {value}',
                               f"{hint}-{name}-kv")
        # rest[i][first]: members i.. given whether none has been written yet.
        after, first = "", ""
        for name in reversed(names):
            kv = kvs[name]
            if name in required:
                new_after = f'"," ws {kv} {after}'.strip()
                new_first = f"{kv} {after}".strip()
            else:
                new_after = f'("," ws {kv})? {after}'.strip()
                alt = f"{kv} {after}".strip()
                new_first = f"({alt} | {first})" if first else f"({alt})?"
            after = g.rule(new_after, f"{hint}-after") if new_after else ""
            first = g.rule(new_first, f"{hint}-members") if new_first else ""
        return g.rule(f'"{{" ws {first} "}}"', f"{hint}-object")

    def _free_object(self, value: str, hint: str) -> str:
        g = self.g
        kv = g.rule(f'{g.base("string")} ws ":" ws {value}', f"{hint}-entry")
        entries = g.repeat(kv, 0, MAX_FREE_MEMBERS, sep='"," ws', close='"}"', hint=f"{hint}-entries")
        body = f'"{{" ws {entries}'
        return g.rule(body, f"{hint}-map")

    def free(self, depth: int) -> str:
        """Any JSON value nested at most `depth` levels (objects and arrays bounded too)."""
        g = self.g
        scalars = [g.base(k) for k in ("string", "number", "boolean", "null")]
        if depth <= 0:
            return g.rule(" | ".join(scalars), "scalar")
        inner = self.free(depth - 1)
        obj = self._free_object(inner, f"json{depth}")
        items = g.repeat(inner, 0, MAX_ARRAY_ITEMS, sep='"," ws', close='"]"',
                         hint=f"json{depth}-items")
        arr = g.rule(f'"[" ws {items}', f"json{depth}-array")
        return g.rule(" | ".join([obj, arr, *scalars]), f"json{depth}")

    def _deref(self, schema: Any, path: str) -> Any:
        while isinstance(schema, dict) and "$ref" in schema:
            schema = {**_resolve(self._root, schema["$ref"], path),
                      **{k: v for k, v in schema.items() if k != "$ref"}}
        return schema

    def _ref(self, schema: dict[str, Any], path: str, hint: str) -> str:
        ref = schema["$ref"]
        depth = self._ref_depth.get(ref, 0)
        if depth >= MAX_REF_DEPTH:
            return self.free(1)
        target = _resolve(self._root, ref, path)
        rest = {k: v for k, v in schema.items() if k != "$ref"}
        self._ref_depth[ref] = depth + 1
        try:
            name = ref.rsplit("/", 1)[-1] or hint
            return self.convert(_merge(target, rest) if _constrains(rest) else target, path, name)
        finally:
            self._ref_depth[ref] = depth


def _resolve(root: Any, ref: Any, path: str) -> Any:
    if not isinstance(ref, str) or not ref.startswith("#"):
        raise SchemaError(f"only local $ref (#/...) is supported, not {ref!r}", path)
    target = root
    for raw in ref[1:].split("/")[1:] if ref != "#" else []:
        key = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(target, dict) and key in target:
            target = target[key]
        elif isinstance(target, list) and key.isdigit() and int(key) < len(target):
            target = target[int(key)]
        else:
            raise SchemaError(f"$ref {ref!r} points nowhere", path)
    return target


_ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment",
                "deprecated", "readOnly", "writeOnly", "$defs", "definitions", "strict"}


def _constrains(schema: dict[str, Any]) -> bool:
    return any(k not in _ANNOTATIONS for k in schema)


def _merge(a: Any, b: Any) -> Any:
    """Both schemas at once, as far as the grammar needs (allOf, $ref siblings)."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return b if isinstance(b, dict) else a
    merged = {**a, **b}
    if "properties" in a and "properties" in b:
        props = dict(a["properties"])
        for k, v in b["properties"].items():
            props[k] = _merge(props[k], v) if k in props else v
        merged["properties"] = props
    if "required" in a and "required" in b:
        merged["required"] = list(dict.fromkeys([*a["required"], *b["required"]]))
    if "type" in a and "type" in b:
        ta = a["type"] if isinstance(a["type"], list) else [a["type"]]
        tb = b["type"] if isinstance(b["type"], list) else [b["type"]]
        both = [t for t in ta if t in tb] or (["integer"] if "integer" in ta + tb else tb)
        merged["type"] = both if len(both) > 1 else both[0]
    return merged


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


def _int(value: Any, default: int | None) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return int(value)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value) if not math.isinf(value) else None


def _bounds(schema: dict[str, Any]) -> tuple[float | None, float | None]:
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
    """A rule body for integers in [lo, hi] (None: unbounded); all it accepts are in range."""
    if lo is not None and hi is not None and hi - lo <= WINDOW:
        return _spelled(range(lo, hi + 1))
    if lo is not None and hi is not None:
        options = [_spelled(range(lo, lo + WINDOW + 1))]
        # Beyond the window: whole digit-count classes that lie inside (lo, hi].
        if lo >= 0:
            for digits in range(len(str(lo + WINDOW)) + 1, len(str(hi))):
                options.append(f"[1-9] [0-9]{{{digits - 1}}}")
        return " | ".join(options)
    if lo is not None:  # lo only
        if lo >= 0:
            return _at_least(g, lo)
        if -lo <= WINDOW:
            return f'{_spelled(range(lo, 0))} | {g.base("nonneg")}'
        return f'"-" {_digits_below(g, len(str(-lo)))} | {g.base("nonneg")}'
    assert hi is not None  # hi only
    if hi < 0:
        return f'"-" ({_at_least(g, -hi)})'
    negatives = f'"-" [1-9] {g.digits(0, MAX_DIGITS - 1)}'
    if hi <= WINDOW:
        return f"{negatives} | {_spelled(range(0, hi + 1))}"
    return f"{negatives} | {_digits_below(g, len(str(hi)))}"


def _at_least(g: Grammar, lo: int) -> str:
    """Non-negative integers >= lo >= 0."""
    if lo == 0:
        return g.base("nonneg")
    if lo <= 9:
        return f"[{lo}-9] | [1-9] {g.digits(1, MAX_DIGITS - 1)}"
    digits = len(str(lo))
    window = _spelled(range(lo, lo + WINDOW + 1))
    if digits >= MAX_DIGITS:
        return window
    return f"{window} | [1-9] {g.digits(digits, MAX_DIGITS - 1)}"


def _spelled(numbers: range) -> str:
    """The numbers as a trie of their digits: a flat list of alternatives would make llama.cpp
    check the vocabulary against each of them at every step."""
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
    """Add the rules for `schema` to `grammar`; returns the name of its top rule."""
    return SchemaConverter(grammar, schema).convert(schema, "", hint)


def schema_grammar(schema: Any) -> str:
    """GBNF accepting exactly (up to the caps) the JSON texts valid against `schema`."""
    g = Grammar()
    return g.render(schema_rule(g, schema))


def json_object_grammar() -> str:
    """GBNF for any JSON object (bounded: see the module)."""
    g = Grammar()
    converter = SchemaConverter(g, {})
    return g.render(converter._free_object(converter.free(FREE_DEPTH - 1), "json"))
