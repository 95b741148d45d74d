"""Reading a workflow file's YAML quickly, with the same bounds and answers (SDK layer).

PyYAML's pure-Python loader took 33 s for a 100,000-action file. This one lets libyaml (PyYAML's
C extension, ``yaml.CParser``) scan, parse and compose the document, and builds the Python
values from the composed nodes in one tight pass, keeping every rule of the safe loader in
:mod:`plait.spec.files`:

* **safe**: only the standard tags; any other (``!!python/object``...) is refused by PyYAML's
  ``SafeConstructor``, to which every non-string scalar and every unusual collection is handed;
* **nesting** is counted while libyaml composes (its composer calls ``descend_resolver`` before
  each node and ``ascend_resolver`` after), so a deeply nested document is refused before the
  composer recurses deeper than ``max_depth``;
* **aliases**: the expanded size of the composed graph (each alias counted as a copy of what it
  names) is computed without expanding it, and a recursive alias is found, before anything is
  built;
* **repeated keys** in one mapping are refused (merge keys, ``<<``, may be overridden), and
  merges behave as ``SafeConstructor.flatten_mapping`` says.

Values are what ``yaml.load(text, Loader=SafeLoader)`` gives: the same types, and an alias
gives the very object its anchor does. Errors are PyYAML's ``MarkedYAMLError`` subclasses, as
the slow loader raises, so the caller reports both the same way.
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from plait.jsonlimits import nesting_exceeds

__all__ = ["AVAILABLE", "NOT_JSON", "load", "load_json"]

AVAILABLE = bool(getattr(yaml, "__with_libyaml__", False))

_STR = "tag:yaml.org,2002:str"
_SEQ = "tag:yaml.org,2002:seq"
_MAP = "tag:yaml.org,2002:map"
_NULL = "tag:yaml.org,2002:null"
_BOOL = "tag:yaml.org,2002:bool"
_MERGE = "tag:yaml.org,2002:merge"
_BOOLS = yaml.constructor.SafeConstructor.bool_values


_IMPLICIT = yaml.resolver.Resolver.yaml_implicit_resolvers
# First characters some implicit resolver (bool, int, float, null, timestamp, merge...) looks
# at; a plain scalar starting with any other character is a string, as Resolver.resolve finds.
_FIRSTS = frozenset(k for k in _IMPLICIT if k is not None)
_CACHE_MAX = 4096


def _libyaml_bounds_nesting() -> bool:
    """Whether this libyaml refuses deep nesting itself (0.2.5 and later: 1,000 levels of flow
    and of block collections), so its recursive composer can never run out of C stack."""
    from yaml._yaml import CParser

    for text in ("[" * 1500 + "]" * 1500, "- " * 1500 + "x"):
        parser = CParser(text)
        try:
            parser.raw_parse()
        except yaml.YAMLError:
            continue
        finally:
            parser.dispose()
        return False
    return True


if AVAILABLE:
    _BOUNDED = _libyaml_bounds_nesting()

    class _Loader(yaml.CSafeLoader):
        """libyaml's composer, with a quicker resolver and, where libyaml does not bound
        nesting itself, a count of it as it descends."""

        def __init__(self, stream: str, max_depth: int) -> None:
            super().__init__(stream)
            self.depth = 0
            self.max_depth = max_depth
            self.tags: dict[str, str] = {}

        def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
            # What Resolver.resolve answers (SafeLoader has no path resolvers), in fewer steps.
            if kind is ScalarNode:
                if not implicit[0] or (value and value[0] not in _FIRSTS and None not in _IMPLICIT):
                    return _STR
                tag = self.tags.get(value)
                if tag is None:
                    tag = super().resolve(kind, value, implicit)  # type: ignore[no-untyped-call]
                    if len(self.tags) < _CACHE_MAX:
                        self.tags[value] = tag
                return tag
            return super().resolve(kind, value, implicit)  # type: ignore[no-untyped-call]

        if not _BOUNDED:

            def descend_resolver(self, current_node: Any, current_index: Any) -> None:
                self.depth += 1
                if self.depth > self.max_depth:
                    mark = getattr(current_node, "start_mark", None)
                    raise ComposerError(
                        None,
                        None,
                        f"nested more than {self.max_depth} levels deep, the limit",
                        mark,
                    )

            def ascend_resolver(self) -> None:
                self.depth -= 1

        else:

            def descend_resolver(self, current_node: Any, current_index: Any) -> None:
                pass  # libyaml bounds nesting; the builder enforces max_depth

            def ascend_resolver(self) -> None:
                pass


def _check_aliases(root: Node, max_alias_nodes: int) -> None:
    """Refuses a recursive alias, and aliases that expand to more than ``max_alias_nodes``
    nodes in all: the expanded size is summed over the node graph (shared nodes once each, by
    identity), never by expanding it."""
    size: dict[int, int] = {}
    on_path: set[int] = set()
    distinct = 0
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            children = _children(node)
            size[key] = 1 + sum([size[id(c)] for c in children])
            continue
        if key in size:
            continue
        if key in on_path:
            raise ComposerError(
                None, None, "an alias inside the node it names (a recursive alias)", node.start_mark
            )
        distinct += 1
        children = _children(node)
        if not children:
            size[key] = 1
            continue
        on_path.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in on_path:
                raise ComposerError(
                    None,
                    None,
                    "an alias inside the node it names (a recursive alias)",
                    child.start_mark,
                )
            if id(child) not in size:
                stack.append((child, False))
    if size[id(root)] - distinct > max_alias_nodes:
        raise ComposerError(
            None,
            None,
            f"aliases expand to more than {max_alias_nodes:,} nodes, the limit for a workflow"
            " file (nested aliases?)",
            root.start_mark,
        )


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


class _Builder:
    """Python values from composed nodes: strings, sequences and mappings here, everything
    else through the safe constructor. Recursion is bounded by the nesting limit, which is
    enforced here (a scalar counts as a level, as in the safe loader)."""

    def __init__(self, loader: Any, shared: bool, max_depth: int) -> None:
        self.loader = loader
        self.max_depth = max_depth
        # Only a document with anchors can have one node in two places.
        self.memo: dict[int, Any] | None = {} if shared else None

    def _too_deep(self, node: Node) -> ComposerError:
        return ComposerError(
            None, None, f"nested more than {self.max_depth} levels deep, the limit", node.start_mark
        )

    def build(self, node: Node, depth: int = 1) -> Any:
        memo = self.memo
        if memo is not None:
            found = memo.get(id(node), memo)
            if found is not memo:
                return found
        if depth > self.max_depth:
            raise self._too_deep(node)
        cls = node.__class__
        tag = node.tag
        out: Any
        if cls is ScalarNode:
            out = self._scalar(node, tag)
        elif cls is SequenceNode and tag == _SEQ:
            out = []
            if memo is not None:
                memo[id(node)] = out
            if node.value and depth >= self.max_depth:
                raise self._too_deep(node.value[0])
            build = self.build
            inner = depth + 1
            for c in node.value:
                out.append(
                    c.value if c.__class__ is ScalarNode and c.tag == _STR else build(c, inner)
                )
        elif cls is MappingNode and tag == _MAP:
            out = {}
            if memo is not None:
                memo[id(node)] = out
            if node.value and depth >= self.max_depth:
                raise self._too_deep(node.value[0][0])
            self._fill(node, out, depth + 1)  # type: ignore[arg-type]  # a MappingNode
        else:  # !!set, !!omap, !!pairs, an explicit tag: PyYAML's safe constructor decides
            out = self.loader.construct_object(node, deep=True)
        if memo is not None:
            memo[id(node)] = out
        return out

    def _scalar(self, node: Node, tag: str) -> Any:
        if tag == _STR:
            return node.value
        if tag == _NULL:
            return None
        if tag == _BOOL:
            return _BOOLS[node.value.lower()]
        return self.loader.construct_object(node, deep=True)

    def _fill(self, node: MappingNode, out: dict[Any, Any], inner: int) -> None:
        pairs = node.value
        merges = False
        build = self.build
        keys = []
        for key_node, _ in pairs:
            if key_node.tag == _MERGE:
                merges = True
                continue
            keys.append(
                key_node.value
                if key_node.__class__ is ScalarNode and key_node.tag == _STR
                else build(key_node, inner)
            )
        try:
            unique = len(set(keys)) == len(keys)
        except TypeError:
            raise ConstructorError(
                "while constructing a mapping", node.start_mark, "found unhashable key", None
            ) from None
        if not unique:
            seen: set[Any] = set()
            own = [p for p in pairs if p[0].tag != _MERGE]
            for (key_node, _), key in zip(own, keys, strict=True):
                if key in seen:
                    raise ConstructorError(
                        None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
                    )
                seen.add(key)
        if merges:
            self.loader.flatten_mapping(node)  # merged pairs first, so the mapping's own win
            pairs = node.value
            keys = [
                k.value if k.__class__ is ScalarNode and k.tag == _STR else build(k, inner)
                for k, _ in pairs
            ]
        for key, (_, value_node) in zip(keys, pairs, strict=True):
            out[key] = (
                value_node.value
                if value_node.__class__ is ScalarNode and value_node.tag == _STR
                else build(value_node, inner)
            )


class _NotTheSame(Exception):
    """The JSON reading of a document might differ from the YAML one."""


_YAML_FLOAT = re.compile(r"[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+][0-9]+)?")
# \uD800-\uDFFF: PyYAML keeps an escaped surrogate pair as two characters, json joins them.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abAB]")
_NON_PRINTABLE = yaml.reader.Reader.NON_PRINTABLE


def _float(text: str) -> float:
    if not _YAML_FLOAT.fullmatch(text):  # 1e3, 1.5e3: strings to YAML 1.1, numbers to JSON
        raise _NotTheSame(text)
    return float(text)


def _constant(text: str) -> Any:
    raise _NotTheSame(text)  # NaN, Infinity: strings to YAML


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _NotTheSame("a repeated key")  # the YAML loader says which, and where
    return out


_decode = json.JSONDecoder(
    object_pairs_hook=_object, parse_float=_float, parse_constant=_constant
).decode


def load_json(text: str, *, max_depth: int) -> Any:
    """``text`` read by the JSON parser, when it is JSON (which is YAML) and the JSON reading
    is certainly what the YAML loader would give; else :data:`NOT_JSON`.

    A generated workflow is often JSON: read this way it takes a twentieth of the time. Only
    what reads the same both ways is taken: no NaN or Infinity, no float the YAML 1.1 resolver
    reads as a string (``1e3``), no escaped surrogate pair, no repeated key, at most
    ``max_depth`` levels (a scalar being one, as the YAML loader counts); anything else is left
    to the YAML loader, which decides (and names the line of any problem).
    """
    if (
        nesting_exceeds(text, max_depth - 1)
        or _SURROGATE_ESCAPE.search(text)
        or _NON_PRINTABLE.search(text)  # what PyYAML's reader refuses, JSON may allow
    ):
        return NOT_JSON
    try:
        return _decode(text)
    except (ValueError, RecursionError, _NotTheSame):
        return NOT_JSON


NOT_JSON: Any = object()


def load(text: str, *, max_depth: int, max_alias_nodes: int) -> Any:
    """The document ``text`` holds (``None`` for an empty one), read with libyaml.

    Raises:
        yaml.YAMLError: malformed, nested more than ``max_depth`` levels, aliases over
            ``max_alias_nodes``, a recursive alias, a repeated key, or a tag the safe loader
            does not construct; with a mark where one is known.
    """
    loader = _Loader(text, max_depth)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        shared = "&" in text  # no anchor, no alias: every node is in one place
        if shared:
            _check_aliases(root, max_alias_nodes)
        return _Builder(loader, shared, max_depth).build(root)
    finally:
        loader.dispose()
